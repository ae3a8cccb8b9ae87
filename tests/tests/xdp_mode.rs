//! End-to-end tests of `mode = "bypass"` listeners: tern attaches its XDP program to the
//! server-side veth, traffic still flows (the program passes everything in this version), the
//! program's counters appear in `tern ctl stats`, and a killed tern leaves nothing attached.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;

fn xdp_attached(s: &Stack) -> bool {
    let out = s
        .rig
        .server_command("ip")
        .args(["link", "show", "dev", &s.rig.server_if])
        .output()
        .expect("ip link show");
    // "prog/xdp id N": the namespace names in the same output may contain "xdp" too.
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

#[test]
fn xdp_listener_serves_and_counts_then_detaches_on_kill() {
    let (rig, dir) = Stack::rig("xdp");
    let backend = Backend::demo_http(server_listener(&rig));
    let listener_extra = format!("interface = \"{}\"\n", rig.server_if);
    let mut s = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr()],
            listener_extra: &listener_extra,
            ..Default::default()
        },
    );
    assert!(
        xdp_attached(&s),
        "the XDP program is attached while tern runs"
    );

    let out = s.curl(&[
        "--http1.1",
        &s.url("/bytes/100000"),
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
    ]);
    assert_ok(&out, "curl through an xdp listener", &s.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "100000");

    let st = s.stats();
    let xdp = &st["xdp"][0];
    assert_eq!(xdp["interface"], s.rig.server_if.as_str());
    assert_eq!(xdp["mode"], "native", "veth supports native XDP");
    let c = &xdp["counters"];
    let packets = c["packets"].as_u64().expect("packets");
    let tcp = c["tcp"].as_u64().expect("tcp");
    // XDP sees the server's inbound frames: the client's handshake, request and ACKs.
    assert!(tcp >= 5, "the program saw the client's TCP segments: {c}");
    assert!(packets >= tcp, "counters add up: {c}");
    assert_eq!(
        c["ipv4"].as_u64().expect("ipv4")
            + c["ipv6"].as_u64().expect("ipv6")
            + c["other"].as_u64().expect("other"),
        packets - c["malformed"].as_u64().expect("malformed"),
        "every frame is IPv4, IPv6, other or malformed: {c}"
    );

    // kill -9: the bpf link dies with the process, so nothing stays attached and the kernel
    // answers the port itself (a RST: nothing listens any more).
    s.tern.signal(libc::SIGKILL);
    s.tern
        .wait_exit(Duration::from_secs(10))
        .expect("tern died");
    let deadline = Instant::now() + Duration::from_secs(5);
    while xdp_attached(&s) {
        assert!(
            Instant::now() < deadline,
            "XDP program still attached after kill -9"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = s.addr();
    let err = s.rig.client.run(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .expect_err("nothing listens")
    });
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the kernel answers with RST: {err}"
    );
}
