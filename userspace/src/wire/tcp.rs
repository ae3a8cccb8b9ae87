//! TCP segment headers and options (RFC 9293 §3.1), window scale and timestamps (RFC 7323 §2,
//! §3), SACK-permitted and SACK blocks (RFC 2018 §2, §3), and the TCP checksum over the IPv4
//! (RFC 9293 §3.1) or IPv6 (RFC 8200 §8.1) pseudo-header.
//!
//! Owns the header layout and option encoding. Does not own what options mean for a connection
//! (clamping a window scale above 14, PAWS, which options a SYN-ACK carries): that is the `tcp`
//! module's. Options are emitted in the order and alignment Linux uses, so that every option
//! starts on the boundary its RFC recommends and no padding is needed.

use core::fmt;
use core::ops::{BitOr, BitOrAssign};
use std::net::IpAddr;

use super::checksum;
use super::IP_PROTO_TCP;
use super::{
    read_u16, read_u32, write_u16, write_u32, ChecksumMode, ChecksumVerdict, Field, SeqNumber,
    WireError,
};

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ_NUM: Field = 4..8;
    pub const ACK_NUM: Field = 8..12;
    /// Data offset (high nibble), reserved bits and AE (low nibble).
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;

    pub const OPT_END: u8 = 0;
    pub const OPT_NOP: u8 = 1;
    pub const OPT_MSS: u8 = 2;
    pub const OPT_WS: u8 = 3;
    pub const OPT_SACK_PERM: u8 = 4;
    pub const OPT_SACK: u8 = 5;
    pub const OPT_TS: u8 = 8;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = field::URGENT.end;
/// The data offset is 4 bits of 32-bit words: at most 60 bytes, so 40 bytes of options.
pub const MAX_OPTIONS_LEN: usize = 40;
/// At most four SACK blocks fit in the option space (2 + 4 × 8 = 34 bytes; RFC 2018 §3).
pub const MAX_SACK_BLOCKS: usize = 4;

/// The eight flag bits of byte 13 (CWR, ECE, URG, ACK, PSH, RST, SYN, FIN).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);
    pub const ECE: TcpFlags = TcpFlags(0x40);
    pub const CWR: TcpFlags = TcpFlags(0x80);
    pub const NONE: TcpFlags = TcpFlags(0);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set.
    pub const fn intersects(self, other: TcpFlags) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }

    pub const fn difference(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & !other.0)
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        self.union(rhs)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        let mut first = true;
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                f.write_str(if first { "" } else { "|" })?;
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("NONE")?;
        }
        Ok(())
    }
}

/// The TCP checksum's pseudo-header sum for a segment of `len` bytes between `src` and `dst`.
/// Mixed families cannot occur on the wire; they are summed as IPv4-mapped IPv6 addresses so
/// the function stays total.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, len: usize) -> u16 {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(s, d, IP_PROTO_TCP, len),
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            checksum::pseudo_header_v6(&v6(s), &v6(d), IP_PROTO_TCP, len)
        }
    }
}

