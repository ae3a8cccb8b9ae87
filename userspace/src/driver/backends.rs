//! Per-worker rules shared by every connection: which backend server a new connection goes to
//! ([`Backends`]: weighted round-robin or least-connections, failover, passive and active
//! health, rate-limited warnings) and how many connections one source address may hold
//! ([`SourceLimits`]).
//!
//! Health (`[backend.health]`): a server is up or down. `fall` consecutive failed connects
//! (a client's or a probe's: refused, unreachable, timed out) mark it down; `rise` consecutive
//! successful ones mark it up again. With active probing (`interval_ms` > 0) the worker
//! connects to every server that is up once per interval (and closes at once) and learns of a
//! dead server without sacrificing a client's connect. A down server is probed after a back-off
//! that starts at the interval (1 s with active probing off) and doubles with each further
//! failed probe up to [`DOWN_MAX`] (or the interval, if longer). A server added at start-up or
//! by a reload starts up: probes (the first one on the next tick) or the first client connect
//! correct that within one interval.
//!
//! New connections go only to servers that are up. When every server is down a connection's
//! backend leg fails at once, without a connect (the client gets close_notify and FIN), it is
//! counted in `backend_all_down`, and a warning says so at most once per interval. Failover
//! within a connection moves forward from the server it tried first, to up servers only, and
//! never comes back to one it tried.
//!
//! Each worker keeps its own view (shared nothing) and publishes it for the control thread
//! through [`super::board`]. [`Backends::reconfigure`] takes a new server list (hot reload)
//! without disturbing connections already on their way.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::Arc;

use super::board::{self, Board, Published, ServerStats};
use super::sock::{self, Io};
use crate::config::{BackendServer, Balance, HealthCheck};
use crate::counters::WorkerCounters;
use crate::sys::uring::Op;
use crate::tcp::time::{Duration, Instant};

/// First back-off of a down server when active probing is off; doubles per failed probe.
const PASSIVE_FIRST: Duration = Duration::from_secs(1);
/// Longest back-off (unless the probe interval is longer).
pub const DOWN_MAX: Duration = Duration::from_secs(30);
/// Warnings about backends: at most one per this interval per worker (or per probe interval,
/// if longer), with a count of those not logged.
const WARN_EVERY: Duration = Duration::from_secs(1);
/// Back-off doublings stop here (2^16 intervals is far beyond any maximum).
const MAX_SHIFT: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    Down,
}

/// One server of the pool as this worker sees it.
#[derive(Debug)]
struct Slot {
    addr: SocketAddr,
    weight: u32,
    /// Smooth weighted round-robin's running score: raised by `weight` at every pick among
    /// the up servers, lowered by their total weight when this one is picked. Σ over the up
    /// servers stays 0, which is what spreads each server's picks evenly over a cycle.
    current: i64,
    state: State,
    /// Removed by [`Backends::reconfigure`]: never picked or probed again; its index stays
    /// valid for the connections that hold it, and the slot is reused by a later addition
    /// once none does ([`Slot::reusable`]).
    retired: bool,
    /// Consecutive failed connects (clients' and probes'); reset by a success.
    failures: u32,
    /// Consecutive successful connects while down; reset by a failure.
    successes: u32,
    /// When the next probe is due; `None`: none planned (up with active probing off, retired,
    /// or a probe in flight, whose completion plans the next).
    next_probe: Option<Instant>,
    probe: Option<Probe>,
    /// This worker's connections that hold this server ([`Backends::pick`] and
    /// [`Backends::failover`] take one, [`Backends::release`] gives it back).
    active: u32,
    /// Last time a connection gave it back (or it was retired): a late completion of a
    /// connection's connect can arrive up to a connect timeout after that, so a retired slot
    /// is not reused before.
    quiet_since: Instant,
    stats: Arc<ServerStats>,
}

impl Slot {
    fn new(s: BackendServer, first_probe: Option<Instant>, now: Instant) -> Slot {
        Slot {
            addr: s.address,
            weight: s.weight,
            current: 0,
            state: State::Up,
            retired: false,
            failures: 0,
            successes: 0,
            next_probe: first_probe,
            probe: None,
            active: 0,
            quiet_since: now,
            stats: Arc::new(ServerStats::new(s.address, s.weight)),
        }
    }

    fn eligible(&self) -> bool {
        !self.retired && self.state == State::Up
    }

    fn reusable(&self, now: Instant, connect_timeout: Duration) -> bool {
        self.retired
            && self.active == 0
            && self.probe.is_none()
            && now >= self.quiet_since + connect_timeout
    }
}

