//! The bypass path's plain TCP (L4) proxy: a [`FrameHandler`] that runs tern's own TCP stack
//! ([`Stack`]) inside a bypass worker and carries each connection's bytes to a backend over the
//! worker's own io_uring, through the same proxy core as kernel mode ([`Session::plain`]).
//!
//! Per worker: one `Stack` (flow table, SYN cookies, timers), one io_uring with a registered
//! slot pool for backend sends and a provided-buffer ring for backend receives (a buffer is
//! taken only when data arrives: idle connections hold none), and a slab of proxied
//! connections. Client frames
//! arrive through [`FrameHandler::frame`]; what the stack sends is copied into UMEM frames at
//! once. Everything else happens in [`FrameHandler::poll`], once per worker turn when there is
//! something to do: io_uring completions, connections the stack reported news for
//! ([`Stack::pop_ready`]), the stack's timers, and one non-blocking submit. The worker sleeps
//! on the ring's eventfd (registered on the worker's [`Waker`]) and until the stack's next
//! timer ([`FrameHandler::next_deadline`]).
//!
//! Back pressure, both ways, with one operation in flight per direction:
//! - client → backend: bytes are taken from the TCB only while the session has nothing
//!   pending for the backend, so an unread backend closes the client's receive window;
//! - backend → client: a backend receive is armed only while the session has nothing pending
//!   for the client, and session bytes enter the TCB only as far as its send buffer has room, so
//!   a client that stops reading stops the backend reads (its kernel socket buffers fill and
//!   the backend's TCP window closes).
//!
//! Lifetimes: a proxied connection is created when the stack reports a new connection and is
//! freed once its TCB is gone and no io_uring operation is in flight. A TCB that disappears
//! before both directions finished (client RST, retransmission or idle timeout) resets the
//! backend (SO_LINGER 0); a backend that fails closes the client side politely (FIN after
//! what was already queued), as kernel mode does.
//!
//! SYN-cookie keys: every worker derives the key of cookie period `p` from one process-wide
//! secret (`siphash(secret, p)`), and all workers share one clock epoch, so they agree on the
//! keys without talking to each other; a period is two cookie slots, so the previous key (still
//! tried) covers every cookie in its lifetime.
//!
//! Not here: the TCP state machine (`tcp`), frames and rings (`xsk`, `bypass`), the byte
//! shuffling rules (`proxy`).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use rustls::ServerConfig;

use crate::bypass::{FrameHandler, Waker};
use crate::config::{
    Backend, Congestion, ConnectPolicy, Limits, RxChecksum, TcpSettings, Timeouts,
};
use crate::counters::WorkerCounters;
use crate::proxy::{Session, Stage};
use crate::tcp::cc::Algorithm;
use crate::tcp::conn::{Keepalive, TcbConfig};
use crate::tcp::stack::{ConnId, RxDrop, Stack, StackConfig, StackCounters};
use crate::tcp::syncookie::{siphash24, CookieKey, SLOT_SECS};
use crate::tcp::time::{Duration as TcpDuration, Instant as TcpInstant};
use crate::uring::{BufRing, Op, SlotId, SlotPool, UserData, BUF_SIZE, GEN_MASK};
use crate::wire::{ChecksumMode, WireError};
use crate::worker::{set_linger_zero, tcp_socket, write_sockaddr};
use crate::xsk::{Disposition, RxFrame, TxQueue};

const RING_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
/// Most registered 16 KiB send slots per worker. A slot is held only while a write to a
/// backend is in flight; connections that find none wait (back pressure), and the pool is
/// pinned memory, so it is bounded well below one per connection.
const MAX_SLOTS: u32 = 2048;
/// Provided buffers for backend receives (16 KiB each): a buffer is taken only when data
/// arrives, so idle connections hold none.
const RECV_BUFFERS: u16 = 1024;
const BUF_GROUP: u16 = 0;
/// How often the stack's counters are published for `tern ctl stats`, and keys checked.
const HOUSEKEEPING_US: u64 = 100_000;
/// A cookie key period: two cookie slots, so the previous key covers a cookie's lifetime.
const KEY_PERIOD_SECS: u64 = 2 * SLOT_SECS;
/// Keep-alive probes after `tcp.keepalive_ms`: Linux's defaults for the other two numbers.
const KEEPALIVE_INTERVAL_SECS: u64 = 75;
const KEEPALIVE_PROBES: u32 = 9;
const NO_PROXIED: u32 = u32::MAX;
/// A stack slot whose connection the proxy is done with, while its TCB finishes the closing
/// handshake (or TIME-WAIT) in the stack: its later news are not a new connection.
const RETIRED: u32 = u32::MAX - 1;

crate::counters::single_writer_counters! {
    /// One bypass worker's TCP stack counters, published from the stack's own every 100 ms.
    TcpCounters,
    /// A point-in-time copy of [`TcpCounters`].
    TcpSnapshot {
    /// Gauge: connections in the flow table.
    connections,
    /// SYN-ACKs sent (stateless, one per SYN to a listener).
    syn_acks_sent,
    /// Connections created by a valid cookie.
    connections_created,
    /// Connections that reached CLOSED.
    connections_closed,
    /// RSTs sent.
    rsts_sent,
    /// Frames the stack sent.
    frames_sent,
    /// Frames that did not parse (any reason, bad checksums included).
    rx_malformed,
    /// Of those, bad IPv4 header or TCP checksums.
    rx_bad_checksum,
    /// TCP segments accepted with a partial checksum (`tcp.rx_checksum = "auto"`: a sender
    /// with TX checksum offload, e.g. a veth peer); not drops.
    rx_partial_checksum,
    /// Segments for no connection and no listener (answered with RST).
    rx_no_listener,
    /// ACKs to a listener whose cookie did not validate (answered with RST).
    rx_bad_cookie,
    /// Valid cookies refused because every connection slot was taken (answered with RST).
    rx_slab_full,
    /// Another copy of the final ACK of a connection that just closed (dropped, no RST).
    rx_late_ack,
    /// Segments for connections in TIME-WAIT after their slot was given back (a retransmitted
    /// FIN or data is ACKed, the rest dropped).
    rx_time_wait,
    /// TIME-WAIT entries forgotten early because another flow needed their place.
    time_wait_evicted,
    /// Other dropped frames (RSTs for no connection, group addresses, neither SYN nor ACK).
    rx_other_dropped,
    /// Frames the stack wanted to send but no UMEM frame was free (dropped; TCP retransmits).
    tx_no_frame,
    /// TX wakeups (SEND on an AF_XDP socket through the ring) that failed unexpectedly.
    tx_kick_errors,
    }
}

