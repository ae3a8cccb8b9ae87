//! `cargo xtask bench xsk`: the raw frame rate of the bypass I/O layer (issue 3), next to the
//! ceiling on the same rig.
//!
//! Rig: one veth pair with one queue; the server side runs `tern-reflector` with one worker
//! pinned to CPU 0; the client side runs tern's SYN generator (`tern_tests::pktgen`, AF_PACKET
//! with qdisc bypass) pinned to CPU 1, and a counting sink: tern's own XDP program on the
//! client veth with the blocklist set to everything, so every reflected frame is counted
//! (`blocked`) and dropped before the client's kernel could answer it.
//!
//! Modes, each run `--runs` times (median and min–max):
//! - `af_xdp`: XDP steers to the worker's AF_XDP socket; the worker swaps L2/L3/L4 addresses in
//!   place and transmits the frame back (zero copy within the UMEM; copy mode on veth).
//! - `af_xdp_copy`: the same, but each reply is built in a fresh frame (what a stack that
//!   builds its segments pays).
//! - `xdp_tx`: the ceiling — the XDP program reflects with `XDP_TX`, no worker involved.
//!
//! Figures: frames/s reflected (counted at the client sink), the worker's CPU time, and frames
//! per worker CPU-second. On veth the receive side's XDP runs in softirq on the *sender's* CPU,
//! so the ceiling's work is charged to the generator core and the worker's CPU includes the
//! client-side sink it transmits into; read the per-core figure with that in mind.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tern::config::XdpAttach;
use tern_tests::pktgen::{mac_of, send_syns, Sent, SynSpec};
use tern_tests::rig::Rig;

use super::stats::{fmt_num, Summary};
use crate::{cargo, display, workspace_root};

#[derive(Args, Clone)]
pub struct XskArgs {
    /// Seconds of traffic per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Measurements per mode.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// One short run per mode (about 10 s in all).
    #[arg(long)]
    quick: bool,
    /// Rewrite the xsk section of docs/benchmarks.md with this run's table.
    #[arg(long)]
    update_docs: bool,
}

const MODES: [(&str, &[&str]); 3] = [
    ("af_xdp", &[]),
    ("af_xdp_copy", &["--copy"]),
    ("xdp_tx", &["--xdp-tx"]),
];
const LISTEN_PORT: u16 = 9;
const DOC_BEGIN: &str = "<!-- xsk:begin -->";
const DOC_END: &str = "<!-- xsk:end -->";

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent_pps: f64,
    reflected_pps: f64,
    /// Worker CPU-seconds per second of traffic (NaN for `xdp_tx`, which has no worker).
    worker_util: f64,
    per_core: f64,
}

pub fn run(args: &XskArgs) -> Result<()> {
    let (seconds, runs) = if args.quick {
        (2.0, 1)
    } else {
        (args.seconds, args.runs.max(1))
    };
    let reflector = build_reflector()?;
    let hugepages_before = read_hugepages();
    let rig = Rig::isolated("xsk", 1);
    let iface = rig.client_if.clone();
    let sink = rig
        .client
        .run(move || -> Result<tern::bypass::xdp::XdpProgram> {
            let p = tern::bypass::xdp::attach(&iface, XdpAttach::Native)?;
            p.block("0.0.0.0/0".parse()?)?;
            p.block("::/0".parse()?)?;
            Ok(p)
        })
        .context("attaching the counting sink to the client veth")?;
    let spec = SynSpec {
        interface: rig.client_if.clone(),
        src_mac: mac_of(rig.client_command("ip"), &rig.client_if)?,
        dst_mac: mac_of(rig.server_command("ip"), &rig.server_if)?,
        src_ip: rig.client_ip,
        src_ips: 1,
        dst_ip: rig.server_ip,
        dst_port: LISTEN_PORT,
        flows: 256,
    };

    let mut samples: Vec<(&str, Vec<Sample>)> =
        MODES.iter().map(|(m, _)| (*m, Vec::new())).collect();
    for run in 0..runs {
        for (i, (mode, flags)) in MODES.iter().enumerate() {
            eprintln!("xsk: run {}/{runs}, {mode} ({seconds} s)", run + 1);
            let s = measure(&rig, &reflector, flags, &spec, &sink, seconds)
                .with_context(|| format!("measuring {mode}"))?;
            samples[i].1.push(s);
        }
    }
    drop(sink);
    drop(rig);
    restore_hugepages(hugepages_before);

    let table = report(&samples, seconds, runs);
    println!("\n{table}");
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("xsk.md"), &table)?;
    eprintln!("xsk: written to {}", out.join("xsk.md").display());
    if args.update_docs {
        update_docs(&table)?;
    }
    Ok(())
}

