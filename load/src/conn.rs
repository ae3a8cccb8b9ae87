//! One TLS connection of the load generator: non-blocking TCP, a rustls `ClientConnection`,
//! and the HTTP/1.1 exchange on top, driven by edge-triggered readiness.
//!
//! Owns: the per-connection stages ([`Stage`]: `Connecting → Handshaking → Request ⇄ Idle`,
//! then `AwaitClose` or `Parking → Parked`), moving bytes between the socket and rustls, feeding
//! plaintext to the response reader, and recording what happened to this connection in the
//! worker's [`Ctx`] (latency, handshake kind, bytes). Does not own: when connections are opened
//! or requests started, timeouts, or what a failure means for the run — the worker decides those
//! from the [`Outcome`] each call returns.
//!
//! I/O: socket reads go into the worker's one 64 KiB buffer (one syscall per 64 KiB instead of
//! rustls's 4 KiB `read_tls` from the socket) and are handed to rustls from that slice; response
//! bodies are consumed in place from rustls's plaintext buffer (`BufRead`), never copied. What
//! still allocates per request is inside rustls 0.23's buffered API: one `Vec` per TLS record
//! each way (the unbuffered API does the same for received records in 0.23).
//!
//! Plain TCP (`--plain`): no rustls session and no HTTP. An operation writes `message_bytes` of
//! the repeating pattern `a..z` (by stream offset, so an echo can be checked byte for byte
//! across writes) and is complete when the same bytes have come back; whatever else arrives is
//! an error (`Http`: the peer did not echo). Stages are the same minus `Handshaking`.
//!
//! Specs: RFC 8446 §6.1 (close_notify), RFC 9112 §9.6 (tearing down a connection).

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind};

use crate::cli::ClosePolicy;
use crate::http::ResponseReader;
use crate::stats::{ErrorKind, Stats};
use crate::sys::{self, EV_FAIL, EV_OUT};
use crate::tls;

/// Plain TCP: payload handed to the kernel per `write` (bulk messages go out in these pieces).
pub const PLAIN_CHUNK: usize = 64 * 1024;

/// The plain-TCP payload byte at stream offset `off`.
pub fn pattern_byte(off: u64) -> u8 {
    b'a' + (off % 26) as u8
}

/// `PLAIN_CHUNK + 26` pattern bytes: a write at stream offset `off` takes
/// `chunk[off % 26..][..n]`.
pub fn plain_chunk() -> Vec<u8> {
    (0..PLAIN_CHUNK as u64 + 26).map(pattern_byte).collect()
}

/// Size of the worker's socket read buffer.
pub const READ_BUF: usize = 64 * 1024;
/// Plaintext handed to rustls per write when streaming a request body (one TLS record).
pub const BODY_CHUNK: usize = 16 * 1024;
/// With `--close server`, how long a transaction waits for the server's close after the
/// response before closing itself (counted as `close_timeouts`): a server that never closes
/// would otherwise pin connections and quietly throttle the closed loop.
pub const AWAIT_CLOSE_MAX: u64 = 1_000_000_000;

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// new-conn/resumed: connect, handshake, one request, close. The operation is the whole
    /// transaction and starts when the connect does.
    Transaction,
    /// resumed mode's set-up: a transaction that only fills the session store.
    Prime,
    /// keepalive/bulk: stays open; the worker starts requests on it.
    Persistent,
    /// idle: handshake, `--idle-requests` requests, then parked until the end.
    Held,
}

/// Where a connection is. Stages only move forward, except `Request ⇄ Idle` on persistent
/// connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect in progress: waiting for writability.
    Connecting,
    Handshaking,
    /// A request is being sent and/or its response read.
    Request,
    /// Persistent: no request outstanding.
    Idle,
    /// Transaction with `--close server`: response complete, waiting for the server's close.
    AwaitClose,
    /// Held: established; parks once the last handshake flight has been written.
    Parking,
    /// Held: the TLS state and the response buffer are dropped, only the socket remains
    /// (watched for the server closing it).
    Parked,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Finished as intended (transaction closed, or an idle close on our side).
    Clean,
    /// The server closed (or announced closing) a connection with no request outstanding.
    PeerClosed,
    Failed(ErrorKind),
}

