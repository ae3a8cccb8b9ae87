//! One TCP socket driven through a worker's io_uring: the kernel path's client sockets and both
//! paths' backend sockets. [`Io`] is what a worker's sockets share (the ring, the registered
//! send slots, the provided receive buffers); [`Sock`] is one socket's operations.
//!
//! Ownership is in the types. A send slot ([`SlotId`], not `Copy`; 32 KiB, so a whole TLS
//! record goes out in one send) is taken from the pool when there are bytes to write and goes
//! back when they are written; more bytes may be appended behind a send in flight. Every send
//! is non-blocking (`MSG_DONTWAIT`): when the peer's window is full a `POLLOUT` is armed, and
//! the unsent rest stays in its slot only while the pool has plenty (fewer than three quarters
//! lent); beyond that it moves to a small per-socket stash and the slot goes back, so peers that
//! never read cannot hold the slots others need (and the connection's send deadline ends them).
//! The fd is owned by the `Sock`: [`Sock::close`] cancels what is in flight and the fd is closed
//! only when the last completion is in, so an fd number is never reused while an operation that
//! names it is queued.
//!
//! Receives are single-shot into the provided-buffer ring (32 KiB buffers), armed only while
//! the connection's machine wants bytes from that peer: one buffer per arm, so the session's
//! bound holds however fast the peer sends, and back pressure needs no cancel. At most one
//! receive and one send are in flight per socket.
//!
//! Plain kernel-path connections may move a direction's bytes through a pipe instead
//! ([`splice`]): the source socket then arms no receives, and the destination is not flushed
//! while its pipe holds bytes.
//!
//! Large client writes may go out zero-copy ([`zc`], `limits.send_zc`): the slot then stays
//! out of the pool until the kernel's notification says it no longer reads it.
//!
//! Kernel interfaces: io_uring_enter(2) with RECV (buffer select; poll first once a receive
//! drained the socket), SEND, SEND_ZC, POLL_ADD, CONNECT linked to LINK_TIMEOUT, ASYNC_CANCEL
//! by fd.

pub mod splice;
#[cfg(test)]
mod tests;
pub mod zc;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::{Event, Key};
use crate::counters::WorkerCounters;
use crate::sys::uring::{BufRing, Op, SlotId, SlotPool, UserData, BUF_SIZE, SLOT_SIZE};

/// The provided-buffer group every receive draws from.
pub const BUF_GROUP: u16 = 0;

/// `IORING_RECVSEND_POLL_FIRST` (io_uring_prep_recv(3), Linux 5.19): arm the poll before
/// trying the receive. The io-uring crate keeps its `sys` constants private.
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// What a worker's sockets share. Field order is drop order: the ring lets go of the
/// registered memory before the pools unmap it.
pub struct Io {
    pub ring: IoUring,
    pub slots: SlotPool,
    pub bufs: BufRing,
    /// Idle pipes and the splice setting (kernel path, plain listeners).
    pub pipes: splice::PipePool,
    /// Whether large client writes go out with SEND_ZC (kernel path, `limits.send_zc`).
    pub zc: zc::Setting,
    connect_timeout: types::Timespec,
    /// Connections to pump again after this batch of completions: a receive found the buffer
    /// ring empty, or a send found no free slot.
    pub retry: Vec<Key>,
}

impl Io {
    /// The timeout of connects submitted from now on (a reload).
    pub fn set_connect_timeout(&mut self, timeout: std::time::Duration) {
        self.connect_timeout = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
    }

    pub fn new(
        ring: IoUring,
        slots: u32,
        recv_buffers: u16,
        connect_timeout: std::time::Duration,
    ) -> io::Result<Io> {
        let slots = SlotPool::new(&ring, slots)?;
        let bufs = BufRing::new(&ring, recv_buffers, BUF_GROUP)?;
        let zc = zc::Setting::probe(&ring);
        Ok(Io {
            ring,
            slots,
            bufs,
            pipes: splice::PipePool::default(),
            zc,
            connect_timeout: types::Timespec::new()
                .sec(connect_timeout.as_secs())
                .nsec(connect_timeout.subsec_nanos()),
            retry: Vec::new(),
        })
    }

