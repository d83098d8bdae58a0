//! A counting global allocator shared by the benches: allocations (and reallocations)
//! are counted while `COUNTING` is set.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Counts allocations (and reallocations) while `COUNTING` is set.
pub(crate) struct Counting;

pub(crate) static COUNTING: AtomicBool = AtomicBool::new(false);
pub(crate) static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

std::thread_local! {
    /// Set on threads whose allocations are not to be counted.
    static EXCLUDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Leaves this thread's allocations out of the count (a load client's, say, when only a
/// server's are wanted).
#[allow(dead_code)] // not every bench needs it
pub(crate) fn exclude_this_thread() {
    EXCLUDED.with(|e| e.set(true));
}

#[inline]
fn count() {
    // `try_with`: nothing to count once the thread-local is gone (thread exit).
    if COUNTING.load(Relaxed) && !EXCLUDED.try_with(std::cell::Cell::get).unwrap_or(true) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}
