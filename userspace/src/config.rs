//! tern's configuration: the TOML file an operator writes (`FileConfig`), and the validated,
//! fully-resolved form the daemon runs with (`Config`).
//!
//! Flow: `FileConfig` (serde, `deny_unknown_fields`, defaults) → `validate()` → `Config`.
//! Every error names the file and the field (`listener[0].address`) and says what was wrong;
//! tern does not start on an invalid file. Certificate and key files are read and parsed during
//! validation so that a missing or broken file is reported here, not at the first handshake.
//! The operator's reference for every field is `docs/configuration.md`; keep the two in step.
//!
//! This module owns parsing and validation only; building the rustls configuration from the
//! validated certificates is `tls`'s job, pinning workers to CPUs is the worker's. The syntax
//! is TOML 1.1 (as the `toml` crate reads it); ALPN ids follow RFC 7301 §3.1 (1–255 bytes),
//! server names RFC 6066 §3 (DNS host names, matched case-insensitively), and a `*.` wildcard
//! covers exactly one label (RFC 6125 §6.4.3).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use serde::Deserialize;

#[cfg(test)]
mod tests;

/// Where a listener's packets come from. File syntax: `"kernel"` | `"bypass"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Ordinary kernel socket (SO_REUSEPORT, one per worker). With an `interface`, tern also
    /// attaches its XDP program there (counters and the source blocklist) while the kernel
    /// still carries the connections.
    Kernel,
    /// The bypass path: the XDP program on `interface` steers this address's TCP frames into
    /// per-queue AF_XDP sockets owned by tern's workers; the kernel's TCP stack never sees them.
    /// `"xdp"`, its name before, is accepted too.
    #[serde(alias = "xdp")]
    Bypass,
}

/// XDP attach mode for `mode = "bypass"` listeners. File syntax: `"auto"` | `"native"` | `"skb"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttach {
    /// Try native (driver) mode, fall back to SKB (generic) mode with a warning.
    Auto,
    /// Driver mode only; attaching fails if the driver has no XDP support.
    Native,
    /// Generic (SKB) mode only: works on every interface, slower.
    Skb,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: SocketAddr,
    pub mode: ListenerMode,
    /// Interface the XDP program is attached to: always `Some` for `mode == Xdp`; optional for
    /// kernel listeners (counters and blocklist only).
    pub interface: Option<String>,
    pub xdp_attach: XdpAttach,
    /// Terminate TLS (the default). `false`: a plain TCP (L4) proxy; the bytes go to the
    /// backend as they arrive.
    pub tls: bool,
}

/// One certificate chain and its private key, already read from disk and parsed.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// DER certificates, leaf first. Never empty.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: std::sync::Arc<rustls::pki_types::PrivateKeyDer<'static>>,
    /// Lower-case DNS names this certificate is selected for by SNI (exact names or `*.suffix`
    /// wildcards). From the config's `names` if given, else from the certificate's SANs.
    pub names: Vec<String>,
    /// Served when SNI is absent or matches no certificate. Exactly one certificate has it.
    pub default: bool,
    /// The OCSP response to staple (`ocsp`), parsed; stapled only while
    /// [`crate::ocsp::Response::usable_at`] says so.
    pub ocsp: Option<crate::ocsp::Response>,
}

/// A TLS protocol version. File syntax: `"1.2"` | `"1.3"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// ALPN protocol ids to advertise, in preference order. Empty: no ALPN extension.
    pub alpn: Vec<Vec<u8>>,
    /// Enabled protocol versions; never empty, sorted, deduplicated.
    pub versions: Vec<TlsVersion>,
    /// Server-side session-id cache capacity (entries, per process). 0 disables the cache.
    pub session_cache_entries: usize,
    /// Issue stateless TLS 1.3 (and 1.2) session tickets.
    pub tickets: bool,
    /// Enabled cipher suites in server preference order, each for an enabled version and every
    /// enabled version covered; `None`: the aws-lc-rs provider's defaults in its order.
    pub cipher_suites: Option<Vec<rustls::CipherSuite>>,
    /// Enabled key-exchange groups (each enabled version has a usable one); `None`: the
    /// provider's defaults, X25519MLKEM768 included.
    pub groups: Option<Vec<rustls::NamedGroup>>,
    /// Refuse (alert unrecognized_name) a handshake whose SNI is absent or matches no
    /// certificate instead of serving the default certificate.
    pub strict_sni: bool,
    /// `[tls] ticket_keys`: the ticket keys shared through a file, read at validation;
    /// `None`: random keys per process. Only set when `tickets` is.
    pub ticket_keys: Option<crate::tls::ticket_keys::TicketKeys>,
    /// Ask clients for a certificate (`client_auth`, `client_ca`). `None`: never ask.
    pub client_auth: Option<ClientAuth>,
}

/// Client certificate verification (mTLS): the CAs a client certificate must chain to, and
/// whether a client without one is let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// Where the CA bundle was read from (re-read on reload).
    pub ca_path: PathBuf,
    /// The CA certificates, DER. Never empty.
    pub roots: Vec<CertificateDer<'static>>,
    /// `client_auth = "required"`: a client without a valid certificate fails the handshake.
    /// `false` (`"optional"`): a client may send none, but one it sends must verify.
    pub required: bool,
}

/// `[tls] client_auth`. File syntax: `"off"` | `"optional"` | `"required"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    #[default]
    Off,
    Optional,
    Required,
}

/// When the backend connection is opened. File syntax: `"first-byte"` | `"eager"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectPolicy {
    /// As soon as the client connection is accepted (for server-speaks-first protocols).
    Eager,
    /// When the first plaintext byte from the client arrives: idle clients hold no backend socket.
    FirstByte,
}

/// PROXY protocol header sent to the backend first. File syntax: `"none"` | `"v1"` | `"v2"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the backend sees tern's address as the client's.
    None,
    /// Human-readable text header.
    V1,
    /// Binary header.
    V2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The pool; never empty, no address twice.
    pub servers: Vec<BackendServer>,
    pub connect_timeout: Duration,
    pub connect: ConnectPolicy,
    pub proxy_protocol: ProxyProtocol,
    pub balance: Balance,
    pub health: HealthCheck,
}

/// One backend server of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendServer {
    pub address: SocketAddr,
    /// Relative share of new connections; `1..=MAX_WEIGHT`.
    pub weight: u32,
}

/// How a new connection's server is chosen among those that are up. File syntax:
/// `"round-robin"` | `"least-connections"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Smooth weighted round-robin (nginx's): over a cycle of `Σ weight` picks each server gets
    /// exactly its weight, spread out rather than in runs.
    RoundRobin,
    /// The server with the fewest of this worker's connections per unit of weight; ties go
    /// round-robin.
    LeastConnections,
}

/// `[backend.health]`: when a server is marked down and up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// Active probes: a TCP connect to every server (up or down) this often; `None`: off
    /// (passive health only: a down server is probed after its back-off).
    pub interval: Option<Duration>,
    /// How long a probe's connect may take.
    pub timeout: Duration,
    /// Consecutive failed connects (clients' and probes') that mark a server down; ≥ 1.
    pub fall: u32,
    /// Consecutive successful connects that mark a down server up; ≥ 1.
    pub rise: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workers {
    /// Number of worker threads; ≥ 1.
    pub count: usize,
    /// CPU each worker is pinned to (`cpus[i]` for worker i); `len() == count` when given,
    /// empty means "worker i on the i-th available CPU".
    pub cpus: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to the end of the TLS handshake.
    pub handshake: Duration,
    /// No plaintext moving in either direction for this long closes the connection.
    pub idle: Duration,
    /// Output queued for a client (or backend) that takes none of it for this long resets
    /// the connection.
    pub send: Duration,
    /// On SIGTERM, how long open connections may take to finish before they are cut.
    pub drain: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections (client side) one worker holds at most; more are refused at accept.
    pub max_connections_per_worker: usize,
    /// Bytes buffered per direction per connection before tern stops reading from the sender.
    pub buffer_per_direction: usize,
    /// Connections one source address may hold per worker; 0: no limit.
    pub max_connections_per_source: usize,
    /// Plain (`tls = false`) kernel-path connections move bytes socket → pipe → socket with
    /// SPLICE once the PROXY header is out (`driver::sock::splice`); false: through buffers.
    pub splice: bool,
    /// Kernel-path client writes of at least `driver::sock::zc::THRESHOLD` bytes go out with
    /// SEND_ZC from the registered slot (`driver::sock::zc`); false: plain SEND.
    pub send_zc: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// Unix stream socket for `tern ctl`.
    pub socket: PathBuf,
    /// Permission bits the socket file gets: at most `0o777`, always with the owner's write
    /// bit (connecting needs it). Set before the socket listens, so no client ever connects
    /// under looser bits.
    pub mode: u32,
    /// Owner (uid) to give the socket file; `None` = the user tern runs as.
    pub owner: Option<u32>,
    /// Group (gid) to give the socket file; `None` = tern's primary group.
    pub group: Option<u32>,
}

/// The validated configuration tern runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub listeners: Vec<Listener>,
    pub certificates: Vec<Certificate>,
    pub tls: TlsSettings,
    pub backend: Backend,
    pub workers: Workers,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub control: Control,
    pub xdp: XdpSettings,
    pub tcp: TcpSettings,
    pub process: Process,
    /// `[access_log]`; `None`: no access log.
    pub access_log: Option<AccessLogSettings>,
    pub metrics: Metrics,
    /// `[session_cache]`: per-worker L1 size and the fleet sync.
    pub session_cache: crate::session_cache::Settings,
}

/// `[process]`: who tern runs as once set-up is done (`privileges`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// The identity every thread switches to after set-up; `None`: keep running as started
    /// (with a warning when that is root). Changing it needs a restart.
    pub run_as: Option<RunAs>,
}

/// A resolved `[process] user`/`group`: never root (uid 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// For messages: the user's name, or its number when it has no passwd entry.
    pub user: String,
    pub uid: u32,
    /// `process.group`, else the user's primary group.
    pub gid: u32,
    /// Supplementary groups: the user's groups in the group database (with `gid`), or just
    /// `gid` for a numeric uid with no passwd entry.
    pub groups: Vec<u32>,
}

/// The Prometheus endpoint (`[metrics]`, the `metrics` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metrics {
    /// Where `/metrics` is served over HTTP; `None` (the default): not served.
    pub address: Option<SocketAddr>,
}

