//! The bypass workers: one pinned thread per worker that owns its part of the interface's
//! AF_XDP state ([`Xsk`]: a socket on every RX queue, the fill and completion rings of the queues
//! it owns, its range of the shared UMEM) and runs "frames in, frames out".
//!
//! Each turn takes back frames other workers returned, reaps and refills the queues the worker
//! owns, and on every socket hands up to [`BATCH`](crate::bypass::xsk::BATCH) received frames one by one
//! to the worker's [`FrameHandler`], whose [`Disposition`] recycles the frame or sends it back
//! out (rewritten in place); the handler may also build new frames through the [`TxQueue`].
//! tern's handler is the proxy over its own TCP stack ([`crate::bypass::proxy::Proxy`], TLS and plain);
//! this module also has [`Classifier`] (counts SYNs to a listener, other TCP, non-TCP, and
//! recycles: the I/O layer's tests) and [`Reflector`] (the I/O benchmark: swaps L2/L3/L4
//! addresses and sends the frame back).
//!
//! Cross-queue rule: the XDP program sends a flow's frames to
//! `XSKMAP[queue * workers + flow_hash % workers]`, and worker `w` has a socket on every queue,
//! registered at `xsk_slot(queue, w, workers)` ([`register_sockets`]). So whichever queue a
//! flow's frame arrives on (veth rehashes a flow to another queue after an RTO), it reaches the
//! flow's one worker. Packets never move between workers; only frame indices go home when a
//! frame that another worker's fill ring supplied is done with (see `xsk`).
//!
//! Adaptive polling: a worker busy-polls while frames flow. After the spin the polling policy
//! allows ([`spin::SpinPolicy`]: none while the gaps between bursts are longer than a sleep and
//! wake-up cost, at most that cost otherwise, never more than `xdp.idle_spin_us`) without a
//! frame (and with nothing left for the kernel to transmit and no returned frames to take back)
//! it sleeps in `poll(2)` on all its AF_XDP sockets plus its eventfd ([`Waker`]: other workers
//! handing it work, shutdown, and the handler's io_uring), at most [`SLEEP`] at a time so
//! it also sees the shutdown flags on its own. A wakeup that brings no frame puts it back to
//! sleep after one turn, so an idle worker costs one turn per [`SLEEP`] and nothing else.
//! Each turn's time (the one clock read per turn, end to end) is counted as work or spin, and
//! each sleep's wall time and thread CPU (`work_ns`, `spin_ns`, `sleep_ns`, `sleep_cpu_ns`).
//!
//! Shutdown: `Shutdown::stop` ends the loop at once. `Shutdown::drain` first asks the handler
//! to drain ([`FrameHandler::drain`]: no new connections, open ones finish) until it has
//! drained or `drain_timeout` passed; the workers of an interface keep turning until all of
//! them are done (they feed each other's queues), then end together. The handler's
//! [`FrameHandler::shutdown`] resets whatever is still open; the workers then wait together, briefly, until every transmission has
//! completed and every frame is home, and each returns a [`BypassExit`] with its frame
//! accounting.
//!
//! Not here: the rings and frames (`xsk`), the XDP program (`xdp`).

pub mod idle_pages;
pub mod mss;
pub mod proxy;
pub mod spin;
#[cfg(test)]
mod tests;
pub mod xdp;
pub mod xsk;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bypass::spin::SpinPolicy;
use crate::bypass::xdp::{XdpError, XdpProgram};
use crate::bypass::xsk::{
    BindMode, Disposition, FrameAccount, KernelStats, PageKind, RxFrame, TurnStats, TxQueue, Xsk,
    XskError,
};
use crate::config::{HugePages, SpinMode, XdpSettings};
use crate::server::Shutdown;

pub use crate::bypass::xsk::Waker;

/// Longest single sleep in `poll`: how late a worker may notice the shutdown flags when nobody
/// wakes it.
pub const SLEEP: Duration = Duration::from_millis(100);

/// At most one sleep in this time has its thread CPU measured (for `sleep_cpu_ns` and the
/// polling policy's sleep cost): at moderate rates a worker sleeps thousands of times a
/// second, and two clock syscalls per sleep were a quarter of its syscalls.
const CPU_SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// How long a stopping worker waits for its last transmissions to complete.
const QUIESCE: Duration = Duration::from_secs(1);

/// At most how often a worker reads the kernel's AF_XDP statistics (one `getsockopt` per
/// socket), while busy or before it sleeps.
pub const KERNEL_STATS_EVERY: Duration = Duration::from_millis(100);

