//! TLS on tern's client side: the one `rustls::ServerConfig` a process serves with, the SNI
//! certificate resolver behind it, and what a finished handshake negotiated.
//!
//! Owns: turning the validated [`config::Certificate`]s and [`config::TlsSettings`] into a
//! `ServerConfig` (aws-lc-rs provider; TLS 1.2 and/or 1.3; ALPN; session-id cache and stateless
//! tickets; no 0-RTT), choosing a certificate by SNI ([`SniResolver`]), and naming the negotiated
//! parameters the way OpenSSL does ([`version_name`], [`cipher_name`]) so that PROXY-protocol
//! consumers see the strings they already know. Also: stapling each certificate's OCSP response
//! while it is valid ([`SniResolver`], with [`crate::ocsp`] deciding validity), and asking for
//! and verifying client certificates when `[tls] client_auth` says so (rustls's
//! `WebPkiClientVerifier`; [`Negotiated::client_cert`] reports the outcome). Does not own:
//! reading PEM/DER files (that is `config`), record I/O and the per-connection state machine
//! (the proxy core).
//!
//! Specs: RFC 8446 (TLS 1.3; §4.6.1 NewSessionTicket, §8 and Appendix C.4 on single-use
//! tickets), RFC 5246 (TLS 1.2), RFC 5077 (stateless tickets), RFC 6066 §3 (server_name: ASCII,
//! no trailing dot), RFC 6125 §6.4.3 (a wildcard stands for exactly one left-most label),
//! RFC 7301 (ALPN), RFC 6066 §8 and RFC 8446 §4.4.2.1 (OCSP stapling), RFC 8446 §4.3.2 and
//! RFC 5280 §6 (client certificates, path validation).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::DnsName;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CipherSuite, InconsistentKeys, ProtocolVersion, ServerConfig, ServerConnection,
    SignatureAlgorithm, SupportedCipherSuite, SupportedProtocolVersion,
};

use crate::config;
use crate::proxy_protocol::TlsInfo;

pub mod options;
#[cfg(test)]
mod tests;
pub mod ticket_keys;

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
    #[error("{}: cannot verify client certificates with these CAs: {source}", ca_path.display())]
    ClientVerifier {
        ca_path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// The default provider, for the tests' clients and resolvers: the server configuration's
/// provider comes from [`options::provider`] with the configured suites and groups.
#[cfg(test)]
fn provider() -> CryptoProvider {
    options::provider(None, None)
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
    let provider = Arc::new(options::provider(
        settings.cipher_suites.as_deref(),
        settings.groups.as_deref(),
    ));
    let resolver = SniResolver::new(certs, &provider)?.strict(settings.strict_sni);
    let verifier = client_verifier(settings.client_auth.as_ref(), &provider)?;

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
        .with_client_cert_verifier(verifier)
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
        cfg.ticketer = match &settings.ticket_keys {
            // Keys from `[tls] ticket_keys`, shared with every process that reads the file.
            Some(keys) => ticket_keys::ticketer(keys)
                .map_err(|e| TlsError::Ticketer(rustls::Error::General(e.to_string())))?,
            // Random keys per process, rotated every 6 hours by rustls (RFC 5077 §4 construction).
            None => rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Ticketer)?,
        };
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

/// The client certificate verifier for `[tls] client_auth`: none, or WebPKI path validation to
/// the configured CAs (RFC 5280 §6; the client certificate must carry the clientAuth extended
/// key usage if it has any). "optional" lets a client without a certificate in
/// (`allow_unauthenticated`), but a certificate a client does send must still verify. No CRLs:
/// revocation of client certificates is out of tern's scope (documented in configuration.md).
fn client_verifier(
    auth: Option<&config::ClientAuth>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let Some(auth) = auth else {
        return Ok(WebPkiClientVerifier::no_client_auth());
    };
    let mut roots = rustls::RootCertStore::empty();
    // config validated each one; a failure here would be reported by `build` below.
    let (_added, _ignored) = roots.add_parsable_certificates(auth.roots.iter().cloned());
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let builder = if auth.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|source| TlsError::ClientVerifier {
        ca_path: auth.ca_path.clone(),
        source,
    })
}

/// The stapled variant of a certificate and when its OCSP response may be served.
#[derive(Debug)]
struct Staple {
    /// The same certificate and key with `ocsp` set.
    stapled: Arc<CertifiedKey>,
    /// The response's validity (only its times are read, per handshake).
    response: crate::ocsp::Response,
}

