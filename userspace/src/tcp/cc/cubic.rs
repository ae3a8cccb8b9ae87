//! CUBIC (RFC 9438): the window follows W_cubic(t) = C·(t − K)³ + W_max after a loss, concave
//! below W_max and convex above it, with a Reno-friendly floor W_est.
//!
//! Implements §4.2 (the curve and K = ∛((W_max − cwnd_epoch)/C)), §4.3 (the Reno-friendly region
//! with α_cubic = 3(1 − β)/(1 + β), then 1 once W_est reaches cwnd_prior), §4.4/§4.5 (the per-ACK
//! step (target − cwnd)/cwnd with target = W_cubic(t + RTT) clamped to [cwnd, 1.5·cwnd]), §4.6
//! (multiplicative decrease by β_cubic = 0.7), §4.7 (fast convergence) and §4.8 (after an RTO:
//! Reno's loss window, then a first epoch with K = 0 and W_max = cwnd at its start). Slow start
//! and loss recovery are Reno's, shared with [`super::newreno`] through [`super::Recovery`].
//!
//! Not done: HyStart++ (RFC 9406) and §4.9's undo of spurious congestion events. The curve is
//! computed in `f64` segments as the RFC states it; the interface stays in bytes.

use super::{initial_window, slow_start_increase, Ack, AckOutcome, CongestionControl, Recovery};
use crate::tcp::time::{Duration, Instant};

/// RFC 9438 §5: C = 0.4 segments/s³.
pub const C: f64 = 0.4;
/// RFC 9438 §4.6: multiplicative decrease factor.
pub const BETA: f64 = 0.7;
/// RFC 9438 §4.3: α_cubic = 3(1 − β)/(1 + β), the Reno-friendly additive increase below
/// cwnd_prior.
pub const ALPHA: f64 = 3.0 * (1.0 - BETA) / (1.0 + BETA);

/// RFC 9438 §4.2 eq. 1: W_cubic(t) = C·(t − K)³ + W_max, in segments, `t` and `k` in seconds.
pub fn w_cubic(t: f64, k: f64, w_max: f64) -> f64 {
    C * (t - k).powi(3) + w_max
}

/// RFC 9438 §4.2 eq. 2: K = ∛((W_max − cwnd_epoch)/C), in seconds (0 if cwnd_epoch ≥ W_max).
pub fn k_for(w_max: f64, cwnd_epoch: f64) -> f64 {
    ((w_max - cwnd_epoch).max(0.0) / C).cbrt()
}

/// One congestion-avoidance epoch (RFC 9438 §4.2): starts at the first ACK in congestion
/// avoidance after slow start, recovery or a timeout.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Epoch {
    /// t_epoch.
    start: Instant,
    /// K for this epoch, seconds.
    k: f64,
    /// W_est (§4.3), segments; starts at cwnd_epoch.
    w_est: f64,
}

/// RFC 9438 state of one connection.
#[derive(Clone, Debug)]
pub struct Cubic {
    /// Sender MSS in bytes, > 0.
    mss: u32,
    /// Congestion window in bytes (fractional, so that per-ACK steps smaller than a byte add up);
    /// never below one MSS.
    cwnd: f64,
    /// Slow-start threshold in bytes; `u32::MAX` until the first congestion event.
    ssthresh: u32,
    /// W_max, segments: the window before the last reduction (after fast convergence); 0 before
    /// the first congestion event.
    w_max: f64,
    /// cwnd_prior, segments: the window just before the last reduction (§4.3's switch of α).
    cwnd_prior: f64,
    /// The current congestion-avoidance epoch; `None` in slow start, in recovery, and until the
    /// first congestion-avoidance ACK after any of them.
    epoch: Option<Epoch>,
    /// The next epoch follows a timeout: §4.8 sets K = 0 and W_max = cwnd at its start.
    after_rto: bool,
    /// Last smoothed RTT reported with an ACK (the "RTT" of §4.4's target).
    rtt: Duration,
    /// RFC 6582 fast-recovery state.
    recovery: Recovery,
    /// An RTO fired with no new data acknowledged since (repeat timeouts keep ssthresh).
    rto_pending: bool,
}

