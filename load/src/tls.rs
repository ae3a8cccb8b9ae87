//! The rustls client side of tern-load: building `ClientConfig`s from the command line, the
//! `--insecure` verifier, and the per-worker session store of resumed mode.
//!
//! Owns: provider selection (aws-lc-rs, restricted to the `--kx` groups and `--ciphers`
//! suites), protocol versions, trust (a `--ca` PEM file, or no chain check), ALPN, resumption
//! (off everywhere except resumed mode), and naming what a handshake negotiated. Does not own:
//! record I/O (`conn`).
//!
//! Specs: RFC 8446 (TLS 1.3; §2.2 and §4.6.1 resumption with tickets, which clients use once:
//! Appendix C.4), RFC 5246 and RFC 5077 (TLS 1.2 session ids and tickets), RFC 7301 (ALPN).
//! `--insecure` skips the certificate *chain and name* checks only: the server's handshake
//! signature (CertificateVerify, or the TLS 1.2 ServerKeyExchange) is still verified, so the
//! client does the same public-key work per handshake as a verifying client minus chain
//! building — honest for benchmarks, and the server must still hold the key.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::crypto::{aws_lc_rs, SupportedKxGroup, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, NamedGroup, RootCertStore,
    SignatureScheme, SupportedCipherSuite, SupportedProtocolVersion,
};

use crate::stats::TlsInfo;

/// Why a client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("--kx: unknown key exchange group {0:?} (known: {known})", known = known_groups())]
    UnknownGroup(String),
    #[error("--ciphers: unknown cipher suite {0:?} (known: {known})", known = known_suites())]
    UnknownSuite(String),
    #[error("--ca {}: {source}", path.display())]
    CaRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--ca {}: no usable certificate in the file", path.display())]
    CaEmpty { path: PathBuf },
    #[error("the TLS options do not combine: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Which protocol versions to offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    Tls13,
    Tls12,
    Both,
}

impl Versions {
    fn list(self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static TLS12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
        static BOTH: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            Versions::Tls13 => &TLS13,
            Versions::Tls12 => &TLS12,
            Versions::Both => &BOTH,
        }
    }
}

/// How the server certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Chain and name checked against the roots in this PEM file.
    Roots(PathBuf),
    /// No chain or name check (handshake signatures are still verified).
    Insecure,
}

/// The validated TLS options (see `cli`).
#[derive(Clone, Debug)]
pub struct TlsOptions {
    pub versions: Versions,
    pub kx: Vec<&'static dyn SupportedKxGroup>,
    /// Empty: the provider's default suites.
    pub suites: Vec<SupportedCipherSuite>,
    pub alpn: Vec<Vec<u8>>,
    pub trust: Trust,
}

fn known_groups() -> String {
    let names: Vec<String> = aws_lc_rs::ALL_KX_GROUPS
        .iter()
        .map(|g| group_name(g.name()))
        .collect();
    names.join(", ")
}

fn known_suites() -> String {
    let names: Vec<String> = aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    names.join(", ")
}

/// The name a group is given on the command line: rustls's enum name, lower case
/// (`x25519`, `secp256r1`, `x25519mlkem768`, …).
fn group_name(g: NamedGroup) -> String {
    format!("{g:?}").to_ascii_lowercase()
}

/// Resolves `--kx` names; `p256`/`p384` are accepted for the NIST curves.
pub fn parse_groups(list: &str) -> Result<Vec<&'static dyn SupportedKxGroup>, TlsSetupError> {
    let mut out: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let want = match raw.to_ascii_lowercase().as_str() {
            "p256" | "p-256" | "prime256v1" => "secp256r1".to_string(),
            "p384" | "p-384" => "secp384r1".to_string(),
            other => other.to_string(),
        };
        let group = aws_lc_rs::ALL_KX_GROUPS
            .iter()
            .find(|g| group_name(g.name()) == want)
            .ok_or_else(|| TlsSetupError::UnknownGroup(raw.to_string()))?;
        if !out.iter().any(|g| g.name() == group.name()) {
            out.push(*group);
        }
    }
    if out.is_empty() {
        return Err(TlsSetupError::UnknownGroup(list.to_string()));
    }
    Ok(out)
}

