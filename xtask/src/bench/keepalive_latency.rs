//! Request latency on kept-alive connections at fixed offered rates (issue 12 item 2): the
//! keep-alive counterpart of the new-connection open-loop figure.
//!
//! tern-load runs `--mode keepalive --rate R` (open loop): every request has an intended send
//! time from the pacer, waits for a free connection if none is, and its latency runs from that
//! intended time to the response's last byte — corrected for coordinated omission, as the
//! new-connection figure. Offered rates are fractions of the slowest target's closed-loop
//! keep-alive rate (the plan's latency fractions) on the keep-alive figure's connections, plus
//! one fixed point: [`FIXED_RATE`] requests/s on [`FIXED_CONNECTIONS`] connections, the
//! outside measurement the issue quotes (h2load, 2,000 req/s, 10 connections). Each point
//! reports p50 / p90 / p99 / p99.9 and the target's CPU per request (methods (a) and (b), as
//! every other figure).
//!
//! Owns: the offers, the pass over one target, the summary table and its plot. The pass order and the
//! target's lifetime are `compare`'s.

use std::fmt::Write as _;

use anyhow::Result;

use super::compare::{self, Plan, Setup};
use super::load::{Latency, TernLoad, Workload};
use super::measure::{run_once, Ctx, Probe, Tool};
use super::plots::{line_chart, Series};
use super::report::{header, missing, row};
use super::results::{latency_summary, summarize, Measurement, TargetResult, Unit};
use super::stats::fmt_num;
use super::targets::{Prepared, SMALL_BODY};

/// The fixed outside point: requests/s and connections.
pub const FIXED_RATE: f64 = 2_000.0;
pub const FIXED_CONNECTIONS: u32 = 10;

/// One offered load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer {
    /// Fraction of the slowest target's closed-loop keep-alive rate; `None`: the fixed point.
    pub fraction: Option<f64>,
    /// Requests per second.
    pub rate: f64,
    pub connections: u32,
}

impl Offer {
    fn name(&self) -> String {
        match self.fraction {
            Some(f) => format!(
                "{:.0} % ({}/s, {} conns)",
                f * 100.0,
                fmt_num(self.rate),
                self.connections
            ),
            None => format!("fixed {}/s, {} conns", fmt_num(self.rate), self.connections),
        }
    }
}

/// Open-loop runs at one offer.
#[derive(Debug, Clone)]
pub struct KeepalivePoint {
    pub offer: Offer,
    pub runs: Vec<Measurement>,
}

/// The offers for a run: the plan's fractions of `slowest` (closed-loop keep-alive requests/s of
/// the slowest target; none when it is unknown) and the fixed point.
pub fn offers(plan: &Plan, slowest: f64) -> Vec<Offer> {
    let mut v: Vec<Offer> = if slowest.is_finite() && slowest > 0.0 {
        plan.latency_fractions
            .iter()
            .map(|&f| Offer {
                fraction: Some(f),
                rate: (slowest * f).max(1.0).round(),
                connections: plan.keepalive_connections,
            })
            .collect()
    } else {
        Vec::new()
    };
    v.push(Offer {
        fraction: None,
        rate: FIXED_RATE,
        connections: FIXED_CONNECTIONS,
    });
    v
}

/// The pass for one target: a fresh start, then `runs` open-loop runs at each offer.
pub(super) fn pass(
    ctx: &Ctx<'_>,
    plan: &Plan,
    setup: &Setup<'_>,
    p: &Prepared,
    tern_load: &TernLoad,
    offers: &[Offer],
    r: &mut TargetResult,
) -> Result<()> {
    let t = r.target;
    let mut daemon = compare::start_target(ctx, setup, p)?;
    let probe = Probe {
        target_pgid: daemon.pgid(),
        backend_pgid: setup.backend_pgid,
    };
    let small = format!("/bytes/{SMALL_BODY}");
    let before = compare::bypass_stats(p)?;
    for offer in offers {
        let what = format!("keep-alive open loop {}/s", fmt_num(offer.rate));
        let mut point = KeepalivePoint {
            offer: *offer,
            runs: Vec::new(),
        };
        for run in 0..plan.runs {
            let mut argv = tern_load.closed(
                Workload::KeepAlive,
                &small,
                offer.connections,
                plan.warmup,
                plan.latency_time,
            );
            argv.extend(["--rate".to_owned(), format!("{:.0}", offer.rate)]);
            let m = compare::with_bypass_work(p, || {
                run_once(
                    ctx,
                    &probe,
                    &mut daemon,
                    &compare::label(t, &what, run),
                    &argv,
                    plan.warmup + plan.latency_time,
                    Tool::TernLoad,
                )
            })?;
            compare::note_errors(ctx, r, &what, &m);
            point.runs.push(m);
        }
        r.keepalive_latency.push(point);
    }
    compare::note_bypass_trouble(ctx, p, before.as_ref(), r, "keep-alive latency pass")?;
    Ok(())
}

/// CPU per request over a point's runs, µs: (a) / (b), and tern-bypass's work CPU. (b) is
/// printed as n/a when any run's is not [`b_plausible`].
fn cpu_cell(runs: &[Measurement]) -> Option<String> {
    let s = summarize(runs, Unit::PerOp)?;
    let b_ok = runs
        .iter()
        .filter_map(Measurement::per_op)
        .all(|p| b_plausible(p.a_us, p.b_us));
    let b = if b_ok {
        fmt_num(s.cpu_b.median)
    } else {
        "n/a".to_owned()
    };
    let mut cell = format!("{} / {b}", fmt_num(s.cpu_a.median));
    if let Some(w) = s.work {
        let _ = write!(cell, " (work {})", fmt_num(w.median));
    }
    Some(cell)
}

