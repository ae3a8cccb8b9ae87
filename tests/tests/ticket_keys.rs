//! `[tls] ticket_keys` end to end, on both paths (kernel mode and the bypass path): two tern
//! processes on two rigs (two "hosts") share one ticket key file made by `tern ticket-keys`.
//!
//! A session ticket from host A resumes on host B (TLS 1.3 and TLS 1.2; the session-id cache
//! is off, so only a ticket can resume). After `tern ticket-keys rotate --keep 0` takes the key
//! out of the file, a `tern ctl reload` on B makes B refuse A's old ticket: a full handshake,
//! no error, counted as `refused`. A is not reloaded: its watcher takes the rotated file by
//! itself, and a ticket B sealed under the new key then resumes on A.

mod support;

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, HandshakeKind, RootCertStore, SupportedProtocolVersion};
use support::{assert_ok, echo_request, echo_round_trip, server_listener, tls_connect, NAME};
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

const KERNEL_PORT: u16 = 443;
const BYPASS_PORT: u16 = 4443;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Bypass,
}

/// One "host": a rig, its echo backend and a tern on it.
struct Host {
    path: Path,
    rig: Rig,
    tern: TernProcess,
    control: PathBuf,
    _backend: Backend,
}

impl Host {
    #[track_caller]
    fn start(path: Path, tag: &str, dir: &FsPath, site: &CertFiles, keys: &FsPath) -> Host {
        let rig = Rig::isolated(tag, 1);
        let backend = Backend::echo(server_listener(&rig));
        let control = dir.join(format!("{tag}.sock"));
        let text = config(path, &rig, site, keys, &control, backend.addr());
        let mut tern = TernProcess::start(&text, rig.server_netns());
        tern.wait_ready(rig.server_addr(KERNEL_PORT));
        let host = Host {
            path,
            rig,
            tern,
            control,
            _backend: backend,
        };
        host.warm_up(site);
        host
    }

    fn addr(&self) -> SocketAddr {
        match self.path {
            Path::Kernel => self.rig.server_addr(KERNEL_PORT),
            Path::Bypass => self.rig.server_addr(BYPASS_PORT),
        }
    }

    /// Waits (bounded) until the listener under test serves, with a client that offers and
    /// keeps no session (the bypass listener may need a moment after the readiness probe).
    #[track_caller]
    fn warm_up(&self, site: &CertFiles) {
        let (addr, cfg) = (self.addr(), client(site, rustls::DEFAULT_VERSIONS, false));
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
                "the listener under test served nothing in 20 s\n{}",
                self.tern.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One connection with an echo round trip (which also takes in the TLS 1.3 tickets);
    /// how the handshake went, as the client saw it.
    #[track_caller]
    fn connect(&self, cfg: &Arc<ClientConfig>) -> HandshakeKind {
        let (addr, cfg) = (self.addr(), cfg.clone());
        self.rig
            .client
            .run(move || {
                let mut tls = tls_connect(addr, &cfg);
                echo_round_trip(&mut tls, b"ticket");
                tls.conn.handshake_kind()
            })
            .expect("a finished handshake has a kind")
    }

    fn ctl(&self, command: &str) -> Output {
        Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.control)
            .arg(command)
            .output()
            .expect("run tern ctl")
    }

    /// The counters of the key file (`stats` → `ticket_keys[0].counters`).
    #[track_caller]
    fn tickets(&self) -> serde_json::Value {
        let out = self.ctl("stats");
        assert_ok(&out, "stats", &self.tern.stderr_text());
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        st["ticket_keys"][0]["counters"].clone()
    }

    #[track_caller]
    fn count(&self, name: &str) -> u64 {
        let c = self.tickets();
        c[name]
            .as_u64()
            .unwrap_or_else(|| panic!("ticket_keys counter {name} in {c}"))
    }
}

