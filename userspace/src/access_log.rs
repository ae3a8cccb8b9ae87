//! The access log: one JSON line per proxied connection (`[access_log]`, off by default),
//! written by a thread of its own so that a worker never waits for a disk.
//!
//! Each worker owns a [`Sink`]: the producer end of a bounded lock-free SPSC ring (rtrb) of
//! fixed-size [`Record`]s. When a connection ends (`driver::begin_finish`, the one place both
//! paths end a connection) the worker copies what the log needs into a record — addresses,
//! byte counts, the close reason, SNI and ALPN as inline strings, the TLS version and cipher as
//! rustls enums — and pushes it without allocating. A full ring drops the record and counts it
//! (`access_log_dropped` in the worker's counters): the worker never blocks. The writer thread
//! ([`AccessLog::spawn`]) drains every ring each `flush_ms`, formats the lines (serde_json,
//! RFC 3339 times) and appends them to the file (`O_APPEND`) in one write per batch. A write
//! error is logged (at most every [`ERROR_LOG_EVERY`]) and counted, never fatal. `tern ctl
//! reopen-log` ([`Handle::reopen`]) makes the writer open the path anew, for log rotation. At
//! shutdown the writer ends only once every worker has dropped its sink, after writing what
//! they left.
//!
//! Not here: when a connection ends and why (`driver`), the `[access_log]` settings'
//! validation (`config`), supervising the thread (`supervise`).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arrayvec::{ArrayString, ArrayVec};
use rustls::{CipherSuite, ProtocolVersion};
use serde::Serialize;

use crate::config::AccessLogSettings;
use crate::counters::WorkerCounters;
use crate::driver::{Backends, Conn, ConnBytes, End, Leg, Why};
use crate::proxy::Failure;
use crate::server::Shutdown;

/// A write error is logged at most this often (the count of errors in between is logged
/// with it); every one is counted.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// Formatted lines are written once this many bytes have gathered (and at the end of each
/// drain), so one write covers many lines.
const BATCH_BYTES: usize = 64 * 1024;
/// How long `tern ctl reopen-log` waits for the writer to have reopened the file, beyond
/// `flush_ms`.
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// The longest SNI kept: a DNS name is at most 253 characters (RFC 1035 §2.3.4); a longer
/// one (which rustls would not accept anyway) is cut here.
const SNI_MAX: usize = 253;
/// The longest ALPN id kept (RFC 7301 §3.1: at most 255 bytes).
const ALPN_MAX: usize = 255;

/// Which data path served a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Kernel,
    Bypass,
}

/// Why a connection ended, as the log spells it. The root cause wins: a TLS error or an
/// unreachable backend is named even when the client then reset the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Both sides finished (FIN or close_notify), nothing lost.
    Graceful,
    /// The client's TLS was invalid; an alert was sent and the connection closed.
    TlsError,
    /// No backend server could be reached; the client was closed politely.
    BackendUnreachable,
    /// The client reset the connection, its transport failed, or it closed during the TLS
    /// handshake.
    Client,
    HandshakeTimeout,
    IdleTimeout,
    SendTimeout,
    FinTimeout,
    /// The backend's connection broke before it finished sending.
    Backend,
    /// tern was stopping (drain deadline, stop).
    Shutdown,
}

impl Reason {
    /// The reason for a connection ending with `end`, given the machine's state then.
    pub fn of(conn: &Conn, end: End) -> Reason {
        match conn.session().failure() {
            Some(Failure::Tls | Failure::SniRefused) => return Reason::TlsError,
            // Closed (FIN) mid-handshake; a reset then or later is `Why::Client` too.
            Some(Failure::ClientLeft) => return Reason::Client,
            None => {}
        }
        if conn.leg() == Leg::Failed && end != End::Abort(Why::Backend) {
            // `Leg::Failed` without a broken stream: every server refused or timed out.
            return Reason::BackendUnreachable;
        }
        match end {
            End::Graceful => Reason::Graceful,
            End::Abort(Why::Client) => Reason::Client,
            End::Abort(Why::HandshakeTimeout) => Reason::HandshakeTimeout,
            End::Abort(Why::IdleTimeout) => Reason::IdleTimeout,
            End::Abort(Why::SendTimeout) => Reason::SendTimeout,
            End::Abort(Why::FinTimeout) => Reason::FinTimeout,
            End::Abort(Why::Backend) => Reason::Backend,
            End::Abort(Why::Shutdown) => Reason::Shutdown,
        }
    }
}

