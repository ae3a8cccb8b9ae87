//! Frame ownership: who holds each UMEM frame, and the handle that makes holding one visible.
//!
//! A frame is an index into the interface's UMEM, and every frame has a **home**: the worker
//! whose range of the UMEM it lies in (`index / frames_per_worker`). Only the home changes a
//! frame's state, and from the home's point of view each of its frames is in exactly one of
//! four places ([`FrameState`]): its free list; lent out for receiving (posted to a fill ring of
//! a queue it owns, being written, waiting in an RX ring, or held by another worker that
//! received it); in its own hands (a [`Frame`] handle); or lent out for sending (in a TX ring,
//! on the wire, or waiting in a completion ring). [`FramePool`] keeps one state byte per frame
//! and a count per state; every transition names the state it expects to leave, and a debug
//! assertion catches a frame that is not there (a double use, a frame the kernel returned twice,
//! or one that was never given out).
//!
//! A frame that reaches a worker other than its home — received on that worker's socket from a
//! fill ring the home filled, or completed on a completion ring that worker owns — is held there
//! as a *foreign* frame (counted, not tracked per frame) and goes home through that pair's
//! return ring (`xsk::handoff`) when it is recycled or its transmission completes.
//! [`Ledger`] is one worker's view: its own pool, its foreign count and its return rings.
//!
//! A [`Frame`] handle is neither `Copy` nor `Clone`, and the only ways to end one are to recycle
//! it or to queue it for transmission, both of which consume it — so the compiler rules out
//! using a frame twice, and debug builds panic if a handle is dropped instead (a leak). Release
//! builds keep the state bytes and counts (one byte store per transition), so
//! [`Ledger::account`] is exact in every build.
//!
//! Not here: the rings themselves (`socket`), the memory (`umem`).

use std::fmt;

use super::handoff::{Consumer, Producer};

/// Where one frame is, as its home sees it. `repr(u8)`: the pool keeps one byte per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameState {
    /// On the home's free list: nobody uses it.
    Free,
    /// Lent out for receiving: in a fill ring, being written, in an RX ring, or held by the
    /// worker that received it if that is not the home.
    Fill,
    /// Held by the home as a [`Frame`] handle (received, or allocated for building a frame).
    Held,
    /// Lent out for sending: in a TX ring, on the wire, or in a completion ring.
    Tx,
}

/// A worker's frames by place (`free + fill + held + tx == total`, over its own range), plus
/// the frames of other homes it holds right now (`foreign`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FrameAccount {
    pub free: u32,
    pub fill: u32,
    pub held: u32,
    pub tx: u32,
    pub total: u32,
    /// Frames of other workers held by this one (received from their fill rings).
    pub foreign: u32,
}

impl FrameAccount {
    /// Every frame is free or lent out for receiving, nothing is held (own or foreign) and
    /// nothing is on its way out. The state of a quiet worker.
    pub fn all_home(&self) -> bool {
        self.held == 0 && self.tx == 0 && self.foreign == 0 && self.free + self.fill == self.total
    }
}

/// A frame held by the worker. Obtained from a receive or from an allocation; ended only by
/// recycling it or queueing it for transmission (both consume the handle).
///
/// `offset..offset + len` within the frame's chunk is the packet; the chunk is
/// `frame_size` bytes long, so a reply may be up to `frame_size - offset` bytes.
#[must_use = "a frame must be transmitted or recycled, otherwise it leaks from the pool"]
pub struct Frame {
    /// Which UMEM (one per interface, numbered per process) the index refers to.
    umem: u32,
    index: u32,
    /// Where the packet starts within the chunk (the kernel puts received packets after its
    /// XDP headroom; allocated frames start at 0).
    offset: u32,
    /// Packet length in bytes.
    len: u32,
}

impl Frame {
    /// The frame's index in the UMEM.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Where the packet starts within the frame's chunk.
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// The packet length.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True for a zero-length packet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the packet length (for a frame being built or rewritten). The caller checks it
    /// against the chunk (`TxQueue` does before a send).
    pub(crate) fn set_len(&mut self, len: u32) {
        self.len = len;
    }

    fn new(umem: u32, index: u32, offset: u32, len: u32) -> Frame {
        Frame {
            umem,
            index,
            offset,
            len,
        }
    }

