//! In-memory state of one volume: its size, attachment and the block-map changes that are not
//! yet committed to RocksDB ("pending"). Pending changes are what makes the write path cheap:
//! a new mapping is recorded in memory when its data write completes and is committed by the
//! committer thread after an fdatasync of the data, so RocksDB never holds a mapping to data
//! that is not durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use crate::format::{map_key, MapEntry, Seal, MAP_KEY_LEN};
use crate::lba_table::LbaTable;

/// Hasher for block numbers: a keyed multiply-fold (as in foldhash / ahash's fallback), much
/// cheaper than SipHash on the per-request path. Keys are guest-chosen block numbers, so the
/// key comes from a per-process random seed: a guest cannot aim collisions it cannot predict.
#[derive(Clone, Copy)]
pub(crate) struct LbaHash {
    k0: u64,
    k1: u64,
}

impl Default for LbaHash {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
        let &(k0, k1) = SEED.get_or_init(|| {
            let mut b = [0u8; 16];
            // SAFETY: getrandom writes at most 16 bytes into the 16-byte buffer.
            let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 16, 0) };
            if n != 16 {
                // No entropy: fall back to the address space layout and time (still unknown
                // to a guest).
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
                b[..8].copy_from_slice(&t.to_le_bytes());
                b[8..].copy_from_slice(&(&SEED as *const _ as u64).to_le_bytes());
            }
            (u64::from_le_bytes(b[..8].try_into().unwrap_or([1; 8])), u64::from_le_bytes(b[8..].try_into().unwrap_or([2; 8])) | 1)
        });
        LbaHash { k0, k1 }
    }
}

impl LbaHash {
    /// The hash of one `u64` (what hashing it through [`LbaHasher`] gives: the hasher applies
    /// this to each word, folded into the state so far).
    #[inline]
    pub fn hash_u64(&self, x: u64) -> u64 {
        let m = ((x ^ self.k0) as u128).wrapping_mul((self.k1 ^ 0x9E37_79B9_7F4A_7C15) as u128);
        (m as u64) ^ ((m >> 64) as u64)
    }
}

impl std::hash::BuildHasher for LbaHash {
    type Hasher = LbaHasher;
    fn build_hasher(&self) -> LbaHasher {
        LbaHasher { k0: self.k0, k1: self.k1, h: 0 }
    }
}

pub(crate) struct LbaHasher {
    k0: u64,
    k1: u64,
    h: u64,
}

impl std::hash::Hasher for LbaHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut a = [0u8; 8];
            a[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(a));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.h = LbaHash { k0: self.k0, k1: self.k1 }.hash_u64(x ^ self.h);
    }
    fn finish(&self) -> u64 {
        self.h
    }
}

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
    /// Copy-on-write source: the block whose data this block replaces (read while the new
    /// block is `Fresh`, and copied around a partial first write); `UNMAPPED` = zeros.
    pub src: u64,
    /// The committed head entry of this lba when the pending entry was made (what the commit
    /// replaces): `None` = no own head entry.
    pub prev: Option<OldHead>,
    /// `prev`'s block was already handed to `frees` (a discard of an unshared block).
    pub prev_freed: bool,
    /// Encrypted volumes: `src` is an uncommitted block this pending entry pointed to before
    /// a rewrite redirected it (FORMAT.md §11.4); freed when the new block's write lands, put
    /// back if it fails.
    pub src_pending: bool,
}

/// A committed head map entry as the pending state remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OldHead {
    /// `UNMAPPED` for a tombstone.
    pub pba: u64,
    pub birth: u64,
}

/// A cached committed view of one lba: the block that reads resolve to (`UNMAPPED` = zeros)
/// and the birth of the volume's own head entry (`NO_OWN` = none; the value came from the
/// origin chain or nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CVal {
    pub pba: u64,
    pub birth: u64,
}

/// `CVal::birth` when the volume's own branch has no head entry for the lba.
pub(crate) const NO_OWN: u64 = u64::MAX;

