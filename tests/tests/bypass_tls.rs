//! End-to-end tests of TLS on the bypass path: a `mode = "bypass"` listener with `tls = true`
//! (the default), served by the bypass workers' L4 proxy over tern's own TCP stack with a
//! rustls `proxy::Session`, against Linux's TCP and rustls clients over the veth rig. The XDP
//! program steers the listener's frames into AF_XDP sockets; the kernel never sees them.
//!
//! What is checked: the handshake (TLS 1.3, ALPN, SNI) and byte-exact echo, concurrency, clean
//! closes without RST, bulk transfer with and without loss, back pressure from a client that
//! stops reading, resumption across the two workers (RFC 8446 §2.2 tickets,
//! RFC 5246 §7.3 session ids; one `ServerConfig` shared by every worker), a TLS alert for a
//! broken peer (RFC 8446 §6), the handshake timeout, PROXY v1 and v2 with its TLS fields
//! (haproxy's `proxy-protocol.txt` §2.1, §2.2.5–2.2.6), `connect = "eager"` with a
//! server-speaks-first backend, a dead backend, and that client FIN / RST free everything.
//! Not here: plain L4 on the bypass path (`bypass_tcp.rs`), kernel mode (`kernel_mode.rs`).
//!
//! Flows are steered to a worker by `flow_hash` of the 4-tuple (tern-common), so a test that
//! needs a particular worker binds the client's source port accordingly.
//!
//! Every test has its own rig and tern (named by the rig's tag), bounded in time by read
//! timeouts and `wait_stats`; nothing is timed except as a failure guard, and the back-pressure
//! test's notion of "stalled" (the socket took no byte for 1 s).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use support::*;
use tern_tests::backend::{pattern_byte, pattern_fill, Backend, ProxyExpect, ProxyVersion};
use tern_tests::rig::{Rig, TempDir};

/// The bypass TLS listener's port (the kernel TLS listener is on 443).
const PORT: u16 = 4443;
/// Bypass workers (and kernel workers): the stack's config says 2.
const WORKERS: u32 = 2;
/// A second certificate, chosen by SNI.
const OTHER: &str = "other.test";

/// How [`start`] configures tern's backend side and the rest.
struct Opts<'a> {
    backends: Vec<SocketAddr>,
    /// `backend.proxy_protocol`.
    proxy_protocol: &'a str,
    /// `backend.connect`.
    connect: &'a str,
    /// Appended to the configuration (whole tables).
    toml_extra: &'a str,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            backends: Vec::new(),
            proxy_protocol: "none",
            connect: "first-byte",
            toml_extra: "",
        }
    }
}

/// Starts tern on `rig` with the kernel TLS listener on :443 (readiness; XDP attached to the
/// server veth) and the bypass TLS listener on :4443, 2 workers, two certificates ([`NAME`],
/// the default, and [`OTHER`], stem "other"), ALPN `http/1.1`.
fn start(rig: Rig, dir: TempDir, opts: Opts<'_>) -> Stack {
    let listener_extra = format!(
        "interface = \"{iface}\"\n\n[[listener]]\naddress = \"{bypass}\"\nmode = \"bypass\"\n\
         interface = \"{iface}\"\ntls = true\n",
        iface = rig.server_if,
        bypass = rig.server_addr(PORT),
    );
    let toml_extra = format!(
        "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n\n\
         [limits]\nmax_connections_per_worker = 1024\n\n{}\n",
        opts.toml_extra
    );
    Stack::start(
        rig,
        dir,
        StackOptions {
            backends: opts.backends,
            proxy_protocol: opts.proxy_protocol,
            connect: opts.connect,
            listener_extra: &listener_extra,
            toml_extra: &toml_extra,
            extra_certs: &[("other", &[OTHER])],
        },
    )
}

/// A rig (2 queues) with an echo backend on the server side's loopback and tern in front.
fn echo_stack(tag: &str, toml_extra: &str) -> (Stack, Backend) {
    let (rig, dir) = (Rig::isolated(tag, 2), TempDir::new(tag));
    let backend = Backend::echo(server_listener(&rig));
    let s = start(
        rig,
        dir,
        Opts {
            backends: vec![backend.addr()],
            toml_extra,
            ..Opts::default()
        },
    );
    (s, backend)
}

fn tls_addr(s: &Stack) -> SocketAddr {
    s.rig.server_addr(PORT)
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a counter: {v}"))
}

/// A `bypass.proxy` total.
fn proxy(st: &serde_json::Value, name: &str) -> u64 {
    n(&st["bypass"]["proxy"][name])
}

/// A `bypass.tcp` total.
fn tcp(st: &serde_json::Value, name: &str) -> u64 {
    n(&st["bypass"]["tcp"][name])
}

/// Bypass worker `w`'s proxy counter `name`.
fn worker_proxy(st: &serde_json::Value, w: u32, name: &str) -> u64 {
    let workers = st["bypass"]["workers"].as_array().expect("bypass workers");
    let entry = workers
        .iter()
        .find(|e| e["worker"] == w)
        .unwrap_or_else(|| panic!("no bypass worker {w}: {st}"));
    n(&entry["proxy"][name])
}

/// Every connection is gone from tern's stack and proxy.
fn settled(st: &serde_json::Value) -> bool {
    tcp(st, "connections") == 0 && proxy(st, "active") == 0
}