    /// The UMEM the frame belongs to.
    pub(crate) fn umem(&self) -> u32 {
        self.umem
    }

    /// Ends the handle without the leak check: the caller has just recorded where it went.
    fn into_index(self) -> u32 {
        let index = self.index;
        std::mem::forget(self);
        index
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame#{}[{}+{}]", self.index, self.offset, self.len)
    }
}

#[cfg(debug_assertions)]
impl Drop for Frame {
    fn drop(&mut self) {
        // During unwinding a second panic would abort and hide the first one.
        if !std::thread::panicking() {
            panic!(
                "UMEM frame {} dropped while held: recycle or transmit it (a leak)",
                self.index
            );
        }
    }
}

/// The state of every frame of one worker's range of the UMEM, and its free list.
pub struct FramePool {
    /// The UMEM's number (stamped on every `Frame`).
    umem: u32,
    /// Index of the first frame of the range.
    base: u32,
    /// One entry per frame of the range; the only record of where a frame is.
    states: Box<[FrameState]>,
    /// Indices of the frames in state `Free`, used as a stack so the most recently used (cache
    /// warm) frame is reused first. Its length is the `free` count.
    free: Vec<u32>,
    /// Number of frames in state `Fill`.
    fill: u32,
    /// Number of frames in state `Held`.
    held: u32,
    /// Number of frames in state `Tx`.
    tx: u32,
    frame_size: u32,
}

impl fmt::Debug for FramePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramePool")
            .field("account", &self.account())
            .field("frame_size", &self.frame_size)
            .finish()
    }
}

impl FramePool {
    /// Frames `base..base + frames` of `frame_size` bytes of UMEM number `umem`, all free.
    pub fn new(umem: u32, base: u32, frames: u32, frame_size: u32) -> FramePool {
        assert!(frames > 0, "a UMEM range needs at least one frame");
        assert!(
            frame_size.is_power_of_two(),
            "frame size {frame_size} is not a power of two"
        );
        FramePool {
            umem,
            base,
            states: vec![FrameState::Free; frames as usize].into_boxed_slice(),
            // Reversed so that the lowest frame is handed out first.
            free: (base..base + frames).rev().collect(),
            fill: 0,
            held: 0,
            tx: 0,
            frame_size,
        }
    }

    pub fn total(&self) -> u32 {
        self.states.len() as u32
    }

    pub fn frame_size(&self) -> u32 {
        self.frame_size
    }

    pub fn free_len(&self) -> u32 {
        self.free.len() as u32
    }

    /// Where each frame is, counted.
    pub fn account(&self) -> FrameAccount {
        FrameAccount {
            free: self.free.len() as u32,
            fill: self.fill,
            held: self.held,
            tx: self.tx,
            total: self.total(),
            foreign: 0,
        }
    }

    /// The state of one frame of the range (tests and assertions).
    pub fn state(&self, index: u32) -> FrameState {
        self.states[(index - self.base) as usize]
    }

    /// Whether `index` lies in this pool's range.
    pub fn owns(&self, index: u32) -> bool {
        index.wrapping_sub(self.base) < self.total()
    }

