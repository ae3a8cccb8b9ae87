//! AF_XDP for the bypass path: the UMEM of one interface, one socket per (RX queue, worker)
//! pair, and the frames moving between the workers, their sockets and the kernel.
//!
//! **Layout.** The kernel keeps one buffer pool — one UMEM, one fill ring, one completion ring —
//! per (device, queue): a second UMEM on a queue is refused with `EBUSY` (`xp_assign_dev`), and a
//! second socket on a queue must share the first one's UMEM *and* its fill and completion rings
//! (`XDP_SHARED_UMEM` with the same queue; Documentation/networking/af_xdp.rst). So the workers
//! of an interface share one UMEM, mapped once ([`open`]) and cut into one range of
//! `frames_per_worker` frames per worker — each frame's **home**. Worker `w` has a socket on
//! every queue `q` (registered in the XSKMAP at `xsk_slot(q, w, workers)`), and each queue's
//! fill and completion rings belong to one worker, the queue's **owner** `q % workers`, which
//! alone produces to that fill ring (from its own range) and consumes that completion ring.
//!
//! **Frames crossing workers.** A flow's frames reach the flow's worker on whatever queue they
//! arrive (the XDP program picks `XSKMAP[q * workers + flow_hash % workers]`), so a worker often
//! receives frames that the queue's owner put on the fill ring, and its transmissions complete
//! on the completion ring of the queue it sent on. Such a frame goes home through a lock-free
//! ring of frame indices for that pair of workers (`handoff`); only indices cross, never packet
//! bytes, and a worker that gives another work (returns, or transmissions completing on its ring)
//! wakes it if it sleeps ([`Waker`]). `frames` holds the ownership rules.
//!
//! **Binding.** The first socket registers the UMEM (`XDP_UMEM_REG`) and binds to queue 0 with
//! `XDP_USE_NEED_WAKEUP` and no mode flag: the kernel tries zero-copy and falls back to copy
//! mode by itself (veth has no zero-copy); `XDP_OPTIONS` tells which one took ([`BindMode`]).
//! The first socket of every other queue binds with `XDP_SHARED_UMEM` to the UMEM socket and
//! brings that queue's fill and completion rings; the other workers' sockets on a queue bind with
//! `XDP_SHARED_UMEM` to that queue's first socket and bring only RX and TX rings. Shared binds
//! carry no other flag (the kernel refuses them and gives the first socket's mode and wakeup
//! setting).
//!
//! **A turn** ([`Xsk::turn`]) takes back returned frames, reaps and refills the queues the
//! worker owns, receives up to [`BATCH`] frames per socket and hands each to the caller with a
//! [`TxQueue`] for frames going out, then writes the outgoing batch and kicks TX only if the
//! ring asks.
//!
//! Not here: the XDP program and its XSKMAP (`xdp`), the worker loop, sleeping and counters
//! (`bypass`).

mod frames;
mod handoff;
mod socket;
#[cfg(test)]
mod tests;
mod umem;

use std::ffi::CString;
use std::fmt;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdpilone::{IfInfo, Socket, SocketConfig, Umem, UmemConfig};

use crate::config::XdpSettings;
use frames::{FramePool, Ledger};
use socket::{errno, QueueRings, SocketRings};

pub use frames::{Frame, FrameAccount, FrameState};
pub use socket::BATCH;
pub use umem::{PageKind, UmemError, HUGE_PAGE};

/// Numbers the UMEMs of this process, so a `Frame` of one is never used with another.
static NEXT_UMEM: AtomicU32 = AtomicU32::new(1);

/// How the sockets were bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BindMode {
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies between its buffers and the UMEM (veth, generic XDP).
    Copy,
}

impl fmt::Display for BindMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindMode::ZeroCopy => "zero-copy",
            BindMode::Copy => "copy",
        })
    }
}

/// Why the AF_XDP sockets could not be set up. Every variant names the interface.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("AF_XDP on {interface}: no such interface")]
    UnknownInterface { interface: String },
    #[error("AF_XDP on {interface}: {source}")]
    Umem {
        interface: String,
        #[source]
        source: UmemError,
    },
    #[error("AF_XDP on {interface}: {step}: {source}")]
    Setup {
        interface: String,
        step: String,
        #[source]
        source: io::Error,
    },
}

/// Counts from one or more turns, for the worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnStats {
    /// Frames received.
    pub rx: u64,
    /// Frames written to a TX ring.
    pub tx: u64,
    /// Frames that were to be sent but found the TX ring full (recycled instead).
    pub tx_ring_full: u64,
    /// Sends with a length outside the frame (a handler bug; recycled instead).
    pub tx_invalid: u64,
    /// Allocations that found the free list empty.
    pub alloc_failed: u64,
    /// Top-ups that found a fill ring empty (the kernel had taken every frame given to it).
    pub fill_ran_dry: u64,
    /// Syscalls made because a ring asked for one (`sendto` for TX, `recvfrom` for fill).
    pub wakeups: u64,
    /// `sendto` calls that failed with an unexpected error.
    pub kick_errors: u64,
    /// Frames that came home from other workers (returns).
    pub returned: u64,
}

