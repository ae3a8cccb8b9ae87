//! Tests for the PROXY header writers: exact bytes for hand-checked headers (built from the
//! spec's field tables, not from the writer), and a small independent parser that round-trips
//! many generated address pairs and TLS facts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;

fn sa(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("test address {text:?}: {e}"))
}

fn header(src: &str, dst: &str) -> ProxyHeader<'static> {
    ProxyHeader {
        source: sa(src),
        destination: sa(dst),
        tls: None,
    }
}

fn v1(h: &ProxyHeader<'_>) -> String {
    let mut out = Vec::new();
    write_v1(h, &mut out);
    String::from_utf8(out).expect("a v1 header is ASCII")
}

fn v2(h: &ProxyHeader<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    write_v2(h, &mut out);
    out
}

const SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

#[test]
fn signature_is_the_spec_bytes() {
    assert_eq!(V2_SIGNATURE, SIG, "v2 signature differs from §2.2");
}

#[test]
fn v1_ipv4_matches_the_spec_example() {
    // The example line of §2.1.
    let h = header("192.168.0.1:56324", "192.168.0.11:443");
    assert_eq!(v1(&h), "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
}

#[test]
fn v1_ipv6_exact() {
    let h = header("[2001:db8::1]:40000", "[2001:db8:0:1::2]:443");
    assert_eq!(
        v1(&h),
        "PROXY TCP6 2001:db8::1 2001:db8:0:1::2 40000 443\r\n"
    );
    let h = header("[::]:0", "[::1]:65535");
    assert_eq!(v1(&h), "PROXY TCP6 :: ::1 0 65535\r\n");
    // A single zero group stays "0"; of two equal runs the first is compressed (RFC 5952).
    let h = header("[1:0:2:3:4:5:6:7]:1", "[1:0:0:2:0:0:3:4]:2");
    assert_eq!(v1(&h), "PROXY TCP6 1:0:2:3:4:5:6:7 1::2:0:0:3:4 1 2\r\n");
    // The longer run wins even when it comes second; upper bits print without leading zeros.
    let h = header("[fe80:0:0:1:0:0:0:abcd]:80", "[1::]:443");
    assert_eq!(v1(&h), "PROXY TCP6 fe80:0:0:1::abcd 1:: 80 443\r\n");
}

#[test]
fn v1_maximum_lengths() {
    let h = header("255.255.255.255:65535", "255.255.255.255:65535");
    assert_eq!(v1(&h).len(), 56, "longest TCP4 line per §2.1");
    let full = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
    let line = v1(&header(full, full));
    assert_eq!(line.len(), 104, "longest TCP6 line per §2.1: {line:?}");
    assert!(line.len() <= MAX_V1_LEN);
}

#[test]
fn v1_appends_to_existing_bytes() {
    let mut out = b"xy".to_vec();
    write_v1(&header("10.0.0.1:1", "10.0.0.2:2"), &mut out);
    assert_eq!(out, b"xyPROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n");
}

#[test]
fn v2_ipv4_exact_bytes() {
    let h = header("192.0.2.1:56324", "198.51.100.7:443");
    let mut expected = SIG.to_vec();
    expected.extend_from_slice(&[
        0x21, // version 2, PROXY
        0x11, // AF_INET, STREAM
        0x00, 0x0C, // 12 address bytes follow
        192, 0, 2, 1, // source
        198, 51, 100, 7, // destination
        0xDC, 0x04, // 56324
        0x01, 0xBB, // 443
    ]);
    assert_eq!(v2(&h), expected);
}

#[test]
fn v2_ipv6_exact_bytes() {
    let h = header("[2001:db8::1]:40000", "[2001:db8::2]:443");
    let mut expected = SIG.to_vec();
    expected.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]); // AF_INET6, STREAM, 36 bytes
    expected.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
    ]);
    expected.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
    ]);
    expected.extend_from_slice(&[0x9C, 0x40, 0x01, 0xBB]); // 40000, 443
    assert_eq!(v2(&h), expected);
}