fn build_reflector() -> Result<PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "tern",
        "--bin",
        "tern-reflector",
    ]);
    eprintln!("xsk: $ {}", display(&build));
    let status = build.status()?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(&build));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("release/tern-reflector"))
}

/// Starts the reflector, waits until it is ready, runs the generator, returns the figures.
fn measure(
    rig: &Rig,
    reflector: &std::path::Path,
    flags: &[&str],
    spec: &SynSpec,
    sink: &tern::bypass::xdp::XdpProgram,
    seconds: f64,
) -> Result<Sample> {
    let listen = rig.server_addr(LISTEN_PORT).to_string();
    let mut cmd = rig.server_command(reflector.to_str().ok_or_else(|| anyhow!("path"))?);
    cmd.args([
        "--interface",
        &rig.server_if,
        "--listen",
        &listen,
        "--workers",
        "1",
        "--cpus",
        "0",
    ])
    // Longer than the traffic: the generator's window is what is measured.
    .args(["--seconds", &format!("{}", seconds + 3.0)])
    .args(flags)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = Reflector(cmd.spawn().context("starting tern-reflector")?);
    wait_ready(&mut child.0)?;

    let before = sink.counters()?.blocked;
    let gen_spec = spec.clone();
    let sent: Sent = rig.client.run(move || -> Result<Sent> {
        pin_current_thread(1);
        let stop = AtomicBool::new(false);
        Ok(send_syns(
            &gen_spec,
            u64::MAX,
            Duration::from_secs_f64(seconds),
            &stop,
        )?)
    })?;
    // Frames in flight when the generator stops still come back; give them a moment.
    std::thread::sleep(Duration::from_millis(200));
    let reflected = sink.counters()?.blocked - before;

    // SIGINT ends the reflector early; it then prints its JSON.
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_output()?;
    let report: serde_json::Value = serde_json::from_slice(&out)
        .with_context(|| format!("tern-reflector output: {}", String::from_utf8_lossy(&out)))?;
    let secs = sent.elapsed.as_secs_f64();
    let cpu = report["total"]["cpu_seconds"].as_f64().unwrap_or(f64::NAN);
    let reflected_pps = reflected as f64 / secs;
    Ok(Sample {
        sent_pps: sent.per_second(),
        reflected_pps,
        worker_util: cpu / secs,
        per_core: reflected as f64 / cpu,
    })
}

/// The reflector child; killed if still running when dropped.
struct Reflector(Child);

impl Reflector {
    fn wait_output(&mut self) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        if let Some(mut s) = self.0.stdout.take() {
            s.read_to_end(&mut out)?;
        }
        let status = self.0.wait()?;
        if !status.success() {
            bail!("tern-reflector failed ({status})");
        }
        Ok(out)
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the reflector's stderr until its `ready` line (bounded), then keeps draining it.
fn wait_ready(child: &mut Child) -> Result<()> {
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if line.contains("tern-reflector: ready") {
                let _ = tx.send(Ok(()));
            }
            lines.push(line);
        }
        let _ = tx.send(Err(lines.join("\n")));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(log)) => bail!("tern-reflector exited before it was ready:\n{log}"),
        Err(_) => bail!("tern-reflector not ready after 20 s"),
    }
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain old data; sched_setaffinity(0, ..) applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn read_hugepages() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// tern reserves hugepages it needs and leaves them; the benchmark puts the pool back as it
/// found it (the kernel frees a UMEM's pages a moment after its sockets close, hence retries).
fn restore_hugepages(before: Option<u64>) {
    let Some(before) = before else { return };
    for _ in 0..50 {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before.to_string());
        if read_hugepages() == Some(before) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("xsk: could not restore vm.nr_hugepages to {before}");
}

