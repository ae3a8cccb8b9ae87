//! End-to-end tests of kernel mode: real clients (curl, openssl, rustls) in a client namespace,
//! tern and its backends in a server namespace, joined by a veth pair. Each test has its own rig.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::{pattern_byte, Backend, ProxyExpect, ProxyVersion};

#[test]
fn curl_gets_the_backend_response() {
    let (s, _backend) = Stack::with_backend("curl", Backend::demo_http, StackOptions::default());

    let out = s.curl(&["--http1.1", &s.url("/")]);
    assert_ok(&out, "curl GET /", &s.log());
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("hello from tern demo backend"),
        "unexpected body: {body}"
    );

    // POST is echoed.
    let out = s.curl(&[
        "--http1.1",
        "--data-binary",
        "ping through tern",
        &s.url("/echo"),
    ]);
    assert_ok(&out, "curl POST", &s.log());
    assert_eq!(out.stdout, b"ping through tern");
}

#[test]
fn many_requests_share_one_connection() {
    let (s, _backend) =
        Stack::with_backend("keepalive", Backend::demo_http, StackOptions::default());
    let before = s.total("handshakes");

    let urls: Vec<String> = (0..20)
        .map(|i| s.url(&format!("/bytes/{}", 1000 + i)))
        .collect();
    let mut args = vec!["--http1.1", "-w", "%{num_connects}\\n"];
    for u in &urls {
        args.extend(["-o", "/dev/null", u.as_str()]);
    }
    let out = s.curl(&args);
    assert_ok(&out, "curl with 20 URLs", &s.log());
    let connects: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().expect("num_connects"))
        .collect();
    assert_eq!(connects.len(), 20, "one line per request");
    assert_eq!(
        connects.iter().sum::<u32>(),
        1,
        "curl reused its one connection: {connects:?}"
    );
    assert_eq!(
        s.total("handshakes") - before,
        1,
        "one TLS handshake for 20 requests"
    );
}

#[test]
fn hundred_megabytes_each_way_over_four_connections() {
    let (s, _backend) = Stack::with_backend("bulk", Backend::demo_http, StackOptions::default());

    // 4 × 25 MB uploaded and echoed back: 100 MB each direction, hashes compared.
    const EACH: usize = 25 * 1024 * 1024;
    let input = s.dir.join("upload.bin");
    let data: Vec<u8> = (0..EACH as u64).map(pattern_byte).collect();
    std::fs::write(&input, &data).expect("write upload");
    drop(data);
    let want = sha256_file(&input);
    let resolve = format!("{NAME}:443:{}", s.rig.server_ip);
    let children: Vec<_> = (0..4)
        .map(|i| {
            let out = s.dir.join(format!("download-{i}.bin"));
            let child = s
                .rig
                .client_command("curl")
                .args(["-sS", "--http1.1", "--max-time", "120", "--cacert"])
                .arg(&s.cert.cert)
                .args(["--resolve", &resolve, "-H", "Expect:", "--data-binary"])
                .arg(format!("@{}", input.display()))
                .arg("-o")
                .arg(&out)
                .arg(s.url("/echo"))
                .spawn()
                .expect("spawn curl");
            (child, out)
        })
        .collect();
    for (child, out) in children {
        let status = child.wait_with_output().expect("curl");
        assert_ok(&status, "curl POST 25 MB", &s.log());
        assert_eq!(
            sha256_file(&out),
            want,
            "echoed body differs from the upload"
        );
    }
    let st = s.stats();
    assert!(st["total"]["backend_bytes_out"].as_u64().unwrap() >= 4 * EACH as u64);
    assert!(st["total"]["backend_bytes_in"].as_u64().unwrap() >= 4 * EACH as u64);
}

