//! The pool: the data file or block device (O_DIRECT), the RocksDB metadata beside it, the
//! allocator, the volumes and the committer thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::{BlockBasedOptions, Cache, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use crate::alloc::{Allocator, Reclaim};
use crate::error::{Error, Location, Result};
use crate::format::{self, *};
use crate::io::{Completion, QueueShared};
use crate::snap::Catalog;
use crate::volume::{CacheBudget, CVal, Committed, OldHead, PEntry, PState, Pending, ReadRes, VolumeState, WBlock, NO_OWN, UNMAPPED};

pub use crate::format::MAX_VOLUME_SIZE;
/// Commit when this many uncommitted map changes have piled up in one volume.
pub(crate) const PENDING_KICK: usize = 16_384;

/// Options for opening a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Metadata (RocksDB) directory; default `PATH.meta` beside a pool file, required for a
    /// block device.
    pub meta_dir: Option<PathBuf>,
    /// The metadata cache (default 64 MiB): half is RocksDB's (its active memtable, at most a
    /// quarter of that half, and the block cache), half an in-memory cache of block-map entries
    /// that spares the data path a RocksDB lookup per request.
    pub cache_bytes: usize,
    /// Commit uncommitted mappings at least this often even without a guest FLUSH.
    pub commit_interval: Duration,
    /// RocksDB's memtable size (default 8 MiB, at most an eighth of `cache_bytes`; up to two
    /// are in memory while one is flushed). It also sizes each
    /// write-ahead log's preallocation (1.1x) and caps the MANIFEST's (4 MiB), which small
    /// test pools on tmpfs pay per open.
    pub memtable_bytes: usize,
    /// Fault injection for tests: the metadata write after this many succeeds fails, and the
    /// pool stops as if it crashed there.
    #[doc(hidden)]
    pub fail_meta_after: Option<u64>,
    /// The master key of encrypted volumes (FORMAT.md §11.1). Without it the pool opens
    /// *locked*: encrypted volumes cannot be read, written or cloned.
    pub master_key: Option<crate::crypt::Key>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            meta_dir: None,
            cache_bytes: 64 << 20,
            commit_interval: Duration::from_secs(1),
            memtable_bytes: 8 << 20,
            fail_meta_after: None,
            master_key: None,
        }
    }
}

/// Options for creating a pool.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Size of a new pool file; for a block device, at most its size (default: whole device).
    pub size_bytes: Option<u64>,
    pub meta_dir: Option<PathBuf>,
    /// Overwrite an existing pool.
    pub force: bool,
    /// How to allocate a new pool file on the host file system.
    pub preallocate: Preallocate,
}

/// Host-side allocation of a pool file (like `qemu-img create -o preallocation=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Preallocate {
    /// Sparse file: the host file system allocates on first write (slower first writes; the
    /// host may run out of space later).
    Off,
    /// `fallocate`: space reserved up front, first writes only convert extents (default).
    #[default]
    Falloc,
    /// Write zeros over the whole file (slow to create; fastest first writes).
    Full,
}

/// Default metadata directory for a pool at `path`.
pub fn default_meta_dir(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".meta");
    PathBuf::from(s)
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into the valid 16-byte buffer.
    let n = unsafe { libc::getrandom(u.as_mut_ptr() as *mut libc::c_void, 16, 0) };
    if n != 16 {
        return Err(Error::io("getrandom", "/dev/urandom")(std::io::Error::last_os_error()));
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    let h = h.concat();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A 4096-aligned, zero-initialised buffer for O_DIRECT. Large ones are their own anonymous
/// mapping: the kernel hands out zeroed pages as they are touched, instead of the allocator
/// memset-ting the whole buffer up front (a 1 MiB `SyncIo` buffer cost 25% of a fuzz target's
/// time in memset and page faults).
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    mapped: bool,
}
// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

/// From this size on an [`AlignedBuf`] is a mapping of its own.
const MAP_FROM: usize = 128 << 10;

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(4096).next_multiple_of(4096);
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        if len >= MAP_FROM {
            // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
            if p == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(layout);
            }
            return AlignedBuf { ptr: p.cast(), len, mapped: true };
        }
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, mapped: false }
    }
    /// Length in bytes (the requested length rounded up to 4096).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in new() with this length, unmapped once.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            return;
        }
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("valid layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

fn device_size(f: &File, path: &Path) -> Result<u64> {
    let md = f.metadata().map_err(Error::io("stat", path))?;
    if md.file_type().is_block_device() {
        let mut size: u64 = 0;
        const BLKGETSIZE64: libc::c_ulong = 0x80081272;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(Error::Io { op: "BLKGETSIZE64", path: path.into(), source: std::io::Error::last_os_error() });
        }
        Ok(size)
    } else {
        Ok(md.len())
    }
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false)
}

/// Open the data file or device for direct I/O. `O_NOATIME`: every read would otherwise check
/// (and now and then write) the file's access time, which nothing uses (1% of the daemon's CPU
/// per 4 KiB read, perf); it needs the file's owner or CAP_FOWNER, so without them the pool
/// opens with access times.
fn open_data(path: &Path) -> Result<File> {
    let open = |flags| OpenOptions::new().read(true).write(true).custom_flags(flags).open(path);
    match open(libc::O_DIRECT | libc::O_CLOEXEC | libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(libc::O_DIRECT | libc::O_CLOEXEC),
        r => r,
    }
    .map_err(Error::io("open (O_DIRECT)", path))
}

fn lock_exclusive(f: &File, path: &Path) -> Result<()> {
    // SAFETY: flock on a valid fd has no memory effects.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Locked { path: path.into() });
        }
        return Err(Error::Io { op: "flock", path: path.into(), source: e });
    }
    Ok(())
}

fn pread_exact(f: &File, path: &Path, buf: &mut [u8], off: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, off).map_err(Error::io("read", path))
}

fn pwrite_all(f: &File, path: &Path, buf: &[u8], off: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(buf, off).map_err(Error::io("write", path))
}

/// RocksDB's half of the metadata cache: (block cache, memtable size). The active memtable is
/// charged to it (at most a quarter of it), so that `--cache` bounds RocksDB's caching memory
/// as a whole: 24 MiB of block cache and an 8 MiB memtable at the default 64 MiB.
fn rocksdb_split(cache_bytes: usize, memtable_bytes: usize) -> (usize, usize) {
    let half = cache_bytes / 2;
    let memtable = memtable_bytes.min(half / 4).max(64 << 10);
    (half.saturating_sub(memtable).max(1 << 20), memtable)
}

fn db_options(cache_bytes: usize, create: bool, memtable_bytes: usize) -> Result<Options> {
    let mut o = Options::default();
    o.create_if_missing(create);
    o.set_error_if_exists(create);
    o.set_keep_log_file_num(2);
    o.set_max_open_files(512);
    o.set_write_buffer_size(memtable_bytes.max(64 << 10));
    // RocksDB preallocates each new MANIFEST (one per open) by 4 MiB; no more than a memtable.
    o.set_manifest_preallocation_size(memtable_bytes.clamp(64 << 10, 4 << 20));
    o.set_max_write_buffer_number(2);
    o.set_max_total_wal_size(64 << 20);
    o.set_max_background_jobs(2);
    o.set_target_file_size_base(16 << 20);
    let mut t = BlockBasedOptions::default();
    let cache = Cache::new_lru_cache(cache_bytes).map_err(Error::meta("create cache"))?;
    t.set_block_cache(&cache);
    // Index and bloom filter blocks stay in the table readers' memory, out of the block cache:
    // when they shared the cache, a scan of the map (open, export) evicted them and every
    // point lookup then re-read and re-checked a whole filter block (~100 us of CPU per
    // allocating write on a 2 GiB working set). They cost ~1.3 bytes per map entry.
    t.set_cache_index_and_filter_blocks(false);
    t.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&t);
    Ok(o)
}

fn sync_write() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

/// Create a new pool on `path` (a regular file, created if missing, or a block device).
pub fn create_pool(path: &Path, opts: &CreateOptions) -> Result<Superblock> {
    let blockdev = is_block_device(path);
    let meta_dir = match (&opts.meta_dir, blockdev) {
        (Some(d), _) => d.clone(),
        (None, false) => default_meta_dir(path),
        (None, true) => {
            return Err(Error::InvalidSize("a pool on a block device needs --meta-dir (a directory on another file system)".into()))
        }
    };
    // Refused before the pool file is created or sized: a failed create must not leave a file
    // behind that the next attempt then refuses too.
    if !opts.force && meta_dir.exists() {
        return Err(Error::AlreadyExists { path: meta_dir });
    }
    // Take the pool lock before touching anything, so that `--force` cannot destroy a pool that
    // a daemon has open.
    let lockf = OpenOptions::new().create(!blockdev).truncate(false).read(true).write(true).open(path).map_err(Error::io("open", path))?;
    lock_exclusive(&lockf, path)?;
    if !opts.force && read_sb(&lockf, path).is_ok() {
        return Err(Error::AlreadyExists { path: path.into() });
    }
    if !blockdev {
        let exists = std::fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false);
        if exists && !opts.force {
            return Err(Error::AlreadyExists { path: path.into() });
        }
        let size = opts.size_bytes.ok_or_else(|| Error::InvalidSize("--size is required for a pool file".into()))?;
        lockf.set_len(0).map_err(Error::io("truncate", path))?;
        lockf.set_len(size).map_err(Error::io("set_len", path))?;
        match opts.preallocate {
            Preallocate::Off => {}
            Preallocate::Falloc => {
                // SAFETY: fallocate on a valid fd has no memory effects.
                let r = unsafe { libc::fallocate(lockf.as_raw_fd(), 0, 0, size as libc::off_t) };
                if r != 0 {
                    return Err(Error::io("fallocate (try --preallocate off)", path)(std::io::Error::last_os_error()));
                }
            }
            Preallocate::Full => {
                use std::os::unix::fs::FileExt;
                let zeros = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(zeros.len() as u64) as usize;
                    lockf.write_all_at(&zeros[..n], off).map_err(Error::io("preallocate", path))?;
                    off += n as u64;
                }
            }
        }
        lockf.sync_all().map_err(Error::io("fsync", path))?;
    }
    if meta_dir.exists() {
        if !opts.force {
            return Err(Error::AlreadyExists { path: meta_dir });
        }
        std::fs::remove_dir_all(&meta_dir).map_err(Error::io("remove old metadata", &meta_dir))?;
    }
    let f = open_data(path)?;
    let dev = device_size(&f, path)?;
    let size = opts.size_bytes.unwrap_or(dev).min(dev);
    if size < DATA_START + 16 * BLOCK_SIZE {
        return Err(Error::InvalidSize(format!("pool of {size} bytes is too small (minimum 1 MiB + 64 KiB)")));
    }
    let sbk = Superblock {
        version: FORMAT_VERSION,
        incompat: 0,
        compat: 0,
        autoclear: 0,
        uuid: random_uuid()?,
        block_size: BLOCK_SIZE as u32,
        data_start: DATA_START,
        total_blocks: (size - DATA_START) / BLOCK_SIZE,
        created_ns: now_ns(),
    };
    let db = DB::open(&db_options(8 << 20, true, 256 << 10)?, &meta_dir).map_err(Error::meta("create"))?;
    let rec = PoolRecord { uuid: sbk.uuid, next_id: 1, generation: 1 };
    let mut b = WriteBatch::default();
    b.put(POOL_KEY, rec.encode());
    db.write_opt(b, &sync_write()).map_err(Error::meta("write pool record"))?;
    drop(db);
    // The superblock goes last: a crash before this leaves no valid pool, never a half one.
    write_sb(&f, path, &sbk)?;
    Ok(sbk)
}

/// Byte offset of the backup superblock (inside the reserved first MiB).
pub const SB_BACKUP_OFFSET: u64 = 4096;

/// Write the superblock: first the backup copy, then the primary, each synced. A torn write
/// of the primary (only 512-byte writes are assumed atomic) then still leaves a valid copy.
pub(crate) fn write_sb(f: &File, path: &Path, sbk: &Superblock) -> Result<()> {
    let mut buf = AlignedBuf::new(4096);
    buf.as_mut_slice()[..sb::SIZE].copy_from_slice(&sbk.encode());
    pwrite_all(f, path, buf.as_slice(), SB_BACKUP_OFFSET)?;
    f.sync_all().map_err(Error::io("fsync", path))?;
    pwrite_all(f, path, buf.as_slice(), 0)?;
    f.sync_all().map_err(Error::io("fsync", path))
}

/// Read and validate the superblock of `path` without opening the pool.
pub fn read_superblock(path: &Path) -> Result<Superblock> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).map_err(Error::io("open", path))?;
    read_sb(&f, path)
}

fn read_sb(f: &File, path: &Path) -> Result<Superblock> {
    read_sb_at(f, path, 0).or_else(|e| match e {
        // A primary that fails its checksum (a torn rewrite): use the backup if it is valid.
        Error::Corrupt { .. } => match read_sb_at(f, path, SB_BACKUP_OFFSET) {
            Ok(b) => {
                tracing::warn!(pool = %path.display(), "primary superblock is damaged; using the backup copy at byte 4096");
                Ok(b)
            }
            Err(_) => Err(e),
        },
        e => Err(e),
    })
}

