//! End-to-end tests of the control socket as an operator meets it: the file's mode, owner and
//! group; a file that is not a socket at its path (refused, left alone); clients that connect
//! and send nothing or half a command while `tern ctl stats` is served; removal at exit;
//! `tern ctl conns` counting held connections per state on both paths, and the text format of
//! `conns`, `backends` and `stats`.
//! Each test runs tern in a namespace of its own rig; the socket lives in a temp directory.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;
use tern_tests::backend::Backend;
use tern_tests::rig::{tern_binary, TernProcess};

/// Generous bound for tern to exit after a signal or a failed start on a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

#[track_caller]
fn socket_meta(path: &Path) -> std::fs::Metadata {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is a socket",
        path.display()
    );
    meta
}

/// The stats document arrives while one client holds a connection without sending and
/// another has sent half a command: both are still connected when it does (the server did
/// not wait for either), and both are closed later by the server's deadline.
#[test]
fn stats_are_served_while_other_clients_hold_connections_idle_or_half_sent() {
    let (mut s, _backend) = Stack::with_backend("ctlidle", Backend::echo, StackOptions::default());
    let meta = socket_meta(&s.control);
    assert_eq!(meta.mode() & 0o7777, 0o600, "owner only by default");
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(meta.uid(), euid, "owned by the user tern runs as");

    let idle = UnixStream::connect(&s.control).expect("connect the idle client");
    let stalled = UnixStream::connect(&s.control).expect("connect the stalled client");
    (&stalled)
        .write_all(b"sta")
        .expect("half a command, no newline");
    for _ in 0..3 {
        let stats = s.stats();
        assert!(stats["total"].is_object(), "{stats}");
    }
    for (name, client) in [("idle", &idle), ("stalled", &stalled)] {
        client.set_nonblocking(true).expect("nonblocking");
        let err = (&*client)
            .read(&mut [0u8; 64])
            .expect_err(&format!("{name}: still connected, nothing to read"));
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::WouldBlock,
            "{name}: {err}\n{}",
            s.log()
        );
    }
    // The deadline (10 s from accept) ends both; 60 s only bounds the test.
    for (name, client) in [("idle", &idle), ("stalled", &stalled)] {
        client.set_nonblocking(false).expect("blocking");
        client
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut rest = Vec::new();
        (&*client)
            .read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("{name}: closed by the server, not {e}"));
        assert!(rest.is_empty(), "{name}: no answer to no command: {rest:?}");
    }

    let log = s.log();
    assert!(
        log.contains("control command")
            && log.contains(&format!("uid={euid}"))
            && log.contains("command=\"stats\""),
        "each command is logged with the peer's credentials:\n{log}"
    );

    s.tern.signal(libc::SIGTERM);
    s.expect_clean_exit(EXIT_WITHIN, "SIGTERM");
    assert!(!s.control.exists(), "the socket is removed at exit");
}

/// `mode`, `owner` and `group` from `[control]` are what the file gets; root still connects.
#[test]
fn configured_mode_owner_and_group_are_applied() {
    let nobody = tern::control::user_id("nobody")
        .expect("look up nobody")
        .expect("the image has a user nobody");
    let (s, _backend) = Stack::with_backend(
        "ctlmode",
        Backend::echo,
        StackOptions {
            // Appended right after `[control]`'s `socket` line, so these keys land in it.
            toml_extra: "mode = \"0640\"\nowner = \"nobody\"\ngroup = 4321\n",
            ..StackOptions::default()
        },
    );
    let meta = socket_meta(&s.control);
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (nobody, 4321));
    let out = Command::new(tern_binary())
        .args(["ctl", "--socket"])
        .arg(&s.control)
        .arg("ping")
        .output()
        .expect("tern ctl ping");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pong\n");
}

