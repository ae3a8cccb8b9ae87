//! The bypass path's proxy: a [`FrameHandler`] that runs tern's own TCP stack ([`Stack`])
//! inside a bypass worker and proxies each connection through the shared connection driver
//! ([`crate::driver`]), TLS or plain, to a backend over the worker's own io_uring.
//!
//! Per worker: one `Stack` (flow table, SYN cookies, timers), one io_uring with a registered
//! slot pool for backend sends and a provided-buffer ring for backend receives (a buffer is
//! taken only when data arrives: idle connections hold none), and a slab of proxied
//! connections, each a driver [`Conn`] with the TCB as its client transport and a [`Sock`] as
//! its backend leg. Client frames arrive through [`FrameHandler::frame`]; what the stack sends
//! is copied into UMEM frames at once. Everything else happens in [`FrameHandler::poll`], once
//! per worker turn when there is something to do: io_uring completions, connections the stack
//! reported news for ([`Stack::pop_ready`]), the stack's timers, the driver's deadlines (on a
//! timer wheel, checked with the housekeeping every 100 ms), and one non-blocking submit. The
//! worker sleeps on the ring's eventfd (registered on the worker's [`Waker`]) and until the
//! stack's next timer ([`FrameHandler::next_deadline`]).
//!
//! What is the bypass path's own is only the client transport: bytes are taken from the TCB's
//! receive ring while the machine wants them (so an unread backend closes the client's receive
//! window), and the machine's output goes straight into the TCB's send ring as far as it has
//! room (so a client that stops reading stops the backend reads). Every rule about the
//! connection (backend choice, failover, close, deadlines, counters) is the driver's, the same
//! as in kernel mode. Idleness is measured in payload moving, not in segments: a bare ACK does
//! not keep a connection alive (the TCB's own idle timer is off; the driver's is used).
//!
//! Lifetimes: a proxied connection is created when the stack reports a new connection and is
//! freed once the machine is done and its backend socket has no operation in flight. A TCB that
//! disappears before both directions finished (client RST, retransmission or keep-alive
//! timeout) counts as a client failure and resets the backend; when the machine ends the
//! connection gracefully the TCB is released and finishes its closing handshake (and
//! TIME-WAIT) on its own in the stack.
//!
//! SYN-cookie keys: every worker derives the key of cookie period `p` from one process-wide
//! secret (`siphash(secret, p)`), and all workers share one clock epoch, so they agree on the
//! keys without talking to each other; a period is two cookie slots, so the previous key (still
//! tried) covers every cookie in its lifetime.
//!
//! Not here: the TCP state machine (`tcp`), frames and rings (`xsk`, `bypass`), the connection
//! rules (`driver`), the byte rules (`proxy`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use rustls::ServerConfig;

use crate::bypass::idle_pages::{self, IdlePages};
use crate::bypass::xsk::{Disposition, RxFrame, TxQueue};
use crate::bypass::{FrameHandler, Waker};
use crate::config::{
    Backend, Congestion, Limits, ProxyProtocol, RxChecksum, TcpSettings, Timeouts,
};
use crate::counters::WorkerCounters;
use crate::driver::sock::{Io, Side, Sock};
use crate::driver::{
    self, Backends, ClientOutput, Conn, End, Key, Policy, Shared, SourceLimits, Table, Why,
};
use crate::proxy::Session;
use crate::reload::Watch;
use crate::sys::uring::{Op, UserData, BUF_SIZE, SLOT_SIZE};
use crate::tcp::cc::Algorithm;
use crate::tcp::conn::{Keepalive, TcbConfig};
use crate::tcp::frame_out::FrameOut;
use crate::tcp::stack::{ConnId, RxDrop, Stack, StackConfig, StackCounters};
use crate::tcp::syncookie::CookieKey;
use crate::tcp::time::{Duration as TcpDuration, Instant as TcpInstant};
use crate::wire::{ChecksumMode, WireError};

