//! Bringing tern up and down: listening sockets, XDP attachment, worker threads, the control
//! thread, signals, the drain on SIGTERM, and watching the threads while tern runs.
//!
//! Start-up either succeeds completely (every socket bound, every worker's io_uring built,
//! every XDP program attached) or fails with an error after releasing everything it had
//! started: threads stopped and joined, sockets closed, the control socket removed, XDP
//! programs detached. Shut-down: SIGTERM makes workers stop accepting and finish open
//! connections until `timeouts.drain_ms`; a second SIGTERM or a SIGINT stops at once. While
//! tern runs the main thread watches every thread (`supervise`): one that fails stops tern,
//! which exits non-zero. XDP programs are attached through bpf links, so the kernel detaches
//! them even if tern is killed or exits from a panic.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context as _};

use crate::bypass::proxy::{Proxy, ProxySetup, TcpCounters};
use crate::bypass::xdp::XdpProgram;
use crate::bypass::{self, BypassSetup, BypassWorker};
use crate::config::Config;
use crate::config::ListenerMode;
use crate::control::{self, BypassInfo, ControlState};
use crate::counters::WorkerCounters;
use crate::kernel::{self, Worker, WorkerSetup};
use crate::reload::Reloader;
use crate::supervise::{self, Job, Watched};

/// Flags the main thread raises; every worker polls them at least once per tick.
#[derive(Debug, Default)]
pub struct Shutdown {
    /// Stop accepting; finish open connections until the drain deadline.
    pub drain: AtomicBool,
    /// Stop now: close every connection and return.
    pub stop: AtomicBool,
    /// Copies of the kernel workers' listening sockets for a new tern taking over; closed
    /// when the drain begins ([`Shutdown::begin_drain`]).
    pub handover: crate::upgrade::Handover,
}

impl Shutdown {
    /// Drain (SIGTERM, `tern ctl drain`, or a new tern took over): raise the flag and close
    /// the handover copies of the listening sockets, so that the workers' own close takes
    /// each socket out of the SO_REUSEPORT group (or leaves it to the process holding it now).
    pub fn begin_drain(&self) {
        self.drain.store(true, Ordering::Relaxed);
        self.handover.close();
    }
}

/// Runs tern with `config` until it is told to stop or a thread fails (then the error is a
/// [`supervise::ThreadFailed`]). Returns once everything is torn down; an error during
/// start-up releases whatever had been started before it is returned.
pub fn run(config: Config) -> anyhow::Result<()> {
    start(config, false)
}

/// Like [`run`], but takes over from the tern running with the same control socket: its
/// listening sockets come over the control socket, and once this process serves, the old one
/// is told to drain ([`crate::upgrade`]).
pub fn upgrade(config: Config) -> anyhow::Result<()> {
    start(config, true)
}