impl Cubic {
    /// A fresh controller: IW per RFC 6928, ssthresh unbounded.
    pub fn new(mss: u32) -> Cubic {
        let mss = mss.max(1);
        Cubic {
            mss,
            cwnd: f64::from(initial_window(mss)),
            ssthresh: u32::MAX,
            w_max: 0.0,
            cwnd_prior: 0.0,
            epoch: None,
            after_rto: false,
            rtt: Duration::ZERO,
            recovery: Recovery::default(),
            rto_pending: false,
        }
    }

    /// W_max in segments (0 before the first congestion event).
    pub fn w_max(&self) -> f64 {
        self.w_max
    }

    /// K of the current epoch in seconds, if one is running.
    pub fn k(&self) -> Option<f64> {
        self.epoch.map(|e| e.k)
    }

    /// W_est of the current epoch in segments, if one is running.
    pub fn w_est(&self) -> Option<f64> {
        self.epoch.map(|e| e.w_est)
    }

    fn segments(&self) -> f64 {
        self.cwnd / f64::from(self.mss)
    }

    /// §4.6 multiplicative decrease with §4.7 fast convergence; shared by loss and timeout.
    fn reduce(&mut self) {
        let cwnd = self.segments();
        // §4.7: a flow that lost before reaching its previous W_max releases bandwidth faster.
        self.w_max = if cwnd < self.w_max {
            cwnd * (1.0 + BETA) / 2.0
        } else {
            cwnd
        };
        self.cwnd_prior = cwnd;
        let ssthresh = (self.cwnd * BETA).max(f64::from(2 * self.mss));
        self.ssthresh = ssthresh as u32;
        self.epoch = None;
    }

    fn congestion_avoidance(&mut self, bytes_acked: u32, now: Instant) {
        let mss = f64::from(self.mss);
        let cwnd = self.segments();
        let epoch = match self.epoch {
            Some(e) => e,
            None => {
                // §4.8: the first epoch after a timeout starts its curve at the current window
                // (K = 0). Likewise when there is no higher W_max to approach (no congestion event
                // yet, or slow start overshot it): there is nothing to be cautious about, so
                // probe on the convex part straight away.
                if self.after_rto || self.w_max < cwnd {
                    self.w_max = cwnd;
                }
                self.after_rto = false;
                let e = Epoch {
                    start: now,
                    k: k_for(self.w_max, cwnd),
                    w_est: cwnd,
                };
                self.epoch = Some(e);
                e
            }
        };
        let t = (now - epoch.start).as_secs_f64();
        let acked = f64::from(bytes_acked) / mss;

        // §4.3: W_est grows like Reno with α_cubic, then α = 1 once it reaches cwnd_prior.
        let alpha = if epoch.w_est >= self.cwnd_prior {
            1.0
        } else {
            ALPHA
        };
        let w_est = epoch.w_est + alpha * acked / cwnd;
        self.epoch = Some(Epoch { w_est, ..epoch });

        let new = if w_cubic(t, epoch.k, self.w_max) < w_est {
            // §4.3: the Reno-friendly region; CUBIC is at least as fast as Reno.
            w_est
        } else {
            // §4.4 (concave) / §4.5 (convex): move towards W_cubic one RTT ahead.
            let ahead = t + self.rtt.as_secs_f64();
            let target = w_cubic(ahead, epoch.k, self.w_max).clamp(cwnd, 1.5 * cwnd);
            cwnd + (target - cwnd) / cwnd * acked
        };
        self.cwnd = (new * mss).max(self.cwnd).min(f64::from(u32::MAX));
    }
}

