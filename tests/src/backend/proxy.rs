//! The PROXY-protocol-aware backend: parses the v1 or v2 header a proxy puts in front of a
//! connection, reports it on a channel, then serves HTTP/1.1 like the demo backend.
//!
//! The parser ([`parse_proxy_header`]) is written from haproxy's `proxy-protocol.txt` alone,
//! independently of tern's encoder, so a test compares two readings of the spec:
//! - v1 (§2.1): `PROXY` SP (`TCP4`|`TCP6`|`UNKNOWN`) SP src SP dst SP sport SP dport CRLF, at
//!   most 107 bytes, exactly one space between fields, no leading zeroes in IPv4 octets or
//!   ports, no lone CR or LF; for `UNKNOWN` the rest of the line is ignored.
//! - v2 (§2.2): the 12-byte signature, version 2 in the high nibble of byte 13 and command
//!   LOCAL/PROXY in the low one, family/transport in byte 14 (unassigned values rejected),
//!   big-endian length, address block (12/36/216 bytes), then TLVs (§2.2.1–2.2.7) which must
//!   tile the rest exactly; a CRC32C TLV is verified (§2.2.3, CRC32c of RFC 4960 App. B).
//!   For LOCAL the whole address block is ignored, as the spec requires.
//!
//! The receiver tolerates a header split over several reads (the spec recommends tolerance).

use super::http::{self, Context};
use super::{hex, serve, Io};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line including CRLF (`PROXY UNKNOWN` with two full IPv6 addresses).
const V1_MAX: usize = 107;
/// Most bytes kept in [`ProxyRecord::raw`] for a header that failed to parse.
const RAW_KEEP: usize = 16 + 65535;

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_CRC32C: u8 = 0x03;
const PP2_TYPE_NOOP: u8 = 0x04;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
const PP2_TYPE_NETNS: u8 = 0x30;

/// Which header version a [`proxy_aware`] backend accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyExpect {
    /// Only the text header.
    V1,
    /// Only the binary header.
    V2,
    /// Either.
    Any,
}

/// The header version that was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// v2 command (v1 headers are always `Proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCommand {
    /// 0x0: a connection of the proxy's own (health check); addresses are ignored.
    Local,
    /// 0x1: relayed on behalf of the client in `source`.
    Proxy,
}

/// Address family (v2 high nibble of byte 14; v1 `TCP4` = Inet, `TCP6` = Inet6,
/// `UNKNOWN` = Unspec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFamily {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

/// Transport (v2 low nibble of byte 14; v1 `TCP4`/`TCP6` = Stream, `UNKNOWN` = Unspec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyTransport {
    Unspec,
    Stream,
    Dgram,
}

/// One v2 TLV (or SSL sub-TLV), as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub kind: u8,
    pub value: Vec<u8>,
}

/// The PP2_TYPE_SSL TLV (§2.2.6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SslInfo {
    /// Bit field: 0x01 PP2_CLIENT_SSL, 0x02 CERT_CONN, 0x04 CERT_SESS.
    pub client: u8,
    /// Zero iff a client certificate was presented and verified.
    pub verify: u32,
    /// PP2_SUBTYPE_SSL_VERSION, e.g. "TLSv1.3".
    pub version: Option<String>,
    /// PP2_SUBTYPE_SSL_CN.
    pub cn: Option<String>,
    /// PP2_SUBTYPE_SSL_CIPHER.
    pub cipher: Option<String>,
    /// PP2_SUBTYPE_SSL_SIG_ALG.
    pub sig_alg: Option<String>,
    /// PP2_SUBTYPE_SSL_KEY_ALG.
    pub key_alg: Option<String>,
    /// Every sub-TLV in order, including the ones above.
    pub sub_tlvs: Vec<Tlv>,
}

