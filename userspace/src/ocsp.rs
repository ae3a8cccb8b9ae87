//! OCSP responses tern staples (RFC 6066 §8 status_request; RFC 8446 §4.4.2.1 in TLS 1.3):
//! reading the DER file an operator configured with a `[[certificate]]`, and deciding whether
//! it may be stapled right now.
//!
//! Owns: a minimal DER walk of `OCSPResponse` → `BasicOCSPResponse` → the `SingleResponse` for
//! the certificate (RFC 6960 §4.2.1), keeping only what the stapling decision needs —
//! responseStatus, the serial number in each CertID, certStatus, thisUpdate and nextUpdate —
//! and [`Response::staple_problem`], the reason (if any) not to staple it at a given time.
//! Does not own: fetching responses from the responder (the operator's cron job does that and
//! reloads tern), checking the responder's signature or the CertID's issuer hashes (the client
//! verifies the response it receives against its trust store; a wrong response costs the
//! client a failed check, never tern a wrong answer), or sending the staple (rustls does, from
//! `CertifiedKey::ocsp`).
//!
//! The walk uses `asn1-rs` (already here through `x509-parser`, which has no OCSP support) for
//! TLV framing and GeneralizedTime; every step is bounds-checked by it, so a malformed file is
//! an error string, never a panic.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::asn1_rs::{Any, Class, FromDer, GeneralizedTime, Tag};

/// `id-pkix-ocsp-basic` (1.3.6.1.5.5.7.48.1.1), DER content bytes: the only response type
/// RFC 6960 §4.2.1 requires responders to support.
const ID_PKIX_OCSP_BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];

/// The `certStatus` of the response for this certificate (RFC 6960 §4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    Good,
    Revoked,
    Unknown,
}

/// A parsed OCSP response file, with the facts the stapling decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Where it was read from (for log lines).
    pub path: PathBuf,
    /// The whole `OCSPResponse`, DER, as it is stapled.
    pub der: Vec<u8>,
    /// Whether one SingleResponse names the certificate's serial number. `false`: the file is
    /// for another certificate and is never stapled.
    pub for_certificate: bool,
    /// The status of the SingleResponse for the certificate (`Good` when `!for_certificate`,
    /// where it means nothing).
    pub status: CertStatus,
    /// thisUpdate of that SingleResponse: before it, the response is not yet valid.
    pub this_update: SystemTime,
    /// nextUpdate of that SingleResponse: from it on, the response is stale. `None`: the
    /// responder promises nothing newer (RFC 6960 §4.2.2.1), so it never goes stale here.
    pub next_update: Option<SystemTime>,
}

impl Response {
    /// Parses the DER `OCSPResponse` in `der` (read from `path`) for the certificate with the
    /// serial number `serial` (the INTEGER's content bytes, as `x509-parser`'s `raw_serial`).
    pub fn parse(path: PathBuf, der: Vec<u8>, serial: &[u8]) -> Result<Response, String> {
        let single = find_single(&der, serial)?;
        let (for_certificate, status, this_update, next_update) = match single {
            Some(s) => (true, s.status, s.this_update, s.next_update),
            None => (false, CertStatus::Good, UNIX_EPOCH, None),
        };
        Ok(Response {
            path,
            der,
            for_certificate,
            status,
            this_update,
            next_update,
        })
    }

    /// Why this response must not be stapled at `now`, or `None` when it may be. A revoked
    /// status is stapled: it is the truth, and the client should learn it.
    pub fn staple_problem(&self, now: SystemTime) -> Option<String> {
        if !self.for_certificate {
            return Some(
                "it is for another certificate (no response names its serial number)".into(),
            );
        }
        if now < self.this_update {
            return Some(format!(
                "it is not valid yet (thisUpdate {})",
                rfc3339(self.this_update)
            ));
        }
        match self.next_update {
            Some(next) if now >= next => {
                Some(format!("it is stale (nextUpdate {})", rfc3339(next)))
            }
            _ => None,
        }
    }

    /// Whether it may be stapled at `now` (see [`Response::staple_problem`]). Cheap: no
    /// allocation, so the certificate resolver can ask on every handshake.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        self.for_certificate
            && now >= self.this_update
            && self.next_update.is_none_or(|next| now < next)
    }
}

