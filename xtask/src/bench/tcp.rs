//! `cargo xtask bench tcp`: plain-TCP (L4) proxying through tern's bypass path (`mode = "bypass"`,
//! tern's own TCP stack on AF_XDP) against tern's kernel path (`mode = "kernel"`, kernel
//! sockets), both `tls = false`, on the same rig, the same echo backend and in the same run.
//!
//! Rig: `Rig::isolated` (client namespace ⇄ veth ⇄ server namespace, one queue). Server side:
//! tern with one worker pinned to CPU 0, and `tern-echo` (a one-thread epoll echo server, from
//! the tern-load package) on 127.0.0.1 pinned to CPU 1. Client side: `tern-load --plain` pinned
//! to CPU 1. Each (run, path) starts a fresh tern with that path's listener only — a bypass
//! worker next to a kernel listener would add its polling to the kernel figures — and the order
//! of the two paths alternates from run to run, so drift hits both.
//!
//! Figures, each over `--runs` runs (median and min–max), and the ratio bypass/kernel of every
//! run pair (the two paths of one run):
//! - new connections/s: connect, send 64 B, read the echo, then reset (SO_LINGER 0). The client
//!   resets so that no side keeps TIME_WAIT (an echo server cannot close first, and a client
//!   FIN would leave ~28k ports in TIME_WAIT within seconds on the client);
//! - round trips/s: 64 B messages echoed on 32 persistent connections, back to back;
//! - bulk MB/s: 1 MiB messages on 4 persistent connections, counting the echoed direction only
//!   (the proxy moves every byte twice: to the backend and back);
//! - server CPU per operation (per connection, per round trip, per MiB echoed): the whole
//!   machine's busy time from /proc/stat (all cores, user + nice + system + irq + softirq +
//!   steal) minus the load generator's own time (wait4 rusage, children included), minus the
//!   echo backend's and every other user process's time (/proc/PID/stat) — on veth the kernel's
//!   receive work runs in softirq on the *sender's* CPU and is charged to no process, so tern's
//!   own process time alone would flatter the kernel path. That is [`super::cpu`]'s method (b);
//!   method (a), tern's process time alone, is printed next to it.
//!
//! Plus tern's criterion per-segment benches (`userspace/benches/tcp.rs`), run on CPU 0 and read
//! from criterion's `estimates.json` as ns per iteration (per element when the bench declares a
//! `Throughput::Elements`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tern_tests::rig::{Rig, TempDir};

use super::compare::{bench_executable, run_captured};
use super::daemon::Daemon;
use super::harness::{self, check_interrupted};
use super::harness::{EchoBins, BACKEND_CPU, LOAD_CPU, TARGET_CPU};
use super::measure::{idle_noise, run_once, shell_line, Ctx, Probe, Tool};
use super::progress::Progress;
use super::results::Measurement;
use super::stats::{fmt_num, Summary};
use crate::{cargo, display, target_dir, workspace_root};

#[derive(Args, Clone)]
pub struct TcpArgs {
    /// Seconds of load per figure.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs per figure (each run measures both paths).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// One run of 2 s per figure, short criterion settings.
    #[arg(long)]
    quick: bool,
    /// Rewrite the tcp section of docs/benchmarks.md with this run's tables.
    #[arg(long)]
    update_docs: bool,
}

const PORT: u16 = 9100;
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9000);
const DOC_BEGIN: &str = "<!-- tcp:begin -->";
const DOC_END: &str = "<!-- tcp:end -->";
const SMALL: u64 = 64;
const BULK: u64 = 1 << 20;
const NEW_CONN_CONCURRENCY: u64 = 64;
const RR_CONNECTIONS: u64 = 32;
const BULK_CONNECTIONS: u64 = 4;

/// The two paths under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPath {
    Kernel,
    Bypass,
}

impl DataPath {
    fn name(self) -> &'static str {
        match self {
            DataPath::Kernel => "kernel",
            DataPath::Bypass => "bypass",
        }
    }
}

