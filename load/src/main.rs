//! `tern-load`: tern's load generator — a lean rustls (aws-lc-rs) client for honest TLS
//! benchmarks on a 2-core machine it shares with the server under test.
//!
//! Modes (`--mode`): `new-conn` (full handshake + one GET + close), `resumed` (the same with
//! session resumption), `keepalive` (persistent connections, back-to-back requests), `bulk`
//! (large bodies, MB/s) and `idle` (open N connections and hold them). Closed loop by default
//! (`--concurrency`/`--connections`), open loop with `--rate`, where every latency is measured
//! from the request's intended send time (no coordinated omission). Runs are bounded by
//! `--duration` and/or `--requests` and always end by themselves: every wait has a deadline.
//! `--plain` runs the same modes over plain TCP against an echo server (no TLS, no HTTP; each
//! operation is `--message-bytes` sent and echoed back), for tern's `tls = false` listeners.
//! See load/README.md for every flag and the JSON schema.
//!
//! Module map: `cli` (flags → `Plan`), `coord` (threads/processes, the common window),
//! `worker` (one epoll loop), `conn` (one TLS connection), `http` (requests, response
//! framing), `pacer` (open-loop intended times), `tls` (rustls configuration), `stats`
//! (counters and histograms), `report` (JSON and human output, /proc samples), `sys` (the
//! crate's only `unsafe`: syscalls).

#![deny(unsafe_code)]

mod cli;
mod conn;
mod coord;
mod http;
mod pacer;
mod report;
mod stats;
#[expect(
    unsafe_code,
    reason = "the crate's syscall wrappers, each with a SAFETY argument"
)]
mod sys;
mod tls;
mod worker;

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

use crate::cli::Args;
use crate::report::Report;

fn main() -> ExitCode {
    let args = Args::parse();
    let cpu_count = core_affinity::get_core_ids()
        .map_or(1, |ids| ids.len())
        .max(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let plan = match args.validate(sys::nofile_limit(), cpu_count) {
        Ok(plan) => Arc::new(plan),
        Err(e) => {
            eprintln!("tern-load: {e}");
            return ExitCode::from(2);
        }
    };
    // SIGINT/SIGTERM end the window early; the report is still produced.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("tern-load: cannot install a signal handler: {e}");
            return ExitCode::from(1);
        }
    }

    if let Some(index) = plan.child_index {
        return match coord::run_child(plan, index, stop) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tern-load: child {index}: {e}");
                ExitCode::from(1)
            }
        };
    }

    let result = match coord::run_top(plan.clone(), stop) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern-load: {e}");
            return ExitCode::from(1);
        }
    };
    let report = Report::new(&plan, &result);
    if !plan.quiet {
        eprint!("{}", report.human());
    }
    if plan.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("tern-load: serialising the report: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
