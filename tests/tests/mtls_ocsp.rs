//! End-to-end tests of OCSP stapling (`[[certificate]] ocsp`, RFC 6066 §8) and client
//! certificates (`[tls] client_auth` / `client_ca`, reported to the backend in the PROXY v2 SSL
//! TLV, haproxy's `proxy-protocol.txt` §2.2.6), on both data paths of one tern: the kernel TLS
//! listener on :443 and the bypass TLS listener on :4443.
//!
//! Both features are switched on by rewriting the running tern's configuration and reloading
//! it (`tern ctl reload`), so the reload path that re-reads the OCSP file and the client CA
//! bundle is what is tested. OCSP responses come from `openssl ocsp` (a real responder's
//! encoding), client certificates from rcgen; clients are `openssl s_client -status` and
//! rustls. Every wait is bounded (`wait_stats`, socket timeouts).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use support::*;
use tern_tests::backend::{Backend, ProxyExpect};
use tern_tests::rig::{tern_binary, Rig, TempDir};

const BYPASS_PORT: u16 = 4443;

/// tern with a kernel and a bypass TLS listener in front of `backends`.
fn start(rig: Rig, dir: TempDir, backends: Vec<SocketAddr>, proxy_protocol: &str) -> Stack {
    let listener_extra = format!(
        "interface = \"{iface}\"\n\n[[listener]]\naddress = \"{bypass}\"\nmode = \"bypass\"\n\
         interface = \"{iface}\"\ntls = true\n",
        iface = rig.server_if,
        bypass = rig.server_addr(BYPASS_PORT),
    );
    Stack::start(
        rig,
        dir,
        StackOptions {
            backends,
            proxy_protocol,
            listener_extra: &listener_extra,
            toml_extra: "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n\n\
                         [limits]\nmax_connections_per_worker = 1024\n",
            ..StackOptions::default()
        },
    )
}

/// Both listeners' addresses: kernel, bypass.
fn both(s: &Stack) -> [SocketAddr; 2] {
    [s.rig.server_addr(443), s.rig.server_addr(BYPASS_PORT)]
}

/// Rewrites tern's configuration with `edit` and reloads it; panics unless the reload is
/// accepted.
#[track_caller]
fn reload_with(s: &Stack, edit: impl FnOnce(String) -> String) {
    let path = s.tern.config_path().to_path_buf();
    let text = std::fs::read_to_string(&path).expect("read the configuration");
    let new = edit(text);
    std::fs::write(&path, new).expect("write the configuration");
    let out = Command::new(tern_binary())
        .args(["ctl", "--socket"])
        .arg(&s.control)
        .arg("reload")
        .output()
        .expect("run tern ctl reload");
    assert_ok(&out, "reload", &s.log());
}

#[track_caller]
fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An OCSP response for the stack's (self-signed) certificate saying "good", signed by the
/// certificate's own key (its issuer is itself), valid for a day. Returns the DER.
fn ocsp_response(s: &Stack) -> Vec<u8> {
    let dir = s.dir.path();
    let (cert, key) = (&s.cert.cert, &s.cert.key);
    let serial = run(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(cert),
        "openssl x509 -serial",
    );
    let serial = String::from_utf8_lossy(&serial.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string();
    // ca(1) index: status, expiry, revocation date, serial (hex), file, subject.
    let index = dir.join("index.txt");
    std::fs::write(
        &index,
        format!("V\t491231235959Z\t\t{serial}\tunknown\t/CN={NAME}\n"),
    )
    .expect("write index");
    let req = dir.join("ocsp.req");
    run(
        Command::new("openssl")
            .args(["ocsp", "-no_nonce", "-issuer"])
            .arg(cert)
            .arg("-cert")
            .arg(cert)
            .arg("-reqout")
            .arg(&req),
        "openssl ocsp request",
    );
    let resp = dir.join("ocsp-out.der");
    run(
        Command::new("openssl")
            .args(["ocsp", "-index"])
            .arg(&index)
            .arg("-rsigner")
            .arg(cert)
            .arg("-rkey")
            .arg(key)
            .arg("-CA")
            .arg(cert)
            .arg("-reqin")
            .arg(&req)
            .args(["-ndays", "1", "-respout"])
            .arg(&resp),
        "openssl ocsp response",
    );
    std::fs::read(&resp).expect("read the response")
}

/// `openssl s_client -status` against `addr`: whether tern stapled an OCSP response.
fn stapled(s: &Stack, addr: SocketAddr) -> (bool, String) {
    let out = s
        .rig
        .client_command("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-status",
            "-servername",
            NAME,
            "-connect",
        ])
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("OCSP response:"),
        "s_client asked for the status: {text}"
    );
    (text.contains("OCSP Response Status: successful"), text)
}

