//! Whole frames: Ethernet (+ optional 802.1Q tag) + IPv4 or IPv6 + TCP, parsed in one call and
//! emitted into a caller's buffer (a UMEM frame) in one call.
//!
//! Owns the layering: which EtherType and protocol numbers go with which header, and the
//! length fields that link them. Does not own anything a single header owns (see the sibling
//! modules) nor what the segment means (the `tcp` module).

use std::net::IpAddr;

use super::ethernet::EtherType;
use super::{checksum, tcp};
use super::{
    ChecksumMode, ChecksumVerdict, EthernetFrame, EthernetRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet,
    Ipv6Repr, TcpPacket, TcpRepr, WireError, IP_PROTO_TCP,
};

/// The network-layer header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpRepr {
    V4(Ipv4Repr),
    V6(Ipv6Repr),
}

impl IpRepr {
    pub fn src_addr(&self) -> IpAddr {
        match self {
            IpRepr::V4(r) => IpAddr::V4(r.src_addr),
            IpRepr::V6(r) => IpAddr::V6(r.src_addr),
        }
    }

    pub fn dst_addr(&self) -> IpAddr {
        match self {
            IpRepr::V4(r) => IpAddr::V4(r.dst_addr),
            IpRepr::V6(r) => IpAddr::V6(r.dst_addr),
        }
    }

    /// Length of the IP payload in bytes.
    pub fn payload_len(&self) -> usize {
        match self {
            IpRepr::V4(r) => r.payload_len,
            IpRepr::V6(r) => r.payload_len,
        }
    }

    /// Header length this repr emits (20 or 40).
    pub fn buffer_len(&self) -> usize {
        match self {
            IpRepr::V4(r) => r.buffer_len(),
            IpRepr::V6(r) => r.buffer_len(),
        }
    }

    fn ethertype(&self) -> EtherType {
        match self {
            IpRepr::V4(_) => EtherType::IPV4,
            IpRepr::V6(_) => EtherType::IPV6,
        }
    }
}

/// A parsed Ethernet/IP/TCP frame borrowing its payload from the frame bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFrame<'a> {
    pub eth: EthernetRepr,
    pub ip: IpRepr,
    pub tcp: TcpRepr,
    /// The TCP payload (`tcp.payload_len` bytes), Ethernet padding excluded.
    pub payload: &'a [u8],
    /// What the TCP checksum field held (the IPv4 header checksum, if checked, verified).
    pub checksum: ChecksumVerdict,
}

/// Parses a whole frame as the stack receives it from AF_XDP; never panics. Anything that is
/// not TCP over IPv4/IPv6 is an `Unsupported*` error (the XDP program only redirects TCP to
/// listened ports, so those are counted, not expected).
pub fn parse_tcp_frame(frame: &[u8], checksum: ChecksumMode) -> Result<TcpFrame<'_>, WireError> {
    let eth_frame = EthernetFrame::new_checked(frame)?;
    let eth = EthernetRepr::parse(&eth_frame)?;
    let l3 = &frame[eth_frame.header_len()..];
    let (ip, segment) = match eth.ethertype {
        EtherType::IPV4 => {
            let packet = Ipv4Packet::new_unchecked(l3);
            let repr = Ipv4Repr::parse(&packet, checksum)?;
            if repr.protocol != IP_PROTO_TCP {
                return Err(WireError::UnsupportedProtocol);
            }
            // In bounds: parse ran check_len (header_len <= total_len <= l3.len()).
            let range = usize::from(packet.header_len())..usize::from(packet.total_len());
            (IpRepr::V4(repr), &l3[range])
        }
        EtherType::IPV6 => {
            let packet = Ipv6Packet::new_unchecked(l3);
            let repr = Ipv6Repr::parse(&packet)?;
            if repr.next_header != IP_PROTO_TCP {
                return Err(WireError::UnsupportedProtocol);
            }
            // In bounds: parse ran check_len (40 + payload_len <= l3.len()).
            (IpRepr::V6(repr), &l3[packet.payload_range()])
        }
        _ => return Err(WireError::UnsupportedEtherType),
    };
    let packet = TcpPacket::new_unchecked(segment);
    let (tcp, verdict) =
        TcpRepr::parse_with_verdict(&packet, ip.src_addr(), ip.dst_addr(), checksum)?;
    // In bounds: parse ran check_len (header_len <= segment.len()).
    let payload = &segment[usize::from(packet.header_len())..];
    Ok(TcpFrame {
        eth,
        ip,
        tcp,
        payload,
        checksum: verdict,
    })
}

