//! The TLS terminator comparison: `cargo xtask bench [--quick] [--targets …] [--runs N]`.
//!
//! Owns the order of a run and its teardown:
//! 1. peers from Debian ([`super::install`]), release builds of `tern` and `tern-load` and of the
//!    criterion bench, the machine and every version;
//! 2. one isolated rig (server namespace: targets and backend; client namespace: load), the
//!    certificate, the nginx backend on CPU 1, and every target's generated config checked by
//!    the target's own checker inside the server namespace — before anything is measured;
//! 3. the floors (`openssl speed`, criterion) on CPU 0;
//! 4. per target, freshly started on CPU 0: the idle machine's noise, a warm-up, then new
//!    connections, keep-alive and bulk, `runs` times each; on tern-kernel also the h2load
//!    cross-check;
//! 5. per target again: open-loop latency at fractions of the slowest target's maximum; then
//!    keep-alive request latency at fractions of the slowest keep-alive rate and at a fixed
//!    2,000 requests/s on 10 connections ([`super::keepalive_latency`]);
//! 6. per target, `runs` times from a fresh start: resident memory with idle connections held,
//!    stepped up to the headline counts the file-descriptor limit allows;
//! 7. the summary (stdout and `target/bench/summary.md`), the SVG plots, and with
//!    `--update-docs` the results section of docs/benchmarks.md and its plots.
//!
//! Every load run is bounded in time (its own duration plus [`super::measure::RUN_SLACK`], then
//! it is killed) and in count (runs, batches and steps are fixed by the plan). SIGINT, SIGTERM
//! and SIGHUP set a flag every wait loop checks; all processes and the rig are guards, so
//! failure, panic and Ctrl-C all end in the same teardown: load generators, target, backend,
//! namespaces, temp files.

use super::daemon::{Daemon, Job};
use super::floors::{self, OpensslSpeed};
use super::harness::{self, check_interrupted, BACKEND_CPU, LOAD_CPU, TARGET_CPU};
use super::install;
use super::load::{self, Endpoint, TernLoad, Workload};
use super::measure::{idle_noise, run_batches, run_once, shell_line, Ctx, Probe, Tool};
use super::plots::{self, BarPanel, Series};
use super::proc;
use super::progress::Progress;
use super::report;
use super::results::{
    summarize, BenchResults, CrossCheck, Environment, Floors, IdlePoint, IdleRun, LatencyPoint,
    Measurement, TargetResult, Unit,
};
use super::targets::{self, CertPaths, Prepared, Target, LARGE_BODY, SMALL_BODY, TLS_PORT};
use crate::{cargo, display, target_dir, workspace_root};
use anyhow::{anyhow, bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{Rig, TempDir};

/// The certificate's (and SNI's) name.
const SNI: &str = "bench.test";
/// Idle connections every target is asked about even when the plan's steps stop earlier.
const HEADLINE_IDLE: [u64; 2] = [10_000, 100_000];

#[derive(clap::Args, Clone, Debug)]
pub struct CompareArgs {
    /// Short runs: finishes in under 9 minutes once built (the full run takes under 50).
    #[arg(long)]
    pub quick: bool,
    /// Targets to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = Target::ALL
    )]
    pub targets: Vec<Target>,
    /// Runs of every figure (median and min–max are reported) [default: 3 quick, 5 full].
    #[arg(long, value_parser = clap::value_parser!(u32).range(3..=20))]
    pub runs: Option<u32>,
    /// Also rewrite the results section of docs/benchmarks.md and copy the plots to docs/bench/.
    #[arg(long)]
    pub update_docs: bool,
    /// Idle-connection counts to step through, comma-separated, instead of the plan's
    /// [default: 1000,10000 quick; 1000,2500,5000,7500,10000,25000,50000,100000 full].
    /// Counts a target cannot hold are printed as n/a with the reason.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub idle_steps: Option<Vec<u64>>,
}

/// How long and how often: everything a run's length depends on.
#[derive(Debug, Clone)]
pub struct Plan {
    pub runs: u32,
    /// One closed-loop run's measuring window.
    pub run_time: Duration,
    /// tern-load's warm-up before each open-loop (latency) window. Closed-loop runs have none:
    /// their CPU window is the load generator's whole life, so every operation in it counts.
    pub warmup: Duration,
    pub latency_fractions: Vec<f64>,
    pub latency_time: Duration,
    pub idle_steps: Vec<u64>,
    /// How long the idle machine is watched before each target.
    pub noise_time: Duration,
    pub newconn_concurrency: u32,
    pub keepalive_connections: u32,
    pub bulk_connections: u32,
    /// h2load clients per new-connection batch.
    pub h2load_batch: u32,
    /// criterion: warm-up and measurement seconds, sample size.
    pub criterion: (u32, u32, u32),
}

impl Plan {
    pub fn quick() -> Plan {
        Plan {
            runs: 3,
            run_time: Duration::from_millis(1500),
            warmup: Duration::from_millis(200),
            latency_fractions: vec![0.25, 0.5],
            latency_time: Duration::from_millis(1500),
            // 5,000 is left out to keep --quick under 6 minutes with five targets (the
            // resumed-connection figure added the sixth).
            idle_steps: vec![1_000, 10_000],
            noise_time: Duration::from_millis(500),
            newconn_concurrency: 32,
            keepalive_connections: 32,
            bulk_connections: 4,
            h2load_batch: 100,
            criterion: (1, 1, 10),
        }
    }

    pub fn full() -> Plan {
        Plan {
            runs: 5,
            run_time: Duration::from_secs(6),
            warmup: Duration::from_millis(500),
            latency_fractions: vec![0.1, 0.25, 0.5, 0.75],
            latency_time: Duration::from_secs(6),
            // Beyond 10,000 only targets without a descriptor per connection (tern-bypass) can
            // hold them; the others print why not.
            idle_steps: vec![1_000, 2_500, 5_000, 7_500, 10_000, 25_000, 50_000, 100_000],
            noise_time: Duration::from_secs(2),
            newconn_concurrency: 32,
            keepalive_connections: 32,
            bulk_connections: 4,
            h2load_batch: 100,
            criterion: (2, 5, 50),
        }
    }

    /// Progress-bar steps for `n` runnable targets.
    fn steps(&self, n: u64) -> u64 {
        // Set-up (packages, build, rig and configs, floors), per target (throughput, latency,
        // idle memory), the report.
        4 + 3 * n + 1
    }

    /// tern-bypass's slab capacity for this plan.
    pub fn bypass_slots(&self) -> u64 {
        let max_idle = self.idle_steps.iter().copied().max().unwrap_or(0);
        targets::bypass_slots(max_idle)
    }
}

/// Runs of the idle ramp that go beyond one client process's connections (tern-bypass's
/// 25,000–100,000); later runs stop at what one process holds.
const LARGE_IDLE_RUNS: u32 = 3;

/// The unrecorded new-connection run before each target's throughput figures.
const WARMUP_RUN: Duration = Duration::from_millis(500);

