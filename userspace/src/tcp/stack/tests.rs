//! Tests for [`Stack`] with crafted frames (built with `wire::emit_tcp_frame`, checksums
//! computed and verified both ways), and an end-to-end run against a client [`Tcb`] that does
//! its side of the handshake by hand and then talks to the stack through frames.

use std::collections::HashMap;

use super::*;
use crate::tcp::conn::CloseReason;
use crate::tcp::time::Duration;
use crate::wire::{emit_tcp_frame, parse_tcp_frame, EtherType, EthernetAddress};

const SERVER_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);
const PORT: u16 = 443;
const MSS: u16 = 1400;
const FRAME: usize = 2048;

fn server() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], PORT))
}

fn client(n: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 2], 40_000 + n))
}

/// Test time: milliseconds after a base far enough from the epoch for nothing to saturate.
fn t(ms: u64) -> Instant {
    Instant::from_millis(100_000 + ms)
}

fn tcb_config() -> TcbConfig {
    TcbConfig {
        send_buffer: 64 * 1024,
        recv_buffer: 256 * 1024,
        mss: MSS,
        time_wait: Duration::from_secs(1),
        ..TcbConfig::default()
    }
}

fn stack(capacity: usize) -> Stack {
    stack_with(capacity, tcb_config(), capacity)
}

fn stack_with(capacity: usize, tcb: TcbConfig, max_orphans: usize) -> Stack {
    Stack::new(
        StackConfig {
            capacity,
            listeners: &[server()],
            tcb,
            cookie_keys: [[7; 16], [9; 16]],
            flow_key: [3; 16],
            rx_checksum: ChecksumMode::Compute,
            frame_size: FRAME,
            max_orphans,
        },
        t(0),
    )
    .expect("valid stack config")
}

/// A frame from `src` to `dst` (client → server MACs unless `src` is the server).
fn frame(src: SocketAddr, dst: SocketAddr, repr: TcpRepr, payload: &[u8]) -> Vec<u8> {
    let (src_mac, dst_mac) = if src == server() {
        (SERVER_MAC, CLIENT_MAC)
    } else {
        (CLIENT_MAC, SERVER_MAC)
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        vlan: None,
        ethertype: EtherType::IPV4,
    };
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("tests use IPv4");
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
        dst_port: dst.port(),
        ..repr
    };
    let mut buf = vec![0; FRAME];
    let n = emit_tcp_frame(&mut buf, &eth, &ip, &repr, payload, ChecksumMode::Compute)
        .expect("test frame fits");
    buf.truncate(n);
    buf
}

/// A parsed frame the stack sent (checksums verified), owning its payload.
#[derive(Debug)]
struct Out {
    eth: EthernetRepr,
    ip: IpRepr,
    tcp: TcpRepr,
    payload: Vec<u8>,
}

#[track_caller]
fn parse_out(bytes: &[u8]) -> Out {
    let f = parse_tcp_frame(bytes, ChecksumMode::Compute).expect("the stack emits valid frames");
    Out {
        eth: f.eth,
        ip: f.ip,
        tcp: f.tcp,
        payload: f.payload.to_vec(),
    }
}

/// Feeds one frame; returns the result and the frames sent in reply.
fn deliver(s: &mut Stack, bytes: &[u8], now: Instant) -> (Result<(), RxDrop>, Vec<Out>) {
    let mut out = Vec::new();
    let r = s.receive(bytes, now, &mut |b| out.push(parse_out(b)));
    (r, out)
}

fn poll(s: &mut Stack, now: Instant) -> Vec<Out> {
    let mut out = Vec::new();
    s.poll(now, &mut |b| out.push(parse_out(b)));
    out
}

fn templ() -> TcpRepr {
    TcpRepr {
        src_port: 0,
        dst_port: 0,
        seq: SeqNumber(0),
        ack: None,
        flags: TcpFlags::NONE,
        window: 0,
        options: TcpOptions::default(),
        payload_len: 0,
    }
}

/// A Linux-like SYN: MSS 1460, window scale 7, SACK-permitted, timestamps.
fn syn(isn: u32, tsval: u32) -> TcpRepr {
    TcpRepr {
        seq: SeqNumber(isn),
        flags: TcpFlags::SYN,
        window: 64_240,
        options: TcpOptions {
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamps: Some(Timestamps { tsval, tsecr: 0 }),
            ..TcpOptions::default()
        },
        ..templ()
    }
}

/// Client side of a connection: its `Tcb` once the handshake is done.
const CLIENT_WSCALE: u8 = 7;

fn client_config() -> TcbConfig {
    TcbConfig {
        send_buffer: 64 * 1024,
        recv_buffer: 64 * 1024,
        mss: 1460,
        time_wait: Duration::from_secs(1),
        ..TcbConfig::default()
    }
}

/// Does the client's half of the handshake by hand (SYN, SYN-ACK, final ACK) against the stack
/// and returns the client's `Tcb` and the stack's new connection.
#[track_caller]
fn connect(s: &mut Stack, addr: SocketAddr, isn: u32, now: Instant) -> (Tcb, ConnId) {
    let tsval = now.ts_millis();
    let (r, out) = deliver(s, &frame(addr, server(), syn(isn, tsval), &[]), now);
    assert_eq!(r, Ok(()), "SYN accepted");
    assert_eq!(out.len(), 1, "one SYN-ACK");
    let sa = &out[0].tcp;
    let ts = sa.options.timestamps.expect("SYN-ACK echoes timestamps");
    let hs = Handshake {
        local_port: addr.port(),
        remote_port: PORT,
        iss: SeqNumber(isn),
        irs: sa.seq,
        peer_mss: sa.options.mss.expect("SYN-ACK carries MSS"),
        window_scale: sa.options.window_scale.map(|w| (w, CLIENT_WSCALE)),
        sack_permitted: sa.options.sack_permitted,
        timestamps: Some(0),
        peer_window: sa.window,
    };
    let mut client = Tcb::new(client_config(), &hs, now);
    client.set_ts_recent(ts.tsval);
    let ack = TcpRepr {
        seq: SeqNumber(isn) + 1,
        ack: Some(sa.seq + 1),
        window: (client_config().recv_buffer >> CLIENT_WSCALE) as u16,
        options: TcpOptions {
            timestamps: Some(Timestamps {
                tsval: now.ts_millis(),
                tsecr: ts.tsval,
            }),
            ..TcpOptions::default()
        },
        ..templ()
    };
    let before = s.counters().connections_created;
    let (r, out) = deliver(s, &frame(addr, server(), ack, &[]), now);
    assert_eq!(r, Ok(()), "cookie ACK accepted");
    assert!(out.is_empty(), "a bare final ACK needs no reply: {out:?}");
    assert_eq!(
        s.counters().connections_created,
        before + 1,
        "one connection"
    );
    let id = s.pop_ready().expect("the new connection is reported");
    assert_eq!(
        s.endpoints(id),
        Some((server(), addr)),
        "endpoints of the new connection"
    );
    (client, id)
}

/// Feeds everything the client has due to the stack; returns the stack's replies.
fn client_to_stack(s: &mut Stack, c: &mut Tcb, addr: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    c.poll_transmit(now, |repr, payload| {
        let mut bytes = vec![0; payload.len()];
        payload.copy_to(&mut bytes);
        frames.push(frame(addr, server(), *repr, &bytes));
        Ok::<(), ()>(())
    })
    .expect("the test link never refuses");
    let mut replies = Vec::new();
    for f in frames {
        let r = s.receive(&f, now, &mut |b| replies.push(b.to_vec()));
        assert_eq!(r, Ok(()), "client segment accepted by the stack");
    }
    replies
}

fn stack_to_client(c: &mut Tcb, frames: &[Vec<u8>], now: Instant) {
    for f in frames {
        let p = parse_out(f);
        // Drops (duplicates) are counted in the client's counters.
        let _ = c.process(now, &p.tcp, &p.payload);
    }
}

// ---------------------------------------------------------------------- passive open

