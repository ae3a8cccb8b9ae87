//! End-to-end tests of the session cache's fleet sync: two tern processes ("hosts") in one
//! server namespace, each listing the other as a peer with a shared key and issuing no tickets,
//! so that a session made on one can only resume on the other through the sync. Then datagrams
//! a peer must refuse: a forged one (bad MAC) and a replayed one, counted in `tern ctl stats`.
//! On the kernel path (both terns), and with the first tern's listener on the bypass path.
//! Then the same pair sharing sessions through a Redis server instead (`[session_cache] redis`),
//! TLS 1.2 and 1.3, on the kernel path and with A on the bypass path; on the kernel path Redis
//! is then stopped: handshakes go on in full, and the counters say why.

mod support;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

/// The sync addresses, on the server namespace's loopback (the namespace is the test's own).
const SYNC_A: &str = "127.0.0.1:7101";
const SYNC_B: &str = "127.0.0.1:7102";
/// A third "peer" of A: the test's socket, which captures A's datagrams to replay them.
const SYNC_SPY: &str = "127.0.0.1:7103";
/// Where tern B serves (A serves on 443, and on the bypass path also on [`BYPASS_PORT`]).
const PORT_B: u16 = 8443;
const BYPASS_PORT: u16 = 4443;
/// Bounds every wait for a datagram or a counter.
const WITHIN: Duration = Duration::from_secs(20);
/// The test's Redis, on the server namespace's loopback.
const REDIS_PORT: u16 = 6390;

/// How the pair shares sessions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Share {
    /// Each lists the other (A also the spy) as a UDP sync peer.
    Peers,
    /// Both use one Redis server the test starts.
    Redis,
}

