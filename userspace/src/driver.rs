//! The connection driver both data paths run: one sans-IO machine per proxied connection
//! ([`Conn`]), the rules every connection of a worker shares ([`Backends`] for choice,
//! failover and health, [`SourceLimits`], [`Slab`] for the connection table), and the
//! io_uring execution of a socket leg ([`sock::Sock`]) that the kernel path uses for clients
//! and backends and the bypass path for backends.
//!
//! The model is quinn-proto under quinn. A [`Conn`] owns the [`Session`] (TLS and the byte
//! rules), the state of the backend leg (connect, failover, failure, half-close), the
//! connection's deadlines (handshake, idle, send progress) and the decision when the connection
//! is over and how (FIN or RST). It is told what happened (`client_data`, `backend_connected`,
//! `on_timeout`, ...) with the time, and asked what to do (`poll_backend`, `client_output`,
//! `fin_due`, `poll_end`, `next_deadline`). It never performs I/O or reads a clock. The kernel
//! worker (`crate::kernel`) and the bypass proxy (`crate::bypass::proxy`) each only move bytes between
//! their client transport (a kernel socket; a TCB of tern's stack) and the machine, and execute
//! the operations it asks for. A rule that both paths need lives here, once.
//!
//! Not here: the TLS/byte rules themselves ([`crate::proxy`]), the TCP stack, rings and frames.

pub mod backends;
pub mod board;
pub mod census;
pub mod slab;
pub mod sock;
pub mod table;
#[cfg(test)]
mod tests;
pub mod timer;

use std::net::SocketAddr;

use crate::counters::WorkerCounters;
use crate::proxy::{Session, SessionError, Stage};
use crate::tcp::time::{Duration, Instant};

pub use backends::{Backends, SourceLimits};
pub use slab::{Key, Slab};
use sock::{Io, Sock};
pub use table::{Entry, Table};

/// The per-worker settings every connection's machine follows (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// From accept to the end of the TLS handshake (`timeouts.handshake_ms`).
    pub handshake: Duration,
    /// No plaintext moving either way for this long ends the connection (`timeouts.idle_ms`).
    pub idle: Duration,
    /// Output queued for a peer that makes no progress for this long ends the connection
    /// (`timeouts.send_ms`): a client (or backend) that never reads cannot hold buffers.
    pub send: Duration,
    /// After our FIN, how long the client may take to finish its side before the connection
    /// is reset (`tcp.fin_timeout_ms`; haproxy's `timeout client-fin`): a client that never
    /// closes does not hold a connection for `idle` after the server side is done.
    pub fin: Duration,
    /// `backend.connect = "eager"`: connect at accept rather than on the first plaintext byte.
    pub eager: bool,
}

impl Policy {
    pub fn from_config(config: &crate::config::Config) -> Policy {
        let (timeouts, backend) = (&config.timeouts, &config.backend);
        Policy {
            handshake: timeouts.handshake.into(),
            idle: timeouts.idle.into(),
            send: timeouts.send.into(),
            fin: config.tcp.fin_timeout.into(),
            eager: backend.connect == crate::config::ConnectPolicy::Eager,
        }
    }
}

/// One direction of a byte stream, as far as its end is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Bytes may still come.
    Open,
    /// The end (FIN, EOF, close) has been passed on.
    Finished,
}

/// The backend leg of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// No backend: none needed yet (`first-byte` waits for plaintext), or none ever.
    Idle,
    /// A connect to `Backends` server `server` is in flight; `first`: the server this
    /// connection tried first (failover moves forward from it and never comes back to it);
    /// `attempts` servers tried so far for this connection (this one included).
    Connecting {
        server: usize,
        first: usize,
        attempts: usize,
    },
    /// Connected to `server`. `write`: whether our FIN (SHUT_WR) has been sent; `read`:
    /// whether the backend's EOF has been passed to the session.
    Connected {
        server: usize,
        write: Flow,
        read: Flow,
    },
    /// No server could be reached, or the connection broke: the client side is closed
    /// politely (close_notify and FIN after what was already queued).
    Failed,
}

