//! io_uring resources a worker owns: the provided-buffer ring its receives draw from,
//! the pool of registered buffers its sends go out of, and the `user_data` encoding that ties a
//! completion back to its operation and connection.
//!
//! Both buffer areas are allocated once at start-up (anonymous mmap) and never grow: a worker's
//! buffer memory is fixed by its configuration. A receive buffer is lent to the kernel through
//! the ring and comes back in a completion; the worker copies it out at once and returns it, so
//! the ring only runs dry when more than its size of completions arrive in one batch. A send
//! slot is borrowed by one connection direction while it has bytes to send and returned as soon
//! as they are written, so idle connections hold none.
//!
//! Kernel interfaces: `IORING_REGISTER_PBUF_RING` (io_uring_register_buf_ring(3)),
//! `IORING_REGISTER_BUFFERS` with `IORING_OP_WRITE_FIXED`.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// Size of one receive buffer: a receive takes up to two TLS records' worth (fewer receives
/// per MiB; one buffer per receive keeps the session's bound).
pub const BUF_SIZE: usize = 32 * 1024;

/// Size of one send slot: a whole TLS record as it goes out (16 KiB of plaintext plus the
/// record's overhead) and then some, so a record does not straddle two sends.
pub const SLOT_SIZE: usize = 32 * 1024;

/// An anonymous, page-aligned, zeroed mapping that is unmapped on drop (memmap2). Populated
/// at once: a worker's buffer memory is resident from start-up, so memory use is predictable
/// and no receive pays a page fault. The kernel keeps raw pointers into it (registered buffers,
/// the buffer ring), so it is only ever accessed through `ptr`.
struct Mapping {
    /// Owns the mapping (unmapped when dropped).
    _map: memmap2::MmapMut,
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        let mut map = memmap2::MmapOptions::new().len(len).populate().map_anon()?;
        let ptr =
            NonNull::new(map.as_mut_ptr()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping {
            _map: map,
            ptr,
            len,
        })
    }
}

/// The provided-buffer ring receives draw from (one buffer group per worker).
pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    /// Our copy of the ring tail: the next index we publish a buffer at.
    tail: u16,
    pub group: u16,
}

