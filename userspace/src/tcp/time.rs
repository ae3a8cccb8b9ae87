//! The stack's notion of time: [`Instant`] and [`Duration`], both whole microseconds in a `u64`.
//!
//! The worker picks the epoch (typically its start-up) and reads the clock once per loop turn;
//! nothing in `tcp` reads a clock itself, which is what makes the stack deterministic under test.
//! Microseconds are fine enough for RTTs on a veth pair and a `u64` of them lasts ~584,000 years,
//! so arithmetic here saturates instead of wrapping: a saturated value is a bug upstream, not a
//! wrap to handle. Does not own timers (the timer wheel does) nor the RFC 7323 timestamp clock
//! beyond [`Instant::ts_millis`].

use core::fmt;
use core::ops::{Add, AddAssign, Div, Mul, Sub, SubAssign};

/// A span of time in whole microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(u64);

impl Duration {
    /// No time at all.
    pub const ZERO: Duration = Duration(0);
    /// The largest representable span (used as "never").
    pub const MAX: Duration = Duration(u64::MAX);

    /// `us` microseconds.
    pub const fn from_micros(us: u64) -> Duration {
        Duration(us)
    }

    /// `ms` milliseconds (saturating).
    pub const fn from_millis(ms: u64) -> Duration {
        Duration(ms.saturating_mul(1_000))
    }

    /// `s` seconds (saturating).
    pub const fn from_secs(s: u64) -> Duration {
        Duration(s.saturating_mul(1_000_000))
    }

    /// Whole microseconds.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Whole milliseconds, truncated.
    pub const fn as_millis(self) -> u64 {
        self.0 / 1_000
    }

    /// Whole seconds, truncated.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1_000_000
    }

    /// Seconds as a float, for CUBIC's curve (RFC 9438 measures `t` and `K` in seconds).
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// `self - rhs`, or zero if `rhs` is larger.
    pub const fn saturating_sub(self, rhs: Duration) -> Duration {
        Duration(self.0.saturating_sub(rhs.0))
    }

    /// `self + rhs`, or [`Duration::MAX`].
    pub const fn saturating_add(self, rhs: Duration) -> Duration {
        Duration(self.0.saturating_add(rhs.0))
    }

    /// `self - rhs`, or `None` if `rhs` is larger.
    pub const fn checked_sub(self, rhs: Duration) -> Option<Duration> {
        match self.0.checked_sub(rhs.0) {
            Some(v) => Some(Duration(v)),
            None => None,
        }
    }

    /// The absolute difference of two spans (RFC 6298's `|SRTT - R'|`).
    pub const fn abs_diff(self, other: Duration) -> Duration {
        Duration(self.0.abs_diff(other.0))
    }

    /// `self * 2^shift`, saturating: exponential backoff.
    pub const fn saturating_shl(self, shift: u32) -> Duration {
        if shift >= 64 || self.0 > (u64::MAX >> shift) {
            Duration::MAX
        } else {
            Duration(self.0 << shift)
        }
    }
}

impl Add for Duration {
    type Output = Duration;
    fn add(self, rhs: Duration) -> Duration {
        self.saturating_add(rhs)
    }
}

impl AddAssign for Duration {
    fn add_assign(&mut self, rhs: Duration) {
        *self = *self + rhs;
    }
}

impl Sub for Duration {
    type Output = Duration;
    /// Saturates at zero.
    fn sub(self, rhs: Duration) -> Duration {
        self.saturating_sub(rhs)
    }
}

impl SubAssign for Duration {
    fn sub_assign(&mut self, rhs: Duration) {
        *self = *self - rhs;
    }
}

impl Mul<u32> for Duration {
    type Output = Duration;
    fn mul(self, rhs: u32) -> Duration {
        Duration(self.0.saturating_mul(u64::from(rhs)))
    }
}

impl Div<u32> for Duration {
    type Output = Duration;
    /// Truncating division.
    ///
    /// # Panics
    /// On division by zero, like the integer types.
    fn div(self, rhs: u32) -> Duration {
        Duration(self.0 / u64::from(rhs))
    }
}

