//! The access log without sockets: a record's JSON line, the close reasons, a full buffer
//! (dropped and counted, never waiting), and the writer thread (drain, reopen, the end).

use super::*;
use crate::config::ProxyProtocol;
use crate::proxy::Session;
use crate::tcp::time::Instant;

const CLIENT: &str = "192.0.2.7:40000";
const LISTENER: &str = "0.0.0.0:443";
const BACKEND: &str = "127.0.0.1:8080";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a test address")
}

/// A throw-away directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tern-access-log-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn plain_conn() -> Conn {
    let session = Session::plain(ProxyProtocol::None, addr(CLIENT), addr(LISTENER), 65_536);
    let secs = crate::tcp::time::Duration::from_secs;
    let policy = crate::driver::Policy {
        handshake: secs(10),
        idle: secs(300),
        send: secs(60),
        fin: secs(60),
        eager: false,
    };
    Conn::new(session, addr(CLIENT), 0, policy, Instant::ZERO)
}

#[track_caller]
fn json(record: &Record) -> serde_json::Value {
    let mut out = Vec::new();
    record.to_json(&[addr(LISTENER)], &mut out).expect("format");
    assert_eq!(out.last(), Some(&b'\n'), "one line");
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
    serde_json::from_slice(&out).expect("the line is JSON")
}

#[test]
fn a_tls_record_is_one_json_line_with_every_field() {
    let mut sni = ArrayString::new();
    sni.push_str("tern.test");
    let record = Record {
        end: SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
        duration: Duration::from_micros(2_500),
        client: addr(CLIENT),
        listener: 0,
        path: PathKind::Bypass,
        tls: Some(TlsFacts {
            sni: Some(sni),
            alpn: Some(b"h2".iter().copied().collect()),
            version: Some(ProtocolVersion::TLSv1_3),
            cipher: Some(CipherSuite::TLS13_AES_128_GCM_SHA256),
            resumed: Some(true),
        }),
        backend: Some(addr(BACKEND)),
        bytes: ConnBytes {
            from_client: 1,
            to_client: 2,
            to_backend: 3,
            from_backend: 4,
        },
        reason: Reason::Graceful,
    };
    let v = json(&record);
    assert_eq!(v["time"], "2023-11-14T22:13:20.123456Z");
    assert_eq!(v["start"], "2023-11-14T22:13:20.120956Z");
    assert_eq!(v["duration_ms"], 2.5);
    assert_eq!(v["client"], CLIENT);
    assert_eq!(v["listener"], LISTENER);
    assert_eq!(v["path"], "bypass");
    assert_eq!(v["sni"], "tern.test");
    assert_eq!(v["alpn"], "h2");
    assert_eq!(v["tls_version"], "TLSv1.3");
    assert_eq!(v["cipher"], "TLS_AES_128_GCM_SHA256");
    assert_eq!(v["resumed"], true);
    assert_eq!(v["backend"], BACKEND);
    assert_eq!(v["bytes_from_client"], 1);
    assert_eq!(v["bytes_to_client"], 2);
    assert_eq!(v["bytes_to_backend"], 3);
    assert_eq!(v["bytes_from_backend"], 4);
    assert_eq!(v["reason"], "graceful");
}

#[test]
fn a_plain_connection_has_null_tls_fields_and_its_reason() {
    let conn = plain_conn();
    let backends = Backends::new(vec![addr(BACKEND)], 0);
    let record = Record::of(
        &conn,
        End::Abort(Why::Client),
        &backends,
        PathKind::Kernel,
        SystemTime::now(),
        Duration::from_millis(1),
    );
    let v = json(&record);
    for field in ["sni", "alpn", "tls_version", "cipher", "resumed", "backend"] {
        assert!(v[field].is_null(), "{field}: {v}");
    }
    assert_eq!(v["path"], "kernel");
    assert_eq!(v["reason"], "client");
    assert_eq!(v["listener"], LISTENER);
}

#[test]
fn reasons_follow_the_end() {
    let conn = plain_conn();
    for (end, reason) in [
        (End::Graceful, Reason::Graceful),
        (End::Abort(Why::Client), Reason::Client),
        (End::Abort(Why::HandshakeTimeout), Reason::HandshakeTimeout),
        (End::Abort(Why::IdleTimeout), Reason::IdleTimeout),
        (End::Abort(Why::SendTimeout), Reason::SendTimeout),
        (End::Abort(Why::FinTimeout), Reason::FinTimeout),
        (End::Abort(Why::Backend), Reason::Backend),
        (End::Abort(Why::Shutdown), Reason::Shutdown),
    ] {
        assert_eq!(Reason::of(&conn, end), reason, "{end:?}");
    }
}