/// A client configuration trusting both of the stack's certificates, offering `http/1.1`.
fn both_roots(s: &Stack) -> Arc<ClientConfig> {
    let other = CertificateDer::from_pem_file(s.dir.join("other.pem")).expect("other.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(s.cert.cert_der.clone()))
        .expect("add default root");
    roots.add(other).expect("add other root");
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Ends our side cleanly (close_notify, then FIN) and reads to the server's close: everything
/// the echo backend still had, then tern's close_notify (rustls reports `Ok(0)` only for a
/// close_notify; a bare FIN would be `UnexpectedEof`).
///
/// The close_notify and the FIN leave in one segment (TCP_CORK holds the record until the FIN
/// joins it): tern reacts to the close_notify alone (it closes the backend, whose FIN comes back
/// as tern's close_notify + FIN), so were our FIN delayed — this thread preempted between the
/// two calls on a busy 2-core machine — tern would close first and keep the TCB in TIME-WAIT
/// for 60 s, which is correct TCP but would hide whether anything else stayed behind.
#[track_caller]
fn close_and_drain(tls: &mut Tls) -> Vec<u8> {
    set_cork(&tls.sock);
    tls.conn.send_close_notify();
    tls.flush().expect("flush close_notify");
    tls.sock.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .expect("the server's close_notify, then EOF");
    rest
}

/// The bytes of a ClientHello for [`NAME`] (one or more TLS records).
fn client_hello(cfg: &Arc<ClientConfig>) -> Vec<u8> {
    let mut conn =
        ClientConnection::new(cfg.clone(), ServerName::try_from(NAME).expect("name")).expect("c");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("ClientHello");
    }
    assert_eq!(out[0], 0x16, "a handshake record");
    out
}

/// Sets TCP_CORK: partial segments wait until uncorked or until shutdown(2) pushes them out
/// together with the FIN.
fn set_cork(c: &TcpStream) {
    SockRef::from(c).set_tcp_cork(true).expect("TCP_CORK");
}

/// A TCP connection from `local` (a chosen source port) to `remote`. The connect is bounded by
/// the socket's send timeout (Linux applies SO_SNDTIMEO to a blocking connect).
fn connect_from(local: SocketAddrV4, remote: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    sock.bind(&SockAddr::from(local))?;
    sock.connect(&SockAddr::from(remote))?;
    Ok(sock.into())
}

/// The running tern's steering key (random per start): read as root from its XDP program's
/// config map, found by the map ids `tern ctl stats` lists.
fn steer_key(s: &Stack) -> [u8; 16] {
    let st = s.stats();
    let ids = st["xdp"][0]["map_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no XDP map ids in {st}"));
    for id in ids.iter().filter_map(|v| v.as_u64()) {
        let Ok(data) = aya::maps::MapData::from_id(id as u32) else {
            continue;
        };
        let is_config = data
            .info()
            .ok()
            .and_then(|i| i.name_as_str().map(|n| n == tern_common::CONFIG_MAP))
            .unwrap_or(false);
        if !is_config {
            continue;
        }
        let map = aya::maps::Map::from_map_data(data).expect("config map");
        let array: aya::maps::Array<_, tern_common::XdpConfig> =
            aya::maps::Array::try_from(map).expect("config map layout");
        return array
            .get(&tern_common::CONFIG_INDEX, 0)
            .expect("read config")
            .steer_key;
    }
    panic!("no {} among {ids:?}", tern_common::CONFIG_MAP);
}

/// The bypass worker the XDP program steers the flow `client → server` to (the same hash and
/// rule as the program, from tern-common), under the running tern's `key`.
fn worker_of(key: &[u8; 16], client: SocketAddrV4, server: SocketAddrV4) -> u32 {
    let hash = tern_common::flow_hash(
        key,
        &tern_common::ipv4_mapped(client.ip().octets()),
        &tern_common::ipv4_mapped(server.ip().octets()),
        client.port(),
        server.port(),
    );
    tern_common::flow_worker(hash, WORKERS)
}

/// A TCP connection to `server` from a source port (at or after `*next_port`, which advances)
/// whose flow the XDP program steers to bypass worker `worker`.
#[track_caller]
fn connect_on_worker(
    key: &[u8; 16],
    client_ip: std::net::Ipv4Addr,
    server: SocketAddrV4,
    worker: u32,
    next_port: &mut u16,
) -> TcpStream {
    for _ in 0..1000 {
        let port = *next_port;
        *next_port += 1;
        let local = SocketAddrV4::new(client_ip, port);
        if worker_of(key, local, server) != worker {
            continue;
        }
        let sock = connect_from(local, server)
            .unwrap_or_else(|e| panic!("connect {local} -> {server}: {e}"));
        return sock;
    }
    panic!("no source port near {next_port} hashes to worker {worker}");
}

/// Consecutive 100 ms polls without the socket taking a byte after which a writer whose peer
/// does not read counts as stalled (the back-pressure test).
const STALLED_POLLS: u32 = 10;