fn read_sb_at(f: &File, path: &Path, off: u64) -> Result<Superblock> {
    let mut buf = AlignedBuf::new(4096);
    pread_exact(f, path, buf.as_mut_slice(), off).map_err(|_| Error::NotAPool { path: path.into() })?;
    Superblock::decode(buf.as_slice()).map_err(|e| match e {
        SbError::BadMagic => Error::NotAPool { path: path.into() },
        SbError::TooNew(v) => Error::VersionTooNew { path: path.into(), found: v, supported: FORMAT_VERSION },
        SbError::Incompat(u) => Error::IncompatibleFeatures { path: path.into(), unknown: u },
        SbError::BadChecksum { stored, computed } => Error::Corrupt {
            location: Location::Superblock,
            what: format!("checksum mismatch (stored {stored:08x}, computed {computed:08x})"),
        },
        SbError::Invalid(w) => Error::Corrupt { location: Location::Superblock, what: w.into() },
    })
}

pub(crate) enum CommitMsg {
    /// A guest FLUSH: complete `tag` on `queue` when the commit is durable.
    Flush { queue: Arc<QueueShared>, tag: u64 },
    /// A control operation waits for a commit.
    Sync(mpsc::Sender<Result<(), String>>),
    /// Commit soon (a volume has many pending changes).
    Kick,
    Shutdown,
}

pub(crate) struct Shared {
    pub path: PathBuf,
    pub meta_dir: PathBuf,
    pub data: File,
    /// Holds the pool's exclusive flock. A separate open file description from `data`, because
    /// io_uring keeps registered files open until its asynchronous teardown, which would delay
    /// the unlock after the pool is closed.
    _lock: File,
    pub sb: Superblock,
    pub db: DB,
    pub alloc: Mutex<Allocator>,
    pub reclaim: Mutex<Reclaim>,
    pub vols: RwLock<BTreeMap<String, Arc<VolumeState>>>,
    pub record: Mutex<PoolRecord>,
    pub control: Mutex<()>,
    pub commit_tx: Mutex<mpsc::Sender<CommitMsg>>,
    /// Set when an fdatasync or metadata write failed: durability can no longer be promised,
    /// so every later request fails (see FORMAT.md "Media assumptions").
    pub failed: AtomicBool,
    pub open_problems: Vec<String>,
    pub nospace_logged: AtomicBool,
    pub cache: CacheBudget,
    /// `PoolOptions::cache_bytes`, as configured.
    pub cache_budget_bytes: usize,
    /// Held by every metadata write whose content depends on which entries snapshots share
    /// (commits, snapshot create/delete), so they never interleave.
    pub meta: Mutex<()>,
    pub cat: Mutex<Catalog>,
    /// Open snapshot views per (branch, generation).
    pub snap_readers: Mutex<HashMap<(u64, u64), u64>>,
    /// Branches that may have history entries (added before any batch that writes one, never
    /// removed while open): reads through other branches skip the history seek.
    pub hist_branches: RwLock<HashSet<u64>>,
    /// Branches that may have head entries (same rules): reads through a clone chain skip the
    /// point lookup in branches that never had one (clones of clones that were not written).
    pub head_branches: RwLock<HashSet<u64>>,
    pub fault: Option<std::sync::atomic::AtomicU64>,
    /// The master key given to `Pool::open` (FORMAT.md §11.1), replaced by a rotation;
    /// `None` = locked.
    pub master: Mutex<Option<crate::crypt::Key>>,
    /// The data nonce counter, once the pool has a nonce record.
    pub nonces: std::sync::OnceLock<crate::crypt::Nonces>,
    /// Committed seals recently used (by pba), at most `seal_cache_cap`.
    pub seal_cache: Mutex<crate::lba_table::LbaTable<Seal>>,
    pub seal_cache_cap: usize,
    /// The superblock has `incompat::ENCRYPTION`.
    pub encryption_on: AtomicBool,
}



/// Operations collected for one metadata batch and applied in key order: RocksDB's memtable
/// inserts keys that follow each other much faster than keys in hash order (the skip list
/// reuses the previous insert's position): on copy-on-write commits the committer thread's
/// share of CPU samples fell from 25% to 14%. The sort is stable, so a delete followed by a put
/// of the same key keeps its order.
#[derive(Default)]
pub(crate) struct SortedBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl SortedBatch {
    pub fn put(&mut self, k: impl AsRef<[u8]>, v: Vec<u8>) {
        self.ops.push((k.as_ref().to_vec(), Some(v)));
    }
    pub fn delete(&mut self, k: impl AsRef<[u8]>) {
        self.ops.push((k.as_ref().to_vec(), None));
    }
    pub fn into_batch(mut self) -> WriteBatch {
        self.ops.sort_by(|a, b| a.0.cmp(&b.0));
        let mut b = WriteBatch::default();
        for (k, v) in self.ops {
            match v {
                Some(v) => b.put(k, v),
                None => b.delete(k),
            }
        }
        b
    }
}

/// An own head entry born at `birth` is shared with a snapshot iff some pin of its branch is at
/// or after its birth, i.e. the newest pin is (pins are generations >= 1).
pub(crate) fn shared_with_snapshot(birth: u64, latest_pin: u64) -> bool {
    latest_pin != 0 && birth <= latest_pin
}

