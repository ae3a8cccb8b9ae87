//! The bench targets (tern in both modes, hitch, haproxy, nginx) and the shared backend: which
//! binary, which config, how to check the config and how to start it on the target core.
//!
//! Owns: the [`Target`] list and what is honestly said about what targets cannot do (how many
//! idle connections each can hold), writing each target's files into its own directory, running the peer's own
//! config checker inside the server namespace (the integration check the bench does before it
//! measures anything: `tern check-config`, `hitch --test`, `haproxy -c`, `nginx -t`), starting the
//! target pinned with `taskset` to the target core (plus the peer's own pinning, see
//! [`super::configs`]) and waiting until it accepts *from the client namespace* (the way the load
//! reaches it; the bypass path only sees frames that cross the veth), reading tern's counters
//! from its control socket, and the nginx backend with its 1 KiB and 1 MiB files. Does not own
//! the processes' lifetime (that is [`super::daemon::Daemon`]).
//!
//! tern-bypass is the same tern binary and config as tern-kernel except for the listener
//! (`mode = "bypass"` on the rig's server-side veth, `tls = true`), `[xdp] hugepages = "off"` and
//! the slab size: its one bypass worker (pinned like the kernel worker) runs tern's own TCP
//! stack on AF_XDP, whose connection slots (`limits.max_connections_per_worker`) are
//! preallocated; [`bypass_slots`] sizes them to what the bench will hold.

use super::configs::{self, BackendLayout, TargetLayout};
use super::daemon::{can_connect, Daemon};
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tern_tests::rig::Rig;

/// TLS port every target listens on.
pub const TLS_PORT: u16 = 443;
/// The backend's address inside the server namespace.
pub const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
/// Response bodies the backend serves, as `/bytes/<len>` (the same paths as tern's demo backend).
pub const SMALL_BODY: u64 = 1024;
pub const LARGE_BODY: u64 = 1 << 20;
/// How long a target gets to start accepting.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// RLIMIT_NOFILE on the bench machines (soft = hard, cannot be raised without
/// CAP_SYS_RESOURCE); the bench reads the real value, this is only for messages in tests.
pub const DOCUMENTED_NOFILE: u64 = 20_000;
/// File descriptors a target needs besides connections (listeners, logs, epoll/io_uring, …).
pub const FD_OVERHEAD: u64 = 64;
/// Slots beyond the most idle connections held: the readiness probe, the closed-loop
/// connections in flight, stragglers.
pub const BYPASS_SLOT_MARGIN: u64 = 1_024;
/// Slab sizes are rounded up to this (keeps the number readable in the report); also the least.
const BYPASS_SLOT_ROUNDING: u64 = 16_384;

/// tern-bypass's slab capacity (`limits.max_connections_per_worker`) for a run that holds up to
/// `max_idle` idle connections at once: those plus a margin, rounded up. (Connections tern has
/// finished with keep no slot in TIME-WAIT, so the closing rate does not count.)
pub fn bypass_slots(max_idle: u64) -> u64 {
    let need = (max_idle + BYPASS_SLOT_MARGIN).max(1);
    need.div_ceil(BYPASS_SLOT_ROUNDING) * BYPASS_SLOT_ROUNDING
}

/// A column of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Target {
    /// tern with its own TCP stack on AF_XDP (`mode = "bypass"`), TLS terminated in its bypass
    /// worker.
    TernBypass,
    /// tern on kernel sockets with io_uring.
    TernKernel,
    Hitch,
    Haproxy,
    Nginx,
}

