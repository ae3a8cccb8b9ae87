//! Tests for `config`: the contract's full example, defaults, and one test per kind of error,
//! each asserting the field named and a fragment of the message. Certificates are generated
//! with rcgen into a per-test temporary directory that is removed on drop (also on panic).

use super::*;

use std::sync::atomic::{AtomicUsize, Ordering};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tern-config-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(dir.join("certs"))
            .unwrap_or_else(|e| panic!("cannot create {dir:?}: {e}"));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover directory must not turn a passing test into a failure.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A temp dir holding `tern.toml`'s future location and a certificate for `example.com` and
/// `*.example.com` at `certs/site.pem` / `certs/site.key`.
struct Fixture {
    dir: TempDir,
    /// Where the configuration "was read from"; relative paths resolve against its directory.
    config: PathBuf,
    /// PEM of the generated leaf, to compare with what validation loaded.
    cert_pem: String,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = TempDir::new(tag);
        let cert_pem = write_cert(&dir.0, "site", &["example.com", "*.example.com"]);
        let config = dir.0.join("tern.toml");
        Fixture {
            dir,
            config,
            cert_pem,
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.0.join(relative)
    }

    fn load(&self, text: &str) -> Result<Config, ConfigError> {
        Config::from_str(&self.config, text)
    }

    #[track_caller]
    fn ok(&self, text: &str) -> Config {
        self.load(text)
            .unwrap_or_else(|e| panic!("expected a valid config, got: {e}\n--- config ---\n{text}"))
    }

    /// Asserts that `text` is rejected for `field` with a message containing `fragment`.
    #[track_caller]
    fn rejects(&self, text: &str, field: &str, fragment: &str) -> ConfigError {
        let error = match self.load(text) {
            Ok(config) => panic!("expected an error on {field:?}, got {config:#?}"),
            Err(e) => e,
        };
        assert_eq!(
            error.path, self.config,
            "error names the wrong file: {error}"
        );
        assert_eq!(error.field, field, "error names the wrong field: {error}");
        assert!(
            error.message.contains(fragment),
            "message of {error:?} lacks {fragment:?}"
        );
        error
    }
}

/// Writes `certs/<stem>.pem` and `certs/<stem>.key` (ECDSA P-256) under `dir`; returns the PEM.
fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let generated =
        rcgen::generate_simple_self_signed(names).unwrap_or_else(|e| panic!("rcgen failed: {e}"));
    let cert_pem = generated.cert.pem();
    write(&dir.join(format!("certs/{stem}.pem")), &cert_pem);
    write(
        &dir.join(format!("certs/{stem}.key")),
        &generated.key_pair.serialize_pem(),
    );
    cert_pem
}

#[track_caller]
fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
}

/// The smallest valid file: every optional table omitted.
const MINIMAL: &str = r#"
[[listener]]
address = "127.0.0.1:8443"

[[certificate]]
cert = "certs/site.pem"
key = "certs/site.key"

[backend]
servers = ["127.0.0.1:8080"]
"#;

/// `MINIMAL` with `table` appended (TOML tables may come in any order).
fn minimal_with(table: &str) -> String {
    format!("{MINIMAL}\n{table}\n")
}

#[test]
fn full_example_from_the_contract() {
    let fx = Fixture::new("full");
    // The contract's example, with an xdp listener (its `interface` is only valid there) and
    // pinned to CPUs this machine really has.
    let cpus: Vec<usize> = available_cpus().into_iter().take(2).collect();
    let cpu_list = cpus
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[[listener]]
address = "0.0.0.0:443"
mode = "kernel"

[[listener]]
address = "[::]:8443"
mode = "bypass"
interface = "veth0"
xdp_attach = "skb"

[[certificate]]
cert = "certs/site.pem"
key = "certs/site.key"
names = ["Example.COM", "*.example.com", "example.com"]
default = true

[tls]
alpn = ["h2", "http/1.1"]
versions = ["1.3", "1.2"]
session_cache_entries = 500
tickets = false

[backend]
servers = ["127.0.0.1:8080", {{ address = "[::1]:8081", weight = 3 }}]
connect_timeout_ms = 1500
connect = "eager"
proxy_protocol = "v2"
balance = "least-connections"

[backend.health]
interval_ms = 500
fall = 2

[workers]
count = {count}
cpus = [{cpu_list}]

[timeouts]
handshake_ms = 5000
idle_ms = 60000
send_ms = 7000
drain_ms = 2000

[limits]
max_connections_per_worker = 123
buffer_per_direction = 16384
max_connections_per_source = 9

[control]
socket = "/run/tern-test.sock"
"#,
        count = cpus.len()
    );
    let config = fx.ok(&text);

    assert_eq!(config.path, fx.config);
    assert_eq!(
        config.listeners,
        vec![
            Listener {
                address: "0.0.0.0:443".parse().expect("literal address"),
                mode: ListenerMode::Kernel,
                interface: None,
                xdp_attach: XdpAttach::Auto,
                tls: true,
            },
            Listener {
                address: "[::]:8443".parse().expect("literal address"),
                mode: ListenerMode::Bypass,
                interface: Some("veth0".to_owned()),
                xdp_attach: XdpAttach::Skb,
                tls: true,
            },
        ]
    );

    assert_eq!(config.certificates.len(), 1);
    let cert = &config.certificates[0];
    assert_eq!(cert.cert_path, fx.path("certs/site.pem"));
    assert_eq!(cert.key_path, fx.path("certs/site.key"));
    // Lower-cased and deduplicated, order kept.
    assert_eq!(cert.names, ["example.com", "*.example.com"]);
    assert!(
        cert.default,
        "the certificate marked default is the default"
    );
    let expected_leaf = CertificateDer::from_pem_slice(fx.cert_pem.as_bytes())
        .expect("the fixture's own PEM parses");
    assert_eq!(cert.chain, vec![expected_leaf]);
    assert!(
        matches!(*cert.key, PrivateKeyDer::Pkcs8(_)),
        "rcgen writes PKCS#8 keys, got {:?}",
        cert.key
    );

    assert_eq!(
        config.tls,
        TlsSettings {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            versions: vec![TlsVersion::Tls12, TlsVersion::Tls13],
            session_cache_entries: 500,
            tickets: false,
            ticket_keys: None,
            client_auth: None,
            cipher_suites: None,
            groups: None,
            strict_sni: false,
        }
    );
    assert_eq!(
        config.backend,
        Backend {
            servers: vec![
                BackendServer {
                    address: "127.0.0.1:8080".parse().expect("literal address"),
                    weight: 1,
                },
                BackendServer {
                    address: "[::1]:8081".parse().expect("literal address"),
                    weight: 3,
                },
            ],
            connect_timeout: Duration::from_millis(1500),
            connect: ConnectPolicy::Eager,
            proxy_protocol: ProxyProtocol::V2,
            balance: Balance::LeastConnections,
            health: HealthCheck {
                interval: Some(Duration::from_millis(500)),
                timeout: Duration::from_millis(1500),
                fall: 2,
                rise: 1,
            },
        }
    );
    assert_eq!(
        config.workers,
        Workers {
            count: cpus.len(),
            cpus
        }
    );
    assert_eq!(
        config.timeouts,
        Timeouts {
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(7),
            drain: Duration::from_secs(2),
        }
    );
    assert_eq!(
        config.limits,
        Limits {
            max_connections_per_worker: 123,
            buffer_per_direction: 16384,
            max_connections_per_source: 9,
            splice: true,
            send_zc: false,
        }
    );
    assert_eq!(config.control.socket, PathBuf::from("/run/tern-test.sock"));
}

