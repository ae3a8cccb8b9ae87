//! Tests for the TLS configuration: in-memory handshakes between a rustls client and the
//! server configuration built by [`server_config`], with bytes pumped through `Vec`s.
//!
//! Certificates come from a throw-away CA made with rcgen per test. RSA uses the fixed test key
//! below because the workspace's rcgen is built with `ring`, which cannot generate RSA keys.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct, HandshakeKind,
    RootCertStore, SideData, SignatureScheme,
};

use super::*;
use crate::config::{TlsSettings, TlsVersion};

mod options;

/// A 2048-bit RSA key in PKCS#8, made with `openssl genpkey` for these tests only.
const TEST_RSA_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCXxAOTkaV5NGnW\n\
WHeZwsk1NmuimwBle1R00DUlLhPTN/m4A4AhPyw4TtoK75ylcsGe0AMxFaFw2BR0\n\
V5oaAVhzmM8qqQeSGUv2AYiNfhDul6VcVvVr61dlkaYVeHaOFJ22xASlwNi+Kk0h\n\
YBVyJjJUeQeh676qphHtZHlWlguqIK4uBCUWLFmDe0av5n6hrimmrqhTQYH8at2U\n\
FXshFiz8DQadOzpyybOadg1tLn95uibnhKmE5YNsKiRIvsEMbD1cygFu0sgRQpnF\n\
SEytgFdcQP+Z9vWWbQFM1cHN1OMxHodsi+PDNNyImz6mvQkFEziagWqJyqzuTXx9\n\
RcDGe5dPAgMBAAECggEAF6qtlBmmYFxYFOD+5a+GiRHPfzAEw86TwROm9gFVfh7A\n\
hn2lQYoEb1N8lTAAkZxvrUBq/wCMiHhp2CrBEUUccgpmZBSv5YykV9ytWsNKCKsF\n\
Un0NEKNGocQwzjBW7JkybwnqX57PLfiSxp2hOofSWXH2Sr3kod/787UzZtlHQGRS\n\
ymlPorCCumNYqhYUJXeiQ8ATL9jLqo30GwR/yxWTnrxDWl3tye4JTZi5BH64ps2N\n\
ZDVXhlW2tcy999rlRGRCsVN0RJjOCdAwG2ntrfd5dlt2nUOWBDsSaiVY4bw/02Gm\n\
qQcwPC+tP3gPSHmoNueDj9Ty6QKG6/Q0YObboG3UQQKBgQDHPtJuyc5d/t8NIfBq\n\
UdkramMmMbewe/VHtTJgqkNaw+UuXbpt7dQNNH+UDnlQv2or0t3jTdgiIPJk+gie\n\
nPcvb9K6pwL4VSza+HxK8v6ZMedXJWHa+N9gNWQJJKLta/oQxrIHWfrYxbQl+MPW\n\
rjtVkglRG9EmLN0RqrYHzbOFSQKBgQDC/uwgATd4yktkAGqNDxxweVsQtiEGny3H\n\
V87kxQrDSEpCfWRW5KadY87U0XA4G6W+UWbbKf7s+pLuYm2qN+kanFrUwaxGs5zc\n\
d8erw2UzjITRas7vVeLUXHwqgZbrDvMdtQjSNO06lvv35vYSw3ZVrGBibFXolazt\n\
WYtM+oxv1wKBgAuUgiSARCdAZfRccZ2sTiPw1fxlTVjLi5D0Xg4yNyHyWsKcHfa/\n\
qOBvma6gPLrNtT0Az3ajkplBMvVddtzJILC4HhZNGKYYRTgg0xCEGPoMZXayLILO\n\
jiUIVV0WrQWBjhIlijlVKHgq3XKLh85VaAtsJnB5XmmKl/qr4lKHyRRJAoGBALyw\n\
5lmKE93FE/MvG+xoJQMJy/993rODsU7nP4PM0L9r4sA4irIzDK/c9zalfMwupNJn\n\
/voxx0gWqbwYbzp6ZA2mI5ch2s2H3VDSb9tcdz/MyHHFw32CRL9ux5ByWlIX41Zp\n\
6qFPKgi6NhUL4C8ECiyZY6OaZf9tZys+rTfOc7t9AoGALu85zCYv8EWRrwXH/WqJ\n\
Prol32OomTVfaN+lxZxTT8eUohWf7l5CZgCxzpIo8kazjjSvpY9EoQdfTUYotnGS\n\
uW+HZ2xfu4cKt7qKfxAb3uvepznGY2Ow7qS4DsUyKzSehycjY5zsleBr6kkFmbiO\n\
l5o0KcEwUPt6eWi2etUtVtM=\n\
-----END PRIVATE KEY-----\n";

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