/// Sends `total` pattern bytes through one TLS connection while reading the echo back, on one
/// thread (a rustls connection is one state machine): a non-blocking socket and poll(2). Then
/// close_notify + FIN, and the server's close_notify + EOF are expected after the last byte.
/// Every byte is checked. Bounded by `guard`.
///
/// With `stall_first`, nothing is read at first: the writer must stall before it has sent
/// everything (back pressure from the client's window through tern, the echo backend and back to
/// tern's window for our writes); then reading starts and everything must still arrive. Returns
/// how many plaintext bytes had been sent when the writer stalled.
fn tls_bulk_echo(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    total: usize,
    guard: Duration,
    stall_first: bool,
) -> Option<usize> {
    let sock = connect_guarded(addr);
    if stall_first {
        // Small client buffers, so the stall comes after megabytes rather than tens of them.
        set_buffers(&sock, 64 * 1024);
    }
    let mut tls = tls_handshake(sock, cfg, NAME);
    tls.sock.set_nonblocking(true).expect("non-blocking");
    let Tls { conn, sock, .. } = &mut tls;
    let deadline = Instant::now() + guard;
    let mut plain = vec![0u8; 16 * 1024];
    let mut back = vec![0u8; 64 * 1024];
    let (mut sent, mut got) = (0usize, 0usize);
    let mut close_notify_queued = false;
    let mut fin_sent = false;
    let mut tcp_eof = false;
    let mut paused = stall_first;
    let mut stalled_at = None;
    let mut idle_polls = 0u32;
    loop {
        assert!(
            Instant::now() < deadline,
            "bulk echo stalled: {sent} of {total} bytes sent, {got} back"
        );
        // Queue plaintext while rustls takes it, and write TLS records while the socket does.
        let mut blocked = false;
        let sent_before = sent;
        loop {
            while sent < total {
                let k = plain.len().min(total - sent);
                pattern_fill(sent as u64, &mut plain[..k]);
                let taken = conn.writer().write(&plain[..k]).expect("queue plaintext");
                if taken == 0 {
                    break;
                }
                sent += taken;
            }
            assert!(
                !(paused && sent == total),
                "no back pressure: all {total} bytes were taken while the client read nothing"
            );
            if sent == total && !close_notify_queued {
                // One segment for the last record, close_notify and FIN (see close_and_drain).
                set_cork(sock);
                conn.send_close_notify();
                close_notify_queued = true;
            }
            if !conn.wants_write() {
                break;
            }
            match conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                Err(e) => panic!("writing TLS after {sent} bytes: {e}"),
            }
        }
        if close_notify_queued && !conn.wants_write() && !fin_sent {
            sock.shutdown(Shutdown::Write).expect("half-close");
            fin_sent = true;
        }
        if paused {
            if sent > sent_before {
                idle_polls = 0;
            } else {
                idle_polls += 1;
            }
            if idle_polls >= STALLED_POLLS {
                stalled_at = Some(sent);
                paused = false;
            } else {
                wait_fd(sock, libc::POLLOUT);
                continue;
            }
        }
        // Read what arrived, and check the plaintext.
        loop {
            match conn.read_tls(sock) {
                Ok(0) => tcp_eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading TLS after {got} bytes back: {e}"),
            }
            conn.process_new_packets()
                .unwrap_or_else(|e| panic!("TLS error after {got} bytes back: {e}"));
            let mut closed = false;
            loop {
                match conn.reader().read(&mut back) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(k) => {
                        for (i, &b) in back[..k].iter().enumerate() {
                            let at = (got + i) as u64;
                            assert_eq!(b, pattern_byte(at), "byte {at} of the echo differs");
                        }
                        got += k;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("after {got} bytes back (no close_notify?): {e}"),
                }
            }
            if closed {
                assert_eq!(got, total, "every byte came back before close_notify");
                assert!(fin_sent, "the server closed before we did");
                return stalled_at;
            }
            if tcp_eof {
                break;
            }
        }
        assert!(
            !tcp_eof,
            "EOF without close_notify after {got} of {total} bytes"
        );
        wait_fd(
            sock,
            if blocked {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            },
        );
    }
}

/// poll(2) on one socket for `events`, for at most 100 ms.
fn wait_fd(sock: &TcpStream, events: libc::c_short) {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
}

/// Caps a socket's receive and send buffers (before connecting, so the window scale fits).
fn set_buffers(sock: &TcpStream, bytes: usize) {
    let sock = SockRef::from(sock);
    sock.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    sock.set_send_buffer_size(bytes).expect("SO_SNDBUF");
}