impl CVal {
    pub const NONE: CVal = CVal { pba: UNMAPPED, birth: NO_OWN };
    pub fn own(&self) -> Option<OldHead> {
        (self.birth != NO_OWN).then_some(OldHead { pba: self.pba, birth: self.birth })
    }
}

#[derive(Default)]
pub(crate) struct Pending {
    pub map: HashMap<u64, PEntry, LbaHash>,
    /// Blocks this volume stopped referencing; reusable after the next commit (and reclaim).
    pub frees: Vec<u64>,
    pub seq: u64,
    /// Encrypted volumes: seals of blocks written since the last commit (by pba), until the
    /// commit that makes them durable or frees the block.
    pub seals: HashMap<u64, Seal, LbaHash>,
    /// Queues with a write waiting for a block of this volume to be established.
    pub waiters: Vec<std::sync::Arc<crate::io::QueueShared>>,
    /// Cache of committed mappings (lba -> pba, or [`UNMAPPED`]), so that the data path does not
    /// ask RocksDB for every request. Consulted only for blocks without a pending entry; updated
    /// by the commit for every block it changes, under this same lock.
    pub cache: MapCache,
    /// Bumped by every commit that changes this volume's committed map: a lookup made outside
    /// the lock may fill the cache only if no commit happened meanwhile.
    pub cache_gen: u64,
    /// The cache holds every committed head entry of the volume's own branch (nothing was
    /// evicted or left out since the branch was empty or the open scan), so a cache miss means
    /// "no own entry" without asking RocksDB. Allocating writes to a new volume then never look
    /// up the metadata store.
    pub complete: bool,
    /// Copy of `!VolumeState::chain.is_empty()` for the cache rules.
    pub has_origin: bool,
}

/// log2 of the number of hash tables a volume's map cache is split into.
const CACHE_SHARD_BITS: u32 = 2;
const CACHE_SHARDS: usize = 1 << CACHE_SHARD_BITS;

/// A volume's map cache (lba -> [`CVal`]), split by the lba's low bits into [`CACHE_SHARDS`]
/// tables ([`LbaTable`]) keyed by the rest. A table grows by doubling and holds the old and the
/// new array while it moves the entries: with one table that was half again the volume's whole
/// cache for a moment (a 14 MiB table growing from 7 MiB), and the daemon's peak RSS while
/// writing rose above its budget by as much (`daemon_memory` bench). Split, a volume's cache
/// grows a quarter at a time. Four, not more: a table of 2 MiB or more gets transparent huge
/// pages ([`crate::HugePageAlloc`]), which the random probes of reads need.
#[derive(Default)]
pub(crate) struct MapCache {
    shards: [LbaTable; CACHE_SHARDS],
}

impl MapCache {
    fn split(lba: u64) -> (usize, u64) {
        ((lba & (CACHE_SHARDS as u64 - 1)) as usize, lba >> CACHE_SHARD_BITS)
    }

    pub fn get(&self, lba: &u64) -> Option<&CVal> {
        let (s, k) = Self::split(*lba);
        self.shards[s].get(k)
    }

    /// See [`LbaTable::prefetch`].
    pub fn prefetch(&self, lba: u64) {
        let (s, k) = Self::split(lba);
        self.shards[s].prefetch(k)
    }

    pub fn get_mut(&mut self, lba: &u64) -> Option<&mut CVal> {
        let (s, k) = Self::split(*lba);
        self.shards[s].get_mut(k)
    }

    pub fn contains_key(&self, lba: &u64) -> bool {
        self.get(lba).is_some()
    }

    pub fn insert(&mut self, lba: u64, v: CVal) -> Option<CVal> {
        let (s, k) = Self::split(lba);
        self.shards[s].insert(k, v)
    }

