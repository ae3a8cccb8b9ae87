//! What a run reports: the JSON document on stdout (`--json`) and the human summary on
//! stderr, plus the /proc samples they include.
//!
//! Owns: the JSON schema (documented field by field in load/README.md; `schema` is bumped on
//! any incompatible change), latency summaries, rates and throughput, and sampling of
//! /proc/stat (whole-machine CPU time by kind, for "machine busy minus load generator" server
//! CPU accounting) and /proc/PID/{stat,status} (CPU time and RSS of `--watch-pid` processes).
//! Does not own: collecting the numbers (`worker`, `coord`).
//!
//! References: proc(5) for the /proc/stat `cpu` line (user nice system idle iowait irq softirq
//! steal, in USER_HZ ticks) and /proc/PID/stat fields 14–15 (utime, stime).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{Load, Mode, Plan};
use crate::coord::RunResult;
use crate::stats::{Bytes, Errors, StatusClasses, TlsInfo};
use crate::sys;
use crate::worker::StopReason;

/// Version of the JSON document's layout.
pub const SCHEMA: u32 = 1;

/// One reading of the /proc/stat `cpu` line (all CPUs), in ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineSample {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
    pub cpus: u64,
}

impl MachineSample {
    pub fn read() -> Option<MachineSample> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    pub fn parse(text: &str) -> Option<MachineSample> {
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(MachineSample {
            user: at(0),
            nice: at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
            cpus: text
                .lines()
                .filter(|l| {
                    l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                })
                .count() as u64,
        })
    }

    fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }
}

/// Whole-machine CPU time over the window.
#[derive(Clone, Debug, Serialize)]
pub struct MachineOut {
    pub cpus: u64,
    /// user + nice + system + irq + softirq + steal, all CPUs, µs.
    pub busy_us: u64,
    /// idle + iowait, all CPUs, µs.
    pub idle_us: u64,
    pub user_us: u64,
    pub system_us: u64,
    pub irq_us: u64,
    pub softirq_us: u64,
}

impl MachineOut {
    pub fn new(a: &MachineSample, b: &MachineSample) -> MachineOut {
        let us = |ticks: u64| ticks * 1_000_000 / sys::clock_ticks_per_s();
        MachineOut {
            cpus: b.cpus,
            busy_us: us(b.busy().saturating_sub(a.busy())),
            idle_us: us((b.idle + b.iowait).saturating_sub(a.idle + a.iowait)),
            user_us: us((b.user + b.nice).saturating_sub(a.user + a.nice)),
            system_us: us(b.system.saturating_sub(a.system)),
            irq_us: us(b.irq.saturating_sub(a.irq)),
            softirq_us: us(b.softirq.saturating_sub(a.softirq)),
        }
    }
}

/// One reading of a watched process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchSample {
    /// utime + stime, ticks (all threads).
    pub cpu_ticks: Option<u64>,
    pub rss_kib: Option<u64>,
}

impl WatchSample {
    pub fn read(pid: u32) -> WatchSample {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
        WatchSample {
            cpu_ticks: stat.as_deref().and_then(parse_stat_cpu),
            rss_kib: status.as_deref().and_then(parse_status_rss),
        }
    }
}

/// utime + stime from /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted after its last ')'.
pub fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from /proc/PID/status, KiB.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `--watch-pid` process over the run.
#[derive(Clone, Debug, Serialize)]
pub struct Watched {
    pub pid: u32,
    /// utime + stime over the window, µs (null if the process was gone).
    pub cpu_window_us: Option<u64>,
    /// RSS before set-up (before any connection was opened), KiB.
    pub rss_kib_before: Option<u64>,
    /// RSS when the window opened (after set-up: persistent/idle connections up).
    pub rss_kib_window_start: Option<u64>,
    /// RSS at the end of the window; in idle mode just before the hold ends, with every
    /// connection still up.
    pub rss_kib_end: Option<u64>,
}

