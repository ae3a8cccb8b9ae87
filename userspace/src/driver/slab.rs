//! The connection table of a worker: a slab of fixed capacity whose entries never move (io_uring
//! operations point into them, e.g. a connect's socket address), addressed by a [`Key`] that
//! carries the entry's generation, so that a late completion for an earlier tenant of a slot is
//! recognised and dropped instead of being taken for the current one.

use crate::sys::uring::GEN_MASK;

/// A slot index and the generation of its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub index: u32,
    pub gen: u32,
}

pub struct Slab<T> {
    /// Allocated with its final capacity; never grows past it, so entries never move.
    entries: Vec<Option<(u32, T)>>,
    free: Vec<u32>,
    /// Worker-wide generation counter (24 bits, as in `user_data`): a slot's next tenant never
    /// has its previous tenant's generation unless 2^24 connections came and went while a
    /// completion was late.
    gen: u32,
    len: usize,
}

impl<T> Slab<T> {
    pub fn with_capacity(capacity: usize) -> Slab<T> {
        Slab {
            entries: Vec::with_capacity(capacity),
            free: Vec::new(),
            gen: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Entries occupied.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.entries.capacity()
    }

    /// Stores `value`; `None` (value dropped) when the slab is full.
    pub fn insert(&mut self, value: T) -> Option<Key> {
        self.insert_with(|_| value)
    }

    /// Stores the value `make` builds for its key; `None` when the slab is full.
    pub fn insert_with(&mut self, make: impl FnOnce(Key) -> T) -> Option<Key> {
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.entries.len() < self.entries.capacity() => {
                self.entries.push(None);
                (self.entries.len() - 1) as u32
            }
            None => return None,
        };
        self.gen = (self.gen + 1) & GEN_MASK;
        let key = Key {
            index,
            gen: self.gen,
        };
        self.entries[index as usize] = Some((key.gen, make(key)));
        self.len += 1;
        Some(key)
    }

    pub fn get(&self, key: Key) -> Option<&T> {
        match self.entries.get(key.index as usize) {
            Some(Some((gen, v))) if *gen == key.gen => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.entries.get_mut(key.index as usize) {
            Some(Some((gen, v))) if *gen == key.gen => Some(v),
            _ => None,
        }
    }

    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.entries.get_mut(key.index as usize)?;
        match slot {
            Some((gen, _)) if *gen == key.gen => {}
            _ => return None,
        }
        let (_, v) = slot.take()?;
        self.free.push(key.index);
        self.len -= 1;
        Some(v)
    }

    /// The keys of every occupied entry (a snapshot: the slab may change while they are used).
    pub fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.as_ref().map(|(gen, _)| Key {
                    index: i as u32,
                    gen: *gen,
                })
            })
            .collect()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().flatten().map(|(_, v)| v)
    }
}
