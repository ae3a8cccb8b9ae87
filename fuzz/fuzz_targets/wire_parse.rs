//! Fuzz target `wire_parse`: arbitrary bytes into every parser of `tern::wire`.
//!
//! Checks the module's panic contract (see `tern::wire`'s docs: no accessor panics after
//! `check_len`, `parse` never panics) and one semantic property: a frame that parses re-emits
//! into a frame that parses to the same representations (IPv4 options are dropped on emit, and
//! SACK blocks that no longer fit beside tern's option layout are dropped, so the expected TCP
//! options are trimmed the same way).

#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use tern::wire::{
    emit_tcp_frame, parse_tcp_frame, ChecksumMode, EthernetFrame, EthernetRepr, IpRepr, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpOptions, TcpPacket, TcpRepr,
};

fuzz_target!(|data: &[u8]| {
    let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let _ = TcpOptions::parse(data);
    let _ = Ipv6Repr::parse(&Ipv6Packet::new_unchecked(data));
    let _ = TcpRepr::parse(&TcpPacket::new_unchecked(data), a, a, ChecksumMode::Compute);
    if let Ok(e) = EthernetFrame::new_checked(data) {
        let _ = (
            e.dst_addr(),
            e.src_addr(),
            e.vlan(),
            e.ethertype(),
            e.payload().len(),
        );
        let _ = EthernetRepr::parse(&e);
    }
    if let Ok(p) = Ipv4Packet::new_checked(data) {
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
    if let Ok(p) = Ipv6Packet::new_checked(data) {
        let _ = (
            p.traffic_class(),
            p.flow_label(),
            p.next_header(),
            p.hop_limit(),
        );
        let _ = (p.src_addr(), p.dst_addr(), p.payload().len());
    }
    if let Ok(p) = TcpPacket::new_checked(data) {
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
    for mode in [
        ChecksumMode::Compute,
        ChecksumMode::AcceptPartial,
        ChecksumMode::Skip,
    ] {
        let _ = Ipv4Repr::parse(&Ipv4Packet::new_unchecked(data), mode);
        let Ok(frame) = parse_tcp_frame(data, mode) else {
            continue;
        };
        // tern aligns each option on its own (NOP padding), so its layout can be longer than a
        // packed legal encoding of the same options (MSS + WS + SACK-permitted + timestamps:
        // 19 bytes packed, 24 aligned); IPv4 options are dropped. The re-emitted frame is
        // therefore at most the input plus the 40-byte TCP option space.
        let mut out = vec![0u8; data.len() + 40];
        let n = emit_tcp_frame(
            &mut out,
            &frame.eth,
            &frame.ip,
            &frame.tcp,
            frame.payload,
            ChecksumMode::Compute,
        )
        .expect("a parsed frame re-emits into its length plus the TCP option space");
        let again = parse_tcp_frame(&out[..n], ChecksumMode::Compute)
            .expect("a re-emitted frame parses with checksums verified");
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
        assert_eq!(again.eth, frame.eth);
        assert_eq!(again.ip, ip);
        assert_eq!(again.tcp, tcp);
        assert_eq!(again.payload, frame.payload);
    }
});
