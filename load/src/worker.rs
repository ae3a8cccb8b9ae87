//! One worker thread: an epoll loop over its share of the connections, from set-up through the
//! measurement window to the drain.
//!
//! Owns: the phases of a worker (set-up → wait for the start signal → window → drain → report),
//! opening connections and starting requests in closed loop (keep `concurrency` operations
//! going) or open loop (at the [`Pacer`]'s intended times, when a slot is free; otherwise the
//! request waits, and its latency keeps running from the intended time), timeouts, the
//! per-worker error back-off, and what a connection's [`Outcome`] means for the run. Does not
//! own: connection internals (`conn`), or coordinating workers (`coord`).
//!
//! A worker never blocks anywhere but `epoll_pwait2`, whose timeout is the earliest of: the
//! next intended send time (only while a slot is free, so a full pool never spins), the next
//! back-off expiry, the next timeout scan, and the end of the current phase. So every phase ends
//! on time even if the target stops answering.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::cli::{ClosePolicy, Load, Mode, Plan};
use crate::conn::{plain_chunk, Conn, Ctx, Dial, End, Outcome, Role, Stage, BODY_CHUNK, READ_BUF};
use crate::http::{request_head, RequestSpec};
use crate::pacer::Pacer;
use crate::stats::{ErrorKind, IdleStats, Stats};
use crate::sys::{self, CpuTime, Epoll, Ready, EV_CONN};
use crate::tls::{self, TicketStore};

const MS: u64 = 1_000_000;
/// How often deadlines are checked. Timeouts are therefore accurate to this much.
const SCAN_EVERY: u64 = 50 * MS;
/// After a failure, the slot waits this long before it tries again, so a dead target costs a
/// bounded number of attempts per second instead of a busy loop.
const RETRY_DELAY: u64 = 20 * MS;
/// Handshakes a worker keeps in flight while opening its persistent connections.
const SETUP_IN_FLIGHT: u64 = 64;
/// While waiting for the start signal, how often the worker looks for it.
const GO_POLL: u64 = 2 * MS;
/// Timer slack for worker threads: wake-ups within 1 µs of the intended send time.
const TIMER_SLACK_NS: u64 = 1_000;

/// The coordinator's instruction after set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Go {
    /// Open the window: t0 is the common start (monotonic ns); the window proper starts after
    /// `--warmup`.
    Start { t0_ns: u64 },
    /// Give up (a member failed to set up, or a signal arrived).
    Abort,
}

/// Set-up results, reported once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Connections up (persistent and idle modes).
    pub established: u64,
    /// Connections that failed during set-up.
    pub failed: u64,
}

impl ReadyInfo {
    pub fn add(&mut self, o: ReadyInfo) {
        self.established += o.established;
        self.failed += o.failed;
    }
}

/// Why the window ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `--duration` elapsed.
    Duration,
    /// `--requests` were all done.
    Requests,
    /// SIGINT or SIGTERM.
    Signal,
    /// Set-up failed or timed out, or a member was lost.
    Aborted,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Duration => "duration",
            StopReason::Requests => "requests",
            StopReason::Signal => "signal",
            StopReason::Aborted => "aborted",
        }
    }

    /// When members disagree, the report names the most severe reason.
    pub fn severity(self) -> u8 {
        match self {
            StopReason::Duration => 0,
            StopReason::Requests => 1,
            StopReason::Signal => 2,
            StopReason::Aborted => 3,
        }
    }
}

/// What a worker, or a whole child process, hands back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberReport {
    pub stats: Stats,
    /// When the window ended for this member (monotonic ns).
    pub window_end_ns: u64,
    pub stopped_by: StopReason,
    /// Child processes only: their CPU time over the window and over their whole life.
    pub cpu_window: Option<CpuTime>,
    pub cpu_total: Option<CpuTime>,
}

/// Messages from members (threads or child processes) to their coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready(ReadyInfo),
    WindowDone { end_ns: u64 },
    Report(Box<MemberReport>),
}

