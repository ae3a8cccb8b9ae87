//! Hot reload end to end, on both paths (kernel mode and the bypass path).
//!
//! Under load — client threads opening TLS connections in a loop, and keep-alive connections
//! held open throughout — the configuration file is rewritten and reloaded every 100 ms
//! (`tern ctl reload`, and SIGHUP every fifth time), alternating two versions: the certificate
//! file replaced in place with another key (an ACME renewal), the backend pool growing from one
//! echo server to two, and the idle timeout changing. No request may fail; the connections
//! opened before keep their certificate and work to the end; a new connection gets the new
//! certificate and both backends take connections; tern's open file descriptors and RSS come
//! back to where they were (nothing leaks per reload). Then, on one path: a file that does not
//! validate and a change that needs a restart are refused by `tern ctl reload` (exit 1, the
//! `FILE: FIELD` message) and by SIGHUP (logged), with tern serving on the running
//! configuration; and a lowered idle timeout applies to new connections only.

mod support;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use support::{
    assert_ok, echo_request, echo_round_trip, load, path_listeners, server_listener, tls_connect,
    Tls, NAME,
};
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

const KERNEL_PORT: u16 = 443;
const BYPASS_PORT: u16 = 4443;
const WORKERS: u32 = 2;
/// Keep-alive connections held across every reload.
const KEPT: usize = 8;
/// Client threads opening new connections while the reloads run.
const LOADERS: usize = 3;
/// Reloads, one every [`EVERY`].
const RELOADS: usize = 30;
const EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Bypass,
}

/// One version of the configuration file.
#[derive(Clone, Copy)]
struct Version<'a> {
    backends: &'a [SocketAddr],
    idle_ms: u64,
    /// Text appended (to make the file invalid or change what needs a restart).
    extra: &'a str,
}

struct Reloadable {
    path: Path,
    tern: TernProcess,
    /// Holds the certificates; removed when the test ends.
    _dir: TempDir,
    control: PathBuf,
    /// The certificate file pair the configuration names; replaced in place to rotate.
    site: CertFiles,
    /// The two certificates that take turns in `site`.
    certs: [CertFiles; 2],
    rig: Rig,
}

impl Reloadable {
    #[track_caller]
    fn start(path: Path, tag: &str, backends: &[SocketAddr], rig: Rig, dir: TempDir) -> Self {
        let certs = [
            write_self_signed(dir.path(), "first", &[NAME], KeyKind::EcdsaP256),
            write_self_signed(dir.path(), "second", &[NAME], KeyKind::EcdsaP256),
        ];
        let site = write_self_signed(dir.path(), "site", &[NAME], KeyKind::EcdsaP256);
        put_cert(&site, &certs[0]);
        let control = dir.join("tern.sock");
        let text = config(
            path,
            &rig,
            &site,
            &control,
            Version {
                backends,
                idle_ms: 60_000,
                extra: "",
            },
        );
        let mut tern = TernProcess::start(&text, rig.server_netns());
        tern.wait_ready(rig.server_addr(KERNEL_PORT));
        let r = Reloadable {
            path,
            tern,
            _dir: dir,
            control,
            site,
            certs,
            rig,
        };
        r.warm_up(tag);
        r
    }

    /// Rewrites the configuration file as an operator would (write aside, rename over).
    fn write(&self, v: Version<'_>) {
        let text = config(self.path, &self.rig, &self.site, &self.control, v);
        replace(self.tern.config_path(), &text);
    }

    /// Puts certificate `i` into the configured files.
    fn put_cert(&self, i: usize) {
        put_cert(&self.site, &self.certs[i]);
    }

    fn addr(&self) -> SocketAddr {
        match self.path {
            Path::Kernel => self.rig.server_addr(KERNEL_PORT),
            Path::Bypass => self.rig.server_addr(BYPASS_PORT),
        }
    }

    /// A client configuration that trusts both certificates (and resumes sessions).
    fn client_config(&self) -> Arc<ClientConfig> {
        self.client_config_with(true)
    }

