//! A keyed limiter's memory while keys come and go, counted by a byte-counting global
//! allocator (its own test binary, so that no other test's allocations are counted).
//!
//! Clients that each send a burst and leave (a crawler rotating addresses, an API key per
//! request) fill the table, go idle, and are swept out for the next ones. The table must
//! stay the size its keys need: the rows swept out leave markers that new rows do not
//! always reuse, and a table out of room because of them used to double while holding no
//! more keys, so a limiter documented at 13 MB for 100 000 `BoundedKey`s held 25 MB.
#![allow(unsafe_code)] // the byte-counting allocator's `unsafe impl GlobalAlloc`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use seawall::rate_limit::{BoundedKey, KeyedRateLimiter, ManualClock, Quota, Rate};

/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; the counter is
// only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Relaxed);
        // SAFETY: as the caller's contract for `alloc`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: as the caller's contract for `dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: as the caller's contract for `realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_keyed_limiter_keeps_its_size_while_keys_come_and_go() {
    let clock = ManualClock::new();
    let quota = Quota::new(Rate::per_second(1), 5).unwrap();
    let before = LIVE.load(Relaxed);
    let limiter: KeyedRateLimiter<BoundedKey, ManualClock> =
        KeyedRateLimiter::with_clock(quota, clock.clone());
    let mut n = 0u64;
    let mut arrive = |count: u64| {
        for _ in 0..count {
            let key = format!("client-{n}");
            // Beyond the table's capacity new keys share the overflow bucket, which
            // refuses most of them: only the memory is measured here.
            let _ = limiter.try_acquire(&BoundedKey::from(key.as_str()), 1);
            n += 1;
        }
    };
    // The default maximum (100 000 keys) filled.
    arrive(120_000);
    let filled = LIVE.load(Relaxed) - before;
    let per_key = filled / limiter.len();
    assert!(per_key < 140, "{per_key} bytes a key when filled");
    for round in 0..6 {
        // Every bucket refills; as many new clients arrive.
        clock.advance(Duration::from_secs(10));
        arrive(100_000);
        let now = LIVE.load(Relaxed) - before;
        assert!(
            now <= filled + filled / 10,
            "round {round}: {now} bytes for {} keys, {filled} when first filled",
            limiter.len()
        );
    }
}
