//! The control plane's command socket: a Unix stream socket on which `tern ctl` (or any client
//! that writes a line) asks for counters and manages the XDP source blocklist. One command per
//! connection, answered with one reply, then the connection is closed.
//!
//! Commands and replies:
//! - `ping` → `pong`
//! - `stats` → one JSON document (workers' counters, totals, each XDP program's counters,
//!   the backend servers, latency percentiles per listener, per backend server and total)
//! - `backends` → one JSON document: each backend server's state and counters, merged across
//!   workers ([`backends_snapshot`])
//! - `conns` → one JSON document: each worker's open connections counted per state (handshake,
//!   waiting, connecting, proxying, half_closed, closing), the sums per path and the total
//!   ([`crate::driver::census`]; answered within a worker tick)
//! - `block PREFIX` → `ok`: drop packets from PREFIX (`10.0.0.0/8`, `2001:db8::/32`, or a bare
//!   address for one host) on every interface tern's XDP program is attached to
//! - `unblock PREFIX` → `ok`: remove exactly that prefix again
//! - `blocks` → the blocked prefixes, one per line (nothing when the list is empty)
//! - `drain` → `ok`: drain as on SIGTERM (stop accepting, finish open connections, exit 0)
//! - `takeover` → the listening sockets, for a new tern taking over ([`crate::upgrade`]);
//!   the connection then stays open until the new tern says `drain`
//! - `reopen-log` → `ok` once the access log writer has opened its path anew (log rotation)
//!
//! Anything that fails is answered with one line starting `error: ` that says what was wrong;
//! `tern ctl` exits non-zero on it. Blocklist commands need an attached XDP program (a listener
//! with an `interface`); without one they answer an error saying so.
//!
//! Access and robustness: the socket file gets the configured owner, group and mode (0600 by
//! default) before it listens; only a stale socket at its path is ever removed ([`bind`],
//! [`SocketFile`]). Each client is served on its own short-lived thread under a read and a
//! write deadline, a request-size bound and a bound on concurrent clients ([`serve`]), so an
//! idle or non-reading client cannot hold up others; each command is logged with the peer's
//! uid, gid and pid (SO_PEERCRED).
//!
//! Counters are read from the workers' [`WorkerCounters`] without locking them; XDP counters
//! come from the attached programs' per-CPU maps. This module does not own the programs (see
//! [`crate::bypass::xdp`]) nor their life cycle (`server` attaches them and empties
//! [`ControlState::xdp`] at exit). How `tern ctl` prints the replies (`--format`) is the
//! client's business ([`text`]).

pub mod text;

use std::fmt::Write as _;
use std::io::{self, Read as _, Write};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::bypass::xdp::{IpPrefix, XdpProgram};
use crate::bypass::{BypassCounters, BypassSnapshot};
use crate::config::Control;
use crate::counters::{Snapshot, WorkerCounters};

/// What the control thread can see.
pub struct ControlState {
    pub workers: Vec<Arc<WorkerCounters>>,
    /// Attached XDP programs, with their interface names. Emptied by the main thread at exit
    /// (dropping a program detaches it).
    pub xdp: Mutex<Vec<(String, XdpProgram)>>,
    /// The bypass workers (`mode = "bypass"` listeners), one entry per worker and interface.
    /// A mutex because after a binary upgrade they start once the old tern has exited.
    pub bypass: Mutex<Vec<BypassInfo>>,
    pub started: Instant,
    /// The running configuration and `reload`.
    pub reloader: Arc<crate::reload::Reloader>,
    /// The process's shutdown flags: `drain` and `takeover` act on them.
    pub shutdown: Arc<crate::server::Shutdown>,
    /// Every worker's backend servers (both paths), for `backends` and `stats`.
    pub backends: Arc<crate::driver::board::Board>,
    /// The access log (`reopen-log`, its counters in `stats`), when it is on; with its
    /// `flush_ms` (how long a reopen may take to be seen).
    pub access_log: Option<(Arc<crate::access_log::Handle>, Duration)>,
    /// The workers' latency histograms (`stats` shows their percentiles; `/metrics` them).
    pub latency: Arc<crate::metrics::Latency>,
}