const RING_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
/// Most registered 32 KiB send slots per worker. A slot is held only while a write to a
/// backend is in flight; connections that find none wait (back pressure), and the pool is
/// pinned memory, so it is bounded well below one per connection.
const MAX_SLOTS: u32 = 1024;
/// Provided buffers for backend receives (32 KiB each): a buffer is taken only when data
/// arrives, so idle connections hold none.
const RECV_BUFFERS: u16 = 512;
/// How often the stack's counters are published for `tern ctl stats`, keys checked and the
/// driver's deadlines looked at.
const HOUSEKEEPING_US: u64 = 100_000;
/// Granularity of the driver's deadlines (the housekeeping interval).
const WHEEL_TICK_MS: u64 = HOUSEKEEPING_US / 1000;
/// A cookie key period: two cookie slots, so the previous key covers a cookie's lifetime.
use tern_common::syncookie::KEY_PERIOD_SECS;
/// Keep-alive probes after `tcp.keepalive_ms`: Linux's defaults for the other two numbers.
const KEEPALIVE_INTERVAL_SECS: u64 = 75;
const KEEPALIVE_PROBES: u32 = 9;

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
    /// Gauge: connections the proxy is done with that hold a slot finishing their closing
    /// handshake (at most `tcp.max_orphans`).
    orphans,
    /// Of those releases, how many were reset instead because `tcp.max_orphans` were held.
    orphans_dropped,
    /// Orphans reset because their closing handshake outlasted `tcp.fin_timeout_ms`.
    orphan_timeouts,
    /// Other dropped frames (RSTs for no connection, group addresses, neither SYN nor ACK).
    rx_other_dropped,
    /// Frames the stack wanted to send but no UMEM frame was free (dropped; TCP retransmits).
    tx_no_frame,
    /// TX wakeups (SEND on an AF_XDP socket through the ring) that failed unexpectedly.
    tx_kick_errors,
    /// TCP buffers (a connection's send or receive ring) whose pages went back to the kernel
    /// because the connection moved no byte for 100 ms (`bypass::idle_pages`).
    idle_buffers_released,
    }
}

/// What one worker's L4 proxy is built from.
pub struct ProxySetup {
    pub worker: usize,
    /// The connection driver's deadlines and connect policy ([`Policy::from_config`]).
    pub policy: Policy,
    /// The `mode = "bypass"` listener addresses this worker serves, plain and TLS.
    pub listeners: Vec<SocketAddr>,
    /// Those of `listeners` that terminate TLS (`tls = true`).
    pub tls_listeners: Vec<SocketAddr>,
    /// Each of `listeners` with its index in `config.listeners` (metrics, access log).
    pub listener_ids: Vec<(SocketAddr, u16)>,
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
    /// Reloaded configurations ([`crate::reload`]).
    pub watch: Watch,
    /// Where the worker publishes its backend servers' state (`tern ctl backends`).
    pub board: Arc<crate::driver::board::Board>,
    /// This worker's end of the access log, when it is on.
    pub access_log: Option<crate::access_log::Sink>,
    /// Its latency histograms (`metrics::latency`).
    pub latency: Arc<crate::metrics::WorkerLatency>,
}

/// Stack slot → proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// No proxied connection (yet): the stack's next news for it is a new connection.
    None,
    Proxied(ConnId, Key),
    /// The proxy is done with this TCB, which finishes its closing handshake (or TIME-WAIT) in
    /// the stack: its later news are not a new connection.
    Retired(ConnId),
}

/// A proxied connection's client transport: its TCB in the stack.
struct Client {
    /// The client's connection; `None` once the proxy let go of it.
    tcb: Option<ConnId>,
    /// The TCB's send queue after the last pump: less now means the client acknowledged bytes.
    sent_queue: usize,
    /// Queued in `Proxy::idle_pages` (at most once).
    watched: bool,
    /// Bytes moved either way ([`moved`]) at the last pump, and since when (µs): the
    /// connection is quiet once `idle_pages::QUIET_US` passed without a change.
    moved: u64,
    moved_at: u64,
}

