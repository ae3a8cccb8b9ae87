//! What the end-to-end tests share: a tern in front of a backend on an isolated rig, its
//! counters, and a small blocking TLS client (rustls) that runs inside the client namespace.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tern_tests::backend::Backend;
use tern_tests::certs::{write_self_signed, CertFiles, KeyKind};
use tern_tests::pktgen::{mac_of, send_syns, SynSpec};
use tern_tests::rig::{tern_binary, Rig, TempDir, TernProcess};

pub const NAME: &str = "tern.test";

/// A tern in front of something, on its own rig.
pub struct Stack {
    pub tern: TernProcess,
    pub cert: CertFiles,
    pub dir: TempDir,
    pub control: std::path::PathBuf,
    /// Declared last: dropped after tern has been killed.
    pub rig: Rig,
}

/// Options for [`Stack::start`]; `toml_extra` is appended to the generated configuration.
pub struct StackOptions<'a> {
    pub backends: Vec<SocketAddr>,
    pub proxy_protocol: &'a str,
    /// `backend.connect`: "first-byte" (tern's default) or "eager".
    pub connect: &'a str,
    pub listener_extra: &'a str,
    pub toml_extra: &'a str,
    pub extra_certs: &'a [(&'a str, &'a [&'a str])],
}

impl Default for StackOptions<'_> {
    fn default() -> Self {
        StackOptions {
            backends: Vec::new(),
            proxy_protocol: "none",
            connect: "first-byte",
            listener_extra: "",
            toml_extra: "",
            extra_certs: &[],
        }
    }
}

impl Stack {
    /// Makes the rig only; the caller starts backends on it and then calls [`Stack::start`].
    #[track_caller]
    pub fn rig(tag: &str) -> (Rig, TempDir) {
        (Rig::isolated(tag, 1), TempDir::new(tag))
    }

    /// tern with its kernel TLS listener (readiness) on the rig's server-side veth and a
    /// `mode = "bypass"` listener on `port` of the same interface — `tls = false` (the L4
    /// proxy) unless `tls` — in front of `backends`; `toml_extra` follows the listeners.
    #[track_caller]
    pub fn with_bypass_listener(
        rig: Rig,
        dir: TempDir,
        port: u16,
        tls: bool,
        backends: Vec<SocketAddr>,
        toml_extra: &str,
    ) -> Stack {
        let listener_extra = format!(
            "interface = \"{iface}\"\n\n[[listener]]\naddress = \"{ip}:{port}\"\n\
             mode = \"bypass\"\ninterface = \"{iface}\"\n{tls}",
            iface = rig.server_if,
            ip = rig.server_ip,
            tls = if tls { "" } else { "tls = false\n" },
        );
        Stack::start(
            rig,
            dir,
            StackOptions {
                backends,
                listener_extra: &listener_extra,
                toml_extra,
                ..Default::default()
            },
        )
    }

