//! Cross-header tests of `wire`: frames captured from Linux (parsed, checksums verified, and
//! re-emitted byte for byte), checksums cross-checked against an independent word-by-word
//! implementation, proptest round trips (`Repr -> emit -> parse == Repr`, IPv4 and IPv6, random
//! options and VLAN tags) and the panic contract (arbitrary and mutated bytes never panic).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

/// Frames captured with an AF_PACKET socket on one end of a veth pair between two throwaway
/// namespaces (Linux 6.18, checksum offload switched off with ETHTOOL_STXCSUM so the checksums
/// are complete), while Python's socket module opened a connection and sent "hello-tern\n".
/// Client 10.77.0.1 / fd00:77::1 (port 42514 / 48392), server 10.77.0.2:8443 / [fd00:77::2]:8444.
const LINUX_V4_SYN: &str = "620eb20935d4c2c22a7eb34a08004500003cefae4000400636710a4d00010a4d0002a61220fb6ce6fb6000000000a002faf035f80000020405b40402080aa8122b10000000000103030a";
const LINUX_V4_SYN_ACK: &str = "c2c22a7eb34a620eb20935d408004500003c00004000400626200a4d00020a4d000120fba612bbbb20146ce6fb61a012fe889f260000020405b40402080a4ecd688ba8122b100103030a";
const LINUX_V4_ACK: &str = "620eb20935d4c2c22a7eb34a080045000034efaf4000400636780a4d00010a4d0002a61220fb6ce6fb61bbbb20158010003fcc3e00000101080aa8122b114ecd688b";
const LINUX_V4_DATA: &str = "620eb20935d4c2c22a7eb34a08004500003fefb040004006366c0a4d00010a4d0002a61220fb6ce6fb61bbbb20158018003f975800000101080aa8122b114ecd688b68656c6c6f2d7465726e0a";
const LINUX_V6_SYN: &str = "620eb20935d4c2c22a7eb34a86dd600db5cf00280640fd000077000000000000000000000001fd000077000000000000000000000002bd0820fcf059167300000000a002fd20e1f20000020405a00402080abd5fcbd9000000000103030a";
const LINUX_V6_SYN_ACK: &str = "c2c22a7eb34a620eb20935d486dd6006086200280640fd000077000000000000000000000002fd00007700000000000000000000000120fcbd08db6c5ce8f0591674a012fb04ed9b0000020405a00402080aac4211cabd5fcbd90103030a";
const LINUX_V6_ACK: &str = "620eb20935d4c2c22a7eb34a86dd600db5cf00200640fd000077000000000000000000000001fd000077000000000000000000000002bd0820fcf0591674db6c5ce980100040171c00000101080abd5fcbd9ac4211ca";
const LINUX_V6_DATA: &str = "620eb20935d4c2c22a7eb34a86dd600db5cf002b0640fd000077000000000000000000000001fd000077000000000000000000000002bd0820fcf0591674db6c5ce980180040e23500000101080abd5fcbd9ac4211ca68656c6c6f2d7465726e0a";

const ALL_LINUX: [&str; 8] = [
    LINUX_V4_SYN,
    LINUX_V4_SYN_ACK,
    LINUX_V4_ACK,
    LINUX_V4_DATA,
    LINUX_V6_SYN,
    LINUX_V6_SYN_ACK,
    LINUX_V6_ACK,
    LINUX_V6_DATA,
];

/// Frames a veth end received from a peer with its default offloads (TX checksum offload on),
/// captured the same way (Linux 6.18): the TCP checksum field holds only the pseudo-header sum
/// (not complemented), over the segment length, in both families; the IPv4 header checksum is
/// complete. Client 10.250.9.2 / fd00:99::2, server port 9; the data frames carry
/// "hello-tern\n".
const PARTIAL_V4_SYN: &str = "b6b2397d9917b605b57dad2d08004500003c60f640004006b1cf0afa09020afa090186e800099dd3093400000000a002faf028250000020405b40402080a44152204000000000103030a";
const PARTIAL_V4_DATA: &str = "e6b0c83bec09f6c8afb1bec008004500003f37ca40004006daf80afa09020afa0901b7300009ecd1deb72655f83e8018003f282800000101080a2b8eb2563370165f68656c6c6f2d7465726e0a";
const PARTIAL_V6_SYN: &str = "b6b2397d9917b605b57dad2d86dd600ac10e00280640fd000099000000000000000000000002fd000099000000000000000000000001ad5a000948142ba900000000a002fd20fb640000020405a00402080a9ec17264000000000103030a";
const PARTIAL_V6_DATA: &str = "e6b0c83bec09f6c8afb1bec086dd600e79cb002b0640fd000099000000000000000000000002fd0000990000000000000000000000019b16000919d6159e951676ab80180040fb6700000101080ae34293ad1ff49da068656c6c6f2d7465726e0a";