/// What to do with a received frame once the handler has looked at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Give it back (to the free list, or home).
    Recycle,
    /// Send the frame back out on the socket it came from, `len` bytes from its start (the
    /// handler may have rewritten it in place; `len` may exceed the received length up to
    /// [`RxFrame::room`]).
    Transmit { len: usize },
}

/// A received frame, lent to the handler for one call.
pub struct RxFrame<'a> {
    /// From the packet's first byte to the end of its chunk.
    buf: &'a mut [u8],
    len: usize,
    queue: u32,
}

impl RxFrame<'_> {
    /// The received packet (an Ethernet frame).
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The received packet, writable (for rewriting it into a reply in place).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// The whole buffer from the packet's first byte: a reply built in place may use all of it.
    pub fn room(&mut self) -> &mut [u8] {
        self.buf
    }

    /// The RX queue the frame arrived on.
    pub fn queue(&self) -> u32 {
        self.queue
    }
}

/// The UMEM as raw memory: frames are carved out of it by index.
#[derive(Clone, Copy)]
struct Area {
    /// The UMEM's number: a `Frame` of another UMEM is refused.
    umem: u32,
    base: *mut u8,
    frame_size: u32,
    frames: u32,
}

impl Area {
    /// The bytes of `frame` from its packet start to the end of its chunk.
    ///
    /// # Safety
    /// `frame` must be held by the calling worker (a `Frame` handle it obtained from its own
    /// ledger) and the slice must not outlive that: then no other slice to the chunk exists (a
    /// `Frame` is unique, chunks are disjoint) and neither the kernel nor another worker touches
    /// it.
    unsafe fn chunk_from(self, frame: &mut Frame) -> &mut [u8] {
        // A real assert: a handle of another UMEM would alias a chunk of this one that someone
        // else may be using.
        assert!(
            frame.umem() == self.umem
                && frame.index() < self.frames
                && frame.offset() < self.frame_size,
            "{frame:?} is not a frame of this UMEM ({} frames)",
            self.frames
        );
        let start = frame.index() as usize * self.frame_size as usize + frame.offset() as usize;
        let len = (self.frame_size - frame.offset()) as usize;
        // SAFETY: start + len is the end of the frame's chunk, inside the mapping (checked
        // above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(start), len) }
    }
}

/// Frames going out on one socket, and frames to build them in.
///
/// Sends are staged and written to the TX ring [`BATCH`] at a time; at the end of the call the
/// rest is written and the ring kicked if it asks. A send that finds the ring full recycles the
/// frame and counts it (`tx_ring_full`): back pressure, never an unbounded queue.
pub struct TxQueue<'a> {
    ledger: &'a mut Ledger,
    area: Area,
    socket: &'a mut SocketRings,
    staged: &'a mut Vec<Frame>,
    stats: &'a mut TurnStats,
}

impl TxQueue<'_> {
    /// A free frame (of this worker's range) to build a packet in, or `None` when the worker
    /// has none left (counted).
    pub fn alloc(&mut self) -> Option<Frame> {
        let frame = self.ledger.alloc();
        if frame.is_none() {
            self.stats.alloc_failed += 1;
        }
        frame
    }

    /// The writable chunk of a frame this worker holds (from its packet start to its end).
    pub fn buffer<'f>(&self, frame: &'f mut Frame) -> &'f mut [u8] {
        debug_assert!(self.ledger.holds(frame), "{frame:?} is not held here");
        // SAFETY: the frame is held by this worker (a `Frame` exists only for held frames;
        // checked above in debug builds and bounds-checked always), and the slice borrows the
        // handle.
        unsafe { self.area.chunk_from(frame) }
    }

    /// Queues `len` bytes of `frame` (from its packet start) for transmission on this socket.
    pub fn send(&mut self, mut frame: Frame, len: usize) {
        let room = (self.area.frame_size - frame.offset()) as usize;
        if len == 0 || len > room {
            debug_assert!(false, "send of {len} bytes from {frame:?} (room {room})");
            self.stats.tx_invalid += 1;
            self.ledger.recycle(frame);
            return;
        }
        frame.set_len(len as u32);
        self.staged.push(frame);
        if self.staged.len() as u32 >= BATCH {
            self.flush();
        }
    }

    /// Gives a frame back (to the free list, or home).
    pub fn recycle(&mut self, frame: Frame) {
        self.ledger.recycle(frame);
    }

    /// The RX queue of the socket this queue sends on.
    pub fn queue(&self) -> u32 {
        self.socket.queue
    }

    /// Writes the staged frames to the TX ring; what does not fit is recycled and counted.
    fn flush(&mut self) {
        while !self.staged.is_empty() {
            let written = self.socket.transmit(self.ledger, self.staged);
            self.stats.tx += u64::from(written);
            if written == 0 {
                self.stats.tx_ring_full += self.staged.len() as u64;
                for frame in self.staged.drain(..) {
                    self.ledger.recycle(frame);
                }
            }
        }
    }
}

