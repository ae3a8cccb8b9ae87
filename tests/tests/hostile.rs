//! Hostile and careless clients (and backends): one scenario table, run end to end against both
//! of tern's paths — kernel mode (`mode = "kernel"`, the kernel's TCP through io_uring) and the
//! bypass path (`mode = "bypass"`, tern's own TCP stack) — with TLS and, where it applies, a plain
//! (`tls = false`) listener.
//!
//! Each scenario is written once as a function of the [`Target`] it runs against; the
//! [`scenarios!`] table turns it into one `#[test]` per path and listener kind, each on its own
//! rig (so the harness may run them in parallel). Every scenario checks the same four things:
//! tern stays up (its process is alive and its log shows no panic), a concurrent well-behaved
//! client ([`Good`], from a second client address) gets every response it asks for, the counters
//! of `tern ctl stats` show what happened, and memory stays bounded (tern's RSS after the
//! scenario against a generous, per-connection bound, and the `active` gauge back to 0). Checks
//! are collected in a [`Verdict`] and reported together, so one run shows every symptom of a
//! scenario rather than only the first.
//!
//! The hostile side uses clients tern did not write where they fit: `openssl s_client` (unknown
//! SNI), Python's `ssl` (slowloris), and raw `std` sockets with `SO_LINGER {1, 0}` for resets;
//! rustls where the test needs exact control over the bytes. Behind tern is [`Scripted`], a small
//! HTTP/1.1-shaped backend whose request path picks its behaviour (answer, stream, delay,
//! reset, stall, close first), so one backend serves the good client and the hostile one.
//!
//! Some scenarios use configuration knobs that the connection-driver rewrite (issue 9, part 5)
//! adds: `timeouts.send_ms` (a connection whose queued output to the client makes no progress
//! for that long is reset and counted in `send_timeouts`), `limits.max_connections_per_source`
//! (per worker, counted in `refused_source_limit`) and `tcp.fin_timeout_ms` (bypass only: a
//! connection in FIN-WAIT-2 is dropped after it). Until those exist, tern rejects the
//! configuration and those scenarios fail at start-up.
//!
//! Time is bounded everywhere: short `timeouts.*` in each scenario's configuration, read
//! timeouts on every client socket, and deadlines on every loop. Nothing asserts how fast the
//! machine is; the one latency check (a backend that is down) compares against a 5 s connect
//! timeout with a 2× margin.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use support::*;
use tern_tests::backend::{pattern_byte, pattern_fill};
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

/// The kernel listener's port (in bypass runs it is the readiness listener and attaches XDP).
const KERNEL_PORT: u16 = 443;
/// The bypass listener's port.
const BYPASS_PORT: u16 = 4443;
/// Kernel workers, and bypass workers.
const WORKERS: u32 = 2;

/// Which of tern's two paths serves the listener under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Bypass,
}

/// Whether the listener under test terminates TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Tls,
    Plain,
}

/// Per-scenario configuration. Durations are tern's `_ms` keys.
struct Knobs {
    handshake_ms: u64,
    idle_ms: u64,
    connect_timeout_ms: u64,
    max_per_worker: u32,
    /// Lines appended to `[timeouts]`, `[limits]` and `[tcp]` (bypass only).
    timeouts_extra: &'static str,
    limits_extra: &'static str,
    tcp_extra: &'static str,
    /// Put a server that is silently down ([`black_hole`]) before the scripted backend.
    dead_server_first: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            handshake_ms: 10_000,
            idle_ms: 30_000,
            connect_timeout_ms: 2_000,
            max_per_worker: 4_096,
            timeouts_extra: "",
            limits_extra: "",
            tcp_extra: "",
            dead_server_first: false,
        }
    }
}

/// A tern on its own rig, serving the listener under test (`path`, `wire`) in front of a
/// [`Scripted`] backend, plus what the checks need: the RSS at start, the good client's address.
struct Target {
    path: Path,
    wire: Wire,
    stack: Stack,
    backend: Scripted,
    /// A backend server that is down, if the scenario has one (kept open while tern runs).
    _hole: Option<BlackHole>,
    /// The address the good client binds (a second address on the client veth), so per-source
    /// limits on the hostile clients' address do not apply to it.
    good_ip: Ipv4Addr,
    rss_start_kib: u64,
    /// When the scenario started (after the warm-up), for the report.
    started: Instant,
}