#[test]
fn a_thousand_concurrent_tls_connections() {
    let (s, _backend) = Stack::with_backend("thousand", Backend::echo, StackOptions::default());

    const THREADS: usize = 8;
    const PER_THREAD: usize = 125;
    let cfg = s.client_config();
    let addr = s.addr();
    let opened = Arc::new(Barrier::new(THREADS + 1));
    let checked = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (cfg, opened, checked) = (cfg.clone(), opened.clone(), checked.clone());
            s.rig.client.spawn(move || {
                let mut conns: Vec<Tls> =
                    (0..PER_THREAD).map(|_| tls_connect(addr, &cfg)).collect();
                opened.wait();
                checked.wait();
                for (i, c) in conns.iter_mut().enumerate() {
                    echo_round_trip(c, format!("thread {t} connection {i}\n").as_bytes());
                }
                // Every connection still works after all have been served once.
                for c in conns.iter_mut() {
                    echo_round_trip(c, b"again\n");
                }
                conns.len()
            })
        })
        .collect();
    opened.wait();
    // All 1,000 handshakes are done and the connections are held open.
    let active = s.total("active");
    checked.wait();
    let served: usize = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .sum();
    assert_eq!(served, THREADS * PER_THREAD);
    assert!(
        active >= 1000,
        "tern holds all connections at once: active = {active}"
    );
    assert!(s.total("handshakes") >= 1000);
    assert_eq!(s.total("backend_failures"), 0);
}

/// The certificate the server sent, as PEM, from `openssl s_client -servername`.
fn served_cert(s: &Stack, servername: Option<&str>) -> String {
    let mut cmd = s.rig.client_command("openssl");
    cmd.args(["s_client", "-connect", &s.addr().to_string()]);
    if let Some(name) = servername {
        cmd.args(["-servername", name]);
    } else {
        cmd.arg("-noservername");
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate in: {text}"));
    let end = text
        .find("-----END CERTIFICATE-----")
        .expect("end of certificate")
        + 25;
    text[start..end].to_string()
}

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[test]
fn sni_selects_the_certificate_and_unknown_names_get_the_default() {
    let (s, _backend) = Stack::with_backend(
        "sni",
        Backend::demo_http,
        StackOptions {
            extra_certs: &[("other", &["other.test", "*.wild.test"])],
            ..Default::default()
        },
    );
    let default = pem_body(&s.cert.cert_pem);
    let other = pem_body(&std::fs::read_to_string(s.dir.join("other.pem")).expect("other.pem"));
    assert_ne!(default, other);
    assert_eq!(
        pem_body(&served_cert(&s, Some("other.test"))),
        other,
        "exact SNI match"
    );
    assert_eq!(
        pem_body(&served_cert(&s, Some("a.wild.test"))),
        other,
        "wildcard SNI match"
    );
    assert_eq!(pem_body(&served_cert(&s, Some(NAME))), default);
    assert_eq!(
        pem_body(&served_cert(&s, Some("unknown.example"))),
        default,
        "unknown name"
    );
    assert_eq!(pem_body(&served_cert(&s, None)), default, "no SNI");
}

fn proxy_protocol_case(version: &str, expect: ProxyExpect) {
    let (rig, dir) = Stack::rig(&format!("pp{version}"));
    let (backend, records) = Backend::proxy_aware(server_listener(&rig), expect);
    let s = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr()],
            proxy_protocol: version,
            ..Default::default()
        },
    );
    // A client with a known source port, so the header can be checked exactly.
    let cfg = s.client_config();
    let addr = s.addr();
    let local = s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        let local = tls.sock.local_addr().expect("local addr");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut resp = Vec::new();
        let _ = tls.read_to_end(&mut resp);
        assert!(
            resp.starts_with(b"HTTP/1.1 200"),
            "response: {}",
            String::from_utf8_lossy(&resp)
        );
        local
    });
    let rec = records
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend saw a connection");
    let h = rec.expect_header();
    assert_eq!(h.source, Some(local), "client's real address and port");
    assert_eq!(
        h.destination,
        Some(s.addr()),
        "the address the client connected to"
    );
    match version {
        "v1" => assert_eq!(h.version, ProxyVersion::V1),
        _ => {
            assert_eq!(h.version, ProxyVersion::V2);
            assert_proxy_v2_tls(h);
        }
    }
}

