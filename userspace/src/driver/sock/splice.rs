//! Splicing a plain (`tls = false`) kernel-path connection: once the machine has nothing of its
//! own to send in a direction (the PROXY header is out, the session holds no bytes), that
//! direction's bytes go socket → pipe → socket with splice(2) and never reach tern's
//! buffers. The pipe of a direction belongs to the socket the bytes go to (its `pipe`, read
//! like a send slot: the socket is not flushed while its pipe holds bytes); the socket they
//! come from only stops arming receives (`splice_in`).
//!
//! The ring only waits: a fill is a POLL_ADD POLLIN on the source, a drain a POLL_ADD POLLOUT
//! on the destination, and when one completes the worker itself calls splice(2) with
//! SPLICE_F_NONBLOCK (the socket sides are made O_NONBLOCK when a direction starts
//! splicing). io_uring's own IORING_OP_SPLICE always runs on io-wq helper threads (the kernel
//! forces it async), which measured dearer per MiB than the worker's syscall. Every poll is
//! counted in its socket's `in_flight`, so the fd is closed only once nothing names it
//! ([`Sock::close`]); an idle or unread connection parks a poll, never a thread.
//!
//! Bounds: a pipe holds at most `limits.buffer_per_direction` bytes (F_SETPIPE_SZ; the kernel
//! rounds to a power of two of pages and, past `fs.pipe-user-pages-soft`, may give less), and
//! a fill asks for no more than the pipe's free room, so a peer that does not read stops the
//! fill and then the other peer's sends (TCP back pressure) while its poll waits; the
//! machine's send deadline ends it. Pipes cost 2 fds per spliced direction (4 per connection);
//! a worker keeps up to [`MAX_IDLE_PIPES`] empty ones for reuse; a pipe left holding bytes
//! when its connection ends is closed, not reused.
//!
//! A fill refused with EINVAL or EOPNOTSUPP (a socket type without splice_read) sends that
//! direction back to the copy path for good (`splice_fallbacks`); nothing was moved. A refused
//! drain has bytes stranded in the pipe and fails the connection like a send error.
//!
//! Kernel interfaces: pipe2(2), fcntl(2) F_SETPIPE_SZ / F_GETPIPE_SZ, io_uring_enter(2) with
//! POLL_ADD, splice(2) (SPLICE_F_NONBLOCK | SPLICE_F_MOVE).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{opcode, types};

use super::{Io, Side, Sock};
use crate::driver::{Entry, Event, Key, Shared};
use crate::sys::uring::{Op, UserData};
use crate::tcp::time::Instant;

/// Empty pipes a worker keeps for the next connections (2 fds each).
pub const MAX_IDLE_PIPES: usize = 64;

/// One pipe between two sockets of a connection.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Its capacity as the kernel reports it (F_GETPIPE_SZ).
    cap: u32,
    /// Bytes in it: added when a fill completes, taken when a drain completes. Invariant:
    /// `len <= cap`.
    len: u32,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both fds are open and ours alone.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        // SAFETY: fcntl on our own pipe; a failure (EPERM past the user's pipe page limit, or
        // EBUSY) leaves the pipe at its default size, which is what F_GETPIPE_SZ then reports.
        let cap = unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size);
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if cap <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            r,
            w,
            cap: cap as u32,
            len: 0,
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn room(&self) -> u32 {
        self.cap - self.len
    }
}

/// A worker's idle pipes and the splice setting its new connections follow.
#[derive(Debug, Default)]
pub struct PipePool {
    free: Vec<Pipe>,
    /// `limits.splice`: plain connections splice.
    enabled: bool,
    /// Pipe size asked for (`limits.buffer_per_direction`).
    size: usize,
}