fn report(samples: &[(&str, Vec<Sample>)], seconds: f64, runs: usize) -> String {
    let ceiling = samples
        .iter()
        .find(|(m, _)| *m == "xdp_tx")
        .and_then(|(_, v)| Summary::of(&v.iter().map(|s| s.reflected_pps).collect::<Vec<_>>()))
        .map(|s| s.median)
        .unwrap_or(f64::NAN);
    let mut t = String::new();
    t += &format!(
        "Bypass I/O layer, one worker on CPU 0, generator on CPU 1, veth (1 queue, copy mode); \
         {runs} run(s) of {seconds} s, median (min–max).\n\n"
    );
    t += "| mode | offered frames/s | reflected frames/s | worker CPU | frames per worker CPU-second | vs XDP_TX ceiling |\n";
    t += "|---|---|---|---|---|---|\n";
    for (mode, v) in samples {
        let col = |f: fn(&Sample) -> f64| {
            Summary::of(&v.iter().map(f).collect::<Vec<_>>())
                .map(|s| s.display())
                .unwrap_or_else(|| "–".into())
        };
        let refl = Summary::of(&v.iter().map(|s| s.reflected_pps).collect::<Vec<_>>());
        let ratio = refl
            .map(|s| format!("{:.2}×", s.median / ceiling))
            .unwrap_or_default();
        let util = if *mode == "xdp_tx" {
            "– (softirq on the generator's CPU)".to_string()
        } else {
            Summary::of(&v.iter().map(|s| s.worker_util * 100.0).collect::<Vec<_>>())
                .map(|s| format!("{} %", fmt_num(s.median)))
                .unwrap_or_default()
        };
        let per_core = if *mode == "xdp_tx" {
            "–".to_string()
        } else {
            col(|s| s.per_core)
        };
        t += &format!(
            "| {mode} | {} | {} | {util} | {per_core} | {ratio} |\n",
            col(|s| s.sent_pps),
            col(|s| s.reflected_pps),
        );
    }
    t += "\nCommand: `cargo xtask bench xsk`";
    t += &format!(" (--seconds {seconds} --runs {runs}).\n");
    t
}

fn update_docs(table: &str) -> Result<()> {
    let path = workspace_root().join("docs/benchmarks.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let section = format!("{DOC_BEGIN}\n{table}{DOC_END}");
    let new = match (doc.find(DOC_BEGIN), doc.find(DOC_END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{section}{}", &doc[..b], &doc[e + DOC_END.len()..])
        }
        _ => format!("{doc}\n## The bypass I/O layer (`cargo xtask bench xsk`)\n\n{section}\n"),
    };
    std::fs::write(&path, new)?;
    eprintln!("xsk: updated {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_computes_ratio_against_the_ceiling() {
        let s = |r: f64| Sample {
            sent_pps: 2.0 * r,
            reflected_pps: r,
            worker_util: 0.5,
            per_core: 2.0 * r,
        };
        let samples = vec![
            ("af_xdp", vec![s(100.0)]),
            ("af_xdp_copy", vec![s(80.0)]),
            ("xdp_tx", vec![s(200.0)]),
        ];
        let t = report(&samples, 1.0, 1);
        assert!(
            t.contains("| af_xdp | 200 | 100 | 50.0 % | 200 | 0.50× |"),
            "{t}"
        );
        assert!(
            t.contains("| xdp_tx | 400 | 200 | – (softirq on the generator's CPU) | – | 1.00× |"),
            "{t}"
        );
    }
}
