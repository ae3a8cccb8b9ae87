//! Least privilege, end to end: tern started as root with `[process] user = "nobody"` runs
//! every thread as nobody with no capability and `NoNewPrivs` once it is ready — on the kernel
//! path and on the bypass path (XDP, AF_XDP, tern's TCP stack) — and still proxies TLS,
//! answers `tern ctl stats`, reads its XDP counters and updates its blocklist (BPF maps through
//! the fds it opened as root), and reloads its configuration (re-reading the key as nobody).
//! With `NOTIFY_SOCKET` set, systemd's protocol sees `READY=1` once tern serves,
//! `RELOADING=1`/`READY=1` around the reload and `STOPPING=1` when SIGTERM starts the drain
//! (sent after the switch).
//!
//! tern starts as root holding only the capabilities dist/tern.service's
//! `CapabilityBoundingSet=` allows (through `setpriv`), so set-up is checked to need no more.
//! The files tern may re-read after the switch (configuration, certificate, key) are made
//! readable by nobody, as docs/operations.md asks of an operator. Each test has its own rig.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernOptions, TernProcess};

/// The user the tests switch to: present on every Debian system.
const USER: &str = "nobody";
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// The bypass listener's port (the kernel listener on :443 attaches XDP and answers the
/// readiness probe).
const BYPASS_PORT: u16 = 4443;
/// Generous bound for the drain after SIGTERM on a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DataPath {
    Kernel,
    Bypass,
}

/// tern as nobody on its own rig, with a demo HTTP backend and a notify socket.
struct Dropped {
    stack: Stack,
    _backend: Backend,
    notify: UnixDatagram,
    path: DataPath,
}

/// Lets `nobody` read `path` (and traverse to it): 0755 directories, 0644 files.
#[track_caller]
fn world_readable(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The capabilities dist/tern.service allows (`CapabilityBoundingSet=`), as setpriv's
/// `--bounding-set` argument (`-all,+net_admin,...`).
#[track_caller]
fn unit_bounding_set() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/tern.service");
    let text =
        std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("read {}: {e}", unit.display()));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("no CapabilityBoundingSet= in {}", unit.display()));
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| {
            let name = c
                .strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{c}: not a capability name"));
            format!("+{}", name.to_ascii_lowercase())
        })
        .collect();
    assert!(!caps.is_empty(), "the unit allows some capability");
    format!("-all,{}", caps.join(","))
}

/// A script in `dir` that starts tern as root holding only `caps` (setpriv's syntax; the
/// tests pass [`unit_bounding_set`]) (root's capabilities after `exec` are the bounding set, as under systemd), so the
/// tests also check that the unit's capability list is enough for set-up. It `exec`s, so
/// tern keeps the PID the harness knows.
#[track_caller]
fn capped_tern(dir: &TempDir, caps: &str) -> std::path::PathBuf {
    let script = dir.join("tern-capped");
    let text = format!(
        "#!/bin/sh\nexec setpriv --bounding-set {caps} --inh-caps -all -- {tern} \"$@\"\n",
        tern = tern_binary().display(),
    );
    std::fs::write(&script, text).expect("write the wrapper");
    world_readable(&script, 0o755);
    script
}