    /// Queues an SQE, submitting first if the queue is full.
    pub fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every buffer and address an entry points at outlives its operation: the
            // slot pool and buffer ring live as long as the ring; a socket's stash and connect
            // address live in its connection's slab entry, which never moves and is freed only
            // once the socket has no operation in flight; `connect_timeout` lives in `self`.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                tracing::warn!(error = %err, "io_uring submit failed");
            }
        }
    }

    /// Submits what is queued if fewer than `n` entries are free, so `n` pushed next are
    /// adjacent (linked entries must be).
    fn make_room(&mut self, n: usize) {
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < n {
            let _ = self.ring.submit();
        }
    }

    /// Calls `f` with the event a completion stands for (borrowing the received bytes from the
    /// buffer ring) and gives the buffer back afterwards.
    pub fn deliver<R>(&mut self, done: Done, f: impl FnOnce(Event<'_>) -> R) -> R {
        match done {
            Done::Data { bid, len } => {
                let r = f(Event::Data(self.bufs.get(bid, len)));
                self.bufs.recycle(bid);
                r
            }
            Done::Event(ev) => f(ev.event()),
        }
    }
}

/// Which end of a connection a socket is; picks the `user_data` op codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    fn recv(self) -> Op {
        match self {
            Side::Client => Op::ClientRecv,
            Side::Backend => Op::BackendRecv,
        }
    }
    fn send(self) -> Op {
        match self {
            Side::Client => Op::ClientSend,
            Side::Backend => Op::BackendSend,
        }
    }
    fn poll(self) -> Op {
        match self {
            Side::Client => Op::ClientPoll,
            Side::Backend => Op::BackendPoll,
        }
    }
}

/// A completion, digested.
#[derive(Debug)]
pub enum Done {
    /// Bytes in provided buffer `bid` (see [`Io::deliver`]).
    Data {
        bid: u16,
        len: usize,
    },
    Event(OwnedEvent),
}

/// [`Event`] without the borrowed bytes.
#[derive(Debug, Clone, Copy)]
pub enum OwnedEvent {
    Eof,
    Failed(i32),
    Connected,
    ConnectFailed { timed_out: bool, errno: i32 },
    Nothing,
}

impl OwnedEvent {
    fn event(self) -> Event<'static> {
        match self {
            OwnedEvent::Eof => Event::Eof,
            OwnedEvent::Failed(e) => Event::Failed(e),
            OwnedEvent::Connected => Event::Connected,
            OwnedEvent::ConnectFailed { timed_out, errno } => {
                Event::ConnectFailed { timed_out, errno }
            }
            OwnedEvent::Nothing => Event::Nothing,
        }
    }
}

/// Bytes queued for the peer: `slot[start..end]` (while a send may go straight out) or
/// `stash[start..]` (after the peer's window filled up).
#[derive(Debug, Default)]
struct Tx {
    slot: Option<SlotId>,
    start: usize,
    end: usize,
    /// Unsent bytes of a send the peer's window cut short; allocated only then.
    stash: Vec<u8>,
    in_flight: bool,
    /// Bytes of the send in flight (from `start`); bytes after them may be appended meanwhile.
    sending: usize,
    /// The send in flight is a SEND_ZC.
    zero_copy: bool,
}

impl Tx {
    fn is_empty(&self) -> bool {
        self.slot.is_none() && self.stash.is_empty()
    }
}

