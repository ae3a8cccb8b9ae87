//! Latency histograms: TLS handshake time, backend connect time, time to the backend's first
//! byte and connection duration, per listener and per backend server, recorded by the workers
//! and merged when read (`/metrics`, `tern ctl stats`).
//!
//! Each worker owns one [`WorkerLatency`] and is its only writer: a sample is a few relaxed
//! loads and stores ([`Counter`]), no lock and no read-modify-write, and it is taken once per
//! connection, when the connection ends (`driver::begin_finish`), never per packet. Readers
//! ([`Latency::report`]) add the workers' tables up; a table read while its worker writes may
//! be one sample behind in some bucket, which is all a scrape promises.
//!
//! Buckets are fixed ([`BOUNDS_US`]): 1–2.5–5 steps from 50 µs to 60 s, then +Inf. They cover
//! a handshake on loopback (tens of µs) up to a slow backend (a connect timeout is seconds);
//! connections that last longer than a minute fall in +Inf, and the exact maximum is kept
//! beside the buckets. Percentiles ([`HistogramSnapshot::quantile`]) interpolate linearly
//! inside a bucket, so they are as precise as the buckets (within a factor of 2.5), never
//! beyond the maximum seen.
//!
//! The per-server dimension is a fixed table indexed by a process-wide registry of backend
//! addresses ([`Servers`]): the configured servers at start-up, then every server a reload
//! adds, up to [`EXTRA_SERVERS`] more; an address keeps its index for the life of the process,
//! so a reload that reorders, removes or adds servers never moves history from one address to
//! another. Each worker keeps a copy of the registry, refreshed when it applies a reload
//! ([`WorkerLatency::servers`], one lock per reload) and looks a server's index up in it when a
//! connection ends. An address beyond the table counts into an `other` entry rather than being
//! lost.
//!
//! Not here: what each measurement spans (`driver::Conn::latency`) and the exposition format
//! (`metrics`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::counters::Counter;
use crate::tcp::time::Duration;

/// The buckets' upper bounds (inclusive, as Prometheus' `le`), in microseconds. One more bucket
/// past the last bound counts everything longer (+Inf).
pub const BOUNDS_US: [u64; 19] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 60_000_000,
];
/// Buckets per histogram, +Inf included.
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// The label of the entry that counts indices beyond the tables.
pub const OTHER: &str = "other";

/// Backend servers that reloads may add beyond those configured at start-up, each with its own
/// per-server histograms; more count as [`OTHER`].
pub const EXTRA_SERVERS: usize = 64;

/// The backend addresses by histogram index: appended to, never reordered.
#[derive(Debug, Default)]
pub struct Servers {
    addrs: Mutex<Vec<SocketAddr>>,
    capacity: usize,
}

impl Servers {
    fn new(initial: Vec<SocketAddr>) -> Servers {
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(initial.len());
        for a in initial {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        let capacity = addrs.len() + EXTRA_SERVERS;
        Servers {
            addrs: Mutex::new(addrs),
            capacity,
        }
    }

    /// Registers the addresses not known yet (while there is room) and returns the registry.
    fn register(&self, new: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
        let mut addrs = self.addrs.lock().unwrap_or_else(PoisonError::into_inner);
        for a in new {
            if !addrs.contains(&a) && addrs.len() < self.capacity {
                addrs.push(a);
            }
        }
        addrs.clone()
    }

    fn snapshot(&self) -> Vec<SocketAddr> {
        self.addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One single-writer histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last is +Inf.
    buckets: [Counter; BUCKETS],
    sum_us: Counter,
    max_us: Counter,
}

impl Histogram {
    /// Adds one sample. Only the owning worker calls this.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros();
        let i = BOUNDS_US.partition_point(|&b| b < us);
        if let Some(bucket) = self.buckets.get(i) {
            bucket.inc();
        }
        self.sum_us.add(us);
        if us > self.max_us.get() {
            self.max_us.set(us);
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0; BUCKETS];
        for (out, b) in buckets.iter_mut().zip(&self.buckets) {
            *out = b.get();
        }
        HistogramSnapshot {
            buckets,
            sum_us: self.sum_us.get(),
            max_us: self.max_us.get(),
        }
    }
}

/// A point-in-time copy of a [`Histogram`], or the merge of several (`+=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per-bucket counts (not cumulative), [`BOUNDS_US`] then +Inf.
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
    /// The longest sample (0 when there is none).
    pub max_us: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            buckets: [0; BUCKETS],
            sum_us: 0,
            max_us: 0,
        }
    }
}

