//! TCP sequence numbers: 32-bit values compared modulo 2^32 (RFC 9293 §3.4).
//!
//! Owns the arithmetic only; which comparisons make a segment acceptable is the `tcp` module's.

use core::cmp::Ordering;
use core::fmt;
use core::ops::{Add, AddAssign, Sub};

/// A TCP sequence or acknowledgment number. `a < b` iff `(a - b) as i32 < 0` (RFC 9293 §3.4),
/// which is meaningful only for numbers less than 2^31 apart — true of any two numbers within
/// one connection's windows. Hence `PartialOrd` but no `Ord`: the relation is not transitive
/// over the whole space.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqNumber(pub u32);

impl SeqNumber {
    /// The signed distance from `other` to `self` (positive when `self` is later).
    pub const fn distance_from(self, other: SeqNumber) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }

    /// The later of two sequence numbers.
    pub fn max_seq(self, other: SeqNumber) -> SeqNumber {
        if self.distance_from(other) >= 0 {
            self
        } else {
            other
        }
    }

    /// The earlier of two sequence numbers.
    pub fn min_seq(self, other: SeqNumber) -> SeqNumber {
        if self.distance_from(other) <= 0 {
            self
        } else {
            other
        }
    }

    /// `start <= self < end` in sequence space (an empty range when `start == end`).
    pub fn in_range(self, start: SeqNumber, end: SeqNumber) -> bool {
        self.0.wrapping_sub(start.0) < end.0.wrapping_sub(start.0)
    }
}

impl PartialOrd for SeqNumber {
    fn partial_cmp(&self, other: &SeqNumber) -> Option<Ordering> {
        Some(self.distance_from(*other).cmp(&0))
    }
}

impl Add<u32> for SeqNumber {
    type Output = SeqNumber;
    fn add(self, rhs: u32) -> SeqNumber {
        SeqNumber(self.0.wrapping_add(rhs))
    }
}

impl AddAssign<u32> for SeqNumber {
    fn add_assign(&mut self, rhs: u32) {
        self.0 = self.0.wrapping_add(rhs);
    }
}

impl Sub<u32> for SeqNumber {
    type Output = SeqNumber;
    fn sub(self, rhs: u32) -> SeqNumber {
        SeqNumber(self.0.wrapping_sub(rhs))
    }
}

/// `a - b` is the signed distance, as in RFC 9293's comparisons.
impl Sub<SeqNumber> for SeqNumber {
    type Output = i32;
    fn sub(self, rhs: SeqNumber) -> i32 {
        self.distance_from(rhs)
    }
}

impl fmt::Debug for SeqNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SeqNumber({})", self.0)
    }
}

impl fmt::Display for SeqNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_wrap() {
        let a = SeqNumber(u32::MAX - 5);
        let b = a + 10;
        assert_eq!(b.0, 4, "addition wraps");
        assert!(a < b, "a precedes b across the wrap");
        assert!(b > a);
        assert_eq!(b - a, 10);
        assert_eq!(a - b, -10);
        assert_eq!(a.max_seq(b), b);
        assert_eq!(a.min_seq(b), a);
        assert!(SeqNumber(0) < SeqNumber(0x7fff_ffff));
        assert!(
            SeqNumber(0) > SeqNumber(0x8000_0001),
            "more than 2^31 ahead reads as behind"
        );
    }

    #[test]
    fn in_range_across_wrap() {
        let start = SeqNumber(u32::MAX - 1);
        let end = start + 4;
        assert!(start.in_range(start, end));
        assert!((start + 3).in_range(start, end));
        assert!(!end.in_range(start, end), "end is exclusive");
        assert!(!(start - 1).in_range(start, end));
        assert!(!start.in_range(start, start), "empty range");
    }
}
