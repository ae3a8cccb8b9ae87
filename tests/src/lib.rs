//! tern-tests: the shared test rig for tern's end-to-end tests and for `cargo xtask`.
//!
//! What lives here (and what does not):
//! - [`rig`]: network namespaces joined by veth pairs (`ip netns`, `ip link`), the `tern`
//!   process guard and a temporary-directory guard. Everything it creates is removed on drop.
//! - [`certs`]: self-signed certificates (rcgen) written as PEM files.
//! - [`backend`]: small blocking backends for tern to proxy to: a demo HTTP/1.1 server
//!   (RFC 9112 framing with `Content-Length` only), a raw TCP echo, and a PROXY-protocol-aware
//!   server that parses v1/v2 headers independently of tern's own encoder
//!   (haproxy's `proxy-protocol.txt`).
//! - [`loss`]: test-only packet loss (XDP ingress, tc egress) on a rig interface, from the
//!   test-only programs in tern's eBPF object.
//! - [`pktgen`]: a bounded raw TCP SYN generator (AF_PACKET, qdisc bypass, `sendmmsg`) for the
//!   bypass benchmark and flood tests.
//!
//! The end-to-end tests themselves live in `tests/tests/*.rs`. Nothing here talks to anything
//! but loopback and namespaces it created itself; nothing here uses fixed sleeps to
//! synchronise, only bounded polling with short intervals.

pub mod backend;
pub mod certs;
pub mod loss;
pub mod pktgen;
pub mod rig;
