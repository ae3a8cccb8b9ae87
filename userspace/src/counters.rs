//! Per-worker counters: written by their worker only, read by the control thread.
//!
//! Each worker owns one [`WorkerCounters`] (cache-line aligned so workers never share a line).
//! Because a counter has exactly one writer, increments are a relaxed load and store rather
//! than a locked read-modify-write; readers see a value that may be a few events old, which is
//! all a counter promises. Totals are summed on read (`tern ctl stats`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Defines a cache-line-aligned struct of single-writer [`Counter`]s, its `Copy` snapshot
/// (serialisable, summable with `+=`) and `snapshot()`. Used for the kernel-mode workers'
/// [`WorkerCounters`] and the bypass workers' counters.
macro_rules! single_writer_counters {
    (
        $(#[$meta:meta])* $name:ident, $(#[$smeta:meta])* $snap:ident {
            $($(#[doc = $doc:literal])* $field:ident,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        #[repr(align(64))]
        pub struct $name {
            $($(#[doc = $doc])* pub $field: $crate::counters::Counter,)*
        }

        $(#[$smeta])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct $snap {
            $($(#[doc = $doc])* pub $field: u64,)*
        }

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.get(),)* }
            }
        }

        impl $snap {
            /// Each counter as (field name, its doc text, value), in declaration order: what
            /// the Prometheus endpoint exports (`metrics`), so a counter added here is
            /// exported with its own name and doc.
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($field), concat!($($doc, "\n",)*), self.$field),)*]
            }
        }

        impl std::ops::AddAssign for $snap {
            fn add_assign(&mut self, o: $snap) {
                $(self.$field += o.$field;)*
            }
        }
    };
}
pub(crate) use single_writer_counters;

single_writer_counters! {
    /// One kernel-mode worker's counters. Only the owning worker calls the mutating methods.
    WorkerCounters,
    /// A point-in-time copy of [`WorkerCounters`].
    Snapshot {
    /// Client connections accepted.
    accepted,
    /// Client connections refused at accept because the worker was full.
    refused_full,
    /// Client connections open now (a gauge).
    active,
    /// TLS handshakes completed.
    handshakes,
    /// Of those, resumed (session id or ticket).
    resumed,
    /// Handshakes or records that failed (an alert was sent).
    tls_errors,
    /// Of those, handshakes refused by `strict_sni` (no certificate for the SNI).
    sni_refused,
    /// Connections closed because the handshake took longer than `timeouts.handshake_ms`.
    handshake_timeouts,
    /// Connections closed after `timeouts.idle_ms` without plaintext moving.
    idle_timeouts,
    /// Connections reset because a peer took none of the bytes queued for it for
    /// `timeouts.send_ms` (a client that never reads).
    send_timeouts,
    /// Connections reset because the client did not finish its side (FIN or close_notify)
    /// within `tcp.fin_timeout_ms` of tern's FIN.
    fin_timeouts,
    /// Client connections refused because their source address held
    /// `limits.max_connections_per_source` already.
    refused_source_limit,
    /// Backend connections established.
    backend_connects,
    /// Backend connection attempts refused or failed.
    backend_connect_errors,
    /// Backend connection attempts that timed out.
    backend_connect_timeouts,
    /// Times a new connection passed over a backend server marked down.
    backend_skipped_down,
    /// Client connections closed because no backend could be reached or it failed.
    backend_failures,
    /// Of those, connections whose backend leg failed at once, without a connect, because
    /// every backend server was down.
    backend_all_down,
    /// Client connections ended by a socket error (reset, ...).
    client_errors,
    /// Connections closed (any reason).
    closed,
    /// Ciphertext bytes received from clients.
    client_bytes_in,
    /// Ciphertext bytes sent to clients.
    client_bytes_out,
    /// Plaintext bytes received from backends.
    backend_bytes_in,
    /// Plaintext bytes sent to backends (PROXY headers included).
    backend_bytes_out,
    /// Receives that found the provided-buffer ring empty (retried).
    recv_buffer_starved,
    /// Times a connection waited for a free send slot.
    send_slot_waits,
    /// Connections cut at the end of the drain deadline.
    drain_aborted,
    /// Access log records dropped because the worker's buffer was full (the writer thread
    /// fell behind by `access_log.buffer_lines`).
    access_log_dropped,
    /// Bytes plain (`tls = false`) kernel-path connections moved socket → pipe → socket with
    /// SPLICE, never through tern's buffers (both directions; also in the byte counts above).
    spliced_bytes,
    /// Splices refused with EINVAL/EOPNOTSUPP: that direction went back to the copy path.
    splice_fallbacks,
    /// Ciphertext bytes kernel-path client sends wrote with SEND_ZC from their registered
    /// slot (`limits.send_zc`; also in `client_bytes_out`).
    zero_copy_bytes,
    }
}

/// A single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: a plain load + store cannot lose updates.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub fn dec(&self) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(1),
            Ordering::Relaxed,
        );
    }

    /// For gauges the writer sets outright.
    #[inline]
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_add_up() {
        let a = WorkerCounters::default();
        let b = WorkerCounters::default();
        a.accepted.add(3);
        b.accepted.inc();
        a.active.inc();
        a.active.inc();
        a.active.dec();
        let mut total = a.snapshot();
        total += b.snapshot();
        assert_eq!(total.accepted, 4);
        assert_eq!(total.active, 1);
        assert_eq!(std::mem::align_of::<WorkerCounters>(), 64);
    }
}