    /// The UMEM address of the start of a frame's chunk.
    pub fn chunk_addr(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.frame_size)
    }

    /// Splits a UMEM address (as found in RX and completion descriptors) into the frame index
    /// and the offset within its chunk.
    pub fn split_addr(&self, addr: u64) -> (u32, u32) {
        let index = addr / u64::from(self.frame_size);
        let offset = addr % u64::from(self.frame_size);
        (index as u32, offset as u32)
    }

    /// Records a move of frame `index` from `from` to `to`, checking where it was.
    #[inline]
    fn transition(&mut self, index: u32, from: FrameState, to: FrameState) {
        let state = &mut self.states[(index - self.base) as usize];
        debug_assert_eq!(
            *state, from,
            "UMEM frame {index} moving to {to:?} is in {state:?}, expected {from:?} \
             (double use, or the kernel returned a frame it did not have)"
        );
        *state = to;
        match from {
            FrameState::Free => {}
            FrameState::Fill => self.fill -= 1,
            FrameState::Held => self.held -= 1,
            FrameState::Tx => self.tx -= 1,
        }
        match to {
            FrameState::Free => self.free.push(index),
            FrameState::Fill => self.fill += 1,
            FrameState::Held => self.held += 1,
            FrameState::Tx => self.tx += 1,
        }
    }

    /// Takes a free frame to post on a fill ring; returns its chunk address.
    pub fn pop_for_fill(&mut self) -> Option<u64> {
        let index = self.free.pop()?;
        self.transition(index, FrameState::Free, FrameState::Fill);
        Some(self.chunk_addr(index))
    }

    /// Takes a free frame to build a packet in. Its packet starts at offset 0 with length 0.
    pub fn alloc(&mut self) -> Option<Frame> {
        let index = self.free.pop()?;
        self.transition(index, FrameState::Free, FrameState::Held);
        Some(Frame::new(self.umem, index, 0, 0))
    }

    /// The kernel returned one of this range's frames in an RX descriptor: it moves from the
    /// receive side to the home.
    pub fn received(&mut self, index: u32, offset: u32, len: u32) -> Frame {
        self.transition(index, FrameState::Fill, FrameState::Held);
        Frame::new(self.umem, index, offset, len)
    }

    /// The worker is done with a frame: back to the free list.
    pub fn recycle(&mut self, frame: Frame) {
        debug_assert_eq!(frame.umem, self.umem, "{frame:?} is from another UMEM");
        let index = frame.into_index();
        self.transition(index, FrameState::Held, FrameState::Free);
    }

    /// A frame was written into a TX ring: it belongs to the kernel until its completion.
    /// Returns the descriptor address and length.
    pub fn sent(&mut self, frame: Frame) -> (u64, u32) {
        debug_assert_eq!(frame.umem, self.umem, "{frame:?} is from another UMEM");
        let addr = self.chunk_addr(frame.index) + u64::from(frame.offset);
        let len = frame.len;
        let index = frame.into_index();
        self.transition(index, FrameState::Held, FrameState::Tx);
        (addr, len)
    }

    /// A frame lent out came back: its transmission completed (whoever sent it), or the worker
    /// that received it returned it. It was lent for receiving or for sending.
    pub fn came_home(&mut self, index: u32) {
        let from = self.states[(index - self.base) as usize];
        debug_assert!(
            matches!(from, FrameState::Fill | FrameState::Tx),
            "UMEM frame {index} came home but was {from:?} (double use)"
        );
        self.transition(index, from, FrameState::Free);
    }
}

/// One worker's frames: its own range (the pool), the foreign frames it holds, and the rings
/// that carry frames home.
pub struct Ledger {
    pool: FramePool,
    /// Frames per worker range: `index / frames_per_worker` is a frame's home.
    frames_per_worker: u32,
    /// Return ring to each other worker (`None` at this worker's own index).
    out: Vec<Option<Producer>>,
    /// Return ring from each other worker (`None` at this worker's own index).
    inbound: Vec<Option<Consumer>>,
    /// Frames of other homes this worker holds as [`Frame`] handles.
    foreign: u32,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("account", &self.account())
            .finish_non_exhaustive()
    }
}

impl Ledger {
    pub fn new(
        pool: FramePool,
        out: Vec<Option<Producer>>,
        inbound: Vec<Option<Consumer>>,
    ) -> Ledger {
        Ledger {
            frames_per_worker: pool.total(),
            pool,
            out,
            inbound,
            foreign: 0,
        }
    }

    #[cfg(test)]
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    pub fn account(&self) -> FrameAccount {
        FrameAccount {
            foreign: self.foreign,
            ..self.pool.account()
        }
    }

    fn home(&self, index: u32) -> usize {
        (index / self.frames_per_worker) as usize
    }

    /// A frame from one of this worker's RX rings.
    pub fn received(&mut self, addr: u64, len: u32) -> Frame {
        let (index, offset) = self.pool.split_addr(addr);
        if self.pool.owns(index) {
            self.pool.received(index, offset, len)
        } else {
            self.foreign += 1;
            Frame::new(self.pool.umem, index, offset, len)
        }
    }

    /// A free frame of this worker's own range, to build a packet in.
    pub fn alloc(&mut self) -> Option<Frame> {
        self.pool.alloc()
    }