#[test]
fn defaults_are_applied() {
    let fx = Fixture::new("defaults");
    let config = fx.ok(MINIMAL);

    assert_eq!(config.listeners[0].mode, ListenerMode::Kernel);
    assert_eq!(config.listeners[0].interface, None);
    assert_eq!(config.listeners[0].xdp_attach, XdpAttach::Auto);

    let cert = &config.certificates[0];
    // Without `names`, the leaf's DNS SANs.
    assert_eq!(cert.names, ["example.com", "*.example.com"]);
    assert!(cert.default, "a lone certificate is the default");

    assert_eq!(
        config.tls,
        TlsSettings {
            alpn: Vec::new(),
            versions: vec![TlsVersion::Tls12, TlsVersion::Tls13],
            session_cache_entries: 20_000,
            tickets: true,
            ticket_keys: None,
            client_auth: None,
            cipher_suites: None,
            groups: None,
            strict_sni: false,
        }
    );
    assert_eq!(config.backend.connect_timeout, Duration::from_millis(3000));
    assert_eq!(config.backend.connect, ConnectPolicy::FirstByte);
    assert_eq!(config.backend.proxy_protocol, ProxyProtocol::None);
    assert_eq!(config.backend.balance, Balance::RoundRobin);
    assert_eq!(config.backend.servers[0].weight, 1);
    assert_eq!(
        config.backend.health,
        HealthCheck {
            interval: Some(Duration::from_millis(2000)),
            timeout: Duration::from_millis(3000),
            fall: 1,
            rise: 1,
        }
    );

    let parallelism = std::thread::available_parallelism()
        .expect("available_parallelism works on Linux")
        .get();
    assert_eq!(
        config.workers,
        Workers {
            count: parallelism,
            cpus: Vec::new()
        }
    );
    assert_eq!(
        config.timeouts,
        Timeouts {
            handshake: Duration::from_millis(10_000),
            idle: Duration::from_millis(300_000),
            send: Duration::from_millis(60_000),
            drain: Duration::from_millis(30_000),
        }
    );
    assert_eq!(
        config.limits,
        Limits {
            max_connections_per_worker: 10_000,
            buffer_per_direction: 65_536,
            max_connections_per_source: 0,
            splice: true,
            send_zc: false,
        }
    );
    assert_eq!(config.control.socket, PathBuf::from("/run/tern.sock"));
    assert_eq!(
        (
            config.control.mode,
            config.control.owner,
            config.control.group
        ),
        (0o600, None, None),
        "owner-only socket, owned by whoever runs tern"
    );
}

#[test]
fn control_socket_mode_owner_and_group() {
    let fx = Fixture::new("control");
    let control = |table: &str| fx.ok(&minimal_with(&format!("[control]\n{table}"))).control;
    assert_eq!(control("mode = \"0660\"").mode, 0o660);
    assert_eq!(control("mode = \"640\"").mode, 0o640);
    assert_eq!(control("mode = \"0o600\"").mode, 0o600);
    let c = control("owner = \"root\"\ngroup = \"root\"");
    assert_eq!(
        (c.owner, c.group),
        (Some(0), Some(0)),
        "names are looked up"
    );
    let c = control("owner = 1000\ngroup = \"1001\"");
    assert_eq!(
        (c.owner, c.group),
        (Some(1000), Some(1001)),
        "numeric ids, as integers or strings of digits, are taken as they are"
    );

    for (table, field, fragment) in [
        (
            "mode = \"0668\"",
            "control.mode",
            "\"0668\" is not an octal mode",
        ),
        (
            "mode = \"rw-rw----\"",
            "control.mode",
            "is not an octal mode",
        ),
        ("mode = \"\"", "control.mode", "is not an octal mode"),
        ("mode = \"4755\"", "control.mode", "only permission bits"),
        (
            "mode = \"0460\"",
            "control.mode",
            "owner must have write permission",
        ),
        ("mode = 660", "control.mode", "expected a string"),
        (
            "owner = \"no-such-user-tern\"",
            "control.owner",
            "no user named \"no-such-user-tern\"",
        ),
        (
            "group = \"no-such-group-tern\"",
            "control.group",
            "no group named",
        ),
        ("owner = -1", "control.owner", "out of range"),
        ("group = 4294967295", "control.group", "reserved"),
        ("owner = true", "control.owner", "a name or a numeric id"),
    ] {
        fx.rejects(
            &minimal_with(&format!("[control]\n{table}")),
            field,
            fragment,
        );
    }
}

#[test]
fn metrics_address_is_off_by_default_and_validated() {
    let fx = Fixture::new("metrics");
    assert_eq!(fx.ok(MINIMAL).metrics.address, None, "off by default");
    let config = fx.ok(&minimal_with("[metrics]\naddress = \"[::1]:9100\""));
    assert_eq!(
        config.metrics.address,
        Some("[::1]:9100".parse().expect("addr"))
    );
    for (table, field, fragment) in [
        (
            "address = \"localhost:9100\"",
            "metrics.address",
            "invalid socket address",
        ),
        (
            "address = \"127.0.0.1:0\"",
            "metrics.address",
            "port 0 is not allowed",
        ),
        ("port = 9100", "metrics.port", "unknown field"),
    ] {
        fx.rejects(
            &minimal_with(&format!("[metrics]\n{table}")),
            field,
            fragment,
        );
    }
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let fx = Fixture::new("relative");
    let config = fx.ok(&minimal_with("[control]\nsocket = \"run/ctl.sock\""));
    assert_eq!(config.certificates[0].cert_path, fx.path("certs/site.pem"));
    assert_eq!(config.control.socket, fx.path("run/ctl.sock"));

    // An absolute path is taken as is.
    let absolute = fx.path("certs/site.pem");
    let text = MINIMAL.replace(
        "cert = \"certs/site.pem\"",
        &format!(
            "cert = {:?}",
            absolute.to_str().expect("temp paths are UTF-8")
        ),
    );
    assert_eq!(fx.ok(&text).certificates[0].cert_path, absolute);
}

