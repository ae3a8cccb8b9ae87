//! NewReno: RFC 5681 slow start, congestion avoidance and fast retransmit/recovery, with RFC
//! 6582's recovery point for several losses in one window, RFC 3465 byte counting (L = 2·SMSS)
//! and RFC 6928's initial window.
//!
//! Owns the window arithmetic only; see [`super`] for who detects loss. Not done: RFC 7661
//! (congestion-window validation for application-limited senders) and RFC 6582's "less
//! aggressive" ssthresh heuristics; the connection may simply not call [`NewReno::on_ack`]
//! growth-wise while it is application-limited.

use super::{
    half_flight, initial_window, slow_start_increase, Ack, AckOutcome, CongestionControl, Recovery,
};
use crate::tcp::time::Instant;

/// RFC 5681 + RFC 6582 state of one connection.
#[derive(Clone, Debug)]
pub struct NewReno {
    /// Sender MSS (SMSS) in bytes, > 0.
    mss: u32,
    /// Congestion window in bytes; never below one SMSS.
    cwnd: u32,
    /// Slow-start threshold in bytes; `u32::MAX` until the first loss (RFC 5681 §3.1: "arbitrarily
    /// high").
    ssthresh: u32,
    /// Bytes acknowledged in congestion avoidance since cwnd last grew; < cwnd after each ACK
    /// (RFC 3465 §2.1: one SMSS per cwnd's worth of ACKed bytes).
    bytes_acked: u32,
    /// RFC 6582 fast-recovery state.
    recovery: Recovery,
    /// An RTO fired and no new data has been acknowledged since: a repeated timeout for the same
    /// data must not lower ssthresh again (RFC 5681 §3.1, after eq. 4).
    rto_pending: bool,
}

impl NewReno {
    /// A fresh controller: IW per RFC 6928, ssthresh unbounded.
    pub fn new(mss: u32) -> NewReno {
        let mss = mss.max(1);
        NewReno {
            mss,
            cwnd: initial_window(mss),
            ssthresh: u32::MAX,
            bytes_acked: 0,
            recovery: Recovery::default(),
            rto_pending: false,
        }
    }

    fn grow(&mut self, bytes_acked: u32) {
        if self.cwnd < self.ssthresh {
            // RFC 5681 §3.1 with RFC 3465's L = 2·SMSS.
            self.cwnd = self
                .cwnd
                .saturating_add(slow_start_increase(bytes_acked, self.mss));
            return;
        }
        // RFC 5681 §3.1 eq. 3 in its byte-counting form (RFC 3465 §2.1).
        self.bytes_acked = self.bytes_acked.saturating_add(bytes_acked);
        if self.bytes_acked >= self.cwnd {
            self.bytes_acked -= self.cwnd;
            self.cwnd = self.cwnd.saturating_add(self.mss);
        }
    }
}

impl CongestionControl for NewReno {
    fn on_ack(&mut self, ack: &Ack, _now: Instant) -> AckOutcome {
        self.rto_pending = false;
        let outcome = self.recovery.classify(ack.ack);
        match outcome {
            AckOutcome::Normal => self.grow(ack.bytes_acked),
            // RFC 6582 §3.2 step 3: deflate by the new data acknowledged, add back one SMSS if at
            // least one SMSS was acknowledged, so roughly ssthresh worth stays in flight.
            AckOutcome::PartialAck => {
                self.cwnd = self.cwnd.saturating_sub(ack.bytes_acked);
                if ack.bytes_acked >= self.mss {
                    self.cwnd = self.cwnd.saturating_add(self.mss);
                }
                self.cwnd = self.cwnd.max(self.mss);
            }
            // RFC 6582 §3.2 step 3, full ACK, option (1): min(ssthresh, max(FlightSize, SMSS) +
            // SMSS) avoids a burst when little is left in flight.
            AckOutcome::RecoveryExited => {
                self.cwnd = self
                    .ssthresh
                    .min(ack.flight_size.max(self.mss).saturating_add(self.mss));
                self.bytes_acked = 0;
            }
        }
        outcome
    }

    fn on_dup_ack(&mut self, _now: Instant) {
        // RFC 5681 §3.2 step 4: each further duplicate means one more segment has left.
        if self.recovery.active {
            self.cwnd = self.cwnd.saturating_add(self.mss);
        }
    }

