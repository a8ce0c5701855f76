//! [`LbaTable`]: the hash table behind a volume's map cache (lba -> [`CVal`]) and the pool's
//! seal cache (pba -> [`Seal`](crate::format::Seal)).
//!
//! Why not hashbrown: a Swiss table keeps its control bytes and its entries in two arrays, so a
//! lookup of a key that is not in the CPU cache costs two dependent memory misses (the control
//! group, then the entry). A 4 KiB random read over a large volume does exactly one such lookup,
//! and perf put 8% of the daemon's CPU per read on those two loads (61% of the function's
//! samples on the key compare, 32% on the control load). Here the entries themselves are the
//! table: open addressing with linear probing, the key inline, so a lookup usually touches one
//! cache line (two when an entry straddles lines or the probe runs on).
//!
//! - Keys are `u64` below [`EMPTY`] (the caller's keys are block numbers shifted right by the
//!   shard bits, far below it). Hashes come from [`LbaHash`], keyed per process, so a guest
//!   cannot aim its block numbers at one probe run.
//! - The load stays at most 3/4 (linear probing's probe runs grow fast above that: a miss
//!   scans about 8.5 slots at 3/4); the table doubles when an insert would pass it.
//! - Removal shifts the following entries of the run back (no tombstones), so lookups never
//!   slow down with churn. [`LbaTable::remove_any`] removes entries in slot order from a
//!   rotating cursor: the cache's eviction wants some entry, cheaply, not a particular one.

use crate::format::Seal;
use crate::volume::{CVal, LbaHash};

/// A value an [`LbaTable`] holds, with the filler of empty slots.
pub(crate) trait TableValue: Copy {
    const FILLER: Self;
}

impl TableValue for CVal {
    const FILLER: CVal = CVal::NONE;
}

impl TableValue for Seal {
    const FILLER: Seal = Seal { nonce: [0; 12], tag: [0; 16] };
}

/// The key of an empty slot.
pub(crate) const EMPTY: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Slot<V> {
    key: u64,
    val: V,
}

impl<V: TableValue> Slot<V> {
    const EMPTY: Slot<V> = Slot { key: EMPTY, val: V::FILLER };
}
/// Slots of the first allocation.
const MIN_SLOTS: usize = 16;

pub(crate) struct LbaTable<V = CVal> {
    slots: Box<[Slot<V>]>,
    len: usize,
    /// Where the next [`remove_any`](Self::remove_any) starts looking.
    cursor: usize,
    hash: LbaHash,
}

impl<V: TableValue> Default for LbaTable<V> {
    fn default() -> Self {
        LbaTable { slots: Box::new([]), len: 0, cursor: 0, hash: LbaHash::default() }
    }
}