/// `time` as RFC 3339 UTC, for log lines and errors.
fn rfc3339(time: SystemTime) -> String {
    let secs = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (Unix time)"))
}

/// The facts of one SingleResponse.
struct Single {
    status: CertStatus,
    this_update: SystemTime,
    next_update: Option<SystemTime>,
}

/// One TLV of `input`, with the rest after it.
fn tlv<'a>(input: &'a [u8], what: &str) -> Result<(&'a [u8], Any<'a>), String> {
    Any::from_der(input).map_err(|e| format!("{what}: not DER ({e})"))
}

/// One TLV that must have `tag` (universal class), with the rest after it.
fn expect<'a>(input: &'a [u8], tag: Tag, what: &str) -> Result<(&'a [u8], Any<'a>), String> {
    let (rest, any) = tlv(input, what)?;
    if any.class() != Class::Universal || any.tag() != tag {
        return Err(format!("{what}: expected {tag}, found {}", any.tag()));
    }
    Ok((rest, any))
}

fn is_context(any: &Any<'_>, n: u32) -> bool {
    any.class() == Class::ContextSpecific && any.tag() == Tag(n)
}

fn generalized_time(any: Any<'_>, what: &str) -> Result<SystemTime, String> {
    let t = GeneralizedTime::try_from(any)
        .map_err(|e| format!("{what}: not a GeneralizedTime ({e})"))?
        .utc_datetime()
        .map_err(|e| format!("{what}: not a valid time ({e})"))?;
    let secs = t.unix_timestamp();
    Ok(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    })
}

/// Walks the OCSPResponse down to the SingleResponse whose CertID has `serial`.
fn find_single(der: &[u8], serial: &[u8]) -> Result<Option<Single>, String> {
    // OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, responseBytes [0] EXPLICIT .. }
    let (trailing, resp) = expect(der, Tag::Sequence, "OCSPResponse")?;
    if !trailing.is_empty() {
        return Err("OCSPResponse: trailing bytes after the response".into());
    }
    let (rest, status) = expect(resp.data, Tag::Enumerated, "responseStatus")?;
    if status.data != [0] {
        // 1 malformedRequest, 2 internalError, 3 tryLater, 5 sigRequired, 6 unauthorized.
        return Err(format!(
            "responseStatus is {:?}, not successful (0): there is nothing to staple",
            status.data
        ));
    }
    let (_, bytes) = tlv(rest, "responseBytes")?;
    if !is_context(&bytes, 0) {
        return Err("responseBytes ([0]) is missing".into());
    }
    // ResponseBytes ::= SEQUENCE { responseType OID, response OCTET STRING }
    let (_, bytes) = expect(bytes.data, Tag::Sequence, "ResponseBytes")?;
    let (rest, kind) = expect(bytes.data, Tag::Oid, "responseType")?;
    if kind.data != ID_PKIX_OCSP_BASIC {
        return Err("responseType is not id-pkix-ocsp-basic".into());
    }
    let (_, octets) = expect(rest, Tag::OctetString, "response")?;
    // BasicOCSPResponse ::= SEQUENCE { tbsResponseData ResponseData, .. }
    let (_, basic) = expect(octets.data, Tag::Sequence, "BasicOCSPResponse")?;
    let (_, data) = expect(basic.data, Tag::Sequence, "tbsResponseData")?;
    // ResponseData ::= SEQUENCE { version [0] EXPLICIT DEFAULT v1, responderID CHOICE {[1],[2]},
    //   producedAt GeneralizedTime, responses SEQUENCE OF SingleResponse, .. }
    let (mut rest, mut field) = tlv(data.data, "ResponseData")?;
    if is_context(&field, 0) {
        (rest, field) = tlv(rest, "responderID")?;
    }
    if !(is_context(&field, 1) || is_context(&field, 2)) {
        return Err("responderID: expected [1] or [2]".into());
    }
    let (rest, _produced) = expect(rest, Tag::GeneralizedTime, "producedAt")?;
    let (_, responses) = expect(rest, Tag::Sequence, "responses")?;
    let mut list = responses.data;
    let mut found = None;
    while !list.is_empty() {
        let (next, single) = expect(list, Tag::Sequence, "SingleResponse")?;
        list = next;
        let parsed = single_response(single.data)?;
        if found.is_none() && parsed.0 == serial {
            found = Some(parsed.1);
        }
    }
    Ok(found)
}

