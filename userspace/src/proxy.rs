//! The I/O-free TLS/proxy core of one client connection.
//!
//! A [`Session`] sits between a client that speaks TLS and a backend that speaks plaintext. It
//! is fed bytes ([`Session::client_recv`], [`Session::backend_recv`]) and end-of-stream events,
//! and it is asked for the bytes each side should be sent ([`Session::client_output`],
//! [`Session::backend_output`]) into buffers the caller owns. It never performs I/O, reads a
//! clock or knows whether the bytes travel over kernel sockets driven by io_uring (kernel mode)
//! or over tern's own TCP stack (bypass mode): both drivers use the same core.
//!
//! What it owns:
//! - the rustls server connection and the TLS close_notify / TCP FIN translation both ways
//!   (half-close: either side may finish sending while the other keeps going);
//! - the PROXY protocol header, queued in front of the first plaintext byte to the backend once
//!   the handshake is complete (so it can carry the negotiated SNI/ALPN/version);
//! - back pressure: [`Session::wants_client_read`] and [`Session::wants_backend_read`] turn
//!   false when a bounded amount is buffered for the other side; the driver stops reading then.
//!
//! A plain session ([`Session::plain`], a `tls = false` listener) is the same core without
//! rustls: the client's bytes go to the backend as they are and the backend's to the client,
//! with the same PROXY header, half-close and bounds (a FIN stands in for close_notify).
//!
//! What it does not own: sockets, timers, the backend choice and connection, counters.
//!
//! Bounds, per direction: client → backend holds at most `limit` bytes of ciphertext that
//! rustls has not accepted yet, plus rustls' own 16 KiB of decrypted plaintext; backend → client
//! holds at most `limit` bytes inside rustls (its buffer limit) plus `limit` bytes of plaintext
//! it has not accepted. A driver that stops reading when asked may overshoot by what was already
//! in flight (one receive completion).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::{HandshakeKind, ServerConfig, ServerConnection};

use crate::config::ProxyProtocol;
use crate::proxy_protocol::{self, ProxyHeader, TlsInfo};
use crate::tls;

/// Why a session failed. After an error the session produces only what is left of its
/// client output (a TLS alert, if rustls queued one) and then is done.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's TLS was invalid (bad handshake, bad record, ...). rustls queued an alert.
    #[error("TLS error from client: {0}")]
    Tls(#[from] rustls::Error),
}

/// The stages of a session. They only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// TLS handshake in progress; no plaintext flows yet.
    Handshake,
    /// Handshake done; plaintext flows in both directions (each may already be finished).
    Proxying,
    /// A TLS error occurred; only the queued alert is still to be sent to the client.
    Failed,
}

/// One client connection's TLS and proxy state.
pub struct Session {
    /// `None` for a plain (L4) session.
    tls: Option<ServerConnection>,
    stage: Stage,
    /// Ciphertext from the client that rustls has not taken yet, because its plaintext buffer
    /// was full. Invariant: non-empty only while rustls' received plaintext is non-empty, so
    /// draining plaintext ([`Session::backend_output`]) always makes progress on it. Plain
    /// sessions: the client's bytes not yet handed to the backend, from `client_in_read` on.
    client_in: Vec<u8>,
    client_in_read: usize,
    /// Plaintext from the backend that rustls has not taken yet (its buffer limit was reached).
    /// Plain sessions: the backend's bytes not yet handed to the client, from
    /// `backend_in_read` on.
    backend_in: Vec<u8>,
    backend_in_read: usize,
    /// PROXY header still to be sent to the backend, from `header_sent` on. Built once at the
    /// end of the handshake; empty when no header is configured.
    header: Vec<u8>,
    header_sent: usize,
    proxy_protocol: ProxyProtocol,
    client_addr: SocketAddr,
    local_addr: SocketAddr,
    /// The client sent close_notify (rustls reads nothing more from it).
    client_close_notify: bool,
    /// Decrypted plaintext rustls holds for us (exact: set from `IoState` after processing,
    /// reduced by what `backend_output` reads).
    plaintext: usize,
    /// The client's TCP stream has ended (FIN).
    client_eof: bool,
    /// The backend sent FIN; once everything it sent is encrypted, close_notify is queued.
    backend_eof: bool,
    /// close_notify has been queued to the client; nothing more will be encrypted.
    close_notify_queued: bool,
    /// Bound on buffered bytes per direction (see the module docs).
    limit: usize,
    /// Why the stage became `Failed`, once it has (the access log tells them apart).
    failure: Option<Failure>,
}