fn start(config: Config, upgrade: bool) -> anyhow::Result<()> {
    // First, while this is the only thread: every thread started below inherits it.
    crate::privileges::set_no_new_privs().context("setting PR_SET_NO_NEW_PRIVS")?;
    supervise::install_panic_hook();
    crate::fault::init().map_err(|e| anyhow!(e))?;
    // Before the first TLS configuration: its session store takes the L1 size and the sync.
    crate::session_cache::install(&config.session_cache)
        .context("starting the session cache sync")?;
    // Only listeners with `tls = true` need certificates (validation made sure they exist).
    let tls = if config.listeners.iter().any(|l| l.tls) {
        Some(
            crate::tls::server_config(&config.certificates, &config.tls)
                .context("building the TLS configuration")?,
        )
    } else {
        None
    };

    // Every worker takes its configuration from here, and reloads replace it here.
    let reloader = Reloader::new(config.clone(), tls.clone());

    // An upgrade takes the running tern's sockets (and its XDP programs' ids) before binding or
    // attaching anything of its own.
    let mut takeover = if upgrade {
        crate::upgrade::Takeover::connect(&config.control.socket)?
    } else {
        None
    };

    // From here on, whatever is started goes into `started`, whose drop stops and releases it
    // on every early return.
    let mut started = Started::default();
    // Interfaces whose program was taken over from the old tern (one XDP link per interface:
    // its program, maps and flows stay in place; see docs/architecture.md, "Binary upgrade").
    let mut adopted: Vec<String> = Vec::new();
    // XDP first: if it cannot attach, nothing else should start.
    for l in &config.listeners {
        let Some(iface) = l.interface.clone() else {
            continue;
        };
        if started.xdp.iter().any(|(i, _)| *i == iface) {
            continue;
        }
        let old = takeover.as_ref().and_then(|t| t.xdp(&iface));
        let prog = if let Some(ids) = old {
            let prog = crate::bypass::xdp::adopt(&iface, ids)
                .with_context(|| format!("upgrade: taking over the XDP program on {iface}"))?;
            tracing::info!(interface = %iface, link = ids.link, "upgrade: XDP program taken over");
            adopted.push(iface.clone());
            prog
        } else {
            let prog = crate::bypass::xdp::attach(&iface, l.xdp_attach)
                .with_context(|| format!("attaching the XDP program to {iface}"))?;
            tracing::info!(interface = %iface, mode = %prog.attached_mode(), "XDP program attached");
            prog
        };
        started.xdp.push((iface, prog));
    }

    // Before anything accepts a connection: a SIGTERM that arrives once a client could have
    // connected must drain, not kill.
    let signals = spawn_signal_thread(
        started.shutdown.clone(),
        config.timeouts.drain,
        reloader.clone(),
    )?;
    started.threads.push(signals);
    // Opened before any worker: a path tern cannot write fails start-up. Each worker gets a
    // sink; the writer starts once they all exist.
    let mut access_log = match &config.access_log {
        Some(settings) => {
            let listeners = config.listeners.iter().map(|l| l.address).collect();
            Some(crate::access_log::AccessLog::open(settings, listeners)?)
        }
        None => None,
    };
    // Every worker's latency histograms, indexed by listener and backend server.
    let latency = Arc::new(crate::metrics::Latency::new(
        config.listeners.iter().map(|l| l.address).collect(),
        config.backend.servers.iter().map(|s| s.address).collect(),
    ));
    // The bypass path: on every interface with `mode = "bypass"` listeners, the program steers
    // their frames to AF_XDP sockets owned by bypass workers. Interfaces with only kernel
    // listeners get an empty listen set (counters and blocklist only).
    let mut bypass_info = Vec::new();
    // Every worker (both paths) publishes its backend servers' state here for `tern ctl`.
    let board = Arc::new(crate::driver::board::Board::default());
    // Upgrade: bypass listeners whose AF_XDP queues the old tern still holds. Until it exits
    // they are served on kernel sockets; then `LateBypass` starts their workers.
    let mut deferred: Vec<(String, Vec<SocketAddr>)> = Vec::new();
    // One secret and one clock epoch for every bypass worker: SYN cookies must validate on
    // whichever worker the handshake's last ACK reaches.
    let mut secret = [0u8; 16];
    crate::sys::fill_random(&mut secret).context("reading random bytes for the SYN cookie key")?;
    let epoch = Instant::now();
    for (iface, prog) in &started.xdp {
        let addrs: Vec<SocketAddr> = config
            .listeners
            .iter()
            .filter(|l| l.mode == ListenerMode::Bypass && l.interface.as_deref() == Some(iface))
            .map(|l| l.address)
            .collect();
        // Kernel listeners on this interface join the listen set only for the per-source
        // limits (opt-in), so without them the program behaves exactly as before.
        let limited: Vec<SocketAddr> = if config.xdp.syn_rate_per_source == 0
            && config.xdp.unknown_rate_per_source == 0
        {
            Vec::new()
        } else {
            config
                .listeners
                .iter()
                .filter(|l| l.mode == ListenerMode::Kernel && l.interface.as_deref() == Some(iface))
                .map(|l| l.address)
                .collect()
        };
        prog.set_listen_set(&addrs, &limited)
            .with_context(|| format!("setting the listen set on {iface}"))?;
        prog.set_source_limits(
            crate::bypass::xdp::RateLimit {
                rate: config.xdp.syn_rate_per_source,
                burst: config.xdp.syn_burst_per_source,
            },
            crate::bypass::xdp::RateLimit {
                rate: config.xdp.unknown_rate_per_source,
                burst: config.xdp.unknown_burst_per_source,
            },
        )
        .with_context(|| format!("setting the per-source limits on {iface}"))?;
        if addrs.is_empty() {
            continue;
        }
        if adopted.contains(iface) {
            deferred.push((iface.clone(), addrs));
            continue;
        }
        // On error, `start_bypass` has already stopped the workers it started.
        let workers = start_bypass(
            &config,
            &mut || {
                access_log
                    .as_mut()
                    .map(|log| log.sink(crate::access_log::PathKind::Bypass))
            },
            iface,
            prog,
            &addrs,
            tls.as_ref(),
            &started.shutdown,
            secret,
            epoch,
            &reloader,
            &board,
            &latency,
        )?;
        for (w, extra) in workers {
            bypass_info.push(BypassInfo {
                interface: iface.clone(),
                worker: w.id(),
                bind_mode: w.bind_mode().to_string(),
                page_kind: w.page_kind().to_string(),
                counters: w.counters().clone(),
                proxy: Some(extra.0.clone()),
                tcp: Some(extra.1.clone()),
            });
            let name = format!("tern-x{} ({iface})", w.id());
            started.threads.push(Watched::new(name, Job::Bypass(w)));
        }
    }

    // An upgrade binds its control socket beside the running one's until it serves.
    let (control_listener, control_file) = if takeover.is_some() {
        control::bind_beside(&config.control)?
    } else {
        control::bind(&config.control)?
    };
    // Ours from now on: removed when tern stops, and only if the path is still the socket we
    // made (never before: `bind` refuses a path another tern answers on).
    started.control_socket = Some(control_file);
    // Bound now, so a taken address is a start-up error; served once the workers run.
    let metrics_listener = config
        .metrics
        .address
        .map(|address| crate::metrics::bind(address, &config.path))
        .transpose()?;
    // Kernel-mode workers serve the kernel listeners; none are started without any.
    let mut kernel_listeners: Vec<(SocketAddr, bool, u16)> = config
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mode == ListenerMode::Kernel)
        .map(|(i, l)| (l.address, l.tls, i as u16))
        .collect();
    let own_kernel_listeners = kernel_listeners.len();
    // Upgrade: the deferred bypass listeners on kernel sockets meanwhile (not kept for a later
    // takeover: they are this process's interim, not its configuration).
    for (i, l) in config.listeners.iter().enumerate() {
        if deferred.iter().any(|(_, addrs)| addrs.contains(&l.address)) {
            kernel_listeners.push((l.address, l.tls, i as u16));
        }
    }
    let kernel_workers = if kernel_listeners.is_empty() {
        0
    } else {
        config.workers.count
    };
    let counters: Vec<_> = (0..kernel_workers)
        .map(|_| Arc::new(WorkerCounters::default()))
        .collect();
    let state = Arc::new(ControlState {
        workers: counters.clone(),
        xdp: Mutex::new(std::mem::take(&mut started.xdp)),
        bypass: Mutex::new(bypass_info),
        started: Instant::now(),
        reloader: reloader.clone(),
        shutdown: started.shutdown.clone(),
        backends: board.clone(),
        access_log: access_log
            .as_ref()
            .zip(config.access_log.as_ref())
            .map(|(log, settings)| (log.handle(), settings.flush)),
        latency: latency.clone(),
    });
    started.state = Some(state.clone());

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    // Upgrade: the old tern's sockets per listener, spread over this process's workers
    // (worker i takes the j-th with j % workers == i, so all are taken whatever the counts).
    let mut inherited: Vec<Vec<Vec<OwnedFd>>> = kernel_listeners
        .iter()
        .map(|&(address, _, _)| {
            let fds = takeover
                .as_mut()
                .map(|t| t.take(address))
                .unwrap_or_default();
            let mut per_worker: Vec<Vec<OwnedFd>> =
                (0..kernel_workers).map(|_| Vec::new()).collect();
            for (j, fd) in fds.into_iter().enumerate() {
                if let Some(w) = per_worker.get_mut(j % kernel_workers.max(1)) {
                    w.push(fd);
                }
            }
            per_worker
        })
        .collect();
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, io::Result<()>)>();
    for (i, wc) in counters.iter().enumerate() {
        let mut fds = Vec::new();
        for (k, &(address, tls, listener)) in kernel_listeners.iter().enumerate() {
            let interim = k >= own_kernel_listeners;
            let inherited = inherited
                .get_mut(k)
                .and_then(|per_worker| per_worker.get_mut(i))
                .map(std::mem::take)
                .unwrap_or_default();
            let mine = if inherited.is_empty() {
                // Sockets made so far are closed (dropped) if this one fails.
                vec![listen_socket(address)
                    .with_context(|| format!("listening on {address} (worker {i})"))?]
            } else {
                inherited
            };
            for fd in mine {
                if interim {
                    fds.push((fd, tls, listener));
                    continue;
                }
                let info = crate::upgrade::SocketInfo {
                    address,
                    tls,
                    worker: i,
                };
                started
                    .shutdown
                    .handover
                    .register(&fd, info)
                    .context("keeping a copy of a listening socket for upgrades")?;
                fds.push((fd, tls, listener));
            }
        }
        let cpu = config
            .workers
            .cpus
            .get(i)
            .copied()
            .or_else(|| cores.get(i % cores.len().max(1)).map(|c| c.id));
        let setup = WorkerSetup {
            id: i,
            policy: crate::driver::Policy::from_config(&config),
            listeners: Vec::new(),
            tls: tls.clone(),
            backend: config.backend.clone(),
            timeouts: config.timeouts,
            limits: config.limits,
            counters: wc.clone(),
            latency: latency.worker(),
            shutdown: started.shutdown.clone(),
            watch: reloader.watch(),
            board: board.clone(),
            access_log: access_log
                .as_mut()
                .map(|log| log.sink(crate::access_log::PathKind::Kernel)),
        };
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("tern-w{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        tracing::warn!(worker = i, cpu, "could not pin worker to its CPU");
                    }
                }
                let raw: Vec<RawFd> = fds.iter().map(|(fd, _, _)| fd.as_raw_fd()).collect();
                let mut setup = setup;
                // The worker owns its listening sockets from here on (it closes them when it
                // stops); if it cannot be built they are closed here.
                setup.listeners = fds
                    .into_iter()
                    .map(|(fd, tls, listener)| kernel::ListenSocket {
                        fd: fd.into_raw_fd(),
                        tls,
                        listener,
                    })
                    .collect();
                // The ring is built on the worker's own thread: it is set up single-issuer.
                let w = match Worker::new(setup) {
                    Ok(w) => w,
                    Err(e) => {
                        for fd in raw {
                            // SAFETY: the fds were ours (taken from OwnedFd above) and the
                            // worker that was to own them was never built.
                            drop(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                        let _ = ready.send((i, Err(e)));
                        return Ok(());
                    }
                };
                let _ = ready.send((i, Ok(())));
                w.run()
            })
            .context("spawning a worker thread")?;
        started
            .threads
            .push(Watched::new(format!("tern-w{i}"), Job::Kernel(h)));
    }
    drop(ready_tx);
    for _ in 0..kernel_workers {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((i, Err(e))) => return Err(anyhow!("worker {i}: setting up io_uring: {e}")),
            Err(_) => return Err(anyhow!("a worker exited during start-up")),
        }
    }

    if let Some(log) = access_log.take() {
        let h = log
            .spawn(started.shutdown.clone())
            .context("spawning the access log thread")?;
        started
            .threads
            .push(Watched::new("tern-access-log", Job::AccessLog(h)));
    }

    {
        let state = state.clone();
        let h = std::thread::Builder::new()
            .name("tern-control".into())
            .spawn(move || control::serve(control_listener, state))
            .context("spawning the control thread")?;
        started
            .threads
            .push(Watched::new("tern-control", Job::Control(h)));
    }
    if let Some(listener) = metrics_listener {
        let (state, shutdown) = (state.clone(), started.shutdown.clone());
        let h = std::thread::Builder::new()
            .name("tern-metrics".into())
            .spawn(move || crate::metrics::serve(listener, state, shutdown))
            .context("spawning the metrics thread")?;
        started
            .threads
            .push(Watched::new("tern-metrics", Job::Metrics(h)));
    }

    // Upgrade, bypass: the kernel sockets listen, so new flows go to them; the old tern's flows
    // (no kernel socket holds them) stay on its AF_XDP sockets.
    for (iface, _) in &deferred {
        with_program(&state, iface, |p| {
            p.set_handover(tern_common::HANDOVER_KERNEL_NEW | tern_common::HANDOVER_KERNEL_KEEPS)
        })
        .with_context(|| format!("upgrade: steering new flows on {iface} to the kernel"))?;
    }
    // An upgrade moves the control path over while still privileged (its directory is
    // usually root's), then this process gives up root, and only then is the old tern told to
    // drain: a failure before that point leaves the old one serving.
    if let Some(file) = started
        .control_socket
        .as_mut()
        .filter(|_| takeover.is_some())
    {
        file.rename(&config.control.socket).with_context(|| {
            format!(
                "upgrade: moving the control socket over {}",
                config.control.socket.display()
            )
        })?;
    }
    // Set-up is complete (sockets bound, XDP attached, AF_XDP sockets registered, UMEM mapped,
    // every worker ready, the control socket bound and chowned): give up root. A failure is a
    // failed start-up; `started` releases everything. Bypass workers that start only once the
    // old tern has exited (a bypass upgrade) still need root to bind their AF_XDP sockets:
    // then the switch waits for them (`LateBypass`).
    let switch_late = takeover.is_some() && !deferred.is_empty();
    if !switch_late {
        match &config.process.run_as {
            Some(to) => crate::privileges::switch(to).context("switching to [process] user")?,
            None => crate::privileges::warn_if_root(),
        }
    }
    let mut old_process = None;
    if let Some(takeover) = takeover {
        match takeover.finish() {
            Ok(old) => old_process = Some(old),
            Err(e) => {
                // Both processes accept from the same sockets meanwhile; nothing is lost.
                tracing::error!(
                    error = format!("{e:#}"),
                    "upgrade: the old tern was not told to drain; stop it with SIGTERM"
                );
            }
        }
    }
    let mut late = LateBypass {
        phase: match old_process {
            Some(old) if !deferred.is_empty() => LatePhase::OldDraining { old },
            _ => LatePhase::Done,
        },
        deferred,
        own_kernel_listeners,
        secret,
        epoch,
        run_as: config.process.run_as.clone().filter(|_| switch_late),
    };
    if matches!(late.phase, LatePhase::Done) {
        // The old tern was not told to drain: its queues stay its own, no bypass worker
        // starts late, and root is given up now.
        if let Some(to) = late.run_as.take() {
            crate::privileges::switch(&to).context("switching to [process] user")?;
        }
    }

    let addrs: Vec<String> = config
        .listeners
        .iter()
        .map(|l| l.address.to_string())
        .collect();
    tracing::info!(
        listeners = %addrs.join(","),
        workers = config.workers.count,
        backends = config.backend.servers.len(),
        control = %config.control.socket.display(),
        metrics = %config.metrics.address.map(|a| a.to_string()).unwrap_or_default(),
        "tern ready"
    );
    crate::notify::ready();
    crate::fault::arm();

    // Until every worker has ended after SIGTERM / SIGINT, or a thread fails.
    let watched = {
        let shutdown = started.shutdown.clone();
        // Logs OCSP responses that go stale while tern runs (the resolver stops stapling them
        // by itself); the main thread is not a worker, so this costs the data path nothing.
        let mut ocsp_watch = crate::ocsp::StaleWatch::default();
        supervise::watch_with(&mut started.threads, &shutdown, |threads| {
            ocsp_watch.tick(&reloader);
            late.tick(threads, &config, tls.as_ref(), &state, &counters, &reloader)
        })
    };
    if let Err(failed) = &watched {
        crate::notify::stopping();
        tracing::error!(
            thread = %failed.thread,
            error = %failed.reason,
            exit_code = supervise::EXIT_THREAD_FAILED,
            "thread failed; stopping tern so that the service manager restarts it"
        );
    }
    started.release();
    let total = control::stats(&state);
    tracing::info!(stats = %total["total"], "tern stopped");
    watched.map_err(Into::into)
}

