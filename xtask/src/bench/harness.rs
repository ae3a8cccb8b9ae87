//! What every rig bench (`bench`, `bench tcp`, `bench flood`, `bench million`) does around its
//! measurements, in one place: refuse to run without root, turn SIGINT/SIGTERM/SIGHUP into a
//! flag the loops check, catch the rig's panics so its guards clean up, build the release
//! binaries, start the echo backend and tern, clear the logs folder, widen the client namespace's port range, and rewrite a
//! bench's section of docs/benchmarks.md. The benches own what they measure and report.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tern_tests::rig::Rig;

use super::compare::run_captured;
use super::daemon::{can_connect, Daemon};
use super::measure::{shell_line, Ctx};
use super::progress::Progress;
use super::targets::pinned_server_command;
use crate::{cargo, display, target_dir, workspace_root};

/// How long the echo backend and tern may take to accept.
/// The rig's cores, for every bench: the target (tern, hitch, …; `openssl speed`, criterion)
/// has CPU 0 to itself; the load generator and the backend share CPU 1.
pub const TARGET_CPU: usize = 0;
pub const LOAD_CPU: usize = 1;
pub const BACKEND_CPU: usize = 1;

const ECHO_READY_TIMEOUT: Duration = Duration::from_secs(30);
const TERN_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails unless running as root: `command` (e.g. "cargo xtask bench tcp") needs it for `why`.
pub fn require_root(command: &str, why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{command} needs root ({why})");
    }
    Ok(())
}

/// A flag that SIGINT, SIGTERM and SIGHUP set, so a bench stops between steps and its guards
/// remove what it made instead of the signal killing it midway.
pub fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted))
            .with_context(|| format!("cannot handle signal {sig}"))?;
    }
    Ok(interrupted)
}

/// Fails with "interrupted" once a signal set `flag`.
pub fn check_interrupted(flag: &AtomicBool) -> Result<()> {
    if flag.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `session`, turning a panic into an error. The rig panics with a message instead of
/// returning errors; the panic unwinds through the guards (processes, namespaces, files) and
/// becomes an error here. `name` ("bench tcp", "the bench") names what failed.
pub fn catch_rig_panics(
    name: &str,
    interrupted: &AtomicBool,
    session: impl FnOnce() -> Result<()>,
) -> Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(session)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) if interrupted.load(Ordering::Relaxed) => Err(anyhow!(
            "interrupted: every process, namespace and temp file the bench made was removed"
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!(
            "{name} failed (message above); everything it created was removed"
        )),
    }
}

/// Builds tern and tern-load (release) and returns the paths of `binaries` (file names in the
/// release folder, each checked to exist); `what` names them in the build's error.
pub fn build_release<const N: usize>(
    progress: &Progress,
    what: &str,
    binaries: [&str; N],
) -> Result<[PathBuf; N]> {
    let mut build = cargo();
    build.args(["build", "--release", "-p", "tern", "-p", "tern-load"]);
    progress.log(format!("$ {}", display(&build)));
    run_captured(&mut build).with_context(|| format!("building {what}"))?;
    let release = target_dir()?.join("release");
    let paths = binaries.map(|b| release.join(b));
    for p in &paths {
        if !p.is_file() {
            bail!("{} does not exist after the build", p.display());
        }
    }
    Ok(paths)
}

/// The release binaries of the benches with an echo backend (`bench tcp`, `bench flood`).
pub struct EchoBins {
    pub tern: PathBuf,
    pub load: PathBuf,
    pub echo: PathBuf,
}

/// Builds tern, tern-load and tern-echo (release).
pub fn build_echo_bins(progress: &Progress) -> Result<EchoBins> {
    let [tern, load, echo] = build_release(
        progress,
        "tern, tern-load and tern-echo",
        ["tern", "tern-load", "tern-echo"],
    )?;
    Ok(EchoBins { tern, load, echo })
}

/// Creates `logs` empty, removing what an earlier run left there.
pub fn fresh_logs(logs: &Path) -> Result<()> {
    if logs.is_dir() {
        std::fs::remove_dir_all(logs)
            .with_context(|| format!("cannot clear {}", logs.display()))?;
    }
    std::fs::create_dir_all(logs)?;
    Ok(())
}