pub fn run(args: &CompareArgs) -> Result<()> {
    harness::require_root(
        "cargo xtask bench",
        "network namespaces, veth pairs, apt-get",
    )?;
    let interrupted = harness::interrupt_flag()?;
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(runs) = args.runs {
        plan.runs = runs;
    }
    if let Some(steps) = &args.idle_steps {
        let mut steps = steps.clone();
        steps.sort_unstable();
        steps.dedup();
        plan.idle_steps = steps;
    }
    let mut selected: Vec<Target> = args.targets.clone();
    selected.sort();
    selected.dedup();
    let invocation = invocation(args);
    // The rig's panic messages are printed as "bench: …".
    std::panic::set_hook(Box::new(|info| eprintln!("bench: {info}")));
    let outcome = harness::catch_rig_panics("the bench", &interrupted, || {
        session(
            &plan,
            &selected,
            args.update_docs,
            &invocation,
            &interrupted,
        )
    });
    let _ = std::panic::take_hook();
    outcome
}

fn invocation(args: &CompareArgs) -> String {
    let mut s = "cargo xtask bench".to_owned();
    if args.quick {
        s.push_str(" --quick");
    }
    if args.targets != Target::ALL {
        s.push_str(" --targets ");
        s.push_str(
            &args
                .targets
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if let Some(r) = args.runs {
        s.push_str(&format!(" --runs {r}"));
    }
    if let Some(steps) = &args.idle_steps {
        let list: Vec<String> = steps.iter().map(u64::to_string).collect();
        s.push_str(&format!(" --idle-steps {}", list.join(",")));
    }
    if args.update_docs {
        s.push_str(" --update-docs");
    }
    s
}

/// Runs `cmd` to completion with its output captured; an error carries stderr.
pub(crate) fn run_captured(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Binaries {
    tern: PathBuf,
    tern_load: PathBuf,
    /// The criterion bench executable of userspace/benches/tls.rs, or why it is missing (the
    /// run goes on without the rustls floor).
    tls_bench: Result<PathBuf, String>,
}

/// Release builds of tern and tern-load, and the criterion bench (bench profile = release).
/// `TERN_BIN` / `TERN_LOAD_BIN` skip building those binaries.
fn build(progress: &Progress) -> Result<Binaries> {
    let release = target_dir()?.join("release");
    let from_env = |var: &str| std::env::var_os(var).map(PathBuf::from);
    let (tern_env, load_env) = (from_env("TERN_BIN"), from_env("TERN_LOAD_BIN"));
    let mut build = cargo();
    build.args(["build", "--release"]);
    if tern_env.is_none() {
        build.args(["-p", "tern"]);
    }
    if load_env.is_none() {
        build.args(["-p", "tern-load"]);
    }
    if tern_env.is_none() || load_env.is_none() {
        progress.log(format!("$ {}", display(&build)));
        run_captured(&mut build).context("building the bench binaries")?;
    }
    let mut bench = cargo();
    bench.args([
        "bench",
        "-p",
        "tern",
        "--bench",
        "tls",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    progress.log(format!("$ {}", display(&bench)));
    let tls_bench = run_captured(&mut bench)
        .and_then(|json| {
            bench_executable(&json, "tls")
                .context("cargo did not report the `tls` bench executable")
        })
        .map_err(|e| format!("building the criterion bench failed: {e:#}"));
    if let Err(e) = &tls_bench {
        progress.log(e);
    }
    let bins = Binaries {
        tern: tern_env.unwrap_or_else(|| release.join("tern")),
        tern_load: load_env.unwrap_or_else(|| release.join("tern-load")),
        tls_bench,
    };
    for p in [&bins.tern, &bins.tern_load] {
        if !p.is_file() {
            bail!("{} does not exist after the build", p.display());
        }
    }
    Ok(bins)
}

/// The `executable` of bench target `name` in cargo's JSON messages.
pub(crate) fn bench_executable(json: &str, name: &str) -> Option<PathBuf> {
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bench"))
        })
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
}

fn environment(bins: &Binaries) -> Environment {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut versions = Vec::new();
    let mut add = |name: &str, v: Option<String>| {
        versions.push((name.to_owned(), v.unwrap_or_else(|| "unknown".to_owned())));
    };
    let git = install::version_line(
        "git",
        &[
            "-C",
            &workspace_root().display().to_string(),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    let tern = install::version_line(&bins.tern.display().to_string(), &["--version"]);
    add(
        "tern",
        tern.map(|t| match &git {
            Some(g) => format!("{} (git {g})", t.trim_start_matches("tern ")),
            None => t,
        }),
    );
    add("rustls", lock_version("rustls"));
    add("aws-lc-rs", lock_version("aws-lc-rs"));
    add(
        "tern-load",
        install::version_line(&bins.tern_load.display().to_string(), &["--version"])
            .map(|v| v.trim_start_matches("tern-load ").to_owned()),
    );
    add("hitch", install::package_version("hitch"));
    add("haproxy", install::package_version("haproxy"));
    add("nginx", install::package_version("nginx"));
    add(
        "h2load (nghttp2-client)",
        install::package_version("nghttp2-client"),
    );
    add(
        "OpenSSL",
        install::version_line("openssl", &["version"])
            .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned)),
    );
    Environment {
        cpu_model,
        cores,
        kernel,
        nofile: nofile_limit(),
        irq_time_accounting: irq_time_accounting(),
        versions,
    }
}

/// Whether the kernel charges interrupt time separately from tasks (CONFIG_IRQ_TIME_ACCOUNTING),
/// from /proc/config.gz (`zcat`: no gzip crate for one read); `None` if it cannot be told.
fn irq_time_accounting() -> Option<bool> {
    let out = Command::new("zcat")
        .arg("/proc/config.gz")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().any(|l| l == "CONFIG_IRQ_TIME_ACCOUNTING=y"))
}

/// A package's version from the workspace's Cargo.lock.
fn lock_version(name: &str) -> Option<String> {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).ok()?;
    let needle = format!("name = \"{name}\"\n");
    let at = lock.find(&needle)? + needle.len();
    let line = lock[at..].lines().next()?;
    line.strip_prefix("version = \"")?
        .strip_suffix('"')
        .map(str::to_owned)
}

pub(super) fn nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit; RLIMIT_NOFILE is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur
    } else {
        targets::DOCUMENTED_NOFILE
    }
}

fn openssl_speed(progress: &Progress, record: &mut Vec<(String, String)>) -> Result<OpensslSpeed> {
    let mut text = String::new();
    for args in [
        vec!["speed", "-mr", "-seconds", "1", "ecdsap256", "ecdhx25519"],
        vec![
            "speed",
            "-mr",
            "-seconds",
            "1",
            "-bytes",
            "16384",
            "-evp",
            "aes-128-gcm",
        ],
    ] {
        let mut cmd = Command::new("taskset");
        cmd.arg("-c")
            .arg(TARGET_CPU.to_string())
            .arg("openssl")
            .args(&args);
        if record.len() < 2 {
            record.push((
                "crypto floor: OpenSSL primitives".to_owned(),
                shell_line(&cmd),
            ));
        }
        progress.log(format!("$ {}", display(&cmd)));
        // openssl speed prints its -mr lines on stdout.
        text.push_str(&run_captured(&mut cmd)?);
    }
    floors::parse_openssl_speed(&text)
}

