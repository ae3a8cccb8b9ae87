//! Hot reload: `tern ctl reload` or SIGHUP re-read the configuration file, and the workers of
//! both paths switch to it between two connections, without dropping any.
//!
//! A reload reads and validates the file exactly as start-up does ([`Config::load`]: the same
//! `FILE: FIELD: reason` errors, certificates and keys read and checked), refuses changes that
//! need a restart by name ([`restart_needed`]), builds the new TLS configuration, and then
//! publishes the result as a new [`Live`] generation. Nothing running is touched until all of
//! that succeeded: a file that does not validate leaves the running configuration in place and
//! the reload reports the error.
//!
//! Workers poll the generation (one relaxed atomic load per tick, never per packet) through
//! their [`Watch`]; when it moved they take the new [`Live`], apply it to what *new*
//! connections use (TLS configuration, backend servers, timeouts, limits, PROXY protocol), and
//! acknowledge. Open connections keep what they started with: their rustls session holds the
//! configuration it was created from, their deadlines are their own ([`crate::driver::Conn`]
//! keeps its `Policy`), and a backend server that was removed stays addressable for the
//! connections using it. [`Reloader::reload`] returns once every worker acknowledged (or after
//! [`ACK_WAIT`]), so when `tern ctl reload` says `ok`, the next connection gets the new
//! configuration.
//!
//! Resumption survives a reload: when the session cache size and the ticket switch are
//! unchanged, the new TLS configuration keeps the old one's session cache and ticket keys.
//! With `[tls] ticket_keys` the keys are those the file holds at the reload (re-read by
//! [`Config::load`]), so a reload also takes a rotated key file at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use rustls::ServerConfig;

use crate::config::{Config, ConfigError};

/// How long a reload waits for every worker to take the new configuration. Workers look at
/// least every 100 ms, so only a worker that is stuck (or gone) makes a reload wait this long.
pub const ACK_WAIT: Duration = Duration::from_secs(5);

/// One generation of the configuration the workers run with.
pub struct Live {
    /// 1 at start, +1 per successful reload.
    pub generation: u64,
    pub config: Arc<Config>,
    /// The TLS configuration; `None` when no listener terminates TLS.
    pub tls: Option<Arc<ServerConfig>>,
}

/// Why a reload was refused. The running configuration stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not validate (the same error start-up gives).
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// A change that only a restart can make.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    NeedsRestart(Vec<ConfigError>),
    #[error("{path}: building the TLS configuration: {source}", path = .path.display())]
    Tls {
        path: std::path::PathBuf,
        source: Box<crate::tls::TlsError>,
    },
    #[error("tern is draining; a reload would not reach the workers")]
    Draining,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    /// The sections that changed (`certificates`, `tls`, `backend`, ...); empty when the file
    /// says what was already running.
    pub changed: Vec<&'static str>,
    /// Workers that took it, of how many.
    pub applied: usize,
    pub workers: usize,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let changed = if self.changed.is_empty() {
            "nothing changed".to_string()
        } else {
            format!("changed: {}", self.changed.join(", "))
        };
        write!(
            f,
            "generation {} ({changed}); applied by {} of {} workers",
            self.generation, self.applied, self.workers
        )
    }
}

/// The process's current configuration generation and the workers' acknowledgements.
pub struct Reloader {
    current: Mutex<Arc<Live>>,
    generation: AtomicU64,
    /// One acknowledgement per worker: the generation it applied last. Weak: a worker that
    /// has ended (its [`Watch`] dropped) is not waited for.
    acks: Mutex<Vec<Weak<AtomicU64>>>,
    /// Serialises reloads (a SIGHUP and a `tern ctl reload` at once).
    busy: Mutex<()>,
    /// `limits.max_connections_per_worker` at start: connection tables are sized once.
    start_max_connections: usize,
}

impl Reloader {
    pub fn new(config: Config, tls: Option<Arc<ServerConfig>>) -> Arc<Reloader> {
        let start_max_connections = config.limits.max_connections_per_worker;
        Arc::new(Reloader {
            current: Mutex::new(Arc::new(Live {
                generation: 1,
                config: Arc::new(config),
                tls,
            })),
            generation: AtomicU64::new(1),
            acks: Mutex::new(Vec::new()),
            busy: Mutex::new(()),
            start_max_connections,
        })
    }

