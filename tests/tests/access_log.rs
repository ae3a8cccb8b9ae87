//! The access log end to end, on both paths (kernel and bypass): a TLS client with SNI and
//! ALPN (rustls, counting the ciphertext on its socket), the same client resuming, curl, a
//! client that resets mid-request, plaintext sent to the TLS listener, and a plain
//! (`tls = false`) listener, all in front of the demo HTTP backend. Each connection's line is
//! found by the client's address and checked field by field: bytes each way as the client
//! counted them, the TLS parameters, the backend, the close reason. The accounting: lines written = connections closed
//! (`tern ctl stats`), none dropped. Then log rotation: the file is renamed, `tern ctl
//! reopen-log`, and the next connection's line is the only one in the new file. Last,
//! SIGTERM with a connection still open: it is cut at the end of the drain, and its line
//! (`shutdown`) is in the file once tern has exited.
//!
//! Every loop is bounded in time; nothing asserts how fast the machine is.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use support::*;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

/// The kernel listener that answers the readiness probe (and attaches XDP on bypass runs).
const READY_PORT: u16 = 443;
/// The TLS listener under test.
const TLS_PORT: u16 = 4443;
/// The plain listener under test.
const PLAIN_PORT: u16 = 4080;
const WORKERS: u32 = 2;
/// Generous bound for anything to show up on a loaded machine.
const WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataPath {
    Kernel,
    Bypass,
}

impl DataPath {
    fn name(self) -> &'static str {
        match self {
            DataPath::Kernel => "kernel",
            DataPath::Bypass => "bypass",
        }
    }
}

struct Target {
    path: DataPath,
    tern: TernProcess,
    cert: CertFiles,
    control: PathBuf,
    log: PathBuf,
    backend: Backend,
    _dir: TempDir,
    /// Declared last: dropped after tern.
    rig: Rig,
}

impl Target {
    #[track_caller]
    fn start(path: DataPath, tag: &str) -> Target {
        let queues = match path {
            DataPath::Kernel => 1,
            DataPath::Bypass => WORKERS,
        };
        let rig = Rig::isolated(tag, queues);
        let dir = TempDir::new(tag);
        let backend = Backend::demo_http(server_listener(&rig));
        let cert = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        let control = dir.join("tern.sock");
        let log = dir.join("access.log");
        let (ready_extra, mode_lines, bypass_tables) = match path {
            DataPath::Kernel => (String::new(), String::new(), String::new()),
            DataPath::Bypass => (
                format!("interface = \"{}\"\n", rig.server_if),
                format!("mode = \"bypass\"\ninterface = \"{}\"\n", rig.server_if),
                "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n".to_string(),
            ),
        };
        let config = format!(
            "[[listener]]\naddress = \"{ready}\"\n{ready_extra}\n\
             [[listener]]\naddress = \"{tls}\"\n{mode_lines}tls = true\n\n\
             [[listener]]\naddress = \"{plain}\"\n{mode_lines}tls = false\n\n\
             [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\ndefault = true\n\n\
             [tls]\nalpn = [\"http/1.1\"]\n\n\
             [backend]\nservers = [\"{backend}\"]\n\n\
             [workers]\ncount = {WORKERS}\n\n[control]\nsocket = \"{control}\"\n\n\
             [timeouts]\ndrain_ms = 500\n\n\
             [access_log]\npath = \"{log}\"\nflush_ms = 20\n\n{bypass_tables}",
            ready = rig.server_addr(READY_PORT),
            tls = rig.server_addr(TLS_PORT),
            plain = rig.server_addr(PLAIN_PORT),
            cert = cert.cert.display(),
            key = cert.key.display(),
            backend = backend.addr(),
            control = control.display(),
            log = log.display(),
        );
        let mut tern = TernProcess::start(&config, rig.server_netns());
        tern.wait_ready(rig.server_addr(READY_PORT));
        let t = Target {
            path,
            tern,
            cert,
            control,
            log,
            backend,
            _dir: dir,
            rig,
        };
        t.wait_listeners();
        t
    }

    /// The bypass listeners come up after the kernel one the readiness probe saw: connect
    /// (TCP only) until both accept. On the kernel path this succeeds at once. These
    /// connections are logged too; the test counts lines from after them.
    #[track_caller]
    fn wait_listeners(&self) {
        let addrs = [self.addr(TLS_PORT), self.addr(PLAIN_PORT)];
        let ok = self.rig.client.run(move || {
            let deadline = Instant::now() + WITHIN;
            addrs.iter().all(|a| loop {
                if TcpStream::connect_timeout(a, Duration::from_millis(500)).is_ok() {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            })
        });
        assert!(
            ok,
            "the listeners under test did not accept\n{}",
            self.tern_log()
        );
    }

    fn addr(&self, port: u16) -> SocketAddr {
        self.rig.server_addr(port)
    }

    fn tern_log(&self) -> String {
        self.tern.stderr_text()
    }

    #[track_caller]
    fn ctl(&self, command: &str) -> std::process::Output {
        Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.control)
            .arg(command)
            .output()
            .expect("run tern ctl")
    }