#[test]
fn syn_gets_syn_ack_with_options_and_no_state() {
    let mut s = stack(4);
    let (r, out) = deliver(
        &mut s,
        &frame(client(1), server(), syn(1000, 555), &[]),
        t(0),
    );
    assert_eq!(r, Ok(()), "SYN handled");
    assert_eq!(out.len(), 1, "exactly one SYN-ACK");
    let o = &out[0];
    assert_eq!(
        (o.eth.src_addr, o.eth.dst_addr),
        (SERVER_MAC, CLIENT_MAC),
        "MACs swapped"
    );
    assert_eq!(
        (o.ip.src_addr(), o.ip.dst_addr()),
        (server().ip(), client(1).ip()),
        "addresses swapped"
    );
    assert_eq!(
        (o.tcp.src_port, o.tcp.dst_port),
        (PORT, client(1).port()),
        "ports"
    );
    assert_eq!(o.tcp.flags, TcpFlags::SYN, "SYN-ACK flags");
    assert_eq!(o.tcp.ack, Some(SeqNumber(1001)), "acknowledges the SYN");
    assert_eq!(o.tcp.options.mss, Some(MSS), "our MSS");
    // 256 KiB of receive buffer needs a shift of 3 to be advertised whole.
    assert_eq!(o.tcp.options.window_scale, Some(3), "our window scale");
    assert!(o.tcp.options.sack_permitted, "SACK-permitted echoed");
    let ts = o.tcp.options.timestamps.expect("timestamps");
    assert_eq!(ts.tsecr, 555, "TSecr echoes the SYN's TSval");
    // Our clock for this connection: ts_millis plus the per-tuple offset (RFC 7323 §7.1).
    let clock = t(0).ts_millis().wrapping_add(s.jar.ts_offset(&CookieTuple {
        local: server(),
        remote: client(1),
    }));
    assert!(
        clock.wrapping_sub(ts.tsval) < 64,
        "TSval {} never ahead of our clock {clock} (only the cookie bits below it)",
        ts.tsval
    );
    assert_eq!(o.tcp.window, u16::MAX, "unscaled SYN-ACK window, capped");
    assert!(o.payload.is_empty(), "no payload");
    assert_eq!(s.len(), 0, "a SYN creates no state");
    assert_eq!(s.pop_ready(), None, "nothing for the application");
    assert_eq!(s.counters().syn_acks_sent, 1, "counted");

    // Without timestamps, window scaling and SACK cannot be carried by the cookie: omitted.
    let bare = TcpRepr {
        options: TcpOptions {
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            ..TcpOptions::default()
        },
        ..syn(2000, 0)
    };
    let (_, out) = deliver(&mut s, &frame(client(2), server(), bare, &[]), t(1));
    assert_eq!(out.len(), 1, "one SYN-ACK");
    assert_eq!(
        out[0].tcp.options,
        TcpOptions {
            mss: Some(MSS),
            ..TcpOptions::default()
        },
        "only MSS without timestamps"
    );
    assert_eq!(s.len(), 0, "still no state");
}

#[test]
fn cookie_ack_creates_exactly_one_connection() {
    let mut s = stack(4);
    let (client_tcb, id) = connect(&mut s, client(1), 5000, t(0));
    assert_eq!(s.len(), 1, "one flow");
    assert_eq!(s.counters().connections_created, 1, "one connection");
    let conn = s.conn(id).expect("live");
    assert_eq!(conn.state(), State::Established, "established");
    assert_eq!(
        conn.rcv_nxt(),
        SeqNumber(5001),
        "RCV.NXT after the client ISN"
    );
    assert_eq!(
        conn.snd_una(),
        client_tcb.rcv_nxt(),
        "ISS agrees both sides"
    );
    assert_eq!(s.connections().collect::<Vec<_>>(), vec![id], "iterated");
    assert_eq!(s.pop_ready(), None, "reported once");
}

#[test]
fn data_flows_both_ways_and_is_acked() {
    let mut s = stack(4);
    let addr = client(1);
    let (mut c, id) = connect(&mut s, addr, 5000, t(0));
    assert_eq!(c.send(b"hello, server"), 13, "queued on the client");
    let replies = client_to_stack(&mut s, &mut c, addr, t(1));
    // Delayed ACK: nothing is owed immediately for one small segment.
    stack_to_client(&mut c, &replies, t(1));
    assert_eq!(s.pop_ready(), Some(id), "readable");
    let mut buf = [0u8; 64];
    let tcb = s.conn_mut(id).expect("live");
    let n = tcb.recv(&mut buf);
    assert_eq!(&buf[..n], b"hello, server", "bytes arrive in order");
    assert_eq!(tcb.send(b"hello, client"), 13, "queued on the server");
    let out = poll(&mut s, t(2));
    assert_eq!(out.len(), 1, "one data segment: {out:?}");
    assert_eq!(out[0].payload, b"hello, client", "server data");
    assert_eq!(
        out[0].tcp.ack,
        Some(SeqNumber(5001 + 13)),
        "it ACKs the client's data"
    );
    let bytes: Vec<Vec<u8>> = out
        .iter()
        .map(|o| frame(server(), addr, o.tcp, &o.payload))
        .collect();
    stack_to_client(&mut c, &bytes, t(2));
    assert_eq!(c.snd_una(), c.snd_nxt(), "client data acknowledged");
    let n = c.recv(&mut buf);
    assert_eq!(&buf[..n], b"hello, client", "client reads the reply");
    // The client's ACK (delayed, then due) reaches the server.
    c.on_timer(t(100));
    let replies = client_to_stack(&mut s, &mut c, addr, t(100));
    assert!(replies.is_empty(), "a pure ACK needs no reply");
    let tcb = s.conn(id).expect("live");
    assert_eq!(tcb.send_queue(), 0, "server data acknowledged");
}

// ---------------------------------------------------------------------- RSTs

#[test]
fn bad_cookie_ack_gets_rst_and_no_state() {
    let mut s = stack(4);
    let ack = TcpRepr {
        seq: SeqNumber(7001),
        ack: Some(SeqNumber(0xdead_beef)),
        window: 100,
        ..templ()
    };
    let (r, out) = deliver(&mut s, &frame(client(1), server(), ack, &[]), t(0));
    assert_eq!(r, Err(RxDrop::BadCookie), "refused");
    assert_eq!(out.len(), 1, "one RST");
    let rst = &out[0].tcp;
    assert_eq!(rst.flags, TcpFlags::RST, "RST without ACK");
    assert_eq!(rst.ack, None, "no ACK field");
    assert_eq!(rst.seq, SeqNumber(0xdead_beef), "SEQ=SEG.ACK");
    assert_eq!(s.len(), 0, "no state");
    assert_eq!(s.counters().dropped(RxDrop::BadCookie), 1, "counted");
    assert_eq!(s.counters().rsts_sent, 1, "RST counted");
}

#[test]
fn segment_to_unknown_flow_gets_rst_with_right_seq_and_ack() {
    let mut s = stack(4);
    let closed_port = SocketAddr::from(([10, 0, 0, 1], 80));
    // No ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; the FIN counts in SEG.LEN.
    let data = TcpRepr {
        seq: SeqNumber(1000),
        flags: TcpFlags::FIN,
        window: 100,
        ..templ()
    };
    let (r, out) = deliver(
        &mut s,
        &frame(client(1), closed_port, data, b"0123456789"),
        t(0),
    );
    assert_eq!(r, Err(RxDrop::NoListener), "no listener");
    assert_eq!(out.len(), 1, "one RST");
    let rst = &out[0].tcp;
    assert_eq!(
        (rst.flags, rst.seq, rst.ack),
        (TcpFlags::RST, SeqNumber(0), Some(SeqNumber(1011))),
        "RST,ACK acknowledging the whole segment"
    );
    assert_eq!(
        (rst.src_port, rst.dst_port),
        (80, client(1).port()),
        "ports swapped"
    );
    // With ACK: <SEQ=SEG.ACK><CTL=RST>.
    let acked = TcpRepr {
        seq: SeqNumber(1000),
        ack: Some(SeqNumber(424_242)),
        ..templ()
    };
    let (_, out) = deliver(&mut s, &frame(client(1), closed_port, acked, b"x"), t(0));
    let rst = &out[0].tcp;
    assert_eq!(
        (rst.flags, rst.seq, rst.ack),
        (TcpFlags::RST, SeqNumber(424_242), None),
        "RST at the acknowledged sequence number"
    );
    assert_eq!(s.counters().dropped(RxDrop::NoListener), 2, "counted");
    assert_eq!(s.len(), 0, "no state");
}

