//! `cargo xtask bench million`: up to 1,000,000 idle TLS connections held by one tern process on
//! the bypass path (issue 12, item 4) — tern's resident memory at each step, then new-connection
//! latency at the top step with every connection still held. Opt-in: not part of `bench`.
//!
//! Rig: `Rig::isolated` (one veth pair, one queue). Server side: tern with one `mode = "bypass"`
//! TLS listener and **one** bypass worker pinned to CPU 0 (as the comparison's tern-bypass), the
//! nginx backend on CPU 1 (only the latency run reaches it). Client side: `tern-load --mode idle`
//! processes pinned to CPU 1, each holding at most RLIMIT_NOFILE − 64 connections (~19,900) from
//! an address of its own (the rig's client address, then `.3`, `.4`, … added to the client
//! veth), so no process runs out of descriptors and no address out of ports.
//!
//! Ramp: steps (default 10k, 100k, 250k, 500k, 750k, 1M) reached by starting client processes
//! one after another; a process counts once its ready file exists *and* tern's proxy has
//! completed as many handshakes. The ramp stops cleanly, and says why, at the first step that
//! cannot be reached: memory (before a step, when MemAvailable minus the step's projected cost —
//! the bytes per connection measured so far, or 32 KiB before any — would go below `--reserve-mib`;
//! during one, when MemAvailable falls below half of it, the last client is killed), time (the
//! run's `--max-minutes`, keeping room for the latency run), or tern (a client failed or tern's
//! counters refused connections). Memory is the one to watch on a shared machine: the guard
//! stops before the OOM killer would pick a process.
//!
//! Figures per step: tern's RSS (its process group), growth over the baseline per connection and
//! since the previous step, the clients' RSS, and MemAvailable's fall per connection (tern, the
//! clients, and the client namespace's kernel sockets together). At the top step: tern's CPU over
//! `--idle-seconds` with everything held and no traffic (near zero unless some per-turn or
//! per-tick work grows with the connections held), then
//! `tern-load --mode new-conn --rate R` open loop (coordinated-omission corrected), p50/p99, and
//! tern's `bypass.tcp.connections` gauge before and after, which must still count every held
//! connection; the clients' own reports must show every handshake completed and none closed.
//!
//! Costs that scale with the configured `limits.max_connections_per_worker` rather than with
//! use are paid before the first connection and show in the baseline row (the slot table, the
//! flow table, the free list, the TIME-WAIT table up to 2^20 entries, a virtual reservation of
//! both TCB buffers per slot that is not resident until written).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{Rig, TempDir};

use super::compare::{add_client_sources, idle_per_process, nofile_limit, run_captured};
use super::configs::{self, TargetLayout};
use super::daemon::Job;
use super::harness::{self, check_interrupted, BACKEND_CPU, LOAD_CPU, TARGET_CPU};
use super::load::{self, Endpoint, TernLoad};
use super::measure::{shell_line, Ctx, RUN_SLACK};
use super::plots::{self, Series};
use super::proc;
use super::progress::Progress;
use super::stats::fmt_num;
use super::targets::{self, Prepared, Target, BACKEND, SMALL_BODY, TLS_PORT};
use crate::{target_dir, workspace_root};

#[derive(Args, Clone)]
pub struct MillionArgs {
    /// Idle-connection counts to reach, comma-separated, ascending.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,100000,250000,500000,750000,1000000"
    )]
    steps: Vec<u64>,
    /// The whole run's limit in minutes (ramp and latency run; the build is not counted).
    #[arg(long, default_value_t = 25.0)]
    max_minutes: f64,
    /// MemAvailable (MiB) the ramp keeps free for the rest of the machine.
    #[arg(long, default_value_t = 2048)]
    reserve_mib: u64,
    /// New connections per second offered in the latency run at the top step.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of the latency run (after 2 s of warm-up).
    #[arg(long, default_value_t = 10.0)]
    latency_seconds: f64,
    /// Seconds tern's CPU is measured with every connection held and no traffic, before the
    /// latency run (a worker holding idle connections should use next to none).
    #[arg(long, default_value_t = 5.0)]
    idle_seconds: f64,
    /// Rewrite the million section of docs/benchmarks.md and docs/bench/million.svg.
    #[arg(long)]
    update_docs: bool,
}