/// A view of a TCP segment; the buffer is exactly the segment (the IP payload). Invariant
/// after `check_len`: 20 ≤ header_len ≤ buffer length.
#[derive(Debug, Clone)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> TcpPacket<T> {
        TcpPacket { buffer }
    }

    /// Wraps `buffer` and runs [`TcpPacket::check_len`].
    pub fn new_checked(buffer: T) -> Result<TcpPacket<T>, WireError> {
        let packet = TcpPacket::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the fixed header and the data offset against the buffer.
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = usize::from(self.header_len());
        if header_len < HEADER_LEN {
            return Err(WireError::BadHeaderLength);
        }
        if header_len > len {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn src_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    pub fn seq_number(&self) -> SeqNumber {
        SeqNumber(read_u32(self.buffer.as_ref(), field::SEQ_NUM))
    }

    /// The acknowledgment field, meaningful only with the ACK flag.
    pub fn ack_number(&self) -> SeqNumber {
        SeqNumber(read_u32(self.buffer.as_ref(), field::ACK_NUM))
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.buffer.as_ref()[field::FLAGS])
    }

    /// The raw (unscaled) window field.
    pub fn window_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::WINDOW)
    }

    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn urgent_at(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::URGENT)
    }

    /// The option bytes (between the fixed header and the data offset).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.header_len())]
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..]
    }

    /// Length of the whole segment, header included.
    pub fn segment_len(&self) -> usize {
        self.buffer.as_ref().len()
    }

    /// Whether the checksum over the pseudo-header and the whole buffer verifies.
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        let b = self.buffer.as_ref();
        checksum::combine(&[pseudo_header(src, dst, b.len()), checksum::data(b)]) == 0xffff
    }

    /// Whether the checksum field holds exactly the pseudo-header sum: what Linux leaves in a
    /// segment whose checksum the device is to finish (`th->check = ~tcp_v4_check(len, ..)`,
    /// the folded sum, not complemented; the same for IPv6). Captured on veth, it is that sum
    /// over the segment length, for both families. 0x0000 and 0xffff are the same sum
    /// (one's complement zero), so either encoding matches. O(1): the payload is not read.
    pub fn has_partial_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        let expected = pseudo_header(src, dst, self.buffer.as_ref().len());
        let normal = |v: u16| if v == 0 { 0xffff } else { v };
        normal(self.checksum()) == normal(expected)
    }

    /// Checks the checksum as `mode` says (the buffer must have passed `check_len`). The
    /// pseudo-header-only test runs only on a segment whose full checksum failed, so a right
    /// checksum costs one pass over the segment, as with [`ChecksumMode::Compute`].
    pub fn checksum_verdict(
        &self,
        src: IpAddr,
        dst: IpAddr,
        mode: ChecksumMode,
    ) -> Result<ChecksumVerdict, WireError> {
        match mode {
            ChecksumMode::Skip => Ok(ChecksumVerdict::Unchecked),
            _ if self.verify_checksum(src, dst) => Ok(ChecksumVerdict::Complete),
            ChecksumMode::AcceptPartial if self.has_partial_checksum(src, dst) => {
                Ok(ChecksumVerdict::Partial)
            }
            ChecksumMode::Compute | ChecksumMode::AcceptPartial => Err(WireError::BadChecksum),
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    pub fn set_src_port(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::SRC_PORT, value);
    }

    pub fn set_dst_port(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::DST_PORT, value);
    }

    pub fn set_seq_number(&mut self, value: SeqNumber) {
        write_u32(self.buffer.as_mut(), field::SEQ_NUM, value.0);
    }

    pub fn set_ack_number(&mut self, value: SeqNumber) {
        write_u32(self.buffer.as_mut(), field::ACK_NUM, value.0);
    }

    /// Sets the data offset from a header length in bytes (a multiple of 4, 20..=60), clearing
    /// the reserved bits.
    pub fn set_header_len(&mut self, len: u8) {
        self.buffer.as_mut()[field::DATA_OFF] = (len / 4) << 4;
    }

    pub fn set_flags(&mut self, flags: TcpFlags) {
        self.buffer.as_mut()[field::FLAGS] = flags.0;
    }

    pub fn set_window_len(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::WINDOW, value);
    }

    pub fn set_checksum(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    pub fn set_urgent_at(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::URGENT, value);
    }

    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.header_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = usize::from(self.header_len());
        &mut self.buffer.as_mut()[start..]
    }

    /// Computes and writes the checksum over the pseudo-header and the whole buffer.
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        let len = self.buffer.as_ref().len();
        fill_segment_checksum(self.buffer.as_mut(), src, dst, len);
    }
}

/// Writes the checksum of the first `len` bytes of `segment`, a TCP segment.
fn fill_segment_checksum(segment: &mut [u8], src: IpAddr, dst: IpAddr, len: usize) {
    write_u16(segment, field::CHECKSUM, 0);
    let sum = checksum::combine(&[
        pseudo_header(src, dst, len),
        checksum::data(&segment[..len]),
    ]);
    write_u16(segment, field::CHECKSUM, checksum::finish(sum));
}

/// One SACK block (RFC 2018 §3): `left` is the first sequence number of a received block,
/// `right` the one just after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SackBlock {
    pub left: SeqNumber,
    pub right: SeqNumber,
}

/// Up to [`MAX_SACK_BLOCKS`] SACK blocks, inline. Invariant: `len <= MAX_SACK_BLOCKS`; only
/// `blocks[..len]` is meaningful (equality and hashing look at nothing else).
#[derive(Clone, Copy, Default)]
pub struct SackBlocks {
    blocks: [SackBlock; MAX_SACK_BLOCKS],
    len: u8,
}

