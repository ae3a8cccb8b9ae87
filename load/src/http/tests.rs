//! Tests for the response reader: framing by Content-Length, close-delimited bodies, interim
//! responses, persistence, and the errors it must report instead of guessing.

use super::*;

#[track_caller]
fn head(text: &str) -> Head {
    parse_head(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
}

#[track_caller]
fn head_err(text: &str) -> HttpError {
    match parse_head(text.as_bytes()) {
        Ok(h) => panic!("{text:?} should be rejected, parsed as {h:?}"),
        Err(e) => e,
    }
}

#[test]
fn status_line_and_content_length() {
    let h = head("HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nServer: x\r\n\r\n");
    assert_eq!(h.status, 200, "status code");
    assert_eq!(h.content_length, Some(1024), "content length");
    assert!(!h.close, "HTTP/1.1 persists by default");
    assert!(!h.chunked, "no transfer coding");
}

#[test]
fn reason_phrase_is_optional_and_fields_are_case_insensitive() {
    assert_eq!(head("HTTP/1.1 204\r\n\r\n").status, 204, "no reason phrase");
    assert_eq!(
        head("HTTP/1.1 404 \r\n\r\n").status,
        404,
        "empty reason phrase"
    );
    let h = head("HTTP/1.1 200 OK\r\ncOnTeNt-LeNgTh:7\r\nCONNECTION: Close\r\n\r\n");
    assert_eq!(
        h.content_length,
        Some(7),
        "mixed-case name, no whitespace after colon"
    );
    assert!(h.close, "Connection: Close is case-insensitive");
}

#[test]
fn persistence_rules() {
    assert!(
        head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").close,
        "1.0 closes by default"
    );
    assert!(
        !head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n").close,
        "1.0 with keep-alive persists"
    );
    assert!(
        head("HTTP/1.1 200 OK\r\nConnection: upgrade, close\r\n\r\n").close,
        "close in a token list"
    );
}

#[test]
fn content_length_list_form_and_conflicts() {
    assert_eq!(
        head("HTTP/1.1 200 OK\r\nContent-Length: 42, 42\r\n\r\n").content_length,
        Some(42),
        "identical list members are one length (RFC 9110 §8.6)"
    );
    assert_eq!(
        head_err("HTTP/1.1 200 OK\r\nContent-Length: 42\r\nContent-Length: 43\r\n\r\n"),
        HttpError::ContentLength,
        "conflicting lengths"
    );
    assert_eq!(
        head_err("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
        HttpError::ContentLength,
        "negative length"
    );
    assert_eq!(
        head_err("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n"),
        HttpError::ContentLength,
        "length that overflows u64"
    );
}

#[test]
fn malformed_heads_are_rejected() {
    assert_eq!(
        head_err("HTTP/2 200 OK\r\n\r\n"),
        HttpError::StatusLine,
        "version"
    );
    assert_eq!(
        head_err("HTTP/1.1 20 OK\r\n\r\n"),
        HttpError::StatusLine,
        "two digits"
    );
    assert_eq!(
        head_err("HTTP/1.1 2000 OK\r\n\r\n"),
        HttpError::StatusLine,
        "four digits"
    );
    assert_eq!(
        head_err("HTTP/1.1 099 OK\r\n\r\n"),
        HttpError::StatusLine,
        "below 100"
    );
    assert_eq!(
        head_err("HTTP/1.1 200 OK\r\nNoColon\r\n\r\n"),
        HttpError::Field,
        "no colon"
    );
    assert_eq!(
        head_err("HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n"),
        HttpError::Field,
        "obs-fold"
    );
    assert_eq!(
        head_err("HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"),
        HttpError::Field,
        "space in name"
    );
}

/// Feeds `chunks` one after another and returns (bytes used per chunk, completed after each).
#[track_caller]
fn feed_all(r: &mut ResponseReader, chunks: &[&[u8]]) -> Vec<(usize, bool)> {
    chunks
        .iter()
        .map(|c| r.feed(c).unwrap_or_else(|e| panic!("chunk {c:?}: {e}")))
        .collect()
}

#[test]
fn body_by_content_length_in_one_chunk() {
    let mut r = ResponseReader::default();
    r.start(false);
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(
        r.feed(resp),
        Ok((resp.len(), true)),
        "whole response at once"
    );
    assert_eq!(
        (r.status(), r.body_bytes(), r.close()),
        (200, 5, false),
        "what was read"
    );
}

#[test]
fn head_split_across_every_byte_boundary() {
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
    for split in 1..resp.len() {
        let mut r = ResponseReader::default();
        r.start(false);
        let results = feed_all(&mut r, &[&resp[..split], &resp[split..]]);
        assert_eq!(
            results,
            vec![(split, split == resp.len()), (resp.len() - split, true)],
            "split at {split}"
        );
        assert_eq!(r.body_bytes(), 3, "body bytes, split at {split}");
    }
}

#[test]
fn reader_is_reusable_and_reports_trailing_bytes() {
    let mut r = ResponseReader::default();
    for i in 0..3 {
        r.start(false);
        let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA".to_vec();
        resp.truncate(resp.len() - if i == 2 { 0 } else { 5 });
        let (used, done) = r.feed(&resp).expect("parses");
        assert!(done, "response {i} complete");
        assert_eq!(
            used,
            resp.len() - if i == 2 { 5 } else { 0 },
            "response {i}: used bytes"
        );
    }
}

#[test]
fn interim_100_continue_is_skipped() {
    let mut r = ResponseReader::default();
    r.start(false);
    let resp = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx";
    assert_eq!(
        r.feed(resp),
        Ok((resp.len(), true)),
        "interim then final response"
    );
    assert_eq!(r.status(), 201, "final status");
}

#[test]
fn responses_without_a_body() {
    for (status, head_only) in [(204, false), (304, false), (200, true)] {
        let mut r = ResponseReader::default();
        r.start(head_only);
        let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(
            r.feed(resp.as_bytes()),
            Ok((resp.len(), true)),
            "status {status}, HEAD {head_only}: complete after the head"
        );
        assert_eq!(r.body_bytes(), 0, "no body for status {status}");
    }
}

#[test]
fn close_delimited_body_ends_at_eof_and_truncation_is_an_error() {
    let mut r = ResponseReader::default();
    r.start(false);
    let results = feed_all(&mut r, &[b"HTTP/1.1 200 OK\r\n\r\nabc", b"defg"]);
    assert_eq!(
        results,
        vec![(22, false), (4, false)],
        "never complete before EOF"
    );
    assert_eq!(r.finish_on_eof(), Ok(true), "EOF completes it");
    assert!(
        r.close(),
        "a close-delimited response closes the connection"
    );
    assert_eq!(r.body_bytes(), 7, "body bytes");

    r.start(false);
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        .expect("parses");
    assert_eq!(
        r.finish_on_eof(),
        Err(HttpError::Truncated),
        "EOF inside a sized body"
    );
    r.start(false);
    r.feed(b"HTTP/1.1 200 O").expect("partial head");
    assert_eq!(
        r.finish_on_eof(),
        Err(HttpError::Truncated),
        "EOF inside the head"
    );
}

#[test]
fn unsupported_and_oversized_responses() {
    let mut r = ResponseReader::default();
    r.start(false);
    assert_eq!(
        r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Err(HttpError::TransferEncoding),
        "chunked"
    );
    r.start(false);
    assert_eq!(
        r.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
        Err(HttpError::Upgrade),
        "101"
    );
    r.start(false);
    let big = vec![b'a'; MAX_HEAD + 10];
    r.feed(b"HTTP/1.1 200 OK\r\nX: ")
        .expect("start of a long head");
    assert_eq!(
        r.feed(&big),
        Err(HttpError::HeadTooLarge),
        "head over the limit"
    );
}

#[test]
fn request_heads() {
    let get = request_head(&RequestSpec {
        method: "GET",
        path: "/bytes/1024",
        host: "tern.test",
        headers: &[],
        body_len: 0,
        close: true,
    });
    let text = String::from_utf8(get).expect("ASCII");
    assert!(
        text.starts_with("GET /bytes/1024 HTTP/1.1\r\nHost: tern.test\r\n"),
        "{text}"
    );
    assert!(text.ends_with("Connection: close\r\n\r\n"), "{text}");
    assert!(
        !text.contains("Content-Length"),
        "no length on a body-less GET: {text}"
    );

    let post = request_head(&RequestSpec {
        method: "POST",
        path: "/",
        host: "h",
        headers: &["X-A: 1".to_string()],
        body_len: 65536,
        close: false,
    });
    let text = String::from_utf8(post).expect("ASCII");
    assert!(text.contains("\r\nX-A: 1\r\n"), "extra header: {text}");
    assert!(
        text.contains("\r\nContent-Length: 65536\r\n"),
        "body length: {text}"
    );
    assert!(
        !text.contains("Connection"),
        "keep-alive is the HTTP/1.1 default: {text}"
    );
}
