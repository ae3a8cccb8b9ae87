//! End-to-end tests of the session cache's fleet sync: two tern processes ("hosts") A and B,
//! each in the server namespace of its own rig (its own clients, backend and interface), the
//! two server namespaces joined by a veth link ([`NsLink`]) that carries the sync: each lists
//! the other's link address as a peer with a shared key and issues no tickets, so that a
//! session made on one can only resume on the other through the sync. Then datagrams a peer
//! must refuse, sent over the link: a forged one (bad MAC) and a replayed one, counted in
//! `tern ctl stats`. On the kernel path (both terns), and with both terns' listeners on the
//! bypass path (each rig has its own interface for XDP; the link is not XDP's).
//! Then the same pair sharing sessions through a Redis server instead (`[session_cache] redis`),
//! run in A's namespace on A's link address, so B reaches it over the link; TLS 1.2 and 1.3, on
//! the kernel path and on the bypass path; on the kernel path Redis is then stopped: handshakes
//! go on in full, and the counters say why.

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, NsLink, Rig, TempDir, TernProcess};

/// The sync ports, on each host's link address.
const SYNC_PORT_A: u16 = 7101;
const SYNC_PORT_B: u16 = 7102;
/// A third "peer" of A, on B's link address (a host on the wire): the test's socket, which
/// captures A's datagrams to replay them.
const SYNC_PORT_SPY: u16 = 7103;
/// Each host serves on 443 of its rig's server address, and on the bypass path also on
/// [`BYPASS_PORT`] (the listener under test).
const BYPASS_PORT: u16 = 4443;
/// Bounds every wait for a datagram or a counter.
const WITHIN: Duration = Duration::from_secs(20);
/// The test's Redis, on A's link address.
const REDIS_PORT: u16 = 6390;

/// How the pair shares sessions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Share {
    /// Each lists the other (A also the spy) as a UDP sync peer.
    Peers,
    /// Both use one Redis server the test starts.
    Redis,
}