/// A connection slab with generation-tagged tokens, so a readiness report for a connection
/// that was closed and whose slot was reused in the same batch is recognised as stale.
#[derive(Default)]
struct Slab {
    entries: Vec<(u32, Option<Conn>)>,
    free: Vec<usize>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, conn: Conn) -> (usize, u64) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push((0, None));
                self.entries.len() - 1
            }
        };
        let entry = &mut self.entries[idx];
        entry.0 = entry.0.wrapping_add(1);
        entry.1 = Some(conn);
        self.len += 1;
        (idx, (u64::from(entry.0) << 32) | idx as u64)
    }

    fn get(&mut self, token: u64) -> Option<(usize, &mut Conn)> {
        let idx = (token & 0xffff_ffff) as usize;
        let (gen, conn) = self.entries.get_mut(idx)?;
        if u64::from(*gen) != token >> 32 {
            return None;
        }
        conn.as_mut().map(|c| (idx, c))
    }

    fn at(&mut self, idx: usize) -> Option<&mut Conn> {
        self.entries.get_mut(idx).and_then(|e| e.1.as_mut())
    }

    fn remove(&mut self, idx: usize) -> Option<Conn> {
        let conn = self.entries.get_mut(idx)?.1.take()?;
        self.free.push(idx);
        self.len -= 1;
        Some(conn)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    Waiting,
    Window,
    Drain,
}

pub struct Worker {
    plan: Arc<Plan>,
    /// This worker's index over all processes (g of K).
    g: usize,
    epoll: Epoll,
    ready: Vec<Ready>,
    slab: Slab,
    config: Arc<ClientConfig>,
    ctx: Ctx,
    rbuf: Vec<u8>,
    stop: Arc<AtomicBool>,
    phase: Phase,
    /// Shares of the plan's totals.
    concurrency: u64,
    connections: u64,
    quota: Option<u64>,
    pacer: Option<Pacer>,
    /// Operations in flight (transactions, or requests on persistent/held connections).
    busy: u64,
    /// Transactions (and priming transactions) whose connection is open: bounded so lingering
    /// `AwaitClose` connections cannot exceed the file-descriptor budget.
    transactions_open: u64,
    /// Persistent or held connections open (connecting, handshaking, up).
    persistent_open: u64,
    /// Persistent connections with no request outstanding (slab indices).
    free: Vec<usize>,
    /// Back-off expiry times of failed slots, oldest first.
    retry: VecDeque<u64>,
    /// Measured operations started (checked against `quota`).
    issued: u64,
    /// Connections opened so far (chooses the source address).
    seq: u64,
    next_scan: u64,
    /// Set-up progress: connections opened / resolved (up, parked, done or failed).
    setup_opened: u64,
    setup_resolved: u64,
    setup_failed: u64,
    idle: IdleStats,
    scratch: Vec<usize>,
}