/// One socket. See the module documentation.
pub struct Sock {
    side: Side,
    /// -1: no socket (backend not connected yet, or closed).
    fd: RawFd,
    /// A receive is in flight.
    recv: bool,
    /// The peer's EOF was seen: no receive is armed again.
    eof: bool,
    /// The last receive returned less than a buffer: the socket is most likely empty, so the
    /// next receive waits for readiness before trying ([`Sock::want_recv`]).
    drained: bool,
    /// A POLLOUT is in flight (the peer's window was full).
    poll: bool,
    tx: Tx,
    /// Bytes were written since [`Sock::take_progress`].
    progressed: bool,
    /// The address of a connect in flight; must not move until it completes (the socket lives
    /// in a slab entry that never moves).
    addr: Option<socket2::SockAddr>,
    /// Operations submitted whose final completion has not arrived.
    in_flight: u32,
    /// [`Sock::close`] was called; the fd is closed once `in_flight` is 0.
    closing: bool,
    /// A receive or send failed (reset, broken pipe): nothing more is sent or received; what
    /// was queued is dropped.
    broken: bool,
    /// This socket's bytes go to its peer's pipe ([`splice`]): no receive is armed.
    splice_in: bool,
    /// A splice refused this socket's bytes (EINVAL / EOPNOTSUPP): they are received into
    /// buffers from then on.
    no_splice: bool,
    /// This socket's bytes are about to go to its peer's pipe (the session is writing what it
    /// holds for the peer): no receive is armed meanwhile.
    splice_hold: bool,
    /// A fill (POLLIN, then SPLICE this socket → the peer's pipe) is in flight.
    filling: bool,
    /// A drain (POLLOUT, then SPLICE `pipe` → this socket) is in flight.
    draining: bool,
    /// The pipe the peer's bytes wait in for this socket, once that direction splices. Boxed:
    /// most connections never have one.
    pipe: Option<Box<splice::Pipe>>,
    /// Zero-copy sends awaiting their notification, and the slots they hold.
    zc: zc::Pending,
}

impl Sock {
    /// A socket leg with no socket yet (a backend before its connect).
    pub fn none(side: Side) -> Sock {
        Sock {
            side,
            fd: -1,
            recv: false,
            eof: false,
            drained: false,
            poll: false,
            tx: Tx::default(),
            progressed: false,
            addr: None,
            in_flight: 0,
            closing: false,
            broken: false,
            splice_in: false,
            no_splice: false,
            splice_hold: false,
            filling: false,
            draining: false,
            pipe: None,
            zc: zc::Pending::default(),
        }
    }

