//! Zero-downtime binary upgrade and `tern ctl drain`, end to end on the rig (kernel path).
//!
//! tern A serves keep-alive TLS connections and a stream of new ones; tern B starts with
//! `run --upgrade` on the same configuration, takes A's listening sockets over the control
//! socket and tells A to drain. No client may see a failure or a reset; the connections opened
//! before the upgrade finish on A, new ones are served by B, A exits 0 once its last connection
//! has ended, and B goes on serving.
//!
//! The bypass path (`bypass_upgrade_under_load_loses_nothing`): B takes A's XDP program over;
//! new flows go to B on kernel sockets while A's flows stay on A's AF_XDP sockets, and once A
//! has exited B's bypass workers take new flows (docs/architecture.md, "Binary upgrade").

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{echo_round_trip, load, load_n, tls_connect, Stack, StackOptions};
use tern_tests::backend::Backend;
use tern_tests::rig::{tern_binary, TernOptions, TernProcess};

const TIMEOUTS: &str = "[timeouts]\nidle_ms = 120000\ndrain_ms = 30000\n";

/// Keep-alive connections opened on A before the upgrade.
const KEEP_ALIVE: usize = 20;
/// Client threads opening new connections in a loop across the upgrade.
const LOADERS: usize = 4;

fn ctl(control: &std::path::Path, command: &str) -> std::process::Output {
    Command::new(tern_binary())
        .args(["ctl", "--socket"])
        .arg(control)
        .arg(command)
        .output()
        .expect("run tern ctl")
}