fn note(set: &RwLock<HashSet<u64>>, b: u64) {
    let known = set.read().map(|h| h.contains(&b)).unwrap_or(false);
    if !known {
        if let Ok(mut h) = set.write() {
            h.insert(b);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn data_offset(&self, pba: u64) -> u64 {
        DATA_START + pba * BLOCK_SIZE
    }

    pub fn enter(&self) -> u64 {
        lock(&self.reclaim).enter()
    }

    pub fn exit(&self, epoch: u64) {
        let mut out = Vec::new();
        lock(&self.reclaim).exit(epoch, &mut out);
        self.release_blocks(out);
    }

    pub(crate) fn release_blocks(&self, blocks: Vec<u64>) {
        if blocks.is_empty() {
            return;
        }
        if self.encryption_on.load(Ordering::Acquire) {
            // A block's seal from this life must not be found for its next one: the next
            // life's seal reaches RocksDB (with its mapping) before it reaches the cache, and a
            // reader can find the mapping in between (FORMAT.md §11.4).
            let mut c = lock(&self.seal_cache);
            if c.len() > 0 {
                for &b in &blocks {
                    c.remove(b);
                }
            }
        }
        let mut a = lock(&self.alloc);
        for b in blocks {
            a.release(b);
        }
    }

    fn has_pending(&self) -> bool {
        self.vols
            .read()
            .map(|v| v.values().any(|x| {
                let p = x.lock_pending();
                !p.map.is_empty() || !p.frees.is_empty()
            }))
            .unwrap_or(true)
    }

    pub(crate) fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::DeviceIo(std::io::Error::other("the pool failed earlier (fdatasync or metadata write error); restart the daemon")));
        }
        Ok(())
    }

    pub fn send_commit(&self, m: CommitMsg) -> bool {
        lock(&self.commit_tx).send(m).is_ok()
    }

    /// A decoded entry's readable block: `None` for a tombstone or an out-of-range pba.
    pub(crate) fn data_of(&self, e: &MapEntry) -> Option<u64> {
        (!e.is_tombstone() && e.pba < self.sb.total_blocks).then_some(e.pba)
    }

    fn get_entry(&self, k: &[u8]) -> Result<Option<MapEntry>> {
        match self.db.get_pinned(k).map_err(Error::meta("get"))? {
            None => Ok(None),
            Some(v) => MapEntry::decode(k, &v).map(Some),
        }
    }

    /// Branch `b` as of generation `s` at `lba`: `Some(Some(pba))` data, `Some(None)` zeros,
    /// `None` no entry (the branch's origin shows through).
    pub(crate) fn view_at(&self, b: u64, s: u64, lba: u64) -> Result<Option<Option<u64>>> {
        if self.head_branches.read().map(|h| h.contains(&b)).unwrap_or(true) {
            if let Some(e) = self.get_entry(&map_key(b, lba))? {
                if e.birth_gen <= s {
                    return Ok(Some(self.data_of(&e)));
                }
            }
        }
        if !self.hist_branches.read().map(|h| h.contains(&b)).unwrap_or(true) {
            return Ok(None);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(hist_key(b, lba.saturating_add(1), u64::MAX));
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(hist_key(b, lba, s));
        if it.valid() {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                if parse_hist_key(k).map(|x| (x.0, x.1)) == Some((b, lba)) {
                    let h = HistEntry::decode(k, v)?;
                    return Ok(Some(if h.kill > s { self.data_of(&h.entry) } else { None }));
                }
            }
        }
        it.status().map_err(Error::meta("iterate history"))?;
        Ok(None)
    }

    /// What the origin chain shows at `lba`: the first ancestor with an entry decides.
    pub(crate) fn chain_view(&self, chain: &[(u64, u64)], lba: u64) -> Result<Option<u64>> {
        for &(b, s) in chain {
            if let Some(v) = self.view_at(b, s, lba)? {
                return Ok(v);
            }
        }
        Ok(None)
    }

    fn cval_of(&self, e: &MapEntry) -> CVal {
        CVal { pba: self.data_of(e).unwrap_or(UNMAPPED), birth: e.birth_gen }
    }

    /// The committed view of one lba of `vol` (own head entry, else the origin chain).
    /// `complete`: the volume's cache holds all its own entries, so it has none here.
    fn lookup(&self, vol: &VolumeState, lba: u64, complete: bool) -> Result<CVal> {
        if !complete {
            if let Some(e) = self.get_entry(&vol.map_key(lba))? {
                return Ok(self.cval_of(&e));
            }
        }
        if !vol.has_origin() {
            return Ok(CVal::NONE);
        }
        Ok(CVal { pba: self.chain_view(&vol.chain(), lba)?.unwrap_or(UNMAPPED), birth: NO_OWN })
    }

    /// Committed views of [lba, lba+n), in order.
    fn lookup_range(&self, vol: &VolumeState, lba: u64, n: u64, complete: bool) -> Result<Vec<CVal>> {
        let mut out = vec![CVal::NONE; n as usize];
        let mut own = vec![false; n as usize];
        let found = if complete { Vec::new() } else { self.committed_range(vol, lba, lba + n)? };
        for c in found {
            out[(c.lba - lba) as usize] = self.cval_of(&c.entry);
            own[(c.lba - lba) as usize] = true;
        }
        if vol.has_origin() {
            let chain = vol.chain();
            for i in 0..n as usize {
                if !own[i] {
                    out[i].pba = self.chain_view(&chain, lba + i as u64)?.unwrap_or(UNMAPPED);
                }
            }
        }
        Ok(out)
    }

    /// Committed head entries of `vol` in [start, end).
    pub(crate) fn committed_range(&self, vol: &VolumeState, start: u64, end: u64) -> Result<Vec<Committed>> {
        self.branch_entries(vol.branch(), start, end, usize::MAX)
    }

    /// At most `limit` committed head entries of branch `b` in [start, end), in lba order.
    pub(crate) fn branch_entries(&self, b: u64, start: u64, end: u64, limit: usize) -> Result<Vec<Committed>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(map_key(b, end).to_vec());
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(map_key(b, start));
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
            let Some((_, lba)) = parse_map_key(k) else { break };
            out.push(Committed { lba, entry: MapEntry::decode(k, v)? });
            it.next();
        }
        it.status().map_err(Error::meta("iterate"))?;
        Ok(out)
    }

    /// Lbas in [start, end) where some branch of `chain` has a head or history entry: the only
    /// places where the chain can show data.
    pub(crate) fn chain_candidates(&self, chain: &[(u64, u64)], start: u64, end: u64) -> Result<Vec<u64>> {
        let mut set = std::collections::BTreeSet::new();
        for &(b, _) in chain {
            for c in self.branch_entries(b, start, end, usize::MAX)? {
                set.insert(c.lba);
            }
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(hist_key(b, end, u64::MAX));
            let mut it = self.db.raw_iterator_opt(ro);
            it.seek(hist_key(b, start, u64::MAX));
            while it.valid() {
                let Some(k) = it.key() else { break };
                let Some((_, lba, _)) = parse_hist_key(k) else { break };
                set.insert(lba);
                it.next();
            }
            it.status().map_err(Error::meta("iterate history"))?;
        }
        Ok(set.into_iter().collect())
    }

    /// Resolve `n` blocks from `lba` for a read.
    pub(crate) fn resolve_read(&self, vol: &VolumeState, lba: u64, n: u64, out: &mut Vec<ReadRes>) -> Result<()> {
        self.resolve_read_inner(vol, lba, n, out, None)
    }

    /// `resolve_read` for an encrypted volume: also the seal of every block read (`seals[i]`
    /// for `out[i] == At(..)`). Seals of uncommitted blocks are taken under the same lock as
    /// the mapping, so a rewrite that frees the block cannot take its seal away first;
    /// committed seals cannot change while the caller's epoch keeps the block allocated.
    pub(crate) fn resolve_read_sealed(
        &self,
        vol: &VolumeState,
        lba: u64,
        n: u64,
        out: &mut Vec<ReadRes>,
        seals: &mut Vec<Option<Seal>>,
    ) -> Result<()> {
        let mut pend = Vec::new();
        self.resolve_read_inner(vol, lba, n, out, Some(&mut pend))?;
        seals.clear();
        seals.resize(out.len(), None);
        for (i, s) in pend {
            seals[i] = Some(s);
        }
        // Committed seals: the cache under one lock, then RocksDB for the rest.
        let mut missing: Vec<(u64, usize)> = Vec::new();
        {
            let c = lock(&self.seal_cache);
            for (i, r) in out.iter().enumerate() {
                if let (ReadRes::At(pba), None) = (r, seals[i]) {
                    match c.get(*pba) {
                        Some(s) => seals[i] = Some(*s),
                        None => missing.push((*pba, i)),
                    }
                }
            }
        }
        if !missing.is_empty() {
            self.fetch_seals(&mut missing, seals)?;
        }
        if let Some(&(pba, i)) = missing.iter().find(|&&(_, i)| seals[i].is_none()) {
            return Err(Error::Corrupt {
                location: Location::Record(seal_key(pba)),
                what: format!("no seal for block {pba} of encrypted volume {:?} (lba {})", vol.name(), lba + i as u64),
            });
        }
        Ok(())
    }

    /// Read the seals of `missing` ((pba, index into `seals`)) from RocksDB into `seals` and
    /// the cache: blocks close together (a multi-block read of data written together) with
    /// one iterator seek, others one lookup each.
    fn fetch_seals(&self, missing: &mut [(u64, usize)], seals: &mut [Option<Seal>]) -> Result<()> {
        missing.sort_unstable();
        let (lo, hi) = (missing[0].0, missing[missing.len() - 1].0);
        let mut found: Vec<(u64, Seal)> = Vec::with_capacity(missing.len());
        if missing.len() > 1 && hi - lo < 4 * missing.len() as u64 {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(seal_key(hi + 1));
            let mut it = self.db.raw_iterator_opt(ro);
            it.seek(seal_key(lo));
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
                let Some(pba) = parse_seal_key(k) else { break };
                if missing.binary_search_by_key(&pba, |m| m.0).is_ok() {
                    found.push((pba, Seal::decode(k, v)?));
                }
                it.next();
            }
            it.status().map_err(Error::meta("iterate seals"))?;
        } else {
            for &(pba, _) in missing.iter() {
                let k = seal_key(pba);
                if let Some(v) = self.db.get_pinned(&k).map_err(Error::meta("get seal"))? {
                    found.push((pba, Seal::decode(&k, &v)?));
                }
            }
        }
        for &(pba, s) in &found {
            for m in missing.iter().filter(|m| m.0 == pba) {
                seals[m.1] = Some(s);
            }
        }
        let mut c = lock(&self.seal_cache);
        for (pba, s) in found {
            if c.len() >= self.seal_cache_cap {
                c.remove_any();
            }
            c.insert(pba, s);
        }
        Ok(())
    }

    fn resolve_read_inner(
        &self,
        vol: &VolumeState,
        lba: u64,
        n: u64,
        out: &mut Vec<ReadRes>,
        mut pend_seals: Option<&mut Vec<(usize, Seal)>>,
    ) -> Result<()> {
        out.clear();
        let mut missing = 0;
        let gen;
        let complete;
        {
            let p = vol.lock_pending();
            gen = p.cache_gen;
            complete = p.complete;
            for i in 0..n {
                let r = match p.map.get(&(lba + i)) {
                    None => match p.cache.get(&(lba + i)) {
                        Some(c) if c.pba == UNMAPPED => Some(ReadRes::Zero),
                        Some(c) => Some(ReadRes::At(c.pba)),
                        None => {
                            missing += 1;
                            None
                        }
                    },
                    Some(e) => Some(match e.state {
                        PState::Written => ReadRes::At(e.pba),
                        // A copy-on-write block reads its source until its first write lands.
                        PState::Fresh { .. } if e.src != UNMAPPED => ReadRes::At(e.src),
                        PState::Fresh { .. } | PState::Removed => ReadRes::Zero,
                    }),
                };
                if let (Some(ps), Some(ReadRes::At(pba))) = (pend_seals.as_deref_mut(), r) {
                    if let Some(s) = p.seals.get(&pba) {
                        ps.push((i as usize, *s));
                    }
                }
                // Unresolved blocks are marked with At(u64::MAX) and filled in below.
                out.push(r.unwrap_or(ReadRes::At(u64::MAX)));
            }
        }
        if missing == 0 {
            return Ok(());
        }
        let vals = if n == 1 { vec![self.lookup(vol, lba, complete)?] } else { self.lookup_range(vol, lba, n, complete)? };
        let mut found: Vec<(u64, CVal)> = Vec::with_capacity(missing);
        for (i, s) in out.iter_mut().enumerate() {
            if *s == ReadRes::At(u64::MAX) {
                let c = vals[i];
                *s = if c.pba == UNMAPPED { ReadRes::Zero } else { ReadRes::At(c.pba) };
                found.push((lba + i as u64, c));
            }
        }
        // Fill the cache unless a commit changed the committed map since we looked.
        let mut p = vol.lock_pending();
        if p.cache_gen == gen {
            for (l, v) in found {
                if !p.map.contains_key(&l) {
                    p.cache_put(l, v, &self.cache);
                }
            }
        }
        Ok(())
    }

    /// Resolve `n` blocks from `lba` for a write. `head_partial` / `tail_partial` say that the
    /// first / last block is only partly covered by the write (512-byte granularity).
    ///
    /// Returns `Ok(false)` if the write must wait: it would race with a write whose block is
    /// not established yet (a padded first write of a partial block is in flight, or a partial
    /// write meets a block whose first write is in flight). The caller's queue is then
    /// registered as a waiter and is woken when such a write finishes.
    ///
    /// A block is written in place only if the volume's own head entry maps it and no
    /// snapshot shares it (born after the newest snapshot). Otherwise a new block is allocated
    /// (copy-on-write: a partial write copies the rest of the block from the old one).
    ///
    /// An encrypted volume (FORMAT.md §11.3) writes nothing in place: every block is
    /// redirected to a newly allocated one, also one the volume owns alone or one written
    /// since the last commit (then remembered as `src_pending`), so a block's data and seal
    /// never change while it is allocated. Its writes are whole blocks (the caller checks),
    /// and one that meets a block whose earlier write is still in flight waits for it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn resolve_write(
        &self,
        vol: &VolumeState,
        lba: u64,
        n: u64,
        head_partial: bool,
        tail_partial: bool,
        waiter: &Arc<QueueShared>,
        out: &mut Vec<WBlock>,
    ) -> Result<bool> {
        out.clear();
        let partial = |i: u64| (i == 0 && head_partial) || (i + 1 == n && tail_partial);
        let redirect = vol.encrypted.load(Ordering::Relaxed);
        let latest_pin = vol.latest_pin.load(Ordering::Acquire);
        let mut p = vol.lock_pending();
        // First pass, read-only: any conflict defers the whole request before anything changes.
        for i in 0..n {
            if let Some(e) = p.map.get(&(lba + i)) {
                if let PState::Fresh { writers, padded } = e.state {
                    if padded > 0 || ((partial(i) || redirect) && writers > 0) {
                        p.waiters.push(waiter.clone());
                        return Ok(false);
                    }
                }
            }
        }
        // Committed views of the range: one iterator seek for a multi-block write instead of a
        // point lookup per block (only consulted for blocks without a pending entry).
        let committed = self.committed_prefetch(vol, &p, lba, n)?;
        let mut hint: Option<u64> = None;
        for i in 0..n {
            let l = lba + i;
            let part = partial(i);
            let existing = p.map.get(&l).copied();
            let b = match existing {
                Some(e) => match e.state {
                    PState::Written if redirect => {
                        let Some(pba) = self.alloc_block(hint) else {
                            drop(p);
                            self.finish_write(vol, lba, out, false);
                            return Err(self.no_space(vol));
                        };
                        p.set(l, pba, PState::Fresh { writers: 1, padded: 0 });
                        if let Some(x) = p.map.get_mut(&l) {
                            // Reads see the uncommitted block until the new one lands.
                            x.src = e.pba;
                            x.src_pending = true;
                        }
                        WBlock { pba, fresh: true, padded: false, src: e.pba, seal: None }
                    }
                    PState::Written => WBlock { pba: e.pba, fresh: false, padded: false, src: UNMAPPED, seal: None },
                    // Full write joining other full writes of a new block.
                    PState::Fresh { writers, padded } if writers > 0 => {
                        p.set(l, e.pba, PState::Fresh { writers: writers + 1, padded });
                        WBlock { pba: e.pba, fresh: true, padded: false, src: e.src, seal: None }
                    }
                    // All earlier writes failed: the block is still unwritten; reuse it.
                    PState::Fresh { .. } => {
                        p.set(l, e.pba, PState::Fresh { writers: 1, padded: part as u32 });
                        WBlock { pba: e.pba, fresh: true, padded: part, src: e.src, seal: None }
                    }
                    // Discarded since the last commit: reads zeros, so a new block padded with
                    // zeros.
                    PState::Removed => match self.alloc_block(hint) {
                        Some(pba) => {
                            p.set(l, pba, PState::Fresh { writers: 1, padded: part as u32 });
                            if let Some(x) = p.map.get_mut(&l) {
                                x.src = UNMAPPED;
                            }
                            vol.mapped_blocks.fetch_add(1, Ordering::Relaxed);
                            WBlock { pba, fresh: true, padded: part, src: UNMAPPED, seal: None }
                        }
                        None => {
                            drop(p);
                            self.finish_write(vol, lba, out, false);
                            return Err(self.no_space(vol));
                        }
                    },
                },
                None => {
                    let cv = match self.committed_view(vol, &mut p, l, committed.as_ref().map(|c| c[i as usize])) {
                        Ok(c) => c,
                        Err(e) => {
                            drop(p);
                            self.finish_write(vol, lba, out, false);
                            return Err(e);
                        }
                    };
                    let own_data = cv.birth != NO_OWN && cv.pba != UNMAPPED;
                    if own_data && !shared_with_snapshot(cv.birth, latest_pin) && !redirect {
                        // The volume owns the block alone: write in place (any sub-range).
                        WBlock { pba: cv.pba, fresh: false, padded: false, src: UNMAPPED, seal: None }
                    } else {
                        match self.alloc_block(hint) {
                            Some(pba) => {
                                p.insert(l, pba, PState::Fresh { writers: 1, padded: part as u32 }, cv.pba, cv.own(), false);
                                if !own_data {
                                    vol.mapped_blocks.fetch_add(1, Ordering::Relaxed);
                                }
                                WBlock { pba, fresh: true, padded: part, src: cv.pba, seal: None }
                            }
                            None => {
                                drop(p);
                                self.finish_write(vol, lba, out, false);
                                return Err(self.no_space(vol));
                            }
                        }
                    }
                }
            };
            hint = Some(b.pba + 1);
            out.push(b);
        }
        let kick = p.map.len() >= PENDING_KICK;
        drop(p);
        if kick {
            self.send_commit(CommitMsg::Kick);
        }
        Ok(true)
    }

    /// For a write of `n` blocks from `lba`: the committed views of the range in one iterator
    /// seek when several blocks have neither a pending entry nor a cached view.
    fn committed_prefetch(&self, vol: &VolumeState, p: &Pending, lba: u64, n: u64) -> Result<Option<Vec<CVal>>> {
        let need_db = (0..n).any(|i| !p.map.contains_key(&(lba + i)) && !p.cache.contains_key(&(lba + i)));
        if n > 1 && need_db {
            self.lookup_range(vol, lba, n, p.complete).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The committed view of `l` (no pending entry): cached, prefetched or looked up, and
    /// cached. Under the pending lock, so no commit can interleave and caching is safe.
    fn committed_view(&self, vol: &VolumeState, p: &mut Pending, l: u64, prefetched: Option<CVal>) -> Result<CVal> {
        if let Some(c) = p.cache.get(&l) {
            return Ok(*c);
        }
        let c = match prefetched {
            Some(c) => c,
            None => self.lookup(vol, l, p.complete)?,
        };
        p.cache_put(l, c, &self.cache);
        Ok(c)
    }

    /// The committed seal of block `pba` (cache, then RocksDB).
    pub(crate) fn committed_seal(&self, pba: u64) -> Result<Option<Seal>> {
        if let Some(s) = lock(&self.seal_cache).get(pba) {
            return Ok(Some(*s));
        }
        let k = seal_key(pba);
        let Some(v) = self.db.get_pinned(&k).map_err(Error::meta("get seal"))? else { return Ok(None) };
        let s = Seal::decode(&k, &v)?;
        self.cache_seal(pba, s);
        Ok(Some(s))
    }

    pub(crate) fn cache_seal(&self, pba: u64, s: Seal) {
        let mut c = lock(&self.seal_cache);
        if c.len() >= self.seal_cache_cap {
            // Full: drop some entry (no recency tracking; a miss reads RocksDB's cache).
            c.remove_any();
        }
        c.insert(pba, s);
    }

    /// The next data nonce (FORMAT.md §11.2).
    pub(crate) fn next_nonce(&self) -> Result<[u8; 12]> {
        let Some(n) = self.nonces.get() else { return Err(Error::Crypto("no nonce record".into())) };
        n.next(|r| {
            let mut b = WriteBatch::default();
            b.put(NONCE_KEY, r.encode());
            self.write_meta(b)
        })
    }

    fn alloc_block(&self, hint: Option<u64>) -> Option<u64> {
        lock(&self.alloc).alloc_one(hint)
    }

    fn no_space(&self, vol: &VolumeState) -> Error {
        if !self.nospace_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(pool = %self.path.display(), volume = %vol.name(), "pool is full: writes to unallocated blocks fail with an I/O error until space is freed (discard, delete volumes, or grow the pool)");
        }
        Error::NoSpace
    }

    /// Report completion of a write resolved by `resolve_write`.
    pub(crate) fn finish_write(&self, vol: &VolumeState, lba: u64, blocks: &[WBlock], ok: bool) {
        if !blocks.iter().any(|b| b.fresh) {
            return;
        }
        let mut p = vol.lock_pending();
        for (i, b) in blocks.iter().enumerate() {
            if !b.fresh {
                continue;
            }
            let l = lba + i as u64;
            if let Some(e) = p.map.get(&l).copied() {
                if e.pba != b.pba {
                    continue;
                }
                if let PState::Fresh { writers, padded } = e.state {
                    if e.src_pending {
                        // An encrypted rewrite of an uncommitted block (`resolve_write`):
                        // on success that block is garbage; on failure it is what the lba
                        // holds again, and the new block is.
                        let (pba, freed) = if ok { (b.pba, e.src) } else { (e.src, b.pba) };
                        p.frees.push(freed);
                        p.set(l, pba, PState::Written);
                        if let Some(x) = p.map.get_mut(&l) {
                            x.src_pending = false;
                            x.src = UNMAPPED;
                        }
                        if let (true, Some(seal)) = (ok, b.seal) {
                            p.seals.insert(b.pba, seal);
                        }
                        continue;
                    }
                    let st = if ok {
                        if let Some(seal) = b.seal {
                            p.seals.insert(b.pba, seal);
                        }
                        PState::Written
                    } else {
                        PState::Fresh { writers: writers.saturating_sub(1), padded: padded.saturating_sub(b.padded as u32) }
                    };
                    p.set(l, b.pba, st);
                }
            }
        }
        let waiters = std::mem::take(&mut p.waiters);
        drop(p);
        for w in waiters {
            w.complete(Vec::new());
        }
        if ok && self.nospace_logged.load(Ordering::Relaxed) && lock(&self.alloc).free() > 0 {
            self.nospace_logged.store(false, Ordering::Relaxed);
        }
    }

    /// Blocks of `vol` in [start, end) that read as data (its own or its origin's), as merged
    /// (first lba, count) runs. Pending changes win over committed ones. For sparse export:
    /// holes need not be read.
    pub(crate) fn mapped_runs(&self, vol: &VolumeState, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let chain = vol.chain();
        let p = vol.lock_pending();
        let own = self.committed_range(vol, start, end)?;
        let readable = |e: &PEntry| match e.state {
            PState::Written => true,
            PState::Fresh { .. } => e.src != UNMAPPED,
            PState::Removed => false,
        };
        let mut lbas: Vec<u64> = own
            .iter()
            .filter(|c| self.data_of(&c.entry).is_some())
            .map(|c| c.lba)
            .filter(|l| p.map.get(l).is_none_or(readable))
            .collect();
        lbas.extend(p.map.iter().filter(|(l, e)| **l >= start && **l < end && readable(e)).map(|(l, _)| *l));
        if !chain.is_empty() {
            let own_set: HashSet<u64> = own.iter().map(|c| c.lba).collect();
            for l in self.chain_candidates(&chain, start, end)? {
                if !own_set.contains(&l) && !p.map.contains_key(&l) && self.chain_view(&chain, l)?.is_some() {
                    lbas.push(l);
                }
            }
        }
        drop(p);
        lbas.sort_unstable();
        lbas.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for l in lbas {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == l => *n += 1,
                _ => runs.push((l, 1)),
            }
        }
        Ok(runs)
    }

    /// Unmap [lba, lba+n): the blocks read as zeros. Blocks only this volume's head uses
    /// return to the pool after the next commit; blocks a snapshot shares stay with it.
    pub(crate) fn unmap(&self, vol: &VolumeState, lba: u64, n: u64) -> Result<()> {
        let latest_pin = vol.latest_pin.load(Ordering::Acquire);
        let chain = vol.chain();
        let mut p = vol.lock_pending();
        let committed = self.committed_range(vol, lba, lba + n)?;
        let inherited = if chain.is_empty() { Vec::new() } else { self.chain_candidates(&chain, lba, lba + n)? };
        let mut freed = 0u64;
        // Pending entries in range.
        let pend: Vec<(u64, u64, PState)> = if (n as usize) < p.map.len() {
            (lba..lba + n).filter_map(|l| p.map.get(&l).map(|e| (l, e.pba, e.state))).collect()
        } else {
            p.map.iter().filter(|(l, _)| **l >= lba && **l < lba + n).map(|(l, e)| (*l, e.pba, e.state)).collect()
        };
        let mut handled = HashSet::with_capacity(pend.len());
        for (l, pba, st) in pend {
            handled.insert(l);
            if st != PState::Removed {
                p.frees.push(pba);
                p.set(l, pba, PState::Removed);
                freed += 1;
                if let Some(e) = p.map.get_mut(&l) {
                    if e.src_pending {
                        // An encrypted rewrite in flight: the uncommitted block it replaces
                        // goes too.
                        e.src_pending = false;
                        let src = std::mem::replace(&mut e.src, UNMAPPED);
                        p.frees.push(src);
                    }
                }
            }
        }
        for c in committed {
            if !handled.insert(c.lba) {
                continue;
            }
            let Some(pba) = self.data_of(&c.entry) else {
                // A tombstone already reads as zeros.
                continue;
            };
            let unshared = !shared_with_snapshot(c.entry.birth_gen, latest_pin);
            if unshared {
                p.frees.push(pba);
            }
            p.insert(c.lba, pba, PState::Removed, UNMAPPED, Some(OldHead { pba, birth: c.entry.birth_gen }), unshared);
            freed += 1;
        }
        // Blocks only the origin maps: a tombstone hides them.
        for l in inherited {
            if handled.contains(&l) {
                continue;
            }
            if self.chain_view(&chain, l)?.is_some() {
                p.insert(l, UNMAPPED, PState::Removed, UNMAPPED, None, false);
            }
        }
        vol.mapped_blocks.fetch_sub(freed.min(vol.mapped_blocks.load(Ordering::Relaxed)), Ordering::Relaxed);
        let kick = p.map.len() >= PENDING_KICK;
        drop(p);
        if kick {
            self.send_commit(CommitMsg::Kick);
        }
        Ok(())
    }

    /// Add to `b` what replacing the committed head entry `old` of `lba` in generation `gen`
    /// takes: a shared entry moves to the history (and the dead list) for the snapshots that
    /// still see it; an unshared one is dropped (its block goes to `frees` unless `freed`
    /// says it is already there or `keep` says the new entry reuses it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn retire_head(
        &self,
        b: &mut SortedBatch,
        branch: u64,
        lba: u64,
        old: OldHead,
        gen: u64,
        latest_pin: u64,
        freed: bool,
        keep: Option<u64>,
        frees: &mut Vec<u64>,
    ) {
        if old.birth >= FIRST_INDEXED_BIRTH {
            b.delete(birth_key(branch, old.birth, lba));
        }
        let e = if old.pba == UNMAPPED { MapEntry::tombstone(old.birth) } else { MapEntry::new(old.pba, old.birth) };
        if shared_with_snapshot(old.birth, latest_pin) && old.birth < gen {
            self.note_history(branch);
            let hk = hist_key(branch, lba, old.birth);
            b.put(&hk, HistEntry { entry: e, kill: gen }.encode(&hk));
            let dk = dead_key(branch, gen, old.birth, lba);
            b.put(&dk, encode_dead_value(&dk, e.pba, e.flags));
        } else if old.pba != UNMAPPED && !freed && keep != Some(old.pba) {
            frees.push(old.pba);
        }
    }

    /// Make everything completed so far durable: fdatasync the data, then commit the pending
    /// map changes of every volume in one synced RocksDB batch.
    pub(crate) fn commit(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::DeviceIo(std::io::Error::other("pool failed earlier; restart the daemon")));
        }
        // Snapshot deletion changes which entries are shared; it must not interleave.
        let _m = lock(&self.meta);
        let vols: Vec<Arc<VolumeState>> = self.vols.read().map(|v| v.values().cloned().collect()).unwrap_or_default();
        let mut batch = SortedBatch::default();
        // Per volume: (lba, seq if the entry may be dropped, committed view) of every lba the
        // batch changed.
        #[allow(clippy::type_complexity)]
        let mut taken: Vec<(Arc<VolumeState>, Vec<(u64, Option<u64>, CVal, Option<Seal>)>)> = Vec::new();
        let mut frees = Vec::new();
        for v in &vols {
            let mut p = v.lock_pending();
            if p.map.is_empty() && p.frees.is_empty() {
                continue;
            }
            let branch = v.branch();
            let gen = v.gen.load(Ordering::Acquire);
            let latest_pin = v.latest_pin.load(Ordering::Acquire);
            let origin = v.has_origin();
            // (lba, entry, new head, seq if the entry may be dropped, seal to commit).
            #[allow(clippy::type_complexity)]
            let mut work: Vec<(u64, PEntry, Option<u64>, Option<u64>, Option<Seal>)> = Vec::with_capacity(p.map.len());
            let encrypted = v.encrypted.load(Ordering::Relaxed);
            let mut revert = Vec::new();
            let lbas: Vec<u64> = p.map.keys().copied().collect();
            for l in lbas {
                let Some(e) = p.map.get(&l).copied() else { continue };
                // What the head becomes: Some(pba) data, None zeros.
                let (new, seq) = match e.state {
                    // A block rewritten after a discard, its write still in flight: the old
                    // block may be among this commit's frees, so the old mapping must go now.
                    // The entry stays pending until its write completes.
                    PState::Fresh { writers, .. } if writers > 0 => {
                        if e.src_pending {
                            // An encrypted rewrite in flight over a block that landed and was
                            // never committed: that block is what a flush must make durable
                            // (the rewrite is not complete). It becomes the committed head;
                            // the entry stays pending for the rewrite.
                            (Some(e.src), None)
                        } else if !e.prev_freed {
                            continue;
                        } else {
                            (None, None)
                        }
                    }
                    // Every write of a fresh block failed.
                    PState::Fresh { .. } => {
                        p.frees.push(e.pba);
                        if e.src != UNMAPPED {
                            // A copy-on-write that never happened: the old view stands.
                            revert.push(l);
                            if e.prev.is_none_or(|o| o.pba == UNMAPPED) {
                                v.mapped_blocks.fetch_sub(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        p.set(l, e.pba, PState::Removed);
                        v.mapped_blocks.fetch_sub(1, Ordering::Relaxed);
                        (None, Some(p.seq))
                    }
                    PState::Written => (Some(e.pba), Some(e.seq)),
                    PState::Removed => (None, Some(e.seq)),
                };
                // The seal commits with the mapping (FORMAT.md §11.3).
                let seal = match new {
                    Some(pba) if encrypted => p.seals.get(&pba).copied(),
                    _ => None,
                };
                if encrypted && new.is_some() && seal.is_none() {
                    tracing::error!(volume = %v.name(), lba = l, "encrypted block without a seal; not committing it");
                    continue;
                }
                work.push((l, e, new, seq, seal));
            }
            for l in revert {
                p.map.remove(&l);
            }
            if !p.seals.is_empty() {
                let p = &mut *p;
                for f in &p.frees {
                    p.seals.remove(f);
                }
            }
            frees.append(&mut p.frees);
            // The batch is built without the lock: the data path keeps running meanwhile, and
            // whatever it changes is caught by the seq check after the write.
            drop(p);
            let mut changes = Vec::with_capacity(work.len());
            if !work.is_empty() {
                self.note_head(branch);
            }
            for (l, e, new, seq, seal) in work {
                if let Some(old) = e.prev {
                    self.retire_head(&mut batch, branch, l, old, gen, latest_pin, e.prev_freed, new, &mut frees);
                }
                let k = map_key(branch, l);
                let cv = match new {
                    Some(pba) => {
                        batch.put(k, MapEntry::new(pba, gen).encode(&k));
                        if let Some(s) = seal {
                            batch.put(seal_key(pba), s.encode(pba));
                        }
                        CVal { pba, birth: gen }
                    }
                    None if origin => {
                        batch.put(k, MapEntry::tombstone(gen).encode(&k));
                        CVal { pba: UNMAPPED, birth: gen }
                    }
                    None => {
                        batch.delete(k);
                        CVal::NONE
                    }
                };
                if cv.birth != NO_OWN && gen >= FIRST_INDEXED_BIRTH {
                    let bk = birth_key(branch, gen, l);
                    batch.put(&bk, encode_birth_value(&bk));
                }
                changes.push((l, seq, cv, seal));
            }
            taken.push((v.clone(), changes));
        }
        // Data first: a mapping must never become durable before the data it points to.
        // SAFETY: fdatasync on a valid fd has no memory effects.
        let r = unsafe { libc::fdatasync(self.data.as_raw_fd()) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            self.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "fdatasync of the data device failed; the pool stops accepting I/O");
            return Err(Error::DeviceIo(e));
        }
        if !taken.is_empty() {
            if let Err(e) = self.write_meta(batch.into_batch()) {
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "metadata commit failed; the pool stops accepting I/O");
                // The frees of this commit are dropped: they stay marked used until the next
                // open rebuilds the allocator, so nothing is reused.
                return Err(e);
            }
        }
        for (v, changes) in taken {
            let mut p = v.lock_pending();
            p.cache_gen += 1;
            for (l, s, cv, seal) in changes {
                // The cache follows the committed map for every block this batch changed.
                p.cache_put(l, cv, &self.cache);
                if let Some(seal) = seal {
                    // Committed: from now on found through the committed seals.
                    self.cache_seal(cv.pba, seal);
                    p.seals.remove(&cv.pba);
                }
                match p.map.get_mut(&l) {
                    Some(e) if s == Some(e.seq) => {
                        p.map.remove(&l);
                    }
                    // Changed meanwhile and changed back to exactly what was committed (an
                    // encrypted rewrite of the block that failed and put it back): committed.
                    Some(e) if e.state == PState::Written && !e.src_pending && cv.pba != UNMAPPED && e.pba == cv.pba => {
                        p.map.remove(&l);
                    }
                    Some(e) => {
                        // Changed meanwhile: it now replaces what this batch committed. If that
                        // block is not the pending one (or was discarded), the discard that
                        // changed it already freed it — unless an encrypted rewrite redirected
                        // from it: then it is no longer uncommitted, and the commit of the
                        // rewrite retires it like any committed head.
                        if e.src_pending && e.src == cv.pba && cv.pba != UNMAPPED {
                            e.src_pending = false;
                            e.prev_freed = false;
                        } else {
                            e.prev_freed = cv.pba != UNMAPPED && (e.pba != cv.pba || e.state == PState::Removed);
                        }
                        e.prev = cv.own();
                    }
                    None => {}
                }
            }
            // An idle volume gives its pending map's memory back (a busy one regrows it; the
            // rehash of up to PENDING_KICK entries is small next to a commit).
            if p.map.capacity() > 1024 && p.map.len() < p.map.capacity() / 8 {
                p.map.shrink_to_fit();
            }
        }
        let mut out = Vec::new();
        lock(&self.reclaim).retire(frees, &mut out);
        self.release_blocks(out);
        Ok(())
    }

    /// Record that branch `b` may have history entries (before writing one).
    pub(crate) fn note_history(&self, b: u64) {
        note(&self.hist_branches, b);
    }

    /// Record that branch `b` may have head entries (before writing one).
    pub(crate) fn note_head(&self, b: u64) {
        note(&self.head_branches, b);
    }

    /// Write a metadata batch (synced). A test hook can make the n-th write fail, which
    /// stops the pool like a crash at that point would.
    pub(crate) fn write_meta(&self, b: WriteBatch) -> Result<()> {
        if let Some(f) = &self.fault {
            if f.fetch_update(Ordering::AcqRel, Ordering::Acquire, |x| x.checked_sub(1)).is_err() {
                self.failed.store(true, Ordering::Release);
                return Err(Error::DeviceIo(std::io::Error::other("injected metadata write failure")));
            }
        }
        self.db.write_opt(b, &sync_write()).map_err(|e| Error::Meta { op: "write", source: e })
    }
}

