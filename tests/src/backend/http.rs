//! The demo backend's HTTP/1.1 server side: request-head parsing and the per-connection request
//! loop shared by `demo_http` and `proxy_aware`.
//!
//! Applies RFC 9112: request line (§3), field lines without obs-fold or whitespace before the
//! colon (§5.1, §5.2), message body length from `Content-Length` only (§6.3; a request with
//! `Transfer-Encoding` gets 501, with both gets 400 as §6.1 allows), persistence (§9.3), and
//! `Expect: 100-continue` (RFC 9110 §10.1.1). It is a test server: it accepts what curl and
//! openssl send and rejects the rest with 400 rather than trying to be lenient.

use super::{pattern_fill, Io, CHUNK};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Largest request head accepted (request line + fields + blank line).
const MAX_HEAD: usize = 64 * 1024;
/// How long a closing connection waits for the peer's FIN after ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What a connection knows about its client.
pub(crate) struct Context {
    /// The TCP peer (tern's backend-side socket).
    pub(crate) peer: SocketAddr,
    /// The client address announced in a PROXY header, if any.
    pub(crate) proxied: Option<SocketAddr>,
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) minor: u8,
    pub(crate) content_length: u64,
    pub(crate) keep_alive: bool,
    pub(crate) expect_continue: bool,
    pub(crate) transfer_encoding: bool,
}