    #[track_caller]
    pub fn start(rig: Rig, dir: TempDir, opts: StackOptions<'_>) -> Stack {
        let cert = write_self_signed(dir.path(), "default", &[NAME], KeyKind::EcdsaP256);
        let mut certs = format!(
            "[[certificate]]\ncert = \"{}\"\nkey = \"{}\"\ndefault = true\n",
            cert.cert.display(),
            cert.key.display()
        );
        for (stem, names) in opts.extra_certs {
            let c = write_self_signed(dir.path(), stem, names, KeyKind::EcdsaP256);
            certs += &format!(
                "[[certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
                c.cert.display(),
                c.key.display()
            );
        }
        let control = dir.join("tern.sock");
        let servers: Vec<String> = opts.backends.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "[[listener]]\naddress = \"{addr}\"\n{listener_extra}\n\n{certs}\n\
             [tls]\nalpn = [\"http/1.1\"]\n\n\
             [backend]\nservers = [{servers}]\nproxy_protocol = \"{pp}\"\nconnect = \"{connect}\"\n\
             connect_timeout_ms = 2000\n\n\
             [workers]\ncount = 2\n\n[control]\nsocket = \"{control}\"\n\n{extra}\n",
            addr = rig.server_addr(443),
            listener_extra = opts.listener_extra,
            servers = servers.join(", "),
            pp = opts.proxy_protocol,
            connect = opts.connect,
            control = control.display(),
            extra = opts.toml_extra,
        );
        let mut tern = TernProcess::start(&config, rig.server_netns());
        tern.wait_ready(rig.server_addr(443));
        Stack {
            tern,
            cert,
            dir,
            control,
            rig,
        }
    }

    /// The usual set-up: a rig, `backend` (e.g. `Backend::echo`) on the server side's
    /// loopback, and tern in front of it with `opts` (its `backends` are replaced). The backend
    /// is returned so it lives as long as the caller needs it.
    #[track_caller]
    pub fn with_backend(
        tag: &str,
        backend: fn(TcpListener) -> Backend,
        opts: StackOptions<'_>,
    ) -> (Stack, Backend) {
        let (rig, dir) = Stack::rig(tag);
        let backend = backend(server_listener(&rig));
        let stack = Stack::start(
            rig,
            dir,
            StackOptions {
                backends: vec![backend.addr()],
                ..opts
            },
        );
        (stack, backend)
    }

    pub fn addr(&self) -> SocketAddr {
        self.rig.server_addr(443)
    }

    /// `tern ctl stats`, parsed.
    #[track_caller]
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(tern_binary())
            .args(["ctl", "--socket"])
            .arg(&self.control)
            .arg("stats")
            .output()
            .expect("run tern ctl");
        assert!(
            out.status.success(),
            "tern ctl stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats is JSON")
    }

    /// A total counter.
    #[track_caller]
    pub fn total(&self, name: &str) -> u64 {
        let s = self.stats();
        s["total"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {s}"))
    }

    /// `curl` in the client namespace, resolving [`NAME`] to tern.
    pub fn curl(&self, args: &[&str]) -> Output {
        let resolve = format!("{NAME}:443:{}", self.rig.server_ip);
        self.rig
            .client_command("curl")
            .args(["-sS", "--cacert"])
            .arg(&self.cert.cert)
            .args(["--resolve", &resolve, "--max-time", "60"])
            .args(args)
            .output()
            .expect("run curl")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{NAME}{path}")
    }

    /// A client configuration trusting this stack's certificate.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config(&self.cert.cert_der)
    }

    /// tern's stderr, for failure messages.
    /// Waits up to `within` for tern to exit (after a signal) and checks it exited with 0.
    #[track_caller]
    pub fn expect_clean_exit(&mut self, within: Duration, what: &str) {
        let Some(status) = self.tern.wait_exit(within) else {
            panic!("{what}: tern still runs after {within:?}\n{}", self.log());
        };
        assert!(status.success(), "{what}: {status}\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.tern.stderr_text()
    }
}

pub fn client_config(cert_der: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert_der.to_vec()))
        .expect("add root");
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TCP connection with read and write timeouts as failure guards (call inside the client
/// namespace).
#[track_caller]
pub fn connect_guarded(addr: SocketAddr) -> TcpStream {
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    sock.set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    sock
}

/// Completes a TLS handshake for `name` over an established socket.
#[track_caller]
pub fn tls_handshake(sock: TcpStream, cfg: &Arc<ClientConfig>, name: &str) -> Tls {
    let peer = sock.peer_addr().expect("peer addr");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    sock.set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let conn = ClientConnection::new(
        cfg.clone(),
        ServerName::try_from(name.to_string()).expect("name"),
    )
    .expect("client");
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .unwrap_or_else(|e| panic!("handshake with {peer} for {name}: {e}"));
    }
    tls
}