/// Runs `f` on the program attached to `iface`.
fn with_program<T>(
    state: &ControlState,
    iface: &str,
    f: impl FnOnce(&XdpProgram) -> Result<T, crate::bypass::xdp::XdpError>,
) -> anyhow::Result<T> {
    let programs = state
        .xdp
        .lock()
        .map_err(|_| anyhow!("the XDP program list is poisoned"))?;
    let (_, prog) = programs
        .iter()
        .find(|(i, _)| i == iface)
        .ok_or_else(|| anyhow!("no XDP program on {iface}"))?;
    Ok(f(prog)?)
}

/// How long the new tern tries to bind the AF_XDP sockets once the old one has exited (its
/// sockets are released as its process ends, a little after its control connection closes).
const LATE_BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long after its bypass workers start the new tern still expects handshakes that began
/// on the kernel path (a SYN passed just before the switch) before it stops asking the XDP
/// program to look for kernel-held flows.
const KERNEL_HANDSHAKE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Binary upgrade on the bypass path, after the takeover: the steps that wait for the old
/// tern, run from the main thread's watch loop (docs/architecture.md, "Binary upgrade").
struct LateBypass {
    phase: LatePhase,
    /// Interfaces whose bypass workers wait for the old tern's AF_XDP sockets to close.
    deferred: Vec<(String, Vec<SocketAddr>)>,
    /// Kernel listeners of the configuration; the kernel workers' listeners after these are
    /// the deferred bypass listeners' interim ones.
    own_kernel_listeners: usize,
    secret: [u8; 16],
    epoch: Instant,
    /// `[process]` user to switch to once the late bypass workers have bound their AF_XDP
    /// sockets (which needs root); `None`: switched already, or no switch configured.
    run_as: Option<crate::config::RunAs>,
}

