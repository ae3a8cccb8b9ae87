//! TLS on tern's client side: the one `rustls::ServerConfig` a process serves with, the SNI
//! certificate resolver behind it, and what a finished handshake negotiated.
//!
//! Owns: turning the validated [`config::Certificate`]s and [`config::TlsSettings`] into a
//! `ServerConfig` (aws-lc-rs provider; TLS 1.2 and/or 1.3; ALPN; session-id cache and stateless
//! tickets; no 0-RTT), choosing a certificate by SNI ([`SniResolver`]), and naming the negotiated
//! parameters the way OpenSSL does ([`version_name`], [`cipher_name`]) so that PROXY-protocol
//! consumers see the strings they already know. Does not own: reading PEM files (that is
//! `config`), record I/O and the per-connection state machine (the proxy core), or client
//! certificates (tern does not ask for them).
//!
//! Specs: RFC 8446 (TLS 1.3; §4.6.1 NewSessionTicket, §8 and Appendix C.4 on single-use
//! tickets), RFC 5246 (TLS 1.2), RFC 5077 (stateless tickets), RFC 6066 §3 (server_name: ASCII,
//! no trailing dot), RFC 6125 §6.4.3 (a wildcard stands for exactly one left-most label),
//! RFC 7301 (ALPN).

#![forbid(unsafe_code)]

use std::collections::hash_map::{Entry, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::DnsName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CipherSuite, InconsistentKeys, ProtocolVersion, ServerConfig, ServerConnection,
    SupportedCipherSuite, SupportedProtocolVersion,
};

use crate::config;
use crate::proxy_protocol::TlsInfo;

#[cfg(test)]
mod tests;

/// Why the TLS configuration could not be built. Certificate-specific variants name the
/// certificate by the path it was read from, since that is what the operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificates configured")]
    NoCertificates,
    #[error("{}: the certificate chain is empty", cert_path.display())]
    EmptyChain { cert_path: PathBuf },
    #[error("{}: private key {} is not usable: {source}", cert_path.display(), key_path.display())]
    Key {
        cert_path: PathBuf,
        key_path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{}: private key {} does not belong to the certificate (public keys differ)",
        cert_path.display(),
        key_path.display()
    )]
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    #[error("{}: the leaf certificate cannot be parsed: {source}", cert_path.display())]
    Certificate {
        cert_path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{}: name {name:?} is neither a DNS name nor a `*.suffix` wildcard",
        cert_path.display()
    )]
    Name { cert_path: PathBuf, name: String },
    #[error(
        "{}: marked default, but {} is already the default certificate",
        cert_path.display(),
        first.display()
    )]
    MultipleDefaults { cert_path: PathBuf, first: PathBuf },
    #[error("no TLS protocol version enabled")]
    NoVersions,
    #[error("ALPN protocol {0:?} must be 1 to 255 bytes long")]
    Alpn(String),
    #[error("rustls rejected the configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("cannot create the session ticket keys: {0}")]
    Ticketer(#[source] rustls::Error),
}

/// The provider every tern TLS object is built from. One function so that the server config, the
/// key loading and the tests cannot drift apart.
fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// Builds the server configuration for `certs` and `settings`.
///
/// Build it once per process and hand the same `Arc` to every worker: the session-id cache and
/// the ticket keys live inside it, so workers with separately built configs could not resume
/// each other's sessions, and SO_REUSEPORT gives no guarantee that a client's second connection
/// lands on the worker that served its first.
pub fn server_config(
    certs: &[config::Certificate],
    settings: &config::TlsSettings,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider());
    let resolver = SniResolver::new(certs, &provider)?;

    let versions: Vec<&'static SupportedProtocolVersion> = settings
        .versions
        .iter()
        .map(|v| match v {
            config::TlsVersion::Tls12 => &rustls::version::TLS12,
            config::TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    if versions.is_empty() {
        return Err(TlsError::NoVersions);
    }
    // RFC 7301 §3.1: a protocol name is 1..=255 bytes; rustls would otherwise fail at the first
    // handshake rather than here.
    if let Some(bad) = settings
        .alpn
        .iter()
        .find(|p| p.is_empty() || p.len() > usize::from(u8::MAX))
    {
        return Err(TlsError::Alpn(String::from_utf8_lossy(bad).into_owned()));
    }

    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));

    cfg.alpn_protocols.clone_from(&settings.alpn);

    // Every suite the aws-lc-rs provider enables is an AEAD with ephemeral key exchange, so the
    // choice among them is about speed, not safety. The provider lists AES-GCM first because it
    // is the cheapest for the *server* on x86-64 and ARMv8 with AES instructions, and on a
    // terminator the server is the side that pays for every connection. Choosing by our order
    // also makes CPU-per-handshake comparable between runs and clients. The price: a client
    // without AES hardware that lists ChaCha20 first gets AES-GCM anyway (rustls has no
    // "equal-preference" groups to honour that selectively).
    cfg.ignore_client_order = true;

    // Per-worker L1 over a per-process L2, fed by the fleet sync (`session_cache`).
    cfg.session_storage = crate::session_cache::storage(settings.session_cache_entries);
    if settings.tickets {
        // Random keys per process, rotated every 6 hours by rustls (RFC 5077 §4 construction).
        cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Ticketer)?;
    }

    // TLS 1.3 tickets are single-use (RFC 8446 Appendix C.4: clients SHOULD NOT reuse one), so
    // a client gets one resumption per ticket it holds. Stateless tickets cost the server only an
    // encryption, and two is what OpenSSL sends by default: enough for a browser to open a
    // second resumed connection in parallel (happy eyeballs, a second origin connection). Without
    // a ticketer rustls stores each TLS 1.3 "ticket" in the session cache, where every extra
    // ticket takes a slot of a bounded cache shared with TLS 1.2 session ids — so one. Without
    // either there is nothing to resume and a ticket would be dead weight on the wire.
    cfg.send_tls13_tickets = match (settings.tickets, settings.session_cache_entries > 0) {
        (true, _) => 2,
        (false, true) => 1,
        (false, false) => 0,
    };

    // No 0-RTT: early data is replayable (RFC 8446 §8) and tern cannot know whether the backend's
    // protocol tolerates replay. rustls's default is already 0; stated here so it is a decision.
    cfg.max_early_data_size = 0;

    Ok(Arc::new(cfg))
}

