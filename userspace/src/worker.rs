//! A kernel-mode worker: one pinned thread, one io_uring, its own listening sockets, its own
//! connections and counters; it shares nothing with other workers.
//!
//! Everything the worker does to a socket goes through its ring: multishot ACCEPT on its
//! SO_REUSEPORT listeners, multishot RECV into the provided-buffer ring for both clients and
//! backends, WRITE_FIXED from registered send slots, CONNECT linked to a LINK_TIMEOUT for
//! backends. Socket creation, `getpeername` and `shutdown` are plain syscalls made once per
//! connection, never per byte.
//!
//! The bytes themselves are handled by [`crate::proxy::Session`]; this module turns completions
//! into session calls and session state into operations (`Worker::pump`). Per connection, at
//! most one receive and one send per direction are in flight, so back pressure is simple: when
//! the session says it holds enough for the other side, the worker cancels that side's receive
//! and re-arms it once the session has drained.
//!
//! Not here: TLS details (`tls`, `proxy`), configuration parsing (`config`), the control socket
//! (`control`).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rustls::ServerConfig;

use crate::config::{Backend, ConnectPolicy, Limits, Timeouts};
use crate::counters::WorkerCounters;
use crate::proxy::{Session, Stage};
use crate::timer::{Millis, Wheel};
use crate::uring::{BufRing, Op, SlotId, SlotPool, UserData, BUF_SIZE, GEN_MASK};

/// Flags the main thread raises; every worker polls them at least once per tick.
#[derive(Debug, Default)]
pub struct Shutdown {
    /// Stop accepting; finish open connections until the drain deadline.
    pub drain: AtomicBool,
    /// Stop now: close every connection and return.
    pub stop: AtomicBool,
}

/// Everything a worker needs; built by the main thread, moved into the worker thread.
pub struct WorkerSetup {
    pub id: usize,
    /// This worker's listening sockets (already bound and listening, SO_REUSEPORT).
    pub listeners: Vec<ListenSocket>,
    /// The TLS configuration; `None` when no listener terminates TLS.
    pub tls: Option<Arc<ServerConfig>>,
    pub backend: Backend,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub counters: Arc<WorkerCounters>,
    pub shutdown: Arc<Shutdown>,
}

/// One listening socket of a worker.
#[derive(Debug, Clone, Copy)]
pub struct ListenSocket {
    pub fd: RawFd,
    /// Terminate TLS on its connections; `false`: plain TCP (L4) proxying.
    pub tls: bool,
}

const RING_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16 * 1024;
const RECV_BUFFERS: u16 = 1024;
const BUF_GROUP: u16 = 0;
/// Timer granularity; also the longest the worker sleeps without looking at its flags.
const TICK: Duration = Duration::from_millis(100);
const LISTEN_RETRY: Millis = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// No receive in flight.
    Idle,
    /// A multishot receive is armed.
    Armed,
    /// A cancel was requested; the final completion has not arrived yet.
    Cancelling,
    /// The peer sent FIN; nothing more will be read.
    Eof,
}

/// One direction's outgoing bytes: `slot[start..end]` is still to be written.
#[derive(Debug, Default)]
struct Tx {
    slot: Option<SlotId>,
    start: usize,
    end: usize,
    in_flight: bool,
}

