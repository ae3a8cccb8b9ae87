//! `cargo xtask bench flood`: new connections under a spoofed SYN flood, on tern's kernel path
//! and its bypass path — what a client that keeps connecting sees while an attacker floods the
//! listener from many addresses at the rig's maximum rate.
//!
//! Rig: as `bench tcp` (`Rig::isolated`, one queue): tern with one worker pinned to CPU 0, a
//! `tern-echo` backend and `tern-load --plain` (new connections: connect, 64 B echo, reset)
//! pinned to CPU 1. The flood is tern's SYN generator (`tern_tests::pktgen`, AF_PACKET with
//! qdisc bypass) in the client namespace, unpinned, sending SYNs from 65,536 spoofed source
//! addresses (none of which exists, so the SYN-ACKs go nowhere) as fast as it can for the
//! whole measuring window. Both the generator and the veth's receive path (where the XDP
//! program runs, in softirq on the sender's CPU) share the machine's two cores with tern and
//! the client: the figure is "what is left for real clients", not a capacity.
//!
//! Three paths: the kernel path, the bypass path with its worker answering SYNs (`bypass`,
//! `[xdp] syn_cookies = "worker"`) and with the XDP program answering them
//! (`bypass-xdp-cookies`, `syn_cookies = "xdp"`). The client's veth end runs `tern_pass` for
//! every path (veth delivers the program's `XDP_TX` SYN-ACKs only to a peer in NAPI mode).
//!
//! Each (run, path) starts a fresh tern with that path's listener only and measures twice:
//! without the flood, then with it. Reported, per path: connections/s and connect-to-echo
//! latency p50/p99 (tern-load's), failed connections, the flood's SYN rate, and the XDP
//! program's and the workers' counters over the flood window (`tern ctl stats`).
//!
//! Opt-in (not part of `cargo xtask bench`): about `runs × 3 × 2 × seconds` plus start-up.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tern_tests::pktgen::{mac_of, send_syns, Sent, SynSpec};
use tern_tests::rig::{Rig, TempDir};

use super::compare::run_captured;
use super::daemon::Daemon;
use super::harness;
use super::harness::{EchoBins, BACKEND_CPU, LOAD_CPU, TARGET_CPU};
use super::measure::{run_once, shell_line, Ctx, Probe, Tool};
use super::progress::Progress;
use super::stats::fmt_num;
use crate::target_dir;

#[derive(Args, Clone)]
pub struct FloodArgs {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs (each measures both paths, with and without the flood).
    #[arg(long, default_value_t = 2)]
    runs: u32,
    /// One run of 2 s per measurement.
    #[arg(long)]
    quick: bool,
}

const PORT: u16 = 9200;
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9001);
/// Concurrent connection attempts of the well-behaved client.
const CONCURRENCY: u64 = 16;
/// Spoofed source addresses of the flood (from 10.200.0.0 up: not on any rig interface).
const FLOOD_SOURCES: u32 = 65_536;
const FLOOD_BASE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPath {
    Kernel,
    /// The bypass path with its workers answering SYNs (`[xdp] syn_cookies = "worker"`).
    Bypass,
    /// The bypass path with the XDP program answering SYNs (`[xdp] syn_cookies = "xdp"`).
    BypassXdp,
}

impl DataPath {
    fn name(self) -> &'static str {
        match self {
            DataPath::Kernel => "kernel",
            DataPath::Bypass => "bypass",
            DataPath::BypassXdp => "bypass-xdp-cookies",
        }
    }

    /// The listener's `mode`.
    fn mode(self) -> &'static str {
        match self {
            DataPath::Kernel => "kernel",
            DataPath::Bypass | DataPath::BypassXdp => "bypass",
        }
    }

    /// `[xdp] syn_cookies`.
    fn syn_cookies(self) -> &'static str {
        match self {
            DataPath::BypassXdp => "xdp",
            DataPath::Kernel | DataPath::Bypass => "worker",
        }
    }
}