impl Target {
    /// Every column, in table order.
    pub const ALL: [Target; 5] = [
        Target::TernBypass,
        Target::TernKernel,
        Target::Hitch,
        Target::Haproxy,
        Target::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::TernBypass => "tern-bypass",
            Target::TernKernel => "tern-kernel",
            Target::Hitch => "hitch",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
        }
    }

    /// tern targets answer on a control socket (`tern ctl`) in their directory.
    pub fn is_tern(self) -> bool {
        matches!(self, Target::TernBypass | Target::TernKernel)
    }

    /// File descriptors one idle TLS connection costs the target. tern's default
    /// `connect = "first-byte"` opens the backend connection when the first request byte
    /// arrives, so an idle client holds one; hitch, haproxy (tcp mode) and nginx (stream)
    /// connect to the backend as soon as the client is accepted, so two.
    pub fn fds_per_idle_connection(self) -> u64 {
        match self {
            Target::TernBypass => 0,
            Target::TernKernel => 1,
            Target::Hitch | Target::Haproxy | Target::Nginx => 2,
        }
    }

    /// Whether the target can hold `wanted` idle connections under `nofile` (and, for
    /// tern-bypass, in a slab of `bypass_slots`), or why not.
    pub fn idle_capacity(self, wanted: u64, nofile: u64, bypass_slots: u64) -> Result<(), String> {
        if self == Target::TernBypass && wanted + BYPASS_SLOT_MARGIN > bypass_slots {
            return Err(format!(
                "n/a: {wanted} connections (+{BYPASS_SLOT_MARGIN} margin) > the {bypass_slots} \
                 connection slots this run gives the bypass stack"
            ));
        }
        let per = self.fds_per_idle_connection();
        let needed = per * wanted + FD_OVERHEAD;
        if per > 0 && needed > nofile {
            return Err(format!(
                "n/a: {per} fd per connection ({}), {needed} > RLIMIT_NOFILE {nofile}",
                if per == 1 {
                    "client socket"
                } else {
                    "client + backend socket"
                }
            ));
        }
        Ok(())
    }

    /// Debian packages that provide the target (tern is built from the workspace).
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Target::TernBypass | Target::TernKernel => &[],
            Target::Hitch => &["hitch"],
            Target::Haproxy => &["haproxy"],
            Target::Nginx => &["nginx", "libnginx-mod-stream"],
        }
    }
}

/// Certificate files shared by every target.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one PEM file (hitch, haproxy).
    pub combined: PathBuf,
}

/// A target's files: its config and where its checker and process write.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub target: Target,
    pub config: PathBuf,
    /// The command that starts it (without the netns/taskset prefix), for the report.
    pub argv: Vec<String>,
    /// The command that checks the config.
    pub check_argv: Vec<String>,
    /// tern's control socket (tern targets only).
    pub control_socket: Option<PathBuf>,
    /// The target's log (stdout and stderr).
    pub log: PathBuf,
}