#[test]
fn rst_to_unknown_flow_gets_nothing() {
    let mut s = stack(4);
    for dst in [server(), SocketAddr::from(([10, 0, 0, 1], 80))] {
        for ack in [None, Some(SeqNumber(9))] {
            let rst = TcpRepr {
                seq: SeqNumber(1),
                ack,
                flags: TcpFlags::RST,
                ..templ()
            };
            let (r, out) = deliver(&mut s, &frame(client(1), dst, rst, &[]), t(0));
            assert_eq!(r, Err(RxDrop::UnknownRst), "discarded");
            assert!(out.is_empty(), "never RST an RST");
        }
    }
    assert_eq!(s.counters().dropped(RxDrop::UnknownRst), 4, "counted");
    assert_eq!(s.counters().rsts_sent, 0, "nothing sent");
}

#[test]
fn segment_without_syn_or_ack_to_listener_is_dropped() {
    let mut s = stack(4);
    let bare = TcpRepr {
        seq: SeqNumber(1),
        ..templ()
    };
    let (r, out) = deliver(&mut s, &frame(client(1), server(), bare, b"hi"), t(0));
    assert_eq!(
        r,
        Err(RxDrop::NoSynNoAck),
        "RFC 9293 §3.10.7.2 fourth check"
    );
    assert!(out.is_empty(), "silently");
}

#[test]
fn malformed_and_group_addressed_frames_are_counted_not_answered() {
    let mut s = stack(4);
    let good = frame(client(1), server(), syn(1, 1), &[]);
    let (r, out) = deliver(&mut s, &good[..20], t(0));
    assert_eq!(r, Err(RxDrop::Wire(WireError::Truncated)), "truncated");
    assert!(out.is_empty(), "no reply");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let (r, _) = deliver(&mut s, &bad, t(0));
    assert_eq!(r, Err(RxDrop::Wire(WireError::BadChecksum)), "checksum");
    let mut bcast = good;
    bcast[0..6].copy_from_slice(&[0xff; 6]);
    let (r, out) = deliver(&mut s, &bcast, t(0));
    assert_eq!(r, Err(RxDrop::NotForUs), "broadcast MAC");
    assert!(out.is_empty(), "never answered");
    let c = s.counters();
    assert_eq!(
        (
            c.dropped(RxDrop::Wire(WireError::Truncated)),
            c.dropped(RxDrop::Wire(WireError::BadChecksum)),
            c.dropped(RxDrop::NotForUs),
        ),
        (1, 1, 1),
        "each counted under its reason"
    );
}

// ---------------------------------------------------------------------- capacity

/// xorshift64*: deterministic randomness for the flood.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn syn_flood_creates_no_state_and_every_syn_gets_a_syn_ack() {
    let mut s = stack(16);
    let mut rng = Rng(0x5eed);
    for i in 0..10_000u64 {
        let r = rng.next();
        // Random unicast source in 11.0.0.0/8 (never a group address), random port and ISN.
        let src = SocketAddr::from((
            Ipv4Addr::from(0x0b00_0000 | (r as u32 & 0x00ff_ffff)),
            (r >> 32) as u16 | 1,
        ));
        let isn = (r >> 16) as u32;
        let (res, out) = deliver(
            &mut s,
            &frame(src, server(), syn(isn, r as u32), &[]),
            t(i / 10),
        );
        assert_eq!(res, Ok(()), "SYN {i} handled");
        assert_eq!(out.len(), 1, "SYN {i}: one SYN-ACK");
        assert_eq!(
            (out[0].ip.dst_addr(), out[0].tcp.dst_port, out[0].tcp.ack),
            (src.ip(), src.port(), Some(SeqNumber(isn) + 1)),
            "SYN {i}: SYN-ACK goes back to its spoofed source"
        );
    }
    assert_eq!(s.len(), 0, "the flood created no state");
    assert_eq!(s.counters().syn_acks_sent, 10_000, "every SYN answered");
    assert_eq!(s.pop_ready(), None, "nothing for the application");
    // A legitimate client is still served.
    connect(&mut s, client(1), 77, t(1_000));
    assert_eq!(s.len(), 1, "legitimate client connected");
}

#[test]
fn full_slab_answers_rst() {
    let mut s = stack(1);
    connect(&mut s, client(1), 100, t(0));
    let (r, out) = deliver(&mut s, &frame(client(2), server(), syn(200, 5), &[]), t(1));
    assert_eq!(r, Ok(()), "a SYN is answered even when full (stateless)");
    let sa = &out[0].tcp;
    let ack = TcpRepr {
        seq: SeqNumber(201),
        ack: Some(sa.seq + 1),
        window: 512,
        options: TcpOptions {
            timestamps: Some(Timestamps {
                tsval: 6,
                tsecr: sa.options.timestamps.expect("timestamps").tsval,
            }),
            ..TcpOptions::default()
        },
        ..templ()
    };
    let (r, out) = deliver(&mut s, &frame(client(2), server(), ack, &[]), t(2));
    assert_eq!(r, Err(RxDrop::SlabFull), "no slot");
    assert_eq!(out.len(), 1, "one RST");
    assert_eq!(
        (out[0].tcp.flags, out[0].tcp.seq, out[0].tcp.ack),
        (TcpFlags::RST, sa.seq + 1, None),
        "RST at SEG.ACK"
    );
    assert_eq!(s.len(), 1, "still one connection");
    assert_eq!(s.counters().dropped(RxDrop::SlabFull), 1, "counted");
}

// ---------------------------------------------------------------------- close and timers

/// Runs client and stack against each other (zero-delay link) from `from` to `to` ms.
fn run(s: &mut Stack, c: &mut Tcb, addr: SocketAddr, from: u64, to: u64) {
    for ms in from..=to {
        let now = t(ms);
        c.on_timer(now);
        let replies = client_to_stack(s, c, addr, now);
        stack_to_client(c, &replies, now);
        let mut out = Vec::new();
        s.poll(now, &mut |b| out.push(b.to_vec()));
        stack_to_client(c, &out, now);
    }
}

#[test]
fn close_frees_the_slot_which_is_reused_with_a_new_generation() {
    let mut s = stack(1);
    let addr = client(1);
    let (mut c, id) = connect(&mut s, addr, 100, t(0));
    s.conn_mut(id).expect("live").close();
    run(&mut s, &mut c, addr, 1, 5);
    assert_eq!(c.state(), State::CloseWait, "client got our FIN");
    assert_eq!(
        s.conn(id).map(Tcb::state),
        Some(State::FinWait2),
        "our FIN acknowledged"
    );
    c.close();
    run(&mut s, &mut c, addr, 6, 10);
    assert_eq!(c.state(), State::Closed, "client closed from LAST-ACK");
    assert_eq!(
        s.conn(id).map(Tcb::state),
        Some(State::TimeWait),
        "active closer waits"
    );
    assert_eq!(s.len(), 1, "TIME-WAIT keeps the flow");
    // TIME-WAIT (1 s here) expires through the wheel.
    run(&mut s, &mut c, addr, 11, 1_100);
    assert!(s.conn(id).is_none(), "connection gone");
    assert_eq!(s.len(), 0, "flow removed");
    assert_eq!(s.counters().connections_closed, 1, "counted");
    let mut seen = Vec::new();
    while let Some(r) = s.pop_ready() {
        seen.push(r);
    }
    assert!(
        seen.contains(&id),
        "the application hears of the closing connection"
    );
    // The same 4-tuple connects again into the freed slot, under a new generation.
    let (_, id2) = connect(&mut s, addr, 9_999, t(1_200));
    assert_eq!(id2.slot(), id.slot(), "slot reused");
    assert_eq!(id2.generation(), id.generation() + 1, "new generation");
    assert!(
        s.conn_mut(id).is_none(),
        "the old handle does not reach the new occupant"
    );
}