#[cfg(test)]
impl ControlState {
    /// A state for unit tests: `workers`' counters, `programs`, `latency`, a plain-listener
    /// configuration (never reloaded from disk) and nothing else.
    pub(crate) fn for_tests(
        workers: Vec<Arc<WorkerCounters>>,
        programs: Vec<(String, XdpProgram)>,
        latency: Arc<crate::metrics::Latency>,
    ) -> ControlState {
        let text = "[[listener]]\naddress = \"127.0.0.1:8443\"\ntls = false\n\n[backend]\nservers = [\"127.0.0.1:8080\"]\n";
        let config = crate::config::Config::from_str(Path::new("/nonexistent/tern.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        ControlState {
            workers,
            xdp: Mutex::new(programs),
            bypass: Mutex::new(Vec::new()),
            started: Instant::now(),
            reloader: crate::reload::Reloader::new(config, None),
            shutdown: Arc::default(),
            backends: Arc::default(),
            access_log: None,
            latency,
        }
    }
}

/// What the control plane shows of one bypass worker.
pub struct BypassInfo {
    pub interface: String,
    pub worker: usize,
    /// AF_XDP bind mode (`copy` on veth, `zero-copy` on drivers that support it).
    pub bind_mode: String,
    /// UMEM page size actually used (hugepages, or the 4 KiB fallback).
    pub page_kind: String,
    pub counters: Arc<BypassCounters>,
    /// The L4 proxy's connection counters, when the worker runs one (`tls = false` listeners).
    pub proxy: Option<Arc<crate::counters::WorkerCounters>>,
    /// Its TCP stack's counters.
    pub tcp: Option<Arc<crate::bypass::proxy::TcpCounters>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: another tern is already listening on it")]
    InUse { path: PathBuf },
    #[error(
        "control socket {path}: the path exists and is {what}, not a socket; tern removes only \
         a stale socket, so move it away or point `control.socket` elsewhere"
    )]
    NotASocket { path: PathBuf, what: &'static str },
    #[error("control socket {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: String,
        source: io::Error,
    },
}

/// How many clients are served at once. One more is answered `error: busy` and closed at
/// once, so clients that hold connections open can at worst delay others by a deadline.
pub const MAX_CLIENTS: usize = 16;
/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;
/// From accept, how long a client has to send its command line...
pub const READ_DEADLINE: Duration = Duration::from_secs(10);
/// ...and how long, once the reply is ready, to take all of it.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// The socket file tern created. Dropping it removes the file, but only while the path
/// still names that same socket (same device and inode): a file someone put there since, or a
/// later tern's socket, is left alone.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the socket to `to`, atomically replacing what is there (an upgrade replaces the
    /// old tern's socket: a client connects to one or the other, never to nothing).
    pub fn rename(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }
}

/// For an upgrade: binds like [`bind`], at `SOCKET.upgrade-PID` beside the running tern's
/// socket (so [`SocketFile::rename`] stays on one file system); the caller renames it over the
/// configured path once it serves.
pub fn bind_beside(config: &Control) -> Result<(UnixListener, SocketFile), ControlError> {
    let mut name = config.socket.clone().into_os_string();
    name.push(format!(".upgrade-{}", std::process::id()));
    let temp = Control {
        socket: PathBuf::from(name),
        ..config.clone()
    };
    bind(&temp)
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the control socket");
            }
        }
    }
}

/// Binds the command socket at `config.socket` with the configured owner, group and mode.
///
/// Only a stale socket (nobody listening) is replaced; a live one is [`ControlError::InUse`],
/// so two terns cannot share a path by accident, and anything that is not a socket (a file,
/// a directory, a symbolic link) is [`ControlError::NotASocket`] and left as it is. Owner,
/// group and mode are set between `bind` and `listen`: until then a connect is refused, so
/// no client ever reaches the socket under the process umask's looser bits.
pub fn bind(config: &Control) -> Result<(UnixListener, SocketFile), ControlError> {
    let path = config.socket.as_path();
    let io_err = |action: &str| {
        let action = action.to_owned();
        move |source| ControlError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    remove_stale(path)?;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(io_err("cannot create its directory"))?;
        }
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| io_err("cannot create a Unix socket")(e.into()))?;
    let address = SocketAddrUnix::new(path).map_err(|e| io_err("invalid path")(e.into()))?;
    rustix::net::bind(&fd, &address).map_err(|e| io_err("cannot bind")(e.into()))?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err("cannot stat after bind"))?;
    // From here on the file is ours: an error below removes it again.
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if config.owner.is_some() || config.group.is_some() {
        std::os::unix::fs::lchown(path, config.owner, config.group).map_err(io_err(&format!(
            "cannot set owner {} and group {}",
            id_text(config.owner),
            id_text(config.group)
        )))?;
    }
    // After chown, which may clear bits on some systems; the path was just bound by us and
    // is a socket, so following it cannot reach another file unless the directory is
    // writable by others (docs/operations.md asks for one that is not).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
        .map_err(io_err(&format!("cannot set mode {:04o}", config.mode)))?;
    rustix::net::listen(&fd, 64).map_err(|e| io_err("cannot listen")(e.into()))?;
    Ok((UnixListener::from(fd), file))
}

fn id_text(id: Option<u32>) -> String {
    id.map_or_else(|| "(unchanged)".to_string(), |id| id.to_string())
}

