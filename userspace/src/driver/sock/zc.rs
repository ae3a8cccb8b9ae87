//! Zero-copy sends (`limits.send_zc`): a kernel-path client write of at least [`THRESHOLD`]
//! bytes goes out with io_uring SEND_ZC straight from its registered send slot, so the kernel
//! pins the slot's pages instead of copying them into socket buffers.
//!
//! The price is a second completion. A SEND_ZC first completes like a SEND (bytes written, a
//! short count when the peer's window is full) with `IORING_CQE_F_MORE` set when the kernel
//! still holds the pages; a notification (`IORING_CQE_F_NOTIF`) follows once the last skb
//! that references them is freed (acknowledged by the peer, or copied when it crossed into a
//! local receiver, as on veth and loopback). Until then those bytes of the slot must not be
//! written: the socket does not compact the slot, and a slot it is done with is *retired* here
//! rather than given back, and goes back to the pool with the last notification. The fd is
//! closed as soon as the sends themselves have completed (a notification names no fd), so an
//! abortive close frees the socket's queue and with it the pages; the connection's entry is
//! freed only once the notifications are in too ([`Pending::settled`]).
//!
//! Whether the kernel knows SEND_ZC is probed once per ring; where it does not, the setting is
//! ignored (logged once per process) and plain SEND is used. A SEND_ZC the kernel refuses at
//! run time (EOPNOTSUPP) turns it off for that worker until the next reload; the refused
//! bytes go again with SEND, so the connection loses nothing.

use std::sync::Once;

use io_uring::{opcode, squeue, types, IoUring};

use crate::sys::uring::{SlotId, SlotPool};

/// Writes shorter than this go out with plain SEND: pinning pages and a second completion
/// cost more than copying a few KiB. One TLS record is ~16 KiB, so bulk writes qualify.
pub const THRESHOLD: usize = 16 * 1024;

/// A worker's setting: configured (`limits.send_zc`) and supported by its kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Setting {
    supported: bool,
    enabled: bool,
}

impl Setting {
    /// Probes `ring`'s kernel for IORING_OP_SEND_ZC.
    pub fn probe(ring: &IoUring) -> Setting {
        let mut probe = io_uring::Probe::new();
        let supported = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendZc::CODE);
        Setting {
            supported,
            enabled: false,
        }
    }

    /// Applies `limits.send_zc` to the sends queued from now on (start and reload).
    pub fn configure(&mut self, wanted: bool) {
        if wanted && !self.supported {
            static UNSUPPORTED: Once = Once::new();
            UNSUPPORTED.call_once(|| {
                tracing::warn!(
                    "limits.send_zc: this kernel's io_uring has no SEND_ZC; sending with SEND"
                )
            });
        }
        self.enabled = wanted && self.supported;
    }

    /// The kernel refused a SEND_ZC at run time (EOPNOTSUPP: a socket or route that cannot
    /// send zero-copy although the opcode exists): this worker sends with SEND from now on
    /// (until a reload asks again), and the refused write is retried that way, not failed.
    pub fn refused(&mut self) {
        if self.enabled {
            static REFUSED: Once = Once::new();
            REFUSED.call_once(|| {
                tracing::warn!(
                    "limits.send_zc: the kernel refused a SEND_ZC (EOPNOTSUPP); this worker \
                     sends with SEND until the next reload"
                )
            });
        }
        self.enabled = false;
    }

    /// Whether a write of `len` bytes out of a registered slot goes zero-copy.
    pub fn wants(&self, len: usize) -> bool {
        self.enabled && len >= THRESHOLD
    }
}

/// A SEND_ZC of `len` bytes at `ptr`, inside the slot pool's registered buffer (index 0).
pub fn send(fd: i32, ptr: *const u8, len: usize, user_data: u64) -> squeue::Entry {
    opcode::SendZc::new(types::Fd(fd), ptr, len as u32)
        .buf_index(Some(0))
        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data)
}

/// One socket's zero-copy sends whose notification has not arrived, and the slots waiting
/// for them. Empty (and allocation-free) for sockets that never send zero-copy.
#[derive(Debug, Default)]
pub struct Pending {
    /// Send completions that announced a notification (F_MORE) minus notifications seen.
    /// Signed, so the count stays right whichever of the two is reaped first.
    notifs: i32,
    retired: Vec<SlotId>,
}

impl Pending {
    /// A send completion arrived; `more`: the kernel will post a notification for it.
    pub fn sent(&mut self, more: bool, slots: &mut SlotPool) {
        if more {
            self.notifs += 1;
            self.release(slots);
        }
    }

    /// A notification arrived: when it was the last one, the retired slots go back.
    pub fn notified(&mut self, slots: &mut SlotPool) {
        self.notifs -= 1;
        self.release(slots);
    }

    fn release(&mut self, slots: &mut SlotPool) {
        if self.notifs == 0 {
            for slot in self.retired.drain(..) {
                slots.give_back(slot);
            }
        }
    }

    /// No page of this socket's slots is held by the kernel: a slot may be compacted.
    pub fn idle(&self) -> bool {
        self.notifs == 0
    }

    /// Gives `slot` back to the pool, or keeps it until the notifications are in.
    pub fn give_back(&mut self, slots: &mut SlotPool, slot: SlotId) {
        if self.notifs == 0 {
            slots.give_back(slot);
        } else {
            self.retired.push(slot);
        }
    }

    /// Every notification is in and every slot is back: the connection may be freed.
    pub fn settled(&self) -> bool {
        self.notifs == 0 && self.retired.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_refusal_turns_zero_copy_off_until_configured_again() {
        let mut s = Setting {
            supported: true,
            enabled: false,
        };
        s.configure(true);
        assert!(s.wants(THRESHOLD));
        assert!(!s.wants(THRESHOLD - 1), "small writes copy");
        s.refused();
        assert!(!s.wants(THRESHOLD));
        s.configure(true);
        assert!(s.wants(THRESHOLD), "a reload asks again");
        let mut unsupported = Setting::default();
        unsupported.configure(true);
        assert!(!unsupported.wants(THRESHOLD));
    }
}