const SNI: &str = "bench.test";
const DOC_BEGIN: &str = "<!-- million:begin -->";
const DOC_END: &str = "<!-- million:end -->";
/// Bytes per connection assumed before any were measured (tern ~17 KiB today, the client's
/// socket and state, margin).
const PRIOR_BYTES_PER_CONN: u64 = 32 * 1024;
/// Handshakes one client process keeps in flight while opening: at tern-load's default of 32 the
/// opening rate was bound by handshake latency on a busy machine (~700/s), not by CPU.
const OPENING_CONCURRENCY: u32 = 128;
/// The longest one client process may take to open its connections.
const CLIENT_LIMIT: Duration = Duration::from_secs(240);
/// Warm-up of the latency run.
const LATENCY_WARMUP: Duration = Duration::from_secs(2);

/// One step reached.
#[derive(Debug, Clone, Copy)]
struct Point {
    connections: u64,
    tern_rss: u64,
    clients_rss: u64,
    mem_available: u64,
    /// Seconds since the ramp started.
    at_s: f64,
}

/// The latency run at the top step.
#[derive(Debug, Clone, Default)]
struct LatencyRun {
    offered: f64,
    completed: u64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    /// tern's `bypass.tcp.connections` before and after the run.
    live_before: u64,
    live_after: u64,
}

/// Everything one invocation measured.
#[derive(Default)]
struct Results {
    slots: u64,
    per_process: u64,
    baseline_rss: u64,
    baseline_available: u64,
    points: Vec<Point>,
    /// Why the ramp ended below the last step (`None`: every step was reached).
    stopped: Option<String>,
    latency: Option<LatencyRun>,
    /// tern's CPU over the idle window at the top step: (CPU µs, window µs).
    idle_cpu: Option<(u64, u64)>,
    /// Clients' own accounting at the end: (established, asked, closed during the hold).
    clients: (u64, u64, u64),
    notes: Vec<String>,
    commands: Vec<(String, String)>,
}

pub fn run(args: &MillionArgs) -> Result<()> {
    harness::require_root(
        "cargo xtask bench million",
        "network namespaces, veth pairs, AF_XDP",
    )?;
    let mut steps = args.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    steps.retain(|&n| n > 0);
    if steps.is_empty() {
        bail!("--steps: no step above 0");
    }
    let interrupted = harness::interrupt_flag()?;
    harness::catch_rig_panics("bench million", &interrupted, || {
        session(args, &steps, &interrupted)
    })
}

/// `MemAvailable` from /proc/meminfo, bytes.
fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("/proc/meminfo has no MemAvailable line"))
}