/// Congestion control of the bypass stack's connections. File syntax: `"cubic"` | `"newreno"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438).
    Cubic,
    /// NewReno (RFC 5681, RFC 6582).
    NewReno,
}

/// Whether the bypass stack verifies the checksums of arriving segments. File syntax:
/// `"auto"` | `"verify"` | `"skip"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RxChecksum {
    /// As `Verify`, but a TCP segment whose checksum field holds only the pseudo-header sum
    /// (what a sender with TX checksum offload leaves, e.g. a veth peer with its default
    /// offloads) is accepted and counted (`rx_partial_checksum`).
    Auto,
    /// Verify IPv4 header and TCP checksums; count and drop failures (partial ones too).
    Verify,
    /// Trust what arrives (a NIC that verified it, or a veth whose sender leaves checksums
    /// partial).
    Skip,
}

/// The bypass path's TCP settings (`[tcp]`), used by `mode = "bypass"` listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSettings {
    pub congestion: Congestion,
    /// MSS our SYN-ACKs offer (and the most we send per segment), when set (`tcp.mss`);
    /// `None`: each bypass interface's MTU decides at start ([`crate::bypass::mss`]).
    pub mss: Option<u16>,
    /// Receive buffer per connection (bytes): the most the window advertises.
    pub recv_buffer: usize,
    /// Send buffer per connection (bytes).
    pub send_buffer: usize,
    /// Nagle's algorithm (RFC 896). Off by default: a proxy forwards what it has at once.
    pub nagle: bool,
    /// Idle time before the first keep-alive probe; `None`: no keep-alives.
    pub keepalive: Option<Duration>,
    pub rx_checksum: RxChecksum,
    /// How long a connection tern is done with may take to finish its closing handshake
    /// (FIN-WAIT-1/2, CLOSING, LAST-ACK) before it is reset. Always on.
    pub fin_timeout: Duration,
    /// Per worker: most connections finishing their closing handshake at once; tern resets a
    /// connection it is done with instead when this many are already closing. 0: always reset.
    pub max_orphans: usize,
}

/// Whether the AF_XDP UMEM lives in 2 MiB hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// Use hugepages; reserve them (`vm.nr_hugepages`) if the pool is short; if they cannot be
    /// had, fall back to 4 KiB pages with one warning (exported as a metric).
    Auto,
    /// Hugepages or refuse to start.
    Require,
    /// Ordinary 4 KiB pages.
    Off,
}

/// How a bypass worker decides to busy-poll after its last frame (`xdp.spin`; the policy is
/// `bypass::spin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpinMode {
    /// Spin only while the observed gaps between bursts are shorter than a measured sleep and
    /// wake-up, and then at most that long (never longer than `idle_spin_us`).
    Adaptive,
    /// Always spin `idle_spin_us` after the last frame (burns the core between arrivals).
    Fixed,
}

/// Who answers SYNs to bypass listeners (`[xdp] syn_cookies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynCookies {
    /// The XDP program answers IPv4 SYNs itself with the stack's cookie SYN-ACK (`XDP_TX`), so
    /// a SYN flood never reaches a worker; the final ACK goes to the worker, which validates
    /// the cookie. Other SYNs (IPv6, VLAN-tagged, IP options) still go to the worker. On veth,
    /// `XDP_TX` frames reach the peer only if it runs in NAPI mode (an XDP program or GRO on
    /// it), hence not the default.
    Xdp,
    /// Every SYN goes to its worker, whose stack answers it.
    #[default]
    Worker,
}

/// The bypass path's AF_XDP settings (`[xdp]`), used by `mode = "bypass"` listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpSettings {
    /// Bytes per UMEM frame: 2048 or 4096. One frame holds one Ethernet frame (no multi-buffer).
    pub frame_size: u32,
    /// UMEM frames per worker (shared by the worker's sockets on every queue).
    pub frames_per_worker: u32,
    /// Descriptor ring sizes (powers of two).
    pub rx_ring: u32,
    pub tx_ring: u32,
    pub fill_ring: u32,
    pub completion_ring: u32,
    /// How long a worker keeps busy-polling after the last frame before it sleeps in poll():
    /// the cap of the adaptive policy, and 0 = never spin.
    pub idle_spin: Duration,
    pub spin: SpinMode,
    pub hugepages: HugePages,
    /// Per-source SYN limit in the XDP program, SYNs per second per source address; 0 = off.
    /// Applies to bypass listeners and to kernel listeners with an `interface`.
    pub syn_rate_per_source: u32,
    /// How many SYNs one source may send back to back before the rate applies (>= 1).
    pub syn_burst_per_source: u32,
    /// Per-source limit on segments of flows the kernel does not hold, to kernel listeners with
    /// an `interface`, per second; 0 = off.
    pub unknown_rate_per_source: u32,
    /// Burst of the unknown-flow limit (>= 1).
    pub unknown_burst_per_source: u32,
    /// Who answers SYNs to bypass listeners.
    pub syn_cookies: SynCookies,
}

/// A configuration error: which file, which field (dotted path, `""` for the whole file), what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{message}", path.display(), if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct ConfigError {
    pub path: PathBuf,
    pub field: String,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// The file as written: serde types. Defaults live here (and in docs/configuration.md) only.
// ---------------------------------------------------------------------------------------------

/// Default `tls.session_cache_entries`.
pub const DEFAULT_SESSION_CACHE_ENTRIES: usize = 20_000;
/// Default `backend.connect_timeout_ms`.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Default `backend.health.interval_ms`.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
/// Largest `backend.servers[].weight`.
pub const MAX_WEIGHT: u32 = 256;
/// Largest `backend.health.fall` and `rise`: beyond this a server would never change state in
/// any useful time.
pub const MAX_FALL_RISE: u32 = 100;
/// Default `timeouts.handshake_ms`.
pub const DEFAULT_HANDSHAKE_MS: u64 = 10_000;
/// Default `timeouts.idle_ms`.
pub const DEFAULT_IDLE_MS: u64 = 300_000;
/// Default `timeouts.send_ms` (nginx's `send_timeout` is 60 s too).
pub const DEFAULT_SEND_MS: u64 = 60_000;
/// Default `timeouts.drain_ms`.
pub const DEFAULT_DRAIN_MS: u64 = 30_000;
/// Default `tcp.fin_timeout_ms` (Linux's `tcp_fin_timeout`).
pub const DEFAULT_FIN_TIMEOUT_MS: u64 = 60_000;
/// Default `tcp.max_orphans`: this fraction (1/N) of `limits.max_connections_per_worker`. An
/// orphan holds a whole connection slot (both buffers), so clients that never finish closing
/// can take at most a quarter of the slots from new connections; a normal close holds its
/// orphan for about a round trip, so even thousands of closes a second stay far below it.
pub const DEFAULT_ORPHANS_DIVISOR: usize = 4;
/// Default `limits.max_connections_per_worker`.
pub const DEFAULT_MAX_CONNECTIONS_PER_WORKER: usize = 10_000;
/// Default `limits.buffer_per_direction` (bytes).
pub const DEFAULT_BUFFER_PER_DIRECTION: usize = 65_536;
/// Smallest accepted `limits.buffer_per_direction`: one full TLS record (2^14 bytes of
/// plaintext, RFC 8446 §5.1) must fit, or a record could never be forwarded whole.
pub const MIN_BUFFER_PER_DIRECTION: usize = 16_384;
/// Default `control.socket`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tern.sock";
/// Default `control.mode`: only the owner (normally root) may connect.
pub const DEFAULT_CONTROL_MODE: u32 = 0o600;

/// `sun_path` is 108 bytes on Linux, one of which is the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;
/// `IFNAMSIZ` is 16 on Linux, one of which is the terminating NUL.
const MAX_INTERFACE_NAME: usize = 15;
/// RFC 7301 §3.1: a protocol name is a non-empty string of at most 255 bytes.
const MAX_ALPN_ID: usize = 255;
/// Upper bound for every `_ms` value (one year): far beyond any sensible timeout, and small
/// enough that `Instant + Duration` can never overflow (which would panic in a worker).
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;
/// Upper bound for `limits.buffer_per_direction` (1 GiB): io_uring buffer lengths are `u32`,
/// and more than this per connection direction is a typo, not a configuration.
pub const MAX_BUFFER_PER_DIRECTION: usize = 1 << 30;
/// Upper bound for `tls.session_cache_entries` and `limits.max_connections_per_worker`
/// (2^24): both size tables that are allocated up front.
pub const MAX_TABLE_ENTRIES: usize = 1 << 24;

/// The configuration file exactly as written, before validation. Tables that are optional in
/// the file default to the values documented on their fields; required values are `Option`s
/// (or empty lists) here so that [`FileConfig::validate`] can report them by field name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `[[listener]]` tables: addresses to accept TLS on. Required, at least one.
    pub listener: Vec<FileListener>,
    /// `[[certificate]]` tables: chains and keys, chosen by SNI. At least one is required when a
    /// listener terminates TLS.
    pub certificate: Vec<FileCertificate>,
    /// `[tls]`: protocol settings. Optional.
    pub tls: FileTls,
    /// `[backend]`: where the plaintext goes. Required.
    pub backend: Option<FileBackend>,
    /// `[workers]`: threads and CPU pinning. Optional.
    pub workers: FileWorkers,
    /// `[timeouts]`: per-connection and shutdown deadlines. Optional.
    pub timeouts: FileTimeouts,
    /// `[limits]`: per-worker and per-connection bounds. Optional.
    pub limits: FileLimits,
    /// `[control]`: the `tern ctl` socket. Optional.
    pub control: FileControl,
    /// `[xdp]`: AF_XDP settings of the bypass path. Optional.
    pub xdp: FileXdp,
    /// `[tcp]`: tern's own TCP stack on the bypass path. Optional.
    pub tcp: FileTcp,
    /// `[process]`: the user tern switches to after set-up. Optional.
    pub process: FileProcess,
    /// `[access_log]`: one JSON line per connection. Optional; off without a `path`.
    pub access_log: FileAccessLog,
    /// `[metrics]`: the Prometheus endpoint. Optional; off by default.
    pub metrics: FileMetrics,
    /// `[session_cache]`: the session cache's L1 and fleet sync. Optional.
    pub session_cache: FileSessionCache,
}

