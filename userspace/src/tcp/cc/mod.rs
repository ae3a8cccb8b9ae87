//! Congestion control: the [`CongestionControl`] trait, the [`Cc`] enum that dispatches to an
//! algorithm without `dyn`, and what the algorithms share (RFC 6928's initial window, RFC 6582's
//! recovery point, RFC 3465's byte counting in slow start).
//!
//! Owns cwnd and ssthresh only. Loss *detection* (duplicate-ACK counting, SACK scoreboard, the
//! RTO timer) belongs to the connection, which tells the algorithm about the events below; what to
//! retransmit is also the connection's, guided by [`AckOutcome`]. One file per algorithm:
//! [`newreno`] (RFC 5681 + RFC 6582) and [`cubic`] (RFC 9438). Sequence numbers are `u32` compared
//! with wrapping arithmetic (RFC 9293 §3.4). Windows are in bytes.

pub mod cubic;
pub mod newreno;

use super::time::{Duration, Instant};

pub use cubic::Cubic;
pub use newreno::NewReno;

/// `a < b` in sequence space (RFC 9293 §3.4), valid while the two are within 2^31 of each other.
pub(crate) fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// RFC 6928's initial window: min(10·MSS, max(2·MSS, 14600)).
pub fn initial_window(mss: u32) -> u32 {
    (10 * mss).min((2 * mss).max(14_600))
}

/// What the connection reports with each ACK that acknowledges new data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The new SND.UNA (the ACK's cumulative acknowledgement).
    pub ack: u32,
    /// Bytes newly acknowledged by this ACK (SND.UNA advance).
    pub bytes_acked: u32,
    /// Bytes still outstanding after this ACK (SND.NXT − SND.UNA), i.e. RFC 5681's FlightSize.
    pub flight_size: u32,
    /// The current smoothed RTT, if there has been a sample (CUBIC reads it, RFC 9438 §4.2).
    pub rtt: Option<Duration>,
}

/// What an ACK meant for loss recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Not in recovery: the window grew as slow start or congestion avoidance says.
    Normal,
    /// RFC 6582 §3.2 step 3 partial ACK: still in recovery; the connection should retransmit
    /// the first unacknowledged segment now.
    PartialAck,
    /// RFC 6582 §3.2 step 3 full ACK (at or beyond "recover"): recovery is over.
    RecoveryExited,
}

/// The events a congestion controller reacts to. Implemented by each algorithm and by [`Cc`].
pub trait CongestionControl {
    /// An ACK acknowledged new data (SND.UNA advanced).
    fn on_ack(&mut self, ack: &Ack, now: Instant) -> AckOutcome;
    /// A duplicate ACK arrived while in fast recovery: each one means a segment left the network,
    /// so the window inflates by one SMSS (RFC 5681 §3.2 step 4, RFC 6582 §3.2 step 3).
    /// Ignored outside recovery: the connection counts duplicates and calls
    /// [`on_fast_retransmit`](Self::on_fast_retransmit) on the third.
    fn on_dup_ack(&mut self, now: Instant);
    /// The connection detected loss by duplicate ACKs or SACK and wants to fast-retransmit.
    /// `snd_una` is the cumulative ACK it saw, `snd_nxt` the highest sequence sent so far.
    /// Returns whether fast recovery was entered: RFC 6582 §3.2 step 2 refuses when the ACK does
    /// not cover "recover" (the duplicates are echoes of the last recovery's retransmissions),
    /// and it is a no-op while already in recovery.
    fn on_fast_retransmit(
        &mut self,
        snd_una: u32,
        snd_nxt: u32,
        flight_size: u32,
        now: Instant,
    ) -> bool;
    /// The retransmission timer fired (RFC 5681 §3.1 eq. 4 and the loss window; RFC 6582 §3.2
    /// step 4 sets "recover" to `snd_nxt`).
    fn on_rto(&mut self, snd_nxt: u32, flight_size: u32, now: Instant);
    /// The sender's MSS changed (PMTU); windows expressed in segments keep their meaning.
    fn set_mss(&mut self, mss: u32);
    /// The congestion window in bytes.
    fn cwnd(&self) -> u32;
    /// The slow-start threshold in bytes.
    fn ssthresh(&self) -> u32;
    /// Whether fast recovery is in progress.
    fn in_recovery(&self) -> bool;
}

