//! The load generators the bench drives: `tern-load` (the workspace's own, for every figure) and
//! `h2load` (nghttp2, for the cross-check), as command lines and as parsed results.
//!
//! Owns: the argument lists (what each mode asks for) and parsing each tool's output into a
//! [`LoadReport`]. Does not own running them ([`super::measure`]).
//!
//! h2load notes (nghttp2 1.52): `--h1` forces HTTP/1.1 over TLS with ALPN `http/1.1`;
//! `--connect-to` sends the TLS SNI and `Host` of the URI to another address;
//! `--tls13-ciphers`/`--groups` restrict the handshake like tern-load's settings. It does not
//! verify certificates. It reuses TLS sessions when a client reconnects, so its new-connection
//! figure is taken from batches `-n C -c C` (each client makes exactly one request on one
//! connection, one full handshake), never from `Connection: close` loops.

use super::configs::{CIPHERSUITE, GROUP};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

/// Latency percentiles of an open-loop run, µs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// What a load generator reports for one run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Operations (transactions, requests) completed inside the generator's measuring window:
    /// the numerator of its rate.
    pub ops: u64,
    /// Every operation completed over the process's life (the window plus the drain after it;
    /// the bench runs tern-load without a warm-up, so nothing precedes the window): the
    /// denominator of CPU per operation, whose CPU window is the process's life.
    pub completed: u64,
    /// Response body bytes received in the window.
    pub body_bytes: u64,
    /// The generator's measuring window, seconds.
    pub secs: f64,
    /// Failed operations (connect, TLS, HTTP or timeout errors).
    pub errors: u64,
    /// Request latency percentiles (used from open-loop runs).
    pub latency: Option<Latency>,
    /// Idle mode: connections whose handshake completed.
    pub idle_established: Option<u64>,
    /// Handshakes in the window that resumed a session (tern-load only; 0 from h2load).
    pub resumed: u64,
    /// Handshakes in the window that were full ones: in resumed mode, the connections that
    /// offered a session the server did not take (tern-load only; 0 from h2load).
    pub full: u64,
}

/// What a run asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Full handshake, one GET, close; no resumption.
    NewConn,
    /// GETs on long-lived connections.
    KeepAlive,
    /// Large GETs on long-lived connections.
    Bulk,
    /// As [`Workload::NewConn`], but every connection resumes a TLS 1.3 session (a ticket
    /// from an earlier connection; tern-load counts the handshakes that did not resume).
    Resumed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::NewConn => "new-conn",
            Workload::KeepAlive => "keepalive",
            Workload::Bulk => "bulk",
            Workload::Resumed => "resumed",
        }
    }
}

/// Where and what to request.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    pub sni: String,
}

// ---- h2load ----

/// `h2load` closed loop: `clients` connections, for `duration` (keep-alive) or for exactly
/// `clients` requests (one per connection: the new-connection batch).
pub fn h2load_args(
    endpoint: &Endpoint,
    path: &str,
    clients: u32,
    batch: bool,
    duration: Duration,
) -> Vec<String> {
    let mut args = vec![
        "h2load".to_owned(),
        "--h1".into(),
        "-t".into(),
        "1".into(),
        "-c".into(),
        clients.to_string(),
    ];
    if batch {
        args.extend(["-n".into(), clients.to_string()]);
    } else {
        args.extend(["-D".into(), format!("{}", duration.as_secs().max(1))]);
    }
    args.extend([
        format!("--tls13-ciphers={CIPHERSUITE}"),
        format!("--groups={GROUP}"),
        format!("--connect-to={}", endpoint.addr),
        format!("https://{}{path}", endpoint.sni),
    ]);
    args
}

