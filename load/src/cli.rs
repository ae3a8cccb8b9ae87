//! The command line: clap definitions, value syntax (durations, rates, CPU lists, address
//! ranges) and the validation that turns [`Args`] into a [`Plan`].
//!
//! Owns: every flag, its default and its meaning per mode (also documented in load/README.md),
//! the cross-flag rules, and how totals (concurrency, connections, rate, request count) are
//! shared out over workers: K = threads × processes, worker g gets `total / K` plus one if
//! `g < total % K`. Does not own: running anything.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use rustls::pki_types::ServerName;

use crate::tls::{self, TlsOptions, TlsSetupError, Trust, Versions};

/// File descriptors a process keeps for itself (stdio, epoll, pipes, /proc reads) on top of
/// one per connection.
const FD_RESERVE: u64 = 64;

/// What one operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Full handshake + one GET + close, resumption off: transactions/s.
    NewConn,
    /// As new-conn, resuming a session (TLS 1.3 tickets, TLS 1.2 ids/tickets) each time.
    Resumed,
    /// Persistent connections, back-to-back requests: requests/s.
    Keepalive,
    /// Persistent connections moving large bodies (GET a big path or POST --body-bytes): MB/s.
    Bulk,
    /// Open --connections TLS connections, hold them for --duration, count how many stay up.
    Idle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::NewConn => "new-conn",
            Mode::Resumed => "resumed",
            Mode::Keepalive => "keepalive",
            Mode::Bulk => "bulk",
            Mode::Idle => "idle",
        }
    }

    /// One operation is one connection (transaction modes).
    pub fn per_connection(self) -> bool {
        matches!(self, Mode::NewConn | Mode::Resumed)
    }

    /// Requests travel over long-lived connections.
    pub fn persistent(self) -> bool {
        matches!(self, Mode::Keepalive | Mode::Bulk)
    }
}

/// Who ends a transaction's connection in new-conn and resumed modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClosePolicy {
    /// Send `Connection: close`; the server closes first and keeps the TIME_WAIT state.
    Server,
    /// Close (close_notify + FIN) right after the response; TIME_WAIT lands on the client and
    /// can exhaust its ports at high rates.
    Client,
    /// Reset (SO_LINGER 0) right after the response: no TIME_WAIT anywhere.
    Reset,
}