// ---- Certificates ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    P256,
    P384,
    Ed25519,
    RsaPkcs8,
    /// The same RSA key, handed to tern as PKCS#1 ("RSA PRIVATE KEY").
    RsaPkcs1,
}

impl Key {
    fn generate(self) -> KeyPair {
        let key = match self {
            Key::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            Key::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            Key::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            Key::RsaPkcs8 | Key::RsaPkcs1 => KeyPair::from_pem(TEST_RSA_KEY),
        };
        key.unwrap_or_else(|e| panic!("cannot make a {self:?} test key: {e}"))
    }

    fn der(self, key: &KeyPair) -> PrivateKeyDer<'static> {
        let pkcs8 = key.serialize_der();
        match self {
            Key::RsaPkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(pkcs1_of(&pkcs8))),
            _ => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
        }
    }
}

/// One DER element: (tag, contents, rest). Definite lengths only, which is all DER has.
#[track_caller]
fn der_element(input: &[u8]) -> (u8, &[u8], &[u8]) {
    assert!(input.len() >= 2, "truncated DER");
    let (len, header) = match input[1] {
        short @ 0..=0x7f => (usize::from(short), 2),
        long => {
            let n = usize::from(long & 0x7f);
            let len = input[2..2 + n]
                .iter()
                .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
            (len, 2 + n)
        }
    };
    (
        input[0],
        &input[header..header + len],
        &input[header + len..],
    )
}

/// The RSAPrivateKey (PKCS#1) inside a PKCS#8 PrivateKeyInfo (RFC 5208 §5):
/// SEQUENCE { version INTEGER, algorithm AlgorithmIdentifier, privateKey OCTET STRING }.
#[track_caller]
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    let (tag, info, _) = der_element(pkcs8);
    assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
    let (tag, _, rest) = der_element(info);
    assert_eq!(tag, 0x02, "version INTEGER");
    let (tag, _, rest) = der_element(rest);
    assert_eq!(tag, 0x30, "AlgorithmIdentifier SEQUENCE");
    let (tag, key, _) = der_element(rest);
    assert_eq!(tag, 0x04, "privateKey OCTET STRING");
    key.to_vec()
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tern test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A leaf for `names` signed by this CA, as the config module would hand it over: chain is
    /// leaf + CA, names as given, paths that name the test certificate.
    fn issue(&self, label: &str, names: &[&str], kind: Key, default: bool) -> config::Certificate {
        let key = kind.generate();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names.clone())
            .unwrap_or_else(|e| panic!("leaf params for {names:?}: {e}"));
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        config::Certificate {
            cert_path: PathBuf::from(format!("/test/{label}.pem")),
            key_path: PathBuf::from(format!("/test/{label}.key")),
            chain: vec![cert.der().clone(), self.cert.der().clone()],
            key: Arc::new(kind.der(&key)),
            names,
            default,
            ocsp: None,
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert.der().clone())
            .expect("CA as trust anchor");
        roots
    }
}

fn settings() -> TlsSettings {
    TlsSettings {
        alpn: Vec::new(),
        versions: vec![TlsVersion::Tls12, TlsVersion::Tls13],
        session_cache_entries: 64,
        tickets: true,
        ticket_keys: None,
        client_auth: None,
        cipher_suites: None,
        groups: None,
        strict_sni: false,
    }
}

#[track_caller]
fn build(certs: &[config::Certificate], settings: &TlsSettings) -> Arc<ServerConfig> {
    server_config(certs, settings).unwrap_or_else(|e| panic!("server_config failed: {e}"))
}

// ---- Clients ----

