//! What a worker counts while it runs, and how the counts of threads and processes merge.
//!
//! Owns: the [`Stats`] record (counters, error kinds, HTTP status classes, byte counts, the
//! latency and handshake HdrHistograms, the negotiated TLS parameters, idle-mode figures), its
//! merge, and its JSON form for the child → parent pipe (histograms travel as
//! `[value, count]` pairs of their recorded buckets, which re-record losslessly at the same
//! precision). Does not own: deciding what is in the measurement window (`worker` decides and
//! calls in), or the final report (`report`).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Histogram range: 1 µs to one hour, 3 significant digits (0.1 % value resolution).
pub const HIST_MAX_US: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// Why an operation failed. Each failure is counted under exactly one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connect failed (refused, unreachable, no source port left, …).
    Connect,
    /// The TLS layer failed: a bad record, an alert, a certificate or handshake error.
    Tls,
    /// The HTTP response was malformed or used something tern-load does not parse.
    Http,
    /// A connect, handshake or response took longer than `--timeout`.
    Timeout,
    /// The server closed or reset the connection before the response was complete.
    Closed,
    /// Any other socket error.
    Io,
}

/// Failures by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    pub connect: u64,
    pub tls: u64,
    pub http: u64,
    pub timeout: u64,
    pub closed: u64,
    pub io: u64,
}

impl Errors {
    pub fn add(&mut self, kind: ErrorKind) {
        *match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Tls => &mut self.tls,
            ErrorKind::Http => &mut self.http,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Closed => &mut self.closed,
            ErrorKind::Io => &mut self.io,
        } += 1;
    }

    pub fn total(&self) -> u64 {
        self.connect + self.tls + self.http + self.timeout + self.closed + self.io
    }

    fn merge(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.tls += o.tls;
        self.http += o.http;
        self.timeout += o.timeout;
        self.closed += o.closed;
        self.io += o.io;
    }
}

/// Completed responses by status class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusClasses {
    #[serde(rename = "2xx")]
    pub s2xx: u64,
    #[serde(rename = "3xx")]
    pub s3xx: u64,
    #[serde(rename = "4xx")]
    pub s4xx: u64,
    #[serde(rename = "5xx")]
    pub s5xx: u64,
    /// Anything else a server may send (1xx are interim and never final; 6xx–9xx are invalid
    /// classes but syntactically allowed).
    pub other: u64,
}

impl StatusClasses {
    pub fn add(&mut self, status: u16) {
        *match status / 100 {
            2 => &mut self.s2xx,
            3 => &mut self.s3xx,
            4 => &mut self.s4xx,
            5 => &mut self.s5xx,
            _ => &mut self.other,
        } += 1;
    }

    fn merge(&mut self, o: &StatusClasses) {
        self.s2xx += o.s2xx;
        self.s3xx += o.s3xx;
        self.s4xx += o.s4xx;
        self.s5xx += o.s5xx;
        self.other += o.other;
    }
}

/// Bytes moved inside the measurement window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    /// TLS records written to sockets (handshakes included).
    pub tls_sent: u64,
    /// TLS records read from sockets.
    pub tls_received: u64,
    /// Request body bytes (POST/PUT) handed to TLS.
    pub body_sent: u64,
    /// Response body bytes received.
    pub body_received: u64,
}

impl Bytes {
    fn merge(&mut self, o: &Bytes) {
        self.tls_sent += o.tls_sent;
        self.tls_received += o.tls_received;
        self.body_sent += o.body_sent;
        self.body_received += o.body_received;
    }
}

/// The parameters the first completed handshake negotiated (all handshakes of a run use the
/// same configuration, so one sample describes them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    pub version: String,
    pub cipher_suite: String,
    pub kx_group: String,
    pub alpn: Option<String>,
}

/// Idle mode: how many connections were opened and how many were still up at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleStats {
    /// Connections the run set out to hold.
    pub target: u64,
    /// Connections whose handshake (and `--idle-requests` requests) completed.
    pub established: u64,
    /// Connections that failed while opening (kinds under `errors`).
    pub failed: u64,
    /// Established connections the server closed during the hold.
    pub closed_during_hold: u64,
    /// Connections still up when the hold ended.
    pub up_at_end: u64,
    /// Time from the start of the ramp until every connection was up or had failed; the
    /// maximum over workers, nanoseconds.
    pub ramp_ns: u64,
}

impl IdleStats {
    fn merge(&mut self, o: &IdleStats) {
        self.target += o.target;
        self.established += o.established;
        self.failed += o.failed;
        self.closed_during_hold += o.closed_during_hold;
        self.up_at_end += o.up_at_end;
        self.ramp_ns = self.ramp_ns.max(o.ramp_ns);
    }
}

