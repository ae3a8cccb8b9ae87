//! HTTP/1.1 as the load generator speaks it: the request bytes (built once per run) and an
//! incremental response reader that allocates nothing per response.
//!
//! Owns: request serialisation and response framing — status line (RFC 9112 §4), field lines
//! (§5; no obs-fold), message body length (§6.3: no body for HEAD, 1xx, 204 and 304;
//! `Content-Length`, including the `42, 42` list form RFC 9110 §8.6 allows; otherwise the body
//! runs to the end of the connection), interim 1xx responses (RFC 9110 §15.2, skipped), and
//! persistence (RFC 9112 §9.3: `Connection: close`, HTTP/1.0 without keep-alive). Does not own:
//! chunked transfer coding — the backends tern is measured with (its demo backend, nginx static
//! files) send `Content-Length`, so a chunked response is reported as an `http` error rather
//! than parsed — nor pipelining (the client never sends a second request before a response is
//! complete, so bytes after a response are an error).

use std::fmt::Write as _;

/// Largest response head accepted (status line, fields and the blank line).
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a response could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed status line")]
    StatusLine,
    #[error("malformed header field line")]
    Field,
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("Transfer-Encoding is not supported by tern-load (send Content-Length)")]
    TransferEncoding,
    #[error("unexpected 101 Switching Protocols")]
    Upgrade,
    #[error("connection closed before the response was complete")]
    Truncated,
}

/// What the response head says about framing and persistence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The server will close after this response (RFC 9112 §9.3).
    pub close: bool,
}