/// The proxy of one bypass worker. See the module documentation.
pub struct Proxy {
    id: usize,
    stack: Stack,
    tcp_config: TcbConfig,
    epoch: std::time::Instant,
    secret: CookieKey,
    key_period: u64,
    /// What every connection shares (the ring first: dropped before the buffers it uses).
    sh: Shared,
    /// Proxied connections (entries never move: io_uring entries point into them).
    conns: Table<Client>,
    /// Stack slot → owner.
    by_slot: Vec<Owner>,
    tls_listeners: Vec<SocketAddr>,
    listener_ids: Vec<(SocketAddr, u16)>,
    tls: Option<Arc<ServerConfig>>,
    proxy_protocol: ProxyProtocol,
    limit: usize,
    /// `limits.max_connections_per_worker` now (a reload may lower it below the stack's slots).
    max_conns: usize,
    watch: Watch,
    tcp_counters: Arc<TcpCounters>,
    last_housekeeping: u64,
    /// The stack's slab-full refusals already added to `refused_full`.
    refused_seen: u64,
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
    /// Connections whose TCP buffer pages go back to the kernel once they are quiet.
    idle_pages: IdlePages,
}

impl Proxy {
    /// Builds the stack and the ring; allocates everything the per-packet path uses.
    pub fn new(setup: ProxySetup) -> io::Result<Proxy> {
        let capacity = setup.limits.max_connections_per_worker;
        if !setup.tls_listeners.is_empty() && setup.tls.is_none() {
            return Err(io::Error::other(
                "TLS listeners on the bypass path without a TLS configuration",
            ));
        }
        let tcp_config = TcbConfig {
            send_buffer: setup.tcp.send_buffer,
            recv_buffer: setup.tcp.recv_buffer,
            // Resolved per interface at start (`bypass::mss`); the fallback is never used there.
            mss: setup.tcp.mss.unwrap_or(1460),
            nagle: setup.tcp.nagle,
            // Idleness is the driver's (payload moving, not segments): a bare ACK must not keep
            // a connection alive.
            idle_timeout: None,
            cc: match setup.tcp.congestion {
                Congestion::Cubic => Algorithm::Cubic,
                Congestion::NewReno => Algorithm::NewReno,
            },
            keepalive: setup.tcp.keepalive.map(|idle| Keepalive {
                idle: TcpDuration::from_millis(idle.as_millis() as u64),
                interval: TcpDuration::from_secs(KEEPALIVE_INTERVAL_SECS),
                count: KEEPALIVE_PROBES,
            }),
            orphan_timeout: Some(TcpDuration::from_millis(
                setup.tcp.fin_timeout.as_millis() as u64
            )),
            ..TcbConfig::default()
        };
        let now = to_tcp(setup.epoch, std::time::Instant::now());
        let period = now.as_secs() / KEY_PERIOD_SECS;
        let mut flow_key = [0u8; 16];
        crate::sys::fill_random(&mut flow_key)?;
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
                max_orphans: setup.tcp.max_orphans,
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
        let io = Io::new(
            ring,
            slot_count,
            RECV_BUFFERS,
            setup.backend.connect_timeout,
        )?;
        tracing::info!(
            worker = setup.worker,
            connections = capacity,
            buffers_mib = (capacity * (setup.tcp.send_buffer + setup.tcp.recv_buffer)) >> 20,
            io_buffers_mib =
                (slot_count as usize * SLOT_SIZE + RECV_BUFFERS as usize * BUF_SIZE) >> 20,
            "bypass TCP stack ready (connection buffers are touched only as connections use them)"
        );
        Ok(Proxy {
            id: setup.worker,
            stack,
            tcp_config,
            epoch: setup.epoch,
            secret: setup.secret,
            key_period: period,
            sh: Shared {
                io,
                backends: Backends::from_config(&setup.backend, setup.worker, &setup.board),
                sources: SourceLimits::new(setup.limits.max_connections_per_source),
                policy: setup.policy,
                counters: setup.counters,
                access_log: setup.access_log.map(|s| s.with_epoch(setup.epoch)),
                latency_servers: setup
                    .latency
                    .servers(setup.backend.servers.iter().map(|s| s.address)),
                latency: setup.latency,
            },
            // Twice the stack's slots: a proxied connection can outlive its TCB while its
            // backend operations finish.
            conns: Table::new(2 * capacity, WHEEL_TICK_MS, now)
                .reporting_to(setup.board.census.register("bypass", setup.worker)),
            by_slot: vec![Owner::None; capacity],
            tls_listeners: setup.tls_listeners,
            listener_ids: setup.listener_ids,
            tls: setup.tls,
            proxy_protocol: setup.backend.proxy_protocol,
            limit: setup.limits.buffer_per_direction,
            max_conns: capacity,
            watch: setup.watch,
            tcp_counters: setup.tcp_counters,
            last_housekeeping: 0,
            refused_seen: 0,
            pending: false,
            frame_now: TcpInstant::ZERO,
            kicks_in_flight: Vec::new(),
            shutting_down: false,
            draining: false,
            next_drain_scan: TcpInstant::ZERO,
            idle_pages: IdlePages::default(),
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
        self.tcp_counters
            .idle_buffers_released
            .set(self.idle_pages.released);
        self.check_reload(now);
        // The stack refuses a connection beyond its slots (a valid cookie ACK gets RST) before
        // the proxy sees it: the same refusal as kernel mode's at accept, counted the same way.
        let full = self.stack.counters().dropped(RxDrop::SlabFull);
        if full > self.refused_seen {
            self.sh.counters.refused_full.add(full - self.refused_seen);
            self.refused_seen = full;
        }
        if let Some(alarm) = self.stack.checksum_alarm(now) {
            tracing::warn!(
                worker = self.id,
                frames = alarm.frames,
                bad = alarm.bad,
                "{alarm}"
            );
        }
        self.expire_timers(now);
        self.trim_idle(now);
    }

    /// Gives back the buffer pages of connections that moved no byte for
    /// [`idle_pages::QUIET_US`] (see [`idle_pages`]).
    fn trim_idle(&mut self, now: TcpInstant) {
        let now_us = now.as_micros();
        while let Some(key) = self.idle_pages.next_due(now_us) {
            let Some(p) = self.conns.get_mut(key) else {
                continue;
            };
            let tcb = p.client.tcb.and_then(|id| self.stack.conn_mut(id));
            let (Some(tcb), false) = (tcb, p.closing) else {
                p.client.watched = false;
                continue;
            };
            if idle_pages::is_quiet(p.client.moved_at, now_us) {
                for storage in tcb.idle_buffers().into_iter().flatten() {
                    idle_pages::release(storage);
                    self.idle_pages.released += 1;
                }
            }
            if tcb.buffers_touched() {
                self.idle_pages.watch(key, now_us);
            } else {
                p.client.watched = false;
            }
        }
    }

    /// Takes a reloaded configuration, if there is one, for the connections accepted from now
    /// on (open ones keep theirs). The stack's own settings (`[tcp]`, `[xdp]`) need a restart.
    fn check_reload(&mut self, now: TcpInstant) {
        let Some(live) = self.watch.poll() else {
            return;
        };
        let config = &live.config;
        self.tls.clone_from(&live.tls);
        self.proxy_protocol = config.backend.proxy_protocol;
        self.limit = config.limits.buffer_per_direction;
        self.max_conns = config.limits.max_connections_per_worker;
        self.sh.reconfigure(config, now);
        self.watch.applied(live.generation);
        tracing::debug!(
            worker = self.id,
            generation = live.generation,
            "configuration reloaded"
        );
    }

    // ------------------------------------------------------------------ events

    /// Handles the stack's news: new connections, data, space, state changes, departures.
    /// Returns whether any connection had news.
    fn drain_ready(&mut self, now: TcpInstant) -> bool {
        let mut any = false;
        while let Some(id) = self.stack.pop_ready() {
            any = true;
            match self.by_slot[id.slot()] {
                Owner::Proxied(owner, key) if owner == id => {
                    self.pump(key, now);
                    continue;
                }
                // A connection the proxy is done with, closing on its own in the stack.
                Owner::Retired(owner) if owner == id => continue,
                _ => {}
            }
            if self.stack.conn(id).is_none() {
                continue;
            }
            if self.shutting_down {
                if let Some(tcb) = self.stack.conn_mut(id) {
                    tcb.abort();
                }
                continue;
            }
            match self.adopt(id, now) {
                Some(key) => self.pump(key, now),
                None => {
                    if let Some(tcb) = self.stack.conn_mut(id) {
                        tcb.abort();
                    }
                }
            }
        }
        any
    }

    /// A new client connection from the stack; `None` (counted) when the slab is full
    /// (connections still finishing their backend side hold entries), the source is at its
    /// limit, or rustls refused to start a session.
    fn adopt(&mut self, id: ConnId, now: TcpInstant) -> Option<Key> {
        let (local, remote) = self.stack.endpoints(id)?;
        if self.conns.is_full() || self.sh.counters.active.get() >= self.max_conns as u64 {
            self.sh.counters.refused_full.inc();
            return None;
        }
        if !self.sh.sources.acquire(remote.ip()) {
            self.sh.counters.refused_source_limit.inc();
            return None;
        }
        let session = match &self.tls {
            Some(config) if self.tls_listeners.contains(&local) => {
                match Session::new(
                    config.clone(),
                    self.proxy_protocol,
                    remote,
                    local,
                    self.limit,
                ) {
                    Ok(session) => session,
                    Err(e) => {
                        self.sh.counters.tls_errors.inc();
                        self.sh.sources.release(remote.ip());
                        tracing::warn!(worker = self.id, error = %e, "cannot start a TLS session");
                        return None;
                    }
                }
            }
            _ => Session::plain(self.proxy_protocol, remote, local, self.limit),
        };
        let client = Client {
            tcb: Some(id),
            sent_queue: 0,
            watched: false,
            moved: 0,
            moved_at: now.as_micros(),
        };
        let listener = listener_index(&self.listener_ids, local);
        let key = self.conns.insert(
            Conn::new(session, remote, listener, self.sh.policy, now),
            client,
            Sock::none(Side::Backend),
        )?;
        self.by_slot[id.slot()] = Owner::Proxied(id, key);
        self.sh.counters.accepted.inc();
        self.sh.counters.active.inc();
        Some(key)
    }

    /// Handles every completion; returns whether any was more than a TX kick's (or a cancel's).
    fn reap(&mut self, now: TcpInstant) -> bool {
        let mut worked = false;
        loop {
            let mut batch = [(0u64, 0i32, 0u32); 64];
            let mut n = 0;
            for cqe in self.sh.io.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                n += 1;
                if n == batch.len() {
                    break;
                }
            }
            if n == 0 {
                return worked;
            }
            for &(ud, res, flags) in &batch[..n] {
                worked |=
                    UserData::decode(ud).is_none_or(|u| !matches!(u.op, Op::Kick | Op::Cancel));
                self.complete(ud, res, flags, now);
            }
            // Connections that found no free send slot: slots may have come back.
            for key in std::mem::take(&mut self.sh.io.retry) {
                self.pump(key, now);
            }
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32, now: TcpInstant) {
        let Some(ud) = UserData::decode(ud) else {
            tracing::error!(worker = self.id, ud, "completion with unknown user_data");
            return;
        };
        match ud.op {
            Op::Cancel => return,
            Op::Probe | Op::ProbeTimeout => {
                self.sh
                    .backends
                    .probe_complete(ud.index as usize, ud.op, res, now);
                return;
            }
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
        let key = Key {
            index: ud.index,
            gen: ud.gen,
        };
        let Some(p) = self.conns.get_mut(key) else {
            tracing::error!(worker = self.id, ?ud, "completion for a freed connection");
            return;
        };
        driver::backend_completion(&mut self.sh, p, key, (ud.op, res, flags), now);
        self.pump(key, now);
    }

    // ------------------------------------------------------------------ the pump

    /// Moves a connection forward after any event: the client's TCB, the backend leg (shared
    /// with kernel mode), the end.
    fn pump(&mut self, key: Key, now: TcpInstant) {
        let Some(p) = self.conns.get_mut(key) else {
            return;
        };
        if p.closing {
            if p.backend.is_released() {
                self.release(key);
            }
            return;
        }
        let counters = &*self.sh.counters;
        let Some(id) = p.client.tcb.filter(|&id| self.stack.conn(id).is_some()) else {
            // The client's connection is gone. Both ways finished: a normal end; otherwise it
            // was reset or timed out (the stack counted which), and the backend is reset too.
            let end = if p.conn.fin_sent() && p.conn.session().client_finished() {
                End::Graceful
            } else {
                p.conn.client_failed(counters);
                End::Abort(Why::Client)
            };
            self.finish(key, end);
            return;
        };
        let c = &mut p.conn;

        // Client → machine, straight from the TCB's ring, while the machine wants bytes.
        if let Some(tcb) = self.stack.conn_mut(id) {
            if c.discards_client_input() {
                // Nothing the client sends after a TLS error is read (once the alert and FIN
                // are queued the TCB is released, so later data draws an RST).
                tcb.consume(tcb.recv_queue());
            }
            while c.wants_client_read() {
                let data = tcb.peek();
                let first = &data.first[..data.first.len().min(BUF_SIZE)];
                let second = &data.second[..data.second.len().min(BUF_SIZE - first.len())];
                let n = first.len() + second.len();
                if n == 0 {
                    break;
                }
                let fed = c
                    .client_data(first, counters)
                    .and_then(|()| c.client_data(second, counters));
                tcb.consume(n);
                if let Err(e) = fed {
                    // rustls queued an alert; it goes out below, then our FIN.
                    tracing::debug!(worker = self.id, client = %c.peer, error = %e, "TLS error");
                    tcb.consume(tcb.recv_queue());
                    break;
                }
            }
            if !tcb.may_recv() && tcb.recv_queue() == 0 {
                c.client_eof();
            }
        }

        driver::pump_backend(&mut self.sh, p, key, now);
        let (c, counters) = (&mut p.conn, &*self.sh.counters);

        // Machine → client, straight into the TCB's send ring as far as it has room.
        let mut client = ClientOutput {
            queued: false,
            progressed: false,
            flushed: true,
        };
        if let Some(tcb) = self.stack.conn_mut(id) {
            client.progressed = tcb.send_queue() < p.client.sent_queue;
            let mut room = self.tcp_config.send_buffer.saturating_sub(tcb.send_queue());
            while room > 0 && c.wants_client_write() {
                let n = tcb.send_in_place(|spare| {
                    let want = room.min(spare.len());
                    c.client_output(&mut spare[..want], counters)
                });
                if n == 0 {
                    break;
                }
                room -= n;
            }
            // The TCB sends our FIN after what it holds.
            if c.fin_due(true, now) {
                tcb.close();
            }
            p.client.sent_queue = tcb.send_queue();
            client.queued = p.client.sent_queue > 0;
            let bytes = moved(c.bytes());
            if bytes != p.client.moved {
                p.client.moved = bytes;
                p.client.moved_at = now.as_micros();
            }
            if !p.client.watched && tcb.buffers_touched() {
                p.client.watched = true;
                self.idle_pages.watch(key, now.as_micros());
            }
        }
        match driver::settle(p, client, now) {
            Some(end) => self.finish(key, end),
            None => self.conns.schedule(key),
        }
    }

    fn expire_timers(&mut self, now: TcpInstant) {
        self.sh.backends.probe(&mut self.sh.io, now);
        for key in self.conns.expire(now, &self.sh.counters) {
            self.pump(key, now);
        }
    }

    /// Ends a proxied connection: closes the backend (RST unless graceful), releases the
    /// client's TCB (graceful: our FIN is queued and the TCB finishes on its own) or aborts it,
    /// and frees the entry once nothing is in flight.
    fn finish(&mut self, key: Key, end: End) {
        // One clock read per connection end, for its duration (`metrics::latency`).
        let now = self.now();
        let Some(p) = self.conns.get_mut(key) else {
            return;
        };
        let Some(graceful) = driver::begin_finish(&mut self.sh, p, end, now) else {
            return;
        };
        if let Some(id) = p.client.tcb.take() {
            if let Some(tcb) = self.stack.conn_mut(id) {
                if graceful {
                    // The TCB resets the client if it sends anything more (nobody reads it now).
                    tcb.release();
                } else {
                    tcb.abort();
                }
            }
            if self.by_slot[id.slot()] == Owner::Proxied(id, key) {
                self.by_slot[id.slot()] = Owner::Retired(id);
            }
        }
        if p.backend.is_released() {
            self.release(key);
        }
    }

    fn release(&mut self, key: Key) {
        if self.conns.remove(key).is_some() {
            self.sh.counters.active.dec();
        }
    }

    /// One round of everything but received frames. Returns whether it did anything but
    /// reap TX-kick completions (a connection moved, a frame went out, an operation completed).
    fn run(&mut self, out: &mut TxQueue<'_>) -> bool {
        let now = self.now();
        // Task work the kernel flagged (cooperative task running) posts its completions now.
        if self.sh.io.ring.submission().taskrun() {
            self.submit();
        }
        let mut worked = self.reap(now);
        worked |= self.drain_ready(now);
        let mut sent = self.poll_stack(now, out);
        // Timers and flushed sends may have ended connections or freed space.
        worked |= self.drain_ready(now);
        self.housekeeping(now);
        sent |= self.poll_stack(now, out);
        // The submit happens in `end_turn`, together with the turn's TX kicks.
        worked || sent
    }

    /// Runs the stack's timers and pending sends into `out`; returns whether a frame went out.
    fn poll_stack(&mut self, now: TcpInstant, out: &mut TxQueue<'_>) -> bool {
        let mut umem = Umem {
            out,
            no_frame: &self.tcp_counters.tx_no_frame,
            sent: false,
        };
        self.stack.poll_into(now, &mut umem);
        umem.sent
    }

    fn submit(&mut self) {
        if let Err(e) = self.sh.io.ring.submit() {
            if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                tracing::warn!(worker = self.id, error = %e, "io_uring submit failed");
            }
        }
    }
}

impl FrameHandler for Proxy {
    fn frame(&mut self, frame: &mut RxFrame<'_>, out: &mut TxQueue<'_>) -> Disposition {
        // One clock read per turn: the frames of one batch arrived together.
        if !self.pending {
            self.frame_now = self.now();
        }
        let now = self.frame_now;
        let tx_no_frame = &self.tcp_counters.tx_no_frame;
        // Drops are counted by the stack (published in `TcpCounters`).
        let _ = self.stack.receive_into(
            frame.data(),
            now,
            &mut Umem {
                out: &mut *out,
                no_frame: tx_no_frame,
                sent: false,
            },
        );
        self.pending = true;
        Disposition::Recycle
    }

    fn attach_waker(&mut self, waker: &Waker) {
        // Completions wake the worker from its sleep in poll(2).
        if let Err(e) = self
            .sh
            .io
            .ring
            .submitter()
            .register_eventfd(waker.as_raw_fd())
        {
            tracing::warn!(worker = self.id, error = %e, "cannot register the io_uring eventfd");
        }
        // Signalled only while the worker sleeps (`prepare_sleep`).
        self.sh.io.ring.completion().disable_eventfd();
    }

    fn prepare_sleep(&mut self) -> bool {
        // While awake the eventfd stays quiet: the worker's own submits complete inline (every
        // TX kick does), and each such completion would leave the eventfd readable, so the next
        // poll(2) would return at once and cost a read besides. Turned on just before the
        // sleep, then the queues are looked at again: what completed before the flag was seen
        // is found here, what completes after signals. (The worker's own completions, which
        // run as task work when a sleep is interrupted, are posted after the wake anyway.)
        self.sh.io.ring.completion().enable_eventfd();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.sh.io.ring.submission().taskrun() || !self.sh.io.ring.completion().is_empty() {
            self.sh.io.ring.completion().disable_eventfd();
            return false;
        }
        true
    }

    fn woke(&mut self) {
        self.sh.io.ring.completion().disable_eventfd();
    }

    fn wants_poll(&mut self) -> bool {
        if self.pending
            || self.sh.io.ring.submission().taskrun()
            || !self.sh.io.ring.completion().is_empty()
        {
            return true;
        }
        let now = self.now();
        // The driver's deadlines are looked at with the housekeeping.
        self.stack.poll_due(now) || now.as_micros() >= self.last_housekeeping + HOUSEKEEPING_US
    }

    fn poll(&mut self, out: &mut TxQueue<'_>) -> bool {
        let frames = std::mem::take(&mut self.pending);
        // Reaping the completion of the turn's own TX kick is not work: counted as work it
        // would restart the worker's spin after every burst.
        self.run(out) || frames
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
            self.sh.io.push(e);
            self.kicks_in_flight.push(fd);
            issued += 1;
        }
        // Nothing is submitted when there is nothing to submit: an idle turn makes no syscall.
        if !self.sh.io.ring.submission().is_empty() {
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
        Some(stack.map_or(housekeeping, |s| s.min(housekeeping)))
    }

    fn drain(&mut self, _deadline: std::time::Instant) {
        // New SYNs and cookie ACKs get RST from now on; open connections go on until they end
        // (or the worker's drain deadline passes and `shutdown` resets them). After a binary
        // upgrade the listeners stay: the XDP program already sends new flows to the successor,
        // so only SYNs queued in the RX rings before that switch and the final ACKs of
        // handshakes answered before it still reach this worker, and each is a client that
        // must not be refused.
        self.draining = true;
        if !crate::upgrade::taken_over() {
            self.stack.close_listeners();
        }
        let open = self.conns.len();
        tracing::info!(worker = self.id, open, "bypass worker draining");
    }

    fn drained(&mut self) -> bool {
        if !self.conns.is_empty() {
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
            let open = self.conns.open();
            if open > 0 {
                self.sh.counters.drain_aborted.add(open as u64);
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
        for key in self.conns.keys() {
            if let Some(p) = self.conns.get_mut(key) {
                p.conn.abort(Why::Shutdown);
            }
            self.finish(key, End::Abort(Why::Shutdown));
        }
        let now = self.now();
        self.poll_stack(now, out);
        // Wait (bounded) for the operations still in flight, so none outlives its buffer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !self.conns.is_empty() && std::time::Instant::now() < deadline {
            let _ = self.sh.io.ring.submitter().submit_with_args(
                1,
                &types::SubmitArgs::new().timespec(&types::Timespec::new().nsec(10_000_000)),
            );
            self.reap(now);
        }
        publish(&self.tcp_counters, self.stack.counters(), self.stack.len());
    }
}

/// Bytes a connection moved either way: unchanged over a period means it was quiet.
fn moved(b: &driver::ConnBytes) -> u64 {
    b.from_client + b.to_client
}

/// The stack's frames go straight into UMEM frames of this worker, queued on its TX ring
/// (flushed in batches by [`TxQueue`]). Without a free frame the segment is dropped and counted
/// (`tx_no_frame`); the TCB retransmits it as it would a lost one.
struct Umem<'q, 'a, 'c> {
    out: &'q mut TxQueue<'a>,
    no_frame: &'c crate::counters::Counter,
    /// A frame was queued (the turn did work).
    sent: bool,
}

impl FrameOut for Umem<'_, '_, '_> {
    fn send(&mut self, frame: &[u8]) {
        let _ = self.build(&mut [], |buf| {
            let dst = buf
                .get_mut(..frame.len())
                .ok_or(WireError::BufferTooSmall)?;
            dst.copy_from_slice(frame);
            Ok::<usize, WireError>(frame.len())
        });
    }

    fn build<E>(
        &mut self,
        _scratch: &mut [u8],
        build: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        let Some(mut f) = self.out.alloc() else {
            self.no_frame.inc();
            return Ok(());
        };
        match build(self.out.buffer(&mut f)) {
            Ok(n) => {
                self.out.send(f, n);
                self.sent = true;
                Ok(())
            }
            Err(e) => {
                // The stack is configured with the UMEM frame size: a frame that does not fit
                // cannot happen.
                self.out.recycle(f);
                self.no_frame.inc();
                Err(e)
            }
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
    c.orphans.set(s.orphans);
    c.orphans_dropped.set(s.orphans_dropped);
    c.orphan_timeouts.set(s.orphan_timeouts);
    c.rx_other_dropped.set(
        s.dropped(RxDrop::UnknownRst) + s.dropped(RxDrop::NotForUs) + s.dropped(RxDrop::NoSynNoAck),
    );
}

/// The index in `config.listeners` of the listener a connection to `local` was accepted by:
/// the exact address, else the wildcard one of its port (0 if none, which cannot happen: the
/// stack accepts only for listeners).
fn listener_index(ids: &[(SocketAddr, u16)], local: SocketAddr) -> u16 {
    ids.iter()
        .find(|(a, _)| *a == local)
        .or_else(|| {
            ids.iter()
                .find(|(a, _)| a.ip().is_unspecified() && a.port() == local.port())
        })
        .map_or(0, |&(_, i)| i)
}

/// The cookie key of period `period`: the same on every worker of the process.
/// (The XDP program derives the same keys from the same secret: `[xdp] syn_cookies`.)
fn cookie_key(secret: &CookieKey, period: u64) -> CookieKey {
    tern_common::syncookie::period_key(secret, period)
}

fn to_tcp(epoch: std::time::Instant, t: std::time::Instant) -> TcpInstant {
    TcpInstant::from_micros(t.saturating_duration_since(epoch).as_micros() as u64)
}
