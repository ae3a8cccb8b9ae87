//! Who watches tern's threads, and what happens when one of them fails.
//!
//! The policy (docs/operations.md, "When a thread fails"): a thread that fails after start-up
//! never leaves a listening socket or an AF_XDP queue unserved. tern exits at once with
//! [`EXIT_THREAD_FAILED`] and the reason in the log, and the service manager restarts it
//! (systemd `Restart=on-failure`). Restarting one worker in place was rejected: a panic may
//! leave its connections, its io_uring's in-flight operations and (bypass) its UMEM frames and
//! its share of other workers' fill rings in an unknown state, while a new process starts from
//! a known one in well under a second.
//!
//! - A **panic** in any thread reaches the hook [`install_panic_hook`] installs: it writes the
//!   standard panic message to stderr, logs thread, reason and location at error level, and
//!   ends the process with `_exit(70)` from the panicking thread.
//! - A thread that **returns** — a worker's loop returning an error, or any thread ending
//!   without being asked to stop — is seen by the main thread, which watches every thread
//!   ([`watch`]) instead of joining them one by one: it logs the reason, stops the others
//!   (best effort, bounded by [`STOP_GRACE`]) and `server::run` returns [`ThreadFailed`], which
//!   `main` turns into exit status 70.
//!
//! Not here: starting the threads and releasing what start-up acquired (`server`), the
//! test-only fault hook that exercises all this (`fault`).

use std::any::Any;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bypass::BypassWorker;
use crate::server::Shutdown;

/// Exit status of a start-up failure (nothing was served, or what was started has been
/// released) and of any other error `tern run` reports.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of an invalid configuration (restarting does not help).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status when a thread failed after start-up (a panic, or a thread that ended with an
/// error): BSD `EX_SOFTWARE`, an internal software error.
pub const EXIT_THREAD_FAILED: u8 = 70;

/// How often the main thread looks at the threads it watches. A panic does not wait for this
/// (the hook exits from the panicking thread); a thread that returns is noticed this late.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// How long stopping waits for threads after a failure or a failed start-up; a thread still
/// running then is left to the process's exit, which releases everything it holds.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why `server::run` ended after start-up: a thread failed.
#[derive(Debug, thiserror::Error)]
#[error("thread {thread} failed: {reason}")]
pub struct ThreadFailed {
    pub thread: String,
    pub reason: String,
}

/// The exit status `tern run` ends with for `err`, an error returned by `server::run`.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<ThreadFailed>().is_some() {
        EXIT_THREAD_FAILED
    } else {
        EXIT_FAILURE
    }
}

/// Installs the process-wide panic hook: any panic, in any thread, ends tern with
/// [`EXIT_THREAD_FAILED`] after logging it. Call once, before starting threads.
///
/// Why `_exit` and not unwinding or `abort`: unwinding would end only the panicking thread,
/// leaving its sockets and queues unserved while the process looks alive. `abort` would dump
/// core, and tern's memory holds private keys and session ticket keys. `_exit` runs no atexit
/// handler and no destructor, so nothing in the process races the threads still running, and
/// everything tern holds is released by the kernel: listening and client sockets close (clients
/// get RST), AF_XDP sockets and the UMEM go, and XDP programs are detached because they are
/// attached through bpf links owned by file descriptors (`xdp`). The control socket's path is
/// left behind; the next start replaces a stale one.
pub fn install_panic_hook() {
    let standard = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        /// The first panicking thread exits; another that panics meanwhile waits for it.
        static EXITING: AtomicBool = AtomicBool::new(false);
        // The standard message (and a backtrace with RUST_BACKTRACE=1) first, straight to
        // stderr: it gets out even if the logger is what is broken.
        standard(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        tracing::error!(
            thread = name,
            reason = payload_text(info.payload()),
            location,
            exit_code = EXIT_THREAD_FAILED,
            "thread panicked; exiting so that the service manager restarts tern"
        );
        if EXITING.swap(true, Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
        // SAFETY: _exit(2) has no preconditions; it ends the process without running any
        // user-space clean-up, which is the point (see above).
        unsafe { libc::_exit(i32::from(EXIT_THREAD_FAILED)) }
    }));
}

/// The text of a panic payload (`panic!` with a literal or with a format string).
fn payload_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "<non-string panic payload>"
    }
}