/// What the machine asks the transport to do with the backend leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOp {
    /// Open a connection to this address (with `backend.connect_timeout_ms`).
    Connect(SocketAddr),
    /// Everything for the backend is written: send FIN (SHUT_WR).
    ShutdownWrite,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished: FIN on both sides, nothing lost.
    Graceful,
    /// Cut: both sockets are reset (RST).
    Abort(Why),
}

/// Why a connection was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The client's transport failed (reset, error, or its TCB timed out).
    Client,
    HandshakeTimeout,
    IdleTimeout,
    SendTimeout,
    /// After our FIN the client did not finish its side within `Policy::fin`.
    FinTimeout,
    /// The backend's connection broke before it finished sending.
    Backend,
    /// The worker is stopping (drain deadline, stop).
    Shutdown,
}

/// What a socket leg reported, in terms the machine understands (see [`sock::Sock::complete`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Data(&'a [u8]),
    Eof,
    /// The peer or the socket failed (errno).
    Failed(i32),
    /// A connect completed.
    Connected,
    /// A connect failed (errno) or timed out.
    ConnectFailed {
        timed_out: bool,
        errno: i32,
    },
    /// Nothing the machine needs to know (bytes written, a wakeup, a cancelled operation).
    Nothing,
}

/// When the milestones of a connection happened (the latency histograms, the access log).
/// `None`: not reached (yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamps {
    /// The TLS handshake finished (plain connections: at accept).
    pub handshake_done: Option<Instant>,
    /// The latest backend connect attempt started (failover restarts it).
    pub connect_started: Option<Instant>,
    /// The backend connection was established.
    pub connected: Option<Instant>,
    /// The backend's first byte arrived.
    pub first_backend_byte: Option<Instant>,
}

/// One connection's byte counts: ciphertext on the client side (plain listeners: the bytes as
/// they are), plaintext on the backend side (the PROXY header included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnBytes {
    pub from_client: u64,
    pub to_client: u64,
    pub to_backend: u64,
    pub from_backend: u64,
}

/// One proxied connection's machine. See the module documentation.
pub struct Conn {
    session: Session,
    /// The client's address (logs, PROXY header, per-source accounting).
    pub peer: SocketAddr,
    /// The listener that accepted it: its index in `config.listeners`.
    pub listener: u16,
    /// The backend server (index in [`Backends`]) this connection tried last, if any.
    server: Option<usize>,
    stamps: Stamps,
    bytes: ConnBytes,
    /// The deadlines it was accepted under: a reload changes them for new connections only.
    policy: Policy,
    leg: Leg,
    /// The client's FIN has been passed to the session.
    client_in: Flow,
    /// Our FIN to the client has been asked for ([`Conn::fin_due`] returned true).
    client_out: Flow,
    handshake_counted: bool,
    accepted: Instant,
    /// Last time plaintext moved either way (or a peer took queued bytes): the idle clock.
    active: Instant,
    /// Since when output queued for a peer has made no progress; `None`: nothing queued.
    stalled_since: Option<Instant>,
    /// When our FIN to the client was asked for: from then on the client has `Policy::fin` to
    /// finish its side.
    fin_at: Option<Instant>,
    end: Option<End>,
    /// The `Backends` server this connection holds (counted in its active connections, for
    /// least-connections): taken with the leg's server, given back exactly once, when a
    /// connect fails over or the connection ends ([`Conn::release_backend`]).
    holds: Option<usize>,
}