impl PipePool {
    /// Applies `limits.splice` and `limits.buffer_per_direction` (start-up and reload); idle
    /// pipes of another size are dropped.
    pub fn configure(&mut self, enabled: bool, size: usize) {
        if size != self.size || !enabled {
            self.free.clear();
        }
        self.enabled = enabled;
        self.size = size;
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn take(&mut self) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(p) => Ok(p),
            None => Pipe::new(self.size),
        }
    }

    /// Takes back the pipes of a freed connection's sockets: an empty one is kept (up to
    /// [`MAX_IDLE_PIPES`]), one still holding bytes is closed.
    pub fn recycle(&mut self, sock: &mut Sock) {
        if let Some(p) = sock.pipe.take() {
            if p.len == 0 && self.enabled && self.free.len() < MAX_IDLE_PIPES {
                self.free.push(*p);
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a socket we own; no memory is involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// The ops of a socket's fill poll (POLLIN, then splice socket → pipe) and drain poll
/// (POLLOUT, then splice pipe → socket).
fn ops(side: Side) -> (Op, Op) {
    match side {
        Side::Client => (Op::ClientSpliceIn, Op::ClientSpliceOut),
        Side::Backend => (Op::BackendSpliceIn, Op::BackendSpliceOut),
    }
}

impl Sock {
    /// Can bytes arriving on this socket start going to a pipe now: open, nothing received
    /// in flight, not refused before.
    fn may_splice_in(&self) -> bool {
        !self.splice_in
            && !self.no_splice
            && !self.recv
            && !self.eof
            && !self.closing
            && !self.broken
            && self.fd >= 0
    }

    /// Can this socket start taking bytes from a pipe: open and nothing queued in its slot.
    fn may_splice_out(&self) -> bool {
        self.tx.is_empty() && !self.tx.in_flight && !self.closing && !self.broken && self.fd >= 0
    }

    fn usable(&self) -> bool {
        !self.closing && !self.broken && self.fd >= 0
    }
}

/// One direction, `src` → `dst`: starts splicing it when the machine says it may (`ready`)
/// and both sockets can, then keeps a fill armed while the pipe has room and a drain armed
/// while it holds bytes.
///
/// `soon`: the direction will be ready once the session's own bytes for `dst` are written. Until
/// then `src` arms no receive (`splice_hold`), so that the receive in flight when the session
/// got bytes of its own (a peer that sends first) is the last: without the hold the copy path
/// would re-arm it after every completion and the direction would never find `src` idle.
fn run(io: &mut Io, src: &mut Sock, dst: &mut Sock, (soon, ready): (bool, bool), key: Key) {
    if ready && src.may_splice_in() && dst.may_splice_out() && dst.pipe.is_none() {
        match io.pipes.take() {
            Ok(pipe) => {
                set_nonblocking(src.fd);
                set_nonblocking(dst.fd);
                dst.pipe = Some(Box::new(pipe));
                src.splice_in = true;
            }
            Err(e) => {
                // No pipe now means none later either (fd or pipe-page limits): copy for good
                // rather than hold receives for a pipe that may not come.
                tracing::debug!(error = %e, "no pipe: this direction is copied");
                src.no_splice = true;
            }
        }
    }
    src.splice_hold = soon && !src.splice_in && !src.no_splice && src.usable();
    if !src.splice_in {
        return;
    }
    let Some(pipe) = dst.pipe.as_deref() else {
        return;
    };
    if !src.filling && !src.eof && src.usable() && pipe.room() > 0 {
        let (fill, _) = ops(src.side);
        let poll = opcode::PollAdd::new(types::Fd(src.fd), libc::POLLIN as u32)
            .build()
            .user_data(UserData::new(fill, key.gen, key.index).encode());
        io.push(poll);
        src.filling = true;
        src.in_flight += 1;
    }
    if !dst.draining && pipe.len > 0 && dst.usable() {
        let (_, drain) = ops(dst.side);
        let poll = opcode::PollAdd::new(types::Fd(dst.fd), libc::POLLOUT as u32)
            .build()
            .user_data(UserData::new(drain, key.gen, key.index).encode());
        io.push(poll);
        dst.draining = true;
        dst.in_flight += 1;
    }
}

/// splice(2) `len` bytes from `from` to `to` without blocking: the bytes moved, or -errno
/// (the shape of an io_uring result).
fn splice_now(from: RawFd, to: RawFd, len: u32) -> i32 {
    // SAFETY: splice(2) on fds this connection owns, no offsets (null), no user memory.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

/// The splice part of a kernel-path connection's pump, before anything else: each direction
/// the machine lets bypass its session ([`crate::driver::Conn::splice_to_backend_ready`],
/// [`crate::driver::Conn::splice_to_client_ready`]) moves through a pipe.
pub fn pump(io: &mut Io, e: &mut Entry<Sock>, key: Key) {
    if e.closing || e.conn.is_over() || !(io.pipes.enabled() || has_pipes(e)) {
        e.client.splice_hold = false;
        e.backend.splice_hold = false;
        return;
    }
    let enabled = io.pipes.enabled();
    let soon = enabled && e.conn.splice_to_backend_soon();
    let ready = soon && e.conn.splice_to_backend_ready();
    run(io, &mut e.client, &mut e.backend, (soon, ready), key);
    let soon = enabled && e.conn.splice_to_client_soon();
    let ready = soon && e.conn.splice_to_client_ready();
    run(io, &mut e.backend, &mut e.client, (soon, ready), key);
}

fn has_pipes(e: &Entry<Sock>) -> bool {
    e.client.splice_in || e.backend.splice_in
}

/// A completion of one of a connection's splice operations (ops `*Splice*`): the bytes moved
/// are counted by the machine, an end of stream or an error becomes the machine's event for
/// that side as on the copy path.
pub fn completion(
    sh: &mut Shared,
    e: &mut Entry<Sock>,
    (op, res, flags): (Op, i32, u32),
    now: Instant,
) {
    let last = !io_uring::cqueue::more(flags);
    let (src_is_client, fill) = match op {
        Op::ClientSpliceIn => (true, true),
        Op::BackendSpliceIn => (false, true),
        // A drain's destination is the side named; its source is the other one.
        Op::ClientSpliceOut => (false, false),
        Op::BackendSpliceOut => (true, false),
        _ => return,
    };
    let (client, backend) = (&mut e.client, &mut e.backend);
    let (src, dst) = if src_is_client {
        (client, backend)
    } else {
        (backend, client)
    };
    // The socket the operation names.
    let named = if fill { &mut *src } else { &mut *dst };
    if last {
        named.in_flight = named.in_flight.saturating_sub(1);
    }
    // The poll's result: the socket is ready (revents > 0), so the splice is done now, from the
    // worker, or it failed (ECANCELED at close), which stands for the splice's result.
    let res = match (res > 0, fill, dst.pipe.as_deref()) {
        (true, true, Some(pipe)) if !src.closing => {
            splice_now(src.fd, pipe.w.as_raw_fd(), pipe.room())
        }
        (true, false, Some(pipe)) if !dst.closing => {
            splice_now(pipe.r.as_raw_fd(), dst.fd, pipe.len)
        }
        (true, _, _) => -libc::ECANCELED,
        // A poll never completes with 0; were it to, it is no end of stream.
        (false, _, _) => res.min(-libc::EAGAIN),
    };
    if step(sh, e, (src_is_client, fill), res, now) {
        follow_on(sh, e, (src_is_client, !fill), now);
    }
}

/// After bytes moved, the other half of the same direction is tried at once (a drain after a
/// fill, a fill after a drain) if no poll is waiting for it: a ready socket then costs no
/// round trip through the ring; EAGAIN leaves it to the next pump's poll.
fn follow_on(
    sh: &mut Shared,
    e: &mut Entry<Sock>,
    (src_is_client, fill): (bool, bool),
    now: Instant,
) {
    let (src, dst) = if src_is_client {
        (&e.client, &e.backend)
    } else {
        (&e.backend, &e.client)
    };
    let Some(pipe) = dst.pipe.as_deref() else {
        return;
    };
    let res = if fill {
        if src.filling || src.eof || !src.splice_in || !src.usable() || pipe.room() == 0 {
            return;
        }
        splice_now(src.fd, pipe.w.as_raw_fd(), pipe.room())
    } else {
        if dst.draining || pipe.len == 0 || !dst.usable() {
            return;
        }
        splice_now(pipe.r.as_raw_fd(), dst.fd, pipe.len)
    };
    step(sh, e, (src_is_client, fill), res, now);
}

/// Accounts one splice's result `res` (bytes, or -errno) for the direction whose source is
/// the client or not, a fill (socket → pipe) or a drain: counters, the pipe's level, the
/// machine's events. Returns whether bytes moved.
fn step(
    sh: &mut Shared,
    e: &mut Entry<Sock>,
    (src_is_client, fill): (bool, bool),
    res: i32,
    now: Instant,
) -> bool {
    let counters = &*sh.counters;
    let (client, backend) = (&mut e.client, &mut e.backend);
    let (src, dst) = if src_is_client {
        (client, backend)
    } else {
        (backend, client)
    };
    let moved = u32::try_from(res).unwrap_or(0);
    let mut event = None;
    if fill {
        src.filling = false;
        if let Some(pipe) = dst.pipe.as_deref_mut() {
            pipe.len = (pipe.len + moved).min(pipe.cap);
        }
        if !src.closing {
            match res {
                n if n > 0 => {
                    counters.spliced_bytes.add(u64::from(moved));
                    if src_is_client {
                        e.conn.spliced_from_client(moved as usize, counters, now);
                    } else {
                        e.conn.spliced_from_backend(moved as usize, counters, now);
                    }
                }
                0 => {
                    src.eof = true;
                    event = Some(Event::Eof);
                }
                r if r == -libc::EAGAIN || r == -libc::EINTR || r == -libc::ECANCELED => {}
                r if r == -libc::EINVAL || r == -libc::EOPNOTSUPP => {
                    // Nothing moved: this direction goes back to receives into buffers.
                    counters.splice_fallbacks.inc();
                    src.splice_in = false;
                    src.no_splice = true;
                }
                r => {
                    src.break_off(&mut sh.io);
                    event = Some(Event::Failed(-r));
                }
            }
        }
    } else {
        dst.draining = false;
        if let Some(pipe) = dst.pipe.as_deref_mut() {
            pipe.len = pipe.len.saturating_sub(moved);
        }
        if !dst.closing {
            match res {
                n if n > 0 => dst.progressed = true,
                r if r == -libc::EAGAIN || r == -libc::EINTR || r == -libc::ECANCELED => {}
                r => {
                    dst.break_off(&mut sh.io);
                    event = Some(Event::Failed(-r));
                }
            }
        }
    }
    // Which side the event is about: a fill's source, a drain's destination.
    let about_client = src_is_client == fill;
    src.release_if_idle(&mut sh.io);
    dst.release_if_idle(&mut sh.io);
    let Some(ev) = event else {
        return moved > 0;
    };
    if about_client {
        e.conn.client_event(ev, counters);
    } else if let Some(next) = e.conn.backend_event(ev, &mut sh.backends, counters, now) {
        // A connected leg's events never ask for a connect; nothing to carry out.
        tracing::debug!(?next, "unexpected backend operation after a splice");
    }
    false
}
