//! End-to-end tests of what tern does when one of its threads fails (docs/operations.md, "When
//! a thread fails"): a panic in a kernel-mode worker, a bypass worker or the control thread, or
//! a worker whose loop returns an error, ends the process at once with exit status 70 and the
//! thread and reason in the log; the XDP program is gone afterwards and the listening ports
//! refuse connections. A failed start-up exits 1 after releasing what it had started.
//!
//! Faults are injected with tern's test-only `TERN_TEST_FAULT` variable (`userspace/src/
//! fault.rs`), which fires once tern is ready.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use support::server_listener;
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernOptions, TernProcess};

/// The bypass (plain L4) listener's port; the kernel TLS listener is on 443.
const BYPASS_PORT: u16 = 4443;
/// How long tern may take to start, fail and exit (a debug build on a loaded 2-core machine).
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// A tern on its own rig, started with some `TERN_TEST_FAULT`.
struct Failing {
    tern: TernProcess,
    control: PathBuf,
    _backend: Backend,
    _dir: TempDir,
    /// Declared last: dropped after tern has been killed.
    rig: Rig,
}

/// What to start: two workers, a kernel TLS listener on :443 with the XDP program attached to
/// the rig's server veth, and with `bypass` also a `mode = "bypass"` plain listener on
/// :[`BYPASS_PORT`]. `extra` is appended to the configuration.
fn start(tag: &str, fault: Option<&str>, bypass: bool, extra: &str) -> Failing {
    start_on(Rig::isolated(tag, 2), tag, fault, bypass, extra)
}

/// [`start`] on a rig the caller made.
fn start_on(rig: Rig, tag: &str, fault: Option<&str>, bypass: bool, extra: &str) -> Failing {
    let dir = TempDir::new(tag);
    let backend = Backend::echo(server_listener(&rig));
    let cert = write_self_signed(dir.path(), "default", &["tern.test"], KeyKind::EcdsaP256);
    let control = dir.join("tern.sock");
    let mut config = format!(
        "[[listener]]\naddress = \"{kernel}\"\ninterface = \"{iface}\"\n\n",
        kernel = rig.server_addr(443),
        iface = rig.server_if,
    );
    if bypass {
        config += &format!(
            "[[listener]]\naddress = \"{addr}\"\nmode = \"bypass\"\ninterface = \"{iface}\"\n\
             tls = false\n\n",
            addr = rig.server_addr(BYPASS_PORT),
            iface = rig.server_if,
        );
    }
    config += &format!(
        "{extra}\n\
         [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [backend]\nservers = [\"{backend}\"]\n\n\
         [workers]\ncount = 2\n\n\
         [xdp]\nhugepages = \"off\"\nframes_per_worker = 4096\n\n\
         [control]\nsocket = \"{control}\"\n",
        cert = cert.cert.display(),
        key = cert.key.display(),
        backend = backend.addr(),
        control = control.display(),
    );
    let env = fault
        .map(|f| vec![("TERN_TEST_FAULT".to_string(), f.to_string())])
        .unwrap_or_default();
    let tern = TernProcess::start_with(
        &config,
        TernOptions {
            netns: rig.server_netns(),
            env,
            ..TernOptions::default()
        },
    );
    Failing {
        tern,
        control,
        _backend: backend,
        _dir: dir,
        rig,
    }
}

impl Failing {
    fn log(&self) -> String {
        self.tern.stderr_text()
    }

    /// Waits for tern to exit on its own and returns its status.
    #[track_caller]
    fn exit_status(&mut self) -> ExitStatus {
        match self.tern.wait_exit(EXIT_WITHIN) {
            Some(status) => status,
            None => panic!(
                "tern still runs {EXIT_WITHIN:?} after start\n{}",
                self.log()
            ),
        }
    }

    #[track_caller]
    fn assert_log_has(&self, fragments: &[&str]) {
        let log = self.log();
        for f in fragments {
            assert!(log.contains(f), "tern's log lacks {f:?}:\n{log}");
        }
    }

    fn xdp_attached(&self) -> bool {
        let out = self
            .rig
            .server_command("ip")
            .args(["link", "show", "dev", &self.rig.server_if])
            .output()
            .expect("ip link show");
        // "prog/xdp id N": the namespace names in the same output may contain "xdp" too.
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    /// After tern exited: the XDP program is detached (the kernel drops the bpf link with the
    /// process; allow it a moment) and every port in `ports` refuses connections.
    #[track_caller]
    fn assert_released(&self, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.xdp_attached() {
            assert!(
                Instant::now() < deadline,
                "XDP program still attached after tern exited\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for &port in ports {
            let addr: SocketAddr = self.rig.server_addr(port);
            let err = self.rig.client.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    .expect_err("nothing listens any more")
            });
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{addr}: the kernel answers with RST: {err}"
            );
        }
    }
}

