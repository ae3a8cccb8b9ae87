//! A fixed-capacity byte ring: the send and receive buffers of one connection.
//!
//! Owns the storage only (allocated once, at construction; nothing here allocates afterwards).
//! A stack's rings are cut from a few large zeroed allocations ([`RingArena`]) rather than one
//! allocation each: the allocator then writes no per-ring header into the storage, so a ring's
//! pages become resident only when bytes are written to them.
//! The ring holds `len` readable bytes starting at `head`; the free space after them can also be
//! written out of order ([`Ring::write_at`]) and made readable later ([`Ring::commit`]), which is
//! how the receive side stores segments that arrive beyond RCV.NXT (RFC 9293 §3.10.7.4, "segment
//! text"). [`Ring::clear`] makes a ring reusable by the slot's next connection without
//! touching the allocator. Which bytes are in flight, acknowledged or in order is the
//! connection's business.
//!
//! An empty ring that was written to can hand its storage out ([`Ring::idle_storage`]) so that
//! the worker gives its pages back to the kernel while the connection is idle (the bypass
//! path's `idle_pages`): an idle connection then holds no resident buffer page. The arena
//! starts every chunk on a page boundary so that rings whose sizes are page multiples (the
//! defaults) own whole pages and share none with a neighbour.

use bytes::BytesMut;

