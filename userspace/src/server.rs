//! Bringing tern up and down: listening sockets, XDP attachment, worker threads, the control
//! thread, signals and the drain on SIGTERM.
//!
//! Start-up either succeeds completely (every socket bound, every worker's io_uring built,
//! every XDP program attached) or fails with an error before anything is served. Shut-down:
//! SIGTERM makes workers stop accepting and finish open connections until `timeouts.drain_ms`;
//! a second SIGTERM or a SIGINT stops at once. XDP programs are attached through bpf links, so
//! the kernel detaches them even if tern is killed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context as _};

use crate::bypass::{self, BypassSetup, BypassWorker};
use crate::config::Config;
use crate::config::ListenerMode;
use crate::control::{self, BypassInfo, ControlState};
use crate::counters::WorkerCounters;
use crate::l4::{L4Proxy, L4Setup, TcpCounters};
use crate::worker::{self, Shutdown, Worker, WorkerSetup};

/// Runs tern with `config` until it is told to stop. Returns once everything is torn down.
pub fn run(config: Config) -> anyhow::Result<()> {
    // Only listeners with `tls = true` need certificates (validation made sure they exist).
    let tls = if config.listeners.iter().any(|l| l.tls) {
        Some(
            crate::tls::server_config(&config.certificates, &config.tls)
                .context("building the TLS configuration")?,
        )
    } else {
        None
    };

    // XDP first: if it cannot attach, nothing else should start.
    let mut xdp = Vec::new();
    for l in &config.listeners {
        let Some(iface) = l.interface.clone() else {
            continue;
        };
        if xdp.iter().any(|(i, _)| *i == iface) {
            continue;
        }
        let prog = crate::xdp::attach(&iface, l.xdp_attach)
            .with_context(|| format!("attaching the XDP program to {iface}"))?;
        tracing::info!(interface = %iface, mode = %prog.attached_mode(), "XDP program attached");
        xdp.push((iface, prog));
    }

    let shutdown = Arc::new(Shutdown::default());
    // Before anything accepts a connection: a SIGTERM that arrives once a client could have
    // connected must drain, not kill.
    spawn_signal_thread(shutdown.clone(), config.timeouts.drain)?;
    // The bypass path: on every interface with `mode = "xdp"` listeners, the program steers
    // their frames to AF_XDP sockets owned by bypass workers. Interfaces with only kernel
    // listeners get an empty listen set (counters and blocklist only).
    let mut bypass_workers: Vec<BypassWorker> = Vec::new();
    let mut bypass_info = Vec::new();
    // One secret and one clock epoch for every bypass worker: SYN cookies must validate on
    // whichever worker the handshake's last ACK reaches.
    let mut secret = [0u8; 16];
    crate::l4::fill_random(&mut secret).context("reading random bytes for the SYN cookie key")?;
    let epoch = Instant::now();
    for (iface, prog) in &xdp {
        let addrs: Vec<SocketAddr> = config
            .listeners
            .iter()
            .filter(|l| l.mode == ListenerMode::Xdp && l.interface.as_deref() == Some(iface))
            .map(|l| l.address)
            .collect();
        prog.set_listeners(&addrs)
            .with_context(|| format!("setting the listen set on {iface}"))?;
        if addrs.is_empty() {
            continue;
        }
        let started = start_bypass(
            &config,
            iface,
            prog,
            &addrs,
            tls.as_ref(),
            &shutdown,
            secret,
            epoch,
        );
        let workers = match started {
            Ok(w) => w,
            Err(e) => {
                stop_bypass(&shutdown, bypass_workers);
                return Err(e);
            }
        };
        for (w, extra) in &workers {
            bypass_info.push(BypassInfo {
                interface: iface.clone(),
                worker: w.id(),
                bind_mode: w.bind_mode().to_string(),
                page_kind: w.page_kind().to_string(),
                counters: w.counters().clone(),
                proxy: Some(extra.0.clone()),
                tcp: Some(extra.1.clone()),
            });
        }
        let workers = workers.into_iter().map(|(w, _)| w);
        bypass_workers.extend(workers);
    }

    // `control_file` removes the socket when dropped, on every way out of this function.
    let (control_listener, control_file) = match control::bind(&config.control) {
        Ok(bound) => bound,
        Err(e) => {
            stop_bypass(&shutdown, bypass_workers);
            return Err(e.into());
        }
    };
    // Kernel-mode workers serve the kernel listeners; none are started without any.
    let kernel_listeners: Vec<(SocketAddr, bool)> = config
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::Kernel)
        .map(|l| (l.address, l.tls))
        .collect();
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
        xdp: Mutex::new(xdp),
        bypass: bypass_info,
        started: Instant::now(),
    });

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, io::Result<()>)>();
    let mut handles = Vec::new();
    for (i, wc) in counters.iter().enumerate() {
        let mut fds = Vec::new();
        for &(address, tls) in &kernel_listeners {
            let fd = listen_socket(address)
                .with_context(|| format!("listening on {address} (worker {i})"))?;
            fds.push(worker::ListenSocket { fd, tls });
        }
        let cpu = config
            .workers
            .cpus
            .get(i)
            .copied()
            .or_else(|| cores.get(i % cores.len().max(1)).map(|c| c.id));
        let setup = WorkerSetup {
            id: i,
            listeners: fds,
            tls: tls.clone(),
            backend: config.backend.clone(),
            timeouts: config.timeouts,
            limits: config.limits,
            counters: wc.clone(),
            shutdown: shutdown.clone(),
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
                // The ring is built on the worker's own thread: it is set up single-issuer.
                let w = match Worker::new(setup) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready.send((i, Err(e)));
                        return Ok(());
                    }
                };
                let _ = ready.send((i, Ok(())));
                w.run()
            })
            .context("spawning a worker thread")?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((i, Err(e))) => {
                shutdown.stop.store(true, Ordering::Relaxed);
                return Err(anyhow!("worker {i}: setting up io_uring: {e}"));
            }
            Err(_) => return Err(anyhow!("a worker exited during start-up")),
        }
    }

    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("tern-control".into())
            .spawn(move || control::serve(control_listener, state))
            .context("spawning the control thread")?;
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
        "tern ready"
    );

    let mut failed = false;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(worker = i, error = %e, "worker failed");
                failed = true;
                shutdown.stop.store(true, Ordering::Relaxed);
            }
            Err(_) => {
                tracing::error!(worker = i, "worker panicked");
                failed = true;
                shutdown.stop.store(true, Ordering::Relaxed);
            }
        }
    }
    // Bypass workers end on the same flags (draining their own connections meanwhile); they
    // must be joined before the programs whose XSKMAP holds their sockets are dropped.
    for w in bypass_workers {
        let id = w.id();
        match w.join() {
            Ok(exit) if exit.quiesced => {
                tracing::debug!(worker = id, frames = ?exit.frames, "bypass worker stopped");
            }
            Ok(exit) => {
                tracing::warn!(worker = id, frames = ?exit.frames, "bypass worker stopped with frames still in flight");
            }
            Err(e) => {
                tracing::error!(worker = id, error = %e, "bypass worker failed");
                failed = true;
            }
        }
    }
    drop(control_file);
    // Dropping the programs detaches them.
    let detached = state
        .xdp
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    drop(detached);
    let total = control::stats(&state);
    tracing::info!(stats = %total["total"], "tern stopped");
    if failed {
        return Err(anyhow!("a worker failed; see the log above"));
    }
    Ok(())
}