/// Loads one certificate's key through the provider's key provider (ECDSA P-256/P-384, RSA,
/// Ed25519 in PKCS#8, PKCS#1 or SEC1 form) and checks that it belongs to the leaf.
fn certified_key(
    cert: &config::Certificate,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    if cert.chain.is_empty() {
        return Err(TlsError::EmptyChain {
            cert_path: cert.cert_path.clone(),
        });
    }
    let key = provider
        .key_provider
        .load_private_key(cert.key.clone_key())
        .map_err(|source| TlsError::Key {
            cert_path: cert.cert_path.clone(),
            key_path: cert.key_path.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(cert.chain.clone(), key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot report its public key; the client's signature check
        // will catch a mismatch at the first handshake instead.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::KeyMismatch {
                cert_path: cert.cert_path.clone(),
                key_path: cert.key_path.clone(),
            })
        }
        Err(source) => {
            return Err(TlsError::Certificate {
                cert_path: cert.cert_path.clone(),
                source,
            })
        }
    }
    Ok(Arc::new(certified))
}

/// A configured name, split into the two kinds the resolver stores.
enum NamePattern {
    /// Matches this name only (lower-case, no trailing dot).
    Exact(String),
    /// `*.suffix`: matches `label.suffix` for exactly one non-empty label. Holds `suffix`.
    Wildcard(String),
}

fn parse_name(name: &str) -> Option<NamePattern> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let (wildcard, host) = match name.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, name),
    };
    // DnsName rejects '*' anywhere, empty labels and over-long names: only a whole left-most
    // `*` label is a wildcard here (no `w*.example.com` partial labels, RFC 6125 §7.2).
    DnsName::try_from(host).ok()?;
    let host = host.to_ascii_lowercase();
    Some(if wildcard {
        NamePattern::Wildcard(host)
    } else {
        NamePattern::Exact(host)
    })
}

/// The longest DNS name in text form without the trailing dot (RFC 1035 §2.3.4's 255 octets on
/// the wire). Configured names are validated `DnsName`s, so a longer SNI cannot match anything.
const MAX_DNS_NAME: usize = 253;