enum LatePhase {
    /// Phase 1: new flows on kernel sockets, the old tern's flows on its AF_XDP sockets.
    OldDraining { old: crate::upgrade::OldProcess },
    /// The old tern has exited; binding the AF_XDP sockets until `deadline`.
    Binding { deadline: Instant },
    /// Phase 2: new flows on this process's AF_XDP sockets; flows the kernel holds stay there.
    KernelFlows { since: Instant },
    /// Steering is back to normal (or there was no bypass upgrade).
    Done,
}

impl LateBypass {
    fn tick(
        &mut self,
        threads: &mut Vec<Watched>,
        config: &Config,
        tls: Option<&Arc<rustls::ServerConfig>>,
        state: &Arc<ControlState>,
        kernel: &[Arc<WorkerCounters>],
        reloader: &Arc<Reloader>,
    ) -> Result<(), supervise::ThreadFailed> {
        let failed = |e: anyhow::Error| supervise::ThreadFailed {
            thread: "tern-main (upgrade)".into(),
            reason: format!("{e:#}"),
        };
        let shutdown = &state.shutdown;
        if matches!(self.phase, LatePhase::Done)
            || shutdown.drain.load(Ordering::Relaxed)
            || shutdown.stop.load(Ordering::Relaxed)
        {
            return Ok(());
        }
        match &self.phase {
            LatePhase::OldDraining { old } => {
                if old.exited() {
                    tracing::info!("upgrade: the old tern has exited; starting the bypass workers");
                    self.phase = LatePhase::Binding {
                        deadline: Instant::now() + LATE_BIND_WAIT,
                    };
                    return self.tick(threads, config, tls, state, kernel, reloader);
                }
            }
            LatePhase::Binding { deadline } => {
                let deadline = *deadline;
                let mut rest = Vec::new();
                for (iface, addrs) in std::mem::take(&mut self.deferred) {
                    let result = with_program(state, &iface, |prog| {
                        let late_log = state.access_log.as_ref().map(|(h, _)| h.clone());
                        Ok(start_bypass(
                            config,
                            &mut || {
                                late_log
                                    .as_ref()
                                    .map(|h| h.late_sink(crate::access_log::PathKind::Bypass))
                            },
                            &iface,
                            prog,
                            &addrs,
                            tls,
                            shutdown,
                            self.secret,
                            self.epoch,
                            reloader,
                            &state.backends,
                            &state.latency,
                        ))
                    })
                    .and_then(|r| r);
                    match result {
                        Ok(workers) => {
                            let mut info = state.bypass.lock().unwrap_or_else(|e| e.into_inner());
                            for (w, extra) in workers {
                                info.push(bypass_info_of(&iface, &w, &extra));
                                let name = format!("tern-x{} ({iface})", w.id());
                                threads.push(Watched::new(name, Job::Bypass(w)));
                            }
                            drop(info);
                            // New flows to the AF_XDP sockets; the kernel keeps what it holds.
                            with_program(state, &iface, |p| {
                                p.set_handover(tern_common::HANDOVER_KERNEL_KEEPS)
                            })
                            .map_err(failed)?;
                            tracing::info!(interface = %iface, "upgrade: bypass path serving new flows");
                        }
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(interface = %iface, error = format!("{e:#}"), "upgrade: AF_XDP queues not free yet");
                            rest.push((iface, addrs));
                        }
                        Err(e) => return Err(failed(e.context(format!(
                            "upgrade: starting the bypass workers on {iface} after the old tern exited"
                        )))),
                    }
                }
                self.deferred = rest;
                if self.deferred.is_empty() {
                    // Set-up is complete now: give up root.
                    if let Some(to) = self.run_as.take() {
                        crate::privileges::switch(&to)
                            .context("switching to [process] user after the bypass workers started")
                            .map_err(failed)?;
                    }
                    self.phase = LatePhase::KernelFlows {
                        since: Instant::now(),
                    };
                }
            }
            LatePhase::KernelFlows { since } => {
                // Only when the kernel workers serve nothing but the interim listeners can
                // their connection count tell that the kernel holds no more of these flows;
                // with kernel listeners of its own the flag stays (one socket lookup per
                // listener segment) until the next restart.
                let open: u64 = kernel.iter().map(|c| c.snapshot().active).sum();
                if since.elapsed() >= KERNEL_HANDSHAKE_GRACE
                    && self.own_kernel_listeners == 0
                    && open == 0
                {
                    let programs = state.xdp.lock().map_err(|_| failed(anyhow!("poisoned")))?;
                    for (iface, prog) in programs.iter() {
                        prog.set_handover(0).map_err(|e| failed(e.into()))?;
                        tracing::info!(interface = %iface, "upgrade: done; steering is back to normal");
                    }
                    self.phase = LatePhase::Done;
                }
            }
            LatePhase::Done => {}
        }
        Ok(())
    }
}

