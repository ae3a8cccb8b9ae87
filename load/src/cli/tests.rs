//! Tests for argument syntax and the cross-flag rules of `Args::validate`.

use super::*;

const NOFILE: u64 = 20_000;
const CPUS: usize = 2;

fn parse(extra: &[&str]) -> Result<Plan, String> {
    let mut argv = vec!["tern-load", "--connect", "127.0.0.1:8443", "--insecure"];
    argv.extend_from_slice(extra);
    let args = Args::try_parse_from(&argv).map_err(|e| format!("clap: {e}"))?;
    args.validate(NOFILE, CPUS).map_err(|e| e.to_string())
}

#[track_caller]
fn ok(extra: &[&str]) -> Plan {
    parse(extra).unwrap_or_else(|e| panic!("{extra:?} should validate: {e}"))
}

#[track_caller]
fn rejected(extra: &[&str], needle: &str) {
    match parse(extra) {
        Ok(plan) => panic!("{extra:?} should be rejected, got {plan:?}"),
        Err(e) => assert!(
            e.contains(needle),
            "{extra:?}: error {e:?} should mention {needle:?}"
        ),
    }
}

#[test]
fn durations_rates_and_lists() {
    assert_eq!(parse_duration_ns("10"), Ok(10_000_000_000), "bare seconds");
    assert_eq!(
        parse_duration_ns("1.5s"),
        Ok(1_500_000_000),
        "fractional seconds"
    );
    assert_eq!(parse_duration_ns("250ms"), Ok(250_000_000), "ms");
    assert_eq!(parse_duration_ns("40us"), Ok(40_000), "us");
    assert_eq!(parse_duration_ns("2m"), Ok(120_000_000_000), "minutes");
    assert!(parse_duration_ns("10 parsecs").is_err(), "unknown unit");
    assert!(parse_duration_ns("-1s").is_err(), "negative");
    assert_eq!(parse_rate("5000/s"), Ok(5000.0), "rate with /s");
    assert_eq!(parse_rate("0.5"), Ok(0.5), "fractional rate");
    assert!(parse_rate("0").is_err(), "zero rate");
    assert!(parse_rate("inf").is_err(), "infinite rate");
    assert_eq!(parse_cpus("1"), Ok(vec![1]), "one CPU");
    assert_eq!(
        parse_cpus("0-2,5"),
        Ok(vec![0, 1, 2, 5]),
        "range and single"
    );
    assert!(parse_cpus("3-1").is_err(), "descending range");
    let ips = parse_source_ips("10.1.2.2-10.1.2.250").expect("range");
    assert_eq!(ips.len(), 249, "range size");
    assert_eq!(ips[0].to_string(), "10.1.2.2", "first");
    assert_eq!(ips[248].to_string(), "10.1.2.250", "last");
    assert_eq!(
        parse_source_ips("127.0.0.2,::1").map(|v| v.len()),
        Ok(2),
        "list"
    );
    assert!(parse_source_ips("10.0.0.0-10.1.0.0").is_err(), "over 65536");
    assert!(parse_source_ips("10.0.0.9-10.0.0.1").is_err(), "descending");
}

#[test]
fn defaults_per_mode() {
    let p = ok(&["--mode", "new-conn"]);
    assert_eq!(
        (p.load, p.concurrency, p.connections),
        (Load::Closed, 32, 0),
        "new-conn"
    );
    assert_eq!(p.duration_ns, 10_000_000_000, "default duration");
    assert_eq!(
        (p.method, p.close),
        ("GET", ClosePolicy::Server),
        "method, close"
    );
    assert_eq!(p.host, "localhost", "Host defaults to SNI");
    let p = ok(&["--mode", "new-conn", "--rate", "100/s"]);
    assert_eq!(p.load, Load::Open { rate: 100.0 }, "open loop");
    assert_eq!(p.concurrency, 1024, "open-loop in-flight cap");
    let p = ok(&["--mode", "keepalive", "--threads", "2"]);
    assert_eq!(
        (p.concurrency, p.connections),
        (32, 32),
        "keepalive connections"
    );
    let p = ok(&["--mode", "bulk", "--body-bytes", "1048576"]);
    assert_eq!(
        (p.connections, p.method),
        (1, "POST"),
        "bulk defaults, POST implied"
    );
    let p = ok(&["--mode", "idle", "--connections", "1000"]);
    assert_eq!(
        (p.connections, p.concurrency),
        (1000, 64),
        "idle: handshakes in flight"
    );
    let p = ok(&[
        "--mode",
        "resumed",
        "--concurrency",
        "600",
        "--threads",
        "2",
    ]);
    assert_eq!(p.prime, 256, "priming capped at 256 per worker");
    let p = ok(&["--mode", "keepalive", "--requests", "1000"]);
    assert_eq!(
        p.duration_ns, 600_000_000_000,
        "--requests alone is still time-bounded"
    );
}

#[test]
fn shares_cover_the_total_exactly() {
    let p = ok(&[
        "--mode",
        "keepalive",
        "--connections",
        "10",
        "--threads",
        "3",
    ]);
    let shares: Vec<u64> = (0..3).map(|g| p.share(10, g)).collect();
    assert_eq!(shares, vec![4, 3, 3], "10 over 3 workers");
    let p = ok(&[
        "--mode",
        "idle",
        "--connections",
        "50000",
        "--processes",
        "3",
        "--threads",
        "2",
    ]);
    let total: u64 = (0..6).map(|g| p.share(50_000, g)).sum();
    assert_eq!(total, 50_000, "every connection belongs to one worker");
}

