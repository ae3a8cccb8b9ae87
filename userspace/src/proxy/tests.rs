//! Session tests: a real rustls client talks to a `Session` through in-memory buffers, and the
//! "backend" is the test reading `backend_output` and calling `backend_recv`.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

use super::*;

const LIMIT: usize = 64 * 1024;

struct Fixture {
    client: ClientConnection,
    session: Session,
    /// Plaintext the backend has received so far.
    backend_got: Vec<u8>,
    /// Plaintext the client has received so far.
    client_got: Vec<u8>,
}

pub(crate) fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["tern.test".to_string()]).expect("rcgen");
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let mut roots = RootCertStore::empty();
    roots.add(cert).expect("root");
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

fn fixture(pp: ProxyProtocol) -> Fixture {
    let (server, client) = configs();
    let client = ClientConnection::new(client, ServerName::try_from("tern.test").expect("name"))
        .expect("client");
    let session = Session::new(
        server,
        pp,
        "192.0.2.7:51000".parse().expect("addr"),
        "198.51.100.1:443".parse().expect("addr"),
        LIMIT,
    )
    .expect("session");
    Fixture {
        client,
        session,
        backend_got: Vec::new(),
        client_got: Vec::new(),
    }
}

impl Fixture {
    /// Moves bytes client → session → backend and session → client until nothing moves.
    #[track_caller]
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            let mut buf = Vec::new();
            while self.client.wants_write() && self.session.wants_client_read() {
                self.client.write_tls(&mut buf).expect("client write_tls");
            }
            if !buf.is_empty() {
                moved = true;
                self.session.client_recv(&buf).expect("session client_recv");
            }
            let mut out = vec![0u8; 16 * 1024];
            let n = self.session.client_output(&mut out);
            if n > 0 {
                moved = true;
                let mut rd = &out[..n];
                while !rd.is_empty() {
                    self.client.read_tls(&mut rd).expect("client read_tls");
                    self.client.process_new_packets().expect("client process");
                    let _ = self.client.reader().read_to_end(&mut self.client_got);
                }
            }
            let n = self
                .session
                .backend_output(&mut out)
                .expect("backend_output");
            if n > 0 {
                moved = true;
                self.backend_got.extend_from_slice(&out[..n]);
            }
            if !moved {
                return;
            }
        }
        panic!("pump did not settle");
    }

    fn client_plaintext(&mut self) -> Vec<u8> {
        let _ = self.client.reader().read_to_end(&mut self.client_got);
        std::mem::take(&mut self.client_got)
    }
}

#[test]
fn handshake_then_bytes_both_ways() {
    let mut f = fixture(ProxyProtocol::None);
    assert!(
        f.session.needs_backend(true),
        "eager connects during the handshake"
    );
    assert!(
        !f.session.needs_backend(false),
        "first-byte waits for a byte"
    );
    f.pump();
    assert_eq!(f.session.stage(), Stage::Proxying);
    assert_eq!(f.session.resumed(), Some(false));
    assert!(!f.session.needs_backend(false), "no plaintext yet");

    f.client
        .writer()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    f.client.write_tls(&mut buf).expect("write_tls");
    f.session.client_recv(&buf).expect("recv");
    assert!(
        f.session.needs_backend(false),
        "first plaintext byte asks for the backend"
    );
    f.pump();
    assert_eq!(f.backend_got, b"GET / HTTP/1.1\r\n\r\n");

    f.session.backend_recv(b"HTTP/1.1 200 OK\r\n\r\n");
    f.pump();
    assert_eq!(f.client_plaintext(), b"HTTP/1.1 200 OK\r\n\r\n");
}

#[test]
fn proxy_v1_header_comes_first() {
    let mut f = fixture(ProxyProtocol::V1);
    f.pump();
    f.client.writer().write_all(b"hello").expect("write");
    f.pump();
    assert_eq!(
        f.backend_got,
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\nhello"
    );
}

#[test]
fn proxy_v2_header_carries_sni() {
    let mut f = fixture(ProxyProtocol::V2);
    f.pump();
    f.client.writer().write_all(b"x").expect("write");
    f.pump();
    let got = &f.backend_got;
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    let len = u16::from_be_bytes([got[14], got[15]]) as usize;
    assert_eq!(got.len(), 16 + len + 1, "header then one plaintext byte");
    assert_eq!(*got.last().expect("byte"), b'x');
    let header = &got[16..16 + len];
    assert!(
        header.windows(9).any(|w| w == b"tern.test"),
        "AUTHORITY TLV carries the SNI"
    );
}