    /// As [`Reloadable::client_config`]; `resume: false`: every connection is a full
    /// handshake, so the certificate it sees is the one served now (a resumed session
    /// reports the certificate of the session it resumes).
    fn client_config_with(&self, resume: bool) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in &self.certs {
            roots
                .add(CertificateDer::from(c.cert_der.clone()))
                .expect("add root");
        }
        let mut cfg = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        if !resume {
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        Arc::new(cfg)
    }

    fn ctl(&self, command: &str) -> Output {
        Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.control)
            .arg(command)
            .output()
            .expect("run tern ctl")
    }

    #[track_caller]
    fn json(&self, command: &str) -> serde_json::Value {
        let out = self.ctl(command);
        assert_ok(&out, command, &self.tern.stderr_text());
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    /// The connection counters of the path under test.
    fn counters(&self) -> serde_json::Value {
        let st = self.json("stats");
        match self.path {
            Path::Kernel => st["total"].clone(),
            Path::Bypass => st["bypass"]["proxy"].clone(),
        }
    }

    /// Connects made to backend `addr`, by `tern ctl backends`.
    fn connects(&self, addr: SocketAddr) -> u64 {
        let doc = self.json("backends");
        doc["servers"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["address"].as_str() == Some(&addr.to_string()))
            })
            .map_or(0, |s| s["connects"].as_u64().unwrap_or(0))
    }

    /// Waits until the listener under test serves.
    #[track_caller]
    fn warm_up(&self, tag: &str) {
        let (addr, cfg) = (self.addr(), self.client_config());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let cfg = cfg.clone();
            if self
                .rig
                .client
                .run(move || echo_request(addr, &cfg, 0).is_ok())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{tag}: the listener under test served nothing in 20 s\n{}",
                self.tern.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until the path's `active` gauge is `n`.
    #[track_caller]
    fn wait_active(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = self.counters();
            if c["active"].as_u64() == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "active never came to {n}: {c}\n{}",
                self.tern.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The configuration file for `path` (kernel or bypass listener) in version `v`.
fn config(path: Path, rig: &Rig, site: &CertFiles, control: &FsPath, v: Version<'_>) -> String {
    // The bypass path's kernel listener attaches XDP and answers the readiness probe.
    let (listeners, bypass) = path_listeners(path == Path::Bypass, rig, KERNEL_PORT, BYPASS_PORT);
    let servers: Vec<String> = v.backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "{listeners}\n\
         [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\ndefault = true\n\n\
         [backend]\nservers = [{servers}]\nconnect_timeout_ms = 2000\n\n\
         [timeouts]\nidle_ms = {idle}\ndrain_ms = 5000\n\n\
         [workers]\ncount = {WORKERS}\n\n[control]\nsocket = \"{control}\"\n\n{bypass}\n{extra}\n",
        cert = site.cert.display(),
        key = site.key.display(),
        servers = servers.join(", "),
        idle = v.idle_ms,
        control = control.display(),
        extra = v.extra,
    )
}

/// Puts certificate `from` into the files of `site`, in place (as an ACME client renews).
fn put_cert(site: &CertFiles, from: &CertFiles) {
    replace(&site.key, &from.key_pem);
    replace(&site.cert, &from.cert_pem);
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader never sees half
/// a file.
fn replace(path: &FsPath, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {tmp:?}: {e}"));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {path:?}: {e}"));
}

/// The leaf certificate a connection was served.
fn served_cert(tls: &Tls) -> Vec<u8> {
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .expect("a peer certificate")
}

/// Open file descriptors and resident memory (KiB) of process `pid`.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