/// Parses a request head (everything up to and including the blank line).
pub(crate) fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or("request head does not end with CRLF CRLF")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or("empty request")?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err("request line is not `METHOD SP target SP version`"),
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err("bad method token");
    }
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("bad request target");
    }
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err("unsupported HTTP version"),
    };
    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive_token) = (false, false);
    let mut expect_continue = false;
    let mut transfer_encoding = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err("obsolete line folding");
        }
        let (name, value) = line.split_once(':').ok_or("field line without a colon")?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err("bad field name");
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err("control character in a field value");
        }
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("bad Content-Length");
                }
                let n: u64 = value.parse().map_err(|_| "Content-Length overflows")?;
                if content_length.is_some_and(|old| old != n) {
                    return Err("conflicting Content-Length fields");
                }
                content_length = Some(n);
            }
            "transfer-encoding" => transfer_encoding = true,
            "connection" => {
                for token in value.split(',') {
                    let token = token.trim_matches([' ', '\t']);
                    close |= token.eq_ignore_ascii_case("close");
                    keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err("both Transfer-Encoding and Content-Length");
    }
    let keep_alive = !close && (minor == 1 || keep_alive_token);
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        minor,
        content_length: content_length.unwrap_or(0),
        keep_alive,
        expect_continue,
        transfer_encoding,
    })
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Waits for a complete request head in `io.buf`. `Ok(None)`: the peer closed cleanly between
/// requests. `Ok(Some(Err(reason)))`: not a request we can parse.
fn read_head(io: &mut Io<'_>) -> io::Result<Option<Result<usize, &'static str>>> {
    loop {
        // RFC 9112 §2.2: ignore empty lines before a request line.
        while io.buf.starts_with(b"\r\n") {
            io.consume(2);
        }
        if let Some(pos) = find(&io.buf, b"\r\n\r\n") {
            return Ok(Some(Ok(pos + 4)));
        }
        if io.buf.len() > MAX_HEAD {
            return Ok(Some(Err("request head too large")));
        }
        if io.fill()? == 0 {
            return Ok(if io.buf.is_empty() {
                None
            } else {
                Some(Err("connection closed in the middle of a request head"))
            });
        }
    }
}

/// Serves requests on one connection until it closes, the client asks to close, or an error.
pub(crate) fn serve_connection(io: &mut Io<'_>, ctx: &Context) -> io::Result<()> {
    let mut served: u64 = 0;
    loop {
        let head_len = match read_head(io)? {
            None => return Ok(()),
            Some(Ok(n)) => n,
            Some(Err(reason)) => return reject(io, 400, "Bad Request", reason),
        };
        let req = match parse_head(&io.buf[..head_len]) {
            Ok(req) => req,
            Err(reason) => return reject(io, 400, "Bad Request", reason),
        };
        io.consume(head_len);
        served += 1;
        if req.transfer_encoding {
            return reject(
                io,
                501,
                "Not Implemented",
                "Transfer-Encoding is not supported",
            );
        }
        if req.expect_continue && req.minor == 1 && req.content_length > 0 {
            io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let path = req.target.split('?').next().unwrap_or_default();
        match req.method.as_str() {
            "GET" | "HEAD" => {
                discard(io, req.content_length)?;
                let head_only = req.method == "HEAD";
                if let Some(count) = path.strip_prefix("/bytes/") {
                    let Ok(n) = count.parse::<u64>() else {
                        return reject(io, 400, "Bad Request", "bad byte count in /bytes/N");
                    };
                    send_pattern(io, &req, n, head_only)?;
                } else {
                    let mut body = format!(
                        "hello from tern demo backend\npath: {}\npeer: {}\n",
                        req.target, ctx.peer
                    );
                    if let Some(client) = ctx.proxied {
                        body.push_str(&format!("proxied-client: {client}\n"));
                    }
                    body.push_str(&format!("request: {served}\n"));
                    respond(
                        io,
                        &req,
                        "200 OK",
                        "text/plain; charset=utf-8",
                        body.as_bytes(),
                        head_only,
                    )?;
                }
            }
            "POST" | "PUT" => echo_body(io, &req)?,
            _ => {
                discard(io, req.content_length)?;
                respond(
                    io,
                    &req,
                    "405 Method Not Allowed\r\nAllow: GET, HEAD, POST, PUT",
                    "text/plain; charset=utf-8",
                    b"method not allowed\n",
                    false,
                )?;
            }
        }
        if !req.keep_alive {
            io.close_gracefully(CLOSE_LINGER);
            return Ok(());
        }
    }
}

/// The status line and the fields every response has. `status` may carry extra field lines.
fn head(req: &Request, status: &str, content_type: &str, length: u64) -> String {
    let connection = match (req.keep_alive, req.minor) {
        (false, _) => "Connection: close\r\n",
        (true, 0) => "Connection: keep-alive\r\n",
        (true, _) => "",
    };
    format!(
        "HTTP/1.1 {status}\r\nServer: tern-demo-backend\r\nContent-Type: {content_type}\r\n\
         Content-Length: {length}\r\n{connection}\r\n"
    )
}

fn respond(
    io: &mut Io<'_>,
    req: &Request,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut out = head(req, status, content_type, body.len() as u64).into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    io.write_all(&out)
}

fn send_pattern(io: &mut Io<'_>, req: &Request, n: u64, head_only: bool) -> io::Result<()> {
    io.write_all(head(req, "200 OK", "application/octet-stream", n).as_bytes())?;
    if head_only {
        return Ok(());
    }
    let mut chunk = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < n {
        let len = (n - offset).min(CHUNK as u64) as usize;
        pattern_fill(offset, &mut chunk[..len]);
        io.write_all(&chunk[..len])?;
        offset += len as u64;
    }
    Ok(())
}

/// Streams the request body back as the response body.
fn echo_body(io: &mut Io<'_>, req: &Request) -> io::Result<()> {
    let length = req.content_length;
    io.write_all(head(req, "200 OK", "application/octet-stream", length).as_bytes())?;
    let mut chunk = vec![0u8; CHUNK.min(length as usize).max(1)];
    let mut remaining = length;
    while remaining > 0 {
        let want = remaining.min(chunk.len() as u64) as usize;
        let n = io.read_into(&mut chunk[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        io.write_all(&chunk[..n])?;
        remaining -= n as u64;
    }
    Ok(())
}

/// Reads and drops `length` body bytes.
fn discard(io: &mut Io<'_>, length: u64) -> io::Result<()> {
    let mut chunk = vec![0u8; CHUNK.min(length as usize)];
    let mut remaining = length;
    while remaining > 0 {
        let want = remaining.min(chunk.len() as u64) as usize;
        let n = io.read_into(&mut chunk[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        remaining -= n as u64;
    }
    Ok(())
}

/// Sends an error response with `Connection: close` and closes.
fn reject(io: &mut Io<'_>, code: u16, reason: &str, detail: &str) -> io::Result<()> {
    let body = format!("{code} {reason}: {detail}\n");
    let out = format!(
        "HTTP/1.1 {code} {reason}\r\nServer: tern-demo-backend\r\nContent-Type: text/plain; \
         charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let result = io.write_all(out.as_bytes());
    io.close_gracefully(CLOSE_LINGER);
    result
}