fn config(
    path: Path,
    rig: &Rig,
    site: &CertFiles,
    keys: &FsPath,
    control: &FsPath,
    backend: SocketAddr,
) -> String {
    let listeners = match path {
        Path::Kernel => format!(
            "[[listener]]\naddress = \"{}\"\n",
            rig.server_addr(KERNEL_PORT)
        ),
        // The kernel listener attaches XDP and answers the readiness probe.
        Path::Bypass => format!(
            "[[listener]]\naddress = \"{k}\"\ninterface = \"{i}\"\n\n\
             [[listener]]\naddress = \"{b}\"\nmode = \"bypass\"\ninterface = \"{i}\"\n\n\
             [xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n",
            k = rig.server_addr(KERNEL_PORT),
            b = rig.server_addr(BYPASS_PORT),
            i = rig.server_if,
        ),
    };
    // No session-id cache: only a ticket can resume.
    format!(
        "{listeners}\n\
         [[certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\ndefault = true\n\n\
         [tls]\nsession_cache_entries = 0\nticket_keys = \"{keys}\"\n\n\
         [backend]\nservers = [\"{backend}\"]\n\n\
         [workers]\ncount = 2\n\n[control]\nsocket = \"{control}\"\n",
        cert = site.cert.display(),
        key = site.key.display(),
        keys = keys.display(),
        control = control.display(),
    )
}

/// A client trusting `site`, for `versions`; `resume`: with its own session store (shared by
/// every connection made with it, whichever host it goes to: sessions are kept per server
/// name), else offering and keeping no session.
fn client(
    site: &CertFiles,
    versions: &[&'static SupportedProtocolVersion],
    resume: bool,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(site.cert_der.clone()))
        .expect("add root");
    let mut cfg = ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = if resume {
        Resumption::in_memory_sessions(64)
    } else {
        Resumption::disabled()
    };
    Arc::new(cfg)
}

#[track_caller]
fn ticket_keys(args: &[&str], file: &FsPath) {
    let out = Command::new(tern_binary())
        .arg("ticket-keys")
        .args(args)
        .arg(file)
        .output()
        .expect("run tern ticket-keys");
    assert_ok(&out, &format!("ticket-keys {args:?}"), "");
}

fn shared_tickets_resume_across_hosts(path: Path, tag: &str) {
    let dir = TempDir::new(tag);
    let site = write_self_signed(dir.path(), "site", &[NAME], KeyKind::EcdsaP256);
    let keys = dir.join("ticket.keys");
    ticket_keys(&["rotate"], &keys);
    let a = Host::start(path, &format!("{tag}a"), dir.path(), &site, &keys);
    let b = Host::start(path, &format!("{tag}b"), dir.path(), &site, &keys);

    // A ticket from A resumes on B, under both versions.
    let mut resumed_on_b = 0;
    for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
        let cfg = client(&site, versions, true);
        assert_eq!(
            a.connect(&cfg),
            HandshakeKind::Full,
            "{versions:?}: first on A"
        );
        assert_eq!(
            b.connect(&cfg),
            HandshakeKind::Resumed,
            "{versions:?}: A's ticket on B"
        );
        resumed_on_b += 1;
    }
    assert_eq!(b.count("decrypted"), resumed_on_b);
    assert_eq!(b.count("refused"), 0);
    assert!(a.count("issued") >= 2, "A sealed tickets: {}", a.tickets());

    // The key leaves the file; B is reloaded and refuses A's ticket: a full handshake.
    let cfg = client(&site, &[&rustls::version::TLS13], true);
    assert_eq!(a.connect(&cfg), HandshakeKind::Full);
    ticket_keys(&["rotate", "--keep", "0"], &keys);
    let out = b.ctl("reload");
    assert_ok(&out, "reload", &b.tern.stderr_text());
    assert_eq!(
        b.connect(&cfg),
        HandshakeKind::Full,
        "a ticket under a removed key"
    );
    assert_eq!(b.count("refused"), 1, "{}", b.tickets());

    // A was not reloaded: its watcher takes the rotated file (bounded wait), and B's ticket,
    // sealed under the new key at the handshake above, resumes on A.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.count("key_loads") < 2 {
        assert!(
            Instant::now() < deadline,
            "A did not re-read the rotated key file in 20 s: {}",
            a.tickets()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        a.connect(&cfg),
        HandshakeKind::Resumed,
        "B's ticket (new key) on A"
    );
    assert_eq!(a.count("file_errors"), 0);
}

#[test]
fn kernel_shared_tickets_resume_across_hosts() {
    shared_tickets_resume_across_hosts(Path::Kernel, "tkk");
}

#[test]
fn bypass_shared_tickets_resume_across_hosts() {
    shared_tickets_resume_across_hosts(Path::Bypass, "tkb");
}
