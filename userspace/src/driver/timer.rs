//! A hashed timer wheel for per-connection deadlines, with cost independent of how many
//! connections a worker holds.
//!
//! Each entry sits in the bucket of its deadline's tick. Deadlines only move later in normal
//! operation (activity pushes an idle deadline out), so entries are not moved when that
//! happens: when a bucket expires, the owner checks each entry's current deadline and
//! re-inserts the ones not yet due (lazy re-scheduling). Deadlines further out than the wheel's
//! span simply go round again. Time is passed in as milliseconds since the worker started.

/// Milliseconds since an arbitrary per-worker epoch.
pub type Millis = u64;

pub struct Wheel<T> {
    buckets: Vec<Vec<T>>,
    tick_ms: u64,
    /// The next tick to expire: every bucket for ticks before it has been emptied.
    next_tick: u64,
}

impl<T: Copy> Wheel<T> {
    /// `buckets` is rounded up to a power of two.
    pub fn new(tick_ms: u64, buckets: usize, now: Millis) -> Wheel<T> {
        let n = buckets.next_power_of_two();
        Wheel {
            buckets: (0..n).map(|_| Vec::new()).collect(),
            tick_ms,
            next_tick: now / tick_ms,
        }
    }

    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Schedules `item` for `deadline` (a deadline in the past fires at the next expiry).
    pub fn insert(&mut self, deadline: Millis, item: T) {
        let tick = (deadline.div_ceil(self.tick_ms)).max(self.next_tick);
        let mask = self.buckets.len() as u64 - 1;
        self.buckets[(tick & mask) as usize].push(item);
    }

    /// Calls `f` for every item whose bucket is due at `now`. `f` sees items that may have
    /// been scheduled a full wheel turn later (or re-scheduled since); it re-inserts them.
    pub fn expire(&mut self, now: Millis, mut f: impl FnMut(&mut Self, T)) {
        let now_tick = now / self.tick_ms;
        let mask = self.buckets.len() as u64 - 1;
        let mut scratch = Vec::new();
        // At most one full turn: older ticks map to the same buckets.
        let first = self.next_tick.max(now_tick.saturating_sub(mask));
        for tick in first..=now_tick {
            std::mem::swap(&mut scratch, &mut self.buckets[(tick & mask) as usize]);
            self.next_tick = tick + 1;
            for item in scratch.drain(..) {
                f(self, item);
            }
            // Items `f` re-inserted into this same bucket stay there; the drained allocation
            // goes back to the bucket so steady state allocates nothing.
            let bucket = &mut self.buckets[(tick & mask) as usize];
            scratch.append(bucket);
            std::mem::swap(&mut scratch, bucket);
        }
        self.next_tick = self.next_tick.max(now_tick + 1);
    }

    /// The tick time (ms) of the earliest non-empty bucket within one wheel turn, if any: when
    /// the owner should next call [`expire`](Self::expire). Entries may be stale (lazy
    /// re-scheduling), so this may be early, never late. O(buckets): for deciding how long to
    /// sleep, not for the per-packet path.
    pub fn next_due(&self) -> Option<Millis> {
        let mask = self.buckets.len() as u64 - 1;
        (self.next_tick..self.next_tick + self.buckets.len() as u64)
            .find(|tick| !self.buckets[(tick & mask) as usize].is_empty())
            .map(|tick| tick * self.tick_ms)
    }

    /// Whether [`expire`](Self::expire) at `now` would visit a non-empty bucket. Cost: the ticks
    /// since the last expiry (at most one turn), so it is cheap to ask every loop turn.
    pub fn due(&self, now: Millis) -> bool {
        let now_tick = now / self.tick_ms;
        if now_tick < self.next_tick {
            return false;
        }
        let mask = self.buckets.len() as u64 - 1;
        let first = self.next_tick.max(now_tick.saturating_sub(mask));
        (first..=now_tick).any(|tick| !self.buckets[(tick & mask) as usize].is_empty())
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_due_is_the_earliest_bucket() {
        let mut w: Wheel<u32> = Wheel::new(10, 8, 0);
        assert_eq!(w.next_due(), None);
        w.insert(55, 1);
        w.insert(31, 2);
        assert_eq!(w.next_due(), Some(40));
        w.expire(40, |_, item| {
            assert_eq!(item, 2, "only the 40 ms bucket is due")
        });
        assert_eq!(w.next_due(), Some(60));
        w.expire(60, |_, _| {});
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn due_says_whether_expire_has_work() {
        let mut w: Wheel<u32> = Wheel::new(10, 8, 0);
        assert!(!w.due(1000), "empty wheel");
        w.insert(35, 1);
        assert!(!w.due(39), "not before its tick");
        assert!(w.due(40));
        assert!(w.due(500), "still due when polled late");
        w.expire(40, |_, _| {});
        assert!(!w.due(40));
    }

    #[test]
    fn fires_at_or_after_deadline_never_before() {
        let mut w = Wheel::new(10, 8, 0);
        w.insert(35, 1u32);
        let mut fired = Vec::new();
        w.expire(30, |_, x| fired.push(x));
        assert!(fired.is_empty(), "fired before its deadline");
        w.expire(40, |_, x| fired.push(x));
        assert_eq!(fired, vec![1]);
        assert!(w.is_empty());
    }

    #[test]
    fn far_deadlines_come_round_and_are_rescheduled() {
        let mut w = Wheel::new(10, 4, 0);
        let deadline = 1000;
        w.insert(deadline, 7u32);
        let mut fired_at = None;
        for now in (0..=1100).step_by(10) {
            w.expire(now, |w, x| {
                if now >= deadline {
                    fired_at.get_or_insert(now);
                } else {
                    w.insert(deadline, x);
                }
            });
        }
        assert_eq!(fired_at, Some(1000));
    }

    #[test]
    fn a_long_pause_expires_everything_due_once() {
        let mut w = Wheel::new(10, 4, 0);
        for i in 0..10u32 {
            w.insert(u64::from(i) * 10, i);
        }
        let mut fired = Vec::new();
        w.expire(10_000, |_, x| fired.push(x));
        fired.sort_unstable();
        assert_eq!(fired, (0..10).collect::<Vec<_>>());
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn past_deadline_fires_next_expiry() {
        let mut w = Wheel::new(10, 8, 100);
        w.insert(5, 3u32);
        let mut fired = Vec::new();
        w.expire(100, |_, x| fired.push(x));
        assert_eq!(fired, vec![3]);
    }
}
