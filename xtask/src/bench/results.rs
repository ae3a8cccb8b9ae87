//! What a bench run found, as plain data: per target and figure, every run's measurement, plus
//! the floors, the cross-check and the machine. The report and the plots are made from this.
//!
//! Owns: the data model and the derived per-figure summaries (median and min–max over runs of a
//! rate and of CPU per operation by both methods). Does not own measuring or printing.

use super::cpu::{PerOp, Window};
use super::floors::{OpensslSpeed, RustlsFloor};
use super::load::LoadReport;
use super::stats::Summary;
use super::targets::Target;

/// Bytes in a MiB (bulk CPU is per MiB of response body).
pub const MIB: f64 = (1u64 << 20) as f64;

/// One load run against one target.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub report: LoadReport,
    pub window: Window,
    /// tern-bypass only: its workers' `work_ns` over the window, µs (turns that did work, not
    /// spin or sleep; `tern ctl stats` read just before and after the window). `None` for the
    /// other targets.
    pub work_us: Option<f64>,
}

impl Measurement {
    /// Completed operations per second, by the load generator's own clock.
    pub fn rate(&self) -> f64 {
        if self.report.secs > 0.0 {
            self.report.ops as f64 / self.report.secs
        } else {
            f64::NAN
        }
    }

    /// Response-body megabytes (10^6) per second.
    pub fn mb_per_s(&self) -> f64 {
        if self.report.secs > 0.0 {
            self.report.body_bytes as f64 / 1e6 / self.report.secs
        } else {
            f64::NAN
        }
    }

    /// Server CPU per completed operation (all operations of the window's life).
    pub fn per_op(&self) -> Option<PerOp> {
        self.window.per_op(self.report.completed as f64)
    }

    /// tern-bypass's work CPU per completed operation, µs (or per MiB of body for `PerMib`).
    pub fn work_per(&self, unit: Unit) -> Option<f64> {
        let ops = match unit {
            Unit::PerOp => self.report.completed as f64,
            Unit::PerMib if self.report.ops > 0 => {
                self.report.completed as f64 * self.report.body_bytes as f64
                    / self.report.ops as f64
                    / MIB
            }
            Unit::PerMib => 0.0,
        };
        self.work_us.filter(|_| ops > 0.0).map(|w| w / ops)
    }

    /// Server CPU per MiB of response body: completed responses times the mean body size.
    pub fn per_mib(&self) -> Option<PerOp> {
        if self.report.ops == 0 {
            return None;
        }
        let body_per_op = self.report.body_bytes as f64 / self.report.ops as f64;
        self.window
            .per_op(self.report.completed as f64 * body_per_op / MIB)
    }
}

/// Rate and CPU summaries of a figure's runs.
#[derive(Debug, Clone, Copy)]
pub struct FigureSummary {
    /// Operations/s, or MB/s for bulk.
    pub rate: Summary,
    /// µs per operation (or per MiB), method (a).
    pub cpu_a: Summary,
    /// Method (b).
    pub cpu_b: Summary,
    /// The machine's irq + softirq time per operation (informative).
    pub irq: Summary,
    /// tern-bypass's work CPU per operation (its workers' `work_ns`); `None` for others.
    pub work: Option<Summary>,
}

/// How a figure counts: per operation, or per MiB of body (bulk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    PerOp,
    PerMib,
}

/// Summarises `runs`; `None` if there are none (or none completed an operation).
pub fn summarize(runs: &[Measurement], unit: Unit) -> Option<FigureSummary> {
    let rate: Vec<f64> = runs
        .iter()
        .map(|m| match unit {
            Unit::PerOp => m.rate(),
            Unit::PerMib => m.mb_per_s(),
        })
        .collect();
    let per: Vec<PerOp> = runs
        .iter()
        .filter_map(|m| match unit {
            Unit::PerOp => m.per_op(),
            Unit::PerMib => m.per_mib(),
        })
        .collect();
    Some(FigureSummary {
        rate: Summary::of(&rate)?,
        cpu_a: Summary::of(&per.iter().map(|p| p.a_us).collect::<Vec<_>>())?,
        cpu_b: Summary::of(&per.iter().map(|p| p.b_us).collect::<Vec<_>>())?,
        irq: Summary::of(&per.iter().map(|p| p.irq_us).collect::<Vec<_>>())?,
        work: Summary::of(
            &runs
                .iter()
                .filter_map(|m| m.work_per(unit))
                .collect::<Vec<_>>(),
        ),
    })
}

