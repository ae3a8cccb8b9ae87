//! Backends for tern to proxy to: [`demo_http`] (HTTP/1.1), [`echo`] (raw TCP) and
//! [`proxy_aware`] (PROXY protocol v1/v2 header, then HTTP/1.1), plus the deterministic byte
//! pattern ([`pattern_byte`]) that `GET /bytes/N` serves and tests compare against.
//!
//! Owns: accepting, one thread per connection (at most [`MAX_CONNECTIONS`] at once; beyond that
//! new connections are closed at once), and stopping. It does not create listeners: bind them
//! where they should live (host loopback, or inside a namespace with `Netns::run`) and hand them
//! over; an accepted socket does not care which thread's namespace accepts it.
//!
//! Stopping: every backend polls its `stop` flag. The accept loop is non-blocking with a short
//! sleep when idle, and connection threads use short socket timeouts, so a backend returns
//! within about [`IO_POLL`] of `stop` being set (plus whatever a blocked peer holds up a write
//! for the same bound) — never running forever. [`Backend`] wraps this in an RAII guard.

mod http;
mod proxy;

pub use proxy::{
    parse_proxy_header, proxy_aware, ProxyCommand, ProxyError, ProxyExpect, ProxyFamily,
    ProxyHeader, ProxyRecord, ProxyTransport, ProxyVersion, SslInfo, Tlv, V2_SIGNATURE,
};

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most connections one backend serves at once (one thread each).
pub const MAX_CONNECTIONS: usize = 4096;
/// Socket read/write timeout of connection threads: how often they look at `stop`.
pub const IO_POLL: Duration = Duration::from_millis(100);
/// Sleep of the accept loop when nothing is pending.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// Stack of connection threads: they keep their buffers on the heap.
const CONN_STACK: usize = 256 * 1024;
/// Bytes moved per read/write when streaming bodies and echoing.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Byte `i` of the pattern that `GET /bytes/N` serves (bytes `0..N`). Not periodic with any
/// small period, so a dropped, repeated or reordered block changes the content.
pub fn pattern_byte(i: u64) -> u8 {
    let x = (i ^ (i >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 56) as u8
}

/// Fills `out` with pattern bytes `offset..offset + out.len()`.
pub fn pattern_fill(offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = pattern_byte(offset + i as u64);
    }
}

/// Lowercase hex SHA-256 of pattern bytes `0..len` (what `curl …/bytes/len | sha256sum` prints).
pub fn pattern_sha256_hex(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        pattern_fill(offset, &mut chunk[..n]);
        hasher.update(&chunk[..n]);
        offset += n as u64;
    }
    hex(&hasher.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves HTTP/1.1 on `listener` until `stop` is set, one thread per connection.
///
/// - `GET /` (and any other path) → 200, `text/plain`: `hello from tern demo backend\n` then
///   `path: <target>`, `peer: <addr>` and `request: <n-th on this connection>` lines.
/// - `GET /bytes/N` → 200, `N` bytes of [`pattern_byte`], streamed.
/// - `POST`/`PUT` → 200 echoing the request body (`Content-Length` bodies; streamed back as it
///   arrives, so a client must read while it writes bodies larger than the socket buffers —
///   curl does). `Expect: 100-continue` is answered.
/// - `HEAD` as `GET` without a body; other methods → 405; malformed requests → 400 and close;
///   `Transfer-Encoding` → 501 and close.
///
/// Keep-alive per RFC 9112 §9.3 (`Connection: close` honoured, HTTP/1.0 closes unless it asked
/// for keep-alive). Blocks until stopped; run it on its own thread.
pub fn demo_http(listener: TcpListener, stop: Arc<AtomicBool>) {
    serve(listener, stop, "demo-http", |stream, peer, stop| {
        let mut io = Io::new(stream, stop);
        let ctx = http::Context {
            peer,
            proxied: None,
        };
        // Errors end this connection only (peer reset, backend stopping).
        let _ = http::serve_connection(&mut io, &ctx);
    });
}

/// Raw TCP echo until `stop` is set: every byte read is written back. When the client
/// half-closes, everything before its FIN has already been echoed; the backend then shuts down
/// its write side (FIN back) and closes. A client that writes a lot without reading blocks
/// itself, as with any echo server. Blocks until stopped.
pub fn echo(listener: TcpListener, stop: Arc<AtomicBool>) {
    serve(listener, stop, "echo", |stream, _peer, stop| {
        let mut io = Io::new(stream, stop);
        let _ = echo_connection(&mut io);
    });
}

fn echo_connection(io: &mut Io<'_>) -> io::Result<()> {
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = io.read_into(&mut chunk)?;
        if n == 0 {
            return io.stream.shutdown(Shutdown::Write);
        }
        io.write_all(&chunk[..n])?;
    }
}

