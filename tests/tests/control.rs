//! End-to-end tests of the control socket as an operator meets it: the file's mode, owner and
//! group; a file that is not a socket at its path (refused, left alone); clients that connect
//! and send nothing or half a command while `tern ctl stats` is served; removal at exit.
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
