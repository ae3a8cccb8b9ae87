//! The retransmission timeout: RFC 6298's SRTT/RTTVAR estimator, Karn's algorithm and
//! exponential backoff.
//!
//! Owns the RTO value only; arming and cancelling the timer is the timer wheel's job, and deciding
//! which segment an ACK measured (send times, timestamps) is the connection's. RFC 6298 §2 gives
//! the estimator (α = 1/8, β = 1/4, K = 4, clock granularity G), §2.1 the initial 1 s RTO, §2.4
//! the floor, §2.5 the ceiling, §3 Karn's rule, §5.5 the backoff. RFC 7323 §4 allows samples from
//! retransmitted segments when the timestamp echo makes them unambiguous.
//!
//! Not done here: RFC 7323 Appendix G's per-window scaling of α/β when timestamps give many
//! samples per RTT (the caller can take one sample per RTT to the same effect), and RFC 6298 §5.7's
//! 3 s RTO after a retransmitted SYN (our passive open is stateless, so there is no SYN timer).

use super::time::Duration;

/// Where an RTT sample came from; decides whether Karn's algorithm lets it through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleSource {
    /// Measured from the send time of the segment the ACK covered.
    /// `retransmitted` must be true if that segment was ever sent more than once.
    SendTime {
        /// The timed segment was retransmitted: the ACK may belong to any transmission.
        retransmitted: bool,
    },
    /// Measured from the echoed TSecr (RFC 7323 §4): names the transmission it answers, so it is
    /// unambiguous even for a retransmitted segment.
    Timestamp,
}

/// Tunables. RFC 6298 fixes α, β and K; these are the knobs it leaves to the implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtoConfig {
    /// RTO before the first sample (RFC 6298 §2.1: 1 s).
    pub initial: Duration,
    /// Floor. RFC 6298 §2.4 says 1 s, but that figure dates from coarse 500 ms clocks and
    /// Internet-scale RTTs; with a fine clock a 1 s floor turns every tail loss on a LAN or in a
    /// data centre into a second-long stall. Linux has used 200 ms (`TCP_RTO_MIN`) for decades
    /// without the spurious-retransmission storms the RFC guards against, and tern talks to the
    /// same peers, so 200 ms is the default.
    pub min: Duration,
    /// Ceiling (RFC 6298 §2.5 allows one of at least 60 s).
    pub max: Duration,
    /// Clock granularity G: the timer wheel's tick, since that is the resolution at which a
    /// timeout can actually fire.
    pub granularity: Duration,
}

impl Default for RtoConfig {
    fn default() -> RtoConfig {
        RtoConfig {
            initial: Duration::from_secs(1),
            min: Duration::from_millis(200),
            max: Duration::from_secs(60),
            granularity: Duration::from_millis(1),
        }
    }
}

/// Backoff stops doubling after this many consecutive timeouts; by then the RTO sits at
/// [`RtoConfig::max`] for any sane configuration and the shift cannot overflow.
const MAX_BACKOFF_SHIFT: u32 = 16;

/// RFC 6298 state for one connection.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    config: RtoConfig,
    /// Smoothed RTT; `None` until the first sample (RFC 6298 §2.2 then initialises it).
    srtt: Option<Duration>,
    /// RTT variation; meaningful only once `srtt` is `Some`.
    rttvar: Duration,
    /// The un-backed-off RTO from the last sample (or the initial RTO), already clamped to
    /// `[config.min, config.max]`.
    base_rto: Duration,
    /// Consecutive timeouts since the last accepted sample or ACK of new data: the RTO in force is
    /// `base_rto << backoff`, capped at `config.max`.
    backoff: u32,
}