#[test]
fn sni_defaults_and_names_across_certificates() {
    let fx = Fixture::new("sni");
    write_cert(&fx.dir.0, "other", &["Other.Example.NET"]);
    let two = format!(
        "{MINIMAL}\n[[certificate]]\ncert = \"certs/other.pem\"\nkey = \"certs/other.key\"\n"
    );
    let config = fx.ok(&two);
    assert!(config.certificates[0].default, "none marked: the first");
    assert!(!config.certificates[1].default);
    assert_eq!(config.certificates[1].names, ["other.example.net"]);
    assert_eq!(
        config.default_certificate().expect("a default").names[0],
        "example.com"
    );

    let second_default = format!("{two}default = true\n");
    let config = fx.ok(&second_default);
    assert!(!config.certificates[0].default);
    assert!(config.certificates[1].default, "the marked one");

    let shadowed = format!("{two}names = [\"www.example.com\", \"EXAMPLE.com\"]\n");
    fx.rejects(
        &shadowed,
        "certificate[1].names",
        "\"example.com\" is also a name of certificate[0] with the same key type",
    );
    // Both files are named, so the operator can find the pair.
    let error = fx.rejects(&shadowed, "certificate[1].names", "site.pem");
    assert!(error.message.contains("other.pem"), "{error}");
    fx.rejects(
        &format!("{two}names = [\"www.*.example.com\"]\n"),
        "certificate[1].names[0]",
        "a wildcard may only be the whole first label",
    );
    fx.rejects(
        &format!("{two}names = [\"ok.example\", \"bücher.example\"]\n"),
        "certificate[1].names[1]",
        "xn-- (punycode) form",
    );
    fx.rejects(
        &format!("{two}names = [\"bad_host name\"]\n"),
        "certificate[1].names[0]",
        "is not a valid DNS host name",
    );
    fx.rejects(
        &format!("{two}names = [\"\"]\n"),
        "certificate[1].names[0]",
        "must not be empty",
    );
    fx.rejects(
        &format!("{two}names = []\n"),
        "certificate[1].names",
        "SNI could never select this certificate",
    );
    // The default certificate needs no name: it is served without SNI.
    let config = fx.ok(&format!("{two}names = []\ndefault = true\n"));
    assert!(config.certificates[1].names.is_empty());
}

#[test]
fn unknown_fields_are_named() {
    let fx = Fixture::new("unknown");
    let error = fx.rejects(
        &format!("colour = \"blue\"\n{MINIMAL}"),
        "colour",
        "unknown field `colour`",
    );
    assert!(
        error.message.contains("line 1, column 1"),
        "no position in {error}"
    );
    fx.rejects(
        &MINIMAL.replace("address = ", "adress = \"x\"\naddress = "),
        "listener[0].adress",
        "unknown field `adress`, expected one of `address`, `mode`",
    );
    fx.rejects(
        &minimal_with("[timeouts]\nhandshake = 5"),
        "timeouts.handshake",
        "unknown field `handshake`",
    );
}

#[test]
fn wrong_types_name_the_field() {
    let fx = Fixture::new("types");
    let text = minimal_with("[workers]\ncount = \"two\"");
    let error = fx.rejects(
        &text,
        "workers.count",
        "invalid type: string \"two\", expected a non-negative integer",
    );
    let line = text
        .lines()
        .position(|l| l.starts_with("count"))
        .expect("the count line")
        + 1;
    assert!(
        error.message.contains(&format!("(line {line}, column 9)")),
        "no or wrong position in {error}"
    );
    assert_eq!(
        error.to_string(),
        format!("{}: workers.count: {}", fx.config.display(), error.message)
    );

    fx.rejects(
        &MINIMAL.replace("127.0.0.1:8443\"", "127.0.0.1:8443\"\nmode = \"dpdk\""),
        "listener[0].mode",
        "unknown variant `dpdk`, expected one of `kernel`, `bypass`",
    );
    fx.rejects(
        &MINIMAL.replace("\"127.0.0.1:8080\"]", "\"127.0.0.1:8080\", 8081]"),
        "backend.servers[1]",
        "invalid type: integer `8081`, expected \"IP:port\" or a table",
    );
    fx.rejects(
        &minimal_with("[tls]\nversions = [\"1.1\"]"),
        "tls.versions[0]",
        "unknown variant `1.1`, expected `1.2` or `1.3`",
    );
    fx.rejects(
        &minimal_with("[backend.extra]"),
        "backend.extra",
        "unknown field `extra`",
    );
    fx.rejects(
        &minimal_with("[limits]\nbuffer_per_direction = -1"),
        "limits.buffer_per_direction",
        "expected a non-negative integer",
    );
}

#[test]
fn syntax_errors_report_line_and_column() {
    let fx = Fixture::new("syntax");
    let text = MINIMAL.replace("[backend]", "[backend\n");
    let line = text
        .lines()
        .position(|l| l.starts_with("[backend"))
        .expect("the backend line")
        + 1;
    let error = fx.rejects(
        &text,
        "",
        &format!("TOML syntax error at line {line}, column 9"),
    );
    assert_eq!(
        error.to_string(),
        format!("{}: {}", fx.config.display(), error.message),
        "no field part for a file-level error"
    );
    fx.rejects(
        &MINIMAL.replace("[backend]", "[backend]\nservers = []"),
        "",
        "TOML syntax error at line",
    );
}