/// What one worker's L4 proxy is built from.
pub struct L4Setup {
    pub worker: usize,
    /// The `mode = "xdp"` listener addresses this worker serves, plain and TLS.
    pub listeners: Vec<SocketAddr>,
    /// Those of `listeners` that terminate TLS (`tls = true`).
    pub tls_listeners: Vec<SocketAddr>,
    /// The TLS configuration (certificates, session cache, tickets) shared with kernel mode;
    /// required when `tls_listeners` is not empty.
    pub tls: Option<Arc<ServerConfig>>,
    pub backend: Backend,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub tcp: TcpSettings,
    /// UMEM frame size: the largest frame the stack may emit.
    pub frame_size: usize,
    /// Process-wide secret the cookie keys are derived from (same for every worker).
    pub secret: CookieKey,
    /// Process-wide clock epoch (same for every worker: cookies carry time).
    pub epoch: std::time::Instant,
    pub counters: Arc<WorkerCounters>,
    pub tcp_counters: Arc<TcpCounters>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendState {
    None,
    Connecting,
    Connected,
    /// Unreachable or broken; the client side is being closed.
    Failed,
}

/// One proxied connection: the client's TCP connection in the stack, the session, and the
/// backend socket.
struct Proxied {
    gen: u32,
    /// The client's connection; `None` once the stack freed it.
    conn: Option<ConnId>,
    session: Session,
    client_addr: SocketAddr,
    backend_fd: RawFd,
    backend: BackendState,
    server: usize,
    attempts: usize,
    sockaddr: libc::sockaddr_storage,
    socklen: libc::socklen_t,
    /// Session → backend: `slot[start..end]` still to be written; one write in flight at most.
    up_slot: Option<SlotId>,
    up_start: usize,
    up_end: usize,
    up_in_flight: bool,
    /// Backend → session: one receive in flight at most (into a provided buffer).
    down_in_flight: bool,
    backend_eof: bool,
    backend_wr_shut: bool,
    /// The client's FIN has been passed to the session.
    client_eof_told: bool,
    /// We queued our FIN to the client.
    client_fin_sent: bool,
    /// The end of the TLS handshake has been counted.
    handshake_counted: bool,
    in_flight: u32,
    /// Torn down; freed when `in_flight` reaches 0.
    closing: bool,
}

/// The L4 proxy of one bypass worker. See the module documentation.
pub struct L4Proxy {
    id: usize,
    stack: Stack,
    tcp_config: TcbConfig,
    epoch: std::time::Instant,
    secret: CookieKey,
    key_period: u64,
    /// Declared before the buffers it has registered: dropped (unregistering them) first.
    ring: IoUring,
    slots: SlotPool,
    bufs: BufRing,
    /// The slab. Created with its final capacity and never grown past it, so entries never
    /// move: io_uring entries point into them (`Proxied::sockaddr`).
    conns: Vec<Option<Proxied>>,
    free: Vec<u32>,
    /// Stack slot → (generation, proxied index).
    by_slot: Vec<(u32, u32)>,
    /// Connections that found no free slot; retried when slots come back.
    starved: Vec<(u32, u32)>,
    tls_listeners: Vec<SocketAddr>,
    tls: Option<Arc<ServerConfig>>,
    handshake_timeout: TcpDuration,
    /// TLS connections by handshake deadline (idx, generation). Every deadline is the accept
    /// time plus the same timeout, so the queue is in deadline order: checking it costs O(1)
    /// per turn, and entries whose handshake finished are skipped when they come up.
    handshake_deadlines: VecDeque<(TcpInstant, u32, u32)>,
    backend: Backend,
    next_server: usize,
    limit: usize,
    connect_timeout: types::Timespec,
    gen_counter: u32,
    counters: Arc<WorkerCounters>,
    tcp_counters: Arc<TcpCounters>,
    last_housekeeping: u64,
    /// Something happened that `poll` must look at (frames were received).
    pending: bool,
    /// The clock at the first frame of this turn.
    frame_now: TcpInstant,
    /// AF_XDP sockets with a TX wakeup on the ring.
    kicks_in_flight: Vec<RawFd>,
    shutting_down: bool,
    /// A drain began: the stack's listeners are closed.
    draining: bool,
    /// During a drain, the next time the stack may be scanned for closing handshakes.
    next_drain_scan: TcpInstant,
}

impl L4Proxy {
    /// Builds the stack and the ring; allocates everything the per-packet path uses.
    pub fn new(setup: L4Setup) -> io::Result<L4Proxy> {
        let capacity = setup.limits.max_connections_per_worker;
        if !setup.tls_listeners.is_empty() && setup.tls.is_none() {
            return Err(io::Error::other(
                "TLS listeners on the bypass path without a TLS configuration",
            ));
        }
        let tcp_config = TcbConfig {
            send_buffer: setup.tcp.send_buffer,
            recv_buffer: setup.tcp.recv_buffer,
            mss: setup.tcp.mss,
            nagle: setup.tcp.nagle,
            idle_timeout: Some(TcpDuration::from_millis(
                setup.timeouts.idle.as_millis() as u64
            )),
            cc: match setup.tcp.congestion {
                Congestion::Cubic => Algorithm::Cubic,
                Congestion::NewReno => Algorithm::NewReno,
            },
            keepalive: setup.tcp.keepalive.map(|idle| Keepalive {
                idle: TcpDuration::from_millis(idle.as_millis() as u64),
                interval: TcpDuration::from_secs(KEEPALIVE_INTERVAL_SECS),
                count: KEEPALIVE_PROBES,
            }),
            ..TcbConfig::default()
        };
        let now = to_tcp(setup.epoch, std::time::Instant::now());
        let period = now.as_secs() / KEY_PERIOD_SECS;
        let mut flow_key = [0u8; 16];
        fill_random(&mut flow_key)?;
        let stack = Stack::new(
            StackConfig {
                capacity,
                listeners: &setup.listeners,
                tcb: tcp_config,
                cookie_keys: [
                    cookie_key(&setup.secret, period),
                    cookie_key(&setup.secret, period.wrapping_sub(1)),
                ],
                flow_key,
                rx_checksum: match setup.tcp.rx_checksum {
                    RxChecksum::Auto => ChecksumMode::AcceptPartial,
                    RxChecksum::Verify => ChecksumMode::Compute,
                    RxChecksum::Skip => ChecksumMode::Skip,
                },
                frame_size: setup.frame_size,
            },
            now,
        )
        .map_err(io::Error::other)?;
        // Cooperative task running: completions are not pushed at the worker with an IPI while
        // it busy-polls; the kernel raises a flag (checked every turn, `wants_poll`) and they
        // are run at the next io_uring_enter. A sleeping worker is still woken (its poll(2)
        // is interrupted, and the CQE then signals the registered eventfd).
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)?;
        let slot_count = (capacity as u32).clamp(64, MAX_SLOTS);
        let slots = SlotPool::new(&ring, slot_count)?;
        let bufs = BufRing::new(&ring, RECV_BUFFERS, BUF_GROUP)?;
        let ct = setup.backend.connect_timeout;
        tracing::info!(
            worker = setup.worker,
            connections = capacity,
            buffers_mib = (capacity * (setup.tcp.send_buffer + setup.tcp.recv_buffer)) >> 20,
            io_buffers_mib =
                (slot_count as usize * BUF_SIZE + RECV_BUFFERS as usize * BUF_SIZE) >> 20,
            "bypass TCP stack ready (connection buffers are touched only as connections use them)"
        );
        Ok(L4Proxy {
            id: setup.worker,
            stack,
            tcp_config,
            epoch: setup.epoch,
            secret: setup.secret,
            key_period: period,
            ring,
            slots,
            bufs,
            // Twice the stack's slots: a proxied connection can outlive its TCB while its
            // backend operations finish.
            conns: Vec::with_capacity(2 * capacity),
            free: Vec::new(),
            by_slot: vec![(0, NO_PROXIED); capacity],
            starved: Vec::new(),
            tls_listeners: setup.tls_listeners,
            tls: setup.tls,
            handshake_timeout: TcpDuration::from_millis(setup.timeouts.handshake.as_millis() as u64),
            // One entry per TLS accept within a handshake timeout; grows only past that.
            handshake_deadlines: VecDeque::with_capacity(capacity),
            backend: setup.backend,
            next_server: setup.worker,
            limit: setup.limits.buffer_per_direction,
            connect_timeout: types::Timespec::new()
                .sec(ct.as_secs())
                .nsec(ct.subsec_nanos()),
            gen_counter: 0,
            counters: setup.counters,
            tcp_counters: setup.tcp_counters,
            last_housekeeping: 0,
            pending: false,
            frame_now: TcpInstant::ZERO,
            kicks_in_flight: Vec::new(),
            shutting_down: false,
            draining: false,
            next_drain_scan: TcpInstant::ZERO,
        })
    }

