//! Per-worker rules shared by every connection: which backend server a new connection goes to
//! ([`Backends`]: round-robin, failover, passive health, rate-limited warnings) and how many
//! connections one source address may hold ([`SourceLimits`]).
//!
//! Passive health: a server whose connect fails (refused, unreachable, timed out) is marked
//! down. New connections skip a down server while another is up, so no connection waits
//! `backend.connect_timeout_ms` behind a server already known to be down. A down server is
//! not retried with a client's connection: once its back-off has passed (1 s, doubling with
//! each consecutive failure up to 30 s) the worker probes it with a connect of its own
//! ([`Backends::probe`], closed at once), and a probe or any connect that succeeds marks it up.
//! When every server is down, a client's connection still tries the one whose back-off ends
//! first (it has no better chance). Each worker keeps its own view (shared nothing); a server
//! down for one worker is learnt by the others on their own first failure.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{IntoRawFd, RawFd};

use super::sock::{self, Io};
use crate::counters::WorkerCounters;
use crate::sys::uring::Op;
use crate::tcp::time::{Duration, Instant};

/// First back-off after a failure; doubles per consecutive failure.
const DOWN_FIRST: Duration = Duration::from_secs(1);
/// Longest back-off.
const DOWN_MAX: Duration = Duration::from_secs(30);
/// Warnings about backends: at most one per this interval per worker, with a count of those
/// not logged.
const WARN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Health {
    /// Consecutive failed connects (probes included).
    failures: u32,
    /// `Some`: the server is down (skipped by new connections while another is up) and may be
    /// probed from then on.
    down_until: Option<Instant>,
    /// A probe connect in flight.
    probe: Option<Probe>,
    /// Removed by a reload: never picked again; its index stays valid for the connections
    /// that use it.
    retired: bool,
}

/// A worker's own connect to a down server, to learn whether it is back.
#[derive(Debug)]
struct Probe {
    fd: RawFd,
    /// The connect's address; boxed so it stays put until the kernel has read it.
    addr: Box<socket2::SockAddr>,
    /// The connect and its linked timeout, until both completed.
    in_flight: u32,
}

/// The backend servers of one worker. See the module documentation.
pub struct Backends {
    servers: Vec<SocketAddr>,
    health: Vec<Health>,
    /// Round-robin position.
    next: usize,
    worker: usize,
    last_warn: Option<Instant>,
    warns_suppressed: u64,
}

impl Backends {
    /// `servers` is never empty (validated configuration). Workers start at different
    /// positions so that their first connections do not all go to the first server.
    pub fn new(servers: Vec<SocketAddr>, worker: usize) -> Backends {
        assert!(!servers.is_empty(), "a backend pool is never empty");
        Backends {
            health: servers.iter().map(|_| Health::default()).collect(),
            next: worker % servers.len(),
            servers,
            worker,
            last_warn: None,
            warns_suppressed: 0,
        }
    }