/// The `[process]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileProcess {
    /// `user`: a user name or a numeric uid (`"tern"`, `998`); never root. Default: none (tern
    /// keeps running as it was started).
    pub user: Option<UserOrId>,
    /// `group`: a group name or a numeric gid. Default: the user's primary group.
    pub group: Option<UserOrId>,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileMetrics {
    /// `address`: `"IP:port"` to serve `GET /metrics` on (Prometheus text or OpenMetrics).
    /// Default: none, nothing is served.
    pub address: Option<String>,
}

/// The `[tcp]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileTcp {
    /// `congestion`: `"cubic"` or `"newreno"`. Default `"cubic"`.
    pub congestion: Congestion,
    /// `mss`: 536 ..= 9000, and the frame (`xdp.frame_size`) must hold it plus headers.
    /// Default: from the bypass interface's MTU at start ([`crate::bypass::mss`]).
    pub mss: Option<u16>,
    /// `recv_buffer`: bytes per connection, 4096 ..= 16 MiB. Default 131072.
    pub recv_buffer: usize,
    /// `send_buffer`: bytes per connection, 4096 ..= 16 MiB. Default 131072.
    pub send_buffer: usize,
    /// `nagle`: Nagle's algorithm. Default false.
    pub nagle: bool,
    /// `keepalive_ms`: idle milliseconds before the first keep-alive probe; 0 = off (default).
    pub keepalive_ms: u64,
    /// `rx_checksum`: `"auto"`, `"verify"` or `"skip"`. Default `"auto"`.
    pub rx_checksum: RxChecksum,
    /// `fin_timeout_ms`: milliseconds a connection tern is done with may take to finish its
    /// closing handshake before it is reset; > 0 and at most a year. Default 60000.
    pub fin_timeout_ms: u64,
    /// `max_orphans`: per worker, connections tern is done with that may be finishing their
    /// closing handshake at once (more are reset); 0 ..= `limits.max_connections_per_worker`.
    /// Default: a quarter of `limits.max_connections_per_worker`, rounded up.
    pub max_orphans: Option<usize>,
}

impl Default for FileTcp {
    fn default() -> Self {
        FileTcp {
            congestion: Congestion::Cubic,
            mss: None,
            recv_buffer: 128 * 1024,
            send_buffer: 128 * 1024,
            nagle: false,
            keepalive_ms: 0,
            rx_checksum: RxChecksum::Auto,
            fin_timeout_ms: DEFAULT_FIN_TIMEOUT_MS,
            max_orphans: None,
        }
    }
}

/// The `[xdp]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileXdp {
    /// `frame_size`: bytes per UMEM frame, 2048 or 4096. Default 2048.
    pub frame_size: u32,
    /// `frames_per_worker`: UMEM frames per worker, at least `fill_ring + tx_ring`, at most
    /// 2^20. Default 8192.
    pub frames_per_worker: u32,
    /// `rx_ring`, `tx_ring`, `fill_ring`, `completion_ring`: descriptors, powers of two from 64
    /// to 16384. Default 2048 each.
    pub rx_ring: u32,
    pub tx_ring: u32,
    pub fill_ring: u32,
    pub completion_ring: u32,
    /// `idle_spin_us`: microseconds of busy polling after the last frame before sleeping;
    /// 0 ..= 1000000. Default 200.
    pub idle_spin_us: u64,
    /// `spin`: `"adaptive"` or `"fixed"`. Default `"adaptive"`.
    pub spin: SpinMode,
    /// `hugepages`: `"auto"`, `"require"` or `"off"`. Default `"auto"`.
    pub hugepages: HugePages,
    /// `syn_rate_per_source`: SYNs per second one source address may send to a listener on an
    /// interface with tern's XDP program, 0 ..= 10000000; beyond it (and its burst) the program
    /// drops them. Default 0 (off).
    pub syn_rate_per_source: u32,
    /// `syn_burst_per_source`: SYNs one source may send back to back, 1 ..= 1000000.
    /// Default 32.
    pub syn_burst_per_source: u32,
    /// `unknown_rate_per_source`: segments per second one source address may send to a kernel
    /// listener (with an `interface`) for flows the kernel holds no connection for (ACK, RST
    /// and data floods), 0 ..= 10000000. Default 0 (off).
    pub unknown_rate_per_source: u32,
    /// `unknown_burst_per_source`: such segments back to back, 1 ..= 1000000. Default 64.
    pub unknown_burst_per_source: u32,
    /// `syn_cookies`: `"xdp"` (the XDP program answers SYNs to bypass listeners with cookie
    /// SYN-ACKs) or `"worker"` (the worker's stack does). Default `"worker"`. Restart only.
    pub syn_cookies: SynCookies,
}

impl Default for FileXdp {
    fn default() -> Self {
        FileXdp {
            frame_size: 2048,
            frames_per_worker: 8192,
            rx_ring: 2048,
            tx_ring: 2048,
            fill_ring: 2048,
            completion_ring: 2048,
            idle_spin_us: 200,
            spin: SpinMode::Adaptive,
            hugepages: HugePages::Auto,
            syn_rate_per_source: 0,
            syn_burst_per_source: 32,
            unknown_rate_per_source: 0,
            unknown_burst_per_source: 64,
            syn_cookies: SynCookies::default(),
        }
    }
}

/// One `[[listener]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileListener {
    /// `address`: `"IPv4:port"` or `"[IPv6]:port"`, port ≠ 0. Required; unique across listeners.
    pub address: Option<String>,
    /// `mode`: `"kernel"` or `"bypass"`. Default `"kernel"`.
    pub mode: Option<ListenerMode>,
    /// `interface`: network interface for the XDP program (≤ 15 bytes). Required when
    /// `mode = "bypass"`; optional for kernel listeners (XDP counters and blocklist only).
    pub interface: Option<String>,
    /// `xdp_attach`: `"auto"`, `"native"` or `"skb"`. Default `"auto"`. Only with an
    /// `interface`.
    pub xdp_attach: Option<XdpAttach>,
    /// `tls`: terminate TLS. `false` makes the listener a plain TCP (L4) proxy. Default true.
    pub tls: Option<bool>,
}

/// One `[[certificate]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileCertificate {
    /// `cert`: PEM file with the chain, leaf first. Required. Relative paths are relative to the
    /// directory of the configuration file.
    pub cert: Option<PathBuf>,
    /// `key`: PEM file with exactly one private key (PKCS#8, PKCS#1 RSA or SEC1 EC). Required.
    /// Relative paths as for `cert`. May be the same file as `cert`.
    pub key: Option<PathBuf>,
    /// `names`: SNI host names (`"example.com"`, `"*.example.com"`), matched case-insensitively.
    /// Default: the leaf's DNS subject alternative names, or its common name if it has none.
    pub names: Option<Vec<String>>,
    /// `default`: serve this certificate when SNI is absent or matches nothing. At most one
    /// certificate may set it; if none does, the first certificate is the default. Default false.
    pub default: bool,
    /// `ocsp`: a DER OCSP response (RFC 6960 `OCSPResponse`) for this certificate, stapled to
    /// handshakes while it is valid. Re-read on reload. Optional.
    pub ocsp: Option<PathBuf>,
}

/// The `[tls]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileTls {
    /// `alpn`: protocol ids to advertise, in preference order (e.g. `["h2", "http/1.1"]`); each
    /// 1–255 bytes, no duplicates. Default `[]`: no ALPN extension in the ServerHello.
    pub alpn: Vec<String>,
    /// `versions`: enabled versions, `"1.2"` and/or `"1.3"`. Non-empty. Default both.
    pub versions: Vec<TlsVersion>,
    /// `session_cache_entries`: server-side session-id cache capacity, entries per process,
    /// ≤ 2^24. `0` disables the cache. Default 20000.
    pub session_cache_entries: usize,
    /// `tickets`: issue stateless session tickets (TLS 1.3 and 1.2). Default true.
    pub tickets: bool,
    /// `ticket_keys`: a file of ticket keys shared by a fleet (`tls::ticket_keys`: one base64
    /// key of 80 bytes per line; the first encrypts, all decrypt), relative to the
    /// configuration's directory. Default: none (random keys per process).
    pub ticket_keys: Option<PathBuf>,
    /// `client_ca`: PEM bundle of the CAs client certificates must chain to. Required when
    /// `client_auth` is not `"off"`; relative to the configuration file's directory.
    pub client_ca: Option<PathBuf>,
    /// `client_auth`: `"off"` (default), `"optional"` or `"required"`.
    pub client_auth: ClientAuthMode,
    /// `cipher_suites`: enabled suites by IANA/rustls or OpenSSL name, in server preference
    /// order. Default: the provider's list.
    pub cipher_suites: Option<Vec<String>>,
    /// `groups`: enabled key-exchange groups (`"X25519MLKEM768"`, `"X25519"`, `"secp256r1"`,
    /// ...). Default: the provider's list.
    pub groups: Option<Vec<String>>,
    /// `strict_sni`: refuse handshakes whose SNI matches no certificate. Default false.
    pub strict_sni: bool,
}

impl Default for FileTls {
    fn default() -> Self {
        FileTls {
            alpn: Vec::new(),
            versions: vec![TlsVersion::Tls12, TlsVersion::Tls13],
            session_cache_entries: DEFAULT_SESSION_CACHE_ENTRIES,
            tickets: true,
            ticket_keys: None,
            client_ca: None,
            client_auth: ClientAuthMode::Off,
            cipher_suites: None,
            groups: None,
            strict_sni: false,
        }
    }
}

/// The `[backend]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileBackend {
    /// `servers`: `"IP:port"` addresses or `{ address = "IP:port", weight = N }` tables.
    /// Required, non-empty, port ≠ 0, no address twice; weight 1..=256, default 1.
    pub servers: Vec<FileServer>,
    /// `connect_timeout_ms`: milliseconds allowed for the TCP connect to a backend; > 0 and at
    /// most a year. Default 3000.
    pub connect_timeout_ms: u64,
    /// `connect`: `"first-byte"` (open the backend connection when the client's first plaintext
    /// byte arrives) or `"eager"` (at accept). Default `"first-byte"`.
    pub connect: ConnectPolicy,
    /// `proxy_protocol`: `"none"`, `"v1"` or `"v2"`. Default `"none"`.
    pub proxy_protocol: ProxyProtocol,
    /// `balance`: `"round-robin"` (weighted) or `"least-connections"`. Default `"round-robin"`.
    pub balance: Balance,
    /// `[backend.health]`: probes and thresholds. Optional.
    pub health: FileHealth,
}