impl Worker {
    pub fn new(plan: Arc<Plan>, g: usize, stop: Arc<AtomicBool>) -> Result<Worker, String> {
        let store: Option<Arc<dyn rustls::client::ClientSessionStore>> = match plan.mode {
            Mode::Resumed => Some(Arc::new(TicketStore::new(4096))),
            _ => None,
        };
        let config = tls::client_config(&plan.tls, store).map_err(|e| e.to_string())?;
        let close_header = plan.mode.per_connection() && plan.close == ClosePolicy::Server;
        let request = request_head(&RequestSpec {
            method: plan.method,
            path: &plan.path,
            host: &plan.host,
            headers: &plan.headers,
            body_len: plan.body_bytes,
            close: close_header,
        });
        let concurrency = plan.share(plan.concurrency, g);
        let connections = plan.share(plan.connections, g);
        let quota = plan.requests.map(|n| plan.share(n, g));
        let epoll = Epoll::new(1024).map_err(|e| format!("epoll_create1: {e}"))?;
        let now = sys::now_ns();
        // Idle mode counts everything from the first connect: the ramp is part of what it
        // measures. Other modes count nothing until the window opens.
        let idle_mode = plan.mode == Mode::Idle;
        let ctx = Ctx {
            now,
            window_start: if idle_mode { 0 } else { u64::MAX },
            window_end: u64::MAX,
            stats: Stats::new(),
            request,
            head_only: plan.head_only(),
            body_bytes: plan.body_bytes,
            body_chunk: (0..BODY_CHUNK).map(|i| b'a' + (i % 26) as u8).collect(),
            close: plan.close,
            timeout_ns: plan.timeout_ns,
            plain: plan.plain,
            message_bytes: plan.message_bytes,
            next_deadline: u64::MAX,
            plain_chunk: if plan.plain {
                plain_chunk()
            } else {
                Vec::new()
            },
        };
        let idle = IdleStats {
            target: if plan.mode == Mode::Idle {
                connections
            } else {
                0
            },
            ..IdleStats::default()
        };
        Ok(Worker {
            g,
            epoll,
            ready: Vec::with_capacity(1024),
            slab: Slab::default(),
            config,
            ctx,
            rbuf: vec![0; READ_BUF],
            stop,
            phase: Phase::Setup,
            concurrency,
            connections,
            quota,
            pacer: None,
            busy: 0,
            transactions_open: 0,
            persistent_open: 0,
            free: Vec::new(),
            retry: VecDeque::new(),
            issued: 0,
            seq: 0,
            next_scan: now + SCAN_EVERY,
            setup_opened: 0,
            setup_resolved: 0,
            setup_failed: 0,
            idle,
            scratch: Vec::new(),
            plan,
        })
    }

    /// Runs the worker to the end, reporting through `send` and taking the start signal from
    /// `go`.
    pub fn run(mut self, mut send: impl FnMut(Event), go: Receiver<Go>) {
        if !self.plan.cpus.is_empty() {
            let id = self.plan.cpus[self.g % self.plan.cpus.len()];
            core_affinity::set_for_current(core_affinity::CoreId { id });
        }
        sys::set_timer_slack_ns(TIMER_SLACK_NS);

        self.setup();
        send(Event::Ready(ReadyInfo {
            established: self.persistent_open,
            failed: self.setup_failed,
        }));
        self.phase = Phase::Waiting;
        let t0 = loop {
            match go.try_recv() {
                Ok(Go::Start { t0_ns }) => break Some(t0_ns),
                Ok(Go::Abort) | Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) => self.turn(Some(GO_POLL)),
            }
        };
        let (end, stopped_by) = match t0 {
            Some(t0) => self.window(t0),
            None => (self.ctx.now, StopReason::Aborted),
        };
        send(Event::WindowDone { end_ns: end });
        self.drain(end);
        self.teardown();
        if self.plan.mode == Mode::Idle {
            self.ctx.stats.idle = Some(self.idle.clone());
        }
        send(Event::Report(Box::new(MemberReport {
            stats: std::mem::take(&mut self.ctx.stats),
            window_end_ns: end,
            stopped_by,
            cpu_window: None,
            cpu_total: None,
        })));
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Opens persistent connections, primes sessions, or ramps idle connections.
    fn setup(&mut self) {
        let start = self.ctx.now;
        let deadline = start.saturating_add(self.plan.ramp_timeout_ns);
        let target = match self.plan.mode {
            Mode::NewConn => return,
            Mode::Resumed => self.plan.prime,
            Mode::Keepalive | Mode::Bulk | Mode::Idle => self.connections,
        };
        let in_flight = match self.plan.mode {
            Mode::Idle => self.concurrency,
            Mode::Resumed => self.concurrency.clamp(1, SETUP_IN_FLIGHT),
            _ => SETUP_IN_FLIGHT,
        };
        if self.plan.mode == Mode::Idle {
            if let Load::Open { rate } = self.plan.load {
                self.pacer = Some(Pacer::new(start, rate, self.g, self.plan.workers()));
            }
        }
        let role = match self.plan.mode {
            Mode::Resumed => Role::Prime,
            Mode::Idle => Role::Held,
            _ => Role::Persistent,
        };
        while self.setup_resolved < target && self.ctx.now < deadline && !self.stopped() {
            let mut wake = deadline;
            while self.setup_opened < target && self.setup_opened - self.setup_resolved < in_flight
            {
                let start = match self.pacer.as_mut() {
                    None => self.ctx.now,
                    Some(p) => match p.take(self.ctx.now) {
                        Some(t) => t,
                        None => {
                            wake = wake.min(p.next_due());
                            break;
                        }
                    },
                };
                self.setup_opened += 1;
                self.open(role, start);
            }
            self.turn(Some(wake.saturating_sub(self.ctx.now).min(SCAN_EVERY)));
        }
        // Whatever has not resolved by the deadline is given up.
        self.scratch.clear();
        for (idx, (_, conn)) in self.slab.entries.iter().enumerate() {
            if let Some(c) = conn {
                // AwaitClose: a primed transaction that only waits for the server's close.
                if !matches!(c.stage, Stage::Idle | Stage::Parked | Stage::AwaitClose) {
                    self.scratch.push(idx);
                }
            }
        }
        for idx in std::mem::take(&mut self.scratch) {
            self.finish(idx, End::Failed(ErrorKind::Timeout));
        }
        self.pacer = None;
        self.idle.ramp_ns = self.ctx.now - start;
    }

