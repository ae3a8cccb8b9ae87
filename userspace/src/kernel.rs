//! A kernel-mode worker: one pinned thread, one io_uring, its own listening sockets, its own
//! connections and counters; it shares nothing with other workers.
//!
//! The worker is the kernel path's thin executor of the shared connection driver
//! ([`crate::driver`]): it accepts (multishot ACCEPT on its SO_REUSEPORT listeners), gives each
//! connection a [`Conn`] machine and two [`Sock`] legs (client and backend) on its ring, turns
//! completions into machine events and runs the pump after each. Every rule about a connection
//! (when to connect, failover, when to close and how, deadlines, counters) is the driver's;
//! what is here is only the kernel socket transport: accept, the per-worker limits at accept,
//! timers on a wheel, drain and stop.
//!
//! Not here: TLS details (`tls`, `proxy`), configuration parsing (`config`), the control socket
//! (`control`).

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, types, IoUring};
use rustls::ServerConfig;

use crate::config::{Backend, Limits, Timeouts};
use crate::counters::WorkerCounters;
use crate::driver::sock::{set_linger_zero, splice, Io, Side, Sock};
use crate::driver::timer::Millis;
use crate::driver::{
    self, Backends, ClientOutput, Conn, End, Key, Policy, Shared, SourceLimits, Table, Why,
};
use crate::proxy::Session;
use crate::reload::Watch;
use crate::server::Shutdown;
use crate::sys::uring::{Op, UserData};
use crate::tcp::time::Instant;

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
    /// The connection driver's deadlines and connect policy ([`Policy::from_config`]).
    pub policy: Policy,
    pub counters: Arc<WorkerCounters>,
    /// Its latency histograms (`metrics::latency`).
    pub latency: Arc<crate::metrics::WorkerLatency>,
    pub shutdown: Arc<Shutdown>,
    /// Reloaded configurations ([`crate::reload`]).
    pub watch: Watch,
    /// Where the worker publishes its backend servers' state (`tern ctl backends`).
    pub board: Arc<crate::driver::board::Board>,
    /// This worker's end of the access log, when it is on.
    pub access_log: Option<crate::access_log::Sink>,
}

/// One listening socket of a worker.
#[derive(Debug, Clone, Copy)]
pub struct ListenSocket {
    pub fd: RawFd,
    /// Terminate TLS on its connections; `false`: plain TCP (L4) proxying.
    pub tls: bool,
    /// Its listener's index in `config.listeners`.
    pub listener: u16,
}

const RING_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16 * 1024;
const RECV_BUFFERS: u16 = 512;
/// Timer granularity; also the longest the worker sleeps without looking at its flags.
const TICK: Duration = Duration::from_millis(100);
const LISTEN_RETRY: Millis = 1000;

pub struct Worker {
    id: usize,
    /// What every connection shares (the ring first: dropped before the buffers it uses).
    sh: Shared,
    /// Connections: the driver's machine and two socket legs each (client and backend).
    conns: Table<Sock>,
    listeners: Vec<Listener>,
    tls: Option<Arc<ServerConfig>>,
    proxy_protocol: crate::config::ProxyProtocol,
    limits: Limits,
    drain_timeout: Duration,
    shutdown: Arc<Shutdown>,
    epoch: std::time::Instant,
    now: Instant,
    draining: Option<Instant>,
    cqes: Vec<(u64, i32, u32)>,
    watch: Watch,
}

