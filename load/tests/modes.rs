//! End-to-end tests of the `tern-load` binary against the in-process rustls server of
//! `support` on 127.0.0.1: every mode, open and closed loop, several processes, source-address
//! binding, a target that never answers, and the JSON report's shape and counts. Each run is
//! bounded (about a second) and each test also bounds the child process from outside.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Behaviour, TestServer};

/// The outside bound on one tern-load run; tern-load must end well before it on its own.
const RUN_LIMIT: Duration = Duration::from_secs(60);

struct Run {
    json: Value,
    code: i32,
    stderr: String,
    took: Duration,
}

/// Runs tern-load against `server` with `--json` and the given arguments.
#[track_caller]
fn run(server: &TestServer, args: &[&str]) -> Run {
    let connect = server.addr.to_string();
    let ca = server
        .ca_path
        .to_str()
        .expect("UTF-8 temp path")
        .to_string();
    let mut argv: Vec<&str> = vec!["--connect", &connect, "--ca", &ca, "--json"];
    argv.extend_from_slice(args);
    run_raw(&argv)
}

#[track_caller]
fn run_raw(argv: &[&str]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args(argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern-load");
    loop {
        if child.try_wait().expect("poll tern-load").is_some() {
            break;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("tern-load {argv:?} did not stop by itself within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect tern-load output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}\nstderr: {stderr}"))
    };
    Run {
        json,
        code: out.status.code().unwrap_or(-1),
        stderr,
        took: start.elapsed(),
    }
}

#[track_caller]
fn u(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path} is not an unsigned integer in {v:#}"))
}

#[track_caller]
fn f(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

/// Fields every report has, with the types the bench harness relies on.
#[track_caller]
fn check_shape(r: &Run, mode: &str) {
    let j = &r.json;
    assert_eq!(r.code, 0, "exit code; stderr:\n{}", r.stderr);
    assert_eq!(j["tool"], "tern-load", "tool");
    assert_eq!(j["schema"], 1, "schema version");
    assert_eq!(j["mode"], mode, "mode");
    for key in [
        "elapsed_s",
        "requests.completed",
        "requests.in_window",
        "requests.rate_per_s",
        "errors.total",
        "throughput_mb_per_s",
        "cpu.window_us",
        "cpu.total_us",
        "connections_opened",
        "handshakes.full",
        "handshakes.resumed",
        "bytes.tls_received",
    ] {
        f(j, key);
    }
    assert!(j["machine"]["busy_us"].is_u64(), "machine busy time: {j:#}");
    assert!(
        u(j, "cpu.total_us") >= u(j, "cpu.window_us"),
        "total CPU covers the window"
    );
    assert_eq!(u(j, "members_lost"), 0, "no member lost");
    assert!(
        r.stderr.contains("tern-load "),
        "human summary on stderr: {}",
        r.stderr
    );
}

#[test]
fn new_conn_closed_loop_counts_one_full_handshake_per_request() {
    let server = TestServer::start(Behaviour::Http);
    let r = run(
        &server,
        &[
            "--mode",
            "new-conn",
            "--path",
            "/bytes/1024",
            "--concurrency",
            "4",
            "--duration",
            "1",
        ],
    );
    check_shape(&r, "new-conn");
    let j = &r.json;
    let done = u(j, "requests.completed");
    assert!(done > 20, "some transactions completed: {j:#}");
    assert_eq!(u(j, "errors.total"), 0, "no errors: {j:#}");
    assert_eq!(u(j, "status.2xx"), done, "all 2xx");
    assert_eq!(
        u(j, "handshakes.resumed"),
        0,
        "resumption is off in new-conn"
    );
    let full = u(j, "handshakes.full");
    assert!(
        full.abs_diff(u(j, "requests.in_window")) <= 4,
        "one handshake per transaction: {j:#}"
    );
    assert!(
        u(j, "bytes.body_received") >= 1024 * u(j, "requests.in_window"),
        "1 KiB bodies"
    );
    assert!(
        server
            .counters
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= done,
        "server saw them"
    );
    assert_eq!(j["tls"]["version"], "TLSv1_3", "TLS 1.3 by default");
    assert_eq!(j["tls"]["kx_group"], "X25519", "X25519 by default");
    assert_eq!(j["loop"], "closed", "closed loop");
    let lat = &j["latency_us"];
    assert!(
        u(lat, "p50") > 0 && u(lat, "p50") <= u(lat, "p99"),
        "percentiles ordered: {lat}"
    );
    assert!(
        u(lat, "p99") <= u(lat, "p99_9") && u(lat, "p99_9") <= u(lat, "max"),
        "{lat}"
    );
    assert!(
        f(j, "elapsed_s") > 0.9 && f(j, "elapsed_s") < 1.2,
        "1 s window: {j:#}"
    );
}

#[test]
fn resumed_mode_resumes_after_priming() {
    let server = TestServer::start(Behaviour::Http);
    let r = run(
        &server,
        &["--mode", "resumed", "--concurrency", "3", "--duration", "1"],
    );
    check_shape(&r, "resumed");
    let j = &r.json;
    let resumed = u(j, "handshakes.resumed");
    assert!(resumed > 10, "resumptions happened: {j:#}");
    assert_eq!(
        u(j, "handshakes.full"),
        0,
        "primed: no full handshake in the window: {j:#}"
    );
    assert_eq!(u(j, "primed"), 3, "one priming transaction per slot");
    assert_eq!(u(j, "errors.total"), 0, "no errors: {j:#}");
    let server_resumed = server
        .counters
        .handshakes_resumed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        server_resumed >= resumed,
        "the server agrees they were resumptions"
    );
}

#[test]
fn keepalive_uses_its_connections_only() {
    let server = TestServer::start(Behaviour::Http);
    let r = run(
        &server,
        &[
            "--mode",
            "keepalive",
            "--connections",
            "4",
            "--threads",
            "2",
            "--duration",
            "1",
            "--path",
            "/bytes/100",
        ],
    );
    check_shape(&r, "keepalive");
    let j = &r.json;
    assert!(
        u(j, "requests.in_window") > 100,
        "many requests over 4 connections: {j:#}"
    );
    assert_eq!(
        u(j, "connections_opened"),
        0,
        "no connection opened in the window"
    );
    assert_eq!(u(j, "handshakes.full"), 0, "no handshake in the window");
    assert_eq!(u(j, "setup.established"), 4, "4 connections set up");
    assert_eq!(u(j, "reconnects"), 0, "none reconnected");
    let accepted = server
        .counters
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(accepted, 4, "the server saw exactly 4 connections");
}

#[test]
fn bulk_get_and_post_move_large_bodies() {
    let server = TestServer::start(Behaviour::Http);
    let get = run(
        &server,
        &[
            "--mode",
            "bulk",
            "--path",
            "/bytes/1048576",
            "--duration",
            "1",
        ],
    );
    check_shape(&get, "bulk");
    let j = &get.json;
    assert!(
        u(j, "requests.in_window") >= 5,
        "several 1 MiB bodies: {j:#}"
    );
    assert!(
        u(j, "bytes.body_received") >= 1_048_576 * u(j, "requests.in_window"),
        "{j:#}"
    );
    assert!(f(j, "throughput_mb_per_s") > 5.0, "MB/s reported: {j:#}");

    let post = run(
        &server,
        &[
            "--mode",
            "bulk",
            "--body-bytes",
            "262144",
            "--duration",
            "1",
        ],
    );
    check_shape(&post, "bulk");
    let j = &post.json;
    assert_eq!(j["method"], "POST", "--body-bytes implies POST");
    let n = u(j, "requests.in_window");
    assert!(n >= 5, "several uploads: {j:#}");
    assert!(
        u(j, "bytes.body_sent") >= 262_144 * n,
        "upload bytes counted: {j:#}"
    );
    assert_eq!(u(j, "errors.total"), 0, "no errors: {j:#}");
}

#[test]
fn open_loop_holds_the_offered_rate() {
    let server = TestServer::start(Behaviour::Http);
    let r = run(
        &server,
        &[
            "--mode",
            "keepalive",
            "--connections",
            "4",
            "--rate",
            "400/s",
            "--duration",
            "1",
            "--threads",
            "2",
        ],
    );
    check_shape(&r, "keepalive");
    let j = &r.json;
    assert_eq!(j["loop"], "open", "open loop");
    assert_eq!(f(j, "offered_rate_per_s"), 400.0, "offered rate");
    let n = u(j, "requests.in_window");
    assert!(
        (360..=420).contains(&n),
        "about 400 requests in 1 s at 400/s, got {n}: {j:#}"
    );

    let r = run(
        &server,
        &["--mode", "new-conn", "--rate", "100", "--duration", "1"],
    );
    check_shape(&r, "new-conn");
    let n = u(&r.json, "requests.in_window");
    assert!(
        (85..=110).contains(&n),
        "about 100 transactions at 100/s, got {n}"
    );
}

#[test]
fn request_count_bound_is_exact() {
    let server = TestServer::start(Behaviour::Http);
    let r = run(
        &server,
        &[
            "--mode",
            "keepalive",
            "--connections",
            "3",
            "--requests",
            "250",
        ],
    );
    check_shape(&r, "keepalive");
    let j = &r.json;
    assert_eq!(j["stopped_by"], "requests", "stopped by the count");
    assert_eq!(u(j, "requests.completed"), 250, "exactly 250: {j:#}");
    assert_eq!(u(j, "requests.in_window"), 250, "all inside the window");
    assert_eq!(u(j, "requests_limit"), 250, "limit echoed");
}

#[test]
fn idle_connections_are_held_and_counted() {
    let server = TestServer::start(Behaviour::Http);
    let ready = server.ca_path.with_file_name("ready.json");
    let ready_arg = ready.to_str().expect("UTF-8").to_string();
    let r = run(
        &server,
        &[
            "--mode",
            "idle",
            "--connections",
            "30",
            "--duration",
            "0.5",
            "--ready-file",
            &ready_arg,
        ],
    );
    check_shape(&r, "idle");
    let idle = &r.json["idle"];
    assert_eq!(u(idle, "target"), 30, "target");
    assert_eq!(u(idle, "established"), 30, "all established: {idle}");
    assert_eq!(u(idle, "up_at_end"), 30, "all still up at the end: {idle}");
    assert_eq!(u(idle, "failed"), 0, "none failed");
    let text = std::fs::read_to_string(&ready).expect("ready file written");
    let ready_json: Value = serde_json::from_str(&text).expect("ready file is JSON");
    assert_eq!(ready_json["established"], 30, "ready file counts: {text}");
    assert_eq!(u(&r.json, "handshakes.full"), 30, "one handshake each");
}

#[test]
fn idle_over_several_processes_and_source_addresses() {
    let server = TestServer::start(Behaviour::Http);
    let r = run(
        &server,
        &[
            "--mode",
            "idle",
            "--connections",
            "40",
            "--duration",
            "0.5",
            "--processes",
            "2",
            "--threads",
            "2",
            "--idle-requests",
            "1",
            "--source-ips",
            "127.0.0.2-127.0.0.5",
        ],
    );
    check_shape(&r, "idle");
    let j = &r.json;
    assert_eq!(u(j, "processes"), 2, "two processes");
    assert_eq!(u(&j["idle"], "up_at_end"), 40, "all 40 up: {j:#}");
    assert_eq!(u(j, "requests.completed"), 40, "one request per connection");
    let peers = server.counters.peers.lock().expect("peers").clone();
    let expect: std::collections::HashSet<std::net::IpAddr> = (2..=5)
        .map(|i| std::net::IpAddr::from([127, 0, 0, i]))
        .collect();
    assert_eq!(
        peers, expect,
        "connections came from the 4 source addresses"
    );
}

#[test]
fn a_server_that_never_closes_is_reported_not_waited_for() {
    let server = TestServer::start(Behaviour::NeverCloses);
    let r = run(
        &server,
        &[
            "--mode",
            "new-conn",
            "--concurrency",
            "2",
            "--duration",
            "1.5",
        ],
    );
    check_shape(&r, "new-conn");
    let j = &r.json;
    assert!(
        u(j, "close_timeouts") > 0,
        "lingering connections counted: {j:#}"
    );
    assert_eq!(
        u(j, "errors.total"),
        0,
        "a missing close is not an error: {j:#}"
    );
    assert!(
        u(j, "requests.in_window") > 20,
        "transactions went on: {j:#}"
    );
}

#[test]
fn a_silent_target_times_out_and_the_run_still_ends() {
    let server = TestServer::start(Behaviour::Silent);
    let r = run(
        &server,
        &[
            "--mode",
            "new-conn",
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--timeout",
            "300ms",
            "--grace",
            "200ms",
        ],
    );
    let j = &r.json;
    assert_eq!(
        r.code, 1,
        "nothing succeeded: exit 1; stderr:\n{}",
        r.stderr
    );
    assert!(u(j, "errors.timeout") >= 2, "handshakes timed out: {j:#}");
    assert_eq!(u(j, "requests.completed"), 0, "no response");
    assert!(
        r.took < Duration::from_secs(8),
        "ended by itself in {:?}",
        r.took
    );
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let r = run_raw(&["--mode", "idle", "--connect", "127.0.0.1:1", "--insecure"]);
    assert_eq!(r.code, 2, "exit code for a bad combination");
    assert!(
        r.stderr.contains("--connections"),
        "message names the flag: {}",
        r.stderr
    );
    assert_eq!(r.json, Value::Null, "no report on stdout");
    let r = run_raw(&["--mode", "warp", "--connect", "127.0.0.1:1", "--insecure"]);
    assert_eq!(r.code, 2, "clap's exit code for an unknown value");
}

#[test]
fn a_signal_ends_the_window_early_with_a_full_report() {
    let server = TestServer::start(Behaviour::Http);
    let ready = server.ca_path.with_file_name("ready-signal.json");
    let connect = server.addr.to_string();
    let ca = server
        .ca_path
        .to_str()
        .expect("UTF-8 temp path")
        .to_string();
    let ready_arg = ready.to_str().expect("UTF-8").to_string();
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args([
            "--connect",
            &connect,
            "--ca",
            &ca,
            "--json",
            "--mode",
            "keepalive",
        ])
        .args(["--connections", "2", "--processes", "2", "--duration", "60"])
        .args(["--ready-file", &ready_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern-load");
    // The ready file appears when set-up is done and the window is about to open.
    while !ready.exists() {
        assert!(
            start.elapsed() < RUN_LIMIT,
            "no ready file within {RUN_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -INT {}", child.id());
    let out = child.wait_with_output().expect("tern-load output");
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "report after SIGINT is JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        took < Duration::from_secs(20),
        "stopped early, took {took:?}"
    );
    assert_eq!(json["stopped_by"], "signal", "stop reason: {json:#}");
    assert_eq!(u(&json, "members_lost"), 0, "both children reported");
    assert!(
        f(&json, "elapsed_s") < 20.0,
        "the window was cut short: {json:#}"
    );
}
