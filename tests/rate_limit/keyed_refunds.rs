//! Review of the keyed limiter's refunds and cancels: what the single bucket's fixes
//! (`RateLimiter::refund` stopping at the turns booked after it, and refusing receipts
//! from before a quota change) must also hold per key.

use std::time::Duration;

use seawall::BoxError;
use seawall::rate_limit::{KeyedRateLimitLayer, KeyedRateLimiter, ManualClock, Quota, Rate};
use tower::{ServiceBuilder, ServiceExt};

fn quota(per_second: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_second(per_second), burst).unwrap()
}

/// As `a_refund_after_a_raised_rate_gives_back_no_tokens_already_refilled`, per key: a
/// receipt taken before `set_default_quota` raised the rate is refunded after the raise,
/// in the old quota's units, though under the new rate its tokens have long refilled.
#[test]
fn keyed_refund_after_a_raised_default_quota_gives_back_no_tokens_already_refilled() {
    let clock = ManualClock::new();
    let limiter: KeyedRateLimiter<String, ManualClock> =
        KeyedRateLimiter::with_clock(quota(1, 10), clock.clone());
    // Ten tokens at one a second: the key's bucket owes ten seconds.
    let (_, early) = limiter.take("k", 10).unwrap();
    // A thousand a second from now on: the debt is ten milliseconds.
    limiter.set_default_quota(quota(1_000, 10));
    clock.advance(Duration::from_millis(10));
    let mut admitted = 10u64;
    assert_eq!(
        limiter.try_acquire("k", 10),
        Ok(0),
        "refilled at the new rate"
    );
    admitted += 10;
    // The early take's tokens refilled (under the new rate) 10 ms ago: nothing is owed.
    limiter.refund("k", early);
    while limiter.try_acquire("k", 1).is_ok() {
        admitted += 1;
    }
    // Over 10 ms: the burst, plus 10 ms at 1000/s.
    let bound = 10 + 10;
    assert!(
        admitted <= bound,
        "{admitted} tokens handed out to one key in 10 ms, at most {bound} allowed"
    );
}

/// As `a_dropped_waiter_does_not_let_the_next_one_double_the_burst`, through the keyed
/// waiting layer: a waiter that gives up (its future dropped: `KeyedRateLimiter::cancel`)
/// moves the key's arrival time back by its tokens, while the waiter booked behind it
/// keeps its later turn; at that turn the bucket counts the patient waiter's token as
/// refilled, and admits a second request at the same instant with a burst of 1.
#[tokio::test(start_paused = true)]
async fn keyed_dropped_waiter_does_not_let_the_next_one_double_the_burst() {
    let layer =
        KeyedRateLimitLayer::new(quota(1, 1), |k: &u32| Some(*k)).wait(Duration::from_secs(10));
    let limiter = layer.limiter_handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|k: u32| async move { Ok::<_, BoxError>(k) });
    // The burst, at 0.
    svc.clone().oneshot(7).await.unwrap();
    // A waiter books the token due at +1 s, then gives up after 10 ms (still booked
    // until its future is dropped).
    let mut quitter = Box::pin(svc.clone().oneshot(7));
    let attempt = tokio::time::timeout(Duration::from_millis(10), &mut quitter).await;
    assert!(attempt.is_err(), "still waiting");
    // Another books the next one, due at +2 s, and waits for it.
    let patient = svc.clone().oneshot(7);
    let mut waiting = Box::pin(async move {
        patient.await.unwrap();
        limiter.try_acquire(&7, 1)
    });
    let booked = tokio::time::timeout(Duration::from_millis(1), &mut waiting).await;
    assert!(booked.is_err(), "booked, waiting for its turn");
    drop(quitter);
    // At the patient waiter's turn the key's bucket of one has just been emptied by it.
    let beside = waiting.await;
    assert!(
        beside.is_err(),
        "a second token for the key at the same instant, with a burst of 1: {beside:?}"
    );
}

/// A sharded limiter behind a layer reports the whole limiter's capacity (`limit`, the
/// `q` the HTTP layers announce: 200 here), but refuses for good, as costing more than
/// that capacity, any request above one shard's burst (50): "request costs 60 tokens,
/// more than the rate limit's capacity of 200", and no `Retry-After`. A client sizing its
/// requests by the announced capacity is refused for ever, told something false. A
/// refusal as exceeding the capacity must name a capacity the cost really exceeds (or the
/// request, within it, be admitted from a full limiter).
#[test]
fn sharded_refusal_never_says_a_cost_within_its_capacity_exceeds_it() {
    use seawall::rate_limit::{Decision, Limit, ShardedRateLimiter};
    let limiter = ShardedRateLimiter::with_clock(quota(1000, 200), 4, ManualClock::new()).unwrap();
    // A full limiter; 60 tokens are within the capacity it announces.
    match Limit::<()>::check(&limiter, &(), 60) {
        Decision::Admitted(..) => {}
        Decision::Refused(refused) => assert!(
            !refused.exceeds_capacity() || refused.limit() < 60,
            "refused for good by a full limiter announcing a capacity of {}: {refused}",
            refused.limit()
        ),
        other => panic!("unexpected decision {other:?}"),
    }
}

/// A receipt taken before `set_default_quota` raised the rate, refunded after it. The
/// change rescaled the key's debt (ten seconds at 1/s, five at 2/s) and marked where it
/// stood (ten seconds): the doc of `KeyedRateLimiter::refund` says such a take "is not
/// refunded further than the bucket's arrival time at the change". But the fifth take's
/// receipt ends (five seconds, in the old units) exactly where the rescaled debt ends,
/// so the refund took it for the key's last take and gave it back, 500 ms below the
/// rescaled debt (and 5.5 s below the mark): the key then had 11 tokens at one instant
/// with a burst of 10 (`RateLimiter::refund` refuses such a receipt).
#[test]
fn keyed_refund_from_before_a_raise_is_not_taken_for_the_last_take() {
    let clock = ManualClock::new();
    let limiter: KeyedRateLimiter<String, ManualClock> =
        KeyedRateLimiter::with_clock(quota(1, 10), clock.clone());
    let receipts: Vec<_> = (0..10).map(|_| limiter.take("k", 1).unwrap().1).collect();
    // Twice the rate, same burst: the key's ten tokens stay taken.
    limiter.set_default_quota(quota(2, 10));
    assert!(limiter.try_acquire("k", 1).is_err(), "still empty");
    let fifth = receipts.into_iter().nth(4).unwrap();
    limiter.refund("k", fifth);
    let mut admitted = 10;
    while limiter.try_acquire("k", 1).is_ok() {
        admitted += 1;
    }
    assert!(
        admitted <= 10,
        "{admitted} tokens for one key at one instant, with a burst of 10"
    );
}