impl Target {
    /// Builds the rig, the scripted backend and tern with `knobs`; waits until tern accepts.
    #[track_caller]
    fn start(path: Path, wire: Wire, tag: &str, knobs: Knobs) -> Target {
        let queues = match path {
            Path::Kernel => 1,
            Path::Bypass => WORKERS,
        };
        let rig = Rig::isolated(tag, queues);
        let dir = TempDir::new(tag);
        let good_ip = second_client_address(&rig);
        let backend = Scripted::start(server_listener(&rig));
        let hole = knobs.dead_server_first.then(|| black_hole(&rig));
        let servers = match &hole {
            Some(h) => vec![h.addr, backend.addr],
            None => vec![backend.addr],
        };
        let cert = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        let control = dir.join("tern.sock");
        let tls_line = match wire {
            Wire::Tls => "tls = true",
            Wire::Plain => "tls = false",
        };
        let listeners = match path {
            Path::Kernel => format!(
                "[[listener]]\naddress = \"{}\"\n{tls_line}\n",
                rig.server_addr(KERNEL_PORT)
            ),
            // The kernel TLS listener on :443 attaches the XDP program and answers the
            // readiness probe; the listener under test is the bypass one.
            Path::Bypass => format!(
                "[[listener]]\naddress = \"{k}\"\ninterface = \"{i}\"\n\n\
                 [[listener]]\naddress = \"{b}\"\nmode = \"bypass\"\ninterface = \"{i}\"\n{tls_line}\n",
                k = rig.server_addr(KERNEL_PORT),
                b = rig.server_addr(BYPASS_PORT),
                i = rig.server_if,
            ),
        };
        let bypass_tables = match path {
            Path::Kernel => String::new(),
            Path::Bypass => format!(
                "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n\n[tcp]\n{}\n",
                knobs.tcp_extra
            ),
        };
        let servers: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "{listeners}\n\
             [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\ndefault = true\n\n\
             [tls]\nalpn = [\"http/1.1\"]\n\n\
             [backend]\nservers = [{servers}]\nconnect_timeout_ms = {ct}\n\n\
             [workers]\ncount = {WORKERS}\n\n[control]\nsocket = \"{control}\"\n\n\
             [timeouts]\nhandshake_ms = {hs}\nidle_ms = {idle}\n{t_extra}\n\n\
             [limits]\nmax_connections_per_worker = {max}\n{l_extra}\n\n{bypass_tables}",
            cert = cert.cert.display(),
            key = cert.key.display(),
            servers = servers.join(", "),
            ct = knobs.connect_timeout_ms,
            control = control.display(),
            hs = knobs.handshake_ms,
            idle = knobs.idle_ms,
            t_extra = knobs.timeouts_extra,
            max = knobs.max_per_worker,
            l_extra = knobs.limits_extra,
        );
        let mut tern = TernProcess::start(&config, rig.server_netns());
        tern.wait_ready(rig.server_addr(KERNEL_PORT));
        let mut t = Target {
            path,
            wire,
            stack: Stack {
                tern,
                cert,
                dir,
                control,
                rig,
            },
            backend,
            _hole: hole,
            good_ip,
            rss_start_kib: 0,
            started: Instant::now(),
        };
        t.warm_up();
        t
    }

    /// Waits until the listener under test serves (the bypass listener comes up after the
    /// kernel one that answers the readiness probe), runs a few good connections so that
    /// what every connection touches once is resident, then takes the RSS baseline.
    #[track_caller]
    fn warm_up(&mut self) {
        let (d, ip) = (self.dial(), self.good_ip);
        let served = self.client(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut ok = 0;
            let mut last = String::new();
            let mut first: Option<Instant> = None;
            while ok < 10
                && Instant::now() < deadline
                && first.is_none_or(|f| f.elapsed() < Duration::from_secs(5))
            {
                match open(&d, Some(ip)).and_then(|mut c| {
                    hello_round_trip(&mut c)?;
                    close_cleanly(c);
                    Ok(())
                }) {
                    Ok(()) => {
                        ok += 1;
                        first.get_or_insert_with(Instant::now);
                    }
                    Err(e) => {
                        last = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            (ok, last)
        });
        assert!(
            served.0 >= 1,
            "the listener under test served no warm-up connection in 20 s: {}\n{}",
            served.1,
            self.stack.log()
        );
        self.wait_counters(Duration::from_secs(10), |c| c("active") == 0);
        self.rss_start_kib = rss_kib(self.stack.tern.pid());
        self.started = Instant::now();
    }

    /// The listener under test.
    fn addr(&self) -> SocketAddr {
        match self.path {
            Path::Kernel => self.stack.rig.server_addr(KERNEL_PORT),
            Path::Bypass => self.stack.rig.server_addr(BYPASS_PORT),
        }
    }

    fn tls(&self) -> bool {
        self.wire == Wire::Tls
    }

    /// What a hostile helper running in the client namespace needs to reach the listener.
    fn dial(&self) -> Dial {
        Dial {
            addr: self.addr(),
            cfg: self.tls().then(|| self.stack.client_config()),
        }
    }

    /// The counters of the path under test: kernel workers' totals, or the bypass proxy's.
    fn counters(&self, st: &serde_json::Value) -> serde_json::Value {
        match self.path {
            Path::Kernel => st["total"].clone(),
            Path::Bypass => st["bypass"]["proxy"].clone(),
        }
    }

    /// Counter `name` of the path under test; `None` if this tern has no such counter there.
    fn counter(&self, st: &serde_json::Value, name: &str) -> Option<u64> {
        self.counters(st)[name].as_u64()
    }

    /// Polls stats until `f` holds on the path's counters (missing counters read as 0), for at
    /// most `within`; returns the last document either way.
    fn wait_counters(
        &self,
        within: Duration,
        f: impl Fn(&dyn Fn(&str) -> u64) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let st = self.stats_or_null();
            let get = |name: &str| self.counter(&st, name).unwrap_or(0);
            if f(&get) || Instant::now() >= deadline {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `tern ctl stats`, or JSON null if tern does not answer (it may have died).
    fn stats_or_null(&self) -> serde_json::Value {
        let out = Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.stack.control)
            .arg("stats")
            .output();
        match out {
            Ok(o) if o.status.success() => {
                serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        }
    }

    /// Runs `f` on a thread in the client namespace and returns its result.
    #[track_caller]
    fn client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.stack.rig.client.run(f)
    }

    /// `python3 -c SCRIPT ARGS…` in the client namespace; its stdout, or a failure.
    fn python(&self, script: &str, args: &[String], v: &mut Verdict) -> Option<String> {
        let out = self
            .stack
            .rig
            .client_command("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run python3");
        if !out.status.success() {
            v.fail(format!(
                "python3 failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
            return None;
        }
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Adds `<subnet>.3/24` to the client veth and returns it.
#[track_caller]
fn second_client_address(rig: &Rig) -> Ipv4Addr {
    let [a, b, c, _] = rig.client_ip.octets();
    let ip = Ipv4Addr::new(a, b, c, 3);
    let status = Command::new("ip")
        .args(["-n", &rig.client.name, "addr", "add"])
        .arg(format!("{ip}/24"))
        .args(["dev", &rig.client_if])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip addr add {ip} on {}", rig.client_if);
    ip
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The verdict: every check of a scenario, reported together.
// ---------------------------------------------------------------------------------------------

/// The failed checks of one scenario run.
#[derive(Default)]
struct Verdict {
    failures: Vec<String>,
}

impl Verdict {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(what());
        }
    }

    /// The hostile client itself could not do its part (tern refused or vanished).
    fn hostile_errors(&mut self, errors: &[String]) {
        self.check(errors.is_empty(), || {
            format!(
                "{} hostile connections failed before misbehaving: {:?}",
                errors.len(),
                &errors[..errors.len().min(3)]
            )
        });
    }

    /// Checks that counter `name` of the path under test is at least `min` in `st`.
    fn at_least(&mut self, t: &Target, st: &serde_json::Value, name: &str, min: u64) {
        match t.counter(st, name) {
            Some(n) if n >= min => {}
            Some(n) => self.fail(format!("counter {name} = {n}, expected >= {min}")),
            None => self.fail(format!("no counter {name} on the {:?} path", t.path)),
        }
    }

    /// Checks that counter `name` of the path under test is exactly `want` (absent reads as 0).
    fn equals(&mut self, t: &Target, st: &serde_json::Value, name: &str, want: u64) {
        let n = t.counter(st, name).unwrap_or(0);
        self.check(n == want, || {
            format!("counter {name} = {n}, expected {want}")
        });
    }
}

/// What every scenario ends with: the good client's report, tern alive and without a panic,
/// `active` back to 0 (within `settle`), the backend's connections gone, RSS growth within
/// `rss_bound_kib`. Panics listing every failed check, the path's counters and tern's log tail.
#[track_caller]
fn conclude(
    mut t: Target,
    mut v: Verdict,
    good: Option<GoodReport>,
    settle: Duration,
    rss_bound_kib: u64,
) {
    if let Some(g) = good {
        v.check(g.ok > 0, || {
            "the good client completed no request during the scenario".to_string()
        });
        v.check(g.failures.is_empty(), || {
            format!(
                "the good client failed {} of {} requests: {:?}",
                g.failures.len(),
                g.ok + g.failures.len() as u64,
                &g.failures[..g.failures.len().min(5)]
            )
        });
    }
    let st = t.wait_counters(settle, |c| c("active") == 0);
    let exited = t.stack.tern.try_wait();
    v.check(exited.is_none(), || format!("tern exited: {exited:?}"));
    let log = t.stack.log();
    if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
        v.fail(format!("tern's log shows a panic: {line}"));
    }
    if exited.is_none() {
        match t.counter(&st, "active") {
            Some(0) => {}
            other => v.fail(format!(
                "active gauge not back to 0 within {settle:?}: {other:?}"
            )),
        }
        let rss = rss_kib(t.stack.tern.pid());
        v.check(rss <= t.rss_start_kib + rss_bound_kib, || {
            format!(
                "RSS grew from {} KiB to {rss} KiB (bound +{rss_bound_kib} KiB)",
                t.rss_start_kib
            )
        });
        // tern closed every backend leg it opened (the backend sees each one end).
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.backend.live() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let live = t.backend.live();
        v.check(live == 0, || {
            format!("{live} backend connections still open after the scenario")
        });
    }
    eprintln!(
        "scenario {:?}/{:?} took {:?}",
        t.path,
        t.wire,
        t.started.elapsed()
    );
    if !v.failures.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>();
        let mut tail: Vec<&str> = tail.into_iter().rev().collect();
        // Warnings and errors from anywhere in the log, once each, first.
        let mut seen = std::collections::HashSet::new();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| seen.insert(l.split_once('Z').map_or(*l, |(_, m)| m)))
            .take(10)
            .collect();
        if !warnings.is_empty() {
            tail.insert(0, "(warnings and errors:)");
            for (i, w) in warnings.into_iter().enumerate() {
                tail.insert(1 + i, w);
            }
        }
        panic!(
            "{:?}/{:?}: {} failed check(s) ({:?} into the scenario):\n  - {}\ncounters: \
             {}\ntern log (last lines):\n{}",
            t.path,
            t.wire,
            v.failures.len(),
            t.started.elapsed(),
            v.failures.join("\n  - "),
            t.counters(&st),
            tail.join("\n")
        );
    }
}

const MIB: u64 = 1024;

// ---------------------------------------------------------------------------------------------
// The scripted backend.
// ---------------------------------------------------------------------------------------------

/// The backend behind every scenario: reads a request head (`METHOD /path HTTP/1.1 … CRLF
/// CRLF`), and the path picks what it does:
/// - `/hello`: a 6-byte answer, then the next request (keep-alive);
/// - `/bytes/N`: N bytes of [`pattern_byte`], then the next request;
/// - `/delay/MS`: waits MS, then answers as `/hello`;
/// - `/reset/N`: announces 4·N bytes, sends N, then resets (`SO_LINGER {1, 0}`);
/// - `/stall`: never reads or writes again; ends when tern closes or resets the connection;
/// - `/close`: answers as `/hello` and closes first (tern then closes the client side first).
///
/// One thread per connection, bounded by a stop flag (Drop) and [`BACKEND_GUARD`].
struct Scripted {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Connections whose thread has not ended (accepted and not yet closed).
    live: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// The longest any backend thread lives.
const BACKEND_GUARD: Duration = Duration::from_secs(180);
const HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n";

impl Scripted {
    fn start(listener: TcpListener) -> Scripted {
        let addr = listener.local_addr().expect("backend addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, live) = (stop.clone(), live.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + BACKEND_GUARD;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((c, _)) => {
                            live.fetch_add(1, Ordering::Relaxed);
                            let (stop, gauge) = (stop.clone(), live.clone());
                            let spawned = std::thread::Builder::new().stack_size(128 * 1024).spawn(
                                move || {
                                    scripted_connection(c, &stop, deadline);
                                    gauge.fetch_sub(1, Ordering::Relaxed);
                                },
                            );
                            if spawned.is_err() {
                                // Out of threads: the connection was dropped (closed).
                                live.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Scripted {
            addr,
            stop,
            live,
            thread: Some(thread),
        }
    }

    fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a connection thread should give up.
fn ending(stop: &AtomicBool, deadline: Instant) -> bool {
    stop.load(Ordering::Relaxed) || Instant::now() >= deadline
}

/// Writes all of `data`, retrying on the socket's 100 ms timeout until `ending`.
fn backend_write(c: &mut TcpStream, data: &[u8], stop: &AtomicBool, deadline: Instant) -> bool {
    let mut off = 0;
    while off < data.len() {
        match c.write(&data[off..]) {
            Ok(0) => return false,
            Ok(n) => off += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if ending(stop, deadline) {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn scripted_connection(mut c: TcpStream, stop: &AtomicBool, deadline: Instant) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = c.set_write_timeout(Some(Duration::from_millis(100)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Read one request head.
        let end = loop {
            if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if ending(stop, deadline) || head.len() > 64 * 1024 {
                return;
            }
            match c.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        };
        let line = String::from_utf8_lossy(&head[..end]).into_owned();
        head.drain(..end);
        let target = line.split(' ').nth(1).unwrap_or("/").to_string();
        let mut parts = target.trim_start_matches('/').splitn(2, '/');
        let cmd = parts.next().unwrap_or("");
        let arg: u64 = parts.next().and_then(|a| a.parse().ok()).unwrap_or(0);
        match cmd {
            "bytes" | "reset" => {
                let announced = if cmd == "bytes" { arg } else { 4 * arg };
                let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\n\r\n");
                if !backend_write(&mut c, h.as_bytes(), stop, deadline) {
                    return;
                }
                let mut chunk = vec![0u8; 16 * 1024];
                let mut off = 0u64;
                while off < arg {
                    let n = (arg - off).min(chunk.len() as u64) as usize;
                    pattern_fill(off, &mut chunk[..n]);
                    if !backend_write(&mut c, &chunk[..n], stop, deadline) {
                        return;
                    }
                    off += n as u64;
                }
                if cmd == "reset" {
                    linger_zero(&c);
                    return;
                }
            }
            "delay" => {
                let until = Instant::now() + Duration::from_millis(arg);
                while Instant::now() < until {
                    if ending(stop, deadline) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !backend_write(&mut c, HELLO, stop, deadline) {
                    return;
                }
            }
            "stall" => {
                // Never read again: wait for tern to end the connection (FIN or RST), seen
                // without reading through poll's RDHUP/HUP/ERR.
                while !ending(stop, deadline) {
                    let mut p = libc::pollfd {
                        fd: c.as_raw_fd(),
                        events: libc::POLLRDHUP,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    let rc = unsafe { libc::poll(&mut p, 1, 100) };
                    if rc > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
                    {
                        return;
                    }
                }
                return;
            }
            "close" => {
                let _ = backend_write(&mut c, HELLO, stop, deadline);
                return;
            }
            _ => {
                if !backend_write(&mut c, HELLO, stop, deadline) {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------

/// The listener under test, as seen from the client namespace.
#[derive(Clone)]
struct Dial {
    addr: SocketAddr,
    /// A client configuration for TLS listeners, `None` for plain ones.
    cfg: Option<Arc<ClientConfig>>,
}

/// A client connection: TLS or plain.
enum Conn {
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    Plain(TcpStream),
}

impl Conn {
    fn sock(&self) -> &TcpStream {
        match self {
            Conn::Tls(t) => &t.sock,
            Conn::Plain(s) => s,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tls(t) => t.read(buf),
            Conn::Plain(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tls(t) => t.write(buf),
            Conn::Plain(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tls(t) => t.flush(),
            Conn::Plain(s) => s.flush(),
        }
    }
}

/// A TCP connection to `remote`, from `local` if given; connect bounded by 10 s (SO_SNDTIMEO
/// applies to a blocking connect), reads and writes by 10 s.
fn tcp_connect(local: Option<Ipv4Addr>, remote: SocketAddr) -> std::io::Result<TcpStream> {
    tcp_connect_with(local, remote, None)
}

/// [`tcp_connect`] with a fixed receive buffer (`SO_RCVBUF`, set before connecting so the
/// window is small from the start and Linux does not grow it): a client that never reads then
/// absorbs kilobytes, not megabytes, before tern sees it stall.
fn tcp_connect_with(
    local: Option<Ipv4Addr>,
    remote: SocketAddr,
    rcvbuf: Option<usize>,
) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(remote) = remote else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    if let Some(bytes) = rcvbuf {
        sock.set_recv_buffer_size(bytes)?;
    }
    if let Some(ip) = local {
        sock.bind(&SockAddr::from(SocketAddrV4::new(ip, 0)))?;
    }
    sock.connect(&SockAddr::from(remote))?;
    Ok(sock.into())
}

/// Connects (from `local` if given) and, on a TLS listener, completes the handshake.
fn open(d: &Dial, local: Option<Ipv4Addr>) -> Result<Conn, String> {
    open_with(d, local, None)
}

/// [`open`] with [`tcp_connect_with`]'s receive buffer.
fn open_with(d: &Dial, local: Option<Ipv4Addr>, rcvbuf: Option<usize>) -> Result<Conn, String> {
    let sock = tcp_connect_with(local, d.addr, rcvbuf).map_err(|e| format!("connect: {e}"))?;
    let Some(cfg) = &d.cfg else {
        return Ok(Conn::Plain(sock));
    };
    let conn = ClientConnection::new(cfg.clone(), ServerName::try_from(NAME).expect("name"))
        .map_err(|e| format!("client: {e}"))?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(Conn::Tls(Box::new(tls)))
}

/// Sends `GET path` (keep-alive, or `Connection: close`).
fn request(c: &mut Conn, path: &str, close: bool) -> std::io::Result<()> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    write!(c, "GET {path} HTTP/1.1\r\nHost: {NAME}\r\n{conn}\r\n")?;
    c.flush()
}

/// One `/hello` round trip.
fn hello_round_trip(c: &mut Conn) -> Result<(), String> {
    request(c, "/hello", false).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; HELLO.len()];
    c.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != HELLO {
        return Err(format!("wrong answer: {}", String::from_utf8_lossy(&got)));
    }
    Ok(())
}

/// Ends a connection cleanly (close_notify on TLS, then FIN).
fn close_cleanly(c: Conn) {
    if let Conn::Tls(mut t) = c {
        t.conn.send_close_notify();
        let _ = t.flush();
    }
}

/// The well-behaved client: a loop of fresh connections from the rig's second client address,
/// each with three `/hello` round trips, until stopped.
struct Good {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<GoodReport>,
}

#[derive(Debug, Default)]
struct GoodReport {
    /// Connections that completed all their round trips.
    ok: u64,
    failures: Vec<String>,
    /// Each connection's time from connect to its last answer.
    latencies: Vec<Duration>,
}

impl Good {
    fn start(t: &Target) -> Good {
        let stop = Arc::new(AtomicBool::new(false));
        let (d, ip) = (t.dial(), t.good_ip);
        let thread = {
            let stop = stop.clone();
            t.stack.rig.client.spawn(move || {
                let mut r = GoodReport::default();
                let deadline = Instant::now() + Duration::from_secs(240);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let t0 = Instant::now();
                    let attempt = open(&d, Some(ip)).and_then(|mut c| {
                        for _ in 0..3 {
                            hello_round_trip(&mut c)?;
                        }
                        close_cleanly(c);
                        Ok(())
                    });
                    let took = t0.elapsed();
                    match attempt {
                        Ok(()) => {
                            r.ok += 1;
                            r.latencies.push(took);
                        }
                        Err(e) => {
                            r.failures
                                .push(format!("connection {i} after {took:?}: {e}"));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r
            })
        };
        Good { stop, thread }
    }

    /// Stops after the current connection and returns the report (at least one more
    /// connection is made after `finish` is called only if none was made yet).
    fn finish(self) -> GoodReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("good client thread")
    }
}

/// Sets SO_LINGER {1, 0} and drops the socket: the kernel sends RST.
fn reset(c: TcpStream) {
    linger_zero(&c);
    drop(c);
}

/// Runs `f` `n` times; the errors, numbered.
fn each(n: u64, mut f: impl FnMut() -> Result<(), String>) -> Vec<String> {
    (0..n)
        .filter_map(|i| f().err().map(|e| format!("hostile connection {i}: {e}")))
        .collect()
}

/// Reads until EOF or error; returns the bytes and how it ended: `Ok(())` for a clean end (TCP
/// FIN on plain, close_notify on TLS), `Err` otherwise.
fn read_to_end_or_error(c: &mut Conn) -> (Vec<u8>, Result<(), String>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(format!("{:?}: {e}", e.kind()))),
        }
    }
}

/// A ClientHello (rustls) for [`NAME`].
fn client_hello(cfg: &Arc<ClientConfig>) -> Vec<u8> {
    let mut conn =
        ClientConnection::new(cfg.clone(), ServerName::try_from(NAME).expect("name")).expect("c");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("ClientHello");
    }
    out
}

/// Waits until `c` is closed by the peer (EOF, reset) or `within` passes; returns how long it
/// took, or `None` on timeout. Data that arrives (an alert) is read and ignored.
fn wait_closed(c: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while t0.elapsed() < within {
        match c.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The scenario table.
// ---------------------------------------------------------------------------------------------

/// One `#[test]` per row and path: `name => scenario_fn(Wire)` on the kernel and bypass paths.
/// `bypass_only` rows run only on the bypass path.
macro_rules! scenarios {
    ($( $kernel:ident, $bypass:ident => $f:ident($wire:expr); )*) => {$(
        #[test]
        fn $kernel() {
            $f(Path::Kernel, $wire, concat!("k", stringify!($f)));
        }
        #[test]
        fn $bypass() {
            $f(Path::Bypass, $wire, concat!("b", stringify!($f)));
        }
    )*};
}

scenarios! {
    kernel_reset_right_after_connect_tls, bypass_reset_right_after_connect_tls
        => reset_right_after_connect(Wire::Tls);
    kernel_reset_right_after_connect_plain, bypass_reset_right_after_connect_plain
        => reset_right_after_connect(Wire::Plain);
    kernel_reset_mid_handshake, bypass_reset_mid_handshake
        => reset_mid_handshake(Wire::Tls);
    kernel_reset_before_the_response_tls, bypass_reset_before_the_response_tls
        => reset_before_the_response(Wire::Tls);
    kernel_reset_before_the_response_plain, bypass_reset_before_the_response_plain
        => reset_before_the_response(Wire::Plain);
    kernel_reset_while_streaming_tls, bypass_reset_while_streaming_tls
        => reset_while_streaming(Wire::Tls);
    kernel_reset_while_streaming_plain, bypass_reset_while_streaming_plain
        => reset_while_streaming(Wire::Plain);
    kernel_half_close_after_the_request_tls, bypass_half_close_after_the_request_tls
        => half_close_after_the_request(Wire::Tls);
    kernel_half_close_after_the_request_plain, bypass_half_close_after_the_request_plain
        => half_close_after_the_request(Wire::Plain);
    kernel_garbage_instead_of_a_client_hello, bypass_garbage_instead_of_a_client_hello
        => garbage_instead_of_a_client_hello(Wire::Tls);
    kernel_truncated_records_then_fin, bypass_truncated_records_then_fin
        => truncated_records_then_fin(Wire::Tls);
    kernel_unknown_sni_gets_the_default_certificate, bypass_unknown_sni_gets_the_default_certificate
        => unknown_sni(Wire::Tls);
    kernel_slowloris_before_the_handshake, bypass_slowloris_before_the_handshake
        => slowloris_before_the_handshake(Wire::Tls);
    kernel_slowloris_after_the_handshake_tls, bypass_slowloris_after_the_handshake_tls
        => slowloris_after_the_handshake(Wire::Tls);
    kernel_slowloris_after_the_handshake_plain, bypass_slowloris_after_the_handshake_plain
        => slowloris_after_the_handshake(Wire::Plain);
    kernel_slow_readers_do_not_starve_others_tls, bypass_slow_readers_do_not_starve_others_tls
        => slow_readers_do_not_starve_others(Wire::Tls);
    kernel_slow_readers_do_not_starve_others_plain, bypass_slow_readers_do_not_starve_others_plain
        => slow_readers_do_not_starve_others(Wire::Plain);
    kernel_slow_readers_are_cut_at_send_ms, bypass_slow_readers_are_cut_at_send_ms
        => slow_readers_are_cut_at_send_ms(Wire::Tls);
    kernel_backend_that_never_reads, bypass_backend_that_never_reads
        => backend_that_never_reads(Wire::Tls);
    kernel_backend_resets_mid_response_tls, bypass_backend_resets_mid_response_tls
        => backend_resets_mid_response(Wire::Tls);
    kernel_backend_resets_mid_response_plain, bypass_backend_resets_mid_response_plain
        => backend_resets_mid_response(Wire::Plain);
    kernel_one_backend_down_tls, bypass_one_backend_down_tls
        => one_backend_down(Wire::Tls);
    kernel_one_backend_down_plain, bypass_one_backend_down_plain
        => one_backend_down(Wire::Plain);
    kernel_per_source_limit, bypass_per_source_limit
        => per_source_limit(Wire::Tls);
    kernel_max_connections_per_worker, bypass_max_connections_per_worker
        => max_connections_per_worker(Wire::Tls);
}

#[test]
fn bypass_fin_wait_2_is_cut_after_fin_timeout_tls() {
    fin_wait_2_is_cut(Path::Bypass, Wire::Tls, "bfinwait-tls");
}

#[test]
fn bypass_fin_wait_2_is_cut_after_fin_timeout_plain() {
    fin_wait_2_is_cut(Path::Bypass, Wire::Plain, "bfinwait-plain");
}

/// A rig tag (≤ 24 bytes of `[a-z0-9-]`) from the scenario's name and the wire.
fn tag(base: &str, wire: Wire) -> String {
    let short: String = base
        .replace('_', "")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(18)
        .collect();
    let w = match wire {
        Wire::Tls => "t",
        Wire::Plain => "p",
    };
    format!("{short}-{w}").to_ascii_lowercase()
}

/// Connect, wait 50 ms, reset: 20 times, each on a fresh connection (both workers get some).
fn reset_right_after_connect(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let good = Good::start(&t);
    let d = t.dial();
    const N: u64 = 20;
    let errors = t.client(move || {
        each(N, || {
            let c = tcp_connect(None, d.addr).map_err(|e| format!("connect: {e}"))?;
            std::thread::sleep(Duration::from_millis(50));
            reset(c);
            Ok(())
        })
    });
    let mut v = Verdict::default();
    v.hostile_errors(&errors);
    let st = t.wait_counters(Duration::from_secs(10), |c| c("client_errors") >= N);
    v.at_least(&t, &st, "client_errors", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// Half a ClientHello, then RST; and a whole ClientHello, the server's first flight partly
/// read, then RST (tern waits for the client's Finished).
fn reset_mid_handshake(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let good = Good::start(&t);
    let d = t.dial();
    const N: u64 = 10;
    let errors = t.client(move || {
        let cfg = d.cfg.clone().expect("TLS");
        let hello = client_hello(&cfg);
        each(N, || {
            let mut c = tcp_connect(None, d.addr).map_err(|e| format!("connect: {e}"))?;
            c.write_all(&hello[..hello.len() / 2])
                .map_err(|e| format!("half a hello: {e}"))?;
            std::thread::sleep(Duration::from_millis(50));
            reset(c);
            let mut c = tcp_connect(None, d.addr).map_err(|e| format!("connect: {e}"))?;
            c.write_all(&hello).map_err(|e| format!("hello: {e}"))?;
            let mut buf = [0u8; 100];
            let _ = c.read(&mut buf);
            reset(c);
            Ok(())
        })
    });
    let mut v = Verdict::default();
    v.hostile_errors(&errors);
    let st = t.wait_counters(Duration::from_secs(10), |c| c("closed") >= 2 * N);
    v.at_least(&t, &st, "accepted", 2 * N);
    v.equals(&t, &st, "handshake_timeouts", 0);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// The request is sent (the backend answers after 1 s), then RST before the answer.
fn reset_before_the_response(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let good = Good::start(&t);
    let d = t.dial();
    const N: u64 = 10;
    let errors = t.client(move || {
        each(N, || {
            let mut c = open(&d, None)?;
            request(&mut c, "/delay/1000", false).map_err(|e| format!("request: {e}"))?;
            std::thread::sleep(Duration::from_millis(200));
            let sock = c.sock().try_clone().map_err(|e| format!("clone: {e}"))?;
            drop(c);
            reset(sock);
            Ok(())
        })
    });
    let mut v = Verdict::default();
    v.hostile_errors(&errors);
    let st = t.wait_counters(Duration::from_secs(10), |c| c("client_errors") >= N);
    v.at_least(&t, &st, "client_errors", N);
    v.at_least(&t, &st, "backend_connects", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// A 256 MiB response, 1 MiB of it read, then RST.
fn reset_while_streaming(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let good = Good::start(&t);
    let d = t.dial();
    const N: u64 = 8;
    let errors = t.client(move || {
        each(N, || {
            let mut c = open(&d, None)?;
            request(&mut c, "/bytes/268435456", false).map_err(|e| format!("request: {e}"))?;
            let mut got = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while got < 1 << 20 {
                match c.read(&mut buf) {
                    Ok(0) => return Err(format!("EOF after {got} bytes")),
                    Ok(n) => got += n,
                    Err(e) => return Err(format!("read after {got} bytes: {e}")),
                }
            }
            let sock = c.sock().try_clone().map_err(|e| format!("clone: {e}"))?;
            drop(c);
            reset(sock);
            Ok(())
        })
    });
    let mut v = Verdict::default();
    v.hostile_errors(&errors);
    let st = t.wait_counters(Duration::from_secs(10), |c| c("client_errors") >= N);
    v.at_least(&t, &st, "client_errors", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 64 * MIB);
}

/// The request, then `shutdown(Write)` (a bare FIN, no close_notify): the 4 MiB response still
/// arrives in full and in order.
fn half_close_after_the_request(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let good = Good::start(&t);
    let d = t.dial();
    const N: usize = 4;
    const LEN: usize = 4 << 20;
    let results = t.client(move || {
        (0..N)
            .map(|_| {
                let mut c = open(&d, None).expect("open");
                request(&mut c, &format!("/bytes/{LEN}"), true).expect("request");
                c.sock().shutdown(Shutdown::Write).expect("half-close");
                let (got, end) = read_to_end_or_error(&mut c);
                let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
                let body_ok = body_at.is_some_and(|b| {
                    got.len() - b == LEN
                        && got[b..]
                            .iter()
                            .enumerate()
                            .all(|(i, &x)| x == pattern_byte(i as u64))
                });
                (got.len(), body_ok, end)
            })
            .collect::<Vec<_>>()
    });
    let mut v = Verdict::default();
    for (i, (len, ok, end)) in results.into_iter().enumerate() {
        v.check(ok, || {
            format!(
                "connection {i}: the response did not arrive in full ({len} bytes, end {end:?})"
            )
        });
    }
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// An HTTP request, random bytes, and an application-data record, each instead of a
/// ClientHello: an alert or a close, promptly, counted as TLS errors, no backend connection.
fn garbage_instead_of_a_client_hello(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let before = t.stats_or_null();
    let d = t.dial();
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: tern.test\r\n\r\n".to_vec(),
        (0..1024u64).map(pattern_byte).collect(),
        [&[0x17u8, 0x03, 0x03, 0x00, 0x20][..], &[0xAB; 32]].concat(),
        vec![0x16, 0x03, 0x01, 0xFF, 0xFF, 0x01],
    ];
    let n = garbage.len() as u64;
    let closed = t.client(move || {
        garbage
            .into_iter()
            .map(|g| {
                let mut c = tcp_connect(None, d.addr).expect("connect");
                let _ = c.write_all(&g);
                wait_closed(&mut c, Duration::from_secs(5))
            })
            .collect::<Vec<_>>()
    });
    let mut v = Verdict::default();
    for (i, c) in closed.iter().enumerate() {
        v.check(c.is_some(), || {
            format!("garbage {i}: tern did not close within 5 s")
        });
    }
    let st = t.wait_counters(Duration::from_secs(5), |c| c("tls_errors") >= n);
    v.at_least(&t, &st, "tls_errors", n);
    let connects = |s: &serde_json::Value| t.counter(s, "backend_connects").unwrap_or(0);
    v.check(connects(&st) == connects(&before), || {
        "a backend connection was opened for garbage".to_string()
    });
    // The good client runs after, so that the backend_connects check above means something.
    let good = Good::start(&t);
    std::thread::sleep(Duration::from_millis(500));
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// A ClientHello record cut short, then FIN; and after a handshake, an application-data
/// record cut short, then FIN: tern closes at once (long before the 5 s handshake timeout and
/// the idle timeout), and counts no timeout.
fn truncated_records_then_fin(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            handshake_ms: 5_000,
            idle_ms: 10_000,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    let d = t.dial();
    const N: usize = 4;
    let closed = t.client(move || {
        let cfg = d.cfg.clone().expect("TLS");
        let hello = client_hello(&cfg);
        let mut out = Vec::new();
        for _ in 0..N {
            let mut c = tcp_connect(None, d.addr).expect("connect");
            c.write_all(&hello[..20]).expect("part of a hello");
            c.shutdown(Shutdown::Write).expect("FIN");
            out.push(("ClientHello", wait_closed(&mut c, Duration::from_secs(8))));

            let Ok(Conn::Tls(mut tls)) = open(&d, None) else {
                panic!("handshake");
            };
            // Header of a 100-byte application-data record, 10 bytes of it, FIN.
            let mut rec = vec![0x17, 0x03, 0x03, 0x00, 100];
            rec.extend_from_slice(&[0x5A; 10]);
            tls.sock.write_all(&rec).expect("partial record");
            tls.sock.shutdown(Shutdown::Write).expect("FIN");
            out.push((
                "record",
                wait_closed(&mut tls.sock, Duration::from_secs(12)),
            ));
        }
        out
    });
    let mut v = Verdict::default();
    for (what, c) in &closed {
        v.check(c.is_some_and(|d| d < Duration::from_millis(2_500)), || {
            format!("truncated {what} then FIN: closed after {c:?} (expected promptly)")
        });
    }
    let st = t.stats_or_null();
    v.equals(&t, &st, "handshake_timeouts", 0);
    v.equals(&t, &st, "idle_timeouts", 0);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// `openssl s_client` with an SNI no certificate has, and with none: the default certificate
/// (docs/configuration.md, `[[certificate]] default`), and the request is served.
fn unknown_sni(path: Path, wire: Wire, name: &str) {
    let t = Target::start(path, wire, &tag(name, wire), Knobs::default());
    let good = Good::start(&t);
    let mut v = Verdict::default();
    let default_cert: String = t
        .stack
        .cert
        .cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for sni in [Some("unknown.example"), None] {
        let mut cmd = t.stack.rig.client_command("openssl");
        cmd.args(["s_client", "-connect", &t.addr().to_string(), "-ign_eof"]);
        match sni {
            Some(n) => cmd.args(["-servername", n]),
            None => cmd.arg("-noservername"),
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"GET /close HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n")
            .expect("write request");
        let out = child.wait_with_output().expect("openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        let served: String = text
            .split("-----BEGIN CERTIFICATE-----")
            .nth(1)
            .and_then(|s| s.split("-----END CERTIFICATE-----").next())
            .unwrap_or("")
            .lines()
            .collect();
        v.check(served == default_cert, || {
            format!("SNI {sni:?}: not the default certificate: {text}")
        });
        v.check(text.contains("hello"), || {
            format!("SNI {sni:?}: the request was not served: {text}")
        });
    }
    let st = t.stats_or_null();
    v.at_least(&t, &st, "handshakes", 2);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// Python's slowloris: `N` connections to `HOST:PORT`; mode `hello` sends a ClientHello (made by
/// Python's ssl) one byte a second; mode `idle` completes a TLS handshake (or sends one byte on
/// a plain listener) and then sends nothing but TCP keep-alive probes, one a second (bare
/// ACKs). Watches for the server's close for at most SECS; prints
/// `closed=<n> first=<s> last=<s>`.
const SLOWLORIS: &str = r#"
import select, socket, ssl, sys, time
mode, host, port, n, secs, tls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6] == "tls"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(inc, out, server_hostname="tern.test")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
socks = []
for k in range(n):
    s = socket.create_connection((host, port), timeout=10)
    if mode == "idle":
        if tls:
            s = ctx.wrap_socket(s, server_hostname="tern.test")
        else:
            s.sendall(b"G")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 100)
    s.setblocking(False)
    socks.append(s)
start = time.monotonic()
closed = [None] * n
sent = 0
next_send = start
while time.monotonic() - start < secs and None in closed:
    now = time.monotonic()
    send = mode == "hello" and now >= next_send and sent < len(hello)
    for k, s in enumerate(socks):
        if closed[k] is not None:
            continue
        try:
            if send:
                s.send(hello[sent:sent + 1])
            r, _, _ = select.select([s], [], [], 0)
            if r:
                if not s.recv(4096):
                    closed[k] = now - start
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except OSError:
            closed[k] = now - start
    if send:
        sent += 1
        next_send += 1.0
    time.sleep(0.1)
done = [c for c in closed if c is not None]
done.sort()
deciles = ",".join("%.1f" % done[len(done) * q // 10] for q in range(10)) if done else ""
print("closed=%d first=%.2f last=%.2f deciles=%s" % (len(done), min(done or [0]), max(done or [0]), deciles))
"#;

/// Parses the slowloris script's `closed=… first=… last=…` line.
fn slowloris_result(out: &str) -> (u64, f64, f64) {
    let mut r = (0, 0.0, 0.0);
    for kv in out.split_whitespace() {
        match kv.split_once('=') {
            Some(("closed", n)) => r.0 = n.parse().unwrap_or(0),
            Some(("first", s)) => r.1 = s.parse().unwrap_or(0.0),
            Some(("last", s)) => r.2 = s.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    r
}

/// 300 connections trickle a ClientHello at a byte a second; `handshake_ms = 2000` cuts every
/// one of them and counts it.
fn slowloris_before_the_handshake(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            handshake_ms: 2_000,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    const N: u64 = 300;
    let args = [
        "hello".to_string(),
        t.addr().ip().to_string(),
        t.addr().port().to_string(),
        N.to_string(),
        "12".to_string(),
        "tls".to_string(),
    ];
    let mut v = Verdict::default();
    if let Some(out) = t.python(SLOWLORIS, &args, &mut v) {
        let (closed, first, last) = slowloris_result(&out);
        v.check(closed == N, || {
            format!("slowloris: {closed} of {N} connections cut within 12 s ({out})")
        });
        v.check(first >= 1.0 && last <= 10.0, || {
            format!("slowloris connections cut between {first} s and {last} s, expected around the 2 s deadline")
        });
    }
    let st = t.wait_counters(Duration::from_secs(5), |c| c("handshake_timeouts") >= N);
    v.at_least(&t, &st, "handshake_timeouts", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 64 * MIB);
}

/// 300 connections complete the handshake (or send one byte on a plain listener), then send
/// only TCP keep-alive probes, bare ACKs, one a second: idleness is measured in payload bytes,
/// so `idle_ms = 2000` cuts every one and counts it.
fn slowloris_after_the_handshake(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            idle_ms: 2_000,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    const N: u64 = 300;
    let args = [
        "idle".to_string(),
        t.addr().ip().to_string(),
        t.addr().port().to_string(),
        N.to_string(),
        "12".to_string(),
        if t.tls() { "tls" } else { "plain" }.to_string(),
    ];
    let mut v = Verdict::default();
    if let Some(out) = t.python(SLOWLORIS, &args, &mut v) {
        let (closed, _, last) = slowloris_result(&out);
        v.check(closed == N, || {
            format!("idle connections with keep-alives: {closed} of {N} cut within 12 s ({out})")
        });
        v.check(last <= 10.0, || {
            format!("the last idle connection was cut after {last} s, expected around the 2 s deadline ({out})")
        });
    }
    let st = t.wait_counters(Duration::from_secs(5), |c| c("idle_timeouts") >= N);
    v.at_least(&t, &st, "idle_timeouts", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 64 * MIB);
}

/// Opens `n` connections from 4 threads, each asking for a 64 MiB response and never reading;
/// returns them (held by the caller) and how many could not be opened.
fn open_slow_readers(t: &Target, n: usize) -> (Vec<Conn>, Vec<String>) {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let d = t.dial();
            t.stack.rig.client.spawn(move || {
                let mut held = Vec::new();
                let mut errors = Vec::new();
                for _ in 0..n / 4 {
                    match open_with(&d, None, Some(16 * 1024)).and_then(|mut c| {
                        request(&mut c, "/bytes/67108864", false)
                            .map_err(|e| format!("request: {e}"))?;
                        Ok(c)
                    }) {
                        Ok(c) => held.push(c),
                        Err(e) => errors.push(e),
                    }
                }
                (held, errors)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut errors = Vec::new();
    for th in threads {
        let (h, e) = th.join().expect("slow reader thread");
        held.extend(h);
        errors.extend(e);
    }
    (held, errors)
}

/// 400 connections ask for a large response and never read; the good client keeps being
/// served meanwhile, and the readers are eventually cut (here by `idle_ms = 8000`, or earlier by
/// a write progress deadline) and counted. The idle timeout applies to the good client too: it
/// must leave room for the backend (400 writer threads on a loaded 2-core machine) to answer
/// the good client's request; 4 s once did not, and the good client was cut as idle.
fn slow_readers_do_not_starve_others(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            idle_ms: 8_000,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    const N: usize = 400;
    let (held, errors) = open_slow_readers(&t, N);
    let mut v = Verdict::default();
    v.check(errors.is_empty(), || {
        format!(
            "{} slow readers could not connect: {:?}",
            errors.len(),
            &errors[..errors.len().min(3)]
        )
    });
    let n = held.len() as u64;
    // Held for a while: the good client must keep being served throughout.
    std::thread::sleep(Duration::from_secs(2));
    let st = t.wait_counters(Duration::from_secs(25), |c| {
        c("idle_timeouts") + c("send_timeouts") >= n
    });
    let cut =
        t.counter(&st, "idle_timeouts").unwrap_or(0) + t.counter(&st, "send_timeouts").unwrap_or(0);
    v.check(cut >= n, || {
        format!("{cut} of {n} slow readers counted as idle_timeouts + send_timeouts")
    });
    let g = good.finish();
    drop(held);
    // Bounded: about 1 MiB per slow reader at most (their responses are 64 MiB each).
    conclude(
        t,
        v,
        Some(g),
        Duration::from_secs(20),
        64 * MIB + N as u64 * MIB,
    );
}

/// 300 slow readers with `timeouts.send_ms = 2000` (and a long `idle_ms`): each is reset once
/// its queued output makes no progress for 2 s, and counted in `send_timeouts`.
fn slow_readers_are_cut_at_send_ms(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            idle_ms: 120_000,
            timeouts_extra: "send_ms = 2000",
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    const N: usize = 300;
    let (held, errors) = open_slow_readers(&t, N);
    let mut v = Verdict::default();
    v.check(errors.is_empty(), || format!("slow readers: {errors:?}"));
    let n = held.len() as u64;
    let st = t.wait_counters(Duration::from_secs(20), |c| c("send_timeouts") >= n);
    v.at_least(&t, &st, "send_timeouts", n);
    v.equals(&t, &st, "idle_timeouts", 0);
    // Each reader sees its connection end (reset) without reading everything first.
    let cut = t.client(move || {
        held.into_iter()
            .map(|c| match c {
                Conn::Tls(t) => t.sock,
                Conn::Plain(s) => s,
            })
            .map(|mut s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return total < 64 << 20,
                        Ok(k) => total += k as u64,
                    }
                }
            })
            .filter(|&cut| cut)
            .count() as u64
    });
    v.check(cut == n, || {
        format!("{cut} of {n} slow readers saw their connection cut")
    });
    let g = good.finish();
    conclude(
        t,
        v,
        Some(g),
        Duration::from_secs(10),
        64 * MIB + N as u64 * MIB,
    );
}

/// The backend accepts and never reads (`/stall`); the client keeps writing a 4 MiB body that
/// goes nowhere. `idle_ms = 3000` cuts it (no byte moves either way) and counts it; the good
/// client is served meanwhile.
fn backend_that_never_reads(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            idle_ms: 3_000,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    let d = t.dial();
    const N: u64 = 4;
    let ended = t.client(move || {
        let writers: Vec<_> = (0..N)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let mut c = open(&d, None).expect("open");
                    request(&mut c, "/stall", false).expect("request");
                    let body = vec![0x42u8; 64 * 1024];
                    let t0 = Instant::now();
                    // Writes until tern cuts the connection (bounded: 64 MiB or 20 s).
                    for _ in 0..1024 {
                        if c.write_all(&body).is_err() || t0.elapsed() > Duration::from_secs(20) {
                            break;
                        }
                    }
                    let (_, end) = read_to_end_or_error(&mut c);
                    (t0.elapsed(), end)
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().expect("writer"))
            .collect::<Vec<_>>()
    });
    let mut v = Verdict::default();
    for (i, (took, end)) in ended.iter().enumerate() {
        v.check(*took < Duration::from_secs(15), || {
            format!("connection {i} to a stalled backend ended after {took:?} ({end:?})")
        });
    }
    let st = t.wait_counters(Duration::from_secs(5), |c| c("idle_timeouts") >= N);
    v.at_least(&t, &st, "idle_timeouts", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 64 * MIB);
}

/// The backend announces 4 MiB, sends 1 MiB and resets: the client's connection ends promptly
/// (no idle wait), not with a clean close_notify on TLS (the response is truncated), and the
/// failure is counted.
fn backend_resets_mid_response(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            idle_ms: 60_000,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    let d = t.dial();
    const N: u64 = 4;
    let ended = t.client(move || {
        (0..N)
            .map(|_| {
                let mut c = open(&d, None).expect("open");
                let _ = c.sock().set_read_timeout(Some(Duration::from_secs(20)));
                request(&mut c, "/reset/1048576", false).expect("request");
                let t0 = Instant::now();
                let (got, end) = read_to_end_or_error(&mut c);
                (t0.elapsed(), got.len(), end)
            })
            .collect::<Vec<_>>()
    });
    let mut v = Verdict::default();
    for (i, (took, len, end)) in ended.iter().enumerate() {
        v.check(*took < Duration::from_secs(10), || {
            format!("connection {i}: ended after {took:?} ({len} bytes, {end:?})")
        });
        v.check(*len <= (1 << 20) + 100, || {
            format!("connection {i}: {len} bytes")
        });
        if t.tls() {
            v.check(end.is_err(), || {
                format!("connection {i}: a truncated response ended with a clean close_notify")
            });
        }
    }
    let st = t.wait_counters(Duration::from_secs(5), |c| c("backend_failures") >= N);
    v.at_least(&t, &st, "backend_failures", N);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 64 * MIB);
}

/// A listener in the server namespace whose accept queue is full (backlog 0, one connection
/// queued and never accepted): further SYNs are dropped, so a connect to it times out — a
/// backend that is down without saying so.
struct BlackHole {
    addr: SocketAddr,
    _listener: TcpListener,
    _filler: TcpStream,
}

#[track_caller]
fn black_hole(rig: &Rig) -> BlackHole {
    rig.server_run(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        SockRef::from(&l).listen(0).expect("listen");
        let addr = l.local_addr().expect("addr");
        let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("filler");
        // Confirm: a further connect does not complete.
        for _ in 0..3 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err() {
                return BlackHole {
                    addr,
                    _listener: l,
                    _filler: filler,
                };
            }
        }
        panic!("the full listener {addr} still completes connections");
    })
}

/// Two backend servers, one silently down (SYNs dropped, listed first) and
/// `connect_timeout_ms = 5000`: no request fails, and after the first failure no connection
/// waits behind the dead server (every good connection but one takes well under the connect
/// timeout).
fn one_backend_down(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            connect_timeout_ms: 5_000,
            dead_server_first: true,
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    // Enough sequential connections that round-robin gives the dead server several.
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let st = t.stats_or_null();
        if t.counter(&st, "backend_connects").unwrap_or(0) >= 25 {
            break;
        }
    }
    let g = good.finish();
    let mut v = Verdict::default();
    let slow: Vec<&Duration> = g
        .latencies
        .iter()
        .filter(|l| **l > Duration::from_millis(2_500))
        .collect();
    // Each of the two workers learns on its own (shared nothing) that the server is down: its
    // first connection there waits the connect timeout, then fails over. No later one does:
    // the down server is skipped, and probed by the worker itself, not with a client.
    v.check(slow.len() <= 2, || {
        format!(
            "{} of {} good connections took over 2.5 s (connect timeout 5 s): {:?}",
            slow.len(),
            g.latencies.len(),
            &slow[..slow.len().min(5)]
        )
    });
    v.check(g.ok >= 5, || {
        format!("only {} good connections in 25 s", g.ok)
    });
    let st = t.stats_or_null();
    v.at_least(&t, &st, "backend_connect_timeouts", 1);
    v.at_least(&t, &st, "backend_skipped_down", 1);
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// Holds `n` TLS (or plain) connections from the hostile address, each proven served by one
/// round trip; counts those refused (handshake or round trip failed) and checks they were
/// refused promptly.
fn hold_many(t: &Target, n: usize) -> (Vec<Conn>, u64, Vec<Duration>) {
    let d = t.dial();
    t.client(move || {
        let mut held = Vec::new();
        let mut refused = 0;
        let mut slow_refusals = Vec::new();
        for _ in 0..n {
            let t0 = Instant::now();
            match open(&d, None).and_then(|mut c| hello_round_trip(&mut c).map(|()| c)) {
                Ok(c) => held.push(c),
                Err(_) => {
                    refused += 1;
                    if t0.elapsed() > Duration::from_secs(3) {
                        slow_refusals.push(t0.elapsed());
                    }
                }
            }
        }
        (held, refused, slow_refusals)
    })
}

/// `limits.max_connections_per_source = 4` (per worker): of 30 connections from one address at
/// most 4 per worker are served, the rest are refused at once and counted in
/// `refused_source_limit`; another address (the good client) is served throughout; after the
/// held ones close, the first address is served again.
fn per_source_limit(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            limits_extra: "max_connections_per_source = 4",
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    const N: usize = 30;
    let (held, refused, slow) = hold_many(&t, N);
    let mut v = Verdict::default();
    let served = held.len() as u64;
    v.check(served >= 1 && served <= 4 * WORKERS as u64, || {
        format!("{served} of {N} connections from one source served (limit 4 per worker)")
    });
    v.check(slow.is_empty(), || format!("refusals took {slow:?}"));
    let st = t.wait_counters(Duration::from_secs(5), |c| {
        c("refused_source_limit") >= refused
    });
    v.at_least(&t, &st, "refused_source_limit", refused);
    drop(held);
    let d = t.dial();
    t.wait_counters(Duration::from_secs(10), |c| c("active") <= 1);
    let again = t.client(move || open(&d, None).and_then(|mut c| hello_round_trip(&mut c)));
    v.check(again.is_ok(), || {
        format!("the limited source is not served after its connections closed: {again:?}")
    });
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// `limits.max_connections_per_worker = 8`: of 40 held connections at most 8 per worker are
/// served, the rest are refused at once (not left waiting) and counted in `refused_full`; once
/// the held ones close, new connections are served again.
fn max_connections_per_worker(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        &tag(name, wire),
        Knobs {
            max_per_worker: 8,
            ..Knobs::default()
        },
    );
    const N: usize = 40;
    let (held, refused, slow) = hold_many(&t, N);
    let mut v = Verdict::default();
    let served = held.len() as u64;
    v.check(served >= 1 && served <= 8 * WORKERS as u64, || {
        format!("{served} of {N} held connections served (limit 8 per worker, {WORKERS} workers)")
    });
    v.check(refused > 0, || "no connection was refused".to_string());
    v.check(slow.is_empty(), || format!("refusals took {slow:?}"));
    let st = t.wait_counters(Duration::from_secs(5), |c| c("refused_full") >= refused);
    v.at_least(&t, &st, "refused_full", refused);
    for c in held {
        close_cleanly(c);
    }
    t.wait_counters(Duration::from_secs(10), |c| c("active") == 0);
    // Served again once there is room: the good client runs after (during, it would be
    // refused like anyone else).
    let good = Good::start(&t);
    std::thread::sleep(Duration::from_secs(1));
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}

/// The backend answers `/close` and closes first, so tern closes the client side first (FIN;
/// close_notify before it on TLS); the client reads everything but never closes, leaving tern's
/// TCB in FIN-WAIT-2. With `tcp.fin_timeout_ms = 2000` the stack drops those TCBs: its
/// `connections` gauge returns to 0 while the clients still hold their sockets.
fn fin_wait_2_is_cut(path: Path, wire: Wire, name: &str) {
    let t = Target::start(
        path,
        wire,
        name,
        Knobs {
            tcp_extra: "fin_timeout_ms = 2000",
            ..Knobs::default()
        },
    );
    let good = Good::start(&t);
    let d = t.dial();
    const N: usize = 20;
    let held = Arc::new(Mutex::new(Vec::new()));
    let got_eof = {
        let held = held.clone();
        t.client(move || {
            let mut eofs = 0;
            for _ in 0..N {
                let mut c = open(&d, None).expect("open");
                request(&mut c, "/close", false).expect("request");
                let mut got = vec![0u8; HELLO.len()];
                c.read_exact(&mut got).expect("answer");
                let mut b = [0u8; 16];
                if matches!(c.read(&mut b), Ok(0) | Err(_)) {
                    eofs += 1;
                }
                // Never close: keep the socket (Linux's side sits in CLOSE-WAIT).
                held.lock().expect("held").push(c);
            }
            eofs
        })
    };
    let mut v = Verdict::default();
    v.check(got_eof == N, || {
        format!("{got_eof} of {N} clients saw tern's close")
    });
    // tern's side is done (FIN-WAIT-2 here); the clients never finish theirs. Each is reset
    // at `fin_timeout_ms` after tern's FIN and counted: accounting, not a snapshot of the
    // stack (the good client's connections come and go meanwhile).
    let st = t.wait_counters(Duration::from_secs(15), |c| c("fin_timeouts") >= N as u64);
    v.at_least(&t, &st, "fin_timeouts", N as u64);
    drop(held);
    let g = good.finish();
    conclude(t, v, Some(g), Duration::from_secs(10), 32 * MIB);
}
