//! The local token bucket and its layer, on paused tokio time or a manual clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use proptest::prelude::*;
use seawall::BoxError;
use seawall::rate_limit::{
    ManualClock, Mode, Quota, Rate, RateLimitLayer, RateLimited, RateLimiter,
};
use tokio::time::{Instant, advance};
use tower::{Service, ServiceBuilder, ServiceExt};

fn quota(per_second: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_second(per_second), burst).unwrap()
}

fn limited(err: BoxError) -> RateLimited {
    *err.downcast_ref::<RateLimited>()
        .unwrap_or_else(|| panic!("expected RateLimited, got {err}"))
}

fn echo() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send {
    tower::service_fn(|x: u32| async move { Ok::<_, BoxError>(x) })
}

#[test]
fn bucket_starts_full_and_refills_at_the_rate() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(10, 3), clock.clone());
    assert_eq!(limiter.available(), 3);
    assert_eq!(limiter.try_acquire(1), Ok(2));
    assert_eq!(limiter.try_acquire(2), Ok(0));
    let refused = limiter.try_acquire(1).unwrap_err();
    assert_eq!(refused.retry_after(), Some(Duration::from_millis(100)));
    assert_eq!(refused.limit(), 3);
    clock.advance(Duration::from_millis(99));
    assert_eq!(
        limiter.try_acquire(1).unwrap_err().retry_after(),
        Some(Duration::from_millis(1))
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(limiter.try_acquire(1), Ok(0));
    // A long pause refills to the burst, never beyond.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(limiter.available(), 3);
}

#[test]
fn weights_and_requests_larger_than_the_bucket() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(10, 5), clock.clone());
    assert_eq!(limiter.try_acquire(4), Ok(1));
    let refused = limiter.try_acquire(3).unwrap_err();
    assert_eq!(refused.retry_after(), Some(Duration::from_millis(200)));
    let too_big = limiter.try_acquire(6).unwrap_err();
    assert!(too_big.exceeds_capacity());
    assert_eq!(too_big.retry_after(), None);
    assert!(
        too_big
            .to_string()
            .contains("more than the rate limit's capacity of 5")
    );
    // Zero costs nothing.
    assert_eq!(limiter.try_acquire(0), Ok(1));
}

#[test]
fn quota_changes_at_run_time_keep_the_level() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(10, 10), clock.clone());
    let clone = limiter.clone();
    assert_eq!(limiter.try_acquire(10), Ok(0));
    clone.set_quota(quota(100, 20));
    assert_eq!(limiter.burst(), 20);
    // The ten taken stay taken: ten of twenty are left.
    assert_eq!(limiter.available(), 10);
    clock.advance(Duration::from_millis(10));
    assert_eq!(limiter.available(), 11, "refills at the new rate");
}

#[test]
fn concurrent_callers_never_take_more_than_the_bucket_holds() {
    let limiter = RateLimiter::with_clock(quota(1, 1_000), ManualClock::new());
    let admitted = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (limiter, admitted) = (limiter.clone(), admitted.clone());
            std::thread::spawn(move || {
                for _ in 0..1_000 {
                    if limiter.try_acquire(1).is_ok() {
                        admitted.fetch_add(1, SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        admitted.load(SeqCst),
        1_000,
        "time did not move: exactly the burst"
    );
}

#[tokio::test(start_paused = true)]
async fn reject_mode_answers_at_once_and_clones_share_the_bucket() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(quota(2, 2)))
        .service_fn(move |x: u32| {
            counter.fetch_add(1, SeqCst);
            async move { Ok::<_, BoxError>(x) }
        });
    // A fresh clone per request, as axum's router does.
    for i in 0..2 {
        let mut s = svc.clone();
        assert_eq!(s.ready().await.unwrap().call(i).await.unwrap(), i);
    }
    let mut s = svc.clone();
    let refused = limited(s.ready().await.unwrap().call(9).await.unwrap_err());
    assert_eq!(refused.retry_after(), Some(Duration::from_millis(500)));
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the refused request did not reach the service"
    );
    advance(Duration::from_millis(500)).await;
    let mut s = svc.clone();
    assert_eq!(s.ready().await.unwrap().call(3).await.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn weighted_requests() {
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(quota(10, 10)).cost(|n: &u32| *n))
        .service(echo());
    assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);
    let refused = limited(svc.ready().await.unwrap().call(5).await.unwrap_err());
    assert_eq!(refused.retry_after(), Some(Duration::from_millis(200)));
    assert!(limited(svc.ready().await.unwrap().call(11).await.unwrap_err()).exceeds_capacity());
}

#[tokio::test(start_paused = true)]
async fn wait_mode_serves_in_arrival_order_at_the_rate() {
    let layer = RateLimitLayer::new(quota(10, 1)).wait_up_to(Duration::from_secs(10));
    let svc = ServiceBuilder::new().layer(layer).service(echo());
    let start = Instant::now();
    let done = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5u32 {
        let mut s = svc.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let r = s.ready().await.unwrap().call(i).await.unwrap();
            done.lock().push((r, start.elapsed()));
        }));
        // Arrive in order.
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let done = done.lock().clone();
    let expected: Vec<(u32, Duration)> = (0..5)
        .map(|i| (i, Duration::from_millis(100 * u64::from(i))))
        .collect();
    assert_eq!(done, expected, "first come, first served, one every 100 ms");
}

#[tokio::test(start_paused = true)]
async fn wait_mode_rejects_beyond_the_maximum_wait() {
    let layer = RateLimitLayer::new(quota(10, 1)).mode(Mode::Wait {
        max_wait: Duration::from_millis(150),
    });
    let svc = ServiceBuilder::new().layer(layer).service(echo());
    let mut a = svc.clone();
    let mut b = svc.clone();
    let mut c = svc.clone();
    a.ready().await.unwrap(); // the bucket's one token, now
    let waited = Instant::now();
    b.ready().await.unwrap(); // the next, due 100 ms later
    assert_eq!(waited.elapsed(), Duration::from_millis(100));
    // c books the token due at +100 ms from here, within 150 ms: pending.
    {
        let mut c_ready = tokio_test::task::spawn(c.ready());
        assert!(c_ready.poll().is_pending());
    }
    // d would wait 200 ms: refused at once.
    let mut d = svc.clone();
    let before = Instant::now();
    let refused = limited(d.ready().await.unwrap().call(4).await.unwrap_err());
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(refused.retry_after(), Some(Duration::from_millis(200)));
    a.call(1).await.unwrap();
    b.call(2).await.unwrap();
    c.ready().await.unwrap().call(3).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_hands_its_token_back() {
    let layer = RateLimitLayer::new(quota(10, 1)).wait_up_to(Duration::from_secs(10));
    let limiter = layer.limiter().clone();
    let svc = ServiceBuilder::new().layer(layer).service(echo());
    let mut first = svc.clone();
    first.ready().await.unwrap();
    first.call(0).await.unwrap();
    // A waiter books the token due at +100 ms, then gives up (its future is dropped).
    let mut quitter = svc.clone();
    let attempt = tokio::time::timeout(Duration::from_millis(10), quitter.ready()).await;
    assert!(attempt.is_err(), "still waiting");
    drop(quitter);
    // Its booking is handed back: at +100 ms the token is there for someone else.
    advance(Duration::from_millis(90)).await;
    assert_eq!(limiter.available(), 1);
}

/// A waiter that gave up handed its booking back by moving the bucket's arrival time
/// back, but the waiter booked behind it kept its (later) turn: its tokens were then
/// counted as refilled before it even took them, and at its turn the bucket was full
/// again: with a burst of 1, two requests admitted at the same instant. A refund stops
/// at what the turns booked after it need.
#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_does_not_let_the_next_one_double_the_burst() {
    let layer = RateLimitLayer::new(quota(1, 1)).wait_up_to(Duration::from_secs(10));
    let limiter = layer.limiter().clone();
    let svc = ServiceBuilder::new().layer(layer).service(echo());
    let mut first = svc.clone();
    first.ready().await.unwrap();
    first.call(0).await.unwrap();
    // A waiter books the token due at +1 s, then gives up after 10 ms.
    let mut quitter = svc.clone();
    let attempt = tokio::time::timeout(Duration::from_millis(10), quitter.ready()).await;
    assert!(attempt.is_err(), "still waiting");
    // Another books the next one, due at +2 s, and waits for it.
    let mut patient = svc.clone();
    let waiting = tokio::spawn(async move {
        patient.ready().await.unwrap().call(2).await.unwrap();
        limiter.try_acquire(1)
    });
    tokio::task::yield_now().await;
    drop(quitter);
    // At the patient waiter's turn the bucket of one has just been emptied by it.
    let beside = waiting.await.unwrap();
    assert!(
        beside.is_err(),
        "a second token at the same instant, with a burst of 1: {beside:?}"
    );
}