    /// Runs the window; returns when it ended and why.
    fn window(&mut self, t0: u64) -> (u64, StopReason) {
        let ws = t0 + self.plan.warmup_ns;
        let we = ws + self.plan.duration_ns;
        self.phase = Phase::Window;
        self.ctx.window_end = we;
        if self.plan.mode != Mode::Idle {
            self.ctx.window_start = ws;
        }
        if let (Load::Open { rate }, false) = (self.plan.load, self.plan.mode == Mode::Idle) {
            self.pacer = Some(Pacer::new(t0, rate, self.g, self.plan.workers()));
        }
        loop {
            let now = self.ctx.now;
            if self.stopped() {
                self.ctx.window_end = now;
                return (now, StopReason::Signal);
            }
            if now >= we {
                return (we, StopReason::Duration);
            }
            if self.quota.is_some_and(|q| self.issued >= q) && self.busy == 0 {
                self.ctx.window_end = now;
                return (now, StopReason::Requests);
            }
            let mut wake = we;
            if now < t0 {
                wake = t0;
            } else {
                wake = wake.min(self.fill());
            }
            self.turn(Some(wake.saturating_sub(now).min(SCAN_EVERY)));
        }
    }

    /// Starts what the load shape allows now; returns when it next could start more without
    /// an event (`u64::MAX`: only an event can change that).
    fn fill(&mut self) -> u64 {
        let mode = self.plan.mode;
        let now = self.ctx.now;
        while self.retry.front().is_some_and(|t| *t <= now) {
            self.retry.pop_front();
        }
        let retry_wake = self.retry.front().copied().unwrap_or(u64::MAX);
        let quota_left = |w: &Worker| w.quota.is_none_or(|q| w.issued < q);
        if mode == Mode::Idle {
            return u64::MAX;
        }
        if mode.persistent() {
            while self.persistent_open + (self.retry.len() as u64) < self.connections {
                self.open(Role::Persistent, now);
                self.ctx.stats.reconnects += u64::from(self.ctx.counting());
            }
        }
        // Lingering transactions (waiting for the server's close) may not use up the fd
        // budget: keep them within 2× the concurrency share.
        let slot_free = |w: &Worker| {
            if mode.per_connection() {
                w.busy + (w.retry.len() as u64) < w.concurrency
                    && w.transactions_open < 2 * w.concurrency + 16
            } else {
                !w.free.is_empty()
            }
        };
        loop {
            if !quota_left(self) || !slot_free(self) {
                return retry_wake;
            }
            let start = match self.pacer.as_mut() {
                None => now,
                Some(p) => match p.take(now) {
                    Some(t) => t,
                    None => return p.next_due().min(retry_wake),
                },
            };
            if self.ctx.measured(start) {
                self.issued += 1;
            }
            if mode.per_connection() {
                self.open(Role::Transaction, start);
            } else {
                let idx = self
                    .free
                    .pop()
                    .expect("slot_free checked a free connection");
                self.start_request(idx, start);
            }
        }
    }

