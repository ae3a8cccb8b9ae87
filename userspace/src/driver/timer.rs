//! A hashed, two-level timer wheel for per-connection deadlines, with cost independent of how
//! many connections a worker holds.
//!
//! Level one has a bucket per tick for the current *span* (`buckets` ticks, aligned); a deadline
//! in a later span waits in level two, one bucket per span, and is moved down once when its span
//! begins. So an entry is touched when it is inserted, once when its span begins and once when
//! it is due: a million idle connections with deadlines minutes away cost nothing per tick
//! (with one level they came round every span, ~4 s on the TCP stack's 1 ms wheel). Deadlines
//! beyond both levels (`buckets`² ticks) go round level two.
//!
//! Deadlines only move later in normal operation (activity pushes an idle deadline out), so
//! entries are not moved when that happens: when a bucket expires, the owner checks each entry's
//! current deadline and re-inserts the ones not yet due (lazy re-scheduling). Time is passed in
//! as milliseconds since the worker started.

/// Milliseconds since an arbitrary per-worker epoch.
pub type Millis = u64;

pub struct Wheel<T> {
    /// Level one: the ticks of the current span, by `tick & mask`.
    buckets: Vec<Vec<T>>,
    /// Level two: later spans by `span & mask`, each item with its tick.
    spans: Vec<Vec<(u64, T)>>,
    /// Items in `buckets` and in `spans`, so that empty stretches are skipped, not walked.
    near: usize,
    far: usize,
    tick_ms: u64,
    /// Ticks per span (`buckets.len()`, a power of two).
    span_ticks: u64,
    /// The next tick to expire: every bucket for ticks before it has been emptied.
    next_tick: u64,
}

impl<T: Copy> Wheel<T> {
    /// `buckets` (per level) is rounded up to a power of two.
    pub fn new(tick_ms: u64, buckets: usize, now: Millis) -> Wheel<T> {
        let n = buckets.next_power_of_two();
        Wheel {
            buckets: (0..n).map(|_| Vec::new()).collect(),
            spans: (0..n).map(|_| Vec::new()).collect(),
            near: 0,
            far: 0,
            tick_ms,
            span_ticks: n as u64,
            next_tick: now / tick_ms,
        }
    }

    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    fn mask(&self) -> u64 {
        self.span_ticks - 1
    }

    /// Schedules `item` for `deadline` (a deadline in the past fires at the next expiry).
    pub fn insert(&mut self, deadline: Millis, item: T) {
        let tick = (deadline.div_ceil(self.tick_ms)).max(self.next_tick);
        let span = tick / self.span_ticks;
        let mask = self.mask();
        if span == self.next_tick / self.span_ticks {
            self.buckets[(tick & mask) as usize].push(item);
            self.near += 1;
        } else {
            self.spans[(span & mask) as usize].push((tick, item));
            self.far += 1;
        }
    }

    /// Moves the level-two items of `span` (those a full level-two turn later stay) down.
    fn cascade(&mut self, span: u64) {
        let mask = self.mask();
        let mut waiting = std::mem::take(&mut self.spans[(span & mask) as usize]);
        waiting.retain(|&(tick, item)| {
            if tick / self.span_ticks != span {
                return true;
            }
            self.buckets[(tick & mask) as usize].push(item);
            self.near += 1;
            self.far -= 1;
            false
        });
        self.spans[(span & mask) as usize] = waiting;
    }

    /// Calls `f` for every item whose tick is due at `now`. `f` may see items whose owner has
    /// moved their deadline since (lazy re-scheduling); it re-inserts them. Cost: the items
    /// due, the non-empty ticks and span starts passed — not the items held.
    pub fn expire(&mut self, now: Millis, mut f: impl FnMut(&mut Self, T)) {
        let now_tick = now / self.tick_ms;
        let mask = self.mask();
        let mut scratch = Vec::new();
        while self.next_tick <= now_tick {
            let tick = self.next_tick;
            if tick.is_multiple_of(self.span_ticks) && self.far > 0 {
                self.cascade(tick / self.span_ticks);
            }
            if self.near == 0 {
                // Nothing this span: on to the next span start (or to `now` if nothing waits).
                self.next_tick = if self.far == 0 {
                    now_tick + 1
                } else {
                    ((tick / self.span_ticks + 1) * self.span_ticks).min(now_tick + 1)
                };
                continue;
            }
            self.next_tick = tick + 1;
            std::mem::swap(&mut scratch, &mut self.buckets[(tick & mask) as usize]);
            self.near -= scratch.len();
            for item in scratch.drain(..) {
                // Re-inserts go to later ticks (`next_tick` has moved), never to this bucket.
                f(self, item);
            }
            // The drained allocation goes back to the bucket so steady state allocates nothing.
            let bucket = &mut self.buckets[(tick & mask) as usize];
            scratch.append(bucket);
            std::mem::swap(&mut scratch, bucket);
        }
    }

