//! The per-segment processing cost of tern's TCP stack (`tern::tcp::stack::Stack`): a frame in
//! through `Stack::receive` (checksums verified, as on the bypass path), the stack's decision,
//! and whatever it emits in reply (built and checksummed into the scratch frame; `out` only
//! looks at it, as the worker would copy it to UMEM).
//!
//! Owns the criterion benchmarks, all in ns per segment (`Throughput::Elements(1)`):
//! - `tcp/syn_to_syn_ack`: a SYN to a listener answered statelessly with a cookie SYN-ACK;
//! - `tcp/data_in_order_1448`: an in-order full-MSS data segment on an established connection,
//!   with the ACK decision, the application draining it (`recv` into a buffer) and the `poll`
//!   that flushes what the drain made due — one worker loop turn per segment;
//! - `tcp/ack_of_data`: a pure ACK acknowledging one segment of ours in flight (RTT sample,
//!   congestion window growth, send-ring release);
//! - `tcp/cookie_ack_accept`: the handshake's final ACK whose cookie validates and creates a
//!   connection (flow-table insert, TCB and ring allocation).
//!
//! Frames are built outside the timed region (the loops that need fresh sequence numbers use
//! `iter_custom` and build a chunk of frames untimed before timing the chunk). Before and after
//! each benchmark, assertions check that the measured path is the one named (a reply was sent,
//! counters moved, every data byte was accepted), so a change that turns it into a drop fails
//! the bench instead of making it faster. Does not own: packet parsing/emitting alone
//! (`benches/wire.rs`) or the on-the-rig comparison with the kernel (`cargo xtask bench tcp`).

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration as StdDuration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern::tcp::conn::{State, TcbConfig};
use tern::tcp::stack::{ConnId, Stack, StackConfig};
use tern::tcp::time::{Duration, Instant};
use tern::wire::{
    emit_tcp_frame, parse_tcp_frame, ChecksumMode, EtherType, EthernetAddress, EthernetRepr,
    IpRepr, Ipv4Repr, SeqNumber, TcpFlags, TcpOptions, TcpRepr, Timestamps, IP_PROTO_TCP,
};

const SERVER_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);
/// Our advertised MSS: 1448 payload bytes plus 12 of timestamps fill a 1500-byte MTU.
const MSS: u16 = 1460;
/// Payload of a full segment with timestamps.
const SEG: usize = 1448;
const FRAME: usize = 2048;
/// The client's window scale; with its 4 MiB window the server is never window-limited.
const CLIENT_WSCALE: u8 = 7;
const CLIENT_WINDOW: u16 = ((4 << 20) >> CLIENT_WSCALE) as u16;
/// Segments per untimed setup in the `iter_custom` loops.
const CHUNK: u64 = 64;

fn server() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 443))
}

fn client(n: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 2], 20_000 + n))
}

fn t0() -> Instant {
    Instant::from_secs(1_000)
}

fn stack(capacity: usize) -> Stack {
    Stack::new(
        StackConfig {
            capacity,
            listeners: &[server()],
            tcb: TcbConfig {
                send_buffer: 256 * 1024,
                recv_buffer: 256 * 1024,
                mss: MSS,
                ..TcbConfig::default()
            },
            cookie_keys: [[7; 16], [9; 16]],
            flow_key: [3; 16],
            rx_checksum: ChecksumMode::Compute,
            frame_size: FRAME,
            max_orphans: capacity,
        },
        t0(),
    )
    .expect("valid stack config")
}

/// Emits a client → server frame from `src` into `buf`; returns its length.
fn emit_into(buf: &mut [u8], src: SocketAddr, repr: &TcpRepr, payload: &[u8]) -> usize {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), server().ip()) else {
        unreachable!("the bench is IPv4");
    };
    let eth = EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: SERVER_MAC,
        vlan: None,
        ethertype: EtherType::IPV4,
    };
    let ip = IpRepr::V4(Ipv4Repr {
        src_addr: s,
        dst_addr: d,
        protocol: IP_PROTO_TCP,
        payload_len: 0,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: true,
    });
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: server().port(),
        ..*repr
    };
    emit_tcp_frame(buf, &eth, &ip, &repr, payload, ChecksumMode::Compute).expect("frame fits")
}