#[test]
fn retransmission_is_driven_by_the_wheel() {
    let mut s = stack(2);
    let (_c, id) = connect(&mut s, client(1), 100, t(0));
    s.conn_mut(id).expect("live").send(b"lost");
    let first = poll(&mut s, t(1));
    assert_eq!(first.len(), 1, "sent once");
    assert!(poll(&mut s, t(500)).is_empty(), "nothing before the RTO");
    // RFC 6298 §2.1: initial RTO 1 s.
    let again: Vec<Out> = (501..=1_100).flat_map(|ms| poll(&mut s, t(ms))).collect();
    assert_eq!(again.len(), 1, "one retransmission: {again:?}");
    assert_eq!(
        (again[0].tcp.seq, &again[0].payload[..]),
        (first[0].tcp.seq, &b"lost"[..]),
        "same bytes, same place"
    );
}

#[test]
fn peer_reset_frees_the_slot() {
    let mut s = stack(1);
    let (c, id) = connect(&mut s, client(1), 100, t(0));
    let rst = TcpRepr {
        seq: c.snd_nxt(),
        flags: TcpFlags::RST,
        ..templ()
    };
    let (r, out) = deliver(&mut s, &frame(client(1), server(), rst, &[]), t(1));
    assert_eq!(r, Ok(()), "delivered to the connection");
    assert!(out.is_empty(), "no reply to an exact RST");
    assert!(s.conn(id).is_none(), "closed and freed");
    assert_eq!(s.len(), 0, "flow removed");
    assert_eq!(s.pop_ready(), Some(id), "the application hears of it");
}

// ---------------------------------------------------------------------- flow table

#[test]
fn flow_table_matches_a_model_under_churn() {
    // A tiny table forces long probe runs and wrap-around, exercising backward-shift deletion.
    let mut table = FlowTable::new(8, [1; 16]);
    let mut model: HashMap<u16, u32> = HashMap::new();
    let mut rng = Rng(42);
    let key = |port: u16| FlowKey::new(server(), client(port));
    for step in 0..20_000u32 {
        let port = (rng.next() % 24) as u16;
        if model.remove(&port).is_some() {
            assert!(table.remove(&key(port)), "step {step}: present key removed");
        } else if table.len < 8 {
            let k = key(port);
            let hash = table.hash(&k);
            table.insert(k, hash, step);
            model.insert(port, step);
        } else {
            assert!(
                !table.remove(&key(port)),
                "step {step}: absent key not removed"
            );
        }
        for p in 0..24u16 {
            assert_eq!(
                table.get(&key(p), table.hash(&key(p))),
                model.get(&p).copied(),
                "step {step}: lookup of port {p}"
            );
        }
    }
}

// ---------------------------------------------------------------------- end to end

#[test]
fn end_to_end_100_kb_each_way_through_cookies() {
    const SIZE: usize = 100 * 1024;
    let mut s = stack(4);
    let addr = client(9);
    let (mut c, id) = connect(&mut s, addr, 0xffff_f000, t(0));
    let to_server: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let to_client: Vec<u8> = (0..SIZE).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    let (mut c_sent, mut s_sent) = (0, 0);
    let (mut c_got, mut s_got) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 16 * 1024];
    let mut ms = 1;
    while ms < 60_000 {
        let now = t(ms);
        // Client application.
        if c_sent < SIZE {
            c_sent += c.send(&to_server[c_sent..]);
            if c_sent == SIZE {
                c.close();
            }
        }
        loop {
            let n = c.recv(&mut buf);
            if n == 0 {
                break;
            }
            c_got.extend_from_slice(&buf[..n]);
        }
        c.on_timer(now);
        let replies = client_to_stack(&mut s, &mut c, addr, now);
        stack_to_client(&mut c, &replies, now);
        // Server application, woken by the ready queue.
        while s.pop_ready().is_some() {}
        if let Some(tcb) = s.conn_mut(id) {
            loop {
                let n = tcb.recv(&mut buf);
                if n == 0 {
                    break;
                }
                s_got.extend_from_slice(&buf[..n]);
            }
            if s_sent < SIZE {
                s_sent += tcb.send(&to_client[s_sent..]);
                if s_sent == SIZE {
                    tcb.close();
                }
            }
        }
        let mut out = Vec::new();
        s.poll(now, &mut |b| out.push(b.to_vec()));
        stack_to_client(&mut c, &out, now);
        if s.is_empty() && c.state() == State::Closed {
            break;
        }
        ms += 1;
    }
    assert!(
        s_got == to_server,
        "server received the client's 100 KB exactly (got {} bytes)",
        s_got.len()
    );
    assert!(
        c_got == to_client,
        "client received the server's 100 KB exactly (got {} bytes)",
        c_got.len()
    );
    assert!(
        s.is_empty() && c.state() == State::Closed,
        "both closed by {ms} ms (client {}, server {:?})",
        c.state(),
        s.conn(id).map(Tcb::state)
    );
    assert_eq!(c.close_reason(), Some(CloseReason::Normal), "orderly close");
    assert_eq!(
        s.counters().connections_closed,
        1,
        "the server's slot was freed"
    );
    assert_eq!(s.counters().rsts_sent, 0, "no RST on the way");
}

// ---------------------------------------------------------------------- configuration, IPv6

#[test]
fn bad_configs_are_refused() {
    let base = StackConfig {
        capacity: 1,
        listeners: &[],
        tcb: tcb_config(),
        cookie_keys: [[0; 16]; 2],
        flow_key: [0; 16],
        rx_checksum: ChecksumMode::Skip,
        frame_size: FRAME,
        max_orphans: 64,
    };
    assert_eq!(
        Stack::new(
            StackConfig {
                capacity: 0,
                ..base
            },
            t(0)
        )
        .err(),
        Some(ConfigError::Capacity),
        "zero capacity"
    );
    assert_eq!(
        Stack::new(
            StackConfig {
                frame_size: 1000,
                ..base
            },
            t(0)
        )
        .err(),
        Some(ConfigError::FrameTooSmall {
            frame_size: 1000,
            mss: MSS
        }),
        "frame cannot hold an MSS"
    );
}

#[test]
fn ipv6_syn_to_wildcard_listener_gets_syn_ack() {
    let listeners = [SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT))];
    let mut s = Stack::new(
        StackConfig {
            capacity: 2,
            listeners: &listeners,
            tcb: tcb_config(),
            cookie_keys: [[1; 16]; 2],
            flow_key: [2; 16],
            rx_checksum: ChecksumMode::Compute,
            frame_size: FRAME,
            max_orphans: 64,
        },
        t(0),
    )
    .expect("valid config");
    let local: Ipv6Addr = "2001:db8::1".parse().expect("literal");
    let remote: Ipv6Addr = "2001:db8::2".parse().expect("literal");
    let eth = EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: SERVER_MAC,
        vlan: None,
        ethertype: EtherType::IPV6,
    };
    let ip = IpRepr::V6(Ipv6Repr {
        src_addr: remote,
        dst_addr: local,
        next_header: IP_PROTO_TCP,
        payload_len: 0,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    });
    let repr = TcpRepr {
        src_port: 50_000,
        dst_port: PORT,
        options: TcpOptions::default(),
        ..syn(31, 0)
    };
    let mut buf = vec![0; FRAME];
    let n =
        emit_tcp_frame(&mut buf, &eth, &ip, &repr, &[], ChecksumMode::Compute).expect("frame fits");
    let (r, out) = deliver(&mut s, &buf[..n], t(0));
    assert_eq!(r, Ok(()), "SYN to [::]:443 accepted");
    assert_eq!(out.len(), 1, "one SYN-ACK");
    assert_eq!(
        (out[0].ip.src_addr(), out[0].ip.dst_addr()),
        (IpAddr::V6(local), IpAddr::V6(remote)),
        "IPv6 addresses swapped"
    );
    assert_eq!(out[0].tcp.options.mss, Some(MSS), "our MSS offered");
    // The same port over IPv4 has no listener: the wildcard is per family.
    let (r, _) = deliver(&mut s, &frame(client(1), server(), syn(1, 1), &[]), t(0));
    assert_eq!(r, Err(RxDrop::NoListener), "[::] does not cover IPv4");
}