impl Watched {
    pub fn new(
        pid: u32,
        before: &WatchSample,
        start: &WatchSample,
        end: &WatchSample,
        hold: Option<&WatchSample>,
    ) -> Watched {
        let hz = sys::clock_ticks_per_s();
        Watched {
            pid,
            cpu_window_us: match (start.cpu_ticks, end.cpu_ticks) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) * 1_000_000 / hz),
                _ => None,
            },
            rss_kib_before: before.rss_kib,
            rss_kib_window_start: start.rss_kib,
            rss_kib_end: hold.unwrap_or(end).rss_kib,
        }
    }
}

/// Latency percentiles, µs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    pub stdev: f64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Option<Summary> {
        if h.is_empty() {
            return None;
        }
        Some(Summary {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
            stdev: (h.stdev() * 10.0).round() / 10.0,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct RequestsOut {
    /// Measured requests with a complete response (any status), drain included.
    pub completed: u64,
    /// Responses completed inside the window (the rate's numerator).
    pub in_window: u64,
    /// Completed with a 2xx status.
    pub succeeded: u64,
    /// Measured requests still in flight when the grace period ended.
    pub abandoned: u64,
    /// in_window / elapsed_s. In new-conn and resumed modes one request is one connection, so
    /// this is also the transaction (connection) rate.
    pub rate_per_s: f64,
}

/// Set-up before the window: persistent/idle connections opened, or priming done.
#[derive(Debug, Serialize)]
pub struct SetupOut {
    pub established: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct ErrorsOut<'a> {
    pub total: u64,
    #[serde(flatten)]
    pub kinds: &'a Errors,
}

#[derive(Debug, Serialize)]
pub struct Handshakes {
    pub full: u64,
    pub resumed: u64,
}

#[derive(Debug, Serialize)]
pub struct CpuOut {
    /// This process and its children (all threads), over the window, µs.
    pub window_user_us: u64,
    pub window_system_us: u64,
    pub window_us: u64,
    /// The whole life of this process and its children (set-up and drain included), µs.
    pub total_user_us: u64,
    pub total_system_us: u64,
    pub total_us: u64,
    /// window_us / requests.in_window.
    pub window_us_per_request: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct IdleOut {
    pub target: u64,
    pub established: u64,
    pub failed: u64,
    pub closed_during_hold: u64,
    pub up_at_end: u64,
    pub ramp_s: f64,
    /// established / ramp_s.
    pub ramp_conn_per_s: f64,
}

/// The JSON document.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub tool: &'static str,
    pub version: &'static str,
    pub schema: u32,
    pub mode: &'static str,
    /// "tls" (TLS + HTTP/1.1) or "tcp" (`--plain` echo).
    pub protocol: &'static str,
    /// `--plain`: bytes per operation, each way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_bytes: Option<u64>,
    #[serde(rename = "loop")]
    pub loop_kind: &'static str,
    pub target: String,
    pub sni: &'a str,
    pub method: &'static str,
    pub path: &'a str,
    pub threads: usize,
    pub processes: usize,
    pub concurrency: Option<u64>,
    pub connections: Option<u64>,
    pub offered_rate_per_s: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub requests_limit: Option<u64>,
    pub stopped_by: StopReason,
    pub elapsed_s: f64,
    pub setup: SetupOut,
    pub requests: RequestsOut,
    pub status: &'a StatusClasses,
    pub errors: ErrorsOut<'a>,
    pub connections_opened: u64,
    pub handshakes: Handshakes,
    pub reconnects: u64,
    pub closed_by_peer: u64,
    pub primed: u64,
    pub close_timeouts: u64,
    pub bytes: &'a Bytes,
    /// (body_received + body_sent) in the window / elapsed_s / 10^6.
    pub throughput_mb_per_s: f64,
    /// (tls_received + tls_sent) in the window / elapsed_s / 10^6.
    pub tls_throughput_mb_per_s: f64,
    pub latency_us: Option<Summary>,
    pub handshake_us: Option<Summary>,
    pub tls: Option<&'a TlsInfo>,
    pub idle: Option<IdleOut>,
    pub cpu: CpuOut,
    pub machine: Option<MachineOut>,
    pub watched: &'a [Watched],
    pub members_lost: usize,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn per_s(n: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 {
        ((n as f64 / elapsed_s) * 100.0).round() / 100.0
    } else {
        0.0
    }
}

impl<'a> Report<'a> {
    pub fn new(plan: &'a Plan, r: &'a RunResult) -> Report<'a> {
        let s = &r.stats;
        let elapsed_ns = r.window_end_ns.saturating_sub(r.window_start_ns);
        let elapsed_s = if plan.mode == Mode::Idle {
            secs(plan.duration_ns.min(elapsed_ns.max(1)))
        } else {
            secs(elapsed_ns)
        };
        let body = s.bytes.body_received + s.bytes.body_sent;
        let wire = s.bytes.tls_received + s.bytes.tls_sent;
        let mb = |bytes: u64| per_s(bytes, elapsed_s) / 1e6;
        Report {
            tool: "tern-load",
            version: env!("CARGO_PKG_VERSION"),
            schema: SCHEMA,
            mode: plan.mode.name(),
            protocol: if plan.plain { "tcp" } else { "tls" },
            message_bytes: plan.plain.then_some(plan.message_bytes),
            loop_kind: match plan.load {
                Load::Closed => "closed",
                Load::Open { .. } => "open",
            },
            target: plan.target.to_string(),
            sni: &plan.sni,
            method: plan.method,
            path: &plan.path,
            threads: plan.threads,
            processes: plan.processes,
            concurrency: (!plan.mode.persistent()).then_some(plan.concurrency),
            connections: (!plan.mode.per_connection()).then_some(plan.connections),
            offered_rate_per_s: plan.rate(),
            duration_s: secs(plan.duration_ns),
            warmup_s: secs(plan.warmup_ns),
            requests_limit: plan.requests,
            stopped_by: r.stopped_by,
            elapsed_s: (elapsed_s * 1e6).round() / 1e6,
            setup: SetupOut {
                established: r.ready.established,
                failed: r.ready.failed,
            },
            requests: RequestsOut {
                completed: s.completed,
                in_window: s.in_window,
                succeeded: s.status.s2xx,
                abandoned: s.abandoned,
                rate_per_s: per_s(s.in_window, elapsed_s),
            },
            status: &s.status,
            errors: ErrorsOut {
                total: s.errors.total(),
                kinds: &s.errors,
            },
            connections_opened: s.connections_opened,
            handshakes: Handshakes {
                full: s.handshakes_full,
                resumed: s.handshakes_resumed,
            },
            reconnects: s.reconnects,
            closed_by_peer: s.closed_by_peer,
            primed: s.primed,
            close_timeouts: s.close_timeouts,
            bytes: &s.bytes,
            throughput_mb_per_s: (mb(body) * 1e4).round() / 1e4,
            tls_throughput_mb_per_s: (mb(wire) * 1e4).round() / 1e4,
            latency_us: Summary::of(&s.latency),
            handshake_us: Summary::of(&s.handshake),
            tls: s.tls.as_ref(),
            idle: s.idle.as_ref().map(|i| {
                let ramp_s = secs(i.ramp_ns);
                IdleOut {
                    target: i.target,
                    established: i.established,
                    failed: i.failed,
                    closed_during_hold: i.closed_during_hold,
                    up_at_end: i.up_at_end,
                    ramp_s: (ramp_s * 1e6).round() / 1e6,
                    ramp_conn_per_s: per_s(i.established, ramp_s),
                }
            }),
            cpu: CpuOut {
                window_user_us: r.cpu_window.user_us,
                window_system_us: r.cpu_window.system_us,
                window_us: r.cpu_window.total_us(),
                total_user_us: r.cpu_total.user_us,
                total_system_us: r.cpu_total.system_us,
                total_us: r.cpu_total.total_us(),
                window_us_per_request: (s.in_window > 0).then(|| {
                    ((r.cpu_window.total_us() as f64 / s.in_window as f64) * 100.0).round() / 100.0
                }),
            },
            machine: r.machine.as_ref().map(|(a, b)| MachineOut::new(a, b)),
            watched: &r.watched,
            members_lost: r.members_lost,
        }
    }

    /// Whether anything succeeded (the exit status).
    pub fn succeeded(&self) -> bool {
        match &self.idle {
            Some(i) => i.established > 0,
            None => self.requests.succeeded > 0,
        }
    }

    /// The human summary (several lines, for stderr).
    pub fn human(&self) -> String {
        let mut o = String::new();
        let shape = match (self.loop_kind, self.offered_rate_per_s) {
            ("open", Some(r)) => format!("open loop at {r}/s"),
            _ => "closed loop".to_string(),
        };
        let width = match (self.concurrency, self.connections) {
            (_, Some(n)) => format!("{n} connections"),
            (Some(c), None) => format!("concurrency {c}"),
            (None, None) => String::new(),
        };
        let what = match self.message_bytes {
            Some(n) => format!("plain TCP echo of {n} B"),
            None => format!("(sni {}) {} {}", self.sni, self.method, self.path),
        };
        let _ = writeln!(
            o,
            "tern-load {} → {} {what}: {shape}, {width}, {} thread(s) × {} process(es)",
            self.mode, self.target, self.threads, self.processes
        );
        let _ = writeln!(
            o,
            "  window       {:.3} s (stopped by {}){}",
            self.elapsed_s,
            self.stopped_by.name(),
            if self.members_lost > 0 {
                format!(", {} member(s) LOST", self.members_lost)
            } else {
                String::new()
            }
        );
        if let Some(i) = &self.idle {
            let _ = writeln!(
                o,
                "  idle         {} of {} up at the end; {} established in {:.3} s ({:.0}/s), {} failed, {} closed by the server",
                i.up_at_end, i.target, i.established, i.ramp_s, i.ramp_conn_per_s, i.failed, i.closed_during_hold
            );
        }
        let rq = &self.requests;
        if self.idle.is_none() || rq.completed > 0 {
            let _ = writeln!(
                o,
                "  requests     {} in window ({:.1}/s), {} completed, {} ok (2xx), 3xx {} 4xx {} 5xx {}, {} abandoned",
                rq.in_window, rq.rate_per_s, rq.completed, rq.succeeded, self.status.s3xx, self.status.s4xx, self.status.s5xx, rq.abandoned
            );
        }
        let mut extra = String::new();
        if self.primed > 0 {
            let _ = write!(extra, ", {} primed before the window", self.primed);
        }
        if self.close_timeouts > 0 {
            let _ = write!(
                extra,
                ", {} not closed by the server within 1 s",
                self.close_timeouts
            );
        }
        let _ = writeln!(
            o,
            "  connections  {} opened, handshakes {} full / {} resumed, {} reconnects, {} closed by peer{extra}",
            self.connections_opened,
            self.handshakes.full,
            self.handshakes.resumed,
            self.reconnects,
            self.closed_by_peer,
        );
        let _ = writeln!(
            o,
            "  throughput   {:.3} MB/s body, {:.3} MB/s TLS ({} B in, {} B out)",
            self.throughput_mb_per_s,
            self.tls_throughput_mb_per_s,
            self.bytes.tls_received,
            self.bytes.tls_sent
        );
        for (name, summary) in [
            ("latency", &self.latency_us),
            ("handshake", &self.handshake_us),
        ] {
            if let Some(l) = summary {
                let _ = writeln!(
                    o,
                    "  {name:<12} µs p50 {} p90 {} p99 {} p99.9 {} max {} (n={}, mean {:.1})",
                    l.p50, l.p90, l.p99, l.p99_9, l.max, l.count, l.mean
                );
            }
        }
        let e = &self.errors;
        if e.total == 0 {
            let _ = writeln!(o, "  errors       none");
        } else {
            let k = e.kinds;
            let _ = writeln!(
                o,
                "  errors       {} (connect {}, tls {}, http {}, timeout {}, closed {}, io {})",
                e.total, k.connect, k.tls, k.http, k.timeout, k.closed, k.io
            );
        }
        if let Some(t) = self.tls {
            let _ = writeln!(
                o,
                "  tls          {} {} {}{}",
                t.version,
                t.cipher_suite,
                t.kx_group,
                t.alpn
                    .as_deref()
                    .map(|a| format!(" alpn {a}"))
                    .unwrap_or_default()
            );
        }
        let _ = write!(
            o,
            "  client cpu   {:.3} s in the window ({:.1} % of one core)",
            self.cpu.window_us as f64 / 1e6,
            if self.elapsed_s > 0.0 {
                self.cpu.window_us as f64 / 1e4 / self.elapsed_s
            } else {
                0.0
            }
        );
        if let Some(per) = self.cpu.window_us_per_request {
            let _ = write!(o, ", {per:.1} µs per request");
        }
        let _ = writeln!(o);
        if let Some(m) = &self.machine {
            let _ = writeln!(
                o,
                "  machine      {:.3} s busy of {} CPUs (softirq {:.3} s), client share {:.1} %",
                m.busy_us as f64 / 1e6,
                m.cpus,
                m.softirq_us as f64 / 1e6,
                if m.busy_us > 0 {
                    self.cpu.window_us as f64 * 100.0 / m.busy_us as f64
                } else {
                    0.0
                }
            );
        }
        for w in self.watched {
            let _ = writeln!(
                o,
                "  pid {:<8} cpu {} µs in the window, rss {} → {} → {} KiB",
                w.pid,
                w.cpu_window_us.map_or("?".into(), |v| v.to_string()),
                w.rss_kib_before.map_or("?".into(), |v| v.to_string()),
                w.rss_kib_window_start.map_or("?".into(), |v| v.to_string()),
                w.rss_kib_end.map_or("?".into(), |v| v.to_string()),
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parsing() {
        let text = "cpu  100 5 50 1000 7 3 11 0 0 0\ncpu0 50 2 25 500 3 1 5 0 0 0\ncpu1 50 3 25 500 4 2 6 0 0 0\nintr 1\n";
        let m = MachineSample::parse(text).expect("parses");
        assert_eq!(
            (m.user, m.nice, m.system, m.idle),
            (100, 5, 50, 1000),
            "first fields"
        );
        assert_eq!(
            (m.iowait, m.irq, m.softirq, m.steal),
            (7, 3, 11, 0),
            "later fields"
        );
        assert_eq!(m.cpus, 2, "per-CPU lines counted");
        assert_eq!(
            m.busy(),
            100 + 5 + 50 + 3 + 11,
            "busy excludes idle and iowait"
        );
    }

    #[test]
    fn pid_stat_and_status_parsing() {
        // A command name with spaces and a ')' must not shift the fields.
        let stat = "1234 (we ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu(stat), Some(325), "utime 250 + stime 75");
        assert_eq!(parse_stat_cpu("1234 (x) S 1"), None, "truncated line");
        let status = "Name:\ttern\nVmPeak:\t  9000 kB\nVmRSS:\t   4321 kB\n";
        assert_eq!(parse_status_rss(status), Some(4321), "VmRSS");
        let me = WatchSample::read(std::process::id());
        assert!(
            me.cpu_ticks.is_some() && me.rss_kib.is_some_and(|r| r > 0),
            "own process: {me:?}"
        );
    }
}