impl std::ops::AddAssign for HistogramSnapshot {
    fn add_assign(&mut self, o: HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a = a.wrapping_add(b);
        }
        self.sum_us = self.sum_us.wrapping_add(o.sum_us);
        self.max_us = self.max_us.max(o.max_us);
    }
}

impl HistogramSnapshot {
    /// Samples counted (the buckets' sum, so it always agrees with them).
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }

    /// The `q`-quantile (`0 < q ≤ 1`) in microseconds, `None` without samples: the bucket that
    /// holds the sample of rank ⌈q·count⌉, interpolated linearly between its bounds (the +Inf
    /// bucket ends at the maximum), and never beyond the maximum.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if seen + n >= rank {
                let lower = i
                    .checked_sub(1)
                    .and_then(|j| BOUNDS_US.get(j))
                    .copied()
                    .unwrap_or(0);
                let upper = BOUNDS_US
                    .get(i)
                    .copied()
                    .unwrap_or(self.max_us)
                    .min(self.max_us)
                    .max(lower);
                let within = (rank - seen) as f64 / n as f64;
                let value = lower + ((upper - lower) as f64 * within).round() as u64;
                return Some(value.min(self.max_us));
            }
            seen += n;
        }
        Some(self.max_us)
    }
}

/// What is measured, one histogram each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From accept to the end of the TLS handshake (TLS connections whose handshake finished).
    Handshake,
    /// From the start of the backend connect attempt that succeeded to its completion.
    Connect,
    /// From the end of the handshake (plain listeners: accept) to the backend's first byte.
    FirstByte,
    /// From accept to the end of the connection (every connection).
    Duration,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Handshake,
        Kind::Connect,
        Kind::FirstByte,
        Kind::Duration,
    ];

    /// The key in `tern ctl stats` and the middle of the metric name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Handshake => "tls_handshake",
            Kind::Connect => "backend_connect",
            Kind::FirstByte => "first_backend_byte",
            Kind::Duration => "connection_duration",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Kind::Handshake => "From accept to the end of the TLS handshake.",
            Kind::Connect => "From the start of the backend connect that succeeded to its end.",
            Kind::FirstByte => {
                "From the end of the TLS handshake (plain listeners: accept) to the first byte \
                 from the backend."
            }
            Kind::Duration => "From accept to the end of the connection.",
        }
    }
}

/// One connection's measurements, taken when it ends (`driver::Conn::latency`). `None`: the
/// milestone was not reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub handshake: Option<Duration>,
    pub connect: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub duration: Duration,
}

/// The four histograms of one listener or one server.
#[derive(Debug, Default)]
pub struct Set {
    handshake: Histogram,
    connect: Histogram,
    first_byte: Histogram,
    duration: Histogram,
}

impl Set {
    fn record(&self, s: &Sample, with_handshake: bool) {
        if let Some(d) = s.handshake.filter(|_| with_handshake) {
            self.handshake.record(d);
        }
        if let Some(d) = s.connect {
            self.connect.record(d);
        }
        if let Some(d) = s.first_byte {
            self.first_byte.record(d);
        }
        self.duration.record(s.duration);
    }

    fn snapshot(&self) -> SetSnapshot {
        SetSnapshot {
            handshake: self.handshake.snapshot(),
            connect: self.connect.snapshot(),
            first_byte: self.first_byte.snapshot(),
            duration: self.duration.snapshot(),
        }
    }
}

/// A point-in-time copy of a [`Set`], or the merge of several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetSnapshot {
    pub handshake: HistogramSnapshot,
    pub connect: HistogramSnapshot,
    pub first_byte: HistogramSnapshot,
    pub duration: HistogramSnapshot,
}