    pub fn addr(&self, server: usize) -> SocketAddr {
        self.servers[server % self.servers.len()]
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    fn is_down(&self, server: usize, _now: Instant) -> bool {
        self.health[server].down_until.is_some()
    }

    /// The server for a new connection: the next one round-robin that is not down.
    pub fn pick(&mut self, now: Instant, counters: &WorkerCounters) -> usize {
        let n = self.servers.len();
        let start = self.next % n;
        self.next = self.next.wrapping_add(1);
        self.first_up(start, n, now, counters)
            .unwrap_or_else(|| self.soonest_back(start))
    }

    /// The server to try after `failed` for a connection that tried `first` first, or `None`
    /// when none is left.
    ///
    /// A connection's attempts move forward in round-robin order from `first` and end before
    /// coming back to it, so no server is tried twice: the candidates are the servers after
    /// `failed` and before `first`. The first of them that is not down is tried; when all of
    /// them are down, the next one is tried anyway (the client has no other chance). A down
    /// server passed over for a later one is not come back to by this connection.
    pub fn failover(
        &mut self,
        failed: usize,
        first: usize,
        now: Instant,
        counters: &WorkerCounters,
    ) -> Option<usize> {
        let n = self.servers.len();
        let start = (failed + 1) % n;
        let left = (first % n + n - start) % n;
        if left == 0 {
            return None;
        }
        self.first_up(start, left, now, counters).or_else(|| {
            (0..left)
                .map(|i| (start + i) % n)
                .find(|&s| !self.health[s].retired)
        })
    }

    /// The first server of `count` from `start` (wrapping) that is not down; the down ones
    /// passed over are counted.
    fn first_up(
        &self,
        start: usize,
        count: usize,
        now: Instant,
        counters: &WorkerCounters,
    ) -> Option<usize> {
        let n = self.servers.len();
        for i in 0..count {
            let s = (start + i) % n;
            if self.health[s].retired {
                continue;
            }
            if !self.is_down(s, now) {
                return Some(s);
            }
            counters.backend_skipped_down.inc();
        }
        None
    }

    /// The server whose back-off ends first (every server is down), from `start` on for ties.
    fn soonest_back(&self, start: usize) -> usize {
        let n = self.servers.len();
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&s| !self.health[s].retired)
            .min_by_key(|&s| self.health[s].down_until)
            .unwrap_or(start)
    }

    /// A reload's server list: servers that stay keep their index and health, removed ones
    /// are retired (never picked again, still addressable by the connections using them),
    /// added ones are appended, up until they fail. A retired server listed again comes back.
    pub fn reconfigure(&mut self, servers: &[SocketAddr], _now: Instant) {
        for (i, h) in self.health.iter_mut().enumerate() {
            h.retired = !servers.contains(&self.servers[i]);
        }
        for &addr in servers {
            if !self.servers.contains(&addr) {
                self.servers.push(addr);
                self.health.push(Health::default());
            }
        }
    }

    /// A connect to `server` succeeded.
    pub fn up(&mut self, server: usize, now: Instant) {
        let h = &mut self.health[server];
        if h.failures > 0 {
            if h.down_until.is_some() {
                tracing::info!(worker = self.worker, server = %self.servers[server], "backend server is up again");
            }
            h.failures = 0;
            h.down_until = None;
        }
        let _ = now;
    }

    /// Whether `server` is down, its back-off has passed and no probe is in flight.
    fn probe_due(&self, server: usize, now: Instant) -> bool {
        let h = &self.health[server];
        !h.retired && h.probe.is_none() && h.down_until.is_some_and(|t| now >= t)
    }