#[test]
fn bad_addresses() {
    let fx = Fixture::new("address");
    fx.rejects(
        &MINIMAL.replace("127.0.0.1:8443", "localhost:443"),
        "listener[0].address",
        "invalid socket address \"localhost:443\"",
    );
    fx.rejects(
        &MINIMAL.replace("127.0.0.1:8443", "::1:443"),
        "listener[0].address",
        "invalid socket address \"::1:443\"",
    );
    fx.rejects(
        &MINIMAL.replace("127.0.0.1:8443", "127.0.0.1:0"),
        "listener[0].address",
        "port 0 is not allowed",
    );
    fx.rejects(
        &MINIMAL.replace("\"127.0.0.1:8080\"]", "\"127.0.0.1:8080\", \"10.0.0.1\"]"),
        "backend.servers[1]",
        "invalid socket address \"10.0.0.1\"",
    );
    fx.rejects(
        &MINIMAL.replace("[\"127.0.0.1:8080\"]", "[]"),
        "backend.servers",
        "at least one backend server is required",
    );
    fx.rejects(
        &format!("{MINIMAL}\n[[listener]]\naddress = \"127.0.0.1:8443\"\n"),
        "listener[1].address",
        "127.0.0.1:8443 is already the address of listener[0]",
    );
}

#[test]
fn required_tables_and_fields() {
    let fx = Fixture::new("required");
    let without_backend = &MINIMAL[..MINIMAL.find("[backend]").expect("backend table")];
    fx.rejects(
        without_backend,
        "backend",
        "the [backend] table is required",
    );
    fx.rejects(
        &MINIMAL.replace("address = \"127.0.0.1:8443\"", ""),
        "listener[0].address",
        "required field is missing",
    );
    fx.rejects(
        &MINIMAL.replace("key = \"certs/site.key\"", ""),
        "certificate[0].key",
        "required field is missing",
    );
    let without_listener = MINIMAL.replace("[[listener]]\naddress = \"127.0.0.1:8443\"", "");
    fx.rejects(&without_listener, "listener", "at least one [[listener]]");
    let without_certificate = MINIMAL.replace(
        "[[certificate]]\ncert = \"certs/site.pem\"\nkey = \"certs/site.key\"",
        "",
    );
    fx.rejects(
        &without_certificate,
        "certificate",
        "at least one [[certificate]]",
    );
}

#[test]
fn missing_certificate_file() {
    let fx = Fixture::new("missing");
    let error = fx.rejects(
        &MINIMAL.replace("certs/site.pem", "certs/nope.pem"),
        "certificate[0].cert",
        "cannot read",
    );
    let expected = format!(
        "cannot read {:?}: No such file or directory (os error 2)",
        fx.path("certs/nope.pem")
    );
    assert_eq!(error.message, expected);
    fx.rejects(
        &MINIMAL.replace("certs/site.key", "certs/nope.key"),
        "certificate[0].key",
        "No such file or directory",
    );
}

#[test]
fn broken_certificate_and_key_files() {
    let fx = Fixture::new("broken");
    // A certificate file with no certificate in it.
    write(&fx.path("certs/empty.pem"), "just some text\n");
    fx.rejects(
        &MINIMAL.replace("certs/site.pem", "certs/empty.pem"),
        "certificate[0].cert",
        "no certificate (\"BEGIN CERTIFICATE\" block) in",
    );
    // A key file that holds only a certificate.
    fx.rejects(
        &MINIMAL.replace("certs/site.key", "certs/site.pem"),
        "certificate[0].key",
        "no private key",
    );
    // A truncated PEM block.
    let truncated: String = fx.cert_pem.lines().take(3).collect::<Vec<_>>().join("\n");
    write(&fx.path("certs/truncated.pem"), &truncated);
    fx.rejects(
        &MINIMAL.replace("certs/site.pem", "certs/truncated.pem"),
        "certificate[0].cert",
        "bad PEM",
    );
    // A key that belongs to another certificate.
    write_cert(&fx.dir.0, "other", &["other.example"]);
    fx.rejects(
        &MINIMAL.replace("certs/site.key", "certs/other.key"),
        "certificate[0].key",
        "does not match the certificate",
    );
    // Two keys in one file are ambiguous.
    let key = std::fs::read_to_string(fx.path("certs/site.key")).expect("fixture key");
    let other = std::fs::read_to_string(fx.path("certs/other.key")).expect("fixture key");
    write(&fx.path("certs/two.key"), &format!("{key}{other}"));
    fx.rejects(
        &MINIMAL.replace("certs/site.key", "certs/two.key"),
        "certificate[0].key",
        "2 private keys in",
    );
    // One combined file for both (as hitch uses) is fine.
    write(
        &fx.path("certs/combined.pem"),
        &format!("{}{key}", fx.cert_pem),
    );
    let combined = MINIMAL
        .replace("certs/site.pem", "certs/combined.pem")
        .replace("certs/site.key", "certs/combined.pem");
    assert_eq!(fx.ok(&combined).certificates[0].names.len(), 2);
}

#[test]
fn bypass_listeners_also_answer_to_their_old_name() {
    let fx = Fixture::new("xdpalias");
    for name in ["bypass", "xdp"] {
        let text = MINIMAL.replace(
            "address = \"127.0.0.1:8443\"",
            &format!("address = \"127.0.0.1:8443\"\nmode = \"{name}\"\ninterface = \"lo\""),
        );
        assert_eq!(
            fx.ok(&text).listeners[0].mode,
            ListenerMode::Bypass,
            "mode = {name:?}"
        );
    }
}

#[test]
fn bypass_listeners_need_an_interface() {
    let fx = Fixture::new("xdp");
    let xdp = |extra: &str| {
        MINIMAL.replace(
            "address = \"127.0.0.1:8443\"",
            &format!("address = \"127.0.0.1:8443\"\nmode = \"bypass\"\n{extra}"),
        )
    };
    fx.rejects(
        &xdp(""),
        "listener[0].interface",
        "required when mode = \"bypass\"",
    );
    fx.rejects(
        &xdp("interface = \"a-very-long-name0\""),
        "listener[0].interface",
        "interface names have at most 15",
    );
    fx.rejects(
        &xdp("interface = \"eth/0\""),
        "listener[0].interface",
        "not a valid interface name",
    );
    assert_eq!(
        fx.ok(&xdp("interface = \"eth0\"")).listeners[0].interface,
        Some("eth0".to_owned())
    );
    // Two listeners on one interface share its XDP program, so one attach mode.
    let two = |second_interface: &str| {
        format!(
            "{}\n[[listener]]\naddress = \"127.0.0.1:9443\"\nmode = \"bypass\"\ninterface = \"{second_interface}\"\n",
            xdp("interface = \"eth0\"\nxdp_attach = \"skb\"")
        )
    };
    fx.rejects(
        &two("eth0"),
        "listener[1].xdp_attach",
        "\"auto\" conflicts with \"skb\" of listener[0]",
    );
    assert_eq!(fx.ok(&two("eth1")).listeners[1].xdp_attach, XdpAttach::Auto);
    // A kernel listener may name an interface: the XDP program (counters, blocklist) is
    // attached there while the kernel carries the connections.
    let kernel = fx.ok(&MINIMAL.replace("8443\"", "8443\"\ninterface = \"eth0\""));
    assert_eq!(kernel.listeners[0].mode, ListenerMode::Kernel);
    assert_eq!(kernel.listeners[0].interface, Some("eth0".to_owned()));
    fx.rejects(
        &MINIMAL.replace("8443\"", "8443\"\nxdp_attach = \"native\""),
        "listener[0].xdp_attach",
        "only valid with an interface",
    );
}

