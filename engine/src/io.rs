//! The data path: one [`Queue`] per I/O thread (one per virtqueue), each with its own
//! io_uring. Requests are submitted straight from the caller's buffers (guest memory) and never
//! block the calling thread on I/O; completions are signalled on an eventfd that the caller
//! polls in its own event loop.

use std::collections::{HashMap, VecDeque};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types, IoUring};
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::format::{BLOCK_SIZE, DATA_START};
use crate::crypt::VolCrypt;
use crate::format::Seal;
use crate::pool::{AlignedBuf, CommitMsg, Shared};
use crate::volume::{ReadRes, VolumeState, WBlock, UNMAPPED};

/// Kind of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One buffer segment of a request (host virtual address).
#[derive(Debug, Clone, Copy)]
pub struct IoVec {
    pub ptr: *mut u8,
    pub len: usize,
}

// Requests are moved by value through submit and dispatch: see the size note on the vhost
// device's `Chain`.
const _: () = assert!(std::mem::size_of::<Request>() <= 128);

/// The buffers of a [`Request`]: inline for the usual one (no allocation per request; one
/// inline, not two, keeps a request small enough to be moved without a `memcpy` call).
pub type IoVecs = smallvec::SmallVec<[IoVec; 1]>;

/// A block request. `offset` and `len` are in bytes and must be multiples of 512 (4096 is the
/// fast path). For Read and Write, `len` must equal the total length of `iov`, and every
/// segment's address and length must be multiples of 512 (the data file is opened with
/// `O_DIRECT`; unaligned buffers fail with `EINVAL`, so callers bounce them).
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
    pub iov: IoVecs,
    pub tag: u64,
}

/// A finished request: `Ok(bytes)` or `Err(errno)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: std::result::Result<u32, i32>,
}

/// The part of a queue that other threads (the committer) complete into.
pub(crate) struct QueueShared {
    efd: RawFd,
    done: Mutex<Vec<Completion>>,
}

impl QueueShared {
    #[cfg(test)]
    pub(crate) fn new_for_test() -> Arc<QueueShared> {
        // SAFETY: eventfd() has no memory effects.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        Arc::new(QueueShared { efd, done: Mutex::new(Vec::new()) })
    }

    pub(crate) fn complete(&self, mut c: Vec<Completion>) {
        if let Ok(mut d) = self.done.lock() {
            d.append(&mut c);
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

impl Drop for QueueShared {
    fn drop(&mut self) {
        // SAFETY: we own the eventfd.
        unsafe { libc::close(self.efd) };
    }
}

struct InFlight {
    tag: u64,
    parts: u32,
    err: Option<i32>,
    bytes: u32,
    epoch: u64,
    /// For writes: first lba and the blocks resolved, to finish fresh allocations.
    write: Option<(u64, Vec<WBlock>)>,
    /// The parts (index = part number): their buffers and the byte count each must return.
    ios: SmallVec<[PartIo; 2]>,
    /// The iovec arrays of parts with several buffers ([`PartIov::Many`]), handed to the
    /// kernel by address: complete before the first part is submitted and unchanged until the
    /// request is reaped (the heap block does not move with the `InFlight`).
    many: Vec<libc::iovec>,
    /// Zero-padded copies of partial first writes, owned until completion.
    _bounces: Vec<AlignedBuf>,
    /// Encrypted reads: what to decrypt from `_bounces[0]` into the caller's buffers.
    dec: Option<Box<Decrypt>>,
    /// Bytes of encrypted-request bounce buffer this request holds (see `BOUNCE_BUDGET`).
    bounce_bytes: usize,
}

/// The io_uring `user_data` of part `part` of the request in slot `idx`: 32 bits each. (16
/// bits for the part were too few: a 1 GiB read, which a guest may send (seg_max x size_max),
/// over blocks that are not adjacent on the device has 262 144 parts, and part 65 536 counted
/// as a completion of another slot's request: that request finished with its I/O still in
/// flight, into its buffers.)
fn user_data(idx: usize, part: usize) -> u64 {
    (idx as u64) << 32 | (part as u64 & 0xffff_ffff)
}

/// The slot and part of a `user_data` from [`user_data`].
fn slot_part(ud: u64) -> (usize, usize) {
    ((ud >> 32) as usize, (ud & 0xffff_ffff) as usize)
}

/// An `io_uring_enter` that failed only for now: the completion queue is busy (EBUSY) or a
/// signal came (EINTR).
fn enter_retryable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINTR))
}

/// One device operation of a request.
struct PartIo {
    iov: PartIov,
    /// Bytes the kernel must report for it (fewer: a short read or write, an I/O error).
    expect: u32,
}

/// The buffers of a [`PartIo`].
#[derive(Clone, Copy)]
enum PartIov {
    /// One buffer: the plain opcodes, no iovec array (and no allocation).
    One(libc::iovec),
    /// `InFlight::many[start..start + count]`.
    Many { start: u32, count: u32 },
}

impl InFlight {
    /// Add a part with buffers `v` (at least one).
    fn add_part(&mut self, v: &[libc::iovec], expect: u32) {
        let iov = match v {
            [one] => PartIov::One(*one),
            _ => {
                let start = self.many.len() as u32;
                self.many.extend_from_slice(v);
                PartIov::Many { start, count: v.len() as u32 }
            }
        };
        self.ios.push(PartIo { iov, expect });
    }
}

/// The decryption step of an encrypted read (FORMAT.md §11.4).
struct Decrypt {
    crypt: Arc<VolCrypt>,
    lba: u64,
    /// (block index in the request, its pba, its seal) of every block read from the device.
    blocks: Vec<(usize, u64, Seal)>,
    /// The caller's buffers.
    iov: IoVecs,
}

/// Entries in the io_uring submission queue; one request may need several.
const RING_ENTRIES: u32 = 512;
/// Requests the engine splits (unaligned WRITE_ZEROES) complete under internal tags with this
/// bit set, folded into the caller's tag.
const INTERNAL_TAG: u64 = 1 << 63;
/// SQEs a plugged queue collects before one `io_uring_enter`. The kernel plugs the block layer
/// for a submission of more than two, so the device's doorbell rings once per batch, not once
/// per request; a bounded batch keeps the first request from waiting for a whole ring's parsing.
const PLUG_BATCH: u32 = 8;
/// Vectors of resolved write blocks a queue keeps for reuse: one per write in flight at the
/// usual queue depths, of requests up to [`WBLOCK_POOL_MAX_LEN`] blocks (larger ones are freed).
const WBLOCK_POOL: usize = 256;
const WBLOCK_POOL_MAX_LEN: usize = 64;
/// Guest I/O granularity: offsets and lengths must be multiples of this.
pub const SECTOR_SIZE: u64 = 512;

