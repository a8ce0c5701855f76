//! In-memory state of one volume: its size, attachment and the block-map changes that are not
//! yet committed to RocksDB ("pending"). Pending changes are what makes the write path cheap:
//! a new mapping is recorded in memory when its data write completes and is committed by the
//! committer thread after an fdatasync of the data, so RocksDB never holds a mapping to data
//! that is not durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use crate::format::{map_key, MapEntry, MAP_KEY_LEN};

/// State of an uncommitted map change for one logical block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PState {
    /// Newly allocated; `writers` writes are in flight and none has completed yet, so the block
    /// still reads as zeros. `padded` of them are partial writes padded with zeros to the whole
    /// block; while one is in flight every other write to the block waits.
    Fresh { writers: u32, padded: u32 },
    /// At least one complete write has landed in `pba`; to be committed.
    Written,
    /// The mapping was removed (discard, write-zeroes, shrink); to be committed as a delete.
    Removed,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct PEntry {
    pub pba: u64,
    pub state: PState,
    /// Bumped on every change; the committer drops an entry only if it is unchanged.
    pub seq: u64,
}

#[derive(Default)]
pub(crate) struct Pending {
    pub map: HashMap<u64, PEntry>,
    /// Blocks this volume stopped referencing; reusable after the next commit (and reclaim).
    pub frees: Vec<u64>,
    pub seq: u64,
    /// Queues with a write waiting for a block of this volume to be established.
    pub waiters: Vec<std::sync::Arc<crate::io::QueueShared>>,
    /// Cache of committed mappings (lba -> pba, or [`UNMAPPED`]), so that the data path does not
    /// ask RocksDB for every request. Consulted only for blocks without a pending entry; updated
    /// by the commit for every block it changes, under this same lock.
    pub cache: std::collections::HashMap<u64, u64>,
    /// Bumped by every commit that changes this volume's committed map: a lookup made outside
    /// the lock may fill the cache only if no commit happened meanwhile.
    pub cache_gen: u64,
}

/// Cache value for a block known to have no committed mapping.
pub(crate) const UNMAPPED: u64 = u64::MAX;

/// The map cache's pool-wide budget in entries.
pub(crate) struct CacheBudget {
    pub cap: usize,
    pub used: std::sync::atomic::AtomicUsize,
}

impl CacheBudget {
    /// Bytes one cached entry costs, roughly (hashbrown: 16 bytes of key and value, a control
    /// byte, and load-factor slack).
    pub const ENTRY_BYTES: usize = 24;
}

impl Pending {
    /// Remember a committed mapping, within the pool-wide budget (evicting another entry of this
    /// volume when the budget is spent).
    pub fn cache_put(&mut self, lba: u64, pba: u64, budget: &CacheBudget) {
        use std::sync::atomic::Ordering::Relaxed;
        if budget.cap == 0 {
            return;
        }
        if let Some(v) = self.cache.get_mut(&lba) {
            *v = pba;
            return;
        }
        if budget.used.load(Relaxed) >= budget.cap {
            let Some(&victim) = self.cache.keys().next() else { return };
            self.cache.remove(&victim);
            budget.used.fetch_sub(1, Relaxed);
        }
        self.cache.insert(lba, pba);
        budget.used.fetch_add(1, Relaxed);
    }

    /// Drop the whole cache (volume deleted).
    pub fn cache_clear(&mut self, budget: &CacheBudget) {
        budget.used.fetch_sub(self.cache.len(), std::sync::atomic::Ordering::Relaxed);
        self.cache.clear();
    }

    pub fn set(&mut self, lba: u64, pba: u64, state: PState) {
        self.seq += 1;
        self.map.insert(lba, PEntry { pba, state, seq: self.seq });
    }
}

/// How a block resolved for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WBlock {
    pub pba: u64,
    /// Newly allocated by (or joined as a first write of) this request.
    pub fresh: bool,
    /// A partial first write: the whole block is written, zeros around the data.
    pub padded: bool,
}

/// How a block resolved for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadRes {
    Zero,
    At(u64),
}

/// Shared state of one volume.
pub struct VolumeState {
    pub(crate) id: u64,
    pub(crate) layer: u64,
    pub(crate) created_ns: u64,
    pub(crate) name: RwLock<String>,
    pub(crate) size_bytes: AtomicU64,
    /// Physical blocks this volume references (committed and pending).
    pub(crate) mapped_blocks: AtomicU64,
    pub(crate) pending: Mutex<Pending>,
    pub(crate) writers: AtomicU64,
    pub(crate) readers: AtomicU64,
    pub(crate) deleted: AtomicBool,
    pub(crate) resize_watchers: Mutex<Vec<Box<dyn Fn(u64) + Send + Sync>>>,
}

impl VolumeState {
    pub(crate) fn new(id: u64, layer: u64, name: String, size_bytes: u64, created_ns: u64) -> Self {
        VolumeState {
            id,
            layer,
            created_ns,
            name: RwLock::new(name),
            size_bytes: AtomicU64::new(size_bytes),
            mapped_blocks: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            writers: AtomicU64::new(0),
            readers: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            resize_watchers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn name(&self) -> String {
        self.name.read().map(|n| n.clone()).unwrap_or_default()
    }

    pub(crate) fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock means a thread panicked while holding it; the pending map is still
        // structurally valid (every mutation is a single insert), so keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn map_key(&self, lba: u64) -> [u8; MAP_KEY_LEN] {
        map_key(self.layer, lba)
    }

    pub(crate) fn notify_resize(&self, size: u64) {
        if let Ok(w) = self.resize_watchers.lock() {
            for f in w.iter() {
                f(size);
            }
        }
    }
}

/// A committed-map entry read from RocksDB, with its lba.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Committed {
    pub lba: u64,
    pub entry: MapEntry,
}