const ALL_PARTIAL: [&str; 4] = [
    PARTIAL_V4_SYN,
    PARTIAL_V4_DATA,
    PARTIAL_V6_SYN,
    PARTIAL_V6_DATA,
];

#[track_caller]
fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

#[track_caller]
fn parse_ok(frame: &[u8]) -> TcpFrame<'_> {
    parse_tcp_frame(frame, ChecksumMode::Compute).expect("frame parses with checksums verified")
}

/// An independent TCP checksum: the pseudo-header and segment laid out as bytes, summed as
/// big-endian words one at a time (RFC 1071 §4.1's loop).
fn reference_tcp_checksum(src: IpAddr, dst: IpAddr, segment: &[u8]) -> u16 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, 6]);
            bytes.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, 6]);
        }
        _ => panic!("mixed address families"),
    }
    let mut seg = segment.to_vec();
    seg[16] = 0;
    seg[17] = 0;
    bytes.extend_from_slice(&seg);
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(c.get(1).copied().unwrap_or(0));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn linux_ipv4_syn_fields() {
    let bytes = hex(LINUX_V4_SYN);
    let f = parse_ok(&bytes);
    assert_eq!(
        f.eth.src_addr,
        EthernetAddress([0xc2, 0xc2, 0x2a, 0x7e, 0xb3, 0x4a])
    );
    assert_eq!(f.eth.vlan, None);
    assert_eq!(f.eth.ethertype, EtherType::IPV4);
    let IpRepr::V4(ip) = f.ip else {
        panic!("expected IPv4, got {:?}", f.ip)
    };
    assert_eq!(ip.src_addr, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(ip.dst_addr, Ipv4Addr::new(10, 77, 0, 2));
    assert_eq!((ip.ttl, ip.dont_frag, ip.payload_len), (64, true, 40));
    assert_eq!((f.tcp.src_port, f.tcp.dst_port), (42514, 8443));
    assert_eq!(f.tcp.seq, SeqNumber(0x6ce6_fb60));
    assert_eq!(f.tcp.ack, None);
    assert_eq!(f.tcp.flags, TcpFlags::SYN);
    assert_eq!(f.tcp.window, 64240);
    let o = f.tcp.options;
    assert_eq!(
        (o.mss, o.window_scale, o.sack_permitted),
        (Some(1460), Some(10), true)
    );
    assert_eq!(
        o.timestamps,
        Some(Timestamps {
            tsval: 0xa812_2b10,
            tsecr: 0
        })
    );
    assert!(o.sack_blocks.is_empty());
    assert_eq!(f.tcp.payload_len, 0);
    assert_eq!(f.tcp.segment_len(), 1, "a SYN occupies one sequence number");
}

#[test]
fn linux_syn_ack_and_data_fields() {
    let bytes = hex(LINUX_V4_SYN_ACK);
    let f = parse_ok(&bytes);
    assert_eq!(
        f.tcp.ack,
        Some(SeqNumber(0x6ce6_fb61)),
        "SYN-ACK acknowledges ISS + 1"
    );
    assert_eq!(
        f.tcp.flags,
        TcpFlags::SYN,
        "ACK lives in `ack`, not in `flags`"
    );

    let bytes = hex(LINUX_V4_DATA);
    let f = parse_ok(&bytes);
    assert_eq!(f.payload, b"hello-tern\n");
    assert_eq!(f.tcp.flags, TcpFlags::PSH);
    assert_eq!(
        f.tcp.options.timestamps,
        Some(Timestamps {
            tsval: 0xa812_2b11,
            tsecr: 0x4ecd_688b
        })
    );

    let bytes = hex(LINUX_V6_DATA);
    let f = parse_ok(&bytes);
    let IpRepr::V6(ip) = f.ip else {
        panic!("expected IPv6, got {:?}", f.ip)
    };
    assert_eq!(
        ip.src_addr,
        "fd00:77::1".parse::<Ipv6Addr>().expect("address")
    );
    assert_eq!(ip.flow_label, 0xdb5cf);
    assert_eq!((ip.hop_limit, ip.payload_len), (64, 43));
    assert_eq!(f.payload, b"hello-tern\n");

    let bytes = hex(LINUX_V6_SYN);
    let f = parse_ok(&bytes);
    assert_eq!(
        f.tcp.options.mss,
        Some(1440),
        "IPv6 MSS is 60 bytes less than IPv4's 1460 - 40 + 20"
    );
}

#[test]
fn linux_frames_reemit_byte_for_byte() {
    // tern emits options in Linux's order, so a parsed Linux frame re-emits identically —
    // headers, options and both checksums.
    for (i, text) in ALL_LINUX.iter().enumerate() {
        let bytes = hex(text);
        let f = parse_ok(&bytes);
        let mut out = [0u8; 256];
        let n = emit_tcp_frame(
            &mut out,
            &f.eth,
            &f.ip,
            &f.tcp,
            f.payload,
            ChecksumMode::Compute,
        )
        .expect("re-emit a captured frame");
        assert_eq!(&out[..n], &bytes[..], "captured frame #{i} re-emitted");
    }
}

#[test]
fn linux_checksums_match_the_reference() {
    for text in ALL_LINUX {
        let bytes = hex(text);
        let f = parse_ok(&bytes);
        let seg_start = 14 + f.ip.buffer_len();
        let segment = &bytes[seg_start..];
        let stored = u16::from_be_bytes([segment[16], segment[17]]);
        assert_eq!(
            reference_tcp_checksum(f.ip.src_addr(), f.ip.dst_addr(), segment),
            stored
        );
    }
}

#[test]
fn any_flipped_bit_is_caught_by_a_checksum() {
    // Every single-bit error in the IPv4 header or the TCP segment fails a checksum or a
    // length/version check; none is accepted, none panics.
    for (text, mode) in [
        (LINUX_V4_DATA, ChecksumMode::Compute),
        (LINUX_V6_DATA, ChecksumMode::Compute),
        (LINUX_V4_DATA, ChecksumMode::AcceptPartial),
        (LINUX_V6_DATA, ChecksumMode::AcceptPartial),
    ] {
        let good = hex(text);
        for byte in 14..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                let parsed = parse_tcp_frame(&bad, mode);
                // IPv6 has no header checksum; a flipped bit in the traffic class, flow label
                // or hop limit legitimately yields a different valid packet.
                let v6_unchecked = text == LINUX_V6_DATA && (byte < 14 + 4 || byte == 14 + 7);
                if !v6_unchecked {
                    assert!(
                        parsed.is_err(),
                        "byte {byte} bit {bit} went unnoticed: {parsed:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn complete_checksums_are_complete_in_every_verifying_mode() {
    for text in ALL_LINUX {
        let bytes = hex(text);
        for mode in [ChecksumMode::Compute, ChecksumMode::AcceptPartial] {
            let f = parse_tcp_frame(&bytes, mode).expect("a complete checksum verifies");
            assert_eq!(f.checksum, ChecksumVerdict::Complete, "{mode:?}");
        }
        let f = parse_tcp_frame(&bytes, ChecksumMode::Skip).expect("parses unchecked");
        assert_eq!(f.checksum, ChecksumVerdict::Unchecked);
    }
}

#[test]
fn partial_checksums_are_accepted_only_when_asked() {
    for text in ALL_PARTIAL {
        let bytes = hex(text);
        assert_eq!(
            parse_tcp_frame(&bytes, ChecksumMode::Compute),
            Err(WireError::BadChecksum),
            "verify refuses a partial checksum"
        );
        let f = parse_tcp_frame(&bytes, ChecksumMode::AcceptPartial)
            .expect("a partial checksum is accepted");
        assert_eq!(f.checksum, ChecksumVerdict::Partial);
        assert_eq!(
            parse_tcp_frame(&bytes, ChecksumMode::Skip).map(|f| f.checksum),
            Ok(ChecksumVerdict::Unchecked)
        );
        // The field is the pseudo-header sum of the segment as it arrived.
        let seg_start = 14 + f.ip.buffer_len();
        let segment = &bytes[seg_start..];
        assert_eq!(
            u16::from_be_bytes([segment[16], segment[17]]),
            tcp_pseudo_header(f.ip.src_addr(), f.ip.dst_addr(), segment.len())
        );
        // Completing it (as a NIC would) gives a frame every verifying mode calls complete.
        let mut fixed = bytes.clone();
        let sum = checksum::data(&fixed[seg_start..]);
        fixed[seg_start + 16..seg_start + 18].copy_from_slice(&checksum::finish(sum).to_be_bytes());
        assert_eq!(
            parse_tcp_frame(&fixed, ChecksumMode::Compute).map(|f| f.checksum),
            Ok(ChecksumVerdict::Complete)
        );
    }
    assert!(
        ALL_PARTIAL.iter().any(|t| t.contains("86dd")),
        "IPv6 covered"
    );
}

#[test]
fn garbage_checksums_are_refused_in_every_verifying_mode() {
    for text in ALL_PARTIAL.iter().chain(&ALL_LINUX) {
        let good = hex(text);
        let seg_start = 14
            + parse_tcp_frame(&good, ChecksumMode::Skip)
                .expect("parses")
                .ip
                .buffer_len();
        // Neither the full checksum nor the pseudo-header sum: every other field value.
        for delta in [1u16, 0x100, 0x8000, 0xfffe] {
            let mut bad = good.clone();
            let at = seg_start + 16..seg_start + 18;
            let field = u16::from_be_bytes([bad[at.start], bad[at.start + 1]]);
            bad[at].copy_from_slice(&field.wrapping_add(delta).to_be_bytes());
            for mode in [ChecksumMode::Compute, ChecksumMode::AcceptPartial] {
                assert_eq!(
                    parse_tcp_frame(&bad, mode).map(|f| f.checksum),
                    Err(WireError::BadChecksum),
                    "{mode:?}, field + {delta:#x}"
                );
            }
        }
        // An address the pseudo-header covers, changed on the way: the partial sum no longer
        // matches either (IPv4: the header checksum catches it first).
        let mut moved = good.clone();
        let last_src_byte = if text.contains("86dd") {
            14 + 8 + 15
        } else {
            14 + 15
        };
        moved[last_src_byte] ^= 0x40;
        assert_eq!(
            parse_tcp_frame(&moved, ChecksumMode::AcceptPartial).map(|f| f.checksum),
            Err(WireError::BadChecksum),
            "a changed source address"
        );
    }
    // The IPv4 header checksum is always complete and always verified.
    let mut bad_ip = hex(PARTIAL_V4_SYN);
    bad_ip[14 + 10] ^= 0x01;
    assert_eq!(
        parse_tcp_frame(&bad_ip, ChecksumMode::AcceptPartial),
        Err(WireError::BadChecksum)
    );
}

#[test]
fn every_truncation_is_an_error() {
    for text in ALL_LINUX {
        let bytes = hex(text);
        for len in 0..bytes.len() {
            let r = parse_tcp_frame(&bytes[..len], ChecksumMode::Compute);
            assert!(
                r.is_err(),
                "a {len}-byte prefix of a {}-byte frame parsed",
                bytes.len()
            );
        }
    }
    assert_eq!(
        parse_tcp_frame(&[], ChecksumMode::Skip),
        Err(WireError::Truncated)
    );
}

#[test]
fn ethernet_padding_is_ignored() {
    // A 54-byte bare ACK is padded to the 60-byte minimum on the wire; the IP length decides.
    let eth = EthernetRepr {
        src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
        dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
        vlan: None,
        ethertype: EtherType::IPV4,
    };
    let ip = IpRepr::V4(Ipv4Repr {
        src_addr: Ipv4Addr::new(10, 0, 0, 1),
        dst_addr: Ipv4Addr::new(10, 0, 0, 2),
        protocol: IP_PROTO_TCP,
        payload_len: 0,
        ttl: 64,
        dscp_ecn: 0,
        ident: 7,
        dont_frag: true,
    });
    let tcp = TcpRepr {
        options: TcpOptions::default(),
        ..parse_ok(&hex(LINUX_V4_ACK)).tcp
    };
    let mut padded = [0xeeu8; 60];
    let n = emit_tcp_frame(&mut padded, &eth, &ip, &tcp, &[], ChecksumMode::Compute)
        .expect("emit a bare ACK");
    assert_eq!(n, 54, "14 + 20 + 20 bytes");
    let parsed = parse_ok(&padded);
    assert_eq!(parsed.tcp, tcp);
    assert!(parsed.payload.is_empty(), "padding is not payload");
}

#[test]
fn vlan_tagged_frames_round_trip() {
    let bytes = hex(LINUX_V4_DATA);
    let f = parse_ok(&bytes);
    let eth = EthernetRepr {
        vlan: Some(VlanTag(0x2064)),
        ..f.eth
    };
    let mut out = [0u8; 128];
    let n = emit_tcp_frame(
        &mut out,
        &eth,
        &f.ip,
        &f.tcp,
        f.payload,
        ChecksumMode::Compute,
    )
    .expect("emit a tagged frame");
    assert_eq!(n, bytes.len() + 4);
    let g = parse_ok(&out[..n]);
    assert_eq!(g.eth.vlan.map(|t| (t.vid(), t.pcp())), Some((0x064, 1)));
    assert_eq!((g.ip, g.tcp, g.payload), (f.ip, f.tcp, f.payload));
}

#[test]
fn non_tcp_and_fragments_are_unsupported() {
    let mut bytes = hex(LINUX_V4_DATA);
    bytes[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(
        parse_tcp_frame(&bytes, ChecksumMode::Compute),
        Err(WireError::UnsupportedEtherType)
    );

    let mut bytes = hex(LINUX_V4_DATA);
    bytes[14 + 9] = 17; // UDP
    let mut ip = Ipv4Packet::new_unchecked(&mut bytes[14..]);
    ip.fill_checksum();
    assert_eq!(
        parse_tcp_frame(&bytes, ChecksumMode::Compute),
        Err(WireError::UnsupportedProtocol)
    );

    let mut bytes = hex(LINUX_V4_DATA);
    bytes[14 + 6] |= 0x20; // MF
    Ipv4Packet::new_unchecked(&mut bytes[14..]).fill_checksum();
    assert_eq!(
        parse_tcp_frame(&bytes, ChecksumMode::Compute),
        Err(WireError::Fragmented)
    );

    let mut bytes = hex(LINUX_V6_DATA);
    bytes[14 + 6] = 0; // hop-by-hop options header
    assert_eq!(
        parse_tcp_frame(&bytes, ChecksumMode::Compute),
        Err(WireError::UnsupportedProtocol)
    );

    let mut bytes = hex(LINUX_V4_DATA);
    bytes[14] = 0x65;
    assert_eq!(
        parse_tcp_frame(&bytes, ChecksumMode::Compute),
        Err(WireError::BadVersion)
    );
    bytes[14] = 0x44;
    assert_eq!(
        parse_tcp_frame(&bytes, ChecksumMode::Compute),
        Err(WireError::BadHeaderLength)
    );
}

#[test]
fn emit_refuses_small_buffers() {
    let bytes = hex(LINUX_V4_DATA);
    let f = parse_ok(&bytes);
    for len in 0..bytes.len() {
        let mut out = vec![0u8; len];
        let r = emit_tcp_frame(
            &mut out,
            &f.eth,
            &f.ip,
            &f.tcp,
            f.payload,
            ChecksumMode::Compute,
        );
        assert_eq!(r, Err(WireError::BufferTooSmall), "a {len}-byte buffer");
    }
}

#[test]
fn summed_headers_match_a_full_checksum() {
    // The bulk send path copies the payload with `copy_and_sum` (in two parts when the send
    // ring wraps, the second at any offset) and then writes the headers with that sum: the
    // frame must be byte for byte what a full checksum pass gives.
    let payload: Vec<u8> = (0..1461u32).map(|i| (i * 131 + 7) as u8).collect();
    for (frame, len) in [LINUX_V4_DATA, LINUX_V6_DATA]
        .into_iter()
        .flat_map(|h| [0usize, 1, 2, 3, 517, 1448, 1460, 1461].map(|l| (h, l)))
    {
        let bytes = hex(frame);
        let f = parse_ok(&bytes);
        let tcp = TcpRepr {
            payload_len: len,
            ..f.tcp
        };
        let mut full = vec![0u8; 2048];
        let n = emit_tcp_frame(
            &mut full,
            &f.eth,
            &f.ip,
            &tcp,
            &payload[..len],
            ChecksumMode::Compute,
        )
        .expect("fits");
        for split in [0, 1, len / 2, len.saturating_sub(1), len].map(|s| s.min(len)) {
            let mut folded = vec![0xa5u8; 2048];
            let start = tcp_payload_offset(&f.eth, &f.ip, &tcp);
            let (a, b) = folded[start..start + len].split_at_mut(split);
            let sum = checksum::combine(&[
                checksum::copy_and_sum(a, &payload[..split]),
                checksum::at_offset(checksum::copy_and_sum(b, &payload[split..len]), split),
            ]);
            let m =
                emit_tcp_frame_headers_summed(&mut folded, &f.eth, &f.ip, &tcp, sum).expect("fits");
            assert_eq!(m, n);
            assert_eq!(folded[..m], full[..n], "len {len} split {split}");
            assert!(parse_tcp_frame(&folded[..m], ChecksumMode::Compute).is_ok());
        }
    }
}

#[test]
fn error_indices_are_dense() {
    for (i, e) in WireError::ALL.iter().enumerate() {
        assert_eq!(e.index(), i, "{e:?}");
        assert!(!e.name().is_empty());
    }
}

// ---- random inputs -------------------------------------------------------------------------

/// xorshift64*: deterministic random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A frame that parses re-emits (no longer than it was: tern's option layout is never longer
/// than another legal encoding of the same options, and IPv4 options are dropped) into a frame
/// that parses to the same representations — with the IP length following the re-encoded TCP
/// header, and SACK blocks that no longer fit beside tern's layout dropped.
fn check_reemit(frame: &TcpFrame<'_>, max_len: usize) {
    let mut out = vec![0u8; max_len];
    let n = emit_tcp_frame(
        &mut out,
        &frame.eth,
        &frame.ip,
        &frame.tcp,
        frame.payload,
        ChecksumMode::Compute,
    )
    .expect("a parsed frame re-emits into a buffer as long as itself");
    let again = parse_tcp_frame(&out[..n], ChecksumMode::Compute).expect("re-emitted frame parses");
    let mut tcp = frame.tcp;
    let fit = tcp.options.max_sack_blocks();
    tcp.options.sack_blocks.truncate(fit);
    let segment_len = tcp.header_len() + frame.payload.len();
    let ip = match frame.ip {
        IpRepr::V4(r) => IpRepr::V4(Ipv4Repr {
            payload_len: segment_len,
            ..r
        }),
        IpRepr::V6(r) => IpRepr::V6(Ipv6Repr {
            payload_len: segment_len,
            ..r
        }),
    };
    assert_eq!(
        (again.eth, again.ip, again.tcp, again.payload),
        (frame.eth, ip, tcp, frame.payload)
    );
}

/// Runs every parser and, where `check_len` passes, every accessor of every view.
fn exercise_everything(bytes: &[u8]) {
    for mode in [
        ChecksumMode::Compute,
        ChecksumMode::AcceptPartial,
        ChecksumMode::Skip,
    ] {
        if let Ok(frame) = parse_tcp_frame(bytes, mode) {
            check_reemit(&frame, bytes.len());
        }
        let _ = Ipv4Repr::parse(&Ipv4Packet::new_unchecked(bytes), mode);
    }
    let _ = Ipv6Repr::parse(&Ipv6Packet::new_unchecked(bytes));
    let _ = TcpOptions::parse(bytes);
    let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let _ = TcpRepr::parse(
        &TcpPacket::new_unchecked(bytes),
        a,
        a,
        ChecksumMode::Compute,
    );
    if let Ok(e) = EthernetFrame::new_checked(bytes) {
        let _ = (
            e.dst_addr(),
            e.src_addr(),
            e.vlan(),
            e.ethertype(),
            e.payload().len(),
        );
        let _ = EthernetRepr::parse(&e);
    }
    if let Ok(p) = Ipv4Packet::new_checked(bytes) {
        let _ = (
            p.version(),
            p.dscp_ecn(),
            p.ident(),
            p.dont_frag(),
            p.more_frags(),
        );
        let _ = (
            p.frag_offset(),
            p.ttl(),
            p.protocol(),
            p.checksum(),
            p.src_addr(),
        );
        let _ = (p.dst_addr(), p.verify_checksum(), p.payload().len());
    }
    if let Ok(p) = Ipv6Packet::new_checked(bytes) {
        let _ = (
            p.traffic_class(),
            p.flow_label(),
            p.next_header(),
            p.hop_limit(),
        );
        let _ = (p.src_addr(), p.dst_addr(), p.payload().len());
    }
    if let Ok(p) = TcpPacket::new_checked(bytes) {
        let _ = (
            p.src_port(),
            p.dst_port(),
            p.seq_number(),
            p.ack_number(),
            p.flags(),
        );
        let _ = (
            p.window_len(),
            p.checksum(),
            p.urgent_at(),
            p.options().len(),
        );
        let _ = (p.payload().len(), p.verify_checksum(a, a));
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds: Vec<Vec<u8>> = ALL_LINUX.iter().map(|t| hex(t)).collect();
    for _ in 0..4000 {
        // Pure noise: rarely gets past Ethernet, so also mutate real frames a few bytes at a
        // time, which reaches the IP, TCP and option parsers with nearly valid input.
        let len = rng.below(160);
        let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        exercise_everything(&noise);
        exercise_everything(&noise[noise.len().min(14)..]);

        let mut frame = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(frame.len());
            frame[at] = rng.next() as u8;
        }
        let cut = rng.below(frame.len() + 1);
        exercise_everything(&frame[..cut]);
        exercise_everything(&frame[14.min(cut)..cut]);
        exercise_everything(&frame[(14 + 20).min(cut)..cut]);
    }
}

// ---- proptest round trips ------------------------------------------------------------------

fn arb_options() -> impl Strategy<Value = TcpOptions> {
    (
        proptest::option::of(any::<u16>()),
        proptest::option::of(any::<u8>()),
        any::<bool>(),
        proptest::collection::vec((any::<u32>(), any::<u32>()), 0..=MAX_SACK_BLOCKS),
        proptest::option::of((any::<u32>(), any::<u32>())),
    )
        .prop_map(|(mss, window_scale, sack_permitted, sacks, ts)| {
            let blocks: Vec<SackBlock> = sacks
                .into_iter()
                .map(|(l, r)| SackBlock {
                    left: SeqNumber(l),
                    right: SeqNumber(r),
                })
                .collect();
            let mut options = TcpOptions {
                mss,
                window_scale,
                sack_permitted,
                sack_blocks: SackBlocks::from_slice(&blocks),
                timestamps: ts.map(|(tsval, tsecr)| Timestamps { tsval, tsecr }),
            };
            // What emit can carry: blocks beyond the option space are dropped (tested
            // separately in tcp::tests), so the generator keeps to what fits.
            let fit = options.max_sack_blocks();
            options.sack_blocks.truncate(fit);
            options
        })
}

fn arb_tcp() -> impl Strategy<Value = TcpRepr> {
    (
        any::<(u16, u16, u32)>(),
        proptest::option::of(any::<u32>()),
        any::<u8>(),
        any::<u16>(),
        arb_options(),
    )
        .prop_map(
            |((src_port, dst_port, seq), ack, flags, window, options)| TcpRepr {
                src_port,
                dst_port,
                seq: SeqNumber(seq),
                ack: ack.map(SeqNumber),
                flags: TcpFlags(flags).difference(TcpFlags::ACK),
                window,
                options,
                payload_len: 0,
            },
        )
}

fn arb_eth() -> impl Strategy<Value = EthernetRepr> {
    (
        any::<[u8; 6]>(),
        any::<[u8; 6]>(),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(s, d, vlan)| EthernetRepr {
            src_addr: EthernetAddress(s),
            dst_addr: EthernetAddress(d),
            vlan: vlan.map(VlanTag),
            ethertype: EtherType::IPV4,
        })
}

fn arb_ip() -> impl Strategy<Value = IpRepr> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<(u8, u8, u16, bool)>()
        )
            .prop_map(
                |(s, d, (ttl, dscp_ecn, ident, dont_frag))| IpRepr::V4(Ipv4Repr {
                    src_addr: Ipv4Addr::from(s),
                    dst_addr: Ipv4Addr::from(d),
                    protocol: IP_PROTO_TCP,
                    payload_len: 0,
                    ttl,
                    dscp_ecn,
                    ident,
                    dont_frag,
                })
            ),
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<(u8, u8)>(),
            0u32..(1 << 20)
        )
            .prop_map(|(s, d, (hop_limit, traffic_class), flow_label)| IpRepr::V6(
                Ipv6Repr {
                    src_addr: Ipv6Addr::from(s),
                    dst_addr: Ipv6Addr::from(d),
                    next_header: IP_PROTO_TCP,
                    payload_len: 0,
                    hop_limit,
                    traffic_class,
                    flow_label,
                }
            )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frame_round_trip(
        eth in arb_eth(),
        ip in arb_ip(),
        tcp in arb_tcp(),
        payload in proptest::collection::vec(any::<u8>(), 0..1500),
    ) {
        let mut buf = vec![0u8; 2048];
        let n = emit_tcp_frame(&mut buf, &eth, &ip, &tcp, &payload, ChecksumMode::Compute)
            .expect("emit into a 2 KiB buffer");
        let f = parse_tcp_frame(&buf[..n], ChecksumMode::Compute).expect("parse what was emitted");
        let ip_expected = match ip {
            IpRepr::V4(r) => IpRepr::V4(Ipv4Repr { payload_len: tcp.header_len() + payload.len(), ..r }),
            IpRepr::V6(r) => IpRepr::V6(Ipv6Repr { payload_len: tcp.header_len() + payload.len(), ..r }),
        };
        prop_assert_eq!(f.eth, EthernetRepr { ethertype: f.eth.ethertype, ..eth });
        prop_assert_eq!(f.ip, ip_expected);
        prop_assert_eq!(f.tcp, TcpRepr { payload_len: payload.len(), ..tcp });
        prop_assert_eq!(f.payload, &payload[..]);
        let seg = &buf[n - tcp.header_len() - payload.len()..n];
        prop_assert_eq!(
            reference_tcp_checksum(ip.src_addr(), ip.dst_addr(), seg),
            u16::from_be_bytes([seg[16], seg[17]]),
            "the emitted checksum matches the word-by-word reference"
        );
    }

    #[test]
    fn options_round_trip(options in arb_options()) {
        let mut out = [0u8; MAX_OPTIONS_LEN_FOR_TESTS];
        let len = options.encoded_len();
        prop_assert!(len <= MAX_OPTIONS_LEN_FOR_TESTS && len.is_multiple_of(4), "length {}", len);
        options.emit(&mut out[..len]);
        prop_assert_eq!(TcpOptions::parse(&out[..len]), Ok(options));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        exercise_everything(&bytes);
    }

    #[test]
    fn checksum_update_matches_recompute(
        data in proptest::collection::vec(any::<u8>(), 2..200),
        at in any::<prop::sample::Index>(),
        new in any::<u16>(),
    ) {
        let mut data = data;
        if !data.len().is_multiple_of(2) {
            data.pop();
        }
        let i = at.index(data.len() / 2) * 2;
        let before = checksum::finish(checksum::data(&data));
        let old = u16::from_be_bytes([data[i], data[i + 1]]);
        data[i..i + 2].copy_from_slice(&new.to_be_bytes());
        let after = checksum::finish(checksum::data(&data));
        // One's complement has two zeros; compare what a verifier would compute.
        let updated = checksum::update_u16(before, old, new);
        prop_assert_eq!(checksum::combine(&[!after]), checksum::combine(&[!updated]));
    }
}

const MAX_OPTIONS_LEN_FOR_TESTS: usize = 40;