impl Conn {
    pub fn new(
        session: Session,
        peer: SocketAddr,
        listener: u16,
        policy: Policy,
        now: Instant,
    ) -> Conn {
        Conn {
            session,
            peer,
            listener,
            policy,
            server: None,
            stamps: Stamps::default(),
            bytes: ConnBytes::default(),
            leg: Leg::Idle,
            client_in: Flow::Open,
            client_out: Flow::Open,
            handshake_counted: false,
            accepted: now,
            active: now,
            stalled_since: None,
            fin_at: None,
            end: None,
            holds: None,
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn leg(&self) -> Leg {
        self.leg
    }

    /// When it was accepted.
    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// When its milestones happened.
    pub fn stamps(&self) -> &Stamps {
        &self.stamps
    }

    /// Its byte counts so far.
    pub fn bytes(&self) -> &ConnBytes {
        &self.bytes
    }

    /// The backend server it tried last (index in [`Backends`]), if any.
    pub fn server(&self) -> Option<usize> {
        self.server
    }

    /// How it ended, once it has (see [`Conn::poll_end`]).
    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// What the latency histograms record of this connection when it ends at `now`
    /// (`crate::metrics::latency`): the TLS handshake (accept to handshake done; TLS only), the
    /// backend connect that succeeded (its attempt's start to established: failed attempts
    /// before it are not included), the time to the backend's first byte, counted from the end
    /// of the handshake (plain listeners: from accept), so that it is the backend's share of
    /// the latency and handshake + first byte is what a client waits for at most, and the
    /// duration (accept to end). A milestone not reached is `None`.
    pub fn latency(&self, now: Instant) -> crate::metrics::latency::Sample {
        let s = &self.stamps;
        let since = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
            (Some(from), Some(to)) => Some(to.saturating_duration_since(from)),
            _ => None,
        };
        let start = if self.session.is_tls() {
            s.handshake_done
        } else {
            Some(self.accepted)
        };
        crate::metrics::latency::Sample {
            handshake: since(Some(self.accepted), s.handshake_done)
                .filter(|_| self.session.is_tls()),
            connect: since(s.connect_started, s.connected),
            first_byte: since(start, s.first_backend_byte),
            duration: now.saturating_duration_since(self.accepted),
        }
    }

    /// Whether the machine has decided the connection is over (see [`Conn::poll_end`]).
    pub fn is_over(&self) -> bool {
        self.end.is_some()
    }

    // ------------------------------------------------------------------ client side

    /// Whether the transport should take bytes from the client now: the session wants them and
    /// has passed on everything it had (so an unread backend closes the client's window), or
    /// the session failed and what the client sends is to be discarded.
    pub fn wants_client_read(&self) -> bool {
        self.end.is_none() && self.session.wants_client_read() && !self.session.has_backend_output()
    }

    /// Whether bytes the client sends now are discarded (the TLS session failed; its alert and
    /// our FIN are on their way).
    pub fn discards_client_input(&self) -> bool {
        self.session.stage() == Stage::Failed
    }

    /// Bytes from the client. A TLS error is counted; rustls has queued an alert, which goes
    /// out with [`Conn::client_output`], then our FIN.
    pub fn client_data(
        &mut self,
        data: &[u8],
        counters: &WorkerCounters,
    ) -> Result<(), SessionError> {
        counters.client_bytes_in.add(data.len() as u64);
        self.bytes.from_client += data.len() as u64;
        let r = self.session.client_recv(data);
        if r.is_err() {
            counters.tls_errors.inc();
            if self.session.failure() == Some(crate::proxy::Failure::SniRefused) {
                counters.sni_refused.inc();
            }
        }
        self.count_handshake(counters);
        r
    }

    /// The client's FIN (after all its bytes).
    pub fn client_eof(&mut self) {
        if self.client_in == Flow::Finished {
            return;
        }
        self.client_in = Flow::Finished;
        let _ = self.session.client_eof();
    }

    /// The client's transport failed: reset, socket error, or its TCB gave up.
    pub fn client_failed(&mut self, counters: &WorkerCounters) {
        if self.end.is_none() {
            counters.client_errors.inc();
            self.end = Some(End::Abort(Why::Client));
        }
    }

    /// A client event reported by a socket leg (kernel path).
    pub fn client_event(&mut self, ev: Event<'_>, counters: &WorkerCounters) {
        match ev {
            Event::Data(data) => {
                if let Err(e) = self.client_data(data, counters) {
                    tracing::debug!(client = %self.peer, error = %e, "TLS error from client");
                }
            }
            Event::Eof => self.client_eof(),
            Event::Failed(errno) => {
                tracing::debug!(client = %self.peer, error = %std::io::Error::from_raw_os_error(errno), "client connection failed");
                self.client_failed(counters);
            }
            Event::Connected | Event::ConnectFailed { .. } | Event::Nothing => {}
        }
    }

    /// Whether [`Conn::client_output`] would produce bytes.
    pub fn wants_client_write(&self) -> bool {
        self.end.is_none() && self.session.wants_client_write()
    }

    /// Ciphertext (plain sessions: the backend's bytes) for the client, into `dst`.
    pub fn client_output(&mut self, dst: &mut [u8], counters: &WorkerCounters) -> usize {
        let n = self.session.client_output(dst);
        counters.client_bytes_out.add(n as u64);
        self.bytes.to_client += n as u64;
        n
    }

    /// Whether our FIN to the client is due now, given whether the transport has written
    /// everything queued for the client (`flushed`). True once: the transport then sends FIN.
    pub fn fin_due(&mut self, flushed: bool, now: Instant) -> bool {
        if self.client_out == Flow::Open && flushed && self.session.server_finished() {
            self.client_out = Flow::Finished;
            self.fin_at = Some(now);
            return true;
        }
        false
    }

    /// Whether our FIN to the client was sent (or queued behind the data).
    pub fn fin_sent(&self) -> bool {
        self.client_out == Flow::Finished
    }

    /// The transport's view of the output queued for its peers (client and backend), once per
    /// pump: `queued`: bytes are waiting for a peer to take them; `progressed`: a peer took
    /// some since the last report. Arms or clears the send-progress deadline.
    pub fn output_state(&mut self, queued: bool, progressed: bool, now: Instant) {
        if progressed {
            self.active = now;
        }
        self.stalled_since = match (queued, self.stalled_since) {
            (false, _) => None,
            (true, Some(since)) if !progressed => Some(since),
            (true, _) => Some(now),
        };
    }

    // ------------------------------------------------------------------ splicing

    /// Whether the client's bytes may now bypass the session on their way to the backend
    /// (kernel path, [`sock::splice`]): a plain session with nothing left for the backend (the
    /// PROXY header included), the backend connected and open for writing, the client open.
    pub fn splice_to_backend_ready(&self) -> bool {
        self.splice_to_backend_soon() && !self.session.has_backend_output()
    }

    /// [`Conn::splice_to_backend_ready`] but for bytes the session still holds for the backend:
    /// once they are written the direction may splice, so the client's receives are held off
    /// until then (a client that sends first would otherwise keep a receive armed for good).
    pub fn splice_to_backend_soon(&self) -> bool {
        self.end.is_none()
            && !self.session.is_tls()
            && self.session.stage() == Stage::Proxying
            && self.client_in == Flow::Open
            && matches!(
                self.leg,
                Leg::Connected {
                    write: Flow::Open,
                    ..
                }
            )
    }

    /// The same for the backend's bytes to the client: a plain session holding nothing for
    /// the client and not finished on our side, the backend connected and still sending.
    pub fn splice_to_client_ready(&self) -> bool {
        self.splice_to_client_soon() && !self.session.wants_client_write()
    }

    /// [`Conn::splice_to_client_ready`] but for bytes the session still holds for the client.
    pub fn splice_to_client_soon(&self) -> bool {
        self.end.is_none()
            && !self.session.is_tls()
            && self.session.stage() == Stage::Proxying
            && !self.session.close_notify_queued()
            && matches!(
                self.leg,
                Leg::Connected {
                    read: Flow::Open,
                    ..
                }
            )
    }

    /// `n` bytes went from the client into the pipe to the backend: counted as received from
    /// the client and given to the backend leg, as the copy path counts them.
    pub fn spliced_from_client(&mut self, n: usize, counters: &WorkerCounters, now: Instant) {
        let n = n as u64;
        counters.client_bytes_in.add(n);
        counters.backend_bytes_out.add(n);
        self.bytes.from_client += n;
        self.bytes.to_backend += n;
        self.active = now;
    }

    /// `n` bytes went from the backend into the pipe to the client.
    pub fn spliced_from_backend(&mut self, n: usize, counters: &WorkerCounters, now: Instant) {
        let n = n as u64;
        counters.backend_bytes_in.add(n);
        counters.client_bytes_out.add(n);
        self.bytes.from_backend += n;
        self.bytes.to_client += n;
        self.stamps.first_backend_byte.get_or_insert(now);
        self.active = now;
    }

    // ------------------------------------------------------------------ backend side

    /// What the backend leg needs now, if anything. `flushed`: the transport has written
    /// everything the machine gave it for the backend.
    pub fn poll_backend(
        &mut self,
        backends: &mut Backends,
        counters: &WorkerCounters,
        eager: bool,
        flushed: bool,
        now: Instant,
    ) -> Option<BackendOp> {
        if self.stamps.handshake_done.is_none() && self.session.stage() == Stage::Proxying {
            self.stamps.handshake_done = Some(now);
        }
        if self.end.is_some() {
            return None;
        }
        self.count_handshake(counters);
        match self.leg {
            Leg::Idle if self.session.needs_backend(eager) => {
                let Some(server) = backends.pick(now, counters) else {
                    // Every server is down: the leg fails now rather than after a connect
                    // timeout (counted and warned about by `pick`).
                    counters.backend_failures.inc();
                    self.leg = Leg::Failed;
                    self.session.close();
                    return None;
                };
                self.holds = Some(server);
                self.server = Some(server);
                self.stamps.connect_started = Some(now);
                self.leg = Leg::Connecting {
                    server,
                    first: server,
                    attempts: 1,
                };
                Some(BackendOp::Connect(backends.addr(server)))
            }
            Leg::Idle => {
                if self.session.stage() == Stage::Proxying && self.session.client_finished() {
                    // The client finished without sending anything: no backend is needed, and
                    // our side closes too.
                    self.session.close();
                }
                None
            }
            Leg::Connected {
                server,
                write: Flow::Open,
                read,
            } if flushed
                && self.session.stage() == Stage::Proxying
                && self.session.client_finished() =>
            {
                self.leg = Leg::Connected {
                    server,
                    write: Flow::Finished,
                    read,
                };
                Some(BackendOp::ShutdownWrite)
            }
            _ => None,
        }
    }

    /// Whether the transport should receive from the backend now: connected, the session has
    /// room, and it has handed on everything it had for the client (to a send slot or the
    /// TCB, where it is written while the next receive runs). Waiting for that lets the
    /// backend's bytes gather in its socket: one receive takes a full buffer, not a trickle.
    pub fn wants_backend_read(&self) -> bool {
        self.end.is_none()
            && matches!(
                self.leg,
                Leg::Connected {
                    read: Flow::Open,
                    ..
                }
            )
            && self.session.wants_backend_read()
            && !self.session.wants_client_write()
    }

    /// Whether the backend leg is connected and [`Conn::backend_output`] may be written to it.
    pub fn backend_writable(&self) -> bool {
        self.end.is_none()
            && matches!(
                self.leg,
                Leg::Connected {
                    write: Flow::Open,
                    ..
                }
            )
    }

    /// Whether [`Conn::backend_output`] would produce bytes.
    pub fn has_backend_output(&self) -> bool {
        self.session.has_backend_output()
    }

    /// Plaintext for the backend (the PROXY header first), into `dst`.
    pub fn backend_output(
        &mut self,
        dst: &mut [u8],
        counters: &WorkerCounters,
        now: Instant,
    ) -> usize {
        match self.session.backend_output(dst) {
            Ok(n) => {
                if n > 0 {
                    self.active = now;
                    counters.backend_bytes_out.add(n as u64);
                    self.bytes.to_backend += n as u64;
                }
                n
            }
            Err(e) => {
                // Ciphertext stashed behind a full plaintext buffer was bad.
                counters.tls_errors.inc();
                tracing::debug!(client = %self.peer, error = %e, "TLS error from client");
                0
            }
        }
    }

    /// A backend event reported by its socket leg. Returns a connect to retry on the next
    /// server when the connect failed and another server is left to try.
    pub fn backend_event(
        &mut self,
        ev: Event<'_>,
        backends: &mut Backends,
        counters: &WorkerCounters,
        now: Instant,
    ) -> Option<BackendOp> {
        match ev {
            Event::Data(data) => {
                counters.backend_bytes_in.add(data.len() as u64);
                self.bytes.from_backend += data.len() as u64;
                self.stamps.first_backend_byte.get_or_insert(now);
                if self.end.is_none() {
                    self.active = now;
                    self.session.backend_recv(data);
                }
                None
            }
            Event::Eof => {
                if let Leg::Connected { server, write, .. } = self.leg {
                    self.leg = Leg::Connected {
                        server,
                        write,
                        read: Flow::Finished,
                    };
                    self.session.backend_eof();
                }
                None
            }
            Event::Failed(errno) => {
                let Leg::Connected { server, read, .. } = self.leg else {
                    return None;
                };
                if self.end.is_some() {
                    return None;
                }
                tracing::debug!(client = %self.peer, error = %std::io::Error::from_raw_os_error(errno), "backend connection failed");
                if read == Flow::Finished {
                    // The backend said all it had to say; only our writes to it failed (it
                    // closed before reading everything). Its answer still goes out whole.
                    self.leg = Leg::Connected {
                        server,
                        write: Flow::Finished,
                        read,
                    };
                    return None;
                }
                // The backend's stream broke mid-way: a close_notify (or a plain FIN) would
                // tell the client that what it got is all there is. It is reset instead, so a
                // truncated response shows as one.
                counters.backend_failures.inc();
                backends.warn_failure(self.peer, now);
                self.leg = Leg::Failed;
                self.end = Some(End::Abort(Why::Backend));
                None
            }
            Event::Connected => {
                if let Leg::Connecting { server, .. } = self.leg {
                    counters.backend_connects.inc();
                    self.stamps.connected = Some(now);
                    backends.up(server, now);
                    self.leg = Leg::Connected {
                        server,
                        write: Flow::Open,
                        read: Flow::Open,
                    };
                }
                None
            }
            Event::ConnectFailed { timed_out, errno } => {
                let Leg::Connecting {
                    server,
                    first,
                    attempts,
                } = self.leg
                else {
                    return None;
                };
                if timed_out {
                    counters.backend_connect_timeouts.inc();
                } else {
                    counters.backend_connect_errors.inc();
                }
                backends.down(server, timed_out, errno, now);
                self.release_backend(backends);
                if self.end.is_some() {
                    return None;
                }
                match backends.failover(server, first, now, counters) {
                    Some(next) => {
                        self.holds = Some(next);
                        self.server = Some(next);
                        self.stamps.connect_started = Some(now);
                        self.leg = Leg::Connecting {
                            server: next,
                            first,
                            attempts: attempts + 1,
                        };
                        Some(BackendOp::Connect(backends.addr(next)))
                    }
                    None => {
                        self.backend_lost(backends, counters, now);
                        None
                    }
                }
            }
            Event::Nothing => None,
        }
    }

    /// Gives back the server this connection holds, if any (its connect failed over, or the
    /// connection ends). Idempotent: the count is given back once.
    pub fn release_backend(&mut self, backends: &mut Backends) {
        if let Some(server) = self.holds.take() {
            backends.release(server);
        }
    }

    /// The backend could not be reached or broke: the client side is closed politely.
    fn backend_lost(&mut self, backends: &mut Backends, counters: &WorkerCounters, now: Instant) {
        if self.leg == Leg::Failed {
            return;
        }
        counters.backend_failures.inc();
        backends.warn_failure(self.peer, now);
        self.leg = Leg::Failed;
        self.session.close();
    }

    // ------------------------------------------------------------------ time and the end

    /// When [`Conn::on_timeout`] must be called next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let policy = &self.policy;
        if self.end.is_some() {
            return None;
        }
        if self.session.stage() == Stage::Handshake {
            return Some(self.accepted + policy.handshake);
        }
        let mut deadline = self.active + policy.idle;
        if let Some(since) = self.stalled_since {
            deadline = deadline.min(since + policy.send);
        }
        if let Some(fin) = self.fin_at.filter(|_| !self.session.client_finished()) {
            deadline = deadline.min(fin + policy.fin);
        }
        Some(deadline)
    }

