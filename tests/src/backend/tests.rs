//! Tests of the backends against real clients on loopback (curl, plain `TcpStream`) and of the
//! PROXY parser against byte vectors from the spec and from haproxy's own output.

use super::http::parse_head;
use super::proxy::crc32c;
use super::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

fn loopback_listener() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0")
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    s
}

#[track_caller]
fn curl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl (is it installed?)");
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn read_to_end(mut s: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read until EOF");
    out
}

#[test]
fn pattern_is_deterministic_and_not_short_periodic() {
    let mut a = vec![0u8; 4096];
    pattern_fill(1000, &mut a);
    assert_eq!(a[0], pattern_byte(1000));
    assert_eq!(a[4095], pattern_byte(5095));
    for period in [1u64, 2, 256, 4096, 65536] {
        let same = (0..1024u64)
            .filter(|&i| pattern_byte(i) == pattern_byte(i + period))
            .count();
        assert!(
            same < 64,
            "pattern looks periodic with period {period}: {same}/1024 equal"
        );
    }
    // Known answer for the empty input: SHA-256 of nothing.
    assert_eq!(
        pattern_sha256_hex(0),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn request_heads_parse_per_rfc_9112() {
    let req = parse_head(
        b"POST /x?y HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .expect("valid request");
    assert_eq!(req.method, "POST");
    assert_eq!(req.target, "/x?y");
    assert_eq!(req.content_length, 5);
    assert!(req.keep_alive && req.expect_continue && !req.transfer_encoding);
    let req = parse_head(b"GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n").expect("valid");
    assert!(
        !req.keep_alive,
        "Connection: close in a token list is honoured"
    );
    let req = parse_head(b"GET / HTTP/1.0\r\n\r\n").expect("valid");
    assert!(!req.keep_alive, "HTTP/1.0 closes by default");
    let req = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("valid");
    assert!(req.keep_alive, "HTTP/1.0 keep-alive on request");
    for bad in [
        &b"GET /  HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"\x16\x03\x01\x02\x00\r\n\r\n",
    ] {
        assert!(
            parse_head(bad).is_err(),
            "accepted {:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn demo_http_serves_curl_get_bytes_and_post() {
    let backend = Backend::demo_http(loopback_listener());
    let base = format!("http://{}", backend.addr());
    let body = String::from_utf8(curl(&[&format!("{base}/hi")])).expect("utf-8 body");
    assert!(
        body.starts_with("hello from tern demo backend\n") && body.contains("path: /hi\n"),
        "unexpected body: {body:?}"
    );
    // Three requests on one connection: the per-connection request counter goes 1, 2, 3.
    let three = String::from_utf8(curl(&[&base, &base, &base])).expect("utf-8");
    for n in 1..=3 {
        assert!(
            three.contains(&format!("request: {n}\n")),
            "keep-alive broken: {three:?}"
        );
    }
    let bytes = curl(&[&format!("{base}/bytes/300000")]);
    assert_eq!(bytes.len(), 300_000);
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64)),
        "/bytes/N content differs from pattern_byte"
    );
    // 2 MB POST: curl sends Expect: 100-continue, reads the echo while still sending.
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let dir = crate::rig::TempDir::new("post");
    let file = dir.join("payload");
    std::fs::write(&file, &payload).expect("write payload");
    let echoed = curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{base}/echo"),
    ]);
    assert!(
        echoed == payload,
        "POST echo differs ({} bytes back)",
        echoed.len()
    );
}

#[test]
fn demo_http_honours_connection_close_and_rejects_garbage() {
    let backend = Backend::demo_http(loopback_listener());
    let mut s = connect(backend.addr());
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let reply = String::from_utf8(read_to_end(s)).expect("utf-8 reply");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "reply: {reply:?}");
    assert!(reply.contains("Connection: close\r\n"), "reply: {reply:?}");

    let mut s = connect(backend.addr());
    s.write_all(b"\x16\x03\x01 this is not http\r\n\r\n")
        .expect("send garbage");
    let reply = String::from_utf8_lossy(&read_to_end(s)).into_owned();
    assert!(
        reply.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "reply: {reply:?}"
    );

    // HEAD gets the length but no body; a pipelined GET after it is answered on the same
    // connection.
    let mut s = connect(backend.addr());
    s.write_all(
        b"HEAD /bytes/10 HTTP/1.1\r\n\r\nGET /bytes/3 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let reply = read_to_end(s);
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(
        text.matches("HTTP/1.1 200 OK").count(),
        2,
        "reply: {text:?}"
    );
    let expected_tail: Vec<u8> = (0..3).map(pattern_byte).collect();
    assert!(reply.ends_with(&expected_tail), "reply: {text:?}");
    assert!(
        text.contains("Content-Length: 10\r\n"),
        "HEAD length missing: {text:?}"
    );
}

