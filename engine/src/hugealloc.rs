//! A global allocator for the daemon that backs large allocations with transparent huge pages.
//!
//! The map cache is a hash table per volume, a few MiB to tens of MiB, probed at random by
//! every read. On 4 KiB pages nearly every probe misses the TLB, and inside a VM a TLB miss is
//! a two-dimensional page walk: profiled at 9.7% of the daemon's CPU for 4 KiB random reads
//! (`resolve_read`, two loads). Hosts usually run THP in `madvise` mode, so the table must ask.
//!
//! Allocations of at least [`HUGE`] bytes (and alignment up to a page) get their own anonymous
//! mapping, rounded up to a multiple of 2 MiB (which the kernel aligns on a 2 MiB boundary).
//! The whole 2 MiB pieces that the allocation fills are advised `MADV_HUGEPAGE`; the last,
//! partly used piece keeps 4 KiB pages, so the rounding costs address space but no memory (a
//! 3.2 MiB table is 2 MiB of huge page and 1.2 MiB of small pages, not 4 MiB resident).
//! Freeing unmaps the block, so the memory goes back to the system at once.
//! Everything else goes to the system allocator.
//!
//! Use: `#[global_allocator] static A: vblk_engine::HugePageAlloc = vblk_engine::HugePageAlloc;`

use std::alloc::{GlobalAlloc, Layout, System};

/// Size from which an allocation gets huge pages (one PMD on x86-64).
pub const HUGE: usize = 2 << 20;

/// See the module documentation.
pub struct HugePageAlloc;

fn is_huge(size: usize, align: usize) -> bool {
    size >= HUGE && align <= 4096
}

fn map_len(size: usize) -> usize {
    size.div_ceil(HUGE) * HUGE
}

/// Advise huge pages for the whole 2 MiB pieces of the first `size` bytes at `p`.
fn advise(p: *mut libc::c_void, size: usize) {
    let huge = size / HUGE * HUGE;
    if huge > 0 {
        // SAFETY: advice on (a prefix of) a mapping of ours; failure (THP disabled) is harmless.
        unsafe { libc::madvise(p, huge, libc::MADV_HUGEPAGE) };
    }
}

fn map(size: usize) -> *mut u8 {
    let len = map_len(size);
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    advise(p, size);
    p.cast()
}

// SAFETY: every block handed out is either the system allocator's (and returned to it with the
// same layout) or a private mapping of at least `layout.size()` bytes, page aligned (so aligned
// for any `align <= 4096`), unmapped exactly once with the same length.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_huge(layout.size(), layout.align()) {
            return map(layout.size());
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_huge(layout.size(), layout.align()) {
            // Anonymous mappings are zero-filled.
            return map(layout.size());
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_huge(layout.size(), layout.align()) {
            // SAFETY: `ptr` came from `map` with this length (same layout, contract of dealloc).
            unsafe { libc::munmap(ptr.cast(), map_len(layout.size())) };
            return;
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_huge, new_huge) = (is_huge(layout.size(), layout.align()), is_huge(new_size, layout.align()));
        if !old_huge && !new_huge {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if old_huge && new_huge && map_len(layout.size()) == map_len(new_size) {
            advise(ptr.cast(), new_size);
            return ptr;
        }
        // Crossing the threshold, or another mapping length: a new block, copy, free the old
        // one. (Not mremap: the advice splits a mapping into a huge and a small-page part, and
        // mremap refuses a range that spans both.)
        // SAFETY: the layout is valid (same align, non-zero size as `new_size` >= the smaller).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in `alloc`.
        let p = unsafe { self.alloc(new_layout) };
        if !p.is_null() {
            // SAFETY: both blocks are live, distinct, and at least `min` bytes long.
            unsafe { std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated by us with `layout`.
            unsafe { self.dealloc(ptr, layout) };
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_huge_blocks_round_trip() {
        let a = HugePageAlloc;
        for (size, new) in [(64, 3 << 20), (3 << 20, 5 << 20), (5 << 20, 100), (HUGE, HUGE + 1), (4 << 20, 4 << 20)] {
            let l = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: valid non-zero layouts; every block is written within its size and freed
            // once with its current layout.
            unsafe {
                let p = a.alloc_zeroed(l);
                assert!(!p.is_null());
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                for i in 0..size.min(new) {
                    *p.add(i) = i as u8;
                }
                let q = a.realloc(p, l, new);
                assert!(!q.is_null());
                for i in 0..size.min(new) {
                    assert_eq!(*q.add(i), i as u8, "byte {i} after {size} -> {new}");
                }
                *q.add(new - 1) = 7;
                a.dealloc(q, Layout::from_size_align(new, 8).unwrap());
            }
        }
    }
}
