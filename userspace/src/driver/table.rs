//! A worker's proxied connections: the slab of entries (a [`Conn`] machine, the path's client
//! transport `C`, the backend [`Sock`]) and the timer wheel their deadlines sit on. The same
//! for both paths; only `C` differs (a kernel socket, or a TCB of tern's stack).
//!
//! Deadlines are scheduled lazily: an entry has at most the wheel entry for its earliest known
//! deadline; when it comes up the machine is asked ([`Conn::on_timeout`]) and, if nothing was
//! due yet (activity moved the deadline later), the entry goes back on the wheel at the new
//! deadline. Activity therefore costs nothing but the timestamps the machine keeps.
//!
//! The tick is also when the table answers the connection census (`tern ctl conns`,
//! [`super::census`]) if the control thread asked for one.

use super::census::{Counts, Tally};
use super::slab::{Key, Slab};
use super::sock::Sock;
use super::timer::Wheel;
use super::Conn;
use crate::counters::WorkerCounters;
use crate::tcp::time::Instant;

/// Wheel buckets per level: with 100 ms ticks a span is about 100 s and level two reaches 29 h.
const WHEEL_BUCKETS: usize = 1024;

/// One proxied connection.
pub struct Entry<C> {
    pub conn: Conn,
    pub client: C,
    pub backend: Sock,
    /// The deadline the wheel holds an entry for (the earliest, if several).
    scheduled: Option<Instant>,
    /// Torn down: the legs are closing; freed once nothing is in flight.
    pub closing: bool,
}

pub struct Table<C> {
    slab: Slab<Entry<C>>,
    wheel: Wheel<Key>,
    /// Scratch list of the keys a tick expired, kept so a tick allocates nothing.
    due: Vec<Key>,
    /// Entries taken at most: the capacity, or less after a reload lowered the limit.
    limit: usize,
    /// Where the census is asked for and answered (`None`: nobody asks, e.g. in unit tests).
    census: Option<std::sync::Arc<Tally>>,
}

impl<C> Table<C> {
    /// A table of `capacity` entries (allocated now, never grown: entries never move) whose
    /// deadlines are looked at with `tick_ms` granularity.
    pub fn new(capacity: usize, tick_ms: u64, now: Instant) -> Table<C> {
        Table {
            slab: Slab::with_capacity(capacity),
            wheel: Wheel::new(tick_ms, WHEEL_BUCKETS, millis(now)),
            due: Vec::new(),
            limit: capacity,
            census: None,
        }
    }

    /// Answers the census asked on `tally` (once per [`Table::expire`], when asked).
    pub fn reporting_to(mut self, tally: std::sync::Arc<Tally>) -> Table<C> {
        self.census = Some(tally);
        self
    }

    /// How many entries are in each state now: one walk of the table.
    pub fn census(&self) -> Counts {
        let mut counts = Counts::default();
        for e in self.slab.values() {
            counts.add(e.conn.state(e.closing));
        }
        counts
    }

    /// Takes at most `limit` entries from now on (never more than the capacity); entries held
    /// beyond it stay until they end.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    pub fn insert(&mut self, conn: Conn, client: C, backend: Sock) -> Option<Key> {
        if self.is_full() {
            return None;
        }
        self.slab.insert(Entry {
            conn,
            client,
            backend,
            scheduled: None,
            closing: false,
        })
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut Entry<C>> {
        self.slab.get_mut(key)
    }

    pub fn remove(&mut self, key: Key) -> Option<Entry<C>> {
        self.slab.remove(key)
    }

    /// Entries held (closing ones included).
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.slab.is_full() || self.slab.len() >= self.limit
    }

    /// Connections not yet torn down.
    pub fn open(&self) -> usize {
        self.slab.values().filter(|e| !e.closing).count()
    }

    pub fn keys(&self) -> Vec<Key> {
        self.slab.keys()
    }

    /// Puts the connection's next deadline on the wheel unless an earlier entry is there.
    pub fn schedule(&mut self, key: Key) {
        let Some(e) = self.slab.get_mut(key) else {
            return;
        };
        let Some(deadline) = e.conn.next_deadline() else {
            return;
        };
        if e.scheduled.is_some_and(|s| s <= deadline) {
            return;
        }
        e.scheduled = Some(deadline);
        self.wheel.insert(deadline.as_micros().div_ceil(1000), key);
    }

    /// Runs the wheel to `now`: connections whose deadline passed are cut by their machine
    /// (and counted) and returned, for the caller to pump; the others are scheduled again.
    pub fn expire(&mut self, now: Instant, counters: &WorkerCounters) -> Vec<Key> {
        if let Some(tally) = &self.census {
            tally.answer(|| self.census());
        }
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(millis(now), |_, key| due.push(key));
        let mut timed_out = Vec::new();
        for &key in &due {
            let Some(e) = self.slab.get_mut(key) else {
                continue;
            };
            if e.closing {
                continue;
            }
            e.scheduled = None;
            if e.conn.on_timeout(now, counters) {
                timed_out.push(key);
            } else {
                self.schedule(key);
            }
        }
        due.clear();
        self.due = due;
        timed_out
    }
}

fn millis(t: Instant) -> u64 {
    t.as_micros() / 1000
}
