//! ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) error messages as far as path-MTU discovery needs
//! them: the message type and code, the reported MTU (RFC 1191 §4 "Fragmentation Needed and DF
//! set" next-hop MTU, RFC 4443 §3.2 "Packet Too Big" MTU) and the quoted invoking packet's IP
//! addresses plus the first 8 bytes of its TCP header (ports and sequence number — RFC 792 and
//! RFC 1812 §4.3.2.3 guarantee at least those 8 bytes, RFC 4443 §2.4(c) quotes as much as fits).
//!
//! Owns the byte layout of those messages, their checksum (ICMPv4: the message alone; ICMPv6:
//! with the RFC 8200 §8.1 pseudo-header, next header 58) and a whole-frame parse and emit. Does
//! not own what a message means for a connection (the stack's PMTU handling and RFC 5927 checks).
//!
//! The quoted header is parsed by hand rather than with [`Ipv4Packet`](super::Ipv4Packet):
//! a quote is truncated, so its length fields describe bytes that are not there. A quoted IPv4
//! packet must be the first fragment (offset 0) and TCP; a quoted IPv6 packet must carry TCP
//! directly (extension headers are not walked). Anything else parses with `quoted: None`.
//!
//! Panic contract as in the parent module: [`parse_icmp_frame`] never panics; [`emit_icmp_frame`]
//! returns [`WireError::BufferTooSmall`] / [`WireError::TooLong`] rather than panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::checksum;
use super::ethernet::EtherType;
use super::{
    ChecksumMode, EthernetFrame, EthernetRepr, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
    SeqNumber, WireError, IP_PROTO_TCP,
};

/// IP protocol number of ICMP (IPv4).
pub const IP_PROTO_ICMP: u8 = 1;
/// Next-header value of ICMPv6.
pub const IP_PROTO_ICMPV6: u8 = 58;
/// ICMPv4 "Destination Unreachable" (RFC 792).
pub const ICMPV4_DEST_UNREACHABLE: u8 = 3;
/// Its code "fragmentation needed and DF set" (RFC 792, RFC 1191 §4).
pub const ICMPV4_FRAG_NEEDED: u8 = 4;
/// ICMPv6 "Packet Too Big" (RFC 4443 §3.2).
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// Fixed ICMP header: type, code, checksum, 4 type-specific bytes.
const HEADER_LEN: usize = 8;

/// The TCP segment an ICMP error quotes: the invoking packet's endpoints (as it was sent, so
/// `src` is ours for a segment we sent) and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotedTcp {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: SeqNumber,
}

/// A parsed ICMP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpRepr {
    /// ICMPv6 (RFC 4443) rather than ICMPv4.
    pub v6: bool,
    pub icmp_type: u8,
    pub code: u8,
    /// The reported MTU for [`is_packet_too_big`](Self::is_packet_too_big) messages (an ICMPv4
    /// message from a pre-RFC 1191 router says 0), else 0.
    pub mtu: u32,
    /// The quoted TCP segment, when the message quotes one.
    pub quoted: Option<QuotedTcp>,
}

impl IcmpRepr {
    /// ICMPv4 type 3 code 4 or ICMPv6 type 2: the messages path-MTU discovery acts on.
    pub fn is_packet_too_big(&self) -> bool {
        if self.v6 {
            self.icmp_type == ICMPV6_PACKET_TOO_BIG
        } else {
            self.icmp_type == ICMPV4_DEST_UNREACHABLE && self.code == ICMPV4_FRAG_NEEDED
        }
    }
}

/// A parsed Ethernet/IP/ICMP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpFrame {
    pub eth: EthernetRepr,
    pub ip: IpRepr,
    pub icmp: IcmpRepr,
}

