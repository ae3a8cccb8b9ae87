//! The Prometheus endpoint (`[metrics] address`): `GET /metrics` over HTTP/1.1 on a thread of
//! its own, answered in the OpenMetrics text format when the scraper asks for it (`Accept:
//! application/openmetrics-text`, as Prometheus does) and in the Prometheus text format 0.0.4
//! otherwise (curl, `promtool check metrics`). Both encodings are prometheus-client's.
//!
//! Nothing is counted twice: [`Exporter`] is a prometheus-client `Collector` that reads, at
//! scrape time, the same single-writer atomics `tern ctl stats` reads (the workers'
//! [`WorkerCounters`], the bypass workers' AF_XDP and TCP stack counters, the XDP programs'
//! per-CPU maps) and the workers' latency histograms ([`latency`]), and encodes them. Workers
//! never wait for a scrape: they only store to their atomics. A scrape is therefore not one
//! instant: a connection that ends while it is encoded may show in the histograms (read last)
//! and not yet in `tern_closed_total`. What is exported:
//! - every counter of `tern ctl stats`, per worker (labels `worker`, `path="kernel"|"bypass"`,
//!   and `interface` for the bypass path), as `tern_<field>_total`, or `tern_xsk_*` (AF_XDP),
//!   `tern_tcp_*` (the bypass TCP stack), `tern_xdp_*` (the XDP program, per interface);
//!   byte counts as `..._bytes_total`, gauges (open connections, UMEM frames) without
//!   `_total`. No totals: they are a `sum()` away and would double a sum over the family;
//! - `tern_build_info{version}` and `tern_start_time_seconds`;
//! - each backend server's state and counters, merged across workers, as
//!   `tern_backend_server_*{server}` (up, retired, workers_up, weight, active,
//!   consecutive_failures; connects, connect_errors, connect_timeouts, probes_ok,
//!   probes_failed as `_total` counters);
//! - the latency histograms in seconds, per listener (`tern_<kind>_seconds{listener}`) and per
//!   backend server (`tern_server_<kind>_seconds{server}`).
//!
//! The HTTP side is minimal on purpose: one request per connection (`Connection: close`), the
//! request head bounded in size and time ([`MAX_HEAD`], [`READ_DEADLINE`]), the reply bounded in
//! time ([`WRITE_DEADLINE`]), and at most [`MAX_CLIENTS`] clients served at once on short-lived
//! threads, so a slow or broken scraper holds only its own thread, and only until a deadline.
//! The thread stops within [`POLL_EVERY`] of `Shutdown::stop`.
//!
//! Not here: the control socket's JSON (`control`), what the counters mean (their own docs).

pub mod latency;

use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::control::ControlState;
use crate::server::Shutdown;

pub use latency::{Latency, WorkerLatency};

/// Clients served at once; one more is closed at once without an answer.
pub const MAX_CLIENTS: usize = 4;
/// The longest request head (request line and headers).
pub const MAX_HEAD: usize = 8192;
/// From accept, how long a client has to send its request head...
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// ...and how long, once the reply is ready, to take all of it.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How often the accepting thread looks at `Shutdown::stop`.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

/// The `Content-Type` of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counter fields exported as gauges: values that go down (a level, not a count of events).
/// Fields whose doc says they are gauges must be here (a unit test checks).
const GAUGES: &[&str] = &[
    "active",
    "connections",
    "orphans",
    "frames_free",
    "frames_fill",
    "frames_held",
    "frames_tx",
    "hugepage_fallback",
];

/// Binds the endpoint during start-up; the error names the field and the file.
pub fn bind(address: SocketAddr, config: &std::path::Path) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address).map_err(|e| {
        anyhow::anyhow!(
            "{}: metrics.address: cannot listen on {address}: {e}",
            config.display()
        )
    })?;
    // Accepting never blocks: `serve` waits in poll(2) so that it can see the stop flag.
    listener.set_nonblocking(true).map_err(|e| {
        anyhow::anyhow!(
            "{}: metrics.address: {address}: cannot make the socket non-blocking: {e}",
            config.display()
        )
    })?;
    Ok(listener)
}

