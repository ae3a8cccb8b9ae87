//! The endpoint's HTTP answers and the collector's encoding, without sockets or workers.

use std::sync::Arc;

use super::latency::{Latency, Sample};
use super::*;
use crate::counters::WorkerCounters;
use crate::tcp::time::Duration as TcpDuration;

fn state() -> Arc<ControlState> {
    let (a, b) = (
        "127.0.0.1:443".parse().expect("addr"),
        "[::1]:8443".parse().expect("addr"),
    );
    let latency = Arc::new(Latency::new(
        vec![a, b],
        vec!["127.0.0.1:8080".parse().expect("addr")],
    ));
    let workers = vec![
        Arc::new(WorkerCounters::default()),
        Arc::new(WorkerCounters::default()),
    ];
    workers[0].accepted.add(3);
    workers[0].active.add(2);
    workers[1].accepted.add(4);
    workers[1].client_bytes_in.add(1234);
    let w = latency.worker();
    let ms = |n| Some(TcpDuration::from_millis(n));
    for _ in 0..3 {
        w.record(
            0,
            Some(0),
            &Sample {
                handshake: ms(2),
                connect: ms(1),
                first_byte: ms(5),
                duration: TcpDuration::from_millis(40),
            },
        );
    }
    Arc::new(ControlState::for_tests(workers, Vec::new(), latency))
}

fn get(head: &str, state: &Arc<ControlState>) -> String {
    let registry = registry(state.clone());
    String::from_utf8(respond(head.as_bytes(), &registry)).expect("UTF-8")
}

/// The lines of a Prometheus text body that are samples of `name` (exactly that name).
fn samples<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

#[test]
fn counters_gauges_and_histograms_are_encoded_with_units_and_labels() {
    let state = state();
    let reply = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &state);
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );

    assert_eq!(
        samples(body, "tern_accepted_total"),
        [
            "tern_accepted_total{worker=\"0\",path=\"kernel\"} 3",
            "tern_accepted_total{worker=\"1\",path=\"kernel\"} 4",
        ]
    );
    assert!(
        body.contains("# TYPE tern_accepted_total counter\n"),
        "{body}"
    );
    assert!(body.contains("# HELP tern_accepted_total Client connections accepted.\n"));
    // A gauge keeps its name; a byte count gets the unit before `_total`.
    assert!(body.contains("# TYPE tern_active gauge\n"));
    assert_eq!(
        samples(body, "tern_active")[0],
        "tern_active{worker=\"0\",path=\"kernel\"} 2"
    );
    assert_eq!(
        samples(body, "tern_client_in_bytes_total")[1],
        "tern_client_in_bytes_total{worker=\"1\",path=\"kernel\"} 1234"
    );
    assert!(body.contains("tern_build_info{version=\""), "{body}");
    assert!(body.contains("# TYPE tern_start_time_seconds gauge\n"));

    // Histograms: per listener (every configured one, with or without samples) and server.
    assert!(body.contains("# TYPE tern_tls_handshake_seconds histogram\n"));
    assert_eq!(
        samples(body, "tern_tls_handshake_seconds_count"),
        [
            "tern_tls_handshake_seconds_count{listener=\"127.0.0.1:443\"} 3",
            "tern_tls_handshake_seconds_count{listener=\"[::1]:8443\"} 0",
        ]
    );
    assert!(body.contains(
        "tern_connection_duration_seconds_bucket{listener=\"127.0.0.1:443\",le=\"0.05\"} 3\n"
    ));
    assert!(body.contains(
        "tern_connection_duration_seconds_bucket{listener=\"127.0.0.1:443\",le=\"0.025\"} 0\n"
    ));
    assert!(body.contains(
        "tern_connection_duration_seconds_bucket{listener=\"127.0.0.1:443\",le=\"+Inf\"} 3\n"
    ));
    assert_eq!(
        samples(body, "tern_server_backend_connect_seconds_count"),
        ["tern_server_backend_connect_seconds_count{server=\"127.0.0.1:8080\"} 3"]
    );
    assert!(
        !body.contains("tern_server_tls_handshake"),
        "no handshake histogram per server"
    );

    // Every family is described once.
    let mut types: Vec<&str> = body.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let n = types.len();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types.len(), n, "a family described twice");
}

#[test]
fn openmetrics_is_served_to_scrapers_that_ask_for_it() {
    let state = state();
    let reply = get(
        "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        &state,
    );
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains("# TYPE tern_accepted counter\n"), "{body}");
    assert!(body.contains("# UNIT tern_tls_handshake_seconds seconds\n"));
}

#[test]
fn other_requests_get_http_errors() {
    let state = state();
    for (head, status) in [
        ("GET / HTTP/1.1\r\n\r\n", "404"),
        ("GET /metricsx HTTP/1.1\r\n\r\n", "404"),
        ("POST /metrics HTTP/1.1\r\n\r\n", "405"),
        ("garbage\r\n\r\n", "400"),
        ("GET /metrics HTTP/1.1\r\nHost: x", "400"),
    ] {
        let reply = get(head, &state);
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status} ")),
            "{head:?}: {reply}"
        );
        assert!(reply.contains("Connection: close\r\n"), "{reply}");
    }
    let long = format!("GET /metrics HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD));
    assert!(get(&long, &state).starts_with("HTTP/1.1 431 "));
    let reply = get("HEAD /metrics?x=1 HTTP/1.1\r\n\r\n", &state);
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    assert!(reply.ends_with("\r\n\r\n"), "HEAD: no body");
}

/// Counters documented as gauges are exported as gauges, and the list names real fields.
#[test]
fn the_gauge_list_matches_the_counters_docs() {
    let all: Vec<(&str, &str, u64)> = [
        crate::counters::Snapshot::default().fields(),
        crate::bypass::BypassSnapshot::default().fields(),
        crate::bypass::proxy::TcpSnapshot::default().fields(),
    ]
    .concat();
    for (name, doc, _) in &all {
        let says_gauge = doc.trim_start().starts_with("Gauge:") || doc.contains("(a gauge)");
        if says_gauge {
            assert!(GAUGES.contains(name), "{name} is a gauge: add it to GAUGES");
        }
    }
    for gauge in GAUGES {
        assert!(
            all.iter().any(|(name, _, _)| name == gauge),
            "GAUGES names {gauge}, which no counter struct has"
        );
    }
}