/// Chooses the certificate for a handshake from the client's SNI.
///
/// Every `CertifiedKey` is parsed and checked when the resolver is built; `resolve` only looks
/// names up. Exact names win over wildcards; without SNI, or when nothing matches, the default
/// certificate is served (the client decides whether it accepts it). When two certificates
/// claim the same name, the first one in the configuration keeps it.
#[derive(Debug)]
pub struct SniResolver {
    /// Exact names, lower-case, no trailing dot.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.suffix` patterns keyed by `suffix` (lower-case, no trailing dot): a name matches when
    /// removing its first, non-empty label leaves exactly the key.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Served without SNI and when no name matches. Always one of the configured certificates.
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Loads every certificate's key with `provider` and indexes the certificates by name.
    /// The default is the certificate marked `default`, else the first one.
    pub fn new(
        certs: &[config::Certificate],
        provider: &CryptoProvider,
    ) -> Result<SniResolver, TlsError> {
        let mut default: Option<(usize, Arc<CertifiedKey>)> = None;
        let mut first: Option<Arc<CertifiedKey>> = None;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();

        for (index, cert) in certs.iter().enumerate() {
            let key = certified_key(cert, provider)?;
            if cert.default {
                if let Some((earlier, _)) = &default {
                    return Err(TlsError::MultipleDefaults {
                        cert_path: cert.cert_path.clone(),
                        first: certs[*earlier].cert_path.clone(),
                    });
                }
                default = Some((index, Arc::clone(&key)));
            }
            for name in &cert.names {
                let (map, host) = match parse_name(name) {
                    Some(NamePattern::Exact(host)) => (&mut exact, host),
                    Some(NamePattern::Wildcard(suffix)) => (&mut wildcard, suffix),
                    None => {
                        return Err(TlsError::Name {
                            cert_path: cert.cert_path.clone(),
                            name: name.clone(),
                        })
                    }
                };
                match map.entry(host) {
                    Entry::Vacant(slot) => {
                        slot.insert(Arc::clone(&key));
                    }
                    Entry::Occupied(_) => tracing::warn!(
                        cert = %cert.cert_path.display(),
                        name = %name,
                        "name already served by an earlier certificate; keeping the earlier one"
                    ),
                }
            }
            first.get_or_insert(key);
        }

        let default = match (default, first) {
            (Some((_, key)), _) | (None, Some(key)) => key,
            (None, None) => return Err(TlsError::NoCertificates),
        };
        Ok(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for `server_name` (the SNI as the client sent it, or `None`).
    ///
    /// Case-insensitive and tolerant of one trailing dot. rustls already lower-cases the SNI
    /// before calling a resolver (`server::hs`, `to_lowercase_owned`) but keeps a trailing dot
    /// (its own client strips it, other clients need not), so the dot is removed here and the
    /// lower-casing is repeated only when an upper-case byte is present — into a stack buffer,
    /// never the heap.
    pub fn lookup(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.len() > MAX_DNS_NAME || !name.is_ascii() {
            // Non-ASCII cannot be a DNS name on the wire (IDNs travel as A-labels).
            return &self.default;
        }
        let mut buf = [0u8; MAX_DNS_NAME];
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = &mut buf[..name.len()];
            lower.copy_from_slice(name.as_bytes());
            lower.make_ascii_lowercase();
            match std::str::from_utf8(lower) {
                Ok(lower) => lower,
                // Unreachable: ASCII lower-casing of ASCII stays ASCII.
                Err(_) => return &self.default,
            }
        } else {
            name
        };

        if let Some(key) = self.exact.get(name) {
            return key;
        }
        if let Some((label, suffix)) = name.split_once('.') {
            if !label.is_empty() {
                if let Some(key) = self.wildcard.get(suffix) {
                    return key;
                }
            }
        }
        &self.default
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.lookup(client_hello.server_name())))
    }
}

/// What a handshake settled on; every field is `None` until the handshake got that far.
#[derive(Debug, Clone, PartialEq)]
pub struct Negotiated {
    pub version: Option<ProtocolVersion>,
    /// The SNI as the client sent it, lower-cased by rustls.
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub cipher: Option<SupportedCipherSuite>,
}

/// Reads the negotiated parameters off a server connection (normally once, after the handshake).
pub fn negotiated(conn: &ServerConnection) -> Negotiated {
    Negotiated {
        version: conn.protocol_version(),
        sni: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        cipher: conn.negotiated_cipher_suite(),
    }
}

impl Negotiated {
    /// The TLS part of a PROXY v2 header for this connection, or `None` before the protocol
    /// version is known (the SSL TLV must carry it).
    pub fn tls_info(&self) -> Option<TlsInfo<'_>> {
        Some(TlsInfo {
            version: version_name(self.version?),
            sni: self.sni.as_deref(),
            alpn: self.alpn.as_deref(),
            cipher: self.cipher.map(|c| cipher_name(c.suite())),
        })
    }
}

/// The protocol version as OpenSSL's `SSL_get_version` spells it, which is what haproxy puts in
/// PP2_SUBTYPE_SSL_VERSION and what consumers of that TLV match against.
pub fn version_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3",
        ProtocolVersion::TLSv1_2 => "TLSv1.2",
        ProtocolVersion::TLSv1_1 => "TLSv1.1",
        ProtocolVersion::TLSv1_0 => "TLSv1",
        ProtocolVersion::SSLv3 => "SSLv3",
        _ => "unknown",
    }
}

/// The cipher suite as OpenSSL's `SSL_CIPHER_get_name` spells it (the form the PROXY spec's
/// PP2_SUBTYPE_SSL_CIPHER example uses: "ECDHE-RSA-AES128-GCM-SHA256"). Covers every suite the
/// aws-lc-rs provider offers; anything else falls back to its IANA name.
pub fn cipher_name(suite: CipherSuite) -> &'static str {
    match suite {
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
            "ECDHE-ECDSA-CHACHA20-POLY1305"
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other.as_str().unwrap_or("unknown"),
    }
}