#[test]
fn close_notify_from_client_finishes_client_side() {
    let mut f = fixture(ProxyProtocol::None);
    f.pump();
    f.client.writer().write_all(b"last words").expect("write");
    f.client.send_close_notify();
    f.pump();
    assert_eq!(f.backend_got, b"last words");
    assert!(
        f.session.client_finished(),
        "client side is finished after close_notify"
    );
    assert!(!f.session.wants_client_read());
    // The other direction still works (half-close).
    assert!(!f.session.server_finished());
    f.session.backend_recv(b"reply after half-close");
    f.pump();
    assert_eq!(f.client_plaintext(), b"reply after half-close");
}

#[test]
fn tcp_eof_without_close_notify_finishes_client_side() {
    let mut f = fixture(ProxyProtocol::None);
    f.pump();
    f.client.writer().write_all(b"abc").expect("write");
    f.pump();
    f.session.client_eof().expect("eof");
    f.pump();
    assert_eq!(f.backend_got, b"abc");
    assert!(f.session.client_finished());
}

#[test]
fn backend_fin_becomes_close_notify() {
    let mut f = fixture(ProxyProtocol::None);
    f.pump();
    f.session.backend_recv(b"bye");
    f.session.backend_eof();
    f.pump();
    assert_eq!(f.client_plaintext(), b"bye");
    let mut rest = Vec::new();
    assert_eq!(
        f.client
            .reader()
            .read_to_end(&mut rest)
            .expect("clean close"),
        0
    );
    assert!(
        f.session.server_finished(),
        "server side finished once close_notify is out"
    );
    assert!(!f.session.wants_backend_read());
}

#[test]
fn eof_during_handshake_fails_quietly() {
    let mut f = fixture(ProxyProtocol::None);
    let mut buf = Vec::new();
    f.client.write_tls(&mut buf).expect("hello");
    f.session.client_recv(&buf).expect("recv");
    f.session.client_eof().expect("eof");
    assert_eq!(f.session.stage(), Stage::Failed);
    assert!(f.session.client_finished());
    assert!(!f.session.needs_backend(true));
}