/// A waiting service polled ready while its turn was beyond `max_wait` is ready with a
/// refusal for its next call. Polled ready again later (as a ready cache or a balancer
/// does before each use), with the bucket full by then, it must not refuse that call.
#[tokio::test(start_paused = true)]
async fn wait_mode_refusal_is_not_sticky_across_poll_ready() {
    let layer = RateLimitLayer::new(quota(1, 1)).wait_up_to(Duration::from_millis(100));
    let limiter = layer.limiter().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service(echo());
    svc.ready().await.unwrap().call(0).await.unwrap();
    // The next token is 1 s away, beyond the 100 ms it may wait: ready, to refuse.
    svc.ready().await.unwrap();
    advance(Duration::from_secs(5)).await;
    assert_eq!(limiter.available(), 1, "the bucket is full again");
    // Polled again before use: the bucket holds a token for it.
    let answer = svc.ready().await.unwrap().call(1).await;
    assert_eq!(
        answer.map_err(|e| e.to_string()).ok(),
        Some(1),
        "refused with a full bucket ({} token available)",
        limiter.available()
    );
}

#[tokio::test(start_paused = true)]
async fn a_ready_but_unused_service_hands_its_token_back() {
    let layer = RateLimitLayer::new(quota(1, 1)).wait_up_to(Duration::from_secs(10));
    let limiter = layer.limiter().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service(echo());
    svc.ready().await.unwrap();
    assert_eq!(limiter.available(), 0);
    drop(svc);
    assert_eq!(limiter.available(), 1);
}

/// One arrival: after `gap_ms` of silence, ask for `cost` tokens.
fn arrivals() -> impl Strategy<Value = Vec<(u64, u32)>> {
    prop::collection::vec((0u64..200, 0u32..4), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: crate::regressions_next_to_source(),
        ..ProptestConfig::default()
    })]

    /// Whatever the arrivals, admitted cost never exceeds burst + rate × elapsed.
    #[test]
    fn never_admits_more_than_burst_plus_rate_times_elapsed(
        per_second in 1u32..1_000,
        burst in 1u32..50,
        seq in arrivals(),
    ) {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(quota(per_second, burst), clock.clone());
        let interval = limiter.interval().as_nanos() as u64;
        let mut admitted = 0u64;
        let mut elapsed = 0u64;
        for (gap_ms, cost) in seq {
            clock.advance(Duration::from_millis(gap_ms));
            elapsed += gap_ms * 1_000_000;
            if limiter.try_acquire(cost).is_ok() {
                admitted += u64::from(cost);
            }
            prop_assert!(admitted <= u64::from(burst) + elapsed / interval,
                "admitted {} after {} ns", admitted, elapsed);
        }
    }

    /// Steady arrivals at or below the rate are never refused.
    #[test]
    fn steady_arrivals_within_the_rate_are_never_refused(
        per_second in 1u32..1_000,
        burst in 1u32..50,
        slack in 1.0f64..3.0,
        n in 1usize..500,
    ) {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(quota(per_second, burst), clock.clone());
        let gap = Duration::from_secs_f64(slack / f64::from(per_second));
        for i in 0..n {
            prop_assert!(limiter.try_acquire(1).is_ok(), "arrival {} refused", i);
            clock.advance(gap);
        }
    }
}

mod keyed {
    use super::*;
    use seawall::rate_limit::{KeyedRateLimitLayer, KeyedRateLimiter};

    #[test]
    fn every_key_has_its_own_bucket() {
        let clock = ManualClock::new();
        let limiter = KeyedRateLimiter::with_clock(quota(10, 2), clock.clone());
        assert_eq!(limiter.try_acquire("a", 2), Ok(0));
        assert_eq!(
            limiter.try_acquire("a", 1).unwrap_err().retry_after(),
            Some(Duration::from_millis(100))
        );
        assert_eq!(limiter.try_acquire("b", 1), Ok(1));
        clock.advance(Duration::from_millis(100));
        assert_eq!(limiter.try_acquire("a", 1), Ok(0));
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn a_flood_of_keys_cannot_grow_memory_or_free_an_abusive_key() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, _> = KeyedRateLimiter::builder(quota(1, 10))
            .clock(clock.clone())
            .max_keys(640)
            .build();
        // One key uses up its bucket...
        assert_eq!(limiter.try_acquire(&0, 10), Ok(0));
        // ...then 100 000 distinct keys arrive, one request each.
        for key in 1..100_000u64 {
            let _ = limiter.try_acquire(&key, 1);
            assert!(limiter.len() <= limiter.capacity());
        }
        assert_eq!(limiter.capacity(), 640);
        // The flood evicted buckets closest to full first: key 0 is still empty.
        assert!(
            limiter.try_acquire(&0, 1).is_err(),
            "the abusive key kept its debt"
        );
    }