    /// Done with a frame: back to the free list, or home.
    pub fn recycle(&mut self, frame: Frame) {
        debug_assert_eq!(frame.umem, self.pool.umem, "{frame:?} is from another UMEM");
        if self.pool.owns(frame.index) {
            self.pool.recycle(frame);
        } else {
            self.foreign -= 1;
            let home = self.home(frame.index);
            let index = frame.into_index();
            self.push_home(home, index);
        }
    }

    /// A frame was written into a TX ring; returns the descriptor address and length. Its
    /// completion brings it home (directly, or through another worker's return ring).
    pub fn sent(&mut self, frame: Frame) -> (u64, u32) {
        debug_assert_eq!(frame.umem, self.pool.umem, "{frame:?} is from another UMEM");
        if self.pool.owns(frame.index) {
            self.pool.sent(frame)
        } else {
            self.foreign -= 1;
            let addr = self.pool.chunk_addr(frame.index) + u64::from(frame.offset);
            let len = frame.len;
            frame.into_index();
            (addr, len)
        }
    }

    /// A completion descriptor from a completion ring this worker owns.
    pub fn completed(&mut self, addr: u64) {
        let (index, _) = self.pool.split_addr(addr);
        if self.pool.owns(index) {
            self.pool.came_home(index);
        } else {
            let home = self.home(index);
            self.push_home(home, index);
        }
    }

    fn push_home(&mut self, home: usize, index: u32) {
        match self.out.get_mut(home) {
            Some(Some(ring)) => ring.push(index),
            _ => panic!("UMEM frame {index} has no home worker {home}"),
        }
    }

    /// Takes back the frames other workers returned. Returns how many.
    pub fn drain_returns(&mut self) -> u32 {
        let Ledger { pool, inbound, .. } = self;
        let mut n = 0;
        for ring in inbound.iter_mut().flatten() {
            n += ring.drain(|index| pool.came_home(index));
        }
        n
    }

    /// Makes this turn's returns visible to their homes. Returns a bit mask of the homes that
    /// got new returns (bit `w` for worker `w`; there are at most 64 workers).
    pub fn publish_returns(&mut self) -> u64 {
        let mut homes = 0;
        for (home, ring) in self.out.iter_mut().enumerate() {
            if let Some(ring) = ring {
                if ring.unpublished() > 0 {
                    ring.publish();
                    homes |= 1u64 << home;
                }
            }
        }
        homes
    }

    /// Whether returns from other workers are waiting.
    pub fn returns_waiting(&self) -> bool {
        self.inbound.iter().flatten().any(|ring| !ring.is_empty())
    }

    /// Whether `frame` may be read and written by this worker now (debug checks).
    pub fn holds(&self, frame: &Frame) -> bool {
        frame.umem == self.pool.umem && !self.pool.owns(frame.index)
            || self.pool.state(frame.index) == FrameState::Held
    }

    pub fn frame_size(&self) -> u32 {
        self.pool.frame_size()
    }

    /// The UMEM's number.
    pub fn umem(&self) -> u32 {
        self.pool.umem
    }

    pub fn free_len(&self) -> u32 {
        self.pool.free_len()
    }

    /// Takes a free frame of the own range to post on a fill ring.
    pub fn pop_for_fill(&mut self) -> Option<u64> {
        self.pool.pop_for_fill()
    }
}

#[cfg(test)]
mod tests {
    use super::super::handoff;
    use super::*;

    #[test]
    fn every_transition_keeps_the_account_whole() {
        let mut pool = FramePool::new(0, 0, 8, 2048);
        assert_eq!(
            pool.account(),
            FrameAccount {
                free: 8,
                total: 8,
                ..FrameAccount::default()
            }
        );
        let a = pool.pop_for_fill().expect("a free frame");
        let b = pool.pop_for_fill().expect("a free frame");
        assert_eq!((a, b), (0, 2048), "frames are handed out lowest first");
        assert_eq!(pool.state(0), FrameState::Fill);

        // The kernel writes the packet after its headroom: the offset is kept.
        let (index, offset) = pool.split_addr(b + 256);
        let rx = pool.received(index, offset, 60);
        assert_eq!((rx.index(), rx.offset(), rx.len()), (1, 256, 60));
        assert_eq!(pool.state(1), FrameState::Held);
        let (addr, len) = pool.sent(rx);
        assert_eq!((addr, len), (2048 + 256, 60));
        assert_eq!(pool.account().tx, 1);
        pool.came_home(1);
        assert_eq!(pool.state(1), FrameState::Free);

        let mut built = pool.alloc().expect("a free frame");
        assert_eq!(built.index(), 1, "the last freed frame is reused first");
        built.set_len(42);
        pool.recycle(built);
        // A frame lent for receiving can come home without passing through this worker's hands
        // (another worker received it and returned it).
        pool.came_home(0);
        let acc = pool.account();
        assert!(acc.all_home(), "{acc:?}");
        assert_eq!(acc.free, 8);
    }

