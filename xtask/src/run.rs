//! `cargo xtask run`: tern in front of the demo backend on a veth rig, until Ctrl-C.
//!
//! Owns the demo session: build tern, create `Rig::host` (client namespace ↔ veth ↔ host),
//! write two self-signed certificates (ECDSA `tern.test`, the default, and RSA `other.test`)
//! and a tern.toml into a temp dir, start the demo backend on the host's loopback, start tern
//! (kernel mode, or xdp with the program on the server-side veth), wait until it accepts, print
//! what to try, then wait for SIGINT/SIGTERM/SIGHUP or for tern to die. Teardown (tern gets
//! SIGTERM, then SIGKILL after a deadline; backend stopped; rig and files removed) is done by
//! the guards' Drop, so it also happens when any step fails or panics.
//!
//! `TERN_BIN=path` skips the build and runs that binary instead (as in the tests).
//!
//! tern runs in its own process group: a terminal's Ctrl-C reaches only xtask, which then
//! drains tern with SIGTERM as an operator would.

use crate::{cargo, display, prereqs, target_dir, Mode};
use anyhow::{anyhow, bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{Rig, TempDir, TernOptions, TernProcess};

/// tern's drain deadline in the generated config.
const DRAIN: Duration = Duration::from_secs(3);
/// How long after SIGTERM xtask waits before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the wait loop looks at the signal flag and at tern.
const POLL: Duration = Duration::from_millis(100);
/// How much of tern's stderr to show when it dies.
const STDERR_TAIL_LINES: usize = 40;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Listener mode: kernel sockets, or xdp (also attaches the XDP program to the veth).
    #[arg(long, value_enum, default_value_t = Mode::Kernel)]
    mode: Mode,
    /// Worker threads, also the veth's queue count [default: available CPUs].
    #[arg(long)]
    workers: Option<u32>,
    /// Build and run tern with the release profile.
    #[arg(long)]
    release: bool,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted))
            .with_context(|| format!("cannot handle signal {sig}"))?;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask run needs root (it creates a network namespace and a veth pair)");
    }
    prereqs::ensure()?;
    // TERN_BIN (as for the tests) runs a binary built elsewhere instead of building one.
    let binary = match std::env::var_os("TERN_BIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => build_tern(args.release)?,
    };
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let workers = match args.workers {
        Some(0) => bail!("--workers must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    };
    // The rig and tern code panics (with a message) rather than returning errors; the panic
    // unwinds through `session`, whose guards tear everything down, and becomes an error here.
    // A user needs the message, not a backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("xtask: {info}")));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        session(args.mode, workers, &binary, &interrupted)
    }));
    match outcome {
        Ok(result) => result,
        Err(_) => Err(anyhow!(
            "setting up the demo failed (message above); everything created was removed"
        )),
    }
}

fn build_tern(release: bool) -> Result<std::path::PathBuf> {
    let mut build = cargo();
    build.args(["build", "-p", "tern"]);
    if release {
        build.arg("--release");
    }
    eprintln!("xtask: $ {}", display(&build));
    let status = build.stdin(Stdio::null()).status()?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(&build));
    }
    let binary = target_dir()?
        .join(if release { "release" } else { "debug" })
        .join("tern");
    if !binary.is_file() {
        bail!(
            "the build succeeded but {} does not exist",
            binary.display()
        );
    }
    Ok(binary)
}

/// TOML basic string (quotes and backslashes escaped).
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn path_str(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

fn session(mode: Mode, workers: u32, binary: &Path, interrupted: &AtomicBool) -> Result<()> {
    // Declaration order is teardown order reversed: tern stops first, the rig goes last.
    let rig = Rig::host("run", workers);
    let dir = TempDir::new("run");
    let tern_cert = write_self_signed(dir.path(), "tern.test", &["tern.test"], KeyKind::EcdsaP256);
    let other_cert = write_self_signed(dir.path(), "other.test", &["other.test"], KeyKind::Rsa2048);
    let backend = Backend::demo_http(
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind the demo backend")?,
    );
    let listen: SocketAddr = rig.server_addr(443);
    let socket = dir.join("tern.sock");
    // xdp: the :443 listener stays on kernel sockets with the XDP program attached to the veth
    // (counters, blocklist; and tern's readiness check, which does not cross the veth), and two
    // bypass listeners are served by tern's own TCP stack in the AF_XDP workers, in front of the
    // same demo backend: TLS on BYPASS_TLS_PORT, plain TCP (L4) on BYPASS_PORT.
    let interface = match mode {
        Mode::Kernel => String::new(),
        Mode::Bypass => format!(
            "interface = {iface}\n\n\
             [[listener]]\naddress = {bypass_tls}\nmode = \"bypass\"\ninterface = {iface}\n\n\
             [[listener]]\naddress = {bypass}\nmode = \"bypass\"\ninterface = {iface}\ntls = false\n",
            iface = toml_str(&rig.server_if),
            bypass_tls = toml_str(&rig.server_addr(BYPASS_TLS_PORT).to_string()),
            bypass = toml_str(&rig.server_addr(BYPASS_PORT).to_string()),
        ),
    };
    let config = format!(
        "# Written by `cargo xtask run`; removed when it exits.\n\
         [[listener]]\n\
         address = {listen}\n\
         {interface}\n\
         [[certificate]]\n\
         cert = {tern_cert}\n\
         key = {tern_key}\n\
         default = true\n\n\
         [[certificate]]\n\
         cert = {other_cert}\n\
         key = {other_key}\n\n\
         [tls]\n\
         alpn = [\"http/1.1\"]\n\n\
         [backend]\n\
         servers = [{backend}]\n\n\
         [workers]\n\
         count = {workers}\n\n\
         [timeouts]\n\
         drain_ms = {drain}\n\n\
         [control]\n\
         socket = {socket}\n\n\
         # 4 KiB pages: the demo leaves no hugepages reserved behind it.\n\
         [xdp]\n\
         hugepages = \"off\"\n",
        listen = toml_str(&listen.to_string()),
        tern_cert = path_str(&tern_cert.cert),
        tern_key = path_str(&tern_cert.key),
        other_cert = path_str(&other_cert.cert),
        other_key = path_str(&other_cert.key),
        backend = toml_str(&backend.addr().to_string()),
        drain = DRAIN.as_millis(),
        socket = path_str(&socket),
    );
    let mut tern = TernProcess::start_with(
        &config,
        TernOptions {
            binary: Some(binary.to_path_buf()),
            own_process_group: true,
            ..TernOptions::default()
        },
    );
    tern.wait_ready(listen);

    print_instructions(mode, workers, &rig, &tern, binary, &backend, &socket);

    let result = loop {
        if interrupted.load(Ordering::Relaxed) {
            break Ok(());
        }
        if let Some(status) = tern.try_wait() {
            let text = tern.stderr_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..];
            eprintln!("xtask: tern exited unexpectedly ({status}); its stderr ends with:");
            for line in tail {
                eprintln!("  {line}");
            }
            break Err(anyhow!("tern exited unexpectedly ({status})"));
        }
        std::thread::sleep(POLL);
    };

    eprintln!("\nxtask: stopping tern (SIGTERM, SIGKILL after {STOP_GRACE:?})");
    let status = tern.stop(STOP_GRACE);
    eprintln!("xtask: tern exited ({status})");
    drop(tern);
    drop(backend);
    let (ns, link) = (rig.client.name.clone(), rig.server_if.clone());
    drop(rig);
    drop(dir);
    eprintln!("xtask: removed namespace {ns}, veth {link} and the temp files");
    result
}