fn bypass_info_of(
    iface: &str,
    w: &BypassWorker,
    extra: &(Arc<WorkerCounters>, Arc<TcpCounters>),
) -> BypassInfo {
    BypassInfo {
        interface: iface.to_owned(),
        worker: w.id(),
        bind_mode: w.bind_mode().to_string(),
        page_kind: w.page_kind().to_string(),
        counters: w.counters().clone(),
        proxy: Some(extra.0.clone()),
        tcp: Some(extra.1.clone()),
    }
}

/// Everything [`run`] has started, released in reverse order by [`Started::release`] (or on
/// drop, which covers every early return of a failed start-up).
#[derive(Default)]
struct Started {
    shutdown: Arc<Shutdown>,
    /// Every thread started so far, in start order.
    threads: Vec<Watched>,
    /// XDP programs attached so far (moved into `state` once it exists).
    xdp: Vec<(String, XdpProgram)>,
    /// Holds the XDP programs once the control state is built.
    state: Option<Arc<ControlState>>,
    /// The control socket, once `run` has bound it (removed when dropped).
    control_socket: Option<control::SocketFile>,
}

impl Started {
    /// Stops and joins the threads (bounded: see [`supervise::stop_all`]), removes the control
    /// socket and detaches the XDP programs. Idempotent.
    fn release(&mut self) {
        // Bypass workers must end before the programs whose XSKMAP holds their sockets are
        // dropped.
        let left = supervise::stop_all(std::mem::take(&mut self.threads), &self.shutdown);
        if !left.is_empty() {
            tracing::warn!(
                threads = %left.join(", "),
                grace_ms = supervise::STOP_GRACE.as_millis() as u64,
                "threads did not stop in time; the process's exit ends them"
            );
        }
        drop(self.control_socket.take());
        let mut programs = std::mem::take(&mut self.xdp);
        if let Some(state) = self.state.take() {
            if let Ok(mut v) = state.xdp.lock() {
                programs.append(&mut v);
            }
        }
        for (iface, prog) in programs {
            // Dropping the program detaches it.
            drop(prog);
            tracing::info!(interface = %iface, "XDP program detached");
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.release();
    }
}

/// A bypass worker, with its L4 proxy's counters.
type StartedBypass = (BypassWorker, (Arc<WorkerCounters>, Arc<TcpCounters>));

/// Opens the AF_XDP sockets of `iface` for every worker, registers them with `prog` and starts
/// the bypass workers. Each runs tern's TCP stack and the proxy over it ([`Proxy`]) for the
/// `mode = "bypass"` listeners of `iface`: TLS ones through rustls (the same configuration, session
/// cache and tickets as kernel mode), plain ones (`tls = false`) as they are.
#[allow(clippy::too_many_arguments)]
fn start_bypass(
    config: &Config,
    access_log: &mut dyn FnMut() -> Option<crate::access_log::Sink>,
    iface: &str,
    prog: &crate::bypass::xdp::XdpProgram,
    addrs: &[SocketAddr],
    tls: Option<&Arc<rustls::ServerConfig>>,
    shutdown: &Arc<Shutdown>,
    secret: [u8; 16],
    epoch: Instant,
    reloader: &Arc<Reloader>,
    board: &Arc<crate::driver::board::Board>,
    latency: &crate::metrics::Latency,
) -> anyhow::Result<Vec<StartedBypass>> {
    let queues = crate::bypass::xsk::rx_queue_count(iface)
        .with_context(|| format!("reading the RX queue count of {iface}"))?;
    let setup = BypassSetup {
        interface: iface.to_owned(),
        queues,
        workers: config.workers.count,
        cpus: config.workers.cpus.clone(),
        settings: config.xdp,
        shutdown: shutdown.clone(),
        drain_timeout: config.timeouts.drain,
    };
    let tls_listeners: Vec<SocketAddr> = config
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::Bypass && l.interface.as_deref() == Some(iface))
        .filter(|l| l.tls)
        .map(|l| l.address)
        .collect();
    let listener_ids: Vec<(SocketAddr, u16)> = config
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mode == ListenerMode::Bypass && l.interface.as_deref() == Some(iface))
        .map(|(i, l)| (l.address, i as u16))
        .collect();
    // The MSS follows this interface's MTU unless `tcp.mss` sets it (`bypass::mss`).
    let mtu = crate::bypass::mss::interface_mtu(iface)
        .with_context(|| format!("reading the MTU of {iface}"))?;
    let mss =
        crate::bypass::mss::resolve(config.tcp.mss, mtu, addrs, config.xdp.frame_size as usize);
    let tcp = crate::config::TcpSettings {
        mss: Some(mss),
        ..config.tcp
    };
    let mut extras = Vec::new();
    let workers = bypass::start_with(&setup, prog, |id, _| {
        let counters = Arc::new(WorkerCounters::default());
        let tcp_counters = Arc::new(TcpCounters::default());
        extras.push((counters.clone(), tcp_counters.clone()));
        let l4 = ProxySetup {
            worker: id,
            policy: crate::driver::Policy::from_config(config),
            listeners: addrs.to_vec(),
            tls_listeners: tls_listeners.clone(),
            listener_ids: listener_ids.clone(),
            tls: tls.cloned(),
            backend: config.backend.clone(),
            timeouts: config.timeouts,
            limits: config.limits,
            tcp,
            frame_size: config.xdp.frame_size as usize,
            secret,
            epoch,
            counters,
            tcp_counters,
            watch: reloader.watch(),
            board: board.clone(),
            access_log: access_log(),
            latency: latency.worker(),
        };
        // Built on the worker's thread: its io_uring is single-issuer.
        move || Proxy::new(l4)
    })
    .with_context(|| format!("starting the bypass workers on {iface}"))?;
    let workers: Vec<StartedBypass> = workers.into_iter().zip(extras).collect();
    // Once the workers run (a binary upgrade's late start too, replacing the predecessor's
    // secret): the program answers SYNs as these workers would, with their secret and epoch.
    let cookies = (config.xdp.syn_cookies == crate::config::SynCookies::Xdp).then(|| {
        crate::bypass::xdp::SynCookieParams {
            secret,
            epoch_ns: crate::bypass::xdp::monotonic_ns_at(epoch),
            mss,
            window: u16::try_from(config.tcp.recv_buffer).unwrap_or(u16::MAX),
            wscale: crate::tcp::stack::window_scale_for(config.tcp.recv_buffer),
        }
    });
    prog.set_syn_cookies(cookies.as_ref())
        .with_context(|| format!("setting [xdp] syn_cookies on {iface}"))?;
    if let Some((w, _)) = workers.first() {
        tracing::info!(
            interface = %iface,
            queues,
            workers = workers.len(),
            bind = %w.bind_mode(),
            pages = %w.page_kind(),
            tls_listeners = tls_listeners.len(),
            mtu,
            mss,
            "bypass path ready"
        );
    }
    Ok(workers)
}

