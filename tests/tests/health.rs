//! Backend health end to end, on both paths (kernel mode and the bypass path): with two echo
//! backends and active probing, a backend the test stops is marked down by the probes (seen in
//! `tern ctl backends`) and from then on gets no connection while every request succeeds on
//! the other; restarted, it is marked up again and served. With every backend stopped, a
//! client's connection is closed at once without any connect attempt (no per-server connect,
//! error or timeout moves; `backend_all_down` counts it), well before `connect_timeout_ms`.
//!
//! Time: one probe interval is 500 ms. The waits for a state change are bounded (a few
//! intervals plus slack for ticks and a loaded machine); they are liveness bounds, not speed
//! measurements. Everything else is asserted on counters.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use support::*;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

const KERNEL_PORT: u16 = 443;
const BYPASS_PORT: u16 = 4443;
const WORKERS: u32 = 2;
const INTERVAL_MS: u64 = 500;
/// Far longer than any wait here: a connection that waited for a connect would show it.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How long a server may take to be seen down after it stopped: one interval, plus the tick
/// and generous slack for a loaded 2-core machine (a liveness bound).
const DOWN_WITHIN: Duration = Duration::from_secs(5);
/// Up again after a restart: the down server's back-off has grown while it was down (500 ms,
/// 1 s, 2 s, 4 s ...), so this allows for two of its probes.
const UP_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Bypass,
}

struct Health {
    path: Path,
    stack: Stack,
}

impl Health {
    #[track_caller]
    fn start(path: Path, tag: &str, backends: &[SocketAddr], rig: Rig, dir: TempDir) -> Health {
        let cert = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        let control = dir.join("tern.sock");
        // The bypass path's kernel listener attaches XDP and answers the readiness probe.
        let (listeners, bypass) =
            path_listeners(path == Path::Bypass, &rig, KERNEL_PORT, BYPASS_PORT);
        // One server as a plain string, one as a table: both forms in use.
        let servers = format!(
            "\"{}\", {{ address = \"{}\", weight = 1 }}",
            backends[0], backends[1]
        );
        let config = format!(
            "{listeners}\n\
             [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\ndefault = true\n\n\
             [backend]\nservers = [{servers}]\nconnect_timeout_ms = {CONNECT_TIMEOUT_MS}\n\n\
             [backend.health]\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 1000\n\n\
             [workers]\ncount = {WORKERS}\n\n[control]\nsocket = \"{control}\"\n\n{bypass}",
            cert = cert.cert.display(),
            key = cert.key.display(),
            control = control.display(),
        );
        let mut tern = TernProcess::start(&config, rig.server_netns());
        tern.wait_ready(rig.server_addr(KERNEL_PORT));
        let h = Health {
            path,
            stack: Stack {
                tern,
                cert,
                dir,
                control,
                rig,
            },
        };
        h.warm_up(tag);
        h
    }

    fn addr(&self) -> SocketAddr {
        match self.path {
            Path::Kernel => self.stack.rig.server_addr(KERNEL_PORT),
            Path::Bypass => self.stack.rig.server_addr(BYPASS_PORT),
        }
    }