/// What a bypass worker does with frames: the seam between the AF_XDP layer and the protocol
/// stack ("frames in, frames out").
///
/// The received frame is lent for the call only. Frames the handler allocates must be sent or
/// recycled before it returns: a UMEM frame kept across calls would be missing from its
/// worker's pool (debug builds panic when a `Frame` handle is dropped instead). Data that must
/// outlive the call is copied out.
pub trait FrameHandler {
    /// One received frame (an Ethernet frame, [`RxFrame::data`]). Return what to do with it;
    /// new frames go out through `out` ([`TxQueue::alloc`], [`TxQueue::send`]).
    fn frame(&mut self, frame: &mut RxFrame<'_>, out: &mut TxQueue<'_>) -> Disposition;

    /// Called once on the worker's thread before the loop starts: a handler with its own
    /// event source (an io_uring) registers the worker's eventfd so its events end the
    /// worker's sleep.
    fn attach_waker(&mut self, _waker: &Waker) {}

    /// The worker is about to sleep (nothing left to do this turn). A handler whose event
    /// source signals the waker only while the worker sleeps turns the signal on here, and
    /// returns false when an event arrived meanwhile (the worker then turns again).
    fn prepare_sleep(&mut self) -> bool {
        true
    }

    /// The worker's sleep ended (after a `prepare_sleep` that returned true).
    fn woke(&mut self) {}

    /// Whether [`poll`](Self::poll) has work now (frames were handled, timers are due, events
    /// arrived). Asked once per worker turn, so it must be cheap; `poll` is only called (and a
    /// TX queue only lent) when it says yes.
    fn wants_poll(&mut self) -> bool {
        false
    }

    /// Work not started by a received frame (timers, application I/O); frames go out through
    /// `out`. Returns whether it did anything (the worker then keeps busy-polling).
    fn poll(&mut self, _out: &mut TxQueue<'_>) -> bool {
        false
    }

    /// Whether the handler wakes the AF_XDP sockets for transmission itself
    /// ([`end_turn`](Self::end_turn)), e.g. batched into its own io_uring submission, instead
    /// of the worker calling `sendto` per socket per turn.
    fn takes_kicks(&self) -> bool {
        false
    }

    /// End of a worker turn (only for handlers that [take kicks](Self::takes_kicks)): `kicks`
    /// are the sockets whose TX rings wait for a wakeup. Returns how many wakeups it issued.
    fn end_turn(&mut self, _kicks: &[std::os::fd::RawFd]) -> u64 {
        0
    }

    /// The latest time the worker may sleep until although no frame arrives (`None`: no
    /// deadline of the handler's own).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// A drain began (SIGTERM): stop accepting new connections and finish the open ones by
    /// `deadline` (after which [`shutdown`](Self::shutdown) ends what is left).
    fn drain(&mut self, _deadline: Instant) {}

    /// During a drain: whether nothing is left open. Asked once per turn, so it must be cheap.
    fn drained(&mut self) -> bool {
        true
    }

    /// The worker is stopping: end what is open (frames still go out through `out`).
    fn shutdown(&mut self, _out: &mut TxQueue<'_>) {}
}

crate::counters::single_writer_counters! {
    /// One bypass worker's counters. Only the owning worker writes them.
    BypassCounters,
    /// A point-in-time copy of [`BypassCounters`].
    BypassSnapshot {
    /// Frames received from the AF_XDP RX rings.
    rx_frames,
    /// Frames written to the AF_XDP TX rings.
    tx_frames,
    /// TCP SYNs (without ACK) to a listener address (`Classifier`).
    syns,
    /// Other TCP segments (`Classifier`).
    other_tcp,
    /// Frames that are not a complete TCP segment (`Classifier`).
    non_tcp,
    /// Times a fill ring was found empty: the kernel had used every frame given to it, so
    /// frames arriving on that queue may have been dropped.
    fill_ring_empty,
    /// Frames that were to be sent but found the TX ring full (dropped).
    tx_ring_full,
    /// Frame allocations that found the worker's pool empty.
    tx_alloc_failed,
    /// Sends with an impossible length (a handler bug; dropped).
    tx_invalid,
    /// TX kicks (`sendto`) that failed with an unexpected error.
    tx_kick_errors,
    /// Syscalls made because a ring asked for one (`sendto` for TX, `recvfrom` for fill).
    wakeups,
    /// Frames of this worker's range that other workers sent home (received or completed
    /// there).
    returned,
    /// Times the worker slept in `poll` (idle).
    sleeps,
    /// Loop turns (each visits every socket once).
    busy_turns,
    /// Nanoseconds of turns that did work (received frames, or the handler worked: completions,
    /// timers, the stack's news), by the loop's one clock read per turn: wall time, which is
    /// the worker's CPU time unless it was preempted.
    work_ns,
    /// Nanoseconds of turns that found nothing: busy-polling after the last frame, and the one
    /// turn after a wake-up that brought no work.
    spin_ns,
    /// Nanoseconds asleep in `poll` (wall time, from before the call to after its return).
    sleep_ns,
    /// Thread CPU nanoseconds spent in those `poll` calls: what sleeping and waking cost the
    /// worker (the adaptive polling policy weighs spinning against it). Measured around at
    /// most one sleep per 5 ms; the others add the measured mean.
    sleep_cpu_ns,
    /// 1 if this worker's UMEM fell back to 4 KiB pages under `hugepages = "auto"`.
    hugepage_fallback,
    /// Gauge: UMEM frames on the free list (updated every turn).
    frames_free,
    /// Gauge: UMEM frames lent to the kernel for receiving.
    frames_fill,
    /// Gauge: UMEM frames held by the worker.
    frames_held,
    /// Gauge: UMEM frames lent to the kernel for sending.
    frames_tx,
    /// Gauge, from the kernel's `XDP_STATISTICS` (summed over the worker's sockets, refreshed
    /// at most every [`KERNEL_STATS_EVERY`]): frames the kernel dropped because the RX ring was
    /// full (the worker fell behind).
    kernel_rx_ring_full,
    /// Gauge, as above: frames the kernel dropped for other reasons, mostly an empty fill ring.
    kernel_rx_dropped,
    /// Gauge, as above: times the kernel found a fill ring empty.
    kernel_fill_ring_empty,
    }
}

impl BypassCounters {
    /// Adds a turn's counts (only the non-zero ones: an idle turn costs no stores).
    fn add_turn(&self, t: &TurnStats) {
        for (stat, n) in [
            (&self.rx_frames, t.rx),
            (&self.tx_frames, t.tx),
            (&self.tx_ring_full, t.tx_ring_full),
            (&self.tx_invalid, t.tx_invalid),
            (&self.tx_alloc_failed, t.alloc_failed),
            (&self.fill_ring_empty, t.fill_ran_dry),
            (&self.wakeups, t.wakeups),
            (&self.tx_kick_errors, t.kick_errors),
            (&self.returned, t.returned),
        ] {
            if n != 0 {
                stat.add(n);
            }
        }
    }