    /// Lets in-flight operations finish for up to `--grace` after the window.
    fn drain(&mut self, end: u64) {
        self.phase = Phase::Drain;
        self.pacer = None;
        let deadline = end.saturating_add(self.plan.grace_ns);
        while self.busy > 0 && self.ctx.now < deadline {
            let wait = deadline.saturating_sub(self.ctx.now).min(SCAN_EVERY);
            self.turn(Some(wait));
        }
        // Abandoned operations: the measured ones are reported, none is an error.
        self.scratch.clear();
        for (idx, (_, conn)) in self.slab.entries.iter().enumerate() {
            if let Some(c) = conn {
                if c.op_active && c.measured {
                    self.ctx.stats.abandoned += 1;
                }
                self.scratch.push(idx);
            }
        }
    }

    /// Closes everything left (the indices `drain` collected).
    fn teardown(&mut self) {
        if self.plan.mode == Mode::Idle {
            self.idle.up_at_end = self
                .slab
                .entries
                .iter()
                .filter(|(_, c)| c.as_ref().is_some_and(|c| c.stage == Stage::Parked))
                .count() as u64;
        }
        for idx in std::mem::take(&mut self.scratch) {
            if let Some(mut conn) = self.slab.remove(idx) {
                conn.close_politely();
            }
        }
    }

