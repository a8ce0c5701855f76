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