/// A stapled OCSP response reaches `openssl s_client -status` on both paths; a stale one (its
/// nextUpdate moved into the past) is not stapled after the reload, and the log says why and
/// which file.
#[test]
fn ocsp_response_is_stapled_on_both_paths_until_stale() {
    let (rig, dir) = (Rig::isolated("ocsp", 2), TempDir::new("ocsp"));
    let backend = Backend::echo(server_listener(&rig));
    let s = start(rig, dir, vec![backend.addr()], "none");
    for addr in both(&s) {
        let (yes, text) = stapled(&s, addr);
        assert!(!yes, "nothing is stapled without `ocsp` ({addr}): {text}");
    }

    let der = ocsp_response(&s);
    let good = s.dir.join("good.der");
    std::fs::write(&good, &der).expect("write");
    let ocsp_line = |p: &std::path::Path| format!("default = true\nocsp = \"{}\"\n", p.display());
    reload_with(&s, |t| t.replacen("default = true\n", &ocsp_line(&good), 1));
    for addr in both(&s) {
        let (yes, text) = stapled(&s, addr);
        assert!(yes, "the response is stapled ({addr}): {text}");
        assert!(text.contains("Cert Status: good"), "{text}");
    }

    // nextUpdate is `[0] EXPLICIT GeneralizedTime` (a0 11 18 0f YYYY...): move it to 2001.
    // The signature no longer matches, which tern does not check; the client would.
    let mut stale = der.clone();
    let at = stale
        .windows(4)
        .position(|w| w == [0xa0, 0x11, 0x18, 0x0f])
        .expect("nextUpdate in openssl's response");
    stale[at + 4..at + 8].copy_from_slice(b"2001");
    let stale_path = s.dir.join("stale.der");
    std::fs::write(&stale_path, &stale).expect("write");
    reload_with(&s, |t| {
        t.replacen(&ocsp_line(&good), &ocsp_line(&stale_path), 1)
    });
    for addr in both(&s) {
        let (yes, text) = stapled(&s, addr);
        assert!(!yes, "a stale response is not stapled ({addr}): {text}");
    }
    let log = s.log();
    assert!(
        log.lines().any(|l| l.contains("OCSP response not stapled")
            && l.contains("stale")
            && l.contains("stale.der")),
        "the log names the stale file: {log}"
    );
}

/// A CA and a client certificate it issued for `cn`.
struct ClientPki {
    ca_pem: String,
    leaf: CertificateDer<'static>,
    key: Vec<u8>,
}

fn client_pki(cn: &str) -> ClientPki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "client CA");
    let ca = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("client key");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    leaf.distinguished_name.push(DnType::CommonName, cn);
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).expect("leaf");
    ClientPki {
        ca_pem: ca.pem(),
        leaf: leaf.der().clone(),
        key: key.serialize_der(),
    }
}

/// A client trusting the stack's certificate, presenting `pki`'s certificate if given.
fn mtls_client(s: &Stack, pki: Option<&ClientPki>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(s.cert.cert_der.clone()))
        .expect("root");
    let b = ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match pki {
        None => b.with_no_client_auth(),
        Some(p) => b
            .with_client_auth_cert(
                vec![p.leaf.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.key.clone())),
            )
            .expect("client cert"),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One request through tern to `addr`; `Err` when the handshake or the request fails (the
/// server may refuse a client certificate only after the client thinks the handshake is done,
/// as in TLS 1.3, so the request's read is where a refusal shows).
fn request(s: &Stack, addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<String, String> {
    s.rig.client.run(move || {
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(cfg, ServerName::try_from(NAME).expect("name"))
            .map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, sock);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: tern.test\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("request: {e}"))?;
        let mut resp = Vec::new();
        tls.read_to_end(&mut resp)
            .map_err(|e| format!("response: {e}"))?;
        Ok(String::from_utf8_lossy(&resp).into_owned())
    })
}