/// The `sysctl` command (not yet run) that gives the rig's client namespace the whole
/// ephemeral port range and TIME_WAIT reuse: the benches open tens of thousands of
/// connections. Both settings are per namespace; nothing global changes.
pub fn client_port_settings(rig: &Rig) -> Command {
    let mut sysctl = rig.client_command("sysctl");
    sysctl.args([
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    sysctl
}

/// Replaces what lies between `begin` and `end` in docs/benchmarks.md with `section`;
/// returns the doc's path.
pub fn rewrite_doc_section(begin: &str, end: &str, section: &str) -> Result<PathBuf> {
    let path = workspace_root().join("docs/benchmarks.md");
    let doc = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let (Some(b), Some(e)) = (doc.find(begin), doc.find(end)) else {
        bail!("{} has no {begin} … {end} markers", path.display());
    };
    if b > e {
        bail!("{}: {end} comes before {begin}", path.display());
    }
    let new = format!(
        "{}{begin}\n{section}{end}{}",
        &doc[..b],
        &doc[e + end.len()..]
    );
    std::fs::write(&path, new)?;
    Ok(path)
}

/// Starts `tern-echo` (`bin`) on `listen` in the server namespace, pinned to `cpu`, logging to
/// `log`, and waits until it accepts. Returns the daemon and its command line for the report.
pub fn start_echo(
    rig: &Rig,
    bin: &Path,
    listen: SocketAddrV4,
    cpu: usize,
    log: &Path,
    interrupted: &AtomicBool,
) -> Result<(Daemon, String)> {
    let argv = vec![
        bin.display().to_string(),
        "--listen".to_owned(),
        listen.to_string(),
        "--max-seconds".to_owned(),
        "7200".to_owned(),
    ];
    let cmd = pinned_server_command(rig, cpu, &argv);
    let line = shell_line(&cmd);
    let mut echo = Daemon::start("tern-echo", cmd, log)?;
    echo.wait_ready(ECHO_READY_TIMEOUT, interrupted, || {
        rig.server_run(move || can_connect(SocketAddr::V4(listen)))
    })?;
    Ok((echo, line))
}

/// Starts tern (`bin run --config config`) for the path `name` of run `run` (0-based) in the
/// server namespace pinned to `cpu`, records its command, and waits until `addr` accepts from
/// the client namespace (a bypass listener only sees traffic that crosses the veth).
pub fn start_tern(
    ctx: &Ctx<'_>,
    bin: &Path,
    config: &Path,
    cpu: usize,
    name: &str,
    run: u32,
    addr: SocketAddrV4,
) -> Result<Daemon> {
    let argv = vec![
        bin.display().to_string(),
        "run".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    let cmd = pinned_server_command(ctx.rig, cpu, &argv);
    ctx.record(
        &format!("tern, {name} path (server namespace, CPU {cpu})"),
        &cmd,
    );
    let log = ctx.logs.join(format!("tern-{name}-run{}.log", run + 1));
    let mut tern = Daemon::start(&format!("tern ({name})"), cmd, &log)?;
    let client = &ctx.rig.client;
    tern.wait_ready(TERN_READY_TIMEOUT, ctx.interrupted, || {
        client.run(move || can_connect(SocketAddr::V4(addr)))
    })?;
    // Let the connection the readiness probe made finish on both sides before measuring.
    std::thread::sleep(Duration::from_millis(200));
    Ok(tern)
}

/// `tern-load --plain` (`bin`) against `addr` for `seconds`, one thread, JSON out; the caller
/// appends the workload's own arguments.
pub fn plain_load_argv(bin: &Path, addr: SocketAddrV4, seconds: f64) -> Vec<String> {
    vec![
        bin.display().to_string(),
        "--plain".to_owned(),
        "--connect".to_owned(),
        addr.to_string(),
        "--duration".to_owned(),
        format!("{seconds}s"),
        "--threads".to_owned(),
        "1".to_owned(),
        "--timeout".to_owned(),
        "5s".to_owned(),
        "--json".to_owned(),
        "--quiet".to_owned(),
    ]
}