/// A per-thread I/O queue on one volume.
pub struct Queue {
    shared: Arc<Shared>,
    vol: Arc<VolumeState>,
    read_only: bool,
    ring: IoUring,
    qs: Arc<QueueShared>,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    ready: Vec<Completion>,
    scratch_r: Vec<ReadRes>,
    scratch_w: Vec<WBlock>,
    /// `submit_rw`'s device I/Os and io_uring operations, kept between requests so that a
    /// request does not allocate them.
    scratch_parts: Vec<Part>,
    scratch_ops: Vec<(bool, u64, bool)>,
    /// Slots of the requests a [`reap_cq`](Self::reap_cq) pass finished.
    scratch_done: Vec<usize>,
    /// Vectors for [`InFlight::write`], reused (see [`WBLOCK_POOL`]).
    wblock_pool: Vec<Vec<WBlock>>,
    unsubmitted: u32,
    /// Between [`plug`](Self::plug) and [`unplug`](Self::unplug): SQEs are handed to the kernel
    /// in batches of [`PLUG_BATCH`], not one `io_uring_enter` per request.
    plugged: bool,
    /// The owner watches the eventfd edge-triggered ([`set_edge_triggered`](Self::set_edge_triggered)):
    /// `reap` does not read it.
    edge: bool,
    /// Writes waiting for a block to be established (see `resolve_write`), retried on reap.
    deferred: VecDeque<Request>,
    /// Device operations submitted and not yet reaped (see [`PARTS_BUDGET`]).
    parts_in_flight: usize,
    /// Reads and writes held back by [`PARTS_BUDGET`], in arrival order: started by
    /// [`release_held`](Self::release_held) as operations complete.
    held: VecDeque<Request>,
    /// Memory registered with the ring as fixed buffers ([`register_buffers`](Self::register_buffers)):
    /// `(start, end)` address ranges, sorted; the index is the buffer index.
    fixed: Vec<(usize, usize)>,
    /// SQEs submitted with a fixed buffer.
    fixed_sqes: u64,
    /// Writes, discards and write-zeroes that arrived while a snapshot was being taken.
    frozen_q: VecDeque<Request>,
    /// Admitted write/discard/write-zeroes requests per tag (counted in the volume's
    /// `mutations` until their completions are returned). A caller may give several requests
    /// the same tag (the parts of one virtio request), hence a count.
    mut_tags: HashMap<u64, u32>,
    /// Split requests: internal tag -> (caller's tag, parts left, first error).
    split: HashMap<u64, (u64, u32, Option<i32>)>,
    next_internal: u64,
    zeros: AlignedBuf,
    /// Encrypted volume: whole blocks only, through `submit_rw_enc`.
    encrypted: bool,
    /// Its cipher (`None` on a pool opened without the master key: every read and write fails).
    crypt: Option<Arc<VolCrypt>>,
    /// Bounce buffers of finished encrypted requests, for reuse (an allocation per request
    /// was 9% of the daemon's CPU on encrypted 4 KiB reads; large ones are mappings).
    bounce_pool: Vec<AlignedBuf>,
    /// Bounce buffer bytes of encrypted requests in flight.
    bounce_bytes: usize,
}

/// Bounce buffers a queue keeps for reuse (of at most `BOUNCE_POOL_MAX_LEN` bytes each).
const BOUNCE_POOL: usize = 64;
const BOUNCE_POOL_MAX_LEN: usize = 1 << 20;
/// Bounce buffer bytes of encrypted requests a queue has in flight before it holds further
/// ones back until some complete: a guest may send requests of hundreds of MiB (up to
/// `seg_max` segments of `size_max`, aliasing the same pages), and each needs a buffer of its
/// size. One request alone always goes.
const BOUNCE_BUDGET: usize = 64 << 20;
/// Device operations a queue has in flight before it holds further reads and writes back
/// until some complete. Each operation keeps about 60 bytes of bookkeeping until it is reaped,
/// and one request may have one per 4 KiB block (a read over blocks that are not adjacent on
/// the device): a guest sending many reads of up to `seg_max` x `size_max` (about 1 GiB,
/// 262 144 blocks) would otherwise make the daemon hold gigabytes. One request alone always
/// goes; requests start in arrival order, so a large one is not overtaken for ever.
const PARTS_BUDGET: usize = 65_536;

// SAFETY: a Queue owns its io_uring (set up without single-issuer restrictions) and its
// buffers; the raw iovec pointers it stores point into memory whose validity the submitter
// guaranteed (submit's contract) independently of the thread. It is not Sync: one thread at a
// time uses it.
unsafe impl Send for Queue {}

fn errno_of(e: &Error) -> i32 {
    match e {
        Error::NoSpace => libc::ENOSPC,
        Error::OutOfRange { .. } | Error::Misaligned { .. } => libc::EINVAL,
        Error::ReadOnly => libc::EROFS,
        _ => libc::EIO,
    }
}

/// Sub-range [off, off+len) of a scatter list, as iovecs.
fn slice_iov(iov: &[IoVec], mut off: usize, mut len: usize, out: &mut impl Extend<libc::iovec>) {
    for v in iov {
        if len == 0 {
            break;
        }
        if off >= v.len {
            off -= v.len;
            continue;
        }
        let n = (v.len - off).min(len);
        out.extend([libc::iovec { iov_base: v.ptr.wrapping_add(off) as *mut libc::c_void, iov_len: n }]);
        off = 0;
        len -= n;
    }
}

/// Zero bytes [off, off+len) of a scatter list (a hole reads as zeros without device I/O).
///
/// # Safety
/// The iovecs must be valid writable memory (submit's contract).
unsafe fn zero_iov(iov: &[IoVec], off: usize, len: usize) {
    let mut v = Vec::new();
    slice_iov(iov, off, len, &mut v);
    for seg in v {
        // SAFETY: a piece of the caller's writable buffers (this function's contract).
        unsafe { std::ptr::write_bytes(seg.iov_base as *mut u8, 0, seg.iov_len) };
    }
}