fn settings(dir: &TempDir, buffer_lines: usize) -> AccessLogSettings {
    AccessLogSettings {
        path: dir.0.join("access.log"),
        buffer_lines,
        flush: Duration::from_millis(5),
    }
}

#[track_caller]
fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("read the log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn a_full_buffer_drops_and_counts_and_the_writer_writes_the_rest_at_the_end() {
    let dir = TempDir::new("full");
    let settings = settings(&dir, 2);
    let mut log = AccessLog::open(&settings, vec![addr(LISTENER)]).expect("open");
    let mut sink = log
        .sink(PathKind::Kernel)
        .with_epoch(std::time::Instant::now());
    let (conn, counters) = (plain_conn(), WorkerCounters::default());
    let backends = Backends::new(vec![addr(BACKEND)], 0);
    for _ in 0..5 {
        sink.record(&conn, End::Graceful, &backends, &counters);
    }
    assert_eq!(
        counters.access_log_dropped.get(),
        3,
        "two fit, three dropped"
    );

    let handle = log.handle();
    let shutdown = Arc::new(Shutdown::default());
    let writer = log.spawn(shutdown.clone()).expect("spawn the writer");
    shutdown.drain.store(true, Ordering::Relaxed);
    // The writer waits for the worker's sink to go before it ends.
    std::thread::sleep(Duration::from_millis(30));
    assert!(!writer.is_finished(), "a sink is still alive");
    drop(sink);
    writer.join().expect("the writer ends");
    let got = lines(&settings.path);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|v| v["reason"] == "graceful"));
    assert_eq!(handle.lines.load(Ordering::Relaxed), 2);
    assert_eq!(handle.write_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn reopen_moves_new_lines_to_a_new_file() {
    let dir = TempDir::new("reopen");
    let settings = settings(&dir, 16);
    let mut log = AccessLog::open(&settings, vec![addr(LISTENER)]).expect("open");
    let mut sink = log
        .sink(PathKind::Bypass)
        .with_epoch(std::time::Instant::now());
    let (conn, counters) = (plain_conn(), WorkerCounters::default());
    let backends = Backends::new(vec![addr(BACKEND)], 0);
    let handle = log.handle();
    let shutdown = Arc::new(Shutdown::default());
    let writer = log.spawn(shutdown.clone()).expect("spawn the writer");

    sink.record(&conn, End::Graceful, &backends, &counters);
    // Bounded: the writer drains every 5 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while handle.lines.load(Ordering::Relaxed) < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&settings.path, &rotated).expect("rotate");
    handle.reopen(settings.flush).expect("reopen");
    sink.record(&conn, End::Abort(Why::IdleTimeout), &backends, &counters);
    shutdown.stop.store(true, Ordering::Relaxed);
    drop(sink);
    writer.join().expect("the writer ends");

    let old = lines(&rotated);
    let new = lines(&settings.path);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["reason"], "graceful");
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["reason"], "idle_timeout");
    assert_eq!(new[0]["path"], "bypass");
}

#[test]
fn a_reopen_that_fails_says_why_and_keeps_the_old_file() {
    let dir = TempDir::new("reopen-fails");
    let settings = settings(&dir, 16);
    let log = AccessLog::open(&settings, vec![addr(LISTENER)]).expect("open");
    let handle = log.handle();
    let shutdown = Arc::new(Shutdown::default());
    let writer = log.spawn(shutdown.clone()).expect("spawn the writer");
    // The path's directory is gone: the new file cannot be created.
    std::fs::remove_dir_all(&dir.0).expect("remove the directory");
    let err = handle.reopen(settings.flush).expect_err("cannot reopen");
    assert!(err.contains("access.log"), "{err}");
    shutdown.stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer ends");
}

#[test]
fn a_record_stays_small() {
    // docs/configuration.md (`buffer_lines`) quotes this size per buffered line.
    let size = std::mem::size_of::<Record>();
    assert!(size <= 700, "{size} bytes");
}
