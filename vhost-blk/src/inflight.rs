//! Inflight I/O tracking (vhost-user protocol feature `INFLIGHT_SHMFD`), so that a frontend
//! that reconnects to a restarted daemon loses no request.
//!
//! Without it, QEMU restarts a queue whose backend died at the used index (it cannot ask the
//! dead backend for the avail index): requests that were in flight are taken again only if
//! every request before them had completed, which out-of-order completion (io_uring) breaks.
//! A request popped before a later one that completed would never complete, and the guest
//! would wait for it forever; one that completed out of order would run twice, possibly on a
//! descriptor the guest had already reused.
//!
//! The frontend asks for a shared area (`GET_INFLIGHT_FD`), keeps it, and hands it to every
//! backend it connects to (`SET_INFLIGHT_FD`). The backend records in it which descriptor
//! heads are in flight, in the layout of the vhost-user specification ("Inflight I/O tracking",
//! split virtqueues), one region per queue:
//!
//! ```text
//! QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//!                    DescStateSplit desc[desc_num] }
//! DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter }
//! ```
//!
//! - A chain taken from the avail ring: `desc[head].counter = counter++`, `inflight = 1`.
//! - A chain put on the used ring (one at a time here, so every batch is one head):
//!   `last_batch_head = head`, then the used ring entry and index, then `inflight = 0` and
//!   `used_idx` = the ring's used index.
//! - On start with an area that holds state: if `used_idx` differs from the ring's used index
//!   the last chain was put on the used ring but not cleared: clear `desc[last_batch_head]`.
//!   Every head still marked is resubmitted, in `counter` order, and the ring's next avail index
//!   is `used index + heads in flight` (what was taken from the avail ring), whatever base the
//!   frontend sent.
//!
//! The area is shared with the frontend: every value read from it is checked (heads against
//! the queue size, the region's size against what the mapping holds) and a region that does
//! not fit is started afresh, never trusted.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Version written into a region this backend starts.
const INFLIGHT_VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC_STATE: usize = 16;
/// Regions start on this boundary.
const REGION_ALIGN: usize = 64;

/// Bytes of one queue's region for queues of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * usize::from(queue_size)).next_multiple_of(REGION_ALIGN)
}

/// Bytes of an area for `num_queues` queues of `queue_size` entries; refuses empty ones.
fn area_size(num_queues: u16, queue_size: u16) -> std::io::Result<usize> {
    if num_queues == 0 || queue_size == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no queues or an empty queue"));
    }
    Ok(usize::from(num_queues) * queue_region_size(queue_size))
}

/// The shared inflight area of one connection, mapped.
pub struct InflightArea {
    ptr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    _file: File,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics.
unsafe impl Send for InflightArea {}
// SAFETY: as above.
unsafe impl Sync for InflightArea {}

impl Drop for InflightArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no references into it outlive
        // the area (InflightQueue holds an Arc of it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl InflightArea {
    /// A new zeroed area for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD); returns it
    /// and a second handle on its file for the frontend.
    pub fn create(num_queues: u16, queue_size: u16) -> std::io::Result<(InflightArea, File)> {
        let len = area_size(num_queues, queue_size)?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"vblk-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new file descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // Its size is fixed from now on (as libvhost-user seals its areas): see `open`.
        seal(&file, libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)?;
        let other = file.try_clone()?;
        let area = Self::map(file, 0, len, num_queues, queue_size)?;
        Ok((area, other))
    }

    /// Map the frontend's area (SET_INFLIGHT_FD): `len` bytes at `offset` of `file`, holding
    /// `num_queues` regions for queues of `queue_size`.
    pub fn open(file: File, offset: u64, len: u64, num_queues: u16, queue_size: u16) -> std::io::Result<InflightArea> {
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        let need = area_size(num_queues, queue_size)?;
        let len = usize::try_from(len).map_err(|_| bad(format!("area of {len} bytes")))?;
        if len < need {
            return Err(bad(format!("area of {len} bytes, {num_queues} queues of {queue_size} need {need}")));
        }
        if !offset.is_multiple_of(page_size()) {
            return Err(bad(format!("area offset {offset} is not page-aligned")));
        }
        // The file must hold the mapping, and keep holding it: touching a page past its end
        // would be a SIGBUS, which kills the daemon with every volume. So the file must be
        // sealed against shrinking (a memfd from GET_INFLIGHT_FD is; else seal it now).
        seal_against_shrinking(&file).map_err(|e| bad(format!("the area's file cannot be sealed against shrinking: {e}")))?;
        let size = file.metadata()?.len();
        if offset.checked_add(need as u64).is_none_or(|end| end > size) {
            return Err(bad(format!("area of {need} bytes at {offset} in a file of {size}")));
        }
        Self::map(file, offset, need, num_queues, queue_size)
    }