/// The staple for `cert`, whose unstapled key is `key`; `None` when it has no OCSP response or
/// one for another certificate. Logs why a configured response is not stapled right now: this
/// runs at start-up and on every reload.
fn staple(cert: &config::Certificate, key: &CertifiedKey) -> Option<Staple> {
    let response = cert.ocsp.as_ref()?;
    if let Some(why) = response.staple_problem(SystemTime::now()) {
        tracing::warn!(
            file = %response.path.display(),
            certificate = %cert.cert_path.display(),
            "OCSP response not stapled: {why}"
        );
    }
    if !response.for_certificate {
        return None;
    }
    if response.status != crate::ocsp::CertStatus::Good {
        tracing::warn!(
            file = %response.path.display(),
            certificate = %cert.cert_path.display(),
            status = ?response.status,
            "OCSP response says the certificate is not good; stapling it anyway (clients will \
             reject the certificate)"
        );
    }
    let mut stapled = key.clone();
    stapled.ocsp = Some(response.der.clone());
    Some(Staple {
        stapled: Arc::new(stapled),
        response: response.clone(),
    })
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

/// The certificates one name can be served with: never empty, one per key type, in the order
/// they are tried (ECDSA first: smaller and cheaper to sign with than RSA).
type Candidates = Vec<Arc<CertifiedKey>>;

/// How much a key type is preferred when a client supports several (lower first).
fn key_rank(key: &CertifiedKey) -> u8 {
    match key.key.algorithm() {
        SignatureAlgorithm::ECDSA => 0,
        SignatureAlgorithm::ED25519 => 1,
        SignatureAlgorithm::RSA => 2,
        _ => 3,
    }
}

/// Adds `key` to a name's candidates unless one of the same key type is there already (config
/// validation refuses that; this keeps the earlier one should a caller skip validation).
fn add_candidate(list: &mut Candidates, key: &Arc<CertifiedKey>, cert: &config::Certificate) {
    if list
        .iter()
        .any(|k| k.key.algorithm() == key.key.algorithm())
    {
        tracing::warn!(
            cert = %cert.cert_path.display(),
            "name already served by an earlier certificate with the same key type; keeping the \
             earlier one"
        );
        return;
    }
    list.push(Arc::clone(key));
    // Stable: among equal ranks the configuration's order stays.
    list.sort_by_key(|k| key_rank(k));
}

/// The error rustls reports when a resolver returns no certificate, which [`SniResolver`] does
/// only under `strict_sni`: how the connection core tells a refused SNI from other failures.
const NO_CERTIFICATE: &str = "no server certificate chain resolved";

/// Whether a handshake failed because [`SniResolver`] refused its SNI (`strict_sni`).
pub fn is_sni_refusal(error: &rustls::Error) -> bool {
    matches!(error, rustls::Error::General(m) if m == NO_CERTIFICATE)
}

/// A fatal unrecognized_name(112) alert in a plaintext TLS record (RFC 6066 §3, RFC 8446 §6),
/// sent instead of the access_denied rustls queues when a resolver has no certificate: it is
/// the alert RFC 6066 names for this case and the one clients report as "unrecognized name".
/// The record version is the 0x0303 every TLS 1.2/1.3 record carries.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Chooses the certificate for a handshake from the client's SNI and signature algorithms.
///
/// Every `CertifiedKey` is parsed and checked when the resolver is built; `resolve` only looks
/// names up. Exact names win over wildcards; without SNI, or when nothing matches, the default
/// certificate is served (the client decides whether it accepts it), or under `strict` the
/// handshake is refused. A name may have one certificate per key type (an ECDSA and an RSA
/// one): the first, ECDSA before RSA, whose key the client can verify with one of its
/// `signature_algorithms` and one of its cipher suites is served.
#[derive(Debug)]
pub struct SniResolver {
    /// Exact names, lower-case, no trailing dot.
    exact: HashMap<String, Candidates>,
    /// OCSP staples, keyed by the address of the unstapled `CertifiedKey` the maps above hold
    /// (those `Arc`s live as long as the resolver, so an address names one certificate). The
    /// maps always hold the unstapled key; `resolve` swaps in the stapled one while its
    /// response is valid, so a response going stale stops being stapled at that moment
    /// without a reload.
    staples: HashMap<usize, Staple>,
    /// `*.suffix` patterns keyed by `suffix` (lower-case, no trailing dot): a name matches when
    /// removing its first, non-empty label leaves exactly the key.
    wildcard: HashMap<String, Candidates>,
    /// Served without SNI and when no name matches: the default certificate, and beside it the
    /// certificates of other key types for its first name.
    default: Candidates,
    /// The default certificate itself (what [`SniResolver::lookup`] falls back to).
    fallback: Arc<CertifiedKey>,
    /// `strict_sni`: no default; a handshake that matches no name gets no certificate.
    strict: bool,
    /// The suites the server configuration enables: a TLS 1.2 client must share one with the
    /// chosen key's type (ECDHE_ECDSA or ECDHE_RSA).
    suites: Vec<SupportedCipherSuite>,
}

impl SniResolver {
    /// Loads every certificate's key with `provider` and indexes the certificates by name.
    /// The default is the certificate marked `default`, else the first one. Not strict.
    pub fn new(
        certs: &[config::Certificate],
        provider: &CryptoProvider,
    ) -> Result<SniResolver, TlsError> {
        let mut default: Option<(usize, Arc<CertifiedKey>)> = None;
        let mut first: Option<(usize, Arc<CertifiedKey>)> = None;
        let mut exact: HashMap<String, Candidates> = HashMap::new();
        let mut wildcard: HashMap<String, Candidates> = HashMap::new();

        let mut staples = HashMap::new();
        for (index, cert) in certs.iter().enumerate() {
            let key = certified_key(cert, provider)?;
            if let Some(s) = staple(cert, &key) {
                staples.insert(Arc::as_ptr(&key) as usize, s);
            }
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
                add_candidate(map.entry(host).or_default(), &key, cert);
            }
            first.get_or_insert((index, key));
        }

        let Some((index, key)) = default.or(first) else {
            return Err(TlsError::NoCertificates);
        };
        // The default's siblings: the candidates of its first name, if it is one of them.
        let siblings = certs
            .get(index)
            .and_then(|c| c.names.first())
            .and_then(|n| match parse_name(n)? {
                NamePattern::Exact(host) => exact.get(&host),
                NamePattern::Wildcard(suffix) => wildcard.get(&suffix),
            })
            .filter(|list| list.iter().any(|k| Arc::ptr_eq(k, &key)));
        let default = match siblings {
            Some(list) => list.clone(),
            None => vec![Arc::clone(&key)],
        };
        Ok(SniResolver {
            exact,
            wildcard,
            default,
            staples,
            fallback: key,
            strict: false,
            suites: provider.cipher_suites.clone(),
        })
    }

    /// Under `strict`, a handshake whose SNI matches no name (or that has none) gets no
    /// certificate, and rustls fails it (see [`is_sni_refusal`]).
    pub fn strict(mut self, strict: bool) -> SniResolver {
        self.strict = strict;
        self
    }

    /// The preferred certificate for `server_name` (the SNI as the client sent it, or `None`),
    /// ignoring what the client supports and `strict`: the default when nothing matches.
    pub fn lookup(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let list = self.matching(server_name).unwrap_or(&self.default);
        list.first().unwrap_or(&self.fallback)
    }

    /// The candidates configured for `server_name`, or `None` when no name matches.
    ///
    /// Case-insensitive and tolerant of one trailing dot. rustls already lower-cases the SNI
    /// before calling a resolver (`server::hs`, `to_lowercase_owned`) but keeps a trailing dot
    /// (its own client strips it, other clients need not), so the dot is removed here and the
    /// lower-casing is repeated only when an upper-case byte is present — into a stack buffer,
    /// never the heap.
    fn matching(&self, server_name: Option<&str>) -> Option<&Candidates> {
        let name = server_name?;
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.len() > MAX_DNS_NAME || !name.is_ascii() {
            // Non-ASCII cannot be a DNS name on the wire (IDNs travel as A-labels).
            return None;
        }
        let mut buf = [0u8; MAX_DNS_NAME];
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = buf.get_mut(..name.len())?;
            lower.copy_from_slice(name.as_bytes());
            lower.make_ascii_lowercase();
            // Cannot fail: ASCII lower-casing of ASCII stays ASCII.
            std::str::from_utf8(lower).ok()?
        } else {
            name
        };

        if let Some(list) = self.exact.get(name) {
            return Some(list);
        }
        let (label, suffix) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(suffix)
    }

    /// Whether the client can verify a signature by `key` (one of its signature schemes fits
    /// the key), shares a cipher suite usable with the key's type, and — for an ECDSA key —
    /// lists its curve among its groups. The last is RFC 8422 §5.1's rule for TLS 1.2 (where
    /// `ecdsa_secp256r1_sha256` does not name a curve); rustls's `ClientHello` does not say
    /// which version will be negotiated, so it applies to TLS 1.3 clients too: one whose
    /// groups leave the curve out gets another key type when there is one, which it can use.
    fn client_supports(&self, key: &CertifiedKey, hello: &ClientHello<'_>) -> bool {
        let algorithm = key.key.algorithm();
        key.key.choose_scheme(hello.signature_schemes()).is_some()
            && hello.cipher_suites().iter().any(|offered| {
                self.suites
                    .iter()
                    .any(|s| s.suite() == *offered && s.usable_for_signature_algorithm(algorithm))
            })
            && curve_offered(key, hello)
    }
}

