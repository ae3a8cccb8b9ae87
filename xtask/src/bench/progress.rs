//! Progress display for `cargo xtask bench`: an overall bar (steps of the plan) and a bar for the
//! load run in flight (its time), with indicatif; plain log lines when stderr is not a terminal.
//!
//! Owns only the display. Lines printed through [`Progress::log`] appear above the bars (or on
//! stderr as they are when the bars are hidden), so the bars never garble the log.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::{Duration, Instant};

pub struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    started: Instant,
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants; a typo is a programming error caught by the unit test.
    ProgressStyle::with_template(template)
        .expect("valid indicatif template")
        .progress_chars("=> ")
}

const OVERALL: &str = "{prefix:>7} [{bar:36}] {pos}/{len} steps  {wide_msg}";
const CURRENT: &str = "{prefix:>7} [{bar:36.cyan}] {msg}";

impl Progress {
    /// `steps`: how many [`Progress::step`] calls the plan makes.
    pub fn new(steps: u64) -> Progress {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let overall = multi.add(ProgressBar::new(steps));
        overall.set_style(style(OVERALL));
        overall.set_prefix("bench");
        Progress {
            multi,
            overall,
            started: Instant::now(),
        }
    }

    /// Prints a line above the bars (or plainly when they are hidden).
    pub fn log(&self, line: impl AsRef<str>) {
        let line = format!(
            "[{:>5.0}s] {}",
            self.started.elapsed().as_secs_f64(),
            line.as_ref()
        );
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            // println only fails when the terminal is gone; then there is nobody to tell.
            let _ = self.multi.println(line);
        }
    }

    /// Starts the next step: advances the overall bar and shows `what`.
    pub fn step(&self, what: impl Into<String>) {
        let what = what.into();
        self.overall.inc(1);
        self.overall.set_message(what.clone());
        self.log(what);
    }

    /// A bar for one timed run of `length`; call [`RunBar::tick`] while it runs.
    pub fn run(&self, label: &str, length: Duration) -> RunBar {
        let bar = self
            .multi
            .add(ProgressBar::new(length.as_millis().max(1) as u64));
        bar.set_style(style(CURRENT));
        bar.set_prefix("run");
        bar.set_message(label.to_owned());
        RunBar {
            bar,
            started: Instant::now(),
        }
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

/// The bar of one run; removed when dropped.
pub struct RunBar {
    bar: ProgressBar,
    started: Instant,
}

impl RunBar {
    pub fn tick(&self) {
        self.bar
            .set_position(self.started.elapsed().as_millis() as u64);
    }
}

impl Drop for RunBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_valid() {
        assert!(ProgressStyle::with_template(OVERALL).is_ok());
        assert!(ProgressStyle::with_template(CURRENT).is_ok());
    }
}