    #[test]
    fn refilled_buckets_are_dropped_first() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, _> = KeyedRateLimiter::builder(quota(1, 1))
            .clock(clock.clone())
            .max_keys(6_400)
            .build();
        // Every shard full (the keys beyond share the overflow bucket).
        for key in 0..20_000u64 {
            let _ = limiter.try_acquire(&key, 1);
        }
        assert_eq!(limiter.len(), 6_400);
        clock.advance(Duration::from_secs(2));
        // Everything refilled: each new key sweeps its shard and gets a bucket of its own.
        for key in 100_000..100_064u64 {
            assert_eq!(limiter.try_acquire(&key, 1), Ok(0));
            assert!(limiter.try_acquire(&key, 1).is_err(), "its own bucket");
        }
        assert!(limiter.len() < 6_400);
    }

    /// Keys chosen by clients cannot grow memory through their length: 3 000 distinct
    /// 64 KiB keys are stored in a fixed 65 bytes each, inline (the key type is `Copy`:
    /// nothing on the heap), so the keys' bytes stay within capacity × 65.
    #[test]
    fn huge_keys_are_stored_in_bounded_bytes() {
        use seawall::rate_limit::{BoundedKey, INLINE_KEY_BYTES};
        fn no_heap<T: Copy>() {}
        no_heap::<BoundedKey>();
        let limiter: KeyedRateLimiter<BoundedKey, _> = KeyedRateLimiter::builder(quota(1, 10))
            .clock(ManualClock::new())
            .max_keys(6_400)
            .build();
        let mut value = vec![b'k'; 64 * 1024];
        for i in 0..3_000u32 {
            value[..4].copy_from_slice(&i.to_be_bytes());
            limiter.try_acquire(&BoundedKey::new(&value), 1).unwrap();
        }
        assert_eq!(limiter.len(), 3_000, "every huge key has its own bucket");
        let key_bytes = limiter.len() * std::mem::size_of::<BoundedKey>();
        assert!(key_bytes <= 3_000 * (INLINE_KEY_BYTES + 1), "{key_bytes}");
        // The same huge value finds its bucket again.
        value[..4].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(limiter.try_acquire(&BoundedKey::new(&value), 1), Ok(8));
    }

    /// A flood of fresh keys beyond the table's capacity neither evicts the buckets that
    /// hold a debt nor goes unlimited: the fresh keys share one overflow bucket.
    #[test]
    fn a_flood_of_fresh_keys_shares_one_overflow_bucket() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, _> = KeyedRateLimiter::builder(quota(1, 10))
            .clock(clock.clone())
            .max_keys(640)
            .build();
        // A real client, half-way through its bucket.
        assert_eq!(limiter.try_acquire(&0, 5), Ok(5));
        let admitted = (1..100_000u64)
            .filter(|key| limiter.try_acquire(key, 1).is_ok())
            .count();
        assert!(limiter.len() <= limiter.capacity());
        // At most one bucket per free row, plus the overflow bucket's burst.
        assert!(admitted <= 640 + 10, "{admitted} admitted");
        // The real client's bucket was kept, debt and all: 5 left, not a fresh 10.
        assert_eq!(limiter.try_acquire(&0, 5), Ok(0));
        assert!(limiter.try_acquire(&0, 1).is_err());
        // Once buckets refill, new keys get buckets of their own again.
        clock.advance(Duration::from_secs(20));
        assert_eq!(limiter.try_acquire(&200_000, 1), Ok(9));
    }

    #[test]
    fn quotas_per_key_and_changes_at_run_time() {
        let clock = ManualClock::new();
        let limiter = KeyedRateLimiter::with_clock(quota(1, 1), clock.clone());
        limiter.set_quota_fn(|tier: &String| {
            if tier.starts_with("gold") {
                quota(100, 100)
            } else {
                quota(1, 1)
            }
        });
        assert_eq!(limiter.try_acquire("gold:alice", 50), Ok(50));
        assert!(
            limiter
                .try_acquire("free:bob", 2)
                .unwrap_err()
                .exceeds_capacity()
        );
        assert_eq!(limiter.try_acquire("free:bob", 1), Ok(0));
        // Upgrade everyone: levels are kept, capacity grows.
        limiter.set_default_quota(quota(100, 100));
        limiter.set_quota_fn(|_: &String| quota(100, 100));
        assert_eq!(
            limiter.try_acquire("free:bob", 1),
            Ok(98),
            "1 taken before, 1 now"
        );
        assert_eq!(limiter.try_acquire("gold:alice", 1), Ok(49));
    }

    /// A quota lowered at run time holds from the change, as `RateLimiter::set_quota`'s
    /// does: a key emptied at 100/s, cut to 1/s, has one token a second later, not the
    /// hundred its old rate would have refilled (its bucket used to move to the new quota
    /// only at its next request, refilling at the old rate until then).
    #[test]
    fn a_lowered_quota_holds_from_the_change() {
        for change in ["default", "function"] {
            let clock = ManualClock::new();
            let keyed = KeyedRateLimiter::with_clock(quota(100, 100), clock.clone());
            let single = RateLimiter::with_clock(quota(100, 100), clock.clone());
            assert_eq!(keyed.try_acquire("k", 100), Ok(0));
            assert_eq!(single.try_acquire(100), Ok(0));
            match change {
                "default" => keyed.set_default_quota(quota(1, 100)),
                _ => keyed.set_quota_fn(|_: &String| quota(1, 100)),
            }
            single.set_quota(quota(1, 100));
            clock.advance(Duration::from_secs(1));
            assert_eq!(single.try_acquire(1), Ok(0));
            assert!(single.try_acquire(1).is_err());
            assert_eq!(keyed.try_acquire("k", 1), Ok(0), "{change}");
            assert!(
                keyed.try_acquire("k", 1).is_err(),
                "{change}: one token, not 100"
            );
        }
    }

    /// The same when the key's next request comes after a flood of new keys has swept its
    /// shard: its bucket was judged refilled by its old rate and dropped, and the key came
    /// back to a fresh bucket (here, the table full, to the flood's overflow bucket).
    #[test]
    fn a_lowered_quota_holds_through_a_sweep() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, _> = KeyedRateLimiter::builder(quota(100, 100))
            .clock(clock.clone())
            .max_keys(640)
            .build();
        assert_eq!(limiter.try_acquire(&0, 100), Ok(0));
        limiter.set_default_quota(quota(1, 100));
        clock.advance(Duration::from_secs(2));
        // Every shard full and swept: key 0's old arrival time (1 s) is past.
        for key in 1..20_000u64 {
            let _ = limiter.try_acquire(&key, 1);
        }
        assert_eq!(
            limiter.try_acquire(&0, 2),
            Ok(0),
            "two tokens refilled in 2 s"
        );
        assert!(limiter.try_acquire(&0, 1).is_err(), "not a fresh bucket");
    }

    #[tokio::test(start_paused = true)]
    async fn layer_limits_per_key_and_stacks_with_a_global_limit() {
        let global = RateLimitLayer::new(quota(1, 3));
        let global_limiter = global.limiter().clone();
        let mut svc = ServiceBuilder::new()
            .layer(global)
            .layer(
                KeyedRateLimitLayer::new(quota(1, 2), |user: &Option<&'static str>| *user)
                    // Anonymous requests are meant to be held by the global limit only.
                    .on_missing_key(seawall::rate_limit::OnMissingKey::Allow),
            )
            .service_fn(|user: Option<&'static str>| async move {
                Ok::<_, BoxError>(user.unwrap_or("anonymous"))
            });
        assert_eq!(
            svc.ready().await.unwrap().call(Some("ann")).await.unwrap(),
            "ann"
        );
        assert_eq!(
            svc.ready().await.unwrap().call(Some("ann")).await.unwrap(),
            "ann"
        );
        // Ann's own limit.
        let refused = limited(
            svc.ready()
                .await
                .unwrap()
                .call(Some("ann"))
                .await
                .unwrap_err(),
        );
        assert_eq!(refused.limit(), 2);
        // The request Ann's own limit refused got its global token back: the global
        // bucket (3) paid only for the two admitted.
        assert_eq!(global_limiter.available(), 1);
        // Requests without a key are not limited per key, but count globally.
        assert_eq!(
            svc.ready().await.unwrap().call(None).await.unwrap(),
            "anonymous"
        );
        let refused = limited(svc.ready().await.unwrap().call(None).await.unwrap_err());
        assert_eq!(refused.limit(), 3, "refused by the global limit");
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: crate::regressions_next_to_source(),
            ..ProptestConfig::default()
        })]

        /// Per key, admitted cost never exceeds burst + rate × elapsed (with room for
        /// every key).
        #[test]
        fn never_admits_more_per_key_than_burst_plus_rate_times_elapsed(
            per_second in 1u32..1_000,
            burst in 1u32..20,
            seq in prop::collection::vec((0u64..100, 0u8..4, 0u32..3), 1..300),
        ) {
            let clock = ManualClock::new();
            let limiter = KeyedRateLimiter::with_clock(quota(per_second, burst), clock.clone());
            let interval = Quota::new(Rate::per_second(per_second), burst).unwrap().interval().as_nanos() as u64;
            let mut admitted = [0u64; 4];
            let mut elapsed = 0u64;
            for (gap_ms, key, cost) in seq {
                clock.advance(Duration::from_millis(gap_ms));
                elapsed += gap_ms * 1_000_000;
                if limiter.try_acquire(&key, cost).is_ok() {
                    admitted[usize::from(key)] += u64::from(cost);
                }
                for a in admitted {
                    prop_assert!(a <= u64::from(burst) + elapsed / interval);
                }
            }
        }
    }
}

