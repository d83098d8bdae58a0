//! A keyed limiter's memory while keys come and go, counted by a byte-counting global
//! allocator (its own test binary, so that no other test's allocations are counted).
//!
//! Clients that each send a burst and leave (a crawler rotating addresses, an API key per
//! request) fill the table, go idle, and are swept out for the next ones. The table must
//! stay the size its keys need: the rows swept out leave markers that new rows do not
//! always reuse, and a table out of room because of them used to double while holding no
//! more keys, so a limiter documented at 13 MB for 100 000 `BoundedKey`s held 25 MB.

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use counting_alloc::LIVE;
use seawall::rate_limit::{BoundedKey, KeyedRateLimiter, ManualClock, Quota, Rate};

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
    // 148 bytes a key measured (`KeyedRateLimiter`'s docs), with room for the
    // allocator's and the table's variations, not for another word in every row.
    assert!(per_key < 155, "{per_key} bytes a key when filled");
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