impl<V: TableValue> LbaTable<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Entries the table holds before it grows.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.slots.len() / 4 * 3
    }

    /// Bytes of the slot array.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, key: u64) -> usize {
        self.hash.hash_u64(key) as usize & self.mask()
    }

    /// The slot holding `key`, if any.
    fn find(&self, key: u64) -> Option<usize> {
        debug_assert_ne!(key, EMPTY);
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(key);
        // The load is at most 3/4, so an empty slot ends every probe run.
        loop {
            let k = self.slots[i].key;
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, key: u64) -> Option<&V> {
        self.find(key).map(|i| &self.slots[i].val)
    }

    /// Start loading the cache line where a lookup of `key` begins, so that a [`get`](Self::get)
    /// a little later finds it in the CPU cache instead of waiting for memory.
    pub fn prefetch(&self, key: u64) {
        if self.len == 0 {
            return;
        }
        let slot: *const Slot<V> = &self.slots[self.home(key)];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint; it reads nothing into the program and cannot
        // fault, and the address is inside the slot array anyway. SSE is part of x86-64.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.find(key).map(|i| &mut self.slots[i].val)
    }

    /// Insert or replace; returns the value replaced.
    pub fn insert(&mut self, key: u64, val: V) -> Option<V> {
        assert_ne!(key, EMPTY, "LbaTable key out of range");
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let s = &mut self.slots[i];
            if s.key == key {
                return Some(std::mem::replace(&mut s.val, val));
            }
            if s.key == EMPTY {
                *s = Slot { key, val };
                self.len += 1;
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![Slot::<V>::EMPTY; n].into_boxed_slice());
        let mask = n - 1;
        for s in old.iter().filter(|s| s.key != EMPTY) {
            let mut i = self.home(s.key);
            while self.slots[i].key != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = *s;
        }
        self.cursor = 0;
    }

    /// Empty slot `hole` and close the gap: move later entries of the run back into it when
    /// their home slot allows (backward-shift deletion).
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.mask();
        self.slots[hole] = Slot::<V>::EMPTY;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j].key;
            if k == EMPTY {
                return;
            }
            // The entry at j may move to the hole if its home is not in (hole, j] (cyclically):
            // then every slot from its home to the hole is occupied and a lookup still finds it.
            let home = self.home(k);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                self.slots[j] = Slot::<V>::EMPTY;
                hole = j;
            }
        }
    }

    pub fn remove(&mut self, key: u64) -> Option<V> {
        let i = self.find(key)?;
        let v = self.slots[i].val;
        self.remove_at(i);
        Some(v)
    }

    /// Remove some entry (the first at or after a rotating cursor); false if the table is empty.
    pub fn remove_any(&mut self) -> bool {
        if self.len == 0 {
            return false;
        }
        let mask = self.mask();
        let mut i = self.cursor & mask;
        while self.slots[i].key == EMPTY {
            i = (i + 1) & mask;
        }
        self.remove_at(i);
        // A shifted entry may now sit at i: start there next time.
        self.cursor = i;
        true
    }

    pub fn clear(&mut self) {
        self.slots = Box::new([]);
        self.len = 0;
        self.cursor = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn v(i: u64) -> CVal {
        CVal { pba: i.wrapping_mul(7), birth: i }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        RemoveAny,
        Get(u64),
        Clear,
    }

    fn op(keys: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..keys, any::<u64>()).prop_map(|(k, x)| Op::Insert(k, x)),
            2 => (0..keys).prop_map(Op::Remove),
            2 => Just(Op::RemoveAny),
            3 => (0..keys).prop_map(Op::Get),
            1 => Just(Op::Clear),
        ]
    }

    /// Every key the model holds is found with its value, and nothing else is.
    fn agree(t: &LbaTable, m: &HashMap<u64, CVal>, keys: u64) {
        assert_eq!(t.len(), m.len());
        for k in 0..keys {
            assert_eq!(t.get(k), m.get(&k), "key {k}");
        }
        assert!(t.len() == 0 || t.len() * 4 <= t.slots.len() * 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Against std's HashMap. Few keys (dense collisions, long runs, wrap-around at the
        /// end of the array) and more keys (growth).
        #[test]
        fn behaves_like_a_hash_map(keys in prop_oneof![Just(24u64), Just(600u64)], ops in proptest::collection::vec(op(600), 1..400)) {
            let mut t = LbaTable::default();
            let mut m: HashMap<u64, CVal> = HashMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, x) => {
                        let k = k % keys;
                        prop_assert_eq!(t.insert(k, v(x)), m.insert(k, v(x)));
                    }
                    Op::Remove(k) => {
                        let k = k % keys;
                        prop_assert_eq!(t.remove(k), m.remove(&k));
                    }
                    Op::RemoveAny => {
                        let before = t.len();
                        prop_assert_eq!(t.remove_any(), before > 0);
                        // Find which key went: exactly one of the model's keys is gone.
                        let gone: Vec<u64> = m.keys().copied().filter(|k| t.get(*k).is_none()).collect();
                        prop_assert_eq!(gone.len(), usize::from(before > 0));
                        for k in gone {
                            m.remove(&k);
                        }
                    }
                    Op::Get(k) => {
                        let k = k % keys;
                        // A hint only: safe on any table (empty, cleared, full) and any key.
                        t.prefetch(k);
                        prop_assert_eq!(t.get(k), m.get(&k));
                    }
                    Op::Clear => {
                        t.clear();
                        m.clear();
                    }
                }
                agree(&t, &m, keys);
            }
        }
    }

    #[test]
    fn remove_any_drains_the_table_and_get_mut_changes_in_place() {
        let mut t = LbaTable::default();
        for k in 0..1000 {
            t.insert(k * 13, v(k));
        }
        assert_eq!(t.len(), 1000);
        assert!(t.capacity() >= 1000 && t.bytes() == t.slots.len() * 24);
        *t.get_mut(13).expect("present") = v(5);
        assert_eq!(t.get(13), Some(&v(5)));
        let mut n = 0;
        while t.remove_any() {
            n += 1;
        }
        assert_eq!((n, t.len()), (1000, 0));
        assert!((0..1000).all(|k| t.get(k * 13).is_none()));
    }
}