impl Tx {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendState {
    /// Not connected yet (first-byte policy waits for plaintext).
    None,
    Connecting,
    Connected,
    /// Connection failed or was lost; the session is being closed towards the client.
    Failed,
    /// Both directions finished and the socket was shut down for writing.
    Done,
}

struct Conn {
    gen: u32,
    session: Session,
    client_fd: RawFd,
    client_addr: SocketAddr,
    backend_fd: RawFd,
    backend: BackendState,
    /// Index into `Backend::servers` of the current attempt, and how many were tried.
    server: usize,
    attempts: usize,
    /// The address a CONNECT in flight points at; must not move while it is in flight
    /// (connections live in a preallocated slab that never reallocates).
    backend_sockaddr: libc::sockaddr_storage,
    backend_socklen: libc::socklen_t,
    client_recv: Recv,
    backend_recv: Recv,
    to_client: Tx,
    to_backend: Tx,
    client_wr_shut: bool,
    backend_wr_shut: bool,
    /// Operations submitted for this connection whose final completion has not arrived. The
    /// slot is reused only when this is 0, so a late completion never meets a new tenant.
    in_flight: u32,
    /// Torn down: fds closed (or closing); waiting for `in_flight` to reach 0.
    closing: bool,
    accepted_at: Millis,
    last_active: Millis,
    handshake_counted: bool,
    /// Queued in `slot_waiters` (at most once).
    waiting_for_slot: bool,
}

pub struct Worker {
    id: usize,
    /// Declared first so it is dropped first: the kernel must let go of the buffer memory
    /// (registered buffers, buffer ring) before `bufs` and `slots` unmap it.
    ring: IoUring,
    bufs: BufRing,
    slots: SlotPool,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    /// Connection count (slots occupied, closing included).
    live: usize,
    listeners: Vec<Listener>,
    tls: Option<Arc<ServerConfig>>,
    backend: Backend,
    next_server: usize,
    timeouts: Timeouts,
    limits: Limits,
    counters: Arc<WorkerCounters>,
    shutdown: Arc<Shutdown>,
    wheel: Wheel<(u32, u32)>,
    /// Connections waiting for a free send slot, in arrival order.
    slot_waiters: VecDeque<(u32, u32)>,
    connect_timeout: types::Timespec,
    epoch: Instant,
    now: Millis,
    draining: Option<Millis>,
    cqes: Vec<(u64, i32, u32)>,
    gen_counter: u32,
    /// Backend failures are logged at most once per second per worker, with a count of those
    /// not logged, so a dead backend under load does not flood the log.
    last_backend_warn: Option<Millis>,
    backend_warns_suppressed: u64,
    /// Scratch list of expired timer entries, kept so a tick allocates nothing.
    due: Vec<(u32, u32)>,
}

struct Listener {
    fd: RawFd,
    tls: bool,
    armed: bool,
    /// After an accept error (e.g. EMFILE), re-arm no earlier than this.
    retry_at: Millis,
}

impl Worker {
    pub fn new(setup: WorkerSetup) -> io::Result<Worker> {
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(RING_ENTRIES)?;
        let bufs = BufRing::new(&ring, RECV_BUFFERS, BUF_GROUP)?;
        let max = setup.limits.max_connections_per_worker;
        // Two directions per connection could each hold a slot; beyond a few thousand slots
        // connections wait for one instead (back pressure, never unbounded memory).
        let slot_count = (2 * max).clamp(64, 4096) as u32;
        let slots = SlotPool::new(&ring, slot_count)?;
        let epoch = Instant::now();
        let ct = setup.backend.connect_timeout;
        Ok(Worker {
            id: setup.id,
            ring,
            bufs,
            slots,
            conns: Vec::with_capacity(max),
            free: Vec::new(),
            live: 0,
            listeners: setup
                .listeners
                .into_iter()
                .map(|l| Listener {
                    fd: l.fd,
                    tls: l.tls,
                    armed: false,
                    retry_at: 0,
                })
                .collect(),
            tls: setup.tls,
            backend: setup.backend,
            next_server: setup.id,
            timeouts: setup.timeouts,
            limits: setup.limits,
            counters: setup.counters,
            shutdown: setup.shutdown,
            wheel: Wheel::new(TICK.as_millis() as u64, 1024, 0),
            slot_waiters: VecDeque::new(),
            connect_timeout: types::Timespec::new()
                .sec(ct.as_secs())
                .nsec(ct.subsec_nanos()),
            epoch,
            now: 0,
            draining: None,
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            gen_counter: 0,
            last_backend_warn: None,
            backend_warns_suppressed: 0,
            due: Vec::new(),
        })
    }

    /// Runs until drained or stopped.
    pub fn run(mut self) -> io::Result<()> {
        tracing::debug!(worker = self.id, "worker running");
        let mut next_tick = 0;
        loop {
            self.arm_listeners();
            let ts = types::Timespec::new().nsec(TICK.as_nanos() as u32);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.now = self.epoch.elapsed().as_millis() as Millis;
            self.reap();
            crate::fault::check(crate::fault::Site::KernelWorker(self.id))?;
            if self.now >= next_tick {
                next_tick = self.now + self.wheel.tick_ms();
                if self.check_shutdown() {
                    break;
                }
                self.expire_timers();
            }
        }
        self.close_listeners();
        tracing::debug!(worker = self.id, "worker stopped");
        Ok(())
    }

    /// Returns true when the worker should exit now.
    fn check_shutdown(&mut self) -> bool {
        if self.shutdown.stop.load(Ordering::Relaxed) {
            self.abort_all();
            return self.settle();
        }
        if self.draining.is_none() && self.shutdown.drain.load(Ordering::Relaxed) {
            let deadline = self.now + self.timeouts.drain.as_millis() as Millis;
            self.draining = Some(deadline);
            self.close_listeners();
            tracing::info!(worker = self.id, open = self.live, "draining");
        }
        match self.draining {
            Some(deadline) if self.now >= deadline => {
                if self.live > 0 {
                    self.counters.drain_aborted.add(self.live as u64);
                }
                self.abort_all();
                self.settle()
            }
            Some(_) => self.live == 0,
            None => false,
        }
    }

