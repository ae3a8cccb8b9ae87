//! Fuzz target `stack_frames`: frames into a `tern::tcp::stack::Stack` that holds live
//! connections, with time and the application's calls interleaved.
//!
//! Each input starts from the same state: a stack (capacity 6, IPv4 and IPv6 listeners) and
//! four connections opened by real cookie handshakes — IPv4 with timestamps, SACK and window
//! scaling; IPv4 with no options but MSS; IPv6 with timestamps and SACK; IPv4 whose application
//! has already closed (FIN in flight) — three of them with server data in flight and one with
//! client data waiting to be read. The first input byte sets knobs: arriving checksums verified
//! (`Compute`) or trusted (`Skip`, so corrupted headers reach the stack), keepalive on or off,
//! NewReno or CUBIC, Nagle on or off. The rest is a sequence of operations, each an opcode byte
//! and its arguments (reading past the end gives zeros):
//! - a segment on one of the tracked flows, built from that flow's live state (SEQ relative to
//!   RCV.NXT, ACK relative to SND.UNA/SND.NXT, or arbitrary), with input-chosen flags, window,
//!   options (timestamps, SACK blocks relative to SND.UNA, SYN options) and payload, optionally
//!   with one byte of the emitted frame overwritten — this is what reaches the established-state
//!   code;
//! - a raw frame of input bytes;
//! - time advancing (µs, ms or 100 ms units);
//! - an application call on a flow: `send`, `recv`, `close`, `abort`;
//! - a SYN from one of eight client ports, and the cookie ACK completing it (new connections,
//!   slab exhaustion, cookie checks);
//! - an ICMP "fragmentation needed" / "packet too big" quoting a segment of a flow (path MTU).
//!
//! After every operation the stack is polled and these invariants are asserted: every frame it
//! emits parses with checksums verified and fits the configured frame size; a data segment on a
//! tracked flow carries at most the MSS, lies within the bytes the application queued, and
//! carries exactly those bytes (the application sends a position-dependent pattern, so a
//! retransmission from the wrong ring offset is caught), and is no larger than the connection's
//! effective MSS, which stays within 536 − 40 (option space) ..= ours; `len() <= capacity()`,
//! connections created minus closed equals `len()`; every live connection's buffers are within
//! the configured sizes and SND.UNA ≤ SND.NXT ≤ SND.UNA + send buffer + FIN.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern::tcp::cc::Algorithm;
use tern::tcp::conn::{Keepalive, TcbConfig};
use tern::tcp::stack::{ConnId, Stack, StackConfig};
use tern::tcp::time::{Duration, Instant};
use tern::wire::{
    emit_icmp_frame, emit_tcp_frame, parse_tcp_frame, ChecksumMode, EtherType, EthernetAddress,
    EthernetRepr, IpRepr, Ipv4Repr, Ipv6Repr, SackBlock, SackBlocks, SeqNumber, TcpFlags,
    TcpOptions, TcpRepr, Timestamps, ICMPV4_DEST_UNREACHABLE, ICMPV4_FRAG_NEEDED,
    ICMPV6_PACKET_TOO_BIG, IP_PROTO_TCP,
};

const SERVER_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x01]);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);
const CAPACITY: usize = 6;
const SEND_BUF: usize = 16 * 1024;
const RECV_BUF: usize = 8 * 1024;
const MSS: u16 = 1200;
const FRAME: usize = 2048;
const PORT: u16 = 443;
/// Client ports of new handshakes (operations 6 and 7).
const NEW_PORTS: u16 = 8;
const MAX_FLOWS: usize = 12;

fn v4_server() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), PORT))
}

fn v6_server() -> SocketAddr {
    SocketAddr::from((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), PORT))
}

fn v4_client(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), port))
}

fn v6_client(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), port))
}

/// Period of the application's byte pattern: far beyond any offset error the buffers allow.
const PATTERN_LEN: usize = 1 << 20;