    /// Checks the deadlines at `now`; returns true when one passed (the connection is cut,
    /// counted, and [`Conn::poll_end`] says so).
    pub fn on_timeout(&mut self, now: Instant, counters: &WorkerCounters) -> bool {
        let policy = self.policy;
        if self.end.is_some() {
            return false;
        }
        let why = if self.session.stage() == Stage::Handshake {
            (now >= self.accepted + policy.handshake).then_some(Why::HandshakeTimeout)
        } else if self.stalled_since.is_some_and(|s| now >= s + policy.send) {
            Some(Why::SendTimeout)
        } else if self
            .fin_at
            .is_some_and(|f| now >= f + policy.fin && !self.session.client_finished())
        {
            Some(Why::FinTimeout)
        } else {
            (now >= self.active + policy.idle).then_some(Why::IdleTimeout)
        };
        let Some(why) = why else { return false };
        match why {
            Why::HandshakeTimeout => counters.handshake_timeouts.inc(),
            Why::SendTimeout => counters.send_timeouts.inc(),
            Why::FinTimeout => counters.fin_timeouts.inc(),
            _ => counters.idle_timeouts.inc(),
        }
        tracing::debug!(client = %self.peer, ?why, "connection timed out");
        self.end = Some(End::Abort(why));
        true
    }