/// The handshake on the bypass listener: TLS 1.3, ALPN, the certificate chosen by SNI; byte-exact
/// echoes of several sizes; a clean close both ways; counted in `bypass.proxy`; and the kernel
/// TLS listener of the same tern still serves.
#[test]
fn tls_echo_through_the_bypass_listener() {
    let (s, _backend) = echo_stack("tlsecho", "");
    let addr = tls_addr(&s);
    let cfg = both_roots(&s);
    let default_der = s.cert.cert_der.clone();
    let other_der = CertificateDer::from_pem_file(s.dir.join("other.pem"))
        .expect("other.pem")
        .to_vec();
    s.rig.client.run(move || {
        let mut tls = tls_handshake(connect_guarded(addr), &cfg, NAME);
        assert_eq!(
            tls.conn.protocol_version(),
            Some(ProtocolVersion::TLSv1_3),
            "TLS 1.3 negotiated"
        );
        assert_eq!(
            tls.conn.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "ALPN agreed"
        );
        assert_eq!(tls.conn.handshake_kind(), Some(HandshakeKind::Full));
        let certs = tls.conn.peer_certificates().expect("server certificates");
        assert_eq!(certs[0].as_ref(), &default_der[..], "{NAME}'s certificate");
        for (round, size) in [1usize, 100, 16383, 16384, 16385, 100_000]
            .into_iter()
            .enumerate()
        {
            let msg: Vec<u8> = (0..size as u64)
                .map(|i| pattern_byte(i + round as u64))
                .collect();
            echo_round_trip(&mut tls, &msg);
        }
        for round in 0..50u32 {
            echo_round_trip(
                &mut tls,
                format!("round {round} over bypass TLS").as_bytes(),
            );
        }
        let rest = close_and_drain(&mut tls);
        assert!(rest.is_empty(), "nothing after the last echo: {rest:?}");

        // SNI picks the other certificate.
        let mut tls = tls_handshake(connect_guarded(addr), &cfg, OTHER);
        let certs = tls.conn.peer_certificates().expect("server certificates");
        assert_eq!(certs[0].as_ref(), &other_der[..], "{OTHER}'s certificate");
        echo_round_trip(&mut tls, b"to the other name");
        assert!(close_and_drain(&mut tls).is_empty());
    });
    let st = wait_stats(&s, "both connections closed", |st| {
        settled(st) && tcp(st, "connections_created") >= 2
    });
    assert_eq!(proxy(&st, "handshakes"), 2, "{st}");
    assert_eq!(proxy(&st, "resumed"), 0, "{st}");
    assert_eq!(proxy(&st, "tls_errors"), 0, "{st}");
    assert_eq!(proxy(&st, "accepted"), 2, "{st}");
    assert_eq!(proxy(&st, "closed"), 2, "{st}");
    assert_eq!(tcp(&st, "connections_created"), 2, "{st}");
    assert_eq!(
        n(&st["total"]["handshakes"]),
        0,
        "the kernel workers did not see the bypass connections: {st}"
    );

    // The kernel TLS listener on the same tern.
    let (kcfg, kaddr) = (s.client_config(), s.addr());
    s.rig.client.run(move || {
        let mut tls = tls_connect(kaddr, &kcfg);
        echo_round_trip(&mut tls, b"through the kernel listener");
        assert!(close_and_drain(&mut tls).is_empty());
    });
    let st = wait_stats(&s, "the kernel handshake counted", |st| {
        n(&st["total"]["handshakes"]) == 1
    });
    assert_eq!(
        proxy(&st, "handshakes"),
        2,
        "the kernel connection was not counted on the bypass path: {st}"
    );
}

/// 400 TLS connections open at once (4 client threads), each echoing byte-exact twice, then
/// closed cleanly; the flows spread over both bypass workers.
#[test]
fn four_hundred_concurrent_tls_connections() {
    let (s, _backend) = echo_stack("tlsmany", "");
    let addr = tls_addr(&s);
    let cfg = s.client_config();
    const THREADS: usize = 4;
    const PER_THREAD: usize = 100;
    const CONNS: u64 = (THREADS * PER_THREAD) as u64;
    // Channels rather than barriers: a client thread that panics drops its sender, and the
    // test fails instead of waiting forever.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let mut go = Vec::new();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (cfg, opened) = (cfg.clone(), opened_tx.clone());
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            go.push(go_tx);
            s.rig.client.spawn(move || {
                let mut conns: Vec<Tls> =
                    (0..PER_THREAD).map(|_| tls_connect(addr, &cfg)).collect();
                opened.send(()).expect("report");
                go_rx.recv().expect("go");
                for (i, c) in conns.iter_mut().enumerate() {
                    echo_round_trip(c, format!("thread {t} connection {i:03};").as_bytes());
                }
                for (i, c) in conns.iter_mut().enumerate() {
                    echo_round_trip(c, format!("again {t}/{i:03}").as_bytes());
                }
                for c in conns.iter_mut() {
                    assert!(close_and_drain(c).is_empty());
                }
                conns.len()
            })
        })
        .collect();
    drop(opened_tx);
    for _ in 0..THREADS {
        opened_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("a client thread did not open its connections: {e}"));
    }
    // Every connection is held open; the server counts a handshake when the client's Finished
    // arrives, which may be just after the client returned from it.
    let st = wait_stats(&s, "every handshake counted", |st| {
        proxy(st, "handshakes") >= CONNS
    });
    for g in go {
        g.send(()).expect("go");
    }
    let served: usize = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .sum();
    assert_eq!(served as u64, CONNS);
    assert_eq!(
        proxy(&st, "active"),
        CONNS,
        "tern held every connection at once: {st}"
    );
    assert_eq!(proxy(&st, "handshakes"), CONNS, "{st}");
    let st = wait_stats(&s, "all connections closed", |st| {
        settled(st) && tcp(st, "connections_created") >= CONNS
    });
    assert_eq!(tcp(&st, "connections_created"), CONNS, "{st}");
    assert_eq!(proxy(&st, "backend_connects"), CONNS, "{st}");
    assert_eq!(proxy(&st, "tls_errors"), 0, "{st}");
    for w in 0..WORKERS {
        assert!(
            worker_proxy(&st, w, "handshakes") > 0,
            "flows spread over both workers: {st}"
        );
    }
}