    #[test]
    fn exhausting_the_pool_is_not_an_error() {
        let mut pool = FramePool::new(0, 0, 2, 4096);
        let x = pool.alloc().expect("first");
        let y = pool.alloc().expect("second");
        assert!(pool.alloc().is_none(), "a third frame from a 2-frame pool");
        assert!(pool.pop_for_fill().is_none());
        let acc = pool.account();
        assert_eq!((acc.held, acc.free), (2, 0));
        assert!(!acc.all_home());
        pool.recycle(x);
        pool.recycle(y);
        assert!(pool.account().all_home());
    }

    /// Two workers with 4 frames each: worker 1 receives a frame of worker 0 (its fill ring fed
    /// the queue), recycles it, and the frame goes home through the return ring; a completion
    /// of worker 0's frame on a ring worker 1 owns goes home the same way.
    #[test]
    fn foreign_frames_go_home_through_the_return_ring() {
        let (to_0, from_1) = handoff::ring(4);
        let (to_1, from_0) = handoff::ring(4);
        let mut w0 = Ledger::new(
            FramePool::new(0, 0, 4, 2048),
            vec![None, Some(to_1)],
            vec![None, Some(from_1)],
        );
        let mut w1 = Ledger::new(
            FramePool::new(0, 4, 4, 2048),
            vec![Some(to_0), None],
            vec![Some(from_0), None],
        );
        assert_eq!(
            w1.pop_for_fill(),
            Some(4 * 2048),
            "worker 1's range starts at frame 4"
        );
        let addr = w0.pop_for_fill().expect("frame");
        let foreign = w1.received(addr + 256, 60);
        assert!(w1.holds(&foreign));
        assert_eq!(w1.account().foreign, 1);
        assert!(!w1.account().all_home());
        w1.recycle(foreign);
        assert_eq!(w1.account().foreign, 0);
        assert_eq!(w0.drain_returns(), 0, "not visible before publish");
        assert_eq!(w1.publish_returns(), 0b01, "worker 0 got a return");
        assert!(w0.returns_waiting());
        assert_eq!(w0.drain_returns(), 1);
        assert_eq!(w0.pool().state(0), FrameState::Free);

        // Worker 1 reflects a frame of worker 0 in place; the completion lands on a ring worker 1
        // owns and goes home.
        let addr = w0.pop_for_fill().expect("frame");
        let foreign = w1.received(addr + 256, 60);
        let (desc, _) = w1.sent(foreign);
        assert_eq!(desc, addr + 256);
        w1.completed(desc);
        w1.publish_returns();
        assert_eq!(w0.drain_returns(), 1);
        // One of worker 0's own transmissions completes on its own ring.
        let mut own = w0.alloc().expect("frame");
        own.set_len(60);
        let (desc, _) = w0.sent(own);
        w0.completed(desc);
        assert!(w0.account().all_home(), "{:?}", w0.account());
        assert_eq!(w0.account().free, 4);
        assert_eq!(w1.account().fill, 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "came home but was Free")]
    fn a_completion_for_a_free_frame_is_caught() {
        let mut pool = FramePool::new(0, 0, 4, 2048);
        // Nobody lent frame 2 out; a completion for it means someone double-used it.
        pool.came_home(2);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "expected Fill")]
    fn receiving_a_frame_never_posted_is_caught() {
        let mut pool = FramePool::new(0, 0, 4, 2048);
        let frame = pool.received(1, 256, 60);
        pool.recycle(frame);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped while held")]
    fn a_dropped_frame_is_caught() {
        let mut pool = FramePool::new(0, 0, 4, 2048);
        let frame = pool.alloc().expect("a free frame");
        drop(frame);
    }
}