#[test]
fn proxy_protocol_v1_carries_the_client_address() {
    proxy_protocol_case("v1", ProxyExpect::V1);
}

#[test]
fn proxy_protocol_v2_carries_the_client_address_and_tls_details() {
    proxy_protocol_case("v2", ProxyExpect::V2);
}

fn resumption_case(tls_flag: &str) {
    let (rig, dir) = Stack::rig(&format!("resume{}", tls_flag[4..].replace('_', "")));
    let backend = Backend::demo_http(server_listener(&rig));
    let s = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr()],
            ..Default::default()
        },
    );
    let sess = s.dir.join("session.pem");
    let run = |extra: &[&str]| {
        let mut child = s
            .rig
            .client_command("openssl")
            .args([
                "s_client",
                "-connect",
                &s.addr().to_string(),
                "-servername",
                NAME,
                tls_flag,
                "-ign_eof",
            ])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        // A request with Connection: close: the backend closes, tern sends close_notify, and
        // s_client exits after the TLS 1.3 tickets have arrived.
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"GET / HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n")
            .expect("write request");
        let out = child.wait_with_output().expect("openssl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = run(&["-sess_out", sess.to_str().expect("path")]);
    assert!(first.contains("New,"), "first handshake is new: {first}");
    assert!(first.contains("HTTP/1.1 200"), "request served: {first}");
    let second = run(&["-sess_in", sess.to_str().expect("path")]);
    assert!(
        second.contains("Reused,"),
        "second handshake resumed: {second}\ntern log:\n{}",
        s.log()
    );
    assert!(s.total("resumed") >= 1);
}

#[test]
fn session_resumption_tls13_tickets() {
    resumption_case("-tls1_3");
}

#[test]
fn session_resumption_tls12() {
    resumption_case("-tls1_2");
}

/// An echo backend whose listening socket can be closed while its connections keep going.
struct StoppableEcho {
    addr: std::net::SocketAddr,
    listening: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoppableEcho {
    fn start(listener: TcpListener) -> StoppableEcho {
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let listening = Arc::new(AtomicBool::new(true));
        let flag = listening.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).expect("blocking");
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = c.shutdown(Shutdown::Both);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // The listener is dropped here: new connections are refused from now on.
        });
        StoppableEcho {
            addr,
            listening,
            thread: Some(thread),
        }
    }

    fn close_listener(&mut self) {
        self.listening.store(false, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("listener thread");
    }
}

impl Drop for StoppableEcho {
    fn drop(&mut self) {
        self.listening.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn dead_backend_closes_only_the_affected_connection_promptly() {
    let (rig, dir) = Stack::rig("backenddown");
    let mut backend = StoppableEcho::start(server_listener(&rig));
    let s = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr],
            ..Default::default()
        },
    );
    let cfg = s.client_config();
    let addr = s.addr();

    // Connection A is established while the backend is up.
    let (to_a, a_rx) = std::sync::mpsc::channel::<&'static [u8]>();
    let (a_done, a_result) = std::sync::mpsc::channel::<()>();
    let a = {
        let cfg = cfg.clone();
        s.rig.client.spawn(move || {
            let mut tls = tls_connect(addr, &cfg);
            echo_round_trip(&mut tls, b"before\n");
            a_done.send(()).expect("report");
            let msg = a_rx.recv().expect("next message");
            echo_round_trip(&mut tls, msg);
        })
    };
    a_result
        .recv_timeout(Duration::from_secs(20))
        .expect("connection A works");

    backend.close_listener();

    // Connection B finds no backend: tern must close it promptly, and say so.
    let b_elapsed = s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        let t = Instant::now();
        tls.write_all(b"hello?\n").expect("write");
        let mut buf = [0u8; 64];
        let r = tls.read(&mut buf);
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "B gets no data, only a close: {r:?}"
        );
        t.elapsed()
    });
    // A safety bound, far below `idle_ms` (300 s) that would otherwise end it; the refused
    // connect is immediate, the connect timeout 2 s.
    assert!(
        b_elapsed < Duration::from_secs(20),
        "closed promptly, not left to the idle timeout; took {b_elapsed:?}"
    );

    // A is unaffected.
    to_a.send(b"after\n").expect("send");
    a.join().expect("connection A still works");
    assert!(s.total("backend_failures") >= 1);
    // Refused by a client connect, or already known down from a health probe.
    assert!(s.total("backend_connect_errors") + s.total("backend_all_down") >= 1);
}