fn frame(src: SocketAddr, repr: &TcpRepr, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; FRAME];
    let n = emit_into(&mut buf, src, repr, payload);
    buf.truncate(n);
    buf
}

/// A Linux-like SYN: MSS 1460, window scale 7, SACK-permitted, timestamps.
fn syn(isn: u32, tsval: u32) -> TcpRepr {
    TcpRepr {
        src_port: 0,
        dst_port: 0,
        seq: SeqNumber(isn),
        ack: None,
        flags: TcpFlags::SYN,
        window: 64_240,
        options: TcpOptions {
            mss: Some(1460),
            window_scale: Some(CLIENT_WSCALE),
            sack_permitted: true,
            timestamps: Some(Timestamps { tsval, tsecr: 0 }),
            ..TcpOptions::default()
        },
        payload_len: 0,
    }
}

/// The client side of one connection, kept by hand: what its next segment carries.
struct Peer {
    addr: SocketAddr,
    /// Next sequence number the client sends.
    seq: SeqNumber,
    /// What the client acknowledges.
    ack: SeqNumber,
    tsval: u32,
    /// The server's latest TSval, echoed.
    tsecr: u32,
}

impl Peer {
    /// A segment from the client with its current SEQ/ACK and timestamps.
    fn segment(&self, flags: TcpFlags) -> TcpRepr {
        TcpRepr {
            src_port: 0,
            dst_port: 0,
            seq: self.seq,
            ack: Some(self.ack),
            flags,
            window: CLIENT_WINDOW,
            options: TcpOptions {
                timestamps: Some(Timestamps {
                    tsval: self.tsval,
                    tsecr: self.tsecr,
                }),
                ..TcpOptions::default()
            },
            payload_len: 0,
        }
    }
}

/// Sends a SYN from `addr` and returns the client state after the SYN-ACK plus the final ACK's
/// frame (not yet delivered).
fn half_open(s: &mut Stack, addr: SocketAddr, isn: u32, now: Instant) -> (Peer, Vec<u8>) {
    let mut replies = Vec::new();
    let r = s.receive(&frame(addr, &syn(isn, 1), &[]), now, &mut |b| {
        replies.push(b.to_vec())
    });
    assert_eq!(r, Ok(()), "SYN accepted");
    assert_eq!(replies.len(), 1, "one SYN-ACK");
    let sa = parse_tcp_frame(&replies[0], ChecksumMode::Compute).expect("valid SYN-ACK");
    assert!(sa.tcp.flags.contains(TcpFlags::SYN) && sa.tcp.ack.is_some());
    let ts = sa
        .tcp
        .options
        .timestamps
        .expect("SYN-ACK echoes timestamps");
    let peer = Peer {
        addr,
        seq: SeqNumber(isn) + 1,
        ack: sa.tcp.seq + 1,
        tsval: 2,
        tsecr: ts.tsval,
    };
    let ack = frame(addr, &peer.segment(TcpFlags::NONE), &[]);
    (peer, ack)
}

/// A full handshake; returns the client state and the stack's connection.
fn connect(s: &mut Stack, addr: SocketAddr, isn: u32, now: Instant) -> (Peer, ConnId) {
    let (peer, ack) = half_open(s, addr, isn, now);
    let r = s.receive(&ack, now, &mut |_| {});
    assert_eq!(r, Ok(()), "cookie ACK accepted");
    let id = s.pop_ready().expect("the new connection is reported");
    assert_eq!(
        s.conn(id).map(|c| c.state()),
        Some(State::Established),
        "connection established"
    );
    (peer, id)
}