impl Default for FileBackend {
    fn default() -> Self {
        FileBackend {
            servers: Vec::new(),
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            connect: ConnectPolicy::FirstByte,
            proxy_protocol: ProxyProtocol::None,
            balance: Balance::RoundRobin,
            health: FileHealth::default(),
        }
    }
}

/// One `backend.servers` entry as written: a string, or a table with a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileServer {
    /// `address`: `"IP:port"`.
    pub address: String,
    /// `weight`: 1..=256. Default 1.
    pub weight: u32,
}

impl<'de> Deserialize<'de> for FileServer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The table form; its own type so unknown keys and wrong types are named by serde.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            #[serde(default = "default_weight")]
            weight: u32,
        }
        fn default_weight() -> u32 {
            1
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileServer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"IP:port\" or a table { address = \"IP:port\", weight = N }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileServer, E> {
                Ok(FileServer {
                    address: v.to_owned(),
                    weight: 1,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileServer, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(FileServer {
                    address: t.address,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The `[backend.health]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileHealth {
    /// `interval_ms`: active TCP connect probes of every server this often; 0 turns them off
    /// (passive health only). Default 2000.
    pub interval_ms: Option<u64>,
    /// `timeout_ms`: how long a probe's connect may take; > 0. Default:
    /// `backend.connect_timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// `fall`: consecutive failed connects (clients' or probes') that mark a server down;
    /// 1..=100. Default 1.
    pub fall: Option<u32>,
    /// `rise`: consecutive successful connects (probes', mostly) that mark a down server up;
    /// 1..=100. Default 1.
    pub rise: Option<u32>,
}

/// The `[workers]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileWorkers {
    /// `count`: worker threads, ≥ 1. Default: `cpus.len()` if `cpus` is given, else the number
    /// of CPUs this process may run on.
    pub count: Option<usize>,
    /// `cpus`: CPU id for each worker (`cpus[i]` for worker i); `len == count`, no duplicates,
    /// each one a CPU this process may run on. Default: worker i on the i-th available CPU.
    pub cpus: Option<Vec<usize>>,
}

/// The `[timeouts]` table. All values are milliseconds, > 0 and at most a year.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileTimeouts {
    /// `handshake_ms`: from accept to the end of the TLS handshake. Default 10000.
    pub handshake_ms: u64,
    /// `idle_ms`: no plaintext moving in either direction for this long closes the connection.
    /// Default 300000.
    pub idle_ms: u64,
    /// `send_ms`: bytes queued for a peer (client or backend) that takes none of them for this
    /// long reset the connection (a client that never reads). Default 60000.
    pub send_ms: u64,
    /// `drain_ms`: on SIGTERM, how long open connections may take to finish. Default 30000.
    pub drain_ms: u64,
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            handshake_ms: DEFAULT_HANDSHAKE_MS,
            idle_ms: DEFAULT_IDLE_MS,
            send_ms: DEFAULT_SEND_MS,
            drain_ms: DEFAULT_DRAIN_MS,
        }
    }
}

/// The `[limits]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLimits {
    /// `max_connections_per_worker`: client connections one worker holds at most; 1 ..= 2^24.
    /// Default 10000.
    pub max_connections_per_worker: usize,
    /// `buffer_per_direction`: bytes buffered per direction per connection; 16384 ..= 2^30.
    /// Default 65536.
    pub buffer_per_direction: usize,
    /// `max_connections_per_source`: connections one client address may hold per worker;
    /// 0 (the default) is no limit.
    pub max_connections_per_source: usize,
    /// `splice`: plain (`tls = false`) kernel-path listeners move bytes socket → pipe →
    /// socket with splice(2) (a pipe of `buffer_per_direction` bytes per direction, 2 fds
    /// each). Default true: on the veth rig it cost tern ~13 % less CPU per MiB than copying
    /// (see docs/benchmarks.md).
    pub splice: bool,
    /// `send_zc`: kernel-path TLS writes of at least 16 KiB go out with io_uring SEND_ZC from
    /// the registered send slots. Default false (see docs/benchmarks.md).
    pub send_zc: bool,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_connections_per_worker: DEFAULT_MAX_CONNECTIONS_PER_WORKER,
            buffer_per_direction: DEFAULT_BUFFER_PER_DIRECTION,
            max_connections_per_source: 0,
            splice: true,
            send_zc: false,
        }
    }
}

/// The `[control]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileControl {
    /// `socket`: path of the Unix control socket (≤ 107 bytes once resolved); relative paths are
    /// relative to the configuration file's directory. Default `/run/tern.sock`.
    pub socket: PathBuf,
    /// `mode`: permission bits of the socket file, an octal string (`"0600"`, `"660"`,
    /// `"0o660"`). Default `"0600"`.
    pub mode: String,
    /// `owner`: the socket file's owner, a user name or a numeric uid (`"tern"`, `0`).
    /// Default: the user tern runs as.
    pub owner: Option<UserOrId>,
    /// `group`: the socket file's group, a group name or a numeric gid (`"adm"`, `4`).
    /// Default: tern's primary group.
    pub group: Option<UserOrId>,
}

impl Default for FileControl {
    fn default() -> Self {
        FileControl {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            mode: format!("{DEFAULT_CONTROL_MODE:04o}"),
            owner: None,
            group: None,
        }
    }
}

/// A user or group as written in the file: a name, or a numeric id (a TOML integer, or a
/// string of digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserOrId {
    Name(String),
    Id(u32),
}

impl<'de> Deserialize<'de> for UserOrId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = UserOrId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a name or a numeric id")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<UserOrId, E> {
                if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                    return text
                        .parse()
                        .map(UserOrId::Id)
                        .map_err(|_| E::custom(format!("id {text} is out of range")));
                }
                Ok(UserOrId::Name(text.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, id: i64) -> Result<UserOrId, E> {
                u32::try_from(id)
                    .map(UserOrId::Id)
                    .map_err(|_| E::custom(format!("id {id} is out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, id: u64) -> Result<UserOrId, E> {
                u32::try_from(id)
                    .map(UserOrId::Id)
                    .map_err(|_| E::custom(format!("id {id} is out of range")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            field: String::new(),
            message: format!("cannot read file: {e}"),
        })?;
        Self::from_str(path, &text)
    }

    /// Parses and validates `text` as if read from `path` (relative certificate paths are
    /// resolved against `path`'s directory).
    pub fn from_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
        FileConfig::parse(path, text)?.validate(path)
    }

    /// The certificate served when SNI is absent or unknown. Validation guarantees exactly one
    /// when any certificate is configured (none are needed when no listener has TLS).
    pub fn default_certificate(&self) -> Option<&Certificate> {
        self.certificates.iter().find(|c| c.default)
    }
}

impl FileConfig {
    /// Parses `text` (read from `path`, which is only used in errors). Syntax errors carry the
    /// line and column; type errors and unknown fields name the field's path
    /// (`listener[0].mode`) and carry the line and column of the offending value when known.
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        let error = |field: String, message: String| ConfigError {
            path: path.to_path_buf(),
            field,
            message,
        };
        let document = toml::Deserializer::parse(text).map_err(|e| {
            let message = match e.span() {
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    format!(
                        "TOML syntax error at line {line}, column {column}: {}",
                        e.message()
                    )
                }
                None => format!("TOML syntax error: {}", e.message()),
            };
            error(String::new(), message)
        })?;
        serde_path_to_error::deserialize(document).map_err(|e| {
            let path = e.path().to_string();
            // serde_path_to_error prints the root as ".".
            let field = if path == "." { String::new() } else { path };
            let inner = e.inner();
            let mut message = friendly_serde_message(inner.message());
            if let Some(span) = inner.span() {
                let (line, column) = line_column(text, span.start);
                message.push_str(&format!(" (line {line}, column {column})"));
            }
            error(field, message)
        })
    }

    /// Checks every field and builds the [`Config`]. Reads the certificate and key files
    /// (relative paths resolved against `path`'s directory) and checks that each key parses
    /// and matches its certificate.
    pub fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        self.validate_in(path)
            .map_err(|Invalid { field, message }| ConfigError {
                path: path.to_path_buf(),
                field,
                message,
            })
    }

    fn validate_in(self, path: &Path) -> Result<Config, Invalid> {
        let dir = config_dir(path);
        let listeners = validate_listeners(self.listener)?;
        let needs_certificates = listeners.iter().any(|l| l.tls);
        let xdp = validate_xdp(self.xdp)?;
        let limits = validate_limits(self.limits)?;
        Ok(Config {
            path: path.to_path_buf(),
            certificates: validate_certificates(dir, self.certificate, needs_certificates)?,
            listeners,
            tls: validate_tls(dir, self.tls)?,
            backend: validate_backend(self.backend)?,
            workers: validate_workers(self.workers, &available_cpus())?,
            timeouts: Timeouts {
                handshake: positive_ms("timeouts.handshake_ms", self.timeouts.handshake_ms)?,
                idle: positive_ms("timeouts.idle_ms", self.timeouts.idle_ms)?,
                send: positive_ms("timeouts.send_ms", self.timeouts.send_ms)?,
                drain: positive_ms("timeouts.drain_ms", self.timeouts.drain_ms)?,
            },
            control: validate_control(dir, self.control)?,
            tcp: validate_tcp(self.tcp, &xdp, &limits)?,
            access_log: validate_access_log(dir, self.access_log)?,
            session_cache: validate_session_cache(dir, self.session_cache)?,
            metrics: Metrics {
                address: self
                    .metrics
                    .address
                    .map(|a| parse_socket_addr("metrics.address", &a, "scrapers need a known port"))
                    .transpose()?,
            },
            limits,
            xdp,
            process: validate_process(self.process)?,
        })
    }
}

/// A validation failure before the file name is attached.
#[derive(Debug)]
struct Invalid {
    /// Dotted path of the field, as the operator wrote it (`certificate[1].key`).
    field: String,
    message: String,
}