    fn on_fast_retransmit(
        &mut self,
        snd_una: u32,
        snd_nxt: u32,
        flight_size: u32,
        _now: Instant,
    ) -> bool {
        if !self.recovery.may_enter(snd_una) {
            return false;
        }
        // RFC 5681 §3.2 steps 2–3 (RFC 6582 §3.2 step 2): halve, then inflate by the three
        // segments the duplicate ACKs say have left the network.
        self.ssthresh = half_flight(flight_size, self.mss);
        self.cwnd = self.ssthresh.saturating_add(3 * self.mss);
        self.bytes_acked = 0;
        self.recovery.enter(snd_nxt);
        true
    }

    fn on_rto(&mut self, snd_nxt: u32, flight_size: u32, _now: Instant) {
        if !self.rto_pending {
            self.ssthresh = half_flight(flight_size, self.mss);
        }
        // RFC 5681 §3.1: the loss window is one segment.
        self.cwnd = self.mss;
        self.bytes_acked = 0;
        self.recovery.on_rto(snd_nxt);
        self.rto_pending = true;
    }

    fn set_mss(&mut self, mss: u32) {
        let mss = mss.max(1);
        self.cwnd = rescale(self.cwnd, self.mss, mss).max(mss);
        if self.ssthresh != u32::MAX {
            self.ssthresh = rescale(self.ssthresh, self.mss, mss).max(2 * mss);
        }
        self.bytes_acked = rescale(self.bytes_acked, self.mss, mss);
        self.mss = mss;
    }

    fn cwnd(&self) -> u32 {
        self.cwnd
    }

    fn ssthresh(&self) -> u32 {
        self.ssthresh
    }

    fn in_recovery(&self) -> bool {
        self.recovery.active
    }
}