/// Method (b) subtracts every other process's CPU from the machine's busy time. At a low
/// offered rate the server's share of a short window is a few hundred ms, the same order as
/// the subtraction's error (tick-rounded counters, processes that came and went), and (b)
/// comes out clamped at zero or several times (a). Such a figure says nothing: it is shown
/// only when it is positive and at most 3× (a). (It may well be below (a): without
/// CONFIG_IRQ_TIME_ACCOUNTING, softirq work served while the target runs is charged to it.)
fn b_plausible(a_us: f64, b_us: f64) -> bool {
    b_us > 0.0 && b_us <= 3.0 * a_us
}

fn latency_cell(runs: &[Measurement]) -> Option<String> {
    let p = |f: fn(&Latency) -> f64| latency_summary(runs, f).map(|s| s.median);
    Some(format!(
        "{} / {} / {} / {}",
        fmt_num(p(|l| l.p50_us)?),
        fmt_num(p(|l| l.p90_us)?),
        fmt_num(p(|l| l.p99_us)?),
        fmt_num(p(|l| l.p999_us)?)
    ))
}

/// The summary's section: two rows per offer (latency, CPU), one column per target.
pub fn section(out: &mut String, targets: &[&TargetResult]) {
    let _ = write!(
        out,
        "\n### Keep-alive request latency at a fixed offered rate\n\n`GET /bytes/{SMALL_BODY}` on \
         kept-alive connections, offered open-loop at a fraction of the slowest target's \
         closed-loop keep-alive rate, and at a fixed {}/s on {FIXED_CONNECTIONS} connections; \
         latency from each request's scheduled send time (corrected for coordinated omission) \
         to its last response byte. Rows: p50 / p90 / p99 / p99.9, µs; server CPU per request \
         (a) / (b), µs, and for tern-bypass its work CPU (turns that did work, not spin or \
         sleep); (b) is n/a where the machine-wide subtraction is noisier than the figure \
         (a run's (b) at zero or above 3× (a)). Medians over runs.\n\n",
        fmt_num(FIXED_RATE)
    );
    out.push_str(&header("offered", targets));
    let mut offers: Vec<Offer> = Vec::new();
    for t in targets {
        for p in &t.keepalive_latency {
            if !offers.contains(&p.offer) {
                offers.push(p.offer);
            }
        }
    }
    // Fractions in order, the fixed point last.
    offers.sort_by(|a, b| {
        let key = |o: &Offer| o.fraction.unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b))
    });
    for offer in &offers {
        for (what, cell) in [
            (
                "latency µs",
                latency_cell as fn(&[Measurement]) -> Option<String>,
            ),
            ("CPU µs/req", cpu_cell),
        ] {
            let mut cells = vec![format!("{} {what}", offer.name())];
            for t in targets {
                let c = t
                    .keepalive_latency
                    .iter()
                    .find(|p| p.offer == *offer)
                    .and_then(|p| cell(&p.runs));
                cells.push(c.unwrap_or_else(|| missing(t)));
            }
            out.push_str(&row(&cells));
        }
    }
}

/// The plot's file name (next to the others in the run's output directory and docs/bench/).
pub const PLOT: &str = "keepalive-latency.svg";

/// p50 and p99 against offered requests/s, one line per target: the fractions only (the fixed
/// point runs on fewer connections, so it is a table row, not a point on these lines).
pub(super) fn plot(targets: &[&TargetResult], out_dir: &std::path::Path) -> Result<()> {
    let lat = |pick: fn(&Latency) -> f64| -> Vec<Series> {
        targets
            .iter()
            .map(|t| Series {
                name: t.target.name().to_owned(),
                points: t
                    .keepalive_latency
                    .iter()
                    .filter(|p| p.offer.fraction.is_some())
                    .filter_map(|p| {
                        latency_summary(&p.runs, pick).map(|s| (p.offer.rate, s.median))
                    })
                    .collect(),
            })
            .collect()
    };
    let (p50, p99) = (lat(|l| l.p50_us), lat(|l| l.p99_us));
    line_chart(
        &out_dir.join(PLOT),
        "Keep-alive request latency vs offered load (median of runs)",
        "offered requests/s",
        &[("p50 latency, µs", &p50), ("p99 latency, µs", &p99)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_fractions_then_the_fixed_point() {
        let plan = Plan::quick();
        let o = offers(&plan, 10_000.0);
        assert_eq!(o.len(), plan.latency_fractions.len() + 1);
        assert_eq!(o[0].rate, 2_500.0);
        assert_eq!(o[0].connections, plan.keepalive_connections);
        let last = o.last().copied();
        assert_eq!(last.map(|l| l.fraction), Some(None));
        assert_eq!(last.map(|l| l.connections), Some(FIXED_CONNECTIONS));
        // No slowest rate: only the fixed point.
        assert_eq!(offers(&plan, f64::INFINITY).len(), 1);
    }

    #[test]
    fn method_b_is_shown_only_when_plausible() {
        assert!(b_plausible(60.0, 55.0));
        assert!(
            b_plausible(42.8, 13.1),
            "below (a): softirq charged to the target"
        );
        assert!(!b_plausible(60.0, 0.0), "clamped at zero");
        assert!(!b_plausible(56.7, 342.0), "6x (a): noise");
        assert!(!b_plausible(0.0, 10.0));
        assert!(b_plausible(90.0, 256.0), "within 3x");
    }
}
