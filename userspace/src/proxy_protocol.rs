//! PROXY protocol headers tern writes at the start of every backend connection, so that the
//! backend learns the client's real address (and, in version 2, what the TLS handshake
//! negotiated).
//!
//! Owns: the byte-exact encoding of version 1 (text) and version 2 (binary) headers for TCP over
//! IPv4/IPv6, and the v2 TLVs PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY and PP2_TYPE_SSL with the
//! PP2_SUBTYPE_SSL_VERSION / PP2_SUBTYPE_SSL_CN / PP2_SUBTYPE_SSL_CIPHER sub-TLVs and the
//! client-certificate bits (§2.2.6). Does not own: sending the bytes
//! (the proxy core puts them in front of the first plaintext), parsing headers (tern only sends
//! them), the LOCAL command and UNKNOWN/AF_UNSPEC forms (tern always relays a real TCP
//! connection), PP2_TYPE_CRC32C (optional in the spec; TCP already checksums the header, and
//! receivers that ignore the TLV are the common case), and padding (PP2_TYPE_NOOP; not needed).
//!
//! Spec: haproxy's `doc/proxy-protocol.txt` (2020/03/05), §2.1 for version 1 and §2.2 for
//! version 2, §2.2.1–§2.2.6 for the TLVs. Writers append to the caller's `Vec` and allocate
//! nothing else.
//!
//! Address families. Both addresses of a header must be of the advertised family (§2.1: the
//! destination "matches the same family"; v2 has one family byte for both). A kernel socket
//! bound to `[::]` reports IPv4 peers as IPv4-mapped IPv6 (`::ffff:a.b.c.d`, RFC 4291
//! §2.5.5.2), so addresses are normalised first: when both sides are IPv4 or IPv4-mapped the
//! header is TCP4 / 0x11 with plain IPv4 addresses; when at least one side is a real IPv6
//! address the header is TCP6 / 0x21 and an IPv4 side is written as its mapped IPv6 form. The
//! spec recommends against UNKNOWN "when the connection is expected to be accepted", and the
//! mapped form loses nothing.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config;

#[cfg(test)]
mod tests;

/// The 12 bytes every version 2 header starts with (§2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included, a receiver must accept (§2.1). tern's own lines
/// are at most 104 bytes (TCP6 with two 39-character addresses).
pub const MAX_V1_LEN: usize = 107;
/// Version 2 (high nibble), command PROXY (low nibble).
const V2_VERSION_PROXY: u8 = 0x21;
/// Address family byte: AF_INET / AF_INET6 (high nibble), STREAM (low nibble).
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
/// Fixed part of a v2 header: signature, ver_cmd, fam, len.
const V2_HEADER_LEN: usize = 16;

pub const PP2_TYPE_ALPN: u8 = 0x01;
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `client` bit: the client connected over TLS (§2.2.6).
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// `client` bit: the client presented a certificate over this connection.
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// `client` bit: the client presented a certificate at least once over this TLS session (this
/// connection's handshake, or the one that established a resumed session).
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;
/// The `verify` field of PP2_TYPE_SSL. §2.2.6: "zero if the client presented a certificate and
/// it was successfully verified, and non-zero otherwise". tern reports only certificates rustls
/// verified (an unverifiable one fails the handshake), so `verify` is 0 exactly when a client
/// certificate is reported, and this value otherwise. (haproxy leaves it 0 without a client
/// certificate and expects receivers to check the PP2_CLIENT_CERT_* bits first; following the
/// spec's wording means a receiver that reads only `verify` can never mistake an
/// unauthenticated tern connection for a verified client.)
pub const PP2_VERIFY_NO_CLIENT_CERT: u32 = 1;
/// Longest value tern puts in a TLV. Every value comes from a TLS handshake, where each is
/// bounded by this (RFC 7301 protocol names, RFC 6066/1035 host names) or far below it (version
/// and cipher names); a longer one cannot have come from a handshake and is left out rather
/// than sent. This bound keeps a whole header under 1,400 bytes, so its u16 length cannot wrap.
pub const MAX_TLV_VALUE: usize = 255;

/// What a PROXY header describes: the client's connection to tern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader<'a> {
    /// The client's address and port.
    pub source: SocketAddr,
    /// The address and port the client connected to (tern's listener).
    pub destination: SocketAddr,
    /// The negotiated TLS parameters; only version 2 carries them.
    pub tls: Option<TlsInfo<'a>>,
}