/// The three figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    NewConn,
    RoundTrip,
    Bulk,
}

impl Metric {
    const ALL: [Metric; 3] = [Metric::NewConn, Metric::RoundTrip, Metric::Bulk];

    fn title(self) -> &'static str {
        match self {
            Metric::NewConn => "new connections (64 B echo, then RST)",
            Metric::RoundTrip => "round trips (64 B, 32 persistent connections)",
            Metric::Bulk => "bulk (1 MiB messages, 4 connections, echoed direction)",
        }
    }

    fn rate_unit(self) -> &'static str {
        match self {
            Metric::NewConn => "conn/s",
            Metric::RoundTrip => "round trips/s",
            Metric::Bulk => "MB/s",
        }
    }

    fn op_unit(self) -> &'static str {
        match self {
            Metric::NewConn => "µs/conn",
            Metric::RoundTrip => "µs/round trip",
            Metric::Bulk => "µs/MiB",
        }
    }

    /// tern-load's arguments for this figure (without the common ones).
    fn load_args(self) -> Vec<String> {
        let v: Vec<&str> = match self {
            Metric::NewConn => vec![
                "--mode",
                "new-conn",
                "--close",
                "reset",
                "--message-bytes",
                "64",
            ],
            Metric::RoundTrip => vec!["--mode", "keepalive", "--message-bytes", "64"],
            Metric::Bulk => vec!["--mode", "bulk", "--message-bytes", "1048576"],
        };
        let mut v: Vec<String> = v.into_iter().map(str::to_owned).collect();
        let (flag, n) = match self {
            Metric::NewConn => ("--concurrency", NEW_CONN_CONCURRENCY),
            Metric::RoundTrip => ("--connections", RR_CONNECTIONS),
            Metric::Bulk => ("--connections", BULK_CONNECTIONS),
        };
        v.push(flag.to_owned());
        v.push(n.to_string());
        v
    }

    fn message_bytes(self) -> u64 {
        match self {
            Metric::Bulk => BULK,
            _ => SMALL,
        }
    }

    /// Payload bytes one CPU-per-op unit stands for: a MiB for bulk, one message otherwise.
    fn op_bytes(self) -> f64 {
        match self {
            Metric::Bulk => (1u64 << 20) as f64,
            _ => SMALL as f64,
        }
    }
}

/// One measured figure of one path in one run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// conn/s, round trips/s, or MB/s (10^6 B of echoed payload per second).
    rate: f64,
    /// Server CPU per operation, method (b), µs (per MiB for bulk).
    cpu_b: f64,
    /// tern's own process time per operation, method (a), µs.
    cpu_a: f64,
    /// The echo backend's process time per operation, µs (subtracted from (b)).
    backend: f64,
    errors: u64,
}

impl Sample {
    fn of(metric: Metric, m: &Measurement) -> Sample {
        let r = &m.report;
        let rate = match metric {
            Metric::Bulk if r.secs > 0.0 => r.body_bytes as f64 / r.secs / 1e6,
            _ if r.secs > 0.0 => r.ops as f64 / r.secs,
            _ => 0.0,
        };
        // The CPU window is the generator's whole life, so its denominator is every operation
        // completed in that life (window and drain); for bulk, MiB echoed.
        // Bulk messages are 1 MiB each, so per operation is per MiB.
        let ops = r.completed as f64 * metric.message_bytes() as f64 / metric.op_bytes();
        let per = m.window.per_op(ops);
        Sample {
            rate,
            cpu_b: per.map_or(f64::NAN, |p| p.b_us),
            cpu_a: per.map_or(f64::NAN, |p| p.a_us),
            backend: if ops > 0.0 {
                m.window.backend_us as f64 / ops
            } else {
                f64::NAN
            },
            errors: r.errors,
        }
    }
}