/// Checks, as nobody, that `file` can be read (what a reload after the switch needs).
#[track_caller]
fn readable_by_nobody(file: &Path) {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            USER,
            "--regid",
            "nogroup",
            "--clear-groups",
            "--",
        ])
        .arg("cat")
        .arg(file)
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "{} is readable by {USER}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Dropped {
    /// Starts tern with the unit's capabilities and waits until it accepts.
    #[track_caller]
    fn start(path: DataPath, tag: &str) -> Dropped {
        let mut d = Dropped::launch(path, tag, &unit_bounding_set());
        let addr = d.stack.rig.server_addr(443);
        d.stack.tern.wait_ready(addr);
        d
    }

    /// Starts tern as root holding only `caps`, without waiting for it.
    #[track_caller]
    fn launch(path: DataPath, tag: &str, caps: &str) -> Dropped {
        let queues = match path {
            DataPath::Kernel => 1,
            DataPath::Bypass => 2,
        };
        let rig = Rig::isolated(tag, queues);
        let dir = TempDir::new(tag);
        world_readable(dir.path(), 0o755);
        let backend = Backend::demo_http(server_listener(&rig));
        let cert: CertFiles = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        // As docs/operations.md advises: owned by root (who reads it at start-up, without
        // needing CAP_DAC_OVERRIDE), readable by the group of the user tern switches to.
        std::os::unix::fs::chown(&cert.key, Some(0), Some(NOGROUP)).expect("chown key");
        world_readable(&cert.key, 0o640);
        world_readable(&cert.cert, 0o644);
        readable_by_nobody(&cert.key);
        let control = dir.join("tern.sock");
        let notify_path = dir.join("notify");
        let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        // tern sends STOPPING=1 as nobody.
        world_readable(&notify_path, 0o666);
        notify
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let listeners = match path {
            DataPath::Kernel => format!("[[listener]]\naddress = \"{}\"\n", rig.server_addr(443)),
            DataPath::Bypass => format!(
                "[[listener]]\naddress = \"{k}\"\ninterface = \"{i}\"\n\n\
                 [[listener]]\naddress = \"{b}\"\nmode = \"bypass\"\ninterface = \"{i}\"\n\n\
                 [xdp]\nhugepages = \"off\"\nframes_per_worker = 4096\n",
                k = rig.server_addr(443),
                b = rig.server_addr(BYPASS_PORT),
                i = rig.server_if,
            ),
        };
        let config = format!(
            "{listeners}\n\
             [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\ndefault = true\n\n\
             [tls]\nalpn = [\"http/1.1\"]\n\n\
             [backend]\nservers = [\"{backend}\"]\nconnect_timeout_ms = 2000\n\n\
             [workers]\ncount = 2\n\n[control]\nsocket = \"{control}\"\n\n\
             [limits]\nmax_connections_per_worker = 256\n\n\
             [process]\nuser = \"{USER}\"\n",
            cert = cert.cert.display(),
            key = cert.key.display(),
            backend = backend.addr(),
            control = control.display(),
        );
        let tern = TernProcess::start_with(
            &config,
            TernOptions {
                netns: rig.server_netns(),
                binary: Some(capped_tern(&dir, caps)),
                env: vec![(
                    "NOTIFY_SOCKET".into(),
                    notify_path.to_str().expect("UTF-8 path").into(),
                )],
                ..TernOptions::default()
            },
        );
        world_readable(tern.dir(), 0o755);
        world_readable(tern.config_path(), 0o644);
        Dropped {
            stack: Stack {
                tern,
                cert,
                dir,
                control,
                rig,
            },
            _backend: backend,
            notify,
            path,
        }
    }

    /// The next notification tern sent, within 30 s.
    #[track_caller]
    fn notification(&self) -> String {
        let mut buf = [0u8; 1024];
        let n = self
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("a notification: {e}\n{}", self.stack.log()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// curl through TLS to the listener under test; the demo backend's greeting comes back.
    #[track_caller]
    fn curl_ok(&self) {
        let out = self.curl();
        assert_ok(&out, "curl through tern", &self.stack.log());
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.contains("hello from tern demo backend"),
            "unexpected body: {body}"
        );
    }

    fn curl(&self) -> Output {
        let port = match self.path {
            DataPath::Kernel => 443,
            DataPath::Bypass => BYPASS_PORT,
        };
        let resolve = format!("{NAME}:{port}:{}", self.stack.rig.server_ip);
        self.stack
            .rig
            .client_command("curl")
            .args(["-sS", "--http1.1", "--cacert"])
            .arg(&self.stack.cert.cert)
            .args(["--resolve", &resolve, "--max-time", "20"])
            .arg(format!("https://{NAME}:{port}/"))
            .output()
            .expect("run curl")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.stack.control)
            .args(args)
            .output()
            .expect("tern ctl")
    }
}