/// Clean closes where the client's close_notify and its FIN arrive in separate segments (as most
/// clients send them): tern answers each with its own close_notify + FIN and sends no RST — no
/// segment of its own may make the client answer after tern's TCB is gone. (TIME-WAIT may keep
/// a TCB whose close crossed the client's FIN, so the stack's `connections` is not checked.)
#[test]
fn clean_closes_with_separate_close_notify_and_fin_send_no_rst() {
    let (s, _backend) = echo_stack("tlsnorst", "");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    const THREADS: u64 = 2;
    const PER_THREAD: u64 = 100;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let cfg = cfg.clone();
            s.rig.client.spawn(move || {
                for i in 0..PER_THREAD {
                    let mut tls = tls_connect(addr, &cfg);
                    echo_round_trip(&mut tls, format!("close test {t}/{i}").as_bytes());
                    tls.conn.send_close_notify();
                    tls.flush().expect("flush close_notify");
                    tls.sock.shutdown(Shutdown::Write).expect("half-close");
                    let mut rest = Vec::new();
                    tls.read_to_end(&mut rest)
                        .expect("the server's close_notify, then EOF");
                    assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    // The stack's counters are published every 100 ms; a client's answer to a stray segment
    // comes within a round trip.
    let st = wait_stats(&s, "every proxied connection closed", |st| {
        proxy(st, "active") == 0
            && proxy(st, "closed") == THREADS * PER_THREAD
            && tcp(st, "connections_created") == THREADS * PER_THREAD
    });
    assert_eq!(
        tcp(&st, "rsts_sent"),
        0,
        "RSTs on clean closes (rx_bad_cookie: ACKs for flows tern had closed): {}",
        st["bypass"]["tcp"]
    );
}

/// ~20 MB each way through TLS on the bypass path, every byte checked.
#[test]
fn twenty_megabytes_each_way_through_tls() {
    let (s, _backend) = echo_stack("tlsbulk", "");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    const TOTAL: usize = 20 << 20;
    s.rig
        .client
        .run(move || tls_bulk_echo(addr, &cfg, TOTAL, Duration::from_secs(60), false));
    let st = wait_stats(&s, "the connection closed", settled);
    assert!(proxy(&st, "client_bytes_in") >= TOTAL as u64, "{st}");
    assert!(proxy(&st, "client_bytes_out") >= TOTAL as u64, "{st}");
    assert_eq!(proxy(&st, "backend_bytes_out"), TOTAL as u64, "{st}");
    assert_eq!(proxy(&st, "backend_bytes_in"), TOTAL as u64, "{st}");
}

/// A client that stops reading: the echo stalls end to end through TLS (tern's window to the
/// client closes, its reads from the backend stop, the backend stops reading, tern's window for
/// the client's writes closes), so tern does not buffer without bound; nothing is lost, and
/// everything flows again when the client reads.
#[test]
fn client_that_stops_reading_gets_back_pressure() {
    let (s, _backend) = echo_stack("tlszwin", "");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    // More than every buffer on the way can hold: the client's are 64 KiB, tern's TCB and
    // session buffers a few hundred KiB, and the two loopback sockets to the echo backend at
    // most 6 MiB receive + 4 MiB send each (a new namespace's tcp_rmem / tcp_wmem maxima).
    const TOTAL: usize = 32 << 20;
    let stalled_at = s
        .rig
        .client
        .run(move || tls_bulk_echo(addr, &cfg, TOTAL, Duration::from_secs(60), true))
        .expect("the writer stalled");
    println!("the writer stalled after {stalled_at} of {TOTAL} bytes");
    let st = wait_stats(&s, "the connection closed", settled);
    assert_eq!(proxy(&st, "backend_bytes_out"), TOTAL as u64, "{st}");
    assert_eq!(proxy(&st, "backend_bytes_in"), TOTAL as u64, "{st}");
}

/// The same with 2 % of the TCP frames lost in each direction (a test-only XDP program drops
/// what the client receives, a tc program what it sends).
#[test]
fn twenty_megabytes_each_way_through_tls_with_two_percent_loss() {
    let (s, _backend) = echo_stack("tlsloss", "");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    let mut loss = tern_tests::loss::LossInjector::attach(
        &s.rig.client,
        &s.rig.client_if,
        20_000,
        20_000,
        0x715,
    );
    const TOTAL: usize = 20 << 20;
    s.rig
        .client
        .run(move || tls_bulk_echo(addr, &cfg, TOTAL, Duration::from_secs(90), false));
    let counts = stop_loss_checking_two_percent(&mut loss);
    println!("2 % loss, 20 MB each way through TLS: {counts:?}");
    let st = wait_stats(&s, "the connection closed", settled);
    assert_eq!(proxy(&st, "backend_bytes_out"), TOTAL as u64, "{st}");
}

/// A second connection resumes the first one's session on the *other* worker: TLS 1.3 with a
/// ticket (the shared ticketer), and TLS 1.2 with a session id only (the shared session cache).
/// Source ports are chosen so the XDP program steers each flow to the intended worker.
#[test]
fn resumption_across_workers() {
    let (s, _backend) = echo_stack("tlsresume", "");
    let server = match tls_addr(&s) {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("the rig is IPv4"),
    };
    let client_ip = s.rig.client_ip;
    let key = steer_key(&s);
    let cfg13 = s.client_config();
    let cfg12 = {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(s.cert.cert_der.clone()))
            .expect("add root");
        let mut cfg = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.resumption = Resumption::in_memory_sessions(16)
            .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
        Arc::new(cfg)
    };
    s.rig.client.run(move || {
        // Below Linux's ephemeral range, so no automatic port is in the way; the namespace and
        // its ports are this test's own.
        let mut next_port = 20_000u16;
        // A full handshake on worker `full_on`, then one resumed on the other worker.
        let mut full_then_resumed = |cfg: &Arc<ClientConfig>, version, full_on: u32, what: &str| {
            let first = connect_on_worker(&key, client_ip, server, full_on, &mut next_port);
            let mut tls = tls_handshake(first, cfg, NAME);
            assert_eq!(tls.conn.protocol_version(), Some(version));
            assert_eq!(tls.conn.handshake_kind(), Some(HandshakeKind::Full));
            // TLS 1.3 tickets arrive after the handshake, before the echo.
            echo_round_trip(&mut tls, b"first, full");
            assert!(close_and_drain(&mut tls).is_empty());
            let second = connect_on_worker(&key, client_ip, server, 1 - full_on, &mut next_port);
            let mut tls = tls_handshake(second, cfg, NAME);
            assert_eq!(
                tls.conn.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{what} from worker {full_on} resumed on worker {}",
                1 - full_on
            );
            echo_round_trip(&mut tls, b"second, resumed");
            assert!(close_and_drain(&mut tls).is_empty());
        };
        full_then_resumed(&cfg13, ProtocolVersion::TLSv1_3, 0, "TLS 1.3 ticket");
        // Session ids only (no ticket extension): resumed from the shared session cache.
        full_then_resumed(&cfg12, ProtocolVersion::TLSv1_2, 1, "TLS 1.2 session id");
    });
    let st = wait_stats(&s, "the connections closed", |st| {
        settled(st) && tcp(st, "connections_created") >= 4
    });
    assert_eq!(proxy(&st, "handshakes"), 4, "{st}");
    assert_eq!(proxy(&st, "resumed"), 2, "{st}");
    for w in 0..WORKERS {
        assert_eq!(worker_proxy(&st, w, "handshakes"), 2, "worker {w}: {st}");
        assert_eq!(worker_proxy(&st, w, "resumed"), 1, "worker {w}: {st}");
    }
}

/// Plain HTTP instead of a ClientHello: tern answers with the TLS alert rustls queued (one
/// alert record, fatal), then FIN; the client's later bytes are discarded; no backend is
/// connected; `tls_errors` counts it; other clients are served.
#[test]
fn garbage_gets_a_tls_alert_then_eof() {
    let (s, _backend) = echo_stack("tlsgarbage", "");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    let reply = s.rig.client.run(move || {
        let mut raw = connect_guarded(addr);
        raw.write_all(b"GET / HTTP/1.1\r\nHost: tern.test\r\n\r\n")
            .expect("write");
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply)
            .expect("the alert, then EOF (FIN, not RST)");
        // tern half-closed; more bytes from us are read and dropped, not an error again.
        raw.write_all(&[0x42; 4096]).expect("write after the alert");
        raw.shutdown(Shutdown::Write).expect("half-close");
        reply
    });
    assert!(
        reply.len() == 7 && reply[0] == 0x15 && reply[1] == 0x03 && reply[3..5] == [0, 2],
        "exactly one alert record (type 21, 2 bytes): {reply:02x?}"
    );
    assert_eq!(reply[5], 2, "a fatal alert: {reply:02x?}");
    let st = wait_stats(&s, "the broken connection freed", |st| {
        proxy(st, "active") == 0 && proxy(st, "closed") >= 1
    });
    assert_eq!(proxy(&st, "tls_errors"), 1, "{st}");
    assert_eq!(proxy(&st, "handshakes"), 0, "{st}");
    assert_eq!(
        proxy(&st, "backend_connects"),
        0,
        "no backend connection for a failed handshake: {st}"
    );
    // tern keeps serving.
    s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        echo_round_trip(&mut tls, b"after the broken peer");
        assert!(close_and_drain(&mut tls).is_empty());
    });
    let st = wait_stats(&s, "the good connection counted", |st| {
        proxy(st, "handshakes") == 1 && proxy(st, "active") == 0
    });
    assert_eq!(proxy(&st, "tls_errors"), 1, "{st}");
}