/// One criterion figure: bench id, ns per segment (or per iteration), and which of the two.
type CriterionFigure = (String, f64, &'static str);

/// Everything one invocation measured.
#[derive(Default)]
struct Results {
    /// (figure, path, run index, sample); a path that failed in a run has no samples for it.
    samples: Vec<(Metric, DataPath, u32, Sample)>,
    /// Unattributed busy time of the machine with tern up and idle, µs per second, per
    /// (path, run): the noise floor method (b) carries (kernel threads, short-lived processes).
    idle: Vec<(DataPath, u32, f64)>,
    criterion: Vec<CriterionFigure>,
    notes: Vec<String>,
    commands: Vec<(String, String)>,
}

pub fn run(args: &TcpArgs) -> Result<()> {
    harness::require_root(
        "cargo xtask bench tcp",
        "network namespaces, veth pairs, AF_XDP",
    )?;
    let interrupted = harness::interrupt_flag()?;
    let (seconds, runs) = if args.quick {
        (2.0, 1)
    } else {
        (args.seconds.max(0.5), args.runs.max(1))
    };
    harness::catch_rig_panics("bench tcp", &interrupted, || {
        session(args, seconds, runs, &interrupted)
    })
}

fn session(args: &TcpArgs, seconds: f64, runs: u32, interrupted: &AtomicBool) -> Result<()> {
    let steps = 4 + u64::from(runs) * 2;
    let progress = Progress::new(steps);
    let out_dir = target_dir()?.join("bench");
    let logs = out_dir.join("tcp-logs");
    harness::fresh_logs(&logs)?;
    let mut results = Results::default();

    progress.step("building tern, tern-load, tern-echo (release)");
    let bins = harness::build_echo_bins(&progress)?;
    check_interrupted(interrupted)?;

    progress.step("criterion: per-segment costs of tern's TCP stack (CPU 0)");
    match criterion(args.quick, &out_dir.join("criterion-tcp"), &progress) {
        Ok((figures, cmd)) => {
            results.criterion = figures;
            results
                .commands
                .push(("criterion (userspace/benches/tcp.rs)".to_owned(), cmd));
        }
        Err(e) => {
            progress.log(format!("criterion: {e:#}"));
            results.notes.push(format!("criterion: {e:#}"));
        }
    }
    check_interrupted(interrupted)?;

    progress.step("rig and echo backend");
    let rig = Rig::isolated("tcp", 1);
    // New-connection runs open tens of thousands of connections; widen the client's port range
    // (per namespace). The client resets every connection, so no TIME_WAIT builds up.
    let mut sysctl = harness::client_port_settings(&rig);
    results
        .commands
        .push(("client namespace settings".to_owned(), shell_line(&sysctl)));
    run_captured(&mut sysctl)?;
    let dir = TempDir::new("bench-tcp");
    let (mut echo, echo_line) = harness::start_echo(
        &rig,
        &bins.echo,
        BACKEND,
        BACKEND_CPU,
        &logs.join("echo.log"),
        interrupted,
    )?;
    results.commands.push((
        format!("echo backend (server namespace, CPU {BACKEND_CPU})"),
        echo_line,
    ));

    let ctx = Ctx::new(&rig, interrupted, &progress, logs.clone(), LOAD_CPU);
    let addr = SocketAddrV4::new(rig.server_ip, PORT);
    let mut configs = Vec::new();
    for path in [DataPath::Kernel, DataPath::Bypass] {
        let file = dir.join(format!("tern-{}.toml", path.name()));
        std::fs::write(&file, tern_config(path, addr, &rig.server_if, dir.path()))?;
        configs.push((path, file));
    }

    for run in 0..runs {
        let order = if run % 2 == 0 {
            [DataPath::Kernel, DataPath::Bypass]
        } else {
            [DataPath::Bypass, DataPath::Kernel]
        };
        for path in order {
            progress.step(format!("run {}/{runs}: {} path", run + 1, path.name()));
            let config = &configs
                .iter()
                .find(|(p, _)| *p == path)
                .ok_or_else(|| anyhow!("no config for {}", path.name()))?
                .1;
            match measure_path(
                &ctx,
                &bins,
                path,
                config,
                addr,
                &echo,
                seconds,
                run,
                &mut results,
            ) {
                Ok(()) => {}
                Err(e) if interrupted.load(Ordering::Relaxed) => return Err(e),
                Err(e) => {
                    progress.log(format!("{} path, run {}: {e:#}", path.name(), run + 1));
                    results
                        .notes
                        .push(format!("{} path, run {}: {e:#}", path.name(), run + 1));
                }
            }
        }
    }
    for (what, line) in ctx.commands() {
        results.commands.push((what, line));
    }
    echo.stop();
    drop(rig);
    progress.step("report");
    progress.finish();

    let text = report(&results, seconds, runs);
    println!("\n{text}");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("tcp.md"), &text)?;
    eprintln!(
        "bench tcp: written to {}; logs in {}",
        out_dir.join("tcp.md").display(),
        logs.display()
    );
    if args.update_docs {
        update_docs(&text)?;
    }
    Ok(())
}