/// tern-load: a lean TLS load generator (rustls client) for benchmarking tern and its peers.
///
/// Prints a human summary on stderr and, with --json, a JSON report on stdout. Exit code 0 if
/// any operation succeeded, 1 if none did or the run could not start, 2 for bad arguments.
#[derive(Debug, Parser)]
#[command(name = "tern-load", version, verbatim_doc_comment)]
pub struct Args {
    /// What one operation is.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Target address.
    #[arg(long, value_name = "IP:PORT")]
    pub connect: SocketAddr,
    /// TLS server name (SNI) and the name the certificate is checked against.
    #[arg(long, default_value = "localhost", value_name = "NAME")]
    pub sni: String,
    /// Host header [default: the SNI name].
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Request target.
    #[arg(long, default_value = "/", value_name = "PATH")]
    pub path: String,
    /// Request method: GET, HEAD, POST or PUT [default: GET, or POST with --body-bytes].
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
    /// Request body size for POST/PUT (a fixed byte pattern, streamed).
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub body_bytes: u64,
    /// Extra request header, repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// PEM file with the CA certificate(s) that sign the server's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Skip certificate chain and name checks (handshake signatures are still verified).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
    /// TLS versions to offer: 1.3, 1.2, or 1.2,1.3.
    #[arg(long, default_value = "1.3", value_name = "LIST")]
    pub tls: String,
    /// Key exchange groups, in preference order (x25519, secp256r1, secp384r1, x25519mlkem768).
    #[arg(long, default_value = "x25519", value_name = "LIST")]
    pub kx: String,
    /// Cipher suites, e.g. TLS13_AES_128_GCM_SHA256 [default: the aws-lc-rs provider's list].
    #[arg(long, value_name = "LIST")]
    pub ciphers: Option<String>,
    /// ALPN protocols to offer, comma-separated [default: none].
    #[arg(long, value_name = "LIST")]
    pub alpn: Option<String>,
    /// Open loop: total rate over all threads and processes (requests/s; connections/s in
    /// new-conn and resumed; the opening rate in idle). Without it the run is closed-loop.
    #[arg(long, value_name = "R[/s]", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// new-conn/resumed: transactions in flight (closed loop) or the cap on them (open loop,
    /// default 1024 per process). idle: handshakes in flight while opening. [default: 32]
    #[arg(long, value_name = "C")]
    pub concurrency: Option<u64>,
    /// keepalive/bulk: persistent connections [default: 32 keepalive, one per worker bulk];
    /// idle: connections to open and hold (required).
    #[arg(long, value_name = "N")]
    pub connections: Option<u64>,
    /// Worker threads per process, each with its own epoll loop.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: usize,
    /// Pin worker g (over all processes) to the g-th CPU of this list, cycling: "1", "0-1,3".
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Run this many processes (fork/exec of itself) and aggregate: needed beyond the
    /// per-process file descriptor limit.
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub processes: usize,
    /// Measurement window (idle: hold time): 10, 1.5s, 500ms, 2m
    /// [default: 10s; 600s when only --requests bounds the run].
    #[arg(long, value_name = "TIME", value_parser = parse_duration_ns)]
    pub duration: Option<u64>,
    /// Stop after this many measured requests (transactions in new-conn/resumed).
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// Run this long before the window opens; nothing from it is counted.
    #[arg(long, default_value = "0", value_name = "TIME", value_parser = parse_duration_ns)]
    pub warmup: u64,
    /// Limit for a TCP connect + handshake, and for a response.
    #[arg(long, default_value = "10s", value_name = "TIME", value_parser = parse_duration_ns)]
    pub timeout: u64,
    /// After the window, how long in-flight requests may finish; then everything is dropped.
    #[arg(long, default_value = "2s", value_name = "TIME", value_parser = parse_duration_ns)]
    pub grace: u64,
    /// new-conn/resumed: who closes each connection [default: server].
    #[arg(long, value_enum, value_name = "WHO")]
    pub close: Option<ClosePolicy>,
    /// Bind connection n to the n-th source address of this list, cycling:
    /// "10.1.2.2-10.1.2.250", "127.0.0.2,127.0.0.3".
    #[arg(long, value_name = "LIST")]
    pub source_ips: Option<String>,
    /// idle: requests each connection makes before it is parked.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub idle_requests: u32,
    /// idle: the longest the opening phase may take; the hold starts after it in any case.
    #[arg(long, default_value = "120s", value_name = "TIME", value_parser = parse_duration_ns)]
    pub ramp_timeout: u64,
    /// Write a one-line JSON file here when set-up is done (connections up, sessions primed,
    /// idle connections open), just before the window opens.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Sample this process's CPU time over the window and its RSS at the start and end of the
    /// window; repeatable.
    #[arg(long = "watch-pid", value_name = "PID")]
    pub watch_pids: Vec<u32>,
    /// resumed: priming transactions per worker before the window [default: its concurrency,
    /// at most 256].
    #[arg(long, value_name = "N")]
    pub prime: Option<u64>,
    /// Plain TCP (no TLS, no HTTP) against an echo server: each operation writes
    /// --message-bytes of a fixed pattern and reads the same bytes back (checked). new-conn:
    /// connect + one message + close (--close reset by default); keepalive: back-to-back
    /// messages on persistent connections; bulk: large messages (MB/s of echoed bytes); idle:
    /// connections held open. TLS flags are ignored.
    #[arg(long)]
    pub plain: bool,
    /// --plain: bytes per operation, each way [default: 64; bulk 1048576].
    #[arg(long, value_name = "BYTES")]
    pub message_bytes: Option<u64>,
    /// Print the JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// No human summary on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Internal: this process is child number I of --processes (set by the parent).
    #[arg(long, hide = true, value_name = "I")]
    pub child_index: Option<usize>,
}

/// A command line that parses but cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ArgError> {
    Err(ArgError::Invalid(msg.into()))
}

/// How operations are started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Each worker keeps its share of `concurrency` operations going back to back.
    Closed,
    /// Operations start at the intended times of a fixed total `rate` (per second).
    Open { rate: f64 },
}

