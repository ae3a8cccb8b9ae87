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

/// Each backend server's merged state and counters, as `tern_backend_server_*{server}`.
#[test]
fn backend_servers_are_exported_with_their_state_and_counters() {
    use crate::driver::board::{Published, ServerStats, STATE_DOWN, STATE_RETIRED, STATE_UP};
    let state = state();
    let (a, b) = (
        "127.0.0.1:8080".parse().expect("addr"),
        "127.0.0.1:8081".parse().expect("addr"),
    );
    let server = |addr, state, weight| {
        let s = Arc::new(ServerStats::new(addr, weight));
        s.state.set(state);
        s
    };
    let (w0, w1) = (
        Arc::new(Published::default()),
        Arc::new(Published::default()),
    );
    state.backends.register(w0.clone());
    state.backends.register(w1.clone());
    let (a0, b0) = (server(a, STATE_UP, 3), server(b, STATE_DOWN, 1));
    a0.connects.add(5);
    a0.active.add(2);
    a0.probes_ok.add(4);
    b0.connect_errors.add(6);
    b0.connect_timeouts.add(1);
    b0.consecutive_failures.add(7);
    b0.probes_failed.add(9);
    let a1 = server(a, STATE_DOWN, 3);
    a1.connects.add(1);
    w0.publish(vec![a0, b0]);
    w1.publish(vec![a1, server(b, STATE_RETIRED, 1)]);

    let reply = get("GET /metrics HTTP/1.1\r\n\r\n", &state);
    let (_, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let on = |name: &str| samples(body, name).join("\n");
    assert_eq!(
        on("tern_backend_server_up"),
        "tern_backend_server_up{server=\"127.0.0.1:8080\"} 1\n\
         tern_backend_server_up{server=\"127.0.0.1:8081\"} 0"
    );
    assert_eq!(
        on("tern_backend_server_retired"),
        "tern_backend_server_retired{server=\"127.0.0.1:8080\"} 0\n\
         tern_backend_server_retired{server=\"127.0.0.1:8081\"} 0",
        "down for the worker that has it live: not retired"
    );
    assert!(
        body.contains("# TYPE tern_backend_server_up gauge\n"),
        "{body}"
    );
    assert!(body.contains("# TYPE tern_backend_server_connects_total counter\n"));
    for (name, want) in [
        ("tern_backend_server_connects_total", ["6", "0"]),
        ("tern_backend_server_active", ["2", "0"]),
        ("tern_backend_server_weight", ["3", "1"]),
        ("tern_backend_server_workers_up", ["1", "0"]),
        ("tern_backend_server_connect_errors_total", ["0", "6"]),
        ("tern_backend_server_connect_timeouts_total", ["0", "1"]),
        ("tern_backend_server_consecutive_failures", ["0", "7"]),
        ("tern_backend_server_probes_ok_total", ["4", "0"]),
        ("tern_backend_server_probes_failed_total", ["0", "9"]),
    ] {
        let values: Vec<&str> = samples(body, name)
            .iter()
            .filter_map(|l| l.rsplit_once(' ').map(|(_, v)| v))
            .collect();
        assert_eq!(values, want, "{name}:\n{body}");
    }
    // No family collides with the workers' own `tern_backend_*` counters.
    let mut types: Vec<&str> = body.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let n = types.len();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types.len(), n, "a family described twice");
}

#[test]
fn nanosecond_and_byte_fields_are_named_in_base_units() {
    assert_eq!(
        metric_name("tern_xsk", "work_ns"),
        ("tern_xsk_work".to_string(), Some(Unit::Seconds))
    );
    assert_eq!(
        metric_name("tern_xsk", "sleep_cpu_ns"),
        ("tern_xsk_sleep_cpu".to_string(), Some(Unit::Seconds))
    );
    assert_eq!(
        metric_name("tern", "client_bytes_in"),
        ("tern_client_in".to_string(), Some(Unit::Bytes))
    );
    assert_eq!(
        metric_name("tern", "accepted"),
        ("tern_accepted".to_string(), None)
    );
}