    fn now(&self) -> TcpInstant {
        to_tcp(self.epoch, std::time::Instant::now())
    }

    /// Publishes counters, rotates the cookie key when its period changed, and warns when most
    /// arriving frames fail their checksum.
    fn housekeeping(&mut self, now: TcpInstant) {
        if now.as_micros() < self.last_housekeeping + HOUSEKEEPING_US {
            return;
        }
        self.last_housekeeping = now.as_micros();
        let period = now.as_secs() / KEY_PERIOD_SECS;
        if period != self.key_period {
            self.key_period = period;
            self.stack
                .rotate_cookie_key(cookie_key(&self.secret, period));
        }
        publish(&self.tcp_counters, self.stack.counters(), self.stack.len());
        if let Some(alarm) = self.stack.checksum_alarm(now) {
            tracing::warn!(
                worker = self.id,
                frames = alarm.frames,
                bad = alarm.bad,
                "{alarm}"
            );
        }
    }

    // ------------------------------------------------------------------ events

    /// Handles the stack's news: new connections, data, space, state changes, departures.
    fn drain_ready(&mut self, now: TcpInstant) {
        while let Some(id) = self.stack.pop_ready() {
            let (gen, idx) = self.by_slot[id.slot()];
            let known = idx != NO_PROXIED && gen == id.generation();
            if known && idx == RETIRED {
                // A connection the proxy is done with, closing on its own in the stack.
                continue;
            }
            if known {
                self.pump(idx);
            } else if self.stack.conn(id).is_some() {
                if self.shutting_down {
                    if let Some(tcb) = self.stack.conn_mut(id) {
                        tcb.abort();
                    }
                    continue;
                }
                match self.adopt(id, now) {
                    Some(idx) => self.pump(idx),
                    None => {
                        if let Some(tcb) = self.stack.conn_mut(id) {
                            tcb.abort();
                        }
                    }
                }
            }
        }
    }