#[test]
fn v2_with_tls_tlvs_exact_bytes() {
    let h = ProxyHeader {
        source: sa("10.0.0.1:1000"),
        destination: sa("10.0.0.2:443"),
        tls: Some(TlsInfo {
            version: "TLSv1.3",
            sni: Some("example.com"),
            alpn: Some(b"h2"),
            cipher: Some("TLS_AES_128_GCM_SHA256"),
            client_cert: None,
        }),
    };
    let mut expected = SIG.to_vec();
    // 12 address bytes + ALPN (3+2) + AUTHORITY (3+11) + SSL (3 + 5 + (3+7) + (3+22)) = 74
    expected.extend_from_slice(&[0x21, 0x11, 0x00, 74]);
    expected.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0x03, 0xE8, 0x01, 0xBB]);
    expected.extend_from_slice(&[0x01, 0x00, 0x02]);
    expected.extend_from_slice(b"h2");
    expected.extend_from_slice(&[0x02, 0x00, 11]);
    expected.extend_from_slice(b"example.com");
    expected.extend_from_slice(&[0x20, 0x00, 5 + 10 + 25]); // SSL: client, verify, two sub-TLVs
    expected.extend_from_slice(&[0x01, 0x00, 0x00, 0x00, 0x01]); // PP2_CLIENT_SSL, verify = 1
    expected.extend_from_slice(&[0x21, 0x00, 7]);
    expected.extend_from_slice(b"TLSv1.3");
    expected.extend_from_slice(&[0x23, 0x00, 22]);
    expected.extend_from_slice(b"TLS_AES_128_GCM_SHA256");
    let got = v2(&h);
    assert_eq!(got.len(), 16 + 74);
    assert_eq!(got, expected);
}

#[test]
fn v2_tls_without_optional_fields_has_only_the_ssl_tlv() {
    let h = ProxyHeader {
        tls: Some(TlsInfo {
            version: "TLSv1.2",
            sni: None,
            alpn: None,
            cipher: None,
            client_cert: None,
        }),
        ..header("[2001:db8::1]:1", "[2001:db8::2]:2")
    };
    let got = v2(&h);
    let tlvs = &got[16 + 36..];
    assert_eq!(
        tlvs,
        [
            0x20, 0x00, 15, 0x01, 0, 0, 0, 1, 0x21, 0x00, 7, b'T', b'L', b'S', b'v', b'1', b'.',
            b'2'
        ],
        "only PP2_TYPE_SSL with the version sub-TLV expected"
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([got[14], got[15]])),
        36 + tlvs.len()
    );
}

#[test]
fn oversized_tlv_values_are_left_out() {
    let long = "a".repeat(MAX_TLV_VALUE + 1);
    let h = ProxyHeader {
        tls: Some(TlsInfo {
            version: "TLSv1.3",
            sni: Some(&long),
            alpn: Some(long.as_bytes()),
            cipher: Some(&long),
            client_cert: None,
        }),
        ..header("10.0.0.1:1", "10.0.0.2:2")
    };
    let parsed = parse_v2(&v2(&h));
    assert_eq!(parsed.authority, None);
    assert_eq!(parsed.alpn, None);
    let ssl = parsed
        .ssl
        .expect("the SSL TLV is always present with TLS info");
    assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
    assert_eq!(ssl.cipher, None);

    // Values at the limit are kept, and the worst case still has a consistent length.
    let max = "b".repeat(MAX_TLV_VALUE);
    let h = ProxyHeader {
        tls: Some(TlsInfo {
            version: &max,
            sni: Some(&max),
            alpn: Some(max.as_bytes()),
            cipher: Some(&max),
            client_cert: None,
        }),
        ..header("[::1]:1", "[::2]:2")
    };
    let bytes = v2(&h);
    let parsed = parse_v2(&bytes);
    assert_eq!(parsed.authority.as_deref(), Some(max.as_str()));
    assert_eq!(parsed.alpn.as_deref(), Some(max.as_bytes()));
    assert_eq!(bytes.len(), 16 + 36 + 4 * (3 + MAX_TLV_VALUE) + 3 + 5);
}

#[test]
fn mapped_addresses_are_normalised() {
    // Both sides IPv4-mapped (a dual-stack listener's view of an IPv4 client): plain IPv4.
    let h = header("[::ffff:192.0.2.1]:5000", "[::ffff:192.0.2.2]:443");
    assert_eq!(v1(&h), "PROXY TCP4 192.0.2.1 192.0.2.2 5000 443\r\n");
    assert_eq!(v2(&h), v2(&header("192.0.2.1:5000", "192.0.2.2:443")));

    // One mapped, one plain IPv4: still one family, IPv4.
    let h = header("[::ffff:192.0.2.1]:5000", "192.0.2.2:443");
    assert_eq!(v1(&h), "PROXY TCP4 192.0.2.1 192.0.2.2 5000 443\r\n");

    // Mixed real IPv6 and IPv4: TCP6 with the IPv4 side mapped, in hex groups (no dotted quad).
    let h = header("192.0.2.1:5000", "[2001:db8::2]:443");
    assert_eq!(
        v1(&h),
        "PROXY TCP6 ::ffff:c000:201 2001:db8::2 5000 443\r\n"
    );
    let bytes = v2(&h);
    assert_eq!(bytes[13], 0x21, "mixed families are sent as AF_INET6");
    assert_eq!(
        &bytes[16..32],
        &Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets()
    );

    // IPv4-compatible (deprecated, ::a.b.c.d) is not mapped and stays IPv6.
    let h = header("[::c000:201]:1", "[::c000:202]:2");
    assert_eq!(v1(&h), "PROXY TCP6 ::c000:201 ::c000:202 1 2\r\n");
}