/// A validated run description, shared read-only by every worker.
#[derive(Clone, Debug)]
pub struct Plan {
    pub mode: Mode,
    pub target: SocketAddr,
    pub server_name: ServerName<'static>,
    pub sni: String,
    pub host: String,
    pub path: String,
    pub method: &'static str,
    pub body_bytes: u64,
    pub headers: Vec<String>,
    pub tls: TlsOptions,
    pub load: Load,
    /// new-conn/resumed: transactions in flight (closed) or their cap (open); idle: handshakes
    /// in flight while opening; keepalive/bulk: equal to `connections`. Total over all workers.
    pub concurrency: u64,
    /// keepalive/bulk/idle: connections in total; new-conn/resumed: 0.
    pub connections: u64,
    pub threads: usize,
    pub processes: usize,
    pub cpus: Vec<usize>,
    pub duration_ns: u64,
    /// Measured requests in total, if bounded by count.
    pub requests: Option<u64>,
    pub warmup_ns: u64,
    pub timeout_ns: u64,
    pub grace_ns: u64,
    pub close: ClosePolicy,
    pub source_ips: Vec<IpAddr>,
    pub idle_requests: u32,
    pub ramp_timeout_ns: u64,
    pub ready_file: Option<PathBuf>,
    pub watch_pids: Vec<u32>,
    /// resumed: priming transactions per worker.
    pub prime: u64,
    /// Plain TCP echo instead of TLS + HTTP.
    pub plain: bool,
    /// Plain: bytes sent (and echoed back) per operation.
    pub message_bytes: u64,
    pub json: bool,
    pub quiet: bool,
    pub child_index: Option<usize>,
}

impl Plan {
    /// K: workers over all processes.
    pub fn workers(&self) -> usize {
        self.threads * self.processes
    }

    /// Worker `g`'s share of `total`.
    pub fn share(&self, total: u64, g: usize) -> u64 {
        let k = self.workers() as u64;
        total / k + u64::from((g as u64) < total % k)
    }

    /// The open-loop rate, if any.
    pub fn rate(&self) -> Option<f64> {
        match self.load {
            Load::Open { rate } => Some(rate),
            Load::Closed => None,
        }
    }

    /// Whether responses carry no body (HEAD).
    pub fn head_only(&self) -> bool {
        self.method == "HEAD"
    }
}

