//! Tests of the operator's TLS choices: `cipher_suites` and `groups` (names, validation, what
//! a handshake negotiates, the hybrid post-quantum group by default), one certificate per key
//! type for a name (chosen by the client's signature algorithms and suites), and `strict_sni`
//! (refused with unrecognized_name, through the connection core).

use rustls::crypto::aws_lc_rs::{cipher_suite as cs, kx_group};
use rustls::{AlertDescription, NamedGroup};

use super::*;
use crate::config::ProxyProtocol;
use crate::proxy::{Failure, Session};

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const BOTH_VERSIONS: &[TlsVersion] = &[TlsVersion::Tls12, TlsVersion::Tls13];

#[test]
fn cipher_suite_names_are_checked_against_the_provider_and_the_versions() {
    let ok = crate::tls::options::cipher_suites(
        &names(&[
            "TLS13_AES_128_GCM_SHA256",
            // The OpenSSL spelling tern logs is accepted too.
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "tls_ecdhe_rsa_with_aes_128_gcm_sha256",
        ]),
        BOTH_VERSIONS,
    );
    assert_eq!(
        ok,
        Ok(vec![
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ])
    );
    let err = |list: &[&str], versions: &[TlsVersion]| {
        crate::tls::options::cipher_suites(&names(list), versions).expect_err("must be refused")
    };
    let e = err(
        &["TLS13_AES_128_GCM_SHA256", "TLS_RSA_WITH_RC4_128_MD5"],
        BOTH_VERSIONS,
    );
    assert_eq!(e.index, Some(1));
    assert!(
        e.message.contains("not a cipher suite tern supports"),
        "{e:?}"
    );
    let e = err(
        &["TLS13_AES_128_GCM_SHA256", "TLS13_AES_128_GCM_SHA256"],
        BOTH_VERSIONS,
    );
    assert_eq!(
        (e.index, e.message.contains("twice")),
        (Some(1), true),
        "{e:?}"
    );
    let e = err(
        &[
            "TLS13_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ],
        &[TlsVersion::Tls13],
    );
    assert_eq!(
        e.index,
        Some(1),
        "a TLS 1.2 suite with only 1.3 enabled: {e:?}"
    );
    let e = err(&["TLS13_AES_128_GCM_SHA256"], BOTH_VERSIONS);
    assert_eq!(e.index, None);
    assert!(e.message.contains("no suite for TLS 1.2"), "{e:?}");
}

#[test]
fn group_names_are_checked_against_the_provider_and_the_versions() {
    assert_eq!(
        crate::tls::options::groups(
            &names(&["x25519mlkem768", "X25519", "secp384r1"]),
            BOTH_VERSIONS
        ),
        Ok(vec![
            NamedGroup::X25519MLKEM768,
            NamedGroup::X25519,
            NamedGroup::secp384r1
        ])
    );
    let e = crate::tls::options::groups(&names(&["X448"]), BOTH_VERSIONS).expect_err("unknown");
    assert_eq!(e.index, Some(0));
    assert!(e.message.contains("supported: "), "{e:?}");
    // The ML-KEM hybrid is TLS 1.3 only: alone it leaves TLS 1.2 without a group.
    let e =
        crate::tls::options::groups(&names(&["X25519MLKEM768"]), BOTH_VERSIONS).expect_err("1.2");
    assert_eq!(e.index, None);
    assert!(e.message.contains("TLS 1.2"), "{e:?}");
    assert!(crate::tls::options::groups(&names(&["X25519MLKEM768"]), &[TlsVersion::Tls13]).is_ok());
}

/// A client that offers the hybrid group first (as current browsers do) gets it by default.
#[test]
fn x25519mlkem768_is_negotiated_by_default_when_the_client_offers_it() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let server = build(&certs, &settings());
    let pq_first = CryptoProvider {
        kx_groups: vec![kx_group::X25519MLKEM768, kx_group::X25519],
        ..provider()
    };
    let client = Arc::new(client_with(pq_first, TLS13_ONLY));
    let (_, s) = handshake(&server, &client, Some("site.example"));
    assert_eq!(
        s.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::X25519MLKEM768)
    );
}

#[test]
fn configured_suites_and_groups_are_what_is_negotiated() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example"], Key::P256, true)];
    let server = build(
        &certs,
        &TlsSettings {
            cipher_suites: Some(vec![
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ]),
            groups: Some(vec![NamedGroup::secp384r1]),
            ..settings()
        },
    );
    for (versions, want) in [
        (TLS13_ONLY, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
        (
            TLS12_ONLY,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ] {
        // The default client prefers AES-GCM and sends an X25519 key share first: the server
        // must still pick its configured suite, and ask for secp384r1 (TLS 1.3: a retry).
        let (_, s) = handshake(&server, &client(versions), Some("site.example"));
        assert_eq!(s.negotiated_cipher_suite().map(|c| c.suite()), Some(want));
        assert_eq!(
            s.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::secp384r1)
        );
    }
    // A client offering only a suite the server left out is refused.
    let aes_only = CryptoProvider {
        cipher_suites: vec![cs::TLS13_AES_128_GCM_SHA256],
        ..provider()
    };
    let (mut c, mut s) = start(
        &server,
        &Arc::new(client_with(aes_only, TLS13_ONLY)),
        Some("site.example"),
    );
    assert!(pump(&mut c, &mut s).is_err());
}

/// Offers only the RSA signature schemes of the wrapped verifier, like a client without ECDSA.
#[derive(Debug)]
struct RsaOnly(AnyChain);