fn reload_under_load_loses_nothing(path: Path, tag: &str) {
    let (rig, dir) = (Rig::isolated(tag, WORKERS), TempDir::new(tag));
    let a = Backend::echo(server_listener(&rig));
    let b = Backend::echo(server_listener(&rig));
    let (one, two) = ([a.addr()], [a.addr(), b.addr()]);
    let r = Reloadable::start(path, tag, &one, rig, dir);
    let (addr, cfg) = (r.addr(), r.client_config());
    let first_der = r.certs[0].cert_der.clone();
    let second_der = r.certs[1].cert_der.clone();

    // Warm: one round of everything the reloads will exercise, so that what is measured after
    // them is what the reloads left behind, not first-use allocations.
    for round in 0..2 {
        r.put_cert(1 - round);
        r.write(Version {
            backends: if round == 0 { &two } else { &one },
            idle_ms: 60_000 - round as u64,
            extra: "",
        });
        assert_ok(&r.ctl("reload"), "warm-up reload", &r.tern.stderr_text());
    }
    {
        let cfg = cfg.clone();
        let failures: Vec<String> = r.rig.client.run(move || {
            (0..50)
                .filter_map(|i| echo_request(addr, &cfg, i).err())
                .collect()
        });
        assert!(failures.is_empty(), "warm-up: {failures:?}");
    }
    r.wait_active(0);
    let before = fds_and_rss(r.tern.pid());

    let mut kept: Vec<Tls> = {
        let cfg = cfg.clone();
        r.rig.client.run(move || {
            (0..KEPT)
                .map(|i| {
                    let mut t = tls_connect(addr, &cfg);
                    echo_round_trip(&mut t, format!("kept {i} before\n").as_bytes());
                    t
                })
                .collect()
        })
    };
    for t in &kept {
        assert_eq!(served_cert(t), first_der, "served the certificate in place");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..LOADERS)
        .map(|_| {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            r.rig.client.spawn(move || load(addr, cfg, stop))
        })
        .collect();

    let mut refused = Vec::new();
    for i in 0..RELOADS {
        let t = Instant::now();
        let odd = i % 2 == 1;
        r.put_cert(usize::from(!odd));
        r.write(Version {
            backends: if odd { &one } else { &two },
            idle_ms: if odd { 60_000 } else { 50_000 },
            extra: "",
        });
        if i % 5 == 4 {
            r.tern.signal(libc::SIGHUP);
        } else {
            let out = r.ctl("reload");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() || !text.starts_with("ok: generation") {
                refused.push(format!("reload {i}: {text}"));
            }
        }
        std::thread::sleep(EVERY.saturating_sub(t.elapsed()));
    }
    // The last version serves the second certificate and both backends; make sure it is in
    // (the last SIGHUP may still be applying).
    r.put_cert(1);
    r.write(Version {
        backends: &two,
        idle_ms: 50_000,
        extra: "",
    });
    assert_ok(&r.ctl("reload"), "last reload", &r.tern.stderr_text());
    let (b_before, _) = (r.connects(b.addr()), ());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    let mut failures = Vec::new();
    for l in loaders {
        let seen = l.join().expect("load thread");
        served += seen.ok;
        failures.extend(seen.failures);
    }
    assert!(refused.is_empty(), "reloads refused: {refused:?}");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reloads: {:?}\n{}",
        failures.len(),
        served + failures.len() as u64,
        &failures[..failures.len().min(5)],
        r.tern.stderr_text()
    );
    assert!(served > 0, "the load made requests");

    // The connections from before: still the first certificate, still working.
    for (i, t) in kept.iter_mut().enumerate() {
        echo_round_trip(t, format!("kept {i} after\n").as_bytes());
        assert_eq!(
            served_cert(t),
            first_der,
            "an open connection keeps its certificate"
        );
    }
    // A new connection: the renewed certificate, and both backends in use.
    let fresh = {
        let cfg = r.client_config_with(false);
        r.rig.client.run(move || {
            (0..8)
                .map(|_| {
                    let mut t = tls_connect(addr, &cfg);
                    echo_round_trip(&mut t, b"fresh\n");
                    served_cert(&t)
                })
                .collect::<Vec<_>>()
        })
    };
    assert!(
        fresh.iter().all(|c| *c == second_der),
        "new connections get the new certificate"
    );
    assert!(
        r.connects(b.addr()) > b_before || b_before > 0,
        "the added backend takes connections"
    );
    let log = r.tern.stderr_text();
    assert!(
        log.contains("configuration reloaded") && log.contains("SIGHUP"),
        "reloads are logged, SIGHUP's too:\n{log}"
    );

    for t in kept.drain(..) {
        drop(t);
    }
    r.wait_active(0);
    let after = fds_and_rss(r.tern.pid());
    // Probes may hold a socket for a moment; a leak per reload would show as dozens.
    assert!(
        after.0 <= before.0 + 4,
        "open fds: {} before the reloads, {} after",
        before.0,
        after.0
    );
    assert!(
        after.1 <= before.1 + 16 * 1024,
        "RSS: {} KiB before the reloads, {} KiB after",
        before.1,
        after.1
    );
    drop((a, b));
}

