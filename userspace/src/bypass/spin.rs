//! The bypass worker's polling policy: after its last frame, how long a worker busy-polls
//! before it sleeps in `poll(2)`. A pure function of what the worker observed (the quiet gaps
//! between bursts of work, the CPU a sleep and wake-up cost), so it is tested without sockets.
//!
//! Why: a worker that spins a fixed time after every burst burns that time at every rate where
//! the next burst comes later, so at moderate rates its CPU per operation is spin, not work.
//! Spinning only pays while the next arrival is expected sooner than a sleep and wake-up costs
//! (the ski-rental bound: spin at most as long as the sleep would have cost, then sleep, and
//! the total is never worse than twice the best choice in hindsight).
//!
//! The rule ([`SpinPolicy::spin_for`], `xdp.spin = "adaptive"`): keep an exponentially
//! weighted mean of the quiet gaps (from the end of a turn that did work to the start of the
//! next turn that did, counted only when at least one turn between them found nothing) and of
//! the thread CPU of a sleep round (measured around each `poll(2)`). While the mean gap is
//! shorter than the sleep cost, spin up to the sleep cost; otherwise sleep at once. Never
//! longer than `xdp.idle_spin_us` (the cap; 0 = never spin). `xdp.spin = "fixed"` always spins
//! the cap (the old behaviour: lowest wake-up latency, a core's worth of CPU under any load).
//!
//! Not here: the loop, the clock reads and the counters (`bypass`).

use std::time::Duration;

use crate::config::SpinMode;

/// The weight of a new sample in the means: 1/2^EWMA_SHIFT.
const EWMA_SHIFT: u32 = 3;

/// The sleep cost assumed until the first sleep is measured: a `poll(2)` round on a few
/// AF_XDP sockets with a context switch, as measured on the bench machine (veth, 2 sockets).
pub const INITIAL_SLEEP_COST: Duration = Duration::from_micros(8);

/// Bounds on a measured sleep cost: below, clock granularity; above, a preempted measurement
/// (the thread's CPU time then includes whatever ran before the wake-up was served).
const MIN_SLEEP_COST_NS: u64 = 1_000;
const MAX_SLEEP_COST_NS: u64 = 200_000;

/// A gap sample counts at most this many sleep costs: a long silence says "sleep" as clearly
/// as a short one, and a bounded sample keeps the mean quick to follow traffic that returns.
const GAP_CLAMP_COSTS: u64 = 4;

/// One worker's polling policy state.
#[derive(Debug, Clone)]
pub struct SpinPolicy {
    mode: SpinMode,
    /// `xdp.idle_spin_us`, ns: the longest spin either mode does.
    cap_ns: u64,
    /// Mean quiet gap, ns (samples clamped to `GAP_CLAMP_COSTS` sleep costs). Starts at the
    /// clamp: a worker that has seen no traffic sleeps at once.
    gap_ns: u64,
    /// Mean thread CPU of one sleep round, ns, within `MIN_SLEEP_COST_NS..=MAX_SLEEP_COST_NS`.
    sleep_cost_ns: u64,
}

fn ewma(mean: u64, sample: u64) -> u64 {
    // mean + (sample - mean) / 2^k, in integers; exact enough at ns.
    let k = EWMA_SHIFT;
    ((mean << k) - mean + sample) >> k
}