/// The uid of user `name` (through NSS, as `id` resolves it); `None` if there is none.
pub fn user_id(name: &str) -> io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))?;
    lookup(|buf| {
        // SAFETY: `passwd` is plain data that getpwnam_r fills; zeroed is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: a NUL-terminated name, an entry and a
        // result pointer on this stack frame, and `buf` with its true length. The strings the
        // entry points to live in `buf`, which is not read here.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(entry.pw_uid))
    })
}

/// The gid of group `name` (through NSS); `None` if there is none.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))?;
    lookup(|buf| {
        // SAFETY: `group` is plain data that getgrnam_r fills; zeroed is a valid value.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_id`.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(entry.gr_gid))
    })
}

/// Runs a `get*nam_r` call with a scratch buffer, growing it while the call says ERANGE.
fn lookup(
    mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<u32>),
) -> io::Result<Option<u32>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        match call(&mut buf) {
            (0, id) => return Ok(id),
            // Groups with many members need more room; 1 MiB is far beyond any real entry.
            (libc::ERANGE, _) if size < 1 << 20 => size *= 4,
            // Some NSS modules report "no such entry" as an error code instead of a null result.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (rc, _) => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// Removes a socket nobody listens on at `path`; refuses anything else that is there.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Io {
                path: path.to_path_buf(),
                action: "cannot inspect the path".to_string(),
                source,
            })
        }
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_file() {
            "a regular file"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
            what,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_path_buf(),
        }),
        // Nobody listening: a socket left behind by a tern that did not exit cleanly.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale control socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ControlError::Io {
                    path: path.to_path_buf(),
                    action: "cannot remove the stale socket".to_string(),
                    source: e,
                }),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // E.g. permission denied: whether someone listens is unknown, so nothing is removed.
        Err(source) => Err(ControlError::Io {
            path: path.to_path_buf(),
            action: "cannot tell whether another tern listens on it".to_string(),
            source,
        }),
    }
}