    /// Cuts the connection now (worker shutdown).
    pub fn abort(&mut self, why: Why) {
        self.end.get_or_insert(End::Abort(why));
    }

    /// Whether the connection is over, and how. `client_flushed`/`backend_flushed`: the
    /// transport has written everything queued for that peer. Once this returns `Some`, the
    /// transport closes both legs (FIN for `Graceful`, RST otherwise) and drops the machine.
    pub fn poll_end(&mut self, client_flushed: bool, backend_flushed: bool) -> Option<End> {
        if let Some(end) = self.end {
            return Some(end);
        }
        if !(self.fin_sent() && client_flushed && backend_flushed) {
            return None;
        }
        // The client's FIN or its close_notify: either ends what it sends (after close_notify
        // its FIN may never come, and is not waited for).
        let client_done = self.session.client_finished();
        let done = match self.leg {
            // A failed session or backend: nothing more from the client will be used (its
            // unread plaintext has nowhere to go), so our FIN ends it.
            _ if self.session.stage() == Stage::Failed => true,
            Leg::Failed => true,
            Leg::Idle => client_done,
            Leg::Connecting { .. } => false,
            Leg::Connected { write, .. } => client_done && write == Flow::Finished,
        };
        if done {
            self.end = Some(End::Graceful);
        }
        self.end
    }

