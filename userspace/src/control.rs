//! The control plane's command socket: a Unix stream socket on which `tern ctl` (or any client
//! that writes a line) asks for counters and manages the XDP source blocklist. One command per
//! connection, answered with one reply, then the connection is closed.
//!
//! Commands and replies:
//! - `ping` → `pong`
//! - `stats` → one JSON document (workers' counters, totals, each XDP program's counters)
//! - `block PREFIX` → `ok`: drop packets from PREFIX (`10.0.0.0/8`, `2001:db8::/32`, or a bare
//!   address for one host) on every interface tern's XDP program is attached to
//! - `unblock PREFIX` → `ok`: remove exactly that prefix again
//! - `blocks` → the blocked prefixes, one per line (nothing when the list is empty)
//!
//! Anything that fails is answered with one line starting `error: ` that says what was wrong;
//! `tern ctl` exits non-zero on it. Blocklist commands need an attached XDP program (a listener
//! with an `interface`); without one they answer an error saying so.
//!
//! Counters are read from the workers' [`WorkerCounters`] without locking them; XDP counters
//! come from the attached programs' per-CPU maps. This module does not own the programs (see
//! [`crate::xdp`]) nor their life cycle (`server` attaches them and empties
//! [`ControlState::xdp`] at exit).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read as _, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::bypass::{BypassCounters, BypassSnapshot};
use crate::counters::{Snapshot, WorkerCounters};
use crate::xdp::{IpPrefix, XdpProgram};

/// What the control thread can see.
pub struct ControlState {
    pub workers: Vec<Arc<WorkerCounters>>,
    /// Attached XDP programs, with their interface names. Emptied by the main thread at exit
    /// (dropping a program detaches it).
    pub xdp: Mutex<Vec<(String, XdpProgram)>>,
    /// The bypass workers (`mode = "xdp"` listeners), one entry per worker and interface.
    pub bypass: Vec<BypassInfo>,
    pub started: Instant,
}

/// What the control plane shows of one bypass worker.
pub struct BypassInfo {
    pub interface: String,
    pub worker: usize,
    /// AF_XDP bind mode (`copy` on veth, `zero-copy` on drivers that support it).
    pub bind_mode: String,
    /// UMEM page size actually used (hugepages, or the 4 KiB fallback).
    pub page_kind: String,
    pub counters: Arc<BypassCounters>,
    /// The L4 proxy's connection counters, when the worker runs one (`tls = false` listeners).
    pub proxy: Option<Arc<crate::counters::WorkerCounters>>,
    /// Its TCP stack's counters.
    pub tcp: Option<Arc<crate::l4::TcpCounters>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: another tern is already listening on it")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Binds the command socket. A stale socket file (nobody listening) is replaced; a live one is
/// an error, so two terns cannot share a path by accident.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
    }
    UnixListener::bind(path).map_err(io_err)
}