/// Serves commands until the process exits. Runs on the control thread, which only accepts:
/// each client is served on a short-lived thread of its own, under [`READ_DEADLINE`] and
/// [`WRITE_DEADLINE`], at most [`MAX_CLIENTS`] at once. A client that sends nothing, sends
/// half a line or never reads its reply holds only its own thread, and only until a deadline.
pub fn serve(listener: UnixListener, state: Arc<ControlState>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = crate::fault::check(crate::fault::Site::Control) {
                    tracing::debug!(error = %e, "control connection failed");
                    continue;
                }
                admit(stream, &state, &active)
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on the same error.
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// One of the [`MAX_CLIENTS`] places; given back on drop.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(active: &Arc<AtomicUsize>) -> Option<ClientSlot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(active.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hands `stream` to a thread of its own, or turns it away when [`MAX_CLIENTS`] are served.
fn admit(stream: UnixStream, state: &Arc<ControlState>, active: &Arc<AtomicUsize>) {
    let peer = Peer::of(&stream);
    let Some(slot) = ClientSlot::take(active) else {
        tracing::debug!(%peer, "control client turned away: {MAX_CLIENTS} already connected");
        // Non-blocking: the answer fits an empty socket buffer, and if it does not go out the
        // client loses only the explanation. What the client sent already is read first, so
        // that closing does not reset the connection before the answer is read.
        let _ = stream.set_nonblocking(true);
        let mut discard = [0u8; 512];
        for _ in 0..MAX_REQUEST / discard.len() {
            if !matches!((&stream).read(&mut discard), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = (&stream).write(
            format!("error: busy ({MAX_CLIENTS} control clients connected); try again\n")
                .as_bytes(),
        );
        return;
    };
    let state = state.clone();
    let spawned = std::thread::Builder::new()
        .name("tern-control-client".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = handle(&stream, &state, peer, Instant::now()) {
                tracing::debug!(%peer, error = %e, "control connection failed");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "cannot start a thread for a control client");
    }
}

/// The peer process of a control connection, as the kernel saw it at connect (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    uid: Option<u32>,
    gid: Option<u32>,
    pid: Option<i32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        match rustix::net::sockopt::socket_peercred(stream) {
            Ok(cred) => Peer {
                uid: Some(cred.uid.as_raw()),
                gid: Some(cred.gid.as_raw()),
                pid: Some(cred.pid.as_raw_nonzero().get()),
            },
            Err(_) => Peer {
                uid: None,
                gid: None,
                pid: None,
            },
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<String>| v.unwrap_or_else(|| "?".to_string());
        write!(
            f,
            "uid={} gid={} pid={}",
            show(self.uid.map(|v| v.to_string())),
            show(self.gid.map(|v| v.to_string())),
            show(self.pid.map(|v| v.to_string()))
        )
    }
}

/// Reads one command line from `stream` and writes the reply, each under its deadline
/// counted from `accepted`.
fn handle(
    stream: &UnixStream,
    state: &ControlState,
    peer: Peer,
    accepted: Instant,
) -> io::Result<()> {
    let answer = match read_request(stream, accepted + READ_DEADLINE)? {
        Ok(line) if line.trim() == "takeover" => {
            tracing::info!(%peer, "control command takeover: a new tern asks for the sockets");
            // The XDP programs go to the successor too (bypass path and XDP interfaces).
            let xdp: Vec<crate::upgrade::XdpInfo> = state
                .xdp
                .lock()
                .map(|programs| {
                    programs
                        .iter()
                        .map(|(interface, p)| crate::upgrade::XdpInfo {
                            interface: interface.clone(),
                            xdp: p.handover_ids().clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            return crate::upgrade::serve(stream, &state.shutdown, &xdp);
        }
        Ok(line) => {
            tracing::info!(
                // `None` (SO_PEERCRED failed, which a connected Unix socket does not do)
                // leaves the field out.
                uid = peer.uid,
                gid = peer.gid,
                pid = peer.pid,
                command = ?line.trim(),
                "control command"
            );
            reply(state, &line)
        }
        Err(message) => {
            tracing::info!(%peer, %message, "control request refused");
            format!("error: {message}\n")
        }
    };
    write_reply(stream, answer.as_bytes(), Instant::now() + WRITE_DEADLINE)
}

/// Reads up to the first newline (or the end of the stream) by `deadline`. The outer error is
/// the connection's (including [`io::ErrorKind::TimedOut`]); the inner one is a request that
/// arrived but cannot be a command (too long, not UTF-8), to be answered with its message.
fn read_request(mut stream: &UnixStream, deadline: Instant) -> io::Result<Result<String, String>> {
    let mut line = Vec::with_capacity(64);
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete command line before the deadline",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The timeout shows as EAGAIN; the loop's deadline check names it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let data = chunk.get(..n).unwrap_or_default();
        let (part, complete) = match data.iter().position(|&b| b == b'\n') {
            Some(end) => (data.get(..end).unwrap_or_default(), true),
            // End of stream: what came is the command (`printf stats | socat ...`).
            None => (data, n == 0),
        };
        if n == 0 && line.is_empty() {
            // Connected and went away without a word (a probe, like `bind`'s stale check).
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(part);
        if line.len() + usize::from(complete) > MAX_REQUEST {
            return Ok(Err(format!("request longer than {MAX_REQUEST} bytes")));
        }
        if complete {
            return Ok(String::from_utf8(line).map_err(|_| "the request is not UTF-8".to_string()));
        }
    }
}

/// Writes all of `bytes` by `deadline` ([`crate::sys::write_all_before`]).
fn write_reply(stream: &UnixStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    crate::sys::write_all_before(stream, bytes, deadline, "client")
}

/// The reply to one command line: what [`serve`] writes back, newline-terminated.
pub fn reply(state: &ControlState, line: &str) -> String {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("");
    let argument = words.next();
    let extra = words.next();
    let result = match (command, argument, extra) {
        ("ping", None, _) => Ok("pong\n".to_string()),
        ("stats", None, _) => serde_json::to_string_pretty(&stats(state))
            .map(|mut json| {
                json.push('\n');
                json
            })
            .map_err(|e| format!("cannot encode the counters: {e}")),
        ("backends", None, _) => serde_json::to_string_pretty(&backends(state))
            .map(|mut json| {
                json.push('\n');
                json
            })
            .map_err(|e| format!("cannot encode the backends: {e}")),
        ("conns", None, _) => conns(state),
        ("block", Some(prefix), None) => block(state, prefix),
        ("unblock", Some(prefix), None) => unblock(state, prefix),
        ("blocks", None, _) => blocks(state),
        ("reload", None, _) => reload(state),
        ("drain", None, _) => {
            state.shutdown.begin_drain();
            Ok("ok\n".to_string())
        }
        ("reopen-log", None, _) => reopen_log(state),
        ("block" | "unblock", None, _) => Err(format!("usage: {command} PREFIX")),
        ("block" | "unblock", Some(_), Some(_)) => {
            Err(format!("usage: {command} PREFIX (one prefix per command)"))
        }
        (
            "ping" | "stats" | "blocks" | "reload" | "drain" | "backends" | "reopen-log" | "conns",
            Some(_),
            _,
        ) => Err(format!("{command} takes no argument")),
        _ => Err(format!(
            "unknown command {:?} (commands: ping, stats, backends, conns, reload, drain, \
             block PREFIX, unblock PREFIX, blocks, reopen-log, takeover)",
            line.trim()
        )),
    };
    result.unwrap_or_else(|message| format!("error: {message}\n"))
}

/// Re-reads the configuration file; the reply says what changed, or why nothing did.
fn reload(state: &ControlState) -> Result<String, String> {
    let draining = state.shutdown.drain.load(Ordering::Relaxed);
    let outcome = state.reloader.reload(draining);
    crate::reload::log_outcome("tern ctl reload", &outcome);
    match outcome {
        Ok(r) => Ok(format!("ok: {r}\n")),
        Err(e) => Err(format!(
            "reload refused, the running configuration is kept: {e}"
        )),
    }
}

/// Runs `f` on every attached program, in attach order; stops at the first error. The error
/// names the interface (every `XdpError` does).
fn with_programs<T>(
    state: &ControlState,
    mut f: impl FnMut(&XdpProgram) -> Result<T, crate::bypass::xdp::XdpError>,
) -> Result<Vec<T>, String> {
    let programs = state.xdp.lock().unwrap_or_else(PoisonError::into_inner);
    if programs.is_empty() {
        return Err(
            "no XDP program is attached (the blocklist needs a listener with an `interface`)"
                .to_string(),
        );
    }
    programs
        .iter()
        .map(|(_, program)| f(program).map_err(|e| e.to_string()))
        .collect()
}

fn parse_prefix(text: &str) -> Result<IpPrefix, String> {
    text.parse::<IpPrefix>().map_err(|e| e.to_string())
}

fn block(state: &ControlState, text: &str) -> Result<String, String> {
    let prefix = parse_prefix(text)?;
    with_programs(state, |program| program.block(prefix))?;
    tracing::info!(%prefix, "blocked");
    Ok("ok\n".to_string())
}

fn unblock(state: &ControlState, text: &str) -> Result<String, String> {
    let prefix = parse_prefix(text)?;
    let removed = with_programs(state, |program| program.unblock(prefix))?;
    if !removed.contains(&true) {
        return Err(format!("{prefix} is not in the blocklist"));
    }
    tracing::info!(%prefix, "unblocked");
    Ok("ok\n".to_string())
}

/// The union of every program's blocklist (they are managed together, so normally identical).
fn blocks(state: &ControlState) -> Result<String, String> {
    let lists = with_programs(state, XdpProgram::blocks)?;
    let mut all: Vec<IpPrefix> = lists.into_iter().flatten().collect();
    all.sort();
    all.dedup();
    let mut out = String::new();
    for prefix in all {
        let _ = writeln!(out, "{prefix}");
    }
    Ok(out)
}

/// Each backend server's state and counters, merged across every worker of both paths (see
/// [`crate::driver::board::Board::snapshot`] for how). For `tern ctl backends`, the `backends`
/// section of `stats`, and metrics.
pub fn backends_snapshot(state: &ControlState) -> Vec<crate::driver::board::ServerSnapshot> {
    state.backends.snapshot()
}

/// The `backends` document.
pub fn backends(state: &ControlState) -> serde_json::Value {
    serde_json::json!({ "servers": backends_snapshot(state) })
}

/// `conns`: asks every worker for its connections per state and waits (bounded) for the
/// answers; a worker that does not answer in time is listed with `"counts": null`.
fn conns(state: &ControlState) -> Result<String, String> {
    let answers = state
        .backends
        .census
        .count(crate::driver::census::ANSWER_WITHIN);
    serde_json::to_string_pretty(&crate::driver::census::document(&answers))
        .map(|mut json| {
            json.push('\n');
            json
        })
        .map_err(|e| format!("cannot encode the connection counts: {e}"))
}

/// `reopen-log`: the access log writer opens its path anew (after logrotate moved the file).
fn reopen_log(state: &ControlState) -> Result<String, String> {
    let Some((log, flush)) = &state.access_log else {
        return Err("the access log is off (no [access_log] path)".to_string());
    };
    log.reopen(*flush)?;
    Ok("ok\n".to_string())
}

/// The `stats` document.
pub fn stats(state: &ControlState) -> serde_json::Value {
    let mut total = Snapshot::default();
    let workers: Vec<_> = state
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let s = w.snapshot();
            total += s;
            serde_json::json!({ "worker": i, "counters": s })
        })
        .collect();
    let xdp: Vec<_> = state
        .xdp
        .lock()
        .map(|progs| {
            progs
                .iter()
                .map(|(iface, p)| match p.counters() {
                    Ok(c) => serde_json::json!({
                        "interface": iface,
                        "mode": p.attached_mode().to_string(),
                        "counters": c,
                        // Kernel ids, for inspecting the maps as root (bpftool, tests); no
                        // secret: the steering key stays in the map.
                        "map_ids": p.handover_ids().maps,
                    }),
                    Err(e) => serde_json::json!({ "interface": iface, "error": e.to_string() }),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut bypass_total = BypassSnapshot::default();
    let mut proxy_total = crate::counters::Snapshot::default();
    let mut tcp_total = crate::bypass::proxy::TcpSnapshot::default();
    let bypass = state.bypass.lock().unwrap_or_else(|e| e.into_inner());
    let bypass_workers: Vec<_> = bypass
        .iter()
        .map(|b| {
            let s = b.counters.snapshot();
            bypass_total += s;
            let proxy = b.proxy.as_ref().map(|p| p.snapshot());
            let tcp = b.tcp.as_ref().map(|t| t.snapshot());
            if let Some(p) = proxy {
                proxy_total += p;
            }
            if let Some(t) = tcp {
                tcp_total += t;
            }
            serde_json::json!({
                "interface": b.interface,
                "worker": b.worker,
                "bind": b.bind_mode,
                "pages": b.page_kind,
                "counters": s,
                "proxy": proxy,
                "tcp": tcp,
            })
        })
        .collect();
    serde_json::json!({
        "latency": state.latency.report().percentiles_json(),
        "uptime_s": state.started.elapsed().as_secs(),
        "access_log": state.access_log.as_ref().map(|(log, _)| log.stats()),
        "ticket_keys": crate::tls::ticket_keys::stats()
            .into_iter()
            .map(|(file, s)| serde_json::json!({ "file": file, "counters": s }))
            .collect::<Vec<_>>(),
        "total": total,
        "workers": workers,
        "xdp": xdp,
        "backends": backends_snapshot(state),
        "session_cache": crate::session_cache::stats(),
        "bypass": {
            "total": bypass_total,
            "proxy": proxy_total,
            "tcp": tcp_total,
            "workers": bypass_workers,
        },
    })
}

/// Client side, for `tern ctl`: sends `command`, returns the reply.
///
/// The server may answer and close before reading everything sent (`error: busy`, or a
/// request that is too long); the kernel then fails the rest of the write (EPIPE) or the read
/// after the reply (ECONNRESET). What was answered is still the answer, so it is returned.
pub fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )
    })?;
    // Longer than the server's own deadlines, so its `error: ...` answer arrives first.
    s.set_read_timeout(Some(READ_DEADLINE + WRITE_DEADLINE))?;
    s.set_write_timeout(Some(READ_DEADLINE))?;
    let mut message = command.as_bytes().to_vec();
    message.push(b'\n');
    let sent = s.write_all(&message);
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !out.is_empty() => break,
            Err(e) => return Err(sent.err().unwrap_or(e)),
        }
    }
    if out.is_empty() {
        sent?;
    }
    String::from_utf8(out)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the reply is not UTF-8"))
}

#[cfg(test)]
mod tests {
    //! The blocklist commands against real attached programs (on `lo` of throw-away network
    //! namespaces, skb mode; needs root), and over a real Unix socket through [`request`].

    use super::*;
    use crate::bypass::xdp::tests::Netns;
    use crate::config::XdpAttach;

    fn state(programs: Vec<(String, XdpProgram)>) -> ControlState {
        ControlState::for_tests(
            vec![Arc::new(WorkerCounters::default())],
            programs,
            Arc::default(),
        )
    }

    fn program_on_lo(ns: &Netns) -> (String, XdpProgram) {
        let program = ns
            .run_in(|| crate::bypass::xdp::attach("lo", XdpAttach::Skb))
            .unwrap_or_else(|err| panic!("attach to lo in {}: {err}", ns.name));
        ("lo".to_string(), program)
    }

    #[test]
    fn blocklist_commands_without_a_program_say_so() {
        let state = state(Vec::new());
        for command in ["block 10.0.0.0/8", "unblock 10.0.0.0/8", "blocks"] {
            let answer = reply(&state, command);
            assert!(
                answer.starts_with("error: no XDP program is attached"),
                "{command}: {answer}"
            );
        }
        // Prefix errors come first: they are the caller's to fix whatever is attached.
        let answer = reply(&state, "block 10.0.0.1/8");
        assert!(answer.contains("host bits"), "{answer}");
        assert_eq!(reply(&state, "ping\n"), "pong\n");
    }

    #[test]
    fn malformed_commands_are_errors() {
        let state = state(Vec::new());
        for (command, expected) in [
            ("block", "error: usage: block PREFIX\n"),
            ("unblock", "error: usage: unblock PREFIX\n"),
            (
                "block 10.0.0.0/8 10.1.0.0/16",
                "error: usage: block PREFIX (one prefix per command)\n",
            ),
            ("blocks now", "error: blocks takes no argument\n"),
            ("ping pong", "error: ping takes no argument\n"),
        ] {
            assert_eq!(reply(&state, command), expected, "{command:?}");
        }
        let answer = reply(&state, "frobnicate 1");
        assert!(
            answer.starts_with("error: unknown command \"frobnicate 1\"")
                && answer.contains("block PREFIX"),
            "{answer}"
        );
        let answer = reply(&state, "block not-a-prefix");
        assert!(
            answer.starts_with("error: ") && answer.contains("\"not-a-prefix\""),
            "names the bad prefix: {answer}"
        );
    }

    #[test]
    fn block_unblock_and_list_apply_to_every_program() {
        let (ns1, ns2) = (Netns::new(), Netns::new());
        let state = state(vec![program_on_lo(&ns1), program_on_lo(&ns2)]);
        assert_eq!(reply(&state, "blocks"), "", "empty at start");
        assert_eq!(reply(&state, "block 10.0.0.0/8"), "ok\n");
        assert_eq!(reply(&state, "block 2001:db8::/32\n"), "ok\n");
        assert_eq!(reply(&state, "block 192.0.2.7"), "ok\n", "a bare address");
        let answer = reply(&state, "block 10.0.0.1/8");
        assert!(
            answer.starts_with("error: 10.0.0.1/8: host bits are set")
                && answer.contains("10.0.0.0/8"),
            "{answer}"
        );
        let listed = "10.0.0.0/8\n192.0.2.7/32\n2001:db8::/32\n";
        assert_eq!(reply(&state, "blocks"), listed);
        for (_, program) in state.xdp.lock().expect("lock").iter() {
            let own: Vec<String> = program
                .blocks()
                .expect("blocks")
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(
                own.join("\n") + "\n",
                listed,
                "every program got every prefix"
            );
        }

        assert_eq!(reply(&state, "unblock 10.0.0.0/8"), "ok\n");
        assert_eq!(
            reply(&state, "unblock 10.0.0.0/8"),
            "error: 10.0.0.0/8 is not in the blocklist\n"
        );
        assert_eq!(
            reply(&state, "unblock 2001:db8::/48"),
            "error: 2001:db8::/48 is not in the blocklist\n",
            "unblock is exact, not a match inside a blocked prefix"
        );
        assert_eq!(reply(&state, "blocks"), "192.0.2.7/32\n2001:db8::/32\n");

        // The same over the socket, through the client `tern ctl` uses.
        let dir = TempDir(std::env::temp_dir().join(format!(
            "tern-control-test-{}",
            crate::bypass::xdp::tests::unique("c")
        )));
        let path = dir.0.join("ctl.sock");
        let (listener, _file) = bind(&control_at(&path)).expect("bind the control socket");
        let state = Arc::new(state);
        let server = {
            let state = state.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    let (stream, _) = listener.accept().expect("accept");
                    let peer = Peer::of(&stream);
                    handle(&stream, &state, peer, Instant::now()).expect("handle");
                }
            })
        };
        assert_eq!(
            request(&path, "block 198.51.100.0/24").expect("request"),
            "ok\n"
        );
        assert_eq!(
            request(&path, "blocks").expect("request"),
            "192.0.2.7/32\n198.51.100.0/24\n2001:db8::/32\n"
        );
        let answer = request(&path, "unblock 198.51.101.0/23").expect("request");
        assert!(
            answer.starts_with("error: 198.51.101.0/23: host bits are set"),
            "{answer}"
        );
        server.join().expect("control thread");
    }

    fn control_at(path: &Path) -> Control {
        Control {
            socket: path.to_path_buf(),
            mode: crate::config::DEFAULT_CONTROL_MODE,
            owner: None,
            group: None,
        }
    }

    fn temp_dir(tag: &str) -> TempDir {
        let dir = TempDir(std::env::temp_dir().join(format!(
            "tern-control-{tag}-{}",
            crate::bypass::xdp::tests::unique("c")
        )));
        std::fs::create_dir_all(&dir.0).expect("create the test directory");
        dir
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("stat the socket")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_socket_gets_the_configured_mode_and_is_removed_only_while_ours() {
        let dir = temp_dir("mode");
        let path = dir.0.join("ctl.sock");
        let (listener, file) = bind(&control_at(&path)).expect("bind");
        assert_eq!(
            mode_of(&path),
            0o600,
            "default: owner only, whatever the umask"
        );
        drop((listener, file));
        assert!(!path.exists(), "dropping the guard removes our socket");

        let control = Control {
            mode: 0o660,
            ..control_at(&path)
        };
        let (listener, file) = bind(&control).expect("bind with 0660");
        assert_eq!(mode_of(&path), 0o660);
        drop(listener);
        // Someone replaced the socket with a file of their own: the guard leaves it.
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, "theirs").expect("write");
        drop(file);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "theirs");
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = temp_dir("stale");
        let path = dir.0.join("ctl.sock");
        // A live socket: refused, and still answering afterwards.
        let (live, file) = bind(&control_at(&path)).expect("bind");
        let err = bind(&control_at(&path)).expect_err("a second bind on a live socket");
        assert!(matches!(err, ControlError::InUse { .. }), "{err}");
        // Stale: nobody listens any more, but the file is still there.
        drop(live);
        std::mem::forget(file);
        assert!(path.exists());
        let (_live, _file) = bind(&control_at(&path)).expect("a stale socket is replaced");

        for (name, make, what) in [
            (
                "file",
                (|p: &Path| std::fs::write(p, "keep me")) as fn(&Path) -> io::Result<()>,
                "a regular file",
            ),
            ("dir", |p: &Path| std::fs::create_dir(p), "a directory"),
            (
                "link",
                |p: &Path| std::os::unix::fs::symlink("/nonexistent/tern.sock", p),
                "a symbolic link",
            ),
        ] {
            let path = dir.0.join(name);
            make(&path).expect("make the obstacle");
            let err = bind(&control_at(&path)).expect_err("not a socket");
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()) && message.contains(what),
                "{name}: {message}"
            );
            let meta = std::fs::symlink_metadata(&path).expect("still there");
            assert!(!meta.file_type().is_socket(), "{name}: left alone");
        }
        assert_eq!(
            std::fs::read_to_string(dir.0.join("file")).expect("read"),
            "keep me"
        );
    }

    #[test]
    fn user_and_group_names_resolve() {
        assert_eq!(user_id("root").expect("look up root"), Some(0));
        assert_eq!(group_id("root").expect("look up root"), Some(0));
        assert_eq!(user_id("no-such-user-tern-test").expect("look up"), None);
        assert_eq!(group_id("no-such-group-tern-test").expect("look up"), None);
    }

    #[test]
    fn requests_are_bounded_in_size_and_time() {
        let (client, server) = UnixStream::pair().expect("socketpair");
        (&client).write_all(b"stats\nignored").expect("write");
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            read_request(&server, deadline).expect("read"),
            Ok("stats".to_string())
        );

        let (client, server) = UnixStream::pair().expect("socketpair");
        (&client).write_all(b"ping").expect("write");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        assert_eq!(
            read_request(&server, deadline).expect("read"),
            Ok("ping".to_string()),
            "the end of the stream ends the line"
        );

        let (client, server) = UnixStream::pair().expect("socketpair");
        let writer = std::thread::spawn(move || {
            // Ends when the reader gives up and closes its end.
            let _ = (&client).write_all(&[b'x'; 2 * MAX_REQUEST]);
        });
        assert_eq!(
            read_request(&server, deadline).expect("read"),
            Err(format!("request longer than {MAX_REQUEST} bytes"))
        );
        drop(server);
        writer.join().expect("writer");

        let (client, server) = UnixStream::pair().expect("socketpair");
        (&client).write_all(b"sta").expect("write");
        let err = read_request(&server, Instant::now() + Duration::from_millis(50))
            .expect_err("half a line, then silence");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

        // A client that never reads: the write gives up at its deadline.
        let (_client, server) = UnixStream::pair().expect("socketpair");
        let big = vec![b'x'; 8 << 20];
        let err = write_reply(&server, &big, Instant::now() + Duration::from_millis(50))
            .expect_err("more than the socket buffer, never read");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }

    /// Clients that connect and send nothing, or half a line, do not keep a third from its
    /// answer: they are still connected (not closed by a deadline) when it arrives.
    #[test]
    fn idle_and_stalled_clients_do_not_block_others() {
        let dir = temp_dir("idle");
        let path = dir.0.join("ctl.sock");
        let (listener, _file) = bind(&control_at(&path)).expect("bind");
        let state = Arc::new(state(Vec::new()));
        std::thread::spawn(move || serve(listener, state));

        let idle = UnixStream::connect(&path).expect("connect the idle client");
        let stalled = UnixStream::connect(&path).expect("connect the stalled client");
        (&stalled).write_all(b"sta").expect("half a command");
        for _ in 0..3 {
            let stats = request(&path, "stats").expect("stats");
            let json: serde_json::Value = serde_json::from_str(&stats).expect("JSON");
            assert!(json["total"].is_object(), "{stats}");
        }
        for (name, client) in [("idle", &idle), ("stalled", &stalled)] {
            client.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 16];
            let err = (&*client)
                .read(&mut buf)
                .expect_err(&format!("{name}: still open, nothing to read"));
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{name}: {err}");
        }
    }

    #[test]
    fn clients_beyond_the_bound_are_turned_away_and_others_served_after() {
        let dir = temp_dir("busy");
        let path = dir.0.join("ctl.sock");
        let (listener, _file) = bind(&control_at(&path)).expect("bind");
        let state = Arc::new(state(Vec::new()));
        std::thread::spawn(move || serve(listener, state));

        let held: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        // The control thread admits in order, so once this one is answered `busy`, every held
        // connection has its place.
        let answer = request(&path, "ping").expect("request");
        assert!(answer.starts_with("error: busy"), "{answer}");
        drop(held);
        // Places come back as the held clients' threads see their ends close.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = request(&path, "ping").expect("request");
            if answer == "pong\n" {
                break;
            }
            assert!(answer.starts_with("error: busy"), "{answer}");
            assert!(Instant::now() < deadline, "places never came back");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A directory removed on drop, also when the test fails.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