impl Invalid {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The directory relative paths in `path` are resolved against.
fn config_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

/// `file` relative to `dir` unless absolute, made absolute against the current directory so
/// that messages show the path that was really tried and a later `chdir` cannot change it.
fn resolve(dir: &Path, file: &Path) -> PathBuf {
    let joined = dir.join(file);
    std::path::absolute(&joined).unwrap_or(joined)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// serde names Rust types in its messages ("expected usize"); an operator thinks in TOML types.
fn friendly_serde_message(message: &str) -> String {
    let mut message = message.trim_end().to_owned();
    for (rust, toml) in [
        ("expected usize", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected a boolean", "expected true or false"),
        ("expected a sequence", "expected an array"),
        ("invalid type: map", "invalid type: table"),
        // toml's message for a non-string where a keyword (`mode = "bypass"`) belongs.
        ("wanted string or table", "expected a string"),
    ] {
        message = message.replace(rust, toml);
    }
    message
}

/// A socket address as written in the file: `IPv4:port` or `[IPv6]:port`, port ≠ 0.
fn parse_socket_addr(field: &str, text: &str, port_zero_why: &str) -> Result<SocketAddr, Invalid> {
    let address: SocketAddr = text.parse().map_err(|_| {
        Invalid::new(
            field,
            format!(
                "invalid socket address {text:?} (expected IPv4:port or [IPv6]:port, \
                 e.g. \"0.0.0.0:443\" or \"[::]:443\")"
            ),
        )
    })?;
    if address.port() == 0 {
        return Err(Invalid::new(
            field,
            format!("port 0 is not allowed in {text:?}: {port_zero_why}"),
        ));
    }
    Ok(address)
}

fn validate_listeners(file: Vec<FileListener>) -> Result<Vec<Listener>, Invalid> {
    if file.is_empty() {
        return Err(Invalid::new(
            "listener",
            "at least one [[listener]] table is required",
        ));
    }
    let mut listeners: Vec<Listener> = Vec::with_capacity(file.len());
    for (i, l) in file.into_iter().enumerate() {
        let field = |name: &str| format!("listener[{i}].{name}");
        let text = l
            .address
            .ok_or_else(|| Invalid::new(field("address"), "required field is missing"))?;
        let address = parse_socket_addr(
            &field("address"),
            &text,
            "every worker binds the same port, so it must be fixed",
        )?;
        if let Some(j) = listeners.iter().position(|other| other.address == address) {
            return Err(Invalid::new(
                field("address"),
                format!("{address} is already the address of listener[{j}]"),
            ));
        }
        let mode = l.mode.unwrap_or(ListenerMode::Kernel);
        let interface =
            match (mode, l.interface) {
                (ListenerMode::Bypass, None) => return Err(Invalid::new(
                    field("interface"),
                    "required when mode = \"bypass\" (the interface the XDP program attaches to)",
                )),
                (_, Some(name)) => {
                    check_interface_name(&name).map_err(|m| Invalid::new(field("interface"), m))?;
                    Some(name)
                }
                (ListenerMode::Kernel, None) => None,
            };
        if interface.is_none() && l.xdp_attach.is_some() {
            return Err(Invalid::new(
                field("xdp_attach"),
                "only valid with an interface (the XDP program's attach mode)",
            ));
        }
        let xdp_attach = l.xdp_attach.unwrap_or(XdpAttach::Auto);
        // One XDP program per interface serves all its listeners, attached once, in one mode.
        if let Some((j, other)) = listeners.iter().enumerate().find(|(_, other)| {
            other.interface.is_some()
                && other.interface == interface
                && other.xdp_attach != xdp_attach
        }) {
            return Err(Invalid::new(
                field("xdp_attach"),
                format!(
                    "\"{}\" conflicts with \"{}\" of listener[{j}] on the same interface \
                     (one XDP program per interface, attached once)",
                    attach_keyword(xdp_attach),
                    attach_keyword(other.xdp_attach)
                ),
            ));
        }
        listeners.push(Listener {
            address,
            mode,
            interface,
            xdp_attach,
            tls: l.tls.unwrap_or(true),
        });
    }
    Ok(listeners)
}

/// `xdp_attach` as written in the file.
fn attach_keyword(attach: XdpAttach) -> &'static str {
    match attach {
        XdpAttach::Auto => "auto",
        XdpAttach::Native => "native",
        XdpAttach::Skb => "skb",
    }
}

/// The kernel's own rule for interface names (`dev_valid_name` in net/core/dev.c).
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "{name:?} is {} bytes; interface names have at most {MAX_INTERFACE_NAME}",
            name.len()
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

fn validate_certificates(
    dir: &Path,
    file: Vec<FileCertificate>,
    required: bool,
) -> Result<Vec<Certificate>, Invalid> {
    if file.is_empty() {
        if !required {
            return Ok(Vec::new());
        }
        return Err(Invalid::new(
            "certificate",
            "at least one [[certificate]] table is required (a listener terminates TLS)",
        ));
    }
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let mut certificates: Vec<Certificate> = Vec::with_capacity(file.len());
    let mut algorithms = Vec::with_capacity(file.len());
    let mut default_index = None;
    for (i, c) in file.into_iter().enumerate() {
        if c.default {
            if let Some(first) = default_index {
                return Err(Invalid::new(
                    format!("certificate[{i}].default"),
                    format!(
                        "only one certificate may be the default; certificate[{first}] already is"
                    ),
                ));
            }
            default_index = Some(i);
        }
        let (certificate, algorithm) = load_certificate(dir, i, c, &provider)?;
        certificates.push(certificate);
        algorithms.push(algorithm);
    }
    let default_index = default_index.unwrap_or(0);
    certificates[default_index].default = true;

    // SNI picks one certificate per name and key type (the client's signature algorithms choose
    // between the types), so a name claimed twice with one key type would silently shadow one
    // of them; a certificate without names could only ever be served as the default.
    // Keyed by the algorithm's wire code: `SignatureAlgorithm` is not `Hash`.
    let mut owner: HashMap<(&str, u8), usize> = HashMap::new();
    for (i, c) in certificates.iter().enumerate() {
        let field = format!("certificate[{i}].names");
        if c.names.is_empty() && i != default_index {
            return Err(Invalid::new(
                field,
                "no server names, so SNI could never select this certificate (it is not the \
                 default); list them in `names`, or use a certificate whose subject \
                 alternative names or common name are DNS names",
            ));
        }
        for name in &c.names {
            if let Some(j) = owner.insert((name, u8::from(algorithms[i])), i) {
                return Err(Invalid::new(
                    field,
                    format!(
                        "{name:?} is also a name of certificate[{j}] with the same key type \
                         ({:?}): {:?} and {:?}; one name may have one certificate per key type",
                        algorithms[i], certificates[j].cert_path, c.cert_path
                    ),
                ));
            }
        }
    }
    Ok(certificates)
}

/// Reads and checks one `[[certificate]]`. The returned certificate is not yet marked default;
/// beside it, its key's signature algorithm (SNI may pick between key types for one name).
fn load_certificate(
    dir: &Path,
    i: usize,
    c: FileCertificate,
    provider: &CryptoProvider,
) -> Result<(Certificate, rustls::SignatureAlgorithm), Invalid> {
    let cert_field = format!("certificate[{i}].cert");
    let key_field = format!("certificate[{i}].key");
    let cert_path = resolve(
        dir,
        &c.cert
            .ok_or_else(|| Invalid::new(&cert_field, "required field is missing"))?,
    );
    let key_path = resolve(
        dir,
        &c.key
            .ok_or_else(|| Invalid::new(&key_field, "required field is missing"))?,
    );

    let cert_pem = read_file(&cert_field, &cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Invalid::new(&cert_field, format!("{cert_path:?}: bad PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(Invalid::new(
            &cert_field,
            format!("no certificate (\"BEGIN CERTIFICATE\" block) in {cert_path:?}"),
        ));
    };
    let (_, parsed_leaf) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        Invalid::new(
            &cert_field,
            format!("the first certificate in {cert_path:?} is not valid X.509: {e}"),
        )
    })?;

    let key_pem = read_file(&key_field, &key_path)?;
    let mut keys = PrivateKeyDer::pem_slice_iter(&key_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Invalid::new(&key_field, format!("{key_path:?}: bad PEM: {e}")))?;
    let key = match keys.len() {
        1 => keys.remove(0),
        0 => {
            return Err(Invalid::new(
                &key_field,
                format!(
                    "no private key (\"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \
                     \"BEGIN EC PRIVATE KEY\" block) in {key_path:?}"
                ),
            ))
        }
        n => {
            return Err(Invalid::new(
                &key_field,
                format!("{n} private keys in {key_path:?}; expected exactly one"),
            ))
        }
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            Invalid::new(
                &key_field,
                format!("unusable private key in {key_path:?}: {e}"),
            )
        })?;
    let algorithm = signing_key.algorithm();
    match rustls::sign::CertifiedKey::new(chain.clone(), signing_key).keys_match() {
        // `Unknown`: the key type cannot report its public key, so there is nothing to compare
        // (rustls' own `CertifiedKey::from_der` accepts this case too).
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(Invalid::new(
                &key_field,
                format!(
                    "the private key in {key_path:?} does not match the certificate in \
                     {cert_path:?}"
                ),
            ))
        }
        Err(e) => {
            return Err(Invalid::new(
                &cert_field,
                format!("the first certificate in {cert_path:?} is unusable: {e}"),
            ))
        }
    }

    let names_field = format!("certificate[{i}].names");
    let names = match c.names {
        Some(given) => {
            let mut names = Vec::with_capacity(given.len());
            for (j, name) in given.iter().enumerate() {
                let name = check_server_name(name)
                    .map_err(|m| Invalid::new(format!("{names_field}[{j}]"), m))?;
                names.push(name);
            }
            names
        }
        None => names_from_certificate(&parsed_leaf)
            .map_err(|m| Invalid::new(&cert_field, format!("{cert_path:?}: {m}")))?,
    };
    let mut seen = HashSet::new();
    let names = names
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .collect();

    let ocsp = match c.ocsp {
        None => None,
        Some(file) => {
            let field = format!("certificate[{i}].ocsp");
            let path = resolve(dir, &file);
            let der = read_file(&field, &path)?;
            let response = crate::ocsp::Response::parse(path, der, parsed_leaf.raw_serial())
                .map_err(|m| Invalid::new(&field, format!("{file:?}: {m}")))?;
            Some(response)
        }
    };

    Ok((
        Certificate {
            cert_path,
            key_path,
            chain,
            key: Arc::new(key),
            names,
            default: false,
            ocsp,
        },
        algorithm,
    ))
}