fn committer(shared: Arc<Shared>, rx: mpsc::Receiver<CommitMsg>, interval: Duration) {
    loop {
        let first = match rx.recv_timeout(interval) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut msgs: Vec<CommitMsg> = first.into_iter().collect();
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        let shutdown = msgs.iter().any(|m| matches!(m, CommitMsg::Shutdown));
        if msgs.is_empty() && !shared.has_pending() {
            continue;
        }
        let r = shared.commit();
        if let Err(e) = &r {
            tracing::error!(error = %e, "commit failed");
        }
        let mut by_queue: HashMap<usize, (Arc<QueueShared>, Vec<Completion>)> = HashMap::new();
        for m in msgs {
            match m {
                CommitMsg::Flush { queue, tag } => {
                    let res = match &r {
                        Ok(()) => Ok(0),
                        Err(_) => Err(libc::EIO),
                    };
                    let key = Arc::as_ptr(&queue) as usize;
                    by_queue.entry(key).or_insert_with(|| (queue, Vec::new())).1.push(Completion { tag, result: res });
                }
                CommitMsg::Sync(tx) => {
                    let _ = tx.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                CommitMsg::Kick | CommitMsg::Shutdown => {}
            }
        }
        for (_, (q, c)) in by_queue {
            q.complete(c);
        }
        if shutdown {
            return;
        }
    }
}

/// Information about one volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    /// Bytes of data blocks the volume's own branch maps (a clone's or rolled-back volume's
    /// inherited blocks are counted on the snapshot it reads through).
    pub allocated_bytes: u64,
    pub created_ns: u64,
    pub attached_rw: bool,
    pub attached_ro: u64,
    /// `VOL@SNAP` whose data shows through unwritten blocks (a clone's parent, or the snapshot
    /// the volume was rolled back to); `None` for an independent volume.
    pub origin: Option<String>,
    /// Data encrypted at rest (FORMAT.md §11).
    pub encrypted: bool,
}

