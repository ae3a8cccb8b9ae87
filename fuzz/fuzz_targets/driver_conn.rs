//! Fuzz target `driver_conn`: one connection's machine (`tern::driver::Conn`) with a real
//! rustls server session (or a plain one), driven by input-chosen client bytes, backend bytes
//! and time, the way a transport (the kernel worker or the bypass proxy) drives it.
//!
//! The first input byte sets knobs: bit 0 a TLS session (a fixed self-signed certificate for
//! `tern.test`, `fuzz/data/`) or a plain one, bit 1 `backend.connect = "eager"`, bits 2-3 the
//! number of backend servers (1 to 3). The rest is a sequence of operations, an opcode byte and
//! its arguments (reading past the end gives zeros):
//! - the client application writes `n` bytes (through a real rustls client on a TLS session,
//!   so the handshake and records are valid), or raw bytes go on the client's wire as they
//!   are (garbage, truncated records), the client's FIN, the client's reset;
//! - the transport reads up to `n` bytes of the client's wire into the machine (only while it
//!   wants them, as the paths do), or the client's EOF once the wire is empty;
//! - the backend's connect succeeds or fails (refused or timed out), the backend sends `n`
//!   bytes, its EOF, its error;
//! - the transport pulls client or backend output into a small buffer, and the peers take
//!   (some of) what was pulled for them;
//! - time advances (ms or 100 ms units), with due deadlines served as the timer wheel does;
//! - the worker stops (abort).
//!
//! After each operation the transport's end of pump runs (the backend operations the machine
//! asks for, `fin_due`, `output_state`, `poll_end`) and these invariants are asserted: no panic;
//! once `poll_end` returned an end it returns the same end; `next_deadline` is `Some` until the
//! end and `None` after; a deadline that has passed fires and one that has not does not;
//! output pulls return at most the buffer; nothing reaches the client after our FIN nor the
//! backend after its FIN; one connect at a time; what the backend receives is a prefix of what
//! the client application sent, and what the client application receives a prefix of what the
//! backend sent (a plain session: byte for byte; a TLS one: after decryption); the byte
//! counters equal what moved.

#![no_main]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
use tern::config::ProxyProtocol;
use tern::counters::WorkerCounters;
use tern::driver::{BackendOp, Backends, Conn, End, Event, Policy, Why};
use tern::proxy::Session;
use tern::tcp::time::{Duration, Instant};

/// A self-signed certificate for `tern.test` (P-256, not a CA, valid until 2126) and its key:
/// test material only.
const CERT: &[u8] = include_bytes!("../data/tern.test.cert.der");
const KEY: &[u8] = include_bytes!("../data/tern.test.key.der");

/// The session's per-direction bound: small, so back pressure is reached.
const LIMIT: usize = 8 * 1024;
/// Output the transport holds for a peer before it stops pulling (a socket buffer).
const SOCKET_BUFFER: usize = 16 * 1024;

fn configs() -> &'static (Arc<ServerConfig>, Arc<ClientConfig>) {
    static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let cert = CertificateDer::from(CERT.to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KEY.to_vec()));
        let server = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("the fixed certificate and key make a server config");
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("the fixed certificate is a root");
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    })
}

fn policy(eager: bool) -> Policy {
    Policy {
        handshake: Duration::from_secs(10),
        idle: Duration::from_secs(30),
        send: Duration::from_secs(5),
        fin: Duration::from_secs(20),
        eager,
    }
}

/// The bytes the client application (or the backend, with another seed) sends: position-
/// dependent, so a byte lost, repeated or reordered breaks the prefix checks.
fn pattern(seed: u8, pos: usize) -> u8 {
    (pos as u8).wrapping_mul(31) ^ ((pos >> 8) as u8) ^ seed
}

struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

struct Rig {
    conn: Conn,
    backends: Backends,
    counters: WorkerCounters,
    policy: Policy,
    now: Instant,
    tls: bool,

    client: Option<ClientConnection>,
    /// The client's TLS failed (tern's alert, or garbage from us broke it): it says nothing more.
    client_dead: bool,
    /// Plaintext the client application sent (plain: every byte put on the wire).
    client_sent: Vec<u8>,
    client_wire: Vec<u8>,
    client_fin: bool,
    client_eof_delivered: bool,
    client_reset: bool,
    to_client: Vec<u8>,
    client_got: Vec<u8>,
    client_progress: bool,

    connecting: bool,
    connected: bool,
    backend_sent: Vec<u8>,
    backend_wire: Vec<u8>,
    backend_fin: bool,
    backend_eof_delivered: bool,
    to_backend: Vec<u8>,
    backend_got: Vec<u8>,
    backend_saw_fin: bool,
    backend_progress: bool,