fn read_file(field: &str, path: &Path) -> Result<Vec<u8>, Invalid> {
    std::fs::read(path).map_err(|e| Invalid::new(field, format!("cannot read {path:?}: {e}")))
}

/// A server name as SNI carries it (RFC 6066 §3: a DNS host name, no trailing dot), lower-cased,
/// optionally with a leading `*.` wildcard label.
fn check_server_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("server names must not be empty".to_owned());
    }
    let lower = name.to_ascii_lowercase();
    let base = lower.strip_prefix("*.").unwrap_or(&lower);
    if base.contains('*') {
        return Err(format!(
            "{name:?}: a wildcard may only be the whole first label (\"*.example.com\")"
        ));
    }
    if !name.is_ascii() {
        return Err(format!(
            "{name:?} is not ASCII; write internationalized names in their xn-- (punycode) form"
        ));
    }
    if base.ends_with('.') || DnsName::try_from(base).is_err() {
        return Err(format!("{name:?} is not a valid DNS host name"));
    }
    Ok(lower)
}

/// The leaf's DNS subject alternative names; if it has none, its common name when that is a
/// host name (RFC 6125 §6.4.4 fallback). May be empty.
fn names_from_certificate(
    leaf: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Vec<String>, String> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName extension: {e}"))?;
    let dns_sans: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
        .collect();
    if !dns_sans.is_empty() {
        return dns_sans
            .into_iter()
            .map(|dns| {
                check_server_name(dns)
                    .map_err(|m| format!("subject alternative name {m}; list the names in `names`"))
            })
            .collect();
    }
    // A common name like "My Test CA" is not a host name: treat it as no name.
    Ok(leaf
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .filter_map(|cn| check_server_name(cn).ok())
        .take(1)
        .collect())
}

fn validate_tls(dir: &Path, file: FileTls) -> Result<TlsSettings, Invalid> {
    let client_auth = validate_client_auth(dir, &file)?;
    let mut alpn: Vec<Vec<u8>> = Vec::with_capacity(file.alpn.len());
    for (i, id) in file.alpn.into_iter().enumerate() {
        let field = format!("tls.alpn[{i}]");
        if id.is_empty() || id.len() > MAX_ALPN_ID {
            return Err(Invalid::new(
                field,
                format!(
                    "ALPN protocol ids are 1 to {MAX_ALPN_ID} bytes, {id:?} is {}",
                    id.len()
                ),
            ));
        }
        if alpn.iter().any(|a| a == id.as_bytes()) {
            return Err(Invalid::new(field, format!("{id:?} is listed twice")));
        }
        alpn.push(id.into_bytes());
    }
    let mut versions = file.versions;
    if versions.is_empty() {
        return Err(Invalid::new(
            "tls.versions",
            "at least one TLS version (\"1.2\", \"1.3\") is required",
        ));
    }
    versions.sort();
    versions.dedup();
    let option = |list: &str, e: crate::tls::options::OptionError| match e.index {
        Some(i) => Invalid::new(format!("tls.{list}[{i}]"), e.message),
        None => Invalid::new(format!("tls.{list}"), e.message),
    };
    let cipher_suites = file
        .cipher_suites
        .map(|names| crate::tls::options::cipher_suites(&names, &versions))
        .transpose()
        .map_err(|e| option("cipher_suites", e))?;
    let groups = file
        .groups
        .map(|names| crate::tls::options::groups(&names, &versions))
        .transpose()
        .map_err(|e| option("groups", e))?;
    Ok(TlsSettings {
        cipher_suites,
        groups,
        strict_sni: file.strict_sni,
        alpn,
        versions,
        session_cache_entries: at_most(
            "tls.session_cache_entries",
            file.session_cache_entries,
            MAX_TABLE_ENTRIES,
        )?,
        tickets: file.tickets,
        ticket_keys: validate_ticket_keys(dir, file.ticket_keys.as_deref(), file.tickets)?,
        client_auth,
    })
}

/// `tls.ticket_keys`: the file read and its keys checked now, so a bad file fails start-up
/// and reload as a certificate does (`FILE: tls.ticket_keys: KEYFILE: line N: reason`).
fn validate_ticket_keys(
    dir: &Path,
    file: Option<&Path>,
    tickets: bool,
) -> Result<Option<crate::tls::ticket_keys::TicketKeys>, Invalid> {
    let Some(file) = file else {
        return Ok(None);
    };
    if !tickets {
        return Err(Invalid::new(
            "tls.ticket_keys",
            "set, but tls.tickets is false: no ticket would use the keys",
        ));
    }
    let path = resolve(dir, file);
    let keys = crate::tls::ticket_keys::read(&path)
        .map_err(|e| Invalid::new("tls.ticket_keys", format!("{}: {e}", path.display())))?;
    Ok(Some(crate::tls::ticket_keys::TicketKeys { path, keys }))
}

/// `[tls] client_auth` and `client_ca`: reads the CA bundle when client certificates are asked
/// for.
fn validate_client_auth(dir: &Path, file: &FileTls) -> Result<Option<ClientAuth>, Invalid> {
    let (required, ca) =
        match (file.client_auth, &file.client_ca) {
            (ClientAuthMode::Off, None) => return Ok(None),
            (ClientAuthMode::Off, Some(_)) => {
                return Err(Invalid::new(
                    "tls.client_ca",
                    "set, but tls.client_auth is \"off\": set client_auth to \"optional\" or \
                 \"required\", or remove client_ca",
                ))
            }
            (_, None) => return Err(Invalid::new(
                "tls.client_ca",
                "required when tls.client_auth is \"optional\" or \"required\" (the CAs client \
                 certificates must chain to)",
            )),
            (mode, Some(ca)) => (mode == ClientAuthMode::Required, ca),
        };
    let field = "tls.client_ca";
    let ca_path = resolve(dir, ca);
    let pem = read_file(field, &ca_path)?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Invalid::new(field, format!("{ca_path:?}: bad PEM: {e}")))?;
    if roots.is_empty() {
        return Err(Invalid::new(
            field,
            format!("no certificate (\"BEGIN CERTIFICATE\" block) in {ca_path:?}"),
        ));
    }
    // The same check rustls's verifier builder makes later, here so that the error names the
    // file and field.
    let mut store = rustls::RootCertStore::empty();
    for (j, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|e| {
            Invalid::new(
                field,
                format!(
                    "certificate {} in {ca_path:?} is not a usable CA: {e}",
                    j + 1
                ),
            )
        })?;
    }
    Ok(Some(ClientAuth {
        ca_path,
        roots,
        required,
    }))
}

fn validate_backend(file: Option<FileBackend>) -> Result<Backend, Invalid> {
    let file = file.ok_or_else(|| Invalid::new("backend", "the [backend] table is required"))?;
    if file.servers.is_empty() {
        return Err(Invalid::new(
            "backend.servers",
            "at least one backend server is required",
        ));
    }
    let mut servers: Vec<BackendServer> = Vec::with_capacity(file.servers.len());
    for (i, s) in file.servers.iter().enumerate() {
        let field = format!("backend.servers[{i}]");
        let address = parse_socket_addr(&field, &s.address, "a backend needs a real port")?;
        if !(1..=MAX_WEIGHT).contains(&s.weight) {
            return Err(Invalid::new(
                format!("{field}.weight"),
                format!("{} is out of range: 1 to {MAX_WEIGHT}", s.weight),
            ));
        }
        // The pool is keyed by address (health, counters, reload): one entry per server.
        if let Some(j) = servers.iter().position(|o| o.address == address) {
            return Err(Invalid::new(
                field,
                format!("{address} is already backend.servers[{j}]"),
            ));
        }
        servers.push(BackendServer {
            address,
            weight: s.weight,
        });
    }
    let connect_timeout = positive_ms("backend.connect_timeout_ms", file.connect_timeout_ms)?;
    let h = file.health;
    let interval_ms = h.interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS);
    let interval = match interval_ms {
        0 => None,
        ms => Some(positive_ms("backend.health.interval_ms", ms)?),
    };
    let timeout = match h.timeout_ms {
        Some(ms) => positive_ms("backend.health.timeout_ms", ms)?,
        None => connect_timeout,
    };
    let count = |field: &str, v: Option<u32>| match v.unwrap_or(1) {
        n @ 1..=MAX_FALL_RISE => Ok(n),
        n => Err(Invalid::new(
            field,
            format!("{n} is out of range: 1 to {MAX_FALL_RISE}"),
        )),
    };
    Ok(Backend {
        servers,
        connect_timeout,
        connect: file.connect,
        proxy_protocol: file.proxy_protocol,
        balance: file.balance,
        health: HealthCheck {
            interval,
            timeout,
            fall: count("backend.health.fall", h.fall)?,
            rise: count("backend.health.rise", h.rise)?,
        },
    })
}

/// CPU ids this process may run on (its affinity mask), ascending. Falls back to
/// `0..available_parallelism` if the mask cannot be read.
fn available_cpus() -> Vec<usize> {
    let mut cpus: Vec<usize> = match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    };
    cpus.sort_unstable();
    cpus
}

/// `available` is the CPU set from [`available_cpus`] (a parameter so tests can fix it).
fn validate_workers(file: FileWorkers, available: &[usize]) -> Result<Workers, Invalid> {
    if file.cpus.as_ref().is_some_and(Vec::is_empty) {
        return Err(Invalid::new(
            "workers.cpus",
            "must not be empty (omit it to pin worker i to the i-th available CPU)",
        ));
    }
    let cpus = file.cpus.unwrap_or_default();
    let count = match file.count {
        Some(0) => return Err(Invalid::new("workers.count", "must be at least 1")),
        Some(n) => n,
        None if !cpus.is_empty() => cpus.len(),
        // available_parallelism also honours cgroup CPU quotas, which the mask does not.
        None => std::thread::available_parallelism().map_or(available.len().max(1), |n| n.get()),
    };
    if !cpus.is_empty() && cpus.len() != count {
        return Err(Invalid::new(
            "workers.cpus",
            format!(
                "lists {} CPU(s) but workers.count is {count}; give one CPU per worker",
                cpus.len()
            ),
        ));
    }
    for (i, &cpu) in cpus.iter().enumerate() {
        let field = format!("workers.cpus[{i}]");
        if cpus[..i].contains(&cpu) {
            return Err(Invalid::new(field, format!("CPU {cpu} is listed twice")));
        }
        if !available.contains(&cpu) {
            let list = available
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Invalid::new(
                field,
                format!("CPU {cpu} is not available to this process (available: {list})"),
            ));
        }
    }
    Ok(Workers { count, cpus })
}