impl ServerCertVerifier for RsaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .supported_verify_schemes()
            .into_iter()
            .filter(|s| {
                matches!(
                    s,
                    SignatureScheme::RSA_PKCS1_SHA256
                        | SignatureScheme::RSA_PKCS1_SHA384
                        | SignatureScheme::RSA_PKCS1_SHA512
                        | SignatureScheme::RSA_PSS_SHA256
                        | SignatureScheme::RSA_PSS_SHA384
                        | SignatureScheme::RSA_PSS_SHA512
                )
            })
            .collect()
    }
}

fn rsa_only_client(versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("client protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RsaOnly(AnyChain(algorithms))))
            .with_no_client_auth(),
    )
}

#[test]
fn ecdsa_and_rsa_certificates_for_one_name_are_chosen_by_the_client() {
    let ca = Ca::new();
    // RSA listed first: ECDSA is still preferred where the client takes it.
    let certs = [
        ca.issue("rsa", &["site.example"], Key::RsaPkcs8, true),
        ca.issue("ecdsa", &["site.example"], Key::P256, false),
    ];
    let server = build(&certs, &settings());
    let leaf_of = |i: usize| certs[i].chain[0].clone();
    for versions in [TLS13_ONLY, TLS12_ONLY] {
        let (c, _) = handshake(&server, &client(versions), Some("site.example"));
        assert_eq!(leaf(&c), leaf_of(1), "a default client gets ECDSA");
        let (c, _) = handshake(&server, &rsa_only_client(versions), Some("site.example"));
        assert_eq!(leaf(&c), leaf_of(0), "an RSA-only client gets RSA");
        // The default (no SNI) has the same choice.
        let (c, _) = handshake(&server, &rsa_only_client(versions), None);
        assert_eq!(leaf(&c), leaf_of(0), "no SNI, RSA-only client");
        let (c, _) = handshake(&server, &client(versions), None);
        assert_eq!(leaf(&c), leaf_of(1), "no SNI, default client");
    }
    // TLS 1.2 with only ECDHE_RSA suites: ECDSA signatures are fine but no suite fits them.
    let rsa_suites = CryptoProvider {
        cipher_suites: vec![cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256],
        ..provider()
    };
    let client = Arc::new(client_with(rsa_suites, TLS12_ONLY));
    let (c, _) = handshake(&server, &client, Some("site.example"));
    assert_eq!(leaf(&c), leaf_of(0));
    // Groups that leave out the ECDSA certificate's curve (P-256): RFC 8422 §5.1 rules that
    // certificate out for TLS 1.2, so the RSA one is served; tern cannot tell the version at
    // that point, so a TLS 1.3 client gets RSA too (which it can use).
    let p384_only = || CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::SECP384R1],
        ..provider()
    };
    let client = Arc::new(client_with(p384_only(), TLS12_ONLY));
    let (c, _) = handshake(&server, &client, Some("site.example"));
    assert_eq!(leaf(&c), leaf_of(0), "TLS 1.2 without P-256 gets RSA");
    let client = Arc::new(client_with(p384_only(), TLS13_ONLY));
    let (c, _) = handshake(&server, &client, Some("site.example"));
    assert_eq!(leaf(&c), leaf_of(0), "TLS 1.3 as well");
    // With only the ECDSA certificate, it is still served (the one there is).
    let only_ecdsa = build(&certs[1..], &settings());
    let client = Arc::new(client_with(p384_only(), TLS13_ONLY));
    let (c, _) = handshake(&only_ecdsa, &client, Some("site.example"));
    assert_eq!(leaf(&c), leaf_of(1), "no other choice");
}

#[test]
fn strict_sni_refuses_unknown_and_absent_names_with_unrecognized_name() {
    let ca = Ca::new();
    let certs = [ca.issue("site", &["site.example", "*.wild.example"], Key::P256, true)];
    let strict = build(
        &certs,
        &TlsSettings {
            strict_sni: true,
            ..settings()
        },
    );
    handshake(&strict, &client(BOTH), Some("site.example"));
    handshake(&strict, &client(BOTH), Some("a.wild.example"));
    for sni in [Some("unknown.test"), None] {
        let (mut c, mut s) = start(&strict, &client(BOTH), sni);
        let e = pump(&mut c, &mut s).expect_err("refused");
        assert!(is_sni_refusal(&e), "SNI {sni:?}: {e:?}");
    }
    // Not strict: the default is served.
    let lax = build(&certs, &settings());
    handshake(&lax, &client(BOTH), Some("unknown.test"));

    // Through the connection core: the client sees unrecognized_name, and the failure says why.
    let name = ServerName::try_from("unknown.test").expect("name");
    let mut c = ClientConnection::new(client(BOTH), name).expect("client");
    let mut session = Session::new(
        strict,
        ProxyProtocol::None,
        "192.0.2.7:51000".parse().expect("addr"),
        "198.51.100.1:443".parse().expect("addr"),
        1 << 16,
    )
    .expect("session");
    let mut hello = Vec::new();
    c.write_tls(&mut hello).expect("client hello");
    assert!(session.client_recv(&hello).is_err());
    assert_eq!(session.failure(), Some(Failure::SniRefused));
    let mut out = [0u8; 64];
    let n = session.client_output(&mut out);
    assert_eq!(out.get(..n), Some(&UNRECOGNIZED_NAME_ALERT[..]));
    assert!(session.server_finished());
    let mut rest = &out[..n];
    c.read_tls(&mut rest).expect("alert in");
    assert_eq!(
        c.process_new_packets().expect_err("alert"),
        rustls::Error::AlertReceived(AlertDescription::UnrecognisedName)
    );
}