/// One measurement of the client.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// One (run, path): the client without and with the flood, and the flood itself.
#[derive(Debug, Clone, Default)]
struct Row {
    path: Option<DataPath>,
    run: u32,
    quiet: Sample,
    flooded: Sample,
    flood_syns_per_s: f64,
    /// Counter deltas over the flood window (`tern ctl stats`), by name.
    counters: Vec<(&'static str, u64)>,
}

pub fn run(args: &FloodArgs) -> Result<()> {
    harness::require_root(
        "cargo xtask bench flood",
        "network namespaces, veth pairs, AF_XDP",
    )?;
    let interrupted = harness::interrupt_flag()?;
    let (seconds, runs) = if args.quick {
        (2.0, 1)
    } else {
        (args.seconds.max(0.5), args.runs.max(1))
    };
    harness::catch_rig_panics("bench flood", &interrupted, || {
        session(seconds, runs, &interrupted)
    })
}

fn session(seconds: f64, runs: u32, interrupted: &AtomicBool) -> Result<()> {
    let progress = Progress::new(2 + u64::from(runs) * 3);
    let out_dir = target_dir()?.join("bench");
    let logs = out_dir.join("flood-logs");
    harness::fresh_logs(&logs)?;

    progress.step("building tern, tern-load, tern-echo (release)");
    let bins = harness::build_echo_bins(&progress)?;

    progress.step("rig and echo backend");
    let rig = Rig::isolated("flood", 1);
    // veth hands the XDP program's `XDP_TX` frames (the SYN-ACKs of `syn_cookies = "xdp"`) only
    // to a peer in NAPI mode, which an XDP program on it turns on: `tern_pass` on the client's
    // end, for every path alike.
    let client_if = rig.client_if.clone();
    let _pass = rig
        .client
        .run(move || tern::bypass::xdp::attach_pass(&client_if, tern::config::XdpAttach::Native))
        .context("attaching tern_pass to the client's veth end")?;
    let mut sysctl = harness::client_port_settings(&rig);
    let mut commands = vec![("client namespace settings".to_owned(), shell_line(&sysctl))];
    run_captured(&mut sysctl)?;
    let dir = TempDir::new("bench-flood");
    let (mut echo, echo_line) = harness::start_echo(
        &rig,
        &bins.echo,
        BACKEND,
        BACKEND_CPU,
        &logs.join("echo.log"),
        interrupted,
    )?;
    commands.push((
        format!("echo backend (server namespace, CPU {BACKEND_CPU})"),
        echo_line,
    ));
    let spec = SynSpec {
        interface: rig.client_if.clone(),
        src_mac: mac_of(rig.client_command("ip"), &rig.client_if)
            .map_err(|e| anyhow!("client MAC: {e}"))?,
        dst_mac: mac_of(rig.server_command("ip"), &rig.server_if)
            .map_err(|e| anyhow!("server MAC: {e}"))?,
        src_ip: FLOOD_BASE,
        src_ips: FLOOD_SOURCES,
        dst_ip: rig.server_ip,
        dst_port: PORT,
        flows: 1,
    };

    let ctx = Ctx::new(&rig, interrupted, &progress, logs.clone(), LOAD_CPU);
    let addr = SocketAddrV4::new(rig.server_ip, PORT);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for run in 0..runs {
        let order = if run % 2 == 0 {
            [DataPath::Kernel, DataPath::Bypass, DataPath::BypassXdp]
        } else {
            [DataPath::BypassXdp, DataPath::Bypass, DataPath::Kernel]
        };
        for path in order {
            progress.step(format!("run {}/{runs}: {} path", run + 1, path.name()));
            let config = dir.join(format!("tern-{}.toml", path.name()));
            let socket = dir.join(format!("tern-{}.sock", path.name()));
            std::fs::write(&config, tern_config(path, addr, &rig.server_if, &socket))?;
            match measure_path(
                &ctx, &bins, path, &config, &socket, addr, &echo, &spec, seconds, run,
            ) {
                Ok(row) => rows.push(row),
                Err(e) if interrupted.load(Ordering::Relaxed) => return Err(e),
                Err(e) => {
                    progress.log(format!("{} path, run {}: {e:#}", path.name(), run + 1));
                    notes.push(format!("{} path, run {}: {e:#}", path.name(), run + 1));
                }
            }
        }
    }
    commands.extend(ctx.commands());
    echo.stop();
    drop(rig);
    progress.finish();

    let text = report(&rows, &notes, &commands, seconds);
    println!("\n{text}");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("flood.md"), &text)?;
    eprintln!(
        "bench flood: written to {}; logs in {}",
        out_dir.join("flood.md").display(),
        logs.display()
    );
    Ok(())
}

