//! End-to-end tests of the bypass data plane (`mode = "bypass"` listeners): the XDP program
//! steers the listener's frames into per-queue AF_XDP sockets owned by tern's workers, while
//! everything else (ping, other ports, tern's own kernel listener) still reaches the kernel.
//! Real traffic from the client namespace over a two-queue veth.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tern_tests::rig::{tern_binary, Rig, TempDir};

const BYPASS_PORT: u16 = 4443;

/// tern with a kernel TLS listener on :443 (for readiness and the "kernel still serves" check)
/// and a bypass listener on :4443, both on the rig's server-side veth (2 queues, 2 workers).
fn bypass_stack(tag: &str) -> Stack {
    let rig = Rig::isolated(tag, 2);
    let dir = TempDir::new(tag);
    let backend = dead_port(&rig);
    // 4 KiB pages: tests must not leave hugepages reserved on the machine.
    Stack::with_bypass_listener(
        rig,
        dir,
        BYPASS_PORT,
        true,
        vec![backend],
        "[xdp]\nhugepages = \"off\"\nframes_per_worker = 4096\n",
    )
}

/// A source address on the client's subnet that no interface has: the stack's SYN-ACKs to it
/// are dropped by the client's kernel (not for a local address), so nothing comes back and
/// every frame the workers receive is one the test sent.
fn unassigned_source(s: &Stack) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(s.rig.client_ip) + 100)
}

/// SYNs tern's stack handled: it answers every SYN to a listener with exactly one SYN-ACK
/// (counted even when no TX frame was free for it). Published every 100 ms.
fn syns_handled(st: &serde_json::Value) -> u64 {
    counter_at(st, &["bypass", "tcp", "syn_acks_sent"])
}

fn kernel_dropped(st: &serde_json::Value) -> u64 {
    counter_at(st, &["bypass", "total", "kernel_rx_ring_full"])
        + counter_at(st, &["bypass", "total", "kernel_rx_dropped"])
}

fn assert_terminal_invariant(st: &serde_json::Value) {
    let c = &st["xdp"][0]["counters"];
    let sum: u64 = ["steered", "passed", "no_socket", "blocked", "rate_limited"]
        .iter()
        .map(|k| counter_at(c, &[k]))
        .sum();
    assert_eq!(
        sum,
        counter_at(c, &["packets"]),
        "every frame has exactly one fate: {c}"
    );
}