/// Bytes a hashbrown table of `capacity` entries of `entry` bytes holds: buckets are a power of
/// two at most 7/8 full, each one entry plus a control byte.
fn table_bytes(capacity: usize, entry: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity * 8 / 7).next_power_of_two();
    (buckets * (entry + 1)) as u64
}

/// Pool-wide usage.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub path: PathBuf,
    pub meta_dir: PathBuf,
    pub uuid: String,
    pub version: u32,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Freed but not reusable yet (waiting for a commit or for in-flight requests).
    pub pending_free_bytes: u64,
    /// Held only by snapshots (including the origins of clones): what deleting every
    /// snapshot would free.
    pub snapshot_bytes: u64,
    pub volumes: Vec<VolumeInfo>,
}

/// Where the pool's memory goes (estimates from the structures' sizes and RocksDB's own
/// properties); for `vblk pool status` and the memory benchmark.
#[derive(Debug, Clone, Default)]
pub struct MemoryStats {
    /// The configured metadata cache (`PoolOptions::cache_bytes`): half RocksDB (active
    /// memtable and block cache), half map cache.
    pub cache_budget_bytes: u64,
    /// Map cache entries held (all volumes) and their estimated bytes.
    pub map_cache_entries: u64,
    pub map_cache_bytes: u64,
    /// Uncommitted map entries (all volumes) and the bytes their tables hold (capacity).
    pub pending_entries: u64,
    pub pending_bytes: u64,
    /// RocksDB: memtables (active and immutable), block cache in use, table readers (index and
    /// filter blocks, which are kept out of the block cache).
    pub rocksdb_memtable_bytes: u64,
    pub rocksdb_block_cache_bytes: u64,
    pub rocksdb_table_readers_bytes: u64,
}

/// Result of `check`.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub records: u64,
    pub map_entries: u64,
    pub referenced_blocks: u64,
    pub allocated_blocks: u64,
    /// Problems found, each with its location.
    pub errors: Vec<String>,
    /// Blocks marked used that nothing references (space leaks).
    pub leaked_blocks: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.leaked_blocks == 0
    }
}

/// An open pool. Dropping it commits and stops the committer.
pub struct Pool {
    pub(crate) shared: Arc<Shared>,
    committer: Option<JoinHandle<()>>,
}