mod sharded {
    use super::*;
    use seawall::rate_limit::ShardedRateLimiter;

    #[test]
    fn threads_share_the_quota_exactly() {
        let clock = ManualClock::new();
        let limiter = ShardedRateLimiter::with_clock(quota(1, 1_000), 4, clock).unwrap();
        assert_eq!(limiter.shards(), 4);
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (limiter, admitted) = (limiter.clone(), admitted.clone());
                std::thread::spawn(move || {
                    // Uneven demand: borrowing lets the busy threads use idle shards.
                    for _ in 0..(400 * (t + 1)) {
                        if limiter.try_acquire(1).is_ok() {
                            admitted.fetch_add(1, SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            admitted.load(SeqCst),
            1_000,
            "time did not move: exactly the burst"
        );
    }

    #[test]
    fn invalid_shares_and_oversized_requests() {
        // A burst of 3 cannot feed 4 shards: 3 shards of one token each.
        let limiter = ShardedRateLimiter::with_clock(quota(3, 3), 4, ManualClock::new()).unwrap();
        assert_eq!(limiter.shards(), 3);
        assert!(
            limiter.try_acquire(2).unwrap_err().exceeds_capacity(),
            "a shard holds 1"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: crate::regressions_next_to_source(),
            ..ProptestConfig::default()
        })]

        /// Whatever the arrivals, the shards together admit no more than
        /// burst + rate × elapsed.
        #[test]
        fn never_admits_more_than_the_quota(
            per_second in 1u32..1_000,
            burst in 1u32..64,
            shards in 1usize..8,
            seq in prop::collection::vec((0u64..100, 1u32..3), 1..300),
        ) {
            let clock = ManualClock::new();
            let limiter = ShardedRateLimiter::with_clock(quota(per_second, burst), shards, clock.clone()).unwrap();
            let interval = Quota::new(Rate::per_second(per_second), burst).unwrap().interval().as_nanos() as u64;
            let mut admitted = 0u64;
            let mut elapsed = 0u64;
            for (gap_ms, cost) in seq {
                clock.advance(Duration::from_millis(gap_ms));
                elapsed += gap_ms * 1_000_000;
                if limiter.try_acquire(cost).is_ok() {
                    admitted += u64::from(cost);
                }
                prop_assert!(admitted <= u64::from(burst) + elapsed / interval,
                    "admitted {} after {} ns", admitted, elapsed);
            }
        }
    }
}

#[test]
fn quota_change_keeps_tokens_taken_as_documented() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(10, 10), clock);
    assert_eq!(limiter.try_acquire(4), Ok(6));
    limiter.set_quota(quota(10, 20));
    assert_eq!(limiter.available(), 16);
}

#[test]
fn intervals_round_up_so_the_rate_is_never_exceeded() {
    // 600 million a second does not divide a second into whole nanoseconds.
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(600_000_000, 1), clock.clone());
    let mut admitted = 0u64;
    for _ in 0..1_000_000 {
        clock.advance(Duration::from_nanos(1));
        admitted += u64::from(limiter.try_acquire(1).is_ok());
    }
    // One millisecond at 600 million a second: at most 600 000 (+ the burst of 1).
    assert!(admitted <= 600_001, "{admitted}");
}

