//! End-to-end tests of zero-copy sends on the kernel path (`limits.send_zc = true`): TLS
//! records of 16 KiB and more go out with io_uring SEND_ZC from the registered send slots.
//! Each test checks what the client receives (every byte, sha256 compared), that the bytes
//! were sent zero-copy (`zero_copy_bytes`), and that every connection is freed afterwards
//! (`active` 0) — which needs every SEND_ZC notification in, since a slot (and the
//! connection's entry) waits for it, also when the client resets mid-transfer.
//!
//! Time is bounded: read/write timeouts on every socket, deadlines on every wait.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::*;
use tern_tests::backend::{pattern_sha256_hex, Backend};

const MIB: u64 = 1 << 20;

fn zc_stack(tag: &str) -> (Stack, Backend) {
    Stack::with_backend(
        tag,
        Backend::demo_http,
        StackOptions {
            toml_extra: "[timeouts]\nsend_ms = 5000\n\n[limits]\nsend_zc = true\n",
            ..StackOptions::default()
        },
    )
}

/// `GET /bytes/len` over `tls`; reads at most `limit` body bytes. Returns (body bytes read,
/// sha256 of them).
fn get_bytes(tls: &mut Tls, len: u64, limit: u64) -> (u64, String) {
    tls.write_all(format!("GET /bytes/{len} HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
        .expect("write request");
    tls.flush().expect("flush");
    // The head ends at the first blank line; the rest of what is read is body.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).expect("read head");
        head.push(byte[0]);
        assert!(head.len() < 4096, "response head too long");
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < len.min(limit) {
        let want = (len.min(limit) - got).min(buf.len() as u64) as usize;
        let n = tls.read(&mut buf[..want]).expect("read body");
        assert!(n > 0, "EOF after {got} of {len} bytes");
        h.update(&buf[..n]);
        got += n as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (got, hex)
}

#[test]
fn bulk_downloads_go_out_zero_copy_intact() {
    let (s, _backend) = zc_stack("zcbulk");
    const LEN: u64 = 24 * MIB;
    const CONNS: usize = 3;
    let (cfg, addr) = (s.client_config(), s.addr());
    let handles: Vec<_> = (0..CONNS)
        .map(|_| {
            let cfg = cfg.clone();
            s.rig.client.spawn(move || {
                let mut tls = tls_connect(addr, &cfg);
                // Twice on one connection: slots sent zero-copy are reused.
                let first = get_bytes(&mut tls, LEN, LEN);
                let second = get_bytes(&mut tls, LEN, LEN);
                (first, second)
            })
        })
        .collect();
    let want = pattern_sha256_hex(LEN);
    for h in handles {
        let (first, second) = h.join().expect("client thread");
        assert_eq!(first, (LEN, want.clone()), "first download");
        assert_eq!(second, (LEN, want.clone()), "second download");
    }
    let st = wait_stats(&s, "active back to 0", |st| {
        st["total"]["active"].as_u64() == Some(0)
    });
    let t = &st["total"];
    let zc = t["zero_copy_bytes"].as_u64().unwrap_or(0);
    let out = t["client_bytes_out"].as_u64().unwrap_or(0);
    let body = 2 * CONNS as u64 * LEN;
    // Nearly all of it went zero-copy: only writes under 16 KiB (handshake, a send's short
    // tail) are copied.
    assert!(
        zc >= body * 9 / 10 && zc <= out,
        "zero_copy_bytes {zc} of {out}: {st}"
    );
    assert_eq!(t["client_errors"].as_u64(), Some(0), "{st}");
}

#[test]
fn a_client_reset_mid_download_frees_its_slots_and_connection() {
    let (s, _backend) = zc_stack("zcreset");
    const LEN: u64 = 256 * MIB;
    let (cfg, addr) = (s.client_config(), s.addr());
    let cfg2 = cfg.clone();
    s.rig.client.run(move || {
        for _ in 0..4 {
            let mut tls = tls_connect(addr, &cfg);
            let (got, _) = get_bytes(&mut tls, LEN, 4 * MIB);
            assert_eq!(got, 4 * MIB);
            // Stop reading with tern's sends (and notifications) in flight, then reset.
            std::thread::sleep(Duration::from_millis(100));
            linger_zero(&tls.sock);
            drop(tls);
        }
    });
    wait_stats(&s, "active back to 0", |st| {
        st["total"]["active"].as_u64() == Some(0)
    });
    // The worker still serves: its slot pool is whole again.
    let want = pattern_sha256_hex(8 * MIB);
    let got = s.rig.client.run(move || {
        let mut tls = tls_connect(addr, &cfg2);
        get_bytes(&mut tls, 8 * MIB, 8 * MIB)
    });
    assert_eq!(got, (8 * MIB, want));
    assert!(s.total("zero_copy_bytes") >= 16 * MIB);
}