/// A bypass worker, with its L4 proxy's counters.
type StartedBypass = (BypassWorker, (Arc<WorkerCounters>, Arc<TcpCounters>));

/// Opens the AF_XDP sockets of `iface` for every worker, registers them with `prog` and starts
/// the bypass workers. Each runs tern's TCP stack and the proxy over it ([`L4Proxy`]) for the
/// `mode = "xdp"` listeners of `iface`: TLS ones through rustls (the same configuration, session
/// cache and tickets as kernel mode), plain ones (`tls = false`) as they are.
#[allow(clippy::too_many_arguments)]
fn start_bypass(
    config: &Config,
    iface: &str,
    prog: &crate::xdp::XdpProgram,
    addrs: &[SocketAddr],
    tls: Option<&Arc<rustls::ServerConfig>>,
    shutdown: &Arc<Shutdown>,
    secret: [u8; 16],
    epoch: Instant,
) -> anyhow::Result<Vec<StartedBypass>> {
    let queues = crate::xsk::rx_queue_count(iface)
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
        .filter(|l| l.mode == ListenerMode::Xdp && l.interface.as_deref() == Some(iface))
        .filter(|l| l.tls)
        .map(|l| l.address)
        .collect();
    let mut extras = Vec::new();
    let workers = bypass::start_with(&setup, prog, |id, _| {
        let counters = Arc::new(WorkerCounters::default());
        let tcp_counters = Arc::new(TcpCounters::default());
        extras.push((counters.clone(), tcp_counters.clone()));
        let l4 = L4Setup {
            worker: id,
            listeners: addrs.to_vec(),
            tls_listeners: tls_listeners.clone(),
            tls: tls.cloned(),
            backend: config.backend.clone(),
            timeouts: config.timeouts,
            limits: config.limits,
            tcp: config.tcp,
            frame_size: config.xdp.frame_size as usize,
            secret,
            epoch,
            counters,
            tcp_counters,
        };
        // Built on the worker's thread: its io_uring is single-issuer.
        move || L4Proxy::new(l4)
    })
    .with_context(|| format!("starting the bypass workers on {iface}"))?;
    let workers: Vec<StartedBypass> = workers.into_iter().zip(extras).collect();
    if let Some((w, _)) = workers.first() {
        tracing::info!(
            interface = %iface,
            queues,
            workers = workers.len(),
            bind = %w.bind_mode(),
            pages = %w.page_kind(),
            tls_listeners = tls_listeners.len(),
            "bypass path ready"
        );
    }
    Ok(workers)
}