    /// Drop one entry to make room for `lba`: from `lba`'s own table if it has any (so that
    /// table does not grow), else from another. False when the cache is empty.
    pub fn evict_for(&mut self, lba: u64) -> bool {
        let (first, _) = Self::split(lba);
        (0..CACHE_SHARDS).any(|i| self.shards[(first + i) % CACHE_SHARDS].remove_any())
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(LbaTable::len).sum()
    }

    pub fn clear(&mut self) {
        self.shards.iter_mut().for_each(LbaTable::clear);
    }

    /// Bytes of the tables.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(LbaTable::bytes).sum()
    }
}

/// Cache value for a block known to have no committed mapping.
pub(crate) const UNMAPPED: u64 = u64::MAX;

/// The map cache's pool-wide budget in entries.
pub(crate) struct CacheBudget {
    pub cap: usize,
    pub used: std::sync::atomic::AtomicUsize,
}

impl CacheBudget {
    /// Bytes one cached entry costs ([`LbaTable`]: 24-byte slots at a load between 3/8 and 3/4
    /// after power-of-two growth, 32 to 64 bytes per entry). Measured with 16 volumes sharing a
    /// full budget (`daemon_memory` bench): 48.7 bytes per entry (50.7 with hashbrown before);
    /// 52 keeps the map cache within its half of `PoolOptions::cache_bytes` on average. The
    /// worst case, every table just doubled, is 64 (a fifth over), for as long as the tables
    /// take to fill again.
    pub const ENTRY_BYTES: usize = 52;
}

impl Pending {
    /// Remember a committed mapping, within the pool-wide budget (evicting another entry of this
    /// volume when the budget is spent).
    pub fn cache_put(&mut self, lba: u64, pba: CVal, budget: &CacheBudget) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(v) = self.cache.get_mut(&lba) {
            *v = pba;
            return;
        }
        if self.complete && pba == CVal::NONE && !self.has_origin {
            // A complete cache already says "not mapped" by not holding the lba.
            return;
        }
        if budget.cap == 0 {
            self.complete = false;
            return;
        }
        if budget.used.load(Relaxed) >= budget.cap {
            self.complete = false;
            if !self.cache.evict_for(lba) {
                return;
            }
            budget.used.fetch_sub(1, Relaxed);
        }
        self.cache.insert(lba, pba);
        budget.used.fetch_add(1, Relaxed);
    }

    /// Drop the whole cache (volume deleted, origin changed, ...). It is no longer complete.
    pub fn cache_clear(&mut self, budget: &CacheBudget) {
        budget.used.fetch_sub(self.cache.len(), std::sync::atomic::Ordering::Relaxed);
        self.cache.clear();
        self.complete = false;
    }

    /// Change the pending entry of `lba` (keeping what it replaces), or make a new one that
    /// replaces `prev`.
    pub fn set(&mut self, lba: u64, pba: u64, state: PState) {
        self.seq += 1;
        let seq = self.seq;
        match self.map.get_mut(&lba) {
            Some(e) => {
                e.pba = pba;
                e.state = state;
                e.seq = seq;
            }
            None => {
                self.map.insert(lba, PEntry { pba, state, seq, src: UNMAPPED, prev: None, prev_freed: false, src_pending: false });
            }
        }
    }

    /// A new pending entry replacing the committed head entry `prev`.
    pub fn insert(&mut self, lba: u64, pba: u64, state: PState, src: u64, prev: Option<OldHead>, prev_freed: bool) {
        self.seq += 1;
        self.map.insert(lba, PEntry { pba, state, seq: self.seq, src, prev, prev_freed, src_pending: false });
    }
}