/// Whether an ECDSA `key`'s curve is among the client's supported groups (any other key, or a
/// client that sent no groups, passes).
fn curve_offered(key: &CertifiedKey, hello: &ClientHello<'_>) -> bool {
    use rustls::{NamedGroup, SignatureScheme};
    if key.key.algorithm() != SignatureAlgorithm::ECDSA {
        return true;
    }
    let Some(groups) = hello.named_groups() else {
        return true;
    };
    // A signing key offers exactly the scheme of its own curve.
    let curve = [
        (
            SignatureScheme::ECDSA_NISTP256_SHA256,
            NamedGroup::secp256r1,
        ),
        (
            SignatureScheme::ECDSA_NISTP384_SHA384,
            NamedGroup::secp384r1,
        ),
        (
            SignatureScheme::ECDSA_NISTP521_SHA512,
            NamedGroup::secp521r1,
        ),
    ]
    .into_iter()
    .find(|(scheme, _)| key.key.choose_scheme(&[*scheme]).is_some());
    match curve {
        Some((_, group)) => groups.contains(&group),
        None => true,
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let list = match self.matching(client_hello.server_name()) {
            Some(list) => list,
            None if self.strict => return None,
            None => &self.default,
        };
        let chosen = match list.as_slice() {
            [only] => only,
            // No candidate fits: serve the preferred one and let rustls fail the handshake
            // with the alert it chooses for this.
            _ => list
                .iter()
                .find(|k| self.client_supports(k, &client_hello))
                .or(list.first())?,
        };
        if !self.staples.is_empty() {
            if let Some(s) = self.staples.get(&(Arc::as_ptr(chosen) as usize)) {
                // One clock read per handshake, and only with staples configured: the
                // handshake's own signature costs far more.
                if s.response.usable_at(SystemTime::now()) {
                    return Some(Arc::clone(&s.stapled));
                }
            }
        }
        Some(Arc::clone(chosen))
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
    /// The client certificate rustls verified, if the client sent one (only possible with
    /// `[tls] client_auth`).
    pub client_cert: Option<ClientCert>,
}

/// A verified client certificate, as the PROXY v2 SSL TLV reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Presented in this connection's handshake (PP2_CLIENT_CERT_CONN); `false`: the session
    /// was resumed and the certificate was presented when it was established (only
    /// PP2_CLIENT_CERT_SESS).
    pub this_connection: bool,
    /// The first commonName of the certificate's subject, if it has one in a string form.
    pub cn: Option<String>,
}

/// Reads the negotiated parameters off a server connection (normally once, after the handshake).
pub fn negotiated(conn: &ServerConnection) -> Negotiated {
    Negotiated {
        version: conn.protocol_version(),
        sni: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        cipher: conn.negotiated_cipher_suite(),
        client_cert: client_cert(conn),
    }
}

/// The client certificate of `conn`. rustls only reports certificates it verified (a failed
/// verification fails the handshake), including those of a resumed session.
fn client_cert(conn: &ServerConnection) -> Option<ClientCert> {
    let leaf = conn.peer_certificates()?.first()?;
    let cn = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .and_then(|(_, cert)| {
            let cn = cert.subject().iter_common_name().next()?;
            cn.as_str().ok().map(str::to_owned)
        });
    Some(ClientCert {
        this_connection: conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed),
        cn,
    })
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
            client_cert: self.client_cert.as_ref().map(ClientCert::tls_info),
        })
    }
}

impl ClientCert {
    /// Its part of [`TlsInfo`].
    pub fn tls_info(&self) -> crate::proxy_protocol::ClientCertInfo<'_> {
        crate::proxy_protocol::ClientCertInfo {
            this_connection: self.this_connection,
            cn: self.cn.as_deref(),
        }
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
