//! tern's sans-IO TCP stack (server side only), fed raw frames from AF_XDP.
//!
//! This module owns the transport logic; packet views and option parsing live in `wire`. Nothing
//! in here makes a syscall, reads a clock or allocates after construction: time is passed in as
//! [`time::Instant`], which the worker reads once per loop turn. Sequence numbers are plain `u32`
//! with wrapping arithmetic (RFC 9293 §3.4) at these building blocks' boundaries, so they do not
//! depend on `wire`'s newtype.
//!
//! Building blocks:
//! - [`time`]: the stack's own `Instant`/`Duration`.
//! - [`rtt`]: the RFC 6298 retransmission-timeout estimator (Karn, backoff).
//! - [`cc`]: congestion control (RFC 5681/6582 NewReno, RFC 9438 CUBIC) behind one trait and
//!   an enum dispatcher.
//! - [`syncookie`]: stateless passive open (RFC 4987 §3.6), keyed with SipHash-2-4.
//! - [`reassembly`]: bounded out-of-order range tracking and SACK blocks (RFC 2018).
//! - [`checksum_alarm`]: notices when most arriving frames fail their checksum, and says why.
//! - [`ring`]: the fixed-capacity byte ring behind each connection's send and receive buffers.
//! - [`conn`]: one connection's TCB (RFC 9293 state machine from ESTABLISHED on, created when a
//!   SYN cookie validates): segment arrival, RFC 5961 challenge ACKs, retransmission, SACK,
//!   delayed ACK, zero-window probes, keep-alive, the per-connection half of path-MTU
//!   discovery, half-close, TIME-WAIT; re-initialised in place for each new connection.
//! - [`frame_out`]: where outgoing frames are built and sent (the bypass worker's UMEM frames).
//! - [`stack`]: per-worker flow table, a slab whose slots own their TCB and buffers (no
//!   allocation per connection), SYN-cookie passive open (per-connection TSval offsets), RSTs,
//!   ICMP packet-too-big for live flows, timer wheel.
//!
//! Not here yet: the bypass worker's `FrameHandler` that runs a [`stack::Stack`], and the L4
//! proxy that connects its connections to `proxy`/io_uring.
#![forbid(unsafe_code)]

pub mod cc;
pub mod checksum_alarm;
pub mod conn;
pub mod frame_out;
pub mod reassembly;
pub mod ring;
pub mod rtt;
pub mod stack;
pub mod syncookie;
pub mod time;
