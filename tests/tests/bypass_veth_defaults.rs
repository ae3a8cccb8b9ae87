//! End-to-end tests of the bypass path on a veth pair as users make it (`ip link add … type
//! veth`, nothing changed: the client end keeps TX checksum offload on, so every TCP segment it
//! sends carries only the pseudo-header sum in its checksum field).
//!
//! What is checked: with the default `tcp.rx_checksum = "auto"`, a `mode = "bypass"` TLS listener
//! serves curl through the bypass path and counts the partial checksums
//! (`bypass.tcp.rx_partial_checksum`) without calling any frame bad and without a warning; with
//! `"verify"`, every SYN is dropped as `rx_bad_checksum` and tern says why in its log (the
//! checksum alarm, at most one per 10 s per worker) instead of failing silently.
//! Not here: the rest of the bypass path's behaviour (`bypass_tls.rs`, `bypass_tcp.rs`), which
//! runs on the rig's usual client veth with offloads off.
//!
//! Each test has its own rig and tern; every wait is bounded (`wait_stats`, curl's
//! `--max-time`, connect timeouts).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;
use tern_tests::rig::{ClientOffloads, Rig, TempDir};

/// The bypass TLS listener's port (the kernel TLS listener, for readiness, is on 443).
const PORT: u16 = 4443;

/// A rig whose client veth keeps its default offloads, a demo HTTP backend on the server
/// side's loopback, and tern in front with a `mode = "bypass"` TLS listener on [`PORT`] and
/// `tcp_table` appended (e.g. `[tcp]\nrx_checksum = "verify"`).
fn start(tag: &str, tcp_table: &str) -> (Stack, Backend) {
    let rig = Rig::isolated_with(tag, 1, ClientOffloads::Default);
    assert_eq!(
        rig.client_tx_checksum_offload(),
        Ok(true),
        "a new veth has TX checksum offload on; without it this test checks nothing"
    );
    let dir = TempDir::new(tag);
    let backend = Backend::demo_http(server_listener(&rig));
    let listener_extra = format!(
        "interface = \"{iface}\"\n\n[[listener]]\naddress = \"{bypass}\"\nmode = \"bypass\"\n\
         interface = \"{iface}\"\ntls = true\n",
        iface = rig.server_if,
        bypass = rig.server_addr(PORT),
    );
    let toml_extra = format!(
        "[xdp]\nhugepages = \"off\"\nframes_per_worker = 4096\n\n\
         [limits]\nmax_connections_per_worker = 256\n\n{tcp_table}\n"
    );
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

/// `curl` in the client namespace against the bypass listener.
fn curl_bypass(s: &Stack, max_time_s: u32, args: &[&str]) -> Output {
    let resolve = format!("{NAME}:{PORT}:{}", s.rig.server_ip);
    s.rig
        .client_command("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(&s.cert.cert)
        .args(["--resolve", &resolve, "--max-time", &max_time_s.to_string()])
        .args(args)
        .output()
        .expect("run curl")
}

fn url(path: &str) -> String {
    format!("https://{NAME}:{PORT}{path}")
}

/// A `bypass.tcp` total.
fn tcp(st: &serde_json::Value, name: &str) -> u64 {
    st["bypass"]["tcp"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no bypass.tcp.{name} in {st}"))
}

/// A `bypass.proxy` total.
fn proxy(st: &serde_json::Value, name: &str) -> u64 {
    st["bypass"]["proxy"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no bypass.proxy.{name} in {st}"))
}

/// The words of the checksum alarm (`tcp::checksum_alarm`) that every mode's message has.
const ALARM: &str = "failed their checksum";

#[test]
fn auto_serves_a_veth_peer_with_default_offloads() {
    let (s, _backend) = start("vdefauto", "");

    let out = curl_bypass(&s, 30, &[&url("/")]);
    assert_ok(&out, "curl GET / through the bypass listener", &s.log());
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("hello from tern demo backend"),
        "unexpected body: {body}"
    );
    let out = curl_bypass(
        &s,
        30,
        &["--data-binary", "partial checksums welcome", &url("/echo")],
    );
    assert_ok(&out, "curl POST through the bypass listener", &s.log());
    assert_eq!(out.stdout, b"partial checksums welcome");

    // Published every 100 ms: wait until both connections are in the counters.
    let st = wait_stats(&s, "two bypass handshakes published", |st| {
        proxy(st, "handshakes") >= 2 && tcp(st, "connections_created") >= 2
    });
    // At least the SYN, the final ACK and the request of each connection were partial.
    assert!(
        tcp(&st, "rx_partial_checksum") >= 6,
        "the client's segments were counted as partial: {st}"
    );
    assert_eq!(tcp(&st, "rx_bad_checksum"), 0, "nothing refused: {st}");
    assert!(
        !s.log().contains(ALARM),
        "no checksum warning when auto accepts the frames:\n{}",
        s.log()
    );
}

#[test]
fn verify_drops_partial_checksums_and_says_why() {
    let (s, _backend) = start("vdefverify", "[tcp]\nrx_checksum = \"verify\"");
    let addr: SocketAddr = s.rig.server_addr(PORT);

    // ATTEMPTS connection attempts, one SYN each (each gives up long before the 1 s
    // retransmission). Flows are spread over the 2 workers by hash, so one of them gets at
    // least half: more than the alarm's 16-frame window, whatever the hash does.
    const ATTEMPTS: usize = 40;
    let refused = s.rig.client.run(move || {
        (0..ATTEMPTS)
            .filter(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_err())
            .count()
    });
    assert_eq!(refused, ATTEMPTS, "no connection gets through \"verify\"");

    let st = wait_stats(&s, "the SYNs counted as bad checksums", |st| {
        tcp(st, "rx_bad_checksum") >= ATTEMPTS as u64
    });
    assert_eq!(
        tcp(&st, "rx_partial_checksum"),
        0,
        "verify accepts none: {st}"
    );
    assert_eq!(tcp(&st, "syn_acks_sent"), 0, "nothing answered: {st}");

    // The worker's housekeeping (every 100 ms) raises the alarm; give it 20 s on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.log().contains(ALARM) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains(ALARM))
        .unwrap_or_else(|| panic!("no checksum warning in tern's log:\n{log}"));
    assert!(line.contains("WARN"), "a warning: {line}");
    assert!(
        line.contains("tcp.rx_checksum"),
        "names the setting: {line}"
    );
    assert!(
        line.contains("ethtool -K <peer> tx off"),
        "names the other fix: {line}"
    );
    // At most one per worker within 10 s (the other worker may or may not have had 16).
    let mut workers: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(ALARM))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("worker=")))
        .collect();
    let lines = workers.len();
    workers.sort_unstable();
    workers.dedup();
    assert_eq!(
        lines,
        workers.len(),
        "one warning per worker at most:\n{log}"
    );
}
