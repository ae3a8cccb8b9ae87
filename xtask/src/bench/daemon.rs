//! Child processes of the bench: long-running servers ([`Daemon`]) and bounded load runs
//! ([`Job`]), each in a process group of its own and always gone when its guard is dropped.
//!
//! Owns: spawning (output to a log file, no stdin, own process group, `PR_SET_PDEATHSIG` so a
//! `kill -9` of the bench still takes the direct child down), readiness polling, stopping
//! (SIGTERM to the group, SIGKILL after a grace period) and reaping with `wait4(2)` to get the
//! child's `rusage`. Signals go to the process group the bench created (`kill(-pgid)`) and only
//! while its leader is unreaped or some member is still alive, so no recycled PID is hit.
//!
//! Why own process groups: a terminal's Ctrl-C then reaches only the bench, which stops the
//! children in order (load first, target, backend, then the namespaces), and the group is what
//! [`super::proc::group_usage`] adds up for CPU and memory.
//!
//! Children must be spawned from the main thread: the parent-death signal fires when the
//! spawning *thread* exits.

use anyhow::{anyhow, bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a stopped group gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// Poll interval while waiting for readiness or exit.
const POLL: Duration = Duration::from_millis(10);

/// Spawns `cmd` in a new process group with stdout to `out` and stderr to `err` (the same file
/// when they are the same path).
fn spawn_in_group(cmd: &mut Command, out: &Path, err: &Path) -> Result<Child> {
    let create = |p: &Path| {
        std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))
    };
    let file = create(out)?;
    let err = if err == out {
        file.try_clone()
            .with_context(|| format!("cannot duplicate {}", out.display()))?
    } else {
        create(err)?
    };
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe, allocates nothing and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start `{}`", crate::display(cmd)))
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

fn signal_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions. -pgid names the process group this
    // module created with process_group(0); callers only signal it while it has members.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Waits for the leader with `wait4(WNOHANG)`: `Some((status, rusage))` once it exited.
fn try_reap(pid: i32) -> Result<Option<(ExitStatus, libc::rusage)>> {
    let mut status: libc::c_int = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `status` and `usage` point to writable memory of the right types; `pid` is our
    // own child that has not been reaped yet (the callers track that).
    let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, usage.as_mut_ptr()) };
    match rc {
        0 => Ok(None),
        r if r == pid => {
            // SAFETY: wait4 returned our pid, so it filled `usage`.
            let usage = unsafe { usage.assume_init() };
            Ok(Some((ExitStatus::from_raw(status), usage)))
        }
        _ => Err(anyhow!(
            "wait4({pid}) failed: {}",
            std::io::Error::last_os_error()
        )),
    }
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].trim().to_owned()
}