/// What one call into a connection produced, for the worker to act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The current operation finished (response complete); its stats are recorded.
    pub op_done: bool,
    /// A persistent connection is established and has no request outstanding.
    pub ready: bool,
    /// A held connection was parked.
    pub parked: bool,
    /// The connection is over: the worker removes and closes it.
    pub end: Option<End>,
}

/// The worker's state that connections read and record into.
pub struct Ctx {
    /// Monotonic now, refreshed by the worker before every call into a connection.
    pub now: u64,
    /// Measurement window: operations that start in `[window_start, window_end)` are measured;
    /// rate and byte counters count only inside it. `u64::MAX` start: not open yet.
    pub window_start: u64,
    pub window_end: u64,
    pub stats: Stats,
    /// The serialised request head, the same for every request of the run.
    pub request: Vec<u8>,
    pub head_only: bool,
    pub body_bytes: u64,
    /// Pattern bytes a request body is streamed from.
    pub body_chunk: Vec<u8>,
    pub close: ClosePolicy,
    pub timeout_ns: u64,
    /// Plain TCP echo instead of TLS + HTTP.
    pub plain: bool,
    /// Plain: bytes per operation, each way.
    pub message_bytes: u64,
    /// Plain: pattern bytes writes are taken from ([`plain_chunk`]).
    pub plain_chunk: Vec<u8>,
    /// No connection's deadline is earlier than this (a lower bound, lowered by every
    /// [`Ctx::arm`]): the worker's timeout scan, a walk of every connection, runs only once it
    /// has passed, so held connections without a deadline cost nothing per scan period.
    pub next_deadline: u64,
}

impl Ctx {
    /// `deadline`, noted as a lower bound for the timeout scan: every finite deadline a
    /// connection takes goes through here.
    pub fn arm(&mut self, deadline: u64) -> u64 {
        self.next_deadline = self.next_deadline.min(deadline);
        deadline
    }

    /// Inside the measurement window now.
    pub fn counting(&self) -> bool {
        self.now >= self.window_start && self.now < self.window_end
    }

    /// An operation starting at `start` is measured.
    pub fn measured(&self, start: u64) -> bool {
        start >= self.window_start && start < self.window_end
    }
}

/// Where and how to connect.
pub struct Dial<'a> {
    pub target: SocketAddr,
    pub source: Option<IpAddr>,
    pub config: &'a Arc<ClientConfig>,
    pub name: &'a ServerName<'static>,
}

pub struct Conn {
    pub stream: TcpStream,
    /// `None` only when `Parked`.
    tls: Option<ClientConnection>,
    pub stage: Stage,
    pub role: Role,
    /// Start of this connection's handshake latency: the connect, or for transactions the
    /// (intended) start of the operation.
    conn_start: u64,
    /// Start of the current operation's latency (intended send time in open loop).
    op_start: u64,
    /// An operation is in flight on this connection (set at its start, cleared when its
    /// response completes or the connection ends).
    pub op_active: bool,
    /// The current operation, or the connection's handshake, started inside the window.
    pub measured: bool,
    /// Monotonic time after which the worker fails this connection; `u64::MAX`: none.
    pub deadline: u64,
    resp: ResponseReader,
    /// Request body bytes not yet handed to rustls.
    body_left: u64,
    /// Body bytes of the current response already added to the stats.
    body_counted: u64,
    /// Held: requests still to make before parking.
    gets_left: u32,
    /// Plain TCP (no `tls` at any stage).
    plain: bool,
    /// Plain: bytes of the current message still to write / still to come back, and the
    /// stream offsets written and read so far (they choose the pattern bytes).
    send_left: u64,
    recv_left: u64,
    sent_off: u64,
    recv_off: u64,
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => ErrorKind::Closed,
        _ => ErrorKind::Io,
    }
}

