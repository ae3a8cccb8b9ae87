//! End-to-end tests of splicing on the kernel path: a plain (`tls = false`, `mode = "kernel"`)
//! listener moves bytes socket → pipe → socket with splice(2) (`limits.splice`, on by
//! default). Each test checks what a client and a backend see (every byte, in order, sha256
//! compared; FIN in each direction on its own; RST), the counters (`spliced_bytes` proves the
//! pipe carried the bytes, the byte counts equal what was sent) and that tern is back where it
//! started (`active` 0, its file descriptors bounded).
//!
//! Time is bounded: read/write timeouts on every socket, short `timeouts.send_ms`, deadlines on
//! every wait.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::*;
use tern_tests::backend::{pattern_fill, Backend};

const MIB: u64 = 1 << 20;

/// tern with a plain kernel listener in front of `backend` and a short send deadline.
fn plain_stack(tag: &str, backend: SocketAddr, rig: tern_tests::rig::Rig) -> Stack {
    let dir = tern_tests::rig::TempDir::new(tag);
    Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend],
            listener_extra: "tls = false",
            toml_extra: "[timeouts]\nsend_ms = 2000\nidle_ms = 20000\n\n[limits]\nsplice = true\n",
            ..StackOptions::default()
        },
    )
}

/// Writes `len` bytes of the pattern to `w`; returns their sha256.
fn send_pattern(w: &mut impl Write, len: u64) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern_fill(off, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex(h))
}

/// Reads `r` to EOF; returns (bytes, sha256).
fn read_all(r: &mut impl Read) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hex(h)));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