#[test]
fn cookie_survives_key_rotation_and_final_ack_may_carry_data() {
    let mut s = stack(2);
    let addr = client(3);
    let (_, out) = deliver(&mut s, &frame(addr, server(), syn(500, 10), &[]), t(0));
    let sa = &out[0].tcp;
    s.rotate_cookie_key([0x42; 16]);
    let ack = TcpRepr {
        seq: SeqNumber(501),
        ack: Some(sa.seq + 1),
        window: 512,
        options: TcpOptions {
            timestamps: Some(Timestamps {
                tsval: 11,
                tsecr: sa.options.timestamps.expect("timestamps").tsval,
            }),
            ..TcpOptions::default()
        },
        ..templ()
    };
    let (r, _) = deliver(&mut s, &frame(addr, server(), ack, b"GET /"), t(5));
    assert_eq!(r, Ok(()), "the previous key still validates");
    let id = s.pop_ready().expect("new connection reported");
    let mut buf = [0u8; 16];
    let n = s.conn_mut(id).expect("live").recv(&mut buf);
    assert_eq!(&buf[..n], b"GET /", "data on the final ACK is delivered");
    // The cookie is bound to its 4-tuple: the same ACK from another port is refused.
    let (r, _) = deliver(&mut s, &frame(client(4), server(), ack, &[]), t(6));
    assert_eq!(
        r,
        Err(RxDrop::BadCookie),
        "a cookie for another tuple never validates"
    );
}

// ---------------------------------------------------------------------- allocation

/// SYN, SYN-ACK, final ACK against the stack, with no client `Tcb` (so that nothing on the
/// test's side allocates rings); returns the new connection.
#[track_caller]
fn handshake_only(s: &mut Stack, addr: SocketAddr, isn: u32, now: Instant) -> ConnId {
    let (r, out) = deliver(s, &frame(addr, server(), syn(isn, 1), &[]), now);
    assert_eq!((r, out.len()), (Ok(()), 1), "SYN answered");
    let sa = &out[0].tcp;
    let ts = sa.options.timestamps.expect("SYN-ACK echoes timestamps");
    let ack = TcpRepr {
        seq: SeqNumber(isn) + 1,
        ack: Some(sa.seq + 1),
        window: 512,
        options: TcpOptions {
            timestamps: Some(Timestamps {
                tsval: 2,
                tsecr: ts.tsval,
            }),
            ..TcpOptions::default()
        },
        ..templ()
    };
    let (r, _) = deliver(s, &frame(addr, server(), ack, &[]), now);
    assert_eq!(r, Ok(()), "cookie ACK accepted");
    let mut id = None;
    while let Some(r) = s.pop_ready() {
        if s.endpoints(r).map(|e| e.1) == Some(addr) {
            id = Some(r);
        }
    }
    id.expect("the new connection is reported")
}

#[test]
fn connections_reuse_their_slots_buffers_without_allocating() {
    use crate::tcp::ring::RING_ALLOCS;
    let allocs = || RING_ALLOCS.with(std::cell::Cell::get);
    let before_new = allocs();
    let mut s = stack(3);
    assert_eq!(
        allocs() - before_new,
        1,
        "Stack::new allocates the storage of every slot's rings at once (the counter works)"
    );
    let after_new = allocs();
    assert_eq!(s.slots_made(), 0, "a slot is made on its first connection");
    assert_eq!(s.capacity(), 3);
    let mut seen: HashMap<usize, (*const u8, *const u8)> = HashMap::new();
    for round in 0..60u16 {
        let now = t(u64::from(round) * 10);
        // Two at a time, so more than one slot churns.
        let a = handshake_only(&mut s, client(round * 2), 1_000 + u32::from(round), now);
        let b = handshake_only(&mut s, client(round * 2 + 1), 9_000 + u32::from(round), now);
        for id in [a, b] {
            let tcb = s.conn_mut(id).expect("live");
            assert_eq!(tcb.send(b"payload"), 7, "the reused send buffer takes data");
            assert_eq!(tcb.send_queue(), 7, "and starts empty");
            assert_eq!(tcb.recv_queue(), 0, "receive buffer starts empty");
            let ptrs = tcb.buffer_ptrs();
            let first = *seen.entry(id.slot()).or_insert(ptrs);
            assert_eq!(ptrs, first, "slot {} keeps its buffers", id.slot());
        }
        let _ = poll(&mut s, now);
        s.conn_mut(a).expect("live").abort();
        s.conn_mut(b).expect("live").abort();
        let _ = poll(&mut s, now);
        assert!(s.is_empty(), "round {round}: both aborted and freed");
    }
    assert_eq!(s.counters().connections_created, 120, "all created");
    assert_eq!(
        s.slots_made(),
        2,
        "two at a time: freed slots are reused, no third is made"
    );
    assert_eq!(
        allocs(),
        after_new,
        "no ring was allocated after Stack::new, over 120 connections"
    );
}

// ---------------------------------------------------------------------- ICMP / PMTU

const ROUTER: [u8; 4] = [192, 0, 2, 1];

/// An ICMPv4 error from a router to the server quoting the first 28 bytes (IP header + 8 TCP
/// bytes) of `quoted_frame` (a frame the server sent).
fn icmp_v4(icmp_type: u8, code: u8, mtu: u32, quoted_frame: &[u8]) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: SERVER_MAC,
        vlan: None,
        ethertype: EtherType::IPV4,
    };
    let IpAddr::V4(server_ip) = server().ip() else {
        panic!("tests use IPv4");
    };
    let ip = IpRepr::V4(Ipv4Repr {
        src_addr: Ipv4Addr::from(ROUTER),
        dst_addr: server_ip,
        protocol: 0,
        payload_len: 0,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: false,
    });
    let mut buf = vec![0; FRAME];
    let n = crate::wire::emit_icmp_frame(
        &mut buf,
        &eth,
        &ip,
        icmp_type,
        code,
        mtu,
        &quoted_frame[14..14 + 28],
        ChecksumMode::Compute,
    )
    .expect("ICMP frame fits");
    buf.truncate(n);
    buf
}

/// A connection with 5 full segments in flight (unacknowledged); returns the stack, the
/// connection and the raw frames it sent.
fn pmtu_fixture() -> (Stack, ConnId, Vec<Vec<u8>>) {
    let mut s = stack(2);
    let (_c, id) = connect(&mut s, client(1), 100, t(0));
    let mss = s.conn(id).expect("live").mss() as usize;
    assert_eq!(
        s.conn_mut(id).expect("live").send(&vec![0x42; 5 * mss]),
        5 * mss,
        "queued"
    );
    let mut frames = Vec::new();
    s.poll(t(1), &mut |b| frames.push(b.to_vec()));
    assert_eq!(frames.len(), 5, "five full segments in flight");
    (s, id, frames)
}