impl RttEstimator {
    /// A fresh estimator with the initial RTO.
    pub fn new(config: RtoConfig) -> RttEstimator {
        RttEstimator {
            config,
            srtt: None,
            rttvar: Duration::ZERO,
            base_rto: config.initial.max(config.min).min(config.max),
            backoff: 0,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> RtoConfig {
        self.config
    }

    /// The smoothed RTT, once there has been a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The RTT variation (zero before the first sample).
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Consecutive timeouts currently folded into [`rto`](Self::rto).
    pub fn backoff(&self) -> u32 {
        self.backoff
    }

    /// The RTO to arm the timer with now, backoff included.
    pub fn rto(&self) -> Duration {
        self.base_rto
            .saturating_shl(self.backoff)
            .min(self.config.max)
    }

    /// Offers an RTT measurement. Returns whether it was used: a send-time sample from a
    /// retransmitted segment is discarded (Karn, RFC 6298 §3). A zero sample (a TSecr from the
    /// same millisecond tick) counts as 1 µs so that SRTT stays non-zero; G then sets the RTO.
    ///
    /// An accepted sample also clears the backoff, since the RTO is recomputed from fresh data
    /// (RFC 6298 §5, the note after rule 5.7: the RTO may "collapse" back down once a new RTT
    /// measurement arrives; Karn's rule is what keeps this from happening too early).
    pub fn sample(&mut self, rtt: Duration, source: SampleSource) -> bool {
        if source
            == (SampleSource::SendTime {
                retransmitted: true,
            })
        {
            return false;
        }
        let rtt = rtt.max(Duration::from_micros(1));
        match self.srtt {
            // RFC 6298 §2.2: SRTT <- R, RTTVAR <- R/2.
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            // RFC 6298 §2.3: RTTVAR first, with the old SRTT.
            Some(srtt) => {
                self.rttvar = (self.rttvar * 3 + srtt.abs_diff(rtt)) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(rtt);
        // RFC 6298 §2.2/2.3: RTO <- SRTT + max(G, K*RTTVAR), then §2.4/§2.5 clamps.
        let rto = srtt + self.config.granularity.max(self.rttvar * 4);
        self.base_rto = rto.max(self.config.min).min(self.config.max);
        self.backoff = 0;
        true
    }

    /// The retransmission timer fired: double the RTO (RFC 6298 §5.5), up to the maximum.
    pub fn on_timeout(&mut self) {
        if self.backoff < MAX_BACKOFF_SHIFT {
            self.backoff += 1;
        }
    }

    /// An ACK acknowledged new data: the path works again, so the backed-off RTO gives way to the
    /// estimate even if Karn's rule denied a sample (as Linux does on forward progress; RFC 6298
    /// §5 keeps the backoff until a valid sample, which over-delays the next RTO on a path whose
    /// every ACK covers retransmitted data). Callers wanting the strict RFC behaviour skip this.
    pub fn on_new_data_acked(&mut self) {
        self.backoff = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    const TIMED: SampleSource = SampleSource::SendTime {
        retransmitted: false,
    };

    fn rfc_config() -> RtoConfig {
        RtoConfig {
            min: ms(1),
            ..RtoConfig::default()
        }
    }

    #[test]
    fn initial_rto_is_one_second() {
        let e = RttEstimator::new(RtoConfig::default());
        assert_eq!(e.rto(), Duration::from_secs(1), "RFC 6298 §2.1");
        assert_eq!(e.srtt(), None, "no sample yet");
        assert_eq!(e.config().min, ms(200), "default floor is Linux's 200 ms");
    }

    #[test]
    fn worked_samples() {
        // Floor at 1 ms so the raw formula shows through.
        let mut e = RttEstimator::new(rfc_config());
        assert!(e.sample(ms(100), TIMED), "first sample accepted");
        // SRTT = 100, RTTVAR = 50, RTO = 100 + 4*50 = 300.
        assert_eq!(e.srtt(), Some(ms(100)), "first SRTT");
        assert_eq!(e.rttvar(), ms(50), "first RTTVAR");
        assert_eq!(e.rto(), ms(300), "first RTO");

        assert!(e.sample(ms(200), TIMED), "second sample accepted");
        // RTTVAR = 3/4*50 + 1/4*|100-200| = 62.5; SRTT = 7/8*100 + 1/8*200 = 112.5;
        // RTO = 112.5 + 250 = 362.5.
        assert_eq!(e.rttvar(), us(62_500), "second RTTVAR");
        assert_eq!(e.srtt(), Some(us(112_500)), "second SRTT");
        assert_eq!(e.rto(), us(362_500), "second RTO");

        assert!(e.sample(ms(80), TIMED), "third sample accepted");
        // RTTVAR = 3/4*62.5 + 1/4*32.5 = 55; SRTT = 7/8*112.5 + 10 = 108.4375;
        // RTO = 108.4375 + 220 = 328.4375 ms.
        assert_eq!(e.rttvar(), us(55_000), "third RTTVAR");
        assert_eq!(e.srtt(), Some(us(108_437)), "third SRTT (µs truncation)");
        assert_eq!(e.rto(), us(328_437), "third RTO");
    }

    #[test]
    fn granularity_dominates_a_steady_rtt() {
        let mut e = RttEstimator::new(RtoConfig {
            granularity: ms(10),
            ..rfc_config()
        });
        for _ in 0..200 {
            e.sample(ms(20), TIMED);
        }
        // RTTVAR decays towards 0, so 4*RTTVAR < G and RTO = SRTT + G.
        assert_eq!(e.srtt(), Some(ms(20)), "converged SRTT");
        assert_eq!(e.rto(), ms(30), "RTO = SRTT + G once K*RTTVAR < G");
    }

    #[test]
    fn clamped_to_min_and_max() {
        let mut e = RttEstimator::new(RtoConfig::default());
        e.sample(ms(1), TIMED);
        assert_eq!(e.rto(), ms(200), "floor (default 200 ms)");
        let mut e = RttEstimator::new(RtoConfig {
            min: Duration::from_secs(1),
            ..RtoConfig::default()
        });
        e.sample(ms(100), TIMED);
        assert_eq!(e.rto(), Duration::from_secs(1), "RFC floor of 1 s");
        let mut e = RttEstimator::new(RtoConfig::default());
        e.sample(Duration::from_secs(40), TIMED);
        assert_eq!(e.rto(), Duration::from_secs(60), "ceiling");
    }

    #[test]
    fn karn_ignores_retransmitted_send_time_samples() {
        let mut e = RttEstimator::new(rfc_config());
        e.sample(ms(100), TIMED);
        let before = e.rto();
        assert!(
            !e.sample(
                ms(900),
                SampleSource::SendTime {
                    retransmitted: true
                }
            ),
            "Karn: ambiguous sample refused"
        );
        assert_eq!(e.rto(), before, "estimate unchanged");
        assert_eq!(e.srtt(), Some(ms(100)), "SRTT unchanged");
    }

    #[test]
    fn timestamps_make_retransmissions_measurable() {
        let mut e = RttEstimator::new(rfc_config());
        e.on_timeout();
        assert!(
            e.sample(ms(100), SampleSource::Timestamp),
            "RFC 7323 §4: TS sample is unambiguous"
        );
        assert_eq!(e.srtt(), Some(ms(100)), "taken as the first sample");
        assert_eq!(e.backoff(), 0, "a valid sample clears the backoff");
        assert_eq!(e.rto(), ms(300), "RTO from the sample");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut e = RttEstimator::new(RtoConfig::default());
        e.on_timeout();
        assert_eq!(e.rto(), Duration::from_secs(2), "one timeout doubles");
        e.on_timeout();
        assert_eq!(e.rto(), Duration::from_secs(4), "two timeouts quadruple");
        for _ in 0..100 {
            e.on_timeout();
        }
        assert_eq!(e.rto(), Duration::from_secs(60), "capped at max");
        assert_eq!(e.backoff(), MAX_BACKOFF_SHIFT, "shift bounded");
    }

    #[test]
    fn backoff_survives_karn_and_resets_on_progress() {
        let mut e = RttEstimator::new(rfc_config());
        e.sample(ms(100), TIMED);
        e.on_timeout();
        e.on_timeout();
        assert_eq!(e.rto(), ms(1200), "300 ms backed off twice");
        e.sample(
            ms(50),
            SampleSource::SendTime {
                retransmitted: true,
            },
        );
        assert_eq!(
            e.rto(),
            ms(1200),
            "Karn: a refused sample keeps the backoff"
        );
        e.on_new_data_acked();
        assert_eq!(e.rto(), ms(300), "forward progress resets the backoff");
        e.on_timeout();
        assert!(e.sample(ms(100), TIMED), "fresh sample accepted");
        assert_eq!(e.backoff(), 0, "a valid sample resets the backoff");
    }

    #[test]
    fn zero_sample_counts_as_one_microsecond() {
        let mut e = RttEstimator::new(rfc_config());
        assert!(
            e.sample(Duration::ZERO, SampleSource::Timestamp),
            "accepted"
        );
        assert_eq!(e.srtt(), Some(us(1)), "floored to 1 µs");
        assert_eq!(e.rto(), us(1_001), "RTO = SRTT + G");
    }
}