fn positive_ms(field: &str, ms: u64) -> Result<Duration, Invalid> {
    if ms == 0 {
        return Err(Invalid::new(field, "must be greater than 0 (milliseconds)"));
    }
    if ms > MAX_DURATION_MS {
        return Err(Invalid::new(
            field,
            format!("{ms} ms is more than a year; at most {MAX_DURATION_MS}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

fn at_most(field: &str, value: usize, max: usize) -> Result<usize, Invalid> {
    if value > max {
        return Err(Invalid::new(
            field,
            format!("{value} is too large; at most {max}"),
        ));
    }
    Ok(value)
}

fn validate_limits(file: FileLimits) -> Result<Limits, Invalid> {
    if file.max_connections_per_worker == 0 {
        return Err(Invalid::new(
            "limits.max_connections_per_worker",
            "must be at least 1",
        ));
    }
    if file.buffer_per_direction < MIN_BUFFER_PER_DIRECTION {
        return Err(Invalid::new(
            "limits.buffer_per_direction",
            format!(
                "{} bytes is too small: at least {MIN_BUFFER_PER_DIRECTION} (one full TLS \
                 record) is required",
                file.buffer_per_direction
            ),
        ));
    }
    Ok(Limits {
        max_connections_per_worker: at_most(
            "limits.max_connections_per_worker",
            file.max_connections_per_worker,
            MAX_TABLE_ENTRIES,
        )?,
        buffer_per_direction: at_most(
            "limits.buffer_per_direction",
            file.buffer_per_direction,
            MAX_BUFFER_PER_DIRECTION,
        )?,
        max_connections_per_source: at_most(
            "limits.max_connections_per_source",
            file.max_connections_per_source,
            MAX_TABLE_ENTRIES,
        )?,
        splice: file.splice,
        send_zc: file.send_zc,
    })
}

fn validate_xdp(file: FileXdp) -> Result<XdpSettings, Invalid> {
    if file.frame_size != 2048 && file.frame_size != 4096 {
        return Err(Invalid::new(
            "xdp.frame_size",
            format!("{} bytes: must be 2048 or 4096", file.frame_size),
        ));
    }
    for (name, v) in [
        ("xdp.rx_ring", file.rx_ring),
        ("xdp.tx_ring", file.tx_ring),
        ("xdp.fill_ring", file.fill_ring),
        ("xdp.completion_ring", file.completion_ring),
    ] {
        if !v.is_power_of_two() || !(64..=16384).contains(&v) {
            return Err(Invalid::new(
                name,
                format!("{v} descriptors: must be a power of two from 64 to 16384"),
            ));
        }
    }
    let needed = file.fill_ring + file.tx_ring;
    if file.frames_per_worker < needed || file.frames_per_worker > 1 << 20 {
        return Err(Invalid::new(
            "xdp.frames_per_worker",
            format!(
                "{} frames: must be at least fill_ring + tx_ring ({needed}) so both rings can be                  kept full, and at most 1048576",
                file.frames_per_worker
            ),
        ));
    }
    if file.idle_spin_us > 1_000_000 {
        return Err(Invalid::new(
            "xdp.idle_spin_us",
            format!("{} µs: at most 1000000 (1 s)", file.idle_spin_us),
        ));
    }
    for (field, rate, burst_field, burst) in [
        (
            "xdp.syn_rate_per_source",
            file.syn_rate_per_source,
            "xdp.syn_burst_per_source",
            file.syn_burst_per_source,
        ),
        (
            "xdp.unknown_rate_per_source",
            file.unknown_rate_per_source,
            "xdp.unknown_burst_per_source",
            file.unknown_burst_per_source,
        ),
    ] {
        if rate > 10_000_000 {
            return Err(Invalid::new(
                field,
                format!("{rate} per second: at most 10000000 (0 turns the limit off)"),
            ));
        }
        if !(1..=1_000_000).contains(&burst) {
            return Err(Invalid::new(
                burst_field,
                format!("{burst}: must be 1 to 1000000"),
            ));
        }
    }
    Ok(XdpSettings {
        syn_rate_per_source: file.syn_rate_per_source,
        syn_burst_per_source: file.syn_burst_per_source,
        unknown_rate_per_source: file.unknown_rate_per_source,
        unknown_burst_per_source: file.unknown_burst_per_source,
        syn_cookies: file.syn_cookies,
        frame_size: file.frame_size,
        frames_per_worker: file.frames_per_worker,
        rx_ring: file.rx_ring,
        tx_ring: file.tx_ring,
        fill_ring: file.fill_ring,
        completion_ring: file.completion_ring,
        idle_spin: Duration::from_micros(file.idle_spin_us),
        spin: file.spin,
        hugepages: file.hugepages,
    })
}

/// Ethernet + IPv6 + TCP with the largest options we send (timestamps): what a frame must hold
/// besides one MSS of payload.
pub const TCP_FRAME_OVERHEAD: usize = 14 + 40 + 60;

fn validate_tcp(file: FileTcp, xdp: &XdpSettings, limits: &Limits) -> Result<TcpSettings, Invalid> {
    let room = xdp.frame_size as usize - TCP_FRAME_OVERHEAD;
    if let Some(mss) = file.mss {
        if !(536..=9000).contains(&mss) || usize::from(mss) > room {
            return Err(Invalid::new(
                "tcp.mss",
                format!(
                    "{mss} bytes: must be from 536 to 9000 and fit a {}-byte frame with its \
                     headers (at most {room})",
                    xdp.frame_size
                ),
            ));
        }
    }
    for (name, v) in [
        ("tcp.recv_buffer", file.recv_buffer),
        ("tcp.send_buffer", file.send_buffer),
    ] {
        if !(4096..=16 << 20).contains(&v) {
            return Err(Invalid::new(
                name,
                format!("{v} bytes: must be from 4096 to 16777216 (16 MiB)"),
            ));
        }
    }
    if file.keepalive_ms > MAX_DURATION_MS {
        return Err(Invalid::new(
            "tcp.keepalive_ms",
            format!(
                "{} ms: at most {MAX_DURATION_MS} (a year)",
                file.keepalive_ms
            ),
        ));
    }
    let capacity = limits.max_connections_per_worker;
    let max_orphans = match file.max_orphans {
        None => capacity.div_ceil(DEFAULT_ORPHANS_DIVISOR),
        Some(n) if n > capacity => {
            return Err(Invalid::new(
                "tcp.max_orphans",
                format!(
                    "{n} is more than limits.max_connections_per_worker ({capacity}): it is per \
                     worker, and an orphan holds one of those connection slots"
                ),
            ))
        }
        Some(n) => n,
    };
    Ok(TcpSettings {
        fin_timeout: positive_ms("tcp.fin_timeout_ms", file.fin_timeout_ms)?,
        max_orphans,
        congestion: file.congestion,
        mss: file.mss,
        recv_buffer: file.recv_buffer,
        send_buffer: file.send_buffer,
        nagle: file.nagle,
        keepalive: (file.keepalive_ms > 0).then(|| Duration::from_millis(file.keepalive_ms)),
        rx_checksum: file.rx_checksum,
    })
}

fn validate_control(dir: &Path, file: FileControl) -> Result<Control, Invalid> {
    if file.socket.as_os_str().is_empty() {
        return Err(Invalid::new("control.socket", "must not be empty"));
    }
    let socket = resolve(dir, &file.socket);
    let len = socket.as_os_str().len();
    if len > MAX_UNIX_SOCKET_PATH {
        return Err(Invalid::new(
            "control.socket",
            format!(
                "{socket:?} is {len} bytes; a Unix socket path holds at most \
                 {MAX_UNIX_SOCKET_PATH}"
            ),
        ));
    }
    Ok(Control {
        socket,
        mode: parse_mode(&file.mode).map_err(|m| Invalid::new("control.mode", m))?,
        owner: file
            .owner
            .map(|o| resolve_id("control.owner", o, crate::control::user_id))
            .transpose()?,
        group: file
            .group
            .map(|g| resolve_id("control.group", g, crate::control::group_id))
            .transpose()?,
    })
}

fn validate_process(file: FileProcess) -> Result<Process, Invalid> {
    let Some(user) = file.user else {
        if file.group.is_some() {
            return Err(Invalid::new(
                "process.group",
                "needs process.user (the group is switched together with the user)",
            ));
        }
        return Ok(Process::default());
    };
    // A numeric uid need not have a passwd entry; a name must.
    let (uid, entry) = match user {
        UserOrId::Id(u32::MAX) => {
            return Err(Invalid::new("process.user", "id 4294967295 is reserved"))
        }
        UserOrId::Id(uid) => (
            uid,
            crate::privileges::user_by_id(uid).map_err(|e| {
                Invalid::new("process.user", format!("cannot look up user id {uid}: {e}"))
            })?,
        ),
        UserOrId::Name(name) => {
            let entry = crate::privileges::user_by_name(&name)
                .map_err(|e| {
                    Invalid::new("process.user", format!("cannot look up user {name:?}: {e}"))
                })?
                .ok_or_else(|| Invalid::new("process.user", format!("no user named {name:?}")))?;
            (entry.uid, Some(entry))
        }
    };
    if uid == 0 {
        return Err(Invalid::new(
            "process.user",
            "root (uid 0) keeps every capability: name an unprivileged user, or leave \
             [process] out to keep running as root",
        ));
    }
    let gid = match (file.group, &entry) {
        (Some(g), _) => resolve_id("process.group", g, crate::control::group_id)?,
        (None, Some(e)) => e.gid,
        (None, None) => {
            return Err(Invalid::new(
                "process.group",
                format!("user id {uid} has no passwd entry: name its group here"),
            ))
        }
    };
    let groups = match &entry {
        Some(e) => crate::privileges::groups_of(&e.name, gid).map_err(|err| {
            Invalid::new(
                "process.user",
                format!("cannot list the groups of {:?}: {err}", e.name),
            )
        })?,
        None => vec![gid],
    };
    Ok(Process {
        run_as: Some(RunAs {
            user: entry.map_or_else(|| uid.to_string(), |e| e.name),
            uid,
            gid,
            groups,
        }),
    })
}

/// An octal permission string (`"0600"`, `"660"`, `"0o660"`) as mode bits.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let octal = !digits.is_empty()
        && digits.len() <= 4
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    let mode = match u32::from_str_radix(digits, 8) {
        Ok(mode) if octal => mode,
        _ => {
            return Err(format!(
                "{text:?} is not an octal mode (write it like \"0600\" or \"0660\")"
            ))
        }
    };
    if mode > 0o777 {
        return Err(format!(
            "{text:?}: only permission bits (at most 0777); setuid, setgid and sticky bits \
             mean nothing on a socket"
        ));
    }
    if mode & 0o200 == 0 {
        return Err(format!(
            "{text:?}: the owner must have write permission (connecting needs it), e.g. \"0600\""
        ));
    }
    Ok(mode)
}

/// A user or group id: numbers as they are, names looked up (NSS, as `id` does).
fn resolve_id(
    field: &str,
    value: UserOrId,
    lookup: fn(&str) -> std::io::Result<Option<u32>>,
) -> Result<u32, Invalid> {
    let what = if field.ends_with("owner") {
        "user"
    } else {
        "group"
    };
    match value {
        // -1 means "leave unchanged" to chown(2): not an id anyone can have.
        UserOrId::Id(u32::MAX) => Err(Invalid::new(field, "id 4294967295 is reserved")),
        UserOrId::Id(id) => Ok(id),
        UserOrId::Name(name) => match lookup(&name) {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(Invalid::new(field, format!("no {what} named {name:?}"))),
            Err(e) => Err(Invalid::new(
                field,
                format!("cannot look up {what} {name:?}: {e}"),
            )),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// [access_log]
// ---------------------------------------------------------------------------------------------

/// Default `access_log.buffer_lines`.
pub const DEFAULT_ACCESS_LOG_BUFFER_LINES: usize = 4096;
/// Default `access_log.flush_ms`.
pub const DEFAULT_ACCESS_LOG_FLUSH_MS: u64 = 100;
/// Upper bound for `access_log.buffer_lines`: each line takes about 700 bytes per worker.
const MAX_ACCESS_LOG_BUFFER_LINES: usize = 1 << 20;
/// Upper bound for `access_log.flush_ms`: the writer must drain well within the drain and
/// stop deadlines.
const MAX_ACCESS_LOG_FLUSH_MS: u64 = 1_000;

/// The validated `[access_log]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogSettings {
    /// The file lines are appended to (absolute).
    pub path: PathBuf,
    /// Records each worker's buffer holds until the writer takes them; beyond, records are
    /// dropped and counted (`access_log_dropped`).
    pub buffer_lines: usize,
    /// How often the writer drains the buffers and writes to the file.
    pub flush: Duration,
}

/// The `[access_log]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAccessLog {
    /// `path`: the file to append one JSON line per connection to; relative paths are relative
    /// to the configuration file's directory. Default: none (no access log).
    pub path: Option<PathBuf>,
    /// `buffer_lines`: records each worker buffers for the writer thread. Default 4096.
    pub buffer_lines: usize,
    /// `flush_ms`: how often (milliseconds) the writer drains the buffers. Default 100.
    pub flush_ms: u64,
}

impl Default for FileAccessLog {
    fn default() -> Self {
        FileAccessLog {
            path: None,
            buffer_lines: DEFAULT_ACCESS_LOG_BUFFER_LINES,
            flush_ms: DEFAULT_ACCESS_LOG_FLUSH_MS,
        }
    }
}

fn validate_access_log(
    dir: &Path,
    file: FileAccessLog,
) -> Result<Option<AccessLogSettings>, Invalid> {
    let Some(path) = file.path else {
        return Ok(None);
    };
    if path.as_os_str().is_empty() {
        return Err(Invalid::new(
            "access_log.path",
            "must not be empty (leave it out to turn the access log off)",
        ));
    }
    if !(1..=MAX_ACCESS_LOG_BUFFER_LINES).contains(&file.buffer_lines) {
        return Err(Invalid::new(
            "access_log.buffer_lines",
            format!(
                "{} is out of range (1 to {MAX_ACCESS_LOG_BUFFER_LINES})",
                file.buffer_lines
            ),
        ));
    }
    if !(1..=MAX_ACCESS_LOG_FLUSH_MS).contains(&file.flush_ms) {
        return Err(Invalid::new(
            "access_log.flush_ms",
            format!(
                "{} is out of range (1 to {MAX_ACCESS_LOG_FLUSH_MS})",
                file.flush_ms
            ),
        ));
    }
    Ok(Some(AccessLogSettings {
        path: resolve(dir, &path),
        buffer_lines: file.buffer_lines,
        flush: Duration::from_millis(file.flush_ms),
    }))
}

// ---------------------------------------------------------------------------------------------
// [session_cache]
// ---------------------------------------------------------------------------------------------

/// Upper bound for `session_cache.entries_per_worker` (each entry is a few hundred bytes).
const MAX_SESSION_CACHE_ENTRIES_PER_WORKER: usize = 1 << 20;
/// Upper bound for `session_cache.peers`: every session is sent to each of them.
const MAX_SESSION_CACHE_PEERS: usize = 64;

/// The `[session_cache]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSessionCache {
    /// `entries_per_worker`: each worker's L1 capacity; 0 turns L1 off. Default 1024.
    pub entries_per_worker: usize,
    /// `listen`: the UDP address peers send session updates to. Default: no sync.
    pub listen: Option<String>,
    /// `peers`: the other hosts' `listen` addresses.
    pub peers: Vec<String>,
    /// `key`: file holding the shared HMAC secret (relative to the configuration's directory).
    pub key: Option<PathBuf>,
    /// `redis`: `redis://HOST:PORT` of the fleet's shared store. Default: no Redis.
    pub redis: Option<String>,
    /// `timeout_ms`: the bound on each Redis command (background threads only). Default 5.
    pub timeout_ms: Option<u64>,
}

impl Default for FileSessionCache {
    fn default() -> Self {
        FileSessionCache {
            entries_per_worker: crate::session_cache::DEFAULT_ENTRIES_PER_WORKER,
            listen: None,
            peers: Vec::new(),
            key: None,
            redis: None,
            timeout_ms: None,
        }
    }
}

fn validate_session_cache(
    dir: &Path,
    file: FileSessionCache,
) -> Result<crate::session_cache::Settings, Invalid> {
    let entries_per_worker = at_most(
        "session_cache.entries_per_worker",
        file.entries_per_worker,
        MAX_SESSION_CACHE_ENTRIES_PER_WORKER,
    )?;
    let redis = validate_session_cache_redis(file.redis.as_deref(), file.timeout_ms)?;
    let Some(listen) = file.listen else {
        if !file.peers.is_empty() || file.key.is_some() {
            return Err(Invalid::new(
                "session_cache.listen",
                "is required with `peers` or `key` (the address peers send updates to)",
            ));
        }
        return Ok(crate::session_cache::Settings {
            entries_per_worker,
            sync: None,
            redis,
        });
    };
    let listen = parse_socket_addr("session_cache.listen", &listen, "peers need a known port")?;
    if file.peers.is_empty() {
        return Err(Invalid::new(
            "session_cache.peers",
            "must list at least one peer when `listen` is set",
        ));
    }
    if file.peers.len() > MAX_SESSION_CACHE_PEERS {
        return Err(Invalid::new(
            "session_cache.peers",
            format!(
                "{} peers is too many; at most {MAX_SESSION_CACHE_PEERS}",
                file.peers.len()
            ),
        ));
    }
    let peers = file
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            parse_socket_addr(
                &format!("session_cache.peers[{i}]"),
                p,
                "updates need a known port",
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let Some(key) = file.key else {
        return Err(Invalid::new(
            "session_cache.key",
            "is required with `listen`: updates are authenticated with a shared secret",
        ));
    };
    let key_path = resolve(dir, &key);
    let secret = std::fs::read(&key_path).map_err(|e| {
        Invalid::new(
            "session_cache.key",
            format!("cannot read {}: {e}", key_path.display()),
        )
    })?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < crate::session_cache::sync::MIN_KEY_LEN {
        return Err(Invalid::new(
            "session_cache.key",
            format!(
                "{}: the secret is {} bytes; at least {} are needed",
                key_path.display(),
                secret.len(),
                crate::session_cache::sync::MIN_KEY_LEN
            ),
        ));
    }
    Ok(crate::session_cache::Settings {
        entries_per_worker,
        sync: Some(crate::session_cache::SyncSettings {
            listen,
            peers,
            key_path,
            key: secret,
        }),
        redis,
    })
}

/// Upper bound for `session_cache.timeout_ms`: a Redis command slower than this is a Redis
/// that is down, for a cache.
const MAX_SESSION_CACHE_REDIS_TIMEOUT_MS: u64 = 10_000;

/// `session_cache.redis` and `timeout_ms`: the URL must parse (the redis crate's syntax); the
/// server need not be up (the backend connects in the background).
fn validate_session_cache_redis(
    url: Option<&str>,
    timeout_ms: Option<u64>,
) -> Result<Option<crate::session_cache::RedisSettings>, Invalid> {
    let Some(url) = url else {
        if timeout_ms.is_some() {
            return Err(Invalid::new(
                "session_cache.timeout_ms",
                "applies to Redis only: set `redis` too, or remove it",
            ));
        }
        return Ok(None);
    };
    let settings = crate::session_cache::RedisSettings {
        url: url.to_string(),
        timeout: crate::session_cache::DEFAULT_REDIS_TIMEOUT,
    };
    if let Err(e) = redis::Client::open(url) {
        return Err(Invalid::new(
            "session_cache.redis",
            format!(
                "{} is not a Redis URL (redis://HOST:PORT): {e}",
                settings.display()
            ),
        ));
    }
    let timeout = match timeout_ms {
        None => settings.timeout,
        Some(ms) if (1..=MAX_SESSION_CACHE_REDIS_TIMEOUT_MS).contains(&ms) => {
            std::time::Duration::from_millis(ms)
        }
        Some(ms) => {
            return Err(Invalid::new(
                "session_cache.timeout_ms",
                format!("{ms} is out of range: 1 to {MAX_SESSION_CACHE_REDIS_TIMEOUT_MS}"),
            ))
        }
    };
    Ok(Some(crate::session_cache::RedisSettings {
        timeout,
        ..settings
    }))
}