/// What a watched thread runs.
pub enum Job {
    /// A kernel-mode worker (`tern-w<i>`).
    Kernel(JoinHandle<io::Result<()>>),
    /// A bypass worker (`tern-x<i>`).
    Bypass(BypassWorker),
    /// The signal thread; closing `handle` ends it.
    Signals {
        handle: signal_hook::iterator::Handle,
        thread: JoinHandle<()>,
    },
    /// The control thread. It blocks in `accept` and has no way to be told to stop, so
    /// stopping does not wait for it: the process's exit ends it.
    Control(JoinHandle<()>),
    /// The access log writer; it ends on its own once shutdown is asked for and every worker
    /// has ended, after writing what they logged (`access_log`).
    AccessLog(JoinHandle<()>),
    /// The metrics endpoint's thread (`metrics::serve`); it ends on `Shutdown::stop`.
    Metrics(JoinHandle<()>),
}

/// A thread the main thread watches.
pub struct Watched {
    /// For the log: the thread's name, and its interface for a bypass worker.
    pub name: String,
    pub job: Job,
}

impl Watched {
    pub fn new(name: impl Into<String>, job: Job) -> Watched {
        Watched {
            name: name.into(),
            job,
        }
    }

    fn is_finished(&self) -> bool {
        match &self.job {
            Job::Kernel(h) => h.is_finished(),
            Job::Bypass(w) => w.is_finished(),
            Job::Signals { thread, .. } => thread.is_finished(),
            Job::Control(h) | Job::Metrics(h) | Job::AccessLog(h) => h.is_finished(),
        }
    }

    /// A worker: tern runs as long as one does.
    fn is_worker(&self) -> bool {
        matches!(self.job, Job::Kernel(_) | Job::Bypass(_))
    }

    /// Tells the thread to stop after `shutdown.stop` was raised: ends a bypass worker's sleep
    /// so it sees the flag at once (kernel workers look at it at least every 100 ms on their
    /// own) and closes the signal thread's iterator.
    fn wake(&self) {
        match &self.job {
            Job::Bypass(w) => w.waker().wake(),
            Job::Signals { handle, .. } => handle.close(),
            // The metrics thread looks at the flag every `metrics::POLL_EVERY`.
            Job::Kernel(_) | Job::Control(_) | Job::AccessLog(_) | Job::Metrics(_) => {}
        }
    }

    /// Joins a finished thread: `Err` with the reason if it failed.
    fn join(self) -> Result<(), String> {
        match self.job {
            Job::Kernel(h) => match h.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(payload) => Err(format!("panicked: {}", payload_text(&*payload))),
            },
            Job::Bypass(w) => {
                let id = w.id();
                let exit = w.join().map_err(|e| e.to_string())?;
                if exit.quiesced {
                    tracing::debug!(worker = id, frames = ?exit.frames, "bypass worker stopped");
                } else {
                    tracing::warn!(
                        worker = id,
                        frames = ?exit.frames,
                        "bypass worker stopped with frames still in flight"
                    );
                }
                Ok(())
            }
            Job::Signals { thread: h, .. }
            | Job::Control(h)
            | Job::AccessLog(h)
            | Job::Metrics(h) => h
                .join()
                .map_err(|payload| format!("panicked: {}", payload_text(&*payload))),
        }
    }
}

/// Watches `threads` until every worker among them has ended after a shutdown request (returns
/// `Ok`), or until one thread fails (returns why; the others still run). A thread fails when
/// it ends with an error or a panic, or ends while `shutdown` asks for nothing. Finished
/// threads are joined and removed from `threads`.
pub fn watch(threads: &mut Vec<Watched>, shutdown: &Shutdown) -> Result<(), ThreadFailed> {
    watch_with(threads, shutdown, |_| Ok(()))
}