    /// One loop turn: wait, dispatch readiness, check deadlines.
    fn turn(&mut self, timeout_ns: Option<u64>) {
        let mut ready = std::mem::take(&mut self.ready);
        if let Err(e) = self.epoll.wait(&mut ready, timeout_ns) {
            // Not expected (EBADF/EFAULT/EINVAL are bugs); do not spin on it.
            eprintln!("tern-load: epoll_pwait2: {e}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for r in &ready {
            self.ctx.now = sys::now_ns();
            let Some((idx, conn)) = self.slab.get(r.token) else {
                continue;
            };
            let out = conn.on_ready(r.events, &mut self.ctx, &mut self.rbuf);
            self.apply(idx, out);
        }
        self.ready = ready;
        self.ctx.now = sys::now_ns();
        if self.ctx.now >= self.next_scan {
            self.next_scan = self.ctx.now + SCAN_EVERY;
            self.scan_timeouts();
        }
    }

    /// Ends the connections whose deadline passed. The walk is over every connection, so it
    /// only happens once the earliest deadline ([`Ctx::next_deadline`]) has passed: holding
    /// idle connections (no deadline) costs no walk at all.
    fn scan_timeouts(&mut self) {
        let now = self.ctx.now;
        // Connections ended below may re-arm (through `Ctx::arm`), lowering the bound again.
        expired(
            &self.slab.entries,
            |c| c.deadline,
            now,
            &mut self.ctx.next_deadline,
            &mut self.scratch,
        );
        for idx in std::mem::take(&mut self.scratch) {
            let lingering = self
                .slab
                .at(idx)
                .is_some_and(|c| c.stage == Stage::AwaitClose);
            // A transaction whose response is complete is not failed by a slow close, but it
            // is counted: a server that does not close skews new-conn figures.
            let end = if lingering {
                if self.ctx.counting() {
                    self.ctx.stats.close_timeouts += 1;
                }
                End::Clean
            } else {
                End::Failed(ErrorKind::Timeout)
            };
            self.finish(idx, end);
        }
    }

    fn dial_source(&mut self) -> Option<IpAddr> {
        let ips = &self.plan.source_ips;
        if ips.is_empty() {
            return None;
        }
        let k = self.plan.workers() as u64;
        let n = self.g as u64 + self.seq * k;
        self.seq += 1;
        Some(ips[(n % ips.len() as u64) as usize])
    }

    /// Opens a connection for `role` whose latency starts at `start`.
    fn open(&mut self, role: Role, start: u64) {
        let source = self.dial_source();
        let dial = Dial {
            target: self.plan.target,
            source,
            config: &self.config,
            name: &self.plan.server_name,
        };
        let gets = if role == Role::Held {
            self.plan.idle_requests
        } else {
            0
        };
        let measured = role != Role::Prime && self.ctx.measured(start);
        match Conn::open(role, &dial, start, &self.ctx, gets) {
            Ok(conn) => {
                self.ctx.arm(conn.deadline);
                let fd = conn.stream.as_raw_fd();
                let (idx, token) = self.slab.insert(conn);
                if self.ctx.counting() {
                    self.ctx.stats.connections_opened += 1;
                }
                match role {
                    Role::Transaction | Role::Prime => {
                        self.busy += u64::from(role == Role::Transaction);
                        self.transactions_open += 1;
                    }
                    Role::Persistent | Role::Held => self.persistent_open += 1,
                }
                if self.epoll.add(fd, token, EV_CONN).is_err() {
                    self.finish(idx, End::Failed(ErrorKind::Io));
                }
            }
            Err(kind) => {
                let in_setup = self.phase == Phase::Setup;
                if measured || self.ctx.counting() || in_setup {
                    self.ctx.stats.errors.add(kind);
                }
                if in_setup {
                    // Resolved at once, or set-up would wait for it until --ramp-timeout.
                    self.setup_resolved += 1;
                    self.setup_failed += 1;
                    if role == Role::Held {
                        self.idle.failed += 1;
                    }
                }
                self.after_failure(role);
            }
        }
    }

    fn start_request(&mut self, idx: usize, start: u64) {
        let Some(conn) = self.slab.at(idx) else {
            return;
        };
        let mut out = Outcome::default();
        let result = conn.start_request(&mut self.ctx, start, &mut out);
        // Counted once the operation is really in flight, so `finish` can take it back.
        if conn.op_active {
            self.busy += 1;
        }
        if let Err(kind) = result {
            out.end = Some(End::Failed(kind));
        }
        self.apply(idx, out);
    }

    /// Acts on what a connection reported.
    fn apply(&mut self, idx: usize, out: Outcome) {
        let Some(conn) = self.slab.at(idx) else {
            return;
        };
        let role = conn.role;
        if out.op_done && matches!(role, Role::Transaction | Role::Persistent) {
            self.busy -= 1;
        }
        if out.op_done && role == Role::Prime {
            self.setup_resolved += 1;
        }
        if out.ready {
            if self.phase == Phase::Setup {
                self.setup_resolved += 1;
            }
            self.free.push(idx);
        }
        if out.parked {
            self.setup_resolved += 1;
            self.idle.established += 1;
        }
        if let Some(end) = out.end {
            self.finish(idx, end);
        }
    }

    /// Removes and closes connection `idx`, accounting for how it ended.
    fn finish(&mut self, idx: usize, end: End) {
        let Some(conn) = self.slab.remove(idx) else {
            return;
        };
        let (role, stage) = (conn.role, conn.stage);
        if conn.op_active && matches!(role, Role::Transaction | Role::Persistent) {
            self.busy -= 1;
        }
        match role {
            Role::Transaction | Role::Prime => self.transactions_open -= 1,
            Role::Persistent | Role::Held => {
                self.persistent_open -= 1;
                if let Some(pos) = self.free.iter().position(|&i| i == idx) {
                    self.free.swap_remove(pos);
                }
            }
        }
        let in_setup = self.phase == Phase::Setup;
        match end {
            End::Failed(kind) => {
                if conn.measured || self.ctx.counting() || in_setup {
                    self.ctx.stats.errors.add(kind);
                }
                // Whether this connection still counted as "not yet up" for set-up.
                let unresolved = match role {
                    Role::Prime => conn.op_active,
                    Role::Held => stage != Stage::Parked,
                    Role::Persistent => matches!(stage, Stage::Connecting | Stage::Handshaking),
                    Role::Transaction => false,
                };
                if in_setup && unresolved {
                    self.setup_resolved += 1;
                    self.setup_failed += 1;
                    if role == Role::Held {
                        self.idle.failed += 1;
                    }
                } else if role == Role::Held && stage == Stage::Parked {
                    self.idle.closed_during_hold += 1;
                } else if role == Role::Held && unresolved {
                    self.idle.failed += 1;
                }
                self.after_failure(role);
            }
            End::PeerClosed => match role {
                Role::Persistent => {
                    if self.ctx.counting() {
                        self.ctx.stats.closed_by_peer += 1;
                    }
                }
                Role::Held => {
                    self.idle.closed_during_hold += 1;
                    if self.ctx.counting() {
                        self.ctx.stats.closed_by_peer += 1;
                    }
                }
                Role::Transaction | Role::Prime => {}
            },
            End::Clean => {
                if role == Role::Transaction && self.ctx.close == ClosePolicy::Reset {
                    let _ = sys::set_linger_zero(&conn.stream);
                }
            }
        }
        // Dropping the stream closes the socket, which also removes it from the epoll set.
        drop(conn);
    }

    /// Back-off bookkeeping after a failure of a closed-loop slot or a persistent connection.
    fn after_failure(&mut self, role: Role) {
        let closed_loop_slot = role == Role::Transaction && self.plan.load == Load::Closed;
        let persistent = role == Role::Persistent && self.phase != Phase::Setup;
        if closed_loop_slot || persistent {
            self.retry.push_back(self.ctx.now + RETRY_DELAY);
        }
    }
}

/// Puts the indices of the `entries` whose deadline is at or before `now` into `out` (cleared
/// first). A walk of every entry, so it happens only once `*next` (a lower bound of every
/// deadline) has passed, and then sets `*next` to the earliest deadline left. Returns the
/// entries walked (0 when skipped).
fn expired<T>(
    entries: &[(u32, Option<T>)],
    deadline: impl Fn(&T) -> u64,
    now: u64,
    next: &mut u64,
    out: &mut Vec<usize>,
) -> usize {
    out.clear();
    if now < *next {
        return 0;
    }
    let mut earliest = u64::MAX;
    for (idx, (_, entry)) in entries.iter().enumerate() {
        match entry.as_ref().map(&deadline) {
            Some(d) if d <= now => out.push(idx),
            Some(d) => earliest = earliest.min(d),
            None => {}
        }
    }
    *next = earliest;
    entries.len()
}

#[cfg(test)]
mod tests {
    use super::expired;

