//! Zero-downtime binary upgrade, kernel path: handing the listening sockets of a running tern
//! to a new tern process over the control socket, and the drain that follows.
//!
//! The protocol (after haproxy's `-x` socket transfer and sozu's upgrade), on one control
//! connection that stays open for the whole handover:
//!
//! 1. the new process sends `takeover`;
//! 2. the old one answers one line per listening socket, `{"address":…,"tls":…,"worker":…}`,
//!    each sent with its socket attached (`SCM_RIGHTS`, one descriptor per line), then `end`;
//! 3. the new process starts its workers on those sockets (plus fresh SO_REUSEPORT sockets
//!    when it has more workers), moves the control socket path over to itself, and sends
//!    `drain`; the old one answers `ok` and drains exactly as on SIGTERM.
//!
//! If the connection ends before `drain` (the new process failed to start), the old process
//! goes on serving as if nothing had happened: nothing was taken from it, the sockets it sent
//! are duplicates. While both processes hold a socket, both accept from its queue; once the old
//! one drains it closes its copies and the queue belongs to the new process alone, so no
//! queued connection is lost and no client is refused.
//!
//! This module owns the registry of the process's own listening sockets ([`Handover`], kept in
//! [`Shutdown`] so that every drain closes them) and both ends of the exchange. It does not own
//! the workers (`server`, `kernel`) nor the bypass path, whose flows live in the XDP program and
//! are handed over by program (see `crate::bypass::xdp::adopt` and docs/architecture.md).

use std::io::{self, IoSlice, IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::server::Shutdown;

/// How long the old process waits, after sending its sockets, for the new one to say `drain`:
/// the new process's whole start-up (certificates, io_uring rings) fits in it.
pub const DRAIN_WAIT: Duration = Duration::from_secs(120);
/// How long the new process waits for the old one's sockets.
const RECEIVE_WAIT: Duration = Duration::from_secs(10);
/// More sockets than any configuration has (workers × listeners); a peer sending more is
/// refused rather than followed.
const MAX_SOCKETS: usize = 16 * 1024;
/// The longest description line.
const MAX_LINE: usize = 512;

/// What describes one passed socket on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketInfo {
    /// The listener's configured address (also checked against the socket's own name).
    pub address: SocketAddr,
    /// Whether the old process terminated TLS on it (the new one follows its own config).
    pub tls: bool,
    /// The old process's worker that owned it.
    pub worker: usize,
}

/// One XDP program a successor takes over (bypass path): sent as a line of its own, without
/// a descriptor (the successor opens the link and maps by id, [`crate::bypass::xdp::adopt`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct XdpInfo {
    pub interface: String,
    pub xdp: crate::bypass::xdp::HandoverIds,
}

/// One listening socket: in the registry, a duplicate of a worker's descriptor; received, the
/// new process's own.
#[derive(Debug)]
pub struct Passed {
    pub fd: OwnedFd,
    pub info: SocketInfo,
}

/// The process's listening sockets as a successor may take them, and whether a handover is
/// under way.
///
/// Invariant: `sockets` holds duplicates of the kernel workers' listening sockets only until
/// the process starts draining ([`Handover::close`], from [`Shutdown::begin_drain`]): a copy
/// kept after that would keep a socket in the SO_REUSEPORT group that nobody accepts from,
/// and its queued connections would be reset at exit.
#[derive(Debug, Default)]
pub struct Handover {
    sockets: Mutex<Vec<Passed>>,
    /// Set while a successor holds the sockets and has not yet said `drain` or gone away.
    busy: AtomicBool,
    /// The connection of the successor that made this process drain, kept open until this
    /// process exits: its end tells the successor that this process's AF_XDP sockets are
    /// closed and their queues free (bypass path).
    successor: Mutex<Option<UnixStream>>,
}

impl Handover {
    /// Keeps a duplicate of a worker's listening socket for a later takeover.
    pub fn register(&self, fd: &OwnedFd, info: SocketInfo) -> io::Result<()> {
        let fd = fd.try_clone()?;
        self.lock().push(Passed { fd, info });
        Ok(())
    }