fn bench_syn(c: &mut Criterion) {
    let mut s = stack(4);
    let now = t0();
    let f = frame(client(1), &syn(1000, 1), &[]);
    let mut sent = 0usize;
    let r = s.receive(&f, now, &mut |b| sent += b.len());
    assert_eq!(r, Ok(()), "SYN accepted");
    assert!(sent > 0, "a SYN-ACK was sent");
    let before = s.counters().syn_acks_sent;
    let mut ran = false;

    let mut g = c.benchmark_group("tcp");
    g.throughput(Throughput::Elements(1));
    g.bench_function("syn_to_syn_ack", |b| {
        ran = true;
        b.iter(|| {
            let mut n = 0usize;
            let r = s.receive(black_box(&f), now, &mut |b| n += black_box(b).len());
            black_box((r, n))
        })
    });
    g.finish();
    if !ran {
        return; // Filtered out.
    }
    let acks = s.counters().syn_acks_sent - before;
    assert!(acks > 0, "every iteration sent a SYN-ACK");
    assert_eq!(s.len(), 0, "SYNs created no state");
    assert_eq!(
        s.counters().frames_sent,
        acks + 1,
        "one frame per SYN, nothing else"
    );
}

fn bench_data(c: &mut Criterion) {
    let mut s = stack(4);
    let mut now = t0();
    let (mut peer, id) = connect(&mut s, client(1), 7_000, now);
    let payload: Vec<u8> = (0..SEG).map(|i| (i * 7) as u8).collect();
    let mut frames: Vec<Vec<u8>> = (0..CHUNK).map(|_| vec![0u8; FRAME]).collect();
    let mut lens = vec![0usize; CHUNK as usize];
    let mut sink = vec![0u8; 64 * 1024];
    let start_rcv = s.conn(id).expect("live").rcv_nxt();
    let mut segments = 0u64;
    let mut frames_out = 0u64;
    let mut ran = false;

    let mut g = c.benchmark_group("tcp");
    g.throughput(Throughput::Elements(1));
    g.bench_function("data_in_order_1448", |b| {
        ran = true;
        b.iter_custom(|iters| {
            let mut total = StdDuration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = CHUNK.min(iters - done) as usize;
                // Untimed: the next `n` in-order segments, 10 µs apart (~1.2 Gbit/s).
                for (f, len) in frames.iter_mut().zip(lens.iter_mut()).take(n) {
                    *len = emit_into(f, peer.addr, &peer.segment(TcpFlags::PSH), &payload);
                    peer.seq += SEG as u32;
                    peer.tsval = peer.tsval.wrapping_add(1);
                }
                let start = std::time::Instant::now();
                for (f, &len) in frames.iter().zip(lens.iter()).take(n) {
                    now += Duration::from_micros(10);
                    let r = s.receive(black_box(&f[..len]), now, &mut |b| {
                        frames_out += 1;
                        black_box(b);
                    });
                    debug_assert!(r.is_ok());
                    let tcb = s.conn_mut(id).expect("live");
                    let got = tcb.recv(&mut sink);
                    black_box(got);
                    s.poll(now, &mut |b| {
                        frames_out += 1;
                        black_box(b);
                    });
                }
                total += start.elapsed();
                while s.pop_ready().is_some() {}
                done += n as u64;
                segments += n as u64;
            }
            total
        })
    });
    g.finish();
    if !ran {
        return; // Filtered out.
    }
    let tcb = s.conn(id).expect("still live");
    assert_eq!(tcb.state(), State::Established, "still established");
    assert_eq!(
        tcb.rcv_nxt(),
        start_rcv + (segments * SEG as u64) as u32,
        "every segment was accepted in order"
    );
    assert_eq!(tcb.rcv_nxt(), peer.seq, "RCV.NXT is the client's SND.NXT");
    assert_eq!(tcb.recv_queue(), 0, "every byte was drained");
    assert_eq!(tcb.counters().out_of_window, 0, "no drops");
    assert!(
        frames_out >= segments / 2,
        "ACKs went out ({frames_out} for {segments} segments)"
    );
}