/// Per-worker state the other workers of the interface see. Its own cache line: written by its
/// worker once per turn at most, read by the others when they hand it work or stop.
#[repr(align(64))]
struct Peer {
    /// Descriptors this worker has written to its TX rings (published once per turn).
    sent: AtomicU64,
    /// Completions this worker has reaped from the rings it owns (published once per turn).
    completed: AtomicU64,
    /// Set when the worker has stopped turning: its `sent` is final.
    stopping: AtomicBool,
    /// Set when the worker, stopping, has published its last returns.
    flushed: AtomicBool,
    /// Set while the worker sleeps (or is about to) in `poll`.
    sleeping: AtomicBool,
    /// The eventfd it polls while asleep.
    eventfd: OwnedFd,
}

impl Peer {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. It can only fail when the
        // counter would overflow, and then a wakeup is pending anyway.
        unsafe { libc::write(self.eventfd.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
    }

    /// Wakes the worker if it is asleep (once per sleep).
    fn wake_if_sleeping(&self) {
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }
}

/// What the workers of one interface share.
struct Shared {
    peers: Box<[Peer]>,
    /// Unmapped when the last worker's `Xsk` (and so the last socket) is gone.
    memory: umem::UmemMemory,
}

impl Shared {
    /// Transmissions written and not yet reaped, over all workers. Exact once every worker is
    /// `stopping` (their `sent` is final); before that a completion may be published before
    /// its send, which the saturating difference hides.
    fn in_flight(&self) -> u64 {
        // Completions first: once sends are final, reading them second can only over-estimate
        // what is in flight.
        let completed: u64 = self
            .peers
            .iter()
            .map(|p| p.completed.load(Ordering::Acquire))
            .sum();
        let sent: u64 = self
            .peers
            .iter()
            .map(|p| p.sent.load(Ordering::Acquire))
            .sum();
        sent.saturating_sub(completed)
    }
}

/// Wakes a sleeping worker (an eventfd it polls). Cheap to clone; waking a worker that is not
/// asleep makes its next sleep return at once, which is harmless.
#[derive(Clone)]
pub struct Waker {
    shared: Arc<Shared>,
    worker: usize,
}

impl fmt::Debug for Waker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Waker(worker {})", self.worker)
    }
}

impl Waker {
    pub fn wake(&self) {
        self.shared.peers[self.worker].wake();
    }

    /// The eventfd, e.g. to register with an io_uring (`IORING_REGISTER_EVENTFD`).
    pub fn as_raw_fd(&self) -> RawFd {
        self.shared.peers[self.worker].eventfd.as_raw_fd()
    }
}

/// One worker's AF_XDP state: its sockets (one per queue), the fill and completion rings of the
/// queues it owns, its range of the interface's UMEM and its return rings.
///
/// Built by [`open`] for every worker of an interface at once; `Send`, so each can move to its
/// worker's thread. Field order is drop order: the sockets close before the shared memory can
/// be unmapped.
pub struct Xsk {
    worker: usize,
    /// One per RX queue, in queue order.
    sockets: Vec<SocketRings>,
    /// The socket every frame this worker sends goes out on ([`Xsk::tx_index`]).
    tx: usize,
    /// The queues this worker owns (`queue % workers == worker`).
    owned: Vec<QueueRings>,
    ledger: Ledger,
    /// Frames received in the current turn; empty between turns (capacity kept).
    rx_batch: Vec<Frame>,
    /// Frames staged for a TX ring; empty between turns.
    tx_batch: Vec<Frame>,
    /// Descriptors written to TX rings / completions reaped so far (published to `Peer`).
    sent: u64,
    completed: u64,
    /// Workers whose completion rings this turn's transmissions will complete on (bit per
    /// worker): woken at the end of the turn if they sleep.
    notify: u64,
    /// TX kicks are left to the caller ([`Xsk::set_deferred_kicks`]).
    deferred_kicks: bool,
    bind_mode: BindMode,
    interface: String,
    shared: Arc<Shared>,
}

impl fmt::Debug for Xsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Xsk")
            .field("interface", &self.interface)
            .field("worker", &self.worker)
            .field("queues", &self.sockets.len())
            .field("owned", &self.owned.len())
            .field("bind_mode", &self.bind_mode)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// Maps the UMEM of `interface` (`workers * frames_per_worker` frames) and binds one socket per
