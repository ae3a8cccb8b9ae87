//! The bench targets (tern in both modes, hitch, haproxy, nginx) and the shared backend: which
//! binary, which config, how to check the config and how to start it on the target core.
//!
//! Owns: the [`Target`] list and what is honestly said about targets that cannot run yet
//! (`tern-bypass`), writing each target's files into its own directory, running the peer's own
//! config checker inside the server namespace (the integration check the bench does before it
//! measures anything: `tern check-config`, `hitch --test`, `haproxy -c`, `nginx -t`), starting the
//! target pinned with `taskset` to the target core (plus the peer's own pinning, see
//! [`super::configs`]), and the nginx backend with its 1 KiB and 1 MiB files. Does not own the
//! processes' lifetime (that is [`super::daemon::Daemon`]).

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

/// A column of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Target {
    /// tern with its own TCP stack on AF_XDP (not built yet: always n/a).
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

    /// Why this target cannot be measured in this version, printed in its column.
    pub fn unavailable(self) -> Option<&'static str> {
        match self {
            Target::TernBypass => Some("n/a (bypass TLS not built yet)"),
            _ => None,
        }
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

    /// The most idle connections the target can hold under `nofile`, or why not `wanted`.
    pub fn idle_capacity(self, wanted: u64, nofile: u64) -> Result<(), String> {
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
    pub dir: PathBuf,
    /// The command that starts it (without the netns/taskset prefix), for the report.
    pub argv: Vec<String>,
    /// The command that checks the config.
    pub check_argv: Vec<String>,
}

/// Writes `target`'s config into `dir` (created) and returns how to check and start it.
pub fn prepare(
    target: Target,
    dir: &Path,
    rig: &Rig,
    certs: &CertPaths,
    tern_bin: &Path,
    cpu: usize,
    nofile: u64,
) -> Result<Prepared> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // haproxy refuses to start unless 2 × maxconn (client + server side) fits RLIMIT_NOFILE;
    // tern counts client connections only (an idle one holds no backend socket).
    let budget = nofile.saturating_sub(FD_OVERHEAD);
    let max_connections = match target {
        Target::Haproxy => budget / 2,
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
        Target::TernBypass => bail!("{}", target.unavailable().unwrap_or("not available")),
        Target::TernKernel => {
            let config = dir.join("tern.toml");
            (
                config.clone(),
                configs::tern(&layout)?,
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
        dir: dir.to_path_buf(),
        argv,
        check_argv,
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

/// Starts a prepared target and waits until it accepts on the TLS port.
pub fn start(
    prepared: &Prepared,
    rig: &Rig,
    cpu: usize,
    interrupted: &AtomicBool,
) -> Result<Daemon> {
    let cmd = pinned_server_command(rig, cpu, &prepared.argv);
    let log = prepared.dir.join(format!("{}.log", prepared.target.name()));
    let mut daemon = Daemon::start(prepared.target.name(), cmd, &log)?;
    let addr = SocketAddr::V4(SocketAddrV4::new(rig.server_ip, TLS_PORT));
    wait_accepting(&mut daemon, rig, addr, interrupted)?;
    Ok(daemon)
}

fn wait_accepting(
    daemon: &mut Daemon,
    rig: &Rig,
    addr: SocketAddr,
    interrupted: &AtomicBool,
) -> Result<()> {
    daemon.wait_ready(READY_TIMEOUT, interrupted, || {
        rig.server_run(move || can_connect(addr))
    })
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
    wait_accepting(&mut daemon, rig, SocketAddr::V4(BACKEND), interrupted)?;
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
        assert!(Target::TernBypass.unavailable().is_some());
        assert!(Target::ALL[1..].iter().all(|t| t.unavailable().is_none()));
    }

    #[test]
    fn idle_capacity_follows_file_descriptors() {
        let n = DOCUMENTED_NOFILE;
        assert!(Target::TernKernel.idle_capacity(10_000, n).is_ok());
        let why = Target::Hitch
            .idle_capacity(10_000, n)
            .expect_err("2 fds × 10k > 20k");
        assert!(why.contains("RLIMIT_NOFILE 20000"), "{why}");
        assert!(Target::Haproxy.idle_capacity(9_000, n).is_ok());
        assert!(Target::TernKernel.idle_capacity(100_000, n).is_err());
    }
}