impl BufRing {
    /// Allocates `entries` buffers (a power of two, ≤ 32768) and registers them as `group`.
    pub fn new(ring: &IoUring, entries: u16, group: u16) -> io::Result<BufRing> {
        assert!(
            entries.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let ring_map = Mapping::new(entries as usize * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(entries as usize * BUF_SIZE)?;
        // SAFETY: the ring memory is page aligned, sized for `entries` entries and lives as
        // long as `BufRing`, which unregisters it before unmapping (see Drop ordering notes in
        // the worker: the IoUring is dropped before the BufRing).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                ring_map.ptr.as_ptr() as u64,
                entries,
                group,
                0,
            )?;
        }
        let mut br = BufRing {
            ring: ring_map,
            bufs,
            entries,
            tail: 0,
            group,
        };
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn base(&self) -> *mut BufRingEntry {
        self.ring.ptr.as_ptr().cast()
    }

    /// Queues buffer `bid` at the tail (made visible to the kernel by `publish`).
    fn push(&mut self, bid: u16) {
        let mask = self.entries - 1;
        let idx = (self.tail & mask) as usize;
        // SAFETY: idx < entries, so the entry is inside the ring mapping; the kernel does not
        // read entries at or past the published tail, so writing this one does not race.
        let entry = unsafe { &mut *self.base().add(idx) };
        // SAFETY: bid < entries, so the buffer is inside the buffer mapping.
        let addr = unsafe { self.bufs.ptr.as_ptr().add(bid as usize * BUF_SIZE) };
        entry.set_addr(addr as u64);
        entry.set_len(BUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives inside the first ring entry (see io_uring_buf_ring), a
        // valid, aligned u16 for the life of the mapping; the kernel reads it with an acquire.
        let tail = unsafe { &*(BufRingEntry::tail(self.base()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`, as filled by a completion.
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        assert!(
            bid < self.entries && len <= BUF_SIZE,
            "buffer id or length out of range"
        );
        // SAFETY: bounds checked above; the kernel wrote this buffer before posting the
        // completion that named it, and does not touch it again until it is recycled.
        unsafe {
            std::slice::from_raw_parts(self.bufs.ptr.as_ptr().add(bid as usize * BUF_SIZE), len)
        }
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }
}

/// A slot of the [`SlotPool`], lent to one socket's queued bytes. Not `Copy` or `Clone`: the
/// one handle moves from the pool to its holder and back ([`SlotPool::give_back`] consumes it),
/// so a slot cannot be returned twice or written by two holders.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotId(u32);

/// Registered send buffers, registered as one fixed buffer (index 0) and carved into slots.
pub struct SlotPool {
    mem: Mapping,
    free: Vec<SlotId>,
    count: u32,
}

impl SlotPool {
    pub fn new(ring: &IoUring, count: u32) -> io::Result<SlotPool> {
        let mem = Mapping::new(count as usize * SLOT_SIZE)?;
        let iov = libc::iovec {
            iov_base: mem.ptr.as_ptr().cast(),
            iov_len: mem.len,
        };
        // SAFETY: the region stays mapped for as long as the ring exists (the worker drops the
        // ring before the pool); the kernel pins it.
        unsafe { ring.submitter().register_buffers(&[iov])? };
        Ok(SlotPool {
            mem,
            free: (0..count).rev().map(SlotId).collect(),
            count,
        })
    }

    /// Borrows a free slot, or `None` when all are in use (the caller waits for one).
    pub fn take(&mut self) -> Option<SlotId> {
        self.free.pop()
    }

    pub fn give_back(&mut self, id: SlotId) {
        debug_assert!(id.0 < self.count, "slot from another pool");
        self.free.push(id);
    }

    pub fn capacity(&self) -> usize {
        self.count as usize
    }

    pub fn in_use(&self) -> usize {
        (self.count as usize) - self.free.len()
    }

    pub fn slot_mut(&mut self, id: &SlotId) -> &mut [u8] {
        let id = id.0;
        assert!(id < self.count, "slot id out of range");
        // SAFETY: in bounds (checked), and `&mut self` guarantees no other reference from us;
        // the caller only writes to slots it does not have a write in flight for.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.ptr.as_ptr().add(id as usize * SLOT_SIZE),
                SLOT_SIZE,
            )
        }
    }

    /// Pointer to byte `offset` of slot `id`, for a WRITE_FIXED on registered buffer 0.
    pub fn ptr(&self, id: &SlotId, offset: usize) -> *const u8 {
        let id = id.0;
        assert!(
            id < self.count && offset <= SLOT_SIZE,
            "slot id or offset out of range"
        );
        // SAFETY: in bounds (checked).
        unsafe { self.mem.ptr.as_ptr().add(id as usize * SLOT_SIZE + offset) }
    }
}

/// What a completion is for. Stored in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Accept = 1,
    ClientRecv,
    ClientSend,
    BackendConnect,
    ConnectTimeout,
    BackendRecv,
    BackendSend,
    /// Completions of cancel requests; nothing to do.
    Cancel,
    /// A TX wakeup (zero-length SEND) on an AF_XDP socket; `index` is its fd.
    Kick,
    /// A client socket's window was full: wait until it takes bytes again (POLLOUT).
    ClientPoll,
    /// The same for a backend socket.
    BackendPoll,
    /// A worker's probe connect to a backend server marked down; `index` is the server.
    Probe,
    /// The probe's linked timeout.
    ProbeTimeout,
    /// A plain connection's client socket is readable: splice it → pipe
    /// (`driver::sock::splice`).
    ClientSpliceIn,
    /// A client socket is writable: splice pipe → it.
    ClientSpliceOut,
    /// Backend socket readable → pipe.
    BackendSpliceIn,
    /// Backend socket writable ← pipe.
    BackendSpliceOut,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::ClientRecv,
            3 => Op::ClientSend,
            4 => Op::BackendConnect,
            5 => Op::ConnectTimeout,
            6 => Op::BackendRecv,
            7 => Op::BackendSend,
            8 => Op::Cancel,
            9 => Op::Kick,
            10 => Op::ClientPoll,
            11 => Op::BackendPoll,
            12 => Op::Probe,
            13 => Op::ProbeTimeout,
            14 => Op::ClientSpliceIn,
            15 => Op::ClientSpliceOut,
            16 => Op::BackendSpliceIn,
            17 => Op::BackendSpliceOut,
            _ => return None,
        })
    }
}

/// `user_data` layout: op (8 bits) | generation (24 bits) | index (32 bits). The generation
/// tells a completion for a connection slot's earlier occupant from one for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserData {
    pub op: Op,
    pub gen: u32,
    pub index: u32,
}

pub const GEN_MASK: u32 = (1 << 24) - 1;

impl UserData {
    pub fn new(op: Op, gen: u32, index: u32) -> UserData {
        UserData {
            op,
            gen: gen & GEN_MASK,
            index,
        }
    }

    pub fn encode(self) -> u64 {
        ((self.op as u64) << 56) | (((self.gen & GEN_MASK) as u64) << 32) | self.index as u64
    }

    pub fn decode(v: u64) -> Option<UserData> {
        Some(UserData {
            op: Op::from_u8((v >> 56) as u8)?,
            gen: ((v >> 32) as u32) & GEN_MASK,
            index: v as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [Op::Accept, Op::ClientRecv, Op::BackendSend, Op::Cancel] {
            for (gen, index) in [(0, 0), (GEN_MASK, u32::MAX), (12345, 678)] {
                let ud = UserData::new(op, gen, index);
                assert_eq!(UserData::decode(ud.encode()), Some(ud));
            }
        }
        assert_eq!(UserData::decode(0), None);
    }

    #[test]
    fn generation_wraps_into_24_bits() {
        let ud = UserData::new(Op::ClientSend, GEN_MASK + 5, 1);
        assert_eq!(ud.gen, 4);
    }

    #[test]
    fn slot_pool_lends_each_slot_once() {
        let ring = IoUring::new(8).expect("io_uring");
        let mut pool = SlotPool::new(&ring, 4).expect("slot pool");
        let mut taken: Vec<_> = std::iter::from_fn(|| pool.take()).collect();
        taken.sort_unstable();
        assert_eq!(taken, (0..4).map(SlotId).collect::<Vec<_>>());
        assert_eq!(pool.in_use(), 4);
        let two = taken.remove(2);
        pool.slot_mut(&two)[0] = 7;
        pool.give_back(two);
        let again = pool.take().expect("the slot given back");
        assert_eq!(again, SlotId(2));
        assert_eq!(pool.slot_mut(&again)[0], 7);
    }

    #[test]
    fn buf_ring_registers_and_recycles() {
        let ring = IoUring::new(8).expect("io_uring");
        let mut br = BufRing::new(&ring, 8, 3).expect("buf ring");
        assert_eq!(br.get(7, 4), &[0, 0, 0, 0]);
        br.recycle(7);
        assert_eq!(br.tail, 9);
    }
}