/// A parsed PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: ProxyVersion,
    pub command: ProxyCommand,
    pub family: ProxyFamily,
    pub transport: ProxyTransport,
    /// The client's address and port; `None` for LOCAL, UNSPEC/UNKNOWN and AF_UNIX.
    pub source: Option<SocketAddr>,
    /// The address and port the client connected to; `None` as for `source`.
    pub destination: Option<SocketAddr>,
    /// AF_UNIX source and destination paths (NUL padding removed).
    pub unix: Option<(Vec<u8>, Vec<u8>)>,
    /// Every top-level TLV in order (v2 only), including the ones decoded below.
    pub tlvs: Vec<Tlv>,
    /// PP2_TYPE_ALPN: the negotiated protocol, e.g. `b"http/1.1"`.
    pub alpn: Option<Vec<u8>>,
    /// PP2_TYPE_AUTHORITY: the SNI host name.
    pub authority: Option<String>,
    /// PP2_TYPE_CRC32C value, already verified against the header.
    pub crc32c: Option<u32>,
    /// PP2_TYPE_UNIQUE_ID (≤ 128 bytes).
    pub unique_id: Option<Vec<u8>>,
    /// PP2_TYPE_SSL.
    pub ssl: Option<SslInfo>,
    /// PP2_TYPE_NETNS.
    pub netns: Option<String>,
    /// Header length on the wire in bytes (v1 line with CRLF, or 16 + v2 length).
    pub len: usize,
}

/// Why a header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header (starts with {0})")]
    NotProxy(String),
    #[error("connection closed after {0} bytes, before a complete PROXY header")]
    Truncated(usize),
    #[error("v1: no CRLF within the first {V1_MAX} bytes")]
    V1TooLong,
    #[error("v1: lone CR or LF at byte {0}")]
    V1BareLineEnd(usize),
    #[error("v1: {0}")]
    V1Syntax(String),
    #[error("v2: version nibble is {0:#x}, must be 0x2")]
    V2Version(u8),
    #[error("v2: command {0:#x} is neither LOCAL (0x0) nor PROXY (0x1)")]
    V2Command(u8),
    #[error("v2: address family {0:#x} is unassigned")]
    V2Family(u8),
    #[error("v2: transport protocol {0:#x} is unassigned")]
    V2Transport(u8),
    #[error("v2: length {len} is shorter than the {need}-byte address block")]
    V2ShortAddresses { len: usize, need: usize },
    #[error("v2: TLV at header offset {0} runs past the end of the header")]
    V2TlvOverrun(usize),
    #[error("v2: {0}")]
    V2Tlv(String),
    #[error("v2: CRC32c mismatch: header carries {got:#010x}, computed {computed:#010x}")]
    V2Crc32c { got: u32, computed: u32 },
    #[error("expected a {expected:?} header, got {got:?}")]
    WrongVersion {
        expected: ProxyExpect,
        got: ProxyVersion,
    },
    #[error("reading the header failed: {0}")]
    Io(String),
}

/// What a [`proxy_aware`] backend saw at the start of one connection.
#[derive(Debug, Clone)]
pub struct ProxyRecord {
    /// The TCP peer of the backend connection (tern's side).
    pub peer: SocketAddr,
    /// The header bytes exactly as received (on failure: everything received, capped).
    pub raw: Vec<u8>,
    /// The parsed header, or why it was rejected (the connection is then closed).
    pub header: Result<ProxyHeader, ProxyError>,
}

impl ProxyRecord {
    /// The header; panics with the error and the raw bytes if it was rejected.
    #[track_caller]
    pub fn expect_header(&self) -> &ProxyHeader {
        match &self.header {
            Ok(h) => h,
            Err(e) => panic!(
                "backend rejected the PROXY header from {}: {e}\nraw ({} bytes): {}\nas text: {:?}",
                self.peer,
                self.raw.len(),
                hex(&self.raw),
                String::from_utf8_lossy(&self.raw)
            ),
        }
    }
}

impl fmt::Display for ProxyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        })
    }
}