/// What the application sends on every flow: byte `off` of the stream is
/// `PATTERN[off % PATTERN_LEN]`, position-dependent, so data from the wrong offset does not
/// match. A table, so that the per-byte work is a copy and a compare, not instrumented code.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..PATTERN_LEN as u32)
            .map(|i| (i.wrapping_mul(0x9e37_79b1) >> 24) as u8 ^ (i >> 12) as u8)
            .collect()
    })
}

/// Appends `n` pattern bytes starting at stream offset `off` to `out`.
fn pattern_at(off: u64, n: usize, out: &mut Vec<u8>) {
    let table = pattern();
    let mut at = (off % PATTERN_LEN as u64) as usize;
    let mut left = n;
    while left > 0 {
        let k = left.min(PATTERN_LEN - at);
        out.extend_from_slice(&table[at..at + k]);
        left -= k;
        at = 0;
    }
}

/// Reads operation arguments; zeros once the input is exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

/// One client → server 4-tuple the harness knows, and the client's view of it.
struct Flow {
    remote: SocketAddr,
    local: SocketAddr,
    id: Option<ConnId>,
    /// Our ISS (the cookie): stream offset 0 is `iss + 1`.
    iss: SeqNumber,
    /// The client's next sequence number (used once the connection is gone).
    client_nxt: SeqNumber,
    /// The highest server sequence number seen (used once the connection is gone).
    server_nxt: SeqNumber,
    timestamps: bool,
    tsval: u32,
    /// The server's latest TSval.
    tsecr: u32,
    /// Bytes the application has queued (`send` accepted) since the connection was created.
    app_sent: u64,
}

/// A SYN-ACK we received for a new client port: what its cookie ACK needs.
#[derive(Clone, Copy)]
struct Pending {
    isn: SeqNumber,
    cookie: SeqNumber,
    tsecr: Option<u32>,
}

struct Harness {
    stack: Stack,
    now: Instant,
    flows: Vec<Flow>,
    pending: [Option<Pending>; NEW_PORTS as usize],
    scratch: Vec<u8>,
    /// The application's outgoing data, rebuilt per `send`.
    scratch_data: Vec<u8>,
    /// Frames emitted by the last call (copied, checked after the call).
    out: Vec<Vec<u8>>,
}

/// Connection tunables; `knobs` (the input's first byte) turns on keepalive, NewReno, Nagle.
fn tcb_config(knobs: u8) -> TcbConfig {
    TcbConfig {
        keepalive: (knobs & 0x02 != 0).then_some(Keepalive {
            idle: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            count: 3,
        }),
        cc: if knobs & 0x04 != 0 {
            Algorithm::NewReno
        } else {
            Algorithm::Cubic
        },
        nagle: knobs & 0x08 != 0,
        send_buffer: SEND_BUF,
        recv_buffer: RECV_BUF,
        mss: MSS,
        time_wait: Duration::from_secs(2),
        idle_timeout: Some(Duration::from_secs(600)),
        max_retransmits: 6,
        ..TcbConfig::default()
    }
}

fn emit(buf: &mut [u8], src: SocketAddr, dst: SocketAddr, repr: &TcpRepr, payload: &[u8]) -> usize {
    let eth = |ethertype| EthernetRepr {
        src_addr: CLIENT_MAC,
        dst_addr: SERVER_MAC,
        vlan: None,
        ethertype,
    };
    let (eth, ip) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (
            eth(EtherType::IPV4),
            IpRepr::V4(Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                protocol: IP_PROTO_TCP,
                payload_len: 0,
                ttl: 64,
                dscp_ecn: 0,
                ident: 0,
                dont_frag: true,
            }),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => (
            eth(EtherType::IPV6),
            IpRepr::V6(Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IP_PROTO_TCP,
                payload_len: 0,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0,
            }),
        ),
        _ => unreachable!("flows are single-family"),
    };
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        ..*repr
    };
    // Options are at most 40 bytes and payloads at most FRAME - 200: always fits.
    emit_tcp_frame(buf, &eth, &ip, &repr, payload, ChecksumMode::Compute)
        .expect("harness frames fit the scratch buffer")
}

