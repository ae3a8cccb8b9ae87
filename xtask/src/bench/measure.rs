//! One measured load run: CPU snapshots around a load generator's whole life, the generator's own
//! rusage, and its report — the raw material of every figure.
//!
//! Owns: the measuring window (opened just before the spawn, closed just after the reap, so the
//! generator's rusage covers exactly the window), the run's log files (`<logs>/<n>-<what>.out`
//! and `.err`), keeping an example of every command for the report, and the h2load batch loop.
//! Does not own what the figures mean ([`super::cpu`], [`super::results`]).

use super::cpu::{ProcSample, Snapshot, Window};
use super::daemon::{Daemon, Job};
use super::load::{accumulate, LoadReport};
use super::proc;
use super::progress::Progress;
use super::results::Measurement;
use anyhow::{bail, Context, Result};
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tern_tests::rig::Rig;

/// Extra time a run gets beyond its nominal length before it is killed: start-up, connection
/// set-up, the generator's drain and exit.
pub const RUN_SLACK: Duration = Duration::from_secs(15);

/// What every measurement needs: the rig, the stop flag, the display, where logs go.
pub struct Ctx<'a> {
    pub rig: &'a Rig,
    pub interrupted: &'a AtomicBool,
    pub progress: &'a Progress,
    pub logs: PathBuf,
    /// The CPU the load generator is pinned to.
    pub load_cpu: usize,
    commands: RefCell<Vec<(String, String)>>,
    seq: Cell<u32>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        rig: &'a Rig,
        interrupted: &'a AtomicBool,
        progress: &'a Progress,
        logs: PathBuf,
        load_cpu: usize,
    ) -> Ctx<'a> {
        Ctx {
            rig,
            interrupted,
            progress,
            logs,
            load_cpu,
            commands: RefCell::new(Vec::new()),
            seq: Cell::new(0),
        }
    }

    /// Keeps `cmd` as the example of `what` (the first one recorded wins).
    pub fn record(&self, what: &str, cmd: &Command) {
        let mut commands = self.commands.borrow_mut();
        if !commands.iter().any(|(w, _)| w == what) {
            commands.push((what.to_owned(), shell_line(cmd)));
        }
    }

    pub fn commands(&self) -> Vec<(String, String)> {
        self.commands.borrow().clone()
    }

    /// `argv` in the client namespace, pinned to the load CPU.
    pub fn client_command(&self, argv: &[String]) -> Command {
        let mut cmd = self.rig.client_command("taskset");
        cmd.arg("-c").arg(self.load_cpu.to_string()).args(argv);
        cmd
    }

    /// Fresh `(stdout, stderr)` log paths for a run called `what`.
    pub fn log_paths(&self, what: &str) -> (PathBuf, PathBuf) {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        let stem: String = what
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        (
            self.logs.join(format!("{n:04}-{stem}.out")),
            self.logs.join(format!("{n:04}-{stem}.err")),
        )
    }
}

/// A command line as a POSIX shell would need it typed: arguments with spaces, quotes or
/// shell metacharacters in single quotes.
pub fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            let plain = !a.is_empty()
                && a.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@')
                });
            if plain {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The process groups a window is measured against.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub target_pgid: i32,
    pub backend_pgid: i32,
}

impl Probe {
    /// The machine's busy time and every process's CPU counters, now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let hz = proc::clock_ticks_per_second();
        let processes = proc::all_processes()?
            .into_iter()
            // Kernel threads (ksoftirqd running deferred network receive work, kworkers) are
            // kernel work caused by the traffic: it stays in (b) like softirq time does.
            .filter(|s| !s.is_kernel_thread())
            .map(|s| ProcSample {
                pid: s.pid,
                starttime: s.starttime,
                pgrp: s.pgrp,
                // Own time only, never cutime/cstime: those jump by a child's *whole-life* CPU
                // when it is reaped (a compiler job that ran mostly before the window, or the
                // load generator this harness reaps and counts from wait4 anyway).
                cpu_us: proc::ticks_to_us(s.utime + s.stime, hz),
            })
            .collect();
        let machine = proc::machine_ticks()?;
        Ok(Snapshot {
            machine_busy_us: proc::ticks_to_us(machine.busy, hz),
            machine_irq_us: proc::ticks_to_us(machine.irq, hz),
            processes,
        })
    }

    /// The window between two snapshots of this probe.
    pub fn window(&self, start: &Snapshot, end: &Snapshot, wall: Duration, load_us: u64) -> Window {
        Window::between(
            start,
            end,
            self.target_pgid,
            self.backend_pgid,
            wall,
            load_us,
        )
    }
}