/// Serves scrapes until `shutdown.stop`. Runs on the `tern-metrics` thread, which only
/// accepts; each client is answered on a thread of its own (see the module documentation).
pub fn serve(listener: TcpListener, state: Arc<ControlState>, shutdown: Arc<Shutdown>) {
    let registry = Arc::new(registry(state));
    let active = Arc::new(AtomicUsize::new(0));
    while !shutdown.stop.load(Ordering::Relaxed) {
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call's duration; the listener outlives it.
        let ready = unsafe { libc::poll(&mut fd, 1, POLL_EVERY.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => admit(stream, peer, &registry, &active),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on the same error.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The registry every scrape encodes: only the [`Exporter`].
pub fn registry(state: Arc<ControlState>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter { state }));
    registry
}

/// Hands `stream` to a thread of its own, or closes it when [`MAX_CLIENTS`] are served.
fn admit(stream: TcpStream, peer: SocketAddr, registry: &Arc<Registry>, active: &Arc<AtomicUsize>) {
    let taken = active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < MAX_CLIENTS).then_some(n + 1)
    });
    if taken.is_err() {
        tracing::debug!(%peer, "metrics client turned away: {MAX_CLIENTS} already connected");
        return;
    }
    let slot = Slot(active.clone());
    let registry = registry.clone();
    let spawned = std::thread::Builder::new()
        .name("tern-metrics-client".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = handle(&stream, &registry, Instant::now()) {
                tracing::debug!(%peer, error = %e, "metrics connection failed");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "cannot start a thread for a metrics client");
    }
}

/// One of the [`MAX_CLIENTS`] places; given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request head and writes the reply, each under its deadline from `accepted`.
fn handle(stream: &TcpStream, registry: &Registry, accepted: Instant) -> io::Result<()> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; say so anyway, the deadlines need
    // blocking reads with timeouts.
    stream.set_nonblocking(false)?;
    let head = read_head(stream, accepted + READ_DEADLINE)?;
    let reply = respond(&head, registry);
    write_all(stream, &reply, Instant::now() + WRITE_DEADLINE)
}

/// Reads until the end of the request head (an empty line), at most [`MAX_HEAD`] bytes.
fn read_head(mut stream: &TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() <= MAX_HEAD {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head before the deadline",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(head)
}

/// The whole HTTP reply to a request head.
pub fn respond(head: &[u8], registry: &Registry) -> Vec<u8> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if head.len() > MAX_HEAD => {
            return reply(431, "text/plain", &[], b"request head too large\n", false)
        }
        _ => return reply(400, "text/plain", &[], b"bad request\n", false),
    }
    let (method, path) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let allow = [("Allow", "GET, HEAD")];
        return reply(405, "text/plain", &allow, b"only GET\n", false);
    }
    if path.split('?').next() != Some("/metrics") {
        let body = b"not found: metrics are at /metrics\n";
        return reply(404, "text/plain", &[], body, head_only);
    }
    let openmetrics = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("accept")
            && String::from_utf8_lossy(h.value).contains("application/openmetrics-text")
    });
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, registry),
            OPENMETRICS,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        tracing::warn!("metrics endpoint: encoding the metrics failed");
        return reply(500, "text/plain", &[], b"encoding failed\n", head_only);
    }
    reply(200, content_type, &[], body.as_bytes(), head_only)
}

