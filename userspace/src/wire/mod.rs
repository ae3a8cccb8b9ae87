//! Zero-copy typed views over the bytes of Ethernet, IPv4, IPv6 and TCP frames, their parsed
//! representations (`Repr`s), the Internet checksum and TCP sequence-number arithmetic.
//!
//! Owns: the byte layout of every header tern's user-space TCP stack reads or writes on the
//! bypass path, the ICMP errors path-MTU discovery reads (`icmp`), and nothing else — no state,
//! no policy, no allocation, no I/O. What a segment *means* (state machine, SYN cookies, PAWS,
//! what a packet-too-big does to a connection) belongs to the `tcp` module.
//!
//! The shape follows smoltcp's `wire` module: each header has a view `Packet<T: AsRef<[u8]>>`
//! over a buffer (getters need `AsRef`, setters `AsMut`) with a private `mod field` of byte
//! ranges, and a plain-data `Repr` with `parse`, `buffer_len` and `emit`.
//!
//! # Panic contract
//! - `new_unchecked` does no checking; accessors of an unchecked view may panic on a short buffer.
//! - After `check_len()` (or `new_checked`) has returned `Ok`, **no accessor panics**, whatever
//!   the bytes say: every length field an accessor relies on has been checked against the
//!   buffer.
//! - **`Repr::parse` never panics on any input**, and [`parse_tcp_frame`] neither; malformed
//!   input yields a [`WireError`], whose variants are the reasons the stack counts drops by.
//! - `emit` panics only on a caller bug: a buffer shorter than the `Repr`'s `buffer_len()`, or
//!   a `payload_len` the IP length field cannot hold. [`emit_tcp_frame`] checks both and returns
//!   [`WireError::BufferTooSmall`] / [`WireError::TooLong`] instead.
//!
//! Specifications: IEEE 802.3 / 802.1Q (Ethernet and one VLAN tag), RFC 791 (IPv4), RFC 8200
//! (IPv6; §8.1 upper-layer checksums), RFC 9293 (TCP; §3.1 header and pseudo-header, §3.4
//! sequence numbers), RFC 7323 (window scale, timestamps), RFC 2018 (SACK), RFC 1071 and
//! RFC 1624 (the Internet checksum and its incremental update), RFC 792 / RFC 1191 §4 (ICMPv4
//! "fragmentation needed") and RFC 4443 §3.2 (ICMPv6 "packet too big").

#![forbid(unsafe_code)]

pub mod checksum;
mod ethernet;
mod frame;
mod icmp;
mod ipv4;
mod ipv6;
mod seq;
mod tcp;

#[cfg(test)]
mod tests;

pub use ethernet::{EtherType, EthernetAddress, EthernetFrame, EthernetRepr, VlanTag};
pub use frame::{
    emit_tcp_frame, emit_tcp_frame_headers, emit_tcp_frame_headers_summed, parse_tcp_frame,
    tcp_payload_offset, IpRepr, TcpFrame,
};
pub use icmp::{
    emit_icmp_frame, parse_icmp_frame, IcmpFrame, IcmpRepr, QuotedTcp, ICMPV4_DEST_UNREACHABLE,
    ICMPV4_FRAG_NEEDED, ICMPV6_PACKET_TOO_BIG, IP_PROTO_ICMP, IP_PROTO_ICMPV6,
};
pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use seq::SeqNumber;
pub use tcp::pseudo_header as tcp_pseudo_header;
pub use tcp::{
    SackBlock, SackBlocks, TcpFlags, TcpOptions, TcpPacket, TcpRepr, Timestamps, MAX_SACK_BLOCKS,
};

/// IP protocol number of TCP (IANA "Assigned Internet Protocol Numbers").
pub const IP_PROTO_TCP: u8 = 6;

/// A byte range of a header field.
type Field = core::ops::Range<usize>;

/// Whether checksums are computed: verified by `parse`, filled in by `emit`.
///
/// AF_XDP offers no receive checksum offload, so the stack verifies in software. A sender that
/// hands its device a TCP segment to finish (Linux's CHECKSUM_PARTIAL: TX checksum offload on)
/// leaves only the pseudo-header sum in the checksum field; a NIC completes it on the wire, but
/// veth passes the frame on as it is, so a veth peer with default offloads sends exactly that.
/// [`ChecksumMode::AcceptPartial`] tells those frames from damaged ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumMode {
    /// `parse` rejects a wrong checksum with [`WireError::BadChecksum`]; `emit` fills it in.
    Compute,
    /// As `Compute`, except that `parse` also accepts a TCP segment whose checksum field holds
    /// exactly its pseudo-header sum (what a partial-checksum sender leaves, checked on Linux
    /// veth for IPv4 and IPv6) and reports it as [`ChecksumVerdict::Partial`]. The IPv4 header
    /// and ICMP checksums are always complete, so they are verified as with `Compute`. A frame
    /// whose full checksum verifies costs nothing more than with `Compute`.
    AcceptPartial,
    /// `parse` does not look at the checksum; `emit` leaves the field as it is.
    Skip,
}