/// A backend running on its own thread; Drop sets its stop flag and joins it.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// [`demo_http`] on `listener`.
    #[track_caller]
    pub fn demo_http(listener: TcpListener) -> Backend {
        Backend::spawn(listener, demo_http)
    }

    /// [`echo`] on `listener`.
    #[track_caller]
    pub fn echo(listener: TcpListener) -> Backend {
        Backend::spawn(listener, echo)
    }

    /// [`proxy_aware`] on `listener`, with the receiver of its records.
    #[track_caller]
    pub fn proxy_aware(
        listener: TcpListener,
        expect: ProxyExpect,
    ) -> (Backend, std::sync::mpsc::Receiver<ProxyRecord>) {
        let addr = local_addr(&listener);
        let stop = Arc::new(AtomicBool::new(false));
        let (rx, thread) = proxy::spawn_proxy_aware(listener, expect, Arc::clone(&stop));
        let backend = Backend {
            addr,
            stop,
            thread: Some(thread),
        };
        (backend, rx)
    }

    #[track_caller]
    fn spawn(listener: TcpListener, run: fn(TcpListener, Arc<AtomicBool>)) -> Backend {
        let addr = local_addr(&listener);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("backend-{addr}"))
                .spawn(move || run(listener, stop))
                .expect("cannot spawn a backend thread")
        };
        Backend {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the backend and waits for it (same as dropping it).
    pub fn stop(self) {}
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("backend on {} panicked", self.addr);
            }
        }
    }
}

#[track_caller]
fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("backend listener has no local address: {e}"))
}

/// The accept loop shared by every backend: non-blocking accept, one thread per connection,
/// returns once `stop` is set and every connection thread has finished.
pub(crate) fn serve<H>(listener: TcpListener, stop: Arc<AtomicBool>, label: &str, handler: H)
where
    H: Fn(TcpStream, SocketAddr, &AtomicBool) + Send + Sync + 'static,
{
    if let Err(e) = listener.set_nonblocking(true) {
        panic!("{label}: cannot make the listener non-blocking: {e}");
    }
    let handler = Arc::new(handler);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                // Finished threads are detached by dropping their handles.
                threads.retain(|t| !t.is_finished());
                if threads.len() >= MAX_CONNECTIONS {
                    eprintln!("{label}: {MAX_CONNECTIONS} connections open; closing {peer}");
                    continue;
                }
                if let Err(e) = prepare(&stream) {
                    eprintln!("{label}: cannot set up the socket of {peer}: {e}");
                    continue;
                }
                let handler = Arc::clone(&handler);
                let stop = Arc::clone(&stop);
                let spawned = std::thread::Builder::new()
                    .name(format!("{label}-conn"))
                    .stack_size(CONN_STACK)
                    .spawn(move || handler(stream, peer, &stop));
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => eprintln!("{label}: cannot spawn a thread for {peer}: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                eprintln!("{label}: accept failed: {e}");
                std::thread::sleep(IO_POLL);
            }
        }
    }
    drop(listener);
    for t in threads {
        let _ = t.join();
    }
}

fn prepare(stream: &TcpStream) -> io::Result<()> {
    // An accepted socket does not inherit O_NONBLOCK on Linux; say so anyway.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_POLL))?;
    stream.set_write_timeout(Some(IO_POLL))?;
    stream.set_nodelay(true)
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "backend stopped")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A connection with a receive buffer, whose blocking calls give up once `stop` is set.
pub(crate) struct Io<'a> {
    pub(crate) stream: TcpStream,
    stop: &'a AtomicBool,
    /// Bytes received and not yet consumed, in order.
    pub(crate) buf: Vec<u8>,
}

impl<'a> Io<'a> {
    pub(crate) fn new(stream: TcpStream, stop: &'a AtomicBool) -> Io<'a> {
        Io {
            stream,
            stop,
            buf: Vec::new(),
        }
    }

    /// Appends what the socket has (waiting for at least one byte) to `buf`; `Ok(0)` at EOF.
    pub(crate) fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = self.read_socket(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Drops the first `n` buffered bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }

    /// Reads into `out`, from `buf` first, else from the socket; `Ok(0)` at EOF.
    pub(crate) fn read_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.buf.is_empty() {
            let n = self.buf.len().min(out.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            self.consume(n);
            return Ok(n);
        }
        self.read_socket(out)
    }

    fn read_socket(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(stopped());
            }
            match self.stream.read(out) {
                Ok(n) => return Ok(n),
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `data`, retrying partial writes and timeouts until `stop` is set.
    pub(crate) fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.stop.load(Ordering::Relaxed) {
                return Err(stopped());
            }
            match self.stream.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends the connection so the peer reads everything we sent: FIN, then discard what the
    /// peer still sends until its EOF (closing with unread data would send an RST that can
    /// destroy our last response in flight), for at most `linger`.
    pub(crate) fn close_gracefully(&mut self, linger: Duration) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + linger;
        let mut sink = [0u8; 4096];
        while Instant::now() < deadline && !self.stop.load(Ordering::Relaxed) {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