/// Starts a backend on its own thread that reads a PROXY header (`expect` says which version
/// is acceptable) on every connection, sends a [`ProxyRecord`] per connection, and then serves
/// HTTP/1.1 exactly like `demo_http` (its `GET /` body adds a `proxied-client:` line); a
/// rejected header closes the connection. A connection closed before a complete header is
/// reported as [`ProxyError::Truncated`], except one closed before its first byte (a TCP
/// health probe), which is not reported. Runs until `stop` is set.
pub fn proxy_aware(
    listener: TcpListener,
    expect: ProxyExpect,
    stop: Arc<AtomicBool>,
) -> Receiver<ProxyRecord> {
    spawn_proxy_aware(listener, expect, stop).0
}

pub(crate) fn spawn_proxy_aware(
    listener: TcpListener,
    expect: ProxyExpect,
    stop: Arc<AtomicBool>,
) -> (Receiver<ProxyRecord>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    // Sender is Send but not Sync; connection threads each take a clone under the lock.
    let tx = Mutex::new(tx);
    let thread = std::thread::Builder::new()
        .name("proxy-aware".into())
        .spawn(move || {
            serve(listener, stop, "proxy-aware", move |stream, peer, stop| {
                let tx = tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                proxy_connection(stream, peer, stop, expect, &tx);
            });
        })
        .expect("cannot spawn the proxy-aware backend thread");
    (rx, thread)
}

fn proxy_connection(
    stream: TcpStream,
    peer: SocketAddr,
    stop: &AtomicBool,
    expect: ProxyExpect,
    tx: &Sender<ProxyRecord>,
) {
    let mut io = Io::new(stream, stop);
    let parsed = loop {
        match parse_proxy_header(&io.buf) {
            Ok(Some(found)) => break Ok(found),
            Ok(None) => match io.fill() {
                // Closed without a byte: a TCP health probe (tern's active backend health),
                // not a proxied connection; it leaves no record.
                Ok(0) if io.buf.is_empty() => return,
                Ok(0) => break Err(ProxyError::Truncated(io.buf.len())),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => return,
                Err(e) => break Err(ProxyError::Io(e.to_string())),
            },
            Err(e) => break Err(e),
        }
    };
    let parsed = parsed.and_then(|(header, len)| match (expect, header.version) {
        (ProxyExpect::V1, ProxyVersion::V2) | (ProxyExpect::V2, ProxyVersion::V1) => {
            Err(ProxyError::WrongVersion {
                expected: expect,
                got: header.version,
            })
        }
        _ => Ok((header, len)),
    });
    let (record, serve_from) = match parsed {
        Ok((header, len)) => {
            let raw = io.buf[..len].to_vec();
            let proxied = header.source;
            (
                ProxyRecord {
                    peer,
                    raw,
                    header: Ok(header),
                },
                Some((len, proxied)),
            )
        }
        Err(e) => (
            ProxyRecord {
                peer,
                raw: io.buf[..io.buf.len().min(RAW_KEEP)].to_vec(),
                header: Err(e),
            },
            None,
        ),
    };
    // The test may have stopped listening; the backend carries on regardless.
    let _ = tx.send(record);
    if let Some((len, proxied)) = serve_from {
        io.consume(len);
        let ctx = Context { peer, proxied };
        let _ = http::serve_connection(&mut io, &ctx);
    }
    // A rejected header: dropping `io` closes the connection (the spec says abort).
}

