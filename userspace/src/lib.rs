//! tern: a Linux-native TLS terminator.
//!
//! Module map, by layer (docs/architecture.md draws the data flow):
//!
//! The shared core, the same on both data paths:
//! - [`driver`]: the connection driver: one sans-IO machine per proxied connection, backend
//!   choice, failover and health, per-source limits, the connection table, deadlines
//!   on a timer wheel, and a socket leg on io_uring ([`driver::sock`]).
//! - [`proxy`]: the byte rules of one connection (rustls session, plaintext both ways,
//!   half-close, back pressure bounds).
//! - [`tls`]: rustls server configuration (certificates by SNI, ALPN, resumption, client
//!   certificates); [`tls::ticket_keys`]: ticket keys shared by a fleet through a file;
//!   [`ocsp`]: the OCSP responses it staples.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers sent to backends.
//!
//! The kernel path:
//! - [`kernel`]: the io_uring worker on ordinary sockets (one per core, SO_REUSEPORT).
//!
//! The bypass path:
//! - [`bypass`]: the pinned worker loop over AF_XDP sockets; [`bypass::proxy`] (tern's TCP
//!   stack + the driver), [`bypass::xsk`] (AF_XDP sockets, UMEM, frames) and [`bypass::xdp`]
//!   (loading and attaching the XDP program, its maps and counters).
//! - [`tcp`] and [`wire`]: the sans-IO TCP stack and the packet views it parses and emits.
//!
//! The system and the control plane:
//! - [`sys`]: io_uring buffers and `user_data`, random bytes.
//! - [`server`]: start-up, threads, signals, drain; [`supervise`] watches the threads and
//!   [`fault`] is the test-only fault hook.
//! - [`privileges`]: `PR_SET_NO_NEW_PRIVS` and the switch to `[process] user` after set-up;
//!   [`notify`]: systemd's readiness protocol (`Type=notify`).
//! - [`control`]: the command socket (`tern ctl`, its `--format` in [`control::text`]);
//!   [`upgrade`]: handing the listening
//!   sockets to a new tern process; [`reload`]: re-reading the configuration;
//!   [`counters`]: per-worker counters; [`config`]: the TOML file and its validation;
//!   [`access_log`]: one JSON line per connection, written off the workers;
//!   [`metrics`]: the Prometheus endpoint and the latency histograms.

pub mod access_log;
pub mod bypass;
pub mod config;
pub mod control;
pub mod counters;
pub mod driver;
pub mod fault;
pub mod kernel;
pub mod metrics;
pub mod notify;
pub mod ocsp;
pub mod privileges;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod session_cache;
pub mod supervise;
pub mod sys;
pub mod tcp;
#[cfg(test)]
pub(crate) mod testnet;
pub mod tls;
pub mod upgrade;
pub mod wire;
