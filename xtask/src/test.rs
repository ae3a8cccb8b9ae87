//! `cargo xtask test`: every check CI runs, in order, stopping at the first failure.
//!
//! Steps: prerequisites, `cargo fmt --all -- --check`, `cargo +nightly fmt --check` in
//! `xdp-ebpf/` (its own nightly workspace, if present), `cargo clippy --workspace --all-targets
//! -- -D warnings`, `cargo build -p tern` (the end-to-end tests run the binary, which `cargo
//! test` does not build for another package), `cargo test --workspace`, then a fuzz smoke run:
//! the cargo-fuzz targets in `fuzz/` built with coverage instrumentation on nightly (the flags
//! `cargo fuzz` passes, without needing cargo-fuzz installed) and run for a bounded time each
//! with a fixed seed; a crash fails the step and leaves its input under
//! `target/fuzz-smoke/artifacts/`. Output is streamed as it comes; a summary with each step's
//! time ends the run. Exit status is non-zero if any step failed.

use crate::{cargo, display, prereqs, workspace_root};
use anyhow::{bail, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Outcome {
    name: &'static str,
    took: Duration,
    ok: bool,
}

pub fn test() -> Result<()> {
    let started = Instant::now();
    let mut done: Vec<Outcome> = Vec::new();
    let mut tally = Tally::default();
    let result = run_steps(&mut done, &mut tally);
    eprintln!("\nxtask test summary:");
    for o in &done {
        eprintln!(
            "  {:<6} {:<28} {:>8.1}s",
            if o.ok { "ok" } else { "FAILED" },
            o.name,
            o.took.as_secs_f64()
        );
    }
    match &result {
        Ok(()) => eprintln!(
            "xtask test: all {} steps succeeded in {:.1}s",
            done.len(),
            started.elapsed().as_secs_f64()
        ),
        Err(_) => eprintln!(
            "xtask test: stopped at the first failing step after {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    }
    if tally.ran {
        // The closing line CI reads: totals over every test binary.
        println!(
            "tests: {} passed, {} failed, {} skipped",
            tally.passed, tally.failed, tally.ignored
        );
    }
    result
}

fn run_steps(done: &mut Vec<Outcome>, tally: &mut Tally) -> Result<()> {
    step(done, "prerequisites", None, prereqs::ensure_for_tests)?;

    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    command_step(done, "fmt (workspace)", fmt)?;

    let ebpf = workspace_root().join("xdp-ebpf");
    if ebpf.join("Cargo.toml").is_file() {
        // No `--all`: that also formats path dependencies (common/ and, through its
        // workspace, the root crates), which the stable step above owns.
        let mut fmt = Command::new("cargo");
        fmt.current_dir(&ebpf)
            .args(["+nightly", "fmt", "--", "--check"]);
        command_step(done, "fmt (xdp-ebpf, nightly)", fmt)?;

        // The eBPF crate is outside the workspace, so the clippy step below does not see it.
        // Checking needs no bpf-linker (nothing is linked).
        let mut clippy = Command::new("cargo");
        clippy.current_dir(&ebpf).args([
            "+nightly",
            "clippy",
            "--release",
            "--target-dir",
            "../target/ebpf",
            "--",
            "-D",
            "warnings",
        ]);
        command_step(done, "clippy (xdp-ebpf, nightly)", clippy)?;
    }

    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    command_step(done, "clippy -D warnings", clippy)?;

    let mut build = cargo();
    build.args(["build", "-p", "tern"]);
    command_step(done, "build tern", build)?;

    // --lib --bins --tests: every unit and integration test; there are no doc tests, and
    // their empty "0 passed" pass would otherwise close the log.
    let mut tests = cargo();
    tests.args(["test", "--workspace", "--lib", "--bins", "--tests"]);
    let line = display(&tests);
    tally.ran = true;
    let result = step(done, "test --workspace", Some(&line), || {
        let status = run_tallied(&mut tests, tally)?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(())
    });
    result?;
    if tally.passed == 0 {
        bail!("no test ran");
    }
    fuzz_smoke(done)
}

/// The fuzz targets, how long each runs in `cargo xtask test` (seconds) and the step's name.
const FUZZ_SMOKE: &[(&str, u32, &str)] = &[
    ("stack_frames", 60, "fuzz smoke: stack_frames (60 s)"),
    ("wire_parse", 20, "fuzz smoke: wire_parse (20 s)"),
    ("driver_conn", 30, "fuzz smoke: driver_conn (30 s)"),
];
/// What `cargo fuzz build` passes to rustc (SanitizerCoverage for libFuzzer, `cfg(fuzzing)`),
/// plus the debug assertions and overflow checks the stack's invariants rely on.
const FUZZ_RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";
const FUZZ_TARGET: &str = "x86_64-unknown-linux-gnu";

fn fuzz_smoke(done: &mut Vec<Outcome>) -> Result<()> {
    let root = workspace_root();
    let fuzz = root.join("fuzz");
    if !fuzz.join("Cargo.toml").is_file() {
        return Ok(());
    }
    let target_dir = root.join("target/fuzz-smoke");
    let mut build = Command::new("cargo");
    // An explicit --target keeps the instrumentation off build scripts, as cargo-fuzz does.
    build
        .current_dir(&fuzz)
        .env("RUSTFLAGS", FUZZ_RUSTFLAGS)
        .args(["+nightly", "build", "--release", "--target", FUZZ_TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    for (name, _, _) in FUZZ_SMOKE {
        build.args(["--bin", name]);
    }
    command_step(done, "fuzz smoke: build (nightly, instrumented)", build)?;
    let artifacts = target_dir.join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    for &(name, seconds, step_name) in FUZZ_SMOKE {
        let mut run = Command::new(target_dir.join(FUZZ_TARGET).join("release").join(name));
        run.arg(format!("-max_total_time={seconds}"))
            .arg("-seed=1")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/{name}-", artifacts.display()));
        command_step(done, step_name, run)?;
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    /// The test step started (so the totals mean something).
    ran: bool,
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cmd`, echoing its stdout line by line and adding up libtest's
/// `test result: ok. N passed; N failed; N ignored; ...` lines.
fn run_tallied(cmd: &mut Command, tally: &mut Tally) -> Result<std::process::ExitStatus> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match kind {
                    "passed" => tally.passed += n,
                    "failed" => tally.failed += n,
                    "ignored" => tally.ignored += n,
                    _ => {}
                }
            }
        }
    }
    Ok(child.wait()?)
}

/// Runs `cmd` with inherited stdout/stderr (streamed) and no stdin.
fn command_step(done: &mut Vec<Outcome>, name: &'static str, mut cmd: Command) -> Result<()> {
    let line = display(&cmd);
    step(done, name, Some(&line), || {
        let status = cmd.stdin(Stdio::null()).status()?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(())
    })
}

fn step(
    done: &mut Vec<Outcome>,
    name: &'static str,
    line: Option<&str>,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    match line {
        Some(line) => eprintln!("\n==> {name}: {line}"),
        None => eprintln!("\n==> {name}"),
    }
    let started = Instant::now();
    let result = f();
    done.push(Outcome {
        name,
        took: started.elapsed(),
        ok: result.is_ok(),
    });
    result
}
