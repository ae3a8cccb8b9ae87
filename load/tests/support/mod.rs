//! A small rustls TLS server for tern-load's integration tests (and the `tls-server` example):
//! a self-signed ECDSA P-256 certificate from rcgen, one thread per connection, HTTP/1.1
//! keep-alive on 127.0.0.1 only.
//!
//! Serves `GET /bytes/N` (N bytes), any other GET (a short text), and POST/PUT (reads the
//! Content-Length body and answers with a body of the same length). Honours
//! `Connection: close` by sending close_notify and closing after the response. Counts what it
//! saw so tests can cross-check tern-load's figures. [`Behaviour::Silent`] accepts TCP and
//! never answers, for the "target hangs" test. Not a benchmark server: thread-per-connection
//! keeps it simple and obviously correct.

#![allow(
    dead_code,
    reason = "shared by the tests and the example, which use different parts (so `expect` would be unfulfilled in one of them)"
)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustls::{HandshakeKind, ServerConfig, ServerConnection, StreamOwned};

/// What the server does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Http,
    /// As `Http`, but ignores `Connection: close` and keeps the connection open.
    NeverCloses,
    /// Accept the TCP connection and never read or write.
    Silent,
}

/// What the server observed.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    pub requests: AtomicU64,
    pub peers: Mutex<HashSet<IpAddr>>,
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The certificate in PEM: self-signed, so it is its own CA for `--ca`.
    pub ca_path: PathBuf,
    pub counters: Arc<Counters>,
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(behaviour: Behaviour) -> TestServer {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tern-load-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("generate a self-signed certificate");
        let ca_path = dir.join("cert.pem");
        std::fs::write(&ca_path, cert.cert.pem()).expect("write the certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server certificate");
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().expect("ticketer");
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let accept = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Head and body go out as separate records: without this, Nagle holds the
                    // body until the client's delayed ACK (40 ms).
                    let _ = stream.set_nodelay(true);
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(peer) = stream.peer_addr() {
                        counters.peers.lock().expect("peers lock").insert(peer.ip());
                    }
                    let (config, counters) = (config.clone(), counters.clone());
                    std::thread::spawn(move || match behaviour {
                        Behaviour::Http => serve(stream, config, &counters, true),
                        Behaviour::NeverCloses => serve(stream, config, &counters, false),
                        Behaviour::Silent => {
                            // Hold the socket until the client gives up.
                            let mut sink = [0u8; 1024];
                            let mut s = stream;
                            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                        }
                    });
                }
            })
        };
        TestServer {
            addr,
            ca_path,
            counters,
            dir,
            stop,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve(stream: TcpStream, config: Arc<ServerConfig>, counters: &Counters, honour_close: bool) {
    let Ok(conn) = ServerConnection::new(config) else {
        return;
    };
    let mut tls = StreamOwned::new(conn, stream);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    let mut counted_handshake = false;
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if !counted_handshake && !tls.conn.is_handshaking() {
                counted_handshake = true;
                let counter = match tls.conn.handshake_kind() {
                    Some(HandshakeKind::Resumed) => &counters.handshakes_resumed,
                    _ => &counters.handshakes_full,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or_default().split(' ');
        let (method, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or("/"),
        );
        let mut length = 0usize;
        let mut close = false;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().unwrap_or(0),
                    "connection" => close = honour_close && value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        // Request body: read and drop.
        while buf.len() < length {
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let body_len = match (method, path.strip_prefix("/bytes/")) {
            ("POST" | "PUT", _) => length,
            (_, Some(n)) => n.parse().unwrap_or(0),
            _ => 6,
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        if tls.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut left = if method == "HEAD" { 0 } else { body_len };
        chunk.fill(b'x');
        while left > 0 {
            let n = left.min(chunk.len());
            if tls.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
        if tls.flush().is_err() {
            return;
        }
        if close {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            let _ = tls.sock.shutdown(Shutdown::Write);
            // Wait for the client's close so our FIN is not followed by an RST.
            while matches!(tls.sock.read(&mut chunk), Ok(n) if n > 0) {}
            return;
        }
    }
}
