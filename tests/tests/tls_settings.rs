//! The `[tls]` handshake settings end to end, on both paths (kernel mode and the bypass path),
//! seen by a client tern did not write (`openssl s_client`, in the rig's client namespace):
//! an ECDSA and an RSA certificate for the same name, served by what the client can verify
//! (RSA-only signature algorithms, or a TLS 1.2 ECDHE_RSA suite, get the RSA one; openssl's
//! defaults get the ECDSA one); `strict_sni` refusing an unknown SNI and a missing one with an
//! `unrecognized_name` alert (RFC 6066 §3), counted in `sni_refused`, where without it the
//! default certificate is served; `cipher_suites` and `groups` choosing what is negotiated and
//! failing a client that offers nothing enabled; the hybrid post-quantum X25519MLKEM768 group by
//! default (checked with a rustls client: Debian 12's OpenSSL 3.0 does not implement it); and a
//! reload that turns `strict_sni` on and narrows `cipher_suites`, applying to new connections
//! while an open one keeps working.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, NamedGroup, RootCertStore};
use support::{
    assert_ok, client_config, echo_request, echo_round_trip, path_listeners, server_listener,
    tls_connect, NAME,
};
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

const KERNEL_PORT: u16 = 443;
const BYPASS_PORT: u16 = 4443;
const WORKERS: u32 = 2;
/// A name no certificate carries.
const UNKNOWN: &str = "unknown.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Bypass,
}

/// tern with an ECDSA (default) and an RSA certificate for [`NAME`], in front of an echo
/// backend, serving on the listener of `path`.
struct Site {
    path: Path,
    tern: TernProcess,
    ecdsa: CertFiles,
    rsa: CertFiles,
    control: PathBuf,
    backend: Backend,
    /// Holds the certificates; removed when the test ends.
    _dir: TempDir,
    /// Declared last: dropped after tern has been killed.
    rig: Rig,
}

impl Site {
    /// Starts tern with `tls` as the body of its `[tls]` section.
    #[track_caller]
    fn start(path: Path, tag: &str, tls: &str) -> Site {
        let (rig, dir) = (Rig::isolated(tag, WORKERS), TempDir::new(tag));
        let backend = Backend::echo(server_listener(&rig));
        let ecdsa = write_self_signed(dir.path(), "ecdsa", &[NAME], KeyKind::EcdsaP256);
        let rsa = write_self_signed(dir.path(), "rsa", &[NAME], KeyKind::Rsa2048);
        let control = dir.join("tern.sock");
        let mut tern = TernProcess::start(
            &config(path, &rig, [&ecdsa, &rsa], &control, backend.addr(), tls),
            rig.server_netns(),
        );
        tern.wait_ready(rig.server_addr(KERNEL_PORT));
        let site = Site {
            path,
            tern,
            ecdsa,
            rsa,
            control,
            backend,
            _dir: dir,
            rig,
        };
        site.warm_up(tag);
        site
    }

    fn addr(&self) -> SocketAddr {
        match self.path {
            Path::Kernel => self.rig.server_addr(KERNEL_PORT),
            Path::Bypass => self.rig.server_addr(BYPASS_PORT),
        }
    }

    /// Rewrites the configuration with `tls` as the `[tls]` body and reloads it; returns
    /// `tern ctl reload`'s answer.
    #[track_caller]
    fn reload(&self, tls: &str) -> String {
        let text = config(
            self.path,
            &self.rig,
            [&self.ecdsa, &self.rsa],
            &self.control,
            self.backend.addr(),
            tls,
        );
        let file = self.tern.config_path();
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {tmp:?}: {e}"));
        std::fs::rename(&tmp, file).unwrap_or_else(|e| panic!("rename over {file:?}: {e}"));
        let out = self.ctl("reload");
        assert_ok(&out, "reload", &self.tern.stderr_text());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ctl(&self, command: &str) -> Output {
        Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.control)
            .arg(command)
            .output()
            .expect("run tern ctl")
    }