#[test]
fn write_dispatches_on_the_configured_version() {
    let h = header("10.1.1.1:1234", "10.1.1.2:443");
    let mut out = b"keep".to_vec();
    write(config::ProxyProtocol::None, &h, &mut out);
    assert_eq!(out, b"keep", "ProxyProtocol::None must write nothing");

    let mut out = Vec::new();
    write(config::ProxyProtocol::V1, &h, &mut out);
    assert_eq!(out, v1(&h).into_bytes());

    let mut out = Vec::new();
    write(config::ProxyProtocol::V2, &h, &mut out);
    assert_eq!(out, v2(&h));
}

// ---- An independent parser, written from the spec's text, used for round trips. ----

#[derive(Debug, PartialEq, Eq)]
struct ParsedSsl {
    client: u8,
    verify: u32,
    version: Option<String>,
    cn: Option<String>,
    cipher: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
struct ParsedV2 {
    source: SocketAddr,
    destination: SocketAddr,
    alpn: Option<Vec<u8>>,
    authority: Option<String>,
    ssl: Option<ParsedSsl>,
}

/// Splits a TLV list, panicking unless the TLVs exactly fill `bytes`.
#[track_caller]
fn tlvs(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 3, "truncated TLV header: {bytes:?}");
        let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
        assert!(
            bytes.len() >= 3 + len,
            "TLV {:#x} overruns its container",
            bytes[0]
        );
        out.push((bytes[0], &bytes[3..3 + len]));
        bytes = &bytes[3 + len..];
    }
    out
}

#[track_caller]
fn utf8(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("TLV string is UTF-8")
}

#[track_caller]
fn parse_v2(bytes: &[u8]) -> ParsedV2 {
    assert!(bytes.len() >= 16, "shorter than the fixed v2 header");
    assert_eq!(bytes[..12], SIG, "signature");
    assert_eq!(bytes[12], 0x21, "version 2 + PROXY");
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    assert_eq!(
        bytes.len(),
        16 + len,
        "length field must cover exactly the rest"
    );
    let body = &bytes[16..];
    let (source, destination, rest) = match bytes[13] {
        0x11 => {
            assert!(body.len() >= 12);
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                &body[12..],
            )
        }
        0x21 => {
            assert!(body.len() >= 36);
            let ip = |b: &[u8]| {
                let octets: [u8; 16] = b.try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                &body[36..],
            )
        }
        other => panic!("unexpected family/protocol byte {other:#x}"),
    };
    let mut parsed = ParsedV2 {
        source,
        destination,
        alpn: None,
        authority: None,
        ssl: None,
    };
    for (kind, value) in tlvs(rest) {
        match kind {
            0x01 => parsed.alpn = Some(value.to_vec()),
            0x02 => parsed.authority = Some(utf8(value)),
            0x20 => {
                assert!(value.len() >= 5, "pp2_tlv_ssl shorter than client + verify");
                let mut ssl = ParsedSsl {
                    client: value[0],
                    verify: u32::from_be_bytes([value[1], value[2], value[3], value[4]]),
                    version: None,
                    cn: None,
                    cipher: None,
                };
                for (sub, sub_value) in tlvs(&value[5..]) {
                    match sub {
                        0x21 => ssl.version = Some(utf8(sub_value)),
                        0x22 => ssl.cn = Some(utf8(sub_value)),
                        0x23 => ssl.cipher = Some(utf8(sub_value)),
                        other => panic!("unexpected SSL sub-TLV {other:#x}"),
                    }
                }
                parsed.ssl = Some(ssl);
            }
            other => panic!("unexpected TLV {other:#x}"),
        }
    }
    parsed
}