/// Writes `target`'s config into `dir` (created) and returns how to check and start it.
/// `bypass_slots` is tern-bypass's slab capacity ([`bypass_slots`]).
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
pub fn prepare(
    target: Target,
    dir: &Path,
    rig: &Rig,
    certs: &CertPaths,
    tern_bin: &Path,
    cpu: usize,
    nofile: u64,
    bypass_slots: u64,
) -> Result<Prepared> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // haproxy refuses to start unless 2 × maxconn (client + server side) fits RLIMIT_NOFILE;
    // tern counts client connections only (an idle one holds no backend socket).
    let budget = nofile.saturating_sub(FD_OVERHEAD);
    let max_connections = match target {
        Target::Haproxy => budget / 2,
        // Not fds but preallocated slots: an idle bypass connection holds no descriptor.
        Target::TernBypass => bypass_slots,
        _ => budget,
    };
    let max_connections = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let layout = TargetLayout {
        listen: SocketAddrV4::new(rig.server_ip, TLS_PORT),
        backend: BACKEND,
        cert: certs.cert.clone(),
        key: certs.key.clone(),
        combined_pem: certs.combined.clone(),
        dir: dir.to_path_buf(),
        cpu,
        max_connections,
    };
    let s = |p: &Path| p.display().to_string();
    let (file, text, argv, check_argv) = match target {
        Target::TernBypass | Target::TernKernel => {
            let config = dir.join("tern.toml");
            let text = if target == Target::TernBypass {
                configs::tern_bypass(&layout, &rig.server_if)?
            } else {
                configs::tern(&layout)?
            };
            (
                config.clone(),
                text,
                vec![s(tern_bin), "run".into(), "--config".into(), s(&config)],
                vec![s(tern_bin), "check-config".into(), s(&config)],
            )
        }
        Target::Hitch => {
            std::fs::create_dir_all(dir.join("ocsp"))?;
            let config = dir.join("hitch.conf");
            (
                config.clone(),
                configs::hitch(&layout)?,
                vec!["hitch".into(), format!("--config={}", s(&config))],
                vec![
                    "hitch".into(),
                    "--test".into(),
                    format!("--config={}", s(&config)),
                ],
            )
        }
        Target::Haproxy => {
            let config = dir.join("haproxy.cfg");
            (
                config.clone(),
                configs::haproxy(&layout)?,
                // -db: foreground, no daemon; -W is not used, so there is no master process.
                vec!["haproxy".into(), "-db".into(), "-f".into(), s(&config)],
                vec!["haproxy".into(), "-c".into(), "-f".into(), s(&config)],
            )
        }
        Target::Nginx => {
            let config = dir.join("nginx.conf");
            let base = vec![
                "nginx".to_owned(),
                "-p".into(),
                s(dir),
                "-e".into(),
                s(&dir.join("nginx-startup.log")),
                "-c".into(),
                s(&config),
            ];
            let mut check = base.clone();
            check.push("-t".into());
            (config, configs::nginx_tls(&layout)?, base, check)
        }
    };
    std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(Prepared {
        target,
        config: file,
        argv,
        check_argv,
        // The socket path the tern configs name (see `configs::tern`).
        control_socket: target.is_tern().then(|| dir.join("tern.sock")),
        log: dir.join(format!("{}.log", target.name())),
    })
}

/// Runs the prepared config checker inside the server namespace; an error carries its output.
pub fn check(prepared: &Prepared, rig: &Rig) -> Result<String> {
    let mut cmd = rig.server_command(&prepared.check_argv[0]);
    cmd.args(&prepared.check_argv[1..]).stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", prepared.check_argv.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "`{}` rejected the generated {} ({}):\n{}",
            prepared.check_argv.join(" "),
            prepared.config.display(),
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

/// The command that runs `argv` in the server namespace pinned to `cpu`.
pub fn pinned_server_command(rig: &Rig, cpu: usize, argv: &[String]) -> Command {
    let mut cmd = rig.server_command("taskset");
    cmd.arg("-c").arg(cpu.to_string()).args(argv);
    cmd
}

/// Starts a prepared target and waits until it accepts on the TLS port from the client
/// namespace (and, for tern, until its control socket answers).
pub fn start(
    prepared: &Prepared,
    rig: &Rig,
    cpu: usize,
    interrupted: &AtomicBool,
) -> Result<Daemon> {
    let cmd = pinned_server_command(rig, cpu, &prepared.argv);
    let mut daemon = Daemon::start(prepared.target.name(), cmd, &prepared.log)?;
    let addr = SocketAddr::V4(SocketAddrV4::new(rig.server_ip, TLS_PORT));
    let client = &rig.client;
    // tern binds its control socket after its bypass workers run: a bypass listener can
    // accept before `tern ctl` answers, and the bench reads tern-bypass's counters.
    let control = prepared.control_socket.clone();
    daemon.wait_ready(READY_TIMEOUT, interrupted, || {
        // Connect, not exists(): a file left by a killed run would pass too early.
        let answers = |c: &PathBuf| std::os::unix::net::UnixStream::connect(c).is_ok();
        control.as_ref().is_none_or(answers) && client.run(move || can_connect(addr))
    })?;
    Ok(daemon)
}

/// `tern ctl stats` without the extra process: one `stats` line on the control socket, one JSON
/// document back (see tern's `control` module).
pub fn tern_stats(socket: &Path) -> Result<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to tern's control socket {}",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"stats\n")?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .with_context(|| format!("reading stats from {}", socket.display()))?;
    if text.starts_with("error:") {
        bail!("tern ctl stats: {}", text.trim());
    }
    serde_json::from_str(&text).with_context(|| format!("tern's stats are not JSON:\n{text}"))
}