/// `bytes` counted in segments of `from` bytes, re-expressed in segments of `to` bytes.
fn rescale(bytes: u32, from: u32, to: u32) -> u32 {
    u32::try_from(u64::from(bytes) * u64::from(to) / u64::from(from)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::time::Duration;

    const MSS: u32 = 1000;

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn ack(ack: u32, bytes_acked: u32, flight_size: u32) -> Ack {
        Ack {
            ack,
            bytes_acked,
            flight_size,
            rtt: Some(Duration::from_millis(50)),
        }
    }

    /// Acknowledge one full window, one segment per ACK; returns the new SND.UNA.
    #[track_caller]
    fn ack_window(cc: &mut NewReno, mut una: u32, now: Instant) -> u32 {
        let segments = cc.cwnd() / MSS;
        for _ in 0..segments {
            una += MSS;
            assert_eq!(
                cc.on_ack(&ack(una, MSS, 0), now),
                AckOutcome::Normal,
                "plain ACK"
            );
        }
        una
    }

    #[test]
    fn slow_start_doubles_per_rtt() {
        let mut cc = NewReno::new(MSS);
        assert_eq!(cc.cwnd(), 10 * MSS, "IW10");
        let mut una = 0;
        for round in 1..=4u32 {
            una = ack_window(&mut cc, una, t(u64::from(round) * 50));
            assert_eq!(cc.cwnd(), (10 * MSS) << round, "doubled after RTT {round}");
        }
    }

    #[test]
    fn abc_caps_growth_per_ack_at_two_segments() {
        let mut cc = NewReno::new(MSS);
        cc.on_ack(&ack(8 * MSS, 8 * MSS, 2 * MSS), t(0));
        assert_eq!(
            cc.cwnd(),
            12 * MSS,
            "stretch ACK of 8 segments grows by L = 2 SMSS"
        );
        cc.on_ack(&ack(8 * MSS + 100, 100, 0), t(1));
        assert_eq!(
            cc.cwnd(),
            12 * MSS + 100,
            "sub-MSS ACK grows by the bytes acked"
        );
    }

    #[test]
    fn congestion_avoidance_adds_one_segment_per_window() {
        let mut cc = NewReno::new(MSS);
        cc.on_rto(10_000, 20 * MSS, t(0));
        assert_eq!(cc.ssthresh(), 10 * MSS, "half of flight");
        // Slow start back to ssthresh from one segment: 1, 2, 4, 8, 16 > 10.
        let mut una = 0;
        while cc.cwnd() < cc.ssthresh() {
            una = ack_window(&mut cc, una, t(10));
        }
        let start = cc.cwnd();
        una = ack_window(&mut cc, una, t(20));
        assert_eq!(cc.cwnd(), start + MSS, "one SMSS per window in CA");
        ack_window(&mut cc, una, t(30));
        assert_eq!(cc.cwnd(), start + 2 * MSS, "and again");
    }

    #[test]
    fn fast_recovery_halves_inflates_and_exits() {
        let mut cc = NewReno::new(MSS);
        let mut una = ack_window(&mut cc, 0, t(0));
        assert_eq!(cc.cwnd(), 20 * MSS, "grown to 20 segments");
        let snd_nxt = una + 20 * MSS;
        assert!(
            cc.on_fast_retransmit(una, snd_nxt, 20 * MSS, t(10)),
            "enter recovery"
        );
        assert!(cc.in_recovery(), "in recovery");
        assert_eq!(cc.ssthresh(), 10 * MSS, "ssthresh = FlightSize / 2");
        assert_eq!(cc.cwnd(), 13 * MSS, "cwnd = ssthresh + 3 SMSS");
        cc.on_dup_ack(t(11));
        cc.on_dup_ack(t(12));
        assert_eq!(
            cc.cwnd(),
            15 * MSS,
            "each further dup ACK inflates by one SMSS"
        );
        assert!(
            !cc.on_fast_retransmit(una, snd_nxt, 20 * MSS, t(12)),
            "no re-entry while in recovery"
        );

        una += 3 * MSS;
        let out = cc.on_ack(&ack(una, 3 * MSS, 17 * MSS), t(20));
        assert_eq!(out, AckOutcome::PartialAck, "below recover");
        assert_eq!(cc.cwnd(), 13 * MSS, "deflate by 3 SMSS, add back one");
        una += 500;
        cc.on_ack(&ack(una, 500, 16 * MSS + 500), t(21));
        assert_eq!(
            cc.cwnd(),
            12 * MSS + 500,
            "sub-SMSS partial ACK: no add-back"
        );

        let out = cc.on_ack(&ack(snd_nxt, snd_nxt - una, 0), t(30));
        assert_eq!(out, AckOutcome::RecoveryExited, "full ACK");
        assert!(!cc.in_recovery(), "recovery over");
        assert_eq!(
            cc.cwnd(),
            2 * MSS,
            "min(ssthresh, max(flight, SMSS) + SMSS), flight = 0"
        );
    }

    #[test]
    fn full_ack_with_much_in_flight_sets_cwnd_to_ssthresh() {
        let mut cc = NewReno::new(MSS);
        assert!(cc.on_fast_retransmit(0, 10 * MSS, 10 * MSS, t(0)), "enter");
        let out = cc.on_ack(&ack(10 * MSS, 10 * MSS, 30 * MSS), t(1));
        assert_eq!(out, AckOutcome::RecoveryExited, "full ACK");
        assert_eq!(cc.cwnd(), 5 * MSS, "loss halved the window");
    }

    #[test]
    fn no_second_reduction_for_the_same_window() {
        let mut cc = NewReno::new(MSS);
        assert!(cc.on_fast_retransmit(0, 10 * MSS, 10 * MSS, t(0)), "enter");
        cc.on_ack(&ack(10 * MSS, 10 * MSS, 0), t(1));
        assert!(
            !cc.on_fast_retransmit(10 * MSS, 12 * MSS, 2 * MSS, t(2)),
            "dup ACKs at recover are echoes of the old loss (RFC 6582 step 2)"
        );
        assert!(
            cc.on_fast_retransmit(10 * MSS + 1, 12 * MSS, 2 * MSS, t(3)),
            "beyond recover: a new loss"
        );
    }

    #[test]
    fn rto_collapses_to_one_segment_once() {
        let mut cc = NewReno::new(MSS);
        assert!(cc.on_fast_retransmit(0, 10 * MSS, 10 * MSS, t(0)), "enter");
        cc.on_rto(10 * MSS, 10 * MSS, t(1000));
        assert_eq!(cc.cwnd(), MSS, "loss window");
        assert_eq!(cc.ssthresh(), 5 * MSS, "half of flight");
        assert!(!cc.in_recovery(), "timeout abandons recovery");
        cc.on_rto(10 * MSS, 2 * MSS, t(3000));
        assert_eq!(
            cc.ssthresh(),
            5 * MSS,
            "a repeated timeout does not lower ssthresh"
        );
        cc.on_ack(&ack(MSS, MSS, 9 * MSS), t(3100));
        assert_eq!(cc.cwnd(), 2 * MSS, "slow start again from one segment");
        assert!(
            !cc.on_fast_retransmit(MSS, 10 * MSS, 9 * MSS, t(3200)),
            "recover = SND.NXT at the timeout"
        );
    }

    #[test]
    fn mss_change_keeps_segment_counts() {
        let mut cc = NewReno::new(1460);
        cc.on_rto(0, 20 * 1460, t(0));
        cc.set_mss(1200);
        assert_eq!(cc.cwnd(), 1200, "one segment stays one segment");
        assert_eq!(cc.ssthresh(), 10 * 1200, "ten segments stay ten segments");
    }
}