/// Parses a PROXY header at the start of `buf`.
///
/// `Ok(Some((header, len)))`: a complete header of `len` bytes. `Ok(None)`: everything so far
/// is a valid prefix; read more. `Err`: not a valid header (close the connection).
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // §2.2: the two versions are told apart by their first bytes; a prefix of either
    // signature may still become a header.
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy(hex(&buf[..buf.len().min(16)])))
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    if buf[end] == b'\n' {
        return Err(ProxyError::V1BareLineEnd(end));
    }
    if end + 2 > V1_MAX {
        return Err(ProxyError::V1TooLong);
    }
    match buf.get(end + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::V1BareLineEnd(end)),
    }
    let syntax = |what: &str| ProxyError::V1Syntax(what.to_string());
    let line = std::str::from_utf8(&buf[..end])
        .ok()
        .filter(|l| l.is_ascii())
        .ok_or_else(|| syntax("line is not US-ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    if fields[0] != "PROXY" || fields.len() < 2 {
        return Err(syntax("line does not start with `PROXY` SP protocol"));
    }
    let len = end + 2;
    let (family, is_v6) = match fields[1] {
        "UNKNOWN" => {
            // §2.1: the receiver must ignore anything before the CRLF.
            return Ok(Some((
                empty_header(
                    ProxyVersion::V1,
                    ProxyCommand::Proxy,
                    ProxyFamily::Unspec,
                    len,
                ),
                len,
            )));
        }
        "TCP4" => (ProxyFamily::Inet, false),
        "TCP6" => (ProxyFamily::Inet6, true),
        other => return Err(ProxyError::V1Syntax(format!("unknown protocol {other:?}"))),
    };
    if fields.len() != 6 {
        return Err(ProxyError::V1Syntax(format!(
            "{} has {} space-separated fields, expected 6 (exactly one space between each)",
            fields[1],
            fields.len()
        )));
    }
    let src = v1_address(fields[2], is_v6)?;
    let dst = v1_address(fields[3], is_v6)?;
    let sport = v1_port(fields[4])?;
    let dport = v1_port(fields[5])?;
    let mut header = empty_header(ProxyVersion::V1, ProxyCommand::Proxy, family, len);
    header.transport = ProxyTransport::Stream;
    header.source = Some(SocketAddr::new(src, sport));
    header.destination = Some(SocketAddr::new(dst, dport));
    Ok(Some((header, len)))
}

/// A decimal number without leading zeroes ("0" itself is fine), as v1 requires for IPv4 octets
/// and ports.
fn v1_decimal(text: &str, max: u32, what: &str) -> Result<u32, ProxyError> {
    let ok = !text.is_empty()
        && text.len() <= 5
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    let value = if ok { text.parse::<u32>().ok() } else { None };
    value
        .filter(|&v| v <= max)
        .ok_or_else(|| ProxyError::V1Syntax(format!("bad {what} {text:?}")))
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    v1_decimal(text, 65535, "port").map(|p| p as u16)
}

fn v1_address(text: &str, is_v6: bool) -> Result<IpAddr, ProxyError> {
    if is_v6 {
        // Hex digit groups and colons only (no embedded dotted quad, no zone), then std's
        // parser checks the grouping and the single `::`.
        let charset_ok = !text.is_empty()
            && text.len() <= 39
            && text.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        return charset_ok
            .then(|| text.parse::<Ipv6Addr>().ok())
            .flatten()
            .map(IpAddr::V6)
            .ok_or_else(|| ProxyError::V1Syntax(format!("bad IPv6 address {text:?}")));
    }
    let octets: Vec<&str> = text.split('.').collect();
    if octets.len() != 4 {
        return Err(ProxyError::V1Syntax(format!("bad IPv4 address {text:?}")));
    }
    let mut out = [0u8; 4];
    for (slot, octet) in out.iter_mut().zip(&octets) {
        *slot = v1_decimal(octet, 255, "IPv4 octet")? as u8;
    }
    Ok(IpAddr::V4(Ipv4Addr::from(out)))
}

