//! Frames going home: a single-producer single-consumer ring of frame indices from one worker to
//! another, lock-free.
//!
//! Every UMEM frame has a home worker (the one whose range of the UMEM it lies in, see
//! `xsk`). A frame can end up at another worker — it arrived on a socket of that worker from a
//! fill ring its home filled, or its transmission completed on a completion ring another worker
//! owns — and that worker sends the index back home on the ring for the pair. Only indices move
//! (4 bytes), never packet bytes.
//!
//! A ring holds at least as many entries as a worker has frames, and a frame is in at most one
//! place, so a push never finds the ring full. Producer and consumer each keep a cached copy of
//! the other side's position and publish their own once per batch (one release store), so a
//! batch costs one shared cache-line write per side.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Keeps the producer's and the consumer's positions on separate cache lines.
#[repr(align(64))]
struct Padded(AtomicU32);

struct Ring {
    slots: Box<[AtomicU32]>,
    mask: u32,
    /// Next slot the consumer reads (free-running, wraps).
    head: Padded,
    /// Next slot the producer writes (free-running, wraps); slots before it are published.
    tail: Padded,
}

/// Makes a ring with room for at least `capacity` indices.
pub fn ring(capacity: u32) -> (Producer, Consumer) {
    let size = capacity.max(2).next_power_of_two();
    let ring = Arc::new(Ring {
        slots: (0..size).map(|_| AtomicU32::new(0)).collect(),
        mask: size - 1,
        head: Padded(AtomicU32::new(0)),
        tail: Padded(AtomicU32::new(0)),
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            head: 0,
            published: 0,
        },
        Consumer { ring, head: 0 },
    )
}

/// The sending end (the worker that found a frame of another home).
pub struct Producer {
    ring: Arc<Ring>,
    /// Local write position, ahead of the published one by the unpublished pushes.
    tail: u32,
    /// Cached consumer position.
    head: u32,
    /// Position last published.
    published: u32,
}

impl Producer {
    /// Queues `index` (visible to the consumer after [`Producer::publish`]).
    pub fn push(&mut self, index: u32) {
        let size = self.ring.mask + 1;
        if self.tail.wrapping_sub(self.head) >= size {
            self.head = self.ring.head.0.load(Ordering::Acquire);
            // A frame is in one place at a time and the ring holds a worker's every frame.
            assert!(
                self.tail.wrapping_sub(self.head) < size,
                "frame return ring full: more frames in flight than a worker has"
            );
        }
        self.ring.slots[(self.tail & self.ring.mask) as usize].store(index, Ordering::Relaxed);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the pushed indices visible to the consumer (one release store).
    pub fn publish(&mut self) {
        if self.published != self.tail {
            self.ring.tail.0.store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// Pushes not yet published.
    pub fn unpublished(&self) -> u32 {
        self.tail.wrapping_sub(self.published)
    }
}

/// The receiving end (the frames' home).
pub struct Consumer {
    ring: Arc<Ring>,
    /// Local read position.
    head: u32,
}

impl Consumer {
    /// Takes every published index, calling `f` for each; returns how many.
    pub fn drain(&mut self, mut f: impl FnMut(u32)) -> u32 {
        let tail = self.ring.tail.0.load(Ordering::Acquire);
        let n = tail.wrapping_sub(self.head);
        while self.head != tail {
            f(self.ring.slots[(self.head & self.ring.mask) as usize].load(Ordering::Relaxed));
            self.head = self.head.wrapping_add(1);
        }
        if n > 0 {
            self.ring.head.0.store(self.head, Ordering::Release);
        }
        n
    }

    /// Whether published indices are waiting.
    pub fn is_empty(&self) -> bool {
        self.ring.tail.0.load(Ordering::Acquire) == self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_arrive_in_order_after_publish() {
        let (mut tx, mut rx) = ring(5);
        tx.push(7);
        tx.push(9);
        assert_eq!(tx.unpublished(), 2);
        assert!(rx.is_empty(), "nothing is visible before publish");
        assert_eq!(rx.drain(|_| panic!("unpublished index seen")), 0);
        tx.publish();
        let mut got = Vec::new();
        assert_eq!(rx.drain(|i| got.push(i)), 2);
        assert_eq!(got, [7, 9]);
        assert!(rx.is_empty());
    }

    #[test]
    fn wraps_around_many_times_across_threads() {
        const N: u32 = 200_000;
        let (mut tx, mut rx) = ring(8);
        let consumer = std::thread::spawn(move || {
            let mut next = 0;
            while next < N {
                rx.drain(|i| {
                    assert_eq!(i, next, "out of order");
                    next += 1;
                });
            }
        });
        // In flight never exceeds the ring size (8): the producer waits for the consumer.
        let mut sent = 0;
        while sent < N {
            let in_flight = sent - tx.ring.head.0.load(Ordering::Acquire);
            for _ in 0..(8 - in_flight).min(N - sent) {
                tx.push(sent);
                sent += 1;
            }
            tx.publish();
        }
        consumer.join().expect("consumer");
    }

    #[test]
    #[should_panic(expected = "ring full")]
    fn overfilling_is_caught() {
        let (mut tx, _rx) = ring(2);
        for i in 0..3 {
            tx.push(i);
        }
    }
}