/// Serves commands until the process exits. Runs on the control thread.
pub fn serve(listener: UnixListener, state: Arc<ControlState>) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if let Err(e) = handle(s, &state) {
                    tracing::debug!(error = %e, "control connection failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one command line from `stream` and writes the reply.
fn handle(stream: UnixStream, state: &ControlState) -> io::Result<()> {
    crate::fault::check(crate::fault::Site::Control)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line)?;
    (&stream).write_all(reply(state, &line).as_bytes())
}

/// The reply to one command line: what [`serve`] writes back, newline-terminated.
pub fn reply(state: &ControlState, line: &str) -> String {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("");
    let argument = words.next();
    let extra = words.next();
    let result = match (command, argument, extra) {
        ("ping", None, _) => Ok("pong\n".to_string()),
        ("stats", None, _) => serde_json::to_string_pretty(&stats(state))
            .map(|mut json| {
                json.push('\n');
                json
            })
            .map_err(|e| format!("cannot encode the counters: {e}")),
        ("block", Some(prefix), None) => block(state, prefix),
        ("unblock", Some(prefix), None) => unblock(state, prefix),
        ("blocks", None, _) => blocks(state),
        ("block" | "unblock", None, _) => Err(format!("usage: {command} PREFIX")),
        ("block" | "unblock", Some(_), Some(_)) => {
            Err(format!("usage: {command} PREFIX (one prefix per command)"))
        }
        ("ping" | "stats" | "blocks", Some(_), _) => Err(format!("{command} takes no argument")),
        _ => Err(format!(
            "unknown command {:?} (commands: ping, stats, block PREFIX, unblock PREFIX, blocks)",
            line.trim()
        )),
    };
    result.unwrap_or_else(|message| format!("error: {message}\n"))
}

/// Runs `f` on every attached program, in attach order; stops at the first error. The error
/// names the interface (every `XdpError` does).
fn with_programs<T>(
    state: &ControlState,
    mut f: impl FnMut(&XdpProgram) -> Result<T, crate::xdp::XdpError>,
) -> Result<Vec<T>, String> {
    let programs = state.xdp.lock().unwrap_or_else(PoisonError::into_inner);
    if programs.is_empty() {
        return Err(
            "no XDP program is attached (the blocklist needs a listener with an `interface`)"
                .to_string(),
        );
    }
    programs
        .iter()
        .map(|(_, program)| f(program).map_err(|e| e.to_string()))
        .collect()
}

fn parse_prefix(text: &str) -> Result<IpPrefix, String> {
    text.parse::<IpPrefix>().map_err(|e| e.to_string())
}

fn block(state: &ControlState, text: &str) -> Result<String, String> {
    let prefix = parse_prefix(text)?;
    with_programs(state, |program| program.block(prefix))?;
    tracing::info!(%prefix, "blocked");
    Ok("ok\n".to_string())
}

fn unblock(state: &ControlState, text: &str) -> Result<String, String> {
    let prefix = parse_prefix(text)?;
    let removed = with_programs(state, |program| program.unblock(prefix))?;
    if !removed.contains(&true) {
        return Err(format!("{prefix} is not in the blocklist"));
    }
    tracing::info!(%prefix, "unblocked");
    Ok("ok\n".to_string())
}

/// The union of every program's blocklist (they are managed together, so normally identical).
fn blocks(state: &ControlState) -> Result<String, String> {
    let lists = with_programs(state, XdpProgram::blocks)?;
    let mut all: Vec<IpPrefix> = lists.into_iter().flatten().collect();
    all.sort();
    all.dedup();
    let mut out = String::new();
    for prefix in all {
        let _ = writeln!(out, "{prefix}");
    }
    Ok(out)
}

/// The `stats` document.
pub fn stats(state: &ControlState) -> serde_json::Value {
    let mut total = Snapshot::default();
    let workers: Vec<_> = state
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let s = w.snapshot();
            total += s;
            serde_json::json!({ "worker": i, "counters": s })
        })
        .collect();
    let xdp: Vec<_> = state
        .xdp
        .lock()
        .map(|progs| {
            progs
                .iter()
                .map(|(iface, p)| match p.counters() {
                    Ok(c) => serde_json::json!({
                        "interface": iface,
                        "mode": p.attached_mode().to_string(),
                        "counters": c,
                    }),
                    Err(e) => serde_json::json!({ "interface": iface, "error": e.to_string() }),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut bypass_total = BypassSnapshot::default();
    let mut proxy_total = crate::counters::Snapshot::default();
    let mut tcp_total = crate::l4::TcpSnapshot::default();
    let bypass_workers: Vec<_> = state
        .bypass
        .iter()
        .map(|b| {
            let s = b.counters.snapshot();
            bypass_total += s;
            let proxy = b.proxy.as_ref().map(|p| p.snapshot());
            let tcp = b.tcp.as_ref().map(|t| t.snapshot());
            if let Some(p) = proxy {
                proxy_total += p;
            }
            if let Some(t) = tcp {
                tcp_total += t;
            }
            serde_json::json!({
                "interface": b.interface,
                "worker": b.worker,
                "bind": b.bind_mode,
                "pages": b.page_kind,
                "counters": s,
                "proxy": proxy,
                "tcp": tcp,
            })
        })
        .collect();
    serde_json::json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "total": total,
        "workers": workers,
        "xdp": xdp,
        "bypass": {
            "total": bypass_total,
            "proxy": proxy_total,
            "tcp": tcp_total,
            "workers": bypass_workers,
        },
    })
}

/// Client side, for `tern ctl`: sends `command`, returns the reply.
pub fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(command.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! The blocklist commands against real attached programs (on `lo` of throw-away network
    //! namespaces, skb mode; needs root), and over a real Unix socket through [`request`].

    use super::*;
    use crate::config::XdpAttach;
    use crate::xdp::tests::Netns;

    fn state(programs: Vec<(String, XdpProgram)>) -> ControlState {
        ControlState {
            workers: vec![Arc::new(WorkerCounters::default())],
            xdp: Mutex::new(programs),
            bypass: Vec::new(),
            started: Instant::now(),
        }
    }

    fn program_on_lo(ns: &Netns) -> (String, XdpProgram) {
        let program = ns
            .run_in(|| crate::xdp::attach("lo", XdpAttach::Skb))
            .unwrap_or_else(|err| panic!("attach to lo in {}: {err}", ns.name));
        ("lo".to_string(), program)
    }

    #[test]
    fn blocklist_commands_without_a_program_say_so() {
        let state = state(Vec::new());
        for command in ["block 10.0.0.0/8", "unblock 10.0.0.0/8", "blocks"] {
            let answer = reply(&state, command);
            assert!(
                answer.starts_with("error: no XDP program is attached"),
                "{command}: {answer}"
            );
        }
        // Prefix errors come first: they are the caller's to fix whatever is attached.
        let answer = reply(&state, "block 10.0.0.1/8");
        assert!(answer.contains("host bits"), "{answer}");
        assert_eq!(reply(&state, "ping\n"), "pong\n");
    }

    #[test]
    fn malformed_commands_are_errors() {
        let state = state(Vec::new());
        for (command, expected) in [
            ("block", "error: usage: block PREFIX\n"),
            ("unblock", "error: usage: unblock PREFIX\n"),
            (
                "block 10.0.0.0/8 10.1.0.0/16",
                "error: usage: block PREFIX (one prefix per command)\n",
            ),
            ("blocks now", "error: blocks takes no argument\n"),
            ("ping pong", "error: ping takes no argument\n"),
        ] {
            assert_eq!(reply(&state, command), expected, "{command:?}");
        }
        let answer = reply(&state, "frobnicate 1");
        assert!(
            answer.starts_with("error: unknown command \"frobnicate 1\"")
                && answer.contains("block PREFIX"),
            "{answer}"
        );
        let answer = reply(&state, "block not-a-prefix");
        assert!(
            answer.starts_with("error: ") && answer.contains("\"not-a-prefix\""),
            "names the bad prefix: {answer}"
        );
    }

    #[test]
    fn block_unblock_and_list_apply_to_every_program() {
        let (ns1, ns2) = (Netns::new(), Netns::new());
        let state = state(vec![program_on_lo(&ns1), program_on_lo(&ns2)]);
        assert_eq!(reply(&state, "blocks"), "", "empty at start");
        assert_eq!(reply(&state, "block 10.0.0.0/8"), "ok\n");
        assert_eq!(reply(&state, "block 2001:db8::/32\n"), "ok\n");
        assert_eq!(reply(&state, "block 192.0.2.7"), "ok\n", "a bare address");
        let answer = reply(&state, "block 10.0.0.1/8");
        assert!(
            answer.starts_with("error: 10.0.0.1/8: host bits are set")
                && answer.contains("10.0.0.0/8"),
            "{answer}"
        );
        let listed = "10.0.0.0/8\n192.0.2.7/32\n2001:db8::/32\n";
        assert_eq!(reply(&state, "blocks"), listed);
        for (_, program) in state.xdp.lock().expect("lock").iter() {
            let own: Vec<String> = program
                .blocks()
                .expect("blocks")
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(
                own.join("\n") + "\n",
                listed,
                "every program got every prefix"
            );
        }

        assert_eq!(reply(&state, "unblock 10.0.0.0/8"), "ok\n");
        assert_eq!(
            reply(&state, "unblock 10.0.0.0/8"),
            "error: 10.0.0.0/8 is not in the blocklist\n"
        );
        assert_eq!(
            reply(&state, "unblock 2001:db8::/48"),
            "error: 2001:db8::/48 is not in the blocklist\n",
            "unblock is exact, not a match inside a blocked prefix"
        );
        assert_eq!(reply(&state, "blocks"), "192.0.2.7/32\n2001:db8::/32\n");

        // The same over the socket, through the client `tern ctl` uses.
        let dir = TempDir(std::env::temp_dir().join(format!(
            "tern-control-test-{}",
            crate::xdp::tests::unique("c")
        )));
        let path = dir.0.join("ctl.sock");
        let listener = bind(&path).expect("bind the control socket");
        let state = Arc::new(state);
        let server = {
            let state = state.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    let (stream, _) = listener.accept().expect("accept");
                    handle(stream, &state).expect("handle");
                }
            })
        };
        assert_eq!(
            request(&path, "block 198.51.100.0/24").expect("request"),
            "ok\n"
        );
        assert_eq!(
            request(&path, "blocks").expect("request"),
            "192.0.2.7/32\n198.51.100.0/24\n2001:db8::/32\n"
        );
        let answer = request(&path, "unblock 198.51.101.0/23").expect("request");
        assert!(
            answer.starts_with("error: 198.51.101.0/23: host bits are set"),
            "{answer}"
        );
        server.join().expect("control thread");
    }

    /// A directory removed on drop, also when the test fails.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