/// Parses a response head; `head` ends with the CRLF CRLF that terminates it.
pub fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let head = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or(HttpError::StatusLine)?;
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().ok_or(HttpError::StatusLine)?;
    // "HTTP/1.1 200 OK": version, SP, 3 digits, then SP and an optional reason phrase.
    let minor = match status_line.get(..9) {
        Some(b"HTTP/1.1 ") => 1,
        Some(b"HTTP/1.0 ") => 0,
        _ => return Err(HttpError::StatusLine),
    };
    let code = status_line.get(9..12).ok_or(HttpError::StatusLine)?;
    if !code.iter().all(u8::is_ascii_digit) || !matches!(status_line.get(12), None | Some(b' ')) {
        return Err(HttpError::StatusLine);
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=999).contains(&status) {
        return Err(HttpError::StatusLine);
    }
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let (mut close, mut keep_alive) = (false, false);
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(HttpError::Field);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HttpError::Field)?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || name.iter().any(|b| !is_tchar(*b)) {
            return Err(HttpError::Field);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            for item in value.split(|&b| b == b',') {
                let item = trim(item);
                if item.is_empty() || !item.iter().all(u8::is_ascii_digit) || item.len() > 19 {
                    return Err(HttpError::ContentLength);
                }
                let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                if content_length.is_some_and(|old| old != n) {
                    return Err(HttpError::ContentLength);
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim(token);
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    Ok(Head {
        status,
        content_length,
        chunked,
        close: close || (minor == 0 && !keep_alive),
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Head,
    /// `remaining` body bytes still to come.
    Body {
        remaining: u64,
    },
    /// No length: the body ends when the connection does.
    UntilClose,
    Done,
}

/// Reads one response at a time from plaintext chunks as they arrive.
#[derive(Debug)]
pub struct ResponseReader {
    /// Bytes of the head seen so far; capacity kept across responses (no allocation per
    /// response once it has grown to the server's head size).
    head: Vec<u8>,
    phase: Phase,
    /// The request was HEAD: the response has no body whatever its fields say.
    head_only: bool,
    status: u16,
    close: bool,
    /// Body bytes of the current response consumed so far.
    body_bytes: u64,
}

impl Default for ResponseReader {
    fn default() -> Self {
        ResponseReader {
            head: Vec::with_capacity(512),
            phase: Phase::Done,
            head_only: false,
            status: 0,
            close: false,
            body_bytes: 0,
        }
    }
}

impl ResponseReader {
    /// Gives the head buffer back: a parked idle connection reads no more responses, and at a
    /// million held connections 512 bytes each is half a GiB of the client's memory.
    pub fn release(&mut self) {
        self.head = Vec::new();
    }

    /// Prepares for the response to a request just sent.
    pub fn start(&mut self, head_only: bool) {
        self.head.clear();
        self.phase = Phase::Head;
        self.head_only = head_only;
        self.status = 0;
        self.close = false;
        self.body_bytes = 0;
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The server announced it closes the connection after this response.
    pub fn close(&self) -> bool {
        self.close
    }

    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// Consumes the response's bytes from the front of `data`. Returns how many were used and
    /// whether the response is now complete. Bytes left over after completion belong to no
    /// request: the caller treats them as a protocol error, since it never pipelines.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(usize, bool), HttpError> {
        let total = data.len();
        loop {
            match self.phase {
                Phase::Done => return Ok((total - data.len(), true)),
                Phase::Head => {
                    let old = self.head.len();
                    let take = data.len().min(MAX_HEAD - old);
                    self.head.extend_from_slice(&data[..take]);
                    let from = old.saturating_sub(3);
                    let Some(pos) = find_crlfcrlf(&self.head[from..]) else {
                        if self.head.len() >= MAX_HEAD {
                            return Err(HttpError::HeadTooLarge);
                        }
                        return Ok((total, false));
                    };
                    let end = from + pos + 4;
                    data = &data[end - old..];
                    let head = parse_head(&self.head[..end])?;
                    self.head.clear();
                    self.begin_body(head)?;
                }
                Phase::Body { remaining } => {
                    let n = remaining.min(data.len() as u64);
                    self.body_bytes += n;
                    data = &data[n as usize..];
                    self.phase = if n == remaining {
                        Phase::Done
                    } else {
                        Phase::Body {
                            remaining: remaining - n,
                        }
                    };
                    if self.phase != Phase::Done {
                        return Ok((total, false));
                    }
                }
                Phase::UntilClose => {
                    self.body_bytes += data.len() as u64;
                    return Ok((total, false));
                }
            }
        }
    }

    fn begin_body(&mut self, head: Head) -> Result<(), HttpError> {
        match head.status {
            101 => return Err(HttpError::Upgrade),
            // Interim response: the real one follows (RFC 9110 §15.2).
            100..=199 => return Ok(()),
            _ => {}
        }
        self.status = head.status;
        self.close = head.close;
        self.phase = if self.head_only || head.status == 204 || head.status == 304 {
            Phase::Done
        } else if head.chunked {
            return Err(HttpError::TransferEncoding);
        } else if let Some(n) = head.content_length {
            if n == 0 {
                Phase::Done
            } else {
                Phase::Body { remaining: n }
            }
        } else {
            self.close = true;
            Phase::UntilClose
        };
        Ok(())
    }

    /// The connection ended. `Ok(true)`: that completed a close-delimited response;
    /// `Ok(false)`: no response was in progress.
    pub fn finish_on_eof(&mut self) -> Result<bool, HttpError> {
        match self.phase {
            Phase::UntilClose => {
                self.phase = Phase::Done;
                Ok(true)
            }
            Phase::Done => Ok(false),
            Phase::Head | Phase::Body { .. } => Err(HttpError::Truncated),
        }
    }
}

fn find_crlfcrlf(haystack: &[u8]) -> Option<usize> {
    haystack.windows(4).position(|w| w == b"\r\n\r\n")
}

/// What to send, fixed for the whole run.
#[derive(Clone, Debug)]
pub struct RequestSpec<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    /// Extra `Name: value` lines, already validated.
    pub headers: &'a [String],
    pub body_len: u64,
    /// Ask the server to close after the response (`Connection: close`).
    pub close: bool,
}

/// Serialises the request head (the body, if any, is streamed separately).
pub fn request_head(spec: &RequestSpec<'_>) -> Vec<u8> {
    let mut s = String::with_capacity(128);
    let _ = write!(
        s,
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tern-load/{}\r\n",
        spec.method,
        spec.path,
        spec.host,
        env!("CARGO_PKG_VERSION")
    );
    for h in spec.headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    if spec.body_len > 0 || matches!(spec.method, "POST" | "PUT") {
        let _ = write!(s, "Content-Length: {}\r\n", spec.body_len);
    }
    if spec.close {
        s.push_str("Connection: close\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

#[cfg(test)]
mod tests;