/// tern's config for one path: one `tls = false` listener, the echo backend, one worker on
/// [`TARGET_CPU`].
fn tern_config(path: DataPath, addr: SocketAddrV4, iface: &str, dir: &Path) -> String {
    let listener = match path {
        DataPath::Kernel => format!("mode = \"kernel\"\ninterface = \"{iface}\"\n"),
        DataPath::Bypass => format!("mode = \"bypass\"\ninterface = \"{iface}\"\n"),
    };
    // 4 KiB pages: a bench must not leave hugepages reserved on the machine.
    let xdp = match path {
        DataPath::Kernel => "",
        DataPath::Bypass => "\n[xdp]\nhugepages = \"off\"\n",
    };
    format!(
        "# Written by `cargo xtask bench tcp`.\n\
         [[listener]]\n\
         address = \"{addr}\"\n\
         {listener}\
         tls = false\n\n\
         [backend]\n\
         servers = [\"{BACKEND}\"]\n\n\
         [workers]\n\
         count = 1\n\
         cpus = [{TARGET_CPU}]\n\n\
         [limits]\n\
         max_connections_per_worker = 16384\n\n\
         [timeouts]\n\
         drain_ms = 1000\n\n\
         [control]\n\
         socket = \"{socket}\"\n\
         {xdp}",
        socket = dir.join(format!("tern-{}.sock", path.name())).display(),
    )
}

/// Starts tern for `path`, measures the three figures, stops tern.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
fn measure_path(
    ctx: &Ctx<'_>,
    bins: &EchoBins,
    path: DataPath,
    config: &Path,
    addr: SocketAddrV4,
    echo: &Daemon,
    seconds: f64,
    run: u32,
    results: &mut Results,
) -> Result<()> {
    let mut check_cmd = ctx.rig.server_command(&bins.tern.display().to_string());
    check_cmd.arg("check-config").arg(config);
    run_captured(&mut check_cmd)
        .with_context(|| format!("tern rejects the {} config", path.name()))?;
    let mut tern =
        harness::start_tern(ctx, &bins.tern, config, TARGET_CPU, path.name(), run, addr)?;
    let probe = Probe {
        target_pgid: tern.pgid(),
        backend_pgid: echo.pgid(),
    };
    let noise = idle_noise(ctx, &probe, Duration::from_secs(1))?;
    results.idle.push((path, run, noise));
    let length = Duration::from_secs_f64(seconds);
    for metric in Metric::ALL {
        let mut argv = harness::plain_load_argv(&bins.load, addr, seconds);
        argv.extend(metric.load_args());
        let what = format!(
            "{} {} #{}",
            path.name(),
            match metric {
                Metric::NewConn => "new-conn",
                Metric::RoundTrip => "round-trips",
                Metric::Bulk => "bulk",
            },
            run + 1
        );
        let m = run_once(ctx, &probe, &mut tern, &what, &argv, length, Tool::TernLoad)?;
        let s = Sample::of(metric, &m);
        ctx.progress.log(format!(
            "{what}: {} {}, server CPU {} {} (tern alone {}), {} errors",
            fmt_num(s.rate),
            metric.rate_unit(),
            fmt_num(s.cpu_b),
            metric.op_unit(),
            fmt_num(s.cpu_a),
            s.errors
        ));
        if s.errors > 0 {
            results
                .notes
                .push(format!("{what}: {} failed operations", s.errors));
        }
        results.samples.push((metric, path, run, s));
    }
    tern.stop();
    Ok(())
}