#[test]
fn garbage_gets_an_alert() {
    let mut f = fixture(ProxyProtocol::None);
    let err = f.session.client_recv(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(err.is_err(), "plain HTTP to a TLS port is an error");
    assert_eq!(f.session.stage(), Stage::Failed);
    let mut out = [0u8; 64];
    let n = f.session.client_output(&mut out);
    assert!(
        n >= 7 && out[0] == 0x15,
        "an alert record is queued, got {:?}",
        &out[..n]
    );
    assert!(f.session.server_finished());
}

#[test]
fn client_to_backend_back_pressure_is_bounded_and_lossless() {
    let mut f = fixture(ProxyProtocol::None);
    f.pump();
    let total = 1024 * 1024;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    f.client.set_buffer_limit(None);
    f.client.writer().write_all(&data).expect("write");
    // Feed without draining the backend side: the session must ask us to stop.
    let mut wire = Vec::new();
    while f.client.wants_write() {
        f.client.write_tls(&mut wire).expect("write_tls");
    }
    // Feed it as a socket would deliver it, 16 KiB per receive, while the session wants more.
    let mut fed = 0;
    while f.session.wants_client_read() && fed < wire.len() {
        let end = (fed + 16 * 1024).min(wire.len());
        f.session.client_recv(&wire[fed..end]).expect("recv");
        fed = end;
    }
    assert!(
        fed < wire.len(),
        "reading stopped before everything was fed"
    );
    assert!(
        f.session.stashed_bytes() <= LIMIT + 32 * 1024,
        "stash bounded: {}",
        f.session.stashed_bytes()
    );
    let mut out = vec![0u8; 16 * 1024];
    for round in 0.. {
        assert!(round < 10_000, "no progress");
        let n = f.session.backend_output(&mut out).expect("backend_output");
        f.backend_got.extend_from_slice(&out[..n]);
        while f.session.wants_client_read() && fed < wire.len() {
            let end = (fed + 16 * 1024).min(wire.len());
            f.session.client_recv(&wire[fed..end]).expect("recv");
            fed = end;
        }
        if n == 0 && fed == wire.len() {
            break;
        }
    }
    assert_eq!(f.backend_got.len(), total);
    assert!(f.backend_got == data, "bytes arrive intact and in order");
}

#[test]
fn backend_to_client_back_pressure_is_bounded_and_lossless() {
    let mut f = fixture(ProxyProtocol::None);
    f.pump();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut sent = 0;
    while f.session.wants_backend_read() && sent < data.len() {
        let end = (sent + 16 * 1024).min(data.len());
        f.session.backend_recv(&data[sent..end]);
        sent = end;
    }
    assert!(
        sent < data.len(),
        "the session asked the backend side to pause"
    );
    let mut got = Vec::new();
    for round in 0.. {
        if got.len() >= data.len() {
            break;
        }
        assert!(
            round < 10_000,
            "no progress: {} of {} bytes",
            got.len(),
            data.len()
        );
        f.pump();
        got.extend(f.client_plaintext());
        while f.session.wants_backend_read() && sent < data.len() {
            let end = (sent + 16 * 1024).min(data.len());
            f.session.backend_recv(&data[sent..end]);
            sent = end;
        }
    }
    assert!(got == data, "bytes arrive intact and in order");
}

// ---- plain (L4) sessions ----

fn plain(pp: ProxyProtocol) -> Session {
    Session::plain(
        pp,
        "192.0.2.7:51000".parse().expect("addr"),
        "198.51.100.1:443".parse().expect("addr"),
        LIMIT,
    )
}

/// Drains everything `session` holds for the backend.
fn drain_backend(session: &mut Session) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1000];
    loop {
        let n = session
            .backend_output(&mut buf)
            .expect("plain sessions cannot fail");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn plain_passes_bytes_both_ways_unchanged() {
    let mut s = plain(ProxyProtocol::None);
    assert!(!s.is_tls());
    assert_eq!(s.stage(), Stage::Proxying, "no handshake to wait for");
    assert!(!s.needs_backend(false), "first-byte: nothing to send yet");
    s.client_recv(b"hello ").expect("plain");
    s.client_recv(b"backend").expect("plain");
    assert!(
        s.needs_backend(false),
        "the first byte asks for the backend"
    );
    assert_eq!(drain_backend(&mut s), b"hello backend");
    assert!(!s.has_backend_output());

    s.backend_recv(b"hello client");
    assert!(s.wants_client_write());
    let mut buf = [0u8; 5];
    let mut got = Vec::new();
    while s.wants_client_write() {
        let n = s.client_output(&mut buf);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hello client", "small reads reassemble the stream");
    assert_eq!(s.negotiated().sni, None);
    assert_eq!(s.resumed(), None);
}

#[test]
fn plain_proxy_header_has_no_tls_fields() {
    let mut s = plain(ProxyProtocol::V1);
    assert!(
        s.needs_backend(false),
        "the header alone asks for the backend"
    );
    s.client_recv(b"data").expect("plain");
    assert_eq!(
        drain_backend(&mut s),
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\ndata"
    );
}

#[test]
fn plain_half_close_both_ways() {
    let mut s = plain(ProxyProtocol::None);
    s.client_recv(b"request").expect("plain");
    s.client_eof().expect("plain");
    assert!(!s.wants_client_read(), "nothing more is read after FIN");
    assert!(!s.client_finished(), "not until the bytes are handed on");
    assert_eq!(drain_backend(&mut s), b"request");
    assert!(
        s.client_finished(),
        "now the backend's write side can be shut"
    );
    // The other direction still flows.
    assert!(s.wants_backend_read());
    s.backend_recv(b"response");
    s.backend_eof();
    assert!(!s.server_finished(), "the response is still pending");
    let mut buf = [0u8; 64];
    let n = s.client_output(&mut buf);
    assert_eq!(&buf[..n], b"response");
    assert!(
        s.server_finished(),
        "FIN to the client once the response is out"
    );
}

#[test]
fn plain_back_pressure_is_bounded_and_lossless() {
    let mut s = plain(ProxyProtocol::None);
    let chunk: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let mut sent = 0usize;
    while s.wants_client_read() {
        s.client_recv(&chunk).expect("plain");
        sent += chunk.len();
        assert!(sent <= LIMIT + chunk.len(), "reading stops at the limit");
    }
    assert!(s.stashed_bytes() <= 2 * (LIMIT + chunk.len()));
    // Partial drains interleaved with refills keep the order.
    let mut got = Vec::new();
    let mut buf = [0u8; 3000];
    let mut more = 40usize;
    loop {
        let n = s.backend_output(&mut buf).expect("plain");
        got.extend_from_slice(&buf[..n]);
        if s.wants_client_read() && more > 0 {
            s.client_recv(&chunk).expect("plain");
            sent += chunk.len();
            more -= 1;
        } else if n == 0 {
            break;
        }
    }
    assert_eq!(got.len(), sent);
    for (i, c) in got.chunks(chunk.len()).enumerate() {
        assert_eq!(
            c,
            &chunk[..c.len()],
            "chunk {i} arrived intact and in order"
        );
    }
}