/// What a TLS handshake settled on, as far as it got (every field `None` before then).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    /// The SNI as rustls has it (lower-cased); at most [`SNI_MAX`] characters.
    pub sni: Option<ArrayString<SNI_MAX>>,
    pub alpn: Option<ArrayVec<u8, ALPN_MAX>>,
    pub version: Option<ProtocolVersion>,
    pub cipher: Option<CipherSuite>,
    /// `None` while the handshake had not finished.
    pub resumed: Option<bool>,
}

/// One connection's line, as a worker hands it to the writer: fixed size, no heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the connection ended (wall clock).
    pub end: SystemTime,
    /// From accept to the end.
    pub duration: Duration,
    pub client: SocketAddr,
    /// The listener's index in `config.listeners`.
    pub listener: u16,
    pub path: PathKind,
    /// `None` for a plain (`tls = false`) listener.
    pub tls: Option<TlsFacts>,
    /// The backend server tried last, if any.
    pub backend: Option<SocketAddr>,
    pub bytes: ConnBytes,
    pub reason: Reason,
}

impl Record {
    /// The record of `conn` ending with `end` after `duration`, at `end_time`.
    pub fn of(
        conn: &Conn,
        end: End,
        backends: &Backends,
        path: PathKind,
        end_time: SystemTime,
        duration: Duration,
    ) -> Record {
        let session = conn.session();
        let tls = session.tls_connection().map(|tls| TlsFacts {
            sni: tls.server_name().map(|s| {
                let mut cut = s.len().min(SNI_MAX);
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                let mut out = ArrayString::new();
                out.push_str(s.get(..cut).unwrap_or_default());
                out
            }),
            alpn: tls.alpn_protocol().map(|p| {
                p.iter()
                    .take(ALPN_MAX)
                    .copied()
                    .collect::<ArrayVec<u8, ALPN_MAX>>()
            }),
            version: tls.protocol_version(),
            cipher: tls.negotiated_cipher_suite().map(|c| c.suite()),
            resumed: session.resumed(),
        });
        Record {
            end: end_time,
            duration,
            client: conn.peer,
            listener: conn.listener,
            path,
            tls,
            backend: conn.server().map(|i| backends.addr(i)),
            bytes: *conn.bytes(),
            reason: Reason::of(conn, end),
        }
    }

    /// The record as one JSON line (newline included), with `listeners` naming the listener
    /// indices (`config.listeners` addresses).
    pub fn to_json(&self, listeners: &[SocketAddr], out: &mut Vec<u8>) -> serde_json::Result<()> {
        let start = self.end.checked_sub(self.duration).unwrap_or(self.end);
        let tls = self.tls.as_ref();
        let line = Line {
            time: rfc3339(self.end),
            start: rfc3339(start),
            duration_ms: self.duration.as_micros() as f64 / 1000.0,
            client: self.client,
            listener: listeners.get(usize::from(self.listener)).copied(),
            path: self.path,
            sni: tls.and_then(|t| t.sni.as_ref()).map(|s| s.as_str()),
            alpn: tls
                .and_then(|t| t.alpn.as_ref())
                .map(|a| String::from_utf8_lossy(a)),
            tls_version: tls.and_then(|t| t.version).map(crate::tls::version_name),
            cipher: tls.and_then(|t| t.cipher).map(crate::tls::cipher_name),
            resumed: tls.and_then(|t| t.resumed),
            backend: self.backend,
            bytes_from_client: self.bytes.from_client,
            bytes_to_client: self.bytes.to_client,
            bytes_to_backend: self.bytes.to_backend,
            bytes_from_backend: self.bytes.from_backend,
            reason: self.reason,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.push(b'\n');
        Ok(())
    }
}

/// One line of the file (docs/configuration.md, "[access_log]", lists the fields).
#[derive(Serialize)]
struct Line<'a> {
    time: Option<String>,
    start: Option<String>,
    duration_ms: f64,
    client: SocketAddr,
    listener: Option<SocketAddr>,
    path: PathKind,
    sni: Option<&'a str>,
    alpn: Option<Cow<'a, str>>,
    tls_version: Option<&'static str>,
    cipher: Option<&'static str>,
    resumed: Option<bool>,
    backend: Option<SocketAddr>,
    bytes_from_client: u64,
    bytes_to_client: u64,
    bytes_to_backend: u64,
    bytes_from_backend: u64,
    reason: Reason,
}