    /// A new client connection from the stack; `None` (counted) when the slab is full
    /// (connections still finishing their backend side hold entries) or rustls refused to
    /// start a session.
    fn adopt(&mut self, id: ConnId, now: TcpInstant) -> Option<u32> {
        let (local, remote) = self
            .stack
            .endpoints(id)
            .expect("a connection the stack just reported is live");
        if self.free.is_empty() && self.conns.len() == self.conns.capacity() {
            self.counters.refused_full.inc();
            return None;
        }
        let protocol = self.backend.proxy_protocol;
        let session = match &self.tls {
            Some(config) if self.tls_listeners.contains(&local) => {
                match Session::new(config.clone(), protocol, remote, local, self.limit) {
                    Ok(session) => session,
                    Err(e) => {
                        self.counters.tls_errors.inc();
                        tracing::warn!(worker = self.id, error = %e, "cannot start a TLS session");
                        return None;
                    }
                }
            }
            _ => Session::plain(protocol, remote, local, self.limit),
        };
        let tls = session.is_tls();
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        self.gen_counter = (self.gen_counter + 1) & GEN_MASK;
        self.conns[idx as usize] = Some(Proxied {
            gen: self.gen_counter,
            conn: Some(id),
            session,
            client_addr: remote,
            backend_fd: -1,
            backend: BackendState::None,
            server: 0,
            attempts: 0,
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            sockaddr: unsafe { std::mem::zeroed() },
            socklen: 0,
            up_slot: None,
            up_start: 0,
            up_end: 0,
            up_in_flight: false,
            down_in_flight: false,
            backend_eof: false,
            backend_wr_shut: false,
            client_eof_told: false,
            client_fin_sent: false,
            handshake_counted: false,
            in_flight: 0,
            closing: false,
        });
        self.by_slot[id.slot()] = (id.generation(), idx);
        if tls {
            self.handshake_deadlines.push_back((
                now + self.handshake_timeout,
                idx,
                self.gen_counter,
            ));
        }
        self.counters.accepted.inc();
        self.counters.active.inc();
        Some(idx)
    }

    fn reap(&mut self) {
        loop {
            let mut batch = [(0u64, 0i32, 0u32); 64];
            let mut n = 0;
            for cqe in self.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                n += 1;
                if n == batch.len() {
                    break;
                }
            }
            if n == 0 {
                return;
            }
            for &(ud, res, flags) in &batch[..n] {
                self.complete(ud, res, flags);
            }
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let Some(ud) = UserData::decode(ud) else {
            tracing::error!(worker = self.id, ud, "completion with unknown user_data");
            return;
        };
        match ud.op {
            Op::Cancel => return,
            Op::Kick => {
                let fd = ud.index as RawFd;
                self.kicks_in_flight.retain(|&k| k != fd);
                // EAGAIN/EBUSY/ENOBUFS: the ring still holds descriptors and the next turn kicks
                // again; anything else is counted.
                if res < 0 && ![libc::EAGAIN, libc::EBUSY, libc::ENOBUFS].contains(&-res) {
                    self.tcp_counters.tx_kick_errors.inc();
                }
                return;
            }
            _ => {}
        }
        let idx = ud.index;
        let Some(Some(p)) = self.conns.get_mut(idx as usize) else {
            tracing::error!(worker = self.id, ?ud, "completion for a freed connection");
            return;
        };
        if p.gen != ud.gen {
            tracing::error!(
                worker = self.id,
                ?ud,
                "completion for an earlier connection"
            );
            return;
        }
        p.in_flight -= 1;
        match ud.op {
            Op::BackendConnect => self.on_connect(idx, res),
            Op::BackendSend => self.on_send(idx, res),
            Op::BackendRecv => self.on_recv(idx, res, flags),
            _ => {}
        }
        self.pump(idx);
    }

    fn on_connect(&mut self, idx: u32, res: i32) {
        let n = self.backend.servers.len();
        let p = self.conns[idx as usize].as_mut().expect("live");
        if p.backend != BackendState::Connecting || p.closing {
            return;
        }
        if res == 0 {
            p.backend = BackendState::Connected;
            self.counters.backend_connects.inc();
            return;
        }
        // SAFETY: our socket; the connect completed, nothing else uses it.
        unsafe { libc::close(p.backend_fd) };
        p.backend_fd = -1;
        p.attempts += 1;
        let server = self.backend.servers[p.server];
        if res == -libc::ECANCELED {
            self.counters.backend_connect_timeouts.inc();
        } else {
            self.counters.backend_connect_errors.inc();
        }
        tracing::debug!(
            worker = self.id,
            %server,
            client = %p.client_addr,
            error = %io::Error::from_raw_os_error(-res),
            "backend connect failed"
        );
        if p.attempts < n {
            p.server = (p.server + 1) % n;
            p.backend = BackendState::None;
            self.start_connect(idx);
        } else {
            self.backend_lost(idx);
        }
    }

    fn on_send(&mut self, idx: u32, res: i32) {
        let p = self.conns[idx as usize].as_mut().expect("live");
        p.up_in_flight = false;
        if res < 0 {
            if !p.closing {
                self.backend_lost(idx);
            }
            return;
        }
        p.up_start += res as usize;
        self.counters.backend_bytes_out.add(res as u64);
        if p.up_start >= p.up_end {
            p.up_start = 0;
            p.up_end = 0;
            if let Some(slot) = p.up_slot.take() {
                self.slots.give_back(slot);
            }
        }
    }