/// How a block resolved for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WBlock {
    pub pba: u64,
    /// Newly allocated by (or joined as a first write of) this request.
    pub fresh: bool,
    /// A partial first write: the whole block is written, with zeros (or `src`'s data)
    /// around the request's.
    pub padded: bool,
    /// Copy-on-write source of a fresh block (`UNMAPPED` = none, pad with zeros).
    pub src: u64,
    /// Encrypted volumes: the seal of the data this write puts in the block.
    pub seal: Option<Seal>,
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
    /// The branch holding this volume's head map (changes on rollback, while detached).
    pub(crate) layer: AtomicU64,
    /// The head branch's current generation (birth of new entries).
    pub(crate) gen: AtomicU64,
    /// Newest snapshot generation of the head branch (0 = none): an own entry born at or
    /// before it is shared with a snapshot and is copied on write.
    pub(crate) latest_pin: AtomicU64,
    /// Ancestors whose data shows through unwritten blocks: (branch, generation), nearest
    /// first. Empty for a volume that is not a clone and was never rolled back.
    pub(crate) chain: RwLock<Vec<(u64, u64)>>,
    /// Snapshot in progress: new writes, discards and write-zeroes wait.
    pub(crate) frozen: AtomicBool,
    /// Admitted write/discard/write-zeroes requests not yet completed.
    pub(crate) mutations: AtomicU64,
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
    /// `vol_flags::ENCRYPTED`: data is encrypted (FORMAT.md §11).
    pub(crate) encrypted: AtomicBool,
    /// The family's cipher, when the pool was opened with its master key.
    pub(crate) crypt: std::sync::OnceLock<std::sync::Arc<crate::crypt::VolCrypt>>,
}

impl VolumeState {
    pub(crate) fn new(id: u64, layer: u64, name: String, size_bytes: u64, created_ns: u64) -> Self {
        VolumeState {
            id,
            layer: AtomicU64::new(layer),
            gen: AtomicU64::new(1),
            latest_pin: AtomicU64::new(0),
            chain: RwLock::new(Vec::new()),
            frozen: AtomicBool::new(false),
            mutations: AtomicU64::new(0),
            created_ns,
            encrypted: AtomicBool::new(false),
            crypt: std::sync::OnceLock::new(),
            name: RwLock::new(name),
            size_bytes: AtomicU64::new(size_bytes),
            mapped_blocks: AtomicU64::new(0),
            pending: Mutex::new(Pending { complete: true, ..Pending::default() }),
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

    pub(crate) fn branch(&self) -> u64 {
        self.layer.load(Ordering::Acquire)
    }

    pub(crate) fn map_key(&self, lba: u64) -> [u8; MAP_KEY_LEN] {
        map_key(self.branch(), lba)
    }

    pub(crate) fn chain(&self) -> Vec<(u64, u64)> {
        self.chain.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub(crate) fn has_origin(&self) -> bool {
        self.chain.read().map(|c| !c.is_empty()).unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_cache_shards_keep_every_lba_and_the_budget() {
        let budget = CacheBudget { cap: 1000, used: Default::default() };
        let mut p = Pending::default();
        let v = |i: u64| CVal { pba: i * 7, birth: i };
        for lba in 0..1000u64 {
            p.cache_put(lba * 3 + (lba >> 5), v(lba), &budget);
        }
        assert_eq!(p.cache.len(), 1000);
        for lba in 0..1000u64 {
            assert_eq!(p.cache.get(&(lba * 3 + (lba >> 5))), Some(&v(lba)), "lba {lba}");
        }
        assert!(!p.cache.contains_key(&1), "never inserted");
        // Full: each new lba evicts one entry, preferably from its own table.
        for lba in 5000..5400u64 {
            p.cache_put(lba, v(lba), &budget);
            assert_eq!(p.cache.get(&lba), Some(&v(lba)));
        }
        assert_eq!(p.cache.len(), 1000);
        assert_eq!(budget.used.load(std::sync::atomic::Ordering::Relaxed), 1000);
        let per_shard: Vec<usize> = p.cache.shards.iter().map(LbaTable::len).collect();
        assert!(per_shard.iter().all(|&n| (200..=300).contains(&n)), "tables stay balanced: {per_shard:?}");
        assert!(!p.complete);
        p.cache_clear(&budget);
        assert_eq!((p.cache.len(), budget.used.load(std::sync::atomic::Ordering::Relaxed)), (0, 0));
    }
}