/// A counter of the bypass path's totals in a stats document: `bypass.<group>.<name>`
/// (`proxy` = the L4/TLS proxy's counters, `tcp` = the stack's).
pub fn bypass_counter(stats: &serde_json::Value, group: &str, name: &str) -> Option<u64> {
    stats["bypass"][group][name].as_u64()
}

/// TLS handshakes tern-bypass's proxy has completed since it started: the server side of "the
/// idle connections are up", where kernel targets show established sockets.
pub fn bypass_handshakes(socket: &Path) -> Result<u64> {
    let stats = tern_stats(socket)?;
    bypass_counter(&stats, "proxy", "handshakes")
        .ok_or_else(|| anyhow::anyhow!("tern's stats have no bypass.proxy.handshakes"))
}

/// Counters of the bypass path that mean a figure was distorted (connections refused for want
/// of a slot, frames dropped for want of UMEM, TLS failures, handshake timeouts), as notes;
/// empty when all are zero. `since` is an earlier stats document (its values are subtracted).
pub fn bypass_trouble(now: &serde_json::Value, since: Option<&serde_json::Value>) -> Vec<String> {
    const WATCHED: [(&str, &str, &str); 5] = [
        (
            "tcp",
            "rx_slab_full",
            "handshakes refused: every connection slot taken (TIME-WAIT included)",
        ),
        ("tcp", "tx_no_frame", "frames not sent: no free UMEM frame"),
        ("proxy", "tls_errors", "TLS errors"),
        ("proxy", "handshake_timeouts", "handshake timeouts"),
        ("proxy", "backend_failures", "backend failures"),
    ];
    WATCHED
        .iter()
        .filter_map(|&(group, name, what)| {
            let n = bypass_counter(now, group, name)?;
            let before = since
                .and_then(|s| bypass_counter(s, group, name))
                .unwrap_or(0);
            let d = n.saturating_sub(before);
            (d > 0).then(|| format!("{d} {what} (bypass.{group}.{name})"))
        })
        .collect()
}

/// The backend: nginx serving `/bytes/1024` and `/bytes/1048576` on [`BACKEND`].
pub struct BackendFiles {
    pub config: PathBuf,
    pub argv: Vec<String>,
    pub check_argv: Vec<String>,
    pub dir: PathBuf,
}