impl SpinPolicy {
    pub fn new(mode: SpinMode, cap: Duration) -> SpinPolicy {
        let sleep_cost_ns = INITIAL_SLEEP_COST.as_nanos() as u64;
        SpinPolicy {
            mode,
            cap_ns: u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX),
            gap_ns: sleep_cost_ns * GAP_CLAMP_COSTS,
            sleep_cost_ns,
        }
    }

    /// A quiet gap ended: work arrived `gap` after the last turn that did work.
    pub fn arrived_after(&mut self, gap: Duration) {
        let clamp = self.sleep_cost_ns * GAP_CLAMP_COSTS;
        let sample = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX).min(clamp);
        self.gap_ns = ewma(self.gap_ns, sample);
    }

    /// A sleep round (the `poll(2)` call, asleep and awake again) cost `cpu` of the thread's
    /// CPU time.
    pub fn slept(&mut self, cpu: Duration) {
        let sample = u64::try_from(cpu.as_nanos())
            .unwrap_or(u64::MAX)
            .clamp(MIN_SLEEP_COST_NS, MAX_SLEEP_COST_NS);
        self.sleep_cost_ns = ewma(self.sleep_cost_ns, sample);
    }

    /// How long to keep polling after the last turn that did work before sleeping.
    pub fn spin_for(&self) -> Duration {
        let ns = match self.mode {
            SpinMode::Fixed => self.cap_ns,
            SpinMode::Adaptive if self.gap_ns < self.sleep_cost_ns => {
                self.sleep_cost_ns.min(self.cap_ns)
            }
            SpinMode::Adaptive => 0,
        };
        Duration::from_nanos(ns)
    }

    /// The mean quiet gap (for tests and diagnostics).
    pub fn mean_gap(&self) -> Duration {
        Duration::from_nanos(self.gap_ns)
    }

    /// The mean sleep-round cost.
    pub fn sleep_cost(&self) -> Duration {
        Duration::from_nanos(self.sleep_cost_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_micros(200);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_worker_that_saw_no_traffic_sleeps_at_once() {
        let p = SpinPolicy::new(SpinMode::Adaptive, CAP);
        assert_eq!(p.spin_for(), Duration::ZERO);
    }

    #[test]
    fn short_gaps_make_it_spin_for_the_sleep_cost_only() {
        let mut p = SpinPolicy::new(SpinMode::Adaptive, CAP);
        p.slept(us(10));
        for _ in 0..40 {
            p.arrived_after(us(2));
        }
        assert!(p.mean_gap() < us(3), "{:?}", p.mean_gap());
        // Spinning longer than a sleep costs never pays: the cost, not the cap.
        let cost = p.sleep_cost();
        assert_eq!(p.spin_for(), cost);
        assert!(cost < CAP);
    }

    #[test]
    fn gaps_longer_than_a_sleep_make_it_sleep() {
        let mut p = SpinPolicy::new(SpinMode::Adaptive, CAP);
        for _ in 0..40 {
            p.arrived_after(us(2));
        }
        assert!(p.spin_for() > Duration::ZERO);
        // Traffic thins out to one burst every 50 µs, against a sleep of about 8 µs.
        for _ in 0..40 {
            p.arrived_after(us(50));
        }
        assert_eq!(p.spin_for(), Duration::ZERO);
    }

    #[test]
    fn one_long_silence_does_not_outweigh_a_steady_short_rhythm() {
        let mut p = SpinPolicy::new(SpinMode::Adaptive, CAP);
        for _ in 0..40 {
            p.arrived_after(us(1));
        }
        // A 10 s pause counts as GAP_CLAMP_COSTS sleep costs, not 10 s.
        p.arrived_after(Duration::from_secs(10));
        assert!(p.spin_for() > Duration::ZERO, "{:?}", p.mean_gap());
        // Many pauses do turn it to sleeping, and a return of the rhythm turns it back soon.
        for _ in 0..40 {
            p.arrived_after(Duration::from_secs(10));
        }
        assert_eq!(p.spin_for(), Duration::ZERO);
        let mut back = 0;
        while p.spin_for() == Duration::ZERO {
            p.arrived_after(us(1));
            back += 1;
            assert!(back < 20, "still sleeping after {back} short gaps");
        }
    }

    #[test]
    fn the_cap_bounds_the_spin_and_zero_means_never() {
        let mut p = SpinPolicy::new(SpinMode::Adaptive, us(3));
        p.slept(us(100));
        for _ in 0..40 {
            p.arrived_after(us(1));
        }
        assert_eq!(p.spin_for(), us(3));
        let mut never = SpinPolicy::new(SpinMode::Adaptive, Duration::ZERO);
        for _ in 0..40 {
            never.arrived_after(Duration::ZERO);
        }
        assert_eq!(never.spin_for(), Duration::ZERO);
        assert_eq!(
            SpinPolicy::new(SpinMode::Fixed, Duration::ZERO).spin_for(),
            Duration::ZERO
        );
    }

    #[test]
    fn fixed_mode_always_spins_the_cap() {
        let mut p = SpinPolicy::new(SpinMode::Fixed, CAP);
        assert_eq!(p.spin_for(), CAP);
        for _ in 0..40 {
            p.arrived_after(Duration::from_millis(5));
        }
        assert_eq!(p.spin_for(), CAP);
    }

    #[test]
    fn measured_sleep_costs_are_bounded() {
        let mut p = SpinPolicy::new(SpinMode::Adaptive, CAP);
        for _ in 0..100 {
            p.slept(Duration::ZERO);
        }
        assert!(p.sleep_cost() >= Duration::from_nanos(MIN_SLEEP_COST_NS));
        for _ in 0..100 {
            p.slept(Duration::from_secs(1));
        }
        assert!(p.sleep_cost() <= Duration::from_nanos(MAX_SLEEP_COST_NS));
    }
}