fn bench_ack(c: &mut Criterion) {
    let mut s = stack(4);
    let mut now = t0();
    let (mut peer, id) = connect(&mut s, client(1), 9_000, now);
    let data = vec![0x5au8; SEG * 8];
    // ACK frames of one round, and the data segments (seq end, TSval) they acknowledge.
    let mut acks: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 256]).collect();
    let mut lens = [0usize; 16];
    let mut sent: Vec<(SeqNumber, u32)> = Vec::with_capacity(16);
    let mut acked = 0u64;
    let mut replies = 0u64;
    let mut ran = false;

    let mut g = c.benchmark_group("tcp");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ack_of_data", |b| {
        ran = true;
        b.iter_custom(|iters| {
            let mut total = StdDuration::ZERO;
            let mut done = 0;
            while done < iters {
                // Untimed: queue up to 8 segments (the initial window is 10, so all go out at
                // once), capture them, and build one ACK per segment 100 µs later.
                let n = 8.min(iters - done) as usize;
                let tcb = s.conn_mut(id).expect("live");
                assert_eq!(tcb.send(&data[..n * SEG]), n * SEG, "send space");
                sent.clear();
                s.poll(now, &mut |b| {
                    let f = parse_tcp_frame(b, ChecksumMode::Skip).expect("our frame");
                    let ts = f.tcp.options.timestamps.map_or(0, |t| t.tsval);
                    sent.push((f.tcp.seq + f.payload.len() as u32, ts));
                });
                assert_eq!(sent.len(), n, "all segments sent in one flight");
                for (i, &(end, ts)) in sent.iter().enumerate() {
                    peer.ack = end;
                    peer.tsecr = ts;
                    lens[i] =
                        emit_into(&mut acks[i], peer.addr, &peer.segment(TcpFlags::NONE), &[]);
                }
                now += Duration::from_micros(100);
                let start = std::time::Instant::now();
                for (f, &len) in acks.iter().zip(lens.iter()).take(n) {
                    let r = s.receive(black_box(&f[..len]), now, &mut |b| {
                        replies += 1;
                        black_box(b);
                    });
                    debug_assert!(r.is_ok());
                }
                total += start.elapsed();
                while s.pop_ready().is_some() {}
                done += n as u64;
                acked += n as u64;
            }
            total
        })
    });
    g.finish();
    if !ran {
        return; // Filtered out.
    }
    let tcb = s.conn(id).expect("still live");
    assert_eq!(tcb.state(), State::Established, "still established");
    assert_eq!(tcb.snd_una(), peer.ack, "every ACK advanced SND.UNA");
    assert_eq!(tcb.snd_una(), tcb.snd_nxt(), "nothing left in flight");
    assert_eq!(tcb.send_queue(), 0, "send ring released");
    assert!(acked > 0, "ACKs processed");
    assert_eq!(replies, 0, "pure ACKs of data need no reply");
    assert_eq!(tcb.counters().ack_too_old + tcb.counters().ack_too_new, 0);
}

fn bench_accept(c: &mut Criterion) {
    let capacity = CHUNK as usize;
    let mut s = stack(capacity);
    let now = t0();
    // One cookie ACK per client port, valid for as long as `now` stays put; the connections
    // it creates are aborted (and their slots freed) untimed after each chunk.
    let acks: Vec<Vec<u8>> = (0..capacity as u16)
        .map(|i| half_open(&mut s, client(i), 1_000 * u32::from(i), now).1)
        .collect();
    let mut created = 0u64;
    let before = s.counters().connections_created;
    let mut ran = false;

    let mut g = c.benchmark_group("tcp");
    g.throughput(Throughput::Elements(1));
    g.bench_function("cookie_ack_accept", |b| {
        ran = true;
        b.iter_custom(|iters| {
            let mut total = StdDuration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = CHUNK.min(iters - done) as usize;
                let start = std::time::Instant::now();
                for f in acks.iter().take(n) {
                    let r = s.receive(black_box(f), now, &mut |b| {
                        black_box(b);
                    });
                    debug_assert!(r.is_ok());
                }
                total += start.elapsed();
                assert_eq!(s.len(), n, "each ACK created a connection");
                while let Some(id) = s.pop_ready() {
                    if let Some(tcb) = s.conn_mut(id) {
                        tcb.abort();
                    }
                }
                s.poll(now, &mut |_| {});
                assert_eq!(s.len(), 0, "aborted connections freed their slots");
                done += n as u64;
                created += n as u64;
            }
            total
        })
    });
    g.finish();
    if !ran {
        return; // Filtered out.
    }
    assert_eq!(
        s.counters().connections_created - before,
        created,
        "every timed ACK created a connection"
    );
}

criterion_group!(benches, bench_syn, bench_data, bench_ack, bench_accept);
criterion_main!(benches);