fn hex(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until tern holds no connection.
#[track_caller]
fn wait_idle(s: &Stack) -> serde_json::Value {
    wait_stats(s, "active back to 0", |st| {
        st["total"]["active"].as_u64() == Some(0)
    })
}

/// tern's open file descriptors.
fn fds(s: &Stack) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", s.tern.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits (at most 10 s) until both workers (`workers.count = 2` in the test stack) have
/// opened their io_uring: tern answers as soon as one worker listens, and a ring opened after
/// a test's first fd count looks like a leaked fd.
fn wait_workers_up(s: &Stack) {
    let rings = || {
        std::fs::read_dir(format!("/proc/{}/fd", s.tern.pid()))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|l| l.as_os_str() == "anon_inode:[io_uring]")
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rings() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "workers' rings not open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One client through tern to the echo backend: `len` bytes up while the echo comes down,
/// then FIN up; the echo backend answers the FIN with its own after the last byte. Returns
/// (sent sha, received bytes, received sha).
fn echo_transfer(addr: SocketAddr, len: u64) -> (String, u64, String) {
    let c = connect_guarded(addr);
    let mut reader = c.try_clone().expect("clone");
    let down = std::thread::spawn(move || read_all(&mut reader).expect("read the echo"));
    let mut w = &c;
    let sent = send_pattern(&mut w, len).expect("send");
    c.shutdown(Shutdown::Write).expect("FIN");
    let (got, sha) = down.join().expect("reader");
    (sent, got, sha)
}

/// 10 MiB each way through an echo backend: both directions intact, the client's FIN reaches
/// the backend and the backend's comes back after the last byte (half-close, client first),
/// the pipe carried the bytes, and the byte counts equal what was sent.
#[test]
fn ten_mib_each_way_is_intact_spliced_and_counted() {
    let (rig, _) = Stack::rig("splice-echo");
    let backend = Backend::echo(server_listener(&rig));
    let s = plain_stack("splice-echo", backend.addr(), rig);
    let addr = s.addr();
    let len = 10 * MIB;
    let (sent, got, sha) = s.rig.client.run(move || echo_transfer(addr, len));
    assert_eq!(got, len, "every byte came back\n{}", s.log());
    assert_eq!(sha, sent, "in order and unchanged");
    let st = wait_idle(&s);
    let t = &st["total"];
    for name in [
        "client_bytes_in",
        "client_bytes_out",
        "backend_bytes_in",
        "backend_bytes_out",
    ] {
        assert_eq!(t[name].as_u64(), Some(len), "{name}: {st}");
    }
    // Both directions: the client sends first, so its first receive goes through buffers
    // (at most one receive's worth each way); everything after it is spliced.
    assert!(
        t["spliced_bytes"].as_u64().unwrap_or(0) >= 2 * len - MIB,
        "the pipes carried (nearly) all of both directions: {st}"
    );
    assert_eq!(t["splice_fallbacks"].as_u64(), Some(0), "{st}");
    assert_eq!(t["client_errors"].as_u64(), Some(0), "{st}");
}

/// The backend finishes first: it sends 10 MiB and its FIN, then reads what the client sends
/// after having seen that FIN (10 MiB) to the client's FIN. Half-close with the backend first.
#[test]
fn backend_fin_first_then_client_sends_ten_mib() {
    let (rig, _) = Stack::rig("splice-bfin");
    let listener = server_listener(&rig);
    let backend_addr = listener.local_addr().expect("addr");
    let len = 10 * MIB;
    let (tx, rx) = mpsc::channel();
    let backend = std::thread::spawn(move || {
        // The test's client is the connection whose first byte is `x` (any other, e.g. a
        // readiness probe's, is dropped).
        let mut c = listener
            .incoming()
            .take(8)
            .filter_map(Result::ok)
            .find_map(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                c.set_write_timeout(Some(Duration::from_secs(30))).ok()?;
                let mut first = [0u8; 1];
                (c.read_exact(&mut first).is_ok() && first == *b"x").then_some(c)
            })
            .expect("the client's connection");
        let sent = send_pattern(&mut c, len).expect("backend send");
        c.shutdown(Shutdown::Write).expect("backend FIN");
        let got = read_all(&mut c).expect("backend read");
        let _ = tx.send((sent, got));
    });
    let s = plain_stack("splice-bfin", backend_addr, rig);
    let addr = s.addr();
    let (down, up_sent) = s.rig.client.run(move || {
        let mut c = connect_guarded(addr);
        // The backend connects on the first byte (`connect = "first-byte"`).
        c.write_all(b"x").expect("first byte");
        let down = read_all(&mut c).expect("client read");
        let up_sent = send_pattern(&mut c, len).expect("client send after the FIN");
        c.shutdown(Shutdown::Write).expect("client FIN");
        let mut rest = [0u8; 1];
        assert_eq!(c.read(&mut rest).expect("EOF stays"), 0);
        (down, up_sent)
    });
    let (backend_sent, (backend_got, backend_sha)) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("backend done");
    backend.join().expect("backend thread");
    assert_eq!(
        down,
        (len, backend_sent),
        "the backend's 10 MiB, then its FIN"
    );
    // The backend read the first byte, then the client's 10 MiB after its own FIN.
    assert_eq!(backend_got, len, "{}", s.log());
    assert_eq!(backend_sha, up_sent);
    let st = wait_idle(&s);
    let t = &st["total"];
    assert_eq!(t["client_bytes_in"].as_u64(), Some(len + 1), "{st}");
    assert_eq!(t["backend_bytes_out"].as_u64(), Some(len + 1), "{st}");
    assert_eq!(t["client_bytes_out"].as_u64(), Some(len), "{st}");
    assert_eq!(t["backend_bytes_in"].as_u64(), Some(len), "{st}");
    assert!(t["spliced_bytes"].as_u64().unwrap_or(0) > len, "{st}");
    assert_eq!(t["client_errors"].as_u64(), Some(0), "{st}");
}

/// A client that resets mid-transfer: tern counts a client error, resets the backend, frees
/// the connection, and the next client's transfer is whole.
#[test]
fn client_reset_mid_transfer() {
    let (rig, _) = Stack::rig("splice-rst");
    let backend = Backend::echo(server_listener(&rig));
    let s = plain_stack("splice-rst", backend.addr(), rig);
    let addr = s.addr();
    s.rig.client.run(move || {
        let mut c = connect_guarded(addr);
        let mut w = &c;
        send_pattern(&mut w, 2 * MIB).expect("send");
        let mut buf = vec![0u8; 256 * 1024];
        c.read_exact(&mut buf).expect("some echo");
        linger_zero(&c);
        drop(c);
    });
    let st = wait_idle(&s);
    assert_eq!(st["total"]["client_errors"].as_u64(), Some(1), "{st}");
    let (sent, got, sha) = s.rig.client.run(move || echo_transfer(addr, MIB));
    assert_eq!((got, sha), (MIB, sent), "the next client is served whole");
    wait_idle(&s);
}

/// A client that never reads while its backend streams: the pipe fills (bounded), the
/// backend is held back by TCP back pressure, the connection is reset at `timeouts.send_ms`,
/// another client is served meanwhile, and tern's fds come back (the stuck pipe is closed,
/// not pooled).
#[test]
fn client_that_never_reads_is_bounded() {
    let (rig, _) = Stack::rig("splice-stuck");
    let listener = server_listener(&rig);
    let backend_addr = listener.local_addr().expect("addr");
    // The backend: the connection that starts with `go` gets an endless stream (until it
    // breaks; the bytes it managed to write come back on `streamed`), the others an echo.
    let (streamed_tx, streamed) = mpsc::channel();
    std::thread::spawn(move || {
        for c in listener.incoming().take(8) {
            let Ok(mut c) = c else { return };
            let _ = c.set_write_timeout(Some(Duration::from_secs(30)));
            let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
            let mut first = [0u8; 2];
            if c.read_exact(&mut first).is_err() {
                continue;
            }
            if first == *b"go" {
                let tx = streamed_tx.clone();
                std::thread::spawn(move || {
                    let chunk = vec![7u8; 64 * 1024];
                    let mut sent = 0u64;
                    while sent < 1 << 30 && c.write_all(&chunk).is_ok() {
                        sent += chunk.len() as u64;
                    }
                    let _ = tx.send(sent);
                });
            } else {
                std::thread::spawn(move || {
                    if c.write_all(&first).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        }
    });
    let s = plain_stack("splice-stuck", backend_addr, rig);
    let addr = s.addr();
    wait_workers_up(&s);
    let fds_before = fds(&s);
    let stuck = s.rig.client.run(move || {
        let mut c = connect_guarded(addr);
        c.write_all(b"go").expect("first bytes");
        c
    });
    // Served while the other one is stuck.
    let (sent, got, sha) = s.rig.client.run(move || echo_transfer(addr, 4 * MIB));
    assert_eq!(
        (got, sha),
        (4 * MIB, sent),
        "the other client is served whole"
    );
    let st = wait_stats(&s, "the send deadline", |st| {
        st["total"]["send_timeouts"].as_u64() == Some(1)
    });
    let streamed = streamed
        .recv_timeout(Duration::from_secs(60))
        .expect("the streaming backend stopped");
    assert!(
        streamed < 64 * MIB,
        "the backend was held back, not let write {streamed} bytes: {st}"
    );
    drop(stuck);
    wait_idle(&s);
    let fds_after = fds(&s);
    // Empty pipes stay pooled (2 fds each): at most the echo connection's two and the stuck
    // one's client → backend pipe; its full backend → client pipe is closed (a leak would add
    // its 2).
    assert!(
        fds_after <= fds_before + 6,
        "fds back to where they were ({fds_before} → {fds_after})\n{}",
        s.log()
    );
    assert!(
        std::path::Path::new(&format!("/proc/{}", s.tern.pid())).exists(),
        "tern is up"
    );
}