impl Conn {
    /// Starts connecting. `start` is where latency starts; an operation for a transaction role
    /// is in flight from here on. `gets`: requests a held connection makes before parking.
    pub fn open(
        role: Role,
        dial: &Dial<'_>,
        start: u64,
        ctx: &Ctx,
        gets: u32,
    ) -> Result<Conn, ErrorKind> {
        let stream = sys::connect(dial.target, dial.source).map_err(|_| ErrorKind::Connect)?;
        let tls = if ctx.plain {
            None
        } else {
            Some(
                ClientConnection::new(dial.config.clone(), dial.name.clone())
                    .map_err(|_| ErrorKind::Tls)?,
            )
        };
        let transaction = matches!(role, Role::Transaction | Role::Prime);
        Ok(Conn {
            stream,
            tls,
            stage: Stage::Connecting,
            role,
            conn_start: start,
            op_start: start,
            op_active: transaction,
            measured: role != Role::Prime && ctx.measured(start),
            deadline: ctx.now.saturating_add(ctx.timeout_ns),
            resp: ResponseReader::default(),
            body_left: 0,
            body_counted: 0,
            gets_left: gets,
            plain: ctx.plain,
            send_left: 0,
            recv_left: 0,
            sent_off: 0,
            recv_off: 0,
        })
    }

    /// Handles readiness `events`.
    pub fn on_ready(&mut self, events: u32, ctx: &mut Ctx, rbuf: &mut [u8]) -> Outcome {
        let mut out = Outcome::default();
        if let Err(kind) = self.drive(events, ctx, rbuf, &mut out) {
            out.end = Some(End::Failed(kind));
        }
        out
    }

    fn drive(
        &mut self,
        events: u32,
        ctx: &mut Ctx,
        rbuf: &mut [u8],
        out: &mut Outcome,
    ) -> Result<(), ErrorKind> {
        if self.stage == Stage::Connecting {
            if events & (EV_OUT | EV_FAIL) == 0 {
                return Ok(());
            }
            match self.stream.take_error() {
                Ok(None) if self.stream.peer_addr().is_ok() => {}
                _ => return Err(ErrorKind::Connect),
            }
            self.stage = Stage::Handshaking;
            if self.plain {
                self.on_connected_plain(ctx, out)?;
            }
        }
        if self.stage == Stage::Parked {
            self.drain_parked(rbuf, out);
            return Ok(());
        }
        if self.plain {
            self.read_plain(ctx, rbuf, out)?;
            if out.end.is_none() {
                self.write_plain(ctx)?;
            }
            return Ok(());
        }
        self.read_all(ctx, rbuf, out)?;
        if out.end.is_none() && self.stage != Stage::Parked {
            self.flush(ctx, out)?;
        }
        Ok(())
    }

    /// Starts a request on an idle persistent (or held) connection and writes what it can.
    pub fn start_request(
        &mut self,
        ctx: &mut Ctx,
        op_start: u64,
        out: &mut Outcome,
    ) -> Result<(), ErrorKind> {
        self.begin_request(ctx, op_start)?;
        if self.plain {
            return self.write_plain(ctx);
        }
        self.flush(ctx, out)
    }

    /// Plain: the TCP connect completed (there is no handshake).
    fn on_connected_plain(&mut self, ctx: &mut Ctx, out: &mut Outcome) -> Result<(), ErrorKind> {
        if self.role != Role::Prime && ctx.measured(self.conn_start) {
            ctx.stats.record_handshake(self.conn_start, ctx.now);
        }
        match self.role {
            Role::Transaction | Role::Prime => {
                let start = self.op_start;
                self.begin_request(ctx, start)?;
            }
            Role::Persistent => {
                self.stage = Stage::Idle;
                self.deadline = u64::MAX;
                out.ready = true;
            }
            Role::Held => {
                self.resp.release();
                self.stage = Stage::Parked;
                self.deadline = u64::MAX;
                out.parked = true;
            }
        }
        Ok(())
    }