    fn count_handshake(&mut self, counters: &WorkerCounters) {
        if !self.handshake_counted && self.session.stage() == Stage::Proxying {
            self.handshake_counted = true;
            if self.session.is_tls() {
                counters.handshakes.inc();
            }
            if self.session.resumed() == Some(true) {
                counters.resumed.inc();
            }
        }
    }
}

// ---------------------------------------------------------------------- the backend leg

/// What every connection of a worker shares, on both paths: the ring and its buffers, the
/// backend pool and its health, the per-source limits, the policy and the counters.
pub struct Shared {
    /// Declared first: dropped (unregistering the buffers) before anything else goes.
    pub io: Io,
    pub backends: Backends,
    pub sources: SourceLimits,
    pub policy: Policy,
    pub counters: std::sync::Arc<WorkerCounters>,
    /// This worker's latency histograms (recorded in [`begin_finish`]).
    pub latency: std::sync::Arc<crate::metrics::WorkerLatency>,
    /// The backend addresses by histogram index (the worker's copy of the registry,
    /// refreshed on reload).
    pub latency_servers: Vec<SocketAddr>,
    /// The worker's end of the access log; `None` when `[access_log]` is off.
    pub access_log: Option<crate::access_log::Sink>,
}

impl Shared {
    /// Takes a reloaded configuration for the connections accepted from now on: deadlines,
    /// connect policy and timeout, the per-source limit and the backend servers. Open
    /// connections keep their own deadlines and the server they use.
    pub fn reconfigure(&mut self, config: &crate::config::Config, now: Instant) {
        self.policy = Policy::from_config(config);
        self.io.set_connect_timeout(config.backend.connect_timeout);
        self.sources
            .set_limit(config.limits.max_connections_per_source);
        self.backends.reconfigure(&config.backend, now);
        self.latency_servers = self
            .latency
            .servers(config.backend.servers.iter().map(|s| s.address));
    }
}