/// Accepts any certificate chain but still checks the handshake signature against the leaf,
/// so a handshake only completes when the server holds the key of the certificate it sent.
#[derive(Debug)]
struct AnyChain(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyChain {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn client_with(
    provider: CryptoProvider,
    versions: &[&'static SupportedProtocolVersion],
) -> ClientConfig {
    let algorithms = provider.signature_verification_algorithms;
    ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("client protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyChain(algorithms)))
        .with_no_client_auth()
}

fn client(versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    Arc::new(client_with(provider(), versions))
}

fn client_alpn(protocols: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = client_with(provider(), BOTH);
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A client that verifies the chain against `ca` and the name, as a browser would.
fn client_verifying(ca: &Ca) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(BOTH)
            .expect("client protocol versions")
            .with_root_certificates(ca.roots())
            .with_no_client_auth(),
    )
}

// ---- Moving bytes ----

/// Moves everything `from` wants to send into `to` and lets `to` process it. Returns the bytes
/// moved, or the error `to` raised while processing them.
fn transfer<A: SideData, B: SideData>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
) -> Result<usize, rustls::Error> {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("writing TLS into a Vec");
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("reading TLS from a slice");
        to.process_new_packets()?;
    }
    Ok(wire.len())
}

/// Runs the handshake (and the post-handshake tickets) until neither side has anything to send.
#[track_caller]
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
    for _ in 0..16 {
        let moved = transfer(client, server)? + transfer(server, client)?;
        if moved == 0 {
            assert!(
                !client.is_handshaking() && !server.is_handshaking(),
                "handshake stalled: nothing to send but still handshaking"
            );
            return Ok(());
        }
    }
    panic!("handshake did not settle in 16 rounds");
}

/// A client and a server connection for `sni` (`None`: the client sends no SNI).
fn start(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    sni: Option<&str>,
) -> (ClientConnection, ServerConnection) {
    let (client, name) = match sni {
        Some(name) => (Arc::clone(client), name),
        None => {
            let mut no_sni = (**client).clone();
            no_sni.enable_sni = false;
            (Arc::new(no_sni), "no-sni.invalid")
        }
    };
    let name = ServerName::try_from(name.to_owned()).expect("test server name");
    (
        ClientConnection::new(client, name).expect("client connection"),
        ServerConnection::new(Arc::clone(server)).expect("server connection"),
    )
}

/// A completed handshake, checked by sending application data both ways.
#[track_caller]
fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    sni: Option<&str>,
) -> (ClientConnection, ServerConnection) {
    let (mut c, mut s) = start(server, client, sni);
    pump(&mut c, &mut s).unwrap_or_else(|e| panic!("handshake with SNI {sni:?} failed: {e}"));

    c.writer().write_all(b"ping").expect("client write");
    transfer(&mut c, &mut s).expect("client -> server data");
    let mut got = [0u8; 4];
    s.reader()
        .read_exact(&mut got)
        .expect("server reads the client's data");
    assert_eq!(&got, b"ping");
    s.writer().write_all(b"pong").expect("server write");
    transfer(&mut s, &mut c).expect("server -> client data");
    c.reader()
        .read_exact(&mut got)
        .expect("client reads the server's data");
    assert_eq!(&got, b"pong");
    (c, s)
}

#[track_caller]
fn leaf(client: &ClientConnection) -> CertificateDer<'static> {
    client
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server sent a certificate")
        .clone()
        .into_owned()
}

/// Which of `certs` the resolver would serve for `sni` (by cert path).
#[track_caller]
fn served<'a>(
    resolver: &SniResolver,
    certs: &'a [config::Certificate],
    sni: Option<&str>,
) -> &'a str {
    let key = resolver.lookup(sni);
    certs
        .iter()
        .find(|c| c.chain[0] == key.cert[0])
        .and_then(|c| c.cert_path.to_str())
        .expect("the resolver serves one of the configured certificates")
}

// ---- Certificate selection ----

#[test]
fn sni_selects_the_matching_certificate() {
    let ca = Ca::new();
    let certs = [
        ca.issue("default", &["default.example"], Key::P256, true),
        ca.issue("a", &["a.example"], Key::P256, false),
        ca.issue("b", &["b.example", "b2.example"], Key::P256, false),
    ];
    let server = build(&certs, &settings());
    let client = client(BOTH);
    for (sni, want) in [
        ("a.example", 1),
        ("b.example", 2),
        ("b2.example", 2),
        ("default.example", 0),
        ("A.Example", 1),
    ] {
        let (c, s) = handshake(&server, &client, Some(sni));
        assert_eq!(
            leaf(&c),
            certs[want].chain[0],
            "SNI {sni:?} should get {}",
            certs[want].cert_path.display()
        );
        assert_eq!(
            c.peer_certificates().map(<[_]>::len),
            Some(2),
            "the whole chain (leaf + CA) is sent"
        );
        let lower = sni.to_ascii_lowercase();
        assert_eq!(s.server_name(), Some(lower.as_str()));
    }
}