fn criterion_floor(
    plan: &Plan,
    bins: &Binaries,
    home: &Path,
    progress: &Progress,
    record: &mut Vec<(String, String)>,
) -> Result<floors::RustlsFloor> {
    let (warm, measure, samples) = plan.criterion;
    let exe = bins.tls_bench.as_ref().map_err(|e| anyhow!("{e}"))?;
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(TARGET_CPU.to_string())
        .arg(exe)
        .args(["--bench", "--warm-up-time"])
        .arg(warm.to_string())
        .arg("--measurement-time")
        .arg(measure.to_string())
        .arg("--sample-size")
        .arg(samples.to_string())
        .env("CRITERION_HOME", home);
    record.push((
        "crypto floor: rustls in memory (criterion, userspace/benches/tls.rs)".to_owned(),
        format!("CRITERION_HOME={} {}", home.display(), shell_line(&cmd)),
    ));
    progress.log(format!("$ {}", display(&cmd)));
    run_captured(&mut cmd)?;
    floors::read_rustls_floor(home)
}

/// What every pass needs from the set-up: the rig, each target's checked files, the backend.
pub(super) struct Setup<'a> {
    pub(super) rig: &'a Rig,
    prepared: Vec<Prepared>,
    pub(super) backend_pgid: i32,
    /// Extra addresses on the client veth, for idle connections beyond one client process.
    client_sources: Vec<Ipv4Addr>,
}

/// Connections one idle client process (and one source address) holds: its fd limit.
pub(super) fn idle_per_process(nofile: u64) -> u64 {
    nofile.saturating_sub(targets::FD_OVERHEAD).max(1)
}

/// Which of `steps` target `t` is ramped through, and why the others and the headline counts
/// ([`HEADLINE_IDLE`]) outside the steps are not measured.
fn idle_plan(t: Target, steps: &[u64], nofile: u64, slots: u64) -> (Vec<u64>, Vec<(u64, String)>) {
    let mut measured = Vec::new();
    let mut not = Vec::new();
    for &n in steps {
        match t.idle_capacity(n, nofile, slots) {
            Ok(()) => measured.push(n),
            Err(why) => not.push((n, why)),
        }
    }
    for n in HEADLINE_IDLE {
        if steps.contains(&n) {
            continue;
        }
        // The bypass slab is sized to the steps, so only the fd limit can rule a count out
        // here; otherwise the plan did.
        let why = t
            .idle_capacity(n, nofile, u64::MAX)
            .err()
            .unwrap_or_else(|| {
                format!(
                    "n/a (not among this run's idle steps; the full run or `--idle-steps …,{n}` \
                 measures it)"
                )
            });
        not.push((n, why));
    }
    (measured, not)
}

/// Extra client addresses the idle steps of `targets` need: one per `per_process`
/// connections beyond the first.
fn extra_sources_needed(targets: &[Target], steps: &[u64], nofile: u64, slots: u64) -> u64 {
    let per = idle_per_process(nofile);
    targets
        .iter()
        .flat_map(|&t| idle_plan(t, steps, nofile, slots).0)
        .max()
        .map_or(0, |most| most.div_ceil(per).saturating_sub(1))
}

/// Adds `count` addresses to the client veth (.3, .4, … of the rig's /24; the namespace and
/// its addresses go with the rig) and returns them with the command that added the first.
pub(super) fn add_client_sources(rig: &Rig, count: u64) -> Result<(Vec<Ipv4Addr>, Option<String>)> {
    let [a, b, c, _] = rig.client_ip.octets();
    let mut added = Vec::new();
    let mut example = None;
    for i in 0..count {
        let host = 3 + i;
        let last = u8::try_from(host)
            .ok()
            .filter(|h| *h < 255)
            .ok_or_else(|| anyhow!("{count} extra client addresses do not fit the rig's /24"))?;
        let ip = Ipv4Addr::new(a, b, c, last);
        if ip == rig.server_ip || ip == rig.client_ip {
            bail!("extra client address {ip} is taken in the rig");
        }
        let mut cmd = rig.client_command("ip");
        cmd.args(["addr", "add", &format!("{ip}/24"), "dev", &rig.client_if]);
        if example.is_none() {
            example = Some(shell_line(&cmd));
        }
        run_captured(&mut cmd)?;
        added.push(ip);
    }
    Ok((added, example))
}

impl Setup<'_> {
    fn get(&self, t: Target) -> Option<&Prepared> {
        self.prepared.iter().find(|p| p.target == t)
    }
}