    /// Takes ownership of a connected socket (an accepted client).
    pub fn adopt(side: Side, fd: RawFd) -> Sock {
        Sock {
            fd,
            ..Sock::none(side)
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Nothing is queued for the peer (everything given to [`Sock::fill`] is written, and its
    /// pipe is empty; a broken socket's leftovers are dropped).
    pub fn flushed(&self) -> bool {
        self.tx.is_empty() && (self.broken || self.pipe.as_ref().is_none_or(|p| p.is_empty()))
    }

    /// Whether bytes were written since the last call (and forgets it).
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }

    /// Closed and every operation completed: the connection may be freed.
    pub fn is_released(&self) -> bool {
        self.fd < 0 && self.in_flight == 0 && self.tx.slot.is_none() && self.zc.settled()
    }

    // ------------------------------------------------------------------ operations

    /// Opens a non-blocking-free (io_uring drives it) TCP socket and starts a connect to
    /// `addr`, linked to the connect timeout. A socket that cannot be created is reported as a
    /// failed connect.
    pub fn connect(&mut self, io: &mut Io, addr: SocketAddr, key: Key) -> Result<(), i32> {
        debug_assert!(self.fd < 0, "connect on a socket that has one");
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.cloexec(),
            None,
        )
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let _ = socket.set_tcp_nodelay(true);
        self.fd = socket.into_raw_fd();
        let sa = self.addr.insert(socket2::SockAddr::from(addr));
        connect_linked(
            io,
            self.fd,
            sa,
            (Op::BackendConnect, Op::ConnectTimeout),
            key,
        );
        self.in_flight += 2;
        Ok(())
    }

    /// Arms a receive if `wanted` and none is in flight.
    pub fn want_recv(&mut self, io: &mut Io, wanted: bool, key: Key) {
        if self.eof
            || self.closing
            || self.broken
            || self.fd < 0
            || self.splice_in
            || self.splice_hold
        {
            return;
        }
        if !wanted || self.recv {
            return;
        }
        // Single-shot: at most one buffer arrives per arm, so the session's bound holds
        // whatever the peer sends (a multishot receive went on filling buffers until its
        // cancel was processed: hundreds of slow readers' backends overran their bounds).
        // Poll first once the last receive drained the socket (it returned less than a
        // buffer): the next bytes are then almost never there yet, and without the flag
        // io_uring first tries the receive, fails with EAGAIN and only then arms the poll — a
        // wasted tcp_recvmsg per receive, two per keep-alive request. After a full buffer
        // (bulk) more bytes are likely waiting, and the receive is tried at once as before.
        let ioprio = if self.drained {
            IORING_RECVSEND_POLL_FIRST
        } else {
            0
        };
        let e = opcode::Recv::new(types::Fd(self.fd), std::ptr::null_mut(), BUF_SIZE as u32)
            .buf_group(BUF_GROUP)
            .ioprio(ioprio)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(UserData::new(self.side.recv(), key.gen, key.index).encode());
        self.recv = true;
        self.in_flight += 1;
        io.push(e);
    }

    /// Queues bytes for the peer when nothing is queued: `f` writes into a free send slot and
    /// returns how much. Returns false when no slot was free (the caller retries later).
    pub fn fill(&mut self, io: &mut Io, f: impl FnOnce(&mut [u8]) -> usize) -> bool {
        // Nothing is added while the peer's window is full (the stash waits for POLLOUT).
        if !self.tx.stash.is_empty() || self.closing || self.broken || self.fd < 0 {
            return true;
        }
        let tx = &mut self.tx;
        match &tx.slot {
            Some(slot) => {
                // Appending after what is queued is fine while a send is in flight: the kernel
                // reads only `start..start + sending`. Compacting is not: only when idle.
                if !tx.in_flight && tx.start > 0 && self.zc.idle() {
                    io.slots.slot_mut(slot).copy_within(tx.start..tx.end, 0);
                    tx.end -= tx.start;
                    tx.start = 0;
                }
                if tx.end < SLOT_SIZE {
                    tx.end += f(&mut io.slots.slot_mut(slot)[tx.end..]);
                }
            }
            None => {
                let Some(slot) = io.slots.take() else {
                    return false;
                };
                let n = f(io.slots.slot_mut(&slot));
                if n == 0 {
                    self.zc.give_back(&mut io.slots, slot);
                } else {
                    *tx = Tx {
                        slot: Some(slot),
                        start: 0,
                        end: n,
                        ..Tx::default()
                    };
                }
            }
        }
        true
    }

    /// Sends what is queued, unless a send or a wait for room is in flight.
    pub fn flush(&mut self, io: &mut Io, key: Key) {
        if self.tx.in_flight
            || self.poll
            || self.tx.is_empty()
            || self.closing
            || self.broken
            || self.fd < 0
        {
            return;
        }
        let (ptr, len, registered) = match &self.tx.slot {
            Some(slot) => (
                io.slots.ptr(slot, self.tx.start),
                self.tx.end - self.tx.start,
                true,
            ),
            None => (
                // SAFETY: `start < stash.len()` (a stash holds only unsent bytes).
                unsafe { self.tx.stash.as_ptr().add(self.tx.start) },
                self.tx.stash.len() - self.tx.start,
                false,
            ),
        };
        if len == 0 {
            return;
        }
        let user_data = UserData::new(self.side.send(), key.gen, key.index).encode();
        self.tx.zero_copy = registered && self.side == Side::Client && io.zc.wants(len);
        let e = if self.tx.zero_copy {
            zc::send(self.fd, ptr, len, user_data)
        } else {
            opcode::Send::new(types::Fd(self.fd), ptr, len as u32)
                .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data)
        };
        self.tx.sending = len;
        self.tx.in_flight = true;
        self.in_flight += 1;
        io.push(e);
    }

    /// Sends FIN after what was written (SHUT_WR).
    pub fn shutdown_write(&mut self) {
        if self.fd >= 0 && !self.closing {
            // SAFETY: our socket; shutdown(2) has no memory-safety preconditions.
            unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
        }
    }