#[test]
fn xdp_table_defaults_and_bounds() {
    let fx = Fixture::new("xdptable");
    let c = fx.ok(MINIMAL);
    assert_eq!(c.xdp.frame_size, 2048);
    assert_eq!(c.xdp.frames_per_worker, 8192);
    assert_eq!(c.xdp.rx_ring, 2048);
    assert_eq!(c.xdp.idle_spin, Duration::from_micros(200));
    assert_eq!(c.xdp.hugepages, HugePages::Auto);
    assert_eq!(c.xdp.spin, crate::config::SpinMode::Adaptive);
    let with = |t: &str| format!("{MINIMAL}\n[xdp]\n{t}\n");
    let c = fx.ok(&with("spin = \"fixed\""));
    assert_eq!(c.xdp.spin, crate::config::SpinMode::Fixed);
    fx.rejects(&with("spin = \"sometimes\""), "xdp.spin", "unknown variant");
    let c = fx.ok(&with(
        "frame_size = 4096\nhugepages = \"off\"\nidle_spin_us = 0",
    ));
    assert_eq!((c.xdp.frame_size, c.xdp.hugepages), (4096, HugePages::Off));
    fx.rejects(
        &with("frame_size = 3000"),
        "xdp.frame_size",
        "must be 2048 or 4096",
    );
    fx.rejects(&with("rx_ring = 1000"), "xdp.rx_ring", "power of two");
    fx.rejects(&with("fill_ring = 32"), "xdp.fill_ring", "from 64 to 16384");
    fx.rejects(
        &with("frames_per_worker = 1024"),
        "xdp.frames_per_worker",
        "at least fill_ring + tx_ring (4096)",
    );
    fx.rejects(
        &with("idle_spin_us = 2000000"),
        "xdp.idle_spin_us",
        "at most 1000000",
    );
    fx.rejects(
        &with("hugepages = \"maybe\""),
        "xdp.hugepages",
        "unknown variant",
    );
    fx.rejects(&with("umem = 1"), "xdp.umem", "unknown field");
}

#[test]
fn at_most_one_default_certificate() {
    let fx = Fixture::new("defaults2");
    write_cert(&fx.dir.0, "other", &["other.example"]);
    let text = MINIMAL.replace("key = \"certs/site.key\"", "key = \"certs/site.key\"\ndefault = true")
        + "\n[[certificate]]\ncert = \"certs/other.pem\"\nkey = \"certs/other.key\"\ndefault = true\n";
    fx.rejects(
        &text,
        "certificate[1].default",
        "only one certificate may be the default; certificate[0] already is",
    );
}

#[test]
fn workers_and_cpus() {
    let available = [0, 1, 2, 3];
    let workers = |count: Option<usize>, cpus: Option<Vec<usize>>| {
        validate_workers(FileWorkers { count, cpus }, &available)
    };
    #[track_caller]
    fn rejected(result: Result<Workers, Invalid>, field: &str, fragment: &str) {
        match result {
            Ok(w) => panic!("expected an error on {field}, got {w:?}"),
            Err(e) => {
                assert_eq!(e.field, field, "wrong field in {e:?}");
                assert!(e.message.contains(fragment), "{e:?} lacks {fragment:?}");
            }
        }
    }

    assert_eq!(
        workers(Some(2), Some(vec![3, 1])).expect("valid pinning"),
        Workers {
            count: 2,
            cpus: vec![3, 1]
        }
    );
    assert_eq!(
        workers(None, Some(vec![2])).expect("count from cpus"),
        Workers {
            count: 1,
            cpus: vec![2]
        }
    );
    rejected(
        workers(Some(2), Some(vec![0])),
        "workers.cpus",
        "lists 1 CPU(s) but workers.count is 2",
    );
    rejected(
        workers(Some(2), Some(vec![1, 1])),
        "workers.cpus[1]",
        "CPU 1 is listed twice",
    );
    rejected(
        workers(Some(1), Some(vec![4])),
        "workers.cpus[0]",
        "CPU 4 is not available to this process (available: 0, 1, 2, 3)",
    );
    rejected(
        workers(Some(0), None),
        "workers.count",
        "must be at least 1",
    );
    rejected(
        workers(None, Some(vec![])),
        "workers.cpus",
        "must not be empty",
    );

    // Through the file, with this machine's CPUs.
    let fx = Fixture::new("cpus");
    fx.rejects(
        &minimal_with("[workers]\ncount = 2\ncpus = [0]"),
        "workers.cpus",
        "lists 1 CPU(s) but workers.count is 2",
    );
    fx.rejects(
        &minimal_with("[workers]\ncount = 1\ncpus = [100000]"),
        "workers.cpus[0]",
        "CPU 100000 is not available to this process",
    );
}