/// A duration as h2load prints it: `45.62ms`, `2.00s`, `812us`.
fn parse_h2_duration(text: &str) -> Option<f64> {
    let text = text.trim().trim_end_matches(',');
    for (suffix, scale) in [("ms", 1e-3), ("us", 1e-6), ("s", 1.0)] {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// Parses h2load's summary: `finished in X, …`, `requests: N total, …, S succeeded, F failed,
/// E errored, T timeout`, and the body bytes from `traffic: … (N) data`.
pub fn parse_h2load(text: &str) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut saw_finished = false;
    let mut saw_requests = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in ") {
            let first = rest.split(',').next().unwrap_or_default();
            report.secs = parse_h2_duration(first)
                .with_context(|| format!("cannot parse h2load duration in {line:?}"))?;
            saw_finished = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n
                    .parse()
                    .with_context(|| format!("bad count in h2load line {line:?}"))?;
                match what {
                    "succeeded" => {
                        report.ops = n;
                        report.completed = n;
                    }
                    "failed" | "errored" | "timeout" => report.errors += n,
                    _ => {}
                }
            }
            saw_requests = true;
        } else if let Some(rest) = line.strip_prefix("traffic: ") {
            // "114.74KB (117500) total, 11.62KB (11900) headers (space savings 0.00%), 100.00KB (102400) data"
            if let Some(data) = rest.split(',').find(|p| p.trim_end().ends_with("data")) {
                if let (Some(open), Some(close)) = (data.find('('), data.find(')')) {
                    report.body_bytes = data[open + 1..close].parse().unwrap_or(0);
                }
            }
        }
    }
    if !saw_finished || !saw_requests {
        bail!("h2load printed no summary (did it fail to connect?):\n{text}");
    }
    Ok(report)
}

/// Adds `other` (another batch) to `acc`.
pub fn accumulate(acc: &mut LoadReport, other: &LoadReport) {
    acc.ops += other.ops;
    acc.completed += other.completed;
    acc.body_bytes += other.body_bytes;
    acc.secs += other.secs;
    acc.errors += other.errors;
}

// ---- tern-load ----

/// tern-load's `--json` document (schema 1, load/README.md): only the fields the bench reads.
#[derive(Debug, Deserialize)]
struct TernLoadJson {
    schema: u32,
    elapsed_s: f64,
    requests: TlRequests,
    errors: TlErrors,
    bytes: TlBytes,
    latency_us: Option<TlLatency>,
    idle: Option<TlIdle>,
    handshakes: Option<TlHandshakes>,
}

#[derive(Debug, Deserialize)]
struct TlHandshakes {
    full: u64,
    resumed: u64,
}

#[derive(Debug, Deserialize)]
struct TlRequests {
    completed: u64,
    in_window: u64,
}

#[derive(Debug, Deserialize)]
struct TlErrors {
    total: u64,
}

#[derive(Debug, Deserialize)]
struct TlBytes {
    body_received: u64,
}

#[derive(Debug, Deserialize)]
struct TlLatency {
    p50: f64,
    p90: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
}

#[derive(Debug, Deserialize)]
struct TlIdle {
    established: u64,
}

/// The JSON schema this parser understands.
const TERN_LOAD_SCHEMA: u32 = 1;

/// Parses the JSON document tern-load printed on stdout (`--json`: the document is all that
/// goes to stdout, pretty-printed or not).
pub fn parse_tern_load(text: &str) -> Result<LoadReport> {
    let json = text.trim();
    if !json.starts_with('{') {
        bail!("tern-load printed no JSON document:\n{text}");
    }
    let j: TernLoadJson = serde_json::from_str(json)
        .with_context(|| format!("cannot parse tern-load's JSON:\n{json}"))?;
    if j.schema != TERN_LOAD_SCHEMA {
        bail!(
            "tern-load reports JSON schema {}, the bench reads schema {TERN_LOAD_SCHEMA}",
            j.schema
        );
    }
    Ok(LoadReport {
        ops: j.requests.in_window,
        completed: j.requests.completed,
        body_bytes: j.bytes.body_received,
        secs: j.elapsed_s,
        errors: j.errors.total,
        latency: j.latency_us.map(|l| Latency {
            p50_us: l.p50,
            p90_us: l.p90,
            p99_us: l.p99,
            p999_us: l.p99_9,
            max_us: l.max,
        }),
        idle_established: j.idle.map(|i| i.established),
        resumed: j.handshakes.as_ref().map_or(0, |h| h.resumed),
        full: j.handshakes.as_ref().map_or(0, |h| h.full),
    })
}

/// The TLS and target options every tern-load run shares: TLS 1.3, X25519, one suite, ALPN
/// `http/1.1`, the bench certificate as the only trust anchor, one worker thread (the process
/// is pinned to the load CPU with taskset), JSON on stdout.
#[derive(Debug, Clone)]
pub struct TernLoad {
    pub bin: String,
    pub endpoint: Endpoint,
    /// PEM file of the bench certificate (self-signed: it is its own CA).
    pub ca: String,
}