    fn set_kernel(&self, k: &KernelStats) {
        self.kernel_rx_ring_full.set(k.rx_ring_full);
        self.kernel_rx_dropped.set(k.rx_dropped);
        self.kernel_fill_ring_empty.set(k.rx_fill_ring_empty_descs);
    }

    fn set_frames(&self, a: &FrameAccount) {
        self.frames_free.set(u64::from(a.free));
        self.frames_fill.set(u64::from(a.fill));
        self.frames_held.set(u64::from(a.held));
        self.frames_tx.set(u64::from(a.tx));
    }
}

/// Why the bypass workers could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum BypassError {
    #[error("bypass workers: {0}")]
    Xsk(#[from] XskError),
    #[error("bypass workers: {0}")]
    Xdp(#[from] XdpError),
    #[error("bypass worker {worker}: {what}: {source}")]
    Io {
        worker: usize,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("bypass worker {worker} exited during start-up")]
    Exited { worker: usize },
    #[error("bypass worker {worker} panicked")]
    Panicked { worker: usize },
    /// The test-only fault hook ([`crate::fault`]).
    #[error("bypass worker: {0}")]
    Injected(#[from] crate::fault::Injected),
}

/// The bypass workers of one interface.
#[derive(Debug, Clone)]
pub struct BypassSetup {
    /// The interface (a name in the calling thread's network namespace; worker threads are
    /// created in that namespace too).
    pub interface: String,
    /// RX queues to bind, `0..queues` ([`crate::bypass::xsk::rx_queue_count`]).
    pub queues: u32,
    /// Number of workers (`workers.count`).
    pub workers: usize,
    /// `workers.cpus` (may be empty): worker `i` is pinned by [`worker_cpu`].
    pub cpus: Vec<usize>,
    pub settings: XdpSettings,
    /// Workers end when `stop` is set ([`stop`] also wakes them), or once `drain` is set and
    /// every worker's handler has drained or `drain_timeout` has passed.
    pub shutdown: Arc<Shutdown>,
    /// How long a drain may take (`timeouts.drain_ms`).
    pub drain_timeout: Duration,
}

/// What a worker reports when it ends.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BypassExit {
    pub worker: usize,
    /// Where the worker's UMEM frames were at the end (after the workers quiesced together).
    pub frames: FrameAccount,
    /// Whether every transmission completed and every frame went home before the worker gave
    /// up waiting.
    pub quiesced: bool,
    /// Frames received per RX queue (one socket per queue).
    pub rx_per_queue: Vec<u64>,
    /// CPU time the worker thread used (user + system).
    pub cpu_time: Duration,
    /// The kernel's AF_XDP statistics for the worker's sockets (if they could be read).
    pub kernel: Option<KernelStats>,
    pub bind_mode: BindMode,
    pub page_kind: PageKind,
}

/// A started bypass worker.
#[derive(Debug)]
pub struct BypassWorker {
    id: usize,
    tid: i32,
    waker: Waker,
    bind_mode: BindMode,
    page_kind: PageKind,
    counters: Arc<BypassCounters>,
    join: JoinHandle<Result<BypassExit, BypassError>>,
}

impl BypassWorker {
    pub fn id(&self) -> usize {
        self.id
    }

    /// The worker thread's Linux thread id (for `/proc/self/task/<tid>`).
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Wakes the worker if it sleeps (shutdown; later the io_uring's completions).
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    pub fn bind_mode(&self) -> BindMode {
        self.bind_mode
    }

    pub fn page_kind(&self) -> PageKind {
        self.page_kind
    }

    pub fn counters(&self) -> &Arc<BypassCounters> {
        &self.counters
    }

    /// Whether the worker's thread has ended ([`join`](Self::join) will not block).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Waits for the worker to end (after the shutdown flag; see [`stop`]).
    pub fn join(self) -> Result<BypassExit, BypassError> {
        let worker = self.id;
        self.join
            .join()
            .unwrap_or(Err(BypassError::Panicked { worker }))
    }
}

/// The CPU for worker `index`: `cpus[index]` if configured, else the `index`-th CPU this
/// process may run on (wrapping) — the same rule as the kernel-mode workers.
pub fn worker_cpu(cpus: &[usize], index: usize) -> Option<usize> {
    if let Some(&cpu) = cpus.get(index) {
        return Some(cpu);
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    cores.get(index % cores.len().max(1)).map(|core| core.id)
}

/// Starts the bypass workers of one interface: maps the UMEM and binds one socket per (queue,
/// worker) ([`crate::bypass::xsk::open`]), fills the fill rings, registers every socket in `program`'s
/// XSKMAP and sets its worker count ([`register_sockets`]; steering starts here), then spawns
/// one pinned thread per worker (`tern-x<i>`) with the handler `make(i, counters)`.
///
/// On error nothing is left running (threads already started are stopped and joined, sockets
/// closed, which also empties their XSKMAP slots).
pub fn start<H, F>(
    setup: &BypassSetup,
    program: &XdpProgram,
    mut make: F,
) -> Result<Vec<BypassWorker>, BypassError>
where
    H: FrameHandler + Send + 'static,
    F: FnMut(usize, Arc<BypassCounters>) -> H,
{
    start_with(setup, program, |id, counters| {
        let handler = make(id, counters);
        move || Ok(handler)
    })
}

/// [`start`] for handlers that must be built on their worker's own thread (an io_uring set up
/// single-issuer belongs to the thread that creates it): `make(i, counters)` returns a builder
/// that runs on worker `i`'s thread, after pinning; if it fails, start-up fails with its error.
pub fn start_with<H, F, M>(
    setup: &BypassSetup,
    program: &XdpProgram,
    mut make: F,
) -> Result<Vec<BypassWorker>, BypassError>
where
    H: FrameHandler + 'static,
    M: FnOnce() -> io::Result<H> + Send + 'static,
    F: FnMut(usize, Arc<BypassCounters>) -> M,
{
    let mut xsks = crate::bypass::xsk::open(
        &setup.interface,
        setup.queues,
        setup.workers as u32,
        &setup.settings,
    )?;
    for xsk in &mut xsks {
        // Frames may arrive as soon as the sockets are registered: have buffers waiting.
        xsk.turn(&mut TurnStats::default(), |_, _| Disposition::Recycle);
    }
    register_sockets(program, &xsks)?;
    let mut workers: Vec<BypassWorker> = Vec::with_capacity(xsks.len());
    let drain = Arc::new(DrainBarrier {
        workers: xsks.len(),
        done: AtomicUsize::new(0),
    });
    for xsk in xsks {
        let id = xsk.worker();
        let counters = Arc::new(BypassCounters::default());
        let build = make(id, counters.clone());
        let spawned = spawn(
            xsk,
            WorkerConfig {
                cpu: worker_cpu(&setup.cpus, id),
                idle_spin: setup.settings.idle_spin,
                spin: setup.settings.spin,
                hugepages: setup.settings.hugepages,
                counters,
                shutdown: setup.shutdown.clone(),
                drain_timeout: setup.drain_timeout,
                drain: drain.clone(),
            },
            build,
        );
        match spawned {
            Ok(worker) => workers.push(worker),
            Err(err) => {
                stop(&setup.shutdown, &workers);
                for worker in workers {
                    let _ = worker.join();
                }
                return Err(err);
            }
        }
    }
    tracing::info!(
        interface = %setup.interface,
        queues = setup.queues,
        workers = setup.workers,
        mode = %workers[0].bind_mode(),
        pages = ?workers[0].page_kind(),
        "bypass workers running"
    );
    Ok(workers)
}

/// Registers every socket of `xsks` (all workers of one interface, in worker order) in the
/// program's XSKMAP at `xsk_slot(queue, worker, workers)`, then sets the program's worker
/// count, which turns steering on.
pub fn register_sockets(program: &XdpProgram, xsks: &[Xsk]) -> Result<(), XdpError> {
    let count = xsks.len() as u32;
    for xsk in xsks {
        for (queue, fd) in xsk.sockets() {
            program
                .register_socket(tern_common::xsk_slot(queue, xsk.worker() as u32, count), fd)?;
        }
    }
    program.set_workers(count)
}

/// Sets the stop flag and wakes every worker so none waits out its sleep.
pub fn stop(shutdown: &Shutdown, workers: &[BypassWorker]) {
    shutdown.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.waker.wake();
    }
}

/// A worker's own settings, besides its `Xsk` and handler.
struct WorkerConfig {
    cpu: Option<usize>,
    idle_spin: Duration,
    spin: SpinMode,
    hugepages: HugePages,
    counters: Arc<BypassCounters>,
    shutdown: Arc<Shutdown>,
    drain_timeout: Duration,
    drain: Arc<DrainBarrier>,
}

/// The workers of one interface end a drain together: each keeps turning (its fill rings feed
/// the queues every worker receives on, and frames of its UMEM range come home to it) until
/// all have drained.
struct DrainBarrier {
    workers: usize,
    /// Workers whose handler has drained (or whose drain deadline passed).
    done: AtomicUsize,
}

/// Spawns the thread of one worker; returns once it runs (pinned, its handler built).
fn spawn<H, M>(xsk: Xsk, config: WorkerConfig, build: M) -> Result<BypassWorker, BypassError>
where
    H: FrameHandler + 'static,
    M: FnOnce() -> io::Result<H> + Send + 'static,
{
    let worker = xsk.worker();
    let waker = xsk.waker();
    let bind_mode = xsk.bind_mode();
    let page_kind = xsk.page_kind();
    let counters = config.counters.clone();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let join = std::thread::Builder::new()
        .name(format!("tern-x{worker}"))
        .spawn(move || {
            if let Some(cpu) = config.cpu {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    tracing::warn!(worker, cpu, "could not pin bypass worker to its CPU");
                }
            }
            let handler = match build() {
                Ok(h) => h,
                Err(source) => {
                    let _ = ready_tx.send(Err(source));
                    return Err(BypassError::Exited { worker });
                }
            };
            // SAFETY: gettid has no preconditions.
            let _ = ready_tx.send(Ok(unsafe { libc::gettid() }));
            Loop::new(xsk, handler, config).run()
        })
        .map_err(|source| BypassError::Io {
            worker,
            what: "spawning the thread",
            source,
        })?;
    match ready_rx.recv() {
        Ok(Err(source)) => {
            let _ = join.join();
            Err(BypassError::Io {
                worker,
                what: "setting up the frame handler",
                source,
            })
        }
        Ok(Ok(tid)) => Ok(BypassWorker {
            id: worker,
            tid,
            waker,
            bind_mode,
            page_kind,
            counters,
            join,
        }),
        Err(_) => Err(match join.join() {
            Err(_) => BypassError::Panicked { worker },
            Ok(_) => BypassError::Exited { worker },
        }),
    }
}

struct Loop<H> {
    id: usize,
    xsk: Xsk,
    handler: H,
    counters: Arc<BypassCounters>,
    shutdown: Arc<Shutdown>,
    /// When to stop busy-polling after the last frame (`xdp.idle_spin_us`, `xdp.spin`).
    policy: SpinPolicy,
    drain_timeout: Duration,
    drain: Arc<DrainBarrier>,
    /// The drain deadline, once a drain began.
    draining: Option<Instant>,
    /// This worker has counted itself in `drain.done`.
    drain_reported: bool,
    /// When a sleep's thread CPU was last measured ([`CPU_SAMPLE_EVERY`]).
    last_cpu_sample: Instant,
}

impl<H: FrameHandler> Loop<H> {
    fn new(mut xsk: Xsk, mut handler: H, config: WorkerConfig) -> Loop<H> {
        handler.attach_waker(&xsk.waker());
        xsk.set_deferred_kicks(handler.takes_kicks());
        let fallback = config.hugepages == HugePages::Auto && xsk.page_kind() == PageKind::Small;
        config.counters.hugepage_fallback.set(u64::from(fallback));
        config.counters.set_frames(&xsk.frames_accounted());
        Loop {
            id: xsk.worker(),
            xsk,
            handler,
            counters: config.counters,
            shutdown: config.shutdown,
            policy: SpinPolicy::new(config.spin, config.idle_spin),
            drain_timeout: config.drain_timeout,
            drain: config.drain,
            draining: None,
            drain_reported: false,
            // The first sleep is measured.
            last_cpu_sample: Instant::now()
                .checked_sub(CPU_SAMPLE_EVERY)
                .unwrap_or_else(Instant::now),
        }
    }

    fn run(mut self) -> Result<BypassExit, BypassError> {
        let mut pollfds: Vec<libc::pollfd> = self
            .xsk
            .sockets()
            .map(|(_, fd)| fd.as_raw_fd())
            .chain(std::iter::once(self.xsk.waker().as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut last_frame = Instant::now();
        let mut last_kernel_stats = last_frame;
        // The end of the previous turn (or of the last sleep): where this turn's time starts.
        let mut turn_start = last_frame;
        // A turn found nothing since the last one that did work: the next one that does ends
        // a quiet gap, which the polling policy learns from.
        let mut quiet = false;
        let deferred_kicks = self.handler.takes_kicks();
        let tx = self.xsk.tx_index();
        let mut kicks = Vec::with_capacity(pollfds.len());
        loop {
            if self.shutdown.stop.load(Ordering::Relaxed) || self.drain_over() {
                break;
            }
            crate::fault::check(crate::fault::Site::BypassWorker(self.id))?;
            let mut stats = TurnStats::default();
            let handler = &mut self.handler;
            let received = self
                .xsk
                .turn(&mut stats, |frame, out| handler.frame(frame, out));
            let worked =
                handler.wants_poll() && self.xsk.send_with(tx, &mut stats, |out| handler.poll(out));
            if deferred_kicks {
                kicks.clear();
                kicks.extend(self.xsk.kicks_wanted());
                stats.wakeups += handler.end_turn(&kicks);
            }
            self.counters.busy_turns.inc();
            self.counters.add_turn(&stats);
            let now = Instant::now();
            let active = received > 0 || worked;
            let turn_ns = now.saturating_duration_since(turn_start).as_nanos() as u64;
            if active {
                self.counters.work_ns.add(turn_ns);
                if quiet {
                    quiet = false;
                    self.policy
                        .arrived_after(turn_start.saturating_duration_since(last_frame));
                }
            } else {
                self.counters.spin_ns.add(turn_ns);
                quiet = true;
            }
            turn_start = now;
            let spinning = !active
                && (now.duration_since(last_frame) < self.policy.spin_for() || self.xsk.busy());
            if !spinning {
                // Busy or about to sleep (an idle worker wakes at least every SLEEP), at most
                // every KERNEL_STATS_EVERY: one getsockopt per socket, never per frame.
                self.counters.set_frames(&self.xsk.frames_accounted());
                if now.duration_since(last_kernel_stats) >= KERNEL_STATS_EVERY {
                    self.publish_kernel_stats();
                    last_kernel_stats = now;
                }
            }
            if active {
                last_frame = now;
                continue;
            }
            if spinning {
                std::hint::spin_loop();
                continue;
            }
            turn_start = self.sleep(&mut pollfds, now)?;
        }
        let mut stats = TurnStats::default();
        let handler = &mut self.handler;
        self.xsk
            .send_with(self.xsk.tx_index(), &mut stats, |out| handler.shutdown(out));
        self.counters.add_turn(&stats);
        Ok(self.exit())
    }

    /// Starts the drain when the flag is first seen; true once every worker of the interface
    /// has drained (or passed its deadline).
    fn drain_over(&mut self) -> bool {
        let deadline = match self.draining {
            Some(deadline) => deadline,
            None if self.shutdown.drain.load(Ordering::Relaxed) => {
                let deadline = Instant::now() + self.drain_timeout;
                self.draining = Some(deadline);
                self.handler.drain(deadline);
                tracing::debug!(worker = self.id, "bypass worker draining");
                deadline
            }
            None => return false,
        };
        if !self.drain_reported && (self.handler.drained() || Instant::now() >= deadline) {
            self.drain_reported = true;
            self.drain.done.fetch_add(1, Ordering::AcqRel);
        }
        self.drain.done.load(Ordering::Acquire) >= self.drain.workers
    }

    fn publish_kernel_stats(&self) {
        // A socket whose statistics cannot be read keeps the last published figures.
        if let Ok(k) = self.xsk.kernel_stats() {
            self.counters.set_kernel(&k);
        }
    }

    /// Sleeps in `poll` until a socket has frames, the waker fires or [`SLEEP`] passes;
    /// `now` is the end of the last turn. Returns when the sleep ended (`now` if it did not
    /// sleep), having counted its wall time and thread CPU and told the polling policy.
    fn sleep(
        &mut self,
        pollfds: &mut [libc::pollfd],
        now: Instant,
    ) -> Result<Instant, BypassError> {
        if !self.xsk.prepare_sleep() {
            return Ok(now);
        }
        if !self.handler.prepare_sleep() {
            self.xsk.woke(false);
            return Ok(now);
        }
        self.counters.sleeps.inc();
        // What a sleep round costs this thread: two CLOCK_THREAD_CPUTIME_ID reads (syscalls,
        // not vDSO), so only around one sleep per CPU_SAMPLE_EVERY; the others are counted at
        // the measured mean.
        let sample = now.saturating_duration_since(self.last_cpu_sample) >= CPU_SAMPLE_EVERY;
        let cpu_before = if sample {
            self.last_cpu_sample = now;
            thread_cpu_now()
        } else {
            Duration::ZERO
        };
        let mut timeout = SLEEP;
        if let Some(deadline) = self.handler.next_deadline() {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        // Round up: waking a little late is fine, spinning on a sub-millisecond rest is not.
        let timeout_ms = timeout.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: `pollfds` is a valid array of initialised pollfd of the given length, whose
        // fds stay open (owned by `xsk`) for the call.
        let rc = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        // The eventfd is the last pollfd; it is read (emptied) only when it fired.
        let signalled = pollfds
            .last()
            .is_some_and(|p| p.revents & libc::POLLIN != 0);
        self.xsk.woke(signalled);
        self.handler.woke();
        let cpu = if sample {
            let cpu = thread_cpu_now().saturating_sub(cpu_before);
            self.policy.slept(cpu);
            cpu
        } else {
            self.policy.sleep_cost()
        };
        let woke = Instant::now();
        self.counters
            .sleep_ns
            .add(woke.saturating_duration_since(now).as_nanos() as u64);
        self.counters.sleep_cpu_ns.add(cpu.as_nanos() as u64);
        match err {
            Some(err) if err.raw_os_error() != Some(libc::EINTR) => Err(BypassError::Io {
                worker: self.id,
                what: "poll",
                source: err,
            }),
            _ => Ok(woke),
        }
    }

    fn exit(mut self) -> BypassExit {
        self.xsk.set_deferred_kicks(false);
        let quiesced = self.xsk.quiesce(QUIESCE);
        let frames = self.xsk.frames_accounted();
        self.counters.set_frames(&frames);
        self.publish_kernel_stats();
        if !quiesced {
            tracing::warn!(worker = self.id, ?frames, "frames still in flight at exit");
        }
        BypassExit {
            worker: self.id,
            frames,
            quiesced,
            rx_per_queue: self.xsk.rx_per_queue(),
            cpu_time: thread_cpu_time(),
            kernel: self.xsk.kernel_stats().ok(),
            bind_mode: self.xsk.bind_mode(),
            page_kind: self.xsk.page_kind(),
        }
    }
}

/// The calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`, ns resolution); zero if it
/// cannot be read.
fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// User + system CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    // SAFETY: all-zero is a valid rusage, filled in by getrusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a pointer to a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Handlers and the little header parsing they need. The full packet views (`wire`) come with
// the TCP stack; these read only fixed offsets after bounds checks.

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Where the network and transport headers of a frame start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Headers {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the transport header (it may be incomplete: check before reading).
    l4: usize,
    v6: bool,
    /// IPv4 protocol or IPv6 next header.
    proto: u8,
    /// An IPv4 fragment (MF set or offset != 0): no transport header to trust.
    fragment: bool,
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Parses Ethernet (one 802.1Q/802.1ad tag) and the IPv4 / IPv6 fixed header, like the XDP
/// program. `None` for anything else or anything cut short.
fn headers(frame: &[u8]) -> Option<Headers> {
    if frame.len() < ETH_HEADER {
        return None;
    }
    let mut l3 = ETH_HEADER;
    let mut ethertype = be16(frame, 12);
    if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        if frame.len() < ETH_HEADER + 4 {
            return None;
        }
        ethertype = be16(frame, 16);
        l3 += 4;
    }
    match ethertype {
        ETHERTYPE_IPV4 => {
            let first = *frame.get(l3)?;
            let ihl = usize::from(first & 0x0f) * 4;
            if first >> 4 != 4 || ihl < 20 || frame.len() < l3 + ihl {
                return None;
            }
            Some(Headers {
                l3,
                l4: l3 + ihl,
                v6: false,
                proto: frame[l3 + 9],
                fragment: be16(frame, l3 + 6) & 0x3fff != 0,
            })
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < l3 + 40 || frame[l3] >> 4 != 6 {
                return None;
            }
            Some(Headers {
                l3,
                l4: l3 + 40,
                v6: true,
                proto: frame[l3 + 6],
                fragment: false,
            })
        }
        _ => None,
    }
}

/// The three kinds of frame the [`Classifier`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A SYN (no ACK) to a listener's address and port: a connection attempt.
    ListenerSyn,
    /// Any other complete TCP segment.
    OtherTcp,
    /// Not a complete, unfragmented TCP segment.
    NonTcp,
}

fn classify(frame: &[u8], listeners: &[SocketAddr]) -> Class {
    let Some(h) = headers(frame) else {
        return Class::NonTcp;
    };
    if h.proto != IPPROTO_TCP || h.fragment || frame.len() < h.l4 + 20 {
        return Class::NonTcp;
    }
    if frame[h.l4 + 13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Class::OtherTcp;
    }
    let port = be16(frame, h.l4 + 2);
    let dst: IpAddr = if h.v6 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&frame[h.l3 + 24..h.l3 + 40]);
        a.into()
    } else {
        let mut a = [0u8; 4];
        a.copy_from_slice(&frame[h.l3 + 16..h.l3 + 20]);
        a.into()
    };
    let matches = |l: &SocketAddr| {
        l.port() == port
            && (l.ip() == dst || (l.ip().is_unspecified() && l.is_ipv6() == dst.is_ipv6()))
    };
    if listeners.iter().any(matches) {
        Class::ListenerSyn
    } else {
        Class::OtherTcp
    }
}

/// A handler that counts what arrives (SYNs to a listener, other TCP, non-TCP: the `syns`,
/// `other_tcp`, `non_tcp` counters, which only it fills) and recycles every frame. The I/O
/// layer's tests use it.
pub struct Classifier {
    listeners: Vec<SocketAddr>,
    counters: Arc<BypassCounters>,
}

impl Classifier {
    /// Counts into `counters` (the worker's own, so there is still one writer).
    pub fn new(listeners: Vec<SocketAddr>, counters: Arc<BypassCounters>) -> Classifier {
        Classifier {
            listeners,
            counters,
        }
    }
}

impl FrameHandler for Classifier {
    fn frame(&mut self, frame: &mut RxFrame<'_>, _out: &mut TxQueue<'_>) -> Disposition {
        match classify(frame.data(), &self.listeners) {
            Class::ListenerSyn => self.counters.syns.inc(),
            Class::OtherTcp => self.counters.other_tcp.inc(),
            Class::NonTcp => self.counters.non_tcp.inc(),
        }
        Disposition::Recycle
    }
}

/// Swaps source and destination at L2 (MAC), L3 (IPv4/IPv6 address) and L4 (TCP/UDP port) in
/// place. Checksums stay valid: the IPv4 header checksum and the TCP/UDP pseudo-header sum are
/// sums of 16-bit words, which a swap does not change. Returns false (frame untouched) for
/// frames that are not IP.
fn reflect(frame: &mut [u8]) -> bool {
    let Some(h) = headers(frame) else {
        return false;
    };
    let (dst_mac, rest) = frame.split_at_mut(6);
    dst_mac.swap_with_slice(&mut rest[..6]);
    let (src, len) = if h.v6 { (h.l3 + 8, 16) } else { (h.l3 + 12, 4) };
    let (a, b) = frame[src..src + 2 * len].split_at_mut(len);
    a.swap_with_slice(b);
    if (h.proto == IPPROTO_TCP || h.proto == IPPROTO_UDP) && !h.fragment && frame.len() >= h.l4 + 4
    {
        let (a, b) = frame[h.l4..h.l4 + 4].split_at_mut(2);
        a.swap_with_slice(b);
    }
    true
}

/// How the [`Reflector`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReflectMode {
    /// Rewrite the received frame and send it back: zero copy within the UMEM.
    InPlace,
    /// Copy into a freshly allocated frame, send that and recycle the received one: what a
    /// stack that builds its replies costs.
    Copy,
}

/// The benchmark handler: sends every IP frame back where it came from, addresses swapped.
/// Non-IP frames are recycled.
pub struct Reflector {
    mode: ReflectMode,
}

impl Reflector {
    pub fn new(mode: ReflectMode) -> Reflector {
        Reflector { mode }
    }
}

impl FrameHandler for Reflector {
    fn frame(&mut self, frame: &mut RxFrame<'_>, out: &mut TxQueue<'_>) -> Disposition {
        let len = frame.data().len();
        match self.mode {
            ReflectMode::InPlace => {
                if reflect(frame.data_mut()) {
                    Disposition::Transmit { len }
                } else {
                    Disposition::Recycle
                }
            }
            ReflectMode::Copy => {
                let Some(mut copy) = out.alloc() else {
                    return Disposition::Recycle;
                };
                let buf = out.buffer(&mut copy);
                buf[..len].copy_from_slice(frame.data());
                if reflect(&mut buf[..len]) {
                    out.send(copy, len);
                } else {
                    out.recycle(copy);
                }
                Disposition::Recycle
            }
        }
    }
}
