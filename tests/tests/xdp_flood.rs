//! End-to-end tests of the XDP flood defences (`[xdp] syn_rate_per_source`): a SYN flood from
//! one source is cut at the XDP program, on a bypass listener and on a kernel listener with an
//! `interface`, every drop is counted (`rate_limited`), and other sources still connect. Real
//! frames from the client namespace over a two-queue veth (`tern_tests::pktgen`). And with
//! `[xdp] syn_cookies = "xdp"`, real clients complete TLS handshakes whose SYN-ACK the XDP
//! program made (rustls TLS clients and `tern-load --plain`), with and without TCP timestamps,
//! while the workers never see a SYN. Needs `cargo build -p tern -p tern-load`.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::*;
use tern_tests::rig::{Rig, TempDir};

const BYPASS_PORT: u16 = 4443;
/// One source may open 10 connections a second, 20 back to back.
const RATE: u64 = 10;
const BURST: u64 = 20;

/// tern with a kernel TLS listener on :443 and a bypass listener on :4443, both on the rig's
/// server-side veth, with the per-source SYN limit on.
fn limited_stack(tag: &str) -> Stack {
    let rig = Rig::isolated(tag, 2);
    let dir = TempDir::new(tag);
    let backend = dead_port(&rig);
    let toml_extra = format!(
        "[xdp]\nhugepages = \"off\"\nframes_per_worker = 4096\nsyn_rate_per_source = {RATE}\nsyn_burst_per_source = {BURST}\n"
    );
    Stack::with_bypass_listener(rig, dir, BYPASS_PORT, true, vec![backend], &toml_extra)
}

fn xdp(st: &serde_json::Value, name: &str) -> u64 {
    counter_at(&st["xdp"][0], &["counters", name])
}

/// SYNs tern's stack answered (one SYN-ACK each).
fn syns_handled(st: &serde_json::Value) -> u64 {
    counter_at(st, &["bypass", "tcp", "syn_acks_sent"])
}

/// Sends `n` SYNs from `src_ip` (one address) to `port`, from the client namespace.
fn flood(s: &Stack, src_ip: Ipv4Addr, port: u16, n: u64) {
    send_syns_from_client(s, syn_spec(s, src_ip, port, 1000), n);
}

/// An address on the client's subnet that no interface has: replies to it go nowhere.
fn unassigned(s: &Stack, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(s.rig.client_ip) + offset)
}

fn assert_terminal_invariant(st: &serde_json::Value) {
    let sum: u64 = [
        "steered",
        "passed",
        "no_socket",
        "blocked",
        "rate_limited",
        "syn_cookies",
    ]
    .iter()
    .map(|k| xdp(st, k))
    .sum();
    assert_eq!(sum, xdp(st, "packets"), "every frame has one fate: {st}");
}

#[test]
fn a_one_source_syn_flood_is_cut_at_xdp_on_both_paths() {
    let s = limited_stack("xdpflood");
    let before = s.stats();
    let handled_before = syns_handled(&before);
    let limited_before = xdp(&before, "rate_limited");

    // Bypass listener: 2000 SYNs from one address. It gets its burst plus the rate for the
    // time the flood and the check take (far below 2000 at 10/s); the rest never reach a
    // worker. The sum is exact: every SYN either reached the stack or was dropped at XDP.
    const N: u64 = 2000;
    flood(&s, unassigned(&s, 100), BYPASS_PORT, N);
    let st = wait_stats(&s, "every flood SYN accounted", |st| {
        syns_handled(st) - handled_before + xdp(st, "rate_limited") - limited_before >= N
    });
    let handled = syns_handled(&st) - handled_before;
    let limited = xdp(&st, "rate_limited") - limited_before;
    assert_eq!(handled + limited, N, "{st}");
    assert!(handled >= BURST, "the burst got through: {st}");
    assert!(limited >= N / 2, "the flood was cut at XDP: {st}");

    // Kernel listener on the same interface: another flooding address is cut too.
    flood(&s, unassigned(&s, 101), 443, N);
    let st = wait_stats(&s, "kernel listener's flood dropped", |st| {
        xdp(st, "rate_limited") - limited_before >= limited + N / 2
    });
    assert_terminal_invariant(&st);

    // A well-behaved client (its own address, its own schedule) still connects on both paths.
    for port in [443, BYPASS_PORT] {
        let addr = SocketAddr::from((s.rig.server_ip, port));
        let connected = s.rig.client.run(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(|_| ())
        });
        assert!(
            connected.is_ok(),
            "connect to {addr}: {connected:?}\n{}",
            s.log()
        );
    }
}

/// The plain (`tls = false`) bypass listener `tern-load --plain` connects to.
const PLAIN_PORT: u16 = 4444;