impl TernLoad {
    fn common(&self, mode: &str, path: &str) -> Vec<String> {
        vec![
            self.bin.clone(),
            "--mode".into(),
            mode.to_owned(),
            "--connect".into(),
            self.endpoint.addr.to_string(),
            "--sni".into(),
            self.endpoint.sni.clone(),
            "--path".into(),
            path.to_owned(),
            "--ca".into(),
            self.ca.clone(),
            "--tls".into(),
            "1.3".into(),
            "--kx".into(),
            GROUP.to_ascii_lowercase(),
            "--ciphers".into(),
            TERN_LOAD_SUITE.into(),
            "--alpn".into(),
            "http/1.1".into(),
            "--threads".into(),
            "1".into(),
            "--json".into(),
            "--quiet".into(),
        ]
    }

    /// Closed loop for `duration` after `warmup`: `concurrency` transactions in flight
    /// (new-conn) or persistent connections (keepalive, bulk).
    pub fn closed(
        &self,
        workload: Workload,
        path: &str,
        concurrency: u32,
        warmup: Duration,
        duration: Duration,
    ) -> Vec<String> {
        let mut args = self.common(workload.name(), path);
        let count_flag = match workload {
            Workload::NewConn | Workload::Resumed => "--concurrency",
            Workload::KeepAlive | Workload::Bulk => "--connections",
        };
        args.extend([
            count_flag.into(),
            concurrency.to_string(),
            "--warmup".into(),
            secs(warmup),
            "--duration".into(),
            secs(duration),
        ]);
        args
    }

    /// Open loop: new connections at `rate`/s for `duration` after `warmup`.
    pub fn open(&self, path: &str, rate: f64, warmup: Duration, duration: Duration) -> Vec<String> {
        let mut args = self.common(Workload::NewConn.name(), path);
        args.extend([
            "--rate".into(),
            format!("{rate:.0}"),
            "--warmup".into(),
            secs(warmup),
            "--duration".into(),
            secs(duration),
        ]);
        args
    }

    /// Idle: open `connections` and hold them for `hold`, writing `ready_file` once they are up;
    /// from `source` (`--source-ips`, an address on the client veth) when given, else from the
    /// kernel's choice (the rig's client address).
    pub fn idle(
        &self,
        connections: u64,
        hold: Duration,
        ready_file: &str,
        source: Option<Ipv4Addr>,
    ) -> Vec<String> {
        let mut args = self.common("idle", "/");
        args.extend([
            "--connections".into(),
            connections.to_string(),
            "--duration".into(),
            secs(hold),
            "--ready-file".into(),
            ready_file.to_owned(),
        ]);
        if let Some(ip) = source {
            args.extend(["--source-ips".into(), ip.to_string()]);
        }
        args
    }
}

/// rustls' name of [`CIPHERSUITE`].
pub const TERN_LOAD_SUITE: &str = "TLS13_AES_128_GCM_SHA256";

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H2LOAD: &str = "\
starting benchmark...
spawning thread #0: 100 total client(s). 100 total requests
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: http/1.1
progress: 100% done

