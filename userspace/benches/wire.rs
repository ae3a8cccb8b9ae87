//! The per-segment cost of tern's packet views (`tern::wire`): parsing and emitting a whole
//! Ethernet/IPv4/TCP frame, and the Internet checksum that dominates both (AF_XDP on veth has no
//! checksum offload, so every byte in and out is summed in software).
//!
//! Owns the criterion benchmarks `wire/parse_data_1448` and `wire/emit_data_1448` (a full-MSS
//! data segment with timestamps: 1448 payload bytes, 1514-byte frame), `wire/parse_ack` and
//! `wire/emit_ack` (a bare ACK with timestamps and one SACK block), and `wire/checksum_1500`.
//! Checksums are computed and verified in all of them (`ChecksumMode::Compute`), as on the
//! bypass path. Does not own the TCP stack's processing cost (the `tcp` benches).

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern::wire::{
    checksum, emit_tcp_frame, parse_tcp_frame, ChecksumMode, EtherType, EthernetAddress,
    EthernetRepr, IpRepr, Ipv4Repr, SackBlock, SackBlocks, SeqNumber, TcpFlags, TcpOptions,
    TcpRepr, Timestamps, IP_PROTO_TCP,
};

/// Payload of a full segment at MTU 1500 with timestamps (1500 − 20 − 20 − 12).
const MSS_TS: usize = 1448;

fn headers(options: TcpOptions, flags: TcpFlags) -> (EthernetRepr, IpRepr, TcpRepr) {
    let eth = EthernetRepr {
        src_addr: EthernetAddress([0x02, 0, 0, 0, 0, 1]),
        dst_addr: EthernetAddress([0x02, 0, 0, 0, 0, 2]),
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
        ident: 0,
        dont_frag: true,
    });
    let tcp = TcpRepr {
        src_port: 443,
        dst_port: 50_000,
        seq: SeqNumber(0x1234_5678),
        ack: Some(SeqNumber(0x9abc_def0)),
        flags,
        window: 2048,
        options,
        payload_len: 0,
    };
    (eth, ip, tcp)
}

fn bench_wire(c: &mut Criterion) {
    let ts = Some(Timestamps {
        tsval: 1_000_000,
        tsecr: 2_000_000,
    });
    let data_opts = TcpOptions {
        timestamps: ts,
        ..TcpOptions::default()
    };
    let ack_opts = TcpOptions {
        timestamps: ts,
        sack_blocks: SackBlocks::from_slice(&[SackBlock {
            left: SeqNumber(0x9abc_e000),
            right: SeqNumber(0x9abc_e5a8),
        }]),
        ..TcpOptions::default()
    };
    let payload: Vec<u8> = (0..MSS_TS).map(|i| (i * 7) as u8).collect();

    let (eth, ip, data) = headers(data_opts, TcpFlags::PSH);
    let mut data_frame = [0u8; 2048];
    let data_len = emit_tcp_frame(
        &mut data_frame,
        &eth,
        &ip,
        &data,
        &payload,
        ChecksumMode::Compute,
    )
    .expect("emit the data segment");
    assert_eq!(data_len, 14 + 1500, "a full-MTU frame");
    let (_, _, ack) = headers(ack_opts, TcpFlags::NONE);
    let mut ack_frame = [0u8; 128];
    let ack_len = emit_tcp_frame(&mut ack_frame, &eth, &ip, &ack, &[], ChecksumMode::Compute)
        .expect("emit the ACK");

    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Bytes(data_len as u64));
    g.bench_function("parse_data_1448", |b| {
        b.iter(|| {
            let f = parse_tcp_frame(black_box(&data_frame[..data_len]), ChecksumMode::Compute)
                .expect("parse the data segment");
            black_box(f.tcp.seq)
        })
    });
    let mut out = [0u8; 2048];
    g.bench_function("emit_data_1448", |b| {
        b.iter(|| {
            emit_tcp_frame(
                &mut out,
                black_box(&eth),
                &ip,
                black_box(&data),
                &payload,
                ChecksumMode::Compute,
            )
            .expect("emit the data segment")
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_ack", |b| {
        b.iter(|| {
            let f = parse_tcp_frame(black_box(&ack_frame[..ack_len]), ChecksumMode::Compute)
                .expect("parse the ACK");
            black_box(f.tcp.ack)
        })
    });
    g.bench_function("emit_ack", |b| {
        b.iter(|| {
            emit_tcp_frame(
                &mut out,
                black_box(&eth),
                &ip,
                black_box(&ack),
                &[],
                ChecksumMode::Compute,
            )
            .expect("emit the ACK")
        })
    });
    g.throughput(Throughput::Bytes(1500));
    let bytes = &data_frame[14..14 + 1500];
    g.bench_function("checksum_1500", |b| {
        b.iter(|| checksum::data(black_box(bytes)))
    });
    g.finish();
}

criterion_group!(benches, bench_wire);
criterion_main!(benches);