/// A worker's own connect to a server, to learn whether it takes connections.
#[derive(Debug)]
struct Probe {
    fd: RawFd,
    /// The connect's address and timeout; boxed so they stay put until the kernel has read
    /// them (at the next submit).
    target: Box<(socket2::SockAddr, io_uring::types::Timespec)>,
    /// The connect and its linked timeout, until both completed.
    in_flight: u32,
}

/// At most one message per period; counts the ones held back.
#[derive(Debug, Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(held back since the last one)` when a message may go out now.
    fn allow(&mut self, now: Instant, every: Duration) -> Option<u64> {
        match self.last {
            Some(t) if now < t + every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The backend servers of one worker. See the module documentation.
pub struct Backends {
    /// Never empty. Indices are stable: a connection names its server by index.
    slots: Vec<Slot>,
    balance: Balance,
    health: HealthCheck,
    /// `backend.connect_timeout_ms` (see [`Slot::quiet_since`]).
    connect_timeout: Duration,
    /// Where smooth weighted round-robin starts scanning for ties: workers start at different
    /// servers, so their first connections do not all go to the first one.
    offset: usize,
    /// Round-robin position of least-connections' tie-break.
    next: usize,
    /// The latest `now` any call brought (for [`Backends::release`], which has none).
    clock: Instant,
    worker: usize,
    warn: RateLimit,
    all_down: RateLimit,
    published: Arc<Published>,
}

impl Backends {
    /// A pool of `servers` with weight 1, round-robin, passive health only (tests, fuzzing).
    pub fn new(servers: Vec<SocketAddr>, worker: usize) -> Backends {
        let config = crate::config::Backend {
            servers: servers
                .into_iter()
                .map(|address| BackendServer { address, weight: 1 })
                .collect(),
            connect_timeout: std::time::Duration::from_secs(3),
            connect: crate::config::ConnectPolicy::FirstByte,
            proxy_protocol: crate::config::ProxyProtocol::None,
            balance: Balance::RoundRobin,
            health: HealthCheck {
                interval: None,
                timeout: std::time::Duration::from_secs(3),
                fall: 1,
                rise: 1,
            },
        };
        Backends::from_config(&config, worker, &Board::default())
    }

    /// The pool of `config` (never empty: validated), published on `board`.
    pub fn from_config(config: &crate::config::Backend, worker: usize, board: &Board) -> Backends {
        assert!(!config.servers.is_empty(), "a backend pool is never empty");
        let health = config.health;
        let first_probe = health.interval.map(|_| Instant::ZERO);
        let slots: Vec<Slot> = config
            .servers
            .iter()
            .map(|&s| Slot::new(s, first_probe, Instant::ZERO))
            .collect();
        let b = Backends {
            offset: worker % slots.len(),
            next: worker % slots.len(),
            slots,
            balance: config.balance,
            health,
            connect_timeout: config.connect_timeout.into(),
            clock: Instant::ZERO,
            worker,
            warn: RateLimit::default(),
            all_down: RateLimit::default(),
            published: Arc::new(Published::default()),
        };
        b.publish();
        board.register(b.published.clone());
        b
    }

    fn publish(&self) {
        self.published
            .publish(self.slots.iter().map(|s| s.stats.clone()).collect());
    }

    /// The address of `server` (an index a connection holds: always valid, retired or not).
    pub fn addr(&self, server: usize) -> SocketAddr {
        let n = self.slots.len();
        self.slots[server % n].addr
    }

    /// Slots, retired ones included (indices run below this).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn tick(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
    }

    /// The probe interval, if active probing is on.
    fn interval(&self) -> Option<Duration> {
        self.health.interval.map(Duration::from)
    }

    /// The period of warnings: the probe interval, at least [`WARN_EVERY`].
    fn warn_every(&self) -> Duration {
        self.interval().map_or(WARN_EVERY, |i| i.max(WARN_EVERY))
    }

    /// The server for a new connection, or `None` when every server is down (counted in
    /// `backend_all_down` and warned about; the caller fails the backend leg without a
    /// connect). The connection holds the server until it gives it back with
    /// [`Backends::release`].
    pub fn pick(&mut self, now: Instant, counters: &WorkerCounters) -> Option<usize> {
        self.tick(now);
        let down = self
            .slots
            .iter()
            .filter(|s| !s.retired && s.state == State::Down)
            .count();
        counters.backend_skipped_down.add(down as u64);
        let chosen = match self.balance {
            Balance::RoundRobin => self.pick_weighted(),
            Balance::LeastConnections => self.pick_least(),
        };
        match chosen {
            Some(s) => {
                self.acquire(s);
                Some(s)
            }
            None => {
                counters.backend_all_down.inc();
                if let Some(suppressed) = self.all_down.allow(now, self.warn_every()) {
                    tracing::warn!(
                        worker = self.worker,
                        servers = self.slots.iter().filter(|s| !s.retired).count(),
                        suppressed,
                        "every backend server is down: new connections are closed at once"
                    );
                }
                None
            }
        }
    }

    /// Smooth weighted round-robin (nginx's `ngx_http_upstream_get_peer`) over the up servers.
    fn pick_weighted(&mut self) -> Option<usize> {
        let n = self.slots.len();
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for i in 0..n {
            let s = (self.offset + i) % n;
            let slot = &mut self.slots[s];
            if !slot.eligible() {
                continue;
            }
            slot.current += i64::from(slot.weight);
            total += i64::from(slot.weight);
            if best.is_none_or(|(_, c)| slot.current > c) {
                best = Some((s, slot.current));
            }
        }
        let (s, _) = best?;
        self.slots[s].current -= total;
        Some(s)
    }

    /// The up server with the fewest of this worker's connections per unit of weight; ties go
    /// to the first from the round-robin position, which then moves past it.
    fn pick_least(&mut self) -> Option<usize> {
        let n = self.slots.len();
        let start = self.next % n;
        let mut best: Option<usize> = None;
        for i in 0..n {
            let s = (start + i) % n;
            let slot = &self.slots[s];
            if !slot.eligible() {
                continue;
            }
            // a.active / a.weight < b.active / b.weight, without division.
            let fewer = |b: &Slot| {
                u64::from(slot.active) * u64::from(b.weight)
                    < u64::from(b.active) * u64::from(slot.weight)
            };
            if best.is_none_or(|b| fewer(&self.slots[b])) {
                best = Some(s);
            }
        }
        let s = best?;
        self.next = s + 1;
        Some(s)
    }

    /// The server to try after `failed` for a connection that tried `first` first, or `None`
    /// when no up server is left for it. The caller has given `failed` back
    /// ([`Backends::release`]); the connection holds the one returned.
    ///
    /// A connection's attempts move forward in slot order from `first` and end before coming
    /// back to it, so no server is tried twice: the candidates are the servers after `failed`
    /// and before `first`, and the first of them that is up is tried. Down ones passed over
    /// are counted and not come back to.
    pub fn failover(
        &mut self,
        failed: usize,
        first: usize,
        now: Instant,
        counters: &WorkerCounters,
    ) -> Option<usize> {
        self.tick(now);
        let n = self.slots.len();
        let start = (failed + 1) % n;
        let left = (first % n + n - start) % n;
        for i in 0..left {
            let s = (start + i) % n;
            if self.slots[s].eligible() {
                self.acquire(s);
                return Some(s);
            }
            if !self.slots[s].retired {
                counters.backend_skipped_down.inc();
            }
        }
        None
    }

    fn acquire(&mut self, server: usize) {
        let slot = &mut self.slots[server];
        slot.active += 1;
        slot.stats.active.set(u64::from(slot.active));
    }

    /// A connection no longer holds `server` (it ended, or its connect failed and it moves
    /// on). Called exactly once per [`Backends::pick`] or successful [`Backends::failover`].
    pub fn release(&mut self, server: usize) {
        let clock = self.clock;
        let Some(slot) = self.slots.get_mut(server) else {
            return;
        };
        slot.active = slot.active.saturating_sub(1);
        slot.stats.active.set(u64::from(slot.active));
        slot.quiet_since = clock;
    }

    /// A client's connect to `server` succeeded.
    pub fn up(&mut self, server: usize, now: Instant) {
        self.tick(now);
        if let Some(slot) = self.slots.get(server) {
            slot.stats.connects.inc();
        }
        self.success(server, now);
    }

    /// A client's connect to `server` failed.
    pub fn down(&mut self, server: usize, timed_out: bool, errno: i32, now: Instant) {
        self.tick(now);
        if let Some(slot) = self.slots.get(server) {
            if timed_out {
                slot.stats.connect_timeouts.inc();
            } else {
                slot.stats.connect_errors.inc();
            }
        }
        self.failure(server, timed_out, errno, now);
    }

    fn success(&mut self, server: usize, now: Instant) {
        let (rise, interval) = (self.health.rise, self.interval());
        let Some(slot) = self.slots.get_mut(server) else {
            return;
        };
        if slot.retired {
            return;
        }
        slot.failures = 0;
        slot.stats.consecutive_failures.set(0);
        if slot.state == State::Down {
            slot.successes = slot.successes.saturating_add(1);
            if slot.successes >= rise {
                slot.state = State::Up;
                slot.current = 0;
                slot.stats.state.set(board::STATE_UP);
                slot.stats.last_change_unix_ms.set(board::unix_ms());
                slot.next_probe = interval.map(|i| now + i);
                tracing::info!(worker = self.worker, server = %slot.addr, "backend server is up again");
            } else {
                // Not yet `rise` in a row: the next probe comes soon, without back-off.
                slot.next_probe = Some(now + interval.unwrap_or(PASSIVE_FIRST));
            }
        }
    }

    fn failure(&mut self, server: usize, timed_out: bool, errno: i32, now: Instant) {
        let (fall, every) = (self.health.fall, self.warn_every());
        let first = self.interval().unwrap_or(PASSIVE_FIRST);
        let Some(slot) = self.slots.get_mut(server) else {
            return;
        };
        if slot.retired {
            return;
        }
        slot.successes = 0;
        slot.failures = slot.failures.saturating_add(1);
        slot.stats
            .consecutive_failures
            .set(u64::from(slot.failures));
        if slot.state == State::Up && slot.failures < fall {
            return;
        }
        let marked = slot.state == State::Up;
        if marked {
            slot.state = State::Down;
            slot.current = 0;
            slot.stats.state.set(board::STATE_DOWN);
            slot.stats.last_change_unix_ms.set(board::unix_ms());
        }
        // The back-off doubles with each failure after the one that marked it down.
        let backoff = first
            .saturating_shl(slot.failures.saturating_sub(fall).min(MAX_SHIFT))
            .min(DOWN_MAX.max(first));
        // Planned even with a probe in flight: [`Backends::probe`] starts none while one is.
        slot.next_probe = Some(now + backoff);
        let (addr, failures) = (slot.addr, slot.failures);
        if !marked {
            return;
        }
        if let Some(suppressed) = self.warn.allow(now, every) {
            let error = if timed_out {
                "connect timed out".to_owned()
            } else {
                std::io::Error::from_raw_os_error(errno).to_string()
            };
            tracing::warn!(
                worker = self.worker,
                server = %addr,
                %error,
                consecutive_failures = failures,
                probe_in_ms = backoff.as_millis(),
                suppressed,
                "backend server down"
            );
        }
    }

    /// Starts a probe connect to every server whose probe is due (see the module
    /// documentation) and that has none in flight. Called by the worker with its
    /// housekeeping (every tick, ~100 ms).
    pub fn probe(&mut self, io: &mut Io, now: Instant) {
        self.tick(now);
        let timeout = self.health.timeout;
        for server in 0..self.slots.len() {
            let slot = &mut self.slots[server];
            if slot.retired || slot.probe.is_some() || slot.next_probe.is_none_or(|t| now < t) {
                continue;
            }
            slot.next_probe = None;
            let addr = slot.addr;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM.cloexec(),
                None,
            );
            let Ok(socket) = socket else {
                // No socket now (e.g. out of fds): a failed probe, retried later.
                self.probe_done(server, Err((false, libc::EMFILE)), now);
                continue;
            };
            let probe = slot.probe.insert(Probe {
                fd: socket.into_raw_fd(),
                target: Box::new((
                    socket2::SockAddr::from(addr),
                    io_uring::types::Timespec::new()
                        .sec(timeout.as_secs())
                        .nsec(timeout.subsec_nanos()),
                )),
                in_flight: 2,
            });
            let key = super::Key {
                index: server as u32,
                gen: 0,
            };
            sock::connect_linked_timeout(
                io,
                probe.fd,
                &probe.target.0,
                &probe.target.1,
                (Op::Probe, Op::ProbeTimeout),
                key,
            );
        }
    }

    /// The completion of a probe's connect (`Op::Probe`) or its timeout for `server`.
    pub fn probe_complete(&mut self, server: usize, op: Op, res: i32, now: Instant) {
        self.tick(now);
        let Some(probe) = self.slots.get_mut(server).and_then(|h| h.probe.as_mut()) else {
            return;
        };
        probe.in_flight = probe.in_flight.saturating_sub(1);
        if probe.in_flight == 0 {
            if let Some(p) = self.slots[server].probe.take() {
                // SAFETY: the probe's socket, closed once: both its operations completed.
                unsafe { libc::close(p.fd) };
            }
        }
        if op == Op::Probe {
            let result = if res == 0 {
                Ok(())
            } else {
                Err((res == -libc::ECANCELED, -res))
            };
            self.probe_done(server, result, now);
        }
    }

    /// A probe's result: counted, and the server's next probe planned.
    fn probe_done(&mut self, server: usize, result: Result<(), (bool, i32)>, now: Instant) {
        let Some(slot) = self.slots.get(server) else {
            return;
        };
        if slot.retired {
            return;
        }
        match result {
            Ok(()) => {
                slot.stats.probes_ok.inc();
                self.success(server, now);
            }
            Err((timed_out, errno)) => {
                slot.stats.probes_failed.inc();
                self.failure(server, timed_out, errno, now);
            }
        }
        let interval = self.interval();
        let slot = &mut self.slots[server];
        if slot.state == State::Up && slot.next_probe.is_none() {
            slot.next_probe = interval.map(|i| now + i);
        }
    }

    /// No server could be reached for a client, or its backend broke.
    pub fn warn_failure(&mut self, client: SocketAddr, now: Instant) {
        let every = self.warn_every();
        if let Some(suppressed) = self.warn.allow(now, every) {
            tracing::warn!(
                worker = self.worker,
                %client,
                suppressed,
                "backend unreachable or failed: closing the client connection"
            );
        }
    }

    /// Takes a new configuration of the pool (a reload): servers whose address stays keep
    /// their index, health and counters (their weight is updated); removed ones are retired
    /// (never picked or probed again, still addressable by the connections that hold them);
    /// added ones start up, in a retired slot nobody holds any more or in a new one, so that
    /// repeated reloads keep the pool bounded. The balance and health settings are taken too.
    pub fn reconfigure(&mut self, new: &crate::config::Backend, now: Instant) {
        self.tick(now);
        self.balance = new.balance;
        self.health = new.health;
        self.connect_timeout = new.connect_timeout.into();
        let interval = self.interval();
        for slot in &mut self.slots {
            let kept = new.servers.iter().find(|s| s.address == slot.addr);
            match kept {
                Some(s) => {
                    // Kept (or back after a removal whose slot was still held).
                    if slot.retired {
                        slot.retired = false;
                        slot.state = State::Up;
                        slot.failures = 0;
                        slot.successes = 0;
                        slot.stats.state.set(board::STATE_UP);
                        slot.stats.consecutive_failures.set(0);
                    }
                    slot.weight = s.weight;
                    slot.stats.weight.set(u64::from(s.weight));
                    if slot.probe.is_none() {
                        slot.next_probe = match slot.state {
                            State::Up => interval.map(|_| now),
                            State::Down => slot.next_probe.or(Some(now)),
                        };
                    }
                }
                None if !slot.retired => {
                    slot.retired = true;
                    slot.next_probe = None;
                    slot.quiet_since = now;
                    slot.stats.state.set(board::STATE_RETIRED);
                }
                None => {}
            }
            slot.current = 0;
        }
        for &s in &new.servers {
            if self.slots.iter().any(|o| o.addr == s.address) {
                continue;
            }
            let slot = Slot::new(s, interval.map(|_| now), now);
            let connect_timeout = self.connect_timeout;
            match self
                .slots
                .iter()
                .position(|o| o.reusable(now, connect_timeout))
            {
                Some(i) => self.slots[i] = slot,
                None => self.slots.push(slot),
            }
        }
        // Trailing slots nobody can name any more go, so the pool shrinks back after removals.
        while self.slots.len() > 1
            && self
                .slots
                .last()
                .is_some_and(|s| s.reusable(now, self.connect_timeout))
        {
            self.slots.pop();
        }
        self.offset %= self.slots.len();
        self.publish();
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(p) = s.probe.take() {
                // SAFETY: the probe's socket, closed once. The ring is gone by now (it is
                // dropped first), so nothing in flight names it.
                unsafe { libc::close(p.fd) };
            }
        }
    }
}

/// Connections per source address, per worker (`limits.max_connections_per_source`; 0: no
/// limit). A source at its limit has its next connection refused (RST) and counted. Places are
/// counted also without a limit, so that a reload can set one that holds at once.
pub struct SourceLimits {
    limit: u32,
    open: HashMap<IpAddr, u32>,
}

impl SourceLimits {
    pub fn new(limit: usize) -> SourceLimits {
        SourceLimits {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            open: HashMap::new(),
        }
    }

    /// A new limit (a reload); 0: none. Connections over it are not cut; new ones from that
    /// source are refused until it is back under.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = u32::try_from(limit).unwrap_or(u32::MAX);
    }

    /// Takes a place for a connection from `ip`; false (nothing taken) when it is at its limit.
    pub fn acquire(&mut self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket is the same source as over IPv4.
        let n = self.open.entry(ip.to_canonical()).or_insert(0);
        if self.limit != 0 && *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a place taken by [`SourceLimits::acquire`].
    pub fn release(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// Sources holding connections now.
    pub fn sources(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests;
