//! vblk engine: a pool of thin volumes on one data file or block device, with metadata in
//! RocksDB. See `format-spec/FORMAT.md` for the on-disk format and the commit protocol.
//!
//! The engine knows nothing of virtio: the device crate translates virtqueue requests into
//! [`Request`]s on a per-thread [`Queue`].

#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod error;
pub mod format;
pub mod crypt;
mod hugealloc;
mod io;
mod lba_table;
mod pool;
mod snap;
mod volume;

use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use error::{Error, Result};
pub use format::BLOCK_SIZE;
pub use hugealloc::HugePageAlloc;
pub use io::{Completion, IoVec, IoVecs, Queue, ReqKind, Request, SECTOR_SIZE};
pub use pool::{
    create_pool, default_meta_dir, read_superblock, uuid_string, CheckReport, CreateOptions, MemoryStats, Pool, PoolOptions,
    Preallocate, PoolStatus, VolumeInfo, MAX_VOLUME_SIZE,
};
pub use snap::{parse_snap_spec, DiffRange, SnapshotInfo};

use pool::{AlignedBuf, Shared};
use volume::VolumeState;

/// An opened (attached) volume. Dropping it detaches.
pub struct Volume {
    shared: Arc<Shared>,
    vol: Arc<VolumeState>,
    read_only: bool,
    /// A read-only view of snapshot (branch, generation), not a volume.
    snapshot: Option<(u64, u64)>,
}

impl Volume {
    pub(crate) fn new(shared: Arc<Shared>, vol: Arc<VolumeState>, read_only: bool) -> Volume {
        Volume { shared, vol, read_only, snapshot: None }
    }
    pub(crate) fn snapshot_view(shared: Arc<Shared>, vol: Arc<VolumeState>, snap: (u64, u64)) -> Volume {
        Volume { shared, vol, read_only: true, snapshot: Some(snap) }
    }
    pub fn name(&self) -> String {
        self.vol.name()
    }
    pub fn id(&self) -> u64 {
        self.vol.id
    }
    pub fn size_bytes(&self) -> u64 {
        self.vol.size()
    }
    /// Data encrypted at rest (FORMAT.md §11).
    pub fn encrypted(&self) -> bool {
        self.vol.encrypted.load(Ordering::Relaxed)
    }
    /// The smallest I/O unit: 512 bytes, or 4096 for an encrypted volume (whole blocks only).
    pub fn logical_block_size(&self) -> u32 {
        if self.encrypted() {
            4096
        } else {
            SECTOR_SIZE as u32
        }
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// A new I/O queue for the calling thread.
    pub fn open_queue(&self) -> Result<Queue> {
        Queue::new(self.shared.clone(), self.vol.clone(), self.read_only)
    }
    /// Call `f(new_size)` whenever the volume grows.
    pub fn on_resize(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        if let Ok(mut w) = self.vol.resize_watchers.lock() {
            w.push(f);
        }
    }
    /// Byte ranges of `[offset, offset + len)` that hold written data (allocated blocks), merged
    /// and in order; everything else reads as zeros. Lets export skip holes without reading
    /// them. Scans the block map of the range, so ask in chunks (e.g. 1 GiB) on big volumes.
    pub fn allocated_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let start = offset / BLOCK_SIZE;
        let end = offset.saturating_add(len).div_ceil(BLOCK_SIZE);
        Ok(self
            .shared
            .mapped_runs(&self.vol, start, end)?
            .into_iter()
            .map(|(l, n)| {
                let s = (l * BLOCK_SIZE).max(offset);
                let e = ((l + n) * BLOCK_SIZE).min(offset + len);
                (s, e - s)
            })
            .collect())
    }

    /// A blocking I/O handle (import, export, tests).
    pub fn sync_io(&self) -> Result<SyncIo> {
        Ok(SyncIo { q: self.open_queue()?, buf: AlignedBuf::new(1 << 20), tag: 0 })
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Ok(mut w) = self.vol.resize_watchers.lock() {
            w.clear();
        }
        if let Some(k) = self.snapshot {
            self.vol.lock_pending().cache_clear(&self.shared.cache);
            if let Ok(mut r) = self.shared.snap_readers.lock() {
                if let Some(n) = r.get_mut(&k) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        r.remove(&k);
                    }
                }
            }
        } else if self.read_only {
            self.vol.readers.fetch_sub(1, Ordering::AcqRel);
        } else {
            self.vol.writers.store(0, Ordering::Release);
        }
    }
}