/// Parses a v1 line strictly per §2.1; returns (family, source, destination).
#[track_caller]
fn parse_v1(line: &str) -> (&str, SocketAddr, SocketAddr) {
    assert!(
        line.len() <= MAX_V1_LEN,
        "line longer than 107 bytes: {line:?}"
    );
    let body = line.strip_suffix("\r\n").expect("line ends in CRLF");
    assert!(!body.contains(['\r', '\n']), "stray CR/LF in {line:?}");
    let fields: Vec<&str> = body.split(' ').collect();
    assert_eq!(fields.len(), 6, "six space-separated fields in {line:?}");
    assert_eq!(fields[0], "PROXY");
    let ip = |text: &str| -> IpAddr {
        match fields[1] {
            "TCP4" => {
                let ip: Ipv4Addr = text.parse().expect("TCP4 address parses as IPv4");
                // No leading zeros, exactly four decimal octets: std's Display is canonical.
                assert_eq!(text, ip.to_string(), "non-canonical IPv4 {text:?}");
                IpAddr::V4(ip)
            }
            "TCP6" => {
                let ip: Ipv6Addr = text.parse().expect("TCP6 address parses as IPv6");
                assert!(
                    text.chars().all(|c| c.is_ascii_hexdigit() || c == ':'),
                    "IPv6 must be hex groups only: {text:?}"
                );
                assert!(
                    text.split(':')
                        .all(|g| g.len() <= 4 && !(g.len() > 1 && g.starts_with('0'))),
                    "groups of at most 4 digits without leading zeros: {text:?}"
                );
                // std prints RFC 5952 form except for mapped addresses, which it writes dotted.
                if ip.to_ipv4_mapped().is_none() {
                    assert_eq!(text, ip.to_string(), "non-canonical IPv6 {text:?}");
                }
                IpAddr::V6(ip)
            }
            other => panic!("unexpected protocol {other:?}"),
        }
    };
    let port = |text: &str| -> u16 {
        let port: u16 = text.parse().expect("port is a decimal u16");
        assert_eq!(text, port.to_string(), "leading zeros in port {text:?}");
        port
    };
    (
        fields[1],
        SocketAddr::new(ip(fields[2]), port(fields[4])),
        SocketAddr::new(ip(fields[3]), port(fields[5])),
    )
}

/// What a receiver should learn from a header for (src, dst), computed from std's
/// `to_canonical` rather than from the writer's own helpers.
fn expected(src: SocketAddr, dst: SocketAddr) -> (&'static str, SocketAddr, SocketAddr) {
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    let widen = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    if s.is_ipv4() && d.is_ipv4() {
        (
            "TCP4",
            SocketAddr::new(s, src.port()),
            SocketAddr::new(d, dst.port()),
        )
    } else {
        (
            "TCP6",
            SocketAddr::new(widen(s), src.port()),
            SocketAddr::new(widen(d), dst.port()),
        )
    }
}

/// xorshift64*: deterministic, so a failure reproduces; no dependency needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }

    fn ip(&mut self) -> IpAddr {
        match self.next() % 5 {
            0 => IpAddr::V4(Ipv4Addr::from(self.next() as u32)),
            1 => IpAddr::V6(Ipv4Addr::from(self.next() as u32).to_ipv6_mapped()),
            2 => IpAddr::V6(Ipv6Addr::from(
                (u128::from(self.next()) << 64) | u128::from(self.next()),
            )),
            _ => {
                // Sparse IPv6: each group zero with probability 1/2, so runs of every length
                // (and ties between runs) occur.
                let mut groups = [0u16; 8];
                for g in &mut groups {
                    let r = self.next();
                    if r & 1 == 1 {
                        *g = (r >> 8) as u16;
                    }
                }
                IpAddr::V6(Ipv6Addr::from(groups))
            }
        }
    }

    fn port(&mut self) -> u16 {
        match self.next() % 4 {
            0 => *self.pick(&[0, 1, 9, 10, 80, 443, 1000, 65535]),
            _ => self.next() as u16,
        }
    }
}