#[cfg(feature = "metrics")]
#[test]
fn named_limiters_report_their_decisions() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use seawall::rate_limit::KeyedRateLimiter;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (global, keyed, sharded) = metrics::with_local_recorder(&recorder, || {
        (
            RateLimiter::builder(quota(1, 2))
                .clock(ManualClock::new())
                .name("global")
                .build(),
            KeyedRateLimiter::builder(quota(1, 1))
                .clock(ManualClock::new())
                .name("per-user")
                .build(),
            seawall::rate_limit::ShardedRateLimiter::builder(quota(1, 2))
                .shards(2)
                .clock(ManualClock::new())
                .name("sharded")
                .build()
                .unwrap(),
        )
    });
    assert_eq!(sharded.name(), Some("sharded"));
    for _ in 0..3 {
        let _ = sharded.try_acquire(1);
    }
    assert_eq!(global.name(), Some("global"));
    for _ in 0..3 {
        let _ = global.try_acquire(1);
    }
    let _ = keyed.try_acquire("ann", 1);
    let _ = keyed.try_acquire("ann", 1);
    let _ = keyed.try_acquire("bob", 1);
    let mut seen: Vec<(String, String, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let k = key.key();
            let label = |name: &str| {
                k.labels()
                    .find(|l| l.key() == name)
                    .map(|l| l.value().to_owned())
                    .unwrap()
            };
            (label("limiter"), label("decision"), value)
        })
        .collect();
    seen.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        seen,
        vec![
            ("global".into(), "admitted".into(), DebugValue::Counter(2)),
            ("global".into(), "refused".into(), DebugValue::Counter(1)),
            ("per-user".into(), "admitted".into(), DebugValue::Counter(2)),
            ("per-user".into(), "refused".into(), DebugValue::Counter(1)),
            ("sharded".into(), "admitted".into(), DebugValue::Counter(2)),
            ("sharded".into(), "refused".into(), DebugValue::Counter(1)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_wait_mode_serves_each_key_in_order_at_its_rate() {
    use seawall::rate_limit::KeyedRateLimitLayer;

    let served: Arc<parking_lot::Mutex<Vec<(String, u64)>>> = Arc::default();
    let start = Instant::now();
    let log = served.clone();
    let svc = ServiceBuilder::new()
        .layer(
            KeyedRateLimitLayer::new(quota(10, 1), |req: &(String, u32)| Some(req.0.clone()))
                .cost(|req: &(String, u32)| req.1)
                .wait(Duration::from_millis(450)),
        )
        .service_fn(move |req: (String, u32)| {
            let log = log.clone();
            async move {
                log.lock().push((req.0, start.elapsed().as_millis() as u64));
                Ok::<_, BoxError>(())
            }
        });
    // Six requests for ada, one for bob, arriving together.
    let mut tasks = Vec::new();
    for (user, cost) in [
        ("ada", 1),
        ("ada", 1),
        ("ada", 1),
        ("bob", 1),
        ("ada", 1),
        ("ada", 1),
        ("ada", 1),
    ] {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            s.ready().await?.call((user.to_string(), cost)).await
        }));
        tokio::task::yield_now().await;
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // ada's first now, then one every 100 ms: her sixth would wait 500 ms > 450 and is
    // refused with its retry_after.
    assert!(results[..6].iter().all(Result::is_ok));
    let e = results[6].as_ref().unwrap_err();
    let limited = e
        .downcast_ref::<seawall::rate_limit::RateLimited>()
        .expect("RateLimited");
    assert!(limited.retry_after().unwrap() > Duration::from_millis(450));
    let served = served.lock().clone();
    let ada: Vec<u64> = served
        .iter()
        .filter(|(u, _)| u == "ada")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(ada, vec![0, 100, 200, 300, 400]);
    let bob: Vec<u64> = served
        .iter()
        .filter(|(u, _)| u == "bob")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(
        bob,
        vec![0],
        "bob has his own bucket and does not wait behind ada"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_wait_hands_its_booking_back() {
    use seawall::rate_limit::KeyedRateLimitLayer;

    let layer = KeyedRateLimitLayer::new(quota(10, 1), |k: &&'static str| Some(*k))
        .wait(Duration::from_secs(1));
    let limiter = layer.limiter_handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|k: &'static str| async move { Ok::<_, BoxError>(k) });
    let start = Instant::now();
    svc.ready().await.unwrap().call("k").await.unwrap(); // the burst
    let booked = svc.ready().await.unwrap().call("k"); // due at 100 ms
    let later = svc.ready().await.unwrap().call("k"); // due at 200 ms
    // Dropped first, the earlier booking cannot hand back a slot the later one's turn
    // counts on (that turn would then find its token long refilled, and admit two at
    // once with a burst of one); the last booking hands its slot back whole.
    drop(booked);
    drop(later);
    svc.ready().await.unwrap().call("k").await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(200),
        "the later booking's slot, not 300 ms"
    );
    // Costs beyond the burst are refused at once, never booked.
    assert!(
        limiter
            .reserve(&"k", 2, Duration::from_secs(60))
            .unwrap_err()
            .exceeds_capacity()
    );
}

/// Stacked limits: a request refused by an inner limit gets the outer limit's tokens
/// back, so the outer bucket pays only for requests every limit admitted.
mod stacked {
    use super::*;
    use seawall::rate_limit::{KeyedRateLimitLayer, KeyedRateLimiter, Taken};

    #[tokio::test(start_paused = true)]
    async fn refusals_by_the_inner_layer_never_consume_the_outer() {
        let outer = RateLimitLayer::new(quota(1, 5));
        let outer_limiter = outer.limiter().clone();
        let inner = RateLimitLayer::new(quota(1, 1));
        let mut svc = ServiceBuilder::new()
            .layer(outer)
            .layer(inner)
            .service(echo());
        let mut admitted = 0;
        for i in 0..40 {
            match svc.ready().await.unwrap().call(i).await {
                Ok(_) => admitted += 1,
                Err(e) => assert_eq!(limited(e).limit(), 1, "refused by the inner layer"),
            }
        }
        assert_eq!(admitted, 1);
        assert_eq!(
            outer_limiter.available(),
            4,
            "the 39 refusals cost the outer nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_refused_per_key_leaves_the_global_bucket_to_the_others() {
        let global = RateLimitLayer::new(quota(1, 5));
        let global_limiter = global.limiter().clone();
        let mut svc = ServiceBuilder::new()
            .layer(global)
            .layer(KeyedRateLimitLayer::new(quota(1, 1), |client: &u32| {
                Some(*client)
            }))
            .service(echo());
        let mut admitted = 0;
        for _ in 0..40 {
            admitted += usize::from(svc.ready().await.unwrap().call(1).await.is_ok());
        }
        assert_eq!(admitted, 1);
        assert_eq!(global_limiter.available(), 4);
        for other in 2..6 {
            assert_eq!(svc.ready().await.unwrap().call(other).await.unwrap(), other);
        }
    }

    #[test]
    fn refunds_are_exact_and_bounded() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(quota(10, 4), clock.clone());
        let (_, taken) = limiter.take(3).unwrap();
        assert_eq!(limiter.available(), 1);
        limiter.refund(taken);
        assert_eq!(limiter.available(), 4, "all of it back");
        // Part of a take refilled since: only the rest comes back; never above burst.
        let (_, a) = limiter.take(2).unwrap();
        clock.advance(Duration::from_millis(100)); // one token refilled
        assert_eq!(limiter.available(), 3);
        limiter.refund(a);
        assert_eq!(limiter.available(), 4);
        // A take long refilled gives nothing back, even after another take.
        let (_, old) = limiter.take(1).unwrap();
        clock.advance(Duration::from_secs(1));
        let (_, _) = limiter.take(1).unwrap();
        limiter.refund(old);
        assert_eq!(limiter.available(), 3, "the second take stays paid");

        let keyed = KeyedRateLimiter::with_clock(quota(10, 4), clock.clone());
        let (_, taken) = keyed.take("k", 3).unwrap();
        assert_eq!(Taken::tokens(&taken), 3);
        keyed.refund("k", taken);
        assert_eq!(keyed.try_acquire("k", 4), Ok(0));
    }

    /// A receipt taken before the quota was raised was refunded in full after the raise,
    /// although under the new rate its tokens had long refilled: the bucket then admitted
    /// more than burst + rate × elapsed. Receipts from before a change are not refunded.
    #[test]
    fn a_refund_after_a_raised_rate_gives_back_no_tokens_already_refilled() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(quota(1, 10), clock.clone());
        // Ten tokens at one a second: the bucket owes ten seconds.
        let (_, early) = limiter.take(10).unwrap();
        // A thousand a second from now on: the debt is ten milliseconds.
        limiter.set_quota(quota(1_000, 10));
        clock.advance(Duration::from_millis(10));
        let mut admitted = 10u64;
        assert_eq!(limiter.try_acquire(10), Ok(0), "refilled at the new rate");
        admitted += 10;
        // The early take's tokens refilled (under the new rate) 10 ms ago: nothing of them
        // is owed any more, so nothing should come back.
        limiter.refund(early);
        admitted += u64::from(limiter.available());
        // Over 10 ms: the burst, plus 10 ms at 1000/s.
        let bound = 10 + 10;
        assert!(
            admitted <= bound,
            "{admitted} tokens handed out in 10 ms, at most {bound} allowed"
        );
    }

    /// A refund moves the arrival time back, and with it the debt of every take made after
    /// the refunded one. A later take's receipt still said where its debt ended before
    /// that move: refunded after some of it had refilled, it gave back what had refilled
    /// as well, and the bucket admitted more than burst + rate × elapsed (4 tokens within
    /// 100 ms with a burst of 3 at 2 a second).
    #[test]
    fn a_refund_after_an_earlier_takes_refund_gives_back_only_what_is_still_owed() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(quota(2, 3), clock.clone());
        let keyed = KeyedRateLimiter::with_clock(quota(2, 3), clock.clone());
        let (_, a) = limiter.take(2).unwrap();
        let (_, b) = limiter.take(1).unwrap();
        let (_, ka) = keyed.take("k", 2).unwrap();
        let (_, kb) = keyed.take("k", 1).unwrap();
        // The first take handed back: the second one's debt (500 ms) now runs from 0.
        limiter.refund(a);
        keyed.refund("k", ka);
        clock.advance(Duration::from_millis(400));
        limiter.take(2).unwrap();
        keyed.take("k", 2).unwrap();
        // 100 ms of the second take's debt is left: that much comes back, not 500 ms.
        limiter.refund(b);
        keyed.refund("k", kb);
        clock.advance(Duration::from_millis(100));
        // Two tokens at 400 ms, then over 100 ms: the burst (3) plus 0.2 allows one more.
        assert_eq!(limiter.available(), 1);
        assert!(limiter.take(2).is_err(), "4 tokens within 100 ms");
        assert!(
            keyed.take("k", 2).is_err(),
            "4 tokens within 100 ms, per key"
        );
        assert_eq!(keyed.try_acquire("k", 1), Ok(0));
    }

    /// One step: after `gap` quarters of the refill interval, take `cost` tokens, or
    /// (`refund`) hand back one of the takes not yet handed back (`which`), in any order.
    fn steps() -> impl Strategy<Value = Vec<(u64, u32, bool, prop::sample::Index)>> {
        prop::collection::vec(
            (
                0u64..4,
                0u32..4,
                any::<bool>(),
                any::<prop::sample::Index>(),
            ),
            1..300,
        )
    }

    /// The takes a run kept (taken and not handed back), by time: over every window
    /// between two of them, at most burst + rate × the window's length (the GCRA's bound,
    /// which refunds in any order must keep).
    fn check_windows(
        kept: &[(u64, u64, bool)],
        interval: u64,
        burst: u32,
    ) -> Result<(), TestCaseError> {
        let tau = u64::from(burst) * interval;
        for (i, &(from, _, _)) in kept.iter().enumerate() {
            let mut tokens = 0;
            for &(at, cost, refunded) in &kept[i..] {
                tokens += if refunded { 0 } else { cost };
                prop_assert!(
                    tokens * interval <= tau + (at - from),
                    "{} tokens kept from {} ns to {} ns",
                    tokens,
                    from,
                    at
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            // Rare interleavings (a refund out of order, after a partial refill, in a
            // drained bucket; a cancel ahead of two bookings): more cases than the
            // default 256.
            cases: 2_048,
            failure_persistence: crate::regressions_next_to_source(),
            ..ProptestConfig::default()
        })]

        /// Whatever the interleaving of takes and refunds, and whatever the order of the
        /// refunds, the tokens kept (taken and not handed back) never exceed burst + rate
        /// × elapsed over any window, and the bucket never holds more than its burst; per
        /// key as well.
        #[test]
        fn takes_and_refunds_never_admit_more_than_burst_plus_rate_times_elapsed(
            per_second in 1u32..1_000,
            burst in 1u32..8,
            seq in steps(),
        ) {
            let mut run = Ledger::new(per_second, burst);
            for (gap, cost, refund, which) in seq {
                run.advance(gap);
                if refund {
                    run.hand_back(which);
                } else {
                    run.take(cost);
                }
                prop_assert!(run.limiter.available() <= burst);
            }
            run.check_windows(burst)?;
        }

        /// As `takes_and_refunds_never_admit_more_than_burst_plus_rate_times_elapsed`,
        /// with bookings (`reserve`, the waiting layers) and their cancels among the takes
        /// and refunds, handed back in any order: the tokens kept, at the times they are
        /// due, never exceed burst + rate × elapsed over any window.
        #[test]
        fn takes_bookings_refunds_and_cancels_keep_the_bound(
            per_second in 1u32..1_000,
            burst in 1u32..8,
            seq in mixed_steps(),
        ) {
            let mut run = Ledger::new(per_second, burst);
            for (gap, cost, op, wait, which) in seq {
                run.advance(gap);
                match op {
                    0 => run.take(cost),
                    1 => run.reserve(cost, wait),
                    _ => run.hand_back(which),
                }
                prop_assert!(run.limiter.available() <= burst);
            }
            run.check_windows(burst)?;
        }
    }

    /// A receipt not handed back yet: a take's, or a booking's.
    enum Held {
        Taken(Taken),
        Booked(seawall::rate_limit::Reservation),
    }

    /// A limiter and a keyed one (one key) put through the same steps, with the takes
    /// and bookings each admitted: (when due, tokens, handed back), and the receipts not
    /// handed back yet (their place in the log).
    struct Ledger {
        clock: ManualClock,
        limiter: RateLimiter<ManualClock>,
        keyed: KeyedRateLimiter<String, ManualClock>,
        interval: u64,
        elapsed: u64,
        log: Vec<(u64, u64, bool)>,
        keyed_log: Vec<(u64, u64, bool)>,
        held: Vec<(usize, Held)>,
        keyed_held: Vec<(usize, Held)>,
    }

    impl Ledger {
        fn new(per_second: u32, burst: u32) -> Self {
            let clock = ManualClock::new();
            let limiter = RateLimiter::with_clock(quota(per_second, burst), clock.clone());
            let keyed = KeyedRateLimiter::with_clock(quota(per_second, burst), clock.clone());
            let interval = limiter.interval().as_nanos() as u64;
            Self {
                clock,
                limiter,
                keyed,
                interval,
                elapsed: 0,
                log: Vec::new(),
                keyed_log: Vec::new(),
                held: Vec::new(),
                keyed_held: Vec::new(),
            }
        }

        /// `quarters` of the refill interval pass.
        fn advance(&mut self, quarters: u64) {
            let gap = quarters * self.interval / 4;
            self.clock.advance(Duration::from_nanos(gap));
            self.elapsed += gap;
        }

        fn take(&mut self, cost: u32) {
            if let Ok((_, taken)) = self.limiter.take(cost) {
                self.held.push((self.log.len(), Held::Taken(taken)));
                self.log.push((self.elapsed, u64::from(cost), false));
            }
            if let Ok((_, taken)) = self.keyed.take("k", cost) {
                self.keyed_held
                    .push((self.keyed_log.len(), Held::Taken(taken)));
                self.keyed_log.push((self.elapsed, u64::from(cost), false));
            }
        }

        /// Books `cost` tokens due within `quarters` of the refill interval.
        fn reserve(&mut self, cost: u32, quarters: u64) {
            let max_wait = Duration::from_nanos(quarters * self.interval / 4);
            if let Ok(r) = self.limiter.reserve(cost, max_wait) {
                let due = self.elapsed + r.wait.as_nanos() as u64;
                self.held.push((self.log.len(), Held::Booked(r)));
                self.log.push((due, u64::from(cost), false));
            }
            if let Ok(r) = self.keyed.reserve("k", cost, max_wait) {
                let due = self.elapsed + r.wait.as_nanos() as u64;
                self.keyed_held
                    .push((self.keyed_log.len(), Held::Booked(r)));
                self.keyed_log.push((due, u64::from(cost), false));
            }
        }

        /// Hands back one of the receipts held (`which`), a take's or a booking's.
        fn hand_back(&mut self, which: prop::sample::Index) {
            if !self.held.is_empty() {
                let (at, receipt) = self.held.swap_remove(which.index(self.held.len()));
                self.log[at].2 = true;
                match receipt {
                    Held::Taken(t) => self.limiter.refund(t),
                    Held::Booked(r) => self.limiter.cancel(r),
                }
            }
            if !self.keyed_held.is_empty() {
                let n = which.index(self.keyed_held.len());
                let (at, receipt) = self.keyed_held.swap_remove(n);
                self.keyed_log[at].2 = true;
                match receipt {
                    Held::Taken(t) => self.keyed.refund("k", t),
                    Held::Booked(r) => self.keyed.cancel("k", r),
                }
            }
        }

        /// [`check_windows`] over both logs, in the order the tokens were due.
        fn check_windows(mut self, burst: u32) -> Result<(), TestCaseError> {
            self.log.sort_by_key(|e| e.0);
            self.keyed_log.sort_by_key(|e| e.0);
            check_windows(&self.log, self.interval, burst)?;
            check_windows(&self.keyed_log, self.interval, burst)
        }
    }

    /// Threads taking and refunding (in whatever order they interleave) on a clock that
    /// never moves: whatever the refunds hand back, the tokens kept never exceed the
    /// burst, per limiter and per key.
    #[test]
    fn threads_taking_and_refunding_never_keep_more_than_the_burst() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(quota(1, 64), clock.clone());
        let keyed = KeyedRateLimiter::with_clock(quota(1, 64), clock.clone());
        let kept = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4u64)
                .map(|t| {
                    let (limiter, keyed) = (&limiter, &keyed);
                    scope.spawn(move || {
                        let (mut kept, mut keyed_kept) = (0u64, 0u64);
                        let mut held = Vec::new();
                        let mut keyed_held = Vec::new();
                        for i in 0..20_000u64 {
                            let cost = ((i * 7 + t) % 3) as u32;
                            if let Ok((_, taken)) = limiter.take(cost) {
                                held.push(taken);
                            }
                            if let Ok((_, taken)) = keyed.take("k", cost) {
                                keyed_held.push(taken);
                            }
                            // Hand back about two in three, oldest or newest first.
                            if (i + t) % 3 != 0 {
                                let pick = |v: &mut Vec<Taken>| {
                                    if v.is_empty() {
                                        None
                                    } else if i % 2 == 0 {
                                        v.pop()
                                    } else {
                                        Some(v.remove(0))
                                    }
                                };
                                if let Some(taken) = pick(&mut held) {
                                    limiter.refund(taken);
                                }
                                if let Some(taken) = pick(&mut keyed_held) {
                                    keyed.refund("k", taken);
                                }
                            }
                        }
                        kept += held.iter().map(|t| u64::from(t.tokens())).sum::<u64>();
                        keyed_kept += keyed_held
                            .iter()
                            .map(|t| u64::from(t.tokens()))
                            .sum::<u64>();
                        (kept, keyed_kept)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        let (kept, keyed_kept) = kept;
        let left = u64::from(limiter.available());
        assert!(kept + left <= 64, "{kept} kept and {left} left, burst 64");
        let mut keyed_left = 0;
        while keyed.try_acquire("k", 1).is_ok() {
            keyed_left += 1;
        }
        assert!(
            keyed_kept + keyed_left <= 64,
            "{keyed_kept} kept and {keyed_left} left per key"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 1_024,
            failure_persistence: crate::regressions_next_to_source(),
            ..ProptestConfig::default()
        })]

        /// Quota changes up and down between takes (and bookings) and their refunds (and
        /// cancels), on a clock that never moves: the tokens kept at that instant never
        /// exceed the largest burst the limiter had, per limiter and per key.
        #[test]
        fn quota_changes_between_take_and_refund_never_exceed_the_burst(
            seq in prop::collection::vec(
                (
                    0u8..5,
                    0u32..5,
                    // Rates in simple ratios too, where a receipt's end from before a
                    // change can fall exactly where the rescaled debt ends.
                    prop_oneof![prop::sample::select(vec![1u32, 2, 4, 5, 10, 20, 40]), 1u32..2_000],
                    1u32..8,
                    any::<prop::sample::Index>(),
                ),
                1..120,
            ),
        ) {
            let clock = ManualClock::new();
            let limiter = RateLimiter::with_clock(quota(10, 4), clock.clone());
            let keyed = KeyedRateLimiter::with_clock(quota(10, 4), clock.clone());
            let max = Duration::from_secs(3600);
            let mut largest = 4u64;
            let mut held: Vec<(u64, Held)> = Vec::new();
            let mut keyed_held: Vec<(u64, Held)> = Vec::new();
            for (op, cost, per_second, burst, which) in seq {
                match op {
                    0 => {
                        if let Ok((_, t)) = limiter.take(cost) {
                            held.push((u64::from(cost), Held::Taken(t)));
                        }
                        if let Ok((_, t)) = keyed.take("k", cost) {
                            keyed_held.push((u64::from(cost), Held::Taken(t)));
                        }
                    }
                    1 => {
                        // Only a booking due now is kept at this instant.
                        if let Ok(r) = limiter.reserve(cost, max) {
                            held.push((if r.wait.is_zero() { u64::from(cost) } else { 0 }, Held::Booked(r)));
                        }
                        if let Ok(r) = keyed.reserve("k", cost, max) {
                            keyed_held.push((if r.wait.is_zero() { u64::from(cost) } else { 0 }, Held::Booked(r)));
                        }
                    }
                    2 => {
                        largest = largest.max(u64::from(burst));
                        limiter.set_quota(quota(per_second, burst));
                        if per_second % 2 == 0 {
                            keyed.set_default_quota(quota(per_second, burst));
                        } else {
                            keyed.set_quota_fn(move |_: &String| quota(per_second, burst));
                        }
                    }
                    _ => {
                        if !held.is_empty() {
                            match held.swap_remove(which.index(held.len())).1 {
                                Held::Taken(t) => limiter.refund(t),
                                Held::Booked(r) => limiter.cancel(r),
                            }
                        }
                        if !keyed_held.is_empty() {
                            match keyed_held.swap_remove(which.index(keyed_held.len())).1 {
                                Held::Taken(t) => keyed.refund("k", t),
                                Held::Booked(r) => keyed.cancel("k", r),
                            }
                        }
                    }
                }
                let kept: u64 = held.iter().map(|h| h.0).sum();
                let left = u64::from(limiter.available());
                prop_assert!(kept + left <= largest, "{} kept, {} left, largest burst {}", kept, left, largest);
            }
            let kept: u64 = keyed_held.iter().map(|h| h.0).sum();
            let mut left = 0u64;
            while keyed.try_acquire("k", 1).is_ok() {
                left += 1;
            }
            prop_assert!(kept + left <= largest, "per key: {} kept, {} left, largest burst {}", kept, left, largest);
        }
    }

    /// One step of `takes_bookings_refunds_and_cancels_keep_the_bound`: after `gap`
    /// quarters of the refill interval, take (`0`), book within `wait` quarters (`1`), or
    /// hand back one held receipt (`2`, `3`).
    fn mixed_steps() -> impl Strategy<Value = Vec<(u64, u32, u8, u64, prop::sample::Index)>> {
        prop::collection::vec(
            (
                0u64..4,
                0u32..4,
                0u8..4,
                0u64..16,
                any::<prop::sample::Index>(),
            ),
            1..200,
        )
    }
}