/// `timeouts.handshake_ms = 500`: a connection that sends nothing, and one that stops half-way
/// through its ClientHello, are reset and counted in `handshake_timeouts`; a connection whose
/// handshake finished before is not affected.
#[test]
fn silent_clients_are_reset_after_the_handshake_timeout() {
    let (s, _backend) = echo_stack("tlshstimeout", "[timeouts]\nhandshake_ms = 500\n");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    s.rig.client.run(move || {
        let mut done = tls_connect(addr, &cfg);
        echo_round_trip(&mut done, b"handshake finished in time");
        let hello = client_hello(&cfg);
        let silent = connect_guarded(addr);
        let mut partial = connect_guarded(addr);
        partial
            .write_all(&hello[..hello.len() / 2])
            .expect("half a ClientHello");
        for (what, mut c) in [("silent", silent), ("half a ClientHello", partial)] {
            let mut buf = [0u8; 64];
            match c.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("{what}: RST expected, got {other:?}"),
            }
        }
        // Both resets came at least 500 ms after `done`'s handshake: it still works.
        echo_round_trip(&mut done, b"still here");
        assert!(close_and_drain(&mut done).is_empty());
    });
    let st = wait_stats(&s, "all connections gone", |st| {
        settled(st) && tcp(st, "connections_created") >= 3
    });
    assert_eq!(proxy(&st, "handshake_timeouts"), 2, "{st}");
    assert_eq!(proxy(&st, "handshakes"), 1, "{st}");
    assert_eq!(proxy(&st, "backend_connects"), 1, "{st}");
}