fn syn(isn: SeqNumber, mss: Option<u16>, ws: Option<u8>, sack: bool, ts: Option<u32>) -> TcpRepr {
    TcpRepr {
        src_port: 0,
        dst_port: 0,
        seq: isn,
        ack: None,
        flags: TcpFlags::SYN,
        window: 64_240,
        options: TcpOptions {
            mss,
            window_scale: ws,
            sack_permitted: sack,
            timestamps: ts.map(|tsval| Timestamps { tsval, tsecr: 0 }),
            ..TcpOptions::default()
        },
        payload_len: 0,
    }
}

impl Harness {
    fn new(knobs: u8) -> Harness {
        let rx_checksum = if knobs & 0x01 == 0 {
            ChecksumMode::Compute
        } else {
            ChecksumMode::Skip
        };
        let now = Instant::from_secs(1_000);
        let stack = Stack::new(
            StackConfig {
                capacity: CAPACITY,
                listeners: &[v4_server(), v6_server()],
                tcb: tcb_config(knobs),
                cookie_keys: [[7; 16], [9; 16]],
                flow_key: [3; 16],
                rx_checksum,
                frame_size: FRAME,
                max_orphans: CAPACITY,
            },
            now,
        )
        .expect("valid stack config");
        let mut h = Harness {
            stack,
            now,
            flows: Vec::with_capacity(MAX_FLOWS),
            pending: [None; NEW_PORTS as usize],
            scratch: vec![0; FRAME],
            scratch_data: Vec::with_capacity(SEND_BUF + 1),
            out: Vec::new(),
        };
        // Options: full; MSS only; IPv6 without window scaling; full, then closed by the app.
        let f0 = h.handshake(v4_client(40_000), SeqNumber(1_000), Some(7), true, true);
        let f1 = h.handshake(
            v4_client(40_001),
            SeqNumber(u32::MAX - 500),
            None,
            false,
            false,
        );
        let f2 = h.handshake(v6_client(40_002), SeqNumber(77_777), None, true, true);
        let f3 = h.handshake(
            v4_client(40_003),
            SeqNumber(0x8000_0000),
            Some(2),
            false,
            true,
        );
        h.app_send(f0, 6_000);
        h.app_send(f1, 3_000);
        h.app_send(f2, 20_000);
        h.app_send(f3, 2_500);
        if let Some(tcb) = h.flows[f3].id.and_then(|id| h.stack.conn_mut(id)) {
            tcb.close();
        }
        h.poll();
        // Client data on flow 0, left unread.
        let mut seg = h.segment_template(f0);
        seg.flags = TcpFlags::PSH;
        let data = [0xabu8; 700];
        h.send_segment(f0, &seg, &data, None);
        h.check();
        h
    }

    /// Opens a connection from `remote` with a SYN and its cookie ACK; returns the flow index.
    fn handshake(
        &mut self,
        remote: SocketAddr,
        isn: SeqNumber,
        ws: Option<u8>,
        sack: bool,
        ts: bool,
    ) -> usize {
        let local = if remote.is_ipv4() {
            v4_server()
        } else {
            v6_server()
        };
        let tsval = 100;
        let repr = syn(isn, Some(1460), ws, sack, ts.then_some(tsval));
        let n = emit(&mut self.scratch, remote, local, &repr, &[]);
        let frame = self.scratch[..n].to_vec();
        self.receive(&frame);
        let sa = self
            .out
            .iter()
            .filter_map(|f| parse_tcp_frame(f, ChecksumMode::Compute).ok())
            .find(|f| f.tcp.flags.contains(TcpFlags::SYN))
            .map(|f| (f.tcp.seq, f.tcp.options.timestamps))
            .expect("the set-up SYN is answered");
        let mut flow = Flow {
            remote,
            local,
            id: None,
            iss: sa.0,
            client_nxt: isn + 1,
            server_nxt: sa.0 + 1,
            timestamps: ts,
            tsval,
            tsecr: sa.1.map_or(0, |t| t.tsval),
            app_sent: 0,
        };
        let ack = TcpRepr {
            seq: isn + 1,
            ack: Some(sa.0 + 1),
            flags: TcpFlags::NONE,
            window: 1_000,
            options: TcpOptions {
                timestamps: ts.then_some(Timestamps {
                    tsval,
                    tsecr: flow.tsecr,
                }),
                ..TcpOptions::default()
            },
            ..repr
        };
        let n = emit(&mut self.scratch, remote, local, &ack, &[]);
        let frame = self.scratch[..n].to_vec();
        let created = self.stack.counters().connections_created;
        self.receive(&frame);
        assert_eq!(
            self.stack.counters().connections_created,
            created + 1,
            "set-up handshake"
        );
        flow.id = self.pop_new(local, remote);
        self.flows.push(flow);
        self.flows.len() - 1
    }

