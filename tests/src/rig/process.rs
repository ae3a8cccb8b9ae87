//! [`TernProcess`]: runs `tern run --config FILE` (optionally inside a namespace) and makes sure
//! it is gone afterwards; [`tern_binary`] finds the binary to run.
//!
//! Owns: the config file and the captured stdout/stderr (in a private [`TempDir`]), readiness
//! polling, signals, and killing + reaping the child on drop. It does not build tern (that is
//! `cargo build -p tern`, done by `cargo xtask test`) and does not interpret tern's output.
//!
//! Readiness is a TCP connect to the listener from tern's own namespace, polled every few
//! milliseconds until a bounded deadline; the child's exit is checked on every turn, so a tern
//! that fails to start is reported at once with its stderr. Signals are sent by PID, and only
//! while the child has not been reaped, so a recycled PID is never hit.

use super::{enter_netns_path, Netns, TempDir};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Default bound for [`TernProcess::wait_ready`]: generous for a debug build on a loaded
/// 2-core CI machine, short enough that a hung start fails the test quickly.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval between readiness probes and exit checks.
const POLL: Duration = Duration::from_millis(10);
/// How much of stderr to print when a test panics with tern still attached.
const STDERR_TAIL: usize = 8 * 1024;

/// The `tern` binary to test: `$TERN_BIN` if set, else `tern` in the cargo profile directory
/// of the running executable (`target/<profile>/deps/<test>` → `target/<profile>/tern`, or
/// `target/<profile>/xtask` → `target/<profile>/tern`). Panics with instructions if missing.
#[track_caller]
pub fn tern_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TERN_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TERN_BIN={} does not name a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("cannot find the running executable's path");
    let mut dir = exe
        .parent()
        .expect("the running executable has no parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidate = dir.join("tern");
    assert!(
        candidate.is_file(),
        "tern binary not found at {}: build it first with `cargo build -p tern` \
         (`cargo xtask test` does), or set TERN_BIN to its path",
        candidate.display()
    );
    candidate
}

/// How to start tern; `TernOptions::default()` is what [`TernProcess::start`] uses.
#[derive(Debug, Default, Clone)]
pub struct TernOptions<'a> {
    /// Run inside this namespace (`ip netns exec`); `None` = the caller's namespace.
    pub netns: Option<&'a Netns>,
    /// The binary; `None` = [`tern_binary()`].
    pub binary: Option<PathBuf>,
    /// Appended after `run --config FILE`, e.g. `["--log-level", "debug"]`.
    pub extra_args: Vec<String>,
    /// Extra environment variables for the child (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Put tern in its own process group, so a terminal's Ctrl-C reaches only the caller,
    /// which then stops tern itself (`cargo xtask run` drains with SIGTERM). Tests leave this
    /// off so an interrupted `cargo test` takes tern down with it.
    pub own_process_group: bool,
}

/// A running `tern run --config FILE`. Drop: SIGKILL if still running, then reap.
#[derive(Debug)]
pub struct TernProcess {
    child: Child,
    /// Holds `tern.toml`, `tern.stdout`, `tern.stderr`; removed after the child is reaped.
    dir: TempDir,
    config: PathBuf,
    stderr: PathBuf,
    /// `/run/netns/<name>` of the namespace tern runs in, for readiness probes.
    netns_path: Option<PathBuf>,
    /// Set once the child has been reaped: from then on its PID may belong to someone else.
    exited: Option<ExitStatus>,
}

impl TernProcess {
    /// Writes `config_text` to a fresh temp dir and starts tern on it, in `netns` if given.
    /// Paths inside the config should be absolute (relative ones resolve against that dir).
    #[track_caller]
    pub fn start(config_text: &str, netns: Option<&Netns>) -> TernProcess {
        TernProcess::start_with(
            config_text,
            TernOptions {
                netns,
                ..TernOptions::default()
            },
        )
    }