/// A client's request through a PROXY-protocol backend of `version`: the header the backend
/// parsed, the client's local address, and the response.
fn proxy_protocol_case(
    tag: &str,
    version: &str,
    expect: ProxyExpect,
) -> (tern_tests::backend::ProxyHeader, SocketAddr, SocketAddr) {
    let (rig, dir) = (Rig::isolated(tag, 2), TempDir::new(tag));
    let (backend, records) = Backend::proxy_aware(server_listener(&rig), expect);
    let s = start(
        rig,
        dir,
        Opts {
            backends: vec![backend.addr()],
            proxy_protocol: version,
            ..Opts::default()
        },
    );
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    let (local, resp) = s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        let local = tls.sock.local_addr().expect("local addr");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut resp = Vec::new();
        tls.read_to_end(&mut resp)
            .expect("the response, then close_notify");
        (local, String::from_utf8_lossy(&resp).into_owned())
    });
    assert!(resp.starts_with("HTTP/1.1 200"), "response: {resp}");
    assert!(
        resp.contains(&format!("proxied-client: {local}")),
        "the backend saw the client through the header: {resp}"
    );
    let rec = records
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend saw a connection");
    let h = rec.expect_header().clone();
    // The backend closed first, so tern did too: its TCB waits in TIME-WAIT; the proxied
    // connection is done.
    let st = wait_stats(&s, "the proxied connection closed", |st| {
        proxy(st, "active") == 0 && proxy(st, "closed") == 1
    });
    assert_eq!(proxy(&st, "handshakes"), 1, "{st}");
    (h, local, addr)
}

/// PROXY v1 in front of the plaintext carries the client's address and port and the address it
/// connected to (`proxy-protocol.txt` §2.1).
#[test]
fn proxy_protocol_v1_carries_the_client_address() {
    let (h, local, addr) = proxy_protocol_case("tlsppv1", "v1", ProxyExpect::V1);
    assert_eq!(h.version, ProxyVersion::V1);
    assert_eq!(h.source, Some(local), "client's real address and port");
    assert_eq!(
        h.destination,
        Some(addr),
        "the address the client connected to"
    );
}

/// PROXY v2 in front of the plaintext carries the client's address and port, the address it
/// connected to, and the TLS fields (SNI as authority, ALPN, PP2_TYPE_SSL with the version and
/// cipher) to a backend that parses the header independently.
#[test]
fn proxy_protocol_v2_carries_the_tls_details() {
    let (h, local, addr) = proxy_protocol_case("tlsppv2", "v2", ProxyExpect::V2);
    assert_eq!(h.version, ProxyVersion::V2);
    assert_eq!(h.source, Some(local), "client's real address and port");
    assert_eq!(
        h.destination,
        Some(addr),
        "the address the client connected to"
    );
    assert_proxy_v2_tls(&h);
}

/// `connect = "eager"`: the backend is connected at accept, and a server-speaks-first greeting
/// sent during the handshake reaches the client once it completes, before anything else.
#[test]
fn eager_connect_delivers_a_server_first_greeting() {
    const GREETING: &[u8] = b"220 tern-test ready\r\n";
    let (rig, dir) = (Rig::isolated("tlseager", 2), TempDir::new("tlseager"));
    let listener = server_listener(&rig);
    let backend_addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Every connection (tern's readiness probe on the kernel listener connects eagerly too):
    // greet, echo until EOF, close, report what was received. Until `stop`, bounded by 60 s.
    let backend = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            listener.set_nonblocking(true).expect("non-blocking");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let mut conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    conn.set_nonblocking(false).expect("blocking");
                    conn.set_read_timeout(Some(Duration::from_secs(20)))
                        .expect("timeout");
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    // A peer that left (the readiness probe) just ends this connection.
                    if conn.write_all(GREETING).is_ok() {
                        while let Ok(k) = conn.read(&mut buf) {
                            if k == 0 || conn.write_all(&buf[..k]).is_err() {
                                break;
                            }
                            got.extend_from_slice(&buf[..k]);
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                    let _ = tx.send(got);
                });
            }
        })
    };
    let s = start(
        rig,
        dir,
        Opts {
            backends: vec![backend_addr],
            connect: "eager",
            ..Opts::default()
        },
    );
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        let mut greeting = vec![0u8; GREETING.len()];
        tls.read_exact(&mut greeting)
            .expect("the backend's greeting before we sent anything");
        assert_eq!(greeting, GREETING);
        echo_round_trip(&mut tls, b"HELO client");
        assert!(close_and_drain(&mut tls).is_empty());
    });
    // The client's backend connection is the one that received something.
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = rx
            .recv_timeout(left)
            .expect("the backend saw the client's EOF");
        if !got.is_empty() {
            break got;
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    backend.join().expect("backend");
    assert_eq!(got, b"HELO client");
    let st = wait_stats(&s, "the connection closed", settled);
    assert_eq!(proxy(&st, "backend_connects"), 1, "{st}");
    assert_eq!(proxy(&st, "handshakes"), 1, "{st}");
}

/// A backend nobody listens on: the client's first bytes find no backend, and tern closes the
/// client with close_notify (or at least FIN) promptly instead of leaving it hanging; counted.
#[test]
fn dead_backend_gets_a_clean_tls_close() {
    let (rig, dir) = (Rig::isolated("tlsdead", 2), TempDir::new("tlsdead"));
    let dead = dead_port(&rig);
    let s = start(
        rig,
        dir,
        Opts {
            backends: vec![dead],
            ..Opts::default()
        },
    );
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    let r = s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        tls.write_all(b"anyone there?").expect("write");
        let mut buf = [0u8; 64];
        let r = tls.read(&mut buf).map_err(|e| e.kind());
        if r == Ok(0) {
            // close_notify came; the TCP FIN follows.
            let mut rest = Vec::new();
            let eof = tls.sock.read_to_end(&mut rest);
            assert!(
                eof.is_ok() && rest.is_empty(),
                "FIN after close_notify: {eof:?} {rest:?}"
            );
        }
        r
    });
    assert!(
        matches!(r, Ok(0) | Err(ErrorKind::UnexpectedEof)),
        "a clean close (close_notify or EOF), not data, a reset or a hang: {r:?}\n{}",
        s.log()
    );
    let st = wait_stats(&s, "the backend failure counted", |st| {
        proxy(st, "backend_failures") >= 1
    });
    // Refused by a client connect, or already known down from a health probe (then no
    // connect is made at all).
    assert!(
        proxy(&st, "backend_connect_errors") + proxy(&st, "backend_all_down") >= 1,
        "{st}"
    );
    assert_eq!(proxy(&st, "backend_failures"), 1, "{st}");
    assert_eq!(proxy(&st, "backend_connects"), 0, "{st}");
    // Both sides have closed (tern's close_notify + FIN, then ours): the proxied connection
    // must be freed, not held until the TCB's TIME-WAIT ends.
    wait_stats(
        &s,
        "the proxied connection freed after the client closed (bypass.proxy.active == 0)",
        |st| proxy(st, "active") == 0 && proxy(st, "closed") == 1,
    );
}