#[test]
fn selected_certificate_verifies_for_the_name_with_real_webpki() {
    let ca = Ca::new();
    let certs = [
        ca.issue("default", &["default.example"], Key::P256, true),
        ca.issue("a", &["a.example"], Key::P384, false),
        ca.issue("wild", &["*.wild.example"], Key::RsaPkcs8, false),
    ];
    let server = build(&certs, &settings());
    let client = client_verifying(&ca);
    for sni in ["a.example", "www.wild.example", "default.example"] {
        handshake(&server, &client, Some(sni));
    }
    // Only the default matches an unknown name, and it does not cover it: a verifying client
    // must refuse, which shows the default really was what got served.
    let (mut c, mut s) = start(&server, &client, Some("other.example"));
    match pump(&mut c, &mut s) {
        Err(rustls::Error::InvalidCertificate(_)) => {}
        other => panic!("expected the client to reject the default certificate, got {other:?}"),
    }
}

#[test]
fn unknown_or_missing_sni_gets_the_default() {
    let ca = Ca::new();
    // The default is the second certificate: being marked wins over being first.
    let certs = [
        ca.issue("a", &["a.example"], Key::P256, false),
        ca.issue("default", &["default.example"], Key::P256, true),
    ];
    let server = build(&certs, &settings());
    let client = client(BOTH);

    let (c, s) = handshake(&server, &client, Some("unknown.example"));
    assert_eq!(leaf(&c), certs[1].chain[0], "unknown SNI gets the default");
    assert_eq!(s.server_name(), Some("unknown.example"));

    let (c, s) = handshake(&server, &client, None);
    assert_eq!(leaf(&c), certs[1].chain[0], "no SNI gets the default");
    assert_eq!(s.server_name(), None);

    // rustls clients send no SNI for an IP address (RFC 6066 §3 forbids literal addresses).
    let (c, s) = handshake(&server, &client, Some("192.0.2.1"));
    assert_eq!(
        leaf(&c),
        certs[1].chain[0],
        "IP address target gets the default"
    );
    assert_eq!(s.server_name(), None);
}

#[test]
fn first_certificate_is_the_default_when_none_is_marked() {
    let ca = Ca::new();
    let certs = [
        ca.issue("first", &["first.example"], Key::P256, false),
        ca.issue("second", &["second.example"], Key::P256, false),
    ];
    let resolver = SniResolver::new(&certs, &provider()).expect("resolver");
    assert_eq!(served(&resolver, &certs, None), "/test/first.pem");
    assert_eq!(
        served(&resolver, &certs, Some("nope.example")),
        "/test/first.pem"
    );
    assert_eq!(
        served(&resolver, &certs, Some("second.example")),
        "/test/second.pem"
    );
}

#[test]
fn wildcard_and_exact_matching_rules() {
    let ca = Ca::new();
    let certs = [
        ca.issue("default", &["default.example"], Key::P256, true),
        ca.issue("wild", &["*.example.com"], Key::P256, false),
        ca.issue("api", &["api.example.com"], Key::P256, false),
        ca.issue("apex", &["example.com"], Key::P256, false),
        // Names are given lower-case by config, but a trailing dot or upper case in a name
        // must not stop it from matching.
        ca.issue("dotted", &["Dotted.Example.NET."], Key::P256, false),
    ];
    let resolver = SniResolver::new(&certs, &provider()).expect("resolver");
    let long = "a".repeat(300);
    let cases: &[(Option<&str>, &str)] = &[
        (Some("www.example.com"), "wild"),
        (Some("WWW.Example.COM"), "wild"),
        (Some("www.example.com."), "wild"),
        (Some("x-1.example.com"), "wild"),
        // An exact name wins over a wildcard that also matches.
        (Some("api.example.com"), "api"),
        (Some("API.example.com."), "api"),
        // A wildcard stands for exactly one, non-empty label.
        (Some("example.com"), "apex"),
        (Some("a.b.example.com"), "default"),
        (Some(".example.com"), "default"),
        (Some("wwwexample.com"), "default"),
        (Some("www.example.com.."), "default"),
        (Some("example.com.evil"), "default"),
        (Some("dotted.example.net"), "dotted"),
        (Some("DOTTED.example.net."), "dotted"),
        (Some(""), "default"),
        (Some("."), "default"),
        (Some(&long), "default"),
        (Some("bücher.example.com"), "default"),
        (None, "default"),
    ];
    for (sni, want) in cases {
        assert_eq!(
            served(&resolver, &certs, *sni),
            format!("/test/{want}.pem"),
            "SNI {sni:?}"
        );
    }

    // And through a real handshake.
    let server = build(&certs, &settings());
    let (c, _) = handshake(&server, &client(BOTH), Some("www.example.com"));
    assert_eq!(
        leaf(&c),
        certs[1].chain[0],
        "wildcard certificate over the wire"
    );
}

