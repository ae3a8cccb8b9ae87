//! Checks of the rig itself (tern_tests::rig), with no tern involved: namespaces and veth pairs
//! come up with the requested shape, traffic crosses them, several rigs coexist, everything is
//! gone after drop, and the `TernProcess` guard works (driven with a stand-in script that
//! serves TLS with `openssl s_server`, so it can be checked before tern itself runs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tern_tests::backend::{pattern_sha256_hex, Backend};
use tern_tests::certs::{write_self_signed, KeyKind};
use tern_tests::rig::{Netns, Rig, TempDir, TernOptions, TernProcess};

#[track_caller]
fn run_ok(mut cmd: Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[track_caller]
fn ping(mut cmd: Command, to: std::net::Ipv4Addr) {
    cmd.args(["-c", "1", "-W", "1", &to.to_string()]);
    run_ok(cmd);
}

fn netns_list() -> String {
    let out = run_ok({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .expect("run ip link show")
        .status
        .success()
}

#[track_caller]
fn link_details(ns: Option<&Netns>, dev: &str) -> String {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", &ns.name]);
    }
    cmd.args(["-d", "link", "show", "dev", dev]);
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

#[test]
fn isolated_rig_has_the_requested_shape_and_pings_both_ways() {
    let rig = Rig::isolated("shape", 4);
    assert!(rig.server_if.len() <= 15 && rig.client_if.len() <= 15);
    assert_ne!(rig.server_if, rig.client_if);
    let octets = rig.server_ip.octets();
    assert!(
        octets[0] == 10 && octets[1] >= 200,
        "{} outside the test range",
        rig.server_ip
    );
    assert_eq!(rig.client_ip.octets()[..3], octets[..3], "not one /24");
    for (ns, dev) in [
        (rig.server.as_ref(), &rig.server_if),
        (Some(&rig.client), &rig.client_if),
    ] {
        let details = link_details(ns, dev);
        assert!(
            details.contains("numtxqueues 4 numrxqueues 4"),
            "{dev}: {details}"
        );
        assert!(details.contains("mtu 1500 "), "{dev}: {details}");
        assert!(details.contains("state UP"), "{dev} not up: {details}");
    }
    ping(rig.client_command("ping"), rig.server_ip);
    ping(rig.server_command("ping"), rig.client_ip);
    // Loopback is up in both namespaces.
    ping(rig.client_command("ping"), std::net::Ipv4Addr::LOCALHOST);
    ping(rig.server_command("ping"), std::net::Ipv4Addr::LOCALHOST);
}

#[test]
fn two_rigs_coexist_and_drop_removes_everything() {
    let a = Rig::isolated("pair", 1);
    let b = Rig::isolated("pair", 2);
    assert_ne!(a.client.name, b.client.name);
    assert_ne!(a.server_if, b.server_if);
    assert_ne!(
        a.server_ip, b.server_ip,
        "two rigs of one process share a subnet"
    );
    // Both carry traffic at the same time.
    let pings: Vec<_> = [&a, &b]
        .into_iter()
        .map(|rig| {
            let mut cmd = rig.client_command("ping");
            cmd.args([
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                &rig.server_ip.to_string(),
            ]);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.spawn().expect("spawn ping")
        })
        .collect();
    for p in pings {
        let out = p.wait_with_output().expect("wait for ping");
        assert!(
            out.status.success(),
            "concurrent ping failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A rig's client cannot reach the other rig's server: they are separate networks.
    let mut cross = a.client_command("ping");
    cross.args(["-c", "1", "-W", "1", &b.server_ip.to_string()]);
    assert!(
        !cross.output().expect("run ping").status.success(),
        "rig a reached rig b's server"
    );
    let names: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|r| {
            [
                r.client.name.clone(),
                r.server.as_ref().expect("isolated").name.clone(),
            ]
        })
        .collect();
    let listed = netns_list();
    for name in &names {
        assert!(
            listed.contains(name.as_str()),
            "{name} missing from `ip netns list`"
        );
    }
    drop(a);
    drop(b);
    let listed = netns_list();
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} still listed after drop:\n{listed}"
        );
        assert!(!std::path::Path::new("/run/netns").join(name).exists());
    }
}

#[test]
fn host_rig_reaches_the_host_and_drop_removes_the_host_link() {
    let rig = Rig::host("hostrig", 2);
    assert!(rig.server.is_none());
    assert!(
        host_link_exists(&rig.server_if),
        "{} not in the host namespace",
        rig.server_if
    );
    let details = link_details(None, &rig.server_if);
    assert!(details.contains("numtxqueues 2 numrxqueues 2"), "{details}");
    ping(rig.client_command("ping"), rig.server_ip);
    // A listener on the host's side of the veth is reachable from the client namespace.
    let listener = TcpListener::bind(rig.server_addr(0)).expect("bind on the host side");
    let backend = Backend::demo_http(listener);
    let url = format!("http://{}/from-client", backend.addr());
    let mut curl = rig.client_command("curl");
    curl.args(["-sS", "--max-time", "10", &url]);
    let body = String::from_utf8_lossy(&run_ok(curl).stdout).into_owned();
    assert!(
        body.contains(&format!("peer: {}:", rig.client_ip)),
        "backend did not see the client's address: {body:?}"
    );
    let (if_name, ns_name) = (rig.server_if.clone(), rig.client.name.clone());
    drop(backend);
    drop(rig);
    assert!(
        !host_link_exists(&if_name),
        "{if_name} left in the host namespace"
    );
    assert!(
        !netns_list().contains(ns_name.as_str()),
        "{ns_name} left behind"
    );
}

#[test]
fn netns_threads_and_backends_work_across_the_veth() {
    let rig = Rig::isolated("threads", 1);
    // A listener bound inside the server namespace on the veth address (which does not exist
    // in the host namespace, so this also proves the thread really entered the namespace).
    let addr = rig.server_addr(0);
    let listener = rig.server_run(move || TcpListener::bind(addr).expect("bind in server ns"));
    let backend = Backend::echo(listener);
    let target = backend.addr();
    let echoed = rig.client.run(move || {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {target} from the client ns: {e}"));
        s.write_all(b"across the veth").expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read echo");
        back
    });
    assert_eq!(echoed, b"across the veth");
    // The demo backend streams /bytes/N across the veth to curl, byte-exact.
    let addr = rig.server_addr(8080);
    let listener = rig.server_run(move || TcpListener::bind(addr).expect("bind 8080"));
    let http = Backend::demo_http(listener);
    let mut curl = rig.client_command("sh");
    curl.args([
        "-c",
        &format!(
            "curl -sS --max-time 20 http://{}/bytes/5000000 | sha256sum",
            http.addr()
        ),
    ]);
    let out = String::from_utf8_lossy(&run_ok(curl).stdout).into_owned();
    assert!(
        out.starts_with(&pattern_sha256_hex(5_000_000)),
        "sha256 of /bytes/5000000 through the rig: {out}"
    );
}

/// Writes an executable stand-in for `tern`: checks `run --config FILE`, prints the config to
/// stderr, then runs `body`.
fn fake_tern(dir: &TempDir, body: &str) -> std::path::PathBuf {
    let path = dir.join("fake-tern");
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = run ] && [ \"$2\" = --config ] || {{ echo \"bad args: $*\" >&2; exit 2; }}\n\
         echo \"fake tern pid $$\" >&2\n\
         cat \"$3\" >&2\n\
         {body}\n"
    );
    std::fs::write(&path, script).expect("write fake tern");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn tern_process_guard_runs_waits_signals_and_reaps() {
    let rig = Rig::isolated("proc", 1);
    let dir = TempDir::new("fake");
    let cert = write_self_signed(dir.path(), "site", &["tern.test"], KeyKind::EcdsaP256);
    let addr: SocketAddr = rig.server_addr(443);
    let binary = fake_tern(
        &dir,
        &format!(
            "echo 'tern ready' >&2; exec openssl s_server -quiet -www -accept {addr} -cert {} -key {}",
            cert.cert.display(),
            cert.key.display()
        ),
    );
    let config = "# a config the stand-in prints back\n[backend]\nservers = []\n";
    let mut tern = TernProcess::start_with(
        config,
        TernOptions {
            netns: rig.server.as_ref(),
            binary: Some(binary.clone()),
            ..TernOptions::default()
        },
    );
    tern.wait_ready(addr);
    assert!(
        tern.try_wait().is_none(),
        "stand-in exited after becoming ready"
    );
    let stderr = tern.stderr_text();
    assert!(
        stderr.contains(config),
        "config not passed through: {stderr:?}"
    );
    // `ip netns exec` execs in place: the PID we hold is the program's own.
    assert!(
        stderr.contains(&format!("fake tern pid {}", tern.pid())),
        "PID mismatch ({}): {stderr:?}",
        tern.pid()
    );
    // A real TLS client in the client namespace reaches it over the veth.
    let mut s_client = rig.client_command("openssl");
    s_client.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "tern.test",
    ]);
    s_client.stdin(Stdio::null());
    let out = String::from_utf8_lossy(&run_ok(s_client).stdout).into_owned();
    assert!(out.contains("CN = tern.test"), "s_client output: {out}");

    tern.signal(libc::SIGTERM);
    let status = tern
        .wait_exit(Duration::from_secs(10))
        .expect("stand-in did not exit on SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "status {status}");

    // A process that exits at once makes wait_ready panic with its stderr, not hang.
    let failing = fake_tern(&dir, "echo 'config error: bad field' >&2; exit 2");
    let mut early = TernProcess::start_with(
        config,
        TernOptions {
            netns: rig.server.as_ref(),
            binary: Some(failing),
            ..TernOptions::default()
        },
    );
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| early.wait_ready(addr)))
        .expect_err("wait_ready returned for a process that exited");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("exited") && message.contains("config error: bad field"),
        "wait_ready panic message: {message}"
    );
    assert_eq!(early.try_wait().and_then(|s| s.code()), Some(2));

    // Drop kills a process that is still running and reaps it.
    let sleeper = fake_tern(&dir, "exec sleep 600");
    let guard = TernProcess::start_with(
        config,
        TernOptions {
            binary: Some(sleeper),
            ..TernOptions::default()
        },
    );
    let pid = libc::pid_t::try_from(guard.pid()).expect("pid");
    let guard_dir = guard.dir().to_path_buf();
    drop(guard);
    // SAFETY: signal 0 only checks for existence; it delivers nothing.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "pid {pid} still exists after drop");
    assert!(!guard_dir.exists(), "{} left behind", guard_dir.display());
}

#[test]
fn rig_is_removed_when_its_owner_panics() {
    let mut seen: Option<(String, String)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let rig = Rig::isolated("panic", 1);
        let server = rig.server.as_ref().expect("isolated rig has a server ns");
        seen = Some((rig.client.name.clone(), server.name.clone()));
        panic!("deliberate panic with a rig alive");
    }));
    assert!(result.is_err(), "the closure was supposed to panic");
    let (client, server) = seen.expect("rig was created before the panic");
    let listed = netns_list();
    assert!(
        !listed.contains(client.as_str()) && !listed.contains(server.as_str()),
        "namespaces survived the panic:\n{listed}"
    );
}