/// Issue 13, item 1: a request without a key is never silently unlimited.
#[tokio::test(start_paused = true)]
async fn a_keyed_layer_refuses_requests_without_a_key_unless_allowed() {
    use seawall::rate_limit::{KeyedRateLimitLayer, MissingKey, OnMissingKey};
    let key = |n: &u32| (*n != 0).then_some(*n);

    let mut strict = ServiceBuilder::new()
        .layer(KeyedRateLimitLayer::new(quota(1, 1), key))
        .service(echo());
    let err = strict.ready().await.unwrap().call(0).await.unwrap_err();
    assert!(err.is::<MissingKey>(), "{err}");
    assert_eq!(strict.ready().await.unwrap().call(7).await.unwrap(), 7);

    let mut waiting = ServiceBuilder::new()
        .layer(KeyedRateLimitLayer::new(quota(1, 1), key).wait(Duration::from_secs(1)))
        .service(echo());
    let err = waiting.ready().await.unwrap().call(0).await.unwrap_err();
    assert!(err.is::<MissingKey>(), "{err}");

    let mut lenient = ServiceBuilder::new()
        .layer(KeyedRateLimitLayer::new(quota(1, 1), key).on_missing_key(OnMissingKey::Allow))
        .service(echo());
    for _ in 0..3 {
        assert_eq!(lenient.ready().await.unwrap().call(0).await.unwrap(), 0);
    }
}