/// A `redis-server` the test started in A's server namespace; killed (by PID) on drop.
struct RedisServer {
    child: Option<std::process::Child>,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts it on `bind` in `rig`'s server namespace and waits (bounded) until it accepts
    /// connections there.
    fn start(rig: &Rig, bind: Ipv4Addr, tag: &str) -> RedisServer {
        let dir = TempDir::new(&format!("{tag}-redis"));
        let child = rig
            .server_command("redis-server")
            .args([
                "--port",
                &REDIS_PORT.to_string(),
                "--bind",
                &bind.to_string(),
            ])
            // No password: protected mode would refuse B, which comes from another address.
            .args(["--protected-mode", "no"])
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
        let up = rig.server_run(move || {
            let deadline = Instant::now() + WITHIN;
            while Instant::now() < deadline {
                let addr = SocketAddr::from((bind, REDIS_PORT));
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
    /// The name of its rig's client namespace, where its clients run.
    client_ns: String,
    _backend: Backend,
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

/// The two terns, their rigs, the link between them and the spy socket.
struct Pair {
    a: Host,
    b: Host,
    /// Bound in B's namespace at B's link address, port [`SYNC_PORT_SPY`]; A sends it every
    /// update.
    spy: UdpSocket,
    dir: TempDir,
    redis: Option<RedisServer>,
    /// Joins `rig_a`'s server namespace (local end, A's address) to `rig_b`'s.
    link: NsLink,
    /// Declared last: dropped after the terns have been killed and the link deleted.
    rig_a: Rig,
    _rig_b: Rig,
}

/// The `[session_cache]` body: UDP sync on `listen` to `peers`, or the Redis at `redis`.
fn session_cache(
    share: Share,
    listen: SocketAddr,
    peers: &[SocketAddr],
    key: &Path,
    redis: Ipv4Addr,
) -> String {
    match share {
        Share::Peers => {
            let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
            format!(
                "listen = \"{listen}\"\npeers = [{}]\nkey = \"{}\"\n",
                peers.join(", "),
                key.display()
            )
        }
        // A generous timeout: the machine running the tests may be loaded.
        Share::Redis => {
            format!("redis = \"redis://{redis}:{REDIS_PORT}\"\ntimeout_ms = 2000\n")
        }
    }
}

fn config(
    cert: &CertFiles,
    control: &Path,
    listeners: &str,
    extra: &str,
    backend: SocketAddr,
    session_cache: &str,
) -> String {
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

/// One host's listeners on its own rig: the kernel listener on 443 and, on the bypass path, the
/// bypass listener on [`BYPASS_PORT`] of the same interface (the one the clients use); the
/// `[xdp]` section that goes with them; where the clients connect.
fn listeners(rig: &Rig, path: &str) -> (String, &'static str, SocketAddr) {
    if path == "bypass" {
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
    }
}

impl Pair {
    /// `path` is where both terns' listeners under test run: "kernel" or "bypass" (each rig
    /// has its own server interface for its XDP program; sync and Redis use the link).
    fn start(path: &str, tag: &str, share: Share) -> Pair {
        let queues = if path == "bypass" { 2 } else { 1 };
        let rig_a = Rig::isolated(&format!("{tag}-a"), queues);
        let rig_b = Rig::isolated(&format!("{tag}-b"), queues);
        let (server_a, server_b) = match (rig_a.server_netns(), rig_b.server_netns()) {
            (Some(a), Some(b)) => (a, b),
            _ => unreachable!("isolated rigs have server namespaces"),
        };
        let link = server_a.link_to(server_b);
        let (ip_a, ip_b) = link.addrs();
        let at = |ip: Ipv4Addr, port: u16| SocketAddr::V4(SocketAddrV4::new(ip, port));
        let (sync_a, sync_b, sync_spy) = (
            at(ip_a, SYNC_PORT_A),
            at(ip_b, SYNC_PORT_B),
            at(ip_b, SYNC_PORT_SPY),
        );
        let dir = TempDir::new(tag);
        let cert = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        let key = dir.join("sync.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").expect("write key");
        let spy = rig_b.server_run(move || UdpSocket::bind(sync_spy).expect("bind spy socket"));
        spy.set_read_timeout(Some(WITHIN)).expect("timeout");
        let redis = (share == Share::Redis).then(|| RedisServer::start(&rig_a, ip_a, tag));

        let start_host = |rig: &Rig, name: &str, sync: SocketAddr, peers: &[SocketAddr]| {
            let backend = Backend::demo_http(server_listener(rig));
            let (listeners, extra, addr) = listeners(rig, path);
            let control = dir.join(format!("{name}.sock"));
            let cache = session_cache(share, sync, peers, &key, ip_a);
            let text = config(&cert, &control, &listeners, extra, backend.addr(), &cache);
            let mut tern = TernProcess::start(&text, rig.server_netns());
            tern.wait_ready(rig.server_addr(443));
            Host {
                tern,
                control,
                addr,
                client_ns: rig.client.name.clone(),
                _backend: backend,
            }
        };
        let a = start_host(&rig_a, "a", sync_a, &[sync_b, sync_spy]);
        let b = start_host(&rig_b, "b", sync_b, &[sync_a]);
        Pair {
            a,
            b,
            spy,
            dir,
            redis,
            link,
            rig_a,
            _rig_b: rig_b,
        }
    }

    /// One `openssl s_client` request to `host`, from its rig's client namespace; returns its
    /// stdout.
    fn openssl(&self, host: &Host, tls_flag: &str, extra: &[&str]) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &host.client_ns])
            .args(["timeout", "60", "openssl", "s_client", "-connect"])
            .arg(host.addr.to_string())
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
        let first = self.openssl(from, tls_flag, &["-sess_out", sess]);
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
        let second = self.openssl(to, tls_flag, &["-sess_in", sess]);
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

    /// Both hosts' connections (4 each at least) were the bypass path's, not the kernel
    /// listener's.
    fn served_on_the_bypass_path(&self) {
        for (name, h) in [("A", &self.a), ("B", &self.b)] {
            let st = h.stats();
            let closed = st["bypass"]["proxy"]["closed"].as_u64().unwrap_or(0);
            assert!(closed >= 4, "{name} served on the bypass path: {st}");
        }
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

    // Sent from A's namespace over the link, as a host on the wire would.
    let ip_a = p.link.local_ip;
    let sender = p
        .rig_a
        .server_run(move || UdpSocket::bind((ip_a, 0)).expect("bind"));
    let b_sync = SocketAddr::V4(SocketAddrV4::new(p.link.remote_ip, SYNC_PORT_B));

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
        p.served_on_the_bypass_path();
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
    let first = p.openssl(&p.a, "-tls1_2", &["-sess_out", kept]);
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
        let out = p.openssl(h, "-tls1_2", &[]);
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
    let again = p.openssl(&p.b, "-tls1_2", &["-sess_in", kept]);
    assert!(
        again.contains("Reused,"),
        "a mirrored session resumes without Redis: {again}"
    );
}

/// As above with both listeners on the bypass path: the bypass path's sessions reach Redis over
/// the link and come back from it on the other host.
#[test]
fn bypass_sessions_resume_on_the_peer_through_redis() {
    let p = Pair::start("bypass", "scacherb", Share::Redis);
    redis_resumes(&p);
    p.served_on_the_bypass_path();
}
