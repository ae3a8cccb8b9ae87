//! Configuration files for every bench target and for the shared backend, as text.
//!
//! Owns: what each peer is told so that the comparison is like for like — TLS 1.3 only, X25519
//! only, TLS_AES_128_GCM_SHA256 only, the same ECDSA P-256 certificate, ALPN `http/1.1`, one
//! worker (process or thread) on the target core, a listen backlog of [`BACKLOG`], session
//! resumption by each server's own mechanism at its defaults, and the same plain HTTP/1.1
//! backend. Resumption, used only by the resumed figure (new-connection mode never offers a
//! session): every peer issues stateless TLS 1.3 tickets with a key of its own process —
//! tern through rustls's ticketer; hitch and nginx through OpenSSL's default (tickets on,
//! `SSL_OP_NO_TICKET` never set; nginx's `ssl_session_tickets` defaults to on); haproxy with
//! `tls-tickets` on by default (no `no-tls-tickets` on the bind line) plus its shared session
//! cache (`tune.ssl.cachesize`, 20,000 by default). The bench's tern-load counts every
//! connection that did not resume, and the report prints that count. Does not own:
//! starting the processes or checking the files (the bench runs each peer's own checker —
//! `hitch --test`, `haproxy -c`, `nginx -t`, `tern check-config` — inside the server namespace
//! before measuring, see [`super::targets`]).
//!
//! Peers' documentation: hitch.conf(5) (1.7), the HAProxy 2.6 configuration manual (`bind`
//! options `ssl crt curves alpn`, `ssl-default-bind-ciphersuites`, `cpu-map`), nginx's
//! `ngx_stream_ssl_module` and `ngx_stream_proxy_module`, `worker_cpu_affinity`.
//!
//! nginx is configured as an L4 TLS terminator (`stream` module) like the others, not as an HTTP
//! reverse proxy: every target then does the same job — decrypt, copy bytes to the backend,
//! encrypt the reply — and none parses HTTP.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

/// Listen backlog for every target that lets us set it (tern's is its own default).
pub const BACKLOG: u32 = 1024;
/// The TLS 1.3 suite every target is restricted to (and the floors are measured for).
pub const CIPHERSUITE: &str = "TLS_AES_128_GCM_SHA256";
/// The only key-exchange group.
pub const GROUP: &str = "X25519";
/// Where Debian's `libnginx-mod-stream` puts the stream module.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A path that cannot be written into a config file as is.
#[derive(Debug, thiserror::Error)]
#[error("path {0} contains whitespace, quotes, `;`, `#`, `{{` or `}}`; set TMPDIR to a plain path")]
pub struct UnsafePath(pub PathBuf);

/// Everything a target's config needs to know.
#[derive(Debug, Clone)]
pub struct TargetLayout {
    /// The TLS listener (server veth address, port 443).
    pub listen: SocketAddrV4,
    /// The plain HTTP backend.
    pub backend: SocketAddrV4,
    /// PEM certificate and key (tern, nginx) and both in one file (hitch, haproxy).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub combined_pem: PathBuf,
    /// A private directory for pid files, logs, sockets and temp files.
    pub dir: PathBuf,
    /// The CPU the target's one worker runs on.
    pub cpu: usize,
    /// Connection limit where the target has one (sized to the file-descriptor limit).
    pub max_connections: u32,
}

/// Everything the backend's config needs to know.
#[derive(Debug, Clone)]
pub struct BackendLayout {
    pub listen: SocketAddrV4,
    /// Served as the document root: holds `bytes/1024` and `bytes/1048576`.
    pub root: PathBuf,
    pub dir: PathBuf,
    pub cpu: usize,
}

fn plain(path: &Path) -> Result<String, UnsafePath> {
    let s = path.to_string_lossy();
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | ';' | '#' | '{' | '}' | '\\'))
    {
        return Err(UnsafePath(path.to_path_buf()));
    }
    Ok(s.into_owned())
}