/// [`watch`], calling `tick` once per look at the threads: it may start threads of its own
/// (pushed to the list, watched from then on), and its error ends the watch like a failed
/// thread's (a binary upgrade's late start of the bypass workers, `server`).
pub fn watch_with(
    threads: &mut Vec<Watched>,
    shutdown: &Shutdown,
    mut tick: impl FnMut(&mut Vec<Watched>) -> Result<(), ThreadFailed>,
) -> Result<(), ThreadFailed> {
    // Whatever asked for the drain or the stop (a signal, a command), the service manager
    // hears it once, as soon as the flags say so.
    let mut told_stopping = false;
    loop {
        if !told_stopping
            && (shutdown.drain.load(Ordering::Relaxed) || shutdown.stop.load(Ordering::Relaxed))
        {
            crate::notify::stopping();
            told_stopping = true;
        }
        tick(threads)?;
        let mut i = 0;
        while i < threads.len() {
            if !threads[i].is_finished() {
                i += 1;
                continue;
            }
            let thread = threads.swap_remove(i);
            let name = thread.name.clone();
            let asked =
                shutdown.drain.load(Ordering::Relaxed) || shutdown.stop.load(Ordering::Relaxed);
            match thread.join() {
                Ok(()) if asked => tracing::debug!(thread = %name, "thread ended"),
                Ok(()) => {
                    return Err(ThreadFailed {
                        thread: name,
                        reason: "it ended without being asked to stop".into(),
                    })
                }
                Err(reason) => {
                    return Err(ThreadFailed {
                        thread: name,
                        reason,
                    })
                }
            }
        }
        if !threads.iter().any(Watched::is_worker) {
            return Ok(());
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

/// Stops every thread in `threads`: raises `shutdown.stop`, wakes the sleepers and joins what
/// ends within [`STOP_GRACE`], logging failures; the control thread is not waited for (see
/// [`Job::Control`]). Returns the names of the threads still running at the deadline, which
/// the process's exit will end.
pub fn stop_all(threads: Vec<Watched>, shutdown: &Shutdown) -> Vec<String> {
    shutdown.stop.store(true, Ordering::Relaxed);
    for t in &threads {
        t.wake();
    }
    let deadline = Instant::now() + STOP_GRACE;
    // Dropping the control thread's handle detaches it.
    let mut left: Vec<Watched> = threads
        .into_iter()
        .filter(|t| !matches!(t.job, Job::Control(_)))
        .collect();
    loop {
        let (done, running): (Vec<_>, Vec<_>) = left.into_iter().partition(Watched::is_finished);
        for t in done {
            let name = t.name.clone();
            if let Err(reason) = t.join() {
                tracing::error!(thread = %name, error = %reason, "thread failed while stopping");
            }
        }
        left = running;
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    left.into_iter().map(|t| t.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A kernel-worker-like thread: runs until `stop`, then ends with `Ok`.
    fn worker_until_stop(shutdown: &Arc<Shutdown>) -> Job {
        let shutdown = shutdown.clone();
        Job::Kernel(std::thread::spawn(move || {
            // Bounded: the test stops it well before.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !shutdown.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }))
    }

    #[test]
    fn a_worker_error_is_reported_and_the_others_are_stopped() {
        let shutdown = Arc::new(Shutdown::default());
        let mut threads = vec![
            Watched::new("w0", worker_until_stop(&shutdown)),
            Watched::new(
                "w1",
                Job::Kernel(std::thread::spawn(|| Err(io::Error::other("ring broke")))),
            ),
            Watched::new("w2", worker_until_stop(&shutdown)),
        ];
        let failed = watch(&mut threads, &shutdown).expect_err("w1 failed");
        assert_eq!(failed.thread, "w1");
        assert_eq!(failed.reason, "ring broke");
        assert_eq!(threads.len(), 2, "the others still run");
        assert!(stop_all(threads, &shutdown).is_empty(), "all stopped");
        assert!(shutdown.stop.load(Ordering::Relaxed));
    }

    #[test]
    fn a_panic_or_an_unasked_end_is_a_failure() {
        let shutdown = Arc::new(Shutdown::default());
        let mut threads = vec![Watched::new(
            "w0",
            Job::Kernel(std::thread::spawn(|| panic!("bad index"))),
        )];
        let failed = watch(&mut threads, &shutdown).expect_err("w0 panicked");
        assert_eq!(failed.reason, "panicked: bad index");

        let mut threads = vec![Watched::new(
            "w0",
            Job::Kernel(std::thread::spawn(|| Ok(()))),
        )];
        let failed = watch(&mut threads, &shutdown).expect_err("w0 ended unasked");
        assert!(failed.reason.contains("without being asked"), "{failed}");
    }

    #[test]
    fn a_shutdown_ends_the_watch_without_waiting_for_the_control_thread() {
        let shutdown = Arc::new(Shutdown::default());
        let (_keep, blocked) = std::sync::mpsc::channel::<()>();
        // Like the control thread: blocks until the process ends (here: until the test ends).
        let control = std::thread::spawn(move || {
            let _ = blocked.recv_timeout(Duration::from_secs(30));
        });
        let mut threads = vec![
            Watched::new("w0", worker_until_stop(&shutdown)),
            Watched::new("control", Job::Control(control)),
        ];
        shutdown.stop.store(true, Ordering::Relaxed);
        watch(&mut threads, &shutdown).expect("a clean stop");
        assert_eq!(threads.len(), 1, "only the control thread is left");
        // Still running, yet not among the threads left at the deadline: not waited for.
        assert!(stop_all(threads, &shutdown).is_empty());
    }
}
