//! Makes sure the machine has what `cargo xtask run` / `test` need, installing what is missing.
//!
//! Owns: rustup components (`rustfmt` and `clippy` on stable; `rust-src`, `rustfmt` and
//! `clippy` on nightly, which the eBPF crate is built, formatted and linted with) and the
//! Debian packages the rig and the end-to-end tests call (`ip`, `ping`, `curl`, `openssl`, CA certificates, procps) and
//! `g++` for libFuzzer, plus `promtool` for `cargo xtask test` only.
//! Idempotent and quick when everything is there: only queries, no network. When something is
//! missing it runs `apt-get update` once and `apt-get install -y --no-install-recommends`,
//! non-interactively (CI runs as root with no stdin). bpf-linker is not here: userspace/build.rs
//! installs it next to the eBPF build that needs it.
//!
//! On a fresh machine another apt (unattended-upgrades, cloud-init) often holds apt's or
//! dpkg's lock for a few minutes: [`run_apt`] waits for it, up to [`APT_LOCK_WAIT`], saying
//! so, instead of failing.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long an apt-get step waits for another apt or dpkg to release its locks.
pub const APT_LOCK_WAIT: Duration = Duration::from_secs(600);
/// Pause between attempts while a lock apt-get does not wait for itself is held.
const APT_RETRY: Duration = Duration::from_secs(2);
/// While waiting, how often to say so again.
const APT_WAIT_REPORT: Duration = Duration::from_secs(30);

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

/// Debian packages only the tests call, installed by `cargo xtask test` and not by `run`:
/// `prometheus` for `promtool check metrics` (tests/tests/metrics.rs). Debian ships promtool
/// only in it; the Prometheus server it also brings is started by systemd where systemd runs
/// (a CI container has none), which is why `run` does not install it. `redis-server` for the
/// session cache's Redis backend (tests/tests/session_cache.rs starts its own, in the test's
/// namespace; the packaged service is not used); `testssl.sh` for the external TLS audit
/// (tests/tests/audit.rs).
const TEST_PACKAGES: &[&str] = &["prometheus", "redis-server", "testssl.sh"];

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
    ensure_packages(PACKAGES)?;
    Ok(())
}