    /// After `abort_all`: waits (bounded) for the remaining completions so that no operation
    /// outlives the buffers it points into.
    fn settle(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.live > 0 && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        true
    }

    fn close_listeners(&mut self) {
        for l in mem::take(&mut self.listeners) {
            // Cancel the multishot accept (its completion is ignored) and close the socket:
            // with SO_REUSEPORT the kernel stops handing this worker new connections.
            let cancel =
                opcode::AsyncCancel::new(UserData::new(Op::Accept, 0, l.fd as u32).encode())
                    .build()
                    .user_data(UserData::new(Op::Cancel, 0, 0).encode());
            self.push(cancel);
            // SAFETY: the fd is ours and closed once (listeners are drained).
            unsafe { libc::close(l.fd) };
        }
        let _ = self.ring.submit();
    }

    fn arm_listeners(&mut self) {
        if self.draining.is_some() {
            return;
        }
        for i in 0..self.listeners.len() {
            let l = &self.listeners[i];
            if l.armed || self.now < l.retry_at {
                continue;
            }
            let fd = l.fd;
            let e = opcode::AcceptMulti::new(types::Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(UserData::new(Op::Accept, 0, fd as u32).encode());
            self.push(e);
            self.listeners[i].armed = true;
        }
    }

    /// Queues an SQE, submitting first if the queue is full.
    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every buffer and address an entry points at lives in the worker (slab
            // entries, slot pool, buffer ring, `connect_timeout`) until its completion arrives:
            // connections are freed only when their in-flight count is 0.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                tracing::warn!(worker = self.id, error = %err, "io_uring submit failed");
            }
        }
    }

    fn reap(&mut self) {
        loop {
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if self.cqes.is_empty() {
                break;
            }
            let batch = mem::take(&mut self.cqes);
            for &(ud, res, flags) in &batch {
                self.complete(ud, res, flags);
            }
            self.cqes = batch;
            self.serve_slot_waiters();
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let Some(ud) = UserData::decode(ud) else {
            tracing::error!(worker = self.id, ud, "completion with unknown user_data");
            return;
        };
        match ud.op {
            Op::Cancel => {}
            Op::Accept => self.on_accept(ud.index as RawFd, res, flags),
            _ => {
                let idx = ud.index;
                let valid =
                    matches!(self.conns.get(idx as usize), Some(Some(c)) if c.gen == ud.gen);
                if !valid {
                    tracing::error!(worker = self.id, ?ud, "completion for a freed connection");
                    return;
                }
                let more = cqueue::more(flags);
                let c = self.conn(idx);
                if !more {
                    c.in_flight -= 1;
                }
                if c.closing {
                    // Torn down: only give back what the completion lent us.
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        self.bufs.recycle(bid);
                    }
                    self.pump(idx);
                    return;
                }
                match ud.op {
                    Op::ClientRecv => self.on_recv(idx, true, res, flags, more),
                    Op::BackendRecv => self.on_recv(idx, false, res, flags, more),
                    Op::ClientSend => self.on_send(idx, true, res),
                    Op::BackendSend => self.on_send(idx, false, res),
                    Op::BackendConnect => self.on_connect(idx, res),
                    Op::ConnectTimeout | Op::Accept | Op::Cancel | Op::Kick => {}
                }
                self.pump(idx);
            }
        }
    }

    fn conn(&mut self, idx: u32) -> &mut Conn {
        self.conns[idx as usize].as_mut().expect("live connection")
    }