/// Clients that go away at awkward moments free everything: FIN half-way through the
/// ClientHello, FIN right after a whole ClientHello (before reading the server's flight), RST
/// half-way through the ClientHello, and RST after the handshake with data in flight. The
/// handshake timeout is long, so only the FIN/RST handling can free them in time.
#[test]
fn client_fin_and_rst_free_the_connection() {
    let (s, _backend) = echo_stack("tlsfinrst", "[timeouts]\nhandshake_ms = 120000\n");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    s.rig.client.run(move || {
        let hello = client_hello(&cfg);
        for (what, len) in [
            ("FIN mid-ClientHello", hello.len() / 2),
            ("FIN after the ClientHello", hello.len()),
        ] {
            let mut c = connect_guarded(addr);
            c.write_all(&hello[..len]).expect("ClientHello bytes");
            c.shutdown(Shutdown::Write).expect("half-close");
            let mut rest = Vec::new();
            match c.read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{what}: tern did not close ({e}), got {rest:02x?}"),
            }
        }
        let c = connect_guarded(addr);
        (&c).write_all(&hello[..hello.len() / 2])
            .expect("half a ClientHello");
        linger_zero(&c);
        drop(c);

        let mut tls = tls_connect(addr, &cfg);
        echo_round_trip(&mut tls, b"before the reset");
        tls.write_all(&[7u8; 200_000]).expect("data in flight");
        tls.flush().expect("flush");
        linger_zero(&tls.sock);
        drop(tls);
    });
    // A connection whose RST arrives in the same batch as the segment that created it is gone
    // before the proxy sees it (created and closed in the stack, never accepted by the proxy),
    // so `accepted` is 3 or 4.
    let st = wait_stats(&s, "every connection freed", |st| {
        settled(st)
            && tcp(st, "connections_created") >= 4
            && tcp(st, "connections_closed") >= 4
            && proxy(st, "closed") == proxy(st, "accepted")
    });
    assert_eq!(tcp(&st, "connections_created"), 4, "{st}");
    assert!((3..=4).contains(&proxy(&st, "accepted")), "{st}");
    assert_eq!(proxy(&st, "handshake_timeouts"), 0, "{st}");
    assert_eq!(proxy(&st, "handshakes"), 1, "{st}");
    // tern still serves.
    let cfg = s.client_config();
    s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        echo_round_trip(&mut tls, b"after the departures");
        assert!(close_and_drain(&mut tls).is_empty());
    });
    wait_stats(&s, "the last connection closed", |st| {
        settled(st) && proxy(st, "handshakes") == 2
    });
}

/// An idle connection's TCP buffers go back to the kernel (`idle_buffers_released`: its send
/// and receive ring, once it moved no byte for 100 ms), and the connection works exactly as
/// before afterwards: byte-exact echoes of every size, idle again, a clean close.
#[test]
fn an_idle_connection_gives_its_buffers_back_and_works_again() {
    let (s, _backend) = echo_stack("tlsidle", "");
    let (addr, cfg) = (tls_addr(&s), s.client_config());
    let tls = s.rig.client.run(move || {
        let mut tls = tls_handshake(connect_guarded(addr), &cfg, NAME);
        echo_round_trip(&mut tls, b"before the pause");
        tls
    });
    let before = wait_stats(&s, "both rings given back", |st| {
        tcp(st, "idle_buffers_released") >= 2
    });
    assert_eq!(tcp(&before, "connections"), 1, "{before}");
    let tls = s.rig.client.run(move || {
        let mut tls = tls;
        for (round, size) in [1usize, 4096, 16385, 300_000].into_iter().enumerate() {
            let msg: Vec<u8> = (0..size as u64)
                .map(|i| pattern_byte(i + round as u64))
                .collect();
            echo_round_trip(&mut tls, &msg);
        }
        tls
    });
    let released = tcp(&before, "idle_buffers_released");
    wait_stats(&s, "given back again after the second pause", |st| {
        tcp(st, "idle_buffers_released") >= released + 2
    });
    s.rig.client.run(move || {
        let mut tls = tls;
        echo_round_trip(&mut tls, b"after the second pause");
        assert!(close_and_drain(&mut tls).is_empty());
    });
    let st = wait_stats(&s, "the connection closed", settled);
    assert_eq!(proxy(&st, "tls_errors"), 0, "{st}");
    assert_eq!(proxy(&st, "closed"), 1, "{st}");
    assert_eq!(tcp(&st, "rsts_sent"), 0, "a clean close: {st}");
}