/// The backend half of a connection's pump, the same on both paths: start or retry the
/// connect the machine asks for, send its FIN, queue and send its plaintext, and keep a
/// receive armed while it wants bytes.
pub fn pump_backend<C>(sh: &mut Shared, e: &mut Entry<C>, key: Key, now: Instant) {
    let (conn, sock) = (&mut e.conn, &mut e.backend);
    let counters = &*sh.counters;
    if let Some(op) = conn.poll_backend(
        &mut sh.backends,
        counters,
        sh.policy.eager,
        sock.flushed(),
        now,
    ) {
        execute(op, sh, conn, sock, key, now);
    }
    let counters = &*sh.counters;
    if conn.backend_writable()
        && conn.has_backend_output()
        && !sock.fill(&mut sh.io, |buf| conn.backend_output(buf, counters, now))
    {
        // No free send slot: back pressure; pumped again once slots come back.
        counters.send_slot_waits.inc();
        sh.io.retry.push(key);
    }
    sock.flush(&mut sh.io, key);
    sock.want_recv(&mut sh.io, conn.wants_backend_read(), key);
}

/// A completion of a connection's backend socket, the same on both paths.
pub fn backend_completion<C>(
    sh: &mut Shared,
    e: &mut Entry<C>,
    key: Key,
    (op, res, flags): (crate::sys::uring::Op, i32, u32),
    now: Instant,
) {
    let (conn, sock) = (&mut e.conn, &mut e.backend);
    let done = sock.complete(&mut sh.io, key, op, res, flags, &sh.counters);
    let (backends, counters) = (&mut sh.backends, &*sh.counters);
    let next = sh
        .io
        .deliver(done, |ev| conn.backend_event(ev, backends, counters, now));
    if let Some(op) = next {
        execute(op, sh, conn, sock, key, now);
    }
}