fn session(
    plan: &Plan,
    selected: &[Target],
    update_docs: bool,
    invocation: &str,
    interrupted: &AtomicBool,
) -> Result<()> {
    let started = Instant::now();
    let started_utc = utc_now();
    let runnable: Vec<Target> = selected.to_vec();
    let progress = Progress::new(plan.steps(runnable.len() as u64));
    let out_dir = target_dir()?.join("bench");
    let logs = out_dir.join("logs");
    harness::fresh_logs(&logs)?;
    progress.log(format!(
        "{invocation}: {} run(s) of {:.1} s per figure; logs in {}",
        plan.runs,
        plan.run_time.as_secs_f64(),
        logs.display()
    ));

    // 1. Packages, builds, versions.
    progress.step("prerequisites: Debian packages for the peers, h2load, openssl");
    crate::prereqs::ensure()?;
    let packages: Vec<&str> = runnable
        .iter()
        .flat_map(|t| t.packages())
        .copied()
        .collect();
    let installed = install::ensure(&packages, &mut |l| progress.log(l))?;
    if !installed.is_empty() {
        progress.log(format!("installed: {}", installed.join(" ")));
    }
    check_interrupted(interrupted)?;
    progress.step("building tern, tern-load and the criterion bench (release)");
    let bins = build(&progress)?;
    let env = environment(&bins);
    check_interrupted(interrupted)?;

    // 2. Rig, certificate, backend, configs.
    progress.step("rig, certificate, backend; checking every generated config");
    let rig = Rig::isolated("bench", 1);
    // The client namespace opens tens of thousands of connections per run (idle steps, the
    // client-closed cross-check) and closes them first, leaving TIME_WAIT behind: widen its
    // ephemeral port range and let it reuse TIME_WAIT ports (RFC 7323 timestamps keep that
    // safe), or later steps stall on port exhaustion. Both settings are per namespace.
    let mut sysctl = harness::client_port_settings(&rig);
    let sysctl_line = shell_line(&sysctl);
    run_captured(&mut sysctl)?;
    let dir = TempDir::new("bench");
    let cert = write_self_signed(dir.path(), "bench", &[SNI], KeyKind::EcdsaP256);
    let combined = dir.join("bench.combined.pem");
    std::fs::write(&combined, format!("{}{}", cert.cert_pem, cert.key_pem))?;
    let certs = CertPaths {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        combined,
    };
    let backend_files = targets::prepare_backend(&dir.join("backend"), BACKEND_CPU)?;
    let backend = targets::start_backend(&backend_files, &rig, BACKEND_CPU, interrupted)?;
    let nofile = env.nofile;
    let bypass_slots = plan.bypass_slots();
    let mut prepared = Vec::new();
    let mut results: Vec<TargetResult> = Vec::new();
    let mut commands: Vec<(String, String)> = vec![
        ("client namespace settings".to_owned(), sysctl_line),
        (
            "backend (nginx, server namespace, CPU 1)".to_owned(),
            shell_line(&targets::pinned_server_command(
                &rig,
                BACKEND_CPU,
                &backend_files.argv,
            )),
        ),
    ];
    for t in Target::ALL {
        let r = TargetResult::new(t, target_version(&env, t));
        if r.skipped.is_none() && !selected.contains(&t) {
            continue;
        }
        if r.skipped.is_none() {
            let p = targets::prepare(
                t,
                &dir.join(t.name()),
                &rig,
                &certs,
                &bins.tern,
                TARGET_CPU,
                nofile,
                bypass_slots,
            )?;
            let checked = targets::check(&p, &rig)?;
            progress.log(format!(
                "{}: `{}` accepts the generated config{}",
                t.name(),
                p.check_argv.join(" "),
                checked
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(|l| format!(" ({})", l.trim()))
                    .unwrap_or_default()
            ));
            commands.push((
                format!("target {} (server namespace, CPU 0)", t.name()),
                shell_line(&targets::pinned_server_command(&rig, TARGET_CPU, &p.argv)),
            ));
            prepared.push(p);
        }
        results.push(r);
    }
    let extra = extra_sources_needed(&runnable, &plan.idle_steps, nofile, bypass_slots);
    let (client_sources, example) = add_client_sources(&rig, extra)?;
    if let Some(line) = example {
        commands.push((
            format!(
                "extra client addresses for idle connections beyond {} per address ({extra} in all)",
                idle_per_process(nofile)
            ),
            line,
        ));
    }
    let setup = Setup {
        rig: &rig,
        prepared,
        backend_pgid: backend.pgid(),
        client_sources,
    };

    // 3. Floors.
    progress.step("crypto floors: openssl speed and the rustls criterion bench (CPU 0)");
    let mut floors = Floors::default();
    match openssl_speed(&progress, &mut commands) {
        Ok(o) => floors.openssl = Some(o),
        Err(e) => floors.notes.push(format!("openssl speed failed: {e:#}")),
    }
    check_interrupted(interrupted)?;
    match criterion_floor(
        plan,
        &bins,
        &out_dir.join("criterion"),
        &progress,
        &mut commands,
    ) {
        Ok(f) => floors.rustls = Some(f),
        Err(e) => floors.notes.push(format!("criterion bench failed: {e:#}")),
    }
    check_interrupted(interrupted)?;

    let ctx = Ctx::new(&rig, interrupted, &progress, logs.clone(), LOAD_CPU);
    let endpoint = Endpoint {
        addr: SocketAddrV4::new(rig.server_ip, TLS_PORT),
        sni: SNI.to_owned(),
    };
    let tern_load = TernLoad {
        bin: bins.tern_load.display().to_string(),
        endpoint: endpoint.clone(),
        ca: certs.cert.display().to_string(),
    };

    // 4. Throughput figures.
    let mut cross_check = Vec::new();
    for r in results.iter_mut().filter(|r| r.skipped.is_none()) {
        progress.step(format!(
            "{}: new connections, keep-alive, bulk",
            r.target.name()
        ));
        let Some(p) = setup.get(r.target) else {
            continue;
        };
        match throughput(&ctx, plan, &setup, p, &tern_load, r, &mut cross_check) {
            Ok(()) => {}
            Err(e) if interrupted.load(Ordering::Relaxed) => return Err(e),
            Err(e) => {
                progress.log(format!("{}: {e:#}", r.target.name()));
                r.skipped = Some("failed (see “Figures that failed”)".to_owned());
                r.errors.push(format!("{e:#}"));
            }
        }
    }

    // 4b. Bulk at the rig's largest native-XDP MTU (tern's two paths; `bulk_mtu`).
    for r in results
        .iter_mut()
        .filter(|r| r.skipped.is_none() && super::bulk_mtu::measured(r.target))
    {
        let Some(p) = setup.get(r.target) else {
            continue;
        };
        if let Err(e) = super::bulk_mtu::pass(
            &ctx,
            &rig,
            TARGET_CPU,
            setup.backend_pgid,
            p,
            &tern_load,
            plan.bulk_connections,
            (plan.runs, plan.run_time),
            r,
        ) {
            if interrupted.load(Ordering::Relaxed) {
                return Err(e);
            }
            progress.log(format!("{}: bulk at a large MTU: {e:#}", r.target.name()));
            r.errors.push(format!("bulk at a large MTU: {e:#}"));
        }
    }

    // 5. Latency at fractions of the slowest target's maximum.
    let slowest = results
        .iter()
        .filter_map(|r| summarize(&r.new_conn, Unit::PerOp).map(|s| s.rate.median))
        .fold(f64::INFINITY, f64::min);
    for r in results.iter_mut().filter(|r| r.skipped.is_none()) {
        progress.step(format!(
            "{}: latency at fixed offered rates",
            r.target.name()
        ));
        if !slowest.is_finite() {
            r.errors
                .push("no new-connection maximum to base offered rates on".to_owned());
            continue;
        }
        let Some(p) = setup.get(r.target) else {
            continue;
        };
        if let Err(e) = latency(&ctx, plan, &setup, p, &tern_load, slowest, r) {
            if interrupted.load(Ordering::Relaxed) {
                return Err(e);
            }
            progress.log(format!("{}: latency: {e:#}", r.target.name()));
            r.errors.push(format!("latency: {e:#}"));
        }
    }

    // 5b. Keep-alive request latency at fixed offered rates (its own fresh start per target).
    let slowest_keepalive = results
        .iter()
        .filter_map(|r| summarize(&r.keepalive, Unit::PerOp).map(|s| s.rate.median))
        .fold(f64::INFINITY, f64::min);
    let ka_offers = super::keepalive_latency::offers(plan, slowest_keepalive);
    for r in results.iter_mut().filter(|r| r.skipped.is_none()) {
        progress.step(format!(
            "{}: keep-alive latency at fixed offered rates",
            r.target.name()
        ));
        if !slowest_keepalive.is_finite() {
            r.errors.push(
                "no keep-alive maximum to base offered rates on (only the fixed point runs)"
                    .to_owned(),
            );
        }
        let Some(p) = setup.get(r.target) else {
            continue;
        };
        if let Err(e) =
            super::keepalive_latency::pass(&ctx, plan, &setup, p, &tern_load, &ka_offers, r)
        {
            if interrupted.load(Ordering::Relaxed) {
                return Err(e);
            }
            progress.log(format!("{}: keep-alive latency: {e:#}", r.target.name()));
            r.errors.push(format!("keep-alive latency: {e:#}"));
        }
    }

    // 6. Idle memory.
    for r in results.iter_mut().filter(|r| r.skipped.is_none()) {
        progress.step(format!(
            "{}: resident memory with idle connections",
            r.target.name()
        ));
        let Some(p) = setup.get(r.target) else {
            continue;
        };
        if let Err(e) = idle_memory(&ctx, plan, &setup, p, &tern_load, nofile, r) {
            if interrupted.load(Ordering::Relaxed) {
                return Err(e);
            }
            progress.log(format!("{}: idle memory: {e:#}", r.target.name()));
            r.errors.push(format!("idle memory: {e:#}"));
        }
    }

    // 7. Report.
    progress.step("report and plots");
    commands.extend(ctx.commands());
    let results = BenchResults {
        invocation: invocation.to_owned(),
        started_utc,
        took_secs: started.elapsed().as_secs_f64(),
        runs: plan.runs,
        run_secs: plan.run_time.as_secs_f64(),
        environment: env,
        targets: results,
        floors,
        cross_check,
        commands,
        settings: vec![
            (
                "new connections".into(),
                format!("{} in flight", plan.newconn_concurrency),
            ),
            (
                "keep-alive".into(),
                format!("{} connections", plan.keepalive_connections),
            ),
            (
                "bulk".into(),
                format!("{} connections", plan.bulk_connections),
            ),
            (
                "open-loop warm-up".into(),
                format!("{} ms before each latency window", plan.warmup.as_millis()),
            ),
        ]
        .into_iter()
        .chain(selected.contains(&Target::TernBypass).then(|| {
            (
                "tern-bypass".into(),
                format!(
                    "{bypass_slots} connection slots (`limits.max_connections_per_worker`), \
                     `[xdp] hugepages = \"off\"`, AF_XDP and `[tcp]` settings at tern's defaults"
                ),
            )
        }))
        .collect(),
        idle_steps: plan.idle_steps.clone(),
    };
    drop(backend);
    drop(rig);
    drop(dir);
    progress.finish();
    write_outputs(&results, &out_dir, update_docs)?;
    let failed: Vec<&str> = results
        .targets
        .iter()
        .filter(|t| !t.errors.is_empty())
        .map(|t| t.target.name())
        .collect();
    if !failed.is_empty() {
        bail!(
            "figures failed for {} (the summary lists why; logs in {})",
            failed.join(", "),
            logs.display()
        );
    }
    Ok(())
}

