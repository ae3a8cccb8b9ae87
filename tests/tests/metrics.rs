//! End-to-end tests of the Prometheus endpoint (`[metrics] address`) on both paths: TLS
//! requests with curl through a kernel-path or a bypass-path listener, then scrapes of
//! `/metrics` from the client namespace, checked with `promtool check metrics` (Debian's
//! `prometheus` package) and against the requests made: the latency histograms of the listener
//! and the backend server count each connection once, and the connection counters summed over
//! the workers agree, as do the backend server's own counters and state
//! (`tern_backend_server_*`); `tern ctl stats` shows the same counts with percentiles. Also: the
//! OpenMetrics encoding for scrapers that ask for it, a bind failure at start-up that names
//! `metrics.address`, and a clean exit with the endpoint running.
//!
//! Counts are compared as differences between a scrape taken once tern is idle after a warm-up
//! request and one taken once every request's connection has closed, so readiness probes and
//! the warm-up do not enter them. Nothing here is timed except as a failure guard.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;
use tern_tests::rig::{Rig, TempDir, TernProcess};

/// The listener under test (kernel or bypass); the kernel listener on 443 answers the readiness
/// probe and, on the bypass path, attaches the XDP program.
const PORT: u16 = 4443;
/// Where the endpoint listens, on the server's veth address.
const METRICS_PORT: u16 = 9100;
/// Requests made, each a connection of its own.
const REQUESTS: u64 = 5;
/// Bounds the waits for tern to settle.
const SETTLE_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Bypass,
}

/// tern on a rig of its own with a kernel listener on 443 and the listener under test on
/// [`PORT`] (`path`), both TLS, in front of the demo HTTP backend, with the endpoint on.
fn start(path: Path, tag: &str) -> (Stack, Backend) {
    let queues = match path {
        Path::Kernel => 1,
        Path::Bypass => 2,
    };
    let (rig, dir) = (Rig::isolated(tag, queues), TempDir::new(tag));
    let backend = Backend::demo_http(server_listener(&rig));
    let listener_extra = match path {
        Path::Kernel => format!("\n[[listener]]\naddress = \"{}\"\n", rig.server_addr(PORT)),
        Path::Bypass => format!(
            "interface = \"{iface}\"\n\n[[listener]]\naddress = \"{addr}\"\nmode = \"bypass\"\n\
             interface = \"{iface}\"\n",
            iface = rig.server_if,
            addr = rig.server_addr(PORT),
        ),
    };
    let bypass_tables = match path {
        Path::Kernel => "",
        Path::Bypass => "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n\n",
    };
    let toml_extra = format!(
        "{bypass_tables}[metrics]\naddress = \"{}\"\n",
        rig.server_addr(METRICS_PORT)
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

/// One HTTPS request through the listener under test, from the client namespace.
fn request(s: &Stack) -> Output {
    let resolve = format!("{NAME}:{PORT}:{}", s.rig.server_ip);
    s.rig
        .client_command("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&s.cert.cert)
        .args(["--resolve", &resolve, "--max-time", "30"])
        .arg(format!("https://{NAME}:{PORT}/"))
        .output()
        .expect("run curl")
}

/// `GET /metrics` from the client namespace, with extra curl arguments; the body.
#[track_caller]
fn scrape_with(s: &Stack, args: &[&str]) -> String {
    let out = s
        .rig
        .client_command("curl")
        .args(["-sS", "--fail", "--max-time", "30"])
        .args(args)
        .arg(format!(
            "http://{}/metrics",
            s.rig.server_addr(METRICS_PORT)
        ))
        .output()
        .expect("run curl");
    assert_ok(&out, "scraping /metrics", &s.log());
    String::from_utf8(out.stdout).expect("the scrape is UTF-8")
}

#[track_caller]
fn scrape(s: &Stack) -> String {
    scrape_with(s, &[])
}

/// The sum of every sample of `name` (exactly that name) whose labels include `labels`.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = n == name
                && labels
                    .iter()
                    .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\"")));
            matches.then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Scrapes until `f` holds for the body, for at most [`SETTLE_WITHIN`].