#[test]
fn echo_finishes_echoing_after_half_close() {
    let backend = Backend::echo(loopback_listener());
    let mut s = connect(backend.addr());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    // Written from another thread so that the echo can flow back while we send.
    let mut writer = s.try_clone().expect("clone stream");
    let sent = data.clone();
    let t = std::thread::spawn(move || {
        writer.write_all(&sent).expect("write data");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back)
        .expect("read echo until the backend's FIN");
    t.join().expect("writer thread");
    assert!(
        back == data,
        "echo differs: {} of {} bytes",
        back.len(),
        data.len()
    );
}

#[test]
fn backends_stop_promptly_with_idle_connections_open() {
    let backend = Backend::demo_http(loopback_listener());
    let mut idle = connect(backend.addr());
    // One request first, so the connection is surely accepted and owned by a thread.
    idle.write_all(b"GET /bytes/1 HTTP/1.1\r\n\r\n")
        .expect("send");
    let mut reply = Vec::new();
    while !reply.ends_with(&[pattern_byte(0)]) {
        let mut buf = [0u8; 512];
        let n = idle.read(&mut buf).expect("read reply");
        assert!(n > 0, "backend closed a keep-alive connection");
        reply.extend_from_slice(&buf[..n]);
    }
    let started = std::time::Instant::now();
    drop(backend);
    // Connection threads look at `stop` every IO_POLL (100 ms); a generous bound that still
    // tells that from a thread blocked on its idle connection.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        started.elapsed()
    );
    // The connection thread closed its socket on the way out.
    assert!(read_to_end(idle).is_empty(), "idle connection got data");
}

// ---- PROXY protocol parser ----

#[track_caller]
fn parse_ok(bytes: &[u8]) -> ProxyHeader {
    match parse_proxy_header(bytes) {
        Ok(Some((h, len))) => {
            assert_eq!(len, h.len);
            h
        }
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
    }
}

#[track_caller]
fn parse_err(bytes: &[u8]) -> ProxyError {
    match parse_proxy_header(bytes) {
        Err(e) => e,
        other => panic!("accepted {:?}: {other:?}", String::from_utf8_lossy(bytes)),
    }
}