/// Parses a whole frame carrying ICMPv4 or ICMPv6; never panics. Non-ICMP payloads are
/// [`WireError::UnsupportedProtocol`]; a message shorter than its fixed header is
/// [`WireError::Truncated`]; unless [`ChecksumMode::Skip`], a wrong ICMP checksum is
/// [`WireError::BadChecksum`].
pub fn parse_icmp_frame(frame: &[u8], checksum: ChecksumMode) -> Result<IcmpFrame, WireError> {
    let eth_frame = EthernetFrame::new_checked(frame)?;
    let eth = EthernetRepr::parse(&eth_frame)?;
    let l3 = &frame[eth_frame.header_len()..];
    let (ip, message) = match eth.ethertype {
        EtherType::IPV4 => {
            let packet = Ipv4Packet::new_unchecked(l3);
            let repr = Ipv4Repr::parse(&packet, checksum)?;
            if repr.protocol != IP_PROTO_ICMP {
                return Err(WireError::UnsupportedProtocol);
            }
            // In bounds: parse ran check_len (header_len <= total_len <= l3.len()).
            let range = usize::from(packet.header_len())..usize::from(packet.total_len());
            (IpRepr::V4(repr), &l3[range])
        }
        EtherType::IPV6 => {
            let packet = Ipv6Packet::new_unchecked(l3);
            let repr = Ipv6Repr::parse(&packet)?;
            if repr.next_header != IP_PROTO_ICMPV6 {
                return Err(WireError::UnsupportedProtocol);
            }
            // In bounds: parse ran check_len (40 + payload_len <= l3.len()).
            (IpRepr::V6(repr), &l3[packet.payload_range()])
        }
        _ => return Err(WireError::UnsupportedEtherType),
    };
    if message.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    if checksum.computes() && icmp_sum(&ip, message) != 0xffff {
        return Err(WireError::BadChecksum);
    }
    let v6 = matches!(ip, IpRepr::V6(_));
    let (icmp_type, code) = (message[0], message[1]);
    let rest = [message[4], message[5], message[6], message[7]];
    let mut icmp = IcmpRepr {
        v6,
        icmp_type,
        code,
        mtu: 0,
        quoted: None,
    };
    if icmp.is_packet_too_big() {
        // RFC 1191 §4: the low 16 bits of the second word; RFC 4443 §3.2: all 32.
        icmp.mtu = if v6 {
            u32::from_be_bytes(rest)
        } else {
            u32::from(u16::from_be_bytes([rest[2], rest[3]]))
        };
    }
    icmp.quoted = parse_quoted(&message[HEADER_LEN..], v6);
    Ok(IcmpFrame { eth, ip, icmp })
}

/// One's-complement sum over an ICMP message (plus the pseudo-header for ICMPv6); 0xffff when
/// the checksum field is right.
fn icmp_sum(ip: &IpRepr, message: &[u8]) -> u16 {
    match ip {
        IpRepr::V4(_) => checksum::data(message),
        IpRepr::V6(r) => checksum::combine(&[
            checksum::pseudo_header_v6(
                &r.src_addr,
                &r.dst_addr,
                IP_PROTO_ICMPV6,
                message.len() as u32,
            ),
            checksum::data(message),
        ]),
    }
}

/// The quoted packet's TCP endpoints and sequence number, if it is a TCP segment's head.
fn parse_quoted(q: &[u8], v6: bool) -> Option<QuotedTcp> {
    let (src, dst, tcp) = if v6 {
        if q.len() < 48 || q[0] >> 4 != 6 || q[6] != IP_PROTO_TCP {
            return None;
        }
        let src: [u8; 16] = q[8..24].try_into().ok()?;
        let dst: [u8; 16] = q[24..40].try_into().ok()?;
        (
            IpAddr::V6(Ipv6Addr::from(src)),
            IpAddr::V6(Ipv6Addr::from(dst)),
            &q[40..],
        )
    } else {
        let ihl = usize::from(q.first()? & 0x0f) * 4;
        let frag_offset = u16::from_be_bytes([*q.get(6)?, *q.get(7)?]) & 0x1fff;
        if q[0] >> 4 != 4 || ihl < 20 || q.len() < ihl + 8 || q[9] != IP_PROTO_TCP {
            return None;
        }
        if frag_offset != 0 {
            return None; // Not the first fragment: no TCP header in it.
        }
        (
            IpAddr::V4(Ipv4Addr::new(q[12], q[13], q[14], q[15])),
            IpAddr::V4(Ipv4Addr::new(q[16], q[17], q[18], q[19])),
            &q[ihl..],
        )
    };
    Some(QuotedTcp {
        src: SocketAddr::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        seq: SeqNumber(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]])),
    })
}