/// Open-loop runs at one offered rate.
#[derive(Debug, Clone)]
pub struct LatencyPoint {
    /// Fraction of the slowest target's closed-loop maximum.
    pub fraction: f64,
    /// Offered new connections per second.
    pub offered: f64,
    pub runs: Vec<Measurement>,
}

/// A latency percentile's median over runs, µs.
pub fn latency_summary(
    runs: &[Measurement],
    pick: fn(&super::load::Latency) -> f64,
) -> Option<Summary> {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|m| m.report.latency.as_ref().map(pick))
        .collect();
    Summary::of(&v)
}

/// Resident memory with `connections` idle TLS connections held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdlePoint {
    pub connections: u64,
    /// Sum over the target's processes.
    pub rss_bytes: u64,
}

/// One idle-memory ramp against a freshly started target.
#[derive(Debug, Clone, Default)]
pub struct IdleRun {
    /// With no client connected (after start-up and one warm-up connection).
    pub baseline_rss: u64,
    pub points: Vec<IdlePoint>,
}

impl IdleRun {
    /// RSS growth per connection at `connections`, bytes; `None` if that step was not reached.
    pub fn per_connection(&self, connections: u64) -> Option<f64> {
        self.points
            .iter()
            .find(|p| p.connections == connections)
            .map(|p| (p.rss_bytes as f64 - self.baseline_rss as f64) / connections as f64)
    }
}

/// Idle-memory results of a target: the runs and, per headline count, why it was not measured.
#[derive(Debug, Clone, Default)]
pub struct IdleResult {
    pub runs: Vec<IdleRun>,
    /// (connection count, reason) for headline counts that cannot be held.
    pub not_measured: Vec<(u64, String)>,
}

impl IdleResult {
    pub fn per_connection(&self, connections: u64) -> Option<Summary> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| r.per_connection(connections))
            .collect();
        Summary::of(&v)
    }
}

/// Everything measured on one target.
#[derive(Debug, Clone)]
pub struct TargetResult {
    pub target: Target,
    pub version: String,
    /// Why the target has no figures (not built yet, failed to start, …).
    pub skipped: Option<String>,
    /// Failures of single figures (the rest of the target's figures still count).
    pub errors: Vec<String>,
    /// Things a reader should know about figures that did complete (e.g. failed operations).
    pub warnings: Vec<String>,
    /// Unattributed busy time of the idle machine just before measuring, µs per second.
    pub noise_us_per_s: Option<f64>,
    pub new_conn: Vec<Measurement>,
    pub keepalive: Vec<Measurement>,
    pub bulk: Vec<Measurement>,
    /// Bulk again at the rig's largest native-XDP MTU (tern's two paths; `bulk_mtu`).
    pub bulk_large_mtu: Vec<Measurement>,
    /// New connections that resume a TLS 1.3 session (each target's own ticket mechanism).
    pub resumed: Vec<Measurement>,
    pub latency: Vec<LatencyPoint>,
    /// Keep-alive requests at fixed offered rates ([`super::keepalive_latency`]).
    pub keepalive_latency: Vec<super::keepalive_latency::KeepalivePoint>,
    pub idle: IdleResult,
}

impl TargetResult {
    pub fn new(target: Target, version: String) -> TargetResult {
        TargetResult {
            target,
            version,
            skipped: None,
            errors: Vec::new(),
            warnings: Vec::new(),
            noise_us_per_s: None,
            new_conn: Vec::new(),
            keepalive: Vec::new(),
            bulk: Vec::new(),
            bulk_large_mtu: Vec::new(),
            resumed: Vec::new(),
            latency: Vec::new(),
            keepalive_latency: Vec::new(),
            idle: IdleResult::default(),
        }
    }
}

/// h2load against tern-load on the same target and mode.
#[derive(Debug, Clone)]
pub struct CrossCheck {
    pub target: Target,
    pub mode: String,
    pub tern_load: Vec<Measurement>,
    pub h2load: Vec<Measurement>,
}

/// The floors, both sources.
#[derive(Debug, Clone, Default)]
pub struct Floors {
    pub openssl: Option<OpensslSpeed>,
    pub rustls: Option<RustlsFloor>,
    /// Why a source is missing.
    pub notes: Vec<String>,
}