#[test]
fn a_kernel_worker_panic_ends_tern_with_70() {
    let mut t = start("supkpanic", Some("panic:kernel-worker:1"), false, "");
    let status = t.exit_status();
    assert_eq!(status.code(), Some(70), "{status}\n{}", t.log());
    t.assert_log_has(&[
        "tern ready",
        // The standard panic message: thread, location (the worker's loop), reason.
        "thread 'tern-w1'",
        "panicked at userspace/src/kernel.rs",
        "injected fault (TERN_TEST_FAULT=panic:kernel-worker:1)",
        // The error-level log line.
        "ERROR",
        "thread=\"tern-w1\"",
        "exit_code=70",
    ]);
    t.assert_released(&[443]);
}

#[test]
fn a_bypass_worker_panic_ends_tern_with_70() {
    let mut t = start("supxpanic", Some("panic:bypass-worker:1"), true, "");
    let status = t.exit_status();
    assert_eq!(status.code(), Some(70), "{status}\n{}", t.log());
    t.assert_log_has(&[
        "tern ready",
        "thread 'tern-x1'",
        "panicked at userspace/src/bypass.rs",
        "injected fault (TERN_TEST_FAULT=panic:bypass-worker:1)",
        "thread=\"tern-x1\"",
        "exit_code=70",
    ]);
    t.assert_released(&[443, BYPASS_PORT]);
}

#[test]
fn a_worker_that_fails_stops_the_others_and_ends_tern_with_70() {
    // Not a panic: the worker's loop returns an error while the other kernel worker and both
    // bypass workers run. The main thread notices, stops them, releases everything and exits.
    let mut t = start("supkerror", Some("error:kernel-worker:0"), true, "");
    let status = t.exit_status();
    assert_eq!(status.code(), Some(70), "{status}\n{}", t.log());
    t.assert_log_has(&[
        "tern ready",
        "thread failed; stopping tern",
        "thread=tern-w0",
        "injected fault (TERN_TEST_FAULT=error:kernel-worker:0)",
        // The release ran (rather than the process just dying): the program was detached
        // by tern and the final counters were logged.
        "XDP program detached",
        "tern stopped",
    ]);
    let log = t.log();
    assert!(
        !log.contains("did not stop in time"),
        "every other thread stopped:\n{log}"
    );
    assert!(!t.control.exists(), "the control socket was removed");
    t.assert_released(&[443, BYPASS_PORT]);
}

#[test]
fn a_control_thread_panic_ends_tern_with_70() {
    let mut t = start("supcpanic", Some("panic:control"), false, "");
    t.tern.wait_ready(t.rig.server_addr(443));
    // The fault is armed once tern is ready, which may be a moment after the port accepts;
    // from then on the first command the control thread handles panics it. Commands before
    // that are answered, so ask (bounded) until tern is gone; the last one gets no reply.
    let mut replies = Vec::new();
    for _ in 0..100 {
        if t.tern.try_wait().is_some() {
            break;
        }
        let out = Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&t.control)
            .arg("ping")
            .output()
            .expect("run tern ctl");
        replies.push(String::from_utf8_lossy(&out.stdout).contains("pong"));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        replies.last(),
        Some(&false),
        "the command that met the fault got no reply: {replies:?}"
    );
    let status = t.exit_status();
    assert_eq!(status.code(), Some(70), "{status}\n{}", t.log());
    t.assert_log_has(&[
        "thread 'tern-control'",
        "panicked at userspace/src/control.rs",
        "injected fault (TERN_TEST_FAULT=panic:control)",
        "thread=\"tern-control\"",
    ]);
    t.assert_released(&[443]);
}

#[test]
fn a_failed_start_up_exits_1_and_releases_what_it_started() {
    // An address taken by someone else (a listener without SO_REUSEPORT): tern has attached
    // XDP, started its bypass workers and bound its control socket by the time its kernel
    // workers try to listen there.
    let rig = Rig::isolated("supstart", 2);
    let taken = rig.server_run(|| TcpListener::bind("0.0.0.0:0").expect("bind"));
    let port = taken.local_addr().expect("addr").port();
    let extra = format!("[[listener]]\naddress = \"0.0.0.0:{port}\"\ntls = false\n");
    let mut t = start_on(rig, "supstart", None, true, &extra);
    let status = t.exit_status();
    assert_eq!(status.code(), Some(1), "{status}\n{}", t.log());
    let log = t.log();
    assert!(!log.contains("tern ready"), "start-up failed:\n{log}");
    t.assert_log_has(&[
        "bypass workers running",
        &format!("listening on 0.0.0.0:{port}"),
        "Address already in use",
        "XDP program detached",
    ]);
    assert!(!t.control.exists(), "the control socket was removed");
    t.assert_released(&[443, BYPASS_PORT]);
    drop(taken);
}