/// One SingleResponse: the serial number its CertID names, and its facts.
fn single_response(input: &[u8]) -> Result<(&[u8], Single), String> {
    // SingleResponse ::= SEQUENCE { certID CertID, certStatus CertStatus,
    //   thisUpdate GeneralizedTime, nextUpdate [0] EXPLICIT GeneralizedTime OPTIONAL, .. }
    let (rest, cert_id) = expect(input, Tag::Sequence, "certID")?;
    // CertID ::= SEQUENCE { hashAlgorithm, issuerNameHash OCTET STRING,
    //   issuerKeyHash OCTET STRING, serialNumber INTEGER }
    let (id, _) = expect(cert_id.data, Tag::Sequence, "certID.hashAlgorithm")?;
    let (id, _) = expect(id, Tag::OctetString, "certID.issuerNameHash")?;
    let (id, _) = expect(id, Tag::OctetString, "certID.issuerKeyHash")?;
    let (_, serial) = expect(id, Tag::Integer, "certID.serialNumber")?;

    let (rest, status) = tlv(rest, "certStatus")?;
    let status = match (status.class(), status.tag().0) {
        (Class::ContextSpecific, 0) => CertStatus::Good,
        (Class::ContextSpecific, 1) => CertStatus::Revoked,
        (Class::ContextSpecific, 2) => CertStatus::Unknown,
        _ => return Err("certStatus: expected [0], [1] or [2]".into()),
    };
    let (rest, this_update) = expect(rest, Tag::GeneralizedTime, "thisUpdate")?;
    let this_update = generalized_time(this_update, "thisUpdate")?;
    let mut next_update = None;
    if !rest.is_empty() {
        let (_, next) = tlv(rest, "nextUpdate")?;
        if is_context(&next, 0) {
            let (_, t) = expect(next.data, Tag::GeneralizedTime, "nextUpdate")?;
            next_update = Some(generalized_time(t, "nextUpdate")?);
        }
    }
    Ok((
        serial.data,
        Single {
            status,
            this_update,
            next_update,
        },
    ))
}

/// The main thread's periodic look at the running configuration's staples, so that a response
/// going stale (or becoming valid) while tern runs is logged. The resolver already stops
/// stapling it at that moment (`tls::SniResolver` asks [`Response::usable_at`] per handshake);
/// this only tells the operator. Problems present when a configuration is loaded are logged by
/// `tls::server_config`, so this logs changes only: a response that was usable at the previous
/// look and is not any more.
#[derive(Debug, Default)]
pub struct StaleWatch {
    /// When it looked last; `None`: never.
    last: Option<std::time::Instant>,
    /// The generation looked at last, and per certificate whether its staple was usable then.
    seen: (u64, Vec<bool>),
}

/// How often [`StaleWatch::tick`] looks (the brief's "at least once a minute").
pub const STALE_CHECK_EVERY: Duration = Duration::from_secs(30);

impl StaleWatch {
    /// Looks at the running configuration when [`STALE_CHECK_EVERY`] has passed since the last
    /// look (the main thread calls this on every turn of its watch loop).
    pub fn tick(&mut self, reloader: &crate::reload::Reloader) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < STALE_CHECK_EVERY)
        {
            return;
        }
        self.last = Some(now);
        let live = reloader.current();
        self.look(live.generation, &live.config.certificates);
    }

    /// One look at `certs`, the certificates of configuration generation `generation`.
    pub fn look(&mut self, generation: u64, certs: &[crate::config::Certificate]) {
        let wall = SystemTime::now();
        let usable: Vec<bool> = certs
            .iter()
            .map(|c| c.ocsp.as_ref().is_some_and(|o| o.usable_at(wall)))
            .collect();
        if self.seen.0 == generation {
            for (i, cert) in certs.iter().enumerate() {
                let was = self.seen.1.get(i).copied().unwrap_or(false);
                let (Some(ocsp), true) = (&cert.ocsp, was) else {
                    continue;
                };
                if let Some(why) = ocsp.staple_problem(wall) {
                    tracing::warn!(
                        file = %ocsp.path.display(),
                        certificate = %cert.cert_path.display(),
                        "OCSP response no longer stapled: {why}"
                    );
                }
            }
        }
        self.seen = (generation, usable);
    }
}

#[cfg(test)]
mod tests;