    /// The tick time (ms) of the earliest non-empty level-one bucket, else the start of the
    /// earliest span with items waiting, if any: when the owner should next call
    /// [`expire`](Self::expire). Entries may be stale (lazy re-scheduling), so this may be
    /// early, never late. O(buckets): for deciding how long to sleep, not per packet.
    pub fn next_due(&self) -> Option<Millis> {
        let mask = self.mask();
        let span = self.next_tick / self.span_ticks;
        if self.near > 0 {
            let end = (span + 1) * self.span_ticks;
            if let Some(tick) =
                (self.next_tick..end).find(|tick| !self.buckets[(tick & mask) as usize].is_empty())
            {
                return Some(tick * self.tick_ms);
            }
        }
        if self.far == 0 {
            return None;
        }
        let first = self.next_tick.div_ceil(self.span_ticks);
        (first..first + self.span_ticks)
            .find(|s| !self.spans[(s & mask) as usize].is_empty())
            .map(|s| s * self.span_ticks * self.tick_ms)
    }

    /// Whether [`expire`](Self::expire) at `now` would visit a non-empty bucket or move a span
    /// down. Cost: the ticks since the last expiry within the current span, so it is cheap to
    /// ask every loop turn.
    pub fn due(&self, now: Millis) -> bool {
        let now_tick = now / self.tick_ms;
        if now_tick < self.next_tick {
            return false;
        }
        let span = self.next_tick / self.span_ticks;
        let mask = self.mask();
        // A span start reached whose level-two bucket holds items (perhaps of a later turn);
        // `next_tick` itself may be one, not moved down yet.
        let first = self.next_tick.div_ceil(self.span_ticks);
        if self.far > 0
            && (first..=(now_tick / self.span_ticks).min(first + self.span_ticks - 1))
                .any(|s| !self.spans[(s & mask) as usize].is_empty())
        {
            return true;
        }
        if self.near == 0 {
            return false;
        }
        let last = now_tick.min((span + 1) * self.span_ticks - 1);
        (self.next_tick..=last).any(|tick| !self.buckets[(tick & mask) as usize].is_empty())
    }

    pub fn len(&self) -> usize {
        self.near + self.far
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// A million entries minutes away and ten due soon: ticking through the first spans visits
    /// the ten, not the million (with one level each of them came round every span).
    #[test]
    fn only_due_entries_are_visited() {
        // The TCP stack's wheel: 1 ms ticks, 4096 per span.
        let mut w: Wheel<u32> = Wheel::new(1, 4096, 0);
        let far = 300_000; // 5 minutes: ~73 spans out.
        for i in 0..1_000_000u32 {
            w.insert(far + u64::from(i % 1000), i);
        }
        for i in 0..10u32 {
            w.insert(100 + u64::from(i) * 1000, 1_000_000 + i);
        }
        assert_eq!(w.len(), 1_000_010);
        let mut visits = 0u64;
        // Sixty seconds, polled every millisecond as a busy worker would.
        for now in 0..60_000 {
            assert!(w.next_due().is_some());
            if w.due(now) {
                w.expire(now, |_, item| {
                    assert!(item >= 1_000_000, "a far entry was visited early");
                    visits += 1;
                });
            }
        }
        assert_eq!(visits, 10);
        assert_eq!(w.len(), 1_000_000);
        // Each far entry is visited once, when due, and not before.
        let mut fired = 0u64;
        w.expire(far - 1, |_, _| fired += 1);
        assert_eq!(fired, 0);
        w.expire(far + 999, |_, _| fired += 1);
        assert_eq!(fired, 1_000_000);
        assert!(w.is_empty());
    }

    #[test]
    fn next_due_reaches_the_second_level() {
        let mut w: Wheel<u32> = Wheel::new(10, 8, 0);
        // Tick 20 is in span 2 (8 ticks a span): waits in level two until tick 16.
        w.insert(200, 1);
        assert_eq!(w.next_due(), Some(160));
        assert!(!w.due(150));
        // Expired up to just before the span start: the move down is still pending.
        w.expire(150, |_, _| panic!("nothing is due"));
        assert_eq!(w.next_due(), Some(160));
        assert!(w.due(160), "the span start moves it down");
        let mut fired = Vec::new();
        w.expire(160, |_, x| fired.push(x));
        assert!(fired.is_empty());
        assert_eq!(w.next_due(), Some(200));
        w.expire(200, |_, x| fired.push(x));
        assert_eq!(fired, vec![1]);
    }

    /// Deadlines beyond both levels go round level two and still fire on time.
    #[test]
    fn beyond_both_levels_fires_on_time() {
        let mut w: Wheel<u32> = Wheel::new(10, 4, 0);
        // 4 × 4 ticks × 10 ms = 160 ms reach; 1000 ms is further.
        w.insert(1000, 9);
        let mut fired_at = None;
        for now in (0..=1200).step_by(10) {
            w.expire(now, |_, x| {
                assert_eq!(x, 9);
                fired_at.get_or_insert(now);
            });
        }
        assert_eq!(fired_at, Some(1000));
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