/// A `redis-server` the test started in the server namespace; killed (by PID) on drop.
struct RedisServer {
    child: Option<std::process::Child>,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts it and waits (bounded) until it accepts connections.
    fn start(rig: &Rig, tag: &str) -> RedisServer {
        let dir = TempDir::new(&format!("{tag}-redis"));
        let child = rig
            .server_command("redis-server")
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask prereqs installs it)");
        let server = RedisServer {
            child: Some(child),
            _dir: dir,
        };
        let up = rig.server_run(|| {
            let deadline = Instant::now() + WITHIN;
            while Instant::now() < deadline {
                let addr = SocketAddr::from(([127, 0, 0, 1], REDIS_PORT));
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        assert!(up, "redis-server did not listen within {WITHIN:?}");
        server
    }

    /// Kills it (SIGKILL, by PID) and reaps it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One tern of the pair.
struct Host {
    tern: TernProcess,
    control: PathBuf,
    /// Where the clients connect to.
    addr: SocketAddr,
}

impl Host {
    /// `tern ctl stats`, parsed.
    #[track_caller]
    fn stats(&self) -> serde_json::Value {
        let out = Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.control)
            .arg("stats")
            .output()
            .expect("run tern ctl");
        assert!(
            out.status.success(),
            "tern ctl stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats is JSON")
    }

    /// `tern ctl stats`' `session_cache` object.
    #[track_caller]
    fn cache(&self) -> serde_json::Value {
        self.stats()["session_cache"].clone()
    }

    #[track_caller]
    fn counter(&self, name: &str) -> u64 {
        let c = self.cache();
        c[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no session_cache.{name} in {c}"))
    }

    /// Polls until `name` reaches `at_least`, for at most [`WITHIN`].
    #[track_caller]
    fn wait_counter(&self, name: &str, at_least: u64) {
        let deadline = Instant::now() + WITHIN;
        loop {
            let now = self.counter(name);
            if now >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "session_cache.{name} is {now}, expected at least {at_least}\n{}",
                self.tern.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The two terns, their rig and the spy socket.
struct Pair {
    a: Host,
    b: Host,
    /// Bound on the server side at [`SYNC_SPY`]; A sends it every update.
    spy: UdpSocket,
    dir: TempDir,
    _backend: Backend,
    redis: Option<RedisServer>,
    /// Declared last: dropped after the terns have been killed.
    rig: Rig,
}

#[allow(clippy::too_many_arguments)]
fn config(
    cert: &CertFiles,
    control: &Path,
    listeners: &str,
    extra: &str,
    backend: SocketAddr,
    share: Share,
    sync: (&str, &[&str]),
    key: &Path,
) -> String {
    let session_cache = match share {
        Share::Peers => {
            let peers: Vec<String> = sync.1.iter().map(|p| format!("\"{p}\"")).collect();
            format!(
                "listen = \"{}\"\npeers = [{}]\nkey = \"{}\"\n",
                sync.0,
                peers.join(", "),
                key.display()
            )
        }
        // A generous timeout: the machine running the tests may be loaded.
        Share::Redis => {
            format!("redis = \"redis://127.0.0.1:{REDIS_PORT}\"\ntimeout_ms = 2000\n")
        }
    };
    format!(
        "{listeners}\n\
         [[certificate]]\ncert = \"{cert}\"\nkey = \"{certkey}\"\ndefault = true\n\n\
         [tls]\nalpn = [\"http/1.1\"]\ntickets = false\n\n\
         [backend]\nservers = [\"{backend}\"]\nconnect_timeout_ms = 2000\n\n\
         [workers]\ncount = 2\n\n[control]\nsocket = \"{control}\"\n\n\
         [session_cache]\n{session_cache}\n{extra}",
        cert = cert.cert.display(),
        certkey = cert.key.display(),
        control = control.display(),
    )
}

impl Pair {
    /// `path` is where A's listener under test runs: "kernel" or "bypass"; B is on the kernel
    /// path (a second XDP program on the same interface is not possible, and B's traffic passes
    /// A's program to the kernel).
    fn start(path: &str, tag: &str, share: Share) -> Pair {
        let rig = Rig::isolated(tag, if path == "bypass" { 2 } else { 1 });
        let dir = TempDir::new(tag);
        let backend = Backend::demo_http(server_listener(&rig));
        let cert = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        let key = dir.join("sync.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").expect("write key");
        let spy = rig.server_run(|| UdpSocket::bind(SYNC_SPY).expect("bind spy socket"));
        spy.set_read_timeout(Some(WITHIN)).expect("timeout");
        let redis = (share == Share::Redis).then(|| RedisServer::start(&rig, tag));

        let (a_listeners, a_extra, a_addr) = if path == "bypass" {
            (
                format!(
                    "[[listener]]\naddress = \"{main}\"\ninterface = \"{iface}\"\n\n\
                     [[listener]]\naddress = \"{bypass}\"\nmode = \"bypass\"\n\
                     interface = \"{iface}\"\n",
                    main = rig.server_addr(443),
                    bypass = rig.server_addr(BYPASS_PORT),
                    iface = rig.server_if,
                ),
                "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n",
                rig.server_addr(BYPASS_PORT),
            )
        } else {
            (
                format!("[[listener]]\naddress = \"{}\"\n", rig.server_addr(443)),
                "",
                rig.server_addr(443),
            )
        };
        let control_a = dir.join("a.sock");
        let control_b = dir.join("b.sock");
        let config_a = config(
            &cert,
            &control_a,
            &a_listeners,
            a_extra,
            backend.addr(),
            share,
            (SYNC_A, &[SYNC_B, SYNC_SPY]),
            &key,
        );
        let config_b = config(
            &cert,
            &control_b,
            &format!("[[listener]]\naddress = \"{}\"\n", rig.server_addr(PORT_B)),
            "",
            backend.addr(),
            share,
            (SYNC_B, &[SYNC_A]),
            &key,
        );
        let mut tern_a = TernProcess::start(&config_a, rig.server_netns());
        tern_a.wait_ready(rig.server_addr(443));
        let mut tern_b = TernProcess::start(&config_b, rig.server_netns());
        tern_b.wait_ready(rig.server_addr(PORT_B));
        Pair {
            a: Host {
                tern: tern_a,
                control: control_a,
                addr: a_addr,
            },
            b: Host {
                tern: tern_b,
                control: control_b,
                addr: rig.server_addr(PORT_B),
            },
            spy,
            dir,
            _backend: backend,
            redis,
            rig,
        }
    }

    /// One `openssl s_client` request to `addr`; returns its stdout.
    fn openssl(&self, addr: SocketAddr, tls_flag: &str, extra: &[&str]) -> String {
        let mut child = self
            .rig
            .client_command("timeout")
            .args(["60", "openssl", "s_client", "-connect"])
            .arg(addr.to_string())
            .args(["-servername", NAME, tls_flag, "-ign_eof"])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        // Connection: close: the backend closes, tern sends close_notify, and s_client exits
        // after the TLS 1.3 session tickets have arrived.
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"GET / HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n")
            .expect("write request");
        let out = child.wait_with_output().expect("openssl");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A full handshake on `from`, then the same session offered to `to`: it must resume
    /// there, which only the sync can make happen (no tickets, separate processes).
    fn resumes_across(&self, from: &Host, to: &Host, tls_flag: &str, name: &str) {
        let received_counter = if self.redis.is_some() {
            "redis_received"
        } else {
            "sync_received"
        };
        let sess = self.dir.join(format!("{name}.pem"));
        let sess = sess.to_str().expect("path");
        let stored = from.counter("stored");
        let received = to.counter(received_counter);
        let first = self.openssl(from.addr, tls_flag, &["-sess_out", sess]);
        assert!(
            first.contains("New,"),
            "{name}: first handshake is new: {first}"
        );
        assert!(first.contains("HTTP/1.1 200"), "{name}: served: {first}");
        // Every session `from` stored has reached `to` before the client tries it there.
        let made = from.counter("stored") - stored;
        assert!(made >= 1, "{name}: the first handshake stored a session");
        to.wait_counter(received_counter, received + made);
        let hits = to.counter("hits_l2");
        let second = self.openssl(to.addr, tls_flag, &["-sess_in", sess]);
        assert!(
            second.contains("Reused,"),
            "{name}: resumed on the other host: {second}\nA:\n{}\nB:\n{}",
            self.a.tern.stderr_text(),
            self.b.tern.stderr_text()
        );
        assert!(second.contains("HTTP/1.1 200"), "{name}: served: {second}");
        assert!(
            to.counter("hits_l2") > hits,
            "{name}: answered by the L2 the sync fed"
        );
    }

    /// Receives A's next update on the spy socket (bounded by [`WITHIN`]).
    fn captured(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        let (n, _) = self.spy.recv_from(&mut buf).expect("a datagram from A");
        buf.truncate(n);
        buf
    }
}

/// Both directions, TLS 1.2 session ids and TLS 1.3 stateful resumption; then a forged and a
/// replayed datagram sent to B are refused and counted.
fn sync_case(path: &str, tag: &str) {
    let p = Pair::start(path, tag, Share::Peers);
    p.resumes_across(&p.a, &p.b, "-tls1_2", "tls12-a-to-b");
    // The spy got A's datagram for that session (and maybe others): keep the first.
    let datagram = p.captured();
    assert!(datagram.starts_with(b"TSC1"), "a sync datagram");
    p.resumes_across(&p.b, &p.a, "-tls1_2", "tls12-b-to-a");
    p.resumes_across(&p.a, &p.b, "-tls1_3", "tls13-a-to-b");
    p.resumes_across(&p.b, &p.a, "-tls1_3", "tls13-b-to-a");

    let sender = p
        .rig
        .server_run(|| UdpSocket::bind("127.0.0.1:0").expect("bind"));
    let b_sync: SocketAddr = SYNC_B.parse().expect("addr");

    // Forged: one bit of the session flipped, so the MAC no longer verifies.
    let mac_refused = p.b.counter("sync_refused_mac");
    let mut forged = datagram.clone();
    let at = forged.len() - 40;
    forged[at] ^= 1;
    sender.send_to(&forged, b_sync).expect("send forged");
    p.b.wait_counter("sync_refused_mac", mac_refused + 1);

    // Replayed: B already accepted this datagram from A; both copies are refused.
    let replay_refused = p.b.counter("sync_refused_replay");
    let received = p.b.counter("sync_received");
    sender.send_to(&datagram, b_sync).expect("send replay");
    sender.send_to(&datagram, b_sync).expect("send replay");
    p.b.wait_counter("sync_refused_replay", replay_refused + 2);
    assert_eq!(
        p.b.counter("sync_received"),
        received,
        "a replayed datagram is not applied"
    );

    if path == "bypass" {
        // A's connections above were the bypass path's, not the kernel listener's.
        let st = p.a.stats();
        let closed = st["bypass"]["proxy"]["closed"].as_u64().unwrap_or(0);
        assert!(closed >= 4, "A served on the bypass path: {st}");
    }
}

#[test]
fn kernel_sessions_resume_on_the_peer_and_bad_datagrams_are_refused() {
    sync_case("kernel", "scachek");
}

#[test]
fn bypass_sessions_resume_on_the_peer_and_bad_datagrams_are_refused() {
    sync_case("bypass", "scacheb");
}

/// Through Redis, both directions: TLS 1.2 session ids and TLS 1.3 stateful resumption (the
/// pair issues no tickets, so a TLS 1.3 "ticket" is an id into the cache Redis fed).
fn redis_resumes(p: &Pair) {
    for h in [&p.a, &p.b] {
        h.wait_counter("redis_subscriptions", 1);
    }
    p.resumes_across(&p.a, &p.b, "-tls1_2", "redis-tls12-a-to-b");
    p.resumes_across(&p.b, &p.a, "-tls1_2", "redis-tls12-b-to-a");
    p.resumes_across(&p.a, &p.b, "-tls1_3", "redis-tls13-a-to-b");
    p.resumes_across(&p.b, &p.a, "-tls1_3", "redis-tls13-b-to-a");
    assert!(p.a.counter("redis_sent") >= 2 && p.b.counter("redis_sent") >= 2);
}

/// Two terns sharing sessions through Redis: sessions made on one resume on the other. Then
/// Redis is killed: new handshakes on both still succeed (in full), a session already mirrored
/// still resumes (lookups are local), and the failures are counted, not shown to clients.
#[test]
fn redis_shares_sessions_and_its_loss_costs_only_full_handshakes() {
    let mut p = Pair::start("kernel", "scacher", Share::Redis);
    redis_resumes(&p);

    // A session B mirrored before Redis goes away.
    let kept = p.dir.join("kept.pem");
    let kept = kept.to_str().expect("path");
    let received = p.b.counter("redis_received");
    let first = p.openssl(p.a.addr, "-tls1_2", &["-sess_out", kept]);
    assert!(
        first.contains("New,") && first.contains("HTTP/1.1 200"),
        "{first}"
    );
    p.b.wait_counter("redis_received", received + 1);

    let failures = |h: &Host| {
        let c = h.cache();
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        n("redis_errors") + n("redis_timeouts")
    };
    let before = [failures(&p.a), failures(&p.b)];
    p.redis.as_mut().expect("redis").stop();

    for (i, h) in [&p.a, &p.b].into_iter().enumerate() {
        let out = p.openssl(h.addr, "-tls1_2", &[]);
        assert!(
            out.contains("New,") && out.contains("HTTP/1.1 200"),
            "host {i}: a full handshake without Redis: {out}\n{}",
            h.tern.stderr_text()
        );
        // The subscriber sees the connection close; the writer fails on its next update.
        let deadline = Instant::now() + WITHIN;
        while failures(h) <= before[i] {
            assert!(
                Instant::now() < deadline,
                "host {i}: Redis's loss is counted: {}",
                h.cache()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let again = p.openssl(p.b.addr, "-tls1_2", &["-sess_in", kept]);
    assert!(
        again.contains("Reused,"),
        "a mirrored session resumes without Redis: {again}"
    );
}

/// As above with A's listener on the bypass path (B on the kernel path): the bypass path's
/// sessions reach Redis and the kernel path's come back from it.
#[test]
fn bypass_sessions_resume_on_the_peer_through_redis() {
    let p = Pair::start("bypass", "scacherb", Share::Redis);
    redis_resumes(&p);
    // A's connections above were the bypass path's, not the kernel listener's.
    let st = p.a.stats();
    let closed = st["bypass"]["proxy"]["closed"].as_u64().unwrap_or(0);
    assert!(closed >= 4, "A served on the bypass path: {st}");
}
