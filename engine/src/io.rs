//! The data path: one [`Queue`] per I/O thread (one per virtqueue), each with its own
//! io_uring. Requests are submitted straight from the caller's buffers (guest memory) and never
//! block the calling thread on I/O; completions are signalled on an eventfd that the caller
//! polls in its own event loop.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types, IoUring};

use crate::error::{Error, Result};
use crate::format::{BLOCK_SHIFT, BLOCK_SIZE};
use crate::pool::{CommitMsg, Shared};
use crate::volume::{ReadRes, VolumeState};

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

/// A block request. `offset` and `len` are in bytes and must be multiples of 4096. For Read and
/// Write, `len` must equal the total length of `iov`.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
    pub iov: Vec<IoVec>,
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
    write: Option<(u64, Vec<(u64, bool)>)>,
    /// iovec arrays owned until the kernel is done with them.
    iovs: Vec<Vec<libc::iovec>>,
    /// Expected byte count per part (index = part number).
    expect: Vec<u32>,
}

/// Entries in the io_uring submission queue; one request may need several.
const RING_ENTRIES: u32 = 512;

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
    scratch_w: Vec<(u64, bool)>,
    unsubmitted: u32,
}

fn errno_of(e: &Error) -> i32 {
    match e {
        Error::NoSpace => libc::ENOSPC,
        Error::OutOfRange { .. } | Error::Misaligned { .. } => libc::EINVAL,
        Error::ReadOnly => libc::EROFS,
        _ => libc::EIO,
    }
}

/// Sub-range [off, off+len) of a scatter list, as iovecs.
fn slice_iov(iov: &[IoVec], mut off: usize, mut len: usize, out: &mut Vec<libc::iovec>) {
    for v in iov {
        if len == 0 {
            break;
        }
        if off >= v.len {
            off -= v.len;
            continue;
        }
        let n = (v.len - off).min(len);
        out.push(libc::iovec { iov_base: v.ptr.wrapping_add(off) as *mut libc::c_void, iov_len: n });
        off = 0;
        len -= n;
    }
}