impl CongestionControl for Cubic {
    fn on_ack(&mut self, ack: &Ack, now: Instant) -> AckOutcome {
        self.rto_pending = false;
        if let Some(rtt) = ack.rtt {
            self.rtt = rtt;
        }
        let outcome = self.recovery.classify(ack.ack);
        let mss = f64::from(self.mss);
        match outcome {
            AckOutcome::Normal => {
                if self.cwnd < f64::from(self.ssthresh) {
                    self.epoch = None;
                    self.cwnd += f64::from(slow_start_increase(ack.bytes_acked, self.mss));
                } else {
                    self.congestion_avoidance(ack.bytes_acked, now);
                }
            }
            // RFC 6582 §3.2 step 3, as in NewReno.
            AckOutcome::PartialAck => {
                self.cwnd -= f64::from(ack.bytes_acked).min(self.cwnd);
                if ack.bytes_acked >= self.mss {
                    self.cwnd += mss;
                }
                self.cwnd = self.cwnd.max(mss);
            }
            // Full ACK: the reduced window (RFC 6582 option 1); the next ACK starts the epoch.
            AckOutcome::RecoveryExited => {
                let cap = f64::from(ack.flight_size.max(self.mss)) + mss;
                self.cwnd = f64::from(self.ssthresh).min(cap);
                self.epoch = None;
            }
        }
        outcome
    }

    fn on_dup_ack(&mut self, _now: Instant) {
        if self.recovery.active {
            self.cwnd += f64::from(self.mss);
        }
    }

    fn on_fast_retransmit(
        &mut self,
        snd_una: u32,
        snd_nxt: u32,
        _flight_size: u32,
        _now: Instant,
    ) -> bool {
        if !self.recovery.may_enter(snd_una) {
            return false;
        }
        // §4.6 uses cwnd (not FlightSize) for both W_max and ssthresh.
        self.reduce();
        self.cwnd = f64::from(self.ssthresh.saturating_add(3 * self.mss));
        self.recovery.enter(snd_nxt);
        true
    }

    fn on_rto(&mut self, snd_nxt: u32, _flight_size: u32, _now: Instant) {
        if !self.rto_pending {
            self.reduce();
        }
        // §4.8: Reno's loss window of one segment, then K = 0 at the next epoch.
        self.cwnd = f64::from(self.mss);
        self.epoch = None;
        self.after_rto = true;
        self.recovery.on_rto(snd_nxt);
        self.rto_pending = true;
    }

    fn set_mss(&mut self, mss: u32) {
        let mss = mss.max(1);
        let ratio = f64::from(mss) / f64::from(self.mss);
        self.cwnd = (self.cwnd * ratio).max(f64::from(mss));
        if self.ssthresh != u32::MAX {
            self.ssthresh = ((f64::from(self.ssthresh) * ratio) as u32).max(2 * mss);
        }
        self.mss = mss;
    }

    fn cwnd(&self) -> u32 {
        self.cwnd as u32
    }

    fn ssthresh(&self) -> u32 {
        self.ssthresh
    }