/// One thread's identity from `/proc/PID/task/TID/status`.
#[derive(Debug)]
struct ThreadIds {
    name: String,
    uid: String,
    gid: String,
    groups: String,
    cap_prm: String,
    cap_eff: String,
    no_new_privs: String,
}

#[track_caller]
fn threads_of(pid: u32) -> Vec<ThreadIds> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for task in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = task.expect("task entry").path().join("status");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // a thread that just ended
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| panic!("no {name} in {}", path.display()))
        };
        out.push(ThreadIds {
            name: field("Name:"),
            uid: field("Uid:"),
            gid: field("Gid:"),
            groups: field("Groups:"),
            cap_prm: field("CapPrm:"),
            cap_eff: field("CapEff:"),
            no_new_privs: field("NoNewPrivs:"),
        });
    }
    out
}

/// Every thread runs as nobody:nogroup (real, effective, saved, filesystem), in no other
/// group, with no capability and `NoNewPrivs`; the workers are among them.
#[track_caller]
fn assert_every_thread_dropped(d: &Dropped) {
    let worker = match d.path {
        DataPath::Kernel => "tern-w",
        DataPath::Bypass => "tern-x",
    };
    let expected = [worker, "tern-control", "tern-signals"];
    // A spawned thread names itself once it first runs (std sets the name from inside the new
    // thread), so on a loaded machine a thread may still show the process's name for a moment
    // after start-up: read again until every expected name is there, or the deadline passes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let threads = loop {
        let threads = threads_of(d.stack.tern.pid());
        let named = expected
            .iter()
            .all(|name| threads.iter().any(|t| t.name.starts_with(name)));
        if named || Instant::now() >= deadline {
            break threads;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ids = format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY}");
    let gids = format!("{NOGROUP} {NOGROUP} {NOGROUP} {NOGROUP}");
    for t in &threads {
        assert_eq!(t.uid, ids, "uid of {t:?}");
        assert_eq!(t.gid, gids, "gid of {t:?}");
        assert_eq!(t.groups, NOGROUP.to_string(), "groups of {t:?}");
        assert_eq!(t.cap_prm, "0000000000000000", "permitted caps of {t:?}");
        assert_eq!(t.cap_eff, "0000000000000000", "effective caps of {t:?}");
        assert_eq!(t.no_new_privs, "1", "no_new_privs of {t:?}");
    }
    let names: Vec<&str> = threads.iter().map(|t| t.name.as_str()).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n.starts_with(name)),
            "a {name}* thread among {names:?}"
        );
    }
}

/// READY=1 came first; SIGTERM gives STOPPING=1 and a clean exit, with nothing that needed
/// root failing on the way out (XDP detach).
#[track_caller]
/// A reload after the switch: tern, now nobody, re-reads the configuration and the key (which
/// nobody can read, as operations.md advises), tells systemd RELOADING=1 then READY=1, and
/// serves on.
fn reload_as_nobody(d: &Dropped) {
    let out = d.ctl(&["reload"]);
    assert_ok(&out, "tern ctl reload as nobody", &d.stack.log());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("ok: generation 2 (nothing changed)"),
        "{text}"
    );
    let reloading = d.notification();
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1")
            && reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 with MONOTONIC_USEC: {reloading:?}"
    );
    let ready = d.notification();
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "READY=1 after the reload: {ready:?}"
    );
    d.curl_ok();
}