    /// A connection counter of the path under test (`tern ctl stats`).
    #[track_caller]
    fn counter(&self, name: &str) -> u64 {
        let out = self.ctl("stats");
        assert_ok(&out, "stats", &self.tern.stderr_text());
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats is JSON");
        let c = match self.path {
            Path::Kernel => &st["total"],
            Path::Bypass => &st["bypass"]["proxy"],
        };
        c[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {st}"))
    }

    /// Waits (bounded) until counter `name` is `n`, and checks it stays there a moment (a
    /// refusal counted twice would show).
    #[track_caller]
    fn expect_counter(&self, name: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.counter(name) != n {
            assert!(
                Instant::now() < deadline,
                "{name} is {}, expected {n}\n{}",
                self.counter(name),
                self.tern.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(self.counter(name), n, "{name}");
    }

    /// Waits until the listener under test serves (the bypass one comes up after the kernel
    /// listener that answers the readiness probe).
    #[track_caller]
    fn warm_up(&self, tag: &str) {
        let (addr, cfg) = (self.addr(), client_config(&self.ecdsa.cert_der));
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

    /// `openssl s_client` against the listener under test, in the client namespace, with
    /// `-servername NAME` unless `args` says otherwise. Stdin is empty, so a client that
    /// completes the handshake quits at once; `timeout` bounds one that does not.
    fn s_client(&self, args: &[&str]) -> SClient {
        let mut cmd = self.rig.client_command("timeout");
        cmd.args(["20", "openssl", "s_client", "-connect"])
            .arg(self.addr().to_string());
        if !args
            .iter()
            .any(|a| *a == "-servername" || *a == "-noservername")
        {
            cmd.args(["-servername", NAME]);
        }
        let out = cmd
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl s_client (is openssl installed?)");
        SClient {
            ok: out.status.success(),
            text: format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            args: args.join(" "),
        }
    }

    /// `s_client` that must complete its handshake.
    #[track_caller]
    fn s_client_ok(&self, args: &[&str]) -> SClient {
        let c = self.s_client(args);
        assert!(
            c.ok && c.text.contains("-----BEGIN CERTIFICATE-----"),
            "openssl s_client {}: no handshake:\n{}\ntern log:\n{}",
            c.args,
            c.text,
            self.tern.stderr_text()
        );
        c
    }

    /// `s_client` that must fail with a fatal `unrecognized_name` alert (112).
    #[track_caller]
    fn s_client_unrecognized_name(&self, args: &[&str]) {
        let c = self.s_client(args);
        assert!(
            !c.ok
                && c.text.contains("unrecognized name")
                && c.text.contains("alert number 112")
                && !c.text.contains("-----BEGIN CERTIFICATE-----"),
            "openssl s_client {}: expected an unrecognized_name alert:\n{}",
            c.args,
            c.text
        );
    }

    /// The key-exchange group a rustls client negotiates with the listener under test:
    /// rustls' defaults (as tern-tests builds it, without `prefer-post-quantum`:
    /// X25519MLKEM768 offered last), or, with `pq_first`, X25519MLKEM768 first as current
    /// browsers and rustls' own default build offer it.
    fn rustls_group(&self, pq_first: bool) -> Option<NamedGroup> {
        let cfg = if pq_first {
            let mut provider = aws_lc_rs::default_provider();
            provider
                .kx_groups
                .retain(|g| g.name() != NamedGroup::X25519MLKEM768);
            provider
                .kx_groups
                .insert(0, aws_lc_rs::kx_group::X25519MLKEM768);
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from(self.ecdsa.cert_der.clone()))
                .expect("add root");
            let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        } else {
            client_config(&self.ecdsa.cert_der)
        };
        let addr = self.addr();
        self.rig.client.run(move || {
            let mut t = tls_connect(addr, &cfg);
            echo_round_trip(&mut t, b"group\n");
            t.conn.negotiated_key_exchange_group().map(|g| g.name())
        })
    }
}

/// What one `openssl s_client` run printed (stdout and stderr) and whether it succeeded.
struct SClient {
    ok: bool,
    text: String,
    args: String,
}

impl SClient {
    /// The leaf certificate the server sent, as its PEM body without line breaks.
    #[track_caller]
    fn served(&self) -> String {
        let begin = "-----BEGIN CERTIFICATE-----";
        let end = "-----END CERTIFICATE-----";
        let body = self
            .text
            .split_once(begin)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(body, _)| body)
            .unwrap_or_else(|| panic!("{}: no certificate in:\n{}", self.args, self.text));
        body.split_whitespace().collect()
    }

    /// Whether the served certificate is `files`'.
    fn served_is(&self, files: &CertFiles) -> bool {
        self.served() == pem_body(&files.cert_pem)
    }

    /// The line that starts with `label`, for assertions and their messages.
    fn line(&self, label: &str) -> &str {
        self.text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(label))
            .unwrap_or("")
    }
}

fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.split_whitespace())
        .collect()
}