/// nginx's `worker_cpu_affinity` bit mask for one CPU: CPU 0 → `1`, CPU 2 → `100`.
pub fn nginx_cpu_mask(cpu: usize) -> String {
    format!("1{}", "0".repeat(cpu))
}

/// The `[xdp]` table of every bench config with a bypass (`mode = "bypass"`) listener: 4 KiB
/// pages, because a bench must not leave hugepages reserved on the machine (`auto` would raise
/// `vm.nr_hugepages` and keep them); the other AF_XDP settings (`frames_per_worker`, rings) stay
/// at tern's defaults, as in `cargo xtask bench tcp`.
pub const BYPASS_XDP_TABLE: &str = "[xdp]\nhugepages = \"off\"\n";

/// The listener lines of a bypass listener on `iface` (the rig's server-side veth: the XDP
/// program only sees frames that cross it).
pub fn bypass_listener_lines(iface: &str) -> String {
    format!("mode = \"bypass\"\ninterface = \"{iface}\"\n")
}

/// tern, kernel mode, one worker pinned to `cpu`.
pub fn tern(l: &TargetLayout) -> Result<String, UnsafePath> {
    tern_with(l, "mode = \"kernel\"\n", None, "")
}

/// tern, bypass mode: the same certificate, TLS settings, backend and worker pinning as
/// [`tern`], but the listener is `mode = "bypass"` on `iface` with `tls = true`, served by one
/// bypass worker (its own TCP stack on AF_XDP) on `cpu`. `max_connections` is the stack's slab
/// capacity (`limits.max_connections_per_worker`): slots are preallocated, so it is sized to
/// what the bench needs (idle connections and TIME-WAIT), not to the fd limit. `iface` comes
/// from the rig (`tn-…` names); `tern check-config` validates it.
pub fn tern_bypass(l: &TargetLayout, iface: &str) -> Result<String, UnsafePath> {
    tern_bypass_idle(l, iface, None)
}

/// [`tern_bypass`] with `timeouts.idle_ms` set when `idle_ms` is given (`bench million`
/// holds connections longer than the default 300 s).
pub fn tern_bypass_idle(
    l: &TargetLayout,
    iface: &str,
    idle_ms: Option<u64>,
) -> Result<String, UnsafePath> {
    let listener = format!("{}tls = true\n", bypass_listener_lines(iface));
    tern_with(l, &listener, idle_ms, &format!("\n{BYPASS_XDP_TABLE}"))
}

fn tern_with(
    l: &TargetLayout,
    listener: &str,
    idle_ms: Option<u64>,
    tail: &str,
) -> Result<String, UnsafePath> {
    Ok(format!(
        "# Written by `cargo xtask bench`.\n\
         [[listener]]\n\
         address = \"{listen}\"\n\
         {listener}\n\
         [[certificate]]\n\
         cert = \"{cert}\"\n\
         key = \"{key}\"\n\n\
         [tls]\n\
         alpn = [\"http/1.1\"]\n\
         versions = [\"1.3\"]\n\n\
         [backend]\n\
         servers = [\"{backend}\"]\n\n\
         [workers]\n\
         count = 1\n\
         cpus = [{cpu}]\n\n\
         [limits]\n\
         max_connections_per_worker = {max}\n\n\
         [timeouts]\n\
         drain_ms = 1000\n\
         {idle}\n\
         [control]\n\
         socket = \"{socket}\"\n\
         {tail}",
        idle = idle_ms.map_or(String::new(), |ms| format!("idle_ms = {ms}\n")),
        listen = l.listen,
        cert = plain(&l.cert)?,
        key = plain(&l.key)?,
        backend = l.backend,
        cpu = l.cpu,
        max = l.max_connections,
        socket = plain(&l.dir.join("tern.sock"))?,
    ))
}