    /// Drains the ready queue; returns the live connection with these endpoints, if any.
    fn pop_new(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<ConnId> {
        let mut found = None;
        while let Some(id) = self.stack.pop_ready() {
            if self.stack.endpoints(id) == Some((local, remote)) {
                found = Some(id);
            }
        }
        found
    }

    fn live(&self, f: usize) -> Option<ConnId> {
        self.flows[f].id.filter(|&id| self.stack.conn(id).is_some())
    }

    /// A segment from the client of flow `f` at its current SEQ, acknowledging everything.
    fn segment_template(&self, f: usize) -> TcpRepr {
        let flow = &self.flows[f];
        let (seq, ack) = match self.live(f).and_then(|id| self.stack.conn(id)) {
            Some(tcb) => (tcb.rcv_nxt(), tcb.snd_nxt()),
            None => (flow.client_nxt, flow.server_nxt),
        };
        TcpRepr {
            src_port: 0,
            dst_port: 0,
            seq,
            ack: Some(ack),
            flags: TcpFlags::NONE,
            window: 8_000,
            options: TcpOptions {
                timestamps: flow.timestamps.then_some(Timestamps {
                    tsval: flow.tsval,
                    tsecr: flow.tsecr,
                }),
                ..TcpOptions::default()
            },
            payload_len: 0,
        }
    }

    /// Emits `repr` from flow `f`'s client, optionally overwrites one byte, and delivers it.
    fn send_segment(&mut self, f: usize, repr: &TcpRepr, payload: &[u8], patch: Option<(u16, u8)>) {
        let (remote, local) = (self.flows[f].remote, self.flows[f].local);
        let n = emit(&mut self.scratch, remote, local, repr, payload);
        let mut frame = self.scratch[..n].to_vec();
        if let Some((at, value)) = patch {
            let at = usize::from(at) % n;
            frame[at] = value;
        }
        self.receive(&frame);
    }

    fn app_send(&mut self, f: usize, n: usize) {
        let Some(id) = self.live(f) else { return };
        let start = self.flows[f].app_sent;
        // `send` takes at most the buffer; more would only be refused.
        let n = n.min(SEND_BUF + 1);
        let mut data = std::mem::take(&mut self.scratch_data);
        data.clear();
        pattern_at(start, n, &mut data);
        let tcb = self.stack.conn_mut(id).expect("live");
        let sent = tcb.send(&data);
        self.scratch_data = data;
        assert!(sent <= n, "send accepts at most what it is given");
        self.flows[f].app_sent += sent as u64;
    }

    fn receive(&mut self, frame: &[u8]) {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let _ = self
            .stack
            .receive(frame, self.now, &mut |b| out.push(b.to_vec()));
        self.out = out;
        self.check_out();
    }

    fn poll(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        self.stack.poll(self.now, &mut |b| out.push(b.to_vec()));
        self.out = out;
        self.check_out();
    }

    /// Checks every frame the last call emitted, and learns the flows' server state from them.
    fn check_out(&mut self) {
        for bytes in &self.out {
            assert!(bytes.len() <= FRAME, "frame larger than the frame size");
            let f = parse_tcp_frame(bytes, ChecksumMode::Compute)
                .expect("the stack emits frames that parse with valid checksums");
            let src = SocketAddr::new(f.ip.src_addr(), f.tcp.src_port);
            let dst = SocketAddr::new(f.ip.dst_addr(), f.tcp.dst_port);
            let Some(flow) = self
                .flows
                .iter_mut()
                .find(|fl| fl.local == src && fl.remote == dst)
            else {
                continue;
            };
            if f.tcp.flags.contains(TcpFlags::SYN) || f.tcp.flags.contains(TcpFlags::RST) {
                continue;
            }
            if let Some(ts) = f.tcp.options.timestamps {
                flow.tsecr = ts.tsval;
            }
            let end = f.tcp.seq
                + (f.payload.len() as u32 + u32::from(f.tcp.flags.contains(TcpFlags::FIN)));
            if end - flow.server_nxt > 0 {
                flow.server_nxt = end;
            }
            if f.payload.is_empty() {
                continue;
            }
            assert!(
                f.payload.len() <= usize::from(MSS),
                "segment of {} bytes exceeds the MSS",
                f.payload.len()
            );
            if let Some(tcb) = flow.id.and_then(|id| self.stack.conn(id)) {
                assert!(
                    f.payload.len() <= tcb.mss() as usize,
                    "segment of {} bytes exceeds the effective MSS {}",
                    f.payload.len(),
                    tcb.mss()
                );
            }
            let off = (f.tcp.seq - (flow.iss + 1)) as u32;
            assert!(
                u64::from(off) + f.payload.len() as u64 <= flow.app_sent,
                "data at stream offset {off}+{} beyond the {} bytes queued",
                f.payload.len(),
                flow.app_sent
            );
            let mut expected = Vec::with_capacity(f.payload.len());
            pattern_at(u64::from(off), f.payload.len(), &mut expected);
            if f.payload != expected.as_slice() {
                let i = f.payload.iter().zip(&expected).position(|(a, b)| a != b);
                panic!(
                    "wrong data in a segment at stream offset {off}: first difference at +{i:?}"
                );
            }
        }
    }

    /// Whole-stack invariants.
    fn check(&mut self) {
        let s = &self.stack;
        assert!(s.len() <= s.capacity(), "more connections than slots");
        let c = s.counters();
        assert_eq!(
            c.connections_created - c.connections_closed,
            s.len() as u64,
            "created - closed = live"
        );
        let mut live = 0;
        for id in s.connections() {
            live += 1;
            let tcb = s.conn(id).expect("listed connections are live");
            assert!(tcb.buffer_bytes() <= SEND_BUF + RECV_BUF, "buffers grew");
            assert!(tcb.send_queue() <= SEND_BUF, "send queue over its buffer");
            assert!(
                tcb.recv_queue() <= RECV_BUF,
                "receive queue over its buffer"
            );
            // The path-MTU floor (536 payload bytes on IPv4) applies before option bytes
            // (timestamps: 12) come off, as in Linux; 40 is the most options can take.
            assert!(
                (536 - 40..=u32::from(MSS)).contains(&tcb.mss()),
                "effective MSS {} outside 496..=our MSS",
                tcb.mss()
            );
            let flight = tcb.snd_nxt() - tcb.snd_una();
            assert!(
                (0..=SEND_BUF as i32 + 1).contains(&flight),
                "SND.NXT - SND.UNA = {flight}"
            );
        }
        assert_eq!(live, s.len(), "connections() agrees with len()");
        // Remember where gone flows stood, for segments sent to them later.
        for f in 0..self.flows.len() {
            if let Some(tcb) = self.live(f).and_then(|id| self.stack.conn(id)) {
                self.flows[f].client_nxt = tcb.rcv_nxt();
            }
        }
    }

    fn op_segment(&mut self, input: &mut Input<'_>) {
        let f = usize::from(input.u8()) % self.flows.len();
        let mut repr = self.segment_template(f);
        let (una, nxt) = match self.live(f).and_then(|id| self.stack.conn(id)) {
            Some(tcb) => (tcb.snd_una(), tcb.snd_nxt()),
            None => (self.flows[f].server_nxt, self.flows[f].server_nxt),
        };
        let flags = input.u8();
        repr.flags = TcpFlags(flags & !TcpFlags::ACK.0);
        let seq_mode = input.u8();
        repr.seq = match seq_mode % 4 {
            0 => repr.seq,
            1 => repr.seq + (i32::from(input.u16() as i16)) as u32,
            2 => SeqNumber(input.u32()),
            _ => repr.seq + u32::from(input.u16()) * 16,
        };
        repr.ack = match (seq_mode >> 2) % 5 {
            0 => Some(nxt),
            1 => {
                let span = (nxt - una).max(0) as u32 + 1;
                Some(una + u32::from(input.u16()) % span)
            }
            2 => Some(una + (i32::from(input.u16() as i16)) as u32),
            3 => Some(SeqNumber(input.u32())),
            _ => Some(una),
        };
        if flags & TcpFlags::ACK.0 != 0 {
            repr.ack = None;
        }
        repr.window = match seq_mode >> 5 {
            0 => repr.window,
            1 => 0,
            _ => input.u16(),
        };
        let opts = input.u8();
        if opts & 0x01 != 0 {
            let d = i32::from(input.u8() as i8);
            let flow = &mut self.flows[f];
            let tsval = flow.tsval.wrapping_add(d as u32);
            let tsecr = if opts & 0x02 != 0 {
                input.u32()
            } else {
                flow.tsecr
            };
            if d > 0 {
                flow.tsval = tsval;
            }
            repr.options.timestamps = Some(Timestamps { tsval, tsecr });
        } else if opts & 0x02 != 0 {
            repr.options.timestamps = None;
        }
        let mut blocks = [SackBlock {
            left: una,
            right: una,
        }; 3];
        let nblocks = usize::from((opts >> 2) & 3);
        for b in blocks.iter_mut().take(nblocks) {
            let left = una + u32::from(input.u16());
            *b = SackBlock {
                left,
                right: left + u32::from(input.u16() % 8_192),
            };
        }
        repr.options.sack_blocks = SackBlocks::from_slice(&blocks[..nblocks]);
        if opts & 0x10 != 0 {
            repr.options.mss = Some(input.u16());
        }
        if opts & 0x20 != 0 {
            repr.options.window_scale = Some(input.u8());
        }
        repr.options.sack_permitted = opts & 0x40 != 0;
        let len = usize::from(input.u16()) % (usize::from(MSS) + 300);
        let fill = input.u8();
        let payload = vec![fill; len];
        let patch = (opts & 0x80 != 0).then(|| (input.u16(), input.u8()));
        self.send_segment(f, &repr, &payload, patch);
    }

    fn op_app(&mut self, input: &mut Input<'_>) {
        let f = usize::from(input.u8()) % self.flows.len();
        let what = input.u8();
        let n = usize::from(input.u16());
        match what % 5 {
            0 | 1 => self.app_send(f, n % (2 * SEND_BUF)),
            2 => {
                if let Some(tcb) = self.live(f).and_then(|id| self.stack.conn_mut(id)) {
                    let mut buf = vec![0; n % (2 * RECV_BUF)];
                    let got = tcb.recv(&mut buf);
                    assert!(got <= buf.len(), "recv within its buffer");
                }
            }
            3 => {
                if let Some(tcb) = self.live(f).and_then(|id| self.stack.conn_mut(id)) {
                    tcb.close();
                }
            }
            _ => {
                if let Some(tcb) = self.live(f).and_then(|id| self.stack.conn_mut(id)) {
                    tcb.abort();
                }
            }
        }
    }

    fn op_syn(&mut self, input: &mut Input<'_>) {
        let p = input.u8() % NEW_PORTS as u8;
        let opts = input.u8();
        let isn = SeqNumber(input.u32());
        let remote = if opts & 0x80 != 0 {
            v6_client(50_000 + u16::from(p))
        } else {
            v4_client(50_000 + u16::from(p))
        };
        let local = if remote.is_ipv4() {
            v4_server()
        } else {
            v6_server()
        };
        let ts = (opts & 0x01 != 0).then_some(self.now.ts_millis());
        let mss = (opts & 0x02 != 0).then(|| input.u16());
        let ws = (opts & 0x04 != 0).then(|| input.u8());
        let repr = syn(isn, mss, ws, opts & 0x08 != 0, ts);
        let n = emit(&mut self.scratch, remote, local, &repr, &[]);
        let frame = self.scratch[..n].to_vec();
        self.receive(&frame);
        let sa = self
            .out
            .iter()
            .filter_map(|f| parse_tcp_frame(f, ChecksumMode::Compute).ok())
            .find(|f| f.tcp.flags.contains(TcpFlags::SYN));
        self.pending[usize::from(p)] = sa.map(|f| Pending {
            isn,
            cookie: f.tcp.seq,
            tsecr: f.tcp.options.timestamps.map(|t| t.tsval),
        });
    }

    fn op_cookie_ack(&mut self, input: &mut Input<'_>) {
        let p = input.u8() % NEW_PORTS as u8;
        let v6 = input.u8() & 1 != 0;
        let delta = input.u8();
        let Some(pending) = self.pending[usize::from(p)] else {
            return;
        };
        let remote = if v6 {
            v6_client(50_000 + u16::from(p))
        } else {
            v4_client(50_000 + u16::from(p))
        };
        let local = if remote.is_ipv4() {
            v4_server()
        } else {
            v6_server()
        };
        let tsval = self.now.ts_millis();
        let repr = TcpRepr {
            src_port: 0,
            dst_port: 0,
            seq: pending.isn + 1,
            // Mostly exact; sometimes off by a little (a bad cookie).
            ack: Some(pending.cookie + 1 + u32::from(delta >> 6)),
            flags: TcpFlags::NONE,
            window: 1_000,
            options: TcpOptions {
                timestamps: pending.tsecr.map(|tsecr| Timestamps { tsval, tsecr }),
                ..TcpOptions::default()
            },
            payload_len: 0,
        };
        let data = vec![delta; usize::from(delta & 0x3f) * 8];
        let n = emit(&mut self.scratch, remote, local, &repr, &data);
        let frame = self.scratch[..n].to_vec();
        let created = self.stack.counters().connections_created;
        self.receive(&frame);
        if self.stack.counters().connections_created == created {
            return;
        }
        let id = self.pop_new(local, remote);
        let flow = Flow {
            remote,
            local,
            id,
            iss: pending.cookie,
            client_nxt: pending.isn + 1 + data.len() as u32,
            server_nxt: pending.cookie + 1,
            timestamps: pending.tsecr.is_some(),
            tsval,
            tsecr: pending.tsecr.unwrap_or(0),
            app_sent: 0,
        };
        // A 4-tuple has one record: the new connection replaces any old one.
        if let Some(old) = self
            .flows
            .iter_mut()
            .find(|fl| fl.local == local && fl.remote == remote)
        {
            *old = flow;
        } else if self.flows.len() < MAX_FLOWS {
            self.flows.push(flow);
        }
    }

    /// An ICMP "fragmentation needed" / "packet too big" from a router on the path, quoting a
    /// segment of ours on flow `f` (SEQ in flight or arbitrary, quote cut short or not).
    fn op_icmp(&mut self, input: &mut Input<'_>) {
        let f = usize::from(input.u8()) % self.flows.len();
        let mode = input.u8();
        let mtu = match mode % 4 {
            0 => 576 + u32::from(input.u16() % 1_000),
            1 => 1_280 + u32::from(input.u16() % 300),
            2 => 0,
            _ => u32::from(input.u16()),
        };
        let (una, nxt) = match self.live(f).and_then(|id| self.stack.conn(id)) {
            Some(tcb) => (tcb.snd_una(), tcb.snd_nxt()),
            None => (self.flows[f].server_nxt, self.flows[f].server_nxt),
        };
        let seq = if mode & 0x04 == 0 {
            let span = (nxt - una).max(0) as u32 + 1;
            una + u32::from(input.u16()) % span
        } else {
            SeqNumber(input.u32())
        };
        let (remote, local) = (self.flows[f].remote, self.flows[f].local);
        // The quoted segment, as we would have sent it (server -> client).
        let quoted_repr = TcpRepr {
            src_port: local.port(),
            dst_port: remote.port(),
            seq,
            ack: Some(SeqNumber(0)),
            flags: TcpFlags::NONE,
            window: 0,
            options: TcpOptions::default(),
            payload_len: 0,
        };
        let n = emit(&mut self.scratch, local, remote, &quoted_repr, &[0; 64]);
        let ip_hdr = if local.is_ipv4() { 20 } else { 40 };
        // From the IP header on; RFC 792 quotes at least 8 bytes of TCP (ports and SEQ).
        let keep = match mode >> 4 {
            0 => n - 14,
            1 => ip_hdr + 8,
            _ => usize::from(input.u8()).min(n - 14),
        };
        let quoted = self.scratch[14..14 + keep].to_vec();
        let eth = EthernetRepr {
            src_addr: CLIENT_MAC,
            dst_addr: SERVER_MAC,
            vlan: None,
            ethertype: EtherType::IPV4,
        };
        let (ip, icmp_type, code) = match local.ip() {
            IpAddr::V4(dst) => (
                IpRepr::V4(Ipv4Repr {
                    src_addr: Ipv4Addr::new(10, 0, 0, 254),
                    dst_addr: dst,
                    protocol: 0,
                    payload_len: 0,
                    ttl: 64,
                    dscp_ecn: 0,
                    ident: 0,
                    dont_frag: false,
                }),
                ICMPV4_DEST_UNREACHABLE,
                ICMPV4_FRAG_NEEDED,
            ),
            IpAddr::V6(dst) => (
                IpRepr::V6(Ipv6Repr {
                    src_addr: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe),
                    dst_addr: dst,
                    next_header: 0,
                    payload_len: 0,
                    hop_limit: 64,
                    traffic_class: 0,
                    flow_label: 0,
                }),
                ICMPV6_PACKET_TOO_BIG,
                0,
            ),
        };
        let mut frame = vec![0; FRAME];
        let n = emit_icmp_frame(
            &mut frame,
            &eth,
            &ip,
            icmp_type,
            code,
            mtu,
            &quoted,
            ChecksumMode::Compute,
        )
        .expect("the ICMP frame fits");
        frame.truncate(n);
        self.receive(&frame);
    }

    fn op_raw(&mut self, input: &mut Input<'_>) {
        let n = usize::from(input.u16()) % 1_600;
        let frame = input.bytes(n).to_vec();
        self.receive(&frame);
    }

    fn op_time(&mut self, input: &mut Input<'_>) {
        let unit = input.u8();
        let n = u64::from(input.u16());
        let step = match unit % 3 {
            0 => Duration::from_micros(n),
            1 => Duration::from_millis(n),
            _ => Duration::from_millis(n * 100),
        };
        self.now += step;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let mut h = Harness::new(input.u8());
    let mut ops = 0;
    while !input.data.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 11 {
            0..=3 => h.op_segment(&mut input),
            4 => h.op_raw(&mut input),
            5 | 6 => h.op_time(&mut input),
            7 => h.op_app(&mut input),
            8 => h.op_syn(&mut input),
            9 => h.op_cookie_ack(&mut input),
            _ => h.op_icmp(&mut input),
        }
        h.poll();
        // The application reads nothing on its own; it only drains the ready queue.
        while h.stack.pop_ready().is_some() {}
        h.check();
    }
});