finished in 45.62ms, 2192.02 req/s, 2.45MB/s
requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 98 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 114.74KB (117500) total, 11.62KB (11900) headers (space savings 0.00%), 100.00KB (102400) data
";

    #[test]
    fn h2load_summary() {
        let r = parse_h2load(H2LOAD).expect("summary present");
        assert_eq!((r.ops, r.completed), (98, 98));
        assert_eq!(r.errors, 2);
        assert!((r.secs - 0.04562).abs() < 1e-9);
        assert_eq!(r.body_bytes, 102_400);
        assert!(parse_h2load("starting benchmark...\nconnect failed\n").is_err());
        assert_eq!(parse_h2_duration("2.00s"), Some(2.0));
        assert_eq!(parse_h2_duration("812us"), Some(0.000812));
    }

    #[test]
    fn h2load_batch_and_duration_args() {
        let e = Endpoint {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 443),
            sni: "bench.test".into(),
        };
        let batch = h2load_args(&e, "/bytes/1024", 50, true, Duration::from_secs(3));
        assert!(batch.windows(2).any(|w| w == ["-n", "50"]), "{batch:?}");
        assert!(!batch.iter().any(|a| a == "-D"));
        assert_eq!(
            batch.last().map(String::as_str),
            Some("https://bench.test/bytes/1024")
        );
        assert!(batch.contains(&"--connect-to=10.200.0.1:443".to_owned()));
        let timed = h2load_args(&e, "/", 8, false, Duration::from_secs(3));
        assert!(timed.windows(2).any(|w| w == ["-D", "3"]), "{timed:?}");
    }

    /// A `tern-load --json` document (schema 1), trimmed of fields the bench does not read.
    const TERN_LOAD: &str = r#"{"tool":"tern-load","version":"0.1.0","schema":1,"mode":"new-conn","loop":"open","elapsed_s":1.0,"requests":{"completed":1881,"in_window":1880,"succeeded":1881,"abandoned":0,"rate_per_s":1880.0},"errors":{"total":3,"connect":0,"tls":3,"http":0,"timeout":0,"closed":0,"io":0},"bytes":{"tls_sent":775564,"tls_received":4963975,"body_sent":0,"body_received":1926144},"latency_us":{"count":1881,"min":12432,"mean":16931.9,"p50":17679,"p90":19855,"p99":21231,"p99_9":24063,"max":24479,"stdev":2640.4},"idle":null,"cpu":{"window_user_us":305501,"window_system_us":162749,"window_us":468250,"total_us":580989},"machine":{"cpus":2,"busy_us":1620000,"idle_us":360000},"watched":[{"pid":25790,"cpu_window_us":412000,"rss_kib_before":7828},{"pid":25791,"cpu_window_us":null}],"members_lost":0}"#;

    #[test]
    fn tern_load_json() {
        let text = format!("{TERN_LOAD}\n");
        let r = parse_tern_load(&text).expect("schema 1 document");
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_str::<serde_json::Value>(TERN_LOAD).expect("valid JSON"),
        )
        .expect("re-serialise");
        assert_eq!(parse_tern_load(&pretty).expect("pretty-printed").ops, 1880);
        assert_eq!(
            (r.ops, r.completed, r.errors, r.body_bytes),
            (1880, 1881, 3, 1_926_144)
        );
        assert_eq!(r.secs, 1.0);
        let l = r.latency.expect("latency summary");
        assert_eq!(
            (l.p50_us, l.p99_us, l.p999_us, l.max_us),
            (17679.0, 21231.0, 24063.0, 24479.0)
        );
        assert_eq!(r.idle_established, None);

        let newer = TERN_LOAD.replace("\"schema\":1", "\"schema\":2");
        let err = parse_tern_load(&newer).expect_err("unknown schema");
        assert!(err.to_string().contains("schema 2"), "{err}");
        assert!(parse_tern_load("tern-load: bad arguments\n").is_err());
    }

    #[test]
    fn idle_args_bind_a_source_only_when_given() {
        let tl = TernLoad {
            bin: "tern-load".into(),
            endpoint: Endpoint {
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 443),
                sni: "bench.test".into(),
            },
            ca: "/tmp/ca.pem".into(),
        };
        let plain = tl.idle(1000, Duration::from_secs(120), "/tmp/r", None);
        assert!(!plain.iter().any(|a| a == "--source-ips"), "{plain:?}");
        assert!(plain.windows(2).any(|w| w == ["--connections", "1000"]));
        assert!(plain.windows(2).any(|w| w == ["--duration", "120000ms"]));
        let bound = tl.idle(
            19_936,
            Duration::from_secs(120),
            "/tmp/r",
            Some(Ipv4Addr::new(10, 200, 0, 3)),
        );
        assert!(
            bound
                .windows(2)
                .any(|w| w == ["--source-ips", "10.200.0.3"]),
            "{bound:?}"
        );
        assert!(bound.windows(2).any(|w| w == ["--mode", "idle"]));
    }

    #[test]
    fn batches_add_up() {
        let mut acc = LoadReport::default();
        let one = parse_h2load(H2LOAD).expect("summary");
        accumulate(&mut acc, &one);
        accumulate(&mut acc, &one);
        assert_eq!((acc.ops, acc.completed, acc.errors), (196, 196, 4));
        assert_eq!(acc.body_bytes, 204_800);
        assert!((acc.secs - 0.09124).abs() < 1e-9);
    }
}
