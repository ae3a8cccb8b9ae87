//! Summaries of repeated runs (median and min–max) and how the bench prints figures and ratios.
//!
//! Owns: the median (mean of the two middle values for an even count), min, max and the text
//! forms used in the tables. Nothing here knows what a figure measures.

use std::fmt::Write as _;

/// Median and range of `n` runs of one figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// Summarises `values`, ignoring NaNs; `None` if nothing is left.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `median (min–max)` with the precision [`fmt_num`] picks.
    pub fn display(&self) -> String {
        if self.n == 1 {
            return fmt_num(self.median);
        }
        format!(
            "{} ({}–{})",
            fmt_num(self.median),
            fmt_num(self.min),
            fmt_num(self.max)
        )
    }
}

/// A number with three significant digits at most, thousands grouped: `12,345`, `812`,
/// `81.2`, `8.12`, `0.812`.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let a = x.abs();
    if a >= 1000.0 {
        group_thousands(x.round())
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a == 0.0 {
        "0".to_owned()
    } else {
        format!("{x:.3}")
    }
}

fn group_thousands(x: f64) -> String {
    let neg = x < 0.0;
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

/// `value / reference` as `1.23×`; `–` when the reference is zero or missing.
pub fn ratio(value: f64, reference: f64) -> String {
    if reference > 0.0 && value.is_finite() {
        let r = value / reference;
        let mut s = String::new();
        let _ = if r >= 10.0 {
            write!(s, "{r:.0}×")
        } else {
            write!(s, "{r:.2}×")
        };
        s
    } else {
        "–".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_range() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).expect("non-empty");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).expect("non-empty");
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        let s = Summary::of(&[7.0]).expect("non-empty");
        assert_eq!((s.median, s.min, s.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn nan_is_ignored_and_empty_is_none() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        let s = Summary::of(&[f64::NAN, 5.0, 1.0]).expect("two values");
        assert_eq!((s.median, s.n), (3.0, 2));
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_num(12_345.4), "12,345");
        assert_eq!(fmt_num(1_234_567.0), "1,234,567");
        assert_eq!(fmt_num(-1_234.0), "-1,234");
        assert_eq!(fmt_num(812.4), "812");
        assert_eq!(fmt_num(81.24), "81.2");
        assert_eq!(fmt_num(8.124), "8.12");
        assert_eq!(fmt_num(0.8124), "0.812");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(f64::NAN), "–");
        let s = Summary::of(&[10.0, 12.0, 11.0]).expect("values");
        assert_eq!(s.display(), "11.0 (10.0–12.0)");
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(250.0, 10.0), "25×");
        assert_eq!(ratio(1.0, 0.0), "–");
    }
}