/// Everything one worker (or, merged, a process or the whole run) counted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Measured requests (started inside the window) whose response was complete, any status;
    /// includes those that completed during the drain after the window.
    pub completed: u64,
    /// Responses completed inside the window: the numerator of the rate.
    pub in_window: u64,
    pub status: StatusClasses,
    pub errors: Errors,
    /// Measured requests still in flight when the drain's grace period ran out.
    pub abandoned: u64,
    /// TCP connects started inside the window.
    pub connections_opened: u64,
    /// Handshakes completed inside the window, by kind.
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
    /// Persistent connections re-opened because the server closed one or it failed.
    pub reconnects: u64,
    /// Persistent or idle connections the server closed between requests.
    pub closed_by_peer: u64,
    /// Resumed mode: priming transactions completed before the window.
    pub primed: u64,
    /// `--close server`: transactions whose server had not closed 1 s after the response (the
    /// client closed them).
    pub close_timeouts: u64,
    pub bytes: Bytes,
    /// Request latency, µs: from the intended send time (open loop) or the actual one (closed
    /// loop) to the last byte of the response. In new-conn and resumed modes a request is the
    /// whole transaction (connect, handshake, request, response).
    #[serde(with = "hist_pairs")]
    pub latency: Histogram<u64>,
    /// Connect start (or intended start) to handshake complete, µs.
    #[serde(with = "hist_pairs")]
    pub handshake: Histogram<u64>,
    pub tls: Option<TlsInfo>,
    pub idle: Option<IdleStats>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            completed: 0,
            in_window: 0,
            status: StatusClasses::default(),
            errors: Errors::default(),
            abandoned: 0,
            connections_opened: 0,
            handshakes_full: 0,
            handshakes_resumed: 0,
            reconnects: 0,
            closed_by_peer: 0,
            primed: 0,
            close_timeouts: 0,
            bytes: Bytes::default(),
            latency: new_histogram(),
            handshake: new_histogram(),
            tls: None,
            idle: None,
        }
    }

    /// Records one request latency from `start_ns` to `done_ns` (rounded to µs).
    pub fn record_latency(&mut self, start_ns: u64, done_ns: u64) {
        self.latency
            .saturating_record((done_ns.saturating_sub(start_ns) + 500) / 1000);
    }

    pub fn record_handshake(&mut self, start_ns: u64, done_ns: u64) {
        self.handshake
            .saturating_record((done_ns.saturating_sub(start_ns) + 500) / 1000);
    }

    pub fn merge(&mut self, o: &Stats) {
        self.completed += o.completed;
        self.in_window += o.in_window;
        self.status.merge(&o.status);
        self.errors.merge(&o.errors);
        self.abandoned += o.abandoned;
        self.connections_opened += o.connections_opened;
        self.handshakes_full += o.handshakes_full;
        self.handshakes_resumed += o.handshakes_resumed;
        self.reconnects += o.reconnects;
        self.closed_by_peer += o.closed_by_peer;
        self.primed += o.primed;
        self.close_timeouts += o.close_timeouts;
        self.bytes.merge(&o.bytes);
        // Same bounds on both sides, so adding cannot fail; saturate rather than panic anyway.
        if self.latency.add(&o.latency).is_err() {
            for v in o.latency.iter_recorded() {
                self.latency
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        if self.handshake.add(&o.handshake).is_err() {
            for v in o.handshake.iter_recorded() {
                self.handshake
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        if self.tls.is_none() {
            self.tls.clone_from(&o.tls);
        }
        match (&mut self.idle, &o.idle) {
            (Some(a), Some(b)) => a.merge(b),
            (None, Some(b)) => self.idle = Some(b.clone()),
            _ => {}
        }
    }
}

/// Serde for a histogram as the `[value, count]` pairs of its non-empty buckets.
mod hist_pairs {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<[u64; 2]> = h
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect();
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let pairs = Vec::<[u64; 2]>::deserialize(d)?;
        let mut h = super::new_histogram();
        for [value, count] in pairs {
            h.saturating_record_n(value, count);
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = Stats::new();
        a.completed = 3;
        a.errors.add(ErrorKind::Timeout);
        a.status.add(200);
        a.record_latency(0, 1_000_000);
        let mut b = Stats::new();
        b.completed = 4;
        b.errors.add(ErrorKind::Tls);
        b.errors.add(ErrorKind::Tls);
        b.status.add(503);
        b.status.add(99);
        b.record_latency(0, 5_000_000);
        b.tls = Some(TlsInfo {
            version: "TLSv1_3".into(),
            cipher_suite: "TLS13_AES_128_GCM_SHA256".into(),
            kx_group: "X25519".into(),
            alpn: None,
        });
        a.merge(&b);
        assert_eq!(a.completed, 7, "completed");
        assert_eq!(
            (a.errors.timeout, a.errors.tls, a.errors.total()),
            (1, 2, 3),
            "errors"
        );
        assert_eq!(
            (a.status.s2xx, a.status.s5xx, a.status.other),
            (1, 1, 1),
            "status classes"
        );
        assert_eq!(a.latency.len(), 2, "histogram samples");
        assert!(a.latency.max() >= 4_990, "max latency survives the merge");
        assert!(a.tls.is_some(), "TLS info taken from the other side");
    }

    #[test]
    fn json_round_trip_keeps_histogram_buckets() {
        let mut s = Stats::new();
        for us in [1u64, 17, 250, 999, 1_234, 98_765, 3_000_000] {
            s.record_latency(0, us * 1000);
        }
        s.idle = Some(IdleStats {
            target: 10,
            up_at_end: 9,
            ..IdleStats::default()
        });
        let text = serde_json::to_string(&s).expect("serialises");
        let back: Stats = serde_json::from_str(&text).expect("deserialises");
        assert_eq!(back.latency.len(), s.latency.len(), "sample count");
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(
                back.latency.value_at_quantile(q),
                s.latency.value_at_quantile(q),
                "quantile {q}"
            );
        }
        assert_eq!(back.idle, s.idle, "idle stats");
    }
}