    fn map(file: File, offset: u64, len: usize, num_queues: u16, queue_size: u16) -> std::io::Result<InflightArea> {
        let off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a new shared mapping of `len` bytes of a file we hold; the kernel picks the
        // address. Checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), off)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(InflightArea { ptr: ptr.cast(), len, num_queues, queue_size, _file: file })
    }

    /// Bytes of the area.
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// The region of queue `index`, if the area has one.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            area: Arc::clone(self),
            offset: usize::from(index) * queue_region_size(self.queue_size),
            cap: self.queue_size,
            desc_num: 0,
            counter: 0,
        })
    }
}

/// Make sure `file` can no longer shrink: it carries `F_SEAL_SHRINK` already, or it is added
/// now. Fails for files that take no seals: a memfd created without `MFD_ALLOW_SEALING`, files
/// opened by path (on hugetlbfs, tmpfs or any file system).
pub(crate) fn seal_against_shrinking(file: &File) -> std::io::Result<()> {
    // SAFETY: fcntl F_GET_SEALS on a valid fd; no memory effects.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    seal(file, libc::F_SEAL_SHRINK)
}

/// Add `seals` to a memfd.
fn seal(file: &File, seals: libc::c_int) -> std::io::Result<()> {
    // SAFETY: fcntl F_ADD_SEALS on a valid fd; no memory effects.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096).max(1)
}

/// What a queue takes up again on start.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The ring's next avail index: the used index plus the heads in flight.
    pub next_avail: u16,
    /// Heads to run again, oldest first.
    pub resubmit: Vec<u16>,
}

/// One queue's region of the area.
pub struct InflightQueue {
    area: Arc<InflightArea>,
    offset: usize,
    /// Entries the region has room for (the area's queue size).
    cap: u16,
    /// Entries in use: the ring's size (at most `cap`), set by [`start`](Self::start); heads
    /// at or above it are never tracked.
    desc_num: u16,
    /// The next chain's counter.
    counter: u64,
}