impl From<core::time::Duration> for Duration {
    /// Truncates to whole microseconds; saturates past `u64::MAX` microseconds.
    fn from(d: core::time::Duration) -> Duration {
        Duration(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
}

impl From<Duration> for core::time::Duration {
    fn from(d: Duration) -> core::time::Duration {
        core::time::Duration::from_micros(d.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}ms", self.0 / 1_000, self.0 % 1_000)
    }
}

/// A point in time: microseconds since an epoch the worker chose. Only differences matter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The epoch itself.
    pub const ZERO: Instant = Instant(0);

    /// `us` microseconds after the epoch.
    pub const fn from_micros(us: u64) -> Instant {
        Instant(us)
    }

    /// `ms` milliseconds after the epoch (saturating).
    pub const fn from_millis(ms: u64) -> Instant {
        Instant(ms.saturating_mul(1_000))
    }

    /// `s` seconds after the epoch (saturating).
    pub const fn from_secs(s: u64) -> Instant {
        Instant(s.saturating_mul(1_000_000))
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Whole seconds since the epoch, truncated.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1_000_000
    }

    /// The RFC 7323 timestamp clock: milliseconds since the epoch, wrapping modulo 2^32.
    ///
    /// RFC 7323 §5.4 asks for a tick between 1 ms and 1 s; 1 ms keeps TS-based RTT samples
    /// useful on a LAN. The wrap (every ~49.7 days) is what §5.2's PAWS comparison expects.
    pub const fn ts_millis(self) -> u32 {
        (self.0 / 1_000) as u32
    }

    /// Time elapsed from `earlier` to `self`, or `None` if `earlier` is later.
    pub const fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        match self.0.checked_sub(earlier.0) {
            Some(v) => Some(Duration(v)),
            None => None,
        }
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub const fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    /// Saturates: `now + Duration::MAX` is "never".
    fn add(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, rhs: Duration) {
        *self = *self + rhs;
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    /// Saturates at the epoch.
    fn sub(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_sub(rhs.0))
    }
}

impl Sub for Instant {
    type Output = Duration;
    /// Elapsed time, saturating at zero if `rhs` is later (the clock is monotonic, so a later
    /// `rhs` only happens when a caller compares against a deadline already in the future).
    fn sub(self, rhs: Instant) -> Duration {
        self.saturating_duration_since(rhs)
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_conversions() {
        assert_eq!(Duration::from_millis(3).as_micros(), 3_000, "ms → µs");
        assert_eq!(Duration::from_secs(2).as_millis(), 2_000, "s → ms");
        assert_eq!(Duration::from_micros(1_999_999).as_secs(), 1, "truncates");
        assert_eq!(
            Instant::from_secs(5).as_micros(),
            5_000_000,
            "instant s → µs"
        );
        assert_eq!(Instant::from_millis(1500).as_secs(), 1, "instant truncates");
        assert!(
            (Duration::from_millis(250).as_secs_f64() - 0.25).abs() < 1e-12,
            "float seconds"
        );
    }

    #[test]
    fn instant_arithmetic() {
        let t = Instant::from_millis(100);
        let later = t + Duration::from_millis(50);
        assert_eq!(later, Instant::from_millis(150), "instant + duration");
        assert_eq!(later - t, Duration::from_millis(50), "instant - instant");
        assert_eq!(t - later, Duration::ZERO, "earlier - later saturates");
        assert_eq!(
            later - Duration::from_millis(150),
            Instant::ZERO,
            "sub duration"
        );
        assert_eq!(
            t - Duration::from_secs(1),
            Instant::ZERO,
            "saturates at the epoch"
        );
        assert_eq!(
            t.checked_duration_since(later),
            None,
            "checked: earlier - later"
        );
        assert_eq!(
            later.checked_duration_since(t),
            Some(Duration::from_millis(50)),
            "checked: later - earlier"
        );
        assert_eq!(t + Duration::MAX, Instant::from_micros(u64::MAX), "never");
        let mut m = t;
        m += Duration::from_micros(1);
        assert_eq!(m.as_micros(), 100_001, "add-assign");
    }

    #[test]
    fn duration_arithmetic() {
        let d = Duration::from_millis(100);
        assert_eq!(d * 3, Duration::from_millis(300), "mul");
        assert_eq!(d / 8, Duration::from_micros(12_500), "div");
        assert_eq!(d - Duration::from_secs(1), Duration::ZERO, "sub saturates");
        assert_eq!(d.checked_sub(Duration::from_secs(1)), None, "checked sub");
        assert_eq!(Duration::MAX + d, Duration::MAX, "add saturates");
        assert_eq!(Duration::MAX * 2, Duration::MAX, "mul saturates");
        assert_eq!(
            d.abs_diff(Duration::from_millis(250)),
            Duration::from_millis(150),
            "abs"
        );
        assert_eq!(d.saturating_shl(3), Duration::from_millis(800), "shl");
        assert_eq!(d.saturating_shl(64), Duration::MAX, "shl past width");
        assert_eq!(
            Duration::from_secs(1).saturating_shl(60),
            Duration::MAX,
            "shl overflow"
        );
        let mut a = d;
        a += d;
        a -= Duration::from_millis(50);
        assert_eq!(a, Duration::from_millis(150), "assign ops");
    }

    #[test]
    fn std_round_trip_and_display() {
        let std = core::time::Duration::from_nanos(1_234_567);
        let ours = Duration::from(std);
        assert_eq!(ours.as_micros(), 1_234, "truncates nanoseconds");
        assert_eq!(
            core::time::Duration::from(ours),
            core::time::Duration::from_micros(1_234),
            "back to std"
        );
        assert_eq!(
            Duration::from_micros(1_234).to_string(),
            "1.234ms",
            "display duration"
        );
        assert_eq!(
            Instant::from_micros(2_000_001).to_string(),
            "2.000001s",
            "display instant"
        );
    }

    #[test]
    fn ts_clock_wraps() {
        assert_eq!(Instant::from_millis(42).ts_millis(), 42, "ms tick");
        let wrap = Instant::from_millis(u64::from(u32::MAX) + 6);
        assert_eq!(wrap.ts_millis(), 5, "wraps modulo 2^32");
    }
}