#[test]
fn packet_too_big_lowers_the_mss_and_resends_the_flight_smaller() {
    let (mut s, id, frames) = pmtu_fixture();
    let una = s.conn(id).expect("live").snd_una();
    let old_mss = s.conn(id).expect("live").mss();
    assert_eq!(
        old_mss,
        u32::from(MSS) - 12,
        "MSS minus the timestamp option"
    );
    // The third segment was too big for a 1000-byte link.
    let (r, out) = deliver(&mut s, &icmp_v4(3, 4, 1000, &frames[2]), t(5));
    assert_eq!(r, Ok(()), "ICMP accepted");
    let new_mss = 1000 - 40 - 12;
    assert_eq!(s.conn(id).expect("live").mss(), new_mss, "MSS lowered");
    assert_eq!(s.counters().pmtu_reductions, 1, "counted");
    assert!(!out.is_empty(), "the flight is resent at once");
    assert_eq!(out[0].tcp.seq, una, "from SND.UNA");
    for o in &out {
        assert!(
            o.payload.len() <= new_mss as usize,
            "segment of {} bytes fits the new MSS",
            o.payload.len()
        );
        let ip_len = o.ip.payload_len() + o.ip.buffer_len();
        assert!(ip_len <= 1000, "IP packet of {ip_len} bytes fits the MTU");
    }
    // A larger MTU later never raises it; the same MTU again changes nothing.
    let (r, out) = deliver(&mut s, &icmp_v4(3, 4, 1400, &frames[0]), t(6));
    assert_eq!(r, Err(RxDrop::IcmpMtuNotLower), "not raised");
    assert!(out.is_empty(), "nothing resent");
    assert_eq!(s.conn(id).expect("live").mss(), new_mss, "unchanged");
    // Below the IPv4 floor: clamped to 576 − 40 − 12.
    let (r, _) = deliver(&mut s, &icmp_v4(3, 4, 300, &frames[0]), t(7));
    assert_eq!(r, Ok(()), "accepted");
    assert_eq!(s.conn(id).expect("live").mss(), 536 - 12, "floor");
}

#[test]
fn packet_too_big_for_data_not_in_flight_is_ignored() {
    let (mut s, id, frames) = pmtu_fixture();
    let mss = s.conn(id).expect("live").mss();
    let mut bad = frames[0].clone();
    // Quote a sequence number beyond SND.MAX (never sent): offset 14 + 20 + 4 in the frame.
    let beyond = (s.conn(id).expect("live").snd_nxt() + 10_000).0;
    bad[38..42].copy_from_slice(&beyond.to_be_bytes());
    let (r, out) = deliver(&mut s, &icmp_v4(3, 4, 1000, &bad), t(5));
    assert_eq!(r, Err(RxDrop::IcmpStale), "RFC 5927 §4.1 check");
    assert!(out.is_empty(), "nothing sent");
    assert_eq!(s.conn(id).expect("live").mss(), mss, "MSS unchanged");
    assert_eq!(s.counters().dropped(RxDrop::IcmpStale), 1, "counted");
    assert_eq!(s.counters().pmtu_reductions, 0, "no reduction");
}

#[test]
fn other_icmp_and_unknown_flows_are_dropped_and_counted() {
    let (mut s, id, frames) = pmtu_fixture();
    let mss = s.conn(id).expect("live").mss();
    // Port unreachable: not about the path MTU.
    let (r, _) = deliver(&mut s, &icmp_v4(3, 3, 1000, &frames[0]), t(5));
    assert_eq!(r, Err(RxDrop::IcmpIgnored), "3/3 ignored");
    // A quote for a flow we do not have (another client port).
    let mut other = frames[0].clone();
    other[36..38].copy_from_slice(&41_999u16.to_be_bytes());
    let (r, _) = deliver(&mut s, &icmp_v4(3, 4, 1000, &other), t(5));
    assert_eq!(r, Err(RxDrop::IcmpUnknownFlow), "unknown flow");
    // A quote that is not TCP.
    let mut udp = frames[0].clone();
    udp[14 + 9] = 17;
    let (r, _) = deliver(&mut s, &icmp_v4(3, 4, 1000, &udp), t(5));
    assert_eq!(r, Err(RxDrop::IcmpNoQuote), "no TCP quote");
    // A corrupted ICMP checksum.
    let mut bad = icmp_v4(3, 4, 1000, &frames[0]);
    let last = bad.len() - 1;
    bad[last] ^= 0x10;
    let (r, _) = deliver(&mut s, &bad, t(5));
    assert_eq!(
        r,
        Err(RxDrop::Wire(WireError::BadChecksum)),
        "checksum verified"
    );
    let c = s.counters();
    for reason in [
        RxDrop::IcmpIgnored,
        RxDrop::IcmpUnknownFlow,
        RxDrop::IcmpNoQuote,
        RxDrop::Wire(WireError::BadChecksum),
    ] {
        assert_eq!(c.dropped(reason), 1, "{} counted once", reason.name());
    }
    assert_eq!(s.conn(id).expect("live").mss(), mss, "MSS untouched");
}

// ---------------------------------------------------------------------- timestamps

#[test]
fn tsval_offset_is_per_connection_and_continues_the_syn_ack() {
    let mut s = stack(4);
    let mut syn_ack_ts = Vec::new();
    let mut ids = Vec::new();
    for n in [1, 2] {
        let (r, out) = deliver(&mut s, &frame(client(n), server(), syn(500, 1), &[]), t(0));
        assert_eq!((r, out.len()), (Ok(()), 1), "SYN-ACK");
        let sa = out[0].tcp;
        let ts = sa.options.timestamps.expect("timestamps").tsval;
        syn_ack_ts.push(ts);
        let ack = TcpRepr {
            seq: SeqNumber(501),
            ack: Some(sa.seq + 1),
            window: 512,
            options: TcpOptions {
                timestamps: Some(Timestamps {
                    tsval: 2,
                    tsecr: ts,
                }),
                ..TcpOptions::default()
            },
            ..templ()
        };
        // The final ACK arrives after a key rotation: the offset must not change.
        if n == 2 {
            s.rotate_cookie_key([42; 16]);
        }
        let (r, _) = deliver(&mut s, &frame(client(n), server(), ack, &[]), t(5));
        assert_eq!(r, Ok(()), "cookie ACK");
        ids.push(s.pop_ready().expect("new connection"));
    }
    assert!(
        syn_ack_ts[0]
            .wrapping_sub(syn_ack_ts[1])
            .min(syn_ack_ts[1].wrapping_sub(syn_ack_ts[0]))
            > 1_000,
        "two connections at the same instant show unrelated TSvals: {syn_ack_ts:?}"
    );
    for (i, id) in ids.into_iter().enumerate() {
        s.conn_mut(id).expect("live").send(b"hi");
        let out = poll(&mut s, t(100));
        assert_eq!(out.len(), 1, "data segment");
        let ts = out[0].tcp.options.timestamps.expect("timestamps").tsval;
        let step = ts.wrapping_sub(syn_ack_ts[i]);
        assert!(
            (100..100 + 64).contains(&step),
            "connection {i}: TSval moved {step} ms after the SYN-ACK's (100 ms + cookie bits)"
        );
    }
}

// ---------------------------------------------------------------------- drain

#[test]
fn closed_listeners_refuse_new_connections_and_keep_live_ones() {
    let mut s = stack(4);
    let addr = client(1);
    let (mut c, id) = connect(&mut s, addr, 5000, t(0));
    // A handshake half done before the drain: its cookie ACK arrives after it.
    let (_, out) = deliver(&mut s, &frame(client(2), server(), syn(9000, 1), &[]), t(1));
    let cookie = out[0].tcp.seq;
    s.close_listeners();

    let (r, out) = deliver(&mut s, &frame(client(3), server(), syn(7000, 1), &[]), t(2));
    assert_eq!(r, Err(RxDrop::NoListener), "a new SYN is refused");
    assert_eq!(out.len(), 1, "with one RST");
    assert!(
        out[0].tcp.flags.contains(TcpFlags::RST),
        "RST: {:?}",
        out[0].tcp
    );
    let ack = TcpRepr {
        seq: SeqNumber(9001),
        ack: Some(cookie + 1),
        window: 100,
        ..templ()
    };
    let (r, out) = deliver(&mut s, &frame(client(2), server(), ack, &[]), t(3));
    assert_eq!(
        r,
        Err(RxDrop::NoListener),
        "a valid cookie no longer opens a connection"
    );
    assert!(
        out[0].tcp.flags.contains(TcpFlags::RST),
        "RST: {:?}",
        out[0].tcp
    );
    assert_eq!(s.len(), 1, "only the connection from before the drain");
    assert!(!s.only_time_wait(), "it is established");

    // The live connection still carries data.
    assert_eq!(c.send(b"after the drain"), 15);
    let replies = client_to_stack(&mut s, &mut c, addr, t(4));
    stack_to_client(&mut c, &replies, t(4));
    let mut buf = [0u8; 32];
    let n = s.conn_mut(id).expect("live").recv(&mut buf);
    assert_eq!(&buf[..n], b"after the drain");
}

