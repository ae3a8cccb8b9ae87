//! Tests for `reload`: what a reload accepts, what it refuses by name, that a refused reload
//! leaves the running generation alone, that resumption state carries over, and that a reload
//! waits for the workers. Files live in a per-test temporary directory removed on drop.

use super::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tern-reload-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {dir:?}: {e}"));
        let d = Dir(dir);
        d.cert("site", "example.com");
        d
    }

    fn cert(&self, stem: &str, name: &str) {
        let generated = rcgen::generate_simple_self_signed(vec![name.to_string()])
            .unwrap_or_else(|e| panic!("rcgen: {e}"));
        write(&self.0.join(format!("{stem}.pem")), &generated.cert.pem());
        write(
            &self.0.join(format!("{stem}.key")),
            &generated.key_pair.serialize_pem(),
        );
    }

    fn config(&self) -> PathBuf {
        self.0.join("tern.toml")
    }

    /// Writes the configuration file with `extra` appended.
    fn write(&self, backend: &str, extra: &str) {
        let text = format!(
            r#"
[[listener]]
address = "127.0.0.1:8443"

[[certificate]]
cert = "site.pem"
key = "site.key"

[backend]
servers = [{backend}]

{extra}
"#
        );
        write(&self.config(), &text);
    }

    fn reloader(&self) -> Arc<Reloader> {
        let config = Config::load(&self.config()).unwrap_or_else(|e| panic!("{e}"));
        let tls = crate::tls::server_config(&config.certificates, &config.tls)
            .unwrap_or_else(|e| panic!("{e}"));
        Reloader::new(config, Some(tls))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[track_caller]
fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
}

const ONE: &str = r#""127.0.0.1:8080""#;
const TWO: &str = r#""127.0.0.1:8080", "127.0.0.1:8081""#;

#[test]
fn a_valid_file_becomes_the_next_generation_and_says_what_changed() {
    let d = Dir::new("valid");
    d.write(ONE, "");
    let r = d.reloader();
    d.write(TWO, "[timeouts]\nidle_ms = 1234");
    let done = r.reload(false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((done.generation, done.workers), (2, 0));
    assert_eq!(done.changed, vec!["backend", "timeouts"]);
    let live = r.current();
    assert_eq!(live.generation, 2);
    assert_eq!(live.config.backend.servers.len(), 2);
    assert_eq!(live.config.timeouts.idle, Duration::from_millis(1234));

    // The same file again: a new generation that changes nothing.
    let done = r.reload(false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((done.generation, done.changed.len()), (3, 0));
    assert!(done.to_string().contains("nothing changed"), "{done}");
}

#[test]
fn an_invalid_file_is_refused_with_its_field_and_the_running_generation_stays() {
    let d = Dir::new("invalid");
    d.write(ONE, "");
    let r = d.reloader();
    d.write(r#""not an address""#, "");
    let err = r.reload(false).err().unwrap_or_else(|| panic!("refused"));
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("{}: backend.servers", d.config().display())),
        "{text}"
    );
    assert_eq!(r.current().generation, 1);
    assert_eq!(r.current().config.backend.servers.len(), 1);

    // A key that is not the certificate's: refused too, naming the file.
    d.cert("other", "other.example");
    std::fs::copy(d.0.join("other.key"), d.0.join("site.key")).unwrap_or_else(|e| panic!("{e}"));
    d.write(ONE, "");
    let text = r
        .reload(false)
        .err()
        .unwrap_or_else(|| panic!("refused"))
        .to_string();
    assert!(text.contains("site.pem"), "{text}");
    assert_eq!(r.current().generation, 1);
}

#[test]
fn changes_that_need_a_restart_are_refused_by_name() {
    let d = Dir::new("restart");
    d.write(ONE, "[limits]\nmax_connections_per_worker = 100");
    let r = d.reloader();
    let cases = [
        (
            "[limits]\nmax_connections_per_worker = 100\n[[listener]]\naddress = \"127.0.0.1:9443\"",
            "listener",
        ),
        (
            "[limits]\nmax_connections_per_worker = 100\n[workers]\ncount = 7",
            "workers",
        ),
        (
            "[limits]\nmax_connections_per_worker = 100\n[tcp]\nmss = 1200",
            "tcp: changing [tcp] (mss)",
        ),
        (
            "[limits]\nmax_connections_per_worker = 100\n[control]\nsocket = \"/tmp/elsewhere.sock\"",
            "control",
        ),
        (
            "[limits]\nmax_connections_per_worker = 100\n[process]\nuser = \"nobody\"",
            "process",
        ),
        (
            "[limits]\nmax_connections_per_worker = 101",
            "limits.max_connections_per_worker: raising it above its value at start (100)",
        ),
    ];
    for (extra, field) in cases {
        d.write(ONE, extra);
        let text = match r.reload(false) {
            Err(e @ ReloadError::NeedsRestart(_)) => e.to_string(),
            other => panic!("{extra}: {other:?}"),
        };
        assert!(
            text.contains(&format!("tern.toml: {field}")) && text.contains("needs a restart"),
            "{extra}: {text}"
        );
        assert_eq!(r.current().generation, 1);
    }
    // Lowering the connection limit is fine.
    d.write(ONE, "[limits]\nmax_connections_per_worker = 50");
    let done = r.reload(false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.changed, vec!["limits"]);
}

#[test]
fn new_certificates_keep_the_session_cache_and_ticket_keys() {
    let d = Dir::new("certs");
    d.write(ONE, "");
    let r = d.reloader();
    let before = r.current();
    d.cert("site", "example.com");
    let done = r.reload(false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.changed, vec!["certificates"]);
    let after = r.current();
    let (Some(old), Some(new)) = (&before.tls, &after.tls) else {
        panic!("TLS on both generations");
    };
    assert!(!Arc::ptr_eq(old, new), "a new TLS configuration");
    assert!(
        std::ptr::addr_eq(
            Arc::as_ptr(&old.session_storage),
            Arc::as_ptr(&new.session_storage)
        ),
        "the same session cache"
    );
    assert!(
        std::ptr::addr_eq(Arc::as_ptr(&old.ticketer), Arc::as_ptr(&new.ticketer)),
        "the same ticket keys"
    );
}

#[test]
fn a_reload_waits_for_the_workers_and_is_refused_while_draining() {
    let d = Dir::new("acks");
    d.write(ONE, "");
    let r = d.reloader();
    let mut watch = r.watch();
    assert!(watch.poll().is_none(), "nothing new yet");
    let gone = r.watch();
    drop(gone);
    let worker = std::thread::spawn(move || {
        for _ in 0..1000 {
            if let Some(live) = watch.poll() {
                std::thread::sleep(Duration::from_millis(50));
                watch.applied(live.generation);
                assert!(watch.poll().is_none(), "seen once");
                // Returned, so it lives (registered) until joined.
                return (live.generation, Some(watch));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (0, None)
    });
    d.write(TWO, "");
    let done = r.reload(false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (done.applied, done.workers),
        (1, 1),
        "the ended worker is not waited for: {done}"
    );
    assert_eq!(worker.join().ok().map(|(g, _)| g), Some(2));

    assert!(matches!(r.reload(true), Err(ReloadError::Draining)));
    assert_eq!(r.current().generation, 2);
}
