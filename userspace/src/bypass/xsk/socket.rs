//! The rings of the AF_XDP sockets and the batched operations on them.
//!
//! A worker has one [`SocketRings`] per RX queue (its socket's RX and TX rings) and one
//! [`QueueRings`] per queue it owns (that queue's fill and completion rings, which the kernel
//! keeps once per (device, queue) and which every socket on the queue shares). Every ring
//! operation moves at most [`BATCH`] descriptors and touches the shared producer / consumer words
//! once (xdpilone's reserve/peek + commit/release).
//!
//! Syscalls are made only when a ring asks for one (`XDP_USE_NEED_WAKEUP`): `sendto` when the TX
//! ring's flag is set and it holds descriptors the kernel has not taken (in copy mode the flag is
//! always set, because copy-mode transmission only happens inside a syscall), `recvfrom` when the
//! fill ring's flag is set (a zero-copy driver stopped for lack of fill entries). The kernel
//! interface is Documentation/networking/af_xdp.rst ("XDP_USE_NEED_WAKEUP bind flag").
//!
//! Frame states are updated through the [`Ledger`] on every move, so this module never loses
//! track of a frame: fill ring ← free, RX ring → held, held → TX ring, completion ring → free
//! (or home).

use std::io;
use std::os::fd::RawFd;

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, RingRx, RingTx, User};

use super::frames::{Frame, Ledger};

/// Most descriptors moved by one ring operation.
pub const BATCH: u32 = 64;

/// `sendto` calls per socket per turn at most. In copy mode the kernel transmits at most 32
/// descriptors per call and answers `EAGAIN` when more are queued, so a full 64-frame batch
/// needs two; the bound keeps a stuck device from turning the worker into a syscall loop.
const MAX_KICKS: u32 = 4;

/// What a kick (`sendto`) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kicks {
    /// `sendto` calls made.
    pub calls: u32,
    /// Calls that failed with an error other than the transient ones (EAGAIN, EBUSY, ENOBUFS).
    pub errors: u32,
}

/// One socket of a worker: bound to one queue, registered in the XSKMAP at
/// `xsk_slot(queue, worker, workers)`.
pub struct SocketRings {
    pub queue: u32,
    rx: RingRx,
    tx: RingTx,
    /// Keeps the socket's configuration and fd; used for statistics.
    user: User,
    /// Frames received on this socket since start.
    pub rx_frames: u64,
}