#[test]
fn bypass_listener_frames_reach_the_workers_and_the_kernel_keeps_the_rest() {
    let s = bypass_stack("bypass");
    let st = s.stats();
    let workers = st["bypass"]["workers"].as_array().expect("bypass workers");
    assert_eq!(
        workers.len(),
        2,
        "one bypass worker per configured worker: {st}"
    );
    assert_eq!(workers[0]["bind"], "copy", "veth has no zero-copy AF_XDP");
    assert_eq!(workers[0]["pages"], "4KiB-pages");

    const N: u64 = 5000;
    send_syns_from_client(&s, syn_spec(&s, unassigned_source(&s), BYPASS_PORT, 64), N);
    // A burst faster than the workers drain their rings (a loaded machine) loses frames in the
    // kernel, as it would on a NIC; those are counted too. Every steered SYN is either handled
    // by the stack in a worker or counted by the kernel as dropped, never both, never neither.
    let st = wait_stats(&s, "every SYN in a worker or dropped by the kernel", |st| {
        syns_handled(st) + kernel_dropped(st) >= N
    });
    assert_eq!(
        syns_handled(&st) + kernel_dropped(&st),
        N,
        "each SYN counted once: {st}"
    );
    assert_eq!(
        counter_at(&st, &["bypass", "total", "rx_frames"]),
        syns_handled(&st),
        "the workers received exactly the SYNs they handled: {st}"
    );
    // How much of the burst the kernel drops depends on how fast the workers drain their
    // rings on this machine at this moment, so no share is asserted: only that every frame is
    // accounted for, once.
    assert_eq!(
        counter_at(&st["xdp"][0], &["counters", "steered"]),
        N,
        "steered == received"
    );
    for w in st["bypass"]["workers"].as_array().expect("workers") {
        let c = &w["counters"];
        assert!(
            counter_at(c, &["rx_frames"])
                + counter_at(c, &["kernel_rx_ring_full"])
                + counter_at(c, &["kernel_rx_dropped"])
                > 0,
            "64 flows reach both workers' queues (received, or dropped by the kernel there): \
             {st}"
        );
    }

    // The kernel still gets everything else: ping, and tern's own kernel listener on :443.
    let ping = s
        .rig
        .client_command("ping")
        .args(["-c", "2", "-i", "0.2", "-W", "2"])
        .arg(s.rig.server_ip.to_string())
        .output()
        .expect("ping");
    assert_ok(&ping, "ping the server side", &s.log());
    let curl = s.curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &s.url("/"),
    ]);
    // The backend is a dead port: tern answers the TLS handshake, then closes (no backend).
    assert!(
        String::from_utf8_lossy(&curl.stderr).contains("Empty reply")
            || curl.status.code() == Some(52),
        "a TLS connection through the kernel listener: {curl:?}"
    );
    let st = s.stats();
    assert!(
        counter_at(&st, &["total", "handshakes"]) >= 1,
        "the kernel listener served TLS: {st}"
    );
    assert!(counter_at(&st["xdp"][0], &["counters", "passed"]) > 0);
    assert_eq!(
        counter_at(&st["xdp"][0], &["counters", "no_socket"]),
        0,
        "every steered frame had a socket"
    );
    assert_terminal_invariant(&st);
}

#[test]
fn frames_the_kernel_drops_for_a_stalled_worker_are_counted() {
    let s = bypass_stack("bypassstall");
    // With tern stopped, nothing drains the AF_XDP rings: once a queue's fill ring (2,048
    // frames per worker here) is used up, the kernel drops what arrives on it.
    s.tern.signal(libc::SIGSTOP);
    const N: u64 = 10_000;
    send_syns_from_client(&s, syn_spec(&s, unassigned_source(&s), BYPASS_PORT, 64), N);
    s.tern.signal(libc::SIGCONT);
    let st = wait_stats(&s, "every SYN in a worker or dropped by the kernel", |st| {
        syns_handled(st) + kernel_dropped(st) >= N
    });
    assert_eq!(
        syns_handled(&st) + kernel_dropped(&st),
        N,
        "each SYN counted once, by a worker or as a kernel drop: {st}"
    );
    assert!(
        kernel_dropped(&st) >= N - 2 * 4096,
        "at most the rings' worth got through while stopped: {st}"
    );
    assert!(
        counter_at(&st, &["bypass", "total", "kernel_fill_ring_empty"]) > 0,
        "the kernel saw the fill rings empty: {st}"
    );
    // Nothing is lost for good: once running again the workers take new frames.
    let before = syns_handled(&st);
    send_syns_from_client(
        &s,
        syn_spec(&s, unassigned_source(&s), BYPASS_PORT, 64),
        100,
    );
    wait_stats(&s, "SYNs after SIGCONT", |st| {
        syns_handled(st) >= before + 100
    });
}