/// Carries out a backend operation; a connect whose socket cannot even be created fails over
/// at once.
fn execute(
    op: BackendOp,
    sh: &mut Shared,
    conn: &mut Conn,
    sock: &mut Sock,
    key: Key,
    now: Instant,
) {
    let mut next = Some(op);
    while let Some(op) = next.take() {
        match op {
            BackendOp::Connect(addr) => {
                if let Err(errno) = sock.connect(&mut sh.io, addr, key) {
                    let failed = Event::ConnectFailed {
                        timed_out: false,
                        errno,
                    };
                    next = conn.backend_event(failed, &mut sh.backends, &sh.counters, now);
                }
            }
            BackendOp::ShutdownWrite => sock.shutdown_write(),
        }
    }
}

/// The part of ending a connection both paths share: marks the entry closing (once: `None`
/// when it already was), counts it and records its latencies ([`Conn::latency`]), closes the
/// backend leg (FIN or RST) and gives back the source's place. Returns whether the end is
/// graceful; the caller then closes its client leg the same way and frees the entry once
/// nothing is in flight.
pub fn begin_finish<C>(sh: &mut Shared, e: &mut Entry<C>, end: End, now: Instant) -> Option<bool> {
    if e.closing {
        return None;
    }
    e.closing = true;
    sh.counters.closed.inc();
    let server = e
        .conn
        .server()
        .map(|s| crate::metrics::latency::server_index(&sh.latency_servers, sh.backends.addr(s)));
    sh.latency
        .record(usize::from(e.conn.listener), server, &e.conn.latency(now));
    if let Some(log) = &mut sh.access_log {
        log.record(&e.conn, end, &sh.backends, &sh.counters);
    }
    e.conn.release_backend(&mut sh.backends);
    let graceful = end == End::Graceful;
    e.backend.close(&mut sh.io, graceful);
    sh.sources.release(e.conn.peer.ip());
    Some(graceful)
}

/// What a path's client transport reports at the end of a pump.
#[derive(Debug, Clone, Copy)]
pub struct ClientOutput {
    /// Bytes are waiting for the client to take them (written but unacknowledged included).
    pub queued: bool,
    /// The client took some since the last pump.
    pub progressed: bool,
    /// Everything the machine gave the transport is handed on for good (a kernel socket:
    /// written; a TCB: in its send buffer, which delivers it on its own).
    pub flushed: bool,
}

/// The output half every pump ends with: tells the machine whether bytes are queued for a
/// peer and whether a peer took some, and asks whether the connection is over.
pub fn settle<C>(e: &mut Entry<C>, client: ClientOutput, now: Instant) -> Option<End> {
    let progressed = client.progressed | e.backend.take_progress();
    e.conn
        .output_state(client.queued || !e.backend.flushed(), progressed, now);
    e.conn.poll_end(client.flushed, e.backend.flushed())
}