fn empty_header(
    version: ProxyVersion,
    command: ProxyCommand,
    family: ProxyFamily,
    len: usize,
) -> ProxyHeader {
    ProxyHeader {
        version,
        command,
        family,
        transport: ProxyTransport::Unspec,
        source: None,
        destination: None,
        unix: None,
        tlvs: Vec::new(),
        alpn: None,
        authority: None,
        crc32c: None,
        unique_id: None,
        ssl: None,
        netns: None,
        len,
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.len() > 12 && buf[12] >> 4 != 2 {
        return Err(ProxyError::V2Version(buf[12] >> 4));
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < total {
        return Ok(None);
    }
    let header = &buf[..total];
    let command = match header[12] & 0x0f {
        0x0 => ProxyCommand::Local,
        0x1 => ProxyCommand::Proxy,
        other => return Err(ProxyError::V2Command(other)),
    };
    if command == ProxyCommand::Local {
        // §2.2: "discard the protocol block including the family which is ignored".
        let mut h = empty_header(ProxyVersion::V2, command, ProxyFamily::Unspec, total);
        h.transport = ProxyTransport::Unspec;
        return Ok(Some((h, total)));
    }
    let (family, addr_len) = match header[13] >> 4 {
        0x0 => (ProxyFamily::Unspec, 0),
        0x1 => (ProxyFamily::Inet, 12),
        0x2 => (ProxyFamily::Inet6, 36),
        0x3 => (ProxyFamily::Unix, 216),
        other => return Err(ProxyError::V2Family(other)),
    };
    let transport = match header[13] & 0x0f {
        0x0 => ProxyTransport::Unspec,
        0x1 => ProxyTransport::Stream,
        0x2 => ProxyTransport::Dgram,
        other => return Err(ProxyError::V2Transport(other)),
    };
    if total - 16 < addr_len {
        return Err(ProxyError::V2ShortAddresses {
            len: total - 16,
            need: addr_len,
        });
    }
    let mut h = empty_header(ProxyVersion::V2, command, family, total);
    h.transport = transport;
    let a = &header[16..16 + addr_len];
    let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    match family {
        ProxyFamily::Unspec => {}
        ProxyFamily::Inet => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            h.source = Some(SocketAddr::new(ip(0), port(8)));
            h.destination = Some(SocketAddr::new(ip(4), port(10)));
        }
        ProxyFamily::Inet6 => {
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            h.source = Some(SocketAddr::new(ip(0), port(32)));
            h.destination = Some(SocketAddr::new(ip(16), port(34)));
        }
        ProxyFamily::Unix => {
            let path = |p: &[u8]| p[..p.iter().position(|&b| b == 0).unwrap_or(p.len())].to_vec();
            h.unix = Some((path(&a[..108]), path(&a[108..216])));
        }
    }
    let tlv_start = 16 + addr_len;
    let tlvs = parse_tlvs(header, tlv_start)?;
    let mut crc_at = None;
    let mut offset = tlv_start;
    for tlv in &tlvs {
        let value_at = offset + 3;
        offset = value_at + tlv.value.len();
        decode_tlv(&mut h, tlv, value_at, &mut crc_at)?;
    }
    h.tlvs = tlvs;
    if let (Some(got), Some(at)) = (h.crc32c, crc_at) {
        let mut zeroed = header.to_vec();
        zeroed[at..at + 4].fill(0);
        let computed = crc32c(&zeroed);
        if computed != got {
            return Err(ProxyError::V2Crc32c { got, computed });
        }
    }
    Ok(Some((h, total)))
}

/// TLVs in `bytes[start..]`, which they must cover exactly.
fn parse_tlvs(bytes: &[u8], start: usize) -> Result<Vec<Tlv>, ProxyError> {
    let mut tlvs = Vec::new();
    let mut at = start;
    while at < bytes.len() {
        if at + 3 > bytes.len() {
            return Err(ProxyError::V2TlvOverrun(at));
        }
        let len = usize::from(u16::from_be_bytes([bytes[at + 1], bytes[at + 2]]));
        if at + 3 + len > bytes.len() {
            return Err(ProxyError::V2TlvOverrun(at));
        }
        tlvs.push(Tlv {
            kind: bytes[at],
            value: bytes[at + 3..at + 3 + len].to_vec(),
        });
        at += 3 + len;
    }
    Ok(tlvs)
}

fn tlv_text(tlv: &Tlv, what: &str, ascii: bool) -> Result<String, ProxyError> {
    std::str::from_utf8(&tlv.value)
        .ok()
        .filter(|s| !ascii || s.is_ascii())
        .map(str::to_string)
        .ok_or_else(|| ProxyError::V2Tlv(format!("{what} TLV is not valid text")))
}

fn set_once<T>(slot: &mut Option<T>, value: T, what: &str) -> Result<(), ProxyError> {
    if slot.is_some() {
        return Err(ProxyError::V2Tlv(format!("duplicate {what} TLV")));
    }
    *slot = Some(value);
    Ok(())
}

fn decode_tlv(
    h: &mut ProxyHeader,
    tlv: &Tlv,
    value_at: usize,
    crc_at: &mut Option<usize>,
) -> Result<(), ProxyError> {
    match tlv.kind {
        PP2_TYPE_ALPN => set_once(&mut h.alpn, tlv.value.clone(), "ALPN"),
        PP2_TYPE_AUTHORITY => {
            let text = tlv_text(tlv, "AUTHORITY", false)?;
            set_once(&mut h.authority, text, "AUTHORITY")
        }
        PP2_TYPE_CRC32C => {
            let v: [u8; 4] = tlv.value.as_slice().try_into().map_err(|_| {
                ProxyError::V2Tlv(format!("CRC32C TLV has {} bytes, not 4", tlv.value.len()))
            })?;
            *crc_at = Some(value_at);
            set_once(&mut h.crc32c, u32::from_be_bytes(v), "CRC32C")
        }
        PP2_TYPE_NOOP => Ok(()),
        PP2_TYPE_UNIQUE_ID => {
            if tlv.value.len() > 128 {
                return Err(ProxyError::V2Tlv(format!(
                    "UNIQUE_ID TLV has {} bytes, at most 128 allowed",
                    tlv.value.len()
                )));
            }
            set_once(&mut h.unique_id, tlv.value.clone(), "UNIQUE_ID")
        }
        PP2_TYPE_SSL => {
            let v = &tlv.value;
            if v.len() < 5 {
                return Err(ProxyError::V2Tlv(format!(
                    "SSL TLV has {} bytes, needs at least 5 (client, verify)",
                    v.len()
                )));
            }
            let mut ssl = SslInfo {
                client: v[0],
                verify: u32::from_be_bytes([v[1], v[2], v[3], v[4]]),
                sub_tlvs: parse_tlvs(v, 5).map_err(|_| {
                    ProxyError::V2Tlv("SSL sub-TLVs run past the end of the SSL TLV".into())
                })?,
                ..SslInfo::default()
            };
            for sub in ssl.sub_tlvs.clone() {
                match sub.kind {
                    PP2_SUBTYPE_SSL_VERSION => {
                        let t = tlv_text(&sub, "SSL_VERSION", true)?;
                        set_once(&mut ssl.version, t, "SSL_VERSION")?;
                    }
                    PP2_SUBTYPE_SSL_CN => {
                        let t = tlv_text(&sub, "SSL_CN", false)?;
                        set_once(&mut ssl.cn, t, "SSL_CN")?;
                    }
                    PP2_SUBTYPE_SSL_CIPHER => {
                        let t = tlv_text(&sub, "SSL_CIPHER", true)?;
                        set_once(&mut ssl.cipher, t, "SSL_CIPHER")?;
                    }
                    PP2_SUBTYPE_SSL_SIG_ALG => {
                        let t = tlv_text(&sub, "SSL_SIG_ALG", true)?;
                        set_once(&mut ssl.sig_alg, t, "SSL_SIG_ALG")?;
                    }
                    PP2_SUBTYPE_SSL_KEY_ALG => {
                        let t = tlv_text(&sub, "SSL_KEY_ALG", true)?;
                        set_once(&mut ssl.key_alg, t, "SSL_KEY_ALG")?;
                    }
                    _ => {}
                }
            }
            set_once(&mut h.ssl, ssl, "SSL")
        }
        PP2_TYPE_NETNS => {
            let text = tlv_text(tlv, "NETNS", true)?;
            set_once(&mut h.netns, text, "NETNS")
        }
        _ => Ok(()),
    }
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), RFC 4960 Appendix B.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
