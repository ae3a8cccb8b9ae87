//! The control plane's command socket: a Unix stream socket on which `tern ctl` (or any client
//! that writes a line) asks for counters. One command per connection, answered with one JSON
//! document (or `pong`), then the connection is closed.
//!
//! Commands: `ping`, `stats`. Counters are read from the workers' [`WorkerCounters`] without
//! locking them; XDP counters come from the attached programs' per-CPU maps.
//!
//! Not here: changing configuration at run time (a later version adds it on this socket).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::counters::{Snapshot, WorkerCounters};
use crate::xdp::XdpProgram;

/// What the control thread can see.
pub struct ControlState {
    pub workers: Vec<Arc<WorkerCounters>>,
    /// Attached XDP programs, with their interface names. Emptied by the main thread at exit
    /// (dropping a program detaches it).
    pub xdp: Mutex<Vec<(String, XdpProgram)>>,
    pub started: Instant,
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

fn handle(stream: UnixStream, state: &ControlState) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line)?;
    let reply = match line.trim() {
        "ping" => "pong\n".to_string(),
        "stats" => {
            let mut s = serde_json::to_string_pretty(&stats(state)).map_err(io::Error::other)?;
            s.push('\n');
            s
        }
        other => format!("error: unknown command {other:?} (commands: ping, stats)\n"),
    };
    (&stream).write_all(reply.as_bytes())
}

use std::io::Read as _;

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
    serde_json::json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "total": total,
        "workers": workers,
        "xdp": xdp,
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