/// tern's config for one path: one `tls = false` listener on the rig's interface (so the
/// kernel path has the XDP program too, for its counters), the echo backend, one worker.
fn tern_config(path: DataPath, addr: SocketAddrV4, iface: &str, socket: &Path) -> String {
    let mode = path.mode();
    let syn_cookies = path.syn_cookies();
    format!(
        "# Written by `cargo xtask bench flood`.\n\
         [[listener]]\n\
         address = \"{addr}\"\n\
         mode = \"{mode}\"\n\
         interface = \"{iface}\"\n\
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
         socket = \"{socket}\"\n\n\
         [xdp]\n\
         hugepages = \"off\"\n\
         syn_cookies = \"{syn_cookies}\"\n",
        socket = socket.display(),
    )
}

/// `tern ctl stats` as JSON (server namespace).
fn stats(ctx: &Ctx<'_>, bins: &EchoBins, socket: &Path) -> Result<serde_json::Value> {
    let mut cmd = ctx.rig.server_command(&bins.tern.display().to_string());
    cmd.args(["ctl", "--socket"]).arg(socket).arg("stats");
    let out = cmd.output().context("running tern ctl stats")?;
    if !out.status.success() {
        bail!(
            "tern ctl stats: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("tern ctl stats is not JSON")
}

/// The counters reported over the flood window: path to each in `tern ctl stats`.
const COUNTERS: [(&str, &[&str]); 8] = [
    ("xdp packets", &["xdp", "0", "counters", "packets"]),
    ("xdp steered", &["xdp", "0", "counters", "steered"]),
    ("xdp passed", &["xdp", "0", "counters", "passed"]),
    (
        "xdp rate_limited",
        &["xdp", "0", "counters", "rate_limited"],
    ),
    ("xdp syn_cookies", &["xdp", "0", "counters", "syn_cookies"]),
    ("bypass SYN-ACKs", &["bypass", "tcp", "syn_acks_sent"]),
    (
        "bypass connections",
        &["bypass", "tcp", "connections_created"],
    ),
    ("kernel accepted", &["total", "accepted"]),
];

fn counter(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = match p.parse::<usize>() {
            Ok(i) => &x[i],
            Err(_) => &x[*p],
        };
    }
    x.as_u64().unwrap_or(0)
}

fn sample(m: &super::results::Measurement) -> Sample {
    let latency = m.report.latency.unwrap_or_default();
    Sample {
        rate: m.rate(),
        p50_us: latency.p50_us,
        p99_us: latency.p99_us,
        errors: m.report.errors,
    }
}

/// Starts tern for `path`, measures the client without and with the flood, stops tern.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
fn measure_path(
    ctx: &Ctx<'_>,
    bins: &EchoBins,
    path: DataPath,
    config: &Path,
    socket: &Path,
    addr: SocketAddrV4,
    echo: &Daemon,
    spec: &SynSpec,
    seconds: f64,
    run: u32,
) -> Result<Row> {
    let mut tern =
        harness::start_tern(ctx, &bins.tern, config, TARGET_CPU, path.name(), run, addr)?;
    let probe = Probe {
        target_pgid: tern.pgid(),
        backend_pgid: echo.pgid(),
    };
    let length = Duration::from_secs_f64(seconds);
    let mut argv = harness::plain_load_argv(&bins.load, addr, seconds);
    argv.extend([
        "--mode".to_owned(),
        "new-conn".to_owned(),
        "--close".to_owned(),
        "reset".to_owned(),
        "--message-bytes".to_owned(),
        "64".to_owned(),
        "--concurrency".to_owned(),
        CONCURRENCY.to_string(),
    ]);
    let what = format!("{} quiet #{}", path.name(), run + 1);
    let quiet = sample(&run_once(
        ctx,
        &probe,
        &mut tern,
        &what,
        &argv,
        length,
        Tool::TernLoad,
    )?);

    // The flood: from just before the client starts until just after it ends.
    let before = stats(ctx, bins, socket)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let spec = spec.clone();
        let stop = stop.clone();
        // Bounded twice: by the stop flag, and by a deadline well past the client's window.
        let limit = length + Duration::from_secs(30);
        ctx.rig
            .client
            .spawn(move || send_syns(&spec, u64::MAX, limit, &stop))
    };
    std::thread::sleep(Duration::from_millis(200));
    let what = format!("{} flooded #{}", path.name(), run + 1);
    let flooded = run_once(ctx, &probe, &mut tern, &what, &argv, length, Tool::TernLoad);
    stop.store(true, Ordering::Relaxed);
    let sent: Sent = flood
        .join()
        .map_err(|_| anyhow!("the SYN generator panicked"))?
        .context("SYN generator")?;
    let after = stats(ctx, bins, socket)?;
    let flooded = sample(&flooded?);
    tern.stop();

    let counters = COUNTERS
        .iter()
        .map(|(name, p)| {
            (
                *name,
                counter(&after, p).saturating_sub(counter(&before, p)),
            )
        })
        .collect();
    let row = Row {
        path: Some(path),
        run,
        quiet,
        flooded,
        flood_syns_per_s: sent.per_second(),
        counters,
    };
    ctx.progress.log(format!(
        "{} #{}: {} conn/s quiet, {} under {} SYN/s",
        path.name(),
        run + 1,
        fmt_num(quiet.rate),
        fmt_num(flooded.rate),
        fmt_num(row.flood_syns_per_s),
    ));
    Ok(row)
}