    /// Plain: reads until the socket would block, checking the echo against the pattern.
    fn read_plain(
        &mut self,
        ctx: &mut Ctx,
        rbuf: &mut [u8],
        out: &mut Outcome,
    ) -> Result<(), ErrorKind> {
        loop {
            let n = match (&self.stream).read(rbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_kind(&e)),
            };
            if n == 0 {
                return match self.stage {
                    Stage::Idle => {
                        out.end = Some(End::PeerClosed);
                        Ok(())
                    }
                    _ => Err(ErrorKind::Closed),
                };
            }
            if self.stage != Stage::Request || n as u64 > self.recv_left {
                // Bytes nobody sent, or more than was sent: not an echo.
                return Err(ErrorKind::Http);
            }
            let off = self.recv_off;
            if rbuf[..n]
                .iter()
                .enumerate()
                .any(|(i, b)| *b != pattern_byte(off + i as u64))
            {
                return Err(ErrorKind::Http);
            }
            self.recv_off += n as u64;
            self.recv_left -= n as u64;
            if ctx.counting() {
                ctx.stats.bytes.body_received += n as u64;
            }
            if self.recv_left == 0 && self.send_left == 0 {
                self.on_echoed(ctx, out);
                if out.end.is_some() {
                    return Ok(());
                }
            }
            if n < rbuf.len() {
                return Ok(());
            }
        }
    }

    /// Plain: writes what is left of the current message until the socket would block.
    fn write_plain(&mut self, ctx: &mut Ctx) -> Result<(), ErrorKind> {
        while self.send_left > 0 && self.stage == Stage::Request {
            let n = self.send_left.min(PLAIN_CHUNK as u64) as usize;
            let start = (self.sent_off % 26) as usize;
            let written = match (&self.stream).write(&ctx.plain_chunk[start..start + n]) {
                Ok(0) => return Err(ErrorKind::Closed),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_kind(&e)),
            };
            self.send_left -= written as u64;
            self.sent_off += written as u64;
            if ctx.counting() {
                ctx.stats.bytes.body_sent += written as u64;
            }
        }
        Ok(())
    }

    /// Plain: the whole message came back.
    fn on_echoed(&mut self, ctx: &mut Ctx, out: &mut Outcome) {
        self.op_active = false;
        out.op_done = true;
        if self.role == Role::Prime {
            ctx.stats.primed += 1;
        } else {
            if self.measured {
                ctx.stats.completed += 1;
                // An echo is this protocol's success: counted like a 2xx response.
                ctx.stats.status.add(200);
                ctx.stats.record_latency(self.op_start, ctx.now);
            }
            if ctx.counting() {
                ctx.stats.in_window += 1;
            }
        }
        match self.role {
            // `--close server` is refused for plain runs: Client (FIN) or Reset (the worker
            // sets SO_LINGER 0) both end here.
            Role::Transaction | Role::Prime => out.end = Some(End::Clean),
            Role::Persistent | Role::Held => {
                self.stage = Stage::Idle;
                self.deadline = u64::MAX;
                out.ready = true;
            }
        }
    }

    fn begin_request(&mut self, ctx: &mut Ctx, op_start: u64) -> Result<(), ErrorKind> {
        if self.plain {
            self.send_left = ctx.message_bytes;
            self.recv_left = ctx.message_bytes;
            self.op_start = op_start;
            self.op_active = true;
            self.measured = ctx.measured(op_start);
            self.stage = Stage::Request;
            self.deadline = ctx.arm(ctx.now.saturating_add(ctx.timeout_ns));
            return Ok(());
        }
        let tls = self.tls.as_mut().ok_or(ErrorKind::Io)?;
        tls.writer()
            .write_all(&ctx.request)
            .map_err(|_| ErrorKind::Io)?;
        self.resp.start(ctx.head_only);
        self.body_left = ctx.body_bytes;
        self.body_counted = 0;
        self.op_start = op_start;
        self.op_active = true;
        if self.role != Role::Prime {
            self.measured = ctx.measured(op_start);
        }
        self.stage = Stage::Request;
        self.deadline = ctx.arm(ctx.now.saturating_add(ctx.timeout_ns));
        Ok(())
    }

    /// Reads until the socket would block, feeding rustls and the response reader.
    fn read_all(
        &mut self,
        ctx: &mut Ctx,
        rbuf: &mut [u8],
        out: &mut Outcome,
    ) -> Result<(), ErrorKind> {
        loop {
            let n = match (&self.stream).read(rbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_kind(&e)),
            };
            if ctx.counting() {
                ctx.stats.bytes.tls_received += n as u64;
            }
            if n == 0 {
                // Tell rustls about the EOF so its reader can tell a clean close from a cut.
                if let Some(tls) = self.tls.as_mut() {
                    let _ = tls.read_tls(&mut &[][..]);
                }
                if !self.process(ctx, out)? {
                    self.on_peer_close(ctx, out)?;
                }
                return Ok(());
            }
            let mut input = &rbuf[..n];
            while !input.is_empty() {
                let tls = self.tls.as_mut().ok_or(ErrorKind::Io)?;
                tls.read_tls(&mut input).map_err(|_| ErrorKind::Tls)?;
                if self.process(ctx, out)? {
                    return Ok(());
                }
            }
            // A short read drained the socket; new data raises a new edge.
            if n < rbuf.len() {
                return Ok(());
            }
        }
    }

    /// Lets rustls process what it has buffered and consumes the plaintext. `Ok(true)`: the
    /// connection ended or was parked, stop reading.
    fn process(&mut self, ctx: &mut Ctx, out: &mut Outcome) -> Result<bool, ErrorKind> {
        let tls = self.tls.as_mut().ok_or(ErrorKind::Io)?;
        if tls.process_new_packets().is_err() {
            // Best effort: send the alert rustls queued so the server logs why.
            let _ = tls.write_tls(&mut &self.stream);
            return Err(ErrorKind::Tls);
        }
        if self.stage == Stage::Handshaking && !tls.is_handshaking() {
            self.on_handshake(ctx, out)?;
        }
        loop {
            if out.end.is_some() || self.stage == Stage::Parked {
                return Ok(true);
            }
            let tls = self.tls.as_mut().ok_or(ErrorKind::Io)?;
            let mut reader = tls.reader();
            let (used, len, done) = match reader.fill_buf() {
                Ok([]) => {
                    // close_notify received and all data before it consumed.
                    self.on_peer_close(ctx, out)?;
                    return Ok(true);
                }
                Ok(chunk) => {
                    if self.stage != Stage::Request {
                        return Err(ErrorKind::Http);
                    }
                    let (used, done) = self.resp.feed(chunk).map_err(|_| ErrorKind::Http)?;
                    let len = chunk.len();
                    reader.consume(used);
                    (used, len, done)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // TCP EOF without close_notify: many servers close this way.
                    self.on_peer_close(ctx, out)?;
                    return Ok(true);
                }
                Err(_) => return Err(ErrorKind::Io),
            };
            let body = self.resp.body_bytes();
            if ctx.counting() {
                ctx.stats.bytes.body_received += body - self.body_counted;
            }
            self.body_counted = body;
            if done {
                if used < len {
                    return Err(ErrorKind::Http);
                }
                self.on_response(ctx, out)?;
            }
        }
    }

    fn on_handshake(&mut self, ctx: &mut Ctx, out: &mut Outcome) -> Result<(), ErrorKind> {
        let session = self.tls.as_ref().ok_or(ErrorKind::Io)?;
        if self.role != Role::Prime && ctx.measured(self.conn_start) {
            ctx.stats.record_handshake(self.conn_start, ctx.now);
        }
        if ctx.counting() && self.role != Role::Prime {
            if session.handshake_kind() == Some(HandshakeKind::Resumed) {
                ctx.stats.handshakes_resumed += 1;
            } else {
                ctx.stats.handshakes_full += 1;
            }
        }
        if ctx.stats.tls.is_none() {
            ctx.stats.tls = Some(tls::negotiated(session));
        }
        match self.role {
            Role::Transaction | Role::Prime => {
                let start = self.op_start;
                self.begin_request(ctx, start)?;
            }
            Role::Persistent => {
                self.stage = Stage::Idle;
                self.deadline = u64::MAX;
                out.ready = true;
            }
            Role::Held => self.next_held(ctx)?,
        }
        Ok(())
    }

    /// Held connection: the next request, or parking when none are left.
    fn next_held(&mut self, ctx: &mut Ctx) -> Result<(), ErrorKind> {
        if self.gets_left > 0 {
            self.gets_left -= 1;
            let now = ctx.now;
            self.begin_request(ctx, now)
        } else {
            self.stage = Stage::Parking;
            self.deadline = ctx.arm(ctx.now.saturating_add(ctx.timeout_ns));
            Ok(())
        }
    }

    fn on_response(&mut self, ctx: &mut Ctx, out: &mut Outcome) -> Result<(), ErrorKind> {
        self.op_active = false;
        out.op_done = true;
        if self.role == Role::Prime {
            ctx.stats.primed += 1;
        } else {
            if self.measured {
                ctx.stats.completed += 1;
                ctx.stats.status.add(self.resp.status());
                ctx.stats.record_latency(self.op_start, ctx.now);
            }
            if ctx.counting() {
                ctx.stats.in_window += 1;
            }
        }
        // Whatever the server still sends on a connection we are done with is not ours to
        // check (the body is done; a remaining body_left means it answered early).
        self.body_left = 0;
        match self.role {
            Role::Transaction | Role::Prime => match ctx.close {
                ClosePolicy::Server => {
                    self.stage = Stage::AwaitClose;
                    self.deadline =
                        ctx.arm(ctx.now.saturating_add(ctx.timeout_ns.min(AWAIT_CLOSE_MAX)));
                }
                ClosePolicy::Client => {
                    if let Some(tls) = self.tls.as_mut() {
                        tls.send_close_notify();
                        let _ = tls.write_tls(&mut &self.stream);
                    }
                    out.end = Some(End::Clean);
                }
                ClosePolicy::Reset => out.end = Some(End::Clean),
            },
            Role::Persistent if self.resp.close() => out.end = Some(End::PeerClosed),
            Role::Persistent => {
                self.stage = Stage::Idle;
                self.deadline = u64::MAX;
                out.ready = true;
            }
            Role::Held if self.resp.close() => return Err(ErrorKind::Closed),
            Role::Held => self.next_held(ctx)?,
        }
        Ok(())
    }

    /// The server closed (close_notify or TCP EOF).
    fn on_peer_close(&mut self, ctx: &mut Ctx, out: &mut Outcome) -> Result<(), ErrorKind> {
        match self.stage {
            Stage::Request => match self.resp.finish_on_eof() {
                Ok(true) => {
                    self.on_response(ctx, out)?;
                    if out.end.is_none() {
                        out.end = Some(if self.role == Role::Persistent {
                            End::PeerClosed
                        } else {
                            End::Clean
                        });
                    }
                }
                Ok(false) | Err(_) => return Err(ErrorKind::Closed),
            },
            Stage::AwaitClose => out.end = Some(End::Clean),
            Stage::Idle => out.end = Some(End::PeerClosed),
            Stage::Connecting | Stage::Handshaking | Stage::Parking => {
                return Err(ErrorKind::Closed)
            }
            Stage::Parked => out.end = Some(End::PeerClosed),
        }
        Ok(())
    }

    /// Writes what rustls has queued, then more of the request body if any; parks a held
    /// connection once everything is out.
    fn flush(&mut self, ctx: &mut Ctx, out: &mut Outcome) -> Result<(), ErrorKind> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut &self.stream) {
                    Ok(n) => {
                        if ctx.counting() {
                            ctx.stats.bytes.tls_sent += n as u64;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_kind(&e)),
                }
            }
            if self.body_left > 0 && self.stage == Stage::Request {
                let n = self.body_left.min(ctx.body_chunk.len() as u64) as usize;
                let written = tls
                    .writer()
                    .write(&ctx.body_chunk[..n])
                    .map_err(|_| ErrorKind::Io)?;
                if written == 0 {
                    return Ok(());
                }
                self.body_left -= written as u64;
                if ctx.counting() {
                    ctx.stats.bytes.body_sent += written as u64;
                }
                continue;
            }
            break;
        }
        if self.stage == Stage::Parking {
            // Everything is written, including the client Finished: the TLS state is no
            // longer needed to keep the connection up.
            self.tls = None;
            self.resp.release();
            self.stage = Stage::Parked;
            self.deadline = u64::MAX;
            out.parked = true;
        }
        Ok(())
    }

    /// Parked: discard whatever arrives (session tickets, an alert) and notice the close.
    fn drain_parked(&mut self, rbuf: &mut [u8], out: &mut Outcome) {
        loop {
            match (&self.stream).read(rbuf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        out.end = Some(End::PeerClosed);
    }

    /// Ends the connection from our side at the end of a run: close_notify if TLS is still
    /// up and idle (best effort, never blocks).
    pub fn close_politely(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            if matches!(self.stage, Stage::Idle | Stage::AwaitClose) {
                tls.send_close_notify();
                let _ = tls.write_tls(&mut &self.stream);
            }
        }
    }
}