impl ChecksumMode {
    /// Whether `parse` verifies checksums and `emit` computes them.
    pub const fn computes(self) -> bool {
        !matches!(self, ChecksumMode::Skip)
    }
}

/// What `parse` found in a TCP segment's checksum field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumVerdict {
    /// The full checksum verifies.
    Complete,
    /// Only the pseudo-header sum is there (accepted by [`ChecksumMode::AcceptPartial`] only).
    Partial,
    /// Not looked at ([`ChecksumMode::Skip`]).
    Unchecked,
}

/// Why a frame could not be parsed or emitted. One variant per reason the stack counts drops
/// by, hence `Copy + Eq + Hash` and [`WireError::ALL`] / [`WireError::index`] for counter arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than a header, or than a length field says.
    #[error("truncated frame")]
    Truncated,
    /// The IP version nibble is not the one of the header being parsed.
    #[error("bad IP version")]
    BadVersion,
    /// A header-length field (IPv4 IHL, TCP data offset) is below the minimum or beyond the
    /// packet.
    #[error("bad header length")]
    BadHeaderLength,
    /// A checksum does not verify.
    #[error("bad checksum")]
    BadChecksum,
    /// A TCP option has an illegal length (RFC 9293 §3.1: "MUST be prepared to handle an
    /// illegal option length (e.g., zero)").
    #[error("malformed TCP option")]
    BadOption,
    /// The EtherType is neither IPv4 nor IPv6 (after at most one 802.1Q tag).
    #[error("unsupported EtherType")]
    UnsupportedEtherType,
    /// The IP payload is not TCP (IPv6: including any extension header).
    #[error("unsupported IP protocol")]
    UnsupportedProtocol,
    /// An IPv4 fragment: the stack never reassembles (its segments carry DF).
    #[error("IPv4 fragment")]
    Fragmented,
    /// `emit` was given a buffer too small for the frame.
    #[error("buffer too small to emit the frame")]
    BufferTooSmall,
    /// `emit` was given a payload longer than the IP length field can describe.
    #[error("payload too long for the IP length field")]
    TooLong,
}

impl WireError {
    /// Every variant, in [`WireError::index`] order.
    pub const ALL: [WireError; 10] = [
        WireError::Truncated,
        WireError::BadVersion,
        WireError::BadHeaderLength,
        WireError::BadChecksum,
        WireError::BadOption,
        WireError::UnsupportedEtherType,
        WireError::UnsupportedProtocol,
        WireError::Fragmented,
        WireError::BufferTooSmall,
        WireError::TooLong,
    ];

    /// A dense index in `0..ALL.len()`, for per-reason drop counters.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A short snake_case name for metrics output.
    pub const fn name(self) -> &'static str {
        match self {
            WireError::Truncated => "truncated",
            WireError::BadVersion => "bad_version",
            WireError::BadHeaderLength => "bad_header_length",
            WireError::BadChecksum => "bad_checksum",
            WireError::BadOption => "bad_option",
            WireError::UnsupportedEtherType => "unsupported_ethertype",
            WireError::UnsupportedProtocol => "unsupported_protocol",
            WireError::Fragmented => "fragmented",
            WireError::BufferTooSmall => "buffer_too_small",
            WireError::TooLong => "too_long",
        }
    }
}

/// Big-endian reads and writes of fixed-width fields. Callers pass ranges that `check_len` has
/// validated (or that are within a fixed-size minimum header).
fn read_u16(buf: &[u8], field: Field) -> u16 {
    let b = &buf[field];
    u16::from_be_bytes([b[0], b[1]])
}

fn read_u32(buf: &[u8], field: Field) -> u32 {
    let b = &buf[field];
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn write_u16(buf: &mut [u8], field: Field, value: u16) {
    buf[field].copy_from_slice(&value.to_be_bytes());
}

fn write_u32(buf: &mut [u8], field: Field, value: u32) {
    buf[field].copy_from_slice(&value.to_be_bytes());
}