    /// Waits until the listener under test serves (the bypass one comes up after the kernel
    /// listener that answers the readiness probe).
    #[track_caller]
    fn warm_up(&self, tag: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.round_trips(1).is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{tag}: the listener under test served nothing in 20 s\n{}",
                self.stack.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `n` sequential TLS connections, each one echo round trip; the failures, described.
    fn round_trips(&self, n: usize) -> Vec<String> {
        let (addr, cfg) = (self.addr(), self.stack.client_config());
        self.stack.rig.client.run(move || {
            (0..n)
                .filter_map(|i| round_trip(addr, &cfg, i).err())
                .collect()
        })
    }

    /// The counters of the path under test.
    fn counters(&self) -> serde_json::Value {
        let st = self.stack.stats();
        match self.path {
            Path::Kernel => st["total"].clone(),
            Path::Bypass => st["bypass"]["proxy"].clone(),
        }
    }

    /// `tern ctl backends`, parsed: the server entry for `addr`.
    #[track_caller]
    fn server(&self, addr: SocketAddr) -> serde_json::Value {
        let out = std::process::Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.stack.control)
            .arg("backends")
            .output()
            .expect("run tern ctl backends");
        assert_ok(&out, "tern ctl backends", &self.stack.log());
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        doc["servers"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["address"].as_str() == Some(&addr.to_string()))
            })
            .cloned()
            .unwrap_or_else(|| panic!("{addr} not in tern ctl backends: {doc}"))
    }

    /// Waits until every worker holds `addr` in `state` ("up": all workers up; "down": none
    /// up); returns how long it took.
    #[track_caller]
    fn wait_state(&self, addr: SocketAddr, state: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let s = self.server(addr);
            let (up, all) = (n(&s["workers_up"]), n(&s["workers"]));
            let done = match state {
                "up" => all > 0 && up == all,
                _ => all > 0 && up == 0,
            };
            if done {
                assert_eq!(s["state"], state, "{s}");
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "{addr} not {state} for every worker within {within:?}: {s}\n{}",
                self.stack.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Connects, sends a line and reads it back through the echo backend.
fn round_trip(addr: SocketAddr, cfg: &Arc<ClientConfig>, i: usize) -> Result<(), String> {
    let mut tls = tls_connect(addr, cfg);
    let msg = format!("health check {i}\n");
    tls.write_all(msg.as_bytes())
        .and_then(|()| tls.flush())
        .map_err(|e| format!("connection {i}: write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back)
        .map_err(|e| format!("connection {i}: read: {e}"))?;
    if back != msg.as_bytes() {
        return Err(format!("connection {i}: echo mismatch"));
    }
    Ok(())
}

/// A server's connect attempts: client connects made, failed, timed out.
fn attempts(s: &serde_json::Value) -> u64 {
    n(&s["connects"]) + n(&s["connect_errors"]) + n(&s["connect_timeouts"])
}

/// An echo backend on `addr` again (same port: SO_REUSEADDR is std's default on Linux).
#[track_caller]
fn restart_echo(rig: &Rig, addr: SocketAddr) -> Backend {
    let l = rig.server_run(move || TcpListener::bind(addr).expect("rebind the backend's port"));
    Backend::echo(l)
}

fn dead_backend_is_skipped_then_comes_back(path: Path, tag: &str) {
    let (rig, dir) = (Rig::isolated(tag, WORKERS), TempDir::new(tag));
    let a = Backend::echo(server_listener(&rig));
    let b = Backend::echo(server_listener(&rig));
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let h = Health::start(path, tag, &[a_addr, b_addr], rig, dir);
    h.wait_state(a_addr, "up", UP_WITHIN);
    h.wait_state(b_addr, "up", UP_WITHIN);
    let failed = h.round_trips(10);
    assert!(failed.is_empty(), "both up: {failed:?}");

    // A stops. The probes see it within an interval (plus the tick and slack).
    a.stop();
    let took = h.wait_state(a_addr, "down", DOWN_WITHIN);
    eprintln!("{path:?}: {a_addr} seen down {took:?} after it stopped");
    let (a0, b0) = (h.server(a_addr), h.server(b_addr));
    let failed = h.round_trips(20);
    assert!(
        failed.is_empty(),
        "A down, B up: no request fails: {failed:?}"
    );
    let (a1, b1) = (h.server(a_addr), h.server(b_addr));
    assert_eq!(
        attempts(&a1),
        attempts(&a0),
        "no connection is sent to the down server: {a0} -> {a1}"
    );
    assert!(
        n(&b1["connects"]) >= n(&b0["connects"]) + 20,
        "every connection went to B: {b0} -> {b1}"
    );
    assert!(n(&a1["probes_failed"]) >= 1, "{a1}");
    assert!(n(&a1["last_change_unix_ms"]) > 0, "{a1}");

    // A is back: probes mark it up, and it is served again.
    let a = restart_echo(&h.stack.rig, a_addr);
    h.wait_state(a_addr, "up", UP_WITHIN);
    let before = h.server(a_addr);
    let failed = h.round_trips(10);
    assert!(failed.is_empty(), "both up again: {failed:?}");
    let after = h.server(a_addr);
    assert!(
        n(&after["connects"]) > n(&before["connects"]),
        "A takes connections again: {before} -> {after}"
    );
    // The clients have closed; tern ends each connection (and gives its hold back) when it
    // sees the close, which may be just after the client returned: wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = after;
    while n(&after["active"]) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = h.server(a_addr);
    }
    assert_eq!(n(&after["active"]), 0, "every hold given back: {after}");
    let c = h.counters();
    assert_eq!(n(&c["backend_all_down"]), 0, "{c}");
    assert_eq!(n(&c["backend_failures"]), 0, "{c}");
    let st = h.stack.stats();
    assert!(
        st["backends"].as_array().is_some_and(|a| a.len() == 2),
        "stats has the backends section: {}",
        st["backends"]
    );
    drop(a);
    drop(b);
}

fn all_down_fails_fast_without_a_connect(path: Path, tag: &str) {
    let (rig, dir) = (Rig::isolated(tag, WORKERS), TempDir::new(tag));
    let a = Backend::echo(server_listener(&rig));
    let b = Backend::echo(server_listener(&rig));
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let h = Health::start(path, tag, &[a_addr, b_addr], rig, dir);
    a.stop();
    b.stop();
    h.wait_state(a_addr, "down", DOWN_WITHIN);
    h.wait_state(b_addr, "down", DOWN_WITHIN);
    let (a0, b0, c0) = (h.server(a_addr), h.server(b_addr), h.counters());
    const CLIENTS: u64 = 3;
    let (addr, cfg) = (h.addr(), h.stack.client_config());
    let ends: Vec<Result<usize, ErrorKind>> = h.stack.rig.client.run(move || {
        (0..CLIENTS)
            .map(|_| {
                let mut tls = tls_connect(addr, &cfg);
                tls.write_all(b"anyone there?\n").map_err(|e| e.kind())?;
                let mut buf = [0u8; 64];
                tls.read(&mut buf).map_err(|e| e.kind())
            })
            .collect()
    });
    for (i, end) in ends.iter().enumerate() {
        // close_notify (Ok(0)) or an EOF without it: closed, no data, no hang, no reset.
        assert!(
            matches!(end, Ok(0) | Err(ErrorKind::UnexpectedEof)),
            "client {i}: a polite close, got {end:?}\n{}",
            h.stack.log()
        );
    }
    let (a1, b1) = (h.server(a_addr), h.server(b_addr));
    let c1 = wait_until(&h, |c| {
        n(&c["backend_all_down"]) >= n(&c0["backend_all_down"]) + CLIENTS
    });
    assert_eq!(
        n(&c1["backend_all_down"]),
        n(&c0["backend_all_down"]) + CLIENTS,
        "each counted once: {c0} -> {c1}"
    );
    // No connect attempt was made: nothing moved on either server or in the worker totals.
    assert_eq!(attempts(&a1), attempts(&a0), "{a0} -> {a1}");
    assert_eq!(attempts(&b1), attempts(&b0), "{b0} -> {b1}");
    for name in [
        "backend_connect_errors",
        "backend_connect_timeouts",
        "backend_connects",
    ] {
        assert_eq!(n(&c1[name]), n(&c0[name]), "{name}: {c0} -> {c1}");
    }
    assert!(
        h.stack.log().contains("every backend server is down"),
        "warned: {}",
        h.stack.log()
    );
}

/// Polls the path's counters until `f` holds (at most 10 s); returns the last ones.
fn wait_until(h: &Health, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = h.counters();
        if f(&c) || Instant::now() >= deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kernel_dead_backend_is_skipped_then_comes_back() {
    dead_backend_is_skipped_then_comes_back(Path::Kernel, "hk-skip");
}

#[test]
fn bypass_dead_backend_is_skipped_then_comes_back() {
    dead_backend_is_skipped_then_comes_back(Path::Bypass, "hb-skip");
}

#[test]
fn kernel_all_down_fails_fast_without_a_connect() {
    all_down_fails_fast_without_a_connect(Path::Kernel, "hk-all");
}

#[test]
fn bypass_all_down_fails_fast_without_a_connect() {
    all_down_fails_fast_without_a_connect(Path::Bypass, "hb-all");
}