/// A regular file where the socket should go: tern refuses to start, names the path, and
/// does not touch the file.
#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_left_alone() {
    let (rig, dir) = Stack::rig("ctlfile");
    let path = dir.join("tern.sock");
    std::fs::write(&path, "keep me\n").expect("write the file");
    let config = format!(
        "[[listener]]\naddress = \"{addr}\"\ntls = false\n\n\
         [backend]\nservers = [\"127.0.0.1:9\"]\n\n\
         [workers]\ncount = 1\n\n[control]\nsocket = \"{path}\"\n",
        addr = rig.server_addr(443),
        path = path.display(),
    );
    let mut tern = TernProcess::start(&config, rig.server_netns());
    let status = tern
        .wait_exit(EXIT_WITHIN)
        .unwrap_or_else(|| panic!("tern still runs:\n{}", tern.stderr_text()));
    let log = tern.stderr_text();
    assert_eq!(status.code(), Some(1), "a start-up error: {status}\n{log}");
    assert!(
        log.contains(&path.display().to_string()) && log.contains("not a socket"),
        "the error names the path and what is wrong:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("the file is still there"),
        "keep me\n"
    );
}

/// The listener under test in the `conns` tests (the kernel listener on 443 answers the
/// readiness probe and, on the bypass path, attaches the XDP program).
const CONNS_PORT: u16 = 4443;
/// Bounds the waits for tern to see the clients' connections come and go.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// `tern ctl [args]` against the stack's socket.
fn ctl(s: &Stack, args: &[&str]) -> std::process::Output {
    Command::new(tern_binary())
        .args(["ctl", "--socket"])
        .arg(&s.control)
        .args(args)
        .output()
        .expect("run tern ctl")
}

/// `tern ctl conns`, parsed (its default format is JSON).
#[track_caller]
fn conns(s: &Stack) -> serde_json::Value {
    let out = ctl(s, &["conns"]);
    assert_ok(&out, "tern ctl conns", &s.log());
    serde_json::from_slice(&out.stdout).expect("conns is JSON")
}