fn sysctl_value(name: &str) -> String {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(&path)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

fn mib(bytes: u64) -> String {
    fmt_num(bytes as f64 / (1u64 << 20) as f64)
}

fn kib(bytes: f64) -> String {
    if bytes.is_finite() {
        fmt_num(bytes / 1024.0)
    } else {
        "–".to_owned()
    }
}

/// tern's config: the bench's bypass config ([`configs::tern_bypass`]) with `slots` connection
/// slots and an idle timeout longer than the run (the default 300 s would close the first
/// connections while the ramp is still opening the last ones).
fn tern_config(
    listen: SocketAddrV4,
    iface: &str,
    cert: &Path,
    key: &Path,
    dir: &Path,
    slots: u64,
    idle_ms: u64,
) -> Result<String> {
    let layout = TargetLayout {
        listen,
        backend: BACKEND,
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        // tern takes the certificate and key apart.
        combined_pem: cert.to_path_buf(),
        dir: dir.to_path_buf(),
        cpu: TARGET_CPU,
        max_connections: u32::try_from(slots).context("connection slots beyond u32")?,
    };
    Ok(configs::tern_bypass_idle(&layout, iface, Some(idle_ms))?)
}

fn session(args: &MillionArgs, steps: &[u64], interrupted: &AtomicBool) -> Result<()> {
    let progress = Progress::new(steps.len() as u64 + 4);
    let out_dir = target_dir()?.join("bench");
    let logs = out_dir.join("million-logs");
    harness::fresh_logs(&logs)?;
    let mut r = Results::default();

    progress.step("building tern and tern-load (release)");
    let [tern_bin, load_bin] =
        harness::build_release(&progress, "tern and tern-load", ["tern", "tern-load"])?;
    check_interrupted(interrupted)?;
    // The clock starts after the build: the limit is for the measurement.
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.max_minutes.max(1.0) * 60.0);
    let latency_room = Duration::from_secs_f64(args.latency_seconds.max(1.0))
        + LATENCY_WARMUP
        + RUN_SLACK
        + Duration::from_secs_f64(args.idle_seconds.max(0.0))
        + Duration::from_secs(30);

    progress.step("rig, certificate, backend, client addresses");
    let top = *steps.last().ok_or_else(|| anyhow!("no steps"))?;
    let nofile = nofile_limit();
    r.per_process = idle_per_process(nofile);
    r.slots = targets::bypass_slots(top);
    for name in [
        "fs.file-max",
        "fs.nr_open",
        "net.ipv4.tcp_mem",
        "vm.max_map_count",
        "vm.overcommit_memory",
    ] {
        r.notes.push(format!("{name} = {}", sysctl_value(name)));
    }
    r.notes.push(format!(
        "RLIMIT_NOFILE {nofile}: {} connections per client process and per source address",
        r.per_process
    ));
    let file_max: u64 = sysctl_value("fs.file-max").parse().unwrap_or(u64::MAX);
    if file_max < top + top / 10 {
        r.notes.push(format!(
            "fs.file-max {file_max} is below {top} client sockets plus a margin: the ramp may stop on ENFILE"
        ));
    }
    let rig = Rig::isolated("million", 1);
    // Per namespace: the whole port range for every source address, and TIME_WAIT reuse for the
    // latency run's short connections. Nothing global is changed.
    let mut sysctl = harness::client_port_settings(&rig);
    r.commands
        .push(("client namespace settings".to_owned(), shell_line(&sysctl)));
    run_captured(&mut sysctl)?;
    let dir = TempDir::new("bench-million");
    let cert = write_self_signed(dir.path(), "million", &[SNI], KeyKind::EcdsaP256);
    let backend_files = targets::prepare_backend(&dir.join("backend"), BACKEND_CPU)?;
    let backend = targets::start_backend(&backend_files, &rig, BACKEND_CPU, interrupted)?;
    let extra = top.div_ceil(r.per_process).saturating_sub(1);
    let (sources, example) = add_client_sources(&rig, extra)?;
    if let Some(line) = example {
        r.commands
            .push((format!("extra client addresses ({extra} in all)"), line));
    }
    let tern_dir = dir.join("tern");
    std::fs::create_dir_all(&tern_dir)?;
    let config = tern_dir.join("tern.toml");
    let idle_ms = (limit.as_millis() as u64).saturating_add(600_000);
    let listen = SocketAddrV4::new(rig.server_ip, TLS_PORT);
    std::fs::write(
        &config,
        tern_config(
            listen,
            &rig.server_if,
            &cert.cert,
            &cert.key,
            &tern_dir,
            r.slots,
            idle_ms,
        )?,
    )?;
    let s = |p: &Path| p.display().to_string();
    let prepared = Prepared {
        target: Target::TernBypass,
        config: config.clone(),
        argv: vec![s(&tern_bin), "run".into(), "--config".into(), s(&config)],
        check_argv: vec![s(&tern_bin), "check-config".into(), s(&config)],
        control_socket: Some(tern_dir.join("tern.sock")),
        log: logs.join("tern.log"),
    };
    targets::check(&prepared, &rig)?;
    r.commands.push((
        format!(
            "tern (server namespace, CPU {TARGET_CPU}), config {}",
            config.display()
        ),
        shell_line(&targets::pinned_server_command(
            &rig,
            TARGET_CPU,
            &prepared.argv,
        )),
    ));
    let socket = tern_dir.join("tern.sock");
    let ctx = Ctx::new(&rig, interrupted, &progress, logs.clone(), LOAD_CPU);
    let tern_load = TernLoad {
        bin: s(&load_bin),
        endpoint: Endpoint {
            addr: listen,
            sni: SNI.to_owned(),
        },
        ca: s(&cert.cert),
    };

    let mut tern = targets::start(&prepared, &rig, TARGET_CPU, interrupted)?;
    let pgid = tern.pgid();
    std::thread::sleep(Duration::from_millis(500));
    r.baseline_rss = proc::group_usage(pgid)?.rss_bytes;
    r.baseline_available = mem_available()?;
    progress.log(format!(
        "tern up with {} slots: RSS {} MiB before any connection; MemAvailable {} MiB",
        fmt_num(r.slots as f64),
        mib(r.baseline_rss),
        mib(r.baseline_available)
    ));
    let reserve = args.reserve_mib << 20;
    let stats_before = targets::tern_stats(&socket)?;

    // The ramp. Jobs live until the end (dropping one kills its connections).
    let mut jobs: Vec<(Job, PathBuf, u64)> = Vec::new();
    let mut held = 0u64;
    let hold = limit + Duration::from_secs(120);
    let mut opening_rate = f64::NAN;
    'steps: for &step in steps {
        check_interrupted(interrupted)?;
        progress.step(format!("{} idle connections", fmt_num(step as f64)));
        // Memory: project this step's cost from what the connections so far cost the machine.
        let available = mem_available()?;
        let per_conn = if held >= 5_000 {
            (r.baseline_available.saturating_sub(available) / held).max(4096)
        } else {
            PRIOR_BYTES_PER_CONN
        };
        let need = (step - held) * per_conn * 11 / 10;
        if available < need + reserve {
            r.stopped = Some(format!(
                "memory: {} more connections at ~{} KiB each (measured so far: tern, clients and \
                 kernel sockets) need ~{} MiB, MemAvailable is {} MiB and {} MiB stay free",
                fmt_num((step - held) as f64),
                kib(per_conn as f64),
                mib(need),
                mib(available),
                args.reserve_mib
            ));
            break;
        }
        if opening_rate.is_finite() {
            let eta = Duration::from_secs_f64((step - held) as f64 / opening_rate);
            if started.elapsed() + eta + latency_room > limit {
                r.stopped = Some(format!(
                    "time: {} more connections at the {} conn/s measured so far take ~{:.0} s, \
                     beyond the {} min limit (kept: {:.0} s for the latency run)",
                    fmt_num((step - held) as f64),
                    fmt_num(opening_rate),
                    eta.as_secs_f64(),
                    args.max_minutes,
                    latency_room.as_secs_f64()
                ));
                break;
            }
        }
        while held < step {
            let n = (step - held).min(r.per_process - held % r.per_process);
            let source =
                match held / r.per_process {
                    0 => None,
                    a => Some(*sources.get(a as usize - 1).ok_or_else(|| {
                        anyhow!("no extra client address for connections {held}…")
                    })?),
                };
            let what = format!("idle +{n} from {}", source.unwrap_or(rig.client_ip));
            let (out, err) = ctx.log_paths(&what);
            let ready = out.with_extension("ready");
            let mut argv = tern_load.idle(n, hold, &s(&ready), source);
            argv.extend(["--concurrency".into(), OPENING_CONCURRENCY.to_string()]);
            let cmd = ctx.client_command(&argv);
            ctx.record("idle connections (tern-load idle)", &cmd);
            jobs.push((Job::start(&what, cmd, &out, &err)?, out.clone(), n));
            let t0 = Instant::now();
            let bar = progress.run(&what, Duration::from_secs_f64(n as f64 / 1_500.0));
            let failure = loop {
                bar.tick();
                tern.check_alive()?;
                check_interrupted(interrupted)?;
                if let Some((job, _, _)) = jobs.last_mut() {
                    if let Some(exit) = job.poll(t0)? {
                        break Some(format!(
                            "client: {what} exited early ({}); {} ends with: {}",
                            exit.status,
                            err.display(),
                            super::daemon::log_tail(&err, 600)
                        ));
                    }
                }
                if ready.exists() && targets::bypass_handshakes(&socket)? >= held + n {
                    break None;
                }
                let available = mem_available()?;
                if available < reserve / 2 {
                    break Some(format!(
                        "memory: MemAvailable fell to {} MiB while opening {what} (at {} held)",
                        mib(available),
                        fmt_num(held as f64)
                    ));
                }
                if t0.elapsed() > CLIENT_LIMIT || started.elapsed() + latency_room > limit {
                    break Some(format!(
                        "time: {what} not up after {:.0} s (tern completed {} handshakes of {})",
                        t0.elapsed().as_secs_f64(),
                        fmt_num(targets::bypass_handshakes(&socket)? as f64),
                        fmt_num((held + n) as f64)
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if let Some(why) = failure {
                // The client that did not finish goes with its connections; the ones before
                // it stay, so the latency run measures what is held.
                if let Some((mut job, _, _)) = jobs.pop() {
                    job.kill();
                }
                r.stopped = Some(why);
                break 'steps;
            }
            held += n;
            let secs = t0.elapsed().as_secs_f64();
            let rate = n as f64 / secs.max(1e-3);
            opening_rate = if opening_rate.is_finite() {
                (opening_rate + rate) / 2.0
            } else {
                rate
            };
            progress.log(format!(
                "{what}: up in {secs:.1} s ({} conn/s); {} held, tern RSS {} MiB, MemAvailable {} MiB",
                fmt_num(rate),
                fmt_num(held as f64),
                mib(proc::group_usage(pgid)?.rss_bytes),
                mib(mem_available()?)
            ));
        }
        // The last handshakes' allocations land right after the ready signal.
        std::thread::sleep(Duration::from_millis(500));
        let mut clients_rss = 0;
        for (job, _, _) in &jobs {
            clients_rss += proc::group_usage(job.pid()).map_or(0, |u| u.rss_bytes);
        }
        r.points.push(Point {
            connections: step,
            tern_rss: proc::group_usage(pgid)?.rss_bytes,
            clients_rss,
            mem_available: mem_available()?,
            at_s: started.elapsed().as_secs_f64(),
        });
    }

    // tern's CPU with everything held and nothing sent: what holding costs per second.
    if held > 0 && args.idle_seconds > 0.0 {
        progress.step(format!(
            "tern's CPU with {} held, idle",
            fmt_num(held as f64)
        ));
        let window = Duration::from_secs_f64(args.idle_seconds);
        let before = proc::group_usage(pgid)?.cpu_us;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let cpu = proc::group_usage(pgid)?.cpu_us.saturating_sub(before);
        let wall = t0.elapsed().as_micros() as u64;
        progress.log(format!(
            "tern's CPU with {} held and idle: {:.2}% of a core over {:.1} s",
            fmt_num(held as f64),
            100.0 * cpu as f64 / wall.max(1) as f64,
            wall as f64 / 1e6
        ));
        r.idle_cpu = Some((cpu, wall));
    }

    // The latency run with everything held.
    progress.step(format!(
        "new-connection latency with {} held",
        fmt_num(held as f64)
    ));
    if held > 0 {
        match latency_run(&ctx, &tern_load, args, &socket, &mut tern) {
            Ok(l) => r.latency = Some(l),
            Err(e) if interrupted.load(Ordering::Relaxed) => return Err(e),
            Err(e) => r.notes.push(format!("latency run failed: {e:#}")),
        }
    }
    if let Ok(now) = targets::tern_stats(&socket) {
        for t in targets::bypass_trouble(&now, Some(&stats_before)) {
            r.notes.push(format!("tern: {t}"));
        }
    }

    // Stop the clients (SIGINT: each reports and exits), then tern.
    for (job, out, n) in &mut jobs {
        job.interrupt(Instant::now(), Duration::from_secs(20))?;
        let text = std::fs::read_to_string(&*out)
            .with_context(|| format!("cannot read {}", out.display()))?;
        let report = load::parse_tern_load(&text)?;
        r.clients.0 += report.idle_established.unwrap_or(0);
        r.clients.1 += *n;
        r.clients.2 += idle_closed(&text);
    }
    drop(jobs);
    drop(tern);
    drop(backend);
    for (what, line) in ctx.commands() {
        r.commands.push((what, line));
    }
    drop(rig);
    drop(dir);
    progress.step("report");
    progress.finish();

    let svg = out_dir.join("million.svg");
    plot(&r, &svg)?;
    let text = report(&r, args, held);
    println!("\n{text}");
    std::fs::write(out_dir.join("million.md"), &text)?;
    eprintln!(
        "bench million: written to {} and {}; logs in {}",
        out_dir.join("million.md").display(),
        svg.display(),
        logs.display()
    );
    if args.update_docs {
        update_docs(&text, &svg)?;
    }
    Ok(())
}

/// `idle.closed_during_hold` from tern-load's JSON (0 when absent).
fn idle_closed(text: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(text.trim())
        .ok()
        .and_then(|j| j["idle"]["closed_during_hold"].as_u64())
        .unwrap_or(0)
}

fn live(socket: &Path) -> Result<u64> {
    let stats = targets::tern_stats(socket)?;
    targets::bypass_counter(&stats, "tcp", "connections")
        .ok_or_else(|| anyhow!("tern's stats have no bypass.tcp.connections"))
}

/// Open-loop new connections at `args.rate` from the rig's client address, with everything held.
fn latency_run(
    ctx: &Ctx<'_>,
    tern_load: &TernLoad,
    args: &MillionArgs,
    socket: &Path,
    tern: &mut super::daemon::Daemon,
) -> Result<LatencyRun> {
    let live_before = live(socket)?;
    let duration = Duration::from_secs_f64(args.latency_seconds.max(1.0));
    let argv = tern_load.open(
        &format!("/bytes/{SMALL_BODY}"),
        args.rate,
        LATENCY_WARMUP,
        duration,
    );
    let cmd = ctx.client_command(&argv);
    ctx.record(
        "new-connection latency at the top step (tern-load open loop)",
        &cmd,
    );
    let what = format!("open loop {}/s", fmt_num(args.rate));
    let (out, err) = ctx.log_paths(&what);
    let mut job = Job::start(&what, cmd, &out, &err)?;
    let t0 = Instant::now();
    let bar = ctx.progress.run(&what, LATENCY_WARMUP + duration);
    let exit = job.wait(
        t0,
        LATENCY_WARMUP + duration + RUN_SLACK,
        ctx.interrupted,
        || {
            bar.tick();
            tern.check_alive()
        },
    )?;
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("cannot read {}", out.display()))?;
    if !exit.status.success() {
        bail!(
            "{what} exited with {}; {}",
            exit.status,
            super::daemon::log_tail(&err, 600)
        );
    }
    let rep = load::parse_tern_load(&text)?;
    let lat = rep
        .latency
        .ok_or_else(|| anyhow!("{what}: tern-load reported no latency"))?;
    // Closing connections leave the stack within a round trip or two.
    std::thread::sleep(Duration::from_millis(500));
    Ok(LatencyRun {
        offered: args.rate,
        completed: rep.ops,
        errors: rep.errors,
        p50_us: lat.p50_us,
        p99_us: lat.p99_us,
        live_before,
        live_after: live(socket)?,
    })
}

fn plot(r: &Results, path: &Path) -> Result<()> {
    let rss = Series {
        name: "tern RSS, MiB".to_owned(),
        points: std::iter::once((0.0, r.baseline_rss as f64 / 1048576.0))
            .chain(
                r.points
                    .iter()
                    .map(|p| (p.connections as f64, p.tern_rss as f64 / 1048576.0)),
            )
            .collect(),
    };
    let per = Series {
        name: "tern RSS growth per connection, KiB".to_owned(),
        points: r
            .points
            .iter()
            .map(|p| {
                (
                    p.connections as f64,
                    p.tern_rss.saturating_sub(r.baseline_rss) as f64
                        / p.connections as f64
                        / 1024.0,
                )
            })
            .collect(),
    };
    plots::line_chart(
        path,
        "tern-bypass (one worker): resident memory vs idle TLS connections",
        "idle connections",
        &[
            ("RSS, MiB", std::slice::from_ref(&rss)),
            ("growth per connection, KiB", std::slice::from_ref(&per)),
        ],
    )
}

fn report(r: &Results, args: &MillionArgs, held: u64) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Idle TLS connections held by one tern process (bypass path, one worker on CPU {TARGET_CPU}, \
         `limits.max_connections_per_worker = {}`, `[xdp] hugepages = \"off\"`), opened by \
         `tern-load --mode idle` processes on CPU {LOAD_CPU} ({} connections each, one source \
         address each). Baseline (tern up, no connection): RSS {} MiB.\n\n",
        r.slots,
        fmt_num(r.per_process as f64),
        mib(r.baseline_rss)
    ));
    s.push_str(
        "| idle connections | tern RSS (MiB) | tern growth per connection (KiB) | since previous step (KiB/conn) | clients' RSS (MiB) | machine per connection (KiB) | reached after (s) |\n|---|---|---|---|---|---|---|\n",
    );
    let mut prev = (0u64, r.baseline_rss);
    for p in &r.points {
        let growth = p.tern_rss.saturating_sub(r.baseline_rss) as f64 / p.connections as f64;
        let since =
            p.tern_rss.saturating_sub(prev.1) as f64 / (p.connections - prev.0).max(1) as f64;
        let machine =
            r.baseline_available.saturating_sub(p.mem_available) as f64 / p.connections as f64;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} |\n",
            fmt_num(p.connections as f64),
            mib(p.tern_rss),
            kib(growth),
            kib(since),
            mib(p.clients_rss),
            kib(machine),
            p.at_s
        ));
        prev = (p.connections, p.tern_rss);
    }
    s.push('\n');
    match &r.stopped {
        None => s.push_str("Every step was reached.\n\n"),
        Some(why) => s.push_str(&format!(
            "Stopped below the next step with {} held: {why}.\n\n",
            fmt_num(held as f64)
        )),
    }
    match &r.latency {
        Some(l) => s.push_str(&format!(
            "New connections with {} held: {} offered/s open loop for {} s (full handshake, \
             `GET /bytes/{SMALL_BODY}`, close): p50 {} µs, p99 {} µs, {} completed, {} errors. \
             tern's `bypass.tcp.connections`: {} before, {} after.\n\n",
            fmt_num(held as f64),
            fmt_num(l.offered),
            fmt_num(args.latency_seconds),
            fmt_num(l.p50_us),
            fmt_num(l.p99_us),
            fmt_num(l.completed as f64),
            l.errors,
            fmt_num(l.live_before as f64),
            fmt_num(l.live_after as f64)
        )),
        None => s.push_str("No latency run.\n\n"),
    }
    if let Some((cpu, wall)) = r.idle_cpu {
        s.push_str(&format!(
            "tern's CPU with {} held and no traffic: {:.2}% of a core ({} ms over {:.1} s; \
             process group utime + stime).\n\n",
            fmt_num(held as f64),
            100.0 * cpu as f64 / wall.max(1) as f64,
            cpu / 1000,
            wall as f64 / 1e6
        ));
    }
    s.push_str(&format!(
        "Clients at the end: {} of {} handshakes completed, {} connections closed by tern during the hold.\n\n",
        fmt_num(r.clients.0 as f64),
        fmt_num(r.clients.1 as f64),
        fmt_num(r.clients.2 as f64)
    ));
    s.push_str(
        "Machine per connection: MemAvailable's fall since the baseline over the connections \
         held — tern, the clients' processes and the client namespace's kernel sockets together \
         (and whatever else the machine did meanwhile).\n\n",
    );
    if !r.notes.is_empty() {
        s.push_str("Notes: ");
        s.push_str(&r.notes.join("; "));
        s.push_str(".\n\n");
    }
    s.push_str("```sh\n");
    for (what, line) in &r.commands {
        s.push_str(&format!("# {what}\n{line}\n"));
    }
    s.push_str("```\n");
    s
}