impl Queue {
    pub(crate) fn new(shared: Arc<Shared>, vol: Arc<VolumeState>, read_only: bool) -> Result<Queue> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)
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
            vol,
            read_only,
            ring,
            qs,
            slots: Vec::new(),
            free_slots: Vec::new(),
            ready: Vec::new(),
            scratch_r: Vec::new(),
            scratch_w: Vec::new(),
            unsubmitted: 0,
        })
    }

    /// The eventfd that becomes readable when completions are ready to [`reap`](Self::reap).
    pub fn event_fd(&self) -> RawFd {
        self.qs.efd
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Size of the volume in bytes now.
    pub fn size_bytes(&self) -> u64 {
        self.vol.size()
    }

    /// Submit a request. Errors that concern only this request (range, alignment, read-only,
    /// full pool) are returned as a completion with an errno, not as `Err`.
    ///
    /// # Safety
    /// Every `IoVec` must point to memory that stays valid (and, for reads, writable) until the
    /// request's completion has been returned by [`reap`](Self::reap).
    pub unsafe fn submit(&mut self, req: Request) {
        let tag = req.tag;
        if let Err(e) = self.validate(&req) {
            self.ready.push(Completion { tag, result: Err(errno_of(&e)) });
            return;
        }
        match req.kind {
            ReqKind::Flush => {
                if !self.shared.send_commit(CommitMsg::Flush { queue: self.qs.clone(), tag }) {
                    self.ready.push(Completion { tag, result: Err(libc::EIO) });
                }
            }
            ReqKind::Discard | ReqKind::WriteZeroes => {
                let epoch = self.shared.enter();
                let r = self.shared.unmap(&self.vol, req.offset >> BLOCK_SHIFT, req.len >> BLOCK_SHIFT);
                self.shared.exit(epoch);
                self.ready.push(Completion { tag, result: r.map(|_| 0).map_err(|e| errno_of(&e)) });
            }
            ReqKind::Read | ReqKind::Write => self.submit_rw(req),
        }
        self.flush_sq();
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
        if req.offset % BLOCK_SIZE != 0 || req.len % BLOCK_SIZE != 0 {
            return Err(Error::Misaligned { offset: req.offset, len: req.len });
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

    fn submit_rw(&mut self, req: Request) {
        let lba = req.offset >> BLOCK_SHIFT;
        let n = req.len >> BLOCK_SHIFT;
        let write = req.kind == ReqKind::Write;
        let epoch = self.shared.enter();
        // Resolve the blocks: runs of consecutive physical blocks become one readv/writev.
        let mut runs: Vec<(u64, u64, Option<u64>)> = Vec::new(); // (first block index, count, pba or hole)
        let mut write_blocks = None;
        if write {
            let mut w = std::mem::take(&mut self.scratch_w);
            if let Err(e) = self.shared.resolve_write(&self.vol, lba, n, &mut w) {
                self.shared.exit(epoch);
                self.scratch_w = w;
                self.ready.push(Completion { tag: req.tag, result: Err(errno_of(&e)) });
                return;
            }
            for (i, &(pba, _)) in w.iter().enumerate() {
                match runs.last_mut() {
                    Some((s, c, Some(p))) if *p + *c == pba && *s + *c == i as u64 => *c += 1,
                    _ => runs.push((i as u64, 1, Some(pba))),
                }
            }
            write_blocks = Some((lba, w.clone()));
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
                let pba = match res {
                    ReadRes::At(p) => Some(*p),
                    ReadRes::Zero => None,
                };
                match (runs.last_mut(), pba) {
                    (Some((s, c, Some(p))), Some(pba)) if *p + *c == pba && *s + *c == i as u64 => *c += 1,
                    (Some((s, c, None)), None) if *s + *c == i as u64 => *c += 1,
                    _ => runs.push((i as u64, 1, pba)),
                }
            }
            self.scratch_r = r;
        }
        let mut f = InFlight {
            tag: req.tag,
            parts: 0,
            err: None,
            bytes: req.len as u32,
            epoch,
            write: write_blocks,
            iovs: Vec::new(),
            expect: Vec::new(),
        };
        for &(first, count, pba) in &runs {
            let off = (first * BLOCK_SIZE) as usize;
            let len = (count * BLOCK_SIZE) as usize;
            match pba {
                None => {
                    // A hole reads as zeros without device I/O.
                    let mut v = Vec::new();
                    slice_iov(&req.iov, off, len, &mut v);
                    for s in v {
                        // SAFETY: the caller guarantees the iovecs are valid writable memory
                        // for the request's lifetime (submit's contract).
                        unsafe { std::ptr::write_bytes(s.iov_base as *mut u8, 0, s.iov_len) };
                    }
                }
                Some(_) => {
                    let mut v = Vec::new();
                    slice_iov(&req.iov, off, len, &mut v);
                    f.iovs.push(v);
                    f.expect.push(len as u32);
                }
            }
        }
        f.parts = f.iovs.len() as u32;
        if f.parts == 0 {
            self.shared.exit(epoch);
            if let Some((l, b)) = &f.write {
                self.shared.finish_write(&self.vol, *l, b, true);
            }
            self.ready.push(Completion { tag: req.tag, result: Ok(req.len as u32) });
            return;
        }
        let pbas: Vec<u64> = runs.iter().filter_map(|r| r.2).collect();
        let nparts = f.parts as usize;
        let idx = self.slot(f);
        for part in 0..nparts {
            let (ptr, cnt) = {
                let Some(Some(f)) = self.slots.get(idx) else { return };
                (f.iovs[part].as_ptr(), f.iovs[part].len() as u32)
            };
            let off = self.shared.data_offset(pbas[part]);
            let ud = ((idx as u64) << 16) | part as u64;
            let sqe = if write {
                opcode::Writev::new(types::Fixed(0), ptr, cnt).offset(off).build().user_data(ud)
            } else {
                opcode::Readv::new(types::Fixed(0), ptr, cnt).offset(off).build().user_data(ud)
            };
            loop {
                // SAFETY: the iovec array lives in self.slots[idx] until the completion of
                // this part is reaped; the buffers it points to are the caller's (contract).
                let pushed = unsafe { self.ring.submission().push(&sqe) };
                if pushed.is_ok() {
                    self.unsubmitted += 1;
                    break;
                }
                // Submission queue full: hand what we have to the kernel and retry.
                if let Err(e) = self.ring.submit() {
                    if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                        tracing::error!(error = %e, "io_uring_enter failed");
                    }
                    self.reap_cq();
                }
                self.unsubmitted = 0;
            }
        }
    }

    fn flush_sq(&mut self) {
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
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            let idx = (ud >> 16) as usize;
            let part = (ud & 0xffff) as usize;
            let res = cqe.result();
            let Some(Some(f)) = self.slots.get_mut(idx) else { continue };
            if res < 0 {
                f.err.get_or_insert(-res);
            } else if f.expect.get(part).copied() != Some(res as u32) {
                // Short read/write: treat as an I/O error (the device shrank or failed).
                f.err.get_or_insert(libc::EIO);
            }
            f.parts -= 1;
            if f.parts == 0 {
                done.push(idx);
            }
        }
        for idx in done {
            let Some(f) = self.slots.get_mut(idx).and_then(|s| s.take()) else { continue };
            self.free_slots.push(idx);
            if let Some((l, b)) = &f.write {
                self.shared.finish_write(&self.vol, *l, b, f.err.is_none());
            }
            self.shared.exit(f.epoch);
            if let Some(e) = f.err {
                tracing::warn!(volume = %self.vol.name(), errno = e, "data I/O failed");
            }
            self.ready.push(Completion { tag: f.tag, result: match f.err { None => Ok(f.bytes), Some(e) => Err(e) } });
        }
    }

    /// Collect finished requests into `out` without blocking. Call it when the eventfd fires
    /// (it also clears the eventfd).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.qs.efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if self.unsubmitted > 0 {
            self.flush_sq();
        }
        self.reap_cq();
        out.append(&mut self.ready);
        if let Ok(mut d) = self.qs.done.lock() {
            out.append(&mut d);
        }
    }

    /// Block until every submitted request has completed, collecting the completions.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        loop {
            self.reap(out);
            let flushes_pending = Arc::strong_count(&self.qs) > 1;
            if self.in_flight() == 0 && !flushes_pending {
                return;
            }
            if self.in_flight() > 0 {
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