/// The TLS facts sent in version 2 TLVs, as strings the backend can log or match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsInfo<'a> {
    /// OpenSSL spelling, e.g. "TLSv1.3" (see `tls::version_name`).
    pub version: &'a str,
    /// The client's SNI, sent as PP2_TYPE_AUTHORITY.
    pub sni: Option<&'a str>,
    /// The negotiated ALPN protocol, sent as PP2_TYPE_ALPN.
    pub alpn: Option<&'a [u8]>,
    /// OpenSSL spelling, e.g. "TLS_AES_128_GCM_SHA256" (see `tls::cipher_name`).
    pub cipher: Option<&'a str>,
    /// The verified client certificate; `None` when the client sent none.
    pub client_cert: Option<ClientCertInfo<'a>>,
}

/// A verified client certificate in PP2_TYPE_SSL: the PP2_CLIENT_CERT_* bits, `verify` = 0 and
/// PP2_SUBTYPE_SSL_CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertInfo<'a> {
    /// Sent in this connection's handshake (PP2_CLIENT_CERT_CONN as well as _SESS).
    pub this_connection: bool,
    /// The subject's commonName, sent as PP2_SUBTYPE_SSL_CN.
    pub cn: Option<&'a str>,
}

/// Appends the header `version` asks for to `out`; [`config::ProxyProtocol::None`] writes
/// nothing.
pub fn write(version: config::ProxyProtocol, h: &ProxyHeader<'_>, out: &mut Vec<u8>) {
    match version {
        config::ProxyProtocol::None => {}
        config::ProxyProtocol::V1 => write_v1(h, out),
        config::ProxyProtocol::V2 => write_v2(h, out),
    }
}

/// Appends a version 1 line (§2.1), e.g. `PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n`.
/// TLS information is not representable in version 1 and is ignored.
pub fn write_v1(h: &ProxyHeader<'_>, out: &mut Vec<u8>) {
    out.reserve(MAX_V1_LEN);
    out.extend_from_slice(b"PROXY ");
    match Addresses::of(h) {
        Addresses::V4(src, dst) => {
            out.extend_from_slice(b"TCP4 ");
            push_v4(out, src);
            out.push(b' ');
            push_v4(out, dst);
        }
        Addresses::V6(src, dst) => {
            out.extend_from_slice(b"TCP6 ");
            push_v6(out, src);
            out.push(b' ');
            push_v6(out, dst);
        }
    }
    out.push(b' ');
    push_decimal(out, h.source.port());
    out.push(b' ');
    push_decimal(out, h.destination.port());
    out.extend_from_slice(b"\r\n");
}

/// Appends a version 2 header (§2.2): signature, PROXY command, TCP4/TCP6, addresses and ports
/// in network byte order, then — when `h.tls` is set — PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY and
/// PP2_TYPE_SSL (client = PP2_CLIENT_SSL plus the PP2_CLIENT_CERT_* bits, verify = 0 with a
/// client certificate and [`PP2_VERIFY_NO_CLIENT_CERT`] without, sub-TLVs
/// PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN and PP2_SUBTYPE_SSL_CIPHER), in that order.
pub fn write_v2(h: &ProxyHeader<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(V2_HEADER_LEN + 36 + h.tls.as_ref().map_or(0, tls_tlvs_len));
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION_PROXY);
    let addresses = Addresses::of(h);
    out.push(match addresses {
        Addresses::V4(..) => V2_TCP4,
        Addresses::V6(..) => V2_TCP6,
    });
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]); // patched below, once the TLVs are known
    match addresses {
        Addresses::V4(src, dst) => {
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        Addresses::V6(src, dst) => {
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
    }
    out.extend_from_slice(&h.source.port().to_be_bytes());
    out.extend_from_slice(&h.destination.port().to_be_bytes());

    if let Some(tls) = &h.tls {
        push_tls_tlvs(out, tls);
    }
    patch_len(out, len_at);
    debug_assert_eq!(
        usize::from(u16::from_be_bytes([out[len_at], out[len_at + 1]])),
        out.len() - start - V2_HEADER_LEN
    );
}

/// The two addresses of a header, normalised to one family (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addresses {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Addresses {
    fn of(h: &ProxyHeader<'_>) -> Addresses {
        let (src, dst) = (h.source.ip(), h.destination.ip());
        match (as_v4(src), as_v4(dst)) {
            (Some(src), Some(dst)) => Addresses::V4(src, dst),
            _ => Addresses::V6(as_v6(src), as_v6(dst)),
        }
    }
}

/// IPv4, or the IPv4 address inside an IPv4-mapped IPv6 address. The deprecated
/// IPv4-compatible form (`::a.b.c.d`) is a real IPv6 address to every current stack, so it stays
/// IPv6.
fn as_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Decimal without leading zeros (§2.1 forbids them: they could be read as octal).
fn push_decimal(out: &mut Vec<u8>, mut n: u16) {
    let mut digits = [0u8; 5];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Lower-case hex without leading zeros.
fn push_hex(out: &mut Vec<u8>, n: u16) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut started = false;
    for shift in [12u32, 8, 4, 0] {
        let nibble = usize::from((n >> shift) & 0xf);
        if nibble != 0 || started || shift == 0 {
            out.push(HEX[nibble]);
            started = true;
        }
    }
}

