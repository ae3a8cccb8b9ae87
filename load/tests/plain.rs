//! End-to-end tests of `tern-load --plain` (plain TCP echo, no TLS) against the package's own
//! `tern-echo` on 127.0.0.1: every plain mode completes operations without errors and counts
//! the echoed bytes, a peer that answers with other bytes is reported as failing, and the
//! plain-only argument rules hold. Every run is bounded (about a second), and each child is
//! also bounded from outside.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A running `tern-echo`, killed on drop.
struct Echo {
    child: Child,
    addr: String,
}

impl Echo {
    fn start() -> Echo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern-echo"))
            .args(["--listen", "127.0.0.1:0", "--max-seconds", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern-echo");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut line = String::new();
        BufReader::new(stderr)
            .read_line(&mut line)
            .expect("read tern-echo's first line");
        let addr = line
            .trim()
            .strip_prefix("tern-echo: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from tern-echo: {line:?}"))
            .to_owned();
        Echo { child, addr }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    json: Value,
    code: i32,
    stderr: String,
}

#[track_caller]
fn run(argv: &[&str]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args(argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern-load");
    while child.try_wait().expect("poll tern-load").is_none() {
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

#[test]
fn every_plain_mode_echoes_without_errors() {
    let echo = Echo::start();
    for (mode, extra, bytes) in [
        ("new-conn", vec!["--close", "reset"], 64u64),
        (
            "new-conn",
            vec!["--close", "client", "--message-bytes", "100"],
            100,
        ),
        (
            "keepalive",
            vec!["--connections", "4", "--message-bytes", "300"],
            300,
        ),
        (
            "bulk",
            vec!["--connections", "2", "--message-bytes", "200000"],
            200_000,
        ),
    ] {
        let mut argv = vec![
            "--plain",
            "--mode",
            mode,
            "--connect",
            &echo.addr,
            "--duration",
            "700ms",
            "--json",
        ];
        argv.extend(extra.iter().copied());
        let r = run(&argv);
        let j = &r.json;
        assert_eq!(
            r.code, 0,
            "{mode} {extra:?}: exit code; stderr:\n{}",
            r.stderr
        );
        assert_eq!(j["protocol"], "tcp", "{mode}: protocol");
        assert_eq!(u(j, "message_bytes"), bytes, "{mode}: message size");
        assert_eq!(u(j, "errors.total"), 0, "{mode} {extra:?}: errors in {j:#}");
        let completed = u(j, "requests.completed");
        assert!(completed > 0, "{mode}: nothing completed: {j:#}");
        // Every completed operation brought its whole message back; in-window byte counts
        // cover at most the operations that overlapped the window.
        let received = u(j, "bytes.body_received");
        assert!(
            received >= u(j, "requests.in_window").saturating_sub(1) * bytes
                && received <= (completed + 4) * bytes,
            "{mode}: {received} echoed bytes for {completed} operations of {bytes} B"
        );
        assert_eq!(u(j, "bytes.tls_received"), 0, "{mode}: no TLS bytes");
    }
    // Idle: connections are opened and held, nothing is sent.
    let r = run(&[
        "--plain",
        "--mode",
        "idle",
        "--connections",
        "20",
        "--connect",
        &echo.addr,
        "--duration",
        "300ms",
        "--json",
    ]);
    assert_eq!(r.code, 0, "idle: stderr:\n{}", r.stderr);
    assert_eq!(u(&r.json, "idle.established"), 20, "{:#}", r.json);
}

#[test]
fn a_peer_that_does_not_echo_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    // Answers every read with as many `#` bytes: the right length, the wrong content.
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&vec![b'#'; n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let r = run(&[
        "--plain",
        "--mode",
        "keepalive",
        "--connections",
        "1",
        "--connect",
        &addr,
        "--duration",
        "300ms",
        "--json",
    ]);
    assert_eq!(r.code, 1, "no operation may succeed; stderr:\n{}", r.stderr);
    assert!(
        u(&r.json, "errors.http") > 0,
        "wrong bytes must count as http errors: {:#}",
        r.json
    );
    assert_eq!(u(&r.json, "requests.completed"), 0);
}

#[test]
fn plain_argument_rules() {
    for (argv, needle) in [
        (
            vec!["--plain", "--mode", "new-conn", "--close", "server"],
            "never closes first",
        ),
        (vec!["--plain", "--mode", "resumed"], "no sessions"),
        (
            vec!["--mode", "keepalive", "--insecure", "--message-bytes", "9"],
            "needs --plain",
        ),
        (
            vec!["--plain", "--mode", "keepalive", "--message-bytes", "0"],
            "at least 1",
        ),
    ] {
        let mut full = argv.clone();
        full.extend(["--connect", "127.0.0.1:9"]);
        let r = run(&full);
        assert_eq!(r.code, 2, "{argv:?}: exit code; stderr:\n{}", r.stderr);
        assert!(r.stderr.contains(needle), "{argv:?}: {}", r.stderr);
    }
}