/// An HTTP/1.1 reply that closes the connection.
fn reply(
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Writes all of `bytes` by `deadline` ([`crate::sys::write_all_before`]).
fn write_all(stream: &TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    crate::sys::write_all_before(stream, bytes, deadline, "scraper")
}

// ---------------------------------------------------------------------- the collector

/// Encodes tern's counters and histograms at scrape time (see the module documentation).
pub struct Exporter {
    state: Arc<ControlState>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;

/// One family's rows: each a label set and the counters of one worker (or interface) as
/// `fields()` lists them.
type Rows = Vec<(Labels, Vec<(&'static str, &'static str, u64)>)>;

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &*self.state;
        // Process facts.
        let version: Labels = vec![("version", env!("CARGO_PKG_VERSION").to_string())];
        let mut m = encoder.encode_descriptor(
            "tern_build",
            "The running tern's version.",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&version)?;
        let started = SystemTime::now()
            .checked_sub(state.started.elapsed())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let mut m = encoder.encode_descriptor(
            "tern_start_time",
            "When tern started, in seconds since the Unix epoch.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        m.encode_gauge(&started)?;

        // The connection counters: kernel workers, then the bypass workers' proxies.
        let kernel = state.workers.iter().enumerate().map(|(i, w)| {
            let labels = vec![("worker", i.to_string()), ("path", "kernel".to_string())];
            (labels, w.snapshot().fields())
        });
        // Late bypass workers (a binary upgrade) join the list while tern runs.
        let bypass_list = state
            .bypass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bypass = bypass_list.iter().filter_map(|b| {
            b.proxy
                .as_ref()
                .map(|p| (bypass_labels(b), p.snapshot().fields()))
        });
        let rows: Rows = kernel.chain(bypass).collect();
        encode_rows(&mut encoder, "tern", &rows)?;

        let rows: Rows = bypass_list
            .iter()
            .map(|b| (bypass_labels(b), b.counters.snapshot().fields()))
            .collect();
        encode_rows(&mut encoder, "tern_xsk", &rows)?;
        let rows: Rows = bypass_list
            .iter()
            .filter_map(|b| {
                b.tcp
                    .as_ref()
                    .map(|t| (bypass_labels(b), t.snapshot().fields()))
            })
            .collect();
        encode_rows(&mut encoder, "tern_tcp", &rows)?;
        encode_rows(&mut encoder, "tern_xdp", &xdp_rows(state))?;
        // `[tls] ticket_keys`: per key file (normally one), summed over the workers.
        let rows: Rows = crate::tls::ticket_keys::stats()
            .into_iter()
            .map(|(file, s)| (vec![("file", file.display().to_string())], s.fields()))
            .collect();
        encode_rows(&mut encoder, "tern_ticket", &rows)?;

        // Process-wide: one series without labels.
        let rows: Rows = vec![(Vec::new(), crate::session_cache::stats().fields())];
        encode_rows(&mut encoder, "tern_session_cache", &rows)?;

        encode_backend_servers(&mut encoder, state)?;

        let report = state.latency.report();
        for kind in latency::Kind::ALL {
            let series: Vec<(Labels, &latency::HistogramSnapshot)> = report
                .listeners
                .iter()
                .map(|(name, s)| (vec![("listener", name.clone())], s.get(kind)))
                .collect();
            encode_histograms(
                &mut encoder,
                &format!("tern_{}", kind.name()),
                kind,
                &series,
            )?;
        }
        for kind in latency::Kind::ALL {
            if kind == latency::Kind::Handshake {
                // Not measured per server (see `WorkerLatency`).
                continue;
            }
            let series: Vec<(Labels, &latency::HistogramSnapshot)> = report
                .servers
                .iter()
                .map(|(name, s)| (vec![("server", name.clone())], s.get(kind)))
                .collect();
            let name = format!("tern_server_{}", kind.name());
            encode_histograms(&mut encoder, &name, kind, &series)?;
        }
        Ok(())
    }
}

/// Each backend server's state and counters, merged across the workers of both paths
/// ([`crate::control::backends_snapshot`]), as `tern_backend_server_*{server}`. (Not
/// `tern_backend_*`: `tern_backend_connects_total` and its kin are the workers' own counters,
/// per worker.)
fn encode_backend_servers(
    encoder: &mut DescriptorEncoder,
    state: &ControlState,
) -> Result<(), std::fmt::Error> {
    use crate::driver::board::ServerSnapshot;
    let servers = crate::control::backends_snapshot(state);
    if servers.is_empty() {
        return Ok(());
    }
    type Field = fn(&ServerSnapshot) -> u64;
    let gauges: [(&str, &str, Field); 6] = [
        (
            "up",
            "1 while the server takes new connections (up for at least one worker), else 0.",
            |s| u64::from(s.state == "up"),
        ),
        (
            "retired",
            "1 while the server is only kept for connections that still use it after a reload \
             removed it, else 0.",
            |s| u64::from(s.state == "retired"),
        ),
        ("workers_up", "Workers that hold the server up.", |s| {
            s.workers_up
        }),
        ("weight", "The server's weight (backend.servers).", |s| {
            s.weight
        }),
        (
            "active",
            "Connections assigned to the server now (connecting or connected).",
            |s| s.active,
        ),
        (
            "consecutive_failures",
            "Failed connects (clients' and probes') since the last success; the largest any \
             worker saw.",
            |s| s.consecutive_failures,
        ),
    ];
    let counters: [(&str, &str, Field); 5] = [
        (
            "connects",
            "Client connections established to the server.",
            |s| s.connects,
        ),
        (
            "connect_errors",
            "Client connects to the server refused or failed.",
            |s| s.connect_errors,
        ),
        (
            "connect_timeouts",
            "Client connects to the server that timed out.",
            |s| s.connect_timeouts,
        ),
        ("probes_ok", "Health probes that connected.", |s| {
            s.probes_ok
        }),
        (
            "probes_failed",
            "Health probes that failed or timed out.",
            |s| s.probes_failed,
        ),
    ];
    let labels = |s: &ServerSnapshot| -> Labels { vec![("server", s.address.to_string())] };
    for (field, help, get) in gauges {
        let name = format!("tern_backend_server_{field}");
        let mut m = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
        for s in &servers {
            m.encode_family(&labels(s))?.encode_gauge(&get(s))?;
        }
    }
    for (field, help, get) in counters {
        let name = format!("tern_backend_server_{field}");
        let mut m = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
        for s in &servers {
            m.encode_family(&labels(s))?
                .encode_counter::<NoLabelSet, _, u64>(&get(s), None)?;
        }
    }
    Ok(())
}

fn bypass_labels(b: &crate::control::BypassInfo) -> Labels {
    vec![
        ("worker", b.worker.to_string()),
        ("path", "bypass".to_string()),
        ("interface", b.interface.clone()),
    ]
}

/// Each attached XDP program's counters (per interface). A program whose map cannot be read
/// is left out of this scrape (`tern ctl stats` shows the error).
fn xdp_rows(state: &ControlState) -> Rows {
    let Ok(programs) = state.xdp.lock() else {
        return Vec::new();
    };
    programs
        .iter()
        .filter_map(|(iface, p)| {
            let counters = p.counters().ok()?;
            let serde_json::Value::Object(map) = serde_json::to_value(counters).ok()? else {
                return None;
            };
            let fields = map
                .into_iter()
                .filter_map(|(name, v)| {
                    let name: &'static str = XDP_FIELDS.iter().find(|f| **f == name)?;
                    Some((name, "", v.as_u64()?))
                })
                .collect();
            Some((vec![("interface", iface.clone())], fields))
        })
        .collect()
}

/// The XDP program's counters (`bypass::xdp::XdpCounters`), whose meaning is documented on
/// `tern_common::XdpStats`.
const XDP_FIELDS: &[&str] = &[
    "packets",
    "ipv4",
    "ipv6",
    "tcp",
    "vlan",
    "other",
    "malformed",
    "ipv4_fragments",
    "steered",
    "passed",
    "no_socket",
    "blocked",
    "rate_limited",
    "syn_cookies",
];

/// Encodes one family per field of `rows` (named `<prefix>_<field>`), each with one sample per
/// row. Fields come in the first row's order; every row lists the same fields.
fn encode_rows(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    rows: &Rows,
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = rows.first() else {
        return Ok(());
    };
    for (i, &(field, doc, _)) in first.iter().enumerate() {
        let (name, unit) = metric_name(prefix, field);
        let gauge = GAUGES.contains(&field);
        let help = help_text(field, doc);
        let kind = if gauge {
            MetricType::Gauge
        } else {
            MetricType::Counter
        };
        let mut m = encoder.encode_descriptor(&name, &help, unit.as_ref(), kind)?;
        for (labels, fields) in rows {
            let Some(&(_, _, value)) = fields.get(i) else {
                continue;
            };
            let mut sample = m.encode_family(labels)?;
            if gauge {
                sample.encode_gauge(&value)?;
            } else if unit == Some(Unit::Seconds) {
                // A `_ns` field: nanoseconds counted, seconds exported.
                let seconds = value as f64 / 1e9;
                sample.encode_counter::<NoLabelSet, _, u64>(&seconds, None)?;
            } else {
                sample.encode_counter::<NoLabelSet, _, u64>(&value, None)?;
            }
        }
    }
    Ok(())
}

/// `<prefix>_<field>`, with a byte count's `bytes` moved into the unit:
/// `client_bytes_in` → `tern_client_in` + bytes (`tern_client_in_bytes_total`), and a
/// nanosecond count's `ns` into seconds (Prometheus' base unit): `work_ns` →
/// `tern_xsk_work_seconds_total`.
fn metric_name(prefix: &str, field: &str) -> (String, Option<Unit>) {
    if let Some(stem) = field.strip_suffix("_ns") {
        return (format!("{prefix}_{stem}"), Some(Unit::Seconds));
    }
    let stripped = field.replace("bytes_", "").replace("_bytes", "");
    if stripped != field {
        (format!("{prefix}_{stripped}"), Some(Unit::Bytes))
    } else {
        (format!("{prefix}_{field}"), None)
    }
}

/// A doc comment as one line of help text (the exposition formats end help at a newline).
fn help_text(field: &str, doc: &str) -> String {
    let text = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        format!("XDP program counter `{field}` (see tern_common::XdpStats).")
    } else {
        text
    }
}

/// One histogram family in seconds, one series per label set.
fn encode_histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    kind: latency::Kind,
    series: &[(Labels, &latency::HistogramSnapshot)],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut m = encoder.encode_descriptor(
        name,
        kind.help(),
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for (labels, h) in series {
        let buckets: Vec<(f64, u64)> = latency::BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(h.buckets)
            .collect();
        let sum = h.sum_us as f64 / 1e6;
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, h.count(), &buckets, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