    fn on_accept(&mut self, lfd: RawFd, res: i32, flags: u32) {
        let Some(pos) = self.listeners.iter().position(|l| l.fd == lfd) else {
            // A completion for a listener closed by draining.
            if res >= 0 {
                // SAFETY: a socket the kernel just gave us and nobody else knows.
                unsafe { libc::close(res) };
            }
            return;
        };
        if !cqueue::more(flags) {
            self.listeners[pos].armed = false;
        }
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            tracing::warn!(worker = self.id, error = %err, "accept failed");
            self.listeners[pos].retry_at = self.now + LISTEN_RETRY;
            return;
        }
        let fd = res;
        if self.live >= self.limits.max_connections_per_worker || self.draining.is_some() {
            // Refuse at once: a client waiting in a queue is worse than one told no.
            self.counters.refused_full.inc();
            set_linger_zero(fd);
            // SAFETY: fd is ours (just accepted) and closed once.
            unsafe { libc::close(fd) };
            return;
        }
        self.counters.accepted.inc();
        match self.new_conn(fd, self.listeners[pos].tls) {
            Ok(idx) => self.pump(idx),
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "cannot set up accepted connection");
                // SAFETY: as above.
                unsafe { libc::close(fd) };
            }
        }
    }

    fn new_conn(&mut self, fd: RawFd, tls: bool) -> io::Result<u32> {
        let client_addr = sockaddr_of(fd, libc::getpeername)?;
        let local_addr = sockaddr_of(fd, libc::getsockname)?;
        set_nodelay(fd);
        let limit = self.limits.buffer_per_direction;
        let protocol = self.backend.proxy_protocol;
        let session = match (&self.tls, tls) {
            (Some(config), true) => {
                Session::new(config.clone(), protocol, client_addr, local_addr, limit)
                    .map_err(io::Error::other)?
            }
            (None, true) => {
                return Err(io::Error::other(
                    "a TLS listener without a TLS configuration",
                ))
            }
            (_, false) => Session::plain(protocol, client_addr, local_addr, limit),
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        let gen = self.next_gen();
        self.conns[idx as usize] = Some(Conn {
            gen,
            session,
            client_fd: fd,
            client_addr,
            backend_fd: -1,
            backend: BackendState::None,
            server: 0,
            attempts: 0,
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            backend_sockaddr: unsafe { mem::zeroed() },
            backend_socklen: 0,
            client_recv: Recv::Idle,
            backend_recv: Recv::Idle,
            to_client: Tx::default(),
            to_backend: Tx::default(),
            client_wr_shut: false,
            backend_wr_shut: false,
            in_flight: 0,
            closing: false,
            accepted_at: self.now,
            last_active: self.now,
            handshake_counted: false,
            waiting_for_slot: false,
        });
        self.live += 1;
        self.counters.active.inc();
        self.wheel.insert(
            self.now + self.timeouts.handshake.as_millis() as Millis,
            (idx, gen),
        );
        Ok(idx)
    }

    /// A worker-wide generation counter: a slot's next tenant never has its previous
    /// tenant's generation (that would take 2^24 connections while a completion is late).
    fn next_gen(&mut self) -> u32 {
        self.gen_counter = (self.gen_counter + 1) & GEN_MASK;
        self.gen_counter
    }
}

impl Worker {
    fn on_recv(&mut self, idx: u32, client: bool, res: i32, flags: u32, more: bool) {
        let now = self.now;
        let counters = &self.counters;
        let bufs = &mut self.bufs;
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        let bid = cqueue::buffer_select(flags);
        {
            let state = if client {
                &mut c.client_recv
            } else {
                &mut c.backend_recv
            };
            if !more && *state != Recv::Eof {
                *state = Recv::Idle;
            }
        }
        if res > 0 {
            let Some(bid) = bid else {
                tracing::error!(worker = self.id, "receive completion without a buffer");
                return;
            };
            let data = bufs.get(bid, res as usize);
            c.last_active = now;
            if client {
                counters.client_bytes_in.add(res as u64);
                let r = c.session.client_recv(data);
                bufs.recycle(bid);
                if let Err(e) = r {
                    counters.tls_errors.inc();
                    tracing::debug!(worker = self.id, client = %c.client_addr, error = %e, "TLS error");
                }
            } else {
                counters.backend_bytes_in.add(res as u64);
                c.session.backend_recv(data);
                bufs.recycle(bid);
            }
            return;
        }
        if let Some(bid) = bid {
            bufs.recycle(bid);
        }
        if res == 0 {
            if client {
                c.client_recv = Recv::Eof;
                let _ = c.session.client_eof();
            } else {
                c.backend_recv = Recv::Eof;
                c.session.backend_eof();
            }
            return;
        }
        match -res {
            libc::ENOBUFS => counters.recv_buffer_starved.inc(),
            libc::ECANCELED => {}
            errno => {
                let err = io::Error::from_raw_os_error(errno);
                if client {
                    counters.client_errors.inc();
                    tracing::debug!(worker = self.id, client = %c.client_addr, error = %err, "client receive failed");
                    self.finish(idx, false);
                } else {
                    tracing::debug!(worker = self.id, error = %err, "backend receive failed");
                    self.backend_lost(idx);
                }
            }
        }
    }