#[test]
fn a_stalled_backend_does_not_stall_other_connections() {
    let (rig, dir) = Stack::rig("stall");
    // One backend accepts and never reads or answers; the other echoes. Round-robin puts
    // connections on both.
    let stalled = server_listener(&rig);
    let stalled_addr = stalled.local_addr().expect("addr");
    let good = Backend::echo(server_listener(&rig));
    let s = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![stalled_addr, good.addr()],
            ..Default::default()
        },
    );
    let cfg = s.client_config();
    let addr = s.addr();
    let served = s.rig.client.run(move || {
        // Eight connections; about half land on the stalled backend. Those are left waiting;
        // the others must echo promptly regardless.
        let mut ok = 0;
        let mut conns = Vec::new();
        for i in 0..8 {
            let mut tls = tls_connect(addr, &cfg);
            tls.sock
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .expect("timeout");
            let msg = format!("conn {i}\n");
            tls.write_all(msg.as_bytes()).expect("write");
            let mut back = vec![0u8; msg.len()];
            if tls.read_exact(&mut back).is_ok() {
                assert_eq!(back, msg.as_bytes());
                ok += 1;
            }
            conns.push(tls);
        }
        ok
    });
    drop(stalled);
    assert!(
        served >= 3,
        "connections on the good backend were served: {served} of 8\n{}",
        s.log()
    );
}

#[test]
fn half_close_both_ways() {
    let (s, _backend) = Stack::with_backend("halfclose", Backend::echo, StackOptions::default());
    let cfg = s.client_config();
    let addr = s.addr();
    s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg);
        tls.write_all(b"first half").expect("write");
        // The client finishes sending (close_notify + FIN on write); the echo backend still
        // answers everything, then closes, which tern turns into close_notify.
        tls.conn.send_close_notify();
        tls.flush().expect("flush");
        tls.sock.shutdown(Shutdown::Write).expect("shutdown write");
        let mut got = Vec::new();
        tls.read_to_end(&mut got).expect("read until close_notify");
        assert_eq!(got, b"first half");
    });
}