    fn on_recv(&mut self, idx: u32, res: i32, flags: u32) {
        let p = self.conns[idx as usize].as_mut().expect("live");
        p.down_in_flight = false;
        let bid = io_uring::cqueue::buffer_select(flags);
        if res > 0 && !p.closing {
            let bid = bid.expect("a receive with data names its buffer");
            p.session.backend_recv(self.bufs.get(bid, res as usize));
            self.counters.backend_bytes_in.add(res as u64);
        } else if res == 0 {
            p.backend_eof = true;
            p.session.backend_eof();
        }
        if let Some(bid) = bid {
            self.bufs.recycle(bid);
        }
        if res == -libc::ENOBUFS {
            // Every provided buffer was in use: try again once some come back.
            self.counters.recv_buffer_starved.inc();
            self.starved.push((idx, p.gen));
        } else if res < 0 && !p.closing {
            self.backend_lost(idx);
        }
    }

    // ------------------------------------------------------------------ the pump

    /// Moves a connection forward after any event. See the module documentation.
    fn pump(&mut self, idx: u32) {
        let eager = self.backend.connect == ConnectPolicy::Eager;
        let Some(p) = self.conns[idx as usize].as_mut() else {
            return;
        };
        if p.closing {
            if p.in_flight == 0 {
                self.release(idx);
            }
            return;
        }
        let Some(id) = p.conn.filter(|&id| self.stack.conn(id).is_some()) else {
            // The client's connection is gone. Finished both ways: a normal end; otherwise it
            // was reset or timed out, and the backend is reset too.
            let graceful = p.client_eof_told && p.client_fin_sent;
            self.finish(idx, graceful);
            return;
        };

        // Client → session, while the session has passed on everything it had.
        let tcb = self.stack.conn(id).expect("checked above");
        let readable = tcb.recv_queue() > 0;
        let client_done = !tcb.may_recv() && tcb.recv_queue() == 0;
        let failed = p.session.stage() == Stage::Failed;
        if (readable
            && (failed || (p.session.wants_client_read() && !p.session.has_backend_output())))
            || (client_done && !p.client_eof_told)
        {
            let tcb = self.stack.conn_mut(id).expect("checked above");
            if failed {
                // Nothing the client sends after a TLS error is read: discarded (and once the
                // alert and FIN are queued the TCB is released, so later data draws an RST).
                tcb.consume(tcb.recv_queue());
            }
            while p.session.wants_client_read() && !p.session.has_backend_output() {
                // Straight from the TCB's ring into the session, one slot's worth at a time.
                let data = tcb.peek();
                let first = &data.first[..data.first.len().min(BUF_SIZE)];
                let second = &data.second[..data.second.len().min(BUF_SIZE - first.len())];
                let n = first.len() + second.len();
                if n == 0 {
                    break;
                }
                let fed = match p.session.client_recv(first) {
                    Ok(()) => p.session.client_recv(second),
                    Err(e) => Err(e),
                };
                tcb.consume(n);
                self.counters.client_bytes_in.add(n as u64);
                if let Err(e) = fed {
                    // rustls queued an alert; it goes out below, then our FIN.
                    self.counters.tls_errors.inc();
                    tracing::debug!(worker = self.id, client = %p.client_addr, error = %e, "TLS error");
                    tcb.consume(tcb.recv_queue());
                    break;
                }
            }
            if !tcb.may_recv() && tcb.recv_queue() == 0 && !p.client_eof_told {
                p.client_eof_told = true;
                let _ = p.session.client_eof();
            }
        }

        if !p.handshake_counted && p.session.stage() == Stage::Proxying {
            p.handshake_counted = true;
            if p.session.is_tls() {
                self.counters.handshakes.inc();
            }
            if p.session.resumed() == Some(true) {
                self.counters.resumed.inc();
            }
        }
        if p.backend == BackendState::None
            && !p.session.needs_backend(eager)
            && p.session.client_finished()
            && p.session.stage() == Stage::Proxying
        {
            // The client finished without sending anything: no backend is needed, and our side
            // closes too.
            p.session.close();
        }

        if p.backend == BackendState::None && p.session.needs_backend(eager) {
            self.start_connect(idx);
        }
        let p = self.conns[idx as usize].as_mut().expect("live");

        // Session → backend.
        if p.backend == BackendState::Connected {
            if !p.up_in_flight && p.up_slot.is_none() && p.session.has_backend_output() {
                match self.slots.take() {
                    Some(slot) => {
                        let buf = self.slots.slot_mut(slot);
                        let n = match p.session.backend_output(buf) {
                            Ok(n) => n,
                            Err(e) => {
                                // Ciphertext stashed behind a full plaintext buffer was bad.
                                self.counters.tls_errors.inc();
                                tracing::debug!(worker = self.id, error = %e, "TLS error");
                                0
                            }
                        };
                        if n > 0 {
                            p.up_slot = Some(slot);
                            p.up_start = 0;
                            p.up_end = n;
                        } else {
                            self.slots.give_back(slot);
                        }
                    }
                    None => self.starved.push((idx, p.gen)),
                }
            }
            if !p.up_in_flight && p.up_start < p.up_end {
                let slot = p.up_slot.expect("bytes pending in a slot");
                let e = opcode::WriteFixed::new(
                    types::Fd(p.backend_fd),
                    self.slots.ptr(slot, p.up_start),
                    (p.up_end - p.up_start) as u32,
                    0,
                )
                .build()
                .user_data(UserData::new(Op::BackendSend, p.gen, idx).encode());
                p.up_in_flight = true;
                p.in_flight += 1;
                push(&mut self.ring, e);
            }
            if p.session.client_finished()
                && !p.up_in_flight
                && p.up_slot.is_none()
                && !p.backend_wr_shut
            {
                p.backend_wr_shut = true;
                // SAFETY: our socket. Half-close: the client sent FIN and all its bytes went.
                unsafe { libc::shutdown(p.backend_fd, libc::SHUT_WR) };
            }
            // Backend → session, while the session has passed on everything it had.
            if !p.down_in_flight
                && !p.backend_eof
                && p.session.wants_backend_read()
                && !p.session.wants_client_write()
            {
                // The kernel picks a provided buffer when data arrives.
                let e = opcode::Recv::new(types::Fd(p.backend_fd), std::ptr::null_mut(), 0)
                    .buf_group(BUF_GROUP)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(UserData::new(Op::BackendRecv, p.gen, idx).encode());
                p.down_in_flight = true;
                p.in_flight += 1;
                push(&mut self.ring, e);
            }
        }

        // Session → client, as far as the send buffer has room.
        let tcb = self.stack.conn(id).expect("checked above");
        let room = self.tcp_config.send_buffer.saturating_sub(tcb.send_queue());
        let fin_due = p.session.server_finished() && !p.client_fin_sent;
        if (room > 0 && p.session.wants_client_write()) || fin_due {
            let tcb = self.stack.conn_mut(id).expect("checked above");
            let mut room = room;
            while room > 0 && p.session.wants_client_write() {
                // Straight into the TCB's send ring (its contiguous free part, then the rest
                // after the wrap on the next round).
                let session = &mut p.session;
                let n = tcb.send_in_place(|spare| {
                    let want = room.min(spare.len());
                    session.client_output(&mut spare[..want])
                });
                if n == 0 {
                    break;
                }
                self.counters.client_bytes_out.add(n as u64);
                room -= n;
            }
            if p.session.server_finished() && !p.client_fin_sent {
                p.client_fin_sent = true;
                tcb.close();
            }
        }

        // Both directions finished (or the TLS session failed and its alert and our FIN are
        // queued): the backend is closed now and the TCB is left to complete its own closing
        // handshake (and TIME-WAIT) in the stack.
        let client_done = p.client_eof_told && p.session.client_finished();
        let done = match p.backend {
            // A failed session or backend: nothing more from the client will be used (its
            // unread plaintext has nowhere to go), so our FIN ends it.
            _ if p.session.stage() == Stage::Failed => true,
            BackendState::Failed => true,
            BackendState::None => client_done,
            BackendState::Connecting | BackendState::Connected => client_done && p.backend_wr_shut,
        };
        if p.client_fin_sent && done && !p.up_in_flight {
            self.finish(idx, true);
        }
    }