    /// The generation running now.
    pub fn current(&self) -> Arc<Live> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A worker's view of the generations, registered so that reloads wait for it.
    pub fn watch(self: &Arc<Reloader>) -> Watch {
        let live = self.current();
        let applied = Arc::new(AtomicU64::new(live.generation));
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&applied));
        Watch {
            reloader: self.clone(),
            seen: live.generation,
            applied,
        }
    }

    /// Re-reads the configuration file the running one came from and, if it is valid and
    /// changes nothing that needs a restart, makes it the running configuration.
    /// `draining`: tern is draining (its workers no longer take configurations).
    pub fn reload(&self, draining: bool) -> Result<Reloaded, ReloadError> {
        let _one = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if draining {
            return Err(ReloadError::Draining);
        }
        // systemd (Type=notify-reload, or an ExecReload that waits) sees the reload begin and
        // end, whatever its outcome.
        crate::notify::reloading();
        let outcome = self.load_and_publish();
        crate::notify::ready();
        outcome
    }

    fn load_and_publish(&self) -> Result<Reloaded, ReloadError> {
        let old = self.current();
        let new = Config::load(&old.config.path)?;
        let refused = restart_needed(&old.config, &new, self.start_max_connections);
        if !refused.is_empty() {
            return Err(ReloadError::NeedsRestart(refused));
        }
        let changed = changes(&old.config, &new);
        let tls = if new.listeners.iter().any(|l| l.tls) {
            let built =
                crate::tls::server_config(&new.certificates, &new.tls).map_err(|source| {
                    ReloadError::Tls {
                        path: new.path.clone(),
                        source: Box::new(source),
                    }
                })?;
            Some(keep_resumption(
                built,
                old.tls.as_deref(),
                &old.config,
                &new,
            ))
        } else {
            None
        };
        let generation = old.generation + 1;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(Live {
            generation,
            config: Arc::new(new),
            tls,
        });
        self.generation.store(generation, Ordering::Release);
        let (applied, workers) = self.wait_for_workers(generation);
        Ok(Reloaded {
            generation,
            changed,
            applied,
            workers,
        })
    }

    /// Waits (bounded by [`ACK_WAIT`]) until every registered worker applied `generation`;
    /// returns how many did, of how many.
    fn wait_for_workers(&self, generation: u64) -> (usize, usize) {
        let deadline = Instant::now() + ACK_WAIT;
        loop {
            let (mut applied, mut workers) = (0, 0);
            self.acks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|a| match a.upgrade() {
                    Some(a) => {
                        workers += 1;
                        applied += usize::from(a.load(Ordering::Acquire) >= generation);
                        true
                    }
                    None => false,
                });
            if applied == workers || Instant::now() >= deadline {
                return (applied, workers);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Logs a reload's outcome (`by`: what asked for it).
pub fn log_outcome(by: &str, outcome: &Result<Reloaded, ReloadError>) {
    match outcome {
        Ok(r) if r.applied == r.workers => tracing::info!(by, "configuration reloaded: {r}"),
        Ok(r) => tracing::warn!(
            by,
            "configuration reloaded, but not every worker took it in time: {r}"
        ),
        Err(e) => tracing::error!(by, "reload refused, the running configuration is kept: {e}"),
    }
}

/// A worker's handle on the generations: [`Watch::poll`] once per tick.
pub struct Watch {
    reloader: Arc<Reloader>,
    seen: u64,
    applied: Arc<AtomicU64>,
}

impl Watch {
    /// The new generation, when there is one the worker has not applied yet. The worker
    /// applies it, then calls [`Watch::applied`].
    pub fn poll(&mut self) -> Option<Arc<Live>> {
        if self.reloader.generation.load(Ordering::Acquire) == self.seen {
            return None;
        }
        let live = self.reloader.current();
        self.seen = live.generation;
        Some(live)
    }

    /// The worker now runs generation `generation`.
    pub fn applied(&self, generation: u64) {
        self.applied.store(generation, Ordering::Release);
    }
}

/// Gives the new TLS configuration the old one's session cache and ticket keys when their
/// settings did not change, so clients resume across the reload.
fn keep_resumption(
    mut built: Arc<ServerConfig>,
    old: Option<&ServerConfig>,
    old_config: &Config,
    new_config: &Config,
) -> Arc<ServerConfig> {
    let (Some(old), Some(cfg)) = (old, Arc::get_mut(&mut built)) else {
        return built;
    };
    if old_config.tls.session_cache_entries == new_config.tls.session_cache_entries {
        cfg.session_storage = old.session_storage.clone();
    }
    // With `ticket_keys` the new configuration's ticketer holds the keys just re-read from the
    // file (the same ticketer object when the file is the same: `tls::ticket_keys::ticketer`).
    if old_config.tls.tickets == new_config.tls.tickets && new_config.tls.ticket_keys.is_none() {
        cfg.ticketer = old.ticketer.clone();
    }
    built
}

fn restart(config: &Config, field: &str, what: &str) -> ConfigError {
    ConfigError {
        path: config.path.clone(),
        field: field.to_string(),
        message: format!("{what} needs a restart; the running configuration is kept"),
    }
}

/// The changes from `old` to `new` that a running tern cannot make, each an error naming the
/// field. `start_max_connections`: the per-worker connection limit tern started with (its
/// tables are sized from it; lowering it takes effect, raising it beyond needs a restart).
pub fn restart_needed(
    old: &Config,
    new: &Config,
    start_max_connections: usize,
) -> Vec<ConfigError> {
    let mut refused = Vec::new();
    if old.listeners != new.listeners {
        refused.push(restart(
            new,
            "listener",
            "adding, removing or changing a listener",
        ));
    }
    if old.workers != new.workers {
        refused.push(restart(new, "workers", "changing the workers"));
    }
    if old.xdp != new.xdp {
        refused.push(restart(
            new,
            "xdp",
            "changing [xdp] (AF_XDP sizing, per-source limits, syn_cookies)",
        ));
    }
    // The bypass stack's settings are fixed when its tables and timers are built (the FIN
    // timeout included: the stack's orphans and the driver share it). `max_orphans` defaults
    // to a share of the connection limit: when that limit changed, the orphan cap keeps its
    // value from start rather than refusing the limit.
    let mut tcp = new.tcp;
    if old.limits.max_connections_per_worker != new.limits.max_connections_per_worker {
        tcp.max_orphans = old.tcp.max_orphans;
    }
    if old.tcp != tcp {
        refused.push(restart(
            new,
            "tcp",
            &format!("changing [tcp] ({})", tcp_changes(&old.tcp, &tcp)),
        ));
    }
    if old.control != new.control {
        refused.push(restart(new, "control", "changing the control socket"));
    }
    if old.session_cache != new.session_cache {
        refused.push(restart(
            new,
            "session_cache",
            "changing [session_cache] (its sync socket and L1s are set up at start)",
        ));
    }
    if old.metrics != new.metrics {
        refused.push(restart(new, "metrics", "moving the metrics endpoint"));
    }
    if old.access_log != new.access_log {
        refused.push(restart(
            new,
            "access_log",
            "changing the access log (to rotate its file, use `tern ctl reopen-log`)",
        ));
    }
    if old.process != new.process {
        refused.push(restart(new, "process", "changing the user tern runs as"));
    }
    if new.limits.max_connections_per_worker > start_max_connections {
        refused.push(restart(
            new,
            "limits.max_connections_per_worker",
            &format!("raising it above its value at start ({start_max_connections})"),
        ));
    }
    refused
}

fn tcp_changes(a: &crate::config::TcpSettings, b: &crate::config::TcpSettings) -> String {
    let mut names = Vec::new();
    if a.congestion != b.congestion {
        names.push("congestion");
    }
    if a.mss != b.mss {
        names.push("mss");
    }
    if a.recv_buffer != b.recv_buffer {
        names.push("recv_buffer");
    }
    if a.send_buffer != b.send_buffer {
        names.push("send_buffer");
    }
    if a.nagle != b.nagle {
        names.push("nagle");
    }
    if a.keepalive != b.keepalive {
        names.push("keepalive_ms");
    }
    if a.rx_checksum != b.rx_checksum {
        names.push("rx_checksum");
    }
    if a.max_orphans != b.max_orphans {
        names.push("max_orphans");
    }
    if a.fin_timeout != b.fin_timeout {
        names.push("fin_timeout_ms");
    }
    names.join(", ")
}

/// The sections a reload from `old` to `new` changes (for the reply and the log).
pub fn changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let same_certs = old.certificates.len() == new.certificates.len()
        && old
            .certificates
            .iter()
            .zip(&new.certificates)
            .all(|(a, b)| {
                a.chain == b.chain
                    && a.names == b.names
                    && a.default == b.default
                    && a.key.secret_der() == b.key.secret_der()
                    && a.ocsp.as_ref().map(|o| &o.der) == b.ocsp.as_ref().map(|o| &o.der)
            });
    if !same_certs {
        changed.push("certificates");
    }
    if old.tls != new.tls {
        changed.push("tls");
    }
    if old.backend != new.backend {
        changed.push("backend");
    }
    if old.timeouts != new.timeouts {
        changed.push("timeouts");
    }
    if old.limits != new.limits {
        changed.push("limits");
    }
    changed
}

#[cfg(test)]
mod tests;