/// Ends a 2 %-each-way loss run: stops dropping (so the closing handshakes are not retried for
/// seconds) and checks that both directions really lost frames, at 1–4 %. Returns the counts.
#[track_caller]
pub fn stop_loss_checking_two_percent(
    loss: &mut tern_tests::loss::LossInjector,
) -> tern_tests::loss::LossCounts {
    let counts = loss.counts();
    loss.set_rates(0, 0);
    assert!(
        counts.ingress_dropped > 0 && counts.egress_dropped > 0,
        "both directions lost frames: {counts:?}"
    );
    let (rin, rout) = (counts.ingress_rate(), counts.egress_rate());
    assert!(
        (0.01..0.04).contains(&rin) && (0.01..0.04).contains(&rout),
        "loss near 2 % each way: {counts:?}"
    );
    counts
}

/// Sets SO_LINGER {on, 0} so that dropping the stream sends RST.
#[track_caller]
pub fn linger_zero(c: &TcpStream) {
    socket2::SockRef::from(c)
        .set_linger(Some(std::time::Duration::ZERO))
        .expect("SO_LINGER");
}

/// Connects and completes the handshake for [`NAME`] (call inside the client namespace).
#[track_caller]
pub fn tls_connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Tls {
    tls_handshake(connect_guarded(addr), cfg, NAME)
}

/// The TLS fields tern puts in a PROXY v2 header for a TLS 1.3 client that asked for
/// [`NAME`] and `http/1.1`.
#[track_caller]
pub fn assert_proxy_v2_tls(h: &tern_tests::backend::ProxyHeader) {
    assert_eq!(
        h.authority.as_deref(),
        Some(NAME),
        "SNI in PP2_TYPE_AUTHORITY"
    );
    assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]), "ALPN TLV");
    let ssl = h.ssl.as_ref().expect("PP2_TYPE_SSL");
    assert_eq!(ssl.client & 1, 1, "PP2_CLIENT_SSL");
    assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
    assert!(
        ssl.cipher.as_deref().is_some_and(|c| !c.is_empty()),
        "PP2_SUBTYPE_SSL_CIPHER: {ssl:?}"
    );
}

/// Writes `msg` and reads exactly `msg.len()` bytes back (through an echo backend).
#[track_caller]
pub fn echo_round_trip(tls: &mut Tls, msg: &[u8]) {
    tls.write_all(msg).expect("write");
    tls.flush().expect("flush");
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back).expect("read echo");
    assert_eq!(back, msg, "echo mismatch");
}

/// A listener bound inside the rig's server namespace, on loopback.
#[track_caller]
pub fn server_listener(rig: &Rig) -> TcpListener {
    let listener =
        rig.server_run(|| TcpListener::bind("127.0.0.1:0").expect("bind backend listener"));
    // std listens with a backlog of 128: a burst of tern's backend connects (1,000 clients at
    // once) on a loaded machine would overflow it, and the dropped SYNs would turn into connect
    // timeouts that say nothing about tern. Linux takes a second listen() as a new backlog.
    socket2::SockRef::from(&listener)
        .listen(4096)
        .expect("listen");
    listener
}

/// A port on the server side's loopback where nothing listens (connections are refused).
#[track_caller]
/// SYNs from `src_ip` (one address, `flows` source ports) in the client namespace to `port` on
/// the server side of the stack's rig.
pub fn syn_spec(s: &Stack, src_ip: Ipv4Addr, port: u16, flows: u16) -> SynSpec {
    SynSpec {
        interface: s.rig.client_if.clone(),
        src_mac: mac_of(s.rig.client_command("ip"), &s.rig.client_if).expect("client MAC"),
        dst_mac: mac_of(s.rig.server_command("ip"), &s.rig.server_if).expect("server MAC"),
        src_ip,
        src_ips: 1,
        dst_ip: s.rig.server_ip,
        dst_port: port,
        flows,
    }
}

