//! The crypto floors every figure is compared with: OpenSSL's primitives (`openssl speed`) and
//! tern's rustls configuration in memory (the criterion benches in `userspace/benches/tls.rs`).
//!
//! Owns: running both on the target core, parsing `openssl speed -mr` (machine-readable) output,
//! reading criterion's `estimates.json`, and the floor arithmetic:
//! - per new connection: one ECDSA P-256 signature (CertificateVerify, RFC 8446 §4.4.3) plus two
//!   X25519 scalar multiplications (the server's key share and the shared secret, RFC 7748 §6.1);
//!   `openssl speed ecdhx25519` times one derivation, so it counts twice. Hashing, HKDF and the
//!   two tickets' encryption are left out: the primitive floor is a lower bound, the rustls
//!   in-memory handshake (which includes them) is the realistic one;
//! - per MiB of response: AES-128-GCM sealing of 64 records of 16 KiB;
//! - per keep-alive request: rustls opening the request record and sealing a 1 KiB response.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Results of `openssl speed`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OpensslSpeed {
    pub ecdsa_p256_sign_per_s: f64,
    pub x25519_derive_per_s: f64,
    /// AES-128-GCM with 16 KiB blocks.
    pub aes128gcm_bytes_per_s: f64,
}

impl OpensslSpeed {
    pub fn ecdsa_sign_us(&self) -> f64 {
        1e6 / self.ecdsa_p256_sign_per_s
    }
    pub fn x25519_us(&self) -> f64 {
        1e6 / self.x25519_derive_per_s
    }
    /// One signature and two X25519 operations.
    pub fn handshake_us(&self) -> f64 {
        self.ecdsa_sign_us() + 2.0 * self.x25519_us()
    }
    pub fn aes_us_per_mib(&self) -> f64 {
        1e6 * (1u64 << 20) as f64 / self.aes128gcm_bytes_per_s
    }
}

/// Parses the `+F…` result lines of `openssl speed -mr` (OpenSSL 3.x `apps/speed.c`):
/// `+F:<n>:<cipher>:<bytes/s per block size>…` for ciphers, `+F4:<n>:<bits>:<sign/s>:<verify/s>`
/// for ECDSA, `+F5:<n>:<bits>:<ops/s>:<s/op>` for ECDH. Only the algorithms the bench asked for
/// are looked at; a missing one is an error.
pub fn parse_openssl_speed(text: &str) -> Result<OpensslSpeed> {
    let mut out = OpensslSpeed::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.trim().split(':').collect();
        let num = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .with_context(|| format!("short openssl speed line {line:?}"))?
                .parse::<f64>()
                .with_context(|| format!("bad number in openssl speed line {line:?}"))
        };
        match fields.first().copied() {
            Some("+F")
                if fields
                    .get(2)
                    .is_some_and(|n| n.eq_ignore_ascii_case("AES-128-GCM")) =>
            {
                // The last column is the largest block size asked for (-bytes 16384 → the only one).
                out.aes128gcm_bytes_per_s = num(fields.len() - 1)?;
            }
            Some("+F4") if fields.get(2) == Some(&"256") => out.ecdsa_p256_sign_per_s = num(3)?,
            Some("+F5") if fields.get(2) == Some(&"253") => out.x25519_derive_per_s = num(3)?,
            _ => {}
        }
    }
    for (what, v) in [
        ("ecdsap256 sign", out.ecdsa_p256_sign_per_s),
        ("ecdhx25519", out.x25519_derive_per_s),
        ("aes-128-gcm", out.aes128gcm_bytes_per_s),
    ] {
        if v <= 0.0 {
            bail!("openssl speed output has no result for {what}:\n{text}");
        }
    }
    Ok(out)
}

/// The criterion results of `userspace/benches/tls.rs`, per operation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RustlsFloor {
    /// Server side of one full TLS 1.3 handshake, µs.
    pub handshake_server_us: f64,
    /// Both sides of one handshake, µs.
    pub handshake_both_us: f64,
    /// Sealing 1 MiB in 16 KiB records, µs.
    pub encrypt_us_per_mib: f64,
    /// Opening one small request record and sealing a 1 KiB response, µs.
    pub request_1k_us: f64,
}