    /// Closes every duplicate (the process is draining or stopping).
    pub fn close(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Passed>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Set once a successor has taken over and this process drains for it. Process-wide because
/// the bypass workers' frame handlers read it when their drain begins (they have no handle on
/// [`Shutdown`]): they then keep their listeners for the flows already on their way to them.
static TAKEN_OVER: AtomicBool = AtomicBool::new(false);

/// Whether a successor took over from this process ([`TAKEN_OVER`]).
pub fn taken_over() -> bool {
    TAKEN_OVER.load(Ordering::Acquire)
}

/// The old process's side, on the control connection that asked `takeover`: sends the
/// sockets, then waits for `drain` (and drains) or for the successor to go away (and carries
/// on). Errors are the connection's; what they mean is logged here.
pub fn serve(stream: &UnixStream, shutdown: &Shutdown, xdp: &[XdpInfo]) -> io::Result<()> {
    let handover = &shutdown.handover;
    if shutdown.drain.load(Ordering::Relaxed) || shutdown.stop.load(Ordering::Relaxed) {
        return write_line(stream, "error: tern is draining; nothing to take over");
    }
    if handover.busy.swap(true, Ordering::AcqRel) {
        return write_line(stream, "error: another process is taking over");
    }
    let result = send_and_wait(stream, shutdown, xdp);
    handover.busy.store(false, Ordering::Release);
    result
}

fn send_and_wait(stream: &UnixStream, shutdown: &Shutdown, xdp: &[XdpInfo]) -> io::Result<()> {
    stream.set_write_timeout(Some(RECEIVE_WAIT))?;
    for program in xdp {
        let line = serde_json::to_string(program).map_err(io::Error::other)?;
        write_line(stream, &line)?;
    }
    let count = {
        let sockets = shutdown.handover.lock();
        for s in sockets.iter() {
            let mut line = serde_json::to_string(&s.info).map_err(io::Error::other)?;
            line.push('\n');
            send_with_fd(stream, line.as_bytes(), &s.fd)?;
        }
        sockets.len()
    };
    write_line(stream, "end")?;
    tracing::info!(
        sockets = count,
        "listening sockets sent to a new tern; waiting for it to start"
    );
    // Whatever the successor says next, or its end: a read error or EOF means it gave up.
    stream.set_read_timeout(Some(DRAIN_WAIT))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + DRAIN_WAIT;
    while line.len() < MAX_LINE && Instant::now() < deadline {
        match (&*stream).read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "the new tern did not confirm; still serving");
                return Ok(());
            }
        }
    }
    if line == b"drain" {
        tracing::info!("the new tern took over; draining");
        TAKEN_OVER.store(true, Ordering::Release);
        shutdown.begin_drain();
        write_line(stream, "ok")?;
        if let Ok(copy) = stream.try_clone() {
            *shutdown
                .handover
                .successor
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(copy);
        }
        return Ok(());
    }
    tracing::warn!("the new tern went away before taking over; still serving");
    Ok(())
}

fn write_line(mut stream: &UnixStream, text: &str) -> io::Result<()> {
    stream.write_all(format!("{text}\n").as_bytes())
}

fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: &OwnedFd) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other(
            "no room for the descriptor in the control buffer",
        ));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptor went with the first byte; the rest of a short send is plain data.
    if sent < bytes.len() {
        (&*stream).write_all(bytes.get(sent..).unwrap_or_default())?;
    }
    Ok(())
}

/// The new process's side of a handover in progress: the sockets it received, and the
/// connection on which it will tell the old process to drain.
#[derive(Debug)]
pub struct Takeover {
    stream: UnixStream,
    /// Received and not yet given to a worker.
    sockets: Vec<Passed>,
    /// The old process's XDP programs, by interface (bypass path).
    xdp: Vec<XdpInfo>,
}