    fn in_recovery(&self) -> bool {
        self.recovery.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u32 = 1000;

    fn ack(ack: u32, bytes_acked: u32, flight_size: u32, rtt: Duration) -> Ack {
        Ack {
            ack,
            bytes_acked,
            flight_size,
            rtt: Some(rtt),
        }
    }

    fn segs(cc: &Cubic) -> f64 {
        f64::from(cc.cwnd()) / f64::from(MSS)
    }

    /// A controller that has just left recovery after a loss at `w` segments, at time `now`.
    #[track_caller]
    fn after_loss_at(w: u32, now: Instant) -> Cubic {
        let mut cc = Cubic::new(MSS);
        cc.cwnd = f64::from(w * MSS);
        assert!(
            cc.on_fast_retransmit(0, w * MSS, w * MSS, now),
            "enter recovery"
        );
        let out = cc.on_ack(&ack(w * MSS, w * MSS, w * MSS, ms(100)), now);
        assert_eq!(out, AckOutcome::RecoveryExited, "full ACK");
        cc
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// One RTT of ACK clocking: a window's worth of one-segment ACKs at `now`.
    fn ack_window(cc: &mut Cubic, una: &mut u32, now: Instant, rtt: Duration) {
        let n = cc.cwnd() / MSS;
        for _ in 0..n {
            *una = una.wrapping_add(MSS);
            cc.on_ack(&ack(*una, MSS, 0, rtt), now);
        }
    }

    #[test]
    fn constants() {
        assert!((ALPHA - 0.9 / 1.7).abs() < 1e-12, "α_cubic = 3(1-β)/(1+β)");
        assert!(
            (k_for(100.0, 70.0) - 75f64.cbrt()).abs() < 1e-12,
            "K = cbrt(30/0.4)"
        );
        assert_eq!(k_for(50.0, 70.0), 0.0, "K = 0 above W_max");
        assert!((w_cubic(k_for(100.0, 70.0), k_for(100.0, 70.0), 100.0) - 100.0).abs() < 1e-9);
        assert!(
            (w_cubic(0.0, 75f64.cbrt(), 100.0) - 70.0).abs() < 1e-9,
            "W(0) = cwnd_epoch"
        );
    }

    #[test]
    fn slow_start_doubles_per_rtt() {
        let mut cc = Cubic::new(MSS);
        let mut una = 0;
        for round in 1..=3u32 {
            ack_window(
                &mut cc,
                &mut una,
                Instant::from_millis(u64::from(round)),
                ms(50),
            );
            assert_eq!(cc.cwnd(), (10 * MSS) << round, "doubled after RTT {round}");
        }
        assert_eq!(cc.k(), None, "no epoch in slow start");
    }

    #[test]
    fn loss_multiplies_by_beta() {
        let cc = after_loss_at(100, Instant::from_secs(1));
        assert_eq!(cc.ssthresh(), 70 * MSS, "ssthresh = 0.7 cwnd");
        assert_eq!(cc.cwnd(), 70 * MSS, "cwnd = ssthresh after recovery");
        assert_eq!(cc.w_max(), 100.0, "W_max = cwnd before the loss");
    }

    #[test]
    fn recovery_inflates_like_reno() {
        let mut cc = Cubic::new(MSS);
        cc.cwnd = f64::from(100 * MSS);
        let now = Instant::from_secs(1);
        assert!(cc.on_fast_retransmit(0, 100 * MSS, 100 * MSS, now), "enter");
        assert_eq!(cc.cwnd(), 73 * MSS, "ssthresh + 3 SMSS");
        cc.on_dup_ack(now);
        assert_eq!(cc.cwnd(), 74 * MSS, "dup ACK inflates");
        let out = cc.on_ack(&ack(2 * MSS, 2 * MSS, 98 * MSS, ms(10)), now);
        assert_eq!(out, AckOutcome::PartialAck, "partial");
        assert_eq!(cc.cwnd(), 73 * MSS, "deflate 2, add back 1");
    }

    #[test]
    fn growth_follows_the_cubic_curve() {
        let rtt = ms(100);
        let t0 = Instant::from_secs(10);
        let mut cc = after_loss_at(100, t0);
        let k = 75f64.cbrt();
        let mut una = 100 * MSS;
        for round in 0..80u64 {
            let now = t0 + rtt * round as u32;
            ack_window(&mut cc, &mut una, now, rtt);
            assert!(
                (cc.k().expect("epoch running") - k).abs() < 1e-9,
                "K unchanged"
            );
            let t = (now - t0).as_secs_f64();
            let w = segs(&cc);
            // Per-ACK steps of (target − cwnd)/cwnd close most of the gap to W_cubic(t + RTT)
            // within one window of ACKs, so cwnd sits between the curve now and one RTT ahead
            // (or on W_est where the Reno-friendly region takes over, §4.3).
            let w_est = cc.w_est().expect("epoch");
            let upper = w_cubic(t + 0.1, k, 100.0).max(w_est) + 1.0;
            assert!(
                w >= w_cubic(t, k, 100.0) - 1.0 && w <= upper,
                "round {round}: cwnd {w} vs W_cubic({t}) = {}, W_est {w_est}",
                w_cubic(t, k, 100.0)
            );
            // At t = 0 both start from cwnd_epoch and W_est's first increments put it ahead;
            // from the next RTT on the curve leads until the plateau near K, where W_est (by
            // then growing at α = 1) catches up with the flat curve.
            if (1..=45).contains(&round) {
                assert!(
                    cc.w_est().expect("epoch") < w_cubic(t, k, 100.0),
                    "round {round}: CUBIC region, not Reno-friendly, at RTT 100 ms"
                );
            }
        }
    }

    #[test]
    fn concave_then_convex() {
        let rtt = ms(100);
        let t0 = Instant::from_secs(10);
        let mut cc = after_loss_at(100, t0);
        let mut una = 100 * MSS;
        let mut w = Vec::new();
        for round in 0..80u64 {
            ack_window(&mut cc, &mut una, t0 + rtt * round as u32, rtt);
            w.push(segs(&cc));
        }
        let growth = |r: usize| w[r + 1] - w[r];
        // K ≈ 4.2 s ≈ round 42.
        assert!(
            growth(5) > growth(20),
            "concave: growth slows towards W_max"
        );
        assert!(growth(20) > growth(38), "concave: still slowing");
        assert!(growth(38) < 1.0, "plateau near W_max");
        assert!(
            (w[42] - 100.0).abs() < 2.0,
            "cwnd ≈ W_max at t = K, got {}",
            w[42]
        );
        assert!(
            growth(60) > growth(48),
            "convex: growth accelerates beyond W_max"
        );
        assert!(growth(75) > growth(60), "convex: still accelerating");
        assert!(w[79] > 110.0, "probing beyond W_max, got {}", w[79]);
    }

    #[test]
    fn reno_friendly_region_dominates_at_small_rtt() {
        let rtt = ms(1);
        let t0 = Instant::from_secs(10);
        let mut cc = after_loss_at(100, t0);
        let mut una = 100 * MSS;
        let k = 75f64.cbrt();
        for round in 0..300u64 {
            ack_window(&mut cc, &mut una, t0 + rtt * round as u32, rtt);
        }
        let t = 0.299;
        let w = segs(&cc);
        let w_est = cc.w_est().expect("epoch");
        assert!(
            w > w_cubic(t + 0.001, k, 100.0) + 50.0,
            "Reno-friendly window {w} well above W_cubic {}",
            w_cubic(t, k, 100.0)
        );
        assert!((w - w_est).abs() < 1.0, "cwnd tracks W_est: {w} vs {w_est}");
        // W_est: α ≈ 0.53 per RTT up to cwnd_prior = 100 (≈ 57 RTTs), then 1 per RTT for the
        // remaining ≈ 243: about 343 segments.
        assert!(
            w > 330.0 && w < 355.0,
            "about Reno's growth over 300 RTTs, got {w}"
        );
    }

    #[test]
    fn fast_convergence_lowers_w_max() {
        let t0 = Instant::from_secs(1);
        let mut cc = after_loss_at(100, t0);
        cc.cwnd = f64::from(80 * MSS);
        assert!(
            cc.on_fast_retransmit(100 * MSS + 1, 200 * MSS, 80 * MSS, t0),
            "2nd loss"
        );
        assert!(
            (cc.w_max() - 80.0 * 1.7 / 2.0).abs() < 1e-9,
            "W_max = cwnd (1 + β) / 2 when below the previous W_max, got {}",
            cc.w_max()
        );
        assert_eq!(cc.ssthresh(), 56 * MSS, "ssthresh = 0.7 × 80");
    }

    #[test]
    fn rto_resets_to_one_segment_then_k_is_zero() {
        let t0 = Instant::from_secs(1);
        let mut cc = after_loss_at(100, t0);
        cc.on_rto(100 * MSS, 70 * MSS, t0);
        assert_eq!(cc.cwnd(), MSS, "loss window of one segment");
        assert_eq!(cc.ssthresh(), 49 * MSS, "ssthresh = β × cwnd");
        cc.on_rto(100 * MSS, 70 * MSS, t0 + ms(400));
        assert_eq!(cc.ssthresh(), 49 * MSS, "repeated timeout keeps ssthresh");
        let mut una = 100 * MSS;
        let rtt = ms(50);
        let mut now = t0 + Duration::from_secs(1);
        while cc.cwnd() < cc.ssthresh() {
            ack_window(&mut cc, &mut una, now, rtt);
            now += rtt;
        }
        let at_start = segs(&cc);
        ack_window(&mut cc, &mut una, now, rtt);
        assert_eq!(
            cc.k(),
            Some(0.0),
            "§4.8: K = 0 in the first epoch after a timeout"
        );
        assert!(
            cc.w_max() >= 49.0 && cc.w_max() <= at_start + 1.0,
            "W_max = cwnd at the start of the epoch, got {}",
            cc.w_max()
        );
    }
}