/// Builds an ICMP error frame into `buf` and returns its length: `ip` is the outer header (its
/// protocol and length are derived), `icmp_type`/`code`/`mtu` as in [`IcmpRepr`] (`mtu` lands
/// in the type-specific word of a packet-too-big message, else that word is zero), `quoted` the
/// invoking packet's bytes from its IP header on. For tests, fuzzing and tools: the stack itself
/// never sends ICMP.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per field of the message, as the other emit functions take reprs"
)]
pub fn emit_icmp_frame(
    buf: &mut [u8],
    eth: &EthernetRepr,
    ip: &IpRepr,
    icmp_type: u8,
    code: u8,
    mtu: u32,
    quoted: &[u8],
    checksum: ChecksumMode,
) -> Result<usize, WireError> {
    let ip_off = eth.buffer_len();
    let icmp_off = ip_off + ip.buffer_len();
    let message_len = HEADER_LEN + quoted.len();
    let total = icmp_off + message_len;
    if total > buf.len() {
        return Err(WireError::BufferTooSmall);
    }
    if message_len + ip.buffer_len() > usize::from(u16::MAX) {
        return Err(WireError::TooLong);
    }
    let (v6, ethertype) = match ip {
        IpRepr::V4(_) => (false, EtherType::IPV4),
        IpRepr::V6(_) => (true, EtherType::IPV6),
    };
    EthernetRepr { ethertype, ..*eth }.emit(&mut EthernetFrame::new_unchecked(&mut buf[..ip_off]));
    match ip {
        IpRepr::V4(r) => Ipv4Repr {
            protocol: IP_PROTO_ICMP,
            payload_len: message_len,
            ..*r
        }
        .emit(
            &mut Ipv4Packet::new_unchecked(&mut buf[ip_off..icmp_off]),
            checksum,
        ),
        IpRepr::V6(r) => Ipv6Repr {
            next_header: IP_PROTO_ICMPV6,
            payload_len: message_len,
            ..*r
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut buf[ip_off..icmp_off])),
    }
    let message = &mut buf[icmp_off..total];
    message[0] = icmp_type;
    message[1] = code;
    message[2..4].fill(0);
    let repr = IcmpRepr {
        v6,
        icmp_type,
        code,
        mtu,
        quoted: None,
    };
    let word = if !repr.is_packet_too_big() {
        0
    } else if v6 {
        mtu
    } else {
        mtu & 0xffff
    };
    message[4..8].copy_from_slice(&word.to_be_bytes());
    message[HEADER_LEN..].copy_from_slice(quoted);
    if checksum.computes() {
        let sum = checksum::finish(icmp_sum(ip, message));
        message[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{emit_tcp_frame, EthernetAddress, TcpFlags, TcpOptions, TcpRepr};

    fn eth() -> EthernetRepr {
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 9]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            vlan: None,
            ethertype: EtherType::IPV4,
        }
    }

    fn v4(src: [u8; 4], dst: [u8; 4]) -> IpRepr {
        IpRepr::V4(Ipv4Repr {
            src_addr: Ipv4Addr::from(src),
            dst_addr: Ipv4Addr::from(dst),
            protocol: 0,
            payload_len: 0,
            ttl: 64,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: true,
        })
    }

    fn v6(src: u128, dst: u128) -> IpRepr {
        IpRepr::V6(Ipv6Repr {
            src_addr: Ipv6Addr::from(src),
            dst_addr: Ipv6Addr::from(dst),
            next_header: 0,
            payload_len: 0,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
        })
    }

    /// A 1000-byte data segment from 443 to 40000 with sequence `seq`; returns its bytes from
    /// the IP header on (what an ICMP error quotes, untruncated).
    fn segment(ip: &IpRepr, seq: u32) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 443,
            dst_port: 40_000,
            seq: SeqNumber(seq),
            ack: Some(SeqNumber(5)),
            flags: TcpFlags::NONE,
            window: 100,
            options: TcpOptions::default(),
            payload_len: 0,
        };
        let mut buf = vec![0; 2000];
        let n = emit_tcp_frame(
            &mut buf,
            &eth(),
            ip,
            &tcp,
            &[7; 1000],
            ChecksumMode::Compute,
        )
        .expect("fits");
        buf[14..n].to_vec()
    }

    fn build(ip: &IpRepr, icmp_type: u8, code: u8, mtu: u32, quoted: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; 2000];
        let n = emit_icmp_frame(
            &mut buf,
            &eth(),
            ip,
            icmp_type,
            code,
            mtu,
            quoted,
            ChecksumMode::Compute,
        )
        .expect("fits");
        buf.truncate(n);
        buf
    }

    #[test]
    fn frag_needed_v4_parses_mtu_and_quote() {
        let ours = v4([10, 0, 0, 1], [10, 0, 0, 2]);
        let quoted = segment(&ours, 0xdead_beef);
        // RFC 792: the IP header plus 8 bytes; RFC 1812 routers quote more, both must parse.
        for len in [28, 576 - 28, quoted.len()] {
            let f = build(
                &v4([192, 0, 2, 1], [10, 0, 0, 1]),
                3,
                4,
                1400,
                &quoted[..len],
            );
            let p = parse_icmp_frame(&f, ChecksumMode::Compute).expect("parses");
            assert!(p.icmp.is_packet_too_big(), "type 3 code 4");
            assert_eq!(p.icmp.mtu, 1400, "next-hop MTU");
            assert_eq!(
                p.icmp.quoted,
                Some(QuotedTcp {
                    src: "10.0.0.1:443".parse().expect("addr"),
                    dst: "10.0.0.2:40000".parse().expect("addr"),
                    seq: SeqNumber(0xdead_beef),
                }),
                "quote of {len} bytes"
            );
            assert_eq!(p.ip.src_addr(), IpAddr::from([192, 0, 2, 1]), "router");
        }
        // Too short a quote (7 TCP bytes): no ports+seq, so no quote.
        let f = build(
            &v4([192, 0, 2, 1], [10, 0, 0, 1]),
            3,
            4,
            1400,
            &quoted[..27],
        );
        let p = parse_icmp_frame(&f, ChecksumMode::Compute).expect("parses");
        assert_eq!(p.icmp.quoted, None, "short quote");
    }

    #[test]
    fn packet_too_big_v6_parses_mtu_and_quote() {
        let ours = v6(0xfd00_0000_0000_0000_0000_0000_0000_0001, 0xfd00 << 112 | 2);
        let quoted = segment(&ours, 77);
        let f = build(&v6(0x2001_0db8 << 96, 1), 2, 0, 1280, &quoted[..48]);
        let p = parse_icmp_frame(&f, ChecksumMode::Compute).expect("parses");
        assert!(p.icmp.v6 && p.icmp.is_packet_too_big(), "type 2");
        assert_eq!(p.icmp.mtu, 1280, "MTU");
        let q = p.icmp.quoted.expect("quoted TCP");
        assert_eq!(
            (q.src.port(), q.dst.port(), q.seq),
            (443, 40_000, SeqNumber(77)),
            "quoted ports and seq"
        );
        assert_eq!(q.src.ip(), ours.src_addr(), "quoted source is ours");
    }

    #[test]
    fn checksums_are_verified_and_other_messages_are_told_apart() {
        let ours = v4([10, 0, 0, 1], [10, 0, 0, 2]);
        let quoted = segment(&ours, 1);
        for ip in [v4([192, 0, 2, 1], [10, 0, 0, 1]), v6(9, 1)] {
            let mut f = build(&ip, 3, 4, 1400, &quoted[..28]);
            let last = f.len() - 1;
            f[last] ^= 1;
            assert_eq!(
                parse_icmp_frame(&f, ChecksumMode::Compute),
                Err(WireError::BadChecksum),
                "flipped bit caught"
            );
            assert!(
                parse_icmp_frame(&f, ChecksumMode::Skip).is_ok(),
                "not checked when skipped"
            );
        }
        // Port unreachable (3/3) and ICMPv6 type 1: parsed, not packet-too-big, MTU 0.
        let f = build(
            &v4([192, 0, 2, 1], [10, 0, 0, 1]),
            3,
            3,
            1400,
            &quoted[..28],
        );
        let p = parse_icmp_frame(&f, ChecksumMode::Compute).expect("parses");
        assert!(!p.icmp.is_packet_too_big() && p.icmp.mtu == 0, "3/3");
        let f = build(&v6(9, 1), 1, 4, 1400, &quoted[..28]);
        let p = parse_icmp_frame(&f, ChecksumMode::Compute).expect("parses");
        assert!(!p.icmp.is_packet_too_big(), "v6 type 1");
        assert_eq!(
            p.icmp.quoted, None,
            "an IPv4 quote in ICMPv6 is not a quote"
        );
        // A quoted non-first fragment has no TCP header.
        let mut frag = quoted[..28].to_vec();
        frag[7] = 1;
        let f = build(&v4([192, 0, 2, 1], [10, 0, 0, 1]), 3, 4, 1400, &frag);
        let p = parse_icmp_frame(&f, ChecksumMode::Compute).expect("parses");
        assert_eq!(p.icmp.quoted, None, "fragment quote");
        // A TCP frame is not ICMP.
        let mut buf = vec![0; 2000];
        buf[..12].copy_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 9]);
        buf[12..14].copy_from_slice(&[0x08, 0x00]);
        buf[14..14 + quoted.len()].copy_from_slice(&quoted);
        assert_eq!(
            parse_icmp_frame(&buf[..14 + quoted.len()], ChecksumMode::Compute),
            Err(WireError::UnsupportedProtocol),
            "TCP"
        );
    }

    #[test]
    fn truncations_and_noise_never_panic() {
        let quoted = segment(&v4([10, 0, 0, 1], [10, 0, 0, 2]), 1);
        let f = build(
            &v4([192, 0, 2, 1], [10, 0, 0, 1]),
            3,
            4,
            1400,
            &quoted[..60],
        );
        for n in 0..f.len() {
            assert!(
                parse_icmp_frame(&f[..n], ChecksumMode::Compute).is_err(),
                "prefix of {n} bytes is an error"
            );
        }
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..20_000 {
            let mut g = f.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % g.len();
                g[i] = (x >> 32) as u8;
            }
            let _ = parse_icmp_frame(&g, ChecksumMode::Skip);
        }
    }

    #[test]
    fn emit_refuses_small_buffers() {
        let mut buf = [0u8; 40];
        assert_eq!(
            emit_icmp_frame(
                &mut buf,
                &eth(),
                &v4([1, 1, 1, 1], [2, 2, 2, 2]),
                3,
                4,
                1400,
                &[0; 28],
                ChecksumMode::Compute
            ),
            Err(WireError::BufferTooSmall),
            "refused"
        );
    }
}