impl SetSnapshot {
    pub fn get(&self, kind: Kind) -> &HistogramSnapshot {
        match kind {
            Kind::Handshake => &self.handshake,
            Kind::Connect => &self.connect,
            Kind::FirstByte => &self.first_byte,
            Kind::Duration => &self.duration,
        }
    }

    fn is_empty(&self) -> bool {
        Kind::ALL.iter().all(|&k| self.get(k).count() == 0)
    }

    /// `{ "tls_handshake": { "count", "p50_ms", .., "max_ms" }, .. }` for `tern ctl stats`.
    pub fn percentiles_json(&self) -> serde_json::Value {
        let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
        let mut out = serde_json::Map::new();
        for kind in Kind::ALL {
            let h = self.get(kind);
            let count = h.count();
            out.insert(
                kind.name().to_string(),
                serde_json::json!({
                    "count": count,
                    "p50_ms": ms(h.quantile(0.5)),
                    "p90_ms": ms(h.quantile(0.9)),
                    "p99_ms": ms(h.quantile(0.99)),
                    "p999_ms": ms(h.quantile(0.999)),
                    "max_ms": ms((count > 0).then_some(h.max_us)),
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

impl std::ops::AddAssign for SetSnapshot {
    fn add_assign(&mut self, o: SetSnapshot) {
        self.handshake += o.handshake;
        self.connect += o.connect;
        self.first_byte += o.first_byte;
        self.duration += o.duration;
    }
}

/// One worker's histograms: a [`Set`] per listener and per backend server, each table with one
/// more entry at its end for indices beyond it ([`OTHER`]).
#[derive(Debug)]
pub struct WorkerLatency {
    listeners: Box<[Set]>,
    /// Handshake histograms stay empty here: the handshake is the listener's business, and in
    /// `first-byte` mode it is over before a server is chosen.
    servers: Box<[Set]>,
    registry: Arc<Servers>,
}

impl WorkerLatency {
    fn new(listeners: usize, registry: Arc<Servers>) -> WorkerLatency {
        let table = |n: usize| (0..=n).map(|_| Set::default()).collect();
        WorkerLatency {
            listeners: table(listeners),
            servers: table(registry.capacity),
            registry,
        }
    }

    /// The backend addresses by histogram index, after registering `servers` (the pool the
    /// worker starts with, or a reload's): the worker keeps this copy and looks a server's
    /// index up in it ([`server_index`]).
    pub fn servers(&self, servers: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
        self.registry.register(servers)
    }

    /// Records one ended connection of listener `listener` (its index in `config.listeners`)
    /// that used backend server `server` last (its index in the registry, [`server_index`]),
    /// if any.
    pub fn record(&self, listener: usize, server: Option<usize>, sample: &Sample) {
        if let Some(set) = entry(&self.listeners, listener) {
            set.record(sample, true);
        }
        if let Some(set) = server.and_then(|s| entry(&self.servers, s)) {
            set.record(sample, false);
        }
    }
}

/// The histogram index of backend `addr` in a worker's copy of the registry
/// ([`WorkerLatency::servers`]); an address it does not hold counts as [`OTHER`].
pub fn server_index(registry: &[SocketAddr], addr: SocketAddr) -> usize {
    registry
        .iter()
        .position(|a| *a == addr)
        .unwrap_or(usize::MAX)
}

/// Entry `i` of `table`, or its last ([`OTHER`]) one when `i` is beyond.
fn entry(table: &[Set], i: usize) -> Option<&Set> {
    table.get(i.min(table.len().saturating_sub(1)))
}

/// Every worker's histograms and the names of the indices: what the readers see.
#[derive(Debug, Default)]
pub struct Latency {
    /// The listeners' addresses, by index in `config.listeners` (fixed for the process).
    listeners: Vec<SocketAddr>,
    /// The backend servers' addresses, by histogram index.
    servers: Arc<Servers>,
    workers: Mutex<Vec<Arc<WorkerLatency>>>,
}

impl Latency {
    pub fn new(listeners: Vec<SocketAddr>, servers: Vec<SocketAddr>) -> Latency {
        Latency {
            listeners,
            servers: Arc::new(Servers::new(servers)),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// A new worker's tables, sized from the listeners and servers known now, and kept for
    /// the readers.
    pub fn worker(&self) -> Arc<WorkerLatency> {
        let w = Arc::new(WorkerLatency::new(
            self.listeners.len(),
            self.servers.clone(),
        ));
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(w.clone());
        w
    }

    /// Every worker's tables added up, per listener and per server (by address; entries for
    /// the same address merge), and the total over the listeners.
    pub fn report(&self) -> Report {
        let workers: Vec<Arc<WorkerLatency>> = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let names: Vec<String> = self.listeners.iter().map(ToString::to_string).collect();
        let listeners = merge(&names, workers.iter().map(|w| &w.listeners[..]));
        let names: Vec<String> = self
            .servers
            .snapshot()
            .iter()
            .map(ToString::to_string)
            .collect();
        let servers = merge(&names, workers.iter().map(|w| &w.servers[..]));
        let mut total = SetSnapshot::default();
        for (_, s) in &listeners {
            total += *s;
        }
        Report {
            total,
            listeners,
            servers,
        }
    }
}

/// Adds up the workers' tables into one entry per name (`names[i]` names index `i`; indices
/// without a name are [`OTHER`]). Every name gets an entry, even without samples; [`OTHER`]
/// only when it has some.
fn merge<'a>(
    names: &[String],
    tables: impl Iterator<Item = &'a [Set]>,
) -> Vec<(String, SetSnapshot)> {
    let mut out: Vec<(String, SetSnapshot)> = Vec::new();
    let mut add = |name: &str, s: SetSnapshot| match out.iter_mut().find(|(n, _)| n == name) {
        Some((_, total)) => *total += s,
        None => out.push((name.to_string(), s)),
    };
    for name in names {
        add(name, SetSnapshot::default());
    }
    let mut other = SetSnapshot::default();
    for table in tables {
        for (i, set) in table.iter().enumerate() {
            // The table's last entry is its own `other`.
            match names.get(i).filter(|_| i + 1 < table.len()) {
                Some(name) => add(name, set.snapshot()),
                None => other += set.snapshot(),
            }
        }
    }
    if !other.is_empty() {
        add(OTHER, other);
    }
    out
}

/// What [`Latency::report`] returns.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Over every listener.
    pub total: SetSnapshot,
    /// By listener address.
    pub listeners: Vec<(String, SetSnapshot)>,
    /// By backend server address.
    pub servers: Vec<(String, SetSnapshot)>,
}

impl Report {
    /// The `latency` part of `tern ctl stats`: percentiles per listener, per server and total.
    pub fn percentiles_json(&self) -> serde_json::Value {
        let each = |key: &str, v: &[(String, SetSnapshot)]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|(name, s)| {
                    let mut o = s.percentiles_json();
                    if let Some(map) = o.as_object_mut() {
                        map.insert(key.to_string(), serde_json::Value::from(name.as_str()));
                    }
                    o
                })
                .collect()
        };
        serde_json::json!({
            "total": self.total.percentiles_json(),
            "listeners": each("listener", &self.listeners),
            "servers": each("server", &self.servers),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn samples_fall_in_the_bucket_whose_bound_holds_them() {
        let h = Histogram::default();
        for v in [0, 50, 51, 100, 60_000_000, 60_000_001, u64::MAX / 2] {
            h.record(us(v));
        }
        let s = h.snapshot();
        assert_eq!(s.buckets[0], 2, "0 and 50 µs: le 50 µs");
        assert_eq!(s.buckets[1], 2, "51 and 100 µs: le 100 µs");
        assert_eq!(s.buckets[BUCKETS - 2], 1, "60 s: the last bound");
        assert_eq!(s.buckets[BUCKETS - 1], 2, "beyond: +Inf");
        assert_eq!(s.count(), 7);
        assert_eq!(s.max_us, u64::MAX / 2);
        assert!(BOUNDS_US.windows(2).all(|w| w[0] < w[1]), "ascending");
    }

    #[test]
    fn snapshots_merge_by_adding_and_keeping_the_max() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.record(us(70));
        a.record(us(3_000));
        b.record(us(80));
        let mut m = a.snapshot();
        m += b.snapshot();
        assert_eq!(m.count(), 3);
        assert_eq!(m.buckets[1], 2);
        assert_eq!(m.sum_us, 3_150);
        assert_eq!(m.max_us, 3_000);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket_and_never_pass_the_max() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile(0.5), None, "no samples");
        // 100 samples in (1 ms, 2.5 ms]: ranks spread linearly over the bucket.
        for _ in 0..100 {
            h.record(us(2_000));
        }
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), Some(1_500));
        assert_eq!(s.quantile(0.9), Some(1_900));
        assert_eq!(s.quantile(1.0), Some(2_000), "the bucket ends at the max");
        // One slow outlier in +Inf: p99 stays in the first bucket, the max is exact.
        h.record(us(90_000_000));
        let s = h.snapshot();
        assert!(
            s.quantile(0.99).is_some_and(|v| v <= 2_500),
            "{:?}",
            s.quantile(0.99)
        );
        assert_eq!(s.quantile(1.0), Some(90_000_000));
        assert_eq!(s.quantile(0.999), Some(90_000_000));
    }

    #[test]
    fn indices_beyond_the_tables_count_as_other_and_names_merge() {
        let a: SocketAddr = "127.0.0.1:443".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let c: SocketAddr = "127.0.0.1:8081".parse().expect("addr");
        let book = Latency::new(vec![a], vec![b, b]);
        let (w0, w1) = (book.worker(), book.worker());
        assert_eq!(w0.servers([b]), vec![b], "one index per address");
        let sample = Sample {
            handshake: Some(us(300)),
            connect: Some(us(60)),
            first_byte: Some(us(900)),
            duration: us(5_000),
        };
        w0.record(0, Some(0), &sample);
        w1.record(0, Some(0), &sample);
        w1.record(7, Some(usize::MAX), &Sample::default());
        let r = book.report();
        assert_eq!(r.listeners.len(), 2, "{r:?}");
        assert_eq!(r.listeners[0].0, "127.0.0.1:443");
        assert_eq!(r.listeners[0].1.duration.count(), 2);
        assert_eq!(r.listeners[0].1.handshake.count(), 2);
        assert_eq!(r.listeners[1].0, OTHER);
        assert_eq!(r.listeners[1].1.duration.count(), 1);
        assert_eq!(r.total.duration.count(), 3);
        assert_eq!(r.total.handshake.count(), 2);
        assert_eq!(r.servers[0].0, "127.0.0.1:8080");
        assert_eq!(r.servers[0].1.connect.count(), 2);
        assert_eq!(r.servers[0].1.handshake.count(), 0, "not per server");
        assert_eq!(r.servers[1].0, OTHER);
        // A reload that puts a new server first: the old one keeps its index and history.
        let registry = w1.servers([c, b]);
        assert_eq!(registry, vec![b, c]);
        assert_eq!(server_index(&registry, c), 1);
        assert_eq!(
            server_index(&registry, "127.0.0.1:1".parse().expect("addr")),
            usize::MAX
        );
        w1.record(0, Some(server_index(&registry, c)), &sample);
        let r = book.report();
        assert_eq!(r.servers[0].1.connect.count(), 2);
        assert_eq!(
            (r.servers[1].0.as_str(), r.servers[1].1.connect.count()),
            ("127.0.0.1:8081", 1)
        );

        let json = r.percentiles_json();
        assert_eq!(json["total"]["tls_handshake"]["count"], 3);
        assert_eq!(json["total"]["tls_handshake"]["max_ms"], 0.3);
        assert_eq!(json["listeners"][0]["listener"], "127.0.0.1:443");
        assert!(json["listeners"][0]["first_backend_byte"]["p99_ms"].is_number());
        assert!(json["servers"][1]["tls_handshake"]["p50_ms"].is_null());
    }
}
