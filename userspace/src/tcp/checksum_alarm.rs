//! The checksum alarm: notices when most frames arriving at a stack fail their checksum, and
//! says why and what to change, at most once per [`ALARM_EVERY`].
//!
//! Why it exists: a device that leaves checksums to be finished by its peer (a veth whose peer
//! has TX checksum offload on: the default of `ip link add … type veth`) makes every frame fail
//! verification, and a stack that drops them all looks like a black hole — the SYNs arrive,
//! nothing answers, nothing is logged. With [`ChecksumMode::AcceptPartial`] (the default,
//! `tcp.rx_checksum = "auto"`) those frames are accepted, so the alarm is then about frames
//! damaged in some other way; with [`ChecksumMode::Compute`] (`"verify"`) it is most likely
//! the offload. [`ChecksumMode::Skip`] verifies nothing, so nothing fails.
//!
//! Owns the windowing and the message only; the stack counts frames and failures
//! ([`super::stack::StackCounters`]) and the worker logs what [`ChecksumWatch::check`] returns
//! from its housekeeping. Nothing here reads a clock: time is passed in.

use std::fmt;

use super::time::{Duration, Instant};
use crate::wire::ChecksumMode;

/// Fewest frames a window must hold before it is judged: a handful of stray bad frames is
/// noise, not a misconfiguration.
pub const ALARM_MIN_FRAMES: u64 = 16;
/// At most one alarm per this long (per stack, i.e. per worker).
pub const ALARM_EVERY: Duration = Duration::from_secs(10);

/// The counters a window is made of, as running totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    frames: u64,
    bad: u64,
}

/// Watches one stack's running totals. A window runs from the last judgement until it holds
/// [`ALARM_MIN_FRAMES`] frames; it is then judged (alarm if more than half failed and the last
/// alarm is at least [`ALARM_EVERY`] old) and a new window starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChecksumWatch {
    /// The totals when the current window started.
    window_start: Totals,
    /// When the last alarm was raised; `None` before the first.
    last_alarm: Option<Instant>,
}

/// Most frames of a window failed their checksum. `Display` names the cause and the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChecksumAlarm {
    /// Frames that arrived in the window.
    pub frames: u64,
    /// Of those, frames dropped for a bad checksum.
    pub bad: u64,
    /// How the stack checks checksums (decides the likely cause).
    pub mode: ChecksumMode,
}

impl ChecksumWatch {
    /// Judges the window if it is full. `frames` and `bad` are running totals (frames the stack
    /// received, frames it dropped for a bad checksum) and never go down.
    pub fn check(
        &mut self,
        frames: u64,
        bad: u64,
        mode: ChecksumMode,
        now: Instant,
    ) -> Option<ChecksumAlarm> {
        let in_window = frames.saturating_sub(self.window_start.frames);
        if in_window < ALARM_MIN_FRAMES {
            return None;
        }
        let bad_in_window = bad.saturating_sub(self.window_start.bad);
        self.window_start = Totals { frames, bad };
        let mostly_bad = bad_in_window.saturating_mul(2) > in_window;
        let quiet_long_enough = self
            .last_alarm
            .is_none_or(|at| now.saturating_duration_since(at) >= ALARM_EVERY);
        if !(mostly_bad && quiet_long_enough) {
            return None;
        }
        self.last_alarm = Some(now);
        Some(ChecksumAlarm {
            frames: in_window,
            bad: bad_in_window,
            mode,
        })
    }
}

impl fmt::Display for ChecksumAlarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of the last {} frames failed their checksum and were dropped: ",
            self.bad, self.frames
        )?;
        match self.mode {
            ChecksumMode::Compute => f.write_str(
                "the sender probably leaves TCP checksums partial (TX checksum offload, on by \
                 default on a veth peer); set tcp.rx_checksum = \"auto\" (the default), which \
                 accepts them, or turn the offload off on the sending device: \
                 ethtool -K <peer> tx off",
            ),
            // `Skip` verifies nothing, so it cannot get here; worded for `AcceptPartial`.
            ChecksumMode::AcceptPartial | ChecksumMode::Skip => f.write_str(
                "they are not the partial checksums of an offloading sender either (those are \
                 accepted), so frames are damaged or rewritten on the way; check the sending \
                 device (ethtool -K <peer> tx off makes it send complete checksums), or set \
                 tcp.rx_checksum = \"skip\" if the device verifies checksums itself",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODE: ChecksumMode = ChecksumMode::Compute;

    #[test]
    fn a_window_of_mostly_bad_frames_raises_one_alarm() {
        let mut w = ChecksumWatch::default();
        let t = Instant::from_secs(100);
        assert_eq!(w.check(15, 15, MODE, t), None, "too few frames to judge");
        let alarm = w.check(16, 9, MODE, t).expect("9 of 16 bad is most");
        assert_eq!((alarm.frames, alarm.bad), (16, 9));
        assert!(alarm.to_string().contains("tcp.rx_checksum"), "{alarm}");
        assert!(alarm.to_string().contains("ethtool -K"), "{alarm}");
    }

    #[test]
    fn half_or_fewer_bad_is_no_alarm() {
        let mut w = ChecksumWatch::default();
        assert_eq!(w.check(16, 8, MODE, Instant::from_secs(1)), None);
        // The judged window is gone: the next one starts at 16 frames, 8 bad.
        assert_eq!(w.check(32, 16, MODE, Instant::from_secs(2)), None);
    }

    #[test]
    fn alarms_are_at_most_one_per_interval_and_windows_restart() {
        let mut w = ChecksumWatch::default();
        let t0 = Instant::from_secs(50);
        assert!(w.check(20, 20, MODE, t0).is_some());
        assert_eq!(
            w.check(40, 40, MODE, t0 + Duration::from_secs(9)),
            None,
            "within 10 s of the last alarm"
        );
        let again = w
            .check(60, 60, MODE, t0 + ALARM_EVERY)
            .expect("10 s later, still bad");
        assert_eq!(
            (again.frames, again.bad),
            (20, 20),
            "only the frames since the last judgement"
        );
        // Traffic recovers: a window of good frames raises nothing, however long after.
        assert_eq!(w.check(100, 61, MODE, t0 + Duration::from_secs(60)), None);
    }

    #[test]
    fn the_advice_follows_the_mode() {
        let mut w = ChecksumWatch::default();
        let alarm = w
            .check(16, 16, ChecksumMode::AcceptPartial, Instant::ZERO)
            .expect("all bad");
        let text = alarm.to_string();
        assert!(text.contains("not the partial checksums"), "{text}");
        assert!(text.contains("ethtool -K <peer> tx off"), "{text}");
    }
}