#[test]
fn first_certificate_keeps_a_name_claimed_twice() {
    let ca = Ca::new();
    let certs = [
        ca.issue(
            "one",
            &["shared.example", "*.shared.example"],
            Key::P256,
            true,
        ),
        ca.issue(
            "two",
            &["shared.example", "*.shared.example"],
            Key::P256,
            false,
        ),
    ];
    let resolver = SniResolver::new(&certs, &provider()).expect("resolver");
    assert_eq!(
        served(&resolver, &certs, Some("shared.example")),
        "/test/one.pem"
    );
    assert_eq!(
        served(&resolver, &certs, Some("x.shared.example")),
        "/test/one.pem"
    );
}

// ---- Protocol parameters ----

type AlpnCase = (&'static [&'static [u8]], Option<&'static [u8]>);

#[test]
fn alpn_is_negotiated_in_server_preference_order() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let server = build(
        &certs,
        &TlsSettings {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            ..settings()
        },
    );
    // (client's offer, expected choice)
    let cases: &[AlpnCase] = &[
        (&[b"http/1.1"], Some(b"http/1.1")),
        (&[b"http/1.1", b"h2"], Some(b"h2")),
        (&[], None),
    ];
    for (offered, want) in cases {
        let (c, s) = handshake(&server, &client_alpn(offered), Some("site.example"));
        assert_eq!(s.alpn_protocol(), *want, "client offered {offered:?}");
        assert_eq!(c.alpn_protocol(), *want, "client view, offered {offered:?}");
    }

    // RFC 7301 §3.2: no overlap is a no_application_protocol alert, not a silent fallback.
    let (mut c, mut s) = start(&server, &client_alpn(&[b"spdy/3"]), Some("site.example"));
    match pump(&mut c, &mut s) {
        Err(rustls::Error::NoApplicationProtocol) => {}
        other => panic!("expected NoApplicationProtocol, got {other:?}"),
    }

    // Without configured ALPN the server ignores the client's list.
    let plain = build(&certs, &settings());
    let (_, s) = handshake(&plain, &client_alpn(&[b"h2"]), Some("site.example"));
    assert_eq!(s.alpn_protocol(), None);
}

#[test]
fn tls12_only_settings_are_honoured() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let server = build(
        &certs,
        &TlsSettings {
            versions: vec![TlsVersion::Tls12],
            ..settings()
        },
    );
    let (c, s) = handshake(&server, &client(BOTH), Some("site.example"));
    assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_2));
    assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_2));

    let (mut c, mut s) = start(&server, &client(TLS13_ONLY), Some("site.example"));
    assert!(
        pump(&mut c, &mut s).is_err(),
        "a TLS 1.3-only client must be refused by a TLS 1.2-only server"
    );
}

#[test]
fn tls13_only_settings_are_honoured() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let server = build(
        &certs,
        &TlsSettings {
            versions: vec![TlsVersion::Tls13],
            ..settings()
        },
    );
    let (c, s) = handshake(&server, &client(BOTH), Some("site.example"));
    assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));

    let (mut c, mut s) = start(&server, &client(TLS12_ONLY), Some("site.example"));
    assert!(
        pump(&mut c, &mut s).is_err(),
        "a TLS 1.2-only client must be refused by a TLS 1.3-only server"
    );
}

#[test]
fn every_supported_key_type_handshakes_under_both_versions() {
    let ca = Ca::new();
    for kind in [
        Key::P256,
        Key::P384,
        Key::Ed25519,
        Key::RsaPkcs8,
        Key::RsaPkcs1,
    ] {
        let certs = [ca.issue("site", &["site.example"], kind, true)];
        let server = build(&certs, &settings());
        for (versions, want) in [
            (TLS12_ONLY, ProtocolVersion::TLSv1_2),
            (TLS13_ONLY, ProtocolVersion::TLSv1_3),
        ] {
            let (c, s) = handshake(&server, &client(versions), Some("site.example"));
            assert_eq!(leaf(&c), certs[0].chain[0], "{kind:?} leaf");
            assert_eq!(s.protocol_version(), Some(want), "{kind:?}");
            let cipher = cipher_name(s.negotiated_cipher_suite().expect("suite").suite());
            if want == ProtocolVersion::TLSv1_2 {
                let family = match kind {
                    Key::RsaPkcs8 | Key::RsaPkcs1 => "ECDHE-RSA-",
                    _ => "ECDHE-ECDSA-",
                };
                assert!(
                    cipher.starts_with(family),
                    "{kind:?} under TLS 1.2 got {cipher}"
                );
            }
        }
    }
}

