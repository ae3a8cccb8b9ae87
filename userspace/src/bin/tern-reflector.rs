//! `tern-reflector`: the benchmark helper for the bypass I/O layer (`cargo xtask bench xsk`).
//!
//! Attaches tern's XDP program to an interface, steers one listen address into bypass workers
//! whose handler reflects every frame (L2/L3/L4 addresses swapped, sent back out of the queue it
//! came in on), runs for a bounded time or until SIGINT/SIGTERM, and prints one JSON object on
//! stdout: per worker the frames received and sent, packets per second and the CPU time of its
//! thread, plus the totals and the XDP program's counters. `--xdp-tx` measures the ceiling
//! instead: the XDP program reflects the frames itself (`XDP_TX`) and no worker runs (its CPU
//! cost is softirq time, charged to no thread; the harness measures it machine-wide).
//!
//! It prints `tern-reflector: ready` on stderr once frames are being reflected, so a harness
//! can start its traffic then. Not here: the traffic generator and the comparison (xtask).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;
use tern::bypass::{self, BypassSetup, ReflectMode, Reflector};
use tern::config::{FileXdp, HugePages, XdpAttach, XdpSettings};
use tern::server::Shutdown;

#[derive(Parser)]
#[command(
    name = "tern-reflector",
    version,
    about = "Reflect frames for one listen address through tern's AF_XDP workers (benchmark)"
)]
struct Args {
    /// Interface to attach the XDP program to (in the current network namespace).
    #[arg(long)]
    interface: String,
    /// The listen address whose TCP frames are steered and reflected (ADDR:PORT).
    #[arg(long)]
    listen: SocketAddr,
    /// Bypass workers (one socket per RX queue each).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// CPUs to pin the workers to, comma separated (default: the i-th available CPU).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Stop after this many seconds (also stops on SIGINT/SIGTERM).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Copy each frame into a freshly allocated one before sending it back (instead of
    /// rewriting it in place): what a stack that builds its replies costs.
    #[arg(long)]
    copy: bool,
    /// Measure the ceiling: the XDP program reflects with XDP_TX, no AF_XDP worker runs.
    #[arg(long)]
    xdp_tx: bool,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachArg,
    /// UMEM pages.
    #[arg(long, value_enum, default_value = "auto")]
    hugepages: HugePagesArg,
    /// Frames per worker (default: the `[xdp]` default).
    #[arg(long)]
    frames_per_worker: Option<u32>,
    /// Busy-poll time after the last frame before a worker sleeps, in microseconds.
    #[arg(long)]
    idle_spin_us: Option<u64>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AttachArg {
    Auto,
    Native,
    Skb,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HugePagesArg {
    Auto,
    Require,
    Off,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(&args) {
        Ok(report) => {
            println!("{report:#}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tern-reflector: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn settings(args: &Args) -> XdpSettings {
    let defaults = FileXdp::default();
    XdpSettings {
        frame_size: defaults.frame_size,
        frames_per_worker: args.frames_per_worker.unwrap_or(defaults.frames_per_worker),
        rx_ring: defaults.rx_ring,
        tx_ring: defaults.tx_ring,
        fill_ring: defaults.fill_ring,
        completion_ring: defaults.completion_ring,
        idle_spin: Duration::from_micros(args.idle_spin_us.unwrap_or(defaults.idle_spin_us)),
        spin: defaults.spin,
        hugepages: match args.hugepages {
            HugePagesArg::Auto => HugePages::Auto,
            HugePagesArg::Require => HugePages::Require,
            HugePagesArg::Off => HugePages::Off,
        },
        syn_rate_per_source: defaults.syn_rate_per_source,
        syn_burst_per_source: defaults.syn_burst_per_source,
        unknown_rate_per_source: defaults.unknown_rate_per_source,
        unknown_burst_per_source: defaults.unknown_burst_per_source,
        syn_cookies: defaults.syn_cookies,
    }
}

/// Waits until `seconds` pass or a signal arrives.
fn wait(seconds: f64, signalled: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    while Instant::now() < deadline && !signalled.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be positive"
    );
    anyhow::ensure!(
        (1..=tern_common::MAX_WORKERS as usize).contains(&args.workers),
        "--workers must be 1 to {}",
        tern_common::MAX_WORKERS
    );
    let signalled = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, signalled.clone())
            .context("installing signal handlers")?;
    }
    let attach = match args.attach {
        AttachArg::Auto => XdpAttach::Auto,
        AttachArg::Native => XdpAttach::Native,
        AttachArg::Skb => XdpAttach::Skb,
    };
    let program = tern::bypass::xdp::attach(&args.interface, attach)
        .with_context(|| format!("attaching the XDP program to {}", args.interface))?;
    program
        .set_listeners(&[args.listen])
        .context("setting the listen address")?;
    let queues = tern::bypass::xsk::rx_queue_count(&args.interface)
        .with_context(|| format!("counting the RX queues of {}", args.interface))?;

    if args.xdp_tx {
        program
            .set_reflect(true)
            .context("turning on XDP_TX reflection")?;
        let before = program.counters().context("reading XDP counters")?;
        let started = Instant::now();
        eprintln!(
            "tern-reflector: ready (xdp-tx, interface {}, {queues} queues)",
            args.interface
        );
        wait(args.seconds, &signalled);
        let elapsed = started.elapsed().as_secs_f64();
        let after = program.counters().context("reading XDP counters")?;
        let reflected = after.steered - before.steered;
        return Ok(json!({
            "mode": "xdp_tx",
            "interface": args.interface,
            "listen": args.listen.to_string(),
            "queues": queues,
            "xdp_mode": program.attached_mode().to_string(),
            "seconds": elapsed,
            "total": {
                "tx_frames": reflected,
                "tx_pps": reflected as f64 / elapsed,
            },
            "xdp": after,
        }));
    }

    let shutdown = Arc::new(Shutdown::default());
    let setup = BypassSetup {
        interface: args.interface.clone(),
        queues,
        workers: args.workers,
        cpus: args.cpus.clone(),
        settings: settings(args),
        shutdown: shutdown.clone(),
        drain_timeout: Duration::ZERO,
    };
    let mode = if args.copy {
        ReflectMode::Copy
    } else {
        ReflectMode::InPlace
    };
    let workers = bypass::start(&setup, &program, |_, _| Reflector::new(mode))
        .context("starting the bypass workers")?;
    let xdp_before = program.counters().context("reading XDP counters")?;
    let started = Instant::now();
    eprintln!(
        "tern-reflector: ready ({} workers, {queues} queues, {} mode, {:?} pages)",
        workers.len(),
        workers[0].bind_mode(),
        workers[0].page_kind()
    );
    wait(args.seconds, &signalled);
    let elapsed = started.elapsed().as_secs_f64();
    let xdp_after = program.counters().context("reading XDP counters")?;
    bypass::stop(&shutdown, &workers);

    let mut per_worker = Vec::new();
    let (mut rx, mut tx, mut cpu) = (0u64, 0u64, 0f64);
    for worker in workers {
        let id = worker.id();
        let counters = worker.counters().clone();
        let exit = worker
            .join()
            .with_context(|| format!("bypass worker {id}"))?;
        let snapshot = counters.snapshot();
        let cpu_seconds = exit.cpu_time.as_secs_f64();
        rx += snapshot.rx_frames;
        tx += snapshot.tx_frames;
        cpu += cpu_seconds;
        per_worker.push(json!({
            "worker": id,
            "cpu": bypass::worker_cpu(&args.cpus, id),
            "rx_frames": snapshot.rx_frames,
            "tx_frames": snapshot.tx_frames,
            "rx_pps": snapshot.rx_frames as f64 / elapsed,
            "tx_pps": snapshot.tx_frames as f64 / elapsed,
            "cpu_seconds": cpu_seconds,
            "cpu_utilization": cpu_seconds / elapsed,
            "tx_pps_per_cpu_second": snapshot.tx_frames as f64 / cpu_seconds.max(1e-9),
            "rx_per_queue": exit.rx_per_queue,
            "counters": snapshot,
            "frames": exit.frames,
            "quiesced": exit.quiesced,
            "kernel": exit.kernel,
        }));
    }
    Ok(json!({
        "mode": if args.copy { "af_xdp_copy" } else { "af_xdp" },
        "interface": args.interface,
        "listen": args.listen.to_string(),
        "queues": queues,
        "xdp_mode": program.attached_mode().to_string(),
        "seconds": elapsed,
        "workers": per_worker,
        "total": {
            "rx_frames": rx,
            "tx_frames": tx,
            "rx_pps": rx as f64 / elapsed,
            "tx_pps": tx as f64 / elapsed,
            "cpu_seconds": cpu,
            "tx_pps_per_cpu_second": tx as f64 / cpu.max(1e-9),
        },
        "xdp": {
            "steered": xdp_after.steered - xdp_before.steered,
            "counters": xdp_after,
        },
    }))
}