fn update_docs(text: &str, svg: &Path) -> Result<()> {
    let path = harness::rewrite_doc_section(
        DOC_BEGIN,
        DOC_END,
        &format!("{text}\n![RSS vs idle connections](bench/million.svg)\n"),
    )?;
    let dest = workspace_root().join("docs/bench/million.svg");
    std::fs::copy(svg, &dest)
        .with_context(|| format!("cannot copy the plot to {}", dest.display()))?;
    eprintln!(
        "bench million: updated {} and {}",
        path.display(),
        dest.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn config_is_bypass_with_a_long_idle_timeout() {
        let text = tern_config(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 443),
            "tn-x",
            Path::new("/c.pem"),
            Path::new("/k.pem"),
            Path::new("/d"),
            1_015_808,
            2_100_000,
        )
        .expect("plain paths");
        let v: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(v["listener"][0]["mode"].as_str(), Some("bypass"), "{text}");
        assert_eq!(
            v["limits"]["max_connections_per_worker"].as_integer(),
            Some(1_015_808)
        );
        assert_eq!(v["timeouts"]["idle_ms"].as_integer(), Some(2_100_000));
        assert_eq!(v["workers"]["count"].as_integer(), Some(1));
        assert_eq!(v["xdp"]["hugepages"].as_str(), Some("off"));
    }

    #[test]
    fn idle_closed_reads_the_clients_report() {
        assert_eq!(idle_closed(r#"{"idle": {"closed_during_hold": 3}}"#), 3);
        assert_eq!(idle_closed("not json"), 0);
    }
}