/// The configuration for `path`: `[tls] alpn` plus `tls`, the ECDSA certificate as the default
/// and the RSA one for the same name.
fn config(
    path: Path,
    rig: &Rig,
    [ecdsa, rsa]: [&CertFiles; 2],
    control: &std::path::Path,
    backend: SocketAddr,
    tls: &str,
) -> String {
    // The bypass path's kernel listener attaches XDP and answers the readiness probe.
    let (listeners, bypass) = path_listeners(path == Path::Bypass, rig, KERNEL_PORT, BYPASS_PORT);
    format!(
        "{listeners}\n\
         [[certificate]]\ncert = \"{ec}\"\nkey = \"{eck}\"\ndefault = true\n\n\
         [[certificate]]\ncert = \"{rsa}\"\nkey = \"{rsak}\"\n\n\
         [tls]\nalpn = [\"http/1.1\"]\n{tls}\n\n\
         [backend]\nservers = [\"{backend}\"]\nconnect_timeout_ms = 2000\n\n\
         [workers]\ncount = {WORKERS}\n\n[control]\nsocket = \"{control}\"\n\n{bypass}\n",
        ec = ecdsa.cert.display(),
        eck = ecdsa.key.display(),
        rsa = rsa.cert.display(),
        rsak = rsa.key.display(),
        control = control.display(),
    )
}

/// Only ChaCha20-Poly1305, in each version (every enabled version needs a suite).
const CHACHA_ONLY: &str = "cipher_suites = [\"TLS13_CHACHA20_POLY1305_SHA256\", \
     \"TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256\", \
     \"TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256\"]\n";

