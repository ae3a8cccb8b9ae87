//! `tern ctl --format`: what the client prints for a command's reply. The control socket
//! answers every command with one document (JSON for `stats`, `backends` and `conns`, a line
//! or lines for the others); this module turns it, on the client side, into the format asked
//! for: aligned tables for people (`text`) or JSON for programs (`json`). Without `--format`
//! each command prints what it always has (the reply as it came). Error replies
//! (`error: ...`) are never reformatted.
//!
//! Not here: the commands themselves and their documents ([`super::reply`]).

use std::fmt::Write as _;

use serde_json::Value;

use crate::driver::census::ConnState;
use crate::metrics::latency::Kind;

/// An output format asked for with `tern ctl --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON document (what `stats`, `backends` and `conns` print by default).
    Json,
    /// Aligned tables and plain lines (what the other commands print by default).
    Text,
}

/// The commands whose reply is a JSON document.
fn is_json_command(command: &str) -> bool {
    matches!(command, "stats" | "backends" | "conns")
}

/// What `tern ctl` prints for `command`'s `reply` in `format` (`None`: the command's default,
/// the reply as it came). An `error: ` reply is returned as it came; `Err`: a reply that is
/// not the document the command answers (e.g. a tern of another version).
pub fn render(command: &str, reply: &str, format: Option<Format>) -> Result<String, String> {
    if reply.starts_with("error:") {
        return Ok(reply.to_string());
    }
    match (format, is_json_command(command)) {
        (None, _) | (Some(Format::Json), true) => Ok(reply.to_string()),
        (Some(Format::Text), true) => {
            let doc: Value = serde_json::from_str(reply)
                .map_err(|e| format!("the {command} reply is not JSON: {e}"))?;
            Ok(match command {
                "stats" => stats(&doc),
                "backends" => backends(&doc),
                _ => conns(&doc),
            })
        }
        (Some(Format::Text), false) => Ok(reply.to_string()),
        (Some(Format::Json), false) => {
            let doc = if command == "blocks" {
                serde_json::json!({ "blocks": reply.lines().collect::<Vec<_>>() })
            } else {
                serde_json::json!({ "reply": reply.trim_end() })
            };
            Ok(format!("{doc:#}\n"))
        }
    }
}

/// `stats` as text: uptime, the connection counters (kernel workers, bypass workers, both),
/// the latency percentiles and the backend servers.
pub fn stats(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "uptime {} s", number(&doc["uptime_s"]));
    out.push('\n');
    let (kernel, bypass) = (&doc["total"], &doc["bypass"]["proxy"]);
    let rows: Vec<Vec<String>> = crate::counters::Snapshot::default()
        .fields()
        .into_iter()
        .map(|(name, _, _)| {
            let (k, b) = (kernel[name].as_u64(), bypass[name].as_u64());
            let all = k.unwrap_or(0) + b.unwrap_or(0);
            vec![name.to_string(), show(k), show(b), all.to_string()]
        })
        .collect();
    out += &table(&["counter", "kernel", "bypass", "total"], &rows);
    out.push('\n');
    let latency = &doc["latency"];
    let mut rows = Vec::new();
    let mut scope = |name: String, set: &Value| {
        for kind in Kind::ALL {
            let h = &set[kind.name()];
            if h["count"].as_u64().unwrap_or(0) == 0 {
                continue;
            }
            let mut row = vec![name.clone(), kind.name().to_string(), number(&h["count"])];
            row.extend(
                ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
                    .iter()
                    .map(|p| millis(&h[*p])),
            );
            rows.push(row);
        }
    };
    scope("total".to_string(), &latency["total"]);
    for (list, key) in [("listeners", "listener"), ("servers", "server")] {
        for set in latency[list].as_array().into_iter().flatten() {
            scope(format!("{key} {}", text(&set[key])), set);
        }
    }
    if rows.is_empty() {
        out += "latency: no connection has ended yet\n";
    } else {
        out += &table(
            &[
                "latency (ms)",
                "of",
                "count",
                "p50",
                "p90",
                "p99",
                "p99.9",
                "max",
            ],
            &rows,
        );
    }
    out.push('\n');
    out += &backends(&serde_json::json!({ "servers": doc["backends"] }));
    out
}