    /// [`TernProcess::start`] with every option.
    #[track_caller]
    pub fn start_with(config_text: &str, options: TernOptions<'_>) -> TernProcess {
        let binary = options.binary.clone().unwrap_or_else(tern_binary);
        let dir = TempDir::new("tern");
        let config = dir.join("tern.toml");
        let stderr = dir.join("tern.stderr");
        std::fs::write(&config, config_text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let open = |path: &Path| {
            std::fs::File::create(path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        let binary_str = binary.to_str().expect("tern binary path is not UTF-8");
        let mut cmd = match options.netns {
            Some(ns) => ns.command(binary_str),
            None => Command::new(&binary),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args(&options.extra_args)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(open(&dir.join("tern.stdout")))
            .stderr(open(&stderr));
        if options.own_process_group {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        TernProcess {
            child,
            dir,
            config,
            stderr,
            netns_path: options.netns.map(Netns::path),
            exited: None,
        }
    }

    /// The child's PID (tern's own: `ip netns exec` execs in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The private directory holding the config and the captured output.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file tern was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The file tern's stderr goes to.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Everything tern has written to stderr so far.
    pub fn stderr_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to tern. Panics if tern was already reaped (its PID
    /// may have been reused) or if kill(2) fails.
    #[track_caller]
    pub fn signal(&self, sig: libc::c_int) {
        assert!(
            self.exited.is_none(),
            "tern already exited ({:?}); not signalling a PID that may be reused",
            self.exited
        );
        let pid = libc::pid_t::try_from(self.child.id()).expect("PID fits in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own unreaped child
        // (checked above), so it cannot name an unrelated process.
        let rc = unsafe { libc::kill(pid, sig) };
        assert!(
            rc == 0,
            "kill({pid}, {sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Reaps tern if it has exited; `None` while it runs.
    #[track_caller]
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waitpid on tern failed: {e}"));
        }
        self.exited
    }

    /// Waits up to `timeout` for tern to exit; `None` if it is still running then.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, wait up to `grace` for the drain, then SIGKILL. Returns the exit status.
    #[track_caller]
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal(libc::SIGTERM);
        if let Some(status) = self.wait_exit(grace) {
            return status;
        }
        self.kill_and_reap()
            .unwrap_or_else(|e| panic!("cannot kill tern: {e}"))
    }

    /// Waits (up to [`READY_TIMEOUT`]) until a TCP connect to `addr` from tern's namespace
    /// succeeds and tern has logged `tern ready` (set-up complete). Panics with tern's stderr if tern exits first or the deadline passes.
    #[track_caller]
    pub fn wait_ready(&mut self, addr: SocketAddr) {
        self.wait_ready_within(addr, READY_TIMEOUT);
    }

    /// [`TernProcess::wait_ready`] with an explicit deadline.
    #[track_caller]
    pub fn wait_ready_within(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let netns = self.netns_path.clone();
        let prober = {
            let cancel = Arc::clone(&cancel);
            std::thread::spawn(move || {
                if let Some(path) = &netns {
                    enter_netns_path(path);
                }
                while !cancel.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                        let _ = tx.send(());
                        return;
                    }
                    std::thread::sleep(POLL);
                }
            })
        };
        let outcome = loop {
            match rx.recv_timeout(POLL) {
                Ok(()) => break Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err(None),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(status) = self.try_wait() {
                break Err(Some(status));
            }
        };
        cancel.store(true, Ordering::Relaxed);
        if prober.join().is_err() {
            panic!("readiness prober for {addr} panicked (namespace gone?)");
        }
        // The listening socket accepts (into its backlog) as soon as it is bound, before every
        // worker has set up (pools mapped and populated, rings registered): "ready" is the
        // line tern logs, with `READY=1`, once set-up is complete.
        let outcome = outcome.and_then(|()| loop {
            if self.stderr_text().contains("tern ready") {
                break Ok(());
            }
            if let Some(status) = self.try_wait() {
                break Err(Some(status));
            }
            if Instant::now() >= deadline {
                break Err(None);
            }
            std::thread::sleep(POLL);
        });
        match outcome {
            Ok(()) => {}
            Err(Some(status)) => panic!(
                "tern exited ({status}) before accepting on {addr}; stderr:\n{}",
                self.stderr_text()
            ),
            Err(None) => panic!(
                "tern did not accept on {addr} and log `tern ready` within {timeout:?}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    fn kill_and_reap(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        // Child::kill sends SIGKILL by PID to our unreaped child.
        self.child.kill()?;
        let status = self.child.wait()?;
        self.exited = Some(status);
        Ok(status)
    }
}

impl Drop for TernProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.stderr_text();
            let tail_start = text.len().saturating_sub(STDERR_TAIL);
            let tail_start = (tail_start..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            eprintln!(
                "---- tern (pid {}) stderr, last {} bytes ----\n{}\n---- end of tern stderr ----",
                self.child.id(),
                text.len() - tail_start,
                &text[tail_start..]
            );
        }
        if let Err(e) = self.kill_and_reap() {
            eprintln!("could not kill/reap tern (pid {}): {e}", self.child.id());
        }
    }
}