    /// Opens a backend connection (round-robin; on failure the next server).
    fn start_connect(&mut self, idx: u32) {
        let n = self.backend.servers.len();
        let p = self.conns[idx as usize].as_mut().expect("live");
        if p.attempts == 0 {
            p.server = self.next_server % n;
            self.next_server = self.next_server.wrapping_add(1);
        }
        let addr = self.backend.servers[p.server];
        let fd = match tcp_socket(&addr) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "cannot create a backend socket");
                self.backend_lost(idx);
                return;
            }
        };
        p.backend_fd = fd;
        p.backend = BackendState::Connecting;
        p.socklen = write_sockaddr(&addr, &mut p.sockaddr);
        let entries = crate::uring::connect_with_timeout(
            fd,
            &p.sockaddr,
            p.socklen,
            &self.connect_timeout,
            p.gen,
            idx,
        );
        p.in_flight += 2;
        crate::uring::make_room(&mut self.ring, 2);
        for e in entries {
            push(&mut self.ring, e);
        }
    }

    /// The backend failed: close it, and close the client side politely.
    fn backend_lost(&mut self, idx: u32) {
        let p = self.conns[idx as usize].as_mut().expect("live");
        if p.backend == BackendState::Failed {
            return;
        }
        self.counters.backend_failures.inc();
        p.backend = BackendState::Failed;
        close_backend(p, false);
        p.session.close();
    }

    /// Ends a proxied connection: closes the backend (RST unless `graceful`), aborts the client
    /// connection if it is still there, and frees the entry once nothing is in flight.
    fn finish(&mut self, idx: u32, graceful: bool) {
        let p = self.conns[idx as usize].as_mut().expect("live");
        if p.closing {
            return;
        }
        p.closing = true;
        self.counters.closed.inc();
        close_backend(p, graceful);
        if let Some(id) = p.conn.take() {
            if let Some(tcb) = self.stack.conn_mut(id) {
                if graceful {
                    // Our FIN is queued; the TCB finishes its closing handshake in the stack,
                    // and resets the client if it sends anything more (nobody reads it now).
                    tcb.release();
                } else {
                    tcb.abort();
                }
            }
            if self.by_slot[id.slot()] == (id.generation(), idx) {
                self.by_slot[id.slot()] = (id.generation(), RETIRED);
            }
        }
        if p.in_flight == 0 {
            self.release(idx);
        }
    }

    fn release(&mut self, idx: u32) {
        let p = self.conns[idx as usize].take().expect("live");
        debug_assert_eq!(p.in_flight, 0, "releasing with operations in flight");
        if let Some(slot) = p.up_slot {
            self.slots.give_back(slot);
        }
        if let Some(id) = p.conn {
            if self.by_slot[id.slot()] == (id.generation(), idx) {
                self.by_slot[id.slot()] = (id.generation(), RETIRED);
            }
        }
        self.free.push(idx);
        self.counters.active.dec();
    }

    fn retry_starved(&mut self) {
        if self.starved.is_empty() || self.slots.in_use() >= self.slots.capacity() {
            return;
        }
        let waiting = std::mem::take(&mut self.starved);
        for (idx, gen) in waiting {
            if matches!(&self.conns[idx as usize], Some(p) if p.gen == gen) {
                self.pump(idx);
            }
        }
    }

    /// One round of everything but received frames.
    fn run(&mut self, out: &mut TxQueue<'_>) {
        let now = self.now();
        // Task work the kernel flagged (cooperative task running) posts its completions now.
        if self.ring.submission().taskrun() {
            self.submit();
        }
        self.reap();
        self.drain_ready(now);
        self.retry_starved();
        self.expire_handshakes(now);
        let tx_no_frame = &self.tcp_counters.tx_no_frame;
        self.stack.poll(now, &mut |f| transmit(out, f, tx_no_frame));
        // Timers and flushed sends may have ended connections or freed space.
        self.drain_ready(now);
        let tx_no_frame = &self.tcp_counters.tx_no_frame;
        self.stack.poll(now, &mut |f| transmit(out, f, tx_no_frame));
        self.housekeeping(now);
        // The submit happens in `end_turn`, together with the turn's TX kicks.
    }

    /// Resets TLS connections whose handshake did not finish in time (as kernel mode does).
    fn expire_handshakes(&mut self, now: TcpInstant) {
        while let Some(&(deadline, idx, gen)) = self.handshake_deadlines.front() {
            if now < deadline {
                return;
            }
            self.handshake_deadlines.pop_front();
            let Some(Some(p)) = self.conns.get(idx as usize) else {
                continue;
            };
            if p.gen != gen || p.closing || p.session.stage() != Stage::Handshake {
                continue;
            }
            self.counters.handshake_timeouts.inc();
            tracing::debug!(worker = self.id, client = %p.client_addr, "TLS handshake timed out");
            self.finish(idx, false);
        }
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                tracing::warn!(worker = self.id, error = %e, "io_uring submit failed");
            }
        }
    }
}