fn stop_bypass(shutdown: &Shutdown, workers: Vec<BypassWorker>) {
    bypass::stop(shutdown, &workers);
    for w in workers {
        let _ = w.join();
    }
}

fn spawn_signal_thread(shutdown: Arc<Shutdown>, drain: std::time::Duration) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("tern-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGTERM && !shutdown.drain.load(Ordering::Relaxed) {
                    tracing::info!(deadline_ms = drain.as_millis() as u64, "SIGTERM: draining");
                    shutdown.drain.store(true, Ordering::Relaxed);
                } else {
                    tracing::info!(signal = sig, "stopping now");
                    shutdown.stop.store(true, Ordering::Relaxed);
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// A listening TCP socket with SO_REUSEPORT, so each worker has its own accept queue and the
/// kernel spreads connections across workers.
fn listen_socket(addr: SocketAddr) -> io::Result<RawFd> {
    let fd = worker::tcp_socket(&addr)?;
    let close_on_err = |e: io::Error| {
        // SAFETY: our fd, closed once on this error path.
        unsafe { libc::close(fd) };
        e
    };
    let one: libc::c_int = 1;
    let mut opts = vec![
        (libc::SOL_SOCKET, libc::SO_REUSEADDR),
        (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    ];
    if addr.is_ipv6() {
        // "[::]:443" means IPv6 only; list "0.0.0.0:443" as well for IPv4 (explicit beats a
        // sysctl-dependent dual stack).
        opts.push((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
    }
    for (level, opt) in opts {
        // SAFETY: valid fd, pointer to a c_int of the given size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(close_on_err(io::Error::last_os_error()));
        }
    }
    // SAFETY: zeroed sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = worker::write_sockaddr(&addr, &mut ss);
    // SAFETY: ss holds a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } < 0 {
        return Err(close_on_err(io::Error::last_os_error()));
    }
    // SAFETY: valid bound socket.
    if unsafe { libc::listen(fd, 4096) } < 0 {
        return Err(close_on_err(io::Error::last_os_error()));
    }
    Ok(fd)
}