/// Unattributed busy time of the machine while nothing is offered, µs per second (the
/// quality indicator printed with every target).
pub fn idle_noise(ctx: &Ctx<'_>, probe: &Probe, length: Duration) -> Result<f64> {
    let start = probe.snapshot()?;
    let t0 = Instant::now();
    while t0.elapsed() < length {
        if ctx.interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = probe.snapshot()?;
    Ok(probe
        .window(&start, &end, t0.elapsed(), 0)
        .unattributed_rate())
}

/// Which generator a run uses: it decides how the output is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    TernLoad,
    H2load,
}

impl Tool {
    fn parse(self, text: &str) -> Result<LoadReport> {
        match self {
            Tool::TernLoad => super::load::parse_tern_load(text),
            Tool::H2load => super::load::parse_h2load(text),
        }
    }
}

/// Runs `argv` (in the client namespace, on the load CPU) once as a measured window against
/// `target`. `expected` is its nominal length (for the bar and the kill deadline).
pub fn run_once(
    ctx: &Ctx<'_>,
    probe: &Probe,
    target: &mut Daemon,
    what: &str,
    argv: &[String],
    expected: Duration,
    tool: Tool,
) -> Result<Measurement> {
    let cmd = ctx.client_command(argv);
    ctx.record(what.split(" #").next().unwrap_or(what), &cmd);
    let (out, err) = ctx.log_paths(what);
    let bar = ctx.progress.run(what, expected);
    let start = probe.snapshot()?;
    let t0 = Instant::now();
    let mut job = Job::start(what, cmd, &out, &err)?;
    let exit = job.wait(t0, expected + RUN_SLACK, ctx.interrupted, || {
        bar.tick();
        target.check_alive()
    })?;
    let end = probe.snapshot()?;
    drop(bar);
    if !exit.status.success() {
        bail!(
            "{what} failed ({}); {} ends with:\n{}",
            exit.status,
            err.display(),
            super::daemon::log_tail(&err, 1500)
        );
    }
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("cannot read {}", out.display()))?;
    let report = tool
        .parse(&text)
        .with_context(|| format!("{what}: output in {}", out.display()))?;
    Ok(Measurement {
        report,
        window: probe.window(&start, &end, exit.wall, exit.cpu_us),
        work_us: None,
    })
}

/// Runs `argv` repeatedly (h2load new-connection batches) inside one window until `length` of
/// batch time has passed or `max_batches` ran; reports are added up, and so are the batches'
/// CPU times.
pub fn run_batches(
    ctx: &Ctx<'_>,
    probe: &Probe,
    target: &mut Daemon,
    what: &str,
    argv: &[String],
    length: Duration,
    max_batches: u32,
) -> Result<Measurement> {
    let cmd = ctx.client_command(argv);
    ctx.record(what.split(" #").next().unwrap_or(what), &cmd);
    let bar = ctx.progress.run(what, length);
    let start = probe.snapshot()?;
    let t0 = Instant::now();
    let mut total = LoadReport::default();
    let mut load_us = 0u64;
    for batch in 0..max_batches {
        if t0.elapsed() >= length {
            break;
        }
        let (out, err) = ctx.log_paths(what);
        let b0 = Instant::now();
        let mut job = Job::start(what, ctx.client_command(argv), &out, &err)?;
        let exit = job.wait(b0, RUN_SLACK, ctx.interrupted, || {
            bar.tick();
            target.check_alive()
        })?;
        load_us += exit.cpu_us;
        if !exit.status.success() {
            bail!(
                "{what} batch {batch} failed ({}); {} ends with:\n{}",
                exit.status,
                err.display(),
                super::daemon::log_tail(&err, 1500)
            );
        }
        let text = std::fs::read_to_string(&out)
            .with_context(|| format!("cannot read {}", out.display()))?;
        let report = Tool::H2load
            .parse(&text)
            .with_context(|| format!("{what}: output in {}", out.display()))?;
        accumulate(&mut total, &report);
    }
    let end = probe.snapshot()?;
    Ok(Measurement {
        report: total,
        window: probe.window(&start, &end, t0.elapsed(), load_us),
        work_us: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_lines_quote_what_needs_it() {
        let mut cmd = Command::new("sysctl");
        cmd.args([
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            "it's",
            "a/b=c,d",
        ]);
        assert_eq!(
            shell_line(&cmd),
            r"sysctl -w 'net.ipv4.ip_local_port_range=1024 65535' 'it'\''s' a/b=c,d"
        );
    }
}