impl FrameHandler for L4Proxy {
    fn frame(&mut self, frame: &mut RxFrame<'_>, out: &mut TxQueue<'_>) -> Disposition {
        // One clock read per turn: the frames of one batch arrived together.
        if !self.pending {
            self.frame_now = self.now();
        }
        let now = self.frame_now;
        let tx_no_frame = &self.tcp_counters.tx_no_frame;
        // Drops are counted by the stack (published in `TcpCounters`).
        let _ = self
            .stack
            .receive(frame.data(), now, &mut |f| transmit(out, f, tx_no_frame));
        self.pending = true;
        Disposition::Recycle
    }

    fn attach_waker(&mut self, waker: &Waker) {
        // Completions wake the worker from its sleep in poll(2).
        if let Err(e) = self.ring.submitter().register_eventfd(waker.as_raw_fd()) {
            tracing::warn!(worker = self.id, error = %e, "cannot register the io_uring eventfd");
        }
    }

    fn wants_poll(&mut self) -> bool {
        if self.pending || self.ring.submission().taskrun() || !self.ring.completion().is_empty() {
            return true;
        }
        let now = self.now();
        self.stack.poll_due(now)
            || now.as_micros() >= self.last_housekeeping + HOUSEKEEPING_US
            || self
                .handshake_deadlines
                .front()
                .is_some_and(|&(deadline, ..)| now >= deadline)
    }

    fn poll(&mut self, out: &mut TxQueue<'_>) -> bool {
        self.pending = false;
        self.run(out);
        true
    }

    fn takes_kicks(&self) -> bool {
        true
    }

    fn end_turn(&mut self, kicks: &[RawFd]) -> u64 {
        let mut issued = 0;
        for &fd in kicks {
            if self.kicks_in_flight.contains(&fd) {
                continue;
            }
            // A zero-length, non-blocking send is the AF_XDP TX wakeup (copy mode transmits in
            // it); through the ring it shares one io_uring_enter with the turn's other work.
            let e = opcode::Send::new(types::Fd(fd), std::ptr::null(), 0)
                .flags(libc::MSG_DONTWAIT)
                .build()
                .user_data(UserData::new(Op::Kick, 0, fd as u32).encode());
            push(&mut self.ring, e);
            self.kicks_in_flight.push(fd);
            issued += 1;
        }
        // Nothing is submitted when there is nothing to submit: an idle turn makes no syscall.
        if !self.ring.submission().is_empty() {
            self.submit();
        }
        issued
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        // O(wheel buckets), but only asked before sleeping.
        let stack = self
            .stack
            .next_poll()
            .map(|t| self.epoch + std::time::Duration::from_micros(t.as_micros()));
        let housekeeping =
            self.epoch + std::time::Duration::from_micros(self.last_housekeeping + HOUSEKEEPING_US);
        let handshake = self
            .handshake_deadlines
            .front()
            .map(|&(t, ..)| self.epoch + std::time::Duration::from_micros(t.as_micros()));
        Some(
            [stack, handshake]
                .into_iter()
                .flatten()
                .fold(housekeeping, std::cmp::min),
        )
    }

    fn drain(&mut self, _deadline: std::time::Instant) {
        // New SYNs and cookie ACKs get RST from now on; open connections go on until they end
        // (or the worker's drain deadline passes and `shutdown` resets them).
        self.draining = true;
        self.stack.close_listeners();
        let open = self.conns.len() - self.free.len();
        tracing::info!(worker = self.id, open, "bypass worker draining");
    }