/// Issue 13, item 1: `OnMissingKey::Shared` limits every request without a key together, in
/// one bucket of the default quota, separate from every key's own bucket.
#[tokio::test(start_paused = true)]
async fn requests_without_a_key_can_share_one_bucket() {
    use seawall::rate_limit::{KeyedRateLimitLayer, OnMissingKey};
    let key = |n: &u32| (*n != 0).then_some(*n);

    for waiting in [false, true] {
        let layer = KeyedRateLimitLayer::new(quota(1, 2), key).on_missing_key(OnMissingKey::Shared);
        let mut svc: tower::util::BoxService<u32, u32, seawall::BoxError> = if waiting {
            tower::util::BoxService::new(
                ServiceBuilder::new()
                    .layer(layer.wait(Duration::from_secs(5)))
                    .service(echo()),
            )
        } else {
            tower::util::BoxService::new(ServiceBuilder::new().layer(layer).service(echo()))
        };
        // Two unkeyed requests fit the shared bucket (burst 2); the third is refused at
        // once, even by the waiting layer (the shared bucket does not queue).
        for _ in 0..2 {
            assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 0);
        }
        let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
        assert!(err.is::<RateLimited>(), "waiting={waiting}: {err}");
        // A keyed client is untouched by the unkeyed ones.
        assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);
        // The shared bucket refills at the quota's rate.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 0);
    }
}