/// Builds and runs `userspace/benches/tcp.rs` on [`TARGET_CPU`]; returns its figures and the
/// command line. Skips (with an error saying so) only when the bench file does not exist.
fn criterion(
    quick: bool,
    home: &Path,
    progress: &Progress,
) -> Result<(Vec<CriterionFigure>, String)> {
    let file = workspace_root().join("userspace/benches/tcp.rs");
    if !file.is_file() {
        bail!(
            "skipped: {} does not exist yet (no per-segment figures)",
            file.display()
        );
    }
    let mut build = cargo();
    build.args([
        "bench",
        "-p",
        "tern",
        "--bench",
        "tcp",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    progress.log(format!("$ {}", display(&build)));
    let json = run_captured(&mut build).context("building the tcp criterion bench")?;
    let exe = bench_executable(&json, "tcp")
        .ok_or_else(|| anyhow!("cargo did not report the `tcp` bench executable"))?;
    if home.is_dir() {
        std::fs::remove_dir_all(home)
            .with_context(|| format!("cannot clear {}", home.display()))?;
    }
    let (warm, measure, samples) = if quick { (1, 1, 10) } else { (2, 5, 50) };
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(TARGET_CPU.to_string())
        .arg(&exe)
        .args(["--bench", "--warm-up-time"])
        .arg(warm.to_string())
        .arg("--measurement-time")
        .arg(measure.to_string())
        .arg("--sample-size")
        .arg(samples.to_string())
        .env("CRITERION_HOME", home);
    let line = format!(
        "cargo bench -p tern --bench tcp --no-run; CRITERION_HOME={} {}",
        home.display(),
        shell_line(&cmd)
    );
    progress.log(format!("$ {}", display(&cmd)));
    run_captured(&mut cmd).context("running the tcp criterion bench")?;
    let mut figures = Vec::new();
    collect_estimates(home, home, &mut figures)?;
    if figures.is_empty() {
        bail!(
            "the tcp criterion bench wrote no estimates under {}",
            home.display()
        );
    }
    figures.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((figures, line))
}

/// Walks a criterion home for `<id>/new/estimates.json` (skipping `report` directories).
fn collect_estimates(home: &Path, dir: &Path, out: &mut Vec<CriterionFigure>) -> Result<()> {
    let new = dir.join("new");
    if new.join("estimates.json").is_file() {
        let text = std::fs::read_to_string(new.join("estimates.json"))?;
        let bench = std::fs::read_to_string(new.join("benchmark.json")).unwrap_or_default();
        let id = dir.strip_prefix(home).unwrap_or(dir).display().to_string();
        let (ns, unit) =
            per_element_ns(&text, &bench).with_context(|| format!("in {}", new.display()))?;
        out.push((id, ns, unit));
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "report") {
            collect_estimates(home, &p, out)?;
        }
    }
    Ok(())
}

/// The median of an `estimates.json` in ns per iteration, divided by the element count when
/// `benchmark.json` declares `Throughput::Elements` (then: ns per segment).
fn per_element_ns(estimates: &str, benchmark: &str) -> Result<(f64, &'static str)> {
    let e: serde_json::Value = serde_json::from_str(estimates)?;
    let ns = e["median"]["point_estimate"]
        .as_f64()
        .filter(|x| *x > 0.0)
        .ok_or_else(|| anyhow!("no positive median point estimate"))?;
    let elements = serde_json::from_str::<serde_json::Value>(benchmark)
        .ok()
        .and_then(|b| b["throughput"]["Elements"].as_u64())
        .filter(|n| *n > 0);
    Ok(match elements {
        Some(n) => (ns / n as f64, "ns/segment"),
        None => (ns, "ns/iteration"),
    })
}

/// Markdown tables: per path, per figure; ratios per run pair; criterion.
fn report(r: &Results, seconds: f64, runs: u32) -> String {
    let mut t = String::new();
    t += &format!(
        "Plain TCP through tern (`tls = false`), {runs} run(s) of {seconds} s per figure; \
         median (min–max).\n\n"
    );
    t += "| figure | path | rate | server CPU (b) | tern process (a) | echo backend |\n";
    t += "|---|---|---|---|---|---|\n";
    let collect = |metric: Metric, path: DataPath, f: fn(&Sample) -> f64| -> Vec<f64> {
        r.samples
            .iter()
            .filter(|(m, p, _, _)| *m == metric && *p == path)
            .map(|(_, _, _, s)| f(s))
            .collect()
    };
    let show = |v: Vec<f64>| Summary::of(&v).map_or("–".to_owned(), |s| s.display());
    for metric in Metric::ALL {
        for path in [DataPath::Kernel, DataPath::Bypass] {
            t += &format!(
                "| {} | {} | {} {} | {} {} | {} | {} |\n",
                metric.title(),
                path.name(),
                show(collect(metric, path, |s| s.rate)),
                metric.rate_unit(),
                show(collect(metric, path, |s| s.cpu_b)),
                metric.op_unit(),
                show(collect(metric, path, |s| s.cpu_a)),
                show(collect(metric, path, |s| s.backend)),
            );
        }
    }
    t += "\nRatios bypass / kernel, per run pair (median (min–max)); below 1× for CPU is \
          the target (the bypass path costs less server CPU per operation):\n\n";
    t += "| figure | rate bypass/kernel | server CPU per op bypass/kernel |\n|---|---|---|\n";
    for metric in Metric::ALL {
        let pairs = |f: fn(&Sample) -> f64| -> Vec<f64> {
            let runs: Vec<u32> = r.samples.iter().map(|s| s.2).collect();
            let mut out = Vec::new();
            for run in runs
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
            {
                let get = |path: DataPath| {
                    r.samples
                        .iter()
                        .find(|(m, p, n, _)| *m == metric && *p == path && *n == run)
                        .map(|(_, _, _, s)| f(s))
                };
                if let (Some(b), Some(k)) = (get(DataPath::Bypass), get(DataPath::Kernel)) {
                    if k > 0.0 && b.is_finite() {
                        out.push(b / k);
                    }
                }
            }
            out
        };
        let ratio = |v: Vec<f64>| {
            Summary::of(&v).map_or("–".to_owned(), |s| {
                if s.n == 1 {
                    format!("{:.2}×", s.median)
                } else {
                    format!("{:.2}× ({:.2}–{:.2})", s.median, s.min, s.max)
                }
            })
        };
        t += &format!(
            "| {} | {} | {} |\n",
            metric.title(),
            ratio(pairs(|s| s.rate)),
            ratio(pairs(|s| s.cpu_b)),
        );
    }
    t += "\nServer CPU (b) = the machine's busy time (/proc/stat, both cores, softirq \
          included) minus tern-load's own time (wait4) minus the echo backend's and every \
          other user process's time (/proc/PID/stat), per operation; (a) = tern's own process \
          time. Bulk: per MiB echoed; MB/s counts the echoed direction only (the proxy \
          carries each byte twice).\n";
    if !r.idle.is_empty() {
        t += "\nIdle machine with tern up, before each path's figures (busy time charged to no \
              process, µs per second; it is inside every (b) figure): ";
        t += &r
            .idle
            .iter()
            .map(|(p, run, x)| format!("{} #{}: {}", p.name(), run + 1, fmt_num(*x)))
            .collect::<Vec<_>>()
            .join(", ");
        t += ".\n";
    }
    if !r.criterion.is_empty() {
        t += "\nCriterion, tern's TCP stack in memory (`userspace/benches/tcp.rs`, CPU 0, \
              median):\n\n| bench | cost |\n|---|---|\n";
        for (id, ns, unit) in &r.criterion {
            t += &format!("| {id} | {} {unit} |\n", fmt_num(*ns));
        }
    }
    if !r.notes.is_empty() {
        t += "\nNotes:\n\n";
        for n in &r.notes {
            t += &format!("- {}\n", n.replace('\n', " "));
        }
    }
    t += "\nCommands:\n\n";
    for (what, line) in &r.commands {
        t += &format!("- {what}: `{line}`\n");
    }
    t
}

fn update_docs(text: &str) -> Result<()> {
    let path = harness::rewrite_doc_section(DOC_BEGIN, DOC_END, text)?;
    eprintln!("bench tcp: updated {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_differ_only_in_the_path() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 9, 8, 1), PORT);
        let k = tern_config(DataPath::Kernel, addr, "veth-s", Path::new("/tmp/x"));
        let b = tern_config(DataPath::Bypass, addr, "veth-s", Path::new("/tmp/x"));
        for text in [&k, &b] {
            let v: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(v["listener"][0]["tls"].as_bool(), Some(false), "{text}");
            assert_eq!(v["listener"][0]["address"].as_str(), Some("10.9.8.1:9100"));
            assert_eq!(v["workers"]["cpus"][0].as_integer(), Some(0));
            assert_eq!(v["backend"]["servers"][0].as_str(), Some("127.0.0.1:9000"));
        }
        assert!(
            k.contains("mode = \"kernel\"") && !k.contains("[xdp]"),
            "{k}"
        );
        assert!(
            b.contains("mode = \"bypass\"") && b.contains("hugepages = \"off\""),
            "{b}"
        );
    }

    #[test]
    fn criterion_per_segment_when_elements_are_declared() {
        let est = r#"{"median":{"point_estimate":6400.0}}"#;
        let with = r#"{"throughput":{"Elements":64}}"#;
        assert_eq!(
            per_element_ns(est, with).expect("valid"),
            (100.0, "ns/segment")
        );
        assert_eq!(
            per_element_ns(est, "").expect("valid"),
            (6400.0, "ns/iteration")
        );
        assert!(per_element_ns(r#"{"median":{"point_estimate":0.0}}"#, "").is_err());
    }

    #[test]
    fn report_pairs_runs_for_ratios() {
        let s = |rate: f64, cpu: f64| Sample {
            rate,
            cpu_b: cpu,
            cpu_a: cpu / 2.0,
            backend: 1.0,
            errors: 0,
        };
        let r = Results {
            samples: vec![
                (Metric::NewConn, DataPath::Kernel, 0, s(100.0, 20.0)),
                (Metric::NewConn, DataPath::Bypass, 0, s(200.0, 10.0)),
                (Metric::NewConn, DataPath::Kernel, 1, s(100.0, 40.0)),
                (Metric::NewConn, DataPath::Bypass, 1, s(100.0, 10.0)),
            ],
            ..Results::default()
        };
        let t = report(&r, 1.0, 2);
        assert!(
            t.contains(
                "| new connections (64 B echo, then RST) | 1.50× (1.00–2.00) | 0.38× (0.25–0.50) |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| bulk (1 MiB messages, 4 connections, echoed direction) | – | – |"),
            "{t}"
        );
    }
}