fn stop_and_check(mut d: Dropped, ready: &str) {
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "READY=1 first: {ready:?}"
    );
    d.stack.tern.signal(libc::SIGTERM);
    let stopping = d.notification();
    assert!(
        stopping.lines().any(|l| l == "STOPPING=1"),
        "STOPPING=1 after SIGTERM: {stopping:?}"
    );
    d.stack.expect_clean_exit(EXIT_WITHIN, "SIGTERM as nobody");
    let log = d.stack.log();
    assert!(log.contains("switched user"), "{log}");
    assert!(!log.contains("keeps running as root"), "{log}");
    assert!(!log.contains("detaching XDP failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn kernel_path_runs_as_nobody_without_capabilities() {
    let d = Dropped::start(DataPath::Kernel, "privk");
    let ready = d.notification();
    assert_every_thread_dropped(&d);
    for _ in 0..3 {
        d.curl_ok();
    }
    let total = d.stack.total("handshakes");
    assert!(total >= 3, "three handshakes counted: {total}");
    // Still nobody after serving (no thread was started as root later).
    assert_every_thread_dropped(&d);
    reload_as_nobody(&d);
    stop_and_check(d, &ready);
}

#[test]
fn bypass_path_runs_as_nobody_without_capabilities() {
    let d = Dropped::start(DataPath::Bypass, "privb");
    let ready = d.notification();
    assert_every_thread_dropped(&d);
    // The bypass listener comes up with its workers, before READY; a few tries cover the
    // client's first ARP exchange on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.curl().status.success() {
        assert!(
            Instant::now() < deadline,
            "bypass listener serves\n{}",
            d.stack.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.curl_ok();
    let st = d.stack.stats();
    assert!(
        st["bypass"]["proxy"]["handshakes"].as_u64().unwrap_or(0) >= 2,
        "bypass handshakes counted: {st}"
    );
    // XDP counters are read through the map fds opened as root.
    let xdp = &st["xdp"][0];
    assert!(xdp["error"].is_null(), "XDP counters readable: {xdp}");
    assert!(
        xdp["counters"]["steered"].as_u64().unwrap_or(0) > 0,
        "steered frames counted: {xdp}"
    );

    // The blocklist map is written through its fd: the client's address is dropped at XDP,
    // then let through again.
    let client = format!("{}/32", d.stack.rig.client_ip);
    let out = d.ctl(&["block", &client]);
    assert_ok(&out, "tern ctl block as nobody", &d.stack.log());
    let out = d.ctl(&["blocks"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), client);
    let resolve = format!("{NAME}:{BYPASS_PORT}:{}", d.stack.rig.server_ip);
    let blocked = d
        .stack
        .rig
        .client_command("curl")
        .args(["-sS", "--cacert"])
        .arg(&d.stack.cert.cert)
        .args(["--resolve", &resolve, "--connect-timeout", "2"])
        .arg(format!("https://{NAME}:{BYPASS_PORT}/"))
        .output()
        .expect("run curl");
    assert!(!blocked.status.success(), "a blocked client gets nothing");
    let st = d.stack.stats();
    assert!(
        st["xdp"][0]["counters"]["blocked"].as_u64().unwrap_or(0) > 0,
        "blocked frames counted: {st}"
    );
    let out = d.ctl(&["unblock", &client]);
    assert_ok(&out, "tern ctl unblock as nobody", &d.stack.log());
    d.curl_ok();

    assert_every_thread_dropped(&d);
    reload_as_nobody(&d);
    stop_and_check(d, &ready);
}

/// Without CAP_SETUID the switch fails after set-up: tern exits 1 having released everything
/// (the control socket is gone) and never told systemd it was ready.
#[test]
fn a_failed_switch_is_a_failed_start_up() {
    let caps = unit_bounding_set().replace(",+setuid", "");
    let mut d = Dropped::launch(DataPath::Kernel, "privfail", &caps);
    let Some(status) = d.stack.tern.wait_exit(EXIT_WITHIN) else {
        panic!("tern still runs without CAP_SETUID\n{}", d.stack.log());
    };
    let log = d.stack.log();
    assert_eq!(
        status.code(),
        Some(1),
        "a start-up failure: {status}\n{log}"
    );
    assert!(
        log.contains("switching to [process] user") && log.contains("setresuid(65534)"),
        "the error names the step: {log}"
    );
    assert!(!log.contains("tern ready"), "{log}");
    assert!(
        !d.stack.control.exists(),
        "the control socket was removed: {}",
        d.stack.control.display()
    );
    d.notify.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1024];
    while let Ok(n) = d.notify.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !text.lines().any(|l| l == "READY=1"),
            "no READY=1: {text:?}"
        );
    }
}