/// `LimitLayer` over each kind of `Limit`: the one check-and-answer path of the tower
/// layers.
mod limit_layer {
    use super::*;
    use seawall::rate_limit::{
        Decision, KeyedRateLimiter, Limit, LimitLayer, MissingKey, OnMissingKey, PerKey,
        ShardedRateLimiter,
    };

    #[tokio::test(start_paused = true)]
    async fn a_sharded_limiter_behind_the_generic_layer_refuses_past_its_burst() {
        let limiter = ShardedRateLimiter::with_clock(quota(1, 4), 2, ManualClock::new()).unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(LimitLayer::new(limiter))
            .service(echo());
        for n in 0..4 {
            assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
        }
        let refused = limited(svc.ready().await.unwrap().call(4).await.unwrap_err());
        assert!(refused.retry_after().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_follows_on_missing_key_and_the_cost() {
        let keyed = |policy| {
            PerKey::new(KeyedRateLimiter::new(quota(1, 3)), |n: &u32| {
                (*n != 0).then_some(*n % 2)
            })
            .on_missing_key(policy)
        };
        // Two tokens a request: key 1 (odd numbers) admits one, then refuses.
        let mut svc = ServiceBuilder::new()
            .layer(LimitLayer::new(keyed(OnMissingKey::Reject)).cost(2))
            .service(echo());
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
        limited(svc.ready().await.unwrap().call(3).await.unwrap_err());
        assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 2);
        let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
        assert!(err.downcast_ref::<MissingKey>().is_some(), "{err}");

        let allow = keyed(OnMissingKey::Allow);
        for _ in 0..10 {
            assert!(matches!(allow.check(&0, 1), Decision::Unlimited));
        }
        let shared = keyed(OnMissingKey::Shared);
        assert!(matches!(shared.check(&0, 3), Decision::Admitted(_, None)));
        assert!(matches!(shared.check(&0, 1), Decision::Refused(_)));
        assert!(matches!(
            shared.check(&1, 1),
            Decision::Admitted(_, Some(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_absent_limit_is_no_limit() {
        let mut svc = ServiceBuilder::new()
            .layer(LimitLayer::new(None::<RateLimiter>))
            .service(echo());
        for n in 0..100 {
            assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outer_generic_layer_refunds_when_an_inner_limit_refuses() {
        let global = RateLimiter::new(quota(1, 10));
        let mut svc = ServiceBuilder::new()
            .layer(LimitLayer::new(global.clone()))
            .layer(LimitLayer::new(RateLimiter::new(quota(1, 1))))
            .service(echo());
        svc.ready().await.unwrap().call(1).await.unwrap();
        for _ in 0..5 {
            limited(svc.ready().await.unwrap().call(2).await.unwrap_err());
        }
        assert_eq!(
            global.available(),
            9,
            "only the admitted request was charged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_generic_waiting_layer_holds_a_local_limit_until_the_tokens_are_due() {
        let limiter = RateLimiter::new(quota(2, 1));
        let mut svc = ServiceBuilder::new()
            .layer(LimitLayer::new(limiter.clone()).wait(Duration::from_secs(1)))
            .service(echo());
        let start = Instant::now();
        for n in 0..3 {
            assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n);
        }
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "two waits of 500 ms"
        );

        // A wait beyond `max_wait` is refused at once, booking nothing.
        let mut short = ServiceBuilder::new()
            .layer(LimitLayer::new(limiter.clone()).wait(Duration::from_millis(100)))
            .service(echo());
        let refused = limited(short.ready().await.unwrap().call(9).await.unwrap_err());
        assert_eq!(refused.retry_after(), Some(Duration::from_millis(500)));

        // A booking dropped before its turn is handed back: the next caller waits only
        // for the token the dropped one would have used.
        let booked = svc.ready().await.unwrap().call(4);
        drop(booked);
        let start = Instant::now();
        svc.ready().await.unwrap().call(5).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