/// The version string of the software behind a target column.
fn target_version(env: &Environment, t: Target) -> String {
    let component = match t {
        Target::TernBypass | Target::TernKernel => "tern",
        Target::Hitch => "hitch",
        Target::Haproxy => "haproxy",
        Target::Nginx => "nginx",
    };
    env.versions
        .iter()
        .find(|(k, _)| k == component)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// UTC now as `YYYY-MM-DD HH:MM UTC` (civil-from-days, no time crate needed).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days_from_civil inverse.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

pub(super) fn start_target(ctx: &Ctx<'_>, setup: &Setup<'_>, p: &Prepared) -> Result<Daemon> {
    targets::start(p, setup.rig, TARGET_CPU, ctx.interrupted)
}

pub(super) fn label(t: Target, what: &str, run: u32) -> String {
    format!("{} {what} #{}", t.name(), run + 1)
}

/// Pass 1 for one target: noise, warm-up, the four closed-loop figures (new, resumed,
/// keep-alive, bulk), the cross-check.
fn throughput(
    ctx: &Ctx<'_>,
    plan: &Plan,
    setup: &Setup<'_>,
    p: &Prepared,
    tern_load: &TernLoad,
    r: &mut TargetResult,
    cross: &mut Vec<CrossCheck>,
) -> Result<()> {
    let t = r.target;
    let mut daemon = start_target(ctx, setup, p)?;
    let probe = Probe {
        target_pgid: daemon.pgid(),
        backend_pgid: setup.backend_pgid,
    };
    r.noise_us_per_s = Some(idle_noise(ctx, &probe, plan.noise_time)?);
    let small = format!("/bytes/{SMALL_BODY}");
    let large = format!("/bytes/{LARGE_BODY}");
    // A short unrecorded run: first-use costs (page faults, pools, the ticket key) out of the way.
    let warm = tern_load.closed(
        Workload::NewConn,
        &small,
        plan.newconn_concurrency,
        Duration::ZERO,
        WARMUP_RUN,
    );
    let before = bypass_stats(p)?;
    run_once(
        ctx,
        &probe,
        &mut daemon,
        &format!("{} warm-up", t.name()),
        &warm,
        WARMUP_RUN,
        Tool::TernLoad,
    )?;

    let figures: [(Workload, &str, u32); 4] = [
        (Workload::NewConn, &small, plan.newconn_concurrency),
        (Workload::Resumed, &small, plan.newconn_concurrency),
        (Workload::KeepAlive, &small, plan.keepalive_connections),
        (Workload::Bulk, &large, plan.bulk_connections),
    ];
    for (workload, path, n) in figures {
        for run in 0..plan.runs {
            let argv = tern_load.closed(workload, path, n, Duration::ZERO, plan.run_time);
            let m = with_bypass_work(p, || {
                run_once(
                    ctx,
                    &probe,
                    &mut daemon,
                    &label(t, workload.name(), run),
                    &argv,
                    plan.run_time,
                    Tool::TernLoad,
                )
            })?;
            note_errors(ctx, r, workload.name(), &m);
            if workload == Workload::Resumed {
                note_not_resumed(ctx, r, &m);
            }
            let runs = match workload {
                Workload::NewConn => &mut r.new_conn,
                Workload::Resumed => &mut r.resumed,
                Workload::KeepAlive => &mut r.keepalive,
                Workload::Bulk => &mut r.bulk,
            };
            runs.push(m);
        }
    }
    if t == Target::TernKernel {
        cross.push(cross_check(ctx, plan, &probe, &mut daemon, tern_load, t)?);
    }
    note_bypass_trouble(ctx, p, before.as_ref(), r, "throughput pass")?;
    Ok(())
}

/// tern-bypass's stats document, or `None` for the other targets.
pub(super) fn bypass_stats(p: &Prepared) -> Result<Option<serde_json::Value>> {
    match (&p.control_socket, p.target) {
        (Some(socket), Target::TernBypass) => targets::tern_stats(socket).map(Some),
        _ => Ok(None),
    }
}

/// Runs one measured window (`run`) and, on tern-bypass, adds its workers' work time over it
/// (`Measurement::work_us`: `bypass.total.work_ns` read just before and just after, outside
/// the CPU window so the control thread's answer is not charged to it).
pub fn with_bypass_work(
    p: &Prepared,
    run: impl FnOnce() -> Result<Measurement>,
) -> Result<Measurement> {
    let work = |s: &serde_json::Value| targets::bypass_counter(s, "total", "work_ns");
    let before = bypass_stats(p)?;
    let mut m = run()?;
    if let (Some(a), Some(b)) = (
        before.as_ref().and_then(work),
        bypass_stats(p)?.as_ref().and_then(work),
    ) {
        m.work_us = Some(b.saturating_sub(a) as f64 / 1000.0);
    }
    Ok(m)
}

/// Adds a warning to tern-bypass's figures for every counter that says they were distorted
/// (refused handshakes, dropped frames, TLS errors) since `before`.
pub(super) fn note_bypass_trouble(
    ctx: &Ctx<'_>,
    p: &Prepared,
    before: Option<&serde_json::Value>,
    r: &mut TargetResult,
    what: &str,
) -> Result<()> {
    if let Some(now) = bypass_stats(p)? {
        for note in targets::bypass_trouble(&now, before) {
            let msg = format!("{what}: {note}");
            ctx.progress.log(format!("{}: {msg}", r.target.name()));
            r.warnings.push(msg);
        }
    }
    Ok(())
}

/// Errors in a run are reported, not hidden: more than 0.1 % of operations failing is noted.
pub(super) fn note_errors(ctx: &Ctx<'_>, r: &mut TargetResult, what: &str, m: &Measurement) {
    let e = m.report.errors;
    if e > 0 && (e as f64) > 0.001 * (m.report.ops + e) as f64 {
        let msg = format!(
            "{what}: {e} failed operations against {} completed",
            m.report.ops
        );
        ctx.progress.log(format!("{}: {msg}", r.target.name()));
        r.warnings.push(msg);
    }
}

/// A resumed-connection figure counts only if the connections resumed: more than 0.1 % full
/// handshakes in the window (the server refused or did not issue the ticket) is noted.
fn note_not_resumed(ctx: &Ctx<'_>, r: &mut TargetResult, m: &Measurement) {
    let (full, resumed) = (m.report.full, m.report.resumed);
    if full > 0 && (full as f64) > 0.001 * (full + resumed) as f64 {
        let msg = format!("resumed: {full} connections did not resume ({resumed} did)");
        ctx.progress.log(format!("{}: {msg}", r.target.name()));
        r.warnings.push(msg);
    }
}

/// h2load vs tern-load, new connections, same concurrency, same target, `runs` each.
fn cross_check(
    ctx: &Ctx<'_>,
    plan: &Plan,
    probe: &Probe,
    daemon: &mut Daemon,
    tern_load: &TernLoad,
    t: Target,
) -> Result<CrossCheck> {
    ctx.progress.log(format!(
        "{}: cross-check, tern-load vs h2load (new connections)",
        t.name()
    ));
    let small = format!("/bytes/{SMALL_BODY}");
    let mut c = CrossCheck {
        target: t,
        mode: format!(
            "new connections, {} concurrent, GET {small}",
            plan.h2load_batch
        ),
        tern_load: Vec::new(),
        h2load: Vec::new(),
    };
    let h2 = load::h2load_args(
        &tern_load.endpoint,
        &small,
        plan.h2load_batch,
        true,
        plan.run_time,
    );
    for run in 0..plan.runs {
        let mut argv = tern_load.closed(
            Workload::NewConn,
            &small,
            plan.h2load_batch,
            Duration::ZERO,
            plan.run_time,
        );
        // h2load closes each connection itself after its one response; do the same, so both
        // clients leave the server the same TCP teardown (and TIME_WAIT on the client side).
        argv.extend(["--close".to_owned(), "client".to_owned()]);
        c.tern_load.push(run_once(
            ctx,
            probe,
            daemon,
            &label(t, "cross-check tern-load", run),
            &argv,
            plan.run_time,
            Tool::TernLoad,
        )?);
        c.h2load.push(run_batches(
            ctx,
            probe,
            daemon,
            &label(t, "cross-check h2load batches", run),
            &h2,
            plan.run_time,
            10_000,
        )?);
    }
    Ok(c)
}

/// Pass 2 for one target: open-loop new connections at each fraction of `slowest`.
fn latency(
    ctx: &Ctx<'_>,
    plan: &Plan,
    setup: &Setup<'_>,
    p: &Prepared,
    tern_load: &TernLoad,
    slowest: f64,
    r: &mut TargetResult,
) -> Result<()> {
    let t = r.target;
    let mut daemon = start_target(ctx, setup, p)?;
    let probe = Probe {
        target_pgid: daemon.pgid(),
        backend_pgid: setup.backend_pgid,
    };
    let small = format!("/bytes/{SMALL_BODY}");
    let before = bypass_stats(p)?;
    for &fraction in &plan.latency_fractions {
        let offered = (slowest * fraction).max(1.0).round();
        let mut point = LatencyPoint {
            fraction,
            offered,
            runs: Vec::new(),
        };
        for run in 0..plan.runs {
            let argv = tern_load.open(&small, offered, plan.warmup, plan.latency_time);
            let m = with_bypass_work(p, || {
                run_once(
                    ctx,
                    &probe,
                    &mut daemon,
                    &label(t, &format!("open loop {offered}/s"), run),
                    &argv,
                    plan.warmup + plan.latency_time,
                    Tool::TernLoad,
                )
            })?;
            note_errors(ctx, r, &format!("open loop {offered}/s"), &m);
            point.runs.push(m);
        }
        r.latency.push(point);
    }
    note_bypass_trouble(ctx, p, before.as_ref(), r, "latency pass")?;
    Ok(())
}

/// Established TCP connections on `port` in the network namespace of `pid`
/// (`/proc/PID/net/tcp`, state 01).
fn established_on_port(pid: i32, port: u16) -> Result<u64> {
    let path = format!("/proc/{pid}/net/tcp");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    Ok(proc::count_established(&text, port))
}

/// Pass 3 for one target: `runs` ramps from a fresh start, RSS sampled at every step.
fn idle_memory(
    ctx: &Ctx<'_>,
    plan: &Plan,
    setup: &Setup<'_>,
    p: &Prepared,
    tern_load: &TernLoad,
    nofile: u64,
    r: &mut TargetResult,
) -> Result<()> {
    let t = r.target;
    let slots = plan.bypass_slots();
    let (steps, not_measured) = idle_plan(t, &plan.idle_steps, nofile, slots);
    for (n, why) in not_measured {
        if !r.idle.not_measured.iter().any(|(m, _)| *m == n) {
            r.idle.not_measured.push((n, why));
        }
    }
    if steps.is_empty() {
        return Ok(());
    }
    let per_process = idle_per_process(nofile);
    // The server side's count of connections that are up: established sockets on the TLS port
    // in the target's namespace, or, for tern-bypass (no kernel sockets), its proxy's completed
    // handshakes (a fresh start: the readiness probe made none).
    let bypass_socket = match (t, &p.control_socket) {
        (Target::TernBypass, Some(socket)) => Some(socket.clone()),
        (Target::TernBypass, None) => bail!("tern-bypass has no control socket"),
        _ => None,
    };
    let server_count = |pgid: i32| -> Result<u64> {
        match &bypass_socket {
            Some(socket) => targets::bypass_handshakes(socket),
            None => established_on_port(pgid, TLS_PORT),
        }
    };
    for run in 0..plan.runs {
        let mut daemon = start_target(ctx, setup, p)?;
        let pgid = daemon.pgid();
        // Let start-up allocation settle before the baseline.
        std::thread::sleep(Duration::from_millis(300));
        let mut ramp = IdleRun {
            baseline_rss: proc::group_usage(pgid)?.rss_bytes,
            points: Vec::new(),
        };
        // (job, its stdout, connections it was asked for)
        let mut jobs: Vec<(Job, PathBuf, u64)> = Vec::new();
        let mut held = 0u64;
        let hold = Duration::from_secs(120);
        // Ramps beyond one client process take ~45 s each: only the first
        // LARGE_IDLE_RUNS runs make them (still a median and a min–max).
        let run_steps: Vec<u64> = steps
            .iter()
            .copied()
            .filter(|&n| run < LARGE_IDLE_RUNS || n <= per_process)
            .collect();
        for &step in &run_steps {
            check_interrupted(ctx.interrupted)?;
            while held < step {
                // A client process holds at most `per_process` connections (its fds), and so
                // does a source address: connections [a·per_process, (a+1)·per_process) come
                // from address a (0 = the rig's client address, then the extra ones), so no
                // address runs out of ports and ≤ 10,000 looks as it always did.
                let n = (step - held).min(per_process - held % per_process);
                let source = match held / per_process {
                    0 => None,
                    a => Some(*setup.client_sources.get(a as usize - 1).ok_or_else(|| {
                        anyhow!("no extra client address for idle connections {held}…")
                    })?),
                };
                let what = format!("{} idle #{} +{n}", t.name(), run + 1);
                let (out, err) = ctx.log_paths(&what);
                let ready = out.with_extension("ready");
                let argv = tern_load.idle(n, hold, &ready.display().to_string(), source);
                let cmd = ctx.client_command(&argv);
                ctx.record("idle connections (tern-load idle)", &cmd);
                jobs.push((Job::start(&what, cmd, &out, &err)?, out.clone(), n));
                let t0 = Instant::now();
                let bar = ctx.progress.run(&what, Duration::from_secs(10));
                // Ready: tern-load's ready file (its handshakes are done) and the target's
                // count of established sockets agree.
                loop {
                    bar.tick();
                    daemon.check_alive()?;
                    check_interrupted(ctx.interrupted)?;
                    if let Some((job, _, _)) = jobs.last_mut() {
                        if let Some(exit) = job.poll(t0)? {
                            bail!(
                                "{what} exited early ({}); {} ends with:\n{}",
                                exit.status,
                                err.display(),
                                super::daemon::log_tail(&err, 1500)
                            );
                        }
                    }
                    if ready.exists() && server_count(pgid)? >= held + n {
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(90) {
                        bail!(
                            "{what}: {} connections not up within 90 s (target holds {})",
                            held + n,
                            server_count(pgid)?
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                held += n;
            }
            // The last handshakes' allocations land right after the ready signal.
            std::thread::sleep(Duration::from_millis(300));
            ramp.points.push(IdlePoint {
                connections: step,
                rss_bytes: proc::group_usage(pgid)?.rss_bytes,
            });
        }
        // Stop the clients (SIGINT: they report and exit), then the target. Each client's
        // report must confirm that all its handshakes completed, or the RSS figures would be
        // per half-open connection.
        let mut short = Vec::new();
        for (job, out, n) in &mut jobs {
            job.interrupt(Instant::now(), Duration::from_secs(10))?;
            let text = std::fs::read_to_string(&*out)
                .with_context(|| format!("cannot read {}", out.display()))?;
            let established = load::parse_tern_load(&text)?.idle_established.unwrap_or(0);
            if established < *n {
                short.push(format!("{established} of {n} ({})", out.display()));
            }
        }
        drop(jobs);
        drop(daemon);
        if !short.is_empty() {
            bail!(
                "idle clients did not complete every handshake: {}",
                short.join(", ")
            );
        }
        r.idle.runs.push(ramp);
    }
    Ok(())
}

/// Summary to stdout and `out_dir/summary.md`, plots to `out_dir`, and the doc if asked.
fn write_outputs(results: &BenchResults, out_dir: &Path, update_docs: bool) -> Result<()> {
    std::fs::create_dir_all(out_dir)?;
    write_plots(results, out_dir)?;
    let summary = report::markdown(results, ".");
    std::fs::write(out_dir.join("summary.md"), &summary)?;
    println!("\n{summary}");
    eprintln!(
        "bench: summary and plots in {} ({}, {}, {}, {})",
        out_dir.display(),
        report::PLOT_LATENCY,
        super::keepalive_latency::PLOT,
        report::PLOT_MEMORY,
        report::PLOT_CPU
    );
    if update_docs {
        let docs = workspace_root().join("docs");
        let plots = docs.join("bench");
        std::fs::create_dir_all(&plots)?;
        for f in [
            report::PLOT_LATENCY,
            super::keepalive_latency::PLOT,
            report::PLOT_MEMORY,
            report::PLOT_CPU,
        ] {
            std::fs::copy(out_dir.join(f), plots.join(f))
                .with_context(|| format!("cannot copy {f} to {}", plots.display()))?;
        }
        report::update_doc(
            &docs.join("benchmarks.md"),
            &report::markdown(results, "bench"),
        )?;
        eprintln!("bench: updated docs/benchmarks.md and docs/bench/*.svg");
    }
    Ok(())
}

fn write_plots(results: &BenchResults, out_dir: &Path) -> Result<()> {
    let measured: Vec<&TargetResult> = results
        .targets
        .iter()
        .filter(|t| t.skipped.is_none())
        .collect();
    let lat = |pick: fn(&load::Latency) -> f64| -> Vec<Series> {
        measured
            .iter()
            .map(|t| Series {
                name: t.target.name().to_owned(),
                points: t
                    .latency
                    .iter()
                    .filter_map(|p| {
                        super::results::latency_summary(&p.runs, pick)
                            .map(|s| (p.offered, s.median / 1000.0))
                    })
                    .collect(),
            })
            .collect()
    };
    let p50 = lat(|l| l.p50_us);
    let p99 = lat(|l| l.p99_us);
    plots::line_chart(
        &out_dir.join(report::PLOT_LATENCY),
        "New-connection latency vs offered load (median of runs)",
        "offered new connections/s",
        &[("p50 latency, ms", &p50), ("p99 latency, ms", &p99)],
    )?;
    super::keepalive_latency::plot(&measured, out_dir)?;
    // Growth over each run's own baseline: baselines differ by two orders of magnitude (a
    // preallocated bypass slab against a few MiB of a peer) and would flatten every other line.
    let memory: Vec<Series> = measured
        .iter()
        .map(|t| {
            let mut points = vec![(0.0, 0.0)];
            let mut counts: Vec<u64> = t
                .idle
                .runs
                .iter()
                .flat_map(|r| r.points.iter().map(|p| p.connections))
                .collect();
            counts.sort_unstable();
            counts.dedup();
            for n in counts {
                let v = median_of(t.idle.runs.iter().flat_map(|r| {
                    r.points
                        .iter()
                        .filter(move |p| p.connections == n)
                        .map(|p| p.rss_bytes as f64 - r.baseline_rss as f64)
                }));
                points.push((n as f64, v));
            }
            Series {
                name: t.target.name().to_owned(),
                points: points
                    .into_iter()
                    .filter(|p| p.1.is_finite())
                    .map(|(x, y)| (x, y / (1u64 << 20) as f64))
                    .collect(),
            }
        })
        .collect();
    plots::line_chart(
        &out_dir.join(report::PLOT_MEMORY),
        "Resident memory growth of the target vs idle TLS connections (median of runs)",
        "idle connections",
        &[("RSS over the baseline, MiB", &memory)],
    )?;
    let panel =
        |title: &str, y: &str, runs: fn(&TargetResult) -> &[Measurement], unit: Unit| BarPanel {
            title: title.to_owned(),
            y_desc: y.to_owned(),
            groups: results
                .targets
                .iter()
                .map(|t| {
                    let bars = summarize(runs(t), unit)
                        .map(|s| {
                            vec![
                                (s.cpu_a.median, s.cpu_a.min, s.cpu_a.max),
                                (s.cpu_b.median, s.cpu_b.min, s.cpu_b.max),
                            ]
                        })
                        .unwrap_or_default();
                    (t.target.name().to_owned(), bars)
                })
                .collect(),
        };
    plots::bar_chart(
        &out_dir.join(report::PLOT_CPU),
        "Server CPU per operation (bars: median; lines: min–max)",
        &[
            "(a) target processes",
            "(b) machine − load − backend − others",
        ],
        &[
            panel(
                "new connection",
                "µs per transaction",
                |t| &t.new_conn,
                Unit::PerOp,
            ),
            panel(
                "keep-alive 1 KiB",
                "µs per request",
                |t| &t.keepalive,
                Unit::PerOp,
            ),
            panel("bulk 1 MiB", "µs per MiB", |t| &t.bulk, Unit::PerMib),
        ],
    )?;
    Ok(())
}

fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    super::stats::Summary::of(&v).map_or(f64::NAN, |s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_json_names_the_bench_executable() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"tern","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"tls","kind":["bench"]},"executable":"/w/target/release/deps/tls-0123"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            bench_executable(json, "tls"),
            Some(PathBuf::from("/w/target/release/deps/tls-0123"))
        );
        assert_eq!(bench_executable("{}", "tls"), None);
    }

    #[test]
    fn plans_fit_their_time_budgets() {
        // A rough upper bound of the measuring time alone (no builds): every window plus the
        // slack a run usually needs (~0.5 s start/stop), for all five targets; tern-bypass
        // also pays for its slab at every start (~40 µs per slot, measured: 5.2 s for 131,072)
        // and for its ramps beyond one client process (≥ 2,000 handshakes/s, measured ~2,400/s
        // on this rig with another job running).
        let estimate = |p: &Plan| {
            let nofile = targets::DOCUMENTED_NOFILE;
            let per_process = idle_per_process(nofile) as f64;
            let run = |d: Duration| d.as_secs_f64() + p.warmup.as_secs_f64() + 0.5;
            let slots = p.bypass_slots();
            let mut total = 2.0 * p.runs as f64 * run(p.run_time) + 30.0;
            // Bulk at a large MTU: tern's two paths, a start and a warm-up each (`bulk_mtu`).
            total += 2.0 * (p.runs as f64 * run(p.run_time) + 1.5);
            for t in Target::ALL {
                let (steps, _) = idle_plan(t, &p.idle_steps, nofile, slots);
                total += p.noise_time.as_secs_f64()
                    + 1.0
                    + 4.0 * p.runs as f64 * run(p.run_time)
                    + p.latency_fractions.len() as f64 * p.runs as f64 * run(p.latency_time)
                    + p.runs as f64 * (3.0 + steps.len() as f64);
                if t == Target::TernBypass {
                    let starts = 2.0 + p.runs as f64;
                    total += starts * slots as f64 * 40e-6;
                    let most = steps.iter().copied().max().unwrap_or(0) as f64;
                    let large_runs = p.runs.min(LARGE_IDLE_RUNS) as f64;
                    total += large_runs * (most - per_process).max(0.0) / 2_000.0;
                }
            }
            total
        };
        assert!(
            estimate(&Plan::quick()) < 360.0,
            "quick: {}",
            estimate(&Plan::quick())
        );
        assert!(
            estimate(&Plan::full()) < 2100.0,
            "full: {}",
            estimate(&Plan::full())
        );
        assert!(Plan::quick().runs >= 3 && Plan::full().runs >= 3);
    }

    #[test]
    fn idle_plan_splits_by_capacity_and_names_every_headline() {
        let nofile = targets::DOCUMENTED_NOFILE;
        let steps = [1_000, 10_000, 100_000];
        let (m, not) = idle_plan(Target::TernBypass, &steps, nofile, 131_072);
        assert_eq!(m, steps.to_vec());
        assert!(not.is_empty(), "{not:?}");
        let (m, not) = idle_plan(Target::TernKernel, &steps, nofile, 131_072);
        assert_eq!(m, vec![1_000, 10_000]);
        assert_eq!(not.len(), 1);
        assert!(not[0].1.contains("RLIMIT_NOFILE"), "{not:?}");
        // A headline count outside the steps: the reason says so, unless capacity rules it out.
        let (_, not) = idle_plan(Target::TernBypass, &[1_000, 10_000], nofile, 32_768);
        assert_eq!(not.len(), 1);
        assert_eq!(not[0].0, 100_000);
        assert!(
            not[0].1.contains("not among this run's idle steps"),
            "{not:?}"
        );
        let (_, not) = idle_plan(Target::Hitch, &[1_000, 10_000], nofile, 131_072);
        assert_eq!(not.len(), 2, "{not:?}");
        assert!(not
            .iter()
            .all(|(_, why)| why.contains("2 fd per connection")));
    }

    #[test]
    fn extra_client_addresses_only_beyond_one_process() {
        let nofile = targets::DOCUMENTED_NOFILE;
        let per = idle_per_process(nofile);
        assert_eq!(per, 19_936);
        let all = Target::ALL;
        assert_eq!(
            extra_sources_needed(&all, &[1_000, 5_000, 10_000], nofile, 32_768),
            0
        );
        // 100,000 on tern-bypass: 6 processes of ≤ 19,936, the first on the rig's address.
        assert_eq!(
            extra_sources_needed(&all, &[10_000, 100_000], nofile, 131_072),
            5
        );
        // Nobody can hold it: nothing to add.
        assert_eq!(
            extra_sources_needed(&[Target::TernKernel], &[100_000], nofile, 131_072),
            0
        );
    }

    #[test]
    fn bypass_slab_follows_the_plan() {
        let quick = Plan::quick();
        // The full plan's idle ramp reaches 100,000 on tern-bypass.
        assert!(Plan::full().idle_steps.contains(&100_000));
        assert_eq!(quick.bypass_slots(), 16_384);
        let full = Plan::full();
        let slots = full.bypass_slots();
        assert!(
            Target::TernBypass
                .idle_capacity(100_000, targets::DOCUMENTED_NOFILE, slots)
                .is_ok(),
            "{slots}"
        );
    }

    #[test]
    fn utc_date_is_plausible() {
        let s = utc_now();
        assert!(s.ends_with(" UTC") && s.len() == 20, "{s}");
        assert!(s.as_str() > "2024-01-01", "{s}");
    }

    #[test]
    fn invocation_reconstructs_the_command() {
        let args = CompareArgs {
            quick: true,
            targets: Target::ALL.to_vec(),
            runs: None,
            update_docs: false,
            idle_steps: None,
        };
        assert_eq!(invocation(&args), "cargo xtask bench --quick");
        let args = CompareArgs {
            quick: false,
            targets: vec![Target::TernBypass, Target::TernKernel],
            runs: Some(4),
            update_docs: true,
            idle_steps: Some(vec![10_000, 100_000]),
        };
        assert_eq!(
            invocation(&args),
            "cargo xtask bench --targets tern-bypass,tern-kernel --runs 4 \
             --idle-steps 10000,100000 --update-docs"
        );
    }
}