#[cfg(test)]
thread_local! {
    /// Rings with storage allocated on this thread (tests: proves reuse does not allocate).
    pub static RING_ALLOCS: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

/// Storage for many rings of the same two sizes, handed out in pairs: a few large zeroed
/// allocations (at most [`RingArena::CHUNK`] bytes each, so that no single request is refused by
/// the kernel's overcommit heuristic), each split into rings without writing to it.
pub struct RingArena {
    chunk: BytesMut,
    send: usize,
    recv: usize,
    /// Pairs still to hand out.
    left: usize,
}

impl RingArena {
    /// Largest single allocation.
    pub const CHUNK: usize = 1 << 30;
    /// Alignment of every chunk's first ring (the page size of the machines tern runs on;
    /// a larger page only means an idle ring gives back fewer pages).
    pub const ALIGN: usize = 4096;

    /// An arena for `pairs` pairs of (`send`, `recv`)-byte rings.
    pub fn new(pairs: usize, send: usize, recv: usize) -> RingArena {
        RingArena {
            chunk: BytesMut::new(),
            send,
            recv,
            left: pairs,
        }
    }

    /// The next (send, receive) pair, or `None` once `pairs` were handed out.
    pub fn next_pair(&mut self) -> Option<(Ring, Ring)> {
        if self.left == 0 {
            return None;
        }
        let pair = self.send + self.recv;
        if self.chunk.len() < pair {
            let per_chunk = (Self::CHUNK / pair.max(1)).max(1);
            #[cfg(test)]
            RING_ALLOCS.with(|c| c.set(c.get() + 1));
            let len = per_chunk.min(self.left) * pair;
            let mut chunk = BytesMut::zeroed(len + Self::ALIGN);
            // The allocator's header puts the storage a few bytes past a page boundary: skip
            // to the next one, so rings start on page boundaries.
            let skip = chunk.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
            let _ = chunk.split_to(skip);
            chunk.truncate(len);
            self.chunk = chunk;
        }
        self.left -= 1;
        let tx = self.chunk.split_to(self.send);
        let rx = self.chunk.split_to(self.recv);
        Some((Ring::with_storage(tx), Ring::with_storage(rx)))
    }
}

/// A bounded byte ring. Not `Clone`: copying one would allocate.
pub struct Ring {
    /// The storage; its length is the capacity and never changes.
    buf: BytesMut,
    /// Index of the first readable byte; `< buf.len()` (or 0 when the capacity is 0).
    head: usize,
    /// Readable bytes, `<= buf.len()`.
    len: usize,
    /// Written to since the storage was last handed out by [`Ring::idle_storage`] (or since
    /// it was made): only then may its pages be resident.
    touched: bool,
}

impl core::fmt::Debug for Ring {
    /// Sizes only: the contents would flood a log line.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.buf.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Ring {
    /// An empty ring of `capacity` bytes (the only allocation it ever makes).
    pub fn new(capacity: usize) -> Ring {
        #[cfg(test)]
        RING_ALLOCS.with(|c| c.set(c.get() + u64::from(capacity > 0)));
        Ring::with_storage(BytesMut::zeroed(capacity))
    }

    /// An empty ring over `storage` (its length is the capacity; its bytes are never read
    /// before they are written).
    pub fn with_storage(storage: BytesMut) -> Ring {
        Ring {
            buf: storage,
            head: 0,
            len: 0,
            touched: false,
        }
    }

    /// Empties the ring for reuse by another connection. The storage is kept (no allocation);
    /// the old bytes stay in it but are unreadable until written again.
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// The whole storage, when nothing is readable and bytes were written since the last call:
    /// the caller may give its pages back to the kernel (they read as zeros afterwards; the
    /// ring never reads a byte it did not write). The head goes back to the start, so the next
    /// bytes land on the first pages again. The caller must know that nothing was written past
    /// the readable bytes either (out-of-order data: the connection's reassembly is empty).
    pub fn idle_storage(&mut self) -> Option<&mut [u8]> {
        if self.len != 0 || !self.touched {
            return None;
        }
        self.head = 0;
        self.touched = false;
        Some(&mut self.buf[..])
    }

    /// Whether bytes were written since the storage was last handed out (its pages may be
    /// resident).
    pub fn is_touched(&self) -> bool {
        self.touched
    }

    /// Address of the storage, so tests can tell that a reused ring kept its buffer.
    #[cfg(test)]
    pub fn storage_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }

    /// Total capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Readable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is readable.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that can still be appended.
    pub fn free(&self) -> usize {
        self.buf.len() - self.len
    }

    /// Physical index of logical offset `off` from `head` (`off < capacity`).
    fn index(&self, off: usize) -> usize {
        let i = self.head + off;
        if i >= self.buf.len() {
            i - self.buf.len()
        } else {
            i
        }
    }

    /// Appends as much of `data` as fits and returns how much that was.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = self.write_at(self.len, data);
        self.len += n;
        n
    }

    /// Writes `data` at logical offset `off` from the first readable byte, without making it
    /// readable; bytes past the capacity are not written. Returns how many were written.
    pub fn write_at(&mut self, off: usize, data: &[u8]) -> usize {
        let cap = self.buf.len();
        if off >= cap {
            return 0;
        }
        let n = data.len().min(cap - off);
        self.touched |= n > 0;
        let start = self.index(off);
        let first = n.min(cap - start);
        self.buf[start..start + first].copy_from_slice(&data[..first]);
        self.buf[..n - first].copy_from_slice(&data[first..n]);
        n
    }

    /// The free space right after the readable bytes, as far as it is contiguous: write into it
    /// and [`commit`](Self::commit) what was written; after a wrap the rest of the free space
    /// is the next call's. Empty when the ring is full.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let cap = self.buf.len();
        if self.len >= cap {
            return &mut [];
        }
        let start = self.index(self.len);
        let end = if start < self.head { self.head } else { cap };
        self.touched = true;
        &mut self.buf[start..end]
    }

    /// Makes `n` more bytes (previously written with [`write_at`](Self::write_at)) readable;
    /// clamped to the free space.
    pub fn commit(&mut self, n: usize) {
        self.len += n.min(self.free());
    }

    /// The readable bytes from logical offset `off`, at most `max` of them, as two slices (the
    /// second is non-empty only when the range wraps).
    pub fn slices(&self, off: usize, max: usize) -> (&[u8], &[u8]) {
        if off >= self.len {
            return (&[], &[]);
        }
        let n = max.min(self.len - off);
        let start = self.index(off);
        let first = n.min(self.buf.len() - start);
        (&self.buf[start..start + first], &self.buf[..n - first])
    }

    /// Copies readable bytes from logical offset `off` into `out`; returns how many.
    pub fn read_at(&self, off: usize, out: &mut [u8]) -> usize {
        let (a, b) = self.slices(off, out.len());
        out[..a.len()].copy_from_slice(a);
        out[a.len()..a.len() + b.len()].copy_from_slice(b);
        a.len() + b.len()
    }

    /// Drops `n` bytes from the front (clamped to what is readable).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        if n > 0 {
            self.head = self.index(n);
            self.len -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_read_consume_wraps() {
        let mut r = Ring::new(8);
        assert_eq!(r.push(b"abcdef"), 6, "fits");
        r.consume(4);
        assert_eq!(r.push(b"ghijklmn"), 6, "only the free space is taken");
        assert_eq!(r.len(), 8, "full");
        let (a, b) = r.slices(0, 8);
        assert_eq!((a, b), (&b"efgh"[..], &b"ijkl"[..]), "wrapped slices");
        let mut out = [0u8; 5];
        assert_eq!(r.read_at(1, &mut out), 5, "read from an offset");
        assert_eq!(&out, b"fghij", "bytes across the wrap");
        r.consume(100);
        assert!(r.is_empty(), "consume clamps");
    }

    #[test]
    fn arena_hands_out_disjoint_pairs_of_the_right_sizes() {
        let mut arena = RingArena::new(3, 8, 16);
        let mut pairs: Vec<(Ring, Ring)> = std::iter::from_fn(|| arena.next_pair()).collect();
        assert_eq!(pairs.len(), 3, "as many pairs as asked for");
        for (i, (tx, rx)) in pairs.iter_mut().enumerate() {
            assert_eq!((tx.capacity(), rx.capacity()), (8, 16));
            assert_eq!(tx.push(&[i as u8; 8]), 8);
            assert_eq!(rx.push(&[0x10 + i as u8; 16]), 16);
        }
        // No pair's bytes overwrote another's.
        for (i, (tx, rx)) in pairs.iter().enumerate() {
            assert_eq!(tx.slices(0, 8), (&[i as u8; 8][..], &[][..]));
            assert_eq!(rx.slices(0, 16), (&[0x10 + i as u8; 16][..], &[][..]));
        }
    }

    #[test]
    fn spare_space_is_written_in_place_across_the_wrap() {
        let mut r = Ring::new(8);
        assert_eq!(r.spare_mut().len(), 8, "empty: all of it");
        r.push(b"abcdef");
        r.consume(4);
        // Readable "ef" at 4..6; free: 6..8, then 0..4 after the wrap.
        let spare = r.spare_mut();
        assert_eq!(spare.len(), 2, "up to the end of the storage");
        spare.copy_from_slice(b"gh");
        r.commit(2);
        let spare = r.spare_mut();
        assert_eq!(
            spare.len(),
            4,
            "then from the start up to the readable bytes"
        );
        spare[..3].copy_from_slice(b"ijk");
        r.commit(3);
        assert_eq!(r.spare_mut().len(), 1, "what is left before the head");
        let mut out = [0u8; 7];
        assert_eq!(r.read_at(0, &mut out), 7);
        assert_eq!(&out, b"efghijk", "in order across the wrap");
        r.push(b"l");
        assert!(r.spare_mut().is_empty(), "full");
    }

    #[test]
    fn out_of_order_write_then_commit() {
        let mut r = Ring::new(8);
        r.push(b"ab");
        r.consume(2);
        assert_eq!(r.write_at(3, b"xyz"), 3, "beyond the readable bytes");
        assert_eq!(r.slices(0, 8).0.len(), 0, "not readable yet");
        assert_eq!(r.write_at(0, b"uvw"), 3, "fill the gap");
        r.commit(6);
        let mut out = [0u8; 8];
        assert_eq!(r.read_at(0, &mut out), 6, "readable after commit");
        assert_eq!(&out[..6], b"uvwxyz", "in order");
        assert_eq!(r.write_at(8, b"q"), 0, "past the capacity");
        assert_eq!(Ring::new(0).push(b"a"), 0, "zero capacity");
    }
}
