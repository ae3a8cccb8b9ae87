//! `tern-echo`: the plain-TCP echo backend of `cargo xtask bench tcp` — one thread, one
//! edge-triggered epoll loop, every byte read written back on the same connection.
//!
//! Why not `tern_tests::backend::echo`: that one spawns a thread per connection, which at tens
//! of thousands of new connections per second costs more CPU than the proxy under test and
//! would be the bottleneck. This one costs a read and a write per message and nothing per
//! connection beyond accept and close. It runs as its own process so the bench can take its CPU
//! time (`/proc/PID/stat`) out of the machine's busy time.
//!
//! Back-pressure: when a write comes up short, the rest is kept and the connection stops
//! reading until the socket is writable again (the client's own flow control then slows it
//! down), so memory per connection is bounded by one read buffer.
//!
//! Bounds: at most `--max-connections` (default 15,000) connections at once — more are accepted
//! and closed at once, keeping the process under an RLIMIT_NOFILE of 20,000 — and the process
//! exits by itself after `--max-seconds` (default 3600) or on SIGTERM/SIGINT (checked at least
//! every 100 ms).
//!
//! References: epoll(7) (edge-triggered: drain until `EAGAIN`), accept(2), tcp(7).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

#[path = "../sys.rs"]
#[expect(
    dead_code,
    reason = "tern-load's syscall wrappers; the echo server needs only epoll and the clock"
)]
mod sys;

use sys::{Epoll, Ready};

const LISTENER: u64 = u64::MAX;
const READ_BUF: usize = 64 * 1024;
const EV_LISTEN: u32 = (libc::EPOLLIN | libc::EPOLLET) as u32;
const EV_CONN: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const TICK_NS: u64 = 100_000_000;

/// tern-echo: a one-thread epoll TCP echo server (the bench's plain-TCP backend).
#[derive(Debug, Parser)]
#[command(name = "tern-echo", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, value_name = "IP:PORT")]
    listen: SocketAddr,
    /// Exit after this many seconds in any case.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
    /// Connections open at once; further ones are closed right after accept.
    #[arg(long, default_value_t = 15_000)]
    max_connections: usize,
}

/// One client connection and the part of an echo the socket did not take yet.
struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
}

/// What handling readiness decided.
enum Next {
    Keep,
    Close,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("tern-echo: cannot install a signal handler: {e}");
            return ExitCode::from(1);
        }
    }
    match serve(&args, &stop) {
        Ok(accepted) => {
            eprintln!("tern-echo: stopped after {accepted} connections");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern-echo: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: &Args, stop: &AtomicBool) -> io::Result<u64> {
    let listener = TcpListener::bind(args.listen)?;
    listener.set_nonblocking(true)?;
    let mut epoll = Epoll::new(1024)?;
    epoll.add(listener.as_raw_fd(), LISTENER, EV_LISTEN)?;
    eprintln!("tern-echo: listening on {}", listener.local_addr()?);
    let end = sys::now_ns().saturating_add(args.max_seconds.saturating_mul(1_000_000_000));
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut ready: Vec<Ready> = Vec::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    let mut next_token = 0u64;
    let mut accepted = 0u64;
    while !stop.load(Ordering::Relaxed) && sys::now_ns() < end {
        epoll.wait(&mut ready, Some(TICK_NS))?;
        for r in &ready {
            if r.token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            accepted += 1;
                            if conns.len() >= args.max_connections {
                                continue; // dropped: closed at once
                            }
                            stream.set_nonblocking(true)?;
                            stream.set_nodelay(true)?;
                            next_token += 1;
                            epoll.add(stream.as_raw_fd(), next_token, EV_CONN)?;
                            conns.insert(
                                next_token,
                                Conn {
                                    stream,
                                    pending: Vec::new(),
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // ECONNABORTED and fd exhaustion are per-connection troubles: the next
                        // readiness edge retries.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let Some(conn) = conns.get_mut(&r.token) else {
                continue;
            };
            if let Next::Close = echo(conn, &mut buf) {
                // Dropping the stream closes it and takes it out of the epoll set.
                conns.remove(&r.token);
            }
        }
    }
    Ok(accepted)
}

/// Writes what is pending, then reads and echoes until the socket would block either way.
fn echo(conn: &mut Conn, buf: &mut [u8]) -> Next {
    loop {
        while !conn.pending.is_empty() {
            match (&conn.stream).write(&conn.pending) {
                Ok(0) => return Next::Close,
                Ok(n) => {
                    conn.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        let n = match (&conn.stream).read(buf) {
            Ok(0) => return Next::Close,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Next::Close,
        };
        let mut off = 0;
        while off < n {
            match (&conn.stream).write(&buf[off..n]) {
                Ok(0) => return Next::Close,
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.pending.extend_from_slice(&buf[off..n]);
                    return Next::Keep;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
    }
}
