//! Self-signed certificates for tests and `cargo xtask run`, written as PEM files.
//!
//! Owns: key generation and certificate signing with rcgen 0.13. It does not build chains or
//! CAs: each certificate is its own issuer, which is all `curl -k`, `openssl s_client` and
//! tern's SNI selection need.
//!
//! Keys: ECDSA P-256 (`PKCS_ECDSA_P256_SHA256`) and RSA 2048 (`PKCS_RSA_SHA256`). rcgen's default
//! backend, ring, cannot generate RSA keys, so tern-tests enables rcgen's `aws_lc_rs` feature
//! (aws-lc-rs is already built for rustls) and uses `KeyPair::generate_rsa_for`. Keys are
//! written as PKCS#8 (`-----BEGIN PRIVATE KEY-----`); certificates carry the given names as
//! subjectAltNames (DNS names, or IP addresses for names that parse as one, RFC 5280 §4.2.1.6)
//! and the first name as the subject CN.

use rcgen::{CertificateParams, DnType, KeyPair, RsaKeySize};
use std::path::{Path, PathBuf};

/// The key algorithm of a generated certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on NIST P-256, signed with SHA-256.
    EcdsaP256,
    /// RSA with a 2048-bit modulus, PKCS#1 v1.5 signature with SHA-256.
    Rsa2048,
}

/// The files written by [`write_self_signed`] and their contents.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// `<dir>/<stem>.pem`: the certificate (one PEM block).
    pub cert: PathBuf,
    /// `<dir>/<stem>.key`: the private key, PKCS#8 PEM.
    pub key: PathBuf,
    /// Contents of `cert`.
    pub cert_pem: String,
    /// Contents of `key`.
    pub key_pem: String,
    /// The certificate in DER, to compare with what a client received.
    pub cert_der: Vec<u8>,
}

/// Generates a key of `kind` and a self-signed certificate for `names` (first name = CN) and
/// writes `<dir>/<stem>.pem` and `<dir>/<stem>.key`. Panics on any failure.
#[track_caller]
pub fn write_self_signed(dir: &Path, stem: &str, names: &[&str], kind: KeyKind) -> CertFiles {
    assert!(!names.is_empty(), "a certificate needs at least one name");
    let key = match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyKind::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048),
    }
    .unwrap_or_else(|e| panic!("cannot generate a {kind:?} key: {e}"));
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(sans)
        .unwrap_or_else(|e| panic!("invalid certificate names {names:?}: {e}"));
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = params
        .self_signed(&key)
        .unwrap_or_else(|e| panic!("cannot self-sign a certificate for {names:?}: {e}"));
    let files = CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
    };
    for (path, text) in [(&files.cert, &files.cert_pem), (&files.key, &files.key_pem)] {
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rig::TempDir;
    use std::process::Command;

    /// `openssl x509 -noout -text` on the written file: an independent parser must accept it.
    fn openssl_text(cert: &Path) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(cert)
            .output()
            .expect("run openssl (is it installed?)");
        assert!(
            out.status.success(),
            "openssl x509 rejected {}: {}",
            cert.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn ecdsa_certificate_has_names_and_key_type() {
        let dir = TempDir::new("certs");
        let files = write_self_signed(
            dir.path(),
            "site",
            &["tern.test", "*.tern.test", "127.0.0.1"],
            KeyKind::EcdsaP256,
        );
        let text = openssl_text(&files.cert);
        assert!(
            text.contains("CN = tern.test"),
            "subject CN missing:\n{text}"
        );
        assert!(text.contains("DNS:tern.test"), "SAN missing:\n{text}");
        assert!(
            text.contains("DNS:*.tern.test"),
            "wildcard SAN missing:\n{text}"
        );
        assert!(
            text.contains("IP Address:127.0.0.1"),
            "IP SAN missing:\n{text}"
        );
        assert!(text.contains("prime256v1"), "not a P-256 key:\n{text}");
        assert!(files.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            std::fs::read_to_string(&files.key).expect("key file"),
            files.key_pem
        );
    }

    #[test]
    fn rsa_certificate_is_2048_bits_and_key_matches() {
        let dir = TempDir::new("certs");
        let files = write_self_signed(dir.path(), "rsa", &["other.test"], KeyKind::Rsa2048);
        let text = openssl_text(&files.cert);
        assert!(
            text.contains("Public-Key: (2048 bit)"),
            "not RSA 2048:\n{text}"
        );
        assert!(
            text.contains("sha256WithRSAEncryption"),
            "wrong signature:\n{text}"
        );
        // The key must belong to the certificate: compare the public keys openssl derives.
        let pubkey = |args: &[&str], path: &Path| {
            let out = Command::new("openssl")
                .args(args)
                .arg(path)
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args:?} failed");
            out.stdout
        };
        assert_eq!(
            pubkey(&["x509", "-noout", "-pubkey", "-in"], &files.cert),
            pubkey(&["pkey", "-pubout", "-in"], &files.key),
            "private key does not match the certificate"
        );
    }
}