    /// Our FIN to the client (`fin_due` returned true).
    fin: bool,
    end: Option<End>,

    /// What moved, to check the byte counters.
    client_in: u64,
    client_out: u64,
    backend_in: u64,
    backend_out: u64,
}

impl Rig {
    fn new(knobs: u8) -> Rig {
        let tls = knobs & 1 != 0;
        let eager = knobs & 2 != 0;
        let servers_n = u16::from((knobs >> 2) & 3) % 3 + 1;
        let peer: SocketAddr = ([192, 0, 2, 7], 51000).into();
        let local: SocketAddr = ([198, 51, 100, 1], 443).into();
        let now = Instant::from_secs(1000);
        let (server, client_config) = configs();
        let (session, client) = if tls {
            let session = Session::new(server.clone(), ProxyProtocol::None, peer, local, LIMIT)
                .expect("a server session");
            let name = ServerName::try_from("tern.test").expect("a server name");
            let client = ClientConnection::new(client_config.clone(), name).expect("a client");
            (session, Some(client))
        } else {
            (
                Session::plain(ProxyProtocol::None, peer, local, LIMIT),
                None,
            )
        };
        let servers = (0..servers_n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect();
        let mut rig = Rig {
            conn: Conn::new(session, peer, 0, policy(eager), now),
            backends: Backends::new(servers, 0),
            counters: WorkerCounters::default(),
            policy: policy(eager),
            now,
            tls,
            client,
            client_dead: false,
            client_sent: Vec::new(),
            client_wire: Vec::new(),
            client_fin: false,
            client_eof_delivered: false,
            client_reset: false,
            to_client: Vec::new(),
            client_got: Vec::new(),
            client_progress: false,
            connecting: false,
            connected: false,
            backend_sent: Vec::new(),
            backend_wire: Vec::new(),
            backend_fin: false,
            backend_eof_delivered: false,
            to_backend: Vec::new(),
            backend_got: Vec::new(),
            backend_saw_fin: false,
            backend_progress: false,
            fin: false,
            end: None,
            client_in: 0,
            client_out: 0,
            backend_in: 0,
            backend_out: 0,
        };
        rig.client_flush();
        rig
    }

    /// The rustls client puts what it has to send on the wire.
    fn client_flush(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        while !self.client_dead && !self.client_fin && !self.client_reset && client.wants_write() {
            let mut out = Vec::new();
            match client.write_tls(&mut out) {
                Ok(n) if n > 0 => self.client_wire.extend_from_slice(&out),
                _ => break,
            }
        }
    }

    fn op(&mut self, input: &mut Input<'_>) {
        match input.byte() % 18 {
            // The client application writes.
            0 => {
                let n = usize::from(input.byte()) * 16;
                if self.client_fin || self.client_reset || self.client_dead {
                    return;
                }
                let start = self.client_sent.len();
                let data: Vec<u8> = (start..start + n).map(|i| pattern(0, i)).collect();
                match self.client.as_mut() {
                    Some(client) => {
                        let taken = client.writer().write(&data).unwrap_or(0);
                        self.client_sent.extend_from_slice(&data[..taken]);
                        self.client_flush();
                    }
                    None => {
                        self.client_sent.extend_from_slice(&data);
                        self.client_wire.extend_from_slice(&data);
                    }
                }
            }
            // Raw bytes on the client's wire.
            1 => {
                let n = usize::from(input.byte());
                let raw = input.bytes(n).to_vec();
                if self.client_fin || self.client_reset {
                    return;
                }
                if self.tls {
                    // Our own TLS client's stream is broken from here on.
                    self.client_dead = true;
                } else {
                    self.client_sent.extend_from_slice(&raw);
                }
                self.client_wire.extend_from_slice(&raw);
            }
            2 => self.client_fin = true,
            3 => {
                if !self.client_reset {
                    self.client_reset = true;
                    self.conn
                        .client_event(Event::Failed(libc::ECONNRESET), &self.counters);
                }
            }
            // The transport reads from the client while the machine wants bytes.
            4 => {
                let n = usize::from(input.byte()) * 8 + 1;
                self.client_read(n);
            }
            5 => {
                if self.connecting {
                    self.connecting = false;
                    self.connected = true;
                    self.backend(Event::Connected);
                }
            }
            6 => {
                let timed_out = input.byte() & 1 != 0;
                if self.connecting {
                    self.connecting = false;
                    let errno = if timed_out {
                        libc::ETIMEDOUT
                    } else {
                        libc::ECONNREFUSED
                    };
                    self.backend(Event::ConnectFailed { timed_out, errno });
                }
            }
            // The backend sends.
            7 => {
                let n = usize::from(input.byte()) * 32;
                if self.connected && !self.backend_fin {
                    let start = self.backend_sent.len();
                    let data: Vec<u8> = (start..start + n).map(|i| pattern(0x5a, i)).collect();
                    self.backend_sent.extend_from_slice(&data);
                    self.backend_wire.extend_from_slice(&data);
                }
            }
            8 => {
                if self.connected {
                    self.backend_fin = true;
                }
            }
            // The backend's socket fails.
            9 => {
                if self.connected {
                    self.connected = false;
                    self.backend(Event::Failed(libc::ECONNRESET));
                }
            }
            // The transport reads from the backend while the machine wants bytes.
            10 => {
                let n = usize::from(input.byte()) * 32 + 1;
                self.backend_read(n);
            }
            // The transport pulls client output into a small buffer.
            11 => {
                let n = usize::from(input.byte()) + 1;
                self.client_pull(n);
            }
            12 => {
                let n = usize::from(input.byte()) + 1;
                self.backend_pull(n);
            }
            // The client takes what was written for it.
            13 => {
                let n = usize::from(input.u16());
                self.client_take(n);
            }
            14 => {
                let n = usize::from(input.u16());
                self.backend_take(n);
            }
            // Time.
            15 => {
                let ms = u64::from(input.u16());
                self.advance(Duration::from_millis(ms));
            }
            16 => {
                let ms = u64::from(input.byte()) * 100;
                self.advance(Duration::from_millis(ms));
            }
            _ => self.conn.abort(Why::Shutdown),
        }
    }

    fn client_read(&mut self, n: usize) {
        if self.client_reset || !self.conn.wants_client_read() {
            return;
        }
        if !self.client_wire.is_empty() {
            let n = n.min(self.client_wire.len());
            let data: Vec<u8> = self.client_wire.drain(..n).collect();
            if self.conn.session().close_notify_queued() && self.client_dead {
                // rustls (0.23.46) trips its own debug assertion when a record fails after
                // it sent close_notify (rustls/rustls#959); a release build sends the alert.
                // Garbage is not fed after our close_notify in this (debug-assertion) build.
                return;
            }
            self.client_in += data.len() as u64;
            self.conn.client_event(Event::Data(&data), &self.counters);
        } else if self.client_fin && !self.client_eof_delivered {
            self.client_eof_delivered = true;
            self.conn.client_event(Event::Eof, &self.counters);
        }
    }

    fn backend_read(&mut self, n: usize) {
        if !self.connected || !self.conn.wants_backend_read() {
            return;
        }
        if !self.backend_wire.is_empty() {
            let n = n.min(self.backend_wire.len());
            let data: Vec<u8> = self.backend_wire.drain(..n).collect();
            self.backend_in += data.len() as u64;
            self.backend(Event::Data(&data));
        } else if self.backend_fin && !self.backend_eof_delivered {
            self.backend_eof_delivered = true;
            self.backend(Event::Eof);
        }
    }

    fn client_pull(&mut self, n: usize) {
        if self.end.is_some() || self.client_reset || self.to_client.len() >= SOCKET_BUFFER {
            return;
        }
        let mut buf = vec![0u8; n];
        let got = self.conn.client_output(&mut buf, &self.counters);
        assert!(got <= n, "client output {got} > buffer {n}");
        assert!(
            !(self.fin && got > 0),
            "{got} bytes for the client after our FIN"
        );
        self.client_out += got as u64;
        self.to_client.extend_from_slice(&buf[..got]);
    }

    fn backend_pull(&mut self, n: usize) {
        if self.end.is_some() || !self.conn.backend_writable() {
            return;
        }
        assert!(self.connected, "writable only when connected");
        if self.to_backend.len() >= SOCKET_BUFFER {
            return;
        }
        let mut buf = vec![0u8; n];
        let got = self.conn.backend_output(&mut buf, &self.counters, self.now);
        assert!(got <= n, "backend output {got} > buffer {n}");
        assert!(
            !(self.backend_saw_fin && got > 0),
            "bytes for the backend after its FIN"
        );
        self.backend_out += got as u64;
        self.to_backend.extend_from_slice(&buf[..got]);
    }

    fn client_take(&mut self, n: usize) {
        let n = n.min(self.to_client.len());
        if n == 0 || self.client_reset {
            return;
        }
        let data: Vec<u8> = self.to_client.drain(..n).collect();
        self.client_progress = true;
        let Some(client) = self.client.as_mut() else {
            self.client_got.extend_from_slice(&data);
            return;
        };
        let mut rd = &data[..];
        while !rd.is_empty() && !self.client_dead {
            if client.read_tls(&mut rd).is_err() {
                break;
            }
            if client.process_new_packets().is_err() {
                self.client_dead = true;
                break;
            }
            let mut buf = [0u8; 4096];
            while let Ok(k) = client.reader().read(&mut buf) {
                if k == 0 {
                    break;
                }
                self.client_got.extend_from_slice(&buf[..k]);
            }
        }
        self.client_flush();
    }

    fn backend_take(&mut self, n: usize) {
        let n = n.min(self.to_backend.len());
        if n == 0 {
            return;
        }
        self.backend_got.extend(self.to_backend.drain(..n));
        self.backend_progress = true;
    }

    /// A backend event, and the connect it may ask for (failover).
    fn backend(&mut self, ev: Event<'_>) {
        if let Some(op) = self
            .conn
            .backend_event(ev, &mut self.backends, &self.counters, self.now)
        {
            self.execute(op);
        }
    }

    fn execute(&mut self, op: BackendOp) {
        match op {
            BackendOp::Connect(_) => {
                assert!(
                    !self.connecting && !self.connected,
                    "one backend socket at a time"
                );
                self.connecting = true;
            }
            BackendOp::ShutdownWrite => {
                assert!(self.connected, "FIN on a connected backend");
                assert!(!self.backend_saw_fin, "one FIN to the backend");
                assert!(
                    self.to_backend.is_empty(),
                    "FIN only after everything written"
                );
                self.backend_saw_fin = true;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let due = self.conn.next_deadline();
        let fired = self.conn.on_timeout(self.now, &self.counters);
        match due {
            Some(d) => assert_eq!(fired, d <= self.now, "deadline {d:?} at {:?}", self.now),
            None => assert!(!fired, "no deadline, yet one fired"),
        }
    }

    /// What every pump ends with, and the invariants.
    fn settle(&mut self) {
        let flushed_backend = self.to_backend.is_empty();
        if let Some(op) = self.conn.poll_backend(
            &mut self.backends,
            &self.counters,
            self.policy.eager,
            flushed_backend,
            self.now,
        ) {
            self.execute(op);
        }
        if self.conn.fin_due(self.to_client.is_empty(), self.now) {
            assert!(!self.fin, "fin_due is true once");
            self.fin = true;
        }
        let queued = !self.to_client.is_empty() || !self.to_backend.is_empty();
        let progressed =
            std::mem::take(&mut self.client_progress) | std::mem::take(&mut self.backend_progress);
        self.conn.output_state(queued, progressed, self.now);
        let end = self
            .conn
            .poll_end(self.to_client.is_empty(), self.to_backend.is_empty());
        if let Some(before) = self.end {
            assert_eq!(end, Some(before), "an end, once returned, stays");
        }
        self.end = end;
        if self.conn.is_over() {
            assert!(end.is_some(), "over means poll_end says how");
        }
        match end {
            Some(_) => {
                assert_eq!(self.conn.next_deadline(), None);
                assert!(!self.conn.wants_client_read() && !self.conn.wants_backend_read());
                assert!(!self.conn.wants_client_write() && !self.conn.backend_writable());
            }
            None => assert!(
                self.conn.next_deadline().is_some(),
                "a live connection has a deadline"
            ),
        }
        if end == Some(End::Graceful) {
            assert!(self.fin, "a graceful end follows our FIN");
        }

        // Bytes: in order, none invented, all counted.
        assert!(
            self.client_sent.starts_with(&self.backend_got)
                && self
                    .client_sent
                    .starts_with(&[&self.backend_got[..], &self.to_backend[..]].concat()),
            "the backend got bytes the client did not send"
        );
        if !self.client_dead {
            assert!(
                self.backend_sent.starts_with(&self.client_got),
                "the client got bytes the backend did not send"
            );
        }
        if !self.tls {
            assert!(self.client_out <= self.backend_in, "plain: out ≤ in");
            assert!(self.backend_out <= self.client_in, "plain: out ≤ in");
        }
        let c = self.counters.snapshot();
        assert_eq!(c.client_bytes_in, self.client_in);
        assert_eq!(c.client_bytes_out, self.client_out);
        assert_eq!(c.backend_bytes_in, self.backend_in);
        assert_eq!(c.backend_bytes_out, self.backend_out);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let mut rig = Rig::new(input.byte());
    rig.settle();
    let mut ops = 0;
    while !input.data.is_empty() && ops < 4096 {
        rig.op(&mut input);
        rig.settle();
        ops += 1;
    }
});
