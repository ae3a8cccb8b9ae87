//! The driver's machine without sockets or root: scripted client and backend behaviour under
//! explicit time.

use super::*;

#[test]
fn slab_keys_carry_generations() {
    let mut slab: Slab<u32> = Slab::with_capacity(2);
    let a = slab.insert(1).expect("room");
    let b = slab.insert(2).expect("room");
    assert!(slab.insert(3).is_none(), "full at capacity");
    assert_eq!(slab.remove(a), Some(1));
    let c = slab.insert(4).expect("room again");
    assert_eq!(c.index, a.index, "the slot is reused");
    assert_ne!(c.gen, a.gen, "by a new generation");
    assert_eq!(slab.get(a), None, "the old key no longer reaches it");
    assert_eq!(slab.get(c), Some(&4));
    assert_eq!(slab.get(b), Some(&2));
}