/// hitch: `workers = 1` (plus its manager process; the bench pins both with taskset).
pub fn hitch(l: &TargetLayout) -> Result<String, UnsafePath> {
    Ok(format!(
        "# Written by `cargo xtask bench`.\n\
         frontend = \"[{ip}]:{port}\"\n\
         backend = \"[{bip}]:{bport}\"\n\
         pem-file = \"{pem}\"\n\
         workers = 1\n\
         daemon = off\n\
         # hitch refuses to run its workers as root; the manager loads the key before dropping.\n\
         user = \"nobody\"\n\
         group = \"nogroup\"\n\
         syslog = off\n\
         tls-protos = TLSv1.3\n\
         ciphersuites = \"{CIPHERSUITE}\"\n\
         ecdh-curve = \"{GROUP}\"\n\
         alpn-protos = \"http/1.1\"\n\
         ocsp-dir = \"{ocsp}\"\n\
         backlog = {BACKLOG}\n\
         keepalive = 3600\n",
        ip = l.listen.ip(),
        port = l.listen.port(),
        bip = l.backend.ip(),
        bport = l.backend.port(),
        pem = plain(&l.combined_pem)?,
        ocsp = plain(&l.dir.join("ocsp"))?,
    ))
}

/// haproxy: `mode tcp`, one thread mapped to `cpu`.
pub fn haproxy(l: &TargetLayout) -> Result<String, UnsafePath> {
    Ok(format!(
        "# Written by `cargo xtask bench`.\n\
         global\n\
         \x20   nbthread 1\n\
         \x20   cpu-map 1/1 {cpu}\n\
         \x20   maxconn {max}\n\
         \x20   pidfile {pid}\n\
         \x20   ssl-default-bind-ciphersuites {CIPHERSUITE}\n\
         \x20   ssl-default-bind-options ssl-min-ver TLSv1.3\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   maxconn {max}\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 300s\n\
         \x20   timeout server 300s\n\
         \n\
         frontend tls\n\
         \x20   bind {listen} ssl crt {pem} alpn http/1.1 curves {GROUP} backlog {BACKLOG}\n\
         \x20   default_backend plain\n\
         \n\
         backend plain\n\
         \x20   server backend1 {backend}\n",
        cpu = l.cpu,
        max = l.max_connections,
        pid = plain(&l.dir.join("haproxy.pid"))?,
        listen = l.listen,
        pem = plain(&l.combined_pem)?,
        backend = l.backend,
    ))
}

/// Lines every nginx config shares: foreground master + one worker pinned to `cpu`.
fn nginx_main(dir: &Path, name: &str, cpu: usize) -> Result<String, UnsafePath> {
    Ok(format!(
        "# Written by `cargo xtask bench`.\n\
         daemon off;\n\
         master_process on;\n\
         # Root workers read the bench's private temp files without any chown.\n\
         user root;\n\
         worker_processes 1;\n\
         worker_cpu_affinity {mask};\n\
         worker_rlimit_nofile 20000;\n\
         pid {pid};\n\
         error_log {log} warn;\n\
         events {{\n\
         \x20   worker_connections 19000;\n\
         }}\n",
        mask = nginx_cpu_mask(cpu),
        pid = plain(&dir.join(format!("{name}.pid")))?,
        log = plain(&dir.join(format!("{name}.error.log")))?,
    ))
}

/// nginx as the TLS terminator: `stream` server with `ssl`, proxying to the backend.
pub fn nginx_tls(l: &TargetLayout) -> Result<String, UnsafePath> {
    Ok(format!(
        "load_module {NGINX_STREAM_MODULE};\n\
         {main}\
         stream {{\n\
         \x20   server {{\n\
         \x20       listen {listen} ssl backlog={BACKLOG};\n\
         \x20       ssl_certificate {cert};\n\
         \x20       ssl_certificate_key {key};\n\
         \x20       ssl_protocols TLSv1.3;\n\
         \x20       ssl_ecdh_curve {GROUP};\n\
         \x20       ssl_conf_command Ciphersuites {CIPHERSUITE};\n\
         \x20       ssl_alpn http/1.1;\n\
         \x20       proxy_pass {backend};\n\
         \x20       proxy_connect_timeout 5s;\n\
         \x20       proxy_timeout 300s;\n\
         \x20   }}\n\
         }}\n",
        main = nginx_main(&l.dir, "nginx-tls", l.cpu)?,
        listen = l.listen,
        cert = plain(&l.cert)?,
        key = plain(&l.key)?,
        backend = l.backend,
    ))
}