/// Writes the backend's document root (bodies are tern's demo-backend pattern, so a client can
/// check them the same way) and its config.
pub fn prepare_backend(dir: &Path, cpu: usize) -> Result<BackendFiles> {
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("bytes"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    for len in [SMALL_BODY, LARGE_BODY] {
        let mut body = vec![0u8; len as usize];
        tern_tests::backend::pattern_fill(0, &mut body);
        std::fs::write(root.join("bytes").join(len.to_string()), body)?;
    }
    let layout = BackendLayout {
        listen: BACKEND,
        root,
        dir: dir.to_path_buf(),
        cpu,
    };
    let config = dir.join("nginx-backend.conf");
    std::fs::write(&config, configs::nginx_backend(&layout)?)?;
    let s = |p: &Path| p.display().to_string();
    let argv = vec![
        "nginx".to_owned(),
        "-p".into(),
        s(dir),
        "-e".into(),
        s(&dir.join("nginx-startup.log")),
        "-c".into(),
        s(&config),
    ];
    let mut check_argv = argv.clone();
    check_argv.push("-t".into());
    Ok(BackendFiles {
        config,
        argv,
        check_argv,
        dir: dir.to_path_buf(),
    })
}

/// Checks and starts the backend in the server namespace, pinned to `cpu`.
pub fn start_backend(
    files: &BackendFiles,
    rig: &Rig,
    cpu: usize,
    interrupted: &AtomicBool,
) -> Result<Daemon> {
    let mut check = rig.server_command(&files.check_argv[0]);
    check.args(&files.check_argv[1..]).stdin(Stdio::null());
    let out = check.output().context("cannot run nginx -t")?;
    if !out.status.success() {
        bail!(
            "nginx -t rejected the backend config {}:\n{}{}",
            files.config.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cmd = pinned_server_command(rig, cpu, &files.argv);
    let mut daemon = Daemon::start("backend (nginx)", cmd, &files.dir.join("backend.log"))?;
    // The backend listens on the server namespace's loopback: probe it from there.
    let addr = SocketAddr::V4(BACKEND);
    daemon.wait_ready(READY_TIMEOUT, interrupted, || {
        rig.server_run(move || can_connect(addr))
    })?;
    Ok(daemon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_clap() {
        use clap::ValueEnum;
        for t in Target::ALL {
            let parsed = Target::from_str(t.name(), false)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", t.name()));
            assert_eq!(parsed, t);
        }
        assert!(Target::TernBypass.is_tern() && Target::TernKernel.is_tern());
        assert!(!Target::Hitch.is_tern());
    }

    #[test]
    fn idle_capacity_follows_file_descriptors() {
        let n = DOCUMENTED_NOFILE;
        let slots = 131_072;
        assert!(Target::TernKernel.idle_capacity(10_000, n, slots).is_ok());
        let why = Target::Hitch
            .idle_capacity(10_000, n, slots)
            .expect_err("2 fds × 10k > 20k");
        assert!(why.contains("RLIMIT_NOFILE 20000"), "{why}");
        assert!(Target::Haproxy.idle_capacity(9_000, n, slots).is_ok());
        assert!(Target::TernKernel.idle_capacity(100_000, n, slots).is_err());
    }

    #[test]
    fn bypass_idle_capacity_is_its_slab_not_fds() {
        let n = DOCUMENTED_NOFILE;
        assert!(Target::TernBypass
            .idle_capacity(100_000, n, 131_072)
            .is_ok());
        let why = Target::TernBypass
            .idle_capacity(100_000, n, 65_536)
            .expect_err("100k > 64k slots");
        assert!(why.contains("65536 connection slots"), "{why}");
        // The margin counts: exactly the slab is not enough.
        assert!(Target::TernBypass.idle_capacity(65_536, n, 65_536).is_err());
    }

    #[test]
    fn bypass_slots_cover_the_idle_connections() {
        assert_eq!(bypass_slots(0), 16_384, "the least");
        assert_eq!(bypass_slots(10_000), 16_384);
        let big = bypass_slots(100_000);
        assert!(
            big >= 100_000 + BYPASS_SLOT_MARGIN && big.is_multiple_of(16_384),
            "{big}"
        );
        assert!(Target::TernBypass
            .idle_capacity(100_000, DOCUMENTED_NOFILE, big)
            .is_ok());
    }

    #[test]
    fn bypass_trouble_reports_only_what_grew() {
        let before = serde_json::json!({
            "bypass": {"tcp": {"rx_slab_full": 3, "tx_no_frame": 0},
                       "proxy": {"tls_errors": 1, "handshake_timeouts": 0, "backend_failures": 0}}
        });
        assert!(bypass_trouble(&before, Some(&before)).is_empty());
        let after = serde_json::json!({
            "bypass": {"tcp": {"rx_slab_full": 10, "tx_no_frame": 0},
                       "proxy": {"tls_errors": 1, "handshake_timeouts": 2, "backend_failures": 0}}
        });
        let notes = bypass_trouble(&after, Some(&before));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("7 handshakes refused"), "{notes:?}");
        assert!(notes[1].starts_with("2 handshake timeouts"), "{notes:?}");
        assert_eq!(bypass_trouble(&after, None).len(), 3);
        assert_eq!(bypass_counter(&after, "tcp", "rx_slab_full"), Some(10));
        assert_eq!(bypass_counter(&after, "tcp", "nothing"), None);
    }
}