/// [`ensure`], plus what only the tests need ([`TEST_PACKAGES`]).
pub fn ensure_for_tests() -> Result<()> {
    ensure_components()?;
    ensure_packages(&[PACKAGES, TEST_PACKAGES].concat())?;
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
/// Run it with [`run_apt`], which waits for locks other apt processes hold.
fn apt(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    // apt-get waits this long for the dpkg lock itself (apt >= 1.9.11; older ones ignore it),
    // printing `Waiting for cache lock: ... held by process N` on stdout once a second.
    cmd.arg("-o")
        .arg(format!("DPkg::Lock::Timeout={}", APT_LOCK_WAIT.as_secs()))
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_LISTCHANGES_FRONTEND", "none")
        .env("NEEDRESTART_MODE", "l")
        .stdin(Stdio::null());
    cmd
}

/// Whether apt-get's stderr says it failed on a lock someone else holds. DPkg::Lock::Timeout
/// does not cover every lock: `apt-get update` in apt 2.6 (Debian 12) fails at once on
/// `/var/lib/apt/lists/lock`, and the download step's `/var/cache/apt/archives/lock` is the
/// same.
fn is_lock_failure(stderr: &str) -> bool {
    stderr.contains("Could not get lock")
        || stderr.contains("Unable to lock")
        || stderr.contains("Unable to acquire the dpkg frontend lock")
}

/// Runs `apt-get ARGS` to success, waiting for locks other apt or dpkg processes hold.
///
/// apt-get waits for the dpkg lock itself and says so on stdout; those lines are shown (the
/// first, then one every [`APT_WAIT_REPORT`]) also when `quiet`. A failure on a lock apt-get
/// does not wait for is retried every [`APT_RETRY`] until [`APT_LOCK_WAIT`] has passed since
/// the first one, with a message naming the lock and its holder (apt's own words). A lock
/// failure happens before apt changes anything, so a retry is safe. The rest of apt-get's
/// stdout is shown unless `quiet`; its stderr is shown when it fails for good.
pub fn run_apt(args: &[&str], quiet: bool) -> Result<()> {
    let mut waiting_since: Option<Instant> = None;
    let mut reported: Option<Instant> = None;
    loop {
        let mut cmd = apt(args);
        let line = crate::display(&cmd);
        if !quiet && waiting_since.is_none() {
            eprintln!("xtask: $ {line}");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run `{line}`"))?;
        // Drained on a thread of its own so that neither pipe can fill and stall apt-get.
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
                text
            })
        });
        // While waiting, each retry's output is held back and shown only if that attempt
        // is not retried, so a wait prints a line per report, not per attempt.
        let live = !quiet && waiting_since.is_none();
        let mut held = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            for out_line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(out_line) = out_line else { break };
                if out_line.starts_with("Waiting for cache lock") {
                    if reported.is_none_or(|t| t.elapsed() >= APT_WAIT_REPORT) {
                        eprintln!(
                            "xtask: apt-get waits (at most {} s): {out_line}",
                            APT_LOCK_WAIT.as_secs()
                        );
                        reported = Some(Instant::now());
                    }
                } else if live {
                    println!("{out_line}");
                } else if !quiet {
                    held.push(out_line);
                }
            }
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{line}`"))?;
        let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
        let retry = !status.success()
            && is_lock_failure(&stderr)
            && waiting_since.is_none_or(|since| since.elapsed() < APT_LOCK_WAIT);
        if !retry {
            for out_line in held {
                println!("{out_line}");
            }
        }
        if status.success() {
            if let Some(since) = waiting_since {
                eprintln!(
                    "xtask: the apt lock was released after {} s",
                    since.elapsed().as_secs()
                );
            }
            return Ok(());
        }
        if !retry {
            bail!("`{line}` failed ({status}):\n{}", stderr.trim());
        }
        let since = *waiting_since.get_or_insert_with(Instant::now);
        if reported.is_none_or(|t| t.elapsed() >= APT_WAIT_REPORT) {
            let holder = stderr
                .lines()
                .find(|l| l.contains("Could not get lock"))
                .unwrap_or("another apt or dpkg holds its lock")
                .trim_start_matches("E: ");
            eprintln!(
                "xtask: waiting for another apt/dpkg to finish ({holder}); {} s so far, at \
                 most {} s",
                since.elapsed().as_secs(),
                APT_LOCK_WAIT.as_secs()
            );
            reported = Some(Instant::now());
        }
        std::thread::sleep(APT_RETRY);
    }
}

fn ensure_packages(packages: &[&str]) -> Result<()> {
    if Command::new("dpkg-query")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "xtask: not a Debian-based system; make sure these are installed: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    let mut missing = Vec::new();
    for package in packages {
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
    run_apt(&["update", "-q"], false)?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    run_apt(&install, false)?;
    for package in &missing {
        if !installed(package) {
            bail!("{package} is still not installed after apt-get install");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_lock_failure;

    #[test]
    fn lock_failures_are_told_from_other_failures() {
        // apt 2.6's words (Debian 12), for `update` and for `install`.
        assert!(is_lock_failure(
            "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 5277 \
             (python3)\nE: Unable to lock directory /var/lib/apt/lists/"
        ));
        assert!(is_lock_failure(
            "E: Could not get lock /var/lib/dpkg/lock-frontend - open (11: Resource \
             temporarily unavailable)\nE: Unable to acquire the dpkg frontend lock \
             (/var/lib/dpkg/lock-frontend), is another process using it?"
        ));
        assert!(!is_lock_failure(
            "E: Unable to locate package no-such-package"
        ));
        assert!(!is_lock_failure(
            "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease"
        ));
    }
}
