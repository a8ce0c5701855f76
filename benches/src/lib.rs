//! Shared pieces of vblk's benchmarks.

use std::time::{Duration, Instant};

pub mod vhost;

/// A heap buffer of `len` bytes plus slack, used from its first 4096-aligned byte (O_DIRECT),
/// handed out in 4 KiB slots.
pub struct Aligned(Vec<u8>, usize);
impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Aligned(v, off)
    }
    /// Start of 4 KiB slot `i`.
    pub fn ptr(&mut self, i: usize) -> *mut u8 {
        self.0[self.1 + i * 4096..].as_mut_ptr()
    }
}

/// Simple xorshift for offsets (no allocation, no locking in the hot loop).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Median, min and max of a set of figures.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// Run `f` repeatedly for `dur`; `f` returns the number of operations it completed.
pub fn run_for(dur: Duration, mut f: impl FnMut() -> u64) -> f64 {
    let t0 = Instant::now();
    let mut ops = 0;
    while t0.elapsed() < dur {
        ops += f();
    }
    ops as f64 / t0.elapsed().as_secs_f64()
}

/// CPU time (user + system) of this process, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into valid memory.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised by getrusage above.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Requests kept in flight by [`engine_qd32`].
pub const QD32: usize = 32;

/// 4 KiB requests of `kind` through the engine's Queue at QD32 for `dur`: IOPS. `span` is the
/// lba range used (random offsets); `fresh_base` instead picks never-written blocks in order
/// (allocating writes).
pub fn engine_qd32(q: &mut vblk_engine::Queue, span: u64, kind: vblk_engine::ReqKind, dur: Duration, fresh_base: Option<&mut u64>) -> f64 {
    let mut buf = Aligned::new(QD32 * 4096);
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let mut fresh = fresh_base;
    let mut next_off = |rng: &mut Rng| match fresh.as_deref_mut() {
        Some(n) => {
            // The fresh volume has 2 x span blocks; past that writes would be overwrites.
            if *n == 2 * span {
                eprintln!("warning: the fresh volume is full; later 'allocating' writes are overwrites");
            }
            let o = (*n % (2 * span)) * 4096u64;
            *n += 1;
            o
        }
        None => (rng.next() % span) * 4096u64,
    };
    for s in 0..QD32 {
        let off = next_off(&mut rng);
        // SAFETY: buf outlives all requests: we drain before returning.
        unsafe {
            q.submit(vblk_engine::Request { kind, offset: off, len: 4096u64, iov: vec![vblk_engine::IoVec { ptr: buf.ptr(s), len: 4096 }].into(), tag: s as u64 })
        };
    }
    let mut out = Vec::with_capacity(QD32);
    let efd = q.event_fd();
    let r = run_for(dur, || {
        let mut p = libc::pollfd { fd: efd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 1000) };
        out.clear();
        q.reap(&mut out);
        for c in &out {
            assert!(c.result.is_ok(), "{c:?} kind {kind:?} span {span}");
            let off = next_off(&mut rng);
            let s = c.tag as usize;
            // SAFETY: as above.
            unsafe {
                q.submit(vblk_engine::Request { kind, offset: off, len: 4096u64, iov: vec![vblk_engine::IoVec { ptr: buf.ptr(s), len: 4096 }].into(), tag: c.tag })
            };
        }
        out.len() as u64
    });
    q.drain(&mut out);
    r
}