#[test]
fn crc32c_check_value() {
    // The standard check value of CRC-32C (Castagnoli).
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn v1_headers_per_spec() {
    let h = parse_ok(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /");
    assert_eq!(h.version, ProxyVersion::V1);
    assert_eq!(h.source, Some("192.168.0.1:56324".parse().expect("addr")));
    assert_eq!(
        h.destination,
        Some("192.168.0.11:443".parse().expect("addr"))
    );
    assert_eq!(h.len, 47);
    let h = parse_ok(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n");
    assert_eq!(
        h.source,
        Some(SocketAddr::new(
            "2001:db8::1".parse::<Ipv6Addr>().expect("v6").into(),
            65535
        ))
    );
    assert_eq!(h.family, ProxyFamily::Inet6);
    let h = parse_ok(b"PROXY UNKNOWN\r\n");
    assert_eq!((h.source, h.family), (None, ProxyFamily::Unspec));
    let worst = format!(
        "PROXY UNKNOWN {0} {0} 65535 65535\r\n",
        ["ffff"; 8].join(":")
    );
    assert_eq!(worst.len(), 107, "the spec's worst case is 107 bytes");
    assert_eq!(parse_ok(worst.as_bytes()).len, 107);

    // Incomplete but valid so far: need more bytes.
    for partial in [
        &b"PRO"[..],
        b"PROXY TCP4 1.2.3.4",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
    ] {
        assert_eq!(parse_proxy_header(partial), Ok(None), "{partial:?}");
    }
    assert!(matches!(
        parse_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
        ProxyError::V1BareLineEnd(_)
    ));
    assert!(matches!(
        parse_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
        ProxyError::V1BareLineEnd(_)
    ));
    for bad in [
        &b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"[..],
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    ] {
        assert!(
            matches!(parse_err(bad), ProxyError::V1Syntax(_)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = [b"PROXY UNKNOWN ".as_slice(), &[b'f'; 100]].concat();
    assert_eq!(parse_err(&long), ProxyError::V1TooLong);
    assert!(matches!(
        parse_err(b"GET / HTTP/1.1\r\n"),
        ProxyError::NotProxy(_)
    ));
}

/// A v2 header: signature, ver_cmd, fam, then `body` (addresses + TLVs) with its length.
fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(ver_cmd);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    out
}

#[test]
fn v2_haproxy_capture_parses() {
    // What haproxy 1.8 `send-proxy-v2` wrote in front of an HTTP request (TCP over IPv4,
    // 172.19.0.1:42578 -> 172.19.0.3:80), followed by the request itself.
    let bytes: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11, 0x00,
        0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50, b'G', b'E',
    ];
    let h = parse_ok(bytes);
    assert_eq!(h.len, 28);
    assert_eq!(
        (h.version, h.command, h.family, h.transport),
        (
            ProxyVersion::V2,
            ProxyCommand::Proxy,
            ProxyFamily::Inet,
            ProxyTransport::Stream
        )
    );
    assert_eq!(h.source, Some("172.19.0.1:42578".parse().expect("addr")));
    assert_eq!(h.destination, Some("172.19.0.3:80".parse().expect("addr")));
    for cut in 1..28 {
        assert_eq!(
            parse_proxy_header(&bytes[..cut]),
            Ok(None),
            "prefix of {cut} bytes"
        );
    }
}

#[test]
fn v2_tlvs_ssl_and_crc() {
    let mut body = Vec::new();
    body.extend_from_slice(&[0u8; 15]);
    body.push(1); // ::1
    body.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).octets());
    body.extend_from_slice(&40000u16.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    body.extend(tlv(0x01, b"http/1.1"));
    body.extend(tlv(0x02, b"tern.test"));
    let ssl_value = [
        &[0x01u8, 0, 0, 0, 0][..],
        &tlv(0x21, b"TLSv1.3"),
        &tlv(0x23, b"TLS_AES_128_GCM_SHA256"),
    ]
    .concat();
    body.extend(tlv(0x20, &ssl_value));
    body.extend(tlv(0x04, &[0, 0, 0]));
    body.extend(tlv(0xE5, b"custom"));
    let crc_tlv_at = 16 + body.len() + 3;
    body.extend(tlv(0x03, &[0, 0, 0, 0]));
    let mut bytes = v2(0x21, 0x21, &body);
    let crc = crc32c(&bytes);
    bytes[crc_tlv_at..crc_tlv_at + 4].copy_from_slice(&crc.to_be_bytes());

    let h = parse_ok(&bytes);
    assert_eq!(h.source, Some("[::1]:40000".parse().expect("addr")));
    assert_eq!(
        h.destination,
        Some("[2001:db8::2]:443".parse().expect("addr"))
    );
    assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h.authority.as_deref(), Some("tern.test"));
    assert_eq!(h.crc32c, Some(crc));
    let ssl = h.ssl.as_ref().expect("SSL TLV");
    assert_eq!((ssl.client, ssl.verify), (0x01, 0));
    assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
    assert_eq!(ssl.cipher.as_deref(), Some("TLS_AES_128_GCM_SHA256"));
    assert_eq!(
        h.tlvs.iter().map(|t| t.kind).collect::<Vec<_>>(),
        vec![0x01, 0x02, 0x20, 0x04, 0xE5, 0x03]
    );

    let mut corrupted = bytes.clone();
    corrupted[20] ^= 1;
    assert!(matches!(parse_err(&corrupted), ProxyError::V2Crc32c { .. }));
}

#[test]
fn v2_rejections_and_local() {
    let addrs4 = [127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2];
    assert_eq!(
        parse_err(&v2(0x11, 0x11, &addrs4)),
        ProxyError::V2Version(1)
    );
    assert_eq!(
        parse_err(&v2(0x22, 0x11, &addrs4)),
        ProxyError::V2Command(2)
    );
    assert_eq!(parse_err(&v2(0x21, 0x41, &addrs4)), ProxyError::V2Family(4));
    assert_eq!(
        parse_err(&v2(0x21, 0x13, &addrs4)),
        ProxyError::V2Transport(3)
    );
    assert_eq!(
        parse_err(&v2(0x21, 0x21, &addrs4)),
        ProxyError::V2ShortAddresses { len: 12, need: 36 }
    );
    let truncated_tlv = [&addrs4[..], &[0x01, 0x00, 0x05, b'h']].concat();
    assert_eq!(
        parse_err(&v2(0x21, 0x11, &truncated_tlv)),
        ProxyError::V2TlvOverrun(28)
    );
    let two_alpn = [&addrs4[..], &tlv(0x01, b"a"), &tlv(0x01, b"b")].concat();
    assert!(matches!(
        parse_err(&v2(0x21, 0x11, &two_alpn)),
        ProxyError::V2Tlv(_)
    ));
    // LOCAL: the address block is ignored, whatever it holds.
    let h = parse_ok(&v2(0x20, 0x11, &addrs4));
    assert_eq!((h.command, h.source), (ProxyCommand::Local, None));
    let h = parse_ok(&v2(0x20, 0x00, &[]));
    assert_eq!(h.len, 16);
    // AF_UNSPEC with PROXY is accepted with no addresses.
    let h = parse_ok(&v2(0x21, 0x00, &[]));
    assert_eq!((h.family, h.source), (ProxyFamily::Unspec, None));
}

#[test]
fn proxy_aware_with_curl_v1_then_http() {
    let stop = Arc::new(AtomicBool::new(false));
    let listener = loopback_listener();
    let addr = listener.local_addr().expect("addr");
    let rx = proxy_aware(listener, ProxyExpect::V1, Arc::clone(&stop));
    // curl writes a PROXY v1 line itself: an independent sender.
    let body = String::from_utf8(curl(&["--haproxy-protocol", &format!("http://{addr}/")]))
        .expect("utf-8");
    let rec = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a record for curl's connection");
    let h = rec.expect_header();
    assert_eq!(h.version, ProxyVersion::V1);
    let source = h.source.expect("source address");
    assert_eq!(source.ip(), std::net::IpAddr::from(Ipv4Addr::LOCALHOST));
    assert_eq!(h.destination, Some(addr));
    assert_eq!(rec.peer, source, "curl announces its own socket");
    assert!(
        body.contains(&format!("proxied-client: {source}\n")),
        "body: {body:?}"
    );
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn proxy_aware_rejects_wrong_version_and_closes() {
    let (backend, rx) = Backend::proxy_aware(loopback_listener(), ProxyExpect::V2);
    let mut s = connect(backend.addr());
    s.write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 1111 443\r\nGET / HTTP/1.1\r\n\r\n")
        .expect("send");
    let rec = rx.recv_timeout(Duration::from_secs(10)).expect("a record");
    assert_eq!(
        rec.header,
        Err(ProxyError::WrongVersion {
            expected: ProxyExpect::V2,
            got: ProxyVersion::V1
        })
    );
    let mut rest = Vec::new();
    // The backend closes without answering (RST or FIN, both end the read).
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "backend answered a rejected connection: {rest:?}"
    );

    // A v2 header split over two writes is put back together.
    let mut s = connect(backend.addr());
    let header = v2(
        0x21,
        0x11,
        &[10, 0, 0, 1, 10, 0, 0, 2, 0x04, 0x57, 0x01, 0xbb],
    );
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&header[..7]).expect("send first part");
    s.write_all(&header[7..]).expect("send rest");
    s.write_all(b"GET /bytes/4 HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let rec = rx.recv_timeout(Duration::from_secs(10)).expect("a record");
    assert_eq!(
        rec.expect_header().source,
        Some("10.0.0.1:1111".parse().expect("addr"))
    );
    assert_eq!(rec.raw, header);
    let reply = read_to_end(s);
    let expected: Vec<u8> = (0..4).map(pattern_byte).collect();
    assert!(
        reply.ends_with(&expected),
        "reply {:?}",
        String::from_utf8_lossy(&reply)
    );
}