fn push_v4(out: &mut Vec<u8>, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        push_decimal(out, u16::from(octet));
    }
}

/// The RFC 5952 text form (lower-case hex, no leading zeros, the longest run of two or more
/// zero groups — the first on a tie — as `::`), but never with a dotted-quad tail: §2.1 asks for
/// "sets of 4 hexadecimal digits delimited by colons", which `::ffff:1.2.3.4` is not. This is
/// why `Ipv6Addr`'s `Display` (which prints mapped addresses dotted) is not used.
fn push_v6(out: &mut Vec<u8>, ip: Ipv6Addr) {
    let groups = ip.segments();
    let (mut run_start, mut run_len) = (0, 0);
    let mut i = 0;
    while i < groups.len() {
        if groups[i] == 0 {
            let start = i;
            while i < groups.len() && groups[i] == 0 {
                i += 1;
            }
            if i - start > run_len {
                (run_start, run_len) = (start, i - start);
            }
        } else {
            i += 1;
        }
    }
    if run_len < 2 {
        run_len = 0; // RFC 5952 §4.2.2: a single zero group is written as "0"
    }
    let mut i = 0;
    while i < groups.len() {
        if run_len > 0 && i == run_start {
            out.extend_from_slice(b"::");
            i += run_len;
            continue;
        }
        if i > 0 && !(run_len > 0 && i == run_start + run_len) {
            out.push(b':');
        }
        push_hex(out, groups[i]);
        i += 1;
    }
}

/// Whether a TLV value is sent at all (see [`MAX_TLV_VALUE`]).
fn sendable(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_TLV_VALUE
}

/// Bytes [`push_tls_tlvs`] will write for `tls` (for one `reserve`).
fn tls_tlvs_len(tls: &TlsInfo<'_>) -> usize {
    let tlv = |value: &[u8]| if sendable(value) { 3 + value.len() } else { 0 };
    tls.alpn.map_or(0, tlv)
        + tls.sni.map_or(0, |s| tlv(s.as_bytes()))
        + 3
        + 1
        + 4
        + tlv(tls.version.as_bytes())
        + tls
            .client_cert
            .and_then(|c| c.cn)
            .map_or(0, |cn| tlv(cn.as_bytes()))
        + tls.cipher.map_or(0, |c| tlv(c.as_bytes()))
}

fn push_tls_tlvs(out: &mut Vec<u8>, tls: &TlsInfo<'_>) {
    if let Some(alpn) = tls.alpn.filter(|a| sendable(a)) {
        push_tlv(out, PP2_TYPE_ALPN, alpn);
    }
    if let Some(sni) = tls.sni.filter(|s| sendable(s.as_bytes())) {
        push_tlv(out, PP2_TYPE_AUTHORITY, sni.as_bytes());
    }

    // struct pp2_tlv_ssl { uint8_t client; uint32_t verify; struct pp2_tlv sub_tlv[0]; },
    // the TLV's length covering client, verify and every sub-TLV.
    out.push(PP2_TYPE_SSL);
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let (client, verify) = match &tls.client_cert {
        None => (PP2_CLIENT_SSL, PP2_VERIFY_NO_CLIENT_CERT),
        Some(c) if c.this_connection => (
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
            0,
        ),
        Some(_) => (PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS, 0),
    };
    out.push(client);
    out.extend_from_slice(&verify.to_be_bytes());
    if sendable(tls.version.as_bytes()) {
        push_tlv(out, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
    }
    // haproxy's order: version, CN, cipher (the sub-type numbers' order too).
    if let Some(cn) = tls
        .client_cert
        .and_then(|c| c.cn)
        .filter(|cn| sendable(cn.as_bytes()))
    {
        push_tlv(out, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    if let Some(cipher) = tls.cipher.filter(|c| sendable(c.as_bytes())) {
        push_tlv(out, PP2_SUBTYPE_SSL_CIPHER, cipher.as_bytes());
    }
    patch_len(out, len_at);
}

/// `struct pp2_tlv { uint8_t type; uint8_t length_hi; uint8_t length_lo; uint8_t value[0]; }`.
/// Callers pass values of at most [`MAX_TLV_VALUE`] bytes.
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// Writes, big-endian at `at`, the number of bytes after the two length bytes.
fn patch_len(out: &mut [u8], at: usize) {
    // Bounded by construction: 36 address bytes plus at most five TLVs of MAX_TLV_VALUE bytes
    // and their headers, far below u16::MAX.
    let len = (out.len() - at - 2) as u16;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
}
