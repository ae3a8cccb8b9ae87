//! The open-loop schedule: when each request of one worker is *intended* to be sent.
//!
//! Owns: the intended-time arithmetic. At a total rate R spread over K workers (threads across
//! all processes), worker k sends its i-th request at `start + (k + i·K) / R`, so the workers'
//! schedules interleave into one evenly spaced global schedule. Times are computed from the
//! index with integer arithmetic (no accumulated rounding drift over a long run).
//!
//! Coordinated omission (Gil Tene's term; the reason wrk2 exists): a closed-loop client that
//! measures from the moment it actually sent a request stops sending while the server stalls,
//! so the stall shows up as one slow sample instead of the hundreds of requests that real users
//! would have sent and waited on. An open-loop sender measures every request from its intended
//! time instead: when the client is held up — no free connection, a full in-flight cap, or the
//! client itself descheduled — requests pile up behind their intended times and each one's
//! latency includes the wait. [`Pacer::take`] hands out intended times, never "now". Does not
//! own: deciding whether a connection is free (`worker`), or recording (`stats`).

/// The open-loop schedule of one worker.
#[derive(Clone, Debug)]
pub struct Pacer {
    start_ns: u64,
    /// Total rate in requests per 1000 s (milli-requests per second), so fractional rates such
    /// as 0.5/s stay exact in integer arithmetic.
    rate_milli: u128,
    /// This worker's index k; its requests are the global slots k, k+K, k+2K, …
    worker: u128,
    /// Total number of workers K.
    workers: u128,
    /// Index i of the next request not yet handed out.
    next: u64,
}

impl Pacer {
    /// `rate_per_s` is the total over all workers; it must be positive (validated by `cli`).
    pub fn new(start_ns: u64, rate_per_s: f64, worker: usize, workers: usize) -> Pacer {
        assert!(rate_per_s > 0.0 && workers > worker, "pacer parameters");
        Pacer {
            start_ns,
            rate_milli: ((rate_per_s * 1000.0).round() as u128).max(1),
            worker: worker as u128,
            workers: workers as u128,
            next: 0,
        }
    }

    /// Intended send time of this worker's request number `i`.
    pub fn intended(&self, i: u64) -> u64 {
        let slot = self.worker + i as u128 * self.workers;
        // slot / R seconds = slot · 10^12 / rate_milli nanoseconds.
        self.start_ns + (slot * 1_000_000_000_000 / self.rate_milli) as u64
    }

    /// Intended time of the next request not yet handed out.
    pub fn next_due(&self) -> u64 {
        self.intended(self.next)
    }

    /// Hands out the next request if its intended time has come: returns that intended time
    /// (possibly long past, if the sender was held up), which is where its latency starts.
    pub fn take(&mut self, now_ns: u64) -> Option<u64> {
        let due = self.next_due();
        if due <= now_ns {
            self.next += 1;
            Some(due)
        } else {
            None
        }
    }

    /// Requests handed out so far.
    #[cfg(test)]
    pub fn taken(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

    const MS: u64 = 1_000_000;

    #[test]
    fn workers_interleave_into_one_even_schedule() {
        let (start, rate, workers) = (5_000, 3000.0, 3);
        let mut all: Vec<u64> = (0..workers)
            .flat_map(|k| {
                let p = Pacer::new(start, rate, k, workers);
                (0..100).map(move |i| p.intended(i))
            })
            .collect();
        all.sort_unstable();
        for (n, t) in all.iter().enumerate() {
            let expect = start + (n as u64 * 1_000_000_000) / 3000;
            assert_eq!(*t, expect, "global slot {n}");
        }
    }

    #[test]
    fn fractional_rates_and_long_runs_do_not_drift() {
        let p = Pacer::new(0, 0.5, 0, 1);
        assert_eq!(p.intended(3), 6_000_000_000, "0.5/s: every 2 s");
        let p = Pacer::new(0, 7.0, 0, 1);
        // 7/s for 10^7 requests: exact to the nanosecond, no accumulated step error.
        assert_eq!(
            p.intended(7_000_000),
            1_000_000 * 1_000_000_000,
            "after 10^6 s"
        );
    }

    #[test]
    fn a_late_sender_gets_the_backlog_with_original_intended_times() {
        // 1000/s; the sender is stalled (descheduled, or no free connection) until t = 50 ms.
        let mut p = Pacer::new(0, 1000.0, 0, 1);
        assert_eq!(p.take(0), Some(0), "first request at once");
        let mut late = Vec::new();
        while let Some(t) = p.take(50 * MS) {
            late.push(t);
        }
        assert_eq!(late.len(), 50, "requests 1..=50 are due by 50 ms");
        for (n, t) in late.iter().enumerate() {
            assert_eq!(
                *t,
                (n as u64 + 1) * MS,
                "backlog entry {n} keeps its intended time"
            );
        }
        assert_eq!(p.take(50 * MS), None, "nothing more due yet");
        assert_eq!(p.next_due(), 51 * MS, "the schedule continues where it was");
    }

    /// One connection, a server that answers in 100 µs but stalls for 200 ms at t = 100 ms. The
    /// open-loop recorder must show the queue that built up behind the stall: the request
    /// intended at 100 + j ms completes at 300 + 0.1·(j+1) ms, so the wait shrinks by 0.9 ms per
    /// request and 167 of them (j = 0..=166) wait more than 50 ms. Measuring from the actual
    /// send time shows a single slow sample.
    #[test]
    fn a_server_stall_shows_up_in_every_queued_request() {
        const SERVICE: u64 = 100_000;
        let (stall_from, stall_to) = (100 * MS, 300 * MS);
        let mut pacer = Pacer::new(0, 1000.0, 0, 1);
        let mut corrected = Stats::new();
        let mut naive = Stats::new();
        let mut conn_free_at = 0u64;
        while pacer.taken() < 1000 {
            // The client sends when both the request is due and the connection is free.
            let now = pacer.next_due().max(conn_free_at);
            let intended = pacer.take(now).expect("due by construction");
            let begins = if (stall_from..stall_to).contains(&now) {
                stall_to
            } else {
                now
            };
            let done = begins + SERVICE;
            conn_free_at = done;
            corrected.record_latency(intended, done);
            naive.record_latency(now, done);
        }
        let slow = |s: &Stats| s.latency.count_between(50_000, u64::MAX);
        assert_eq!(naive.latency.len(), 1000, "all requests recorded");
        assert!(
            slow(&naive) <= 1,
            "measured from the actual send, the stall is one sample"
        );
        assert!(
            (165..=169).contains(&slow(&corrected)),
            "167 queued requests waited > 50 ms, got {}",
            slow(&corrected)
        );
        let max = corrected.latency.max();
        assert!(
            (199_000..=201_000).contains(&max),
            "max latency ≈ 200 ms, got {max} µs"
        );
        let p99 = corrected.latency.value_at_quantile(0.99);
        assert!(p99 > 150_000, "p99 carries the stall, got {p99} µs");
        assert!(
            naive.latency.value_at_quantile(0.99) < 1_000,
            "the naive p99 hides it"
        );
    }
}