/// `client_auth = "optional"`, then `"required"`, on both paths: a good client certificate's
/// CN reaches the backend with verify 0 and PP2_CLIENT_CERT_CONN|SESS; no certificate is let
/// in (optional) with only PP2_CLIENT_SSL and verify ≠ 0, or refused (required); a certificate
/// from another CA is refused with an alert and counted in tls_errors.
#[test]
fn client_certificates_are_verified_and_reported_in_proxy_v2() {
    let (rig, dir) = (Rig::isolated("mtls", 2), TempDir::new("mtls"));
    let (backend, records) = Backend::proxy_aware(server_listener(&rig), ProxyExpect::V2);
    let s = start(rig, dir, vec![backend.addr()], "v2");
    let pki = client_pki("alice");
    let stranger = client_pki("mallory");
    let ca = s.dir.join("client-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write CA");
    let tls_line = "[tls]\nalpn = [\"http/1.1\"]\n";
    let with_auth = |mode: &str| {
        format!(
            "{tls_line}client_auth = \"{mode}\"\nclient_ca = \"{}\"\n",
            ca.display()
        )
    };
    reload_with(&s, |t| t.replacen(tls_line, &with_auth("optional"), 1));

    let header = || {
        records
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend saw a connection")
            .expect_header()
            .clone()
    };
    for addr in both(&s) {
        let resp = request(&s, addr, mtls_client(&s, Some(&pki))).expect("good certificate");
        assert!(resp.starts_with("HTTP/1.1 200"), "{addr}: {resp}");
        let h = header();
        assert_proxy_v2_tls(&h);
        let ssl = h.ssl.expect("SSL TLV");
        assert_eq!(ssl.client, 0x07, "{addr}: SSL | CERT_CONN | CERT_SESS");
        assert_eq!(ssl.verify, 0, "{addr}: verified");
        assert_eq!(ssl.cn.as_deref(), Some("alice"), "{addr}");

        let resp = request(&s, addr, mtls_client(&s, None)).expect("optional: no certificate");
        assert!(resp.starts_with("HTTP/1.1 200"), "{addr}: {resp}");
        let ssl = header().ssl.expect("SSL TLV");
        assert_eq!(ssl.client, 0x01, "{addr}: no client certificate bits");
        assert_ne!(ssl.verify, 0, "{addr}");
        assert_eq!(ssl.cn, None, "{addr}");
    }

    let bypass_errors = |st: &serde_json::Value| st["bypass"]["proxy"]["tls_errors"].as_u64();
    let before = s.stats();
    let (kernel_before, bypass_before) = (s.total("tls_errors"), bypass_errors(&before));
    reload_with(&s, |t| {
        t.replacen(&with_auth("optional"), &with_auth("required"), 1)
    });
    for addr in both(&s) {
        let resp = request(&s, addr, mtls_client(&s, Some(&pki))).expect("good certificate");
        assert!(resp.starts_with("HTTP/1.1 200"), "{addr}: {resp}");
        assert_eq!(header().ssl.expect("SSL").cn.as_deref(), Some("alice"));

        for (what, pki) in [("no certificate", None), ("another CA", Some(&stranger))] {
            let r = request(&s, addr, mtls_client(&s, pki));
            assert!(r.is_err(), "{addr}: {what} must be refused: {r:?}");
        }
    }
    assert!(
        records.recv_timeout(Duration::from_millis(500)).is_err(),
        "refused clients never reach the backend"
    );
    // Two refusals per path: `total` counts the kernel workers' (and may include the bypass
    // workers'), `bypass.proxy` the bypass workers'.
    wait_stats(&s, "tls_errors counts the refusals", |st| {
        st["total"]["tls_errors"].as_u64().unwrap_or(0) >= kernel_before + 2
            && bypass_errors(st).unwrap_or(0) >= bypass_before.unwrap_or(0) + 2
    });
}
