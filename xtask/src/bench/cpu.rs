//! Server CPU accounting for one measured window, the two ways the bench prints it.
//!
//! Owns the arithmetic, not the reading (that is [`super::proc`]):
//! - **(a) target process time**: utime + stime of every process in the target's process group
//!   over the window. Exact for what the kernel charges to the target, but on veth the receive
//!   path of a packet (netif_receive_skb, IP, TCP, waking the socket) runs in softirq on the CPU
//!   that *sent* it — the load generator's core for client → server packets — and is charged to
//!   no process at all, so (a) leaves out most of a kernel-socket server's receive work.
//! - **(b) machine minus the others**: the whole machine's busy time from `/proc/stat` (every
//!   core, softirq included) minus the load generator's own process time (from `wait4`, so it
//!   covers its whole life), the backend's process time, and the time of every other user
//!   process on the machine (this harness, and whatever else runs — another user's compiler),
//!   read per process from `/proc/PID/stat` at both ends of the window. Kernel threads are not
//!   subtracted: ksoftirqd runs the same network receive work as softirq when it is deferred,
//!   and kworkers run kernel work the traffic caused. What remains is the target's processes
//!   plus all kernel work charged to no user process, the target's share and the client's. (b) is therefore an upper bound and (a) a lower bound of the
//!   target's cost; the truth for a kernel-socket server is nearer (b), since most of that
//!   unattributed work exists only because the server holds the connections.
//!
//! A user process that exits before the window closes escapes the per-process subtraction
//! (reaped children's `cutime` is no help: it adds a child's whole life at the moment it is
//! reaped, most of which may lie before the window). The bench watches the idle machine before
//! every target and prints its unattributed rate, so such noise — a compiler running next to the
//! bench — is visible; run the bench on a quiet machine.

use std::collections::HashMap;
use std::time::Duration;

/// One process at one instant, as the accounting needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    pub pid: i32,
    /// With `pid`, identifies the process across PID reuse.
    pub starttime: u64,
    pub pgrp: i32,
    /// utime + stime (all threads; not reaped children), µs.
    pub cpu_us: u64,
}

/// CPU counters at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Whole-machine busy time (`/proc/stat` `cpu` line, all cores), µs.
    pub machine_busy_us: u64,
    /// The irq + softirq part of it, µs.
    pub machine_irq_us: u64,
    /// Every process alive at that instant.
    pub processes: Vec<ProcSample>,
}

/// What one window cost, in microseconds of CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    pub wall: Duration,
    pub machine_busy_us: u64,
    /// irq + softirq time on the machine (both cores). Informative: depending on the kernel's
    /// accounting it is also inside the processes' times (see [`Window::per_op`]).
    pub machine_irq_us: u64,
    /// The target's process group.
    pub target_us: u64,
    /// The backend's process group.
    pub backend_us: u64,
    /// Every other process, this harness included (not the load generator).
    pub others_us: u64,
    /// The load generator's user + system time over its whole life (wait4's rusage, children
    /// included). The window spans exactly that life: it opens just before the spawn and
    /// closes just after the reap.
    pub load_us: u64,
}

impl Window {
    /// Attributes the CPU used between two snapshots to the target group, the backend group
    /// and everyone else. A process's share is its counter at the end minus its counter at the
    /// start (zero at the start if it did not exist yet); processes gone by the end are left
    /// out, so their time in the window stays in (b) as noise.
    pub fn between(
        start: &Snapshot,
        end: &Snapshot,
        target_pgid: i32,
        backend_pgid: i32,
        wall: Duration,
        load_us: u64,
    ) -> Window {
        let before: HashMap<(i32, u64), u64> = start
            .processes
            .iter()
            .map(|p| ((p.pid, p.starttime), p.cpu_us))
            .collect();
        let mut w = Window {
            wall,
            machine_busy_us: end.machine_busy_us.saturating_sub(start.machine_busy_us),
            machine_irq_us: end.machine_irq_us.saturating_sub(start.machine_irq_us),
            load_us,
            ..Window::default()
        };
        for p in &end.processes {
            let delta = p
                .cpu_us
                .saturating_sub(before.get(&(p.pid, p.starttime)).copied().unwrap_or(0));
            if p.pgrp == target_pgid {
                w.target_us += delta;
            } else if p.pgrp == backend_pgid {
                w.backend_us += delta;
            } else {
                w.others_us += delta;
            }
        }
        w
    }

    /// Method (a): the target's own processes.
    pub fn server_a_us(&self) -> u64 {
        self.target_us
    }

    /// Method (b): machine busy time minus the load generator, the backend and every other
    /// process. Saturates at zero (tick rounding can make a nearly idle window come out
    /// negative).
    pub fn server_b_us(&self) -> u64 {
        self.machine_busy_us
            .saturating_sub(self.load_us)
            .saturating_sub(self.backend_us)
            .saturating_sub(self.others_us)
    }