    /// Closes the socket: with RST unless `graceful`. Operations in flight are cancelled; the
    /// fd itself is closed when the last of them completes.
    pub fn close(&mut self, io: &mut Io, graceful: bool) {
        if self.closing {
            return;
        }
        self.closing = true;
        if self.fd < 0 {
            self.give_back_tx(io);
            return;
        }
        if !graceful {
            set_linger_zero(self.fd);
        }
        if self.in_flight > 0 {
            let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(self.fd)).all())
                .build()
                .user_data(UserData::new(Op::Cancel, 0, 0).encode());
            io.push(e);
        }
        self.release_if_idle(io);
    }

    fn release_if_idle(&mut self, io: &mut Io) {
        if self.closing && self.in_flight == 0 {
            self.give_back_tx(io);
            if self.fd >= 0 {
                // SAFETY: our socket, closed once (set to -1 right after); nothing in flight
                // names it any more.
                unsafe { libc::close(self.fd) };
                self.fd = -1;
            }
        }
    }

    fn give_back_tx(&mut self, io: &mut Io) {
        if let Some(slot) = self.tx.slot.take() {
            self.zc.give_back(&mut io.slots, slot);
        }
        self.tx = Tx::default();
    }

    /// Digests the completion of one of this socket's operations.
    pub fn complete(
        &mut self,
        io: &mut Io,
        key: Key,
        op: Op,
        res: i32,
        flags: u32,
        counters: &WorkerCounters,
    ) -> Done {
        let send = matches!(op, Op::ClientSend | Op::BackendSend);
        if send && io_uring::cqueue::notif(flags) {
            // A SEND_ZC's notification: its send completed already; its slot may be free now.
            self.zc.notified(&mut io.slots);
            return Done::Event(OwnedEvent::Nothing);
        }
        if send {
            // A send's result; with F_MORE (SEND_ZC) a notification follows, counted apart
            // so the fd can close without waiting for it (see `zc`).
            self.in_flight = self.in_flight.saturating_sub(1);
            self.zc.sent(io_uring::cqueue::more(flags), &mut io.slots);
        } else if !io_uring::cqueue::more(flags) {
            // An operation's last completion (every other operation here has only one).
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let bid = io_uring::cqueue::buffer_select(flags);
        let done = if self.closing {
            if let Some(bid) = bid {
                io.bufs.recycle(bid);
            }
            Done::Event(OwnedEvent::Nothing)
        } else {
            match op {
                Op::ClientRecv | Op::BackendRecv => {
                    self.recv = false;
                    self.on_recv(io, res, bid, counters)
                }
                Op::ClientSend | Op::BackendSend => self.on_send(io, res, key, counters),
                Op::ClientPoll | Op::BackendPoll => {
                    self.poll = false;
                    Done::Event(OwnedEvent::Nothing)
                }
                Op::BackendConnect => self.on_connect(res),
                _ => Done::Event(OwnedEvent::Nothing),
            }
        };
        self.release_if_idle(io);
        done
    }

    fn on_recv(
        &mut self,
        io: &mut Io,
        res: i32,
        bid: Option<u16>,
        counters: &WorkerCounters,
    ) -> Done {
        if res > 0 {
            self.drained = (res as usize) < BUF_SIZE;
            return match bid {
                Some(bid) => Done::Data {
                    bid,
                    len: res as usize,
                },
                None => Done::Event(OwnedEvent::Failed(libc::EIO)),
            };
        }
        if let Some(bid) = bid {
            io.bufs.recycle(bid);
        }
        Done::Event(match res {
            0 => {
                self.eof = true;
                OwnedEvent::Eof
            }
            r if r == -libc::ENOBUFS => {
                counters.recv_buffer_starved.inc();
                OwnedEvent::Nothing
            }
            r if r == -libc::ECANCELED || r == -libc::EINTR => OwnedEvent::Nothing,
            r => {
                self.break_off(io);
                OwnedEvent::Failed(-r)
            }
        })
    }

    fn on_send(&mut self, io: &mut Io, res: i32, key: Key, counters: &WorkerCounters) -> Done {
        self.tx.in_flight = false;
        let zero_copy = std::mem::take(&mut self.tx.zero_copy);
        let sent = std::mem::take(&mut self.tx.sending);
        let written = match res {
            n if n >= 0 => (n as usize).min(sent),
            r if r == -libc::EAGAIN || r == -libc::EINTR => 0,
            // Nothing was sent: the same bytes go again with plain SEND once the socket is
            // writable (the POLLOUT wait below).
            r if zero_copy && r == -libc::EOPNOTSUPP => {
                io.zc.refused();
                0
            }
            r => {
                self.break_off(io);
                return Done::Event(OwnedEvent::Failed(-r));
            }
        };
        if written > 0 {
            self.progressed = true;
            if zero_copy {
                counters.zero_copy_bytes.add(written as u64);
            }
        }
        self.tx.start += written;
        let left = match &self.tx.slot {
            Some(_) => self.tx.end - self.tx.start,
            None => self.tx.stash.len() - self.tx.start,
        };
        if left == 0 {
            self.give_back_tx(io);
            return Done::Event(OwnedEvent::Nothing);
        }
        if written == sent {
            // All of it went; what was appended meanwhile goes with the next flush.
            return Done::Event(OwnedEvent::Nothing);
        }
        // The peer's window is full: wait for room. While the pool has plenty of free slots
        // the rest stays in its slot (a bulk transfer to a client slower than us hits this all
        // the time); once three quarters are lent, it moves off the pool into the stash, so
        // peers that do not read can never hold the slots others need.
        let plenty = io.slots.in_use() * 4 < io.slots.capacity() * 3;
        if let Some(slot) = self.tx.slot.take_if(|_| !plenty) {
            let rest = &io.slots.slot_mut(&slot)[self.tx.start..self.tx.end];
            self.tx.stash = rest.to_vec();
            self.tx.start = 0;
            self.tx.end = 0;
            self.zc.give_back(&mut io.slots, slot);
        }
        let e = opcode::PollAdd::new(types::Fd(self.fd), libc::POLLOUT as u32)
            .build()
            .user_data(UserData::new(self.side.poll(), key.gen, key.index).encode());
        self.poll = true;
        self.in_flight += 1;
        io.push(e);
        Done::Event(OwnedEvent::Nothing)
    }

    /// The connection is broken: what was queued for the peer is dropped (its slot goes back)
    /// and nothing more is sent or received.
    fn break_off(&mut self, io: &mut Io) {
        self.broken = true;
        self.give_back_tx(io);
    }

    fn on_connect(&mut self, res: i32) -> Done {
        self.addr = None;
        if res == 0 {
            return Done::Event(OwnedEvent::Connected);
        }
        // The connect completed; its linked timeout completes separately (counted in flight).
        // SAFETY: our socket; the connect completed and nothing else uses it.
        unsafe { libc::close(self.fd) };
        self.fd = -1;
        Done::Event(OwnedEvent::ConnectFailed {
            timed_out: res == -libc::ECANCELED,
            errno: -res,
        })
    }
}

