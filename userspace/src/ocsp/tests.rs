//! OCSP response parsing and the stapling decision, on responses built here byte by byte
//! (signatures are not checked by tern, so a dummy one does).

use super::*;

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn time(text: &str) -> Vec<u8> {
    tlv(0x18, text.as_bytes())
}

/// One SingleResponse for `serial` with `status` ([0] good, [1] revoked, [2] unknown).
fn single(serial: &[u8], status: u8, this: &str, next: Option<&str>) -> Vec<u8> {
    let cert_id = seq(&[
        seq(&[tlv(0x06, &[0x2b, 0x0e, 0x03, 0x02, 0x1a]), tlv(0x05, &[])]), // sha1
        tlv(0x04, &[1; 20]),
        tlv(0x04, &[2; 20]),
        tlv(0x02, serial),
    ]);
    let status = match status {
        0 => vec![0x80, 0x00],
        1 => tlv(0xa1, &time("20200101000000Z")),
        _ => vec![0x82, 0x00],
    };
    let mut parts = vec![cert_id, status, time(this)];
    if let Some(next) = next {
        parts.push(tlv(0xa0, &time(next)));
    }
    seq(&parts)
}

fn response(singles: &[Vec<u8>]) -> Vec<u8> {
    let data = seq(&[
        tlv(0xa2, &tlv(0x04, &[3; 20])), // responderID byKey
        time("20250101000000Z"),
        seq(singles),
    ]);
    let basic = seq(&[
        data,
        seq(&[tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02])]),
        tlv(0x03, &[0, 0xaa]),
    ]);
    seq(&[
        tlv(0x0a, &[0]),
        tlv(
            0xa0,
            &seq(&[tlv(0x06, ID_PKIX_OCSP_BASIC), tlv(0x04, &basic)]),
        ),
    ])
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2025-01-01T00:00:00Z and 2025-01-08T00:00:00Z.
const THIS: u64 = 1_735_689_600;
const NEXT: u64 = THIS + 7 * 86_400;

#[track_caller]
fn parse(der: Vec<u8>, serial: &[u8]) -> Result<Response, String> {
    Response::parse(PathBuf::from("/test/ocsp.der"), der, serial)
}

#[test]
fn finds_the_response_for_the_serial_and_its_window() {
    let der = response(&[
        single(&[0x01], 1, "20240101000000Z", None),
        single(&[0x00, 0x99], 0, "20250101000000Z", Some("20250108000000Z")),
    ]);
    let r = parse(der.clone(), &[0x00, 0x99]).expect("parses");
    assert_eq!(r.der, der, "the whole response is kept for stapling");
    assert!(r.for_certificate);
    assert_eq!(r.status, CertStatus::Good);
    assert_eq!(r.this_update, at(THIS));
    assert_eq!(r.next_update, Some(at(NEXT)));

    assert!(r.usable_at(at(THIS)));
    assert_eq!(r.staple_problem(at(NEXT - 1)), None);
    let early = r.staple_problem(at(THIS - 1)).expect("not yet valid");
    assert!(
        early.contains("not valid yet") && early.contains("2025-01-01"),
        "{early}"
    );
    let stale = r.staple_problem(at(NEXT)).expect("stale at nextUpdate");
    assert!(
        stale.contains("stale") && stale.contains("2025-01-08"),
        "{stale}"
    );
    assert!(!r.usable_at(at(NEXT)));

    // The other single response: revoked, no nextUpdate (never stale).
    let r = parse(der, &[0x01]).expect("parses");
    assert_eq!((r.status, r.next_update), (CertStatus::Revoked, None));
    assert!(r.usable_at(at(NEXT * 2)));
}

#[test]
fn a_response_for_another_serial_is_never_stapled() {
    let der = response(&[single(&[0x05], 0, "20250101000000Z", None)]);
    let r = parse(der, &[0x06]).expect("parses");
    assert!(!r.for_certificate);
    assert!(!r.usable_at(at(THIS + 1)));
    let why = r.staple_problem(at(THIS + 1)).expect("a problem");
    assert!(why.contains("another certificate"), "{why}");
}

#[test]
fn malformed_or_unsuccessful_files_are_errors() {
    let good = response(&[single(&[0x05], 0, "20250101000000Z", None)]);
    for (what, der, want) in [
        ("empty", Vec::new(), "not DER"),
        ("PEM text", b"-----BEGIN".to_vec(), "OCSPResponse"),
        ("truncated", good[..good.len() - 3].to_vec(), "not DER"),
        ("trailing", [good.clone(), vec![0]].concat(), "trailing"),
        ("tryLater", seq(&[tlv(0x0a, &[3])]), "not successful"),
        (
            "bad time",
            response(&[single(&[0x05], 0, "2025XX01000000Z", None)]),
            "thisUpdate",
        ),
    ] {
        let e = parse(der, &[0x05]).expect_err(what);
        assert!(e.contains(want), "{what}: {e}");
    }
    // Every prefix and every single-byte corruption is an error or a parse, never a panic.
    for n in 0..good.len() {
        let _ = parse(good[..n].to_vec(), &[0x05]);
        let mut bad = good.clone();
        bad[n] ^= 0xff;
        let _ = parse(bad, &[0x05]);
    }
}