#[test]
fn late_copies_of_the_final_ack_after_last_ack_draw_no_rst() {
    let mut s = stack(2);
    let addr = client(1);
    let (mut c, id) = connect(&mut s, addr, 100, t(0));
    // The client closes first; we close after: LAST-ACK, then its ACK of our FIN closes us.
    c.close();
    run(&mut s, &mut c, addr, 1, 5);
    assert_eq!(s.conn(id).map(Tcb::state), Some(State::CloseWait));
    s.conn_mut(id).expect("live").close();
    // Capture the client's final ACK so it can be sent again.
    let fin = poll(&mut s, t(6));
    let fin: Vec<Vec<u8>> = fin
        .iter()
        .map(|o| frame(server(), addr, o.tcp, &o.payload))
        .collect();
    stack_to_client(&mut c, &fin, t(6));
    let mut last_ack = Vec::new();
    c.poll_transmit(t(6), |repr, _| {
        last_ack.push(frame(addr, server(), *repr, &[]));
        Ok::<(), ()>(())
    })
    .expect("the test link never refuses");
    assert_eq!(last_ack.len(), 1, "the client ACKs our FIN");
    let (r, out) = deliver(&mut s, &last_ack[0], t(6));
    assert_eq!(
        (r, out.len()),
        (Ok(()), 0),
        "the final ACK closes us quietly"
    );
    assert!(s.conn(id).is_none(), "closed from LAST-ACK");

    // Another copy (a window update as the client's application reads): no RST.
    let (r, out) = deliver(&mut s, &last_ack[0], t(50));
    assert_eq!(r, Err(RxDrop::LateAck));
    assert!(out.is_empty(), "no RST for a late ACK: {out:?}");
    // An ACK that does not match the close is a bad cookie as before.
    let mut other = parse_out(&last_ack[0]).tcp;
    other.ack = other.ack.map(|a| a + 1000);
    let (r, out) = deliver(&mut s, &frame(addr, server(), other, &[]), t(60));
    assert_eq!((r, out.len()), (Err(RxDrop::BadCookie), 1), "RST");
    // The memory is short: later, the same ACK gets RST like any ACK of no connection.
    let (r, out) = deliver(&mut s, &last_ack[0], t(2_100));
    assert_eq!((r, out.len()), (Err(RxDrop::BadCookie), 1), "RST after 2 s");
    assert_eq!(s.counters().dropped(RxDrop::LateAck), 1, "counted");
}

/// The client's segments due at `now`, as frames (not delivered).
fn client_frames(c: &mut Tcb, addr: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    c.poll_transmit(now, |repr, payload| {
        let mut bytes = vec![0; payload.len()];
        payload.copy_to(&mut bytes);
        frames.push(frame(addr, server(), *repr, &bytes));
        Ok::<(), ()>(())
    })
    .expect("the test link never refuses");
    frames
}

/// A connection we close first and the application releases: FIN-WAIT, then TIME-WAIT when
/// the client's FIN (returned, with our replies to it) arrives at 6 ms.
fn released_into_time_wait(s: &mut Stack, addr: SocketAddr) -> (ConnId, Vec<u8>, Vec<Out>) {
    let (mut c, id) = connect(s, addr, 100, t(0));
    s.conn_mut(id).expect("live").release();
    run(s, &mut c, addr, 1, 5);
    assert_eq!(c.state(), State::CloseWait, "client got our FIN");
    c.close();
    let mut fin = client_frames(&mut c, addr, t(6));
    assert_eq!(fin.len(), 1, "the client's FIN");
    let (r, out) = deliver(s, &fin[0], t(6));
    assert_eq!(r, Ok(()));
    (id, fin.remove(0), out)
}

#[test]
fn released_time_wait_gives_its_slot_back_and_still_acks_a_retransmitted_fin() {
    let mut s = stack(1);
    let addr = client(1);
    let (id, fin, out) = released_into_time_wait(&mut s, addr);
    assert_eq!(out.len(), 1, "we ACK the FIN: {out:?}");
    let last_ack = out[0].tcp;
    assert!(
        s.conn(id).is_none(),
        "TIME-WAIT holds no slot once released"
    );
    assert_eq!(s.len(), 0, "nor a flow-table entry");

    // The client did not get our ACK and sends its FIN again: the same ACK comes back.
    let (r, out) = deliver(&mut s, &fin, t(300));
    assert_eq!(r, Err(RxDrop::TimeWait));
    assert_eq!(out.len(), 1, "re-ACKed: {out:?}");
    assert_eq!(
        (out[0].tcp.seq, out[0].tcp.ack, out[0].tcp.flags),
        (last_ack.seq, last_ack.ack, TcpFlags::NONE),
        "the TIME-WAIT ACK"
    );
    let ts = out[0].tcp.options.timestamps.expect("timestamps stay on");
    assert_eq!(
        ts.tsecr,
        last_ack.options.timestamps.expect("ts").tsecr,
        "echoes TS.Recent"
    );
    // A pure ACK is dropped quietly.
    let mut ack = parse_out(&fin).tcp;
    ack.flags = TcpFlags::NONE;
    ack.seq += 1;
    let (r, out) = deliver(&mut s, &frame(addr, server(), ack, &[]), t(301));
    assert_eq!((r, out.len()), (Err(RxDrop::TimeWait), 0));
    // A new SYN on the same 4-tuple starts a new connection.
    let (r, out) = deliver(&mut s, &frame(addr, server(), syn(90_000, 5), &[]), t(400));
    assert_eq!(r, Ok(()));
    assert!(
        out.len() == 1 && out[0].tcp.flags.contains(TcpFlags::SYN),
        "a SYN-ACK: {out:?}"
    );
    assert_eq!(s.counters().dropped(RxDrop::TimeWait), 2);
}

#[test]
fn time_wait_entries_expire() {
    let mut s = stack(1);
    let addr = client(1);
    let (id, fin, _) = released_into_time_wait(&mut s, addr);
    assert!(s.conn(id).is_none());
    // After TIME-WAIT (1 s here) the flow is unknown: its FIN is a segment of no connection.
    let (r, out) = deliver(&mut s, &fin, t(1_100));
    assert_eq!(r, Err(RxDrop::BadCookie), "no TIME-WAIT left");
    assert!(out[0].tcp.flags.contains(TcpFlags::RST), "RST: {out:?}");
}

// ---------------------------------------------------------------------- orphans

/// Frames as the stack emitted them, for [`stack_to_client`].
fn raw(out: &[Out]) -> Vec<Vec<u8>> {
    out.iter()
        .map(|o| {
            frame(
                server(),
                SocketAddr::new(o.ip.dst_addr(), o.tcp.dst_port),
                o.tcp,
                &o.payload,
            )
        })
        .collect()
}

#[test]
fn a_released_connection_whose_peer_never_closes_is_reset_at_the_orphan_timeout() {
    let tcb = TcbConfig {
        orphan_timeout: Some(Duration::from_secs(2)),
        ..tcb_config()
    };
    let mut s = stack_with(2, tcb, 2);
    let addr = client(1);
    let (mut c, id) = connect(&mut s, addr, 100, t(0));
    s.conn_mut(id).expect("live").release();
    // The FIN goes out at the poll of 1 ms, which starts the orphan clock.
    run(&mut s, &mut c, addr, 1, 5);
    assert_eq!(
        c.state(),
        State::CloseWait,
        "client got our FIN and never closes"
    );
    assert_eq!(s.conn(id).map(Tcb::state), Some(State::FinWait2));
    assert_eq!(s.counters().orphans, 1, "one orphan");

    assert!(
        poll(&mut s, t(2_000)).is_empty(),
        "nothing before the deadline"
    );
    assert!(s.conn(id).is_some(), "still held");
    let out = poll(&mut s, t(2_001));
    assert_eq!(out.len(), 1, "one RST: {out:?}");
    assert_eq!(out[0].tcp.flags, TcpFlags::RST, "RST: {out:?}");
    assert_eq!(out[0].tcp.dst_port, addr.port(), "to the orphan's peer");
    assert!(s.conn(id).is_none(), "slot given back");
    assert_eq!(s.len(), 0);
    let k = s.counters();
    assert_eq!(
        (
            k.orphans,
            k.orphan_timeouts,
            k.orphans_dropped,
            k.connections_closed
        ),
        (0, 1, 0, 1),
        "gauge back to 0, one timeout, counted as a close"
    );
    stack_to_client(&mut c, &raw(&out), t(2_001));
    assert_eq!(
        c.close_reason(),
        Some(CloseReason::Reset),
        "the peer learns"
    );
}