/// Which algorithm a connection uses (from configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// RFC 5681 + RFC 6582.
    NewReno,
    /// RFC 9438, Linux's default too.
    #[default]
    Cubic,
}

/// The dispatcher: one variant per algorithm, a `match` per call instead of a vtable.
#[derive(Clone, Debug)]
pub enum Cc {
    /// RFC 5681 + RFC 6582.
    NewReno(NewReno),
    /// RFC 9438.
    Cubic(Cubic),
}

impl Cc {
    /// A controller of the chosen algorithm for a connection with sender MSS `mss`.
    pub fn new(algorithm: Algorithm, mss: u32) -> Cc {
        match algorithm {
            Algorithm::NewReno => Cc::NewReno(NewReno::new(mss)),
            Algorithm::Cubic => Cc::Cubic(Cubic::new(mss)),
        }
    }

    /// The algorithm behind this controller.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Cc::NewReno(_) => Algorithm::NewReno,
            Cc::Cubic(_) => Algorithm::Cubic,
        }
    }
}

/// Forwards one trait call to whichever algorithm is inside.
macro_rules! dispatch {
    ($self:ident, $cc:ident => $call:expr) => {
        match $self {
            Cc::NewReno($cc) => $call,
            Cc::Cubic($cc) => $call,
        }
    };
}

impl CongestionControl for Cc {
    fn on_ack(&mut self, ack: &Ack, now: Instant) -> AckOutcome {
        dispatch!(self, cc => cc.on_ack(ack, now))
    }
    fn on_dup_ack(&mut self, now: Instant) {
        dispatch!(self, cc => cc.on_dup_ack(now))
    }
    fn on_fast_retransmit(
        &mut self,
        snd_una: u32,
        snd_nxt: u32,
        flight_size: u32,
        now: Instant,
    ) -> bool {
        dispatch!(self, cc => cc.on_fast_retransmit(snd_una, snd_nxt, flight_size, now))
    }
    fn on_rto(&mut self, snd_nxt: u32, flight_size: u32, now: Instant) {
        dispatch!(self, cc => cc.on_rto(snd_nxt, flight_size, now))
    }
    fn set_mss(&mut self, mss: u32) {
        dispatch!(self, cc => cc.set_mss(mss))
    }
    fn cwnd(&self) -> u32 {
        dispatch!(self, cc => cc.cwnd())
    }
    fn ssthresh(&self) -> u32 {
        dispatch!(self, cc => cc.ssthresh())
    }
    fn in_recovery(&self) -> bool {
        dispatch!(self, cc => cc.in_recovery())
    }
}

/// RFC 6582's fast-recovery bookkeeping, shared by both algorithms (CUBIC keeps Reno's loss
/// recovery and changes only the window arithmetic, RFC 9438 §4.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// RFC 6582 "recover": the highest sequence sent when the last recovery or RTO began.
    /// `None` until the first one (RFC 6582 initialises it to the ISS, which no ACK can exceed
    /// ambiguity-free, so "no constraint yet" is the same rule).
    pub recover: Option<u32>,
    /// Fast recovery in progress; ends on an ACK at or beyond `recover`, or on an RTO.
    pub active: bool,
}

impl Recovery {
    /// RFC 6582 §3.2 step 2: enter only if the cumulative ACK covers more than "recover".
    pub fn may_enter(&self, snd_una: u32) -> bool {
        !self.active && self.recover.is_none_or(|r| seq_lt(r, snd_una))
    }

    /// Enter fast recovery with `recover = snd_nxt`.
    pub fn enter(&mut self, snd_nxt: u32) {
        self.recover = Some(snd_nxt);
        self.active = true;
    }

    /// RFC 6582 §3.2 step 3: classify an ACK of new data while in recovery.
    pub fn classify(&mut self, ack: u32) -> AckOutcome {
        if !self.active {
            return AckOutcome::Normal;
        }
        match self.recover {
            Some(r) if seq_lt(ack, r) => AckOutcome::PartialAck,
            _ => {
                self.active = false;
                AckOutcome::RecoveryExited
            }
        }
    }

