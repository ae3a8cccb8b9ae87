//! Makes sure the machine has what `cargo xtask run` / `test` need, installing what is missing.
//!
//! Owns: rustup components (`rustfmt` and `clippy` on stable; `rust-src`, `rustfmt` and
//! `clippy` on nightly, which the eBPF crate is built, formatted and linted with) and the
//! Debian packages the rig and the end-to-end tests call (`ip`, `ping`, `curl`, `openssl`, CA certificates, procps) and
//! `g++` for libFuzzer.
//! Idempotent and quick when everything is there: only queries, no network. When something is
//! missing it runs `apt-get update` once and `apt-get install -y --no-install-recommends`,
//! non-interactively (CI runs as root with no stdin). bpf-linker is not here: userspace/build.rs
//! installs it next to the eBPF build that needs it.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// Debian packages the rig, the tests and `cargo xtask run` call.
const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "curl",
    "openssl",
    "ca-certificates",
    "procps",
    // libFuzzer (built by libfuzzer-sys for the fuzz smoke step) is C++.
    "g++",
];

/// (toolchain, component) pairs rustup must have.
const COMPONENTS: &[(&str, &str)] = &[
    ("stable", "rustfmt"),
    ("stable", "clippy"),
    ("nightly", "rust-src"),
    ("nightly", "rustfmt"),
    ("nightly", "clippy"),
];

/// Installs whatever is missing; prints one line when all is in place.
pub fn ensure() -> Result<()> {
    ensure_components()?;
    ensure_packages()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", crate::display(cmd)))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", crate::display(cmd));
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{}`", crate::display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", crate::display(cmd));
    }
    Ok(())
}

fn ensure_components() -> Result<()> {
    for toolchain in ["stable", "nightly"] {
        let wanted: Vec<&str> = COMPONENTS
            .iter()
            .filter(|(t, _)| *t == toolchain)
            .map(|(_, c)| *c)
            .collect();
        let listed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .context("rustup is required (https://rustup.rs)")?;
        if !listed.status.success() {
            bail!(
                "the {toolchain} toolchain is not installed (`rustup toolchain install {toolchain}`): {}",
                String::from_utf8_lossy(&listed.stderr).trim()
            );
        }
        let installed = String::from_utf8_lossy(&listed.stdout);
        // Lines look like `rustfmt-x86_64-unknown-linux-gnu` or `rust-src`.
        let has = |c: &str| {
            installed
                .lines()
                .any(|l| l == c || l.strip_prefix(c).is_some_and(|r| r.starts_with('-')))
        };
        let missing: Vec<&str> = wanted.into_iter().filter(|c| !has(c)).collect();
        if !missing.is_empty() {
            run(Command::new("rustup")
                .args(["component", "add", "--toolchain", toolchain])
                .args(&missing))?;
        }
    }
    Ok(())
}

/// Whether Debian package `package` is installed (false when dpkg-query cannot tell).
pub fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && o.stdout == b"installed")
        .unwrap_or(false)
}

/// `apt-get ARGS`, non-interactive (no prompts, no list-changes pager, no restart dialogs).
pub fn apt(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_LISTCHANGES_FRONTEND", "none")
        .env("NEEDRESTART_MODE", "l")
        .stdin(Stdio::null());
    cmd
}

fn ensure_packages() -> Result<()> {
    if Command::new("dpkg-query")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "xtask: not a Debian-based system; make sure these are installed: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    let mut missing = Vec::new();
    for package in PACKAGES {
        if !installed(package) {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages: {0}; install them with \
             `sudo apt-get install -y --no-install-recommends {0}` (xtask also needs root for \
             network namespaces)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing missing packages: {}", missing.join(" "));
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)?;
    for package in &missing {
        if !installed(package) {
            bail!("{package} is still not installed after apt-get install");
        }
    }
    Ok(())
}