/// Default settings: the certificate follows what the client can verify, an unknown SNI gets
/// the default certificate, a rustls client gets X25519MLKEM768. Then a reload turns on
/// `strict_sni` and ChaCha20 only: new connections see both, an open one keeps working.
fn defaults_dual_certificates_and_reload(path: Path, tag: &str) {
    let s = Site::start(path, tag, "");

    // RSA-only signature algorithms: the RSA certificate, in TLS 1.3 and TLS 1.2.
    let rsa13 = s.s_client_ok(&["-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"]);
    assert!(
        rsa13.served_is(&s.rsa) && rsa13.text.contains("TLSv1.3"),
        "TLS 1.3, RSA sigalgs: the RSA certificate ({}):\n{}",
        rsa13.line("Peer signature type"),
        rsa13.text
    );
    let rsa12 = s.s_client_ok(&[
        "-tls1_2",
        "-cipher",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "-sigalgs",
        "RSA-PSS+SHA256:RSA+SHA256",
    ]);
    assert!(
        rsa12.served_is(&s.rsa)
            && rsa12.text.contains("ECDHE-RSA-AES128-GCM-SHA256")
            && rsa12.text.contains("TLSv1.2"),
        "TLS 1.2, ECDHE-RSA: the RSA certificate:\n{}",
        rsa12.text
    );
    // Only the suite says RSA here: the signature algorithms would allow ECDSA too.
    let rsa12_suite = s.s_client_ok(&["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]);
    assert!(
        rsa12_suite.served_is(&s.rsa),
        "TLS 1.2, an ECDHE_RSA suite only: the RSA certificate:\n{}",
        rsa12_suite.text
    );
    // openssl's defaults allow both: the ECDSA one is preferred.
    let default = s.s_client_ok(&[]);
    assert!(
        default.served_is(&s.ecdsa) && default.line("Peer signature type").contains("ECDSA"),
        "openssl defaults: the ECDSA certificate:\n{}",
        default.text
    );
    let default12 = s.s_client_ok(&["-tls1_2"]);
    assert!(
        default12.served_is(&s.ecdsa) && default12.text.contains("ECDHE-ECDSA"),
        "TLS 1.2 defaults: the ECDSA certificate and an ECDHE_ECDSA suite:\n{}",
        default12.text
    );

    // Without strict_sni, an unknown name and no name get the default certificate.
    for args in [&["-servername", UNKNOWN][..], &["-noservername"]] {
        let c = s.s_client_ok(args);
        assert!(
            c.served_is(&s.ecdsa),
            "{args:?}: the default certificate:\n{}",
            c.text
        );
    }
    assert_eq!(s.counter("sni_refused"), 0, "nothing refused");

    // Post-quantum by default: openssl 3.0 cannot offer X25519MLKEM768, rustls can. tern
    // follows the client's preference: first gets it, last (after X25519) does not.
    assert_eq!(
        s.rustls_group(true),
        Some(NamedGroup::X25519MLKEM768),
        "a client preferring X25519MLKEM768 gets it by default"
    );
    assert_eq!(s.rustls_group(false), Some(NamedGroup::X25519));
    let group = s.s_client_ok(&[]);
    assert!(
        group
            .line("Server Temp Key")
            .starts_with("Server Temp Key: X25519"),
        "openssl (no ML-KEM) falls back to X25519: {}",
        group.line("Server Temp Key")
    );

    // An open connection across the reload.
    let mut open = {
        let (addr, cfg) = (s.addr(), client_config(&s.ecdsa.cert_der));
        s.rig.client.run(move || {
            let mut t = tls_connect(addr, &cfg);
            echo_round_trip(&mut t, b"before the reload\n");
            t
        })
    };
    let before = s.s_client_ok(&[]);
    assert!(
        before.text.contains("TLS_AES_256_GCM_SHA384"),
        "before the reload: the provider's first suite: {}",
        before.line("New, TLSv1.3, Cipher is")
    );

    let answer = s.reload(&format!("strict_sni = true\n{CHACHA_ONLY}"));
    assert!(
        answer.starts_with("ok: generation 2 (changed: tls)"),
        "reload: {answer}"
    );
    s.s_client_unrecognized_name(&["-servername", UNKNOWN]);
    let after = s.s_client_ok(&[]);
    assert!(
        after
            .text
            .contains("Cipher is TLS_CHACHA20_POLY1305_SHA256")
            && after.served_is(&s.ecdsa),
        "after the reload: ChaCha20 for a new connection:\n{}",
        after.text
    );
    s.expect_counter("sni_refused", 1);
    s.rig
        .client
        .run(move || echo_round_trip(&mut open, b"after the reload\n"));
}

#[test]
fn kernel_defaults_dual_certificates_and_reload() {
    defaults_dual_certificates_and_reload(Path::Kernel, "tlss-k");
}

#[test]
fn bypass_defaults_dual_certificates_and_reload() {
    defaults_dual_certificates_and_reload(Path::Bypass, "tlss-b");
}

/// Started with `strict_sni`, ChaCha20 only and `groups = ["secp384r1"]`.
fn strict_sni_suites_and_groups(path: Path, tag: &str) {
    let s = Site::start(
        path,
        tag,
        &format!("strict_sni = true\ngroups = [\"secp384r1\"]\n{CHACHA_ONLY}"),
    );
    let errors_before = s.counter("tls_errors");

    // strict_sni: an unknown name, and no name, are refused with unrecognized_name.
    s.s_client_unrecognized_name(&["-servername", UNKNOWN]);
    s.s_client_unrecognized_name(&["-noservername"]);
    s.s_client_unrecognized_name(&["-tls1_2", "-servername", UNKNOWN]);
    s.expect_counter("sni_refused", 3);

    // The known name works; the suite is tern's choice, the group the only one enabled
    // (the client's X25519 key share is answered with a HelloRetryRequest). The client's
    // groups leave out P-256, the ECDSA certificate's curve: tern serves the RSA one (RFC 8422
    // §5.1 for TLS 1.2; tern cannot tell the version when it chooses).
    let c = s.s_client_ok(&["-groups", "X25519:secp384r1"]);
    assert!(
        c.served_is(&s.rsa)
            && c.text.contains("Cipher is TLS_CHACHA20_POLY1305_SHA256")
            && c.line("Server Temp Key").contains("secp384r1"),
        "ChaCha20 and secp384r1 ({}):\n{}",
        c.line("Server Temp Key"),
        c.text
    );
    // TLS 1.2 clients (openssl) hold the certificate's curve to their group list (RFC 8422
    // §5.1): without P-256 they get the RSA certificate, with it the ECDSA one; tern still
    // picks the only group it enables.
    let c12 = s.s_client_ok(&["-tls1_2", "-groups", "X25519:secp384r1"]);
    assert!(
        c12.served_is(&s.rsa)
            && c12.text.contains("ECDHE-RSA-CHACHA20-POLY1305")
            && c12.line("Server Temp Key").contains("secp384r1"),
        "TLS 1.2 without P-256: RSA, ChaCha20 and secp384r1 ({}):\n{}",
        c12.line("Server Temp Key"),
        c12.text
    );
    let c12 = s.s_client_ok(&["-tls1_2", "-groups", "X25519:prime256v1:secp384r1"]);
    assert!(
        c12.text.contains("ECDHE-ECDSA-CHACHA20-POLY1305")
            && c12.line("Server Temp Key").contains("secp384r1"),
        "TLS 1.2: ChaCha20 and secp384r1 ({}):\n{}",
        c12.line("Server Temp Key"),
        c12.text
    );
    // A rustls client that offers everything also ends on secp384r1.
    assert_eq!(s.rustls_group(true), Some(NamedGroup::secp384r1));

    // Offering only what tern does not enable fails the handshake: a suite, then a group.
    for args in [
        &["-ciphersuites", "TLS_AES_128_GCM_SHA256"][..],
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
        &["-groups", "X25519:prime256v1"],
    ] {
        let c = s.s_client(args);
        assert!(
            !c.ok
                && c.text.contains("handshake failure")
                && !c.text.contains("-----BEGIN CERTIFICATE-----"),
            "{args:?}: the handshake fails:\n{}",
            c.text
        );
    }
    // Those are TLS errors, not SNI refusals.
    s.expect_counter("sni_refused", 3);
    assert!(
        s.counter("tls_errors") >= errors_before + 6,
        "every refusal and failure is a TLS error"
    );
}

#[test]
fn kernel_strict_sni_suites_and_groups() {
    strict_sni_suites_and_groups(Path::Kernel, "tlsg-k");
}

#[test]
fn bypass_strict_sni_suites_and_groups() {
    strict_sni_suites_and_groups(Path::Bypass, "tlsg-b");
}