#[test]
fn server_cipher_order_wins() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let server = build(&certs, &settings());
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    // A client that prefers ChaCha20, then AES-128, then AES-256.
    let reversed = CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ],
        ..provider()
    };
    for (versions, want) in [
        (TLS13_ONLY, CipherSuite::TLS13_AES_256_GCM_SHA384),
        (
            TLS12_ONLY,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
    ] {
        let client = Arc::new(client_with(reversed.clone(), versions));
        let (_, s) = handshake(&server, &client, Some("site.example"));
        assert_eq!(
            s.negotiated_cipher_suite().map(|c| c.suite()),
            Some(want),
            "the server's (provider's) order must win over the client's"
        );
    }
}

#[test]
fn negotiated_reports_the_handshake_and_its_proxy_tls_info() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["a.example"], Key::P256, true)];
    let server = build(
        &certs,
        &TlsSettings {
            alpn: vec![b"h2".to_vec()],
            ..settings()
        },
    );

    let fresh = ServerConnection::new(Arc::clone(&server)).expect("server connection");
    let before = negotiated(&fresh);
    assert_eq!(
        before,
        Negotiated {
            version: None,
            sni: None,
            alpn: None,
            cipher: None,
            client_cert: None,
        }
    );
    assert_eq!(
        before.tls_info(),
        None,
        "no TLS info before the version is known"
    );

    let (_, s) = handshake(&server, &client_alpn(&[b"h2"]), Some("A.Example"));
    let n = negotiated(&s);
    assert_eq!(n.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(n.sni.as_deref(), Some("a.example"));
    assert_eq!(n.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        n.cipher.map(|c| c.suite()),
        Some(CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
    assert_eq!(
        n.tls_info(),
        Some(TlsInfo {
            version: "TLSv1.3",
            sni: Some("a.example"),
            alpn: Some(b"h2"),
            cipher: Some("TLS_AES_256_GCM_SHA384"),
            client_cert: None,
        })
    );

    let (_, s) = handshake(&server, &client(TLS12_ONLY), None);
    let n = negotiated(&s);
    let info = n.tls_info().expect("TLS info after the handshake");
    assert_eq!(info.version, "TLSv1.2");
    assert_eq!(info.sni, None);
    assert_eq!(info.alpn, None);
    assert_eq!(info.cipher, Some("ECDHE-ECDSA-AES256-GCM-SHA384"));
}

#[test]
fn version_and_cipher_names_use_openssl_spelling() {
    assert_eq!(version_name(ProtocolVersion::TLSv1_3), "TLSv1.3");
    assert_eq!(version_name(ProtocolVersion::TLSv1_2), "TLSv1.2");
    assert_eq!(version_name(ProtocolVersion::TLSv1_1), "TLSv1.1");
    assert_eq!(version_name(ProtocolVersion::TLSv1_0), "TLSv1");
    assert_eq!(version_name(ProtocolVersion::Unknown(0x7f1c)), "unknown");

    for suite in rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES {
        let iana = suite.suite();
        let name = cipher_name(iana);
        assert!(
            name != "unknown" && Some(name) != iana.as_str(),
            "{iana:?} has no OpenSSL name"
        );
        match suite.version().version {
            ProtocolVersion::TLSv1_3 => assert!(name.starts_with("TLS_"), "{name}"),
            _ => assert!(name.starts_with("ECDHE-"), "{name}"),
        }
    }
    assert_eq!(
        cipher_name(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
        "ECDHE-RSA-AES128-GCM-SHA256",
        "the PROXY spec's own example"
    );
    // Outside the provider's set: IANA name, or "unknown" when there is none.
    assert_eq!(
        cipher_name(CipherSuite::TLS_RSA_WITH_AES_128_GCM_SHA256),
        "TLS_RSA_WITH_AES_128_GCM_SHA256"
    );
    assert_eq!(cipher_name(CipherSuite::Unknown(0xfafa)), "unknown");
}

// ---- Resumption ----

#[test]
fn sessions_resume_with_tickets_and_with_the_session_cache() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    // (version, tickets, session_cache_entries, second handshake)
    let cases = [
        (TlsVersion::Tls13, true, 0, HandshakeKind::Resumed),
        (TlsVersion::Tls13, false, 64, HandshakeKind::Resumed),
        (TlsVersion::Tls12, true, 0, HandshakeKind::Resumed),
        (TlsVersion::Tls12, false, 64, HandshakeKind::Resumed),
        (TlsVersion::Tls13, false, 0, HandshakeKind::Full),
        (TlsVersion::Tls12, false, 0, HandshakeKind::Full),
    ];
    for (version, tickets, entries, want) in cases {
        let server = build(
            &certs,
            &TlsSettings {
                versions: vec![version],
                tickets,
                session_cache_entries: entries,
                ..settings()
            },
        );
        let what = format!("{version:?}, tickets {tickets}, cache {entries}");
        let client = client(BOTH);
        let (c, s) = handshake(&server, &client, Some("site.example"));
        assert_eq!(
            s.handshake_kind(),
            Some(HandshakeKind::Full),
            "first, {what}"
        );
        assert_eq!(
            c.handshake_kind(),
            Some(HandshakeKind::Full),
            "first, {what}"
        );

        let (c, s) = handshake(&server, &client, Some("site.example"));
        assert_eq!(
            s.handshake_kind(),
            Some(want),
            "second (server view), {what}"
        );
        assert_eq!(
            c.handshake_kind(),
            Some(want),
            "second (client view), {what}"
        );
        assert_eq!(
            leaf(&c),
            certs[0].chain[0],
            "resumed session keeps the certificate"
        );
    }
}

#[test]
fn tls13_ticket_count_follows_the_resumption_mechanism() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    for (tickets, entries, want) in [(true, 0, 2), (true, 64, 2), (false, 64, 1), (false, 0, 0)] {
        let server = build(
            &certs,
            &TlsSettings {
                versions: vec![TlsVersion::Tls13],
                tickets,
                session_cache_entries: entries,
                ..settings()
            },
        );
        let (c, _) = handshake(&server, &client(BOTH), Some("site.example"));
        assert_eq!(
            c.tls13_tickets_received(),
            want,
            "tickets {tickets}, cache {entries}"
        );
    }
}

#[test]
fn resumption_needs_the_same_server_config() {
    // Workers must share one ServerConfig: a separately built one has its own ticket keys.
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let one = build(&certs, &settings());
    let other = build(&certs, &settings());
    for (second, want) in [
        (&other, HandshakeKind::Full),
        (&one, HandshakeKind::Resumed),
    ] {
        // A fresh client each time, so the ticket it offers is the one `one` issued.
        let client = client(BOTH);
        handshake(&one, &client, Some("site.example"));
        let (_, s) = handshake(second, &client, Some("site.example"));
        let which = if Arc::ptr_eq(second, &one) {
            "same"
        } else {
            "other"
        };
        assert_eq!(
            s.handshake_kind(),
            Some(want),
            "second handshake on the {which} config"
        );
    }
}

#[test]
fn server_config_fields_follow_the_settings() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    for (tickets, entries) in [(true, 0), (true, 64), (false, 64), (false, 0)] {
        let alpn = vec![b"http/1.1".to_vec()];
        let cfg = build(
            &certs,
            &TlsSettings {
                alpn: alpn.clone(),
                tickets,
                session_cache_entries: entries,
                ..settings()
            },
        );
        let what = format!("tickets {tickets}, cache {entries}");
        assert!(cfg.ignore_client_order, "{what}");
        assert_eq!(cfg.max_early_data_size, 0, "no 0-RTT, {what}");
        assert_eq!(cfg.ticketer.enabled(), tickets, "{what}");
        assert_eq!(cfg.session_storage.can_cache(), entries > 0, "{what}");
        assert_eq!(cfg.alpn_protocols, alpn, "{what}");
    }
}

