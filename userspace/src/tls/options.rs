//! The operator's choice of cipher suites and key-exchange groups (`[tls] cipher_suites` and
//! `[tls] groups`): resolving their names against what the aws-lc-rs provider implements,
//! checking them against the enabled protocol versions, and building the `CryptoProvider` the
//! server configuration is made from. Does not own the rest of the server configuration
//! (`tls::server_config`) or the file syntax (`config`).
//!
//! Specs: RFC 8446 §4.2.7 (supported_groups; a group list is the client's preference, and rustls
//! follows it so as to avoid a HelloRetryRequest), RFC 8422 (ECDHE suites for TLS 1.2),
//! draft-ietf-tls-ecdhe-mlkem (the hybrid X25519MLKEM768 group, TLS 1.3 only).

use rustls::crypto::{aws_lc_rs, CryptoProvider, SupportedKxGroup};
use rustls::{CipherSuite, NamedGroup, ProtocolVersion, SupportedCipherSuite};

use crate::config::TlsVersion;

/// What is wrong with a list, and which entry (`None`: the list as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub index: Option<usize>,
    pub message: String,
}

fn protocol(version: TlsVersion) -> ProtocolVersion {
    match version {
        TlsVersion::Tls12 => ProtocolVersion::TLSv1_2,
        TlsVersion::Tls13 => ProtocolVersion::TLSv1_3,
    }
}

fn version_label(version: TlsVersion) -> &'static str {
    match version {
        TlsVersion::Tls12 => "1.2",
        TlsVersion::Tls13 => "1.3",
    }
}

/// Every suite the provider implements, in its own (default) order.
fn all_suites() -> &'static [SupportedCipherSuite] {
    aws_lc_rs::ALL_CIPHER_SUITES
}

/// Every group the provider implements (the defaults and those it only offers on request).
fn all_groups() -> &'static [&'static dyn SupportedKxGroup] {
    aws_lc_rs::ALL_KX_GROUPS
}

/// The suite called `name`: its rustls/IANA name (`TLS13_AES_128_GCM_SHA256`,
/// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`) or the OpenSSL name tern reports in PROXY headers
/// and logs (`TLS_AES_128_GCM_SHA256`, `ECDHE-RSA-AES128-GCM-SHA256`). Case-insensitive.
fn find_suite(name: &str) -> Option<SupportedCipherSuite> {
    all_suites().iter().copied().find(|s| {
        let suite = s.suite();
        suite.as_str().is_some_and(|n| n.eq_ignore_ascii_case(name))
            || super::cipher_name(suite).eq_ignore_ascii_case(name)
    })
}

fn suite_names() -> String {
    let names: Vec<&str> = all_suites()
        .iter()
        .filter_map(|s| s.suite().as_str())
        .collect();
    names.join(", ")
}

fn group_names() -> String {
    let names: Vec<&str> = all_groups()
        .iter()
        .filter_map(|g| g.name().as_str())
        .collect();
    names.join(", ")
}

/// Resolves `[tls] cipher_suites` for the enabled `versions`: every name known, none twice, each
/// for an enabled version, and every enabled version left with at least one suite.
pub fn cipher_suites(
    names: &[String],
    versions: &[TlsVersion],
) -> Result<Vec<CipherSuite>, OptionError> {
    let mut chosen: Vec<SupportedCipherSuite> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let err = |message: String| OptionError {
            index: Some(i),
            message,
        };
        let suite = find_suite(name).ok_or_else(|| {
            err(format!(
                "{name:?} is not a cipher suite tern supports; supported: {}",
                suite_names()
            ))
        })?;
        if chosen.iter().any(|c| c.suite() == suite.suite()) {
            return Err(err(format!("{name:?} is listed twice")));
        }
        let version = suite.version().version;
        if !versions.iter().any(|v| protocol(*v) == version) {
            return Err(err(format!(
                "{name:?} is a {} suite, but tls.versions does not enable that version",
                super::version_name(version)
            )));
        }
        chosen.push(suite);
    }
    for v in versions {
        if !chosen.iter().any(|s| s.version().version == protocol(*v)) {
            return Err(OptionError {
                index: None,
                message: format!(
                    "no suite for TLS {}, which tls.versions enables (list one, or remove the \
                     version)",
                    version_label(*v)
                ),
            });
        }
    }
    Ok(chosen.iter().map(|s| s.suite()).collect())
}

/// Resolves `[tls] groups` for the enabled `versions`: every name known (case-insensitive),
/// none twice, and every enabled version left with a usable group (the ML-KEM hybrids are
/// TLS 1.3 only).
pub fn groups(names: &[String], versions: &[TlsVersion]) -> Result<Vec<NamedGroup>, OptionError> {
    let mut chosen: Vec<&'static dyn SupportedKxGroup> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let err = |message: String| OptionError {
            index: Some(i),
            message,
        };
        let group = all_groups()
            .iter()
            .copied()
            .find(|g| {
                g.name()
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .ok_or_else(|| {
                err(format!(
                    "{name:?} is not a key-exchange group tern supports; supported: {}",
                    group_names()
                ))
            })?;
        if chosen.iter().any(|c| c.name() == group.name()) {
            return Err(err(format!("{name:?} is listed twice")));
        }
        chosen.push(group);
    }
    for v in versions {
        if !chosen.iter().any(|g| g.usable_for_version(protocol(*v))) {
            return Err(OptionError {
                index: None,
                message: format!(
                    "no group usable with TLS {}, which tls.versions enables",
                    version_label(*v)
                ),
            });
        }
    }
    Ok(chosen.iter().map(|g| g.name()).collect())
}

/// The provider for a server configuration: aws-lc-rs with only the configured suites (in the
/// configured order, which is the server's preference) and groups; `None` keeps the provider's
/// defaults. Names were validated by [`cipher_suites`] and [`groups`], so nothing is dropped
/// here except by a programming error.
pub fn provider(suites: Option<&[CipherSuite]>, groups: Option<&[NamedGroup]>) -> CryptoProvider {
    let mut provider = aws_lc_rs::default_provider();
    if let Some(suites) = suites {
        provider.cipher_suites = suites
            .iter()
            .filter_map(|want| all_suites().iter().copied().find(|s| s.suite() == *want))
            .collect();
    }
    if let Some(groups) = groups {
        provider.kx_groups = groups
            .iter()
            .filter_map(|want| all_groups().iter().copied().find(|g| g.name() == *want))
            .collect();
    }
    provider
}