    fn drained(&mut self) -> bool {
        if self.free.len() != self.conns.len() {
            return false;
        }
        // No proxied connection is left; TCBs may still be finishing their closing handshakes
        // in the stack. Scanning for them is O(slots), so at most every 10 ms.
        let now = self.now();
        if now < self.next_drain_scan {
            return false;
        }
        self.next_drain_scan = now + TcpDuration::from_millis(10);
        self.stack.only_time_wait()
    }

    fn shutdown(&mut self, out: &mut TxQueue<'_>) {
        self.shutting_down = true;
        if self.draining {
            let open = self.conns.iter().flatten().filter(|p| !p.closing).count();
            if open > 0 {
                self.counters.drain_aborted.add(open as u64);
                tracing::info!(
                    worker = self.id,
                    open,
                    "drain deadline: resetting what is open"
                );
            }
        }
        let ids: Vec<ConnId> = self.stack.connections().collect();
        for id in ids {
            if let Some(tcb) = self.stack.conn_mut(id) {
                tcb.abort();
            }
        }
        for idx in 0..self.conns.len() as u32 {
            if matches!(&self.conns[idx as usize], Some(p) if !p.closing) {
                self.finish(idx, false);
            }
        }
        let now = self.now();
        let tx_no_frame = &self.tcp_counters.tx_no_frame;
        self.stack.poll(now, &mut |f| transmit(out, f, tx_no_frame));
        // Wait (bounded) for the operations still in flight, so none outlives its buffer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.conns.iter().flatten().any(|p| p.in_flight > 0)
            && std::time::Instant::now() < deadline
        {
            let _ = self.ring.submit_and_wait(1);
            self.reap();
        }
        publish(&self.tcp_counters, self.stack.counters(), self.stack.len());
    }
}

/// Closes the backend socket of `p` (with RST unless `graceful`). Operations still in flight
/// complete with errors; their completions only release what they lent.
fn close_backend(p: &mut Proxied, graceful: bool) {
    if p.backend_fd < 0 {
        return;
    }
    if !graceful {
        set_linger_zero(p.backend_fd);
    }
    if p.in_flight > 0 {
        // Make operations on the socket complete now (a read would otherwise wait forever).
        // SAFETY: our socket.
        unsafe { libc::shutdown(p.backend_fd, libc::SHUT_RDWR) };
    }
    // SAFETY: our socket, closed once (set to -1 right after).
    unsafe { libc::close(p.backend_fd) };
    p.backend_fd = -1;
}

/// Copies one frame the stack emitted into a UMEM frame and queues it.
fn transmit(out: &mut TxQueue<'_>, frame: &[u8], no_frame: &crate::counters::Counter) {
    let Some(mut f) = out.alloc() else {
        no_frame.inc();
        return;
    };
    let buf = out.buffer(&mut f);
    if frame.len() > buf.len() {
        // The stack is configured with the UMEM frame size; cannot happen.
        out.recycle(f);
        no_frame.inc();
        return;
    }
    buf[..frame.len()].copy_from_slice(frame);
    out.send(f, frame.len());
}

/// Queues an SQE, submitting first if the queue is full.
fn push(ring: &mut IoUring, e: squeue::Entry) {
    loop {
        // SAFETY: every buffer and address an entry points at lives in the proxy until its
        // completion arrives: the slot pool's memory, `connect_timeout`, and `Proxied::sockaddr`
        // in the slab, which never reallocates (`L4Proxy::conns` is created with its final
        // capacity) and whose entries are released only when nothing is in flight.
        if unsafe { ring.submission().push(&e) }.is_ok() {
            return;
        }
        if let Err(err) = ring.submit() {
            tracing::warn!(error = %err, "io_uring submit failed");
        }
    }
}

fn publish(c: &TcpCounters, s: &StackCounters, live: usize) {
    c.connections.set(live as u64);
    c.syn_acks_sent.set(s.syn_acks_sent);
    c.connections_created.set(s.connections_created);
    c.connections_closed.set(s.connections_closed);
    c.rsts_sent.set(s.rsts_sent);
    c.frames_sent.set(s.frames_sent);
    c.rx_malformed.set(s.wire_drops.iter().sum());
    c.rx_bad_checksum.set(
        WireError::ALL
            .iter()
            .filter(|e| e.name().contains("checksum"))
            .map(|e| s.wire_drops[e.index()])
            .sum(),
    );
    c.rx_partial_checksum.set(s.rx_partial_checksum);
    c.rx_no_listener.set(s.dropped(RxDrop::NoListener));
    c.rx_bad_cookie.set(s.dropped(RxDrop::BadCookie));
    c.rx_slab_full.set(s.dropped(RxDrop::SlabFull));
    c.rx_late_ack.set(s.dropped(RxDrop::LateAck));
    c.rx_time_wait.set(s.dropped(RxDrop::TimeWait));
    c.time_wait_evicted.set(s.closed_evicted);
    c.rx_other_dropped.set(
        s.dropped(RxDrop::UnknownRst) + s.dropped(RxDrop::NotForUs) + s.dropped(RxDrop::NoSynNoAck),
    );
}

/// The cookie key of period `period`: the same on every worker of the process.
fn cookie_key(secret: &CookieKey, period: u64) -> CookieKey {
    let lo = siphash24(secret, &period.to_le_bytes());
    let hi = siphash24(secret, &(!period).to_le_bytes());
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&lo.to_le_bytes());
    key[8..].copy_from_slice(&hi.to_le_bytes());
    key
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the live buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

fn to_tcp(epoch: std::time::Instant, t: std::time::Instant) -> TcpInstant {
    TcpInstant::from_micros(t.saturating_duration_since(epoch).as_micros() as u64)
}