impl Args {
    /// Checks the cross-flag rules and resolves defaults. `nofile` is this process's
    /// RLIMIT_NOFILE and `cpu_count` the number of CPUs (both passed in so tests are stable).
    pub fn validate(self, nofile: u64, cpu_count: usize) -> Result<Plan, ArgError> {
        let mode = self.mode;
        if !(1..=256).contains(&self.threads) {
            return invalid("--threads must be 1..=256");
        }
        if !(1..=1024).contains(&self.processes) {
            return invalid("--processes must be 1..=1024");
        }
        let workers = (self.threads * self.processes) as u64;
        if let Some(i) = self.child_index {
            if i >= self.processes {
                return invalid("--child-index must be below --processes");
            }
        }

        // Target and request.
        let server_name = ServerName::try_from(self.sni.clone()).map_err(|_| {
            ArgError::Invalid(format!("--sni {:?} is not a DNS name or IP", self.sni))
        })?;
        let host = self.host.clone().unwrap_or_else(|| self.sni.clone());
        if host.is_empty() || host.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return invalid("--host must be a non-empty name without spaces or controls");
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return invalid("--path must start with '/' and contain no spaces or controls");
        }
        let method: &'static str = match self.method.as_deref() {
            None if self.body_bytes > 0 => "POST",
            None => "GET",
            Some(m) => match m.to_ascii_uppercase().as_str() {
                "GET" => "GET",
                "HEAD" => "HEAD",
                "POST" => "POST",
                "PUT" => "PUT",
                _ => return invalid("--method must be GET, HEAD, POST or PUT"),
            },
        };
        if self.body_bytes > 0 && !matches!(method, "POST" | "PUT") {
            return invalid("--body-bytes needs --method POST or PUT");
        }
        for h in &self.headers {
            let valid = h.split_once(':').is_some_and(|(name, value)| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                    && !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
            });
            if !valid {
                return invalid(format!("--header {h:?} is not `Name: value`"));
            }
            let name = h.split(':').next().unwrap_or_default().to_ascii_lowercase();
            if matches!(
                name.as_str(),
                "host" | "content-length" | "connection" | "transfer-encoding"
            ) {
                return invalid(format!("--header {h:?}: tern-load sets {name} itself"));
            }
        }

        // TLS.
        let trust = match (&self.ca, self.insecure) {
            // Plain TCP never builds a TLS session; the config is only a placeholder.
            _ if self.plain => Trust::Insecure,
            (Some(path), false) => Trust::Roots(path.clone()),
            (None, true) => Trust::Insecure,
            _ => return invalid("give --ca FILE or --insecure"),
        };
        let versions = match self.tls.replace(' ', "").as_str() {
            "1.3" => Versions::Tls13,
            "1.2" => Versions::Tls12,
            "1.2,1.3" | "1.3,1.2" => Versions::Both,
            other => return invalid(format!("--tls {other:?}: use 1.3, 1.2 or 1.2,1.3")),
        };
        let alpn = self
            .alpn
            .as_deref()
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| p.as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default();
        let tls = TlsOptions {
            versions,
            kx: tls::parse_groups(&self.kx)?,
            suites: match &self.ciphers {
                Some(list) => tls::parse_suites(list)?,
                None => Vec::new(),
            },
            alpn,
            trust,
        };
        // Build once now so an impossible combination is an argument error, not a run error.
        tls::client_config(&tls, None)?;

        // Plain TCP.
        let message_bytes = match (self.plain, self.message_bytes) {
            (false, Some(_)) => return invalid("--message-bytes needs --plain"),
            (false, None) => 0,
            (true, Some(0)) => return invalid("--message-bytes must be at least 1"),
            (true, Some(n)) => n,
            (true, None) if mode == Mode::Bulk => 1 << 20,
            (true, None) => 64,
        };
        if self.plain {
            if mode == Mode::Resumed {
                return invalid("--plain has no sessions to resume: use new-conn");
            }
            if self.body_bytes > 0 {
                return invalid("--plain sends --message-bytes, not --body-bytes");
            }
            if self.close == Some(ClosePolicy::Server) {
                return invalid(
                    "--plain --close server: an echo server never closes first; use client or reset",
                );
            }
            if self.idle_requests > 0 {
                return invalid("--idle-requests does not apply to --plain");
            }
        }

        // Load shape.
        let load = match self.rate {
            Some(rate) if rate.is_finite() && rate > 0.0 => Load::Open { rate },
            Some(_) => return invalid("--rate must be positive"),
            None => Load::Closed,
        };
        if self.concurrency.is_some() && mode.persistent() {
            return invalid(
                "--concurrency applies to new-conn, resumed and idle; use --connections",
            );
        }
        if self.connections.is_some() && mode.per_connection() {
            return invalid("--connections applies to keepalive, bulk and idle; use --concurrency");
        }
        let fd_budget = nofile.saturating_sub(FD_RESERVE).max(1);
        let per_process = |total: u64| total.div_ceil(self.processes as u64);
        let (concurrency, connections) = match mode {
            Mode::NewConn | Mode::Resumed => {
                let c = match (self.concurrency, load) {
                    (Some(c), _) => c,
                    (None, Load::Closed) => 32.max(workers),
                    (None, Load::Open { .. }) => 1024.min(fd_budget) * self.processes as u64,
                };
                (c, 0)
            }
            Mode::Keepalive | Mode::Bulk => {
                let default = if mode == Mode::Bulk {
                    workers
                } else {
                    32.max(workers)
                };
                let n = self.connections.unwrap_or(default);
                (n, n)
            }
            Mode::Idle => {
                let Some(n) = self.connections else {
                    return invalid("idle mode needs --connections N");
                };
                (self.concurrency.unwrap_or(64.max(workers)), n)
            }
        };
        if concurrency < workers {
            return invalid(format!(
                "--concurrency/--connections {concurrency} gives some of the {workers} workers \
                 (threads × processes) nothing to do"
            ));
        }
        if mode == Mode::Idle && connections < workers {
            return invalid(format!(
                "--connections {connections} is below the {workers} workers"
            ));
        }
        let open_fds = if mode.per_connection() {
            concurrency
        } else {
            connections
        };
        if per_process(open_fds) > fd_budget {
            return invalid(format!(
                "{open_fds} connections over {} process(es) need {} file descriptors per process, \
                 over the limit of {fd_budget} (RLIMIT_NOFILE {nofile} minus {FD_RESERVE}): \
                 raise --processes to at least {}",
                self.processes,
                per_process(open_fds),
                open_fds.div_ceil(fd_budget)
            ));
        }

        // Time and count bounds.
        if let Some(0) = self.requests {
            return invalid("--requests must be at least 1");
        }
        if let Some(n) = self.requests {
            if mode == Mode::Idle {
                return invalid("--requests does not apply to idle mode (it holds for --duration)");
            }
            if n < workers {
                return invalid(format!("--requests {n} is below the {workers} workers"));
            }
        }
        let duration_ns = match (self.duration, self.requests) {
            (Some(d), _) => d,
            (None, Some(_)) => 600 * 1_000_000_000,
            (None, None) => 10 * 1_000_000_000,
        };
        if duration_ns == 0 {
            return invalid("--duration must be positive");
        }
        if self.timeout == 0 {
            return invalid("--timeout must be positive");
        }
        if mode == Mode::Idle && self.warmup > 0 {
            return invalid("--warmup does not apply to idle mode");
        }
        if self.close.is_some() && !mode.per_connection() {
            return invalid("--close applies to new-conn and resumed");
        }
        if self.prime.is_some() && mode != Mode::Resumed {
            return invalid("--prime applies to resumed mode");
        }
        if self.idle_requests > 0 && mode != Mode::Idle {
            return invalid("--idle-requests applies to idle mode");
        }
        let source_ips = match &self.source_ips {
            Some(list) => parse_source_ips(list)
                .map_err(|e| ArgError::Invalid(format!("--source-ips {e}")))?,
            None => Vec::new(),
        };
        if source_ips
            .iter()
            .any(|ip| ip.is_ipv4() != self.connect.is_ipv4())
        {
            return invalid("--source-ips must be of the same address family as --connect");
        }
        let cpus = match &self.cpus {
            Some(list) => parse_cpus(list).map_err(|e| ArgError::Invalid(format!("--cpus {e}")))?,
            None => Vec::new(),
        };
        if let Some(bad) = cpus.iter().find(|c| **c >= cpu_count) {
            return invalid(format!(
                "--cpus: CPU {bad} does not exist (this machine has {cpu_count})"
            ));
        }
        let prime = self
            .prime
            .unwrap_or_else(|| concurrency.div_ceil(workers).min(256))
            .max(1);
        Ok(Plan {
            mode,
            target: self.connect,
            server_name,
            sni: self.sni,
            host,
            path: self.path,
            method,
            body_bytes: self.body_bytes,
            headers: self.headers,
            tls,
            load,
            concurrency,
            connections,
            threads: self.threads,
            processes: self.processes,
            cpus,
            duration_ns,
            requests: self.requests,
            warmup_ns: self.warmup,
            timeout_ns: self.timeout,
            grace_ns: self.grace,
            // Plain: RST after the echo, so neither side keeps TIME_WAIT (an echo server
            // cannot close first, and a client FIN would leave TIME_WAIT on the client).
            close: self.close.unwrap_or(if self.plain {
                ClosePolicy::Reset
            } else {
                ClosePolicy::Server
            }),
            source_ips,
            idle_requests: self.idle_requests,
            ramp_timeout_ns: self.ramp_timeout,
            ready_file: self.ready_file,
            watch_pids: self.watch_pids,
            prime,
            plain: self.plain,
            message_bytes,
            json: self.json,
            quiet: self.quiet,
            child_index: self.child_index,
        })
    }
}