/// Sends `n` SYNs of `spec` from the client namespace (within 30 s) and checks all went out.
pub fn send_syns_from_client(s: &Stack, spec: SynSpec, n: u64) {
    let sent = s.rig.client.run(move || {
        send_syns(&spec, n, Duration::from_secs(30), &AtomicBool::new(false)).expect("send SYNs")
    });
    assert_eq!(sent.frames, n, "the generator sent every frame");
}

/// The number at `path` (object keys) in `v`, e.g. a counter of `tern ctl stats`.
pub fn counter_at(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("no counter {path:?} in {v}"))
}

pub fn dead_port(rig: &Rig) -> SocketAddr {
    let l = server_listener(rig);
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[track_caller]
pub fn assert_ok(out: &Output, what: &str, log: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}\ntern log:\n{log}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// `tern ctl stats` polled until `f` holds, for at most 20 s; panics with the last document
/// and tern's log otherwise.
#[track_caller]
pub fn wait_stats(
    s: &Stack,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = s.stats();
        if f(&st) {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {st}\n{}",
            s.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// What one load thread saw: connections that completed a round trip, and every failure.
#[derive(Default)]
pub struct Load {
    pub ok: u64,
    pub failures: Vec<String>,
}

/// One TLS connection for [`NAME`], one echo round trip (`request {i}`), close_notify.
pub fn echo_request(addr: SocketAddr, cfg: &Arc<ClientConfig>, i: u32) -> Result<(), String> {
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(cfg.clone(), NAME.try_into().map_err(|_| "name")?)
        .map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, sock);
    let msg = format!("request {i}\n");
    tls.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back != msg.as_bytes() {
        return Err("echo mismatch".into());
    }
    tls.conn.send_close_notify();
    tls.flush().map_err(|e| format!("close_notify: {e}"))?;
    Ok(())
}

/// New TLS connections through an echo backend, one round trip each ([`echo_request`]), until
/// `stop` (bounded: 20,000 connections, 120 s). Call inside the client namespace.
pub fn load(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Load {
    load_until(addr, cfg, stop, 20_000)
}

/// At most `count` connections.
pub fn load_n(addr: SocketAddr, cfg: Arc<ClientConfig>, count: u32) -> Load {
    load_until(
        addr,
        cfg,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        count,
    )
}

fn load_until(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    count: u32,
) -> Load {
    let mut seen = Load::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for i in 0..count {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || std::time::Instant::now() >= deadline
        {
            break;
        }
        match echo_request(addr, &cfg, i) {
            Ok(()) => seen.ok += 1,
            Err(e) => seen.failures.push(format!(
                "{e} (at {:.3} s since the epoch)",
                std::time::SystemTime::UNIX_EPOCH
                    .elapsed()
                    .unwrap_or_default()
                    .as_secs_f64()
            )),
        }
    }
    seen
}

/// The listeners of a test on one data path: kernel, one listener on `kernel_port`; bypass, a
/// kernel listener on `kernel_port` that attaches XDP to the rig's server interface and answers
/// the readiness probe, plus a `mode = "bypass"` listener on `bypass_port`. With it, the `[xdp]`
/// table the bypass path needs on the rig (no hugepages, a small UMEM); empty for kernel.
pub fn path_listeners(
    bypass: bool,
    rig: &Rig,
    kernel_port: u16,
    bypass_port: u16,
) -> (String, &'static str) {
    if !bypass {
        let l = format!(
            "[[listener]]\naddress = \"{}\"\n",
            rig.server_addr(kernel_port)
        );
        return (l, "");
    }
    let l = format!(
        "[[listener]]\naddress = \"{k}\"\ninterface = \"{i}\"\n\n\
         [[listener]]\naddress = \"{b}\"\nmode = \"bypass\"\ninterface = \"{i}\"\n",
        k = rig.server_addr(kernel_port),
        b = rig.server_addr(bypass_port),
        i = rig.server_if,
    );
    (l, "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\n")
}