/// Offset of the TCP payload in a frame built from these reprs, for callers that write the
/// payload in place (e.g. sealing a TLS record straight into the UMEM frame) before calling
/// [`emit_tcp_frame_headers`].
pub fn tcp_payload_offset(eth: &EthernetRepr, ip: &IpRepr, tcp: &TcpRepr) -> usize {
    eth.buffer_len() + ip.buffer_len() + tcp.header_len()
}

/// Writes the Ethernet, IP and TCP headers of a frame whose `tcp.payload_len` payload bytes are
/// already at [`tcp_payload_offset`], computes the checksums (unless [`ChecksumMode::Skip`])
/// and returns the frame length.
///
/// The linking fields are derived, not taken from the reprs: `eth.ethertype` from the IP
/// version, the IP protocol/next header (TCP) and payload length from `tcp`.
pub fn emit_tcp_frame_headers(
    buf: &mut [u8],
    eth: &EthernetRepr,
    ip: &IpRepr,
    tcp: &TcpRepr,
    checksum: ChecksumMode,
) -> Result<usize, WireError> {
    let ip_off = eth.buffer_len();
    let tcp_off = ip_off + ip.buffer_len();
    let total = tcp_off + tcp.buffer_len();
    if total > buf.len() {
        return Err(WireError::BufferTooSmall);
    }
    let segment_len = tcp.buffer_len();
    let eth = EthernetRepr {
        ethertype: ip.ethertype(),
        ..*eth
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..ip_off]));
    let l3 = &mut buf[ip_off..total];
    match ip {
        IpRepr::V4(r) => {
            if ip.buffer_len() + segment_len > usize::from(u16::MAX) {
                return Err(WireError::TooLong);
            }
            let r = Ipv4Repr {
                protocol: IP_PROTO_TCP,
                payload_len: segment_len,
                ..*r
            };
            r.emit(&mut Ipv4Packet::new_unchecked(l3), checksum);
        }
        IpRepr::V6(r) => {
            if segment_len > usize::from(u16::MAX) {
                return Err(WireError::TooLong);
            }
            let r = Ipv6Repr {
                next_header: IP_PROTO_TCP,
                payload_len: segment_len,
                ..*r
            };
            r.emit(&mut Ipv6Packet::new_unchecked(l3));
        }
    }
    let mut packet = TcpPacket::new_unchecked(&mut buf[tcp_off..total]);
    tcp.emit(&mut packet, ip.src_addr(), ip.dst_addr(), checksum);
    Ok(total)
}

/// [`emit_tcp_frame_headers`] for a payload already in place whose one's-complement sum is
/// known (`payload_sum`, from [`checksum::copy_and_sum`] while it was copied there): the TCP
/// checksum then covers the pseudo-header and the header only, and the payload is not read
/// again. The IPv4 header checksum is computed as usual.
pub fn emit_tcp_frame_headers_summed(
    buf: &mut [u8],
    eth: &EthernetRepr,
    ip: &IpRepr,
    tcp: &TcpRepr,
    payload_sum: u16,
) -> Result<usize, WireError> {
    let total = emit_tcp_frame_headers(buf, eth, ip, tcp, ChecksumMode::Skip)?;
    let ip_off = eth.buffer_len();
    let tcp_off = ip_off + ip.buffer_len();
    if let IpRepr::V4(_) = ip {
        Ipv4Packet::new_unchecked(&mut buf[ip_off..tcp_off]).fill_checksum();
    }
    let header_end = tcp_off + tcp.header_len();
    TcpPacket::new_unchecked(&mut buf[tcp_off..header_end]).set_checksum(0);
    let sum = checksum::combine(&[
        tcp::pseudo_header(ip.src_addr(), ip.dst_addr(), tcp.buffer_len()),
        checksum::data(&buf[tcp_off..header_end]),
        payload_sum,
    ]);
    TcpPacket::new_unchecked(&mut buf[tcp_off..header_end]).set_checksum(checksum::finish(sum));
    Ok(total)
}

/// Builds a whole frame into `buf` — what the stack calls to emit a segment — copying
/// `payload` into place, and returns the frame length. `tcp.payload_len` is taken from
/// `payload.len()`; see [`emit_tcp_frame_headers`] for the other derived fields.
pub fn emit_tcp_frame(
    buf: &mut [u8],
    eth: &EthernetRepr,
    ip: &IpRepr,
    tcp: &TcpRepr,
    payload: &[u8],
    checksum: ChecksumMode,
) -> Result<usize, WireError> {
    let tcp = TcpRepr {
        payload_len: payload.len(),
        ..*tcp
    };
    let start = tcp_payload_offset(eth, ip, &tcp);
    let end = start + payload.len();
    buf.get_mut(start..end)
        .ok_or(WireError::BufferTooSmall)?
        .copy_from_slice(payload);
    emit_tcp_frame_headers(buf, eth, ip, &tcp, checksum)
}
