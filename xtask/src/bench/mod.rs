//! `cargo xtask bench`: tern against the terminators users would pick instead (hitch, haproxy,
//! nginx), on the veth rig, the same certificate, the same backend, one core each for server and
//! load — measured as CPU per operation, with the crypto floors and the exact commands.
//!
//! Subcommands (`bench` alone runs the TLS comparison, so `cargo xtask bench --quick` works):
//! - `tls` — the comparison ([`compare`]); its options are also accepted without the subcommand.
//! - Issue 3's AF_XDP benchmark (`xsk.rs`) plugs in as `Xsk(xsk::XskArgs)` in [`BenchCommand`],
//!   dispatched in [`bench`] to `xsk::run`, with `pub mod xsk;` below (it also needs `tern` as an
//!   xtask dependency). It can reuse [`daemon`] (process-group guards with rusage),
//!   [`proc`]/[`cpu`] (CPU accounting), [`stats`], [`plots`] and [`progress`] as they are;
//!   docs/benchmarks.md has its `<!-- xsk:begin -->` section ready.
//!
//! Module map: [`compare`] drives a run; [`targets`] + [`configs`] know the peers; [`load`] knows
//! tern-load and h2load; [`measure`] turns one load run into CPU and rates; [`floors`] runs
//! `openssl speed` and the criterion benches; [`install`] gets Debian packages; [`harness`]
//! holds the set-up every rig bench shares (root, signals, panics, builds, echo backend);
//! [`results`], [`report`] and [`plots`] present. Nothing here is used by `cargo xtask test`.

pub mod bulk_mtu;
pub mod compare;
pub mod configs;
pub mod cpu;
pub mod daemon;
pub mod flood;
pub mod floors;
pub mod harness;
pub mod install;
pub mod keepalive_latency;
pub mod load;
pub mod measure;
pub mod million;
pub mod plots;
pub mod proc;
pub mod progress;
pub mod report;
pub mod results;
pub mod stats;
pub mod targets;
pub mod tcp;
pub mod xsk;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    compare: compare::CompareArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The TLS terminator comparison (the default when no subcommand is given).
    Tls(compare::CompareArgs),
    /// The bypass I/O layer's raw frame rate: an AF_XDP reflector per worker core next to the
    /// XDP_TX ceiling on the same rig.
    Xsk(xsk::XskArgs),
    /// Plain-TCP (L4) proxying: tern's bypass path (its own TCP stack on AF_XDP) against its
    /// kernel path, same echo backend, same run; plus the TCP stack's criterion benches.
    Tcp(tcp::TcpArgs),
    /// Up to a million idle TLS connections held by one tern-bypass process: resident memory
    /// at each step, then new-connection latency with all of them held (opt-in, ≤ 25 min).
    Million(million::MillionArgs),
    /// New connections (rate, latency) under a spoofed SYN flood at the rig's maximum rate, on
    /// tern's kernel and bypass paths, with the XDP program's counters. Opt-in.
    Flood(flood::FloodArgs),
}

/// Runs the selected benchmark.
pub fn bench(args: &BenchArgs) -> Result<()> {
    match &args.command {
        None => compare::run(&args.compare),
        Some(BenchCommand::Tls(a)) => compare::run(a),
        Some(BenchCommand::Xsk(a)) => xsk::run(a),
        Some(BenchCommand::Tcp(a)) => tcp::run(a),
        Some(BenchCommand::Million(a)) => million::run(a),
        Some(BenchCommand::Flood(a)) => flood::run(a),
    }
}