#[test]
fn the_orphan_cap_turns_the_release_beyond_it_into_an_abort() {
    let mut s = stack_with(4, tcb_config(), 1);
    let (a_addr, b_addr, c_addr) = (client(1), client(2), client(3));
    let (mut a, a_id) = connect(&mut s, a_addr, 100, t(0));
    let (mut b, b_id) = connect(&mut s, b_addr, 200, t(0));
    s.conn_mut(a_id).expect("live").release();
    run(&mut s, &mut a, a_addr, 1, 5);
    assert_eq!(s.conn(a_id).map(Tcb::state), Some(State::FinWait2));
    assert_eq!(s.counters().orphans, 1, "a is the one orphan allowed");

    // b's release would make two: b is reset instead, at once, and its slot freed.
    s.conn_mut(b_id).expect("live").release();
    let out = poll(&mut s, t(6));
    assert_eq!(out.len(), 1, "only an RST, no FIN: {out:?}");
    assert_eq!(out[0].tcp.flags, TcpFlags::RST, "RST: {out:?}");
    assert_eq!(out[0].tcp.dst_port, b_addr.port(), "to b");
    assert!(s.conn(b_id).is_none(), "b's slot is free");
    assert_eq!(s.len(), 1, "only a is held");
    assert_eq!(
        (s.counters().orphans, s.counters().orphans_dropped),
        (1, 1),
        "one orphan, one release dropped"
    );
    stack_to_client(&mut b, &raw(&out), t(6));
    assert_eq!(
        b.close_reason(),
        Some(CloseReason::Reset),
        "b's peer learns"
    );

    // a finishes its close: TIME-WAIT gives its slot back and it is no orphan any more.
    a.close();
    run(&mut s, &mut a, a_addr, 7, 12);
    assert!(s.conn(a_id).is_none(), "a in TIME-WAIT holds no slot");
    assert_eq!(s.counters().orphans, 0, "the cap has room again");

    // So the next release closes politely. (News of a and b were left unread.)
    while s.pop_ready().is_some() {}
    let (mut c, c_id) = connect(&mut s, c_addr, 300, t(20));
    s.conn_mut(c_id).expect("live").release();
    run(&mut s, &mut c, c_addr, 21, 25);
    assert_eq!(c.state(), State::CloseWait, "c got our FIN");
    assert_eq!(s.conn(c_id).map(Tcb::state), Some(State::FinWait2));
    assert_eq!(
        (s.counters().orphans, s.counters().orphans_dropped),
        (1, 1),
        "an orphan again, nothing more dropped"
    );
}

#[test]
fn no_orphans_allowed_means_every_release_aborts() {
    let mut s = stack_with(2, tcb_config(), 0);
    let addr = client(1);
    let (mut c, id) = connect(&mut s, addr, 100, t(0));
    assert_eq!(c.send(b"request"), 7);
    assert!(client_to_stack(&mut s, &mut c, addr, t(1)).is_empty());
    s.conn_mut(id).expect("live").release();
    let out = poll(&mut s, t(2));
    assert_eq!(out.len(), 1, "an RST: {out:?}");
    assert_eq!(out[0].tcp.flags, TcpFlags::RST, "RST: {out:?}");
    assert!(s.conn(id).is_none());
    assert_eq!((s.counters().orphans, s.counters().orphans_dropped), (0, 1));
}

// ---------------------------------------------------------------------- checksums

fn stack_checking(mode: ChecksumMode) -> Stack {
    Stack::new(
        StackConfig {
            capacity: 4,
            listeners: &[server()],
            tcb: tcb_config(),
            cookie_keys: [[7; 16], [9; 16]],
            flow_key: [3; 16],
            rx_checksum: mode,
            frame_size: FRAME,
            max_orphans: 64,
        },
        t(0),
    )
    .expect("valid stack config")
}

/// `bytes` as a sender with TX checksum offload hands it over (a veth peer with its default
/// offloads): the TCP checksum field holds only the pseudo-header sum.
fn partial(mut bytes: Vec<u8>) -> Vec<u8> {
    let f = parse_tcp_frame(&bytes, ChecksumMode::Compute).expect("a complete frame");
    let (src, dst) = (f.ip.src_addr(), f.ip.dst_addr());
    let at = 14 + f.ip.buffer_len();
    let sum = crate::wire::tcp_pseudo_header(src, dst, bytes.len() - at);
    bytes[at + 16..at + 18].copy_from_slice(&sum.to_be_bytes());
    bytes
}

#[test]
fn a_partial_checksum_is_accepted_and_counted_only_when_asked() {
    let partial_syn = partial(frame(client(1), server(), syn(1_000, 1), &[]));
    let mut s = stack_checking(ChecksumMode::AcceptPartial);
    let (r, out) = deliver(&mut s, &partial_syn, t(0));
    assert_eq!(r, Ok(()));
    assert_eq!(out.len(), 1, "a SYN-ACK");
    assert_eq!(s.counters().rx_partial_checksum, 1);
    let complete_syn = frame(client(2), server(), syn(2_000, 1), &[]);
    assert_eq!(deliver(&mut s, &complete_syn, t(0)).0, Ok(()));
    assert_eq!(
        s.counters().rx_partial_checksum,
        1,
        "a complete checksum is not counted as partial"
    );
    assert_eq!(s.counters().frames_received, 2);

    let mut strict = stack_checking(ChecksumMode::Compute);
    let (r, out) = deliver(&mut strict, &partial_syn, t(0));
    assert_eq!(r, Err(RxDrop::Wire(WireError::BadChecksum)));
    assert!(out.is_empty(), "no reply");
    assert_eq!(strict.counters().rx_partial_checksum, 0);
    assert_eq!(
        strict
            .counters()
            .dropped(RxDrop::Wire(WireError::BadChecksum)),
        1
    );
}

#[test]
fn mostly_failing_checksums_raise_the_alarm() {
    let partial_syn = partial(frame(client(1), server(), syn(1_000, 1), &[]));
    let mut garbage = frame(client(2), server(), syn(2_000, 1), &[]);
    garbage[14 + 20 + 16] ^= 0x5a;

    // "verify" against a veth peer with offloads: every SYN dropped, and the alarm says why.
    let mut strict = stack_checking(ChecksumMode::Compute);
    for i in 0..15 {
        let _ = deliver(&mut strict, &partial_syn, t(i));
    }
    assert_eq!(strict.checksum_alarm(t(20)), None, "15 frames: too few");
    let _ = deliver(&mut strict, &partial_syn, t(21));
    let alarm = strict.checksum_alarm(t(22)).expect("16 of 16 bad");
    assert_eq!((alarm.frames, alarm.bad), (16, 16));
    assert!(alarm.to_string().contains("rx_checksum"), "{alarm}");
    for i in 0..16 {
        let _ = deliver(&mut strict, &partial_syn, t(100 + i));
    }
    assert_eq!(
        strict.checksum_alarm(t(200)),
        None,
        "one alarm per 10 s at most"
    );

    // "auto" takes the partial SYNs: no alarm; garbage still raises it.
    let mut auto = stack_checking(ChecksumMode::AcceptPartial);
    for i in 0..16 {
        let _ = deliver(&mut auto, &partial_syn, t(i));
    }
    assert_eq!(auto.checksum_alarm(t(20)), None);
    for i in 0..17 {
        let _ = deliver(&mut auto, &garbage, t(30 + i));
    }
    let alarm = auto.checksum_alarm(t(50)).expect("garbage is refused");
    assert_eq!((alarm.frames, alarm.bad), (17, 17));
}