/// Queues a CONNECT of `fd` to `addr` linked to the connect timeout, as operations `ops`
/// (connect, timeout) for `key`. `addr` must stay where it is until the connect completes.
pub fn connect_linked(io: &mut Io, fd: RawFd, addr: &socket2::SockAddr, ops: (Op, Op), key: Key) {
    io.make_room(2);
    let connect = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(UserData::new(ops.0, key.gen, key.index).encode());
    let timeout = opcode::LinkTimeout::new(&io.connect_timeout)
        .build()
        .user_data(UserData::new(ops.1, key.gen, key.index).encode());
    io.push(connect);
    io.push(timeout);
}

/// [`connect_linked`] with a timeout of its own (health probes: `backend.health.timeout_ms`).
/// The kernel reads `timeout` when the entries are submitted, so it must stay where it is
/// until the next submit (the caller boxes it with the probe).
pub fn connect_linked_timeout(
    io: &mut Io,
    fd: RawFd,
    addr: &socket2::SockAddr,
    timeout: &types::Timespec,
    ops: (Op, Op),
    key: Key,
) {
    io.make_room(2);
    let connect = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(UserData::new(ops.0, key.gen, key.index).encode());
    let timeout = opcode::LinkTimeout::new(timeout)
        .build()
        .user_data(UserData::new(ops.1, key.gen, key.index).encode());
    io.push(connect);
    io.push(timeout);
}

/// Makes the next close send RST instead of FIN (abortive close).
pub fn set_linger_zero(fd: RawFd) {
    let sock = std::mem::ManuallyDrop::new(
        // SAFETY: `fd` is an open socket we own; ManuallyDrop keeps it from being closed here.
        unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) },
    );
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
}