/// Blocking I/O on a volume through the same data path as the device (one request at a time,
/// through an aligned bounce buffer of 1 MiB).
pub struct SyncIo {
    q: Queue,
    buf: AlignedBuf,
    tag: u64,
}

impl SyncIo {
    fn run(&mut self, kind: ReqKind, offset: u64, len: u64, with_buf: bool) -> Result<()> {
        self.tag += 1;
        let iov = if with_buf { smallvec::smallvec![IoVec { ptr: self.buf.as_mut_ptr(), len: len as usize }] } else { IoVecs::new() };
        let req = Request { kind, offset, len, iov, tag: self.tag };
        // SAFETY: the bounce buffer outlives the request: we wait for its completion below.
        unsafe { self.q.submit(req) };
        let mut out = Vec::new();
        loop {
            self.q.reap(&mut out);
            if let Some(c) = out.iter().find(|c| c.tag == self.tag) {
                return match c.result {
                    Ok(_) => Ok(()),
                    Err(e) if e == libc::ENOSPC => Err(Error::NoSpace),
                    Err(e) if e == libc::EINVAL => {
                        let size = self.q.size_bytes();
                        if offset.checked_add(len).is_some_and(|end| end <= size) {
                            // In range, so refused for its alignment (512 bytes; 4096 on an
                            // encrypted volume).
                            Err(Error::Misaligned { offset, len })
                        } else {
                            Err(Error::OutOfRange { offset, len, size })
                        }
                    }
                    Err(e) => Err(Error::DeviceIo(std::io::Error::from_raw_os_error(e))),
                };
            }
            self.q.wait_event(100);
        }
    }

    /// Largest single transfer.
    pub const MAX_IO: usize = 1 << 20;

    /// Read `buf.len()` bytes (a multiple of 512, at most 1 MiB) at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = buf.len();
        if n > Self::MAX_IO {
            return Err(Error::InvalidSize(format!("sync read of {n} bytes exceeds 1 MiB")));
        }
        self.run(ReqKind::Read, offset, n as u64, true)?;
        buf.copy_from_slice(&self.buf.as_slice()[..n]);
        Ok(())
    }

    /// Write `buf` (a multiple of 512, at most 1 MiB) at `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let n = buf.len();
        if n > Self::MAX_IO {
            return Err(Error::InvalidSize(format!("sync write of {n} bytes exceeds 1 MiB")));
        }
        self.buf.as_mut_slice()[..n].copy_from_slice(buf);
        self.run(ReqKind::Write, offset, n as u64, true)
    }

    /// Unmap a range: it reads as zeros and its space is freed.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.run(ReqKind::Discard, offset, len, false)
    }

    /// Zero a range (whole blocks are unmapped, partial blocks get zeros written).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.run(ReqKind::WriteZeroes, offset, len, false)
    }

    /// Make all completed writes durable.
    pub fn flush(&mut self) -> Result<()> {
        self.run(ReqKind::Flush, 0, 0, false)
    }

    pub fn size_bytes(&self) -> u64 {
        self.q.size_bytes()
    }
}

/// For the criterion micro benchmarks (`benches/benches/micro.rs`): the table behind a
/// volume's map cache, filled and queried as the data path does. Not a stable API.
#[doc(hidden)]
pub mod bench_support {
    use crate::lba_table::LbaTable;
    use crate::volume::CVal;

    pub struct MapTable(LbaTable);

    impl MapTable {
        /// A table holding lbas `0, stride, 2*stride, ...` (`n` of them).
        pub fn with_entries(n: u64, stride: u64) -> MapTable {
            let mut t = LbaTable::default();
            for i in 0..n {
                t.insert(i * stride, CVal { pba: i, birth: 1 });
            }
            MapTable(t)
        }
        /// The block `lba` maps to.
        pub fn get(&self, lba: u64) -> Option<u64> {
            self.0.get(lba).map(|v| v.pba)
        }
    }
}