    fn on_send(&mut self, idx: u32, client: bool, res: i32) {
        let now = self.now;
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        let tx = if client {
            &mut c.to_client
        } else {
            &mut c.to_backend
        };
        tx.in_flight = false;
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if client {
                self.counters.client_errors.inc();
                tracing::debug!(worker = self.id, error = %err, "client send failed");
                self.finish(idx, false);
            } else {
                tracing::debug!(worker = self.id, error = %err, "backend send failed");
                self.backend_lost(idx);
            }
            return;
        }
        tx.start += res as usize;
        debug_assert!(tx.start <= tx.end, "wrote more than was queued");
        c.last_active = now;
        if client {
            self.counters.client_bytes_out.add(res as u64);
        } else {
            self.counters.backend_bytes_out.add(res as u64);
        }
        if tx.is_empty() {
            if let Some(slot) = tx.slot.take() {
                self.slots.give_back(slot);
            }
            tx.start = 0;
            tx.end = 0;
        }
    }

    fn on_connect(&mut self, idx: u32, res: i32) {
        let n = self.backend.servers.len();
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if c.backend != BackendState::Connecting {
            return;
        }
        if res == 0 {
            c.backend = BackendState::Connected;
            self.counters.backend_connects.inc();
            return;
        }
        let server = self.backend.servers[c.server];
        // SAFETY: the fd is ours; no other operation uses it (the connect has completed).
        unsafe { libc::close(c.backend_fd) };
        c.backend_fd = -1;
        c.attempts += 1;
        if res == -libc::ECANCELED {
            self.counters.backend_connect_timeouts.inc();
            tracing::debug!(worker = self.id, %server, "backend connect timed out");
        } else {
            self.counters.backend_connect_errors.inc();
            let err = io::Error::from_raw_os_error(-res);
            tracing::debug!(worker = self.id, %server, error = %err, "backend connect failed");
        }
        if c.attempts < n {
            c.server = (c.server + 1) % n;
            c.backend = BackendState::None;
            self.start_connect(idx);
        } else {
            c.backend = BackendState::Connected;
            let client = c.client_addr;
            self.warn_backend(server, client, res);
            self.backend_lost(idx);
        }
    }

    fn warn_backend(&mut self, server: SocketAddr, client: SocketAddr, res: i32) {
        if matches!(self.last_backend_warn, Some(t) if self.now < t + 1000) {
            self.backend_warns_suppressed += 1;
            return;
        }
        let why = if res == -libc::ECANCELED {
            "connect timed out".to_string()
        } else {
            io::Error::from_raw_os_error(-res).to_string()
        };
        tracing::warn!(
            worker = self.id,
            %server,
            %client,
            error = %why,
            suppressed = self.backend_warns_suppressed,
            "no backend reachable; closing the client connection"
        );
        self.last_backend_warn = Some(self.now);
        self.backend_warns_suppressed = 0;
    }

    /// The backend cannot be reached or failed: close it and end the client's session
    /// politely (close_notify after what was already encrypted).
    fn backend_lost(&mut self, idx: u32) {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if matches!(c.backend, BackendState::Failed) {
            return;
        }
        self.counters.backend_failures.inc();
        if c.backend_fd >= 0 {
            if c.in_flight > 0 {
                // Make any operation still on this socket complete now.
                // SAFETY: our socket.
                unsafe { libc::shutdown(c.backend_fd, libc::SHUT_RDWR) };
            }
            // SAFETY: our socket, closed once (set to -1 right after).
            unsafe { libc::close(c.backend_fd) };
            c.backend_fd = -1;
        }
        c.backend = BackendState::Failed;
        c.session.close();
        let cancel = (c.backend_recv == Recv::Armed).then(|| {
            c.backend_recv = Recv::Cancelling;
            UserData::new(Op::BackendRecv, c.gen, idx).encode()
        });
        // Unsent plaintext for the failed backend is dropped. A write still in flight points
        // into the slot: it stays with the connection until it is freed.
        if !c.to_backend.in_flight {
            if let Some(slot) = c.to_backend.slot.take() {
                self.slots.give_back(slot);
            }
            c.to_backend.start = 0;
            c.to_backend.end = 0;
        }
        if let Some(ud) = cancel {
            self.push_cancel(ud);
        }
    }

    fn start_connect(&mut self, idx: u32) {
        let n = self.backend.servers.len();
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if c.attempts == 0 {
            c.server = self.next_server % n;
            self.next_server = self.next_server.wrapping_add(1);
        }
        let addr = self.backend.servers[c.server];
        let fd = match backend_socket(&addr) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "cannot create backend socket");
                c.backend = BackendState::Connected;
                self.backend_lost(idx);
                return;
            }
        };
        c.backend_fd = fd;
        c.backend = BackendState::Connecting;
        c.backend_socklen = write_sockaddr(&addr, &mut c.backend_sockaddr);
        let gen = c.gen;
        let entries = crate::uring::connect_with_timeout(
            fd,
            &c.backend_sockaddr,
            c.backend_socklen,
            &self.connect_timeout,
            gen,
            idx,
        );
        c.in_flight += 2;
        crate::uring::make_room(&mut self.ring, 2);
        for e in entries {
            self.push(e);
        }
    }

    fn push_cancel(&mut self, target: u64) {
        let e = opcode::AsyncCancel::new(target)
            .build()
            .user_data(UserData::new(Op::Cancel, 0, 0).encode());
        self.push(e);
    }

    /// Moves a connection forward after any event: feeds outputs, arms or cancels receives,
    /// translates finished directions into half-closes, and ends the connection when both
    /// directions are done.
    fn pump(&mut self, idx: u32) {
        let eager = self.backend.connect == ConnectPolicy::Eager;
        {
            let c = self.conns[idx as usize].as_mut().expect("live connection");
            if c.closing {
                if c.in_flight == 0 {
                    self.free(idx);
                }
                return;
            }
            if !c.handshake_counted && c.session.stage() == Stage::Proxying {
                c.handshake_counted = true;
                if c.session.is_tls() {
                    self.counters.handshakes.inc();
                }
                if c.session.resumed() == Some(true) {
                    self.counters.resumed.inc();
                }
            }
            if c.backend == BackendState::None {
                if c.session.needs_backend(eager) {
                    self.start_connect(idx);
                } else if c.session.client_finished() && c.session.stage() == Stage::Proxying {
                    // The client finished without sending anything: no backend is needed.
                    c.session.close();
                }
            }
        }

        // Client → backend.
        if self.conn(idx).backend == BackendState::Connected {
            if let Err(e) = self.fill_backend(idx) {
                self.counters.tls_errors.inc();
                tracing::debug!(worker = self.id, error = %e, "TLS error");
            }
            self.flush(idx, false);
            let c = self.conn(idx);
            if c.session.client_finished()
                && c.to_backend.is_empty()
                && !c.to_backend.in_flight
                && !c.backend_wr_shut
                && c.session.stage() == Stage::Proxying
            {
                c.backend_wr_shut = true;
                // SAFETY: our connected socket.
                unsafe { libc::shutdown(c.backend_fd, libc::SHUT_WR) };
            }
        }

        // Backend → client.
        self.fill_client(idx);
        self.flush(idx, true);
        {
            let c = self.conn(idx);
            if c.session.server_finished()
                && c.to_client.is_empty()
                && !c.to_client.in_flight
                && !c.client_wr_shut
            {
                c.client_wr_shut = true;
                // SAFETY: our connected socket.
                unsafe { libc::shutdown(c.client_fd, libc::SHUT_WR) };
            }
        }

        // Receives.
        self.update_recv(idx, true);
        self.update_recv(idx, false);

        let c = self.conn(idx);
        let client_out_done = c.to_client.is_empty() && !c.to_client.in_flight;
        let done = client_out_done
            && (c.session.stage() == Stage::Failed
                || (c.client_wr_shut
                    && match c.backend {
                        BackendState::Connected => c.backend_wr_shut && c.backend_recv == Recv::Eof,
                        BackendState::Connecting => false,
                        BackendState::None | BackendState::Failed | BackendState::Done => true,
                    }));
        if done {
            if c.backend == BackendState::Connected {
                c.backend = BackendState::Done;
            }
            self.finish(idx, true);
        }
    }

    fn fill_backend(&mut self, idx: u32) -> Result<(), crate::proxy::SessionError> {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if !c.session.has_backend_output() {
            return Ok(());
        }
        let slot = match room(&mut c.to_backend, &mut self.slots) {
            Room::Slot(slot) => slot,
            // The write in flight will make room; its completion pumps again.
            Room::Full => return Ok(()),
            Room::PoolEmpty => {
                self.wait_for_slot(idx);
                return Ok(());
            }
        };
        let tx = &mut c.to_backend;
        let buf = self.slots.slot_mut(slot);
        let n = c.session.backend_output(&mut buf[tx.end..])?;
        tx.end += n;
        Ok(())
    }

    fn fill_client(&mut self, idx: u32) {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if !c.session.wants_client_write() {
            return;
        }
        let slot = match room(&mut c.to_client, &mut self.slots) {
            Room::Slot(slot) => slot,
            Room::Full => return,
            Room::PoolEmpty => {
                self.wait_for_slot(idx);
                return;
            }
        };
        let tx = &mut c.to_client;
        let buf = self.slots.slot_mut(slot);
        tx.end += c.session.client_output(&mut buf[tx.end..]);
    }

    /// Queues the connection for the next free send slot (once, however often it asks).
    fn wait_for_slot(&mut self, idx: u32) {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if !c.waiting_for_slot {
            c.waiting_for_slot = true;
            self.counters.send_slot_waits.inc();
            self.slot_waiters.push_back((idx, c.gen));
        }
    }

    /// Submits a write of the queued bytes, unless one is in flight.
    fn flush(&mut self, idx: u32, client: bool) {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        let (fd, tx, op) = if client {
            (c.client_fd, &mut c.to_client, Op::ClientSend)
        } else {
            (c.backend_fd, &mut c.to_backend, Op::BackendSend)
        };
        if tx.in_flight || tx.is_empty() {
            return;
        }
        let Some(slot) = tx.slot else { return };
        let e = opcode::WriteFixed::new(
            types::Fd(fd),
            self.slots.ptr(slot, tx.start),
            (tx.end - tx.start) as u32,
            0,
        )
        .build()
        .user_data(UserData::new(op, c.gen, idx).encode());
        tx.in_flight = true;
        c.in_flight += 1;
        self.push(e);
    }

    fn update_recv(&mut self, idx: u32, client: bool) {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        let (want, fd, state, op) = if client {
            (
                c.session.wants_client_read(),
                c.client_fd,
                &mut c.client_recv,
                Op::ClientRecv,
            )
        } else {
            (
                c.backend == BackendState::Connected && c.session.wants_backend_read(),
                c.backend_fd,
                &mut c.backend_recv,
                Op::BackendRecv,
            )
        };
        let ud = UserData::new(op, c.gen, idx).encode();
        match (*state, want) {
            (Recv::Idle, true) => {
                *state = Recv::Armed;
                c.in_flight += 1;
                let e = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
                    .build()
                    .user_data(ud);
                self.push(e);
            }
            (Recv::Armed, false) => {
                *state = Recv::Cancelling;
                self.push_cancel(ud);
            }
            _ => {}
        }
    }

    /// Ends a connection: closes both sockets (with RST unless `graceful`) and frees the slot
    /// once every operation on it has completed.
    fn finish(&mut self, idx: u32, graceful: bool) {
        let c = self.conns[idx as usize].as_mut().expect("live connection");
        if c.closing {
            return;
        }
        c.closing = true;
        self.counters.closed.inc();
        let gen = c.gen;
        let mut cancels = [0u64; 3];
        let mut nc = 0;
        if c.client_recv == Recv::Armed {
            c.client_recv = Recv::Cancelling;
            cancels[nc] = UserData::new(Op::ClientRecv, gen, idx).encode();
            nc += 1;
        }
        if c.backend_recv == Recv::Armed {
            c.backend_recv = Recv::Cancelling;
            cancels[nc] = UserData::new(Op::BackendRecv, gen, idx).encode();
            nc += 1;
        }
        if c.backend == BackendState::Connecting {
            cancels[nc] = UserData::new(Op::BackendConnect, gen, idx).encode();
            nc += 1;
        }
        for fd in [c.client_fd, c.backend_fd] {
            if fd < 0 {
                continue;
            }
            if !graceful {
                set_linger_zero(fd);
            }
            if c.to_client.in_flight || c.to_backend.in_flight {
                // A write to a peer that does not read would never complete.
                // SAFETY: our socket.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            // SAFETY: our socket, closed once (`closing` guards re-entry). Operations still in
            // flight hold their own reference to the file until they complete.
            unsafe { libc::close(fd) };
        }
        c.client_fd = -1;
        c.backend_fd = -1;
        for &ud in &cancels[..nc] {
            self.push_cancel(ud);
        }
        if self.conn(idx).in_flight == 0 {
            self.free(idx);
        }
    }

    fn free(&mut self, idx: u32) {
        let c = self.conns[idx as usize].take().expect("live connection");
        debug_assert_eq!(
            c.in_flight, 0,
            "freeing a connection with operations in flight"
        );
        for slot in [c.to_client.slot, c.to_backend.slot].into_iter().flatten() {
            self.slots.give_back(slot);
        }
        self.free.push(idx);
        self.live -= 1;
        self.counters.active.dec();
    }

    fn abort_all(&mut self) {
        for idx in 0..self.conns.len() as u32 {
            if matches!(&self.conns[idx as usize], Some(c) if !c.closing) {
                self.finish(idx, false);
            }
        }
        let _ = self.ring.submit();
    }

    fn serve_slot_waiters(&mut self) {
        // Bounded by the queue's length now: a connection that still finds no slot re-queues
        // itself behind the others and waits for the next batch.
        for _ in 0..self.slot_waiters.len() {
            if self.slots.in_use() >= self.slots_capacity() {
                break;
            }
            let Some((idx, gen)) = self.slot_waiters.pop_front() else {
                break;
            };
            let ok = matches!(&self.conns.get(idx as usize), Some(Some(c)) if c.gen == gen && !c.closing);
            if ok {
                self.conn(idx).waiting_for_slot = false;
                self.pump(idx);
            }
        }
    }

    fn slots_capacity(&self) -> usize {
        self.slots.capacity()
    }

    fn expire_timers(&mut self) {
        let mut due = mem::take(&mut self.due);
        self.wheel.expire(self.now, |_, item| due.push(item));
        for &(idx, gen) in &due {
            let Some(Some(c)) = self.conns.get_mut(idx as usize) else {
                continue;
            };
            if c.gen != gen || c.closing {
                continue;
            }
            let (deadline, handshake) = if c.session.stage() == Stage::Handshake {
                (
                    c.accepted_at + self.timeouts.handshake.as_millis() as Millis,
                    true,
                )
            } else {
                (
                    c.last_active + self.timeouts.idle.as_millis() as Millis,
                    false,
                )
            };
            if self.now < deadline {
                self.wheel.insert(deadline, (idx, gen));
                continue;
            }
            if handshake {
                self.counters.handshake_timeouts.inc();
            } else {
                self.counters.idle_timeouts.inc();
            }
            tracing::debug!(worker = self.id, client = %c.client_addr, handshake, "connection timed out");
            self.finish(idx, false);
        }
        due.clear();
        self.due = due;
    }
}