/// Resolves `--ciphers` names (IANA-style, as rustls spells them; case-insensitive).
pub fn parse_suites(list: &str) -> Result<Vec<SupportedCipherSuite>, TlsSetupError> {
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let suite = aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .find(|s| format!("{:?}", s.suite()).eq_ignore_ascii_case(raw))
            .ok_or_else(|| TlsSetupError::UnknownSuite(raw.to_string()))?;
        out.push(*suite);
    }
    if out.is_empty() {
        return Err(TlsSetupError::UnknownSuite(list.to_string()));
    }
    Ok(out)
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let read_err = |source| TlsSetupError::CaRead {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read_err)?);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_reader_iter(&mut reader) {
        // A certificate webpki cannot parse is skipped; an empty store is the error.
        let cert = cert.map_err(|e| read_err(std::io::Error::other(e)))?;
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::CaEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// Builds a client configuration. `store`: `Some` enables resumption with that store (resumed
/// mode, one store per worker); `None` disables it so every handshake is a full one.
pub fn client_config(
    opts: &TlsOptions,
    store: Option<Arc<dyn ClientSessionStore>>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = opts.kx.clone();
    if !opts.suites.is_empty() {
        provider.cipher_suites = opts.suites.clone();
    }
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(opts.versions.list())?;
    let mut config = match &opts.trust {
        Trust::Roots(path) => builder
            .with_root_certificates(read_roots(path)?)
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignaturesOnly {
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = opts.alpn.clone();
    config.resumption = match store {
        Some(store) => Resumption::store(store),
        None => Resumption::disabled(),
    };
    Ok(Arc::new(config))
}

/// `--insecure`: accepts any certificate chain and name, verifies handshake signatures.
#[derive(Debug)]
struct SignaturesOnly {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SignaturesOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Resumed mode's session store: one per worker, so no lock is ever contended.
///
/// Unlike `ClientSessionMemoryCache` it keeps up to `capacity` TLS 1.3 tickets rather than 8:
/// every connection spends one ticket (RFC 8446 Appendix C.4: tickets are single-use) and the
/// server hands out one or more new ones per connection, so with more than 8 connections in
/// flight a cap of 8 would turn resumptions into full handshakes and measure the wrong thing.
/// A load generator talks to one server name, so entries are not keyed by name.
#[derive(Debug)]
pub struct TicketStore {
    capacity: usize,
    inner: Mutex<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    /// Newest last; `take` pops the newest, like rustls's own cache.
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl TicketStore {
    pub fn new(capacity: usize) -> TicketStore {
        TicketStore {
            capacity: capacity.max(1),
            inner: Mutex::new(StoreInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.lock().kx_hint = Some(group);
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().kx_hint
    }

    fn set_tls12_session(&self, _: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.lock().tls12 = Some(value);
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock().tls12.clone()
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {
        self.lock().tls12 = None;
    }

    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut inner = self.lock();
        if inner.tls13.len() >= self.capacity {
            inner.tls13.pop_front();
        }
        inner.tls13.push_back(value);
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.lock().tls13.pop_back()
    }
}

/// What `conn` negotiated, named as rustls's enums print (`TLSv1_3`,
/// `TLS13_AES_128_GCM_SHA256`, `X25519`).
pub fn negotiated(conn: &ClientConnection) -> TlsInfo {
    TlsInfo {
        version: conn
            .protocol_version()
            .map_or_else(|| "unknown".into(), |v| format!("{v:?}")),
        cipher_suite: conn
            .negotiated_cipher_suite()
            .map_or_else(|| "unknown".into(), |s| format!("{:?}", s.suite())),
        kx_group: conn
            .negotiated_key_exchange_group()
            .map_or_else(|| "none".into(), |g| format!("{:?}", g.name())),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_and_suite_names() {
        let g = parse_groups("x25519, P256,secp384r1,x25519").expect("known groups");
        let names: Vec<NamedGroup> = g.iter().map(|g| g.name()).collect();
        assert_eq!(
            names,
            vec![
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ],
            "aliases resolve, duplicates drop"
        );
        assert!(parse_groups("x448").is_err(), "unknown group");
        assert!(parse_groups(" , ").is_err(), "empty list");
        let s = parse_suites("tls13_aes_128_gcm_sha256").expect("known suite");
        assert_eq!(
            format!("{:?}", s[0].suite()),
            "TLS13_AES_128_GCM_SHA256",
            "case-insensitive suite name"
        );
        assert!(parse_suites("RC4").is_err(), "unknown suite");
    }

    #[test]
    fn insecure_config_builds_and_incompatible_options_fail() {
        let opts = TlsOptions {
            versions: Versions::Tls13,
            kx: parse_groups("x25519").expect("x25519"),
            suites: Vec::new(),
            alpn: vec![b"http/1.1".to_vec()],
            trust: Trust::Insecure,
        };
        let cfg = client_config(&opts, None).expect("TLS 1.3 + X25519 builds");
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"http/1.1".to_vec()],
            "ALPN carried over"
        );
        let tls12_suites_only = TlsOptions {
            suites: parse_suites("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256").expect("suite"),
            ..opts
        };
        assert!(
            client_config(&tls12_suites_only, None).is_err(),
            "TLS 1.3 with only TLS 1.2 suites cannot work"
        );
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let opts = TlsOptions {
            versions: Versions::Tls13,
            kx: parse_groups("x25519").expect("x25519"),
            suites: Vec::new(),
            alpn: Vec::new(),
            trust: Trust::Roots("/nonexistent/ca.pem".into()),
        };
        let err = client_config(&opts, None).expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