// ---- Errors ----

#[track_caller]
fn build_err(certs: &[config::Certificate], settings: &TlsSettings) -> TlsError {
    match server_config(certs, settings) {
        Ok(_) => panic!("server_config should have failed"),
        Err(e) => e,
    }
}

#[test]
fn errors_name_the_certificate_and_the_reason() {
    let ca = Ca::new();
    let good = ca.issue("good", &["good.example"], Key::P256, true);
    let other = ca.issue("other", &["other.example"], Key::P256, false);

    assert!(matches!(
        build_err(&[], &settings()),
        TlsError::NoCertificates
    ));

    let empty = config::Certificate {
        chain: Vec::new(),
        ..good.clone()
    };
    let e = build_err(&[empty], &settings());
    assert!(matches!(e, TlsError::EmptyChain { .. }), "{e:?}");
    assert!(e.to_string().contains("/test/good.pem"), "{e}");

    let mismatched = config::Certificate {
        key: Arc::clone(&other.key),
        key_path: other.key_path.clone(),
        ..good.clone()
    };
    let e = build_err(&[mismatched], &settings());
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("/test/good.pem") && text.contains("/test/other.key"),
        "{text}"
    );

    let garbage_key = config::Certificate {
        key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![
            0x30, 0x03, 0x02, 0x01, 0x00,
        ]))),
        ..good.clone()
    };
    let e = build_err(&[garbage_key], &settings());
    assert!(matches!(e, TlsError::Key { .. }), "{e:?}");
    assert!(e.to_string().contains("/test/good.pem"), "{e}");

    let garbage_cert = config::Certificate {
        chain: vec![CertificateDer::from(vec![0x30, 0x00])],
        ..good.clone()
    };
    let e = build_err(&[garbage_cert], &settings());
    assert!(matches!(e, TlsError::Certificate { .. }), "{e:?}");

    for bad in [
        "*.*.example.com",
        "w*.example.com",
        "*",
        "",
        "exa mple.com",
        "*.",
    ] {
        let named = config::Certificate {
            names: vec![bad.to_owned()],
            ..good.clone()
        };
        let e = build_err(&[named], &settings());
        assert!(
            matches!(&e, TlsError::Name { name, .. } if name == bad),
            "{bad:?}: {e:?}"
        );
    }

    let second_default = config::Certificate {
        default: true,
        ..other.clone()
    };
    let e = build_err(&[good.clone(), second_default], &settings());
    assert!(matches!(e, TlsError::MultipleDefaults { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("/test/other.pem") && text.contains("/test/good.pem"),
        "{text}"
    );

    let no_versions = TlsSettings {
        versions: Vec::new(),
        ..settings()
    };
    assert!(matches!(
        build_err(std::slice::from_ref(&good), &no_versions),
        TlsError::NoVersions
    ));

    for alpn in [Vec::new(), vec![b'x'; 256]] {
        let bad_alpn = TlsSettings {
            alpn: vec![b"h2".to_vec(), alpn],
            ..settings()
        };
        let e = build_err(std::slice::from_ref(&good), &bad_alpn);
        assert!(matches!(e, TlsError::Alpn(_)), "{e:?}");
    }
}

#[test]
fn a_shared_ticket_key_file_resumes_across_processes_until_the_key_leaves() {
    use super::ticket_keys::{self, TicketKeys};
    // Two "processes": the same keys in two files (one ticketer per file and process, so one
    // file would give both configurations the same ticketer).
    let dir = std::env::temp_dir().join(format!("tern-tls-shared-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let key = ticket_keys::generate().expect("key");
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let server = |name: &str, keys: Vec<ticket_keys::KeyMaterial>| {
            let path = dir.join(format!("{name}-{version:?}"));
            build(
                &certs,
                &TlsSettings {
                    versions: vec![version],
                    // Tickets only: a session-id hit must not pass for a ticket resumption.
                    session_cache_entries: 0,
                    ticket_keys: Some(TicketKeys { path, keys }),
                    ..settings()
                },
            )
        };
        let a = server("a", vec![key.clone()]);
        let b = server("b", vec![key.clone()]);
        let cl = client(BOTH);
        let (_, s) = handshake(&a, &cl, Some("site.example"));
        assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full), "{version:?}");
        let (c, s) = handshake(&b, &cl, Some("site.example"));
        assert_eq!(
            s.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}: A's ticket on B"
        );
        assert_eq!(
            c.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}"
        );

        // B's file rotated twice with keep 0: A's key is gone (a reload rebuilds B's
        // configuration; the same ticketer takes the new keys).
        let fresh = ticket_keys::generate().expect("key");
        let b = server("b", vec![fresh]);
        let cl = client(BOTH);
        handshake(&a, &cl, Some("site.example"));
        let (c, s) = handshake(&b, &cl, Some("site.example"));
        assert_eq!(
            s.handshake_kind(),
            Some(HandshakeKind::Full),
            "{version:?}: key gone"
        );
        assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full), "{version:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