/// nginx as the plain HTTP/1.1 backend: static files, keep-alive without a request limit.
pub fn nginx_backend(b: &BackendLayout) -> Result<String, UnsafePath> {
    let tmp = |name: &str| plain(&b.dir.join("tmp").join(name));
    Ok(format!(
        "{main}\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {body};\n\
         \x20   proxy_temp_path {proxy};\n\
         \x20   fastcgi_temp_path {fastcgi};\n\
         \x20   uwsgi_temp_path {uwsgi};\n\
         \x20   scgi_temp_path {scgi};\n\
         \x20   sendfile on;\n\
         \x20   tcp_nopush on;\n\
         \x20   keepalive_timeout 300s;\n\
         \x20   # A proxy keeps one backend connection per client connection: never close it\n\
         \x20   # after N requests (nginx's default is 1000), or keep-alive runs would measure\n\
         \x20   # reconnects.\n\
         \x20   keepalive_requests 1000000000;\n\
         \x20   default_type application/octet-stream;\n\
         \x20   server {{\n\
         \x20       listen {listen} backlog=4096;\n\
         \x20       root {root};\n\
         \x20       location / {{ }}\n\
         \x20   }}\n\
         }}\n",
        main = nginx_main(&b.dir, "nginx-backend", b.cpu)?,
        body = tmp("body")?,
        proxy = tmp("proxy")?,
        fastcgi = tmp("fastcgi")?,
        uwsgi = tmp("uwsgi")?,
        scgi = tmp("scgi")?,
        listen = b.listen,
        root = plain(&b.root)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn layout() -> TargetLayout {
        TargetLayout {
            listen: SocketAddrV4::new(Ipv4Addr::new(10, 201, 3, 1), 443),
            backend: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080),
            cert: PathBuf::from("/tmp/b/site.pem"),
            key: PathBuf::from("/tmp/b/site.key"),
            combined_pem: PathBuf::from("/tmp/b/site.combined.pem"),
            dir: PathBuf::from("/tmp/b/t"),
            cpu: 0,
            max_connections: 9900,
        }
    }

    #[test]
    fn tern_config_parses_with_terns_own_loader() {
        // The real validation (`tern check-config`, which also reads the cert files) runs in
        // the bench; here: the TOML is well-formed and carries the pinning.
        let text = tern(&layout()).expect("plain paths");
        let value: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        let workers = value["workers"].as_table().expect("[workers]");
        assert_eq!(workers["count"].as_integer(), Some(1));
        assert_eq!(
            workers["cpus"].as_array().map(|a| a.len()),
            Some(1),
            "{text}"
        );
        assert_eq!(
            value["listener"][0]["address"].as_str(),
            Some("10.201.3.1:443")
        );
        assert_eq!(value["tls"]["versions"][0].as_str(), Some("1.3"));
        assert_eq!(
            value["backend"]["servers"][0].as_str(),
            Some("127.0.0.1:8080")
        );
    }

    #[test]
    fn tern_bypass_config_differs_from_kernel_only_in_listener_and_xdp() {
        let mut l = layout();
        l.max_connections = 131_072;
        let text = tern_bypass(&l, "tn-bench-s-1").expect("plain paths");
        let value: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        let listener = &value["listener"][0];
        assert_eq!(listener["mode"].as_str(), Some("bypass"), "{text}");
        assert_eq!(listener["interface"].as_str(), Some("tn-bench-s-1"));
        assert_eq!(listener["tls"].as_bool(), Some(true));
        assert_eq!(listener["address"].as_str(), Some("10.201.3.1:443"));
        assert_eq!(value["xdp"]["hugepages"].as_str(), Some("off"));
        assert_eq!(
            value["limits"]["max_connections_per_worker"].as_integer(),
            Some(131_072)
        );
        assert_eq!(value["workers"]["cpus"][0].as_integer(), Some(0));
        // Everything else is the kernel target's config, line for line.
        let kernel = tern(&l).expect("plain paths");
        let strip = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|x| {
                    !x.starts_with("mode =")
                        && !x.starts_with("interface =")
                        && !x.starts_with("tls =")
                        && !x.starts_with("hugepages =")
                        && *x != "[xdp]"
                        && !x.is_empty()
                })
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(strip(&text), strip(&kernel), "{text}\n---\n{kernel}");
        let kv: toml::Table = kernel.parse().unwrap_or_else(|e| panic!("{e}\n{kernel}"));
        assert_eq!(kv["listener"][0]["mode"].as_str(), Some("kernel"));
        assert!(!kv.contains_key("xdp"), "{kernel}");
    }

    #[test]
    fn hitch_config_pins_one_worker_and_tls13() {
        let text = hitch(&layout()).expect("plain paths");
        for line in [
            "frontend = \"[10.201.3.1]:443\"",
            "backend = \"[127.0.0.1]:8080\"",
            "workers = 1",
            "daemon = off",
            "user = \"nobody\"",
            "tls-protos = TLSv1.3",
            "ciphersuites = \"TLS_AES_128_GCM_SHA256\"",
            "ecdh-curve = \"X25519\"",
            "pem-file = \"/tmp/b/site.combined.pem\"",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn haproxy_config_is_tcp_mode_with_ssl_bind() {
        let text = haproxy(&layout()).expect("plain paths");
        for line in [
            "    nbthread 1",
            "    cpu-map 1/1 0",
            "    mode tcp",
            "    bind 10.201.3.1:443 ssl crt /tmp/b/site.combined.pem alpn http/1.1 curves X25519 backlog 1024",
            "    server backend1 127.0.0.1:8080",
            "    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn nginx_configs() {
        let mut l = layout();
        l.cpu = 2;
        let text = nginx_tls(&l).expect("plain paths");
        assert!(text.starts_with("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"));
        for line in [
            "worker_processes 1;",
            "worker_cpu_affinity 100;",
            "        listen 10.201.3.1:443 ssl backlog=1024;",
            "        ssl_protocols TLSv1.3;",
            "        ssl_ecdh_curve X25519;",
            "        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;",
            "        ssl_alpn http/1.1;",
            "        proxy_pass 127.0.0.1:8080;",
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count());

        let b = BackendLayout {
            listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080),
            root: PathBuf::from("/tmp/b/www"),
            dir: PathBuf::from("/tmp/b/backend"),
            cpu: 1,
        };
        let text = nginx_backend(&b).expect("plain paths");
        for line in [
            "worker_cpu_affinity 10;",
            "        listen 127.0.0.1:8080 backlog=4096;",
            "        root /tmp/b/www;",
            "    keepalive_requests 1000000000;",
            "    client_body_temp_path /tmp/b/backend/tmp/body;",
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("load_module") && !text.contains("ssl"),
            "the backend is plain HTTP:\n{text}"
        );
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let mut l = layout();
        l.combined_pem = PathBuf::from("/tmp/my dir/site.pem");
        assert!(hitch(&l).is_err());
        l.combined_pem = PathBuf::from("/tmp/x;y.pem");
        assert!(haproxy(&l).is_err());
        assert_eq!(nginx_cpu_mask(0), "1");
        assert_eq!(nginx_cpu_mask(1), "10");
    }
}