#[test]
fn drain_on_sigterm_finishes_open_connections_and_refuses_new_ones() {
    let (mut s, _backend) = Stack::with_backend("drain", Backend::echo, StackOptions::default());
    let cfg = s.client_config();
    let addr = s.addr();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let (ready, ready_rx) = std::sync::mpsc::channel::<()>();
    let open = s.rig.client.spawn(move || {
        let mut tls = tls_connect(addr, &cfg);
        echo_round_trip(&mut tls, b"before drain\n");
        ready.send(()).expect("ready");
        go_rx.recv().expect("go");
        echo_round_trip(&mut tls, b"during drain\n");
        // Closing the connection lets the drain finish.
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("connection open");
    s.tern.signal(libc::SIGTERM);
    // New connections are refused once the workers have closed their listeners.
    let refused = s.rig.client.run(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    assert!(refused, "new connections are refused while draining");
    go.send(()).expect("go");
    open.join()
        .expect("the open connection kept working during the drain");
    s.expect_clean_exit(Duration::from_secs(10), "tern exits once drained");
}

#[test]
fn idle_and_handshake_timeouts_close_connections() {
    let (s, _backend) = Stack::with_backend(
        "timeouts",
        Backend::echo,
        StackOptions {
            toml_extra: "[timeouts]\nhandshake_ms = 500\nidle_ms = 800\n",
            ..Default::default()
        },
    );
    let cfg = s.client_config();
    let addr = s.addr();
    // Closed by tern (EOF or a reset), not by our read timeout, which is only a safety bound
    // (30 s against 0.5 s and 0.8 s); which timeout fired is what the counters say.
    let closed_by_tern = |r: &std::io::Result<usize>| match r {
        Ok(n) => *n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    s.rig.client.run(move || {
        // Sends nothing at all: the handshake timeout closes it.
        let mut raw = std::net::TcpStream::connect(addr).expect("connect");
        raw.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let r = raw.read(&mut buf);
        assert!(closed_by_tern(&r), "closed by the handshake timeout: {r:?}");

        // Handshakes, echoes once, then idles: the idle timeout closes it.
        let mut tls = tls_connect(addr, &cfg);
        echo_round_trip(&mut tls, b"then silence\n");
        let r = tls.read(&mut buf);
        assert!(closed_by_tern(&r), "closed by the idle timeout: {r:?}");
    });
    let st = wait_stats(&s, "both timeouts counted", |st| {
        st["total"]["handshake_timeouts"].as_u64() >= Some(1)
            && st["total"]["idle_timeouts"].as_u64() >= Some(1)
    });
    assert_eq!(
        st["total"]["handshakes"].as_u64(),
        Some(1),
        "only the second connection handshook: {st}"
    );
}

#[test]
fn plain_http_to_the_tls_port_gets_an_alert_and_is_counted() {
    let (s, _backend) = Stack::with_backend("garbage", Backend::echo, StackOptions::default());
    let addr = s.addr();
    let reply = s.rig.client.run(move || {
        let mut raw = std::net::TcpStream::connect(addr).expect("connect");
        raw.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut buf = Vec::new();
        let _ = raw.read_to_end(&mut buf);
        buf
    });
    assert!(
        !reply.is_empty() && reply[0] == 0x15,
        "a TLS alert record: {reply:?}"
    );
    assert!(s.total("tls_errors") >= 1);
    assert_eq!(
        s.total("backend_connects"),
        0,
        "no backend connection for a failed handshake"
    );
}

#[test]
fn ctl_ping_and_stats() {
    let (s, _backend) = Stack::with_backend("ctl", Backend::demo_http, StackOptions::default());
    let out = Command::new(tern_tests::rig::tern_binary())
        .args(["ctl", "--socket"])
        .arg(&s.control)
        .arg("ping")
        .output()
        .expect("tern ctl ping");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pong");
    let out = s.curl(&["--http1.1", &s.url("/")]);
    assert_ok(&out, "curl", &s.log());
    let st = s.stats();
    assert_eq!(st["workers"].as_array().expect("workers").len(), 2);
    let sum: u64 = st["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["counters"]["handshakes"].as_u64().expect("handshakes"))
        .sum();
    assert_eq!(
        sum,
        st["total"]["handshakes"].as_u64().expect("total"),
        "totals add up"
    );
    assert!(sum >= 1);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_client_that_stops_reading_gets_back_pressure_not_buffering() {
    let (s, _backend) =
        Stack::with_backend("slowreader", Backend::demo_http, StackOptions::default());
    const TOTAL: usize = 64 * 1024 * 1024;
    let cfg = s.client_config();
    let addr = s.addr();
    let pid = s.tern.pid();
    let (paused, paused_rx) = std::sync::mpsc::channel::<()>();
    let (resume, resume_rx) = std::sync::mpsc::channel::<()>();
    let client = s.rig.client.spawn(move || {
        let mut tls = tls_connect(addr, &cfg);
        write!(
            tls,
            "GET /bytes/{TOTAL} HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        // Read the response head and the first MiB, then stop reading.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < 1024 * 1024 {
            let n = tls.read(&mut buf).expect("read");
            assert!(n > 0, "early EOF");
            got.extend_from_slice(&buf[..n]);
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        let mut offset = 0u64;
        let check = |data: &[u8], offset: &mut u64| {
            for &b in data {
                assert_eq!(b, pattern_byte(*offset), "byte {offset} differs");
                *offset += 1;
            }
        };
        check(&got[head_end..], &mut offset);
        paused.send(()).expect("paused");
        resume_rx.recv().expect("resume");
        loop {
            let n = tls.read(&mut buf).expect("read after resuming");
            if n == 0 {
                break;
            }
            check(&buf[..n], &mut offset);
        }
        offset
    });
    paused_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("client read the first MiB");
    let before = rss_kib(pid);
    // The backend keeps sending; tern must stop reading from it instead of buffering. Give it
    // time to fill every buffer it is going to fill.
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    resume.send(()).expect("resume");
    let received = client.join().expect("client");
    assert_eq!(received as usize, TOTAL, "every byte arrived, in order");
    assert!(
        after < before + 8 * 1024,
        "tern's RSS grew from {before} KiB to {after} KiB while the client was not reading"
    );
}

#[test]
fn connections_beyond_the_limit_are_refused_at_once() {
    let (s, _backend) = Stack::with_backend(
        "limit",
        Backend::echo,
        StackOptions {
            toml_extra: "[limits]\nmax_connections_per_worker = 1\n",
            ..Default::default()
        },
    );
    let cfg = s.client_config();
    let addr = s.addr();
    let (served, refused) = s.rig.client.run(move || {
        // Two workers, one connection each: of six held connections at most two are served;
        // the others are reset at once rather than left waiting.
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..6 {
            let sock =
                std::net::TcpStream::connect(addr).expect("TCP connect (the kernel accepts)");
            // A safety bound: a refused connection is reset, which the error kind tells from
            // a handshake left waiting (a timeout).
            sock.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let conn = rustls::ClientConnection::new(
                cfg.clone(),
                rustls::pki_types::ServerName::try_from(NAME).expect("name"),
            )
            .expect("client");
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut failed = None;
            while tls.conn.is_handshaking() {
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => {
                    echo_round_trip(&mut tls, b"held\n");
                    held.push(tls);
                }
                Some(e) => {
                    assert!(
                        !matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ),
                        "refused (reset or closed), not left waiting: {e}"
                    );
                    refused += 1;
                }
            }
        }
        (held.len(), refused)
    });
    assert!((1..=2).contains(&served), "served {served}");
    assert_eq!(served + refused, 6);
    assert!(s.total("refused_full") >= refused as u64);
}

/// `tls = false`: the same worker and proxy core as a plain TCP (L4) proxy. Bytes pass
/// unchanged both ways, half-close works both ways, and the stats count no handshakes.
#[test]
fn plain_tcp_listener_proxies_bytes_and_half_closes() {
    let (s, _backend) = Stack::with_backend(
        "plain",
        Backend::echo,
        StackOptions {
            listener_extra: "tls = false",
            ..Default::default()
        },
    );
    let addr = s.addr();
    s.rig.client.run(move || {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let writer = {
            let mut w = conn.try_clone().expect("clone");
            let msg = msg.clone();
            std::thread::spawn(move || {
                w.write_all(&msg).expect("write");
                // Client half-close: the echo backend sees FIN after the last byte, echoes
                // everything, then closes, which tern forwards as FIN.
                w.shutdown(Shutdown::Write).expect("shutdown write");
            })
        };
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read until FIN");
        writer.join().expect("writer");
        assert_eq!(got.len(), msg.len(), "every byte came back");
        assert!(got == msg, "bytes came back unchanged and in order");
    });
    let stats = s.stats();
    assert_eq!(
        stats["total"]["handshakes"], 0,
        "no TLS on a plain listener: {stats}"
    );
    assert!(
        stats["total"]["accepted"].as_u64().unwrap_or(0) >= 1,
        "the connection was accepted: {stats}"
    );
}