/// (queue, worker) for queues `0..queues` (names in the calling thread's network namespace).
/// Returns one [`Xsk`] per worker, in worker order. Frames arrive once the caller has put the
/// sockets into the XDP program's XSKMAP ([`Xsk::sockets`]).
pub fn open(
    interface: &str,
    queues: u32,
    workers: u32,
    settings: &XdpSettings,
) -> Result<Vec<Xsk>, XskError> {
    let setup = |step: &str, source: io::Error| XskError::Setup {
        interface: interface.to_owned(),
        step: step.to_owned(),
        source,
    };
    if queues == 0
        || queues > tern_common::MAX_QUEUES
        || workers == 0
        || workers > tern_common::MAX_WORKERS
    {
        return Err(setup(
            "layout",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{queues} queues and {workers} workers: 1 to {} queues and 1 to {} workers \
                     can be steered",
                    tern_common::MAX_QUEUES,
                    tern_common::MAX_WORKERS
                ),
            ),
        ));
    }
    let per_worker = settings.frames_per_worker;
    let total = per_worker.checked_mul(workers).ok_or_else(|| {
        setup(
            "layout",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{workers} workers × {per_worker} frames overflows"),
            ),
        )
    })?;
    let memory = umem::UmemMemory::new(total, settings.frame_size, settings.hugepages).map_err(
        |source| XskError::Umem {
            interface: interface.to_owned(),
            source,
        },
    )?;
    let config = UmemConfig {
        fill_size: settings.fill_ring,
        complete_size: settings.completion_ring,
        frame_size: settings.frame_size,
        headroom: 0,
        flags: 0,
    };
    // SAFETY: the area is the page-aligned start of a mapping of `total * frame_size` bytes.
    // It outlives every socket: on error paths here `memory` (declared first) is dropped after
    // them, and afterwards it lives in `Shared`, which each `Xsk` drops after its sockets.
    let umem = unsafe { Umem::new(config, memory.area()) }
        .map_err(|e| setup("registering the UMEM (XDP_UMEM_REG)", errno(e)))?;

    let name = CString::new(interface).map_err(|_| XskError::UnknownInterface {
        interface: interface.to_owned(),
    })?;
    let mut info = IfInfo::invalid();
    info.from_name(&name)
        .map_err(|_| XskError::UnknownInterface {
            interface: interface.to_owned(),
        })?;

    let w = workers as usize;
    let owner = |queue: u32| (queue % workers) as usize;
    // Each worker keeps part of its range on the fill rings of the queues it owns and the
    // rest (at least a TX ring's worth, at most half) free for frames it builds.
    let reserve = settings.tx_ring.min(per_worker / 2);
    let fill_target = |worker: usize| {
        let owned = (0..queues).filter(|&q| owner(q) == worker).count() as u32;
        ((per_worker - reserve) / owned.max(1))
            .min(settings.fill_ring)
            .max(1)
    };
    let rings = |bind_flags| SocketConfig {
        rx_size: NonZeroU32::new(settings.rx_ring),
        tx_size: NonZeroU32::new(settings.tx_ring),
        bind_flags,
    };
    let mut sockets: Vec<Vec<SocketRings>> = (0..w).map(|_| Vec::new()).collect();
    let mut owned: Vec<Vec<QueueRings>> = (0..w).map(|_| Vec::new()).collect();
    let mut bind_mode = BindMode::Copy;
    for queue in 0..queues {
        let at = |worker: usize, what: &str| format!("queue {queue}, worker {worker}: {what}");
        let mut qinfo = info;
        qinfo.set_queue(queue);
        let first = owner(queue);
        // The owner's socket brings the queue's fill and completion rings.
        let sock = if queue == 0 {
            Socket::with_shared(&qinfo, &umem)
        } else {
            Socket::new(&qinfo)
        }
        .map_err(|e| setup(&at(first, "socket(AF_XDP)"), errno(e)))?;
        let device = umem
            .fq_cq(&sock)
            .map_err(|e| setup(&at(first, "fill/completion rings"), errno(e)))?;
        let flags = if queue == 0 {
            SocketConfig::XDP_BIND_NEED_WAKEUP
        } else {
            0
        };
        let user = umem
            .rx_tx(&sock, &rings(flags))
            .map_err(|e| setup(&at(first, "rx/tx rings"), errno(e)))?;
        let (rx, tx) = map_rings(&user).map_err(|(what, e)| setup(&at(first, what), e))?;
        // Queue 0: binds the UMEM socket itself. Later queues: XDP_SHARED_UMEM with the UMEM
        // socket on another queue, which gives this queue a pool of its own.
        umem.bind(&user)
            .map_err(|e| setup(&at(first, "bind"), errno(e)))?;
        if queue == 0 {
            bind_mode =
                query_mode(user.as_raw_fd()).map_err(|e| setup(&at(first, "XDP_OPTIONS"), e))?;
        }
        sockets[first].push(SocketRings::new(queue, rx, tx, user));
        // Every other worker's socket on this queue shares the owner's pool (XDP_SHARED_UMEM
        // with the owner's socket, same queue): RX and TX rings of its own, nothing else.
        for worker in (0..w).filter(|&x| x != first) {
            let sock =
                Socket::new(&qinfo).map_err(|e| setup(&at(worker, "socket(AF_XDP)"), errno(e)))?;
            let user = umem
                .rx_tx(&sock, &rings(0))
                .map_err(|e| setup(&at(worker, "rx/tx rings"), errno(e)))?;
            let (rx, tx) = map_rings(&user).map_err(|(what, e)| setup(&at(worker, what), e))?;
            device
                .bind(&user)
                .map_err(|e| setup(&at(worker, "bind (shared queue)"), errno(e)))?;
            sockets[worker].push(SocketRings::new(queue, rx, tx, user));
        }
        owned[first].push(QueueRings::new(queue, device, fill_target(first)));
    }

    // Return rings: one per ordered pair of workers, each able to hold a whole range.
    let mut out: Vec<Vec<Option<handoff::Producer>>> =
        (0..w).map(|_| (0..w).map(|_| None).collect()).collect();
    let mut inbound: Vec<Vec<Option<handoff::Consumer>>> =
        (0..w).map(|_| (0..w).map(|_| None).collect()).collect();
    for from in 0..w {
        for to in (0..w).filter(|&to| to != from) {
            let (producer, consumer) = handoff::ring(per_worker);
            out[from][to] = Some(producer);
            inbound[to][from] = Some(consumer);
        }
    }
    let peers = (0..w)
        .map(|worker| {
            eventfd()
                .map(|eventfd| Peer {
                    sent: AtomicU64::new(0),
                    completed: AtomicU64::new(0),
                    stopping: AtomicBool::new(false),
                    flushed: AtomicBool::new(false),
                    sleeping: AtomicBool::new(false),
                    eventfd,
                })
                .map_err(|e| setup(&format!("worker {worker}: eventfd"), e))
        })
        .collect::<Result<Box<[Peer]>, _>>()?;
    let shared = Arc::new(Shared { peers, memory });
    let umem_id = NEXT_UMEM.fetch_add(1, Ordering::Relaxed);
    let xsks = sockets
        .into_iter()
        .zip(owned)
        .zip(out.into_iter().zip(inbound))
        .enumerate()
        .map(|(worker, ((sockets, owned), (out, inbound)))| Xsk {
            worker,
            tx: tx_socket_index(&sockets, worker, w),
            sockets,
            owned,
            ledger: Ledger::new(
                FramePool::new(
                    umem_id,
                    worker as u32 * per_worker,
                    per_worker,
                    settings.frame_size,
                ),
                out,
                inbound,
            ),
            rx_batch: Vec::with_capacity(BATCH as usize),
            tx_batch: Vec::with_capacity(BATCH as usize),
            sent: 0,
            completed: 0,
            notify: 0,
            deferred_kicks: false,
            bind_mode,
            interface: interface.to_owned(),
            shared: shared.clone(),
        })
        .collect();
    Ok(xsks)
}