    /// Starts a probe connect to every down server whose back-off has passed and that has none
    /// in flight. Called by the worker with its housekeeping (every 100 ms).
    pub fn probe(&mut self, io: &mut Io, now: Instant) {
        for server in 0..self.servers.len() {
            if !self.probe_due(server, now) {
                continue;
            }
            let addr = self.servers[server];
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM.cloexec(),
                None,
            );
            let Ok(socket) = socket else {
                // No socket now (e.g. out of fds): counts as a failed probe, retried later.
                self.down(server, false, libc::EMFILE, now);
                continue;
            };
            let probe = self.health[server].probe.insert(Probe {
                fd: socket.into_raw_fd(),
                addr: Box::new(socket2::SockAddr::from(addr)),
                in_flight: 2,
            });
            let key = super::Key {
                index: server as u32,
                gen: 0,
            };
            sock::connect_linked(
                io,
                probe.fd,
                &probe.addr,
                (Op::Probe, Op::ProbeTimeout),
                key,
            );
        }
    }

    /// The completion of a probe's connect (`Op::Probe`) or its timeout for `server`.
    pub fn probe_complete(&mut self, server: usize, op: Op, res: i32, now: Instant) {
        let Some(probe) = self.health.get_mut(server).and_then(|h| h.probe.as_mut()) else {
            return;
        };
        probe.in_flight -= 1;
        let done = probe.in_flight == 0;
        if done {
            if let Some(p) = self.health[server].probe.take() {
                // SAFETY: the probe's socket, closed once: both its operations completed.
                unsafe { libc::close(p.fd) };
            }
        }
        if op == Op::Probe {
            if res == 0 {
                self.up(server, now);
            } else {
                self.down(server, res == -libc::ECANCELED, -res, now);
            }
        }
    }

    /// A connect to `server` failed: it is down for a back-off.
    pub fn down(&mut self, server: usize, timed_out: bool, errno: i32, now: Instant) {
        let h = &mut self.health[server];
        h.failures = h.failures.saturating_add(1);
        let backoff = DOWN_FIRST
            .saturating_shl(h.failures.saturating_sub(1).min(5))
            .min(DOWN_MAX);
        h.down_until = Some(now + backoff);
        let failures = h.failures;
        let addr = self.servers[server];
        if self.may_warn(now) {
            let error = if timed_out {
                "connect timed out".to_owned()
            } else {
                std::io::Error::from_raw_os_error(errno).to_string()
            };
            let suppressed = self.take_suppressed();
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

    /// No server could be reached for a client, or its backend broke.
    pub fn warn_failure(&mut self, client: SocketAddr, now: Instant) {
        if self.may_warn(now) {
            let suppressed = self.take_suppressed();
            tracing::warn!(
                worker = self.worker,
                %client,
                suppressed,
                "backend unreachable or failed: closing the client connection"
            );
        }
    }

    fn may_warn(&mut self, now: Instant) -> bool {
        match self.last_warn {
            Some(t) if now < t + WARN_EVERY => {
                self.warns_suppressed += 1;
                false
            }
            _ => {
                self.last_warn = Some(now);
                true
            }
        }
    }

    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.warns_suppressed)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for h in &mut self.health {
            if let Some(p) = h.probe.take() {
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
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn pool(n: u16, worker: usize) -> Backends {
        let servers = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect();
        Backends::new(servers, worker)
    }

    const T0: Instant = Instant::from_secs(100);

    #[test]
    fn a_reload_keeps_indices_retires_removed_servers_and_appends_new_ones() {
        let c = WorkerCounters::default();
        let mut b = pool(3, 0);
        let (s0, s2) = (b.addr(0), b.addr(2));
        b.down(0, false, libc::ECONNREFUSED, T0);
        let new = SocketAddr::from(([127, 0, 0, 1], 9100));
        b.reconfigure(&[s2, s0, new], T0);
        assert_eq!(b.len(), 4);
        assert_eq!((b.addr(0), b.addr(2), b.addr(3)), (s0, s2, new));
        // Server 1 is retired: never picked; server 0 kept its health (down).
        let picks: Vec<usize> = (0..6).map(|_| b.pick(T0, &c)).collect();
        assert!(picks.iter().all(|&p| p == 2 || p == 3), "{picks:?}");
        // A connection that used server 1 fails over past it, never onto it.
        assert_eq!(b.failover(0, 0, T0, &c), Some(2));
        assert_eq!(b.failover(3, 1, T0, &c), Some(0), "down, but the last left");
        // Listed again: back in the rotation.
        b.reconfigure(&[b.addr(1)], T0);
        assert!((0..4).all(|_| b.pick(T0, &c) == 1));
    }

    fn at_ms(ms: u64) -> Instant {
        T0 + Duration::from_millis(ms)
    }

    #[test]
    fn pick_is_round_robin_from_the_worker_s_position() {
        let c = WorkerCounters::default();
        let mut b = pool(3, 0);
        let picks: Vec<usize> = (0..4).map(|_| b.pick(T0, &c)).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        let mut b = pool(3, 4);
        assert_eq!(b.pick(T0, &c), 1, "worker 4 starts at 4 % 3");
        assert_eq!(c.backend_skipped_down.get(), 0);
    }

    #[test]
    fn a_failed_server_is_skipped_until_it_is_up_and_probed_after_its_back_off() {
        let c = WorkerCounters::default();
        let mut b = pool(2, 0);
        // Each pick below starts at server 0 (its round-robin turn).
        let pick_from_0 = |b: &mut Backends, now| {
            b.next = 0;
            b.pick(now, &c)
        };
        b.down(0, false, libc::ECONNREFUSED, T0);
        assert_eq!(pick_from_0(&mut b, T0), 1, "0 is skipped");
        // The first back-off is 1 s: then it is probed, but clients still go elsewhere.
        assert!(!b.probe_due(0, at_ms(999)));
        assert!(b.probe_due(0, at_ms(1000)));
        assert!(!b.probe_due(1, at_ms(1000)), "an up server is not probed");
        assert_eq!(
            pick_from_0(&mut b, at_ms(5000)),
            1,
            "no client connection is sent to a down server while another is up"
        );
        // The probe fails: the back-off doubles.
        b.down(0, true, 0, at_ms(1000));
        assert!(!b.probe_due(0, at_ms(2999)));
        assert!(b.probe_due(0, at_ms(3000)), "2 s the second time");
        // A successful connect (a probe's) marks it up.
        b.up(0, at_ms(3000));
        assert_eq!(pick_from_0(&mut b, at_ms(3000)), 0, "up again");
        b.down(0, false, libc::ECONNREFUSED, at_ms(3000));
        assert!(b.probe_due(0, at_ms(4000)), "back to 1 s after an up");
        assert_eq!(c.backend_skipped_down.get(), 2, "each pass-over is counted");
    }

    #[test]
    fn the_back_off_stops_growing_at_its_maximum() {
        let mut b = pool(2, 0);
        for _ in 0..20 {
            b.down(0, false, libc::ECONNREFUSED, T0);
        }
        let max = DOWN_MAX.as_millis();
        assert!(!b.probe_due(0, at_ms(max - 1)));
        assert!(b.probe_due(0, at_ms(max)));
    }

    #[test]
    fn all_down_picks_the_soonest_back() {
        let c = WorkerCounters::default();
        let mut b = pool(3, 0);
        b.down(0, false, libc::ECONNREFUSED, T0);
        b.down(0, false, libc::ECONNREFUSED, T0); // 2 s
        b.down(1, false, libc::ECONNREFUSED, at_ms(500)); // back at 1.5 s
        b.down(2, false, libc::ECONNREFUSED, at_ms(200)); // back at 1.2 s
        assert_eq!(b.pick(at_ms(600), &c), 2);
        assert_eq!(b.pick(at_ms(600), &c), 2, "from any position");
        assert_eq!(c.backend_skipped_down.get(), 6);
    }

    #[test]
    fn failover_never_repeats_a_server_within_a_connection() {
        let c = WorkerCounters::default();
        // Every combination of down servers in a pool of 4, from every first server.
        for down in 0u32..16 {
            for first in 0..4 {
                let mut b = pool(4, 0);
                for s in 0..4 {
                    if down & (1 << s) != 0 {
                        b.down(s, false, libc::ECONNREFUSED, T0);
                    }
                }
                let mut tried = vec![first];
                let mut failed = first;
                while let Some(next) = b.failover(failed, first, T0, &c) {
                    assert!(
                        !tried.contains(&next),
                        "down {down:04b}, first {first}: {next} again after {tried:?}"
                    );
                    assert!(tried.len() < 4, "at most one attempt per server");
                    tried.push(next);
                    b.down(next, false, libc::ECONNREFUSED, T0);
                    failed = next;
                }
                // Only servers passed over as down are left untried.
                for s in 0..4 {
                    assert!(
                        tried.contains(&s) || down & (1 << s) != 0,
                        "down {down:04b}, first {first}: up server {s} never tried ({tried:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn failover_prefers_an_up_server_and_tries_a_down_one_last() {
        let c = WorkerCounters::default();
        let mut b = pool(3, 0);
        b.down(1, false, libc::ECONNREFUSED, T0);
        b.down(0, false, libc::ECONNREFUSED, T0);
        assert_eq!(b.failover(0, 0, T0, &c), Some(2), "1 is down, 2 is not");
        assert_eq!(c.backend_skipped_down.get(), 1);
        b.down(2, false, libc::ECONNREFUSED, T0);
        let mut b2 = pool(3, 0);
        b2.down(0, false, libc::ECONNREFUSED, T0);
        b2.down(1, false, libc::ECONNREFUSED, T0);
        b2.down(2, false, libc::ECONNREFUSED, T0);
        assert_eq!(
            b2.failover(0, 0, T0, &c),
            Some(1),
            "all down: the next is tried anyway"
        );
        assert_eq!(
            pool(1, 0).failover(0, 0, T0, &c),
            None,
            "one server: none left"
        );
    }

    #[test]
    fn backend_warnings_are_rate_limited() {
        let mut b = pool(1, 0);
        b.down(0, false, libc::ECONNREFUSED, T0);
        b.warn_failure("192.0.2.1:1".parse().expect("addr"), T0);
        b.warn_failure("192.0.2.1:1".parse().expect("addr"), at_ms(999));
        assert_eq!(b.warns_suppressed, 2);
        b.warn_failure("192.0.2.1:1".parse().expect("addr"), at_ms(1000));
        assert_eq!(
            b.warns_suppressed, 0,
            "logged with the count, which restarts"
        );
    }

    #[test]
    fn source_limits_count_places_per_address() {
        let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
        let b = IpAddr::from(Ipv4Addr::new(192, 0, 2, 2));
        let mut l = SourceLimits::new(2);
        assert!(l.acquire(a) && l.acquire(a));
        assert!(!l.acquire(a), "at its limit");
        assert!(l.acquire(b), "another source is not affected");
        assert_eq!(l.sources(), 2);
        l.release(a);
        assert!(l.acquire(a), "a place given back is taken again");
        l.release(a);
        l.release(a);
        l.release(b);
        assert_eq!(l.sources(), 0, "nothing held: nothing kept");
        // A release without an acquire is ignored.
        l.release(b);
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn source_limit_zero_is_off() {
        let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
        let mut l = SourceLimits::new(0);
        for _ in 0..1000 {
            assert!(l.acquire(a));
        }
        assert_eq!(l.sources(), 1, "counted, not limited");
        l.release(a);
    }

    #[test]
    fn a_limit_set_later_holds_for_places_taken_before() {
        let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
        let mut l = SourceLimits::new(0);
        assert!(l.acquire(a) && l.acquire(a));
        l.set_limit(2);
        assert!(!l.acquire(a), "two held: at the new limit");
        l.release(a);
        assert!(l.acquire(a));
        l.set_limit(0);
        assert!(l.acquire(a), "no limit again");
        for _ in 0..3 {
            l.release(a);
        }
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn an_ipv4_mapped_ipv6_source_is_the_ipv4_source() {
        let v4 = Ipv4Addr::new(192, 0, 2, 1);
        let mapped = IpAddr::from(v4.to_ipv6_mapped());
        let mut l = SourceLimits::new(2);
        assert!(l.acquire(IpAddr::from(v4)));
        assert!(l.acquire(mapped));
        assert!(!l.acquire(IpAddr::from(v4)), "one source, two connections");
        assert!(!l.acquire(mapped));
        l.release(mapped);
        assert!(l.acquire(IpAddr::from(v4)), "released through either form");
        assert_eq!(l.sources(), 1);
        let v6 = IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert!(l.acquire(v6), "a real IPv6 source is its own");
    }
}