/// `t` in RFC 3339 (UTC, microseconds), or `None` when it cannot be represented.
fn rfc3339(t: SystemTime) -> Option<String> {
    let t = time::OffsetDateTime::from(t);
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

// ---------------------------------------------------------------------- the worker's side

/// A worker's end of the log: pushes a record per finished connection, never waits.
pub struct Sink {
    ring: rtrb::Producer<Record>,
    path: PathKind,
    /// The worker's clock epoch (its `tcp::time::Instant` zero), so that a duration can be
    /// taken against `Conn::accepted`.
    epoch: std::time::Instant,
}

impl Sink {
    /// The same sink, measuring against the worker's clock `epoch`.
    pub fn with_epoch(self, epoch: std::time::Instant) -> Sink {
        Sink { epoch, ..self }
    }

    /// Logs `conn`, ending with `end`. Drops (and counts) the record when the ring is full.
    pub fn record(
        &mut self,
        conn: &Conn,
        end: End,
        backends: &Backends,
        counters: &WorkerCounters,
    ) {
        if self.ring.is_full() {
            counters.access_log_dropped.inc();
            return;
        }
        let now = self.epoch.elapsed().as_micros() as u64;
        let duration = Duration::from_micros(now.saturating_sub(conn.accepted().as_micros()));
        let record = Record::of(conn, end, backends, self.path, SystemTime::now(), duration);
        if self.ring.push(record).is_err() {
            counters.access_log_dropped.inc();
        }
    }
}

// ---------------------------------------------------------------------- the writer

/// What the control thread sees of the log: `reopen-log` and the writer's counters.
#[derive(Debug)]
pub struct Handle {
    pub path: PathBuf,
    reopen: Mutex<Reopen>,
    reopened: Condvar,
    /// Lines written to the file.
    pub lines: AtomicU64,
    /// Writes that failed.
    pub write_errors: AtomicU64,
    /// Lines lost to failed writes.
    pub lines_lost: AtomicU64,
    /// Rings of workers started after the writer (a binary upgrade's late bypass workers),
    /// taken by the writer at its next pass.
    late: Mutex<Vec<rtrb::Consumer<Record>>>,
    buffer_lines: usize,
}

/// `reopen-log` requests and their outcome. Invariant: `done <= requested`; `error` is the
/// outcome of request `done` (`None`: reopened).
#[derive(Debug, Default)]
struct Reopen {
    requested: u64,
    done: u64,
    error: Option<String>,
}

impl Handle {
    /// A sink for a worker started after the writer thread (as [`AccessLog::sink`]).
    pub fn late_sink(&self, path: PathKind) -> Sink {
        let (ring, consumer) = rtrb::RingBuffer::new(self.buffer_lines);
        self.late
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(consumer);
        Sink {
            ring,
            path,
            epoch: std::time::Instant::now(),
        }
    }

    /// Asks the writer to open the path anew (after logrotate moved the file) and waits until
    /// it has. The error says why the new file could not be opened (the old one stays in use).
    pub fn reopen(&self, flush: Duration) -> Result<(), String> {
        let mut r = self.reopen.lock().unwrap_or_else(PoisonError::into_inner);
        r.requested += 1;
        let ticket = r.requested;
        let deadline = std::time::Instant::now() + flush + REOPEN_WAIT;
        while r.done < ticket {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err("the access log writer did not answer in time".into());
            }
            r = self
                .reopened
                .wait_timeout(r, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        r.error.clone().map_or(Ok(()), Err)
    }

    /// The writer's counters for `tern ctl stats`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "lines": self.lines.load(Ordering::Relaxed),
            "write_errors": self.write_errors.load(Ordering::Relaxed),
            "lines_lost": self.lines_lost.load(Ordering::Relaxed),
        })
    }
}

/// The log, from start-up until its writer runs: the open file and every worker's ring.
pub struct AccessLog {
    settings: AccessLogSettings,
    file: File,
    /// `config.listeners` addresses, by index.
    listeners: Vec<SocketAddr>,
    rings: Vec<rtrb::Consumer<Record>>,
    handle: Arc<Handle>,
}