impl Pool {
    /// Open the pool at `path`, taking an exclusive lock on it.
    pub fn open(path: &Path, opts: &PoolOptions) -> Result<Pool> {
        let t_open = std::time::Instant::now();
        let lockf = File::open(path).map_err(Error::io("open", path))?;
        lock_exclusive(&lockf, path)?;
        let data = open_data(path)?;
        let mut sbk = read_sb(&data, path)?;
        // A damaged primary recovered from the backup is rewritten.
        if read_sb_at(&data, path, 0).ok().as_ref() != Some(&sbk) {
            write_sb(&data, path, &sbk)?;
        }
        if sbk.autoclear & !AUTOCLEAR_KNOWN != 0 {
            // qcow2 semantics: a writer that does not know an autoclear feature clears its bit,
            // telling later versions that the data it describes may be stale.
            sbk.autoclear &= AUTOCLEAR_KNOWN;
            write_sb(&data, path, &sbk)?;
        }
        let dev = device_size(&data, path)?;
        if DATA_START + sbk.total_blocks * BLOCK_SIZE > dev {
            return Err(Error::Corrupt {
                location: Location::Superblock,
                what: format!("superblock says {} blocks but the device holds only {} bytes", sbk.total_blocks, dev),
            });
        }
        let meta_dir = opts.meta_dir.clone().unwrap_or_else(|| default_meta_dir(path));
        if !meta_dir.join("CURRENT").exists() {
            return Err(Error::Io {
                op: "open metadata",
                path: meta_dir,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no RocksDB here"),
            });
        }
        let (block_cache, memtable) = rocksdb_split(opts.cache_bytes, opts.memtable_bytes);
        let db = DB::open(&db_options(block_cache, false, memtable)?, &meta_dir).map_err(Error::meta("open"))?;
        let t_db = t_open.elapsed();
        let rec = match db.get(POOL_KEY).map_err(Error::meta("get pool record"))? {
            Some(v) => PoolRecord::decode(&v)?,
            None => {
                return Err(Error::Corrupt { location: Location::Record(POOL_KEY.to_vec()), what: "pool record missing".into() })
            }
        };
        if rec.uuid != sbk.uuid {
            return Err(Error::Corrupt {
                location: Location::Record(POOL_KEY.to_vec()),
                what: format!(
                    "metadata {} belongs to pool {}, not to this pool {}",
                    meta_dir.display(),
                    uuid_string(&rec.uuid),
                    uuid_string(&sbk.uuid)
                ),
            });
        }
        let mut problems = Vec::new();
        let mut vols = BTreeMap::new();
        let mut cat = Catalog::default();
        for item in db.iterator(IteratorMode::From(&[format::key::BRANCH], Direction::Forward)) {
            let (k, v) = item.map_err(Error::meta("scan branches"))?;
            match k.first() {
                Some(&format::key::BRANCH) => match BranchRecord::decode(&k, &v) {
                    Ok(r) => {
                        cat.branches.insert(r.id, r);
                    }
                    Err(e) => problems.push(e.to_string()),
                },
                Some(&format::key::SNAP) => match SnapRecord::decode(&k, &v) {
                    Ok(r) => {
                        cat.snaps.insert((r.branch, r.gen), r);
                    }
                    Err(e) => problems.push(e.to_string()),
                },
                _ => break,
            }
        }
        let mut upgrade = WriteBatch::default();
        let mut by_layer: HashMap<u64, Arc<VolumeState>> = HashMap::new();
        for item in db.iterator(IteratorMode::From(&[format::key::VOLUME], Direction::Forward)) {
            let (k, v) = item.map_err(Error::meta("scan volumes"))?;
            if k.first() != Some(&format::key::VOLUME) {
                break;
            }
            match VolumeRecord::decode(&k, &v) {
                Ok(r) => {
                    let vs = Arc::new(VolumeState::new(r.id, r.layer, r.name.clone(), r.size_bytes, r.created_ns));
                    vs.encrypted.store(r.flags & vol_flags::ENCRYPTED != 0, Ordering::Relaxed);
                    if !cat.branches.contains_key(&r.layer) {
                        // A version-1 pool: every volume is one branch in generation 1.
                        let br = BranchRecord { id: r.layer, gen: 1, origin_branch: 0, origin_gen: 0, head_volume: r.id, created_ns: r.created_ns };
                        upgrade.put(branch_key(r.layer), br.encode());
                        cat.branches.insert(r.layer, br);
                    }
                    vs.gen.store(cat.branches.get(&r.layer).map(|b| b.gen).unwrap_or(1), Ordering::Relaxed);
                    vs.latest_pin.store(cat.latest_pin(r.layer), Ordering::Relaxed);
                    if let Ok(mut c) = vs.chain.write() {
                        *c = cat.chain(r.layer);
                        vs.lock_pending().has_origin = !c.is_empty();
                    }
                    by_layer.insert(r.layer, vs.clone());
                    vols.insert(r.name, vs);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !upgrade.is_empty() {
            db.write_opt(upgrade, &sync_write()).map_err(Error::meta("upgrade to format version 2"))?;
        }
        if sbk.version < FORMAT_VERSION {
            tracing::info!(pool = %path.display(), from = sbk.version, to = FORMAT_VERSION, "upgrading the pool format");
            sbk.version = FORMAT_VERSION;
            write_sb(&data, path, &sbk)?;
        }
        let mut alloc = Allocator::new(sbk.total_blocks);
        // The scan that rebuilds the allocator also warms the block-map cache (up to its
        // budget), so the first requests after a start do not each pay a RocksDB lookup: on a
        // cold cache those reads of SST blocks cost ~100 µs of CPU per request once the map
        // outgrew the block cache.
        let cache = CacheBudget { cap: opts.cache_bytes / 2 / CacheBudget::ENTRY_BYTES, used: Default::default() };
        let mut head_branches = HashSet::new();
        for item in db.iterator(IteratorMode::From(&[format::key::MAP], Direction::Forward)) {
            let (k, v) = item.map_err(Error::meta("scan block maps"))?;
            if k.first() != Some(&format::key::MAP) {
                break;
            }
            let Some((layer, lba)) = parse_map_key(&k) else {
                problems.push(format!("{}: malformed map key", Location::Record(k.to_vec())));
                continue;
            };
            head_branches.insert(layer);
            match MapEntry::decode(&k, &v) {
                Ok(e) => {
                    if !e.is_tombstone() && !alloc.mark_used(e.pba) {
                        problems.push(format!(
                            "{}: physical block {} is out of range or referenced twice",
                            Location::Record(k.to_vec()),
                            e.pba
                        ));
                    }
                    match by_layer.get(&layer) {
                        Some(v) => {
                            if !e.is_tombstone() {
                                v.mapped_blocks.fetch_add(1, Ordering::Relaxed);
                            }
                            let mut p = v.lock_pending();
                            if cache.used.load(Ordering::Relaxed) < cache.cap {
                                let pba = if e.is_tombstone() || e.pba >= sbk.total_blocks { UNMAPPED } else { e.pba };
                                p.cache_put(lba, CVal { pba, birth: e.birth_gen }, &cache);
                            } else {
                                p.complete = false;
                            }
                        }
                        None if cat.branches.contains_key(&layer) => {}
                        None => problems.push(format!("{}: map entry of unknown branch {layer} (lba {lba})", Location::Record(k.to_vec()))),
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let mut hist_branches = HashSet::new();
        for item in db.iterator(IteratorMode::From(&[format::key::HIST], Direction::Forward)) {
            let (k, v) = item.map_err(Error::meta("scan history"))?;
            if k.first() != Some(&format::key::HIST) {
                break;
            }
            if let Some((b, _, _)) = parse_hist_key(&k) {
                hist_branches.insert(b);
            }
            match HistEntry::decode(&k, &v) {
                Ok(h) => {
                    if !h.entry.is_tombstone() && !alloc.mark_used(h.entry.pba) {
                        problems.push(format!(
                            "{}: physical block {} is out of range or referenced twice",
                            Location::Record(k.to_vec()),
                            h.entry.pba
                        ));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        for p in &problems {
            tracing::error!("pool open: {p} (run `vblk check`)");
        }
        let (tx, rx) = mpsc::channel();
        let enc_on = sbk.incompat & incompat::ENCRYPTION != 0;
        let cache_cap = cache.cap;
        let shared = Arc::new(Shared {
            path: path.into(),
            meta_dir,
            data,
            _lock: lockf,
            sb: sbk,
            db,
            alloc: Mutex::new(alloc),
            reclaim: Mutex::new(Reclaim::default()),
            vols: RwLock::new(vols),
            record: Mutex::new(rec),
            control: Mutex::new(()),
            commit_tx: Mutex::new(tx),
            failed: AtomicBool::new(false),
            open_problems: problems,
            nospace_logged: AtomicBool::new(false),
            cache,
            cache_budget_bytes: opts.cache_bytes,
            meta: Mutex::new(()),
            cat: Mutex::new(cat),
            snap_readers: Mutex::new(HashMap::new()),
            hist_branches: RwLock::new(hist_branches),
            head_branches: RwLock::new(head_branches),
            fault: opts.fail_meta_after.map(std::sync::atomic::AtomicU64::new),
            master: Mutex::new(opts.master_key.clone()),
            nonces: std::sync::OnceLock::new(),
            seal_cache: Mutex::new(crate::lba_table::LbaTable::default()),
            // As many seals as the map cache holds entries: the blocks whose mappings are cached
            // are the ones reads find without RocksDB, and a seal lookup that missed cost
            // 10-20 µs (SST reads) once the seals outgrew RocksDB's block cache. 40-byte slots,
            // at most 3/4 full: up to ~55 bytes per cached seal, only in pools with encrypted data.
            seal_cache_cap: cache_cap.max(1024),
            encryption_on: AtomicBool::new(enc_on),
        });
        shared.load_keys()?;
        let s2 = shared.clone();
        let interval = opts.commit_interval;
        let committer = std::thread::Builder::new()
            .name("vblk-commit".into())
            .spawn(move || committer(s2, rx, interval))
            .map_err(Error::io("spawn committer", path))?;
        let pool = Pool { shared, committer: Some(committer) };
        let t_scan = t_open.elapsed();
        pool.resume()?;
        let t_end = t_open.elapsed();
        // Where a slow open spent its time (RocksDB replaying its log, the scans that rebuild
        // the allocator, operations a stop interrupted).
        tracing::info!(
            pool = %path.display(),
            total_ms = t_end.as_millis() as u64,
            metadata_ms = t_db.as_millis() as u64,
            scan_ms = (t_scan - t_db).as_millis() as u64,
            resume_ms = (t_end - t_scan).as_millis() as u64,
            "pool open timings"
        );
        Ok(pool)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn superblock(&self) -> &Superblock {
        &self.shared.sb
    }

    /// Commit everything completed so far and wait until it is durable.
    pub fn sync(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        if !self.shared.send_commit(CommitMsg::Sync(tx)) {
            return Err(Error::ShuttingDown);
        }
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::DeviceIo(std::io::Error::other(e))),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    pub(crate) fn control(&self) -> MutexGuard<'_, ()> {
        lock(&self.shared.control)
    }

    pub(crate) fn get(&self, name: &str) -> Result<Arc<VolumeState>> {
        self.shared
            .vols
            .read()
            .ok()
            .and_then(|v| v.get(name).cloned())
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    pub(crate) fn write_record(&self, b: &mut WriteBatch, v: &VolumeState, name: &str) {
        let r = VolumeRecord {
            id: v.id,
            size_bytes: v.size(),
            created_ns: v.created_ns,
            flags: if v.encrypted.load(Ordering::Relaxed) { vol_flags::ENCRYPTED } else { 0 },
            layer: v.branch(),
            origin_layer: 0,
            origin_gen: 0,
            name: name.to_string(),
        };
        b.put(volume_key(v.id), r.encode());
    }

    fn check_size(size: u64) -> Result<()> {
        if size == 0 {
            return Err(Error::InvalidSize("volume size must be greater than zero".into()));
        }
        if size % BLOCK_SIZE != 0 {
            return Err(Error::InvalidSize(format!("{size} is not a multiple of 4096 bytes")));
        }
        if size > MAX_VOLUME_SIZE {
            return Err(Error::InvalidSize(format!("{size} exceeds the maximum volume size of 64 PiB")));
        }
        Ok(())
    }

    /// Create a thin volume. It may be larger than the pool.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, false)
    }

    /// Create a thin volume whose data is encrypted (FORMAT.md §11) under a new data key; the
    /// pool must have been opened with its master key.
    pub fn create_encrypted_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, true)
    }

    fn create_volume_with(&self, name: &str, size_bytes: u64, encrypted: bool) -> Result<VolumeInfo> {
        validate_name(name)?;
        Self::check_size(size_bytes)?;
        self.shared.check_failed()?;
        let _c = self.control();
        if self.get(name).is_ok() {
            return Err(Error::VolumeExists(name.into()));
        }
        let mut rec = lock(&self.shared.record).clone();
        let id = rec.next_id;
        rec.next_id += 1;
        let v = Arc::new(VolumeState::new(id, id, name.into(), size_bytes, now_ns()));
        let mut b = WriteBatch::default();
        let mut new_nonces = None;
        if encrypted {
            new_nonces = self.shared.prepare_encryption(&mut b)?;
            let dek = crate::crypt::Key(crate::crypt::random::<32>()?);
            b.put(key_key(id), self.shared.wrap_for(id, id, &dek)?);
            v.encrypted.store(true, Ordering::Relaxed);
            let _ = v.crypt.set(Arc::new(crate::crypt::VolCrypt::new(id, &dek)?.with_key(dek)));
        }
        b.put(POOL_KEY, rec.encode());
        self.write_record(&mut b, &v, name);
        b.put(name_key(name), encode_name_value(name, id));
        let br = BranchRecord { id, gen: 1, origin_branch: 0, origin_gen: 0, head_volume: id, created_ns: now_ns() };
        b.put(branch_key(id), br.encode());
        {
            let _m = lock(&self.shared.meta);
            self.shared.write_meta(b)?;
            lock(&self.shared.cat).branches.insert(id, br);
        }
        self.shared.encryption_prepared(new_nonces);
        *lock(&self.shared.record) = rec;
        if let Ok(mut vols) = self.shared.vols.write() {
            vols.insert(name.into(), v.clone());
        }
        Ok(self.info_of(&v))
    }

    pub(crate) fn info_of(&self, v: &VolumeState) -> VolumeInfo {
        VolumeInfo {
            id: v.id,
            name: v.name(),
            size_bytes: v.size(),
            allocated_bytes: v.mapped_blocks.load(Ordering::Relaxed) * BLOCK_SIZE,
            created_ns: v.created_ns,
            attached_rw: v.writers.load(Ordering::Relaxed) > 0,
            attached_ro: v.readers.load(Ordering::Relaxed),
            origin: self.origin_name(v),
            encrypted: v.encrypted.load(Ordering::Relaxed),
        }
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let vols: Vec<Arc<VolumeState>> = self.shared.vols.read().map(|v| v.values().cloned().collect()).unwrap_or_default();
        vols.iter().map(|v| self.info_of(v)).collect()
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let v = self.get(name)?;
        Ok(self.info_of(&v))
    }

    /// Resize. Growing works while attached (the guest is told through the resize watchers);
    /// shrinking needs `allow_shrink`, a detached volume, and frees the cut-off tail.
    pub fn resize_volume(&self, name: &str, new_size: u64, allow_shrink: bool) -> Result<VolumeInfo> {
        Self::check_size(new_size)?;
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(name)?;
        let old = v.size();
        if new_size < old {
            if !allow_shrink {
                return Err(Error::InvalidSize(format!(
                    "{new_size} is smaller than the current size {old}; shrinking discards data past the new end, pass --shrink to do it"
                )));
            }
            if v.writers.load(Ordering::Acquire) > 0 || v.readers.load(Ordering::Acquire) > 0 {
                return Err(Error::Busy { name: name.into(), why: "attached; detach it before shrinking" });
            }
            // The tail's mappings are deleted durably before the smaller size is recorded: a
            // crash in between leaves the old size with a tail that reads as zeros.
            v.size_bytes.store(new_size, Ordering::Release);
            let first = new_size / BLOCK_SIZE;
            let last = old / BLOCK_SIZE;
            self.shared.unmap(&v, first, last - first)?;
            self.sync()?;
        }
        let mut b = WriteBatch::default();
        v.size_bytes.store(new_size, Ordering::Release);
        self.write_record(&mut b, &v, name);
        self.shared.db.write_opt(b, &sync_write()).map_err(Error::meta("resize"))?;
        drop(_c);
        if new_size > old {
            v.notify_resize(new_size);
        }
        Ok(self.info_of(&v))
    }

    pub fn rename_volume(&self, name: &str, new_name: &str) -> Result<VolumeInfo> {
        validate_name(new_name)?;
        self.shared.check_failed()?;
        let _c = self.control();
        let v = self.get(name)?;
        if self.get(new_name).is_ok() {
            return Err(Error::VolumeExists(new_name.into()));
        }
        let mut b = WriteBatch::default();
        self.write_record(&mut b, &v, new_name);
        b.delete(name_key(name));
        b.put(name_key(new_name), encode_name_value(new_name, v.id));
        self.shared.db.write_opt(b, &sync_write()).map_err(Error::meta("rename"))?;
        if let Ok(mut vols) = self.shared.vols.write() {
            vols.remove(name);
            vols.insert(new_name.into(), v.clone());
        }
        if let Ok(mut n) = v.name.write() {
            *n = new_name.into();
        }
        Ok(self.info_of(&v))
    }

    /// Delete a detached volume and free its blocks. A volume with snapshots or clones is
    /// refused unless `recursive`, which deletes its clones (recursively) and snapshots too.
    /// Snapshots that clones depend on keep their blocks until those clones are gone.
    pub fn delete_volume(&self, name: &str, recursive: bool) -> Result<()> {
        self.shared.check_failed()?;
        let _c = self.control();
        self.delete_volume_locked(name, recursive)
    }

    /// Open a volume for I/O. At most one read-write opener at a time.
    pub fn open_volume(&self, name: &str, read_only: bool) -> Result<crate::Volume> {
        let _c = self.control();
        let v = self.get(name)?;
        if v.encrypted.load(Ordering::Relaxed) && v.crypt.get().is_none() {
            return Err(Error::KeyUnavailable(name.into()));
        }
        if read_only {
            v.readers.fetch_add(1, Ordering::AcqRel);
        } else if v.writers.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(Error::Busy { name: name.into(), why: "already attached read-write" });
        }
        Ok(crate::Volume::new(self.shared.clone(), v, read_only))
    }

    pub fn status(&self) -> PoolStatus {
        let (used, total) = {
            let a = lock(&self.shared.alloc);
            (a.used(), a.total())
        };
        let pend = lock(&self.shared.reclaim).pending_blocks()
            + self
                .shared
                .vols
                .read()
                .map(|v| v.values().map(|x| x.lock_pending().frees.len() as u64).sum::<u64>())
                .unwrap_or(0);
        PoolStatus {
            path: self.shared.path.clone(),
            meta_dir: self.shared.meta_dir.clone(),
            uuid: uuid_string(&self.shared.sb.uuid),
            version: self.shared.sb.version,
            total_bytes: total * BLOCK_SIZE,
            used_bytes: used * BLOCK_SIZE,
            free_bytes: (total - used) * BLOCK_SIZE,
            pending_free_bytes: pend * BLOCK_SIZE,
            snapshot_bytes: {
                let heads: u64 = self.list_volumes().iter().map(|v| v.allocated_bytes / BLOCK_SIZE).sum();
                used.saturating_sub(pend).saturating_sub(heads) * BLOCK_SIZE
            },
            volumes: self.list_volumes(),
        }
    }

    /// Compact the whole metadata store now: flush the memtable and merge every level, which
    /// drops the tombstones that deletes leave behind (scans such as `check` otherwise step over
    /// each of them until RocksDB compacts on its own). Takes a moment on a large pool.
    pub fn compact_metadata(&self) -> Result<()> {
        self.shared.db.flush().map_err(Error::meta("flush"))?;
        self.shared.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }

    /// Where the pool's memory goes (see [`MemoryStats`]).
    pub fn memory(&self) -> MemoryStats {
        let sh = &self.shared;
        let prop = |name: &str| sh.db.property_int_value(name).ok().flatten().unwrap_or(0);
        let mut m = MemoryStats {
            cache_budget_bytes: sh.cache_budget_bytes as u64,
            rocksdb_memtable_bytes: prop("rocksdb.cur-size-all-mem-tables"),
            rocksdb_block_cache_bytes: prop("rocksdb.block-cache-usage"),
            rocksdb_table_readers_bytes: prop("rocksdb.estimate-table-readers-mem"),
            ..MemoryStats::default()
        };
        if let Ok(vols) = sh.vols.read() {
            for v in vols.values() {
                let p = v.lock_pending();
                m.map_cache_entries += p.cache.len() as u64;
                m.map_cache_bytes += p.cache.bytes() as u64;
                m.pending_entries += p.map.len() as u64;
                m.pending_bytes += table_bytes(p.map.capacity(), std::mem::size_of::<(u64, crate::volume::PEntry)>());
            }
        }
        m
    }

    /// Verify the pool: every record's checksum and fields, map vs allocation (double
    /// references, out-of-range blocks, leaks), and the snapshot structures: every history
    /// entry has its dead-list entry and a snapshot that still sees it, the birth index
    /// matches the head entries, branches and snapshots refer to each other consistently.
    /// Commits first and holds every volume's pending lock and the allocator while it scans,
    /// so it pauses I/O for its duration.
    pub fn check(&self) -> Result<CheckReport> {
        let _c = self.control();
        let (tx, rx) = mpsc::channel();
        if self.shared.send_commit(CommitMsg::Sync(tx)) {
            if let Ok(Err(e)) = rx.recv() {
                return Err(Error::DeviceIo(std::io::Error::other(e)));
            }
        }
        let s = &self.shared;
        let _m = lock(&s.meta);
        let vols: Vec<Arc<VolumeState>> = s.vols.read().map(|v| v.values().cloned().collect()).unwrap_or_default();
        let guards: Vec<_> = vols.iter().map(|v| v.lock_pending()).collect();
        let cat = lock(&s.cat);
        let alloc = lock(&s.alloc);
        let reclaim = lock(&s.reclaim);
        let mut rep = CheckReport::default();
        let total = s.sb.total_blocks;
        let mut refd = vec![0u64; total.div_ceil(64) as usize];
        let mut mark = |pba: u64, what: &dyn Fn() -> String, rep: &mut CheckReport| {
            if pba >= total {
                rep.errors.push(format!("{}: physical block {pba} is past the end of the pool ({total} blocks)", what()));
                return;
            }
            let w = &mut refd[(pba / 64) as usize];
            if *w & (1 << (pba % 64)) != 0 {
                rep.errors.push(format!("{}: physical block {pba} is referenced twice", what()));
            }
            *w |= 1 << (pba % 64);
            rep.referenced_blocks += 1;
        };
        let mut vol_recs: HashMap<u64, VolumeRecord> = HashMap::new();
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut branches: HashMap<u64, BranchRecord> = HashMap::new();
        let mut snaps: HashMap<(u64, u64), SnapRecord> = HashMap::new();
        // (branch, lba) -> birth of head entries; (branch, birth, lba) of the birth index;
        // (branch, lba, birth) -> (kill, pba, flags) of history; dead list the same way.
        let mut heads: HashMap<(u64, u64), u64> = HashMap::new();
        let mut births: HashSet<(u64, u64, u64)> = HashSet::new();
        let mut hist: HashMap<(u64, u64, u64), (u64, u64, u32)> = HashMap::new();
        let mut dead: HashMap<(u64, u64, u64), (u64, u64, u32)> = HashMap::new();
        let mut key_recs: HashMap<u64, u64> = HashMap::new();
        let mut seals: HashSet<u64> = HashSet::new();
        // (branch, lba, pba) of every head entry with data.
        let mut head_blocks: Vec<(u64, u64, u64)> = Vec::new();
        let pending_of = |layer: u64| vols.iter().zip(guards.iter()).find(|(v, _)| v.branch() == layer).map(|(_, g)| g);
        for item in s.db.iterator(IteratorMode::Start) {
            let (k, v) = item.map_err(Error::meta("check scan"))?;
            rep.records += 1;
            let loc = Location::Record(k.to_vec());
            match k.first().copied() {
                Some(format::key::POOL) if &*k == POOL_KEY => {
                    if let Err(e) = PoolRecord::decode(&v) {
                        rep.errors.push(e.to_string());
                    }
                }
                Some(format::key::VOLUME) => match VolumeRecord::decode(&k, &v) {
                    Ok(r) => {
                        names.insert(r.name.clone(), r.id);
                        vol_recs.insert(r.id, r);
                    }
                    Err(e) => rep.errors.push(e.to_string()),
                },
                Some(format::key::NAME) => match decode_name_value(&k, &v) {
                    Ok(id) => {
                        let n = String::from_utf8_lossy(&k[1..]).to_string();
                        if names.get(&n) != Some(&id) {
                            rep.errors.push(format!("{loc}: name index {n:?} -> volume {id} does not match a volume record"));
                        }
                    }
                    Err(e) => rep.errors.push(e.to_string()),
                },
                Some(format::key::MAP) => {
                    rep.map_entries += 1;
                    let Some((layer, lba)) = parse_map_key(&k) else {
                        rep.errors.push(format!("{loc}: malformed map key"));
                        continue;
                    };
                    match MapEntry::decode(&k, &v) {
                        Ok(e) => {
                            heads.insert((layer, lba), e.birth_gen);
                            if e.is_tombstone() {
                                continue;
                            }
                            head_blocks.push((layer, lba, e.pba));
                            // An entry whose block the pending state already freed (a discard
                            // not yet committed) no longer references it.
                            let freed = pending_of(layer)
                                .and_then(|g| g.map.get(&lba))
                                .map(|p| p.prev_freed && p.prev.map(|o| o.pba) == Some(e.pba))
                                .unwrap_or(false);
                            if !freed {
                                mark(e.pba, &|| format!("{loc} (branch {layer}, block {lba})"), &mut rep);
                            }
                        }
                        Err(e) => rep.errors.push(e.to_string()),
                    }
                }
                Some(format::key::BRANCH) => match BranchRecord::decode(&k, &v) {
                    Ok(r) => {
                        branches.insert(r.id, r);
                    }
                    Err(e) => rep.errors.push(e.to_string()),
                },
                Some(format::key::SNAP) => match SnapRecord::decode(&k, &v) {
                    Ok(r) => {
                        snaps.insert((r.branch, r.gen), r);
                    }
                    Err(e) => rep.errors.push(e.to_string()),
                },
                Some(format::key::DEAD) => match (parse_dead_key(&k), decode_dead_value(&k, &v)) {
                    (Some((b, kill, birth, lba)), Ok((pba, flags))) => {
                        dead.insert((b, lba, birth), (kill, pba, flags));
                    }
                    (None, _) => rep.errors.push(format!("{loc}: malformed dead-list key")),
                    (_, Err(e)) => rep.errors.push(e.to_string()),
                },
                Some(format::key::BIRTH) => match (parse_birth_key(&k), decode_birth_value(&k, &v)) {
                    (Some(t), Ok(())) => {
                        births.insert(t);
                    }
                    (None, _) => rep.errors.push(format!("{loc}: malformed birth index key")),
                    (_, Err(e)) => rep.errors.push(e.to_string()),
                },
                Some(format::key::HIST) => match (parse_hist_key(&k), HistEntry::decode(&k, &v)) {
                    (Some((b, lba, birth)), Ok(h)) => {
                        hist.insert((b, lba, birth), (h.kill, h.entry.pba, h.entry.flags));
                        if !h.entry.is_tombstone() {
                            mark(h.entry.pba, &|| format!("{loc} (history of branch {b}, block {lba})"), &mut rep);
                        }
                    }
                    (None, _) => rep.errors.push(format!("{loc}: malformed history key")),
                    (_, Err(e)) => rep.errors.push(e.to_string()),
                },
                Some(format::key::KEY) => match (parse_key_key(&k), KeyRecord::decode(&k, &v)) {
                    (Some(id), Ok(r)) => {
                        key_recs.insert(id, r.family);
                    }
                    (None, _) => rep.errors.push(format!("{loc}: malformed key record key")),
                    (_, Err(e)) => rep.errors.push(e.to_string()),
                },
                Some(format::key::NONCE) if &*k == NONCE_KEY => {
                    if let Err(e) = NonceRecord::decode(&v) {
                        rep.errors.push(e.to_string());
                    }
                }
                Some(format::key::SEAL) => match (parse_seal_key(&k), Seal::decode(&k, &v)) {
                    (Some(pba), Ok(_)) => {
                        seals.insert(pba);
                    }
                    (None, _) => rep.errors.push(format!("{loc}: malformed seal key")),
                    (_, Err(e)) => rep.errors.push(e.to_string()),
                },
                _ => rep.errors.push(format!("{loc}: unknown record type")),
            }
        }
        // Encryption (FORMAT.md §11.5).
        let enc_vols: Vec<&VolumeRecord> = vol_recs.values().filter(|r| r.flags & vol_flags::ENCRYPTED != 0).collect();
        if !enc_vols.is_empty() && s.sb.incompat & incompat::ENCRYPTION == 0 && !s.encryption_on.load(Ordering::Acquire) {
            rep.errors.push("superblock: encrypted volumes exist but the ENCRYPTION feature bit is not set".into());
        }
        if !key_recs.is_empty() && !key_recs.contains_key(&0) {
            rep.errors.push("key records exist but the master-key check record (key 0) is missing".into());
        }
        for (id, family) in &key_recs {
            if *id != 0 && vol_recs.get(id).is_none_or(|r| r.flags & vol_flags::ENCRYPTED == 0) {
                rep.errors.push(format!("{}: key record of volume {id} (family {family}), which is not an encrypted volume", Location::Record(key_key(*id))));
            }
        }
        for r in &enc_vols {
            if key_recs.get(&r.id).is_none_or(|f| *f == 0) {
                rep.errors.push(format!("encrypted volume {:?} has no key record", r.name));
            }
            for (lba, pba) in head_blocks.iter().filter(|(b, _, _)| *b == r.layer).map(|(_, l, p)| (l, p)) {
                if !seals.contains(pba) {
                    rep.errors.push(format!("encrypted volume {:?}: block {lba} (pba {pba}) has no seal record", r.name));
                }
            }
        }
        // Names, volumes, branches, snapshots.
        for (n, id) in names.iter() {
            if s.db.get(name_key(n)).ok().flatten().is_none() {
                rep.errors.push(format!("volume {n:?} has no name index entry"));
            }
            if let Some(r) = vol_recs.get(id) {
                match branches.get(&r.layer) {
                    Some(b) if b.head_volume == r.id => {}
                    _ => rep.errors.push(format!("volume {n:?}: its branch {} does not name it as head", r.layer)),
                }
            }
        }
        let pins = |b: u64| -> Vec<u64> {
            let mut v: Vec<u64> =
                snaps.values().filter(|x| x.branch == b && x.flags & snap_flags::DELETING == 0).map(|x| x.gen).collect();
            v.sort_unstable();
            v
        };
        for b in branches.values() {
            if b.head_volume != 0 && vol_recs.get(&b.head_volume).map(|r| r.layer) != Some(b.id) {
                rep.errors.push(format!("branch {}: head volume {} does not point back to it", b.id, b.head_volume));
            }
            if let Some((ob, og)) = b.origin() {
                if !snaps.contains_key(&(ob, og)) {
                    rep.errors.push(format!("branch {}: origin snapshot (branch {ob}, generation {og}) does not exist", b.id));
                }
            }
            if b.head_volume == 0 && pins(b.id).is_empty() {
                rep.errors.push(format!("branch {}: neither a head volume nor snapshots (should have been deleted)", b.id));
            }
        }
        for sn in snaps.values() {
            match branches.get(&sn.branch) {
                None => rep.errors.push(format!("snapshot {:?}: branch {} does not exist", sn.name, sn.branch)),
                Some(b) if sn.gen >= b.gen => rep.errors.push(format!("snapshot {:?}: generation {} not below its branch's {}", sn.name, sn.gen, b.gen)),
                _ => {}
            }
            if sn.flags & snap_flags::DELETING != 0 {
                rep.errors.push(format!("snapshot {:?}: an interrupted delete was not finished", sn.name));
            }
        }
        for &(b, lba) in heads.keys() {
            if !branches.contains_key(&b) {
                rep.errors.push(format!("head map entry of unknown branch {b} (block {lba})"));
            }
        }
        // Head entries: indexed by birth, and referenced by the head or a snapshot.
        for (&(b, lba), &birth) in heads.iter() {
            if birth >= FIRST_INDEXED_BIRTH && !births.contains(&(b, birth, lba)) {
                rep.errors.push(format!("branch {b} block {lba}: head entry born {birth} missing from the birth index"));
            }
            if let Some(br) = branches.get(&b) {
                if br.head_volume == 0 && !pins(b).iter().any(|&p| p >= birth) {
                    rep.errors.push(format!("branch {b} block {lba}: head entry born {birth} is referenced by nothing (leak)"));
                }
            }
        }
        for &(b, birth, lba) in births.iter() {
            if heads.get(&(b, lba)) != Some(&birth) {
                rep.errors.push(format!("birth index (branch {b}, birth {birth}, block {lba}) has no matching head entry"));
            }
        }
        // History and dead list: one to one, and each history entry seen by a snapshot.
        for (&(b, lba, birth), &(kill, pba, flags)) in hist.iter() {
            let hp = if flags & map_flags::TOMBSTONE != 0 { 0 } else { pba };
            if dead.get(&(b, lba, birth)).map(|d| (d.0, d.1)) != Some((kill, hp)) {
                rep.errors.push(format!("history (branch {b}, block {lba}, birth {birth}) has no matching dead-list entry"));
            }
            if !pins(b).iter().any(|&p| birth <= p && p < kill) {
                rep.errors.push(format!("history (branch {b}, block {lba}, born {birth}, killed {kill}) is seen by no snapshot (leak)"));
            }
        }
        for &(b, lba, birth) in dead.keys() {
            if !hist.contains_key(&(b, lba, birth)) {
                rep.errors.push(format!("dead-list entry (branch {b}, block {lba}, birth {birth}) has no history entry"));
            }
        }
        // In-memory catalog agrees with the records.
        if cat.branches.len() != branches.len() || cat.snaps.len() != snaps.len() {
            rep.errors.push(format!(
                "in-memory catalog ({} branches, {} snapshots) differs from the records ({}, {})",
                cat.branches.len(),
                cat.snaps.len(),
                branches.len(),
                snaps.len()
            ));
        }
        // Pending (uncommitted) references and frees in flight.
        for (v, g) in vols.iter().zip(guards.iter()) {
            for (&lba, e) in g.map.iter() {
                if e.state != PState::Removed && e.pba != UNMAPPED {
                    mark(e.pba, &|| format!("pending map of volume {:?} block {lba}", v.name()), &mut rep);
                }
            }
            for &f in &g.frees {
                mark(f, &|| format!("pending free of volume {:?}", v.name()), &mut rep);
            }
        }
        // Compare with the allocator.
        for pba in 0..total {
            let r = refd[(pba / 64) as usize] & (1 << (pba % 64)) != 0;
            let u = alloc.is_used(pba);
            if u {
                rep.allocated_blocks += 1;
            }
            if r && !u {
                rep.errors.push(format!("physical block {pba} is referenced but marked free"));
            }
            if u && !r {
                rep.leaked_blocks += 1;
            }
        }
        // Blocks waiting in reclaim are legitimately allocated and unreferenced.
        rep.leaked_blocks = rep.leaked_blocks.saturating_sub(reclaim.pending_blocks());
        for p in &s.open_problems {
            rep.errors.push(format!("at open: {p}"));
        }
        Ok(rep)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.send_commit(CommitMsg::Shutdown);
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::QueueShared;

    #[test]
    fn rocksdb_gets_half_the_cache_memtable_included() {
        const M: usize = 1 << 20;
        assert_eq!(rocksdb_split(64 * M, 8 * M), (24 * M, 8 * M));
        assert_eq!(rocksdb_split(16 * M, 8 * M), (6 * M, 2 * M));
        assert_eq!(rocksdb_split(64 * M, 256 << 10), (32 * M - (256 << 10), 256 << 10));
        // Tiny caches still get a working RocksDB.
        assert_eq!(rocksdb_split(M, 8 * M), (M, 128 << 10));
        assert_eq!(rocksdb_split(0, 8 * M), (M, 64 << 10));
    }

    /// The pending-state rules of encrypted rewrites (FORMAT.md §11.3), at the decision points:
    /// a rewrite of an uncommitted block redirects and frees the old block only when it lands;
    /// a failed rewrite puts the old block back; a commit in between turns the old block into
    /// the committed head, which the rewrite's own commit then retires.
    #[test]
    fn encrypted_rewrites_of_uncommitted_blocks() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.img");
        create_pool(&path, &CreateOptions { size_bytes: Some(8 << 20), ..Default::default() }).unwrap();
        let opts = PoolOptions { master_key: Some(crate::crypt::Key([5; 32])), commit_interval: Duration::from_secs(3600), ..Default::default() };
        let pool = Pool::open(&path, &opts).unwrap();
        pool.create_encrypted_volume("v", 1 << 20).unwrap();
        let s = &pool.shared;
        let v = s.vols.read().unwrap().get("v").cloned().unwrap();
        let q = QueueShared::new_for_test();
        let seal = |x: u8| Seal { nonce: [x; 12], tag: [x; 16] };
        let write = |x: u8, ok: bool| -> WBlock {
            let mut out = Vec::new();
            assert!(s.resolve_write(&v, 0, 1, false, false, &q, &mut out).unwrap());
            out[0].seal = Some(seal(x));
            s.finish_write(&v, 0, &out, ok);
            out[0]
        };
        let read = || -> (u64, Seal) {
            let (mut r, mut seals) = (Vec::new(), Vec::new());
            s.resolve_read_sealed(&v, 0, 1, &mut r, &mut seals).unwrap();
            match r[0] {
                ReadRes::At(pba) => (pba, seals[0].unwrap()),
                ReadRes::Zero => panic!("reads zeros"),
            }
        };
        // First write: a new block, sealed.
        let y1 = write(1, true);
        assert!(y1.fresh);
        assert_eq!(read(), (y1.pba, seal(1)));
        // A rewrite before any commit goes elsewhere; while it is in flight reads see Y1.
        let mut out = Vec::new();
        assert!(s.resolve_write(&v, 0, 1, false, false, &q, &mut out).unwrap());
        let y2 = out[0];
        assert_ne!(y2.pba, y1.pba);
        assert_eq!(read(), (y1.pba, seal(1)));
        // Another write of the block waits for it.
        assert!(!s.resolve_write(&v, 0, 1, false, false, &q, &mut Vec::new()).unwrap());
        // It fails: Y1 is what the lba holds again, Y2 goes back to the pool.
        s.finish_write(&v, 0, &out, false);
        assert_eq!(read(), (y1.pba, seal(1)));
        assert!(v.lock_pending().frees.contains(&y2.pba));
        assert!(!v.lock_pending().frees.contains(&y1.pba));
        // A rewrite that lands frees Y1.
        let y3 = write(3, true);
        assert_eq!(read(), (y3.pba, seal(3)));
        assert!(v.lock_pending().frees.contains(&y1.pba));
        // A rewrite in flight across a commit (a guest FLUSH): Y3 completed, so the commit
        // makes it durable even though the lba's pending entry is the rewrite; Y3 becomes the
        // committed head and is retired by the commit after the rewrite lands (not freed
        // twice, not leaked).
        let mut out = Vec::new();
        assert!(s.resolve_write(&v, 0, 1, false, false, &q, &mut out).unwrap());
        s.commit().unwrap();
        let committed = s.committed_range(&v, 0, 1).unwrap();
        assert_eq!(committed.len(), 1);
        assert_eq!(committed[0].entry.pba, y3.pba, "the flush did not make the completed write durable");
        {
            let p = v.lock_pending();
            let e = p.map.get(&0).unwrap();
            assert!(!e.src_pending && !e.prev_freed);
            assert_eq!(e.prev.map(|o| o.pba), Some(y3.pba));
        }
        assert_eq!(read(), (y3.pba, seal(3)));
        out[0].seal = Some(seal(4));
        s.finish_write(&v, 0, &out, true);
        assert!(!v.lock_pending().frees.contains(&y3.pba));
        s.commit().unwrap();
        assert_eq!(read(), (out[0].pba, seal(4)));
        assert_eq!(v.mapped_blocks.load(Ordering::Relaxed), 1);
        // Blocks back in the allocator have no cached seal left (their next life's seal must
        // not meet this one's, FORMAT.md §11.4).
        {
            let c = lock(&s.seal_cache);
            for old in [y1.pba, y2.pba, y3.pba] {
                assert!(c.get(old).is_none(), "block {old} was freed but its seal is still cached");
            }
            assert!(c.get(out[0].pba).is_some());
        }
        // Wait out the reclaim of what the commits freed, then the pool is consistent.
        drop(v);
        let rep = pool.check().unwrap();
        assert!(rep.is_clean(), "{rep:?}");
        assert_eq!(rep.referenced_blocks, 1);
    }

    /// A damaged key record locks only its own volume; the pool and its other encrypted
    /// volumes open; `check` reports it.
    #[test]
    fn a_damaged_key_record_locks_only_its_volume() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.img");
        create_pool(&path, &CreateOptions { size_bytes: Some(8 << 20), ..Default::default() }).unwrap();
        let opts = PoolOptions { master_key: Some(crate::crypt::Key([5; 32])), ..Default::default() };
        let bad_id = {
            let pool = Pool::open(&path, &opts).unwrap();
            let a = pool.create_encrypted_volume("a", 1 << 20).unwrap();
            pool.create_encrypted_volume("b", 1 << 20).unwrap();
            let k = key_key(a.id);
            let mut v = pool.shared.db.get(&k).unwrap().unwrap();
            v[30] ^= 1;
            pool.shared.db.put(&k, v).unwrap();
            a.id
        };
        let pool = Pool::open(&path, &opts).unwrap();
        assert!(matches!(pool.open_volume("a", false), Err(Error::KeyUnavailable(_))));
        let b = pool.open_volume("b", false).unwrap();
        b.sync_io().unwrap().write_at(0, &[7u8; 4096]).unwrap();
        drop(b);
        let rep = pool.check().unwrap();
        assert!(rep.errors.iter().any(|e| e.contains(&format!("{:016x}", bad_id)) || e.contains("checksum")), "{rep:?}");
    }

    /// The write-ordering rules for partial blocks, checked at the decision point (the kernel's
    /// ordering of the racing writes is not controllable from a test).
    #[test]
    fn partial_writes_to_a_new_block_wait_for_its_first_write() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.img");
        create_pool(&path, &CreateOptions { size_bytes: Some(8 << 20), ..Default::default() }).unwrap();
        let pool = Pool::open(&path, &PoolOptions::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        let s = &pool.shared;
        let v = s.vols.read().unwrap().get("v").cloned().unwrap();
        let q = QueueShared::new_for_test();
        let mut out = Vec::new();
        // First partial write of block 0: allocated, padded.
        assert!(s.resolve_write(&v, 0, 1, true, true, &q, &mut out).unwrap());
        let first = out[0];
        assert!(first.fresh && first.padded);
        // Any other write to block 0 waits while the padded write is in flight.
        let mut o2 = Vec::new();
        assert!(!s.resolve_write(&v, 0, 1, true, true, &q, &mut o2).unwrap());
        assert!(!s.resolve_write(&v, 0, 1, false, false, &q, &mut o2).unwrap());
        assert_eq!(v.lock_pending().waiters.len(), 2);
        // When it completes the waiters are woken and the block is established: in place.
        s.finish_write(&v, 0, &[first], true);
        assert!(v.lock_pending().waiters.is_empty());
        assert!(s.resolve_write(&v, 0, 1, true, true, &q, &mut o2).unwrap());
        assert_eq!(o2[0], WBlock { pba: first.pba, fresh: false, padded: false, src: UNMAPPED, seal: None });
        // Full writes of a new block may run together, but a partial one waits for them.
        let mut f1 = Vec::new();
        assert!(s.resolve_write(&v, 1, 1, false, false, &q, &mut f1).unwrap());
        assert!(f1[0].fresh && !f1[0].padded);
        let mut f2 = Vec::new();
        assert!(s.resolve_write(&v, 1, 1, false, false, &q, &mut f2).unwrap());
        assert_eq!(f2[0].pba, f1[0].pba);
        assert!(!s.resolve_write(&v, 1, 1, true, false, &q, &mut o2).unwrap());
        s.finish_write(&v, 1, &f1, true);
        s.finish_write(&v, 1, &f2, true);
    }
}