/// `10`, `1.5s`, `500ms`, `250us`, `2m`, `1h` → nanoseconds. A bare number is seconds.
pub fn parse_duration_ns(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10, 1.5s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use us, ms, s, m or h)"
            ))
        }
    };
    let ns = value * scale;
    if !ns.is_finite() || ns > 1e15 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(ns.round() as u64)
}

/// `5000` or `5000/s` (fractions allowed) → per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let r: f64 = t
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 5000 or 5000/s)"))?;
    if !r.is_finite() || r <= 0.0 || r > 1e9 {
        return Err(format!("{s:?}: the rate must be above 0 and at most 1e9/s"));
    }
    Ok(r)
}

/// `1`, `0-1`, `0,2-3` → CPU numbers in order given.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        let parse = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: bad CPU {x:?}"))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse(a)?, parse(b)?);
                if a > b || b - a > 4096 {
                    return Err(format!("{s:?}: bad CPU range {item:?}"));
                }
                out.extend(a..=b);
            }
            None => out.push(parse(item)?),
        }
    }
    Ok(out)
}

/// `10.1.2.2-10.1.2.250` (IPv4 ranges, up to 65536 addresses) and/or comma-separated single
/// addresses of either family.
pub fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        let parse = |x: &str| {
            x.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{s:?}: bad address {x:?}"))
        };
        match item.split_once('-') {
            Some((a, b)) => match (parse(a)?, parse(b)?) {
                (IpAddr::V4(a), IpAddr::V4(b)) if u32::from(a) <= u32::from(b) => {
                    let (a, b) = (u32::from(a), u32::from(b));
                    if b - a >= 65536 {
                        return Err(format!("{s:?}: range {item:?} is over 65536 addresses"));
                    }
                    out.extend((a..=b).map(|n| IpAddr::V4(n.into())));
                }
                _ => return Err(format!("{s:?}: {item:?} is not an ascending IPv4 range")),
            },
            None => out.push(parse(item)?),
        }
    }
    if out.is_empty() {
        return Err("empty address list".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