/// Waits (bounded) until `text` shows in `process`'s log.
#[track_caller]
fn wait_log(process: &TernProcess, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !process.stderr_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log within {within:?}:\n{}",
            process.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kernel_upgrade_under_load_loses_nothing() {
    let (mut s, _backend) = Stack::with_backend(
        "upg-k",
        Backend::echo,
        StackOptions {
            toml_extra: TIMEOUTS,
            ..Default::default()
        },
    );
    let addr = s.addr();
    let cfg = s.client_config();

    // Connections A serves from before the upgrade to after it.
    let mut kept = {
        let cfg = cfg.clone();
        s.rig.client.run(move || {
            (0..KEEP_ALIVE)
                .map(|i| {
                    let mut t = tls_connect(addr, &cfg);
                    echo_round_trip(&mut t, format!("kept {i} before\n").as_bytes());
                    t
                })
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(s.total("active"), KEEP_ALIVE as u64);

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..LOADERS)
        .map(|_| {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            s.rig.client.spawn(move || load(addr, cfg, stop))
        })
        .collect();
    // Some load on A alone first.
    let before = Instant::now();
    while s.total("accepted") < KEEP_ALIVE as u64 + 50 && before.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(20));
    }

    let config = std::fs::read_to_string(s.tern.config_path()).expect("read A's config");
    let mut b = TernProcess::start_with(
        &config,
        TernOptions {
            netns: s.rig.server_netns(),
            extra_args: vec!["--upgrade".into()],
            ..Default::default()
        },
    );
    wait_log(
        &b,
        "upgrade: the old tern is draining",
        Duration::from_secs(60),
    );
    wait_log(
        &s.tern,
        "the new tern took over; draining",
        Duration::from_secs(10),
    );

    // The control path is B's now; let B serve new connections for a while.
    let b_start = Instant::now();
    loop {
        let out = ctl(&s.control, "stats");
        assert!(
            out.status.success(),
            "B's stats: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            b.stderr_text()
        );
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
        if stats["total"]["accepted"].as_u64().unwrap_or(0) >= 50 {
            break;
        }
        assert!(
            b_start.elapsed() < Duration::from_secs(60),
            "B serves no new connections: {stats}\n{}",
            b.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut failures = Vec::new();
    for l in loaders {
        let seen = l.join().expect("load thread");
        ok += seen.ok;
        failures.extend(seen.failures);
    }
    assert!(
        failures.is_empty(),
        "{} of {} connections failed across the upgrade, e.g. {:?}\nA:\n{}\nB:\n{}",
        failures.len(),
        ok as usize + failures.len(),
        &failures[..failures.len().min(5)],
        s.log(),
        b.stderr_text()
    );

    // The connections opened before the upgrade still work, on A: B has none of them.
    for (i, t) in kept.iter_mut().enumerate() {
        echo_round_trip(t, format!("kept {i} after\n").as_bytes());
    }
    let b_stats: serde_json::Value =
        serde_json::from_slice(&ctl(&s.control, "stats").stdout).expect("stats JSON");
    assert_eq!(
        b_stats["total"]["active"].as_u64(),
        Some(0),
        "B holds none of A's: {b_stats}"
    );
    let b_accepted = b_stats["total"]["accepted"].as_u64().unwrap_or(0);
    eprintln!("{ok} connections across the upgrade, {b_accepted} of them served by B");
    assert!(
        b_accepted >= 50 && b_accepted <= ok,
        "B accepted {b_accepted} of {ok}"
    );
    assert!(
        s.tern.try_wait().is_none(),
        "A exited with connections open:\n{}",
        s.log()
    );

    // A ends once its last connection has ended, with 0.
    drop(kept);
    s.expect_clean_exit(Duration::from_secs(20), "A after its last connection");
    let a_log = s.log();
    assert!(
        a_log.contains("\"drain_aborted\":0"),
        "A aborted none: {a_log}"
    );

    // B goes on serving.
    let cfg2 = cfg.clone();
    s.rig.client.run(move || {
        let mut t = tls_connect(addr, &cfg2);
        echo_round_trip(&mut t, b"after A\n");
    });
    assert!(b.try_wait().is_none(), "B still runs");
    assert!(
        b.stop(Duration::from_secs(20)).success(),
        "B drains and exits 0:\n{}",
        b.stderr_text()
    );
}

#[test]
fn a_failed_upgrade_leaves_the_old_tern_serving() {
    let (mut s, _backend) = Stack::with_backend("upg-f", Backend::echo, StackOptions::default());
    // The new process takes the sockets, then fails to start: one more listener, on an
    // address no interface of the namespace has, cannot be bound.
    let config = std::fs::read_to_string(s.tern.config_path()).expect("read config");
    let broken = format!("{config}\n[[listener]]\naddress = \"192.0.2.1:443\"\n");
    let mut b = TernProcess::start_with(
        &broken,
        TernOptions {
            netns: s.rig.server_netns(),
            extra_args: vec!["--upgrade".into()],
            ..Default::default()
        },
    );
    let status = b.wait_exit(Duration::from_secs(30)).expect("B gives up");
    assert!(
        !status.success() && b.stderr_text().contains("192.0.2.1:443"),
        "B fails on the listener it cannot bind: {}",
        b.stderr_text()
    );
    wait_log(
        &s.tern,
        "the new tern went away before taking over; still serving",
        Duration::from_secs(10),
    );
    // A still answers on its control socket and serves.
    assert_eq!(
        String::from_utf8_lossy(&ctl(&s.control, "ping").stdout),
        "pong\n"
    );
    let (addr, cfg) = (s.addr(), s.client_config());
    s.rig.client.run(move || {
        let mut t = tls_connect(addr, &cfg);
        echo_round_trip(&mut t, b"still A\n");
    });
    s.tern.signal(libc::SIGTERM);
    s.expect_clean_exit(Duration::from_secs(20), "A after SIGTERM");
}

#[test]
fn ctl_drain_stops_accepting_and_finishes_open_connections() {
    let (mut s, _backend) = Stack::with_backend(
        "upg-d",
        Backend::echo,
        StackOptions {
            toml_extra: TIMEOUTS,
            ..Default::default()
        },
    );
    let (addr, cfg) = (s.addr(), s.client_config());
    let mut open = {
        let cfg = cfg.clone();
        s.rig.client.run(move || tls_connect(addr, &cfg))
    };
    let out = ctl(&s.control, "drain");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{}", s.log());
    wait_log(&s.tern, "draining", Duration::from_secs(10));
    // New connections are refused once the listening sockets are closed...
    let refused = s.rig.client.run(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                _ if Instant::now() >= deadline => return false,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    assert!(refused, "connections refused after drain:\n{}", s.log());
    // ...the open one goes on, and its end ends tern.
    echo_round_trip(&mut open, b"during the drain\n");
    assert!(
        s.tern.try_wait().is_none(),
        "tern waits for the open connection"
    );
    drop(open);
    s.expect_clean_exit(Duration::from_secs(20), "tern after drain");
}

/// The bypass listener's port (the kernel listener on :443 answers the readiness probe and
/// shares the interface, so both kinds of listener are upgraded together).
const BYPASS_PORT: u16 = 8443;

/// `tern ctl stats` of whichever tern answers on `control`.
#[track_caller]
fn stats_at(control: &std::path::Path) -> serde_json::Value {
    let out = ctl(control, "stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

#[test]
fn bypass_upgrade_under_load_loses_nothing() {
    let (rig, dir) = Stack::rig("upg-b");
    let backend = Backend::echo(support::server_listener(&rig));
    let bypass = rig.server_addr(BYPASS_PORT);
    let extra = format!(
        "{TIMEOUTS}\n[[listener]]\naddress = \"{bypass}\"\nmode = \"bypass\"\ninterface = \"{i}\"\n\n\
         [xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n",
        i = rig.server_if
    );
    let listener_extra = format!("interface = \"{}\"", rig.server_if);
    let mut s = Stack::start(
        rig,
        dir,
        StackOptions {
            backends: vec![backend.addr()],
            listener_extra: &listener_extra,
            toml_extra: &extra,
            ..Default::default()
        },
    );
    let cfg = s.client_config();

    // A serves the bypass listener once its workers run (after the readiness probe).
    let served = {
        let cfg = cfg.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(20);
        s.rig.client.run(move || {
            while Instant::now() < deadline {
                if load_once(bypass, &cfg, &stop) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    assert!(served, "A's bypass listener serves:\n{}", s.log());

    let mut kept = {
        let cfg = cfg.clone();
        s.rig.client.run(move || {
            (0..KEEP_ALIVE)
                .map(|i| {
                    let mut t = tls_connect(bypass, &cfg);
                    echo_round_trip(&mut t, format!("kept {i} before\n").as_bytes());
                    t
                })
                .collect::<Vec<_>>()
        })
    };
    let a = stats_at(&s.control);
    assert_eq!(
        a["bypass"]["proxy"]["active"].as_u64(),
        Some(KEEP_ALIVE as u64),
        "{a}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..LOADERS)
        .map(|_| {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            s.rig.client.spawn(move || load(bypass, cfg, stop))
        })
        .collect();
    let before = Instant::now();
    while stats_at(&s.control)["bypass"]["proxy"]["accepted"]
        .as_u64()
        .unwrap_or(0)
        < KEEP_ALIVE as u64 + 50
        && before.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(20));
    }

    let config = std::fs::read_to_string(s.tern.config_path()).expect("read A's config");
    let mut b = TernProcess::start_with(
        &config,
        TernOptions {
            netns: s.rig.server_netns(),
            extra_args: vec!["--upgrade".into()],
            ..Default::default()
        },
    );
    wait_log(
        &b,
        "upgrade: the old tern is draining",
        Duration::from_secs(60),
    );
    wait_log(
        &s.tern,
        "the new tern took over; draining",
        Duration::from_secs(10),
    );

    // Phase 1: B serves new flows on kernel sockets while A keeps its own.
    let b_start = Instant::now();
    while stats_at(&s.control)["total"]["accepted"]
        .as_u64()
        .unwrap_or(0)
        < 50
    {
        assert!(
            b_start.elapsed() < Duration::from_secs(60),
            "B serves no new connections:\n{}",
            b.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connections opened before the upgrade still work, on A.
    for (i, t) in kept.iter_mut().enumerate() {
        echo_round_trip(t, format!("kept {i} after\n").as_bytes());
    }
    assert!(
        s.tern.try_wait().is_none(),
        "A exited with connections open:\n{}",
        s.log()
    );
    let a_log_before = s.log();
    // A ends once its last connection has ended, with 0; B then runs its bypass workers.
    drop(kept);
    s.expect_clean_exit(Duration::from_secs(30), "A after its last connection");
    let a_log = s.log();
    assert!(
        a_log.contains("\"drain_aborted\":0"),
        "A aborted none: {a_log}"
    );
    assert!(a_log_before.len() <= a_log.len());
    wait_log(
        &b,
        "upgrade: bypass path serving new flows",
        Duration::from_secs(30),
    );

    // Phase 2: new flows reach B's bypass workers.
    let b_start = Instant::now();
    while stats_at(&s.control)["bypass"]["proxy"]["accepted"]
        .as_u64()
        .unwrap_or(0)
        < 30
    {
        assert!(
            b_start.elapsed() < Duration::from_secs(60),
            "B's bypass path serves no new connections:\n{}",
            b.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut failures = Vec::new();
    for l in loaders {
        let seen = l.join().expect("load thread");
        ok += seen.ok;
        failures.extend(seen.failures);
    }
    assert!(
        failures.is_empty(),
        "{} of {} connections failed across the upgrade, e.g. {:?}\nA:\n{}\nB:\n{}",
        failures.len(),
        ok as usize + failures.len(),
        &failures[..failures.len().min(5)],
        s.log(),
        b.stderr_text()
    );
    let b_stats = stats_at(&s.control);
    eprintln!(
        "{ok} connections across the upgrade; B: {} on kernel sockets, {} on its bypass path",
        b_stats["total"]["accepted"], b_stats["bypass"]["proxy"]["accepted"]
    );

    // B holds the XDP program now: the blocklist works through it.
    let out = Command::new(tern_binary())
        .args(["ctl", "--socket"])
        .arg(&s.control)
        .args(["block", "192.0.2.0/24"])
        .output()
        .expect("run tern ctl block");
    assert!(
        out.status.success(),
        "block through B: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blocks = String::from_utf8_lossy(&ctl(&s.control, "blocks").stdout).to_string();
    assert!(blocks.contains("192.0.2.0/24"), "blocks: {blocks}");

    // B goes on serving on the bypass listener.
    let cfg2 = cfg.clone();
    s.rig.client.run(move || {
        let mut t = tls_connect(bypass, &cfg2);
        echo_round_trip(&mut t, b"after A\n");
    });
    assert!(b.try_wait().is_none(), "B still runs");
    assert!(
        b.stop(Duration::from_secs(20)).success(),
        "B drains and exits 0:\n{}",
        b.stderr_text()
    );
}

/// One TLS connection and echo round trip; whether it worked.
fn load_once(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    stop: &Arc<AtomicBool>,
) -> bool {
    let _ = stop;
    let seen = load_n(addr, cfg.clone(), 1);
    seen.failures.is_empty() && seen.ok == 1
}

#[test]
fn upgrade_with_nothing_running_starts_afresh() {
    let (rig, dir) = Stack::rig("upg-n");
    let backend = Backend::echo(support::server_listener(&rig));
    let control = dir.join("tern.sock");
    let cert = tern_tests::certs::write_self_signed(
        dir.path(),
        "default",
        &[support::NAME],
        tern_tests::certs::KeyKind::EcdsaP256,
    );
    let config = format!(
        "[[listener]]\naddress = \"{}\"\n\n[[certificate]]\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [backend]\nservers = [\"{}\"]\n\n[control]\nsocket = \"{}\"\n",
        rig.server_addr(443),
        cert.cert.display(),
        cert.key.display(),
        backend.addr(),
        control.display()
    );
    let mut t = TernProcess::start_with(
        &config,
        TernOptions {
            netns: rig.server_netns(),
            extra_args: vec!["--upgrade".into()],
            ..Default::default()
        },
    );
    t.wait_ready(rig.server_addr(443));
    assert!(t
        .stderr_text()
        .contains("no tern runs there; starting afresh"));
    assert_eq!(
        String::from_utf8_lossy(&ctl(&control, "ping").stdout),
        "pong\n"
    );
    assert!(
        t.stop(Duration::from_secs(20)).success(),
        "{}",
        t.stderr_text()
    );
}