/// Why a session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client's TLS was invalid (an alert was queued).
    Tls,
    /// The client closed its side during the handshake.
    ClientLeft,
    /// `strict_sni`: the client's SNI matched no certificate (an unrecognized_name alert was
    /// queued).
    SniRefused,
}

impl Session {
    /// A new session for a freshly accepted client connection.
    pub fn new(
        config: Arc<ServerConfig>,
        proxy_protocol: ProxyProtocol,
        client_addr: SocketAddr,
        local_addr: SocketAddr,
        limit: usize,
    ) -> Result<Session, SessionError> {
        let mut tls = ServerConnection::new(config)?;
        tls.set_buffer_limit(Some(limit));
        Ok(Session {
            tls: Some(tls),
            stage: Stage::Handshake,
            client_in: Vec::new(),
            client_in_read: 0,
            backend_in: Vec::new(),
            backend_in_read: 0,
            header: Vec::new(),
            header_sent: 0,
            proxy_protocol,
            client_addr,
            local_addr,
            client_close_notify: false,
            plaintext: 0,
            client_eof: false,
            backend_eof: false,
            close_notify_queued: false,
            limit,
            failure: None,
        })
    }

    /// A plain (L4) session: no TLS, the bytes pass through as they are. Proxying from the
    /// start; the PROXY header (without TLS fields) is queued at once.
    pub fn plain(
        proxy_protocol: ProxyProtocol,
        client_addr: SocketAddr,
        local_addr: SocketAddr,
        limit: usize,
    ) -> Session {
        let mut session = Session {
            tls: None,
            stage: Stage::Proxying,
            client_in: Vec::new(),
            client_in_read: 0,
            backend_in: Vec::new(),
            backend_in_read: 0,
            header: Vec::new(),
            header_sent: 0,
            proxy_protocol,
            client_addr,
            local_addr,
            client_close_notify: false,
            plaintext: 0,
            client_eof: false,
            backend_eof: false,
            close_notify_queued: false,
            limit,
            failure: None,
        };
        session.build_header();
        session
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Why the session failed; `None` unless the stage is `Failed`.
    pub fn failure(&self) -> Option<Failure> {
        self.failure
    }

    /// Whether this is a TLS session (not a plain one). False also after a refused SNI
    /// ([`Failure::SniRefused`]): no TLS state is left then.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether this handshake resumed an earlier session (None while handshaking, and for
    /// plain sessions).
    pub fn resumed(&self) -> Option<bool> {
        let tls = self.tls.as_ref()?;
        match tls.handshake_kind()? {
            HandshakeKind::Resumed => Some(true),
            _ if tls.is_handshaking() => None,
            _ => Some(false),
        }
    }

    /// The rustls connection, for reading what was negotiated without copying it (the access
    /// log); `None` for a plain session.
    pub fn tls_connection(&self) -> Option<&ServerConnection> {
        self.tls.as_ref()
    }

    /// What was negotiated (SNI, ALPN, version, cipher); all `None` for a plain session.
    pub fn negotiated(&self) -> tls::Negotiated {
        match &self.tls {
            Some(tls) => tls::negotiated(tls),
            None => tls::Negotiated {
                version: None,
                sni: None,
                alpn: None,
                cipher: None,
                client_cert: None,
            },
        }
    }

    /// Feeds ciphertext received from the client. Returns an error when the client's TLS is
    /// invalid; rustls then has an alert queued in [`Session::client_output`].
    pub fn client_recv(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if self.stage == Stage::Failed || self.client_close_notify || data.is_empty() {
            // After close_notify or an error, further client bytes are ignored (RFC 8446 §6.1:
            // data after close_notify is to be ignored).
            return Ok(());
        }
        if self.tls.is_none() {
            stash_plain(&mut self.client_in, &mut self.client_in_read, data);
            return Ok(());
        }
        if !self.client_in.is_empty() {
            stash(&mut self.client_in, data);
            return Ok(());
        }
        let rest = self.feed_tls(data)?;
        if !rest.is_empty() {
            stash(&mut self.client_in, rest);
        }
        Ok(())
    }

    /// Gives rustls as much of `data` as it takes; returns what it did not take.
    fn feed_tls<'d>(&mut self, mut data: &'d [u8]) -> Result<&'d [u8], SessionError> {
        while !data.is_empty() {
            let Some(tls) = self.tls.as_mut() else {
                break;
            };
            match tls.read_tls(&mut data) {
                Ok(0) => {
                    // close_notify received: rustls reads nothing more. The rest is ignored.
                    data = &[];
                }
                Ok(_) => {}
                // Its plaintext buffer is full: the rest waits in `client_in`.
                Err(_) => break,
            }
            self.process()?;
        }
        Ok(data)
    }

    fn process(&mut self) -> Result<(), SessionError> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        match tls.process_new_packets() {
            Ok(state) => {
                if self.stage == Stage::Handshake && !tls.is_handshaking() {
                    self.stage = Stage::Proxying;
                    self.build_header();
                }
                self.plaintext = state.plaintext_bytes_to_read();
                if state.peer_has_closed() {
                    self.client_close_notify = true;
                }
                Ok(())
            }
            Err(e) => {
                self.stage = Stage::Failed;
                self.failure = Some(Failure::Tls);
                self.client_in = Vec::new();
                self.backend_in = Vec::new();
                if tls::is_sni_refusal(&e) {
                    self.refuse_sni();
                }
                Err(e.into())
            }
        }
    }

    /// Replaces the access_denied alert rustls queued for a refused SNI with unrecognized_name
    /// (rustls cannot be told which alert to send). Nothing else was sent yet (the refusal
    /// comes at the ClientHello), so dropping rustls' output loses nothing; the alert leaves
    /// the way a plain session's bytes do, and the failed session ends once it is out.
    fn refuse_sni(&mut self) {
        self.failure = Some(Failure::SniRefused);
        self.tls = None;
        self.backend_in = tls::UNRECOGNIZED_NAME_ALERT.to_vec();
        self.backend_in_read = 0;
    }

    fn build_header(&mut self) {
        if self.proxy_protocol == ProxyProtocol::None {
            return;
        }
        let n = self.negotiated();
        let tls_info = self.tls.as_ref().map(|_| TlsInfo {
            version: n.version.map(tls::version_name).unwrap_or("unknown"),
            sni: n.sni.as_deref(),
            alpn: n.alpn.as_deref(),
            cipher: n.cipher.as_ref().and_then(|c| c.suite().as_str()),
            client_cert: n.client_cert.as_ref().map(tls::ClientCert::tls_info),
        });
        let header = ProxyHeader {
            source: self.client_addr,
            destination: self.local_addr,
            tls: tls_info,
        };
        proxy_protocol::write(self.proxy_protocol, &header, &mut self.header);
    }

    /// The client's TCP stream ended (FIN, or the socket reported EOF).
    pub fn client_eof(&mut self) -> Result<(), SessionError> {
        if self.client_eof {
            return Ok(());
        }
        self.client_eof = true;
        if self.stage == Stage::Failed {
            return Ok(());
        }
        if self.stage == Stage::Handshake {
            // A client that leaves mid-handshake: nothing to forward, nothing to close politely.
            self.stage = Stage::Failed;
            self.failure = Some(Failure::ClientLeft);
            return Ok(());
        }
        // rustls is not told: what it has decrypted is still forwarded, and the client side is
        // finished once that is drained (`client_finished`). A TCP FIN without close_notify
        // is how most HTTP clients close, so it is not treated as an attack on the stream.
        Ok(())
    }

    /// Whether the driver should be receiving from the client now.
    pub fn wants_client_read(&self) -> bool {
        !self.client_eof
            && self.stage != Stage::Failed
            && !self.client_close_notify
            && self.client_in.len() - self.client_in_read < self.limit
    }

    /// True once the client will send no more plaintext and all of it has been handed to
    /// [`Session::backend_output`]: the driver shuts down the backend's write side after
    /// flushing.
    pub fn client_finished(&self) -> bool {
        match self.stage {
            Stage::Failed => true,
            Stage::Handshake => false,
            Stage::Proxying => {
                (self.client_close_notify || self.client_eof) && !self.has_backend_output()
            }
        }
    }

    /// Whether a backend connection is needed now: `eager` asks for it at once; `first-byte`
    /// when the first plaintext byte has arrived.
    pub fn needs_backend(&self, eager: bool) -> bool {
        match self.stage {
            Stage::Failed => false,
            Stage::Handshake => eager,
            Stage::Proxying => eager || self.has_backend_output(),
        }
    }

    /// Whether [`Session::backend_output`] would produce bytes.
    pub fn has_backend_output(&self) -> bool {
        self.stage == Stage::Proxying
            && (self.header_sent < self.header.len()
                || self.plaintext > 0
                || self.client_in.len() > self.client_in_read)
    }

    /// Copies plaintext for the backend into `dst` (the PROXY header first). Returns how much.
    pub fn backend_output(&mut self, dst: &mut [u8]) -> Result<usize, SessionError> {
        if self.stage != Stage::Proxying {
            return Ok(0);
        }
        let mut n = 0;
        if self.header_sent < self.header.len() {
            let h = &self.header[self.header_sent..];
            let k = h.len().min(dst.len());
            dst[..k].copy_from_slice(&h[..k]);
            self.header_sent += k;
            n += k;
            if self.header_sent == self.header.len() {
                self.header = Vec::new();
                self.header_sent = 0;
            }
        }
        if self.tls.is_none() {
            n += unstash_plain(&mut self.client_in, &mut self.client_in_read, &mut dst[n..]);
            return Ok(n);
        }
        while n < dst.len() {
            let Some(tls) = self.tls.as_mut() else {
                break;
            };
            match tls.reader().read(&mut dst[n..]) {
                Ok(0) => {
                    // close_notify received and all plaintext read.
                    self.plaintext = 0;
                    break;
                }
                Ok(k) => {
                    n += k;
                    self.plaintext = self.plaintext.saturating_sub(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext = 0;
                    if self.client_in.is_empty() {
                        break;
                    }
                    // Plaintext drained: rustls takes more of the stashed ciphertext.
                    let stash = std::mem::take(&mut self.client_in);
                    let rest = self.feed_tls(&stash)?;
                    self.client_in = rest.to_vec();
                }
                Err(_) => {
                    // UnexpectedEof: TCP FIN without close_notify, treated as end of stream
                    // (most HTTP clients close that way; the backend sees a FIN either way).
                    self.plaintext = 0;
                    break;
                }
            }
        }
        Ok(n)
    }

    /// Feeds plaintext received from the backend.
    pub fn backend_recv(&mut self, data: &[u8]) {
        if self.stage == Stage::Failed || self.close_notify_queued || data.is_empty() {
            return;
        }
        let Some(tls) = self.tls.as_mut() else {
            stash_plain(&mut self.backend_in, &mut self.backend_in_read, data);
            return;
        };
        if !self.backend_in.is_empty() {
            stash(&mut self.backend_in, data);
            return;
        }
        let taken = tls.writer().write(data).unwrap_or(0);
        if taken < data.len() {
            stash(&mut self.backend_in, &data[taken..]);
        }
    }

    /// The backend's stream ended (FIN): once its data is encrypted, close_notify follows.
    pub fn backend_eof(&mut self) {
        self.backend_eof = true;
        self.maybe_close_notify();
    }

    fn maybe_close_notify(&mut self) {
        if self.backend_eof
            && self.backend_in.len() == self.backend_in_read
            && !self.close_notify_queued
            && self.stage == Stage::Proxying
        {
            // Plain sessions: "close_notify queued" means our side is finished (a FIN follows).
            if let Some(tls) = self.tls.as_mut() {
                tls.send_close_notify();
            }
            self.close_notify_queued = true;
        }
    }

    /// Closes the TLS session from our side now (backend failed, drain deadline, ...): queues
    /// close_notify after whatever is already encrypted; unsent backend plaintext is dropped.
    pub fn close(&mut self) {
        self.backend_in = Vec::new();
        self.backend_in_read = 0;
        self.backend_eof = true;
        if self.stage == Stage::Proxying && !self.close_notify_queued {
            if let Some(tls) = self.tls.as_mut() {
                tls.send_close_notify();
            }
            self.close_notify_queued = true;
        }
    }

    /// Whether our close_notify (plain sessions: the end of our stream) has been queued for the
    /// client.
    pub fn close_notify_queued(&self) -> bool {
        self.close_notify_queued
    }

    /// Whether the driver should be receiving from the backend now.
    pub fn wants_backend_read(&self) -> bool {
        !self.backend_eof
            && self.stage != Stage::Failed
            && self.backend_in.len() - self.backend_in_read < self.limit
    }

    /// Whether [`Session::client_output`] would produce bytes.
    pub fn wants_client_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
            || self.backend_in.len() > self.backend_in_read
    }

    /// Copies ciphertext (plain sessions: the backend's bytes) for the client into `dst`.
    /// Returns how much.
    pub fn client_output(&mut self, dst: &mut [u8]) -> usize {
        if self.tls.is_none() {
            let n = unstash_plain(&mut self.backend_in, &mut self.backend_in_read, dst);
            self.maybe_close_notify();
            return n;
        }
        let mut n = 0;
        while let Some(tls) = self.tls.as_mut() {
            let mut w = &mut dst[n..];
            let before = w.len();
            let _ = tls.write_tls(&mut w);
            n += before - w.len();
            if n == dst.len() || self.backend_in.is_empty() || self.stage == Stage::Failed {
                break;
            }
            // rustls drained some of its buffer: move stashed backend plaintext into it.
            let stash = std::mem::take(&mut self.backend_in);
            let taken = tls.writer().write(&stash).unwrap_or(0);
            self.backend_in = stash[taken..].to_vec();
            if taken == 0 {
                break;
            }
        }
        self.maybe_close_notify();
        n
    }

    /// True once everything for the client is out of the session and the TLS stream is closed
    /// from our side (close_notify queued, or failed): the driver shuts down the client's write
    /// side after flushing.
    pub fn server_finished(&self) -> bool {
        (self.close_notify_queued || self.stage == Stage::Failed)
            && !self.tls.as_ref().is_some_and(|t| t.wants_write())
            && self.backend_in.len() == self.backend_in_read
    }

    /// Bytes of heap this session holds in its own stashes (rustls' buffers not included).
    pub fn stashed_bytes(&self) -> usize {
        self.client_in.capacity() + self.backend_in.capacity() + self.header.capacity()
    }
}

/// Appends to a plain session's buffer, whose bytes before `read` were already handed on:
/// those are dropped first (one move per refill, not per read), so the buffer never holds
/// more than what is pending plus `data`.
fn stash_plain(buf: &mut Vec<u8>, read: &mut usize, data: &[u8]) {
    if *read > 0 {
        buf.drain(..*read);
        *read = 0;
    }
    buf.extend_from_slice(data);
}

/// Takes up to `dst.len()` pending bytes from a plain session's buffer.
fn unstash_plain(buf: &mut Vec<u8>, read: &mut usize, dst: &mut [u8]) -> usize {
    let pending = &buf[*read..];
    let k = pending.len().min(dst.len());
    dst[..k].copy_from_slice(&pending[..k]);
    *read += k;
    if *read == buf.len() {
        // Drained: keep the allocation for the next bytes.
        buf.clear();
        *read = 0;
    }
    k
}

/// Appends to a stash, growing it exactly: stashes are the slow path (the other side is
/// behind), and exact growth keeps the memory bound the module promises.
fn stash(buf: &mut Vec<u8>, data: &[u8]) {
    buf.reserve_exact(data.len());
    buf.extend_from_slice(data);
}

#[cfg(test)]
pub(crate) mod tests;