    /// A million held entries without a deadline: one walk finds none due, and from then on
    /// no scan walks anything until an entry is armed.
    #[test]
    fn held_entries_without_deadline_are_not_walked() {
        let mut entries: Vec<(u32, Option<u64>)> = vec![(0, Some(u64::MAX)); 1_000_000];
        entries.push((0, None));
        let mut next = 0;
        let mut out = Vec::new();
        assert_eq!(
            expired(&entries, |d| *d, 10, &mut next, &mut out),
            entries.len()
        );
        assert!(out.is_empty());
        assert_eq!(next, u64::MAX);
        for now in (60..10_000).step_by(50) {
            assert_eq!(expired(&entries, |d| *d, now, &mut next, &mut out), 0);
        }
        // One entry armed (as `Ctx::arm` lowers the bound): walked only once it is due.
        entries[7].1 = Some(20_000);
        next = next.min(20_000);
        assert_eq!(expired(&entries, |d| *d, 19_999, &mut next, &mut out), 0);
        assert_eq!(
            expired(&entries, |d| *d, 20_000, &mut next, &mut out),
            entries.len()
        );
        assert_eq!(out, vec![7]);
    }

    /// Entries not yet due set the bound to the earliest of them.
    #[test]
    fn the_bound_is_the_earliest_deadline_left() {
        let entries = vec![(0, Some(300)), (0, None), (0, Some(100)), (0, Some(200))];
        let mut next = 0;
        let mut out = Vec::new();
        expired(&entries, |d: &u64| *d, 150, &mut next, &mut out);
        assert_eq!(out, vec![2]);
        assert_eq!(next, 200);
    }
}