fn open(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl AccessLog {
    /// Opens (creates, appends to) the file: a path tern cannot write is a start-up error.
    pub fn open(settings: &AccessLogSettings, listeners: Vec<SocketAddr>) -> io::Result<Self> {
        let file = open(&settings.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening the access log {}: {e}", settings.path.display()),
            )
        })?;
        Ok(AccessLog {
            settings: settings.clone(),
            file,
            listeners,
            rings: Vec::new(),
            handle: Arc::new(Handle {
                path: settings.path.clone(),
                reopen: Mutex::default(),
                reopened: Condvar::new(),
                lines: AtomicU64::new(0),
                write_errors: AtomicU64::new(0),
                lines_lost: AtomicU64::new(0),
                late: Mutex::default(),
                buffer_lines: settings.buffer_lines,
            }),
        })
    }

    /// A new worker's sink (its ring holds `buffer_lines` records). Call
    /// [`Sink::with_epoch`] on the worker.
    pub fn sink(&mut self, path: PathKind) -> Sink {
        let (ring, consumer) = rtrb::RingBuffer::new(self.settings.buffer_lines);
        self.rings.push(consumer);
        Sink {
            ring,
            path,
            epoch: std::time::Instant::now(),
        }
    }

    pub fn handle(&self) -> Arc<Handle> {
        self.handle.clone()
    }

    /// Starts the writer thread (`tern-access-log`). It ends once tern is shutting down and
    /// every sink has been dropped (their workers ended), after writing what they left.
    pub fn spawn(self, shutdown: Arc<Shutdown>) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tern-access-log".into())
            .spawn(move || self.run(&shutdown))
    }

    fn run(mut self, shutdown: &Shutdown) {
        let mut writer = Writer::new(self.file, self.handle.clone());
        let flush = self.settings.flush;
        loop {
            self.rings.append(
                &mut self
                    .handle
                    .late
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            let stopping =
                shutdown.drain.load(Ordering::Relaxed) || shutdown.stop.load(Ordering::Relaxed);
            let finished = stopping && self.rings.iter().all(rtrb::Consumer::is_abandoned);
            // Pairs with the release in each sink's drop: every record pushed before it is
            // seen by the drain below.
            std::sync::atomic::fence(Ordering::Acquire);
            for ring in &mut self.rings {
                while let Ok(record) = ring.pop() {
                    writer.add(&record, &self.listeners);
                }
            }
            writer.write_out();
            writer.serve_reopen(&self.handle);
            if finished {
                break;
            }
            std::thread::sleep(flush);
        }
        tracing::debug!(
            lines = self.handle.lines.load(Ordering::Relaxed),
            "access log writer stopped"
        );
    }
}

/// The writer thread's file and batch.
struct Writer {
    file: File,
    handle: Arc<Handle>,
    /// Formatted lines not written yet (the BufWriter of this file: a failed write drops it
    /// whole, so a broken disk cannot grow it).
    batch: Vec<u8>,
    /// Lines in `batch`.
    batch_lines: u64,
    /// When a write error was last logged, and errors since.
    last_error_log: Option<std::time::Instant>,
    errors_unlogged: u64,
}

impl Writer {
    fn new(file: File, handle: Arc<Handle>) -> Writer {
        Writer {
            file,
            handle,
            batch: Vec::with_capacity(BATCH_BYTES + 1024),
            batch_lines: 0,
            last_error_log: None,
            errors_unlogged: 0,
        }
    }

    fn add(&mut self, record: &Record, listeners: &[SocketAddr]) {
        let len = self.batch.len();
        if let Err(e) = record.to_json(listeners, &mut self.batch) {
            // Cannot happen for these types; if it did, the partial line goes.
            self.batch.truncate(len);
            tracing::warn!(error = %e, "cannot format an access log line");
            return;
        }
        self.batch_lines += 1;
        if self.batch.len() >= BATCH_BYTES {
            self.write_out();
        }
    }

    fn write_out(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        match self.file.write_all(&self.batch) {
            Ok(()) => {
                self.handle
                    .lines
                    .fetch_add(self.batch_lines, Ordering::Relaxed);
            }
            Err(e) => {
                self.handle.write_errors.fetch_add(1, Ordering::Relaxed);
                self.handle
                    .lines_lost
                    .fetch_add(self.batch_lines, Ordering::Relaxed);
                self.errors_unlogged += 1;
                let due = self
                    .last_error_log
                    .is_none_or(|at| at.elapsed() >= ERROR_LOG_EVERY);
                if due {
                    tracing::error!(
                        path = %self.handle.path.display(),
                        error = %e,
                        errors = self.errors_unlogged,
                        "cannot write the access log; lines are lost until it can"
                    );
                    self.last_error_log = Some(std::time::Instant::now());
                    self.errors_unlogged = 0;
                }
            }
        }
        self.batch.clear();
        self.batch_lines = 0;
    }

    /// Reopens the file if `reopen-log` asked for it since the last time.
    fn serve_reopen(&mut self, handle: &Handle) {
        let mut r = handle.reopen.lock().unwrap_or_else(PoisonError::into_inner);
        if r.done == r.requested {
            return;
        }
        r.error = match open(&handle.path) {
            Ok(file) => {
                self.file = file;
                tracing::info!(path = %handle.path.display(), "access log reopened");
                None
            }
            Err(e) => {
                tracing::error!(path = %handle.path.display(), error = %e, "cannot reopen the access log; still writing to the old file");
                Some(format!(
                    "cannot reopen the access log {}: {e}",
                    handle.path.display()
                ))
            }
        };
        r.done = r.requested;
        handle.reopened.notify_all();
    }
}

#[cfg(test)]
mod tests;