struct Listener {
    fd: RawFd,
    tls: bool,
    /// Index in `config.listeners`.
    index: u16,
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
        let max = setup.limits.max_connections_per_worker;
        // A slot is lent only while bytes wait to be written and never across a blocked write,
        // so the pool need not cover every connection: beyond it connections wait (back
        // pressure, never unbounded memory).
        let slot_count = (2 * max).clamp(64, 2048) as u32;
        let epoch = std::time::Instant::now();
        let mut io = Io::new(
            ring,
            slot_count,
            RECV_BUFFERS,
            setup.backend.connect_timeout,
        )?;
        io.pipes
            .configure(setup.limits.splice, setup.limits.buffer_per_direction);
        io.zc.configure(setup.limits.send_zc);
        Ok(Worker {
            id: setup.id,
            sh: Shared {
                io,
                backends: Backends::from_config(&setup.backend, setup.id, &setup.board),
                sources: SourceLimits::new(setup.limits.max_connections_per_source),
                policy: setup.policy,
                counters: setup.counters,
                access_log: setup.access_log.map(|s| s.with_epoch(epoch)),
                latency_servers: setup
                    .latency
                    .servers(setup.backend.servers.iter().map(|s| s.address)),
                latency: setup.latency,
            },
            conns: Table::new(max, TICK.as_millis() as u64, Instant::ZERO)
                .reporting_to(setup.board.census.register("kernel", setup.id)),
            listeners: setup
                .listeners
                .into_iter()
                .map(|l| Listener {
                    fd: l.fd,
                    tls: l.tls,
                    index: l.listener,
                    armed: false,
                    retry_at: 0,
                })
                .collect(),
            tls: setup.tls,
            proxy_protocol: setup.backend.proxy_protocol,
            limits: setup.limits,
            drain_timeout: setup.timeouts.drain,
            shutdown: setup.shutdown,
            epoch,
            now: Instant::ZERO,
            draining: None,
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            watch: setup.watch,
        })
    }

    fn millis(&self) -> Millis {
        self.now.as_micros() / 1000
    }

    /// Runs until drained or stopped.
    pub fn run(mut self) -> io::Result<()> {
        tracing::debug!(worker = self.id, "worker running");
        let mut next_tick = 0;
        loop {
            self.arm_listeners();
            let ts = types::Timespec::new().nsec(TICK.as_nanos() as u32);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.sh.io.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.now = Instant::from_micros(self.epoch.elapsed().as_micros() as u64);
            self.reap();
            crate::fault::check(crate::fault::Site::KernelWorker(self.id))?;
            if self.millis() >= next_tick {
                next_tick = self.millis() + TICK.as_millis() as u64;
                if self.check_shutdown() {
                    break;
                }
                self.check_reload();
                self.expire_timers();
            }
        }
        self.close_listeners();
        tracing::debug!(worker = self.id, "worker stopped");
        Ok(())
    }

    /// Takes a reloaded configuration, if there is one, for the connections accepted from now
    /// on (open ones keep theirs).
    fn check_reload(&mut self) {
        let Some(live) = self.watch.poll() else {
            return;
        };
        let config = &live.config;
        self.tls.clone_from(&live.tls);
        self.proxy_protocol = config.backend.proxy_protocol;
        self.limits = config.limits;
        self.sh
            .io
            .pipes
            .configure(config.limits.splice, config.limits.buffer_per_direction);
        self.sh.io.zc.configure(config.limits.send_zc);
        self.drain_timeout = config.timeouts.drain;
        self.conns
            .set_limit(config.limits.max_connections_per_worker);
        self.sh.reconfigure(config, self.now);
        self.watch.applied(live.generation);
        tracing::debug!(
            worker = self.id,
            generation = live.generation,
            "configuration reloaded"
        );
    }

    /// Returns true when the worker should exit now.
    fn check_shutdown(&mut self) -> bool {
        if self.shutdown.stop.load(Ordering::Relaxed) {
            self.abort_all();
            return self.settle();
        }
        if self.draining.is_none() && self.shutdown.drain.load(Ordering::Relaxed) {
            self.draining = Some(self.now + self.drain_timeout.into());
            self.stop_accepting();
            tracing::info!(worker = self.id, open = self.conns.len(), "draining");
        }
        match self.draining {
            Some(deadline) if self.now >= deadline => {
                let open = self.conns.open();
                if open > 0 {
                    self.sh.counters.drain_aborted.add(open as u64);
                }
                self.abort_all();
                self.settle()
            }
            // Done once the last accept has completed (and was served) and the last
            // connection ended.
            Some(_) => self.conns.is_empty() && self.listeners.is_empty(),
            None => false,
        }
    }

    /// After `abort_all`: waits (bounded) for the remaining completions so that no operation
    /// outlives the buffers it points into.
    fn settle(&mut self) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.conns.is_empty() && std::time::Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.sh.io.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        true
    }

    /// The drain's first step: cancels the multishot accepts, and closes each socket once its
    /// accept's last completion is in ([`Worker::on_accept`]). Until then a connection the
    /// kernel had already accepted for us still arrives and is served: with the sockets passed
    /// to a new tern ([`crate::upgrade`]), an accept queue is never closed under a client.
    fn stop_accepting(&mut self) {
        let mut i = 0;
        while i < self.listeners.len() {
            let l = &self.listeners[i];
            if l.armed {
                let cancel =
                    opcode::AsyncCancel::new(UserData::new(Op::Accept, 0, l.fd as u32).encode())
                        .build()
                        .user_data(UserData::new(Op::Cancel, 0, 0).encode());
                self.sh.io.push(cancel);
                i += 1;
            } else {
                let l = self.listeners.swap_remove(i);
                // SAFETY: the fd is ours, has no accept in flight, and is closed once (it
                // left the list).
                unsafe { libc::close(l.fd) };
            }
        }
        let _ = self.sh.io.ring.submit();
    }

    fn close_listeners(&mut self) {
        for l in mem::take(&mut self.listeners) {
            // Cancel the multishot accept (its completion is ignored) and close the socket:
            // with SO_REUSEPORT the kernel stops handing this worker new connections.
            let cancel =
                opcode::AsyncCancel::new(UserData::new(Op::Accept, 0, l.fd as u32).encode())
                    .build()
                    .user_data(UserData::new(Op::Cancel, 0, 0).encode());
            self.sh.io.push(cancel);
            // SAFETY: the fd is ours and closed once (listeners are drained).
            unsafe { libc::close(l.fd) };
        }
        let _ = self.sh.io.ring.submit();
    }

    fn arm_listeners(&mut self) {
        if self.draining.is_some() {
            return;
        }
        let now = self.millis();
        for i in 0..self.listeners.len() {
            let l = &self.listeners[i];
            if l.armed || now < l.retry_at {
                continue;
            }
            let fd = l.fd;
            let e = opcode::AcceptMulti::new(types::Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(UserData::new(Op::Accept, 0, fd as u32).encode());
            self.sh.io.push(e);
            self.listeners[i].armed = true;
        }
    }

    fn reap(&mut self) {
        loop {
            self.cqes.clear();
            self.cqes.extend(
                self.sh
                    .io
                    .ring
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
            // Connections that found no free send slot: slots may have come back.
            for key in mem::take(&mut self.sh.io.retry) {
                self.pump(key);
            }
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let Some(ud) = UserData::decode(ud) else {
            tracing::error!(worker = self.id, ud, "completion with unknown user_data");
            return;
        };
        let key = Key {
            index: ud.index,
            gen: ud.gen,
        };
        let now = self.now;
        match ud.op {
            Op::Cancel | Op::Kick => {}
            Op::Probe | Op::ProbeTimeout => {
                self.sh
                    .backends
                    .probe_complete(ud.index as usize, ud.op, res, now)
            }
            Op::Accept => self.on_accept(ud.index as RawFd, res, flags),
            Op::ClientRecv | Op::ClientSend | Op::ClientPoll => {
                let Some(e) = self.conns.get_mut(key) else {
                    tracing::error!(worker = self.id, ?ud, "completion for a freed connection");
                    return;
                };
                let done =
                    e.client
                        .complete(&mut self.sh.io, key, ud.op, res, flags, &self.sh.counters);
                let counters = &self.sh.counters;
                self.sh
                    .io
                    .deliver(done, |ev| e.conn.client_event(ev, counters));
                self.pump(key);
            }
            Op::BackendRecv
            | Op::BackendSend
            | Op::BackendPoll
            | Op::BackendConnect
            | Op::ConnectTimeout => {
                let Some(e) = self.conns.get_mut(key) else {
                    tracing::error!(worker = self.id, ?ud, "completion for a freed connection");
                    return;
                };
                driver::backend_completion(&mut self.sh, e, key, (ud.op, res, flags), now);
                self.pump(key);
            }
            Op::ClientSpliceIn
            | Op::ClientSpliceOut
            | Op::BackendSpliceIn
            | Op::BackendSpliceOut => {
                let Some(e) = self.conns.get_mut(key) else {
                    tracing::error!(worker = self.id, ?ud, "completion for a freed connection");
                    return;
                };
                splice::completion(&mut self.sh, e, (ud.op, res, flags), now);
                self.pump(key);
            }
        }
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
        let (tls, index) = (self.listeners[pos].tls, self.listeners[pos].index);
        if !cqueue::more(flags) {
            self.listeners[pos].armed = false;
            if self.draining.is_some() {
                // The cancelled accept's last completion: nothing more can arrive on it.
                let l = self.listeners.swap_remove(pos);
                // SAFETY: the fd is ours, its accept is over, and it is closed once.
                unsafe { libc::close(l.fd) };
                if res < 0 {
                    return;
                }
            }
        }
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            tracing::warn!(worker = self.id, error = %err, "accept failed");
            let retry_at = self.millis() + LISTEN_RETRY;
            if let Some(l) = self.listeners.get_mut(pos) {
                l.retry_at = retry_at;
            }
            return;
        }
        let fd = res;
        let refuse = |fd: RawFd| {
            // Refuse at once: a client waiting in a queue is worse than one told no.
            set_linger_zero(fd);
            // SAFETY: fd is ours (just accepted) and closed once.
            unsafe { libc::close(fd) };
        };
        // While draining, a connection the kernel accepted before the cancel is still served.
        if self.conns.is_full() {
            self.sh.counters.refused_full.inc();
            refuse(fd);
            return;
        }
        let (peer, local) = match endpoints(fd) {
            Ok(ends) => ends,
            Err(e) => {
                // The client is already gone (e.g. reset before we looked).
                tracing::debug!(worker = self.id, error = %e, "accepted connection is gone");
                self.sh.counters.client_errors.inc();
                refuse(fd);
                return;
            }
        };
        if !self.sh.sources.acquire(peer.ip()) {
            self.sh.counters.refused_source_limit.inc();
            refuse(fd);
            return;
        }
        self.sh.counters.accepted.inc();
        match self.new_conn(fd, peer, local, tls, index) {
            Ok(key) => self.pump(key),
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "cannot set up accepted connection");
                self.sh.sources.release(peer.ip());
                refuse(fd);
            }
        }
    }

    fn new_conn(
        &mut self,
        fd: RawFd,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
        listener: u16,
    ) -> io::Result<Key> {
        // SAFETY: `fd` is the socket just accepted, open for the duration of this borrow.
        let _ =
            socket2::SockRef::from(&unsafe { BorrowedFd::borrow_raw(fd) }).set_tcp_nodelay(true);
        let limit = self.limits.buffer_per_direction;
        let session = match (&self.tls, tls) {
            (Some(config), true) => {
                Session::new(config.clone(), self.proxy_protocol, peer, local, limit)
                    .map_err(io::Error::other)?
            }
            (None, true) => {
                return Err(io::Error::other(
                    "a TLS listener without a TLS configuration",
                ))
            }
            (_, false) => Session::plain(self.proxy_protocol, peer, local, limit),
        };
        let now = self.now;
        let key = self
            .conns
            .insert(
                Conn::new(session, peer, listener, self.sh.policy, now),
                Sock::adopt(Side::Client, fd),
                Sock::none(Side::Backend),
            )
            .ok_or_else(|| io::Error::other("connection table full"))?;
        self.sh.counters.active.inc();
        Ok(key)
    }

    /// Moves a connection forward after any event: the client leg, the backend leg (shared
    /// with the bypass path), the end.
    fn pump(&mut self, key: Key) {
        let now = self.now;
        let Some(e) = self.conns.get_mut(key) else {
            return;
        };
        if e.closing {
            if e.client.is_released() && e.backend.is_released() {
                self.free(key);
            }
            return;
        }
        // Plain connections: a direction the session has nothing of its own in goes through
        // a pipe (its receives are then not armed below).
        splice::pump(&mut self.sh.io, e, key);
        e.client
            .want_recv(&mut self.sh.io, e.conn.wants_client_read(), key);
        driver::pump_backend(&mut self.sh, e, key, now);
        let (io, counters, c) = (&mut self.sh.io, &*self.sh.counters, &mut e.conn);
        if c.wants_client_write() && !e.client.fill(io, |buf| c.client_output(buf, counters)) {
            counters.send_slot_waits.inc();
            io.retry.push(key);
        }
        e.client.flush(io, key);
        if c.fin_due(e.client.flushed(), now) {
            e.client.shutdown_write();
        }
        let client = ClientOutput {
            queued: !e.client.flushed(),
            progressed: e.client.take_progress(),
            flushed: e.client.flushed(),
        };
        match driver::settle(e, client, now) {
            Some(end) => self.finish(key, end),
            None => self.conns.schedule(key),
        }
    }

    /// Ends a connection: closes both legs (FIN or RST) and frees the entry once every
    /// operation on them has completed.
    fn finish(&mut self, key: Key, end: End) {
        let Some(e) = self.conns.get_mut(key) else {
            return;
        };
        let Some(graceful) = driver::begin_finish(&mut self.sh, e, end, self.now) else {
            return;
        };
        e.client.close(&mut self.sh.io, graceful);
        if e.client.is_released() && e.backend.is_released() {
            self.free(key);
        }
    }

    fn free(&mut self, key: Key) {
        if let Some(mut e) = self.conns.remove(key) {
            self.sh.io.pipes.recycle(&mut e.client);
            self.sh.io.pipes.recycle(&mut e.backend);
            self.sh.counters.active.dec();
        }
    }

    fn abort_all(&mut self) {
        for key in self.conns.keys() {
            if let Some(e) = self.conns.get_mut(key) {
                e.conn.abort(Why::Shutdown);
            }
            self.finish(key, End::Abort(Why::Shutdown));
        }
        let _ = self.sh.io.ring.submit();
    }

    fn expire_timers(&mut self) {
        self.sh.backends.probe(&mut self.sh.io, self.now);
        for key in self.conns.expire(self.now, &self.sh.counters) {
            self.pump(key);
        }
    }
}

/// The peer's and our address of an accepted socket.
fn endpoints(fd: RawFd) -> io::Result<(SocketAddr, SocketAddr)> {
    // SAFETY: `fd` is the socket just accepted, open for the duration of this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    let addr = |a: socket2::SockAddr| {
        a.as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    };
    Ok((addr(sock.peer_addr()?)?, addr(sock.local_addr()?)?))
}