/// Copy bytes [off, off+len) of a scatter list to `dst`.
///
/// # Safety
/// The iovecs must be valid readable memory (submit's contract) and `dst` valid for `len`
/// bytes of writes.
unsafe fn gather_iov(iov: &[IoVec], off: usize, len: usize, dst: *mut u8) {
    let mut v = Vec::new();
    slice_iov(iov, off, len, &mut v);
    let mut at = 0;
    for seg in v {
        // SAFETY: source: a piece of the caller's buffers; destination: inside `dst`, since
        // the pieces total at most `len` (this function's contract).
        unsafe { std::ptr::copy_nonoverlapping(seg.iov_base as *const u8, dst.add(at), seg.iov_len) };
        at += seg.iov_len;
    }
}

/// One device I/O of a request: where on the device, and which bytes of the request.
struct Part {
    dev_off: u64,
    req_off: usize,
    len: usize,
    /// Write the whole block from a zero-padded copy instead of the request's buffers.
    padded: bool,
    /// For a padded part: copy the rest of the block from this block (copy-on-write) instead
    /// of padding with zeros (`UNMAPPED` = zeros).
    src: u64,
}

impl Queue {
    pub(crate) fn new(shared: Arc<Shared>, vol: Arc<VolumeState>, read_only: bool) -> Result<Queue> {
        let mut plain = IoUring::builder();
        plain.setup_cqsize(RING_ENTRIES * 4);
        let ring = plain
            .clone()
            // Completion work is queued for this thread without an interrupting IPI (an exit
            // in a VM) while it runs; a sleeping thread is still woken (the eventfd fires).
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            // A failing SQE does not stop the rest of a batch in the kernel.
            .setup_submit_all()
            .build(RING_ENTRIES)
            // Kernels before 5.19 do not know these flags: the plain ring works the same, a
            // little slower.
            .or_else(|e| if e.raw_os_error() == Some(libc::EINVAL) { plain.build(RING_ENTRIES) } else { Err(e) })
            .map_err(Error::io("io_uring_setup", &shared.path))?;
        // SAFETY: eventfd() has no memory effects; we check the result.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::io("eventfd", &shared.path)(std::io::Error::last_os_error()));
        }
        let qs = Arc::new(QueueShared { efd, done: Mutex::new(Vec::new()) });
        ring.submitter().register_eventfd(efd).map_err(Error::io("io_uring register eventfd", &shared.path))?;
        ring.submitter()
            .register_files(&[shared.data.as_raw_fd()])
            .map_err(Error::io("io_uring register files", &shared.path))?;
        Ok(Queue {
            shared,
            read_only,
            ring,
            qs,
            slots: Vec::new(),
            free_slots: Vec::new(),
            ready: Vec::new(),
            scratch_r: Vec::new(),
            scratch_w: Vec::new(),
            scratch_parts: Vec::new(),
            scratch_ops: Vec::new(),
            scratch_done: Vec::new(),
            wblock_pool: Vec::new(),
            unsubmitted: 0,
            plugged: false,
            edge: false,
            deferred: VecDeque::new(),
            parts_in_flight: 0,
            held: VecDeque::new(),
            fixed: Vec::new(),
            fixed_sqes: 0,
            frozen_q: VecDeque::new(),
            mut_tags: HashMap::new(),
            split: HashMap::new(),
            next_internal: 0,
            zeros: AlignedBuf::new(BLOCK_SIZE as usize),
            encrypted: vol.encrypted.load(Ordering::Relaxed),
            crypt: vol.crypt.get().cloned(),
            bounce_pool: Vec::new(),
            bounce_bytes: 0,
            vol,
        })
    }

    /// Register memory with the ring as fixed buffers (io_uring `REGISTER_BUFFERS`), replacing
    /// what was registered before. A request part whose single buffer lies inside one of them
    /// is then read or written with `READ_FIXED` / `WRITE_FIXED`: the kernel skips pinning and
    /// unpinning its pages for every request (it pins them all here, once). Ranges over 1 GiB
    /// (the kernel's limit per buffer) are registered as 1 GiB pieces; a buffer across two
    /// pieces goes the usual way. On failure (e.g. `RLIMIT_MEMLOCK`) nothing is registered.
    ///
    /// # Safety
    /// Every range must stay mapped, at the same addresses, until it is replaced or
    /// [`unregister_buffers`](Self::unregister_buffers) is called: a request whose buffer lies
    /// in a registered range is done on the pages pinned here, so a range unmapped and mapped
    /// again meanwhile would send the data to the old pages.
    pub unsafe fn register_buffers(&mut self, ranges: &[(*mut u8, usize)]) -> Result<()> {
        const PIECE: usize = 1 << 30;
        self.unregister_buffers();
        let mut pieces: Vec<(usize, usize)> = Vec::new();
        for &(p, len) in ranges {
            let start = p as usize;
            let mut at = start;
            while at < start.saturating_add(len) {
                let end = (at + PIECE).min(start + len);
                pieces.push((at, end));
                at = end;
            }
        }
        pieces.sort_unstable();
        if pieces.is_empty() {
            return Ok(());
        }
        let iovs: Vec<libc::iovec> =
            pieces.iter().map(|&(a, e)| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: e - a }).collect();
        // SAFETY: the caller keeps every range mapped while it is registered (contract above).
        unsafe { self.ring.submitter().register_buffers(&iovs) }.map_err(Error::io("io_uring register buffers", &self.shared.path))?;
        self.fixed = pieces;
        Ok(())
    }

    /// Drop the fixed buffers (requests in flight on them finish normally).
    pub fn unregister_buffers(&mut self) {
        if !self.fixed.is_empty() {
            let _ = self.ring.submitter().unregister_buffers();
            self.fixed.clear();
        }
    }

    /// Request parts submitted on fixed buffers so far.
    pub fn fixed_submissions(&self) -> u64 {
        self.fixed_sqes
    }

    /// The fixed buffer holding `[addr, addr + len)`, if one does.
    fn fixed_index(&self, addr: usize, len: usize) -> Option<u16> {
        let i = self.fixed.partition_point(|&(a, _)| a <= addr).checked_sub(1)?;
        let (_, end) = self.fixed[i];
        (addr.checked_add(len)? <= end).then_some(i as u16)
    }

    /// The eventfd that becomes readable when completions are ready to [`reap`](Self::reap).
    pub fn event_fd(&self) -> RawFd {
        self.qs.efd
    }

    /// The owner waits for the eventfd with an edge-triggered epoll (every signal is an event,
    /// whatever the counter holds), so [`reap`](Self::reap) need not read the eventfd to clear
    /// it: one system call less per wake-up. `drain` still clears it before it polls.
    pub fn set_edge_triggered(&mut self) {
        self.edge = true;
    }

    fn clear_event(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.qs.efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len() + self.deferred.len() + self.frozen_q.len() + self.held.len()
    }

    /// Device operations submitted and not yet reaped (at most [`PARTS_BUDGET`] once more than
    /// one request is in flight).
    pub fn ops_in_flight(&self) -> usize {
        self.parts_in_flight
    }

    /// Size of the volume in bytes now.
    pub fn size_bytes(&self) -> u64 {
        self.vol.size()
    }

    /// Submit a request. Errors that concern only this request (range, alignment, read-only,
    /// full pool) are returned as a completion with an errno, not as `Err`.
    ///
    /// Offsets and lengths must be multiples of 512 bytes ([`SECTOR_SIZE`]); 4096-aligned I/O
    /// is the fast path. A DISCARD only unmaps the whole 4 KiB blocks inside its range.
    ///
    /// # Safety
    /// Every `IoVec` must point to memory that stays valid (and, for reads, writable) until the
    /// request's completion has been returned by [`reap`](Self::reap).
    pub unsafe fn submit(&mut self, req: Request) {
        let tag = req.tag;
        if let Err(e) = self.validate(&req) {
            self.ready.push(Completion { tag, result: Err(errno_of(&e)) });
            self.flush_sq();
            return;
        }
        self.dispatch(req);
    }

    /// A request at byte `offset` is coming: start loading the map-cache entry of its first
    /// block now. A caller that parses several requests before it submits them (one pass over
    /// a virtqueue) overlaps the memory latency of one lookup with the work on the others;
    /// on a large volume that lookup is usually a miss in the CPU cache.
    pub fn prefetch(&self, offset: u64) {
        self.vol.lock_pending().cache.prefetch(offset / BLOCK_SIZE);
    }

    /// Collect the SQEs of the following submits and hand them to the kernel in batches (a
    /// caller taking many requests at once, e.g. one pass over a virtqueue). Must be followed by
    /// [`unplug`](Self::unplug), which submits the rest.
    pub fn plug(&mut self) {
        self.plugged = true;
    }

    /// Submit what a [`plug`](Self::plug) collected.
    pub fn unplug(&mut self) {
        self.plugged = false;
        self.flush_sq();
    }

    /// Admit and start a validated request. While a snapshot is being taken, requests that
    /// change data wait (they are retried on reap when the snapshot wakes this queue).
    fn dispatch(&mut self, req: Request) {
        let tag = req.tag;
        if matches!(req.kind, ReqKind::Write | ReqKind::Discard | ReqKind::WriteZeroes) {
            let mut p = self.vol.lock_pending();
            if self.vol.frozen.load(Ordering::Acquire) {
                p.waiters.push(self.qs.clone());
                drop(p);
                self.frozen_q.push_back(req);
                return;
            }
            // Counted under the pending lock, so a snapshot that sets `frozen` under it and
            // then waits for the count to drop sees every admitted request.
            self.vol.mutations.fetch_add(1, Ordering::AcqRel);
            drop(p);
            *self.mut_tags.entry(tag).or_insert(0) += 1;
        }
        match req.kind {
            ReqKind::Flush => {
                if !self.shared.send_commit(CommitMsg::Flush { queue: self.qs.clone(), tag }) {
                    self.ready.push(Completion { tag, result: Err(libc::EIO) });
                }
            }
            ReqKind::Discard => {
                let first = req.offset.div_ceil(BLOCK_SIZE);
                let end = (req.offset + req.len) / BLOCK_SIZE;
                let r = if end > first { self.unmap(first, end - first) } else { Ok(()) };
                self.ready.push(Completion { tag, result: r.map(|_| 0).map_err(|e| errno_of(&e)) });
            }
            ReqKind::WriteZeroes => self.write_zeroes(req),
            ReqKind::Read | ReqKind::Write => self.submit_rw(req),
        }
        self.flush_sq();
    }

    fn unmap(&self, first: u64, n: u64) -> Result<()> {
        let epoch = self.shared.enter();
        let r = self.shared.unmap(&self.vol, first, n);
        self.shared.exit(epoch);
        r
    }

    /// WRITE_ZEROES: whole blocks are unmapped (they read as zeros and free their space);
    /// partial blocks at either end get zeros written.
    fn write_zeroes(&mut self, req: Request) {
        let (start, end) = (req.offset, req.offset + req.len);
        let first = start.div_ceil(BLOCK_SIZE);
        let last = end / BLOCK_SIZE;
        let mut edges = Vec::new();
        if first > last {
            // Inside one block.
            edges.push((start, end));
        } else {
            if start < first * BLOCK_SIZE {
                edges.push((start, first * BLOCK_SIZE));
            }
            if last * BLOCK_SIZE < end {
                edges.push((last * BLOCK_SIZE, end));
            }
            if last > first {
                if let Err(e) = self.unmap(first, last - first) {
                    self.ready.push(Completion { tag: req.tag, result: Err(errno_of(&e)) });
                    return;
                }
            }
        }
        if edges.is_empty() {
            self.ready.push(Completion { tag: req.tag, result: Ok(0) });
            return;
        }
        let itag = INTERNAL_TAG | self.next_internal;
        self.next_internal = (self.next_internal + 1) & !INTERNAL_TAG;
        self.split.insert(itag, (req.tag, edges.len() as u32, None));
        for (s, e) in edges {
            let iov = smallvec::smallvec![IoVec { ptr: self.zeros.as_mut_ptr(), len: (e - s) as usize }];
            self.submit_rw(Request { kind: ReqKind::Write, offset: s, len: e - s, iov, tag: itag });
        }
    }

    fn validate(&self, req: &Request) -> Result<()> {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(Error::DeviceIo(std::io::Error::other("pool failed")));
        }
        if self.vol.deleted.load(Ordering::Relaxed) {
            return Err(Error::NoSuchVolume(self.vol.name()));
        }
        if req.kind == ReqKind::Flush {
            return Ok(());
        }
        if req.kind != ReqKind::Read && self.read_only {
            return Err(Error::ReadOnly);
        }
        let size = self.vol.size();
        let end = req.offset.checked_add(req.len);
        if end.is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset: req.offset, len: req.len, size });
        }
        if req.offset % SECTOR_SIZE != 0 || req.len % SECTOR_SIZE != 0 {
            return Err(Error::Misaligned { offset: req.offset, len: req.len });
        }
        if self.encrypted && req.kind != ReqKind::Discard && req.len > 0 {
            // Whole blocks only (FORMAT.md §11.4); a discard unmaps the whole blocks inside.
            if !req.offset.is_multiple_of(BLOCK_SIZE) || !req.len.is_multiple_of(BLOCK_SIZE) {
                return Err(Error::Misaligned { offset: req.offset, len: req.len });
            }
            if self.crypt.is_none() && matches!(req.kind, ReqKind::Read | ReqKind::Write) {
                return Err(Error::KeyUnavailable(self.vol.name()));
            }
        }
        if matches!(req.kind, ReqKind::Read | ReqKind::Write) {
            let total: u64 = req.iov.iter().map(|v| v.len as u64).sum();
            if total != req.len || req.len > u32::MAX as u64 {
                return Err(Error::Misaligned { offset: req.offset, len: req.len });
            }
        }
        Ok(())
    }

    fn slot(&mut self, f: InFlight) -> usize {
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(f);
                i
            }
            None => {
                self.slots.push(Some(f));
                self.slots.len() - 1
            }
        }
    }

    /// Whether a request of `blocks` blocks must wait for operations in flight to complete
    /// (see [`PARTS_BUDGET`]).
    fn over_budget(&self, blocks: u64) -> bool {
        self.parts_in_flight > 0 && self.parts_in_flight.saturating_add(blocks as usize) > PARTS_BUDGET
    }

    fn blocks_of(req: &Request) -> u64 {
        (req.offset + req.len).div_ceil(BLOCK_SIZE) - req.offset / BLOCK_SIZE
    }

    /// Start held requests, in order, while the budget lets them (after operations completed).
    fn release_held(&mut self) {
        while let Some(r) = self.held.front() {
            if self.over_budget(Self::blocks_of(r)) {
                break;
            }
            if let Some(r) = self.held.pop_front() {
                self.submit_rw_now(r);
            }
        }
    }

    fn submit_rw(&mut self, req: Request) {
        if req.len == 0 {
            self.ready.push(Completion { tag: req.tag, result: Ok(0) });
            return;
        }
        if !self.held.is_empty() || self.over_budget(Self::blocks_of(&req)) {
            self.held.push_back(req);
            return;
        }
        self.submit_rw_now(req);
    }

    fn submit_rw_now(&mut self, req: Request) {
        if let Some(c) = &self.crypt {
            let c = c.clone();
            return self.submit_rw_enc(req, c);
        }
        let (start, end) = (req.offset, req.offset + req.len);
        let lba = start / BLOCK_SIZE;
        let n = Self::blocks_of(&req);
        let write = req.kind == ReqKind::Write;
        let epoch = self.shared.enter();
        // Byte range of block i (relative to lba) that the request covers.
        let cover = |i: u64| -> (u64, u64) {
            let bs = (lba + i) * BLOCK_SIZE;
            (bs.max(start), (bs + BLOCK_SIZE).min(end))
        };
        let mut parts = std::mem::take(&mut self.scratch_parts);
        parts.clear();
        let mut write_blocks = None;
        let push = |parts: &mut Vec<Part>, pba: u64, i: u64, padded: bool, src: u64| {
            let (s, e) = cover(i);
            let dev = self.shared.data_offset(pba) + (s - (lba + i) * BLOCK_SIZE);
            if !padded {
                if let Some(last) = parts.last_mut() {
                    if !last.padded && last.dev_off + last.len as u64 == dev && last.req_off + last.len == (s - start) as usize {
                        last.len += (e - s) as usize;
                        return;
                    }
                }
            }
            parts.push(Part { dev_off: dev, req_off: (s - start) as usize, len: (e - s) as usize, padded, src });
        };
        if write {
            let head_partial = start % BLOCK_SIZE != 0 || (n == 1 && end % BLOCK_SIZE != 0);
            let tail_partial = end % BLOCK_SIZE != 0;
            let mut w = std::mem::take(&mut self.scratch_w);
            match self.shared.resolve_write(&self.vol, lba, n, head_partial, tail_partial, &self.qs, &mut w) {
                Err(e) => {
                    self.shared.exit(epoch);
                    self.scratch_w = w;
                    self.ready.push(Completion { tag: req.tag, result: Err(errno_of(&e)) });
                    return;
                }
                Ok(false) => {
                    self.shared.exit(epoch);
                    self.scratch_w = w;
                    self.deferred.push_back(req);
                    return;
                }
                Ok(true) => {}
            }
            for (i, b) in w.iter().enumerate() {
                push(&mut parts, b.pba, i as u64, b.padded, b.src);
            }
            write_blocks = Some((lba, self.wblocks_of(&w)));
            self.scratch_w = w;
        } else {
            let mut r = std::mem::take(&mut self.scratch_r);
            if let Err(e) = self.shared.resolve_read(&self.vol, lba, n, &mut r) {
                self.shared.exit(epoch);
                self.scratch_r = r;
                self.ready.push(Completion { tag: req.tag, result: Err(errno_of(&e)) });
                return;
            }
            for (i, res) in r.iter().enumerate() {
                match res {
                    ReadRes::At(pba) => push(&mut parts, *pba, i as u64, false, UNMAPPED),
                    ReadRes::Zero => {
                        let (s, e) = cover(i as u64);
                        // SAFETY: the caller's writable buffers (submit's contract).
                        unsafe { zero_iov(&req.iov, (s - start) as usize, (e - s) as usize) };
                    }
                }
            }
            self.scratch_r = r;
        }
        let mut f = InFlight {
            tag: req.tag,
            parts: parts.len() as u32,
            err: None,
            bytes: req.len as u32,
            epoch,
            write: write_blocks,
            ios: SmallVec::new(),
            many: Vec::new(),
            _bounces: Vec::new(),
            dec: None,
            bounce_bytes: 0,
        };
        // One io_uring operation per entry: (write?, device offset, linked to the next).
        let mut ops = std::mem::take(&mut self.scratch_ops);
        ops.clear();
        let mut v: SmallVec<[libc::iovec; 4]> = SmallVec::new();
        for p in &parts {
            v.clear();
            if p.padded {
                // First write of a partly written block: zeros (or, copy-on-write, the old
                // block's data) around the request's data.
                let mut b = AlignedBuf::new(BLOCK_SIZE as usize);
                let within = ((p.dev_off - DATA_START) % BLOCK_SIZE) as usize;
                let block_off = p.dev_off - within as u64;
                if p.src != UNMAPPED {
                    // Read the old block into the bounce buffer, then (linked: only after the
                    // read completed) write head and tail from it and the middle from the
                    // request's buffers.
                    let rv = libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: BLOCK_SIZE as usize };
                    f.add_part(&[rv], BLOCK_SIZE as u32);
                    ops.push((false, self.shared.data_offset(p.src), true));
                    if within > 0 {
                        v.push(libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: within });
                    }
                    slice_iov(&req.iov, p.req_off, p.len, &mut v);
                    let tail = within + p.len;
                    if tail < BLOCK_SIZE as usize {
                        v.push(libc::iovec {
                            iov_base: b.as_mut_ptr().wrapping_add(tail) as *mut libc::c_void,
                            iov_len: BLOCK_SIZE as usize - tail,
                        });
                    }
                } else {
                    // SAFETY: source: the caller's buffers (submit's contract); destination:
                    // inside our 4 KiB bounce buffer (within + len <= 4096: the part lies
                    // within one block).
                    unsafe { gather_iov(&req.iov, p.req_off, p.len, b.as_mut_ptr().add(within)) };
                    v.push(libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: BLOCK_SIZE as usize });
                }
                f._bounces.push(b);
                ops.push((true, block_off, false));
                f.add_part(&v, BLOCK_SIZE as u32);
            } else {
                slice_iov(&req.iov, p.req_off, p.len, &mut v);
                ops.push((write, p.dev_off, false));
                f.add_part(&v, p.len as u32);
            }
        }
        self.start(f, &ops);
        self.scratch_parts = parts;
        self.scratch_ops = ops;
    }

    /// Read or write of an encrypted volume (FORMAT.md §11.4): whole blocks, through one
    /// bounce buffer; writes encrypt into it and always go to new blocks, reads decrypt from
    /// it when the device I/O completes.
    fn submit_rw_enc(&mut self, req: Request, c: Arc<VolCrypt>) {
        let lba = req.offset / BLOCK_SIZE;
        let n = req.len / BLOCK_SIZE;
        let bs = BLOCK_SIZE as usize;
        let write = req.kind == ReqKind::Write;
        if self.bounce_bytes > 0 && self.bounce_bytes + req.len as usize > BOUNCE_BUDGET {
            // Retried when a request completes (`reap`).
            self.deferred.push_back(req);
            return;
        }
        let epoch = self.shared.enter();
        let mut bounce = match self.bounce_pool.iter().rposition(|b| b.len() == req.len as usize) {
            Some(i) => self.bounce_pool.swap_remove(i),
            None => AlignedBuf::new(req.len as usize),
        };
        // (device offset, offset in the bounce buffer, length), merged where contiguous.
        let mut parts: Vec<(u64, usize, usize)> = Vec::new();
        let push = |parts: &mut Vec<(u64, usize, usize)>, dev: u64, at: usize| match parts.last_mut() {
            Some(last) if last.0 + last.2 as u64 == dev && last.1 + last.2 == at => last.2 += bs,
            _ => parts.push((dev, at, bs)),
        };
        let mut write_blocks = None;
        let mut dec = None;
        let fail = |q: &mut Queue, e: &Error| {
            q.shared.exit(epoch);
            if matches!(e, Error::Corrupt { .. } | Error::Crypto(_)) {
                tracing::error!(volume = %q.vol.name(), error = %e, "encrypted I/O failed");
            }
            q.ready.push(Completion { tag: req.tag, result: Err(errno_of(e)) });
        };
        if write {
            let mut w = std::mem::take(&mut self.scratch_w);
            match self.shared.resolve_write(&self.vol, lba, n, false, false, &self.qs, &mut w) {
                Err(e) => {
                    self.scratch_w = w;
                    return fail(self, &e);
                }
                Ok(false) => {
                    self.shared.exit(epoch);
                    self.scratch_w = w;
                    self.deferred.push_back(req);
                    return;
                }
                Ok(true) => {}
            }
            // SAFETY: source: the caller's buffers (submit's contract); destination: the bounce
            // buffer, of the request's length.
            unsafe { gather_iov(&req.iov, 0, req.len as usize, bounce.as_mut_ptr()) };
            for (i, b) in w.iter_mut().enumerate() {
                let nonce = match self.shared.next_nonce() {
                    Ok(x) => x,
                    Err(e) => {
                        self.shared.finish_write(&self.vol, lba, &w, false);
                        self.scratch_w = w;
                        return fail(self, &e);
                    }
                };
                b.seal = Some(c.encrypt_block(nonce, lba + i as u64, &mut bounce.as_mut_slice()[i * bs..(i + 1) * bs]));
                push(&mut parts, self.shared.data_offset(b.pba), i * bs);
            }
            write_blocks = Some((lba, self.wblocks_of(&w)));
            self.scratch_w = w;
        } else {
            let mut r = std::mem::take(&mut self.scratch_r);
            let mut seals = Vec::new();
            if let Err(e) = self.shared.resolve_read_sealed(&self.vol, lba, n, &mut r, &mut seals) {
                self.scratch_r = r;
                return fail(self, &e);
            }
            let mut blocks = Vec::new();
            for (i, res) in r.iter().enumerate() {
                match (res, seals.get(i).copied().flatten()) {
                    (ReadRes::At(pba), Some(seal)) => {
                        push(&mut parts, self.shared.data_offset(*pba), i * bs);
                        blocks.push((i, *pba, seal));
                    }
                    // SAFETY: the caller's writable buffers (submit's contract).
                    _ => unsafe { zero_iov(&req.iov, i * bs, bs) },
                }
            }
            self.scratch_r = r;
            dec = Some(Box::new(Decrypt { crypt: c, lba, blocks, iov: req.iov.clone() }));
        }
        let base = bounce.as_mut_ptr();
        let mut f = InFlight {
            tag: req.tag,
            parts: parts.len() as u32,
            err: None,
            bytes: req.len as u32,
            epoch,
            write: write_blocks,
            ios: SmallVec::new(),
            many: Vec::new(),
            _bounces: vec![bounce],
            dec,
            bounce_bytes: req.len as usize,
        };
        for &(_, at, len) in &parts {
            f.add_part(&[libc::iovec { iov_base: base.wrapping_add(at) as *mut libc::c_void, iov_len: len }], len as u32);
        }
        self.bounce_bytes += f.bounce_bytes;
        let ops: Vec<(bool, u64, bool)> = parts.iter().map(|p| (write, p.0, false)).collect();
        self.start(f, &ops);
    }

    /// Submit the device I/O of a resolved request (`ops`: write?, device offset, linked to
    /// the next; one per entry of `f.ios`), or complete it at once if there is none.
    fn start(&mut self, mut f: InFlight, ops: &[(bool, u64, bool)]) {
        f.parts = ops.len() as u32;
        if f.parts == 0 {
            self.bounce_bytes -= f.bounce_bytes;
            self.shared.exit(f.epoch);
            if let Some((l, b)) = &f.write {
                self.shared.finish_write(&self.vol, *l, b, true);
            }
            self.ready.push(Completion { tag: f.tag, result: Ok(f.bytes) });
            return;
        }
        let idx = self.slot(f);
        self.parts_in_flight += ops.len();
        for (part, &(is_write, off, link)) in ops.iter().enumerate() {
            let (single, ptr, cnt) = {
                // Every op has its part (built together in submit_rw / submit_rw_enc).
                let Some(Some(f)) = self.slots.get(idx) else { unreachable!("slot {idx} just filled") };
                match f.ios.get(part).map(|p| p.iov) {
                    Some(PartIov::One(v)) => (Some(v), std::ptr::null(), 1),
                    Some(PartIov::Many { start, count }) => match f.many.get(start as usize..(start + count) as usize) {
                        Some(m) => (None, m.as_ptr(), count),
                        None => unreachable!("part {part}: iovecs {start}+{count} of {}", f.many.len()),
                    },
                    None => unreachable!("op {part} of {} has no part", ops.len()),
                }
            };
            let ud = user_data(idx, part);
            // A single buffer inside registered memory: the fixed-buffer opcodes.
            let fixed = single
                .filter(|_| !self.fixed.is_empty())
                .and_then(|v| self.fixed_index(v.iov_base as usize, v.iov_len).map(|i| (v, i)));
            self.fixed_sqes += u64::from(fixed.is_some());
            let mut sqe = match (is_write, fixed, single) {
                (true, Some((v, i)), _) => {
                    opcode::WriteFixed::new(types::Fixed(0), v.iov_base as *const u8, v.iov_len as u32, i).offset(off).build()
                }
                (false, Some((v, i)), _) => {
                    opcode::ReadFixed::new(types::Fixed(0), v.iov_base as *mut u8, v.iov_len as u32, i).offset(off).build()
                }
                // Any other single buffer: the plain opcodes (no iovec array for the kernel to
                // import).
                (true, None, Some(v)) => opcode::Write::new(types::Fixed(0), v.iov_base as *const u8, v.iov_len as u32).offset(off).build(),
                (false, None, Some(v)) => opcode::Read::new(types::Fixed(0), v.iov_base as *mut u8, v.iov_len as u32).offset(off).build(),
                (true, None, None) => opcode::Writev::new(types::Fixed(0), ptr, cnt).offset(off).build(),
                (false, None, None) => opcode::Readv::new(types::Fixed(0), ptr, cnt).offset(off).build(),
            }
            .user_data(ud);
            if link {
                sqe = sqe.flags(io_uring::squeue::Flags::IO_LINK);
                // A linked pair must reach the kernel in one submission: make room for both.
                let room = {
                    let sq = self.ring.submission();
                    sq.capacity() - sq.len()
                };
                if room < 2 {
                    let _ = self.ring.submit();
                    self.unsubmitted = 0;
                }
            }
            loop {
                // SAFETY: a `Many` part's iovec array is the heap block of the slot's `many`,
                // unchanged and alive until the request is reaped (a `One` part's iovec is
                // copied into the SQE); the buffers are the caller's (contract) or our bounce
                // buffers, owned by the same slot.
                let pushed = unsafe { self.ring.submission().push(&sqe) };
                if pushed.is_ok() {
                    self.unsubmitted += 1;
                    break;
                }
                // Submission queue full: hand what we have to the kernel and retry.
                if let Err(e) = self.ring.submit() {
                    if !enter_retryable(&e) {
                        tracing::error!(error = %e, "io_uring_enter failed");
                    }
                    self.reap_cq();
                }
                self.unsubmitted = 0;
            }
        }
    }

    fn flush_sq(&mut self) {
        if self.plugged && self.unsubmitted < PLUG_BATCH {
            return;
        }
        if self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                Err(e) => tracing::warn!(error = %e, "io_uring_enter failed; will retry"),
            }
        }
        if !self.ready.is_empty() {
            // Make sure the owner's event loop wakes up to reap the immediate completions.
            self.qs.complete(Vec::new());
        }
    }

    fn reap_cq(&mut self) {
        let mut done = std::mem::take(&mut self.scratch_done);
        done.clear();
        loop {
            for cqe in self.ring.completion() {
                let (idx, part) = slot_part(cqe.user_data());
                let res = cqe.result();
                let Some(Some(f)) = self.slots.get_mut(idx) else { continue };
                if res < 0 {
                    f.err.get_or_insert(-res);
                } else if f.ios.get(part).map(|p| p.expect) != Some(res as u32) {
                    // Short read/write: treat as an I/O error (the device shrank or failed).
                    f.err.get_or_insert(libc::EIO);
                }
                f.parts -= 1;
                if f.parts == 0 {
                    done.push(idx);
                }
            }
            // More completions than the CQ ring holds (requests with many parts: a large read
            // over scattered blocks) wait in the kernel's overflow list, and only an
            // io_uring_enter with GETEVENTS (which `submit` makes when the ring says
            // CQ_OVERFLOW) moves them into the ring. Without it they were never seen, and
            // their requests never completed.
            if !self.ring.submission().cq_overflow() {
                break;
            }
            if let Err(e) = self.ring.submit() {
                if !enter_retryable(&e) {
                    tracing::error!(error = %e, "io_uring_enter (flushing overflowed completions) failed");
                    break;
                }
            }
            self.unsubmitted = 0;
        }
        for &idx in &done {
            let Some(mut f) = self.slots.get_mut(idx).and_then(|s| s.take()) else { continue };
            self.free_slots.push(idx);
            self.parts_in_flight = self.parts_in_flight.saturating_sub(f.ios.len());
            if let Some(d) = f.dec.take() {
                if f.err.is_none() {
                    f.err = self.decrypt(&d, &mut f._bounces);
                }
            }
            if self.encrypted {
                self.bounce_bytes -= f.bounce_bytes;
                for b in f._bounces.drain(..) {
                    if self.bounce_pool.len() < BOUNCE_POOL && b.len() <= BOUNCE_POOL_MAX_LEN {
                        self.bounce_pool.push(b);
                    }
                }
            }
            if let Some((l, b)) = f.write.take() {
                self.shared.finish_write(&self.vol, l, &b, f.err.is_none());
                self.recycle_wblocks(b);
            }
            self.shared.exit(f.epoch);
            if let Some(e) = f.err {
                tracing::warn!(volume = %self.vol.name(), errno = e, "data I/O failed");
            }
            self.ready.push(Completion { tag: f.tag, result: match f.err { None => Ok(f.bytes), Some(e) => Err(e) } });
        }
        self.scratch_done = done;
    }

    /// A copy of `w` for an [`InFlight`], in a vector from the pool (no allocation per write).
    fn wblocks_of(&mut self, w: &[WBlock]) -> Vec<WBlock> {
        let mut v = self.wblock_pool.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(w);
        v
    }

    fn recycle_wblocks(&mut self, v: Vec<WBlock>) {
        if self.wblock_pool.len() < WBLOCK_POOL && v.capacity() <= WBLOCK_POOL_MAX_LEN {
            self.wblock_pool.push(v);
        }
    }

    /// Decrypt a completed encrypted read into the caller's buffers; `Some(EIO)` if a block
    /// does not authenticate (its plaintext is never copied out).
    fn decrypt(&self, d: &Decrypt, bounces: &mut [AlignedBuf]) -> Option<i32> {
        let bs = BLOCK_SIZE as usize;
        let buf = bounces.first_mut()?.as_mut_slice();
        for &(i, pba, seal) in &d.blocks {
            let block = &mut buf[i * bs..(i + 1) * bs];
            if !d.crypt.decrypt_block(&seal, d.lba + i as u64, block) {
                tracing::error!(volume = %self.vol.name(), lba = d.lba + i as u64, pba, "encrypted block failed authentication");
                return Some(libc::EIO);
            }
        }
        for &(i, _, _) in &d.blocks {
            let mut v = Vec::new();
            slice_iov(&d.iov, i * bs, bs, &mut v);
            let mut at = i * bs;
            for seg in v {
                // SAFETY: destination: the caller's writable buffers, valid until this
                // completion is returned (submit's contract); source: inside our bounce buffer
                // (the segments of block i total 4096 bytes).
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), seg.iov_base as *mut u8, seg.iov_len) };
                at += seg.iov_len;
            }
        }
        None
    }

    /// Collect finished requests into `out` without blocking. Call it when the eventfd fires
    /// (it also clears the eventfd).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        if !self.edge {
            self.clear_event();
        }
        // Requests held back by a snapshot: dispatch admits them, or (still frozen) keeps them
        // and registers this queue as a waiter again — a wake-up may have come from a write
        // that finished meanwhile, which consumed the registration.
        for _ in 0..self.frozen_q.len() {
            if let Some(r) = self.frozen_q.pop_front() {
                self.dispatch(r);
            }
        }
        // Retry writes that waited for a block to be established.
        for _ in 0..self.deferred.len() {
            if let Some(r) = self.deferred.pop_front() {
                self.submit_rw(r);
            }
        }
        if self.unsubmitted > 0 {
            self.flush_sq();
        }
        self.reap_cq();
        if !self.held.is_empty() {
            // Operations completed just now: start what the budget lets go.
            self.release_held();
            if self.unsubmitted > 0 {
                self.flush_sq();
            }
        }
        if let Ok(mut d) = self.qs.done.lock() {
            self.ready.append(&mut d);
        }
        // Fold the parts of split requests into their caller's completion.
        let base = out.len();
        for c in self.ready.drain(..) {
            if c.tag & INTERNAL_TAG == 0 {
                out.push(c);
                continue;
            }
            let Some(s) = self.split.get_mut(&c.tag) else { continue };
            s.1 -= 1;
            if let Err(e) = c.result {
                s.2.get_or_insert(e);
            }
            if s.1 == 0 {
                if let Some((tag, _, err)) = self.split.remove(&c.tag) {
                    out.push(Completion { tag, result: match err { None => Ok(0), Some(e) => Err(e) } });
                }
            }
        }
        if !self.mut_tags.is_empty() {
            for c in &out[base..] {
                if let Some(n) = self.mut_tags.get_mut(&c.tag) {
                    *n -= 1;
                    if *n == 0 {
                        self.mut_tags.remove(&c.tag);
                    }
                    self.vol.mutations.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Block until every submitted request has completed, collecting the completions.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        loop {
            // Cleared before reaping: a completion after this read signals it again, so the
            // poll below cannot sleep through one (nor spin on a stale count).
            self.clear_event();
            // Read before reaping: the committer pushes a flush's completion and then drops its
            // handle of the queue, so a count read after the reap could miss a completion
            // pushed between the two (seen: a flush's completion returned by the next drain).
            // The fence pairs with the release of the handle's drop: the push is visible to
            // the reap below.
            let flushes_pending = Arc::strong_count(&self.qs) > 1;
            std::sync::atomic::fence(Ordering::Acquire);
            self.reap(out);
            if self.in_flight() == 0 && !flushes_pending && self.split.is_empty() {
                return;
            }
            if self.slots.len() > self.free_slots.len() {
                let _ = self.ring.submit_and_wait(1);
            } else {
                self.wait_event(10);
            }
        }
    }

    /// Wait up to `ms` milliseconds for the eventfd.
    pub fn wait_event(&self, ms: i32) {
        let mut p = libc::pollfd { fd: self.qs.efd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, ms) };
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // The kernel may still write into buffers of unfinished requests: wait for them.
        let mut sink = Vec::new();
        if self.in_flight() > 0 {
            self.drain(&mut sink);
        }
    }
}