    /// Busy time charged to no process: kernel softirq and kthread work, and processes that
    /// came and went inside the window. (b) − (a).
    pub fn unattributed_us(&self) -> u64 {
        self.server_b_us().saturating_sub(self.target_us)
    }

    /// Per-operation figures for `ops` operations (µs per op); `None` when no operation
    /// completed (a per-op figure of a window that did nothing would be meaningless).
    pub fn per_op(&self, ops: f64) -> Option<PerOp> {
        (ops > 0.0).then(|| PerOp {
            a_us: self.server_a_us() as f64 / ops,
            b_us: self.server_b_us() as f64 / ops,
            irq_us: self.machine_irq_us as f64 / ops,
        })
    }

    /// Unattributed busy time per second of wall time, in µs/s (1,000,000 = one core).
    pub fn unattributed_rate(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.unattributed_us() as f64 / secs
        } else {
            0.0
        }
    }
}

/// Server CPU per operation, both methods, µs, and the machine's interrupt time per operation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PerOp {
    pub a_us: f64,
    pub b_us: f64,
    /// All irq + softirq time on the machine (both directions, both cores) per operation. With
    /// CONFIG_IRQ_TIME_ACCOUNTING it is charged to no process and lands in (b); without it
    /// (tick-based accounting) a softirq served while a task runs is also charged to that
    /// task — to the load generator for most client → server receive work.
    pub irq_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: i32 = 100;
    const BACKEND: i32 = 200;

    fn p(pid: i32, starttime: u64, pgrp: i32, cpu_us: u64) -> ProcSample {
        ProcSample {
            pid,
            starttime,
            pgrp,
            cpu_us,
        }
    }

    fn snap(machine: u64, processes: Vec<ProcSample>) -> Snapshot {
        Snapshot {
            machine_busy_us: machine,
            machine_irq_us: machine / 10,
            processes,
        }
    }

    #[test]
    fn both_methods_from_two_snapshots() {
        let start = snap(
            1_000_000,
            vec![
                p(100, 1, TARGET, 50_000),
                p(101, 1, TARGET, 1_000),
                p(200, 1, BACKEND, 7_000),
                p(300, 1, 300, 2_000), // the harness
                p(400, 1, 400, 9_000), // someone's compiler, exits in the window
            ],
        );
        let end = snap(
            3_000_000,
            vec![
                p(100, 1, TARGET, 840_000),
                p(101, 1, TARGET, 11_000),
                p(200, 1, BACKEND, 57_000),
                p(300, 1, 300, 12_000),
                p(500, 7, 500, 30_000), // started in the window
            ],
        );
        let w = Window::between(
            &start,
            &end,
            TARGET,
            BACKEND,
            Duration::from_secs(2),
            900_000,
        );
        assert_eq!(w.machine_busy_us, 2_000_000);
        assert_eq!(w.server_a_us(), 800_000);
        assert_eq!(w.backend_us, 50_000);
        assert_eq!(w.others_us, 10_000 + 30_000);
        // 2,000,000 − 900,000 (load) − 50,000 (backend) − 40,000 (others)
        assert_eq!(w.server_b_us(), 1_010_000);
        assert_eq!(w.unattributed_us(), 210_000);
        assert_eq!(w.unattributed_rate(), 105_000.0);
        let per = w.per_op(1000.0).expect("ops > 0");
        assert_eq!(per.a_us, 800.0);
        assert_eq!(per.b_us, 1010.0);
        assert_eq!(per.irq_us, 200.0);
    }

    #[test]
    fn a_reused_pid_counts_from_zero() {
        // PID 100 exited and a new process got the same PID (different start time).
        let start = snap(0, vec![p(100, 1, 7, 500_000)]);
        let end = snap(100_000, vec![p(100, 9, TARGET, 20_000)]);
        let w = Window::between(&start, &end, TARGET, BACKEND, Duration::ZERO, 0);
        assert_eq!(w.target_us, 20_000);
        assert_eq!(w.others_us, 0);
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        // Tick rounding: the load generator's precise rusage can exceed the machine's coarse
        // busy delta in a short, nearly idle window.
        let w = Window::between(
            &snap(100, vec![]),
            &snap(110, vec![p(1, 1, TARGET, 20)]),
            TARGET,
            BACKEND,
            Duration::ZERO,
            50,
        );
        assert_eq!(w.server_b_us(), 0);
        assert_eq!(w.unattributed_us(), 0);
        assert_eq!(w.unattributed_rate(), 0.0);
        assert_eq!(w.per_op(0.0), None);
    }
}