impl SackBlocks {
    /// Builds from a slice; blocks beyond the fourth are dropped.
    pub fn from_slice(blocks: &[SackBlock]) -> SackBlocks {
        let mut out = SackBlocks::default();
        for &b in blocks {
            out.push(b);
        }
        out
    }

    /// Appends a block; returns false (and drops it) when four are already held.
    pub fn push(&mut self, block: SackBlock) -> bool {
        let len = usize::from(self.len);
        if len == MAX_SACK_BLOCKS {
            return false;
        }
        self.blocks[len] = block;
        self.len += 1;
        true
    }

    /// Keeps only the first `len` blocks.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(u8::try_from(len).unwrap_or(u8::MAX));
    }

    pub fn as_slice(&self) -> &[SackBlock] {
        &self.blocks[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl PartialEq for SackBlocks {
    fn eq(&self, other: &SackBlocks) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SackBlocks {}

impl core::hash::Hash for SackBlocks {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl fmt::Debug for SackBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// The timestamps option (RFC 7323 §3): the sender's clock and the echoed peer clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timestamps {
    pub tsval: u32,
    pub tsecr: u32,
}

/// The options tern understands. Unknown options are skipped on parse; a later duplicate of an
/// option overrides an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpOptions {
    /// Maximum segment size (RFC 9293 §3.7.1); SYN only.
    pub mss: Option<u16>,
    /// Window scale shift count as sent (RFC 7323 §2.3: values above 14 are the receiver's to
    /// clamp); SYN only.
    pub window_scale: Option<u8>,
    /// SACK-permitted (RFC 2018 §2); SYN only.
    pub sack_permitted: bool,
    /// SACK blocks (RFC 2018 §3). On emit, blocks that do not fit beside the other options are
    /// dropped from the end (see [`TcpOptions::max_sack_blocks`]).
    pub sack_blocks: SackBlocks,
    pub timestamps: Option<Timestamps>,
}

impl TcpOptions {
    /// Bytes of everything but the SACK blocks, as [`TcpOptions::emit`] lays them out.
    const fn fixed_len(&self) -> usize {
        let mut len = 0;
        if self.mss.is_some() {
            len += 4;
        }
        if self.timestamps.is_some() {
            // NOP NOP TS, or SACK-permitted TS (Linux's SYN layout); 12 bytes either way.
            len += 12;
        } else if self.sack_permitted {
            len += 4;
        }
        if self.window_scale.is_some() {
            len += 4;
        }
        len
    }

    /// How many SACK blocks fit beside the other options in 40 bytes (RFC 2018 §3: three with
    /// timestamps, four without).
    pub const fn max_sack_blocks(&self) -> usize {
        let room = MAX_OPTIONS_LEN.saturating_sub(self.fixed_len() + 4) / 8;
        if room < MAX_SACK_BLOCKS {
            room
        } else {
            MAX_SACK_BLOCKS
        }
    }

    fn sack_blocks_emitted(&self) -> usize {
        self.sack_blocks.len().min(self.max_sack_blocks())
    }

    /// Encoded length, a multiple of 4 and at most 40.
    pub fn encoded_len(&self) -> usize {
        let sacks = self.sack_blocks_emitted();
        self.fixed_len() + if sacks > 0 { 4 + 8 * sacks } else { 0 }
    }

    /// Parses option bytes; never panics. Errors with [`WireError::BadOption`] on a length byte
    /// that is missing, below 2, beyond the option space, or wrong for a known kind.
    pub fn parse(mut bytes: &[u8]) -> Result<TcpOptions, WireError> {
        let mut opts = TcpOptions::default();
        while let Some((&kind, rest)) = bytes.split_first() {
            match kind {
                field::OPT_END => break,
                field::OPT_NOP => {
                    bytes = rest;
                    continue;
                }
                _ => {}
            }
            let len = usize::from(*rest.first().ok_or(WireError::BadOption)?);
            if len < 2 || len > bytes.len() {
                return Err(WireError::BadOption);
            }
            let data = &bytes[2..len];
            match (kind, data.len()) {
                (field::OPT_MSS, 2) => opts.mss = Some(u16::from_be_bytes([data[0], data[1]])),
                (field::OPT_WS, 1) => opts.window_scale = Some(data[0]),
                (field::OPT_SACK_PERM, 0) => opts.sack_permitted = true,
                (field::OPT_SACK, n)
                    if n > 0 && n.is_multiple_of(8) && n / 8 <= MAX_SACK_BLOCKS =>
                {
                    let mut blocks = SackBlocks::default();
                    for b in data.chunks_exact(8) {
                        blocks.push(SackBlock {
                            left: SeqNumber(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                            right: SeqNumber(u32::from_be_bytes([b[4], b[5], b[6], b[7]])),
                        });
                    }
                    opts.sack_blocks = blocks;
                }
                (field::OPT_TS, 8) => {
                    opts.timestamps = Some(Timestamps {
                        tsval: u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
                        tsecr: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
                    })
                }
                (
                    field::OPT_MSS
                    | field::OPT_WS
                    | field::OPT_SACK_PERM
                    | field::OPT_SACK
                    | field::OPT_TS,
                    _,
                ) => return Err(WireError::BadOption),
                // RFC 9293 §3.1: an unknown option is skipped using its length.
                _ => {}
            }
            bytes = &bytes[len..];
        }
        Ok(opts)
    }

    /// Writes the options into `out`, which must be exactly [`TcpOptions::encoded_len`] bytes.
    /// Layout (Linux's): MSS; SACK-permitted+TS or NOP NOP TS (or NOP NOP SACK-permitted);
    /// NOP WS; NOP NOP SACK. Every option is 4-byte aligned, so no padding is needed.
    pub fn emit(&self, out: &mut [u8]) {
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        if let Some(mss) = self.mss {
            let m = mss.to_be_bytes();
            put(&[field::OPT_MSS, 4, m[0], m[1]]);
        }
        match (self.timestamps, self.sack_permitted) {
            (Some(ts), sack_perm) => {
                if sack_perm {
                    put(&[field::OPT_SACK_PERM, 2]);
                } else {
                    put(&[field::OPT_NOP, field::OPT_NOP]);
                }
                put(&[field::OPT_TS, 10]);
                put(&ts.tsval.to_be_bytes());
                put(&ts.tsecr.to_be_bytes());
            }
            (None, true) => put(&[field::OPT_NOP, field::OPT_NOP, field::OPT_SACK_PERM, 2]),
            (None, false) => {}
        }
        if let Some(ws) = self.window_scale {
            put(&[field::OPT_NOP, field::OPT_WS, 3, ws]);
        }
        let sacks = self.sack_blocks_emitted();
        if sacks > 0 {
            // sacks <= 4, so the length (2 + 8 × sacks) fits a byte.
            put(&[
                field::OPT_NOP,
                field::OPT_NOP,
                field::OPT_SACK,
                2 + 8 * sacks as u8,
            ]);
            for b in &self.sack_blocks.as_slice()[..sacks] {
                put(&b.left.0.to_be_bytes());
                put(&b.right.0.to_be_bytes());
            }
        }
    }
}

/// A parsed TCP header.
///
/// `flags` never contains ACK: the ACK bit is carried by `ack` being `Some` (parse clears it
/// from `flags`; emit sets it iff `ack` is `Some`), so the two cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: SeqNumber,
    /// The acknowledgment number, present iff the ACK flag is set.
    pub ack: Option<SeqNumber>,
    /// Every flag but ACK (see the type's docs). The urgent pointer is not represented: tern
    /// neither uses nor sends urgent data, and emits it as 0.
    pub flags: TcpFlags,
    /// The raw window field (unscaled).
    pub window: u16,
    pub options: TcpOptions,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl TcpRepr {
    /// Parses a segment (the whole IP payload) sent from `src` to `dst`; never panics.
    pub fn parse<T: AsRef<[u8]>>(
        packet: &TcpPacket<T>,
        src: IpAddr,
        dst: IpAddr,
        checksum: ChecksumMode,
    ) -> Result<TcpRepr, WireError> {
        TcpRepr::parse_with_verdict(packet, src, dst, checksum).map(|(repr, _)| repr)
    }

    /// [`TcpRepr::parse`], also saying what was found in the checksum field.
    pub fn parse_with_verdict<T: AsRef<[u8]>>(
        packet: &TcpPacket<T>,
        src: IpAddr,
        dst: IpAddr,
        checksum: ChecksumMode,
    ) -> Result<(TcpRepr, ChecksumVerdict), WireError> {
        packet.check_len()?;
        let verdict = packet.checksum_verdict(src, dst, checksum)?;
        let flags = packet.flags();
        let repr = TcpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq: packet.seq_number(),
            ack: flags.contains(TcpFlags::ACK).then(|| packet.ack_number()),
            flags: flags.difference(TcpFlags::ACK),
            window: packet.window_len(),
            options: TcpOptions::parse(packet.options())?,
            payload_len: packet.payload().len(),
        };
        Ok((repr, verdict))
    }

    /// Header length this repr emits: 20 plus the options.
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options.encoded_len()
    }

    /// Header plus payload.
    pub fn buffer_len(&self) -> usize {
        self.header_len() + self.payload_len
    }

    /// Sequence space this segment occupies: payload plus one each for SYN and FIN.
    pub fn segment_len(&self) -> usize {
        self.payload_len
            + usize::from(self.flags.contains(TcpFlags::SYN))
            + usize::from(self.flags.contains(TcpFlags::FIN))
    }

    /// Writes the header and, unless [`ChecksumMode::Skip`], the checksum over the first
    /// [`TcpRepr::buffer_len`] bytes — so the `payload_len` payload bytes must already be in
    /// place at [`TcpRepr::header_len`] (or be written before calling
    /// [`TcpPacket::fill_checksum`] on a view of exactly `buffer_len` bytes).
    /// Panics if the buffer is shorter than `buffer_len`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut TcpPacket<T>,
        src: IpAddr,
        dst: IpAddr,
        checksum: ChecksumMode,
    ) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_seq_number(self.seq);
        packet.set_ack_number(self.ack.unwrap_or_default());
        let header_len = self.header_len();
        // At most 20 + 40 bytes (TcpOptions::encoded_len caps the options).
        packet.set_header_len(header_len as u8);
        let mut flags = self.flags.difference(TcpFlags::ACK);
        if self.ack.is_some() {
            flags |= TcpFlags::ACK;
        }
        packet.set_flags(flags);
        packet.set_window_len(self.window);
        packet.set_urgent_at(0);
        self.options.emit(packet.options_mut());
        if checksum.computes() {
            fill_segment_checksum(packet.buffer.as_mut(), src, dst, self.buffer_len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_options_are_errors() {
        let cases: [(&[u8], &str); 7] = [
            (&[2], "MSS without a length byte"),
            (&[2, 0, 0, 0], "zero length"),
            (&[2, 1, 0, 0], "length 1"),
            (&[2, 5, 0, 0], "length past the end"),
            (&[2, 3, 0], "MSS of the wrong length"),
            (&[5, 2], "SACK without blocks"),
            (&[8, 6, 0, 0, 0, 0], "short timestamps"),
        ];
        for (bytes, what) in cases {
            assert_eq!(
                TcpOptions::parse(bytes),
                Err(WireError::BadOption),
                "{what}"
            );
        }
    }

    #[test]
    fn unknown_options_and_end_are_tolerated() {
        // Unknown kind 30 (MPTCP) with 4 bytes, NOP, MSS, EOL, then garbage after EOL.
        let bytes = [30, 4, 0xaa, 0xbb, 1, 2, 4, 0x05, 0xb4, 0, 0xff, 0xff];
        let opts = TcpOptions::parse(&bytes).expect("unknown options are skipped");
        assert_eq!(opts.mss, Some(1460));
        assert_eq!(opts.window_scale, None);
    }

    #[test]
    fn sack_blocks_are_limited_by_the_option_space() {
        let mut opts = TcpOptions::default();
        assert_eq!(opts.max_sack_blocks(), 4);
        opts.timestamps = Some(Timestamps { tsval: 1, tsecr: 2 });
        assert_eq!(
            opts.max_sack_blocks(),
            3,
            "RFC 2018 §3: three blocks with timestamps"
        );
        opts.sack_blocks = SackBlocks::from_slice(&[SackBlock::default(); 4]);
        assert_eq!(opts.encoded_len(), 12 + 4 + 24);
        let mut out = [0u8; 40];
        opts.emit(&mut out[..opts.encoded_len()]);
        let parsed = TcpOptions::parse(&out[..opts.encoded_len()]).expect("emitted options parse");
        assert_eq!(
            parsed.sack_blocks.len(),
            3,
            "the fourth block is dropped on emit"
        );
    }

    #[test]
    fn flags_debug_names_bits() {
        assert_eq!(format!("{:?}", TcpFlags::SYN | TcpFlags::ACK), "SYN|ACK");
        assert_eq!(format!("{:?}", TcpFlags::NONE), "NONE");
    }
}
