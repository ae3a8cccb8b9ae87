//! The bench's own prerequisites: the peer servers and tools from Debian, installed when
//! missing, and the version of everything that ends up in the report.
//!
//! Owns: the package list for the selected targets (hitch; haproxy; nginx + libnginx-mod-stream,
//! which is also the backend; nghttp2-client for h2load; openssl; util-linux for taskset;
//! linux-perf optionally, for profiling by hand), one `apt-get update` and one
//! `apt-get install -y --no-install-recommends` for whatever is missing, non-interactively, and
//! `--version` probes. `cargo xtask test` never calls this: the tests do not need the peers.
//!
//! Debian's nginx/haproxy/hitch packages would start their system services from postinst on a
//! machine with an init system; the bench does not rely on or touch those (its own instances
//! listen only inside the rig's network namespaces, on their own config files).

use crate::prereqs::{installed, run_apt};
use anyhow::{bail, Result};
use std::process::{Command, Stdio};

/// Packages every bench run needs, whatever the targets.
const ALWAYS: &[&str] = &[
    "nginx",
    "libnginx-mod-stream",
    "nghttp2-client",
    "openssl",
    "util-linux",
];
/// Installed when available, never required (`perf record` by hand on a target).
const OPTIONAL: &[&str] = &["linux-perf"];

/// Installs the missing ones of `required` (an error if that fails) and of [`OPTIONAL`] (a
/// warning). Returns what was installed, for the log.
pub fn ensure(required: &[&str], log: &mut dyn FnMut(String)) -> Result<Vec<String>> {
    if Command::new("dpkg-query")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        log(format!(
            "not a Debian-based system: make sure these are installed: {}",
            required.join(" ")
        ));
        return Ok(Vec::new());
    }
    let mut wanted: Vec<&str> = ALWAYS.to_vec();
    wanted.extend_from_slice(required);
    wanted.sort_unstable();
    wanted.dedup();
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !installed(p)).collect();
    let optional: Vec<&str> = OPTIONAL.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() && optional.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if !missing.is_empty() && unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages: {0}; install them with \
             `sudo apt-get install -y --no-install-recommends {0}`",
            missing.join(" ")
        );
    }
    log(format!(
        "installing {} (apt-get update, then apt-get install)",
        missing
            .iter()
            .chain(&optional)
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    ));
    run_apt(&["update", "-q"], true)?;
    let mut done = Vec::new();
    if !missing.is_empty() {
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(&missing);
        run_apt(&install, true)?;
        for p in &missing {
            if !installed(p) {
                bail!("{p} is still not installed after apt-get install");
            }
            done.push((*p).to_owned());
        }
    }
    for p in optional {
        match run_apt(&["install", "-y", "-q", "--no-install-recommends", p], true) {
            Ok(()) => done.push(p.to_owned()),
            Err(e) => log(format!("optional package {p} not installed: {e:#}")),
        }
    }
    Ok(done)
}

/// The first line of `program args…`'s output (stdout, else stderr), trimmed; `None` if the
/// program cannot run.
pub fn version_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
        out.stdout
    } else {
        out.stderr
    };
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// The installed Debian version of a package, e.g. `2.6.12-1+deb12u4`.
pub fn package_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !v.is_empty()).then_some(v)
}