#[test]
fn tls_settings_are_checked() {
    let fx = Fixture::new("tls");
    fx.rejects(
        &minimal_with("[tls]\nversions = []"),
        "tls.versions",
        "at least one TLS version",
    );
    fx.rejects(
        &minimal_with("[tls]\nalpn = [\"h2\", \"\"]"),
        "tls.alpn[1]",
        "ALPN protocol ids are 1 to 255 bytes",
    );
    fx.rejects(
        &minimal_with(&format!("[tls]\nalpn = [\"{}\"]", "x".repeat(256))),
        "tls.alpn[0]",
        "is 256",
    );
    fx.rejects(
        &minimal_with("[tls]\nalpn = [\"h2\", \"h2\"]"),
        "tls.alpn[1]",
        "\"h2\" is listed twice",
    );
    let config = fx.ok(&minimal_with(
        "[tls]\nversions = [\"1.3\", \"1.3\"]\nsession_cache_entries = 0",
    ));
    assert_eq!(config.tls.versions, [TlsVersion::Tls13]);
    assert_eq!(config.tls.session_cache_entries, 0);

    fx.rejects(
        &minimal_with("[tls]\ncipher_suites = [\"TLS13_AES_128_GCM_SHA256\", \"RC4\"]"),
        "tls.cipher_suites[1]",
        "\"RC4\" is not a cipher suite tern supports",
    );
    fx.rejects(
        &minimal_with("[tls]\ncipher_suites = [\"TLS13_AES_128_GCM_SHA256\"]"),
        "tls.cipher_suites",
        "no suite for TLS 1.2",
    );
    fx.rejects(
        &minimal_with("[tls]\ngroups = [\"X25519\", \"ffdhe2048\"]"),
        "tls.groups[1]",
        "not a key-exchange group tern supports",
    );
    let config = fx.ok(&minimal_with(
        "[tls]\nversions = [\"1.3\"]\ncipher_suites = [\"TLS13_CHACHA20_POLY1305_SHA256\"]\n\
         groups = [\"X25519MLKEM768\"]\nstrict_sni = true",
    ));
    assert_eq!(
        config.tls.cipher_suites,
        Some(vec![rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256])
    );
    assert_eq!(
        config.tls.groups,
        Some(vec![rustls::NamedGroup::X25519MLKEM768])
    );
    assert!(config.tls.strict_sni);
}

#[test]
fn timeouts_and_limits_are_checked() {
    let fx = Fixture::new("limits");
    for field in ["handshake_ms", "idle_ms", "drain_ms"] {
        fx.rejects(
            &minimal_with(&format!("[timeouts]\n{field} = 0")),
            &format!("timeouts.{field}"),
            "must be greater than 0",
        );
    }
    fx.rejects(
        &MINIMAL.replace("servers = [", "connect_timeout_ms = 0\nservers = ["),
        "backend.connect_timeout_ms",
        "must be greater than 0",
    );
    fx.rejects(
        &minimal_with("[limits]\nbuffer_per_direction = 16383"),
        "limits.buffer_per_direction",
        "at least 16384",
    );
    fx.rejects(
        &minimal_with("[limits]\nmax_connections_per_worker = 0"),
        "limits.max_connections_per_worker",
        "must be at least 1",
    );
    fx.rejects(
        &minimal_with("[timeouts]\nidle_ms = 31536000001"),
        "timeouts.idle_ms",
        "more than a year",
    );
    fx.rejects(
        &minimal_with("[limits]\nbuffer_per_direction = 1073741825"),
        "limits.buffer_per_direction",
        "at most 1073741824",
    );
    fx.rejects(
        &minimal_with("[limits]\nmax_connections_per_worker = 16777217"),
        "limits.max_connections_per_worker",
        "at most 16777216",
    );
    fx.rejects(
        &minimal_with("[tls]\nsession_cache_entries = 16777217"),
        "tls.session_cache_entries",
        "at most 16777216",
    );
    fx.rejects(
        &minimal_with(&format!("[control]\nsocket = \"/{}\"", "s".repeat(107))),
        "control.socket",
        "a Unix socket path holds at most 107",
    );
}

#[test]
fn names_fall_back_to_the_common_name() {
    let fx = Fixture::new("cn");
    let key = rcgen::KeyPair::generate().expect("rcgen key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Legacy.Example.ORG");
    let cert = params.self_signed(&key).expect("self-signed");
    write(&fx.path("certs/cn.pem"), &cert.pem());
    write(&fx.path("certs/cn.key"), &key.serialize_pem());
    let text = MINIMAL
        .replace("certs/site.pem", "certs/cn.pem")
        .replace("certs/site.key", "certs/cn.key");
    assert_eq!(fx.ok(&text).certificates[0].names, ["legacy.example.org"]);
}

#[test]
fn line_column_counts_characters() {
    assert_eq!(line_column("abc", 0), (1, 1));
    assert_eq!(line_column("a\nbc", 3), (2, 2));
    assert_eq!(line_column("é\néx", 5), (2, 2));
    assert_eq!(line_column("ab", 99), (1, 3));
}

#[test]
fn the_documented_examples_parse() {
    // Keeps docs/configuration.md honest: every ```toml block there (the complete example, the
    // minimal one, and whole-file examples of features) must be accepted by the parser
    // (validation needs real certificate files, so it stops at `FileConfig`).
    let doc = include_str!("../../../docs/configuration.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|rest| {
            rest.split("```")
                .next()
                .expect("split yields at least one part")
        })
        .collect();
    assert!(
        blocks.len() >= 2,
        "expected at least the complete and the minimal example"
    );
    for block in blocks {
        let file = FileConfig::parse(Path::new("docs/configuration.md"), block)
            .unwrap_or_else(|e| panic!("documented example rejected: {e}\n{block}"));
        assert!(!file.listener.is_empty() && !file.certificate.is_empty());
        assert!(file.backend.is_some(), "the examples have a [backend]");
    }
}

