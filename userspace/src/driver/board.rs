//! What the workers publish about their backend servers, for the control thread: one
//! [`ServerStats`] of single-writer atomics per server and worker (written only by the worker
//! that owns the [`super::Backends`], read without locking), collected in the process's
//! [`Board`], and merged across workers into [`ServerSnapshot`]s (`tern ctl backends`, the
//! `backends` section of `tern ctl stats`, metrics).
//!
//! Not here: the health rules themselves ([`super::backends`]). The only lock is around each
//! worker's *list* of servers, taken by the worker when it is built or reconfigured (a
//! reload) and by a reader for the time it takes to clone a few `Arc`s: never on a
//! connection's path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::counters::Counter;

/// [`ServerStats::state`] values.
pub const STATE_UP: u64 = 0;
pub const STATE_DOWN: u64 = 1;
/// Removed from the configuration; kept while connections still use it.
pub const STATE_RETIRED: u64 = 2;

/// One worker's view of one backend server. Written by that worker only.
#[derive(Debug)]
pub struct ServerStats {
    pub address: SocketAddr,
    pub weight: Counter,
    /// [`STATE_UP`], [`STATE_DOWN`] or [`STATE_RETIRED`].
    pub state: Counter,
    /// Failed connects (clients' and probes') since the last success.
    pub consecutive_failures: Counter,
    /// Client connections established to it.
    pub connects: Counter,
    /// Client connects refused or failed.
    pub connect_errors: Counter,
    /// Client connects that timed out.
    pub connect_timeouts: Counter,
    pub probes_ok: Counter,
    pub probes_failed: Counter,
    /// This worker's connections assigned to it now (connecting or connected).
    pub active: Counter,
    /// Wall-clock time of the last up/down change, in ms since the Unix epoch; 0: none yet.
    pub last_change_unix_ms: Counter,
}

impl ServerStats {
    pub fn new(address: SocketAddr, weight: u32) -> ServerStats {
        let s = ServerStats {
            address,
            weight: Counter::default(),
            state: Counter::default(),
            consecutive_failures: Counter::default(),
            connects: Counter::default(),
            connect_errors: Counter::default(),
            connect_timeouts: Counter::default(),
            probes_ok: Counter::default(),
            probes_failed: Counter::default(),
            active: Counter::default(),
            last_change_unix_ms: Counter::default(),
        };
        s.weight.set(u64::from(weight));
        s
    }
}

/// One worker's servers, in its slot order (retired slots included).
#[derive(Debug, Default)]
pub struct Published {
    servers: Mutex<Vec<Arc<ServerStats>>>,
}

impl Published {
    /// Replaces the list (the worker, at construction and on reconfigure).
    pub fn publish(&self, servers: Vec<Arc<ServerStats>>) {
        *self.servers.lock().unwrap_or_else(PoisonError::into_inner) = servers;
    }