#[test]
fn blocklist_drops_a_source_at_xdp_and_unblock_restores_it() {
    let s = bypass_stack("blocklist");
    let ctl = |args: &[&str]| {
        Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&s.control)
            .args(args)
            .output()
            .expect("tern ctl")
    };
    // A second source on the same veth: blocking one must not affect the other.
    let other = unassigned_source(&s);

    let out = ctl(&["block", &format!("{}/32", s.rig.client_ip)]);
    assert_ok(&out, "tern ctl block", &s.log());
    let out = ctl(&["blocks"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/32", s.rig.client_ip)
    );
    let out = ctl(&["block", "10.0.0.1/8"]);
    assert!(!out.status.success(), "host bits set: refused");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.0.0.1/8"),
        "names the bad prefix: {out:?}"
    );

    send_syns_from_client(&s, syn_spec(&s, s.rig.client_ip, BYPASS_PORT, 16), 1000);
    send_syns_from_client(&s, syn_spec(&s, other, BYPASS_PORT, 16), 500);
    let st = wait_stats(&s, "the other source's SYNs", |st| syns_handled(st) >= 500);
    assert_eq!(
        counter_at(&st["xdp"][0], &["counters", "blocked"]),
        1000,
        "blocked source dropped at XDP: {st}"
    );
    assert_eq!(
        syns_handled(&st),
        500,
        "only the other source reached the workers: {st}"
    );
    assert_terminal_invariant(&st);

    // The blocked source cannot reach the kernel listener either.
    let addr = s.addr();
    let blocked = s.rig.client.run(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_err()
    });
    assert!(
        blocked,
        "a blocked source's connect to :443 does not complete"
    );

    let blocked_before = counter_at(&s.stats()["xdp"][0], &["counters", "blocked"]);
    assert!(
        blocked_before > 1000,
        "the connect attempt was dropped at XDP too"
    );
    let out = ctl(&["unblock", &format!("{}/32", s.rig.client_ip)]);
    assert_ok(&out, "tern ctl unblock", &s.log());
    send_syns_from_client(&s, syn_spec(&s, s.rig.client_ip, BYPASS_PORT, 16), 300);
    // The SYN-ACKs to the real address draw RSTs from the client's kernel; the stack drops
    // those (no connection), so only the SYNs are counted here.
    let st = wait_stats(&s, "SYNs after unblock", |st| syns_handled(st) >= 800);
    assert_eq!(
        counter_at(&st["xdp"][0], &["counters", "blocked"]),
        blocked_before,
        "nothing is blocked after unblock"
    );
    assert_eq!(String::from_utf8_lossy(&ctl(&["blocks"]).stdout).trim(), "");
}

#[test]
fn after_kill_9_the_kernel_answers_the_bypass_port() {
    let mut s = bypass_stack("bypasskill");
    let bypass_addr = SocketAddr::from((s.rig.server_ip, BYPASS_PORT));
    // While tern runs, tern's own stack in the bypass workers answers the bypass port.
    let connected = s.rig.client.run(move || {
        std::net::TcpStream::connect_timeout(&bypass_addr, Duration::from_secs(5)).map(|_| ())
    });
    assert!(
        connected.is_ok(),
        "tern's stack completes the handshake: {connected:?}"
    );

    s.tern.signal(libc::SIGKILL);
    s.tern
        .wait_exit(Duration::from_secs(10))
        .expect("tern died");
    // The bpf link died with the process: nothing is steered any more, and since nothing
    // listens on the port the kernel answers with RST.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kind = s.rig.client.run(move || {
            std::net::TcpStream::connect_timeout(&bypass_addr, Duration::from_millis(500))
                .expect_err("nothing listens")
                .kind()
        });
        if kind == std::io::ErrorKind::ConnectionRefused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the port is still blackholed after kill -9: {kind:?}"
        );
    }
}

#[test]
fn sigterm_stops_the_bypass_workers_and_detaches() {
    let mut s = bypass_stack("bypassterm");
    send_syns_from_client(&s, syn_spec(&s, unassigned_source(&s), BYPASS_PORT, 8), 200);
    wait_stats(&s, "SYNs in the workers", |st| syns_handled(st) >= 200);
    s.tern.signal(libc::SIGTERM);
    s.expect_clean_exit(Duration::from_secs(10), "tern exits on SIGTERM");
    let out = s
        .rig
        .server_command("ip")
        .args(["link", "show", "dev", &s.rig.server_if])
        .output()
        .expect("ip link show");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("prog/xdp"),
        "no XDP program left on the interface"
    );
    assert!(
        !s.log().contains("frames still in flight"),
        "every UMEM frame was home when the workers stopped:\n{}",
        s.log()
    );
}