#[test]
fn kernel_reload_under_load_loses_nothing() {
    reload_under_load_loses_nothing(Path::Kernel, "rld-k");
}

#[test]
fn bypass_reload_under_load_loses_nothing() {
    reload_under_load_loses_nothing(Path::Bypass, "rld-b");
}

/// Refusals: an invalid file and changes that need a restart, by ctl and by SIGHUP; the
/// running configuration stays. Then the lowered idle timeout applies to new connections only.
fn refusals_keep_the_running_configuration(path: Path, tag: &str) {
    let (rig, dir) = (Rig::isolated(tag, WORKERS), TempDir::new(tag));
    let a = Backend::echo(server_listener(&rig));
    let one = [a.addr()];
    let r = Reloadable::start(path, tag, &one, rig, dir);
    let (addr, cfg) = (r.addr(), r.client_config());
    let file = r.tern.config_path().display().to_string();
    let cases = [
        (
            "[limits]\nmax_connections_per_worker = \"many\"",
            "limits.max_connections_per_worker",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:9443\"",
            "listener: adding, removing or changing a listener needs a restart",
        ),
        (
            "[tcp]\nmss = 1200",
            "tcp: changing [tcp] (mss) needs a restart",
        ),
    ];
    for (extra, expect) in cases {
        r.write(Version {
            backends: &one,
            idle_ms: 60_000,
            extra,
        });
        let out = r.ctl("reload");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !out.status.success(),
            "{extra}: refused with exit 1: {text}"
        );
        assert!(
            text.starts_with("error: reload refused, the running configuration is kept: ")
                && text.contains(&format!("{file}: {expect}")),
            "{extra}: {text}"
        );
    }
    // SIGHUP with the last bad file: logged, nothing changes.
    r.tern.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.tern.stderr_text().contains("by=\"SIGHUP\"") {
        assert!(
            Instant::now() < deadline,
            "no SIGHUP outcome logged:\n{}",
            r.tern.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        r.tern.stderr_text().contains("reload refused"),
        "{}",
        r.tern.stderr_text()
    );
    {
        let cfg = cfg.clone();
        let ok = r.rig.client.run(move || echo_request(addr, &cfg, 1));
        assert_eq!(ok, Ok(()), "still serving on the running configuration");
    }

    // A lower idle timeout: for connections accepted from now on.
    let mut old = {
        let cfg = cfg.clone();
        r.rig.client.run(move || {
            let mut t = tls_connect(addr, &cfg);
            echo_round_trip(&mut t, b"old\n");
            t
        })
    };
    r.write(Version {
        backends: &one,
        idle_ms: 1_000,
        extra: "",
    });
    let out = r.ctl("reload");
    assert_ok(&out, "reload", &r.tern.stderr_text());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("ok: generation 2 (changed: timeouts); applied by "),
        "{text}"
    );
    let mut new = {
        let cfg = cfg.clone();
        r.rig.client.run(move || {
            let mut t = tls_connect(addr, &cfg);
            echo_round_trip(&mut t, b"new\n");
            t
        })
    };
    let timeouts_before = r.counters()["idle_timeouts"].as_u64().unwrap_or(0);
    // Idle for well past the new timeout: tern closes the new connection (a close_notify and
    // FIN, or a reset: either ends the read), the old one lives.
    new.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let closed = matches!(new.read(&mut buf), Ok(0) | Err(_));
    assert!(
        closed,
        "the new connection is closed after its idle timeout"
    );
    assert_eq!(
        r.counters()["idle_timeouts"].as_u64().unwrap_or(0),
        timeouts_before + 1,
        "counted as an idle timeout"
    );
    echo_round_trip(&mut old, b"old, still\n");
    drop(a);
}

#[test]
fn kernel_refusals_keep_the_running_configuration() {
    refusals_keep_the_running_configuration(Path::Kernel, "rlr-k");
}

#[test]
fn bypass_refusals_keep_the_running_configuration() {
    refusals_keep_the_running_configuration(Path::Bypass, "rlr-b");
}