/// The machine and the software measured.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub nofile: u64,
    /// CONFIG_IRQ_TIME_ACCOUNTING of the running kernel, if /proc/config.gz says.
    pub irq_time_accounting: Option<bool>,
    /// (component, version) for every target and tool.
    pub versions: Vec<(String, String)>,
}

/// A whole bench run.
#[derive(Debug, Clone)]
pub struct BenchResults {
    /// The command line that produced it, e.g. `cargo xtask bench --quick`.
    pub invocation: String,
    pub started_utc: String,
    pub took_secs: f64,
    pub runs: u32,
    pub run_secs: f64,
    pub environment: Environment,
    pub targets: Vec<TargetResult>,
    pub floors: Floors,
    pub cross_check: Vec<CrossCheck>,
    /// One example of every command the bench ran, in order of first use.
    pub commands: Vec<(String, String)>,
    /// Concurrency settings per mode, for the report.
    pub settings: Vec<(String, String)>,
    pub idle_steps: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::cpu::Window;
    use std::time::Duration;

    fn m(
        ops: u64,
        bytes: u64,
        secs: f64,
        target_us: u64,
        busy_us: u64,
        load_us: u64,
    ) -> Measurement {
        Measurement {
            report: LoadReport {
                ops,
                completed: ops,
                body_bytes: bytes,
                secs,
                ..LoadReport::default()
            },
            window: Window {
                wall: Duration::from_secs_f64(secs),
                machine_busy_us: busy_us,
                target_us,
                load_us,
                ..Window::default()
            },
            work_us: None,
        }
    }

    #[test]
    fn figure_summary_over_runs() {
        let runs = [
            m(1000, 0, 1.0, 100_000, 500_000, 300_000),
            m(1200, 0, 1.0, 120_000, 540_000, 300_000),
            m(900, 0, 1.0, 99_000, 480_000, 300_000),
        ];
        let s = summarize(&runs, Unit::PerOp).expect("three runs");
        assert_eq!(
            (s.rate.median, s.rate.min, s.rate.max),
            (1000.0, 900.0, 1200.0)
        );
        assert_eq!(s.cpu_a.median, 100.0);
        assert_eq!(s.cpu_a.min, 100.0);
        assert_eq!(s.cpu_a.max, 110.0);
        // (b): (500,000 − 300,000) / 1000 = 200; (540,000 − 300,000)/1200 = 200; 180,000/900 = 200
        assert_eq!((s.cpu_b.min, s.cpu_b.max), (200.0, 200.0));
        assert!(summarize(&[], Unit::PerOp).is_none());
        assert!(s.work.is_none(), "no work counters: not tern-bypass");
        let mut bypass = runs[0].clone();
        bypass.work_us = Some(40_000.0);
        let s = summarize(&[bypass], Unit::PerOp).expect("one run");
        assert_eq!(s.work.map(|w| w.median), Some(40.0));
    }

    #[test]
    fn bulk_counts_per_mib() {
        let runs = [m(10, 10 << 20, 2.0, 20_000, 40_000, 0)];
        let s = summarize(&runs, Unit::PerMib).expect("one run");
        assert!((s.rate.median - 10.0 * MIB / 1e6 / 2.0).abs() < 1e-9);
        assert_eq!(s.cpu_a.median, 2000.0);
        assert_eq!(s.cpu_b.median, 4000.0);
    }

    #[test]
    fn idle_growth_per_connection() {
        let run = IdleRun {
            baseline_rss: 10 << 20,
            points: vec![
                IdlePoint {
                    connections: 1000,
                    rss_bytes: (10 << 20) + 30_000_000,
                },
                IdlePoint {
                    connections: 2000,
                    rss_bytes: (10 << 20) + 50_000_000,
                },
            ],
        };
        assert_eq!(run.per_connection(1000), Some(30_000.0));
        assert_eq!(run.per_connection(2000), Some(25_000.0));
        assert_eq!(run.per_connection(3000), None);
        let result = IdleResult {
            runs: vec![run.clone(), run],
            not_measured: Vec::new(),
        };
        assert_eq!(
            result.per_connection(2000).map(|s| s.median),
            Some(25_000.0)
        );
    }
}
