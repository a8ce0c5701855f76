//! A global allocator for the daemon that backs large allocations with transparent huge pages.
//!
//! The map cache is a hash table per volume, a few MiB to tens of MiB, probed at random by
//! every read. On 4 KiB pages nearly every probe misses the TLB, and inside a VM a TLB miss is
//! a two-dimensional page walk: profiled at 9.7% of the daemon's CPU for 4 KiB random reads
//! (`resolve_read`, two loads). Hosts usually run THP in `madvise` mode, so the table must ask.
//!
//! Allocations of at least [`HUGE`] bytes (and alignment up to a page) get their own anonymous
//! mapping, rounded up to a multiple of 2 MiB (which the kernel aligns on a 2 MiB boundary).
//! The block is placed at the *end* of its mapping, and only the whole 2 MiB pieces it fills
//! are advised `MADV_HUGEPAGE`; the partly used first piece keeps 4 KiB pages. So the rounding
//! costs address space but no memory (a 6.25 MiB table is 6 MiB of huge pages and 0.25 MiB of
//! small ones, not 8 MiB resident), and the end of the block is always in huge pages: a
//! hashbrown table keeps its control bytes, which every probe reads first, at its end.
//! (Measured: with the control bytes in small pages, 4 KiB random reads cost 5.4-5.8 us of
//! daemon CPU per I/O instead of 5.0-5.1.) Freeing unmaps the block, so the memory goes back to
//! the system at once. Everything else goes to the system allocator.
//!
//! Use: `#[global_allocator] static A: vblk_engine::HugePageAlloc = vblk_engine::HugePageAlloc;`

use std::alloc::{GlobalAlloc, Layout, System};

/// Size from which an allocation gets huge pages (one PMD on x86-64).
pub const HUGE: usize = 2 << 20;

/// Alignment a huge block satisfies (blocks start on a page boundary).
const PAGE: usize = 4096;

/// See the module documentation.
pub struct HugePageAlloc;

fn is_huge(size: usize, align: usize) -> bool {
    size >= HUGE && align <= PAGE
}

fn map_len(size: usize) -> usize {
    size.div_ceil(HUGE) * HUGE
}

/// Where in its mapping a huge block of `size` bytes starts: as far in as keeps the block's
/// whole pages inside the mapping.
fn offset(size: usize) -> usize {
    map_len(size) - size.next_multiple_of(PAGE)
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
    let huge = size.next_multiple_of(PAGE) / HUGE * HUGE;
    if huge > 0 {
        // SAFETY: advice on the last `huge` bytes of the mapping just created; failure (THP
        // disabled) is harmless.
        unsafe { libc::madvise(p.cast::<u8>().add(len - huge).cast(), huge, libc::MADV_HUGEPAGE) };
    }
    // SAFETY: `offset(size) < len`, so the pointer stays inside the mapping.
    unsafe { p.cast::<u8>().add(offset(size)) }
}

// SAFETY: every block handed out is either the system allocator's (and returned to it with the
// same layout) or lies at `offset(size)` in a private mapping of `map_len(size)` bytes, with at
// least `size` bytes after it, page aligned (so aligned for any `align <= 4096`); the mapping is
// unmapped exactly once, from the same size.
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
            let size = layout.size();
            // SAFETY: `ptr` came from `map(size)` (same layout, contract of dealloc), so the
            // mapping starts `offset(size)` bytes before it and is `map_len(size)` long.
            unsafe { libc::munmap(ptr.sub(offset(size)).cast(), map_len(size)) };
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
        if old_huge && new_huge && new_size.next_multiple_of(PAGE) == layout.size().next_multiple_of(PAGE) {
            // Same pages, same place in the mapping.
            return ptr;
        }
        // A new block, copy, free the old one (a huge block's place in its mapping depends on
        // its size, so it cannot grow in place).
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
        for (size, new) in [(64, 3 << 20), (3 << 20, 5 << 20), (5 << 20, 100), (HUGE, HUGE + 1), (4 << 20, 4 << 20), ((5 << 20) + 123, (5 << 20) + 200), ((6 << 20) + 5, HUGE)] {
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