    #[track_caller]
    fn stats(&self) -> serde_json::Value {
        let out = self.ctl("stats");
        assert_ok(&out, "tern ctl stats", &self.tern_log());
        serde_json::from_slice(&out.stdout).expect("stats is JSON")
    }

    /// Waits until at least `closed_at_least` connections have closed, none is open and the
    /// log has a line for every connection closed (kernel workers and bypass proxies
    /// together), with none dropped. Returns that count. (A connection the client has finished
    /// may still wait in tern's accept queue: `active` alone does not show it.)
    #[track_caller]
    fn settle(&self, closed_at_least: u64) -> u64 {
        let deadline = Instant::now() + WITHIN;
        loop {
            let st = self.stats();
            let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            let closed = n(&st["total"]["closed"]) + n(&st["bypass"]["proxy"]["closed"]);
            let active = n(&st["total"]["active"]) + n(&st["bypass"]["proxy"]["active"]);
            let lines = n(&st["access_log"]["lines"]);
            let dropped = n(&st["total"]["access_log_dropped"])
                + n(&st["bypass"]["proxy"]["access_log_dropped"]);
            assert_eq!(dropped, 0, "no line dropped: {st}");
            assert_eq!(n(&st["access_log"]["write_errors"]), 0, "{st}");
            if active == 0 && lines == closed && closed >= closed_at_least {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "lines ({lines}) never matched connections closed ({closed}), active {active}: \
                 {st}\n{}",
                self.tern_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every line of `path`, parsed (each must be JSON).
#[track_caller]
fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The one line of `lines` for the connection from `client`.
#[track_caller]
fn line_of(lines: &[serde_json::Value], client: SocketAddr) -> &serde_json::Value {
    let found: Vec<_> = lines
        .iter()
        .filter(|l| l["client"] == client.to_string())
        .collect();
    assert_eq!(found.len(), 1, "one line from {client}: {lines:#?}");
    found[0]
}

/// A socket that counts the bytes it moves: the client's view of the ciphertext.
struct Counted {
    sock: TcpStream,
    read: u64,
    written: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.sock.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// What a client saw of its connection.
#[derive(Debug, Clone, Copy)]
struct Seen {
    local: SocketAddr,
    /// Plaintext sent and received.
    sent: u64,
    received: u64,
    /// Bytes on the wire (ciphertext for TLS).
    wire_out: u64,
    wire_in: u64,
}

fn request() -> Vec<u8> {
    format!("GET /hello HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A full TLS exchange: handshake (SNI, ALPN http/1.1), one request, the response to the end
/// (tern's close_notify), our close_notify, FIN, and the socket read to EOF.
fn tls_exchange(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Seen {
    let sock = connect_guarded(addr);
    let local = sock.local_addr().expect("local addr");
    let conn =
        ClientConnection::new(cfg, ServerName::try_from(NAME).expect("name")).expect("client");
    let mut tls = StreamOwned::new(
        conn,
        Counted {
            sock,
            read: 0,
            written: 0,
        },
    );
    let req = request();
    tls.write_all(&req).expect("write the request");
    tls.flush().expect("flush");
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .expect("the response, ended by close_notify");
    assert!(response.starts_with(b"HTTP/1.1 200"), "{response:?}");
    tls.conn.send_close_notify();
    tls.flush().expect("send close_notify");
    tls.sock.sock.shutdown(Shutdown::Write).expect("FIN");
    let mut rest = [0u8; 64];
    let n = tls.sock.read(&mut rest).expect("EOF");
    assert_eq!(n, 0, "nothing after tern's close_notify");
    Seen {
        local,
        sent: req.len() as u64,
        received: response.len() as u64,
        wire_out: tls.sock.written,
        wire_in: tls.sock.read,
    }
}

/// The same on the plain listener: the request, the response to EOF, then FIN.
fn plain_exchange(addr: SocketAddr) -> Seen {
    let mut sock = connect_guarded(addr);
    let local = sock.local_addr().expect("local addr");
    let req = request();
    sock.write_all(&req).expect("write the request");
    let mut response = Vec::new();
    sock.read_to_end(&mut response)
        .expect("the response to EOF");
    assert!(response.starts_with(b"HTTP/1.1 200"), "{response:?}");
    sock.shutdown(Shutdown::Write).expect("FIN");
    Seen {
        local,
        sent: req.len() as u64,
        received: response.len() as u64,
        wire_out: req.len() as u64,
        wire_in: response.len() as u64,
    }
}

/// Plaintext HTTP to the TLS listener: tern answers with an alert and closes.
fn not_tls_client(addr: SocketAddr) -> SocketAddr {
    let mut sock = connect_guarded(addr);
    let local = sock.local_addr().expect("local addr");
    sock.write_all(&request()).expect("write");
    let mut alert = Vec::new();
    // The alert, then tern's FIN (or a reset, if it saw more of our bytes than it read).
    let _ = sock.read_to_end(&mut alert);
    local
}

/// A TLS client that sends half a request and resets the connection (SO_LINGER 0).
fn resetting_client(addr: SocketAddr, cfg: Arc<ClientConfig>) -> SocketAddr {
    let mut tls = tls_connect(addr, &cfg);
    let local = tls.sock.local_addr().expect("local addr");
    tls.write_all(b"GET /half HT").expect("half a request");
    tls.flush().expect("flush");
    // Give tern the bytes before the reset (what it does with them is not the point).
    std::thread::sleep(Duration::from_millis(100));
    linger_zero(&tls.sock);
    drop(tls);
    local
}

#[track_caller]
fn assert_tls_line(l: &serde_json::Value, t: &Target, seen: &Seen, resumed: bool) {
    let what = format!("{l}");
    assert_eq!(l["listener"], t.addr(TLS_PORT).to_string(), "{what}");
    assert_eq!(l["path"], t.path.name(), "{what}");
    assert_eq!(l["sni"], NAME, "{what}");
    assert_eq!(l["alpn"], "http/1.1", "{what}");
    assert_eq!(l["tls_version"], "TLSv1.3", "{what}");
    assert!(
        l["cipher"].as_str().is_some_and(|c| c.starts_with("TLS_")),
        "{what}"
    );
    assert_eq!(l["resumed"], resumed, "{what}");
    assert_eq!(l["backend"], t.backend.addr().to_string(), "{what}");
    assert_eq!(l["bytes_from_client"], seen.wire_out, "{what}");
    assert_eq!(l["bytes_to_client"], seen.wire_in, "{what}");
    assert_eq!(l["bytes_to_backend"], seen.sent, "{what}");
    assert_eq!(l["bytes_from_backend"], seen.received, "{what}");
    assert_eq!(l["reason"], "graceful", "{what}");
    assert_times(l);
}

/// `time` and `start` are RFC 3339 UTC, `duration_ms` is non-negative.
#[track_caller]
fn assert_times(l: &serde_json::Value) {
    for field in ["time", "start"] {
        let s = l[field].as_str().unwrap_or_default();
        assert!(
            s.len() >= 20 && s.ends_with('Z') && s.as_bytes().get(10) == Some(&b'T'),
            "{field} in RFC 3339 UTC: {l}"
        );
    }
    assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
}

fn run(path: DataPath, tag: &str) {
    let mut t = Target::start(path, tag);
    // The readiness probe and `wait_listeners`' two connections.
    let before = t.settle(3) as usize;
    assert_eq!(read_lines(&t.log).len(), before, "lines before the test");

    // 1. rustls: SNI, ALPN, full handshake; 2. the same config again: resumed (TLS 1.3 ticket).
    let cfg = client_config(&t.cert.cert_der);
    let (tls_addr, plain_addr) = (t.addr(TLS_PORT), t.addr(PLAIN_PORT));
    let (first, second) = {
        let cfg = cfg.clone();
        t.rig.client.run(move || {
            let first = tls_exchange(tls_addr, cfg.clone());
            (first, tls_exchange(tls_addr, cfg))
        })
    };
    // 3. curl (OpenSSL), a client tern did not write.
    let resolve = format!("{NAME}:{TLS_PORT}:{}", t.rig.server_ip);
    let curl = t
        .rig
        .client_command("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(&t.cert.cert)
        .args(["--resolve", &resolve, "--max-time", "30"])
        .args(["-w", "\n%{local_ip}:%{local_port} %{size_request}"])
        .arg(format!("https://{NAME}:{TLS_PORT}/curl"))
        .output()
        .expect("run curl");
    assert_ok(&curl, "curl", &t.tern_log());
    let curl_out = String::from_utf8_lossy(&curl.stdout).into_owned();
    let (curl_local, curl_request) = curl_out
        .lines()
        .last()
        .and_then(|l| l.split_once(' '))
        .map(|(a, n)| {
            (
                a.parse::<SocketAddr>().expect("curl's local address"),
                n.parse::<u64>().expect("curl's request size"),
            )
        })
        .expect("curl's -w line");
    // 4. a client that resets; 5. the plain listener; 6. plaintext to the TLS listener.
    let (reset, plain, not_tls) = {
        let cfg = cfg.clone();
        t.rig.client.run(move || {
            (
                resetting_client(tls_addr, cfg),
                plain_exchange(plain_addr),
                not_tls_client(tls_addr),
            )
        })
    };

    let after = t.settle(before as u64 + 6) as usize;
    let lines = read_lines(&t.log);
    assert_eq!(lines.len(), after, "a line per connection closed");
    assert_eq!(after - before, 6, "six connections: {lines:#?}");
    let new = &lines[before..];
    // The readiness probe connected to :443 and closed without a word.
    let ready = t.addr(READY_PORT).to_string();
    let probes: Vec<_> = lines[..before]
        .iter()
        .filter(|l| l["listener"] == ready)
        .collect();
    assert_eq!(probes.len(), 1, "{lines:#?}");
    assert_eq!(probes[0]["reason"], "client", "{}", probes[0]);
    assert!(probes[0]["backend"].is_null(), "{}", probes[0]);

    assert_tls_line(line_of(new, first.local), &t, &first, false);
    assert_tls_line(line_of(new, second.local), &t, &second, true);

    let c = line_of(new, curl_local);
    assert_eq!(c["sni"], NAME, "{c}");
    assert_eq!(c["alpn"], "http/1.1", "{c}");
    assert_eq!(c["path"], t.path.name(), "{c}");
    assert_eq!(c["bytes_to_backend"], curl_request, "{c}");
    assert!(c["bytes_from_backend"].as_u64().unwrap_or(0) > 0, "{c}");
    // curl closes with close_notify or just FIN after reading everything; either is a
    // graceful end, never a cut.
    assert_eq!(c["reason"], "graceful", "{c}");

    let r = line_of(new, reset);
    assert_eq!(r["reason"], "client", "{r}");
    assert_eq!(r["sni"], NAME, "{r}");
    assert!(r["bytes_from_client"].as_u64().unwrap_or(0) > 0, "{r}");

    let n = line_of(new, not_tls);
    assert_eq!(n["reason"], "tls_error", "{n}");
    assert!(n["tls_version"].is_null() && n["backend"].is_null(), "{n}");

    let p = line_of(new, plain.local);
    assert_eq!(p["listener"], plain_addr.to_string(), "{p}");
    for field in ["sni", "alpn", "tls_version", "cipher", "resumed"] {
        assert!(
            p[field].is_null(),
            "{field} is null on a plain listener: {p}"
        );
    }
    assert_eq!(p["bytes_from_client"], plain.sent, "{p}");
    assert_eq!(p["bytes_to_backend"], plain.sent, "{p}");
    assert_eq!(p["bytes_from_backend"], plain.received, "{p}");
    assert_eq!(p["bytes_to_client"], plain.received, "{p}");
    assert_eq!(p["reason"], "graceful", "{p}");
    assert_eq!(p["backend"], t.backend.addr().to_string(), "{p}");
    assert_times(p);

    // Rotation: rename, reopen-log, one more connection: its line alone is in the new file.
    let rotated = t.log.with_extension("log.1");
    std::fs::rename(&t.log, &rotated).expect("rotate the log");
    let out = t.ctl("reopen-log");
    assert_ok(&out, "tern ctl reopen-log", &t.tern_log());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let last = t.rig.client.run(move || plain_exchange(plain_addr));
    assert_eq!(t.settle(after as u64 + 1) as usize, after + 1);
    assert_eq!(
        read_lines(&rotated).len(),
        after,
        "the old file is left as it was"
    );
    let fresh = read_lines(&t.log);
    assert_eq!(fresh.len(), 1, "{fresh:#?}");
    assert_eq!(fresh[0]["client"], last.local.to_string());
    assert_eq!(fresh[0]["reason"], "graceful");

    // Shutdown: a connection still open when the drain ends is cut, and its line is written
    // after the workers have stopped.
    let held = t.rig.client.run(move || connect_guarded(plain_addr));
    let held_addr = held.local_addr().expect("local addr");
    let deadline = Instant::now() + WITHIN;
    loop {
        let st = t.stats();
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        if n(&st["total"]["active"]) + n(&st["bypass"]["proxy"]["active"]) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held connection never opened: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.tern.signal(libc::SIGTERM);
    let status = t.tern.wait_exit(WITHIN);
    assert!(
        status.is_some_and(|s| s.success()),
        "tern exits 0 after the drain: {status:?}\n{}",
        t.tern_log()
    );
    drop(held);
    let fresh = read_lines(&t.log);
    assert_eq!(fresh.len(), 2, "{fresh:#?}");
    let cut = line_of(&fresh, held_addr);
    assert_eq!(cut["reason"], "shutdown", "{cut}");
    assert!(cut["backend"].is_null(), "no byte, no backend: {cut}");
}

#[test]
fn kernel_path_logs_every_connection() {
    run(DataPath::Kernel, "alogk");
}

#[test]
fn bypass_path_logs_every_connection() {
    run(DataPath::Bypass, "alogb");
}