/// The socket a worker transmits on: the first on a queue it owns (its completions come back
/// to itself), else the first.
fn tx_socket_index(sockets: &[SocketRings], worker: usize, workers: usize) -> usize {
    sockets
        .iter()
        .position(|s| s.queue as usize % workers == worker)
        .unwrap_or(0)
}

fn map_rings(
    user: &xdpilone::User,
) -> Result<(xdpilone::RingRx, xdpilone::RingTx), (&'static str, io::Error)> {
    let rx = user
        .map_rx()
        .map_err(|e| ("mapping the RX ring", errno(e)))?;
    let tx = user
        .map_tx()
        .map_err(|e| ("mapping the TX ring", errno(e)))?;
    Ok((rx, tx))
}

/// Asks a bound socket whether it runs in zero-copy mode (`XDP_OPTIONS`).
fn query_mode(fd: RawFd) -> io::Result<BindMode> {
    const SOL_XDP: libc::c_int = 283;
    const XDP_OPTIONS: libc::c_int = 8;
    const XDP_OPTIONS_ZEROCOPY: u32 = 1;
    let mut flags: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `struct xdp_options` is one u32; both pointers are live for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_OPTIONS,
            std::ptr::addr_of_mut!(flags).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if flags & XDP_OPTIONS_ZEROCOPY != 0 {
        BindMode::ZeroCopy
    } else {
        BindMode::Copy
    })
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2); the result is checked and owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Xsk {
    /// This worker's index.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// `(queue, fd)` of this worker's sockets, in queue order, for the XSKMAP slots
    /// `xsk_slot(queue, worker, workers)`. The fds close with this `Xsk`.
    pub fn sockets(&self) -> impl Iterator<Item = (u32, BorrowedFd<'_>)> + '_ {
        self.sockets.iter().map(|s| {
            // SAFETY: the fd is open for as long as `self` (the socket's owner) is borrowed.
            (s.queue, unsafe { BorrowedFd::borrow_raw(s.fd()) })
        })
    }

    /// Number of sockets (= queues).
    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// The queues whose fill and completion rings this worker owns.
    pub fn owned_queues(&self) -> Vec<u32> {
        self.owned.iter().map(|q| q.queue).collect()
    }

    pub fn bind_mode(&self) -> BindMode {
        self.bind_mode
    }

    pub fn page_kind(&self) -> PageKind {
        self.shared.memory.page_kind()
    }

    /// Hugepages the UMEM added to the system pool at start-up (not given back at exit).
    pub fn reserved_hugepages(&self) -> u64 {
        self.shared.memory.reserved_hugepages()
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Wakes this worker when it sleeps in `poll` on [`Waker::as_raw_fd`].
    pub fn waker(&self) -> Waker {
        Waker {
            shared: self.shared.clone(),
            worker: self.worker,
        }
    }

    /// Where this worker's frames are (`free + fill + held + tx == total`), and how many
    /// frames of other workers it holds.
    pub fn frames_accounted(&self) -> FrameAccount {
        let account = self.ledger.account();
        debug_assert_eq!(
            account.free + account.fill + account.held + account.tx,
            account.total
        );
        account
    }

    /// Frames received per socket since start, in queue order.
    pub fn rx_per_queue(&self) -> Vec<u64> {
        self.sockets.iter().map(|s| s.rx_frames).collect()
    }

    /// The kernel's own statistics, summed over this worker's sockets.
    pub fn kernel_stats(&self) -> io::Result<KernelStats> {
        let mut total = KernelStats::default();
        for socket in &self.sockets {
            let s = socket.statistics()?;
            total.rx_dropped += s.rx_dropped;
            total.rx_invalid_descs += s.rx_invalid_descs;
            total.tx_invalid_descs += s.tx_invalid_descs;
            total.rx_ring_full += s.rx_ring_full;
            total.rx_fill_ring_empty_descs += s.rx_fill_ring_empty_descs;
            total.tx_ring_empty_descs += s.tx_ring_empty_descs;
        }
        Ok(total)
    }

    /// Whether the worker must keep turning rather than sleep: a TX ring holds descriptors the
    /// kernel has not taken (in copy mode nothing is sent until it kicks again), or frames
    /// came home that its fill rings may need.
    pub fn busy(&self) -> bool {
        self.sockets.iter().any(SocketRings::tx_pending) || self.ledger.returns_waiting()
    }

    /// Marks the worker asleep before it polls; returns false (and stays awake) if work
    /// arrived meanwhile. Others wake a sleeping worker when they hand it work.
    pub fn prepare_sleep(&self) -> bool {
        let peer = &self.shared.peers[self.worker];
        peer.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in `hand_off_done`: either they see `sleeping`, or we see their
        // returns here.
        fence(Ordering::SeqCst);
        if self.ledger.returns_waiting() {
            peer.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Clears the asleep mark after `poll` returned, and the eventfd if `signalled` (poll saw
    /// it readable: an eventfd that did not fire needs no read syscall; one written after the
    /// poll returned ends the next sleep at once and is emptied then).
    pub fn woke(&self, signalled: bool) {
        let peer = &self.shared.peers[self.worker];
        peer.sleeping.store(false, Ordering::SeqCst);
        if !signalled {
            return;
        }
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing pending) is fine.
        unsafe {
            libc::read(
                peer.eventfd.as_raw_fd(),
                std::ptr::addr_of_mut!(value).cast(),
                8,
            )
        };
    }

    /// One turn of this worker: take back returned frames, reap and refill the queues it owns,
    /// receive up to [`BATCH`] frames per socket and pass each to `on_frame`, write what it
    /// sends and kick TX if a ring asks. Returns the number of frames received; adds to `stats`.
    pub fn turn<F>(&mut self, stats: &mut TurnStats, mut on_frame: F) -> u32
    where
        F: FnMut(&mut RxFrame<'_>, &mut TxQueue<'_>) -> Disposition,
    {
        self.refill(stats);
        let area = self.area();
        let mut received = 0;
        let workers = self.shared.peers.len();
        let me = self.worker;
        let Xsk {
            sockets,
            tx: tx_index,
            ledger,
            rx_batch,
            tx_batch,
            sent,
            notify,
            deferred_kicks,
            ..
        } = self;
        // Every frame goes out on one TX ring, whichever queue the frames it answers came in
        // on: frames of one flow built in one turn then leave in the order they were built
        // (two rings would be drained in kick order, which can swap a flow's segments).
        let tx = *tx_index;
        let before = stats.tx;
        for k in 0..sockets.len() {
            let n = sockets[k].receive(ledger, BATCH, rx_batch);
            if n == 0 {
                continue;
            }
            received += n;
            stats.rx += u64::from(n);
            let queue = sockets[k].queue;
            let socket = &mut sockets[tx];
            for mut frame in rx_batch.drain(..) {
                let len = frame.len() as usize;
                let disposition = {
                    // SAFETY: the frame was just received (held by this worker) and the slice
                    // lives only for this call, during which the handle stays here.
                    let buf = unsafe { area.chunk_from(&mut frame) };
                    let mut rx = RxFrame { buf, len, queue };
                    let mut out = TxQueue {
                        ledger,
                        area,
                        socket,
                        staged: tx_batch,
                        stats,
                    };
                    on_frame(&mut rx, &mut out)
                };
                let mut out = TxQueue {
                    ledger,
                    area,
                    socket,
                    staged: tx_batch,
                    stats,
                };
                match disposition {
                    Disposition::Recycle => out.recycle(frame),
                    Disposition::Transmit { len } => out.send(frame, len),
                }
            }
        }
        let socket = &mut sockets[tx];
        if received > 0 || socket.tx_pending() {
            TxQueue {
                ledger,
                area,
                socket,
                staged: tx_batch,
                stats,
            }
            .flush();
            let wrote = stats.tx - before;
            *sent += wrote;
            let owner = socket.queue as usize % workers;
            if wrote > 0 && owner != me {
                *notify |= 1u64 << owner;
            }
            if !*deferred_kicks {
                let kicks = socket.kick();
                stats.wakeups += u64::from(kicks.calls);
                stats.kick_errors += u64::from(kicks.errors);
            }
        }
        self.hand_off_done();
        received
    }

    /// The socket index [`turn`](Self::turn) sends every frame on, and the one to pass to
    /// [`send_with`](Self::send_with) so that all of a worker's frames share one TX ring (and
    /// one flow's segments keep their order): the first socket on a queue this worker owns.
    pub fn tx_index(&self) -> usize {
        self.tx
    }

    /// Lends a [`TxQueue`] for the socket on queue `queue_index` outside of a receive (frames
    /// built on a timer, retransmissions), then writes what was sent and kicks TX if the ring
    /// asks.
    pub fn send_with<T>(
        &mut self,
        queue_index: usize,
        stats: &mut TurnStats,
        f: impl FnOnce(&mut TxQueue<'_>) -> T,
    ) -> T {
        self.refill(stats);
        let area = self.area();
        let before = stats.tx;
        let Xsk {
            sockets,
            ledger,
            tx_batch,
            ..
        } = self;
        let socket = &mut sockets[queue_index];
        let mut out = TxQueue {
            ledger,
            area,
            socket,
            staged: tx_batch,
            stats,
        };
        let result = f(&mut out);
        out.flush();
        if !self.deferred_kicks {
            let kicks = socket.kick();
            stats.wakeups += u64::from(kicks.calls);
            stats.kick_errors += u64::from(kicks.errors);
        }
        let wrote = stats.tx - before;
        let owner = socket.queue as usize % self.shared.peers.len();
        self.sent += wrote;
        if wrote > 0 && owner != self.worker {
            self.notify |= 1u64 << owner;
        }
        self.hand_off_done();
        result
    }

    /// Takes back returned frames, reaps the owned completion rings and tops up the owned fill
    /// rings.
    fn refill(&mut self, stats: &mut TurnStats) {
        stats.returned += u64::from(self.ledger.drain_returns());
        for queue in &mut self.owned {
            self.completed += u64::from(queue.reap(&mut self.ledger));
            if queue.top_up(&mut self.ledger) {
                stats.fill_ran_dry += 1;
            }
            if queue.needs_wakeup() {
                queue.wake();
                stats.wakeups += 1;
            }
        }
    }

    /// End of a turn: publish returns and progress, and wake the workers that were given work
    /// (returns to take back, or transmissions completing on rings they own).
    fn hand_off_done(&mut self) {
        let peer = &self.shared.peers[self.worker];
        if peer.sent.load(Ordering::Relaxed) != self.sent {
            peer.sent.store(self.sent, Ordering::Release);
        }
        if peer.completed.load(Ordering::Relaxed) != self.completed {
            peer.completed.store(self.completed, Ordering::Release);
        }
        if self.shared.peers.len() == 1 {
            return;
        }
        // Returns to take back, and transmissions that complete on another owner's ring.
        let notify = self.ledger.publish_returns() | std::mem::take(&mut self.notify);
        if notify != 0 {
            // Pairs with the fence in `prepare_sleep`.
            fence(Ordering::SeqCst);
            for (index, peer) in self.shared.peers.iter().enumerate() {
                if notify & (1u64 << index) != 0 {
                    peer.wake_if_sleeping();
                }
            }
        }
    }

    /// Leaves TX kicks to the caller: [`turn`](Self::turn) and [`send_with`](Self::send_with)
    /// no longer call `sendto` themselves; the caller asks [`kicks_wanted`](Self::kicks_wanted)
    /// once per turn and wakes those sockets itself, e.g. with a SEND on its own io_uring
    /// batched with its other operations (one syscall instead of two). [`quiesce`](Self::quiesce)
    /// always kicks by itself.
    pub fn set_deferred_kicks(&mut self, deferred: bool) {
        self.deferred_kicks = deferred;
    }

    /// The sockets whose TX ring holds descriptors the kernel has not taken and asks to be
    /// woken (`need_wakeup`): what a caller with deferred kicks must kick now.
    pub fn kicks_wanted(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.sockets
            .iter()
            .filter(|s| s.tx_pending() && s.tx_needs_wakeup())
            .map(SocketRings::fd)
    }

    /// Stops using the rings and waits (at most `timeout`) until every transmission of every
    /// worker of the interface has completed and every frame is home, so that
    /// [`Xsk::frames_accounted`] shows this worker's frames at rest. All workers must call it
    /// when they stop. Returns whether that state was reached.
    pub fn quiesce(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut stats = TurnStats::default();
        // No descriptor is written from here on, so the published `sent` is final.
        self.hand_off_done();
        self.shared.peers[self.worker]
            .stopping
            .store(true, Ordering::Release);
        // 1. Until every worker has stopped sending and nothing is in flight anywhere: kick,
        // reap, return.
        loop {
            for socket in &mut self.sockets {
                socket.kick();
            }
            self.refill(&mut stats);
            self.hand_off_done();
            let all_stopping = self
                .shared
                .peers
                .iter()
                .all(|p| p.stopping.load(Ordering::Acquire));
            if all_stopping && self.shared.in_flight() == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        // 2. No completion is left to produce returns: publish the last ones and wait for the
        // others to do the same.
        self.hand_off_done();
        self.shared.peers[self.worker]
            .flushed
            .store(true, Ordering::Release);
        loop {
            let all_flushed = self
                .shared
                .peers
                .iter()
                .all(|p| p.flushed.load(Ordering::Acquire));
            self.ledger.drain_returns();
            if all_flushed && !self.ledger.returns_waiting() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
    }

    fn area(&self) -> Area {
        Area {
            umem: self.ledger.umem(),
            base: self.shared.memory.base(),
            frame_size: self.ledger.frame_size(),
            frames: (self.shared.memory.area().len() / self.ledger.frame_size() as usize) as u32,
        }
    }
}

/// The kernel's AF_XDP statistics (`XDP_STATISTICS`), summed over a worker's sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelStats {
    /// Frames dropped for reasons other than the ones below (e.g. too large).
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Frames dropped because an RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found a fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

/// The number of RX queues of `interface` (in the calling thread's network namespace), from
/// the driver's channel counts (`ETHTOOL_GCHANNELS`: dedicated RX plus combined channels). A
/// driver that does not report channels has one queue as far as tern is concerned.
pub fn rx_queue_count(interface: &str) -> io::Result<u32> {
    /// `struct ethtool_channels` (include/uapi/linux/ethtool.h).
    #[repr(C)]
    #[derive(Default)]
    struct EthtoolChannels {
        cmd: u32,
        max_rx: u32,
        max_tx: u32,
        max_other: u32,
        max_combined: u32,
        rx_count: u32,
        tx_count: u32,
        other_count: u32,
        combined_count: u32,
    }
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;

    let mut channels = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..EthtoolChannels::default()
    };
    let data = (&mut channels as *mut EthtoolChannels).cast();
    // SAFETY: SIOCETHTOOL takes an ifreq whose data points at an ethtool command, here the
    // live `channels` (ETHTOOL_GCHANNELS reads and writes a `struct ethtool_channels`).
    let done = unsafe {
        crate::sys::netdev::interface_ioctl(interface, SIOCETHTOOL, |ifr| {
            ifr.ifr_ifru.ifru_data = data;
        })
    };
    match done {
        Ok(_) => {}
        // A driver without channel counts.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(1),
        Err(e) => return Err(e),
    }
    Ok((channels.rx_count + channels.combined_count).max(1))
}