fn report(rows: &[Row], notes: &[String], commands: &[(String, String)], seconds: f64) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "### New connections under a spoofed SYN flood ({seconds} s per measurement)\n\n\
         Client: tern-load --plain new connections (64 B echo, reset), concurrency \
         {CONCURRENCY}, CPU {LOAD_CPU}. Flood: SYNs from {FLOOD_SOURCES} spoofed sources at the \
         generator's maximum rate. tern: one worker on CPU {TARGET_CPU}.\n\n\
         | path | run | conn/s quiet | p50 / p99 µs quiet | conn/s flooded | p50 / p99 µs flooded | \
         flooded / quiet | failed (quiet / flooded) | flood SYN/s |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    ));
    for r in rows {
        let name = r.path.map(DataPath::name).unwrap_or("?");
        let ratio = if r.quiet.rate > 0.0 {
            format!("{:.2}×", r.flooded.rate / r.quiet.rate)
        } else {
            "–".to_owned()
        };
        t.push_str(&format!(
            "| {name} | {} | {} | {} / {} | {} | {} / {} | {ratio} | {} / {} | {} |\n",
            r.run + 1,
            fmt_num(r.quiet.rate),
            fmt_num(r.quiet.p50_us),
            fmt_num(r.quiet.p99_us),
            fmt_num(r.flooded.rate),
            fmt_num(r.flooded.p50_us),
            fmt_num(r.flooded.p99_us),
            r.quiet.errors,
            r.flooded.errors,
            fmt_num(r.flood_syns_per_s),
        ));
    }
    t.push_str("\nCounters over the flood window (`tern ctl stats` deltas):\n\n| path | run |");
    for (name, _) in COUNTERS {
        t.push_str(&format!(" {name} |"));
    }
    t.push_str("\n|---|---|");
    for _ in COUNTERS {
        t.push_str("---|");
    }
    t.push('\n');
    for r in rows {
        let name = r.path.map(DataPath::name).unwrap_or("?");
        t.push_str(&format!("| {name} | {} |", r.run + 1));
        for (_, v) in &r.counters {
            t.push_str(&format!(" {v} |"));
        }
        t.push('\n');
    }
    if !notes.is_empty() {
        t.push_str("\nNotes:\n");
        for n in notes {
            t.push_str(&format!("- {n}\n"));
        }
    }
    t.push_str("\nCommands:\n\n");
    for (what, line) in commands {
        t.push_str(&format!("- {what}: `{line}`\n"));
    }
    t
}