/// A long-running server (target or backend) in its own process group. Drop stops it.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    child: Child,
    pgid: i32,
    log: PathBuf,
    /// Set once the leader is reaped; its PID may then belong to someone else.
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `cmd` with its output in `log`.
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Result<Daemon> {
        let child = spawn_in_group(&mut cmd, log, log)?;
        let pgid = i32::try_from(child.id()).context("PID does not fit in pid_t")?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
            pgid,
            log: log.to_path_buf(),
            exited: None,
        })
    }

    /// The process group (= the leader's PID).
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// An error naming the exit status and the log's tail if the leader has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.exited.is_none() {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
            }
        }
        match self.exited {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); {} ends with:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 2000)
            ),
        }
    }

    /// Polls a TCP connect to `addr`, made by `connect` (which runs it in the right namespace),
    /// until it succeeds, the daemon dies, `interrupted` is set or `timeout` passes.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        interrupted: &AtomicBool,
        mut connect: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if connect() {
                return Ok(());
            }
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept connections within {timeout:?}; {} ends with:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log, 2000)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM to the group, SIGKILL after [`STOP_GRACE`], reap the leader. Idempotent.
    pub fn stop(&mut self) {
        if self.exited.is_none() || group_alive(self.pgid) {
            signal_group(self.pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if self.exited.is_none() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.exited = Some(status);
                }
            }
            // The group id stays ours while any member lives; once the leader is reaped and
            // no member is left, there is nothing to signal.
            if self.exited.is_some() && !group_alive(self.pgid) {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        if self.exited.is_none() || group_alive(self.pgid) {
            signal_group(self.pgid, libc::SIGKILL);
        }
        if self.exited.is_none() {
            match self.child.wait() {
                Ok(status) => self.exited = Some(status),
                Err(e) => eprintln!("bench: cannot reap {} ({}): {e}", self.name, self.pgid),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A bounded child run (a load generator): waited for with a deadline, its rusage collected.
#[derive(Debug)]
pub struct Job {
    pub name: String,
    pid: i32,
    log: PathBuf,
    /// Set once reaped.
    done: bool,
}

/// How a [`Job`] ended.
#[derive(Debug, Clone, Copy)]
pub struct JobExit {
    pub status: ExitStatus,
    /// User + system time of the child (and of any children it reaped), µs.
    pub cpu_us: u64,
    pub wall: Duration,
}

impl Job {
    /// Starts `cmd`, its stdout going to `out` and its stderr to `log`.
    pub fn start(name: &str, mut cmd: Command, out: &Path, log: &Path) -> Result<Job> {
        let child = spawn_in_group(&mut cmd, out, log)?;
        let pid = i32::try_from(child.id()).context("PID does not fit in pid_t")?;
        // The Child handle is dropped without waiting; this guard reaps with wait4 instead.
        drop(child);
        Ok(Job {
            name: name.to_owned(),
            pid,
            log: log.to_path_buf(),
            done: false,
        })
    }

    /// The job's PID, which is also its process group (it runs in a group of its own).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Has the job exited? Reaps it if so (then [`Job::wait`] returns at once).
    pub fn poll(&mut self, started: Instant) -> Result<Option<JobExit>> {
        if self.done {
            bail!("{} was already reaped", self.name);
        }
        Ok(try_reap(self.pid)?.map(|(status, usage)| {
            self.done = true;
            JobExit {
                status,
                cpu_us: super::proc::rusage_us(&usage),
                wall: started.elapsed(),
            }
        }))
    }

    /// Waits until the job exits, `limit` passes (then it is killed and an error returned) or
    /// `interrupted` is set. `tick` runs every poll (progress bars, liveness checks); an error
    /// from it kills the job and is returned.
    pub fn wait(
        &mut self,
        started: Instant,
        limit: Duration,
        interrupted: &AtomicBool,
        mut tick: impl FnMut() -> Result<()>,
    ) -> Result<JobExit> {
        let deadline = started + limit;
        loop {
            if let Some(exit) = self.poll(started)? {
                return Ok(exit);
            }
            if interrupted.load(Ordering::Relaxed) {
                self.kill();
                bail!("interrupted");
            }
            if let Err(e) = tick() {
                self.kill();
                return Err(e);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "{} did not finish within {limit:?} (killed); {} ends with:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log, 1500)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGINT to the group (a load generator stops early and still reports), then the same
    /// bounded wait as [`Job::wait`] with `grace`.
    pub fn interrupt(&mut self, started: Instant, grace: Duration) -> Result<JobExit> {
        if !self.done {
            signal_group(self.pid, libc::SIGINT);
        }
        let never = AtomicBool::new(false);
        let limit = started.elapsed() + grace;
        self.wait(started, limit, &never, || Ok(()))
    }

    /// SIGKILL to the group and reap. Idempotent.
    pub fn kill(&mut self) {
        if !self.done {
            signal_group(self.pid, libc::SIGKILL);
            let mut status = 0;
            // SAFETY: `pid` is our unreaped child; blocking wait4 returns once SIGKILL lands.
            unsafe {
                libc::wait4(self.pid, &mut status, 0, std::ptr::null_mut());
            }
            self.done = true;
        }
        if group_alive(self.pid) {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP connect probe with a short timeout.
pub fn can_connect(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