#[test]
fn cross_flag_rules() {
    rejected(
        &["--mode", "new-conn", "--ca", "x.pem"],
        "cannot be used with",
    );
    let args = Args::try_parse_from([
        "tern-load",
        "--mode",
        "new-conn",
        "--connect",
        "127.0.0.1:1",
    ])
    .expect("parses");
    let err = args.validate(NOFILE, CPUS).expect_err("no trust choice");
    assert!(err.to_string().contains("--ca FILE or --insecure"), "{err}");
    rejected(
        &["--mode", "keepalive", "--concurrency", "4"],
        "use --connections",
    );
    rejected(
        &["--mode", "new-conn", "--connections", "4"],
        "use --concurrency",
    );
    rejected(&["--mode", "idle"], "needs --connections");
    rejected(
        &["--mode", "idle", "--connections", "10", "--requests", "5"],
        "does not apply",
    );
    rejected(
        &["--mode", "idle", "--connections", "10", "--warmup", "1s"],
        "does not apply",
    );
    rejected(
        &["--mode", "keepalive", "--close", "reset"],
        "--close applies",
    );
    rejected(&["--mode", "new-conn", "--prime", "3"], "--prime applies");
    rejected(
        &["--mode", "new-conn", "--idle-requests", "1"],
        "--idle-requests applies",
    );
    rejected(
        &["--mode", "new-conn", "--concurrency", "3", "--threads", "4"],
        "nothing to do",
    );
    rejected(&["--mode", "new-conn", "--requests", "0"], "at least 1");
    rejected(&["--mode", "new-conn", "--duration", "0"], "positive");
    rejected(&["--mode", "new-conn", "--cpus", "5"], "does not exist");
    rejected(
        &["--mode", "new-conn", "--source-ips", "::1"],
        "address family",
    );
    rejected(&["--mode", "new-conn", "--path", "no-slash"], "--path");
    rejected(&["--mode", "new-conn", "--path", "/a b"], "--path");
    rejected(&["--mode", "new-conn", "--method", "DELETE"], "--method");
    rejected(
        &[
            "--mode",
            "new-conn",
            "--body-bytes",
            "10",
            "--method",
            "GET",
        ],
        "POST or PUT",
    );
    rejected(&["--mode", "new-conn", "--header", "X-A 1"], "Name: value");
    rejected(
        &["--mode", "new-conn", "--header", "Host: x"],
        "sets host itself",
    );
    rejected(&["--mode", "new-conn", "--tls", "1.1"], "--tls");
    rejected(
        &["--mode", "new-conn", "--kx", "x448"],
        "unknown key exchange group",
    );
    rejected(
        &[
            "--mode",
            "new-conn",
            "--ciphers",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        ],
        "do not combine",
    );
    rejected(&["--mode", "new-conn", "--sni", "bad name!"], "--sni");
    rejected(&["--mode", "new-conn", "--threads", "0"], "--threads");
    rejected(
        &[
            "--mode",
            "new-conn",
            "--processes",
            "2",
            "--child-index",
            "2",
        ],
        "--child-index",
    );
}

#[test]
fn file_descriptor_budget_asks_for_processes() {
    rejected(
        &["--mode", "idle", "--connections", "100000"],
        "raise --processes to at least 6",
    );
    let p = ok(&[
        "--mode",
        "idle",
        "--connections",
        "100000",
        "--processes",
        "6",
    ]);
    assert_eq!(p.workers(), 6, "one worker per process");
    rejected(
        &["--mode", "new-conn", "--concurrency", "30000"],
        "raise --processes",
    );
}

#[test]
fn plain_defaults_and_rules() {
    let p = ok(&["--mode", "new-conn", "--plain"]);
    assert!(p.plain);
    assert_eq!(p.message_bytes, 64);
    assert_eq!(
        p.close,
        ClosePolicy::Reset,
        "plain transactions reset by default"
    );
    let p = ok(&["--mode", "bulk", "--plain"]);
    assert_eq!(p.message_bytes, 1 << 20);
    let p = ok(&["--mode", "keepalive", "--plain", "--message-bytes", "512"]);
    assert_eq!(p.message_bytes, 512);
    let p = ok(&["--mode", "new-conn", "--plain", "--close", "client"]);
    assert_eq!(p.close, ClosePolicy::Client);
    // TLS runs are unchanged: no message size, the server closes.
    let p = ok(&["--mode", "new-conn"]);
    assert!(!p.plain);
    assert_eq!((p.message_bytes, p.close), (0, ClosePolicy::Server));
    rejected(
        &["--mode", "new-conn", "--plain", "--close", "server"],
        "never closes first",
    );
    rejected(&["--mode", "resumed", "--plain"], "no sessions");
    rejected(
        &["--mode", "keepalive", "--message-bytes", "8"],
        "needs --plain",
    );
    rejected(
        &[
            "--mode",
            "bulk",
            "--plain",
            "--body-bytes",
            "10",
            "--method",
            "POST",
        ],
        "--message-bytes",
    );
    rejected(
        &[
            "--mode",
            "idle",
            "--plain",
            "--connections",
            "4",
            "--idle-requests",
            "1",
        ],
        "--idle-requests",
    );
    // The file-descriptor budget holds for plain runs too.
    rejected(
        &["--mode", "keepalive", "--plain", "--connections", "30000"],
        "file descriptors",
    );
}