fn print_instructions(
    mode: Mode,
    workers: u32,
    rig: &Rig,
    tern: &TernProcess,
    binary: &Path,
    backend: &Backend,
    socket: &Path,
) {
    let ns = &rig.client.name;
    let ip = rig.server_ip;
    // Show the binary relative to the current directory when it is below it (target/debug/tern).
    let bin = std::env::current_dir()
        .ok()
        .and_then(|cwd| binary.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| binary.to_path_buf());
    println!(
        "\ntern is running: {mode} mode, {workers} worker(s), listening on {ip}:443 \
         (veth {server_if} <-> {client_if} in namespace {ns}),\n\
         proxying to the demo backend on {backend}.\n\n\
         Try, from another terminal (as root):\n\
         \x20 ip netns exec {ns} curl -sk --resolve tern.test:443:{ip} https://tern.test/\n\
         \x20 ip netns exec {ns} curl -sk --resolve tern.test:443:{ip} https://tern.test/echo --data-binary 'hello tern'\n\
         \x20 ip netns exec {ns} curl -sk --resolve other.test:443:{ip} https://other.test/bytes/1048576 | sha256sum\n\
         \x20 ip netns exec {ns} openssl s_client -connect {ip}:443 -servername tern.test\n\
         \x20 {bin} ctl --socket {socket} stats\n\
         \x20 {bin} ctl --socket {socket} --format text conns   # open connections per state\n\
         \x20 {bin} ctl --socket {socket} backends\n\
         \x20 {bin} ctl --socket {socket} reload   # after editing the config below (or kill -HUP)\n\n\
         {bypass}\
         tern's log: {log}\n\
         config:     {config}\n\n\
         Press Ctrl-C to stop tern and remove the namespace.",
        mode = mode.as_str(),
        server_if = rig.server_if,
        client_if = rig.client_if,
        backend = backend.addr(),
        bin = bin.display(),
        socket = socket.display(),
        log = tern.stderr_path().display(),
        config = tern.config_path().display(),
        bypass = match mode {
            Mode::Kernel => String::new(),
            Mode::Bypass => format!(
                "The XDP program is attached to {server_if}. The bypass listeners are served by \
                 tern's own TCP stack in the AF_XDP workers\n(the kernel's TCP never sees those \
                 frames), in front of the same HTTP backend: TLS on {ip}:{BYPASS_TLS_PORT}, plain \
                 TCP on {ip}:{BYPASS_PORT}:\n\
                 \x20 ip netns exec {ns} curl -sk --resolve tern.test:{BYPASS_TLS_PORT}:{ip} https://tern.test:{BYPASS_TLS_PORT}/bytes/1048576 | sha256sum\n\
                 \x20 ip netns exec {ns} curl -s http://{ip}:{BYPASS_PORT}/bytes/1048576 | sha256sum\n\
                 \x20 {bin} ctl --socket {socket} stats | grep -A14 '\"tcp\"'\n\
                 \x20 {bin} ctl --socket {socket} block {client}/32   # then curl above times out; unblock to undo\n\n",
                server_if = rig.server_if,
                client = rig.client_ip,
                bin = bin.display(),
                socket = socket.display(),
            ),
        },
    );
}

/// The plain (L4) bypass listener of `--mode bypass`.
const BYPASS_PORT: u16 = 4443;
/// The TLS bypass listener of `--mode bypass`.
const BYPASS_TLS_PORT: u16 = 8443;