impl SocketRings {
    pub fn new(queue: u32, rx: RingRx, tx: RingTx, user: User) -> SocketRings {
        SocketRings {
            queue,
            rx,
            tx,
            user,
            rx_frames: 0,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.user.as_raw_fd()
    }

    /// True while the TX ring holds descriptors the kernel has not taken yet.
    pub fn tx_pending(&self) -> bool {
        self.tx.pending() > 0
    }

    /// Whether the kernel asks to be woken to transmit (always in copy mode).
    pub fn tx_needs_wakeup(&self) -> bool {
        self.tx.needs_wakeup()
    }

    /// The kernel's statistics for this socket.
    pub fn statistics(&self) -> io::Result<xdpilone::xdp::XdpStatisticsV2> {
        self.user.statistics_v2().map_err(errno)
    }

    /// Takes up to `max` received frames into `out`.
    pub fn receive(&mut self, ledger: &mut Ledger, max: u32, out: &mut Vec<Frame>) -> u32 {
        let mut reader = self.rx.receive(max);
        let mut n = 0;
        while let Some(desc) = reader.read() {
            out.push(ledger.received(desc.addr, desc.len));
            n += 1;
        }
        // The descriptors were copied out; the frames are held until given back.
        reader.release();
        self.rx_frames += u64::from(n);
        n
    }

    /// Writes frames from the front of `frames` into the TX ring, as many as fit (at most
    /// [`BATCH`]), and removes them from `frames`. Returns how many were written; the caller
    /// decides what to do with the rest.
    pub fn transmit(&mut self, ledger: &mut Ledger, frames: &mut Vec<Frame>) -> u32 {
        let want = (frames.len() as u32).min(BATCH);
        if want == 0 {
            return 0;
        }
        let mut writer = self.tx.transmit(want);
        let room = writer.capacity();
        // Exactly `room` frames leave `frames`: xdpilone zips the iterator with the reserved
        // slots, pulling the iterator first, so it must not yield more than that.
        let written = writer.insert(frames.drain(..room as usize).map(|frame| {
            let (addr, len) = ledger.sent(frame);
            XdpDesc {
                addr,
                len,
                options: 0,
            }
        }));
        writer.commit();
        debug_assert_eq!(written, room);
        written
    }

    /// Asks the kernel to transmit what the TX ring holds, if the ring wants a syscall for it.
    pub fn kick(&mut self) -> Kicks {
        let mut kicks = Kicks::default();
        while kicks.calls < MAX_KICKS && self.tx.pending() > 0 && self.tx.needs_wakeup() {
            kicks.calls += 1;
            // SAFETY: a zero-length sendto on our own socket with null buffers and address; the
            // kernel only uses it as a wakeup (copy mode: it transmits from the TX ring here).
            let rc = unsafe {
                libc::sendto(
                    self.fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc >= 0 {
                // Copy mode: everything queued was transmitted. Zero copy: the driver was woken
                // and transmits on its own.
                break;
            }
            match io::Error::last_os_error().raw_os_error() {
                // The per-call budget ran out with more descriptors queued: call again.
                Some(libc::EAGAIN) => continue,
                // The device queue is busy or out of memory: try again next turn.
                Some(libc::EBUSY) | Some(libc::ENOBUFS) => break,
                _ => {
                    kicks.errors += 1;
                    break;
                }
            }
        }
        kicks
    }
}

/// The fill and completion rings of one queue, owned by one worker (the queue's owner).
pub struct QueueRings {
    pub queue: u32,
    device: DeviceQueue,
    /// How many frames this queue's fill ring is kept at (its share of the owner's range).
    fill_target: u32,
    /// False until the first top-up, so the empty ring at start is not counted as running dry.
    started: bool,
}

impl QueueRings {
    pub fn new(queue: u32, device: DeviceQueue, fill_target: u32) -> QueueRings {
        QueueRings {
            queue,
            device,
            fill_target,
            started: false,
        }
    }

    /// Moves completed transmissions off the completion ring (home, or towards home). Returns
    /// how many.
    pub fn reap(&mut self, ledger: &mut Ledger) -> u32 {
        let mut total = 0;
        loop {
            let mut reader = self.device.complete(BATCH);
            let mut n = 0;
            while let Some(addr) = reader.read() {
                ledger.completed(addr);
                n += 1;
            }
            reader.release();
            total += n;
            if n < BATCH {
                return total;
            }
        }
    }

    /// Tops the fill ring up to its target from the free list, one batch at a time. Returns
    /// true if the ring was found empty (the kernel had taken every frame given to it, so a
    /// frame arriving just then could have been dropped).
    pub fn top_up(&mut self, ledger: &mut Ledger) -> bool {
        // Entries the kernel has not taken yet. Its consumer position is published lazily, so
        // this may over-count, never under-count: the ring is never over-filled.
        let queued = self.device.pending();
        let ran_dry = self.started && queued == 0;
        self.started = true;
        let mut queued = queued;
        while queued < self.fill_target && ledger.free_len() > 0 {
            let want = (self.fill_target - queued)
                .min(BATCH)
                .min(ledger.free_len());
            let mut writer = self.device.fill(want);
            let room = writer.capacity();
            // Exactly `room` frames leave the free list (see `SocketRings::transmit`).
            let posted = writer.insert((0..room).map_while(|_| ledger.pop_for_fill()));
            writer.commit();
            debug_assert_eq!(posted, room, "the free list had {want} frames");
            queued += posted;
            if posted < want {
                // The ring itself is full (its size is below the target).
                break;
            }
        }
        ran_dry
    }

    /// Whether a zero-copy driver stopped for lack of fill entries and must be woken.
    pub fn needs_wakeup(&self) -> bool {
        self.device.needs_wakeup()
    }

    /// Wakes the driver's receive path (`recvfrom` with `MSG_DONTWAIT`, as the kernel
    /// documents for the fill ring's need-wakeup flag).
    pub fn wake(&mut self) {
        // SAFETY: a zero-length recvfrom on our own socket with null buffers and addresses;
        // the kernel only uses it as a wakeup.
        unsafe {
            libc::recvfrom(
                self.device.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }
}

/// xdpilone's errno as an `io::Error` (it stores some as negative values).
pub fn errno(err: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(err.get_raw().abs())
}