/// `backends` as text: one line per server.
pub fn backends(doc: &Value) -> String {
    let rows: Vec<Vec<String>> = doc["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                text(&s["address"]),
                number(&s["weight"]),
                text(&s["state"]),
                format!("{}/{}", number(&s["workers_up"]), number(&s["workers"])),
                number(&s["active"]),
                number(&s["connects"]),
                number(&s["connect_errors"]),
                number(&s["connect_timeouts"]),
                number(&s["consecutive_failures"]),
                number(&s["probes_ok"]),
                number(&s["probes_failed"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no backend server\n".to_string();
    }
    table(
        &[
            "server",
            "weight",
            "state",
            "up/workers",
            "active",
            "connects",
            "errors",
            "timeouts",
            "failures",
            "probes ok",
            "probes failed",
        ],
        &rows,
    )
}

/// `conns` as text: a row per worker, per path and the total; a column per state.
pub fn conns(doc: &Value) -> String {
    let mut header = vec!["workers"];
    header.extend(ConnState::ALL.iter().map(|s| s.name()));
    header.push("total");
    let row = |name: String, counts: &Value| -> Vec<String> {
        let mut row = vec![name];
        // A worker that did not answer: `-` in every column (and named below the table).
        row.extend(ConnState::ALL.iter().map(|s| number(&counts[s.name()])));
        row.push(number(&counts["total"]));
        row
    };
    let mut rows: Vec<Vec<String>> = doc["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            row(
                format!("{} {}", text(&w["path"]), number(&w["worker"])),
                &w["counts"],
            )
        })
        .collect();
    if let Some(paths) = doc["paths"].as_object() {
        rows.extend(paths.iter().map(|(p, c)| row(format!("{p} (all)"), c)));
    }
    rows.push(row("total".to_string(), &doc["total"]));
    let mut out = table(&header, &rows);
    let silent: Vec<String> = doc["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["counts"].is_null())
        .map(|w| format!("{} {}", text(&w["path"]), number(&w["worker"])))
        .collect();
    if !silent.is_empty() {
        let _ = writeln!(
            out,
            "did not answer in time (left out of the sums): {}",
            silent.join(", ")
        );
    }
    out
}

/// Columns aligned: the first to the left, the others (numbers) to the right.
fn table<S: AsRef<str>>(header: &[S], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.as_ref().chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().map(AsRef::as_ref).take(columns));
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn number(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_string(), |n| n.to_string())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn millis(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns_doc() -> Value {
        serde_json::json!({
            "total": {"handshake": 3, "waiting": 0, "connecting": 0, "proxying": 2,
                      "half_closed": 0, "closing": 0, "total": 5},
            "paths": {"kernel": {"handshake": 3, "waiting": 0, "connecting": 0, "proxying": 2,
                                 "half_closed": 0, "closing": 0, "total": 5}},
            "workers": [
                {"path": "kernel", "worker": 0, "counts": {"handshake": 3, "waiting": 0,
                 "connecting": 0, "proxying": 2, "half_closed": 0, "closing": 0, "total": 5}},
                {"path": "kernel", "worker": 1, "counts": null},
            ],
            "unanswered": 1,
        })
    }

    #[test]
    fn conns_text_is_a_table_of_states_with_the_silent_worker_named() {
        let out = conns(&conns_doc());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "workers       handshake  waiting  connecting  proxying  half_closed  closing  total"
        );
        assert_eq!(
            lines[1],
            "kernel 0              3        0           0         2            0        0      5"
        );
        assert_eq!(
            lines[2],
            "kernel 1              -        -           -         -            -        -      -"
        );
        assert!(lines[3].starts_with("kernel (all)  ") && lines[3].ends_with(" 5"));
        assert!(lines[4].starts_with("total  ") && lines[4].ends_with(" 5"));
        assert_eq!(
            lines[5], "did not answer in time (left out of the sums): kernel 1",
            "{out}"
        );
    }

    #[test]
    fn backends_text_has_one_aligned_line_per_server() {
        let doc = serde_json::json!({"servers": [
            {"address": "127.0.0.1:8080", "weight": 1, "state": "up", "workers_up": 2,
             "workers": 2, "consecutive_failures": 0, "connects": 12, "connect_errors": 1,
             "connect_timeouts": 0, "probes_ok": 4, "probes_failed": 0, "active": 3,
             "last_change_unix_ms": 0},
            {"address": "[2001:db8::1]:8080", "weight": 10, "state": "down", "workers_up": 0,
             "workers": 2, "consecutive_failures": 7, "connects": 0, "connect_errors": 7,
             "connect_timeouts": 2, "probes_ok": 0, "probes_failed": 9, "active": 0,
             "last_change_unix_ms": 1},
        ]});
        let out = backends(&doc);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("server  ") && lines[0].ends_with("probes failed"));
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "127.0.0.1:8080",
                "1",
                "up",
                "2/2",
                "3",
                "12",
                "1",
                "0",
                "0",
                "4",
                "0"
            ]
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "[2001:db8::1]:8080",
                "10",
                "down",
                "0/2",
                "0",
                "0",
                "7",
                "2",
                "7",
                "0",
                "9"
            ]
        );
        // Right-aligned numbers: every line is as long as the header.
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{out}");
        assert_eq!(
            backends(&serde_json::json!({"servers": []})),
            "no backend server\n"
        );
    }

    #[test]
    fn stats_text_shows_counters_per_path_percentiles_and_servers() {
        let mut kernel = serde_json::to_value(crate::counters::Snapshot::default()).expect("json");
        kernel["accepted"] = 7.into();
        let mut bypass = kernel.clone();
        bypass["accepted"] = 2.into();
        let histogram = serde_json::json!({"count": 4, "p50_ms": 1.5, "p90_ms": 2.0,
            "p99_ms": 2.5, "p999_ms": 2.5, "max_ms": 3.25});
        let empty = serde_json::json!({"count": 0, "p50_ms": null, "p90_ms": null,
            "p99_ms": null, "p999_ms": null, "max_ms": null});
        let doc = serde_json::json!({
            "uptime_s": 42,
            "total": kernel,
            "bypass": {"proxy": bypass},
            "latency": {
                "total": {"tls_handshake": histogram, "backend_connect": empty,
                          "first_backend_byte": empty, "connection_duration": empty},
                "listeners": [{"listener": "10.0.0.1:443", "tls_handshake": histogram,
                               "backend_connect": empty, "first_backend_byte": empty,
                               "connection_duration": empty}],
                "servers": [],
            },
            "backends": [],
        });
        let out = stats(&doc);
        assert!(out.starts_with("uptime 42 s\n"), "{out}");
        let accepted: Vec<&str> = out
            .lines()
            .find(|l| l.starts_with("accepted "))
            .expect("an accepted row")
            .split_whitespace()
            .collect();
        assert_eq!(accepted, ["accepted", "7", "2", "9"]);
        let rows: Vec<Vec<&str>> = out
            .lines()
            .filter(|l| l.contains("tls_handshake"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "total",
                    "tls_handshake",
                    "4",
                    "1.500",
                    "2.000",
                    "2.500",
                    "2.500",
                    "3.250"
                ],
                vec![
                    "listener",
                    "10.0.0.1:443",
                    "tls_handshake",
                    "4",
                    "1.500",
                    "2.000",
                    "2.500",
                    "2.500",
                    "3.250"
                ],
            ]
        );
        assert!(
            !out.lines()
                .any(|l| l.split_whitespace().any(|w| w == "backend_connect")),
            "empty histograms are left out:\n{out}"
        );
        assert!(out.ends_with("no backend server\n"), "{out}");
    }

    #[test]
    fn formats_apply_to_the_right_commands_and_errors_pass_through() {
        let json = "{\n  \"servers\": []\n}\n";
        assert_eq!(render("backends", json, None), Ok(json.to_string()));
        assert_eq!(
            render("backends", json, Some(Format::Json)),
            Ok(json.to_string())
        );
        assert_eq!(
            render("backends", json, Some(Format::Text)),
            Ok("no backend server\n".to_string())
        );
        assert_eq!(render("ping", "pong\n", None), Ok("pong\n".to_string()));
        assert_eq!(
            render("ping", "pong\n", Some(Format::Text)),
            Ok("pong\n".to_string())
        );
        let doc: Value =
            serde_json::from_str(&render("ping", "pong\n", Some(Format::Json)).expect("render"))
                .expect("JSON");
        assert_eq!(doc, serde_json::json!({"reply": "pong"}));
        let doc: Value = serde_json::from_str(
            &render("blocks", "10.0.0.0/8\n2001:db8::/32\n", Some(Format::Json)).expect("render"),
        )
        .expect("JSON");
        assert_eq!(
            doc,
            serde_json::json!({"blocks": ["10.0.0.0/8", "2001:db8::/32"]})
        );
        for format in [None, Some(Format::Json), Some(Format::Text)] {
            assert_eq!(
                render("stats", "error: busy\n", format),
                Ok("error: busy\n".to_string())
            );
        }
        let err = render("conns", "not json", Some(Format::Text)).expect_err("not JSON");
        assert!(err.contains("conns reply is not JSON"), "{err}");
    }
}