impl Takeover {
    /// Connects to the running tern's control socket at `path` and takes its listening
    /// sockets. `None` when no tern runs there (no socket, or a stale one): the caller starts
    /// as usual, so one service definition serves both a first start and an upgrade.
    pub fn connect(path: &Path) -> anyhow::Result<Option<Takeover>> {
        let stream = match UnixStream::connect(path) {
            Ok(stream) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                tracing::info!(path = %path.display(), "upgrade: no tern runs there; starting afresh");
                return Ok(None);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "upgrade: connecting to the running tern's control socket {}",
                        path.display()
                    )
                })
            }
        };
        stream.set_read_timeout(Some(RECEIVE_WAIT))?;
        stream.set_write_timeout(Some(RECEIVE_WAIT))?;
        (&stream)
            .write_all(b"takeover\n")
            .context("upgrade: asking for the sockets")?;
        let (sockets, xdp) =
            receive(&stream).context("upgrade: receiving the listening sockets")?;
        tracing::info!(
            sockets = sockets.len(),
            xdp_programs = xdp.len(),
            "upgrade: listening sockets received"
        );
        Ok(Some(Takeover {
            stream,
            sockets,
            xdp,
        }))
    }

    /// The ids of the old process's XDP program on `interface`, if it had one.
    pub fn xdp(&self, interface: &str) -> Option<&crate::bypass::xdp::HandoverIds> {
        self.xdp
            .iter()
            .find(|x| x.interface == interface)
            .map(|x| &x.xdp)
    }

    /// Takes the received sockets listening on `address` (for the new workers to share), in
    /// the old process's worker order.
    pub fn take(&mut self, address: SocketAddr) -> Vec<OwnedFd> {
        let (mut mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|s| s.info.address == address);
        self.sockets = rest;
        mine.sort_by_key(|s| s.info.worker);
        mine.into_iter().map(|s| s.fd).collect()
    }

    /// Tells the old process to drain, once this one serves. Received sockets no listener
    /// took (their listener is gone from the configuration) are closed. Returns the connection,
    /// which the old process keeps open until it exits ([`OldProcess`]).
    pub fn finish(mut self) -> anyhow::Result<OldProcess> {
        for s in self.sockets.drain(..) {
            tracing::warn!(
                address = %s.info.address,
                "upgrade: the old tern listened on an address the configuration no longer has; closing it"
            );
        }
        (&self.stream)
            .write_all(b"drain\n")
            .context("upgrade: telling the old tern to drain")?;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while answer.len() < MAX_LINE {
            match (&self.stream).read(&mut byte) {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => answer.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("upgrade: reading the old tern's answer to drain"),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        if answer.trim() != "ok" {
            bail!(
                "upgrade: the old tern answered drain with {:?}",
                answer.trim()
            );
        }
        tracing::info!("upgrade: the old tern is draining");
        self.stream.set_nonblocking(true)?;
        Ok(OldProcess {
            stream: self.stream,
        })
    }
}

/// The old process, draining after a takeover: its control connection stays open until it
/// exits.
#[derive(Debug)]
pub struct OldProcess {
    /// Non-blocking; EOF (or an error) once the old process has exited.
    stream: UnixStream,
}

impl OldProcess {
    /// Whether the old process has exited (its end of the connection closed). Never blocks.
    pub fn exited(&self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}

/// Reads description lines and their descriptors up to `end`. Descriptors arrive in the order
/// they were sent, each with the first byte of its line, so the k-th descriptor belongs to the
/// k-th line whatever way the kernel splits the reads.
fn receive(stream: &UnixStream) -> anyhow::Result<(Vec<Passed>, Vec<XdpInfo>)> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let deadline = Instant::now() + RECEIVE_WAIT;
    let mut buf = [0u8; 4096];
    loop {
        if bytes.ends_with(b"end\n") && (bytes.len() == 4 || bytes.ends_with(b"\nend\n")) {
            break;
        }
        if bytes.starts_with(b"error:") && bytes.ends_with(b"\n") {
            bail!(
                "the running tern refused: {}",
                String::from_utf8_lossy(&bytes).trim()
            );
        }
        if Instant::now() >= deadline {
            bail!("no complete answer within {} s", RECEIVE_WAIT.as_secs());
        }
        if bytes.len() > MAX_SOCKETS * MAX_LINE || fds.len() > MAX_SOCKETS {
            bail!("the running tern sent more than {MAX_SOCKETS} sockets");
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            bail!("descriptors were lost in transit (control message truncated)");
        }
        if got.bytes == 0 {
            bail!("the running tern closed the connection before `end`");
        }
        bytes.extend_from_slice(buf.get(..got.bytes).unwrap_or_default());
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| anyhow!("the answer is not UTF-8"))?;
    let mut xdp = Vec::new();
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| *l != "end") {
        // XDP programs come without a descriptor; every other line carries one.
        match serde_json::from_str::<XdpInfo>(line) {
            Ok(info) => xdp.push(info),
            Err(_) => lines.push(line),
        }
    }
    if lines.len() != fds.len() {
        bail!(
            "{} socket descriptions but {} descriptors",
            lines.len(),
            fds.len()
        );
    }
    let sockets = lines
        .into_iter()
        .zip(fds)
        .map(|(line, fd)| {
            let info: SocketInfo = serde_json::from_str(line)
                .with_context(|| format!("a socket description that does not parse: {line:?}"))?;
            check_socket(&fd, &info)?;
            Ok(Passed { fd, info })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((sockets, xdp))
}

/// The descriptor must be a listening TCP socket bound to the address it is described with.
fn check_socket(fd: &OwnedFd, info: &SocketInfo) -> anyhow::Result<()> {
    let sock = socket2::SockRef::from(fd);
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| anyhow!("the socket for {} is not an IP socket", info.address))?;
    if local != info.address {
        bail!(
            "the socket described as {} is bound to {local}",
            info.address
        );
    }
    let listening = rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false);
    if !listening || sock.r#type().ok() != Some(socket2::Type::STREAM) {
        bail!(
            "the socket for {} is not a listening TCP socket",
            info.address
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn listener() -> (OwnedFd, SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l.into(), a)
    }

    #[test]
    fn sockets_pass_and_drain_is_asked_on_the_same_connection() {
        let shutdown = Arc::new(Shutdown::default());
        let (a, addr_a) = listener();
        let (b, addr_b) = listener();
        for (fd, address, worker) in [(&a, addr_a, 0), (&b, addr_b, 0), (&a, addr_a, 1)] {
            let info = SocketInfo {
                address,
                tls: worker == 0,
                worker,
            };
            shutdown.handover.register(fd, info).unwrap();
        }
        let (ours, theirs) = UnixStream::pair().unwrap();
        let old = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || serve(&theirs, &shutdown, &[]))
        };
        ours.set_read_timeout(Some(RECEIVE_WAIT)).unwrap();
        let (sockets, _) = receive(&ours).unwrap();
        assert_eq!(sockets.len(), 3);
        assert_eq!(
            sockets[2].info,
            SocketInfo {
                address: addr_a,
                tls: false,
                worker: 1
            }
        );
        let mut t = Takeover {
            stream: ours,
            sockets,
            xdp: Vec::new(),
        };
        assert_eq!(t.take(addr_a).len(), 2);
        // A received socket accepts what connects to the original.
        let fds = t.take(addr_b);
        let client = std::net::TcpStream::connect(addr_b).unwrap();
        let l = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        assert!(!shutdown.drain.load(Ordering::Relaxed));
        let old_process = t.finish().unwrap();
        old.join().unwrap().unwrap();
        assert!(shutdown.drain.load(Ordering::Relaxed));
        assert!(
            !old_process.exited(),
            "the old process keeps the connection until it exits"
        );
        shutdown.handover.successor.lock().unwrap().take();
        assert!(old_process.exited());
        assert!(
            shutdown.handover.lock().is_empty(),
            "the copies close with the drain"
        );
    }

    #[test]
    fn a_successor_that_goes_away_leaves_the_old_process_serving() {
        let shutdown = Arc::new(Shutdown::default());
        let (a, address) = listener();
        shutdown
            .handover
            .register(
                &a,
                SocketInfo {
                    address,
                    tls: true,
                    worker: 0,
                },
            )
            .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let old = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || serve(&theirs, &shutdown, &[]))
        };
        let (sockets, _) = receive(&ours).unwrap();
        assert_eq!(sockets.len(), 1);
        drop(ours);
        old.join().unwrap().unwrap();
        assert!(!shutdown.drain.load(Ordering::Relaxed));
        assert_eq!(shutdown.handover.lock().len(), 1);
        assert!(!shutdown.handover.busy.load(Ordering::Relaxed));
    }

    #[test]
    fn a_socket_described_as_another_address_is_refused() {
        let (a, _) = listener();
        let (_, other) = listener();
        let info = SocketInfo {
            address: other,
            tls: true,
            worker: 0,
        };
        assert!(check_socket(&a, &info).is_err());
    }
}