#[test]
fn plain_listeners_need_no_certificate() {
    let fx = Fixture::new("plain");
    let config = fx.ok(r#"
[[listener]]
address = "0.0.0.0:7000"
tls = false

[[listener]]
address = "10.0.0.1:7001"
mode = "bypass"
interface = "veth0"
tls = false

[backend]
servers = ["127.0.0.1:8080"]
"#);
    assert!(config.listeners.iter().all(|l| !l.tls));
    assert!(config.certificates.is_empty());
    assert!(config.default_certificate().is_none());
    // One TLS listener brings the requirement back.
    fx.rejects(
        r#"
[[listener]]
address = "0.0.0.0:7000"
tls = false

[[listener]]
address = "0.0.0.0:7443"

[backend]
servers = ["127.0.0.1:8080"]
"#,
        "certificate",
        "a listener terminates TLS",
    );
    fx.rejects(
        &minimal_with("").replacen("address = ", "tls = \"no\"\naddress = ", 1),
        "listener[0].tls",
        "expected true or false",
    );
}

#[test]
fn tcp_table_defaults_and_bounds() {
    let fx = Fixture::new("tcp");
    let tcp = fx.ok(MINIMAL).tcp;
    assert_eq!(
        tcp,
        TcpSettings {
            congestion: Congestion::Cubic,
            mss: None,
            recv_buffer: 128 * 1024,
            send_buffer: 128 * 1024,
            nagle: false,
            keepalive: None,
            rx_checksum: RxChecksum::Auto,
            fin_timeout: Duration::from_secs(60),
            max_orphans: 2_500,
        }
    );
    for (text, value) in [
        ("auto", RxChecksum::Auto),
        ("verify", RxChecksum::Verify),
        ("skip", RxChecksum::Skip),
    ] {
        let tcp = fx
            .ok(&minimal_with(&format!("[tcp]\nrx_checksum = \"{text}\"")))
            .tcp;
        assert_eq!(tcp.rx_checksum, value, "rx_checksum = {text:?}");
    }
    fx.rejects(
        &minimal_with("[tcp]\nrx_checksum = \"partial\""),
        "tcp.rx_checksum",
        "unknown variant",
    );
    let tcp = fx
        .ok(&minimal_with(
            "[tcp]\ncongestion = \"newreno\"\nmss = 1400\nkeepalive_ms = 60000\nrx_checksum = \"skip\"\nnagle = true",
        ))
        .tcp;
    assert_eq!(tcp.congestion, Congestion::NewReno);
    assert_eq!(tcp.mss, Some(1400));
    assert_eq!(tcp.keepalive, Some(Duration::from_secs(60)));
    assert_eq!(tcp.rx_checksum, RxChecksum::Skip);
    assert!(tcp.nagle);
    fx.rejects(
        &minimal_with("[tcp]\nmss = 100"),
        "tcp.mss",
        "from 536 to 9000",
    );
    // 2048-byte frames (the default) cannot hold a 4000-byte segment.
    fx.rejects(
        &minimal_with("[tcp]\nmss = 4000"),
        "tcp.mss",
        "2048-byte frame",
    );
    fx.ok(&minimal_with("[tcp]\nmss = 3900\n[xdp]\nframe_size = 4096"));
    fx.rejects(
        &minimal_with("[tcp]\nrecv_buffer = 100"),
        "tcp.recv_buffer",
        "from 4096",
    );
    fx.rejects(
        &minimal_with("[tcp]\ncongestion = \"bbr\""),
        "tcp.congestion",
        "unknown variant",
    );
}

#[test]
fn tcp_orphan_bounds() {
    let fx = Fixture::new("tcp-orphans");
    let tcp = fx
        .ok(&minimal_with(
            "[tcp]\nfin_timeout_ms = 5000\nmax_orphans = 0\n[limits]\nmax_connections_per_worker = 10",
        ))
        .tcp;
    assert_eq!(tcp.fin_timeout, Duration::from_secs(5));
    assert_eq!(tcp.max_orphans, 0, "0: every release resets");
    // The default follows the slots: a quarter, rounded up (never 0 by default).
    let tcp = fx
        .ok(&minimal_with("[limits]\nmax_connections_per_worker = 3"))
        .tcp;
    assert_eq!(tcp.max_orphans, 1);
    fx.ok(&minimal_with(
        "[tcp]\nmax_orphans = 10\n[limits]\nmax_connections_per_worker = 10",
    ));
    fx.rejects(
        &minimal_with("[tcp]\nmax_orphans = 11\n[limits]\nmax_connections_per_worker = 10"),
        "tcp.max_orphans",
        "more than limits.max_connections_per_worker (10)",
    );
    fx.rejects(
        &minimal_with("[tcp]\nmax_orphans = -1"),
        "tcp.max_orphans",
        "invalid value",
    );
    fx.rejects(
        &minimal_with("[tcp]\nfin_timeout_ms = 0"),
        "tcp.fin_timeout_ms",
        "greater than 0",
    );
    fx.rejects(
        &minimal_with("[tcp]\nfin_timeout_ms = 31536000001"),
        "tcp.fin_timeout_ms",
        "more than a year",
    );
}

#[test]
fn backend_servers_weights_balance_and_health_are_checked() {
    let fx = Fixture::new("health");
    let servers = |list: &str| MINIMAL.replace("[\"127.0.0.1:8080\"]", list);
    fx.rejects(
        &servers("[{ address = \"127.0.0.1:8080\", weight = 0 }]"),
        "backend.servers[0].weight",
        "0 is out of range: 1 to 256",
    );
    fx.rejects(
        &servers("[\"127.0.0.1:8080\", { address = \"127.0.0.1:8081\", weight = 257 }]"),
        "backend.servers[1].weight",
        "257 is out of range",
    );
    fx.rejects(
        &servers("[{ address = \"127.0.0.1:8080\", wieght = 2 }]"),
        "backend.servers[0].wieght",
        "unknown field `wieght`, expected `address` or `weight`",
    );
    fx.rejects(
        &servers("[{ weight = 2 }]"),
        "backend.servers[0]",
        "missing field `address`",
    );
    fx.rejects(
        &servers("[{ address = \"127.0.0.1\" }]"),
        "backend.servers[0]",
        "invalid socket address",
    );
    fx.rejects(
        &servers("[\"127.0.0.1:8080\", { address = \"127.0.0.1:8080\", weight = 2 }]"),
        "backend.servers[1]",
        "127.0.0.1:8080 is already backend.servers[0]",
    );
    fx.rejects(
        &format!("{MINIMAL}balance = \"random\"\n"),
        "backend.balance",
        "unknown variant `random`",
    );
    let health = |lines: &str| format!("{MINIMAL}\n[backend.health]\n{lines}\n");
    fx.rejects(
        &health("fall = 0"),
        "backend.health.fall",
        "0 is out of range: 1 to 100",
    );
    fx.rejects(
        &health("rise = 101"),
        "backend.health.rise",
        "101 is out of range",
    );
    fx.rejects(
        &health("timeout_ms = 0"),
        "backend.health.timeout_ms",
        "greater than 0",
    );
    fx.rejects(
        &health("interval = 5"),
        "backend.health.interval",
        "unknown field",
    );
    let off = fx.ok(&health("interval_ms = 0\ntimeout_ms = 250\nrise = 3"));
    assert_eq!(off.backend.health.interval, None, "0: passive health only");
    assert_eq!(off.backend.health.timeout, Duration::from_millis(250));
    assert_eq!(off.backend.health.rise, 3);
    let weighted = fx.ok(&servers(
        "[\"127.0.0.1:8080\", { address = \"127.0.0.1:8081\", weight = 256 }]",
    ));
    assert_eq!(weighted.backend.servers[1].weight, 256);
}

#[test]
fn process_user_and_group() {
    let fx = Fixture::new("process");
    assert_eq!(
        fx.ok(MINIMAL).process,
        Process::default(),
        "no switch by default"
    );
    let process = |table: &str| {
        fx.ok(&minimal_with(&format!("[process]\n{table}")))
            .process
            .run_as
            .expect("a user to switch to")
    };
    let nobody = process("user = \"nobody\"");
    assert_eq!((nobody.user.as_str(), nobody.uid), ("nobody", 65534));
    assert_eq!(nobody.gid, 65534, "the user's primary group");
    assert!(nobody.groups.contains(&nobody.gid), "{:?}", nobody.groups);
    let by_id = process("user = 65534\ngroup = \"root\"");
    assert_eq!(
        (by_id.user.as_str(), by_id.uid, by_id.gid),
        ("nobody", 65534, 0),
        "a numeric uid finds its name; an explicit group wins"
    );
    let unnamed = process("user = 4000123\ngroup = 4000124");
    assert_eq!(
        (
            unnamed.user.as_str(),
            unnamed.uid,
            unnamed.gid,
            unnamed.groups
        ),
        ("4000123", 4000123, 4000124, vec![4000124]),
        "a uid without a passwd entry runs in its group only"
    );

    for (table, field, fragment) in [
        (
            "user = \"no-such-user-tern\"",
            "process.user",
            "no user named \"no-such-user-tern\"",
        ),
        ("user = \"root\"", "process.user", "root (uid 0)"),
        ("user = 0", "process.user", "root (uid 0)"),
        ("user = 4294967295", "process.user", "reserved"),
        ("user = 4000123", "process.group", "has no passwd entry"),
        (
            "user = \"nobody\"\ngroup = \"no-such-group-tern\"",
            "process.group",
            "no group named",
        ),
        ("group = \"nogroup\"", "process.group", "needs process.user"),
        ("uid = 1", "process.uid", "unknown field"),
    ] {
        fx.rejects(
            &minimal_with(&format!("[process]\n{table}")),
            field,
            fragment,
        );
    }
}

#[test]
fn access_log_is_off_by_default_and_its_path_resolves_against_the_file() {
    let f = Fixture::new("access-log");
    assert_eq!(f.ok(MINIMAL).access_log, None);
    let c = f.ok(&format!(
        "{MINIMAL}\n[access_log]\npath = \"logs/access.log\"\nbuffer_lines = 8\nflush_ms = 20\n"
    ));
    assert_eq!(
        c.access_log,
        Some(AccessLogSettings {
            path: f.path("logs/access.log"),
            buffer_lines: 8,
            flush: Duration::from_millis(20),
        })
    );
    let c = f.ok(&format!(
        "{MINIMAL}\n[access_log]\npath = \"/var/log/a.log\"\n"
    ));
    let settings = c.access_log.expect("on");
    assert_eq!(settings.buffer_lines, DEFAULT_ACCESS_LOG_BUFFER_LINES);
    assert_eq!(
        settings.flush,
        Duration::from_millis(DEFAULT_ACCESS_LOG_FLUSH_MS)
    );
    f.rejects(
        &format!("{MINIMAL}\n[access_log]\npath = \"\"\n"),
        "access_log.path",
        "must not be empty",
    );
    f.rejects(
        &format!("{MINIMAL}\n[access_log]\npath = \"a.log\"\nbuffer_lines = 0\n"),
        "access_log.buffer_lines",
        "out of range",
    );
    f.rejects(
        &format!("{MINIMAL}\n[access_log]\npath = \"a.log\"\nflush_ms = 5000\n"),
        "access_log.flush_ms",
        "out of range",
    );
}

#[test]
fn ticket_keys_file_is_read_and_checked() {
    use crate::tls::ticket_keys::{generate, KEY_LEN};
    let fx = Fixture::new("ticket-keys");
    let (a, b) = (
        generate().expect("key").to_line(),
        generate().expect("key").to_line(),
    );
    write(&fx.path("keys"), &format!("# fleet\n{a}\n\n{b}\n"));
    let config = fx.ok(&minimal_with("[tls]\nticket_keys = \"keys\""));
    let keys = config.tls.ticket_keys.expect("ticket_keys");
    assert_eq!(keys.path, fx.path("keys"), "relative to the configuration");
    assert_eq!(keys.keys.len(), 2);
    assert_eq!(keys.keys[0].to_line(), a, "the first line encrypts");

    write(&fx.path("short"), &format!("{a}\n{}\n", "QUJD"));
    fx.rejects(
        &minimal_with("[tls]\nticket_keys = \"short\""),
        "tls.ticket_keys",
        &format!("short: line 2: a key is {KEY_LEN} bytes"),
    );
    write(&fx.path("empty"), "# nothing yet\n");
    fx.rejects(
        &minimal_with("[tls]\nticket_keys = \"empty\""),
        "tls.ticket_keys",
        "empty: no key in the file",
    );
    fx.rejects(
        &minimal_with("[tls]\nticket_keys = \"missing\""),
        "tls.ticket_keys",
        "missing: cannot read",
    );
    fx.rejects(
        &minimal_with("[tls]\ntickets = false\nticket_keys = \"keys\""),
        "tls.ticket_keys",
        "tls.tickets is false",
    );
}

#[test]
fn session_cache_redis_is_checked_and_needs_no_running_server() {
    let fx = Fixture::new("scache-redis");
    let c = fx.ok(&minimal_with(
        "[session_cache]\nredis = \"redis://127.0.0.1:1\"\ntimeout_ms = 50",
    ));
    let redis = c.session_cache.redis.expect("redis settings");
    assert_eq!(redis.timeout, std::time::Duration::from_millis(50));
    let c = fx.ok(&minimal_with(
        "[session_cache]\nredis = \"redis://:hunter2@10.0.0.9:6379/2\"",
    ));
    let redis = c.session_cache.redis.as_ref().expect("redis settings");
    assert_eq!(redis.timeout, crate::session_cache::DEFAULT_REDIS_TIMEOUT);
    assert!(
        !format!("{:?}", c.session_cache).contains("hunter2"),
        "the password never reaches Debug"
    );
    fx.rejects(
        &minimal_with("[session_cache]\nredis = \"http://example.test\""),
        "session_cache.redis",
        "is not a Redis URL",
    );
    fx.rejects(
        &minimal_with("[session_cache]\nredis = \"redis://127.0.0.1:6379\"\ntimeout_ms = 0"),
        "session_cache.timeout_ms",
        "out of range",
    );
    fx.rejects(
        &minimal_with("[session_cache]\ntimeout_ms = 5"),
        "session_cache.timeout_ms",
        "applies to Redis only",
    );
}