impl InflightQueue {
    fn at<T>(&self, off: usize) -> &T {
        debug_assert!(self.offset + off + std::mem::size_of::<T>() <= self.area.len);
        // SAFETY: `off` is within this queue's region (callers index descriptors below
        // desc_num, and the mapping holds num_queues whole regions), naturally aligned (the
        // mapping is page-aligned, regions 64-byte aligned, fields at their size's multiple),
        // and the memory lives as long as `self.area`. T is an atomic integer type: shared
        // memory that the frontend may also touch is accessed atomically.
        unsafe { &*self.area.ptr.add(self.offset + off).cast::<T>() }
    }
    fn version(&self) -> &AtomicU16 {
        self.at(8)
    }
    fn desc_num_field(&self) -> &AtomicU16 {
        self.at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.at(14)
    }
    fn flag(&self, head: u16) -> &AtomicU8 {
        self.at(HEADER + DESC_STATE * usize::from(head))
    }
    fn next(&self, head: u16) -> &AtomicU16 {
        self.at(HEADER + DESC_STATE * usize::from(head) + 6)
    }
    fn counter(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER + DESC_STATE * usize::from(head) + 8)
    }

    /// Start the queue on this region: `queue_size` is the ring's size, `ring_used` its used
    /// index in guest memory. Returns the heads to resubmit and the next avail index, or
    /// `None` when the region held no state for a ring of this size (a fresh start: the ring's
    /// own indexes stand). A ring larger than the region cannot be tracked: then every head is
    /// left untracked (and a warning logged).
    pub fn start(&mut self, queue_size: u16, ring_used: u16) -> Option<Recovered> {
        if queue_size == 0 || queue_size > self.cap {
            tracing::warn!(ring = queue_size, region = self.cap, "inflight region too small for the ring: not tracked");
            self.desc_num = 0;
            return None;
        }
        let stored = self.desc_num_field().load(Ordering::Relaxed);
        if self.version().load(Ordering::Acquire) == 0 || stored != queue_size {
            if self.version().load(Ordering::Relaxed) != 0 {
                tracing::warn!(region = stored, ring = queue_size, "inflight region is for another ring size; starting it afresh");
            }
            self.reset(queue_size, ring_used);
            return None;
        }
        self.desc_num = queue_size;
        if self.used_idx().load(Ordering::Relaxed) != ring_used {
            // The last chain reached the used ring but was not cleared here.
            let h = self.last_batch_head().load(Ordering::Relaxed);
            if h < self.desc_num {
                self.flag(h).store(0, Ordering::Relaxed);
            }
            self.used_idx().store(ring_used, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.flag(h).load(Ordering::Relaxed) == 1)
            .map(|h| (self.counter(h).load(Ordering::Relaxed), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        // At most desc_num (a u16) heads.
        let n = heads.len() as u16;
        Some(Recovered { next_avail: ring_used.wrapping_add(n), resubmit: heads.into_iter().map(|(_, h)| h).collect() })
    }

    /// Start the region afresh for a ring of `desc_num` entries whose used index is `used`.
    fn reset(&mut self, desc_num: u16, used: u16) {
        self.desc_num = desc_num;
        self.clear_descs();
        self.desc_num_field().store(desc_num, Ordering::Relaxed);
        self.last_batch_head().store(0, Ordering::Relaxed);
        self.used_idx().store(used, Ordering::Relaxed);
        self.version().store(INFLIGHT_VERSION, Ordering::Release);
        self.counter = 0;
    }

    fn clear_descs(&self) {
        for h in 0..self.cap {
            self.flag(h).store(0, Ordering::Relaxed);
            self.next(h).store(0, Ordering::Relaxed);
            self.counter(h).store(0, Ordering::Relaxed);
        }
    }

    /// The device was reset: what was in flight was dropped, not completed. Leave the region
    /// fresh, so that a frontend handing this area back resubmits nothing from before.
    pub fn discard(&mut self) {
        self.version().store(0, Ordering::Release);
        self.clear_descs();
        self.desc_num = 0;
    }

    /// A chain was taken from the avail ring.
    pub fn taken(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter(head).store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        self.flag(head).store(1, Ordering::Release);
    }

    /// `head` is about to go on the used ring.
    pub fn before_used(&self, head: u16) {
        if head < self.desc_num {
            self.next(head).store(self.last_batch_head().load(Ordering::Relaxed), Ordering::Relaxed);
            self.last_batch_head().store(head, Ordering::Release);
        }
    }

    /// `head` is on the used ring, whose index is now `used`.
    pub fn after_used(&self, head: u16, used: u16) {
        if head < self.desc_num {
            self.flag(head).store(0, Ordering::Release);
        }
        self.used_idx().store(used, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_area(nq: u16, qs: u16) -> (Arc<InflightArea>, File) {
        let (a, f) = InflightArea::create(nq, qs).expect("create");
        (Arc::new(a), f)
    }

    fn reopen(f: &File, nq: u16, qs: u16) -> Arc<InflightArea> {
        let len = u64::from(nq) * queue_region_size(qs) as u64;
        Arc::new(InflightArea::open(f.try_clone().expect("dup"), 0, len, nq, qs).expect("open"))
    }

    #[test]
    fn a_second_backend_resubmits_what_the_first_left_in_flight() {
        let (a, f) = new_area(2, 8);
        let mut q = a.queue(1).expect("queue 1");
        assert_eq!(q.start(8, 0), None, "a new area has no state");
        // Heads 3, 5, 1 taken in that order; 5 completes (used index 1), then 1 goes on the
        // used ring (index 2) and the backend dies before clearing it.
        for h in [3, 5, 1] {
            q.taken(h);
        }
        q.before_used(5);
        q.after_used(5, 1);
        q.before_used(1);
        drop((q, a));

        let b = reopen(&f, 2, 8);
        let mut q = b.queue(1).expect("queue 1");
        assert_eq!(q.start(8, 2), Some(Recovered { next_avail: 3, resubmit: vec![3] }));
        // Queue 0 was never started: fresh.
        assert_eq!(b.queue(0).expect("queue 0").start(8, 0), None);
        // Counters go on after the recovered ones: a head taken now sorts after 3.
        q.taken(6);
        drop(q);
        let mut q = reopen(&f, 2, 8).queue(1).expect("queue 1");
        assert_eq!(q.start(8, 2), Some(Recovered { next_avail: 4, resubmit: vec![3, 6] }));
    }

    #[test]
    fn resubmits_come_in_the_order_they_were_taken() {
        let (a, f) = new_area(1, 16);
        let mut q = a.queue(0).expect("queue");
        q.start(16, 0);
        for h in [9, 2, 14, 0, 7] {
            q.taken(h);
        }
        q.before_used(14);
        q.after_used(14, 1);
        drop((q, a));
        let mut q = reopen(&f, 1, 16).queue(0).expect("queue");
        assert_eq!(q.start(16, 1), Some(Recovered { next_avail: 5, resubmit: vec![9, 2, 0, 7] }));
    }

    #[test]
    fn a_region_that_does_not_fit_starts_afresh_and_bad_areas_are_refused() {
        let (a, f) = new_area(1, 8);
        let mut q = a.queue(0).expect("queue");
        assert_eq!(q.start(8, 0), None);
        q.taken(4);
        drop(q);
        // A driver may pick a ring smaller than the area's queue size: recovery works on it.
        let mut q = a.queue(0).expect("queue");
        assert_eq!(q.start(4, 0), None, "the region was for 8 entries: afresh");
        q.taken(2);
        q.taken(3);
        q.before_used(3);
        q.after_used(3, 1);
        let mut q = a.queue(0).expect("queue");
        assert_eq!(q.start(4, 1), Some(Recovered { next_avail: 2, resubmit: vec![2] }));
        // Out-of-range heads from a driver are ignored, not written past the region.
        q.taken(60_000);
        q.before_used(60_000);
        q.after_used(60_000, 2);
        // A ring larger than the region is not tracked at all.
        let mut q = a.queue(0).expect("queue");
        assert_eq!(q.start(16, 0), None);
        q.taken(7);
        // The region still holds the smaller ring's state (head 2 was never completed).
        assert_eq!(a.queue(0).expect("queue").start(4, 2), Some(Recovered { next_avail: 3, resubmit: vec![2] }));
        assert!(a.queue(1).is_none(), "one queue only");
        // Too short, misaligned, or larger than the file: refused.
        let need = queue_region_size(8) as u64;
        assert!(InflightArea::open(f.try_clone().expect("dup"), 0, need - 1, 1, 8).is_err());
        assert!(InflightArea::open(f.try_clone().expect("dup"), 64, need, 1, 8).is_err());
        assert!(InflightArea::open(f.try_clone().expect("dup"), 0, need, 2, 8).is_err());
        assert!(InflightArea::open(f.try_clone().expect("dup"), 0, need, 0, 8).is_err());
        assert!(InflightArea::create(0, 8).is_err());
        // A file that could shrink under the mapping (no sealing): refused.
        let plain = tempfile::tempfile().expect("temp file");
        plain.set_len(need).expect("size");
        let e = InflightArea::open(plain, 0, need, 1, 8).err().expect("refused");
        assert!(e.to_string().contains("sealed"), "{e}");
    }

    /// A fresh region takes the ring's used index: a crash before the first completion must
    /// not clear head `last_batch_head` (0) as if it had just reached the used ring.
    #[test]
    fn a_fresh_region_on_a_ring_already_in_use_loses_no_head() {
        let (a, f) = new_area(1, 8);
        let mut q = a.queue(0).expect("queue");
        assert_eq!(q.start(8, 1000), None);
        q.taken(0);
        q.taken(5);
        drop((q, a));
        let mut q = reopen(&f, 1, 8).queue(0).expect("queue");
        assert_eq!(q.start(8, 1000), Some(Recovered { next_avail: 1002, resubmit: vec![0, 5] }));
    }

    #[test]
    fn a_discarded_region_resubmits_nothing() {
        let (a, _f) = new_area(1, 8);
        let mut q = a.queue(0).expect("queue");
        q.start(8, 0);
        q.taken(1);
        q.discard();
        assert_eq!(a.queue(0).expect("queue").start(8, 0), None);
    }
}