    /// RFC 6582 §3.2 step 4: after a timeout, `recover = snd_nxt` and recovery is abandoned.
    pub fn on_rto(&mut self, snd_nxt: u32) {
        self.recover = Some(snd_nxt);
        self.active = false;
    }
}

/// RFC 3465 slow start with L = 2: grow by the bytes acknowledged, at most 2·SMSS per ACK.
pub(crate) fn slow_start_increase(bytes_acked: u32, mss: u32) -> u32 {
    bytes_acked.min(2 * mss)
}

/// RFC 5681 §3.1 eq. 4: ssthresh = max(FlightSize / 2, 2·SMSS).
pub(crate) fn half_flight(flight_size: u32, mss: u32) -> u32 {
    (flight_size / 2).max(2 * mss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_window_per_rfc_6928() {
        assert_eq!(
            initial_window(1460),
            14_600,
            "10 * 1460 = 14600 fits the cap"
        );
        assert_eq!(initial_window(536), 5_360, "small MSS: 10 segments");
        assert_eq!(initial_window(8960), 17_920, "jumbo MSS: 2 segments");
        assert_eq!(
            initial_window(4000),
            14_600,
            "cap of 14600 between 2 and 10 segments"
        );
    }

    #[test]
    fn seq_comparison_wraps() {
        assert!(seq_lt(1, 2), "plain");
        assert!(seq_lt(u32::MAX - 5, 10), "across the wrap");
        assert!(!seq_lt(10, u32::MAX - 5), "reverse across the wrap");
        assert!(!seq_lt(7, 7), "equal is not less");
    }

    #[test]
    fn recovery_point_rules() {
        let mut r = Recovery::default();
        assert!(r.may_enter(100), "no recovery yet: any ACK may enter");
        r.enter(5_000);
        assert!(!r.may_enter(6_000), "no re-entry while active");
        assert_eq!(r.classify(3_000), AckOutcome::PartialAck, "below recover");
        assert_eq!(r.classify(5_000), AckOutcome::RecoveryExited, "at recover");
        assert_eq!(r.classify(6_000), AckOutcome::Normal, "after exit");
        assert!(!r.may_enter(5_000), "ACK must cover more than recover");
        assert!(r.may_enter(5_001), "beyond recover: may enter");
        r.on_rto(u32::MAX - 10);
        assert!(!r.active, "RTO abandons recovery");
        assert!(r.may_enter(20), "recover compared across the wrap");
    }

    #[test]
    fn enum_dispatches_to_each_algorithm() {
        for alg in [Algorithm::NewReno, Algorithm::Cubic] {
            let mut cc = Cc::new(alg, 1000);
            assert_eq!(cc.algorithm(), alg, "variant");
            assert_eq!(cc.cwnd(), 10_000, "{alg:?}: IW");
            assert_eq!(
                cc.ssthresh(),
                u32::MAX,
                "{alg:?}: ssthresh starts unbounded"
            );
            let now = Instant::from_secs(1);
            let ack = Ack {
                ack: 1000,
                bytes_acked: 1000,
                flight_size: 9000,
                rtt: Some(Duration::from_millis(10)),
            };
            assert_eq!(
                cc.on_ack(&ack, now),
                AckOutcome::Normal,
                "{alg:?}: plain ACK"
            );
            assert_eq!(cc.cwnd(), 11_000, "{alg:?}: slow start");
            assert!(
                cc.on_fast_retransmit(1000, 12_000, 11_000, now),
                "{alg:?}: enters"
            );
            assert!(cc.in_recovery(), "{alg:?}: in recovery");
            cc.on_dup_ack(now);
            cc.on_rto(12_000, 11_000, now);
            assert_eq!(cc.cwnd(), 1000, "{alg:?}: loss window");
            assert!(!cc.in_recovery(), "{alg:?}: RTO ends recovery");
            cc.set_mss(500);
            assert_eq!(cc.cwnd(), 500, "{alg:?}: window follows MSS change");
        }
    }
}
