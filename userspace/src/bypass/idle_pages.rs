//! Giving an idle connection's TCP buffer pages back to the kernel (bypass path).
//!
//! Every slot of the stack has a send and a receive ring cut from one large zeroed arena
//! ([`crate::tcp::ring::RingArena`]): a ring's pages become resident when bytes are first
//! written to them and, without this module, stay resident for as long as the process lives.
//! A connection that finished its handshake and went quiet would hold them all that time
//! (two or three pages: the ClientHello, the server's flight, the tickets). Here the worker
//! watches connections that have used their rings, and once one has moved no byte for
//! [`QUIET_US`] with both rings empty, `madvise(MADV_DONTNEED)` drops those pages: the
//! kernel is the pool, and the next byte costs a zero-filled page fault.
//!
//! The delay keeps a busy connection from paying a syscall and page faults per request: only
//! a connection idle for [`QUIET_US`] is trimmed, at most once per idle period. Ring sizes that
//! are page multiples (the defaults) give whole pages; a ring's partial pages stay.
//!
//! Owns: the queue of connections to look at and the `madvise` call. Not here: which bytes a
//! ring holds (`tcp::ring`, `tcp::conn::Tcb::idle_buffers`), the connections themselves
//! (`bypass::proxy`).

use std::collections::VecDeque;

use crate::driver::Key;

/// How long a connection must move no byte before its buffer pages are given back, in µs.
pub const QUIET_US: u64 = 100_000;

/// The page size pages are given back in (see [`crate::tcp::ring::RingArena::ALIGN`]).
const PAGE: usize = crate::tcp::ring::RingArena::ALIGN;

/// Connections whose rings were written to, to look at once they had time to go quiet.
#[derive(Debug, Default)]
pub struct IdlePages {
    /// (connection, when it was queued in µs), oldest first.
    queue: VecDeque<(Key, u64)>,
    /// Buffers (rings) whose pages were given back so far (`idle_buffers_released`).
    pub released: u64,
}

impl IdlePages {
    /// Queues a connection whose rings were written to (the caller keeps a flag so that a
    /// connection is queued once).
    pub fn watch(&mut self, key: Key, now_us: u64) {
        self.queue.push_back((key, now_us));
    }

    /// The next connection queued at least [`QUIET_US`] ago. The caller gives its pages back
    /// ([`release`]) if it moved no byte for [`QUIET_US`] ([`is_quiet`]), and queues it again
    /// ([`IdlePages::watch`], from now) while its rings may still be written to; a connection
    /// queued again now is not due again in the same sweep.
    pub fn next_due(&mut self, now_us: u64) -> Option<Key> {
        let &(key, at) = self.queue.front()?;
        if now_us.saturating_sub(at) < QUIET_US {
            return None;
        }
        self.queue.pop_front();
        Some(key)
    }

    /// Connections queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Whether a connection whose last byte moved at `last_us` is quiet enough at `now_us` to give
/// its buffer pages back.
pub fn is_quiet(last_us: u64, now_us: u64) -> bool {
    now_us.saturating_sub(last_us) >= QUIET_US
}

/// Gives the whole pages inside `storage` back to the kernel; returns how many. Their bytes
/// read as zeros afterwards (the storage is private anonymous memory: the ring arena's).
pub fn release(storage: &mut [u8]) -> u64 {
    let start = storage.as_mut_ptr();
    let skip = start.align_offset(PAGE).min(storage.len());
    let len = (storage.len() - skip) / PAGE * PAGE;
    if len == 0 {
        return 0;
    }
    // SAFETY: the range lies inside `storage`, which we borrow mutably (nobody else reads or
    // writes it meanwhile), and is page-aligned at both ends. MADV_DONTNEED on private
    // anonymous memory (the ring arena's heap/mmap allocation) keeps the mapping valid and
    // makes the pages read as zeros, which is still initialised memory of `u8`s.
    let r = unsafe { libc::madvise(start.add(skip).cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        // Nothing lost: the pages just stay resident.
        return 0;
    }
    (len / PAGE) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::ring::RingArena;

    /// Resident pages of `storage` (mincore(2)).
    fn resident_pages(storage: &[u8]) -> usize {
        let start = storage.as_ptr();
        let back = start as usize % PAGE;
        let first = start.wrapping_sub(back);
        let len = storage.len() + back;
        let pages = len.div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: `first` is page-aligned and the range covers only pages that `storage` touches,
        // all mapped; `vec` has one byte per page.
        let r = unsafe { libc::mincore(first.cast_mut().cast(), len, vec.as_mut_ptr()) };
        if r != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    fn key(index: u32) -> Key {
        Key { index, gen: 1 }
    }

    #[test]
    fn an_idle_ring_holds_no_resident_page_after_release() {
        // Ring sizes as the defaults: page multiples, so every ring owns whole pages.
        let mut arena = RingArena::new(4, 128 * 1024, 128 * 1024);
        let mut pairs: Vec<_> = (0..4).map_while(|_| arena.next_pair()).collect();
        assert_eq!(pairs.len(), 4);
        for (tx, rx) in &mut pairs {
            assert_eq!(tx.push(&[7u8; 6000]), 6000, "a server flight");
            assert_eq!(rx.push(&[9u8; 2000]), 2000, "a ClientHello");
        }
        let (tx, rx) = &mut pairs[1];
        assert!(tx.idle_storage().is_none(), "not empty: nothing handed out");
        tx.consume(6000);
        rx.consume(2000);
        let s = tx.idle_storage().expect("empty and touched");
        assert_eq!(resident_pages(s), 2, "6000 bytes from a page boundary");
        assert_eq!(release(s), 32, "128 KiB: 32 whole pages");
        assert_eq!(resident_pages(s), 0, "an idle ring holds no page");
        assert!(s.iter().all(|&b| b == 0), "given-back pages read as zeros");
        let s = rx.idle_storage().expect("empty and touched");
        assert_eq!(release(s), 32);
        assert_eq!(resident_pages(s), 0);
        assert!(
            tx.idle_storage().is_none(),
            "untouched since: nothing to give back"
        );
        // The neighbours kept their bytes.
        let (tx0, rx2) = (&pairs[0].0, &pairs[2].1);
        assert_eq!(tx0.slices(0, 6000).0, &[7u8; 6000][..]);
        assert_eq!(rx2.slices(0, 2000).0, &[9u8; 2000][..]);
        // A ring used again works as before, from its start.
        let tx = &mut pairs[1].0;
        assert_eq!(tx.push(b"again"), 5);
        assert_eq!(tx.slices(0, 5).0, b"again");
    }

    #[test]
    fn connections_come_due_after_the_quiet_period_in_order() {
        let mut idle = IdlePages::default();
        idle.watch(key(1), 0);
        idle.watch(key(2), 10);
        idle.watch(key(3), QUIET_US / 2);
        assert_eq!(
            idle.next_due(QUIET_US - 1),
            None,
            "nobody queued long enough"
        );
        assert_eq!(idle.next_due(QUIET_US + 10), Some(key(1)));
        // Queued again now: behind the others, not due in this sweep.
        idle.watch(key(1), QUIET_US + 10);
        assert_eq!(idle.next_due(QUIET_US + 10), Some(key(2)));
        assert_eq!(idle.next_due(QUIET_US + 10), None, "3 is not due yet");
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.next_due(2 * QUIET_US + 10), Some(key(3)));
        assert_eq!(idle.next_due(2 * QUIET_US + 10), Some(key(1)));
        assert!(idle.is_empty());
        assert!(!is_quiet(5, QUIET_US + 4));
        assert!(is_quiet(5, QUIET_US + 5));
    }
}