/// Where a direction's next bytes can go.
enum Room {
    /// This slot (the direction's own, or a fresh one) has room at `tx.end`.
    Slot(SlotId),
    /// The direction's slot is full; a write is in flight or about to be submitted.
    Full,
    /// The direction has no slot and the pool has none to lend.
    PoolEmpty,
}

fn room(tx: &mut Tx, slots: &mut SlotPool) -> Room {
    if let Some(slot) = tx.slot {
        if !tx.in_flight && tx.start > 0 {
            // Make room at the end: move the unsent bytes to the front.
            let (s, e) = (tx.start, tx.end);
            slots.slot_mut(slot).copy_within(s..e, 0);
            tx.start = 0;
            tx.end = e - s;
        }
        return if tx.end < BUF_SIZE {
            Room::Slot(slot)
        } else {
            Room::Full
        };
    }
    match slots.take() {
        Some(slot) => {
            tx.slot = Some(slot);
            tx.start = 0;
            tx.end = 0;
            Room::Slot(slot)
        }
        None => Room::PoolEmpty,
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: valid socket fd, pointer to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Makes the next close send RST instead of FIN (abortive close).
pub(crate) fn set_linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd, pointer to a linger struct of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn backend_socket(addr: &SocketAddr) -> io::Result<RawFd> {
    let fd = tcp_socket(addr)?;
    set_nodelay(fd);
    Ok(fd)
}

/// A blocking, close-on-exec TCP socket of `addr`'s family (io_uring drives it; it never
/// blocks a thread).
pub(crate) fn tcp_socket(addr: &SocketAddr) -> io::Result<RawFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Writes `addr` as a sockaddr_in/sockaddr_in6 into `out`; returns its length.
pub fn write_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a socket's peer or local address.
fn sockaddr_of(
    fd: RawFd,
    f: unsafe extern "C" fn(RawFd, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; `f` is getpeername/getsockname, which write
    // at most `len` bytes into it.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: see above.
    if unsafe {
        f(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    sockaddr_to_std(&ss)
}

pub fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Ok(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(io::Error::other(format!("unexpected address family {f}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trips() {
        for a in ["10.1.2.3:443", "[2001:db8::1]:8443", "127.0.0.1:0"] {
            let addr: SocketAddr = a.parse().expect("address");
            // SAFETY: zeroed sockaddr_storage is valid.
            let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
            write_sockaddr(&addr, &mut ss);
            assert_eq!(sockaddr_to_std(&ss).expect("parse back"), addr);
        }
    }
}