#[test]
fn round_trip_over_many_address_pairs() {
    let fixed: Vec<IpAddr> = [
        "0.0.0.0",
        "255.255.255.255",
        "127.0.0.1",
        "10.0.0.10",
        "::",
        "::1",
        "1::",
        "2001:db8::1",
        "fe80::1:0:0:1",
        "1:0:0:1:0:0:1:1",
        "1:0:1:0:1:0:1:0",
        "::ffff:192.0.2.1",
        "::ffff:0.0.0.0",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ]
    .iter()
    .map(|t| t.parse().expect("fixed test address"))
    .collect();

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut pairs = Vec::new();
    for &a in &fixed {
        for &b in &fixed {
            pairs.push((
                SocketAddr::new(a, rng.port()),
                SocketAddr::new(b, rng.port()),
            ));
        }
    }
    for _ in 0..3000 {
        pairs.push((
            SocketAddr::new(rng.ip(), rng.port()),
            SocketAddr::new(rng.ip(), rng.port()),
        ));
    }

    let versions = ["TLSv1.2", "TLSv1.3"];
    let snis = [None, Some("a.example"), Some("xn--bcher-kva.example.")];
    let alpns: [Option<&[u8]>; 3] = [None, Some(b"h2"), Some(b"http/1.1")];
    let ciphers = [None, Some("ECDHE-RSA-AES128-GCM-SHA256")];

    for (src, dst) in pairs {
        let (family, want_src, want_dst) = expected(src, dst);
        let mut h = ProxyHeader {
            source: src,
            destination: dst,
            tls: None,
        };

        let line = v1(&h);
        assert_eq!(
            parse_v1(&line),
            (family, want_src, want_dst),
            "v1 round trip of {src} -> {dst}: {line:?}"
        );

        let parsed = parse_v2(&v2(&h));
        assert_eq!(
            (parsed.source, parsed.destination, parsed.ssl),
            (want_src, want_dst, None),
            "v2 round trip of {src} -> {dst}"
        );

        let version = *rng.pick(&versions);
        let tls = TlsInfo {
            version,
            sni: *rng.pick(&snis),
            alpn: *rng.pick(&alpns),
            cipher: *rng.pick(&ciphers),
            client_cert: None,
        };
        h.tls = Some(tls);
        let parsed = parse_v2(&v2(&h));
        assert_eq!(
            parsed,
            ParsedV2 {
                source: want_src,
                destination: want_dst,
                alpn: tls.alpn.map(<[u8]>::to_vec),
                authority: tls.sni.map(str::to_owned),
                ssl: Some(ParsedSsl {
                    client: PP2_CLIENT_SSL,
                    verify: PP2_VERIFY_NO_CLIENT_CERT,
                    version: Some(tls.version.to_owned()),
                    cn: None,
                    cipher: tls.cipher.map(str::to_owned),
                }),
            },
            "v2+TLS round trip of {src} -> {dst} with {tls:?}"
        );
        // v1 cannot carry TLS facts; the line must not change.
        assert_eq!(v1(&h), line);
    }
}

#[test]
fn v2_client_certificate_bits_verify_and_cn() {
    let base = TlsInfo {
        version: "TLSv1.3",
        sni: None,
        alpn: None,
        cipher: None,
        client_cert: None,
    };
    let ssl_of = |tls: TlsInfo<'_>| {
        let h = ProxyHeader {
            tls: Some(tls),
            ..header("10.0.0.1:1", "10.0.0.2:2")
        };
        parse_v2(&v2(&h)).ssl.expect("SSL TLV")
    };

    // No certificate: only PP2_CLIENT_SSL, verify non-zero, no CN.
    let none = ssl_of(base);
    assert_eq!(
        (none.client, none.verify, none.cn),
        (PP2_CLIENT_SSL, PP2_VERIFY_NO_CLIENT_CERT, None)
    );

    // Presented in this handshake: CONN and SESS, verify 0, CN between version and cipher.
    let h = ProxyHeader {
        tls: Some(TlsInfo {
            cipher: Some("C"),
            client_cert: Some(ClientCertInfo {
                this_connection: true,
                cn: Some("alice"),
            }),
            ..base
        }),
        ..header("10.0.0.1:1", "10.0.0.2:2")
    };
    let bytes = v2(&h);
    let ssl = &bytes[16 + 12..];
    assert_eq!(
        ssl,
        [
            &[0x20, 0x00, 5 + 10 + 8 + 4][..],
            &[0x07, 0, 0, 0, 0],
            &[0x21, 0x00, 7],
            b"TLSv1.3",
            &[0x22, 0x00, 5],
            b"alice",
            &[0x23, 0x00, 1],
            b"C",
        ]
        .concat(),
        "SSL TLV with client bits 0x07, verify 0, version, CN, cipher"
    );

    // A resumed session whose certificate was presented earlier: SESS only, still verified.
    let resumed = ssl_of(TlsInfo {
        client_cert: Some(ClientCertInfo {
            this_connection: false,
            cn: Some("alice"),
        }),
        ..base
    });
    assert_eq!(
        (resumed.client, resumed.verify, resumed.cn.as_deref()),
        (PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS, 0, Some("alice"))
    );

    // A certificate without a (string) CN: bits and verify, no CN sub-TLV; an oversized CN is
    // left out like any other value.
    let long = "c".repeat(MAX_TLV_VALUE + 1);
    for cn in [None, Some(long.as_str())] {
        let ssl = ssl_of(TlsInfo {
            client_cert: Some(ClientCertInfo {
                this_connection: true,
                cn,
            }),
            ..base
        });
        assert_eq!(
            (ssl.client, ssl.verify, ssl.cn),
            (
                PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
                0,
                None
            )
        );
    }
}