/// Starts the signal thread: SIGTERM raises the drain flag, SIGINT or a second SIGTERM the
/// stop flag, SIGHUP reloads the configuration (the result is logged).
fn spawn_signal_thread(
    shutdown: Arc<Shutdown>,
    drain: std::time::Duration,
    reloader: Arc<Reloader>,
) -> anyhow::Result<Watched> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    let thread: JoinHandle<()> = std::thread::Builder::new()
        .name("tern-signals".into())
        .spawn(move || {
            // Ends when `handle` is closed (tern stopping).
            for sig in signals.forever() {
                if sig == SIGHUP {
                    let draining = shutdown.drain.load(Ordering::Relaxed);
                    crate::reload::log_outcome("SIGHUP", &reloader.reload(draining));
                } else if sig == SIGTERM && !shutdown.drain.load(Ordering::Relaxed) {
                    tracing::info!(deadline_ms = drain.as_millis() as u64, "SIGTERM: draining");
                    shutdown.begin_drain();
                } else {
                    tracing::info!(signal = sig, "stopping now");
                    shutdown.stop.store(true, Ordering::Relaxed);
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(Watched::new(
        "tern-signals",
        Job::Signals { handle, thread },
    ))
}

/// A listening TCP socket with SO_REUSEPORT, so each worker has its own accept queue and the
/// kernel spreads connections across workers. Closed on every error (it is owned from the
/// start).
fn listen_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // "[::]:443" means IPv6 only; list "0.0.0.0:443" as well for IPv4 (explicit beats a
        // sysctl-dependent dual stack).
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}
