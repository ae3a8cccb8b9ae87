//! tern: a Linux-native TLS terminator.
//!
//! Module map (one concept each):
//! - [`config`]: the TOML file and its validation.
//! - [`tls`]: rustls server configuration (certificates by SNI, ALPN, resumption).
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers sent to backends.
//! - [`xdp`]: loading and attaching the XDP program and reading its counters.
//!
//! The I/O-free proxy core, the io_uring worker and the control plane live in the other modules.

pub mod bypass;
pub mod config;
pub mod control;
pub mod counters;
pub mod driver;
pub mod fault;
pub mod l4;
pub mod proxy;
pub mod proxy_protocol;
pub mod server;
pub mod supervise;
pub mod tcp;
#[cfg(test)]
pub(crate) mod testnet;
pub mod timer;
pub mod tls;
pub mod uring;
pub mod wire;
pub mod worker;
pub mod xdp;
pub mod xsk;