/// Polls `tern ctl conns` until `f` holds, for at most [`SETTLE_WITHIN`]; returns that
/// document.
#[track_caller]
fn conns_until(s: &Stack, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + SETTLE_WITHIN;
    loop {
        let doc = conns(s);
        if f(&doc) {
            return doc;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{doc:#}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// tern with a listener under test on `path` ("kernel" or "bypass") at [`CONNS_PORT`] in front
/// of an echo backend; handshakes may take a minute (the test holds some open).
fn conns_stack(path: &str, tag: &str) -> (Stack, Backend) {
    let queues = if path == "bypass" { 2 } else { 1 };
    let (rig, dir) = (
        tern_tests::rig::Rig::isolated(tag, queues),
        tern_tests::rig::TempDir::new(tag),
    );
    let backend = Backend::echo(server_listener(&rig));
    let (listener_extra, bypass_tables) = if path == "bypass" {
        (
            format!(
                "interface = \"{iface}\"\n\n[[listener]]\naddress = \"{addr}\"\n\
                 mode = \"bypass\"\ninterface = \"{iface}\"\n",
                iface = rig.server_if,
                addr = rig.server_addr(CONNS_PORT),
            ),
            "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n\n",
        )
    } else {
        (
            format!(
                "\n[[listener]]\naddress = \"{}\"\n",
                rig.server_addr(CONNS_PORT)
            ),
            "",
        )
    };
    let toml_extra = format!("{bypass_tables}[timeouts]\nhandshake_ms = 120000\n");
    let stack = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr()],
            listener_extra: &listener_extra,
            toml_extra: &toml_extra,
            ..StackOptions::default()
        },
    );
    (stack, backend)
}

/// Three clients connected that say nothing (handshake) and two that finished the handshake
/// and had a request echoed (proxying, the backend holding its connection): `tern ctl conns`
/// counts them in those states on the path under test, in JSON and as a text table, and
/// shows nothing open once they are gone. `--format text` of stats and backends shows their
/// rows.
fn conns_are_counted_per_state(path: &'static str, tag: &str) {
    let (mut s, backend) = conns_stack(path, tag);
    let addr = s.rig.server_addr(CONNS_PORT);
    let cfg = s.client_config();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
    let clients = s.rig.client.spawn(move || {
        // The bypass listener may serve a moment after the kernel one answered the probe.
        let deadline = std::time::Instant::now() + SETTLE_WITHIN;
        let mut proxying = Vec::new();
        while proxying.len() < 2 {
            let attempt = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| e.to_string())
                .map(|sock| {
                    let mut tls = tls_handshake(sock, &cfg, NAME);
                    echo_round_trip(&mut tls, b"GET / HTTP/1.1\r\n\r\n");
                    tls
                });
            match attempt {
                Ok(tls) => proxying.push(tls),
                Err(e) if std::time::Instant::now() >= deadline => {
                    let _ = ready_tx.send(Err(format!("no TLS connection to {addr}: {e}")));
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let silent: Vec<_> = (0..3).map(|_| connect_guarded(addr)).collect();
        let _ = ready_tx.send(Ok(()));
        // Held until the test has looked (bounded: the test gives up long before).
        let _ = close_rx.recv_timeout(Duration::from_secs(300));
        drop(silent);
        drop(proxying);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the clients report")
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));

    let on_path = |doc: &serde_json::Value, state: &str| doc["paths"][path][state].as_u64();
    let doc = conns_until(&s, "3 in handshake and 2 proxying", |d| {
        on_path(d, "handshake") == Some(3)
            && on_path(d, "proxying") == Some(2)
            && on_path(d, "total") == Some(5)
    });
    assert_eq!(doc["unanswered"], 0, "every worker answers: {doc:#}");
    let workers = doc["workers"].as_array().expect("workers");
    let expected_workers = if path == "bypass" { 4 } else { 2 };
    assert_eq!(workers.len(), expected_workers, "{doc:#}");
    let per_worker: u64 = workers
        .iter()
        .filter(|w| w["path"] == path)
        .map(|w| w["counts"]["total"].as_u64().expect("answered"))
        .sum();
    assert_eq!(per_worker, 5, "the workers' rows add up: {doc:#}");

    // The same as a table: the path's row, and its columns in the header's order.
    let out = ctl(&s, &["--format", "text", "conns"]);
    assert_ok(&out, "tern ctl --format text conns", &s.log());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let header: Vec<&str> = text
        .lines()
        .next()
        .expect("a header")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "workers",
            "handshake",
            "waiting",
            "connecting",
            "proxying",
            "half_closed",
            "closing",
            "total"
        ],
        "{text}"
    );
    let row = format!("{path} (all)");
    let cells: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix(row.as_str()))
        .unwrap_or_else(|| panic!("no {row:?} row:\n{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(cells, ["3", "0", "0", "2", "0", "0", "5"], "{text}");

    let out = ctl(&s, &["--format", "text", "backends"]);
    assert_ok(&out, "tern ctl --format text backends", &s.log());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let server = backend.addr().to_string();
    let cells: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with(&server))
        .unwrap_or_else(|| panic!("no row for {server}:\n{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        (cells[1], cells[2], cells[4]),
        ("1", "up", "2"),
        "weight 1, up, the 2 proxied connections active:\n{text}"
    );
    let out = ctl(&s, &["--format", "text", "stats"]);
    assert_ok(&out, "tern ctl --format text stats", &s.log());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("uptime "), "{text}");
    let active: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("active "))
        .unwrap_or_else(|| panic!("no active row:\n{text}"))
        .split_whitespace()
        .collect();
    let column = if path == "bypass" { 2 } else { 1 };
    assert_eq!(active[column], "5", "{path}'s open connections:\n{text}");
    assert!(
        text.lines().any(|l| l.starts_with(&server)),
        "the backend table:\n{text}"
    );

    close_tx.send(()).expect("the clients still wait");
    clients.join().expect("the clients");
    conns_until(&s, "every connection gone", |d| d["total"]["total"] == 0);

    s.tern.signal(libc::SIGTERM);
    s.expect_clean_exit(EXIT_WITHIN, "SIGTERM");
}

#[test]
fn kernel_conns_are_counted_per_state() {
    conns_are_counted_per_state("kernel", "ctlconk");
}

#[test]
fn bypass_conns_are_counted_per_state() {
    conns_are_counted_per_state("bypass", "ctlconb");
}
