//! `cargo xtask`: the one entry point for running tern's workflows (alias in
//! `.cargo/config.toml`).
//!
//! - `cargo xtask run [--mode kernel|xdp] [--workers N] [--release]`: builds tern, puts a client
//!   namespace on a veth pair to the host, starts the demo backend and tern with self-signed
//!   certificates, prints the commands to try, and tears everything down on Ctrl-C or failure
//!   ([`run`]).
//! - `cargo xtask test`: fmt check, clippy with `-D warnings`, build, unit and end-to-end tests;
//!   what `.ci/run` runs ([`test`]).
//! - `cargo xtask bench [--quick] [--targets …] [--runs N] [--update-docs]`: tern against hitch,
//!   haproxy and nginx on the veth rig, CPU per operation, crypto floors, plots ([`bench`]).
//!
//! Both start by making sure the machine has what they need ([`prereqs`]). This crate owns
//! orchestration only: the rig, certificates and backends are `tern_tests`' (shared with the
//! end-to-end tests), building the eBPF object is `userspace/build.rs`'s.

mod bench;
mod prereqs;
mod run;
mod test;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "tern's task runner")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run tern in front of the demo backend on a veth rig until Ctrl-C.
    Run(run::RunArgs),
    /// fmt check, clippy -D warnings, build, unit and end-to-end tests (what CI runs).
    Test,
    /// Benchmarks on the veth rig: tern vs hitch, haproxy and nginx (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
}

/// tern's listener mode, as in the config file's `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Kernel sockets (io_uring).
    Kernel,
    /// The bypass path too: the XDP program on the server-side veth and bypass listeners
    /// served by tern's own TCP stack (`xdp` is accepted as its old name).
    #[value(alias = "xdp")]
    Bypass,
}

impl Mode {
    /// The config-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Bypass => "bypass",
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Run(args) => run::run(&args),
        Task::Test => test::test(),
        Task::Bench(args) => bench::bench(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
}

/// Cargo's target directory: xtask itself runs from `<target>/<profile>/xtask`, which holds for
/// any `CARGO_TARGET_DIR` or `build.target-dir` setting.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("cannot derive the target dir from {}", exe.display()))
}

/// `cargo` (the rustup proxy on PATH, so `+nightly` works) in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// A command line for messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