    fn servers(&self) -> Vec<Arc<ServerStats>> {
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Every worker's [`Published`] list, kernel and bypass workers alike.
#[derive(Debug, Default)]
pub struct Board {
    workers: Mutex<Vec<Arc<Published>>>,
    /// Every worker's connection census (`tern ctl conns`): published on the same board
    /// because every worker of both paths already reaches it, as does the control thread.
    pub census: super::census::Census,
}

impl Board {
    /// Adds a worker's list (a worker registers once, when its `Backends` is built).
    pub fn register(&self, published: Arc<Published>) {
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(published);
    }

    /// Each server's state and counters, merged across workers, in the order the servers
    /// first appear (the configuration's order).
    ///
    /// Merging: counters are summed; `weight` and `last_change_unix_ms` are the largest
    /// (the latest change); `consecutive_failures` is the largest any worker saw. A server is
    /// `"up"` when it is up for at least one worker (some worker sends it connections),
    /// `"down"` when every worker that has it live holds it down, `"retired"` when it is only
    /// kept for connections that still use it after a reload. `workers_up` / `workers` say how
    /// many workers agree.
    pub fn snapshot(&self) -> Vec<ServerSnapshot> {
        let workers: Vec<Arc<Published>> = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out: Vec<ServerSnapshot> = Vec::new();
        for w in &workers {
            for s in w.servers() {
                let state = s.state.get();
                let i = match out.iter().position(|o| o.address == s.address) {
                    Some(i) => i,
                    None => {
                        out.push(ServerSnapshot::new(s.address));
                        out.len() - 1
                    }
                };
                let Some(o) = out.get_mut(i) else { continue };
                o.add(&s, state);
            }
        }
        for o in &mut out {
            o.state = if o.workers_up > 0 {
                "up"
            } else if o.workers > 0 {
                "down"
            } else {
                "retired"
            };
        }
        out
    }
}

/// One server's merged state and counters (see [`Board::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerSnapshot {
    pub address: SocketAddr,
    pub weight: u64,
    /// `"up"`, `"down"` or `"retired"`.
    pub state: &'static str,
    /// Workers that hold it up.
    pub workers_up: u64,
    /// Workers that have it in their live pool (up or down; retired not counted).
    pub workers: u64,
    pub consecutive_failures: u64,
    pub connects: u64,
    pub connect_errors: u64,
    pub connect_timeouts: u64,
    pub probes_ok: u64,
    pub probes_failed: u64,
    pub active: u64,
    pub last_change_unix_ms: u64,
}

impl ServerSnapshot {
    fn new(address: SocketAddr) -> ServerSnapshot {
        ServerSnapshot {
            address,
            weight: 0,
            state: "retired",
            workers_up: 0,
            workers: 0,
            consecutive_failures: 0,
            connects: 0,
            connect_errors: 0,
            connect_timeouts: 0,
            probes_ok: 0,
            probes_failed: 0,
            active: 0,
            last_change_unix_ms: 0,
        }
    }

    fn add(&mut self, s: &ServerStats, state: u64) {
        if state != STATE_RETIRED {
            self.workers += 1;
            self.weight = self.weight.max(s.weight.get());
        }
        if state == STATE_UP {
            self.workers_up += 1;
        }
        self.consecutive_failures = self.consecutive_failures.max(s.consecutive_failures.get());
        self.connects += s.connects.get();
        self.connect_errors += s.connect_errors.get();
        self.connect_timeouts += s.connect_timeouts.get();
        self.probes_ok += s.probes_ok.get();
        self.probes_failed += s.probes_failed.get();
        self.active += s.active.get();
        self.last_change_unix_ms = self.last_change_unix_ms.max(s.last_change_unix_ms.get());
    }
}

/// Wall-clock ms since the Unix epoch (for [`ServerStats::last_change_unix_ms`]).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merged_view_sums_and_says_up_when_any_worker_has_it_up() {
        let board = Board::default();
        let a: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:9001".parse().expect("addr");
        let (w0, w1) = (
            Arc::new(Published::default()),
            Arc::new(Published::default()),
        );
        board.register(w0.clone());
        board.register(w1.clone());
        let s = |addr, state, connects| {
            let s = Arc::new(ServerStats::new(addr, 2));
            s.state.set(state);
            s.connects.set(connects);
            s
        };
        w0.publish(vec![s(a, STATE_UP, 3), s(b, STATE_DOWN, 1)]);
        w1.publish(vec![s(a, STATE_DOWN, 4), s(b, STATE_RETIRED, 5)]);
        let snap = board.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!((snap[0].address, snap[0].state), (a, "up"));
        assert_eq!((snap[0].workers_up, snap[0].workers), (1, 2));
        assert_eq!(snap[0].connects, 7);
        assert_eq!(snap[0].weight, 2);
        assert_eq!((snap[1].address, snap[1].state), (b, "down"));
        assert_eq!(snap[1].workers, 1, "retired is not a live pool member");
        assert_eq!(
            snap[1].connects, 6,
            "a retired server's counters still count"
        );
        w0.publish(vec![s(b, STATE_RETIRED, 0)]);
        w1.publish(Vec::new());
        assert_eq!(board.snapshot()[0].state, "retired");
    }
}