#[derive(Deserialize)]
struct Estimates {
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    /// Nanoseconds per iteration.
    point_estimate: f64,
}

/// Reads the median of `<home>/<group>/<bench>/new/estimates.json`, in µs.
pub fn criterion_median_us(home: &Path, group: &str, bench: &str) -> Result<f64> {
    let path = home
        .join(group)
        .join(bench)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read criterion's {}", path.display()))?;
    parse_estimates_us(&text).with_context(|| format!("in {}", path.display()))
}

/// The median point estimate of a criterion `estimates.json`, converted from ns to µs.
pub fn parse_estimates_us(text: &str) -> Result<f64> {
    let e: Estimates = serde_json::from_str(text)?;
    // NaN fails this too.
    if e.median.point_estimate.is_nan() || e.median.point_estimate <= 0.0 {
        bail!("median estimate is {}", e.median.point_estimate);
    }
    Ok(e.median.point_estimate / 1000.0)
}

/// All four rustls figures from a criterion home.
pub fn read_rustls_floor(home: &Path) -> Result<RustlsFloor> {
    Ok(RustlsFloor {
        handshake_server_us: criterion_median_us(home, "tls", "handshake_server")?,
        handshake_both_us: criterion_median_us(home, "tls", "handshake_both")?,
        encrypt_us_per_mib: criterion_median_us(home, "tls", "encrypt_1mib")?,
        request_1k_us: criterion_median_us(home, "tls", "request_1k")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output of `openssl speed -mr -seconds 1 ecdsap256 ecdhx25519` and
    /// `openssl speed -mr -seconds 1 -bytes 16384 -evp aes-128-gcm` (OpenSSL 3.0.19).
    const SPEED: &str = "\
+DTP:256:sign:ecdsa:1
+R5:49529:256:0.99
+DTP:256:verify:ecdsa:1
+R6:15598:256:1.00
+DTP:253::ecdh:1
+R7:30810:253:1.00
+F4:3:256:50029.292929:15598.000000
+F5:22:253:30810.000000:0.000032
+DT:AES-128-GCM:1:16384
+R:244248:AES-128-GCM:1.000000
+H:16384
+F:25:AES-128-GCM:4001759232.00
";

    #[test]
    fn openssl_speed_machine_readable() {
        let s = parse_openssl_speed(SPEED).expect("all three algorithms");
        assert_eq!(s.ecdsa_p256_sign_per_s, 50029.292929);
        assert_eq!(s.x25519_derive_per_s, 30810.0);
        assert_eq!(s.aes128gcm_bytes_per_s, 4001759232.0);
        assert!((s.ecdsa_sign_us() - 19.988).abs() < 0.01);
        assert!((s.handshake_us() - (19.988 + 2.0 * 32.457)).abs() < 0.01);
        // 1 MiB at 4.0 GB/s is 262 µs.
        assert!(
            (s.aes_us_per_mib() - 262.03).abs() < 0.1,
            "{}",
            s.aes_us_per_mib()
        );
    }

    #[test]
    fn openssl_speed_missing_algorithm_is_an_error() {
        let without_aes: String = SPEED
            .lines()
            .filter(|l| !l.starts_with("+F:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = parse_openssl_speed(&without_aes).expect_err("aes missing");
        assert!(err.to_string().contains("aes-128-gcm"), "{err}");
    }

    #[test]
    fn criterion_estimates() {
        let text = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":151234.5,"standard_error":1.0},
                       "median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":150000.0,"standard_error":1.0}}"#;
        assert_eq!(parse_estimates_us(text).expect("valid"), 150.0);
        assert!(parse_estimates_us(r#"{"median":{"point_estimate":0.0}}"#).is_err());
        assert!(parse_estimates_us("{}").is_err());
    }
}
