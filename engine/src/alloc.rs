//! Free-space management: an in-memory bitmap of physical blocks (1 bit per 4 KiB block, so
//! 32 MiB of RAM per TiB of pool), rebuilt from the block maps when the pool opens.
//! Freed blocks are not reusable until the metadata that dropped them is durable and every
//! request that might still touch them has completed ([`Reclaim`]).

use std::collections::{BTreeMap, VecDeque};

/// Bitmap allocator with a next-fit cursor, so that sequential allocations get contiguous runs.
pub struct Allocator {
    words: Vec<u64>,
    total: u64,
    used: u64,
    cursor: u64,
}

impl Allocator {
    pub fn new(total_blocks: u64) -> Allocator {
        let nwords = total_blocks.div_ceil(64) as usize;
        let mut words = vec![0u64; nwords];
        // Bits past the end are permanently "used".
        let tail = total_blocks % 64;
        if tail != 0 {
            if let Some(last) = words.last_mut() {
                *last = !0u64 << tail;
            }
        }
        Allocator { words, total: total_blocks, used: 0, cursor: 0 }
    }

    pub fn total(&self) -> u64 {
        self.total
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn free(&self) -> u64 {
        self.total - self.used
    }

    pub fn is_used(&self, pba: u64) -> bool {
        pba >= self.total || self.words[(pba / 64) as usize] & (1 << (pba % 64)) != 0
    }

    /// Mark a block used while rebuilding. Returns false if it already was (double reference).
    pub fn mark_used(&mut self, pba: u64) -> bool {
        if pba >= self.total {
            return false;
        }
        let w = &mut self.words[(pba / 64) as usize];
        let bit = 1u64 << (pba % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.used += 1;
        true
    }

    /// Allocate one block, preferring `hint` (the block after the caller's previous one) so
    /// that a multi-block write lands contiguously.
    pub fn alloc_one(&mut self, hint: Option<u64>) -> Option<u64> {
        if let Some(h) = hint {
            if h < self.total && !self.is_used(h) {
                self.mark_used(h);
                return Some(h);
            }
        }
        if self.used >= self.total {
            return None;
        }
        let nwords = self.words.len();
        let start = (self.cursor / 64) as usize;
        for i in 0..=nwords {
            let wi = (start + i) % nwords;
            let w = self.words[wi];
            if w != !0u64 {
                let bit = (!w).trailing_zeros() as u64;
                let pba = wi as u64 * 64 + bit;
                if pba < self.total {
                    self.mark_used(pba);
                    self.cursor = pba + 1;
                    return Some(pba);
                }
            }
        }
        None
    }

    /// Return a block to the free pool.
    pub fn release(&mut self, pba: u64) {
        debug_assert!(self.is_used(pba), "double free of block {pba}");
        if pba < self.total {
            let w = &mut self.words[(pba / 64) as usize];
            let bit = 1u64 << (pba % 64);
            if *w & bit != 0 {
                *w &= !bit;
                self.used -= 1;
            }
        }
    }
}

/// Epoch-based deferred reuse. Every data-path request enters the current epoch before it looks
/// up the block map and leaves it when its I/O has completed. Blocks whose unmapping has become
/// durable are retired at the current epoch, which then advances; they are handed back to the
/// allocator only once no request from that epoch or an earlier one is still running. So a
/// request never reads or writes a block that has meanwhile been given to another volume.
#[derive(Default)]
pub struct Reclaim {
    epoch: u64,
    active: BTreeMap<u64, u64>,
    retired: VecDeque<(u64, Vec<u64>)>,
}

impl Reclaim {
    pub fn enter(&mut self) -> u64 {
        *self.active.entry(self.epoch).or_insert(0) += 1;
        self.epoch
    }

    /// Leave `epoch`; returns blocks that became reusable.
    pub fn exit(&mut self, epoch: u64, out: &mut Vec<u64>) {
        if let Some(c) = self.active.get_mut(&epoch) {
            *c -= 1;
            if *c == 0 {
                self.active.remove(&epoch);
            }
        }
        self.collect(out);
    }

    /// Retire blocks whose unmapping is durable; returns blocks that are reusable at once.
    pub fn retire(&mut self, blocks: Vec<u64>, out: &mut Vec<u64>) {
        if !blocks.is_empty() {
            self.retired.push_back((self.epoch, blocks));
            self.epoch += 1;
        }
        self.collect(out);
    }

    fn collect(&mut self, out: &mut Vec<u64>) {
        let oldest_active = self.active.keys().next().copied().unwrap_or(u64::MAX);
        while let Some((e, _)) = self.retired.front() {
            if *e < oldest_active {
                if let Some((_, b)) = self.retired.pop_front() {
                    out.extend(b);
                }
            } else {
                break;
            }
        }
    }

    pub fn pending_blocks(&self) -> u64 {
        self.retired.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_contiguous_and_full() {
        let mut a = Allocator::new(130);
        let mut prev = None;
        for i in 0..130 {
            let p = a.alloc_one(prev.map(|p: u64| p + 1)).unwrap();
            assert_eq!(p, i);
            prev = Some(p);
        }
        assert_eq!(a.alloc_one(None), None);
        assert_eq!(a.free(), 0);
        a.release(77);
        assert_eq!(a.alloc_one(None), Some(77));
        assert!(!a.mark_used(77));
    }

    #[test]
    fn reclaim_waits_for_older_requests() {
        let mut r = Reclaim::default();
        let mut out = vec![];
        let e0 = r.enter();
        r.retire(vec![1, 2], &mut out);
        assert!(out.is_empty(), "request from epoch 0 may still touch blocks 1, 2");
        let e1 = r.enter();
        r.exit(e0, &mut out);
        assert_eq!(out, vec![1, 2]);
        out.clear();
        r.retire(vec![3], &mut out);
        assert!(out.is_empty());
        r.exit(e1, &mut out);
        assert_eq!(out, vec![3]);
    }

    proptest::proptest! {
        #[test]
        fn alloc_release_model(ops in proptest::collection::vec((proptest::prelude::any::<bool>(), 0u64..200), 1..500)) {
            let mut a = Allocator::new(150);
            let mut model = std::collections::BTreeSet::new();
            for (alloc, x) in ops {
                if alloc {
                    match a.alloc_one(Some(x)) {
                        Some(p) => { proptest::prop_assert!(p < 150); proptest::prop_assert!(model.insert(p)); }
                        None => proptest::prop_assert_eq!(model.len(), 150),
                    }
                } else if let Some(&p) = model.iter().next() {
                    model.remove(&p);
                    a.release(p);
                }
                proptest::prop_assert_eq!(a.used(), model.len() as u64);
            }
        }
    }
}