#[track_caller]
fn scrape_until(s: &Stack, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let body = scrape(s);
        if f(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{body}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `body`: no error and no lint.
#[track_caller]
fn promtool_check(body: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package `prometheus`; `cargo xtask test` installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics ({}):\n{}{}\n--- the scrape:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// Requests through `path`; the scrapes account for every one of them.
fn requests_are_counted_once(path: Path, tag: &str) {
    let (mut s, backend) = start(path, tag);
    let listener = s.rig.server_addr(PORT).to_string();
    let server = backend.addr().to_string();
    let path_label = match path {
        Path::Kernel => "kernel",
        Path::Bypass => "bypass",
    };

    // Warm-up: the bypass listener may serve a moment after the kernel one answered the probe.
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let out = request(&s);
        if out.status.success() && out.stdout == b"200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener under test never served: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The readiness probe to :443 may still wait in an accept queue after the warm-up: the
    // baseline is taken once it has been served too (its connection ended on that listener).
    let probed = s.rig.server_addr(443).to_string();
    scrape_until(&s, "the probe and the warm-up served and closed", |b| {
        value(
            b,
            "tern_connection_duration_seconds_count",
            &[("listener", &probed)],
        ) >= 1.0
            && value(b, "tern_active", &[]) == 0.0
            && value(b, "tern_accepted_total", &[]) == value(b, "tern_closed_total", &[])
    });
    // Taken afresh: one scrape reads the counters before the histograms, so a connection that
    // ended while it ran can be in the latter and not in the former.
    let before = scrape(&s);
    promtool_check(&before);

    for i in 0..REQUESTS {
        let out = request(&s);
        assert!(
            out.status.success() && out.stdout == b"200",
            "request {i}: {} {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            s.log()
        );
    }
    let closed = |b: &str| value(b, "tern_closed_total", &[("path", path_label)]);
    let closed_before = closed(&before);
    scrape_until(&s, "every request's connection closed", |b| {
        closed(b) >= closed_before + REQUESTS as f64 && value(b, "tern_active", &[]) == 0.0
    });
    let after = scrape(&s);
    promtool_check(&after);

    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let n = REQUESTS as f64;
    let on_listener = [("listener", listener.as_str())];
    for name in [
        "tern_tls_handshake_seconds_count",
        "tern_connection_duration_seconds_count",
        "tern_backend_connect_seconds_count",
        "tern_first_backend_byte_seconds_count",
        "tern_connection_duration_seconds_bucket",
    ] {
        let labels: &[(&str, &str)] = if name.ends_with("_bucket") {
            &[("listener", listener.as_str()), ("le", "+Inf")]
        } else {
            &on_listener
        };
        assert_eq!(delta(name, labels), n, "{name}:\n{after}");
    }
    let on_server = [("server", server.as_str())];
    for name in [
        "tern_server_connection_duration_seconds_count",
        "tern_server_backend_connect_seconds_count",
        "tern_server_first_backend_byte_seconds_count",
    ] {
        assert_eq!(delta(name, &on_server), n, "{name}:\n{after}");
    }
    for name in [
        "tern_accepted_total",
        "tern_handshakes_total",
        "tern_closed_total",
        "tern_backend_connects_total",
    ] {
        assert_eq!(delta(name, &[("path", path_label)]), n, "{name}:\n{after}");
        assert_eq!(delta(name, &[]), n, "{name} over both paths:\n{after}");
    }
    // The backend server's merged state and counters (`tern_backend_server_*`).
    assert_eq!(
        delta("tern_backend_server_connects_total", &on_server),
        n,
        "{after}"
    );
    for (name, want) in [
        ("tern_backend_server_up", 1.0),
        ("tern_backend_server_retired", 0.0),
        ("tern_backend_server_weight", 1.0),
        ("tern_backend_server_active", 0.0),
        ("tern_backend_server_consecutive_failures", 0.0),
        ("tern_backend_server_connect_errors_total", 0.0),
        ("tern_backend_server_connect_timeouts_total", 0.0),
    ] {
        assert_eq!(value(&after, name, &on_server), want, "{name}:\n{after}");
    }
    assert!(
        value(&after, "tern_backend_server_workers_up", &on_server) >= 1.0,
        "{after}"
    );
    assert!(
        value(&after, "tern_tls_handshake_seconds_sum", &on_listener) > 0.0,
        "{after}"
    );
    assert!(value(&after, "tern_build_info", &[]) == 1.0, "{after}");
    assert!(
        value(&after, "tern_start_time_seconds", &[]) > 1.6e9,
        "{after}"
    );
    if path == Path::Bypass {
        let iface = s.rig.server_if.clone();
        let on_iface = [("interface", iface.as_str())];
        assert!(value(&after, "tern_xsk_rx_frames_total", &on_iface) > 0.0);
        assert!(value(&after, "tern_xdp_steered_total", &on_iface) > 0.0);
        // The stack publishes its counters every 100 ms, so they may lag the others.
        scrape_until(&s, "the TCP stack's counters", |b| {
            value(b, "tern_tcp_connections_created_total", &on_iface) >= n
        });
    }

    // `tern ctl stats` reads the same histograms.
    let stats = s.stats();
    let entry = stats["latency"]["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["listener"] == listener.as_str()))
        .unwrap_or_else(|| panic!("no latency entry for {listener}: {stats}"))
        .clone();
    let handshakes = value(&after, "tern_tls_handshake_seconds_count", &on_listener);
    assert_eq!(
        entry["tls_handshake"]["count"].as_f64(),
        Some(handshakes),
        "{stats}"
    );
    let hs = &entry["tls_handshake"];
    let (p50, p99, max) = (
        hs["p50_ms"].as_f64().expect("p50"),
        hs["p99_ms"].as_f64().expect("p99"),
        hs["max_ms"].as_f64().expect("max"),
    );
    assert!(p50 <= p99 && p99 <= max && max > 0.0, "{hs}");
    assert!(stats["latency"]["total"]["connection_duration"]["p999_ms"].is_number());

    // OpenMetrics for scrapers that ask for it.
    let om = scrape_with(
        &s,
        &["-H", "Accept: application/openmetrics-text;version=1.0.0"],
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# UNIT tern_tls_handshake_seconds seconds\n"));

    s.tern.signal(libc::SIGTERM);
    s.expect_clean_exit(Duration::from_secs(30), "SIGTERM with the endpoint running");
}

#[test]
fn kernel_requests_are_counted_once() {
    requests_are_counted_once(Path::Kernel, "mtrk");
}

#[test]
fn bypass_requests_are_counted_once() {
    requests_are_counted_once(Path::Bypass, "mtrb");
}

/// An address tern cannot bind: start-up fails, naming the field.
#[test]
fn an_address_that_cannot_be_bound_is_a_start_up_error() {
    let (rig, dir) = Stack::rig("mtrbind");
    // TEST-NET-1: on no interface of the namespace.
    let config = format!(
        "[[listener]]\naddress = \"{addr}\"\ntls = false\n\n\
         [backend]\nservers = [\"127.0.0.1:9\"]\n\n[workers]\ncount = 1\n\n\
         [control]\nsocket = \"{dir}/tern.sock\"\n\n[metrics]\naddress = \"192.0.2.1:9100\"\n",
        addr = rig.server_addr(443),
        dir = dir.path().display(),
    );
    let mut tern = TernProcess::start(&config, rig.server_netns());
    let status = tern
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("tern still runs:\n{}", tern.stderr_text()));
    let log = tern.stderr_text();
    assert_eq!(status.code(), Some(1), "a start-up error: {status}\n{log}");
    assert!(
        log.contains("metrics.address") && log.contains("192.0.2.1:9100"),
        "the error names the field and the address:\n{log}"
    );
}