/// `tern-load` beside the test binaries (`cargo build -p tern-load`).
fn tern_load_binary() -> std::path::PathBuf {
    let tern = tern_tests::rig::tern_binary();
    tern.with_file_name("tern-load")
}

/// tern with an echo backend and bypass listeners on :4443 (TLS) and :4444 (plain) whose SYNs the XDP program answers
/// (`syn_cookies = "xdp"`); the client's veth end runs `tern_pass`, since veth delivers
/// `XDP_TX` frames only to a peer in NAPI mode.
fn cookie_stack(
    tag: &str,
) -> (
    Stack,
    tern_tests::backend::Backend,
    tern::bypass::xdp::PassProgram,
) {
    let (rig, dir) = Stack::rig(tag);
    let backend = tern_tests::backend::Backend::echo(server_listener(&rig));
    let listener_extra = format!(
        "\n[[listener]]\naddress = \"{ip}:{BYPASS_PORT}\"\nmode = \"bypass\"\ninterface = \"{iface}\"\n\n[[listener]]\naddress = \"{ip}:{PLAIN_PORT}\"\nmode = \"bypass\"\ninterface = \"{iface}\"\ntls = false\n",
        iface = rig.server_if,
        ip = rig.server_ip,
    );
    let client_if = rig.client_if.clone();
    let pass = rig
        .client
        .run(move || tern::bypass::xdp::attach_pass(&client_if, tern::config::XdpAttach::Native))
        .expect("tern_pass on the client's veth end");
    let stack = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr()],
            listener_extra: Box::leak(listener_extra.into_boxed_str()),
            toml_extra:
                "[xdp]\nhugepages = \"off\"\nframes_per_worker = 4096\nsyn_cookies = \"xdp\"\n",
            ..Default::default()
        },
    );
    (stack, backend, pass)
}

#[test]
fn xdp_made_syn_acks_complete_real_handshakes_with_and_without_timestamps() {
    let (s, _backend, _pass) = cookie_stack("xdpcookie");
    let addr = SocketAddr::from((s.rig.server_ip, BYPASS_PORT));
    const PER_ROUND: u64 = 8;
    for timestamps in [true, false] {
        let sysctl = format!("net.ipv4.tcp_timestamps={}", u8::from(timestamps));
        let out = s
            .rig
            .client_command("sysctl")
            .args(["-q", "-w", &sysctl])
            .output()
            .expect("run sysctl");
        assert_ok(&out, &sysctl, &s.log());
        let before = s.stats();
        let cfg = s.client_config();
        for i in 0..PER_ROUND {
            let cfg = cfg.clone();
            let done = s.rig.client.run(move || echo_request(addr, &cfg, i as u32));
            assert!(
                done.is_ok(),
                "timestamps {timestamps}, request {i}: {done:?}\n{}",
                s.log()
            );
        }
        // tern-load's new connections (bounded: one second, four at a time).
        let plain = format!("{}:{PLAIN_PORT}", s.rig.server_ip);
        let out = s
            .rig
            .client_command(&tern_load_binary().display().to_string())
            .args(["--plain", "--connect", &plain, "--mode", "new-conn"])
            .args(["--close", "reset", "--duration", "1s", "--concurrency", "4"])
            .args(["--timeout", "5s", "--json", "--quiet"])
            .output()
            .expect("run tern-load (cargo build -p tern-load)");
        assert_ok(&out, "tern-load", &s.log());
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("tern-load --json");
        let loaded = counter_at(&report, &["requests", "completed"]);
        assert!(loaded > 0, "tern-load completed connections: {report}");
        assert_eq!(
            counter_at(&report, &["errors", "total"]),
            0,
            "timestamps {timestamps}: tern-load without errors: {report}"
        );
        let st = wait_stats(&s, "the connections counted", |st| {
            counter_at(st, &["bypass", "tcp", "connections_created"])
                - counter_at(&before, &["bypass", "tcp", "connections_created"])
                >= PER_ROUND + loaded
        });
        let made = xdp(&st, "syn_cookies") - xdp(&before, "syn_cookies");
        assert!(
            made >= PER_ROUND + loaded,
            "timestamps {timestamps}: every SYN answered at XDP ({made}): {st}"
        );
        assert_eq!(
            syns_handled(&st),
            syns_handled(&before),
            "timestamps {timestamps}: the workers sent no SYN-ACK: {st}"
        );
        assert_eq!(
            counter_at(&st, &["bypass", "tcp", "rx_bad_cookie"]),
            counter_at(&before, &["bypass", "tcp", "rx_bad_cookie"]),
            "timestamps {timestamps}: every XDP cookie validated: {st}"
        );
        assert_terminal_invariant(&st);
    }
}
