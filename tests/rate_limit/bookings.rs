//! Bookings handed back after their turn give back only what has not refilled since (a
//! review found each handing back the whole booking again), and the longest quotas
//! accepted stay limited.
//! The keyed limiter's overflow bucket gives a key's own bucket nothing, and keeps its
//! level across default quota changes.

use std::time::Duration;

use seawall::BoxError;
use seawall::rate_limit::{
    LimitLayer, MAX_PERIOD, ManualClock, Quota, Rate, RateLimitLayer, RateLimiter,
};
use tokio::time::advance;
use tower::{Service, ServiceBuilder, ServiceExt};

fn quota(per_second: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_second(per_second), burst).unwrap()
}

fn echo() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send {
    tower::service_fn(|x: u32| async move { Ok::<_, BoxError>(x) })
}

/// `cancel` of a booking whose turn has passed gives back a token that time had already
/// refilled: two tokens at one instant from a bucket of one.
#[test]
fn a_booking_cancelled_after_its_turn_gives_back_nothing() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(1, 1), clock.clone());
    limiter.try_acquire(1).unwrap(); // the burst
    let booking = limiter.reserve(1, Duration::from_secs(10)).unwrap();
    assert_eq!(booking.wait, Duration::from_secs(1));
    clock.advance(Duration::from_secs(10)); // long past its turn: the bucket is full (1)
    limiter.try_acquire(1).unwrap(); // someone takes the one token
    limiter.cancel(booking); // the booking's holder gives up, late
    assert_eq!(limiter.available(), 0, "burst 1, one token just taken");
    assert!(
        limiter.try_acquire(1).is_err(),
        "a second token at the same instant"
    );
}

/// `RateLimit` in `Mode::Wait`: a service made ready (its booking `Reserved`, as a
/// ready-cache or balancer holds services) and dropped later hands back a token the bucket
/// had already refilled.
#[tokio::test(start_paused = true)]
async fn a_ready_service_dropped_late_gives_back_nothing() {
    let layer = RateLimitLayer::new(quota(1, 1)).wait_up_to(Duration::from_secs(10));
    let limiter = layer.limiter().clone();
    let mut idle = ServiceBuilder::new().layer(layer.clone()).service(echo());
    idle.ready().await.unwrap(); // books the one token, at once
    advance(Duration::from_secs(10)).await; // the bucket refills
    let mut other = ServiceBuilder::new().layer(layer).service(echo());
    other.ready().await.unwrap().call(1).await.unwrap(); // takes the refilled token
    drop(idle); // the ready service is dropped unused
    assert!(
        limiter.try_acquire(1).is_err(),
        "burst 1: a second token at the same instant"
    );
}

/// `LimitLayer::wait`: a `WaitFuture` dropped after its turn (never polled again) hands
/// back a token the bucket had already refilled.
#[tokio::test(start_paused = true)]
async fn a_wait_dropped_after_its_turn_gives_back_nothing() {
    let limiter = RateLimiter::new(quota(1, 1));
    let mut svc = ServiceBuilder::new()
        .layer(LimitLayer::new(limiter.clone()).wait(Duration::from_secs(10)))
        .service(echo());
    svc.ready().await.unwrap().call(0).await.unwrap(); // the burst
    let booked = svc.ready().await.unwrap().call(1); // booked for +1 s
    advance(Duration::from_secs(10)).await;
    assert!(limiter.try_acquire(1).is_ok(), "the refilled token");
    drop(booked);
    assert!(
        limiter.try_acquire(1).is_err(),
        "burst 1: a second token at the same instant"
    );
}

/// The longest refill a quota may have is a quarter of the clock's range: one token a
/// year with a burst of 584 (584 years, all of a `u64` of nanoseconds) was accepted, and
/// once the limiter's clock had run 344 days `now + burst × interval` saturated and every
/// request was admitted.
#[test]
fn the_longest_quota_accepted_stays_limited_for_its_clocks_range() {
    let yearly = Rate::new(1, MAX_PERIOD);
    assert!(Quota::new(yearly, 584).is_err(), "584 years to refill");
    let burst = (1..=584u32)
        .rev()
        .find(|&b| Quota::new(yearly, b).is_ok())
        .unwrap();
    assert!((140..=146).contains(&burst), "{burst}");
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(Quota::new(yearly, burst).unwrap(), clock.clone());
    // A century of the clock's time: the bucket, refilled, holds its burst and no more.
    clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
    let admitted = (0..10_000)
        .filter(|_| limiter.try_acquire(1).is_ok())
        .count();
    assert_eq!(admitted, burst as usize);
}

/// The same through the keyed waiting layer (`KeyedBooking`'s drop → `KeyedRateLimiter::cancel`).
#[tokio::test(start_paused = true)]
async fn a_keyed_wait_dropped_after_its_turn_gives_back_nothing() {
    use seawall::rate_limit::KeyedRateLimitLayer;

    let layer = KeyedRateLimitLayer::new(quota(1, 1), |k: &&'static str| Some(*k))
        .wait(Duration::from_secs(10));
    let limiter = layer.limiter_handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|k: &'static str| async move { Ok::<_, BoxError>(k) });
    svc.ready().await.unwrap().call("k").await.unwrap(); // the burst
    let booked = svc.ready().await.unwrap().call("k"); // booked for +1 s
    advance(Duration::from_secs(10)).await;
    assert!(limiter.try_acquire(&"k", 1).is_ok(), "the refilled token");
    drop(booked);
    assert!(
        limiter.try_acquire(&"k", 1).is_err(),
        "burst 1: a second token at the same instant"
    );
}

/// `RateLimiter::cancel` multiplies `tokens × interval` unchecked: a booking of 1000 tokens
/// (a weighted `Mode::Wait` layer) handed back after `set_quota` moved to a slow rate
/// overflows (a panic in the booking's `Drop` with overflow checks, a wrapped,
/// arbitrary credit without).
#[tokio::test(start_paused = true)]
async fn a_cancel_after_a_slower_quota_does_not_overflow() {
    let layer = RateLimitLayer::new(quota(1000, 1000))
        .wait_up_to(Duration::from_secs(10))
        .cost(1000u32);
    let limiter = layer.limiter().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service(echo());
    svc.ready().await.unwrap(); // books 1000 tokens (Reserved)
    limiter.set_quota(Quota::new(Rate::new(1, MAX_PERIOD), 1).unwrap());
    drop(svc); // hands the booking back: 1000 × 31_536_000_000_000_000 ns
    assert_eq!(limiter.available(), 0);
}

/// How far it goes: ten bookings handed back late, each after a take, admit eleven
/// tokens at one instant from a bucket of one.
#[test]
fn late_cancels_do_not_add_up() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(1, 1), clock.clone());
    limiter.try_acquire(1).unwrap();
    let bookings: Vec<_> = (0..10)
        .map(|_| limiter.reserve(1, Duration::from_secs(60)).unwrap())
        .collect();
    clock.advance(Duration::from_secs(100));
    let mut admitted = usize::from(limiter.try_acquire(1).is_ok());
    for booking in bookings {
        limiter.cancel(booking);
        admitted += usize::from(limiter.try_acquire(1).is_ok());
    }
    assert!(
        admitted <= 1,
        "admitted {admitted} at one instant from a bucket of 1"
    );
}

/// A keyed booking drawn from the overflow bucket (the table full) and cancelled after
/// the key got a bucket of its own handed the tokens back to that bucket, which had never
/// lent them: two tokens at one instant from a key's bucket of one.
#[test]
fn a_cancelled_overflow_booking_gives_the_keys_own_bucket_nothing() {
    use seawall::rate_limit::KeyedRateLimiter;

    let clock = ManualClock::new();
    let limiter: KeyedRateLimiter<String, ManualClock> =
        KeyedRateLimiter::with_clock(quota(1, 1), clock.clone());
    limiter.set_max_keys(1); // one bucket a shard
    // Every shard full of a bucket booked 3 s ahead (the keys past the table's room draw
    // from the overflow bucket, which books no waits: the first of them empties it).
    for i in 0..2_000 {
        for _ in 0..3 {
            let _ = limiter.reserve(format!("filler-{i}").as_str(), 1, Duration::from_secs(10));
        }
    }
    clock.advance(Duration::from_secs(1)); // the overflow bucket refills; the fillers owe
    // `a` has no bucket and no room: its booking is the overflow bucket's token.
    let booking = limiter
        .reserve("a", 1, Duration::from_secs(10))
        .expect("booked from the overflow bucket");
    assert_eq!(booking.wait, Duration::ZERO);
    // Room for `a`: it gets a bucket of its own and takes its one token.
    limiter.set_max_keys(limiter.capacity() * 2);
    limiter.try_acquire("a", 1).expect("a's own bucket, full");
    limiter.cancel("a", booking);
    assert!(
        limiter.try_acquire("a", 1).is_err(),
        "burst 1: a second token at the same instant, from the overflow booking's cancel"
    );
}

/// `set_default_quota` left the overflow bucket's debt in nanoseconds of the old rate: cut
/// from 1000/s to 1/s right after the bucket was emptied, it gave 999 tokens at once...
#[test]
fn the_shared_bucket_keeps_its_level_across_a_slower_default_quota() {
    use seawall::rate_limit::KeyedRateLimiter;

    let clock = ManualClock::new();
    let keyed: KeyedRateLimiter<String, _> =
        KeyedRateLimiter::with_clock(quota(1000, 1000), clock.clone());
    keyed.acquire_shared(1000).unwrap();
    keyed.set_default_quota(quota(1, 1000));
    let admitted = (0..2000)
        .filter(|_| keyed.acquire_shared(1).is_ok())
        .count();
    assert_eq!(admitted, 0, "right after taking all 1000");
    clock.advance(Duration::from_secs(1));
    assert!(keyed.acquire_shared(1).is_ok(), "one token a second now");
}

/// ...and raised from 1/min to 100/s, it stayed shut for the old debt (10 min) rather
/// than its 10 tokens at the new rate (0.1 s).
#[test]
fn a_faster_default_quota_does_not_leave_the_shared_bucket_shut() {
    use seawall::rate_limit::KeyedRateLimiter;

    let clock = ManualClock::new();
    let keyed: KeyedRateLimiter<String, _> = KeyedRateLimiter::with_clock(
        Quota::new(Rate::new(1, Duration::from_secs(60)), 10).unwrap(),
        clock.clone(),
    );
    keyed.acquire_shared(10).unwrap(); // 10 tokens owed: 10 min at 1/min
    keyed.set_default_quota(quota(100, 100)); // 10 tokens owed: 0.1 s
    clock.advance(Duration::from_secs(1));
    assert!(keyed.acquire_shared(1).is_ok());
}

/// Three waiters booked behind a drained bucket of 2 at 1/s: one token due at 1 s, two
/// at 3 s, one at 4 s. The first gives up (`cancel`). Bookings made after it keep their
/// turns and a cancel "hands back only as far as those turns allow" (`RateLimiter::
/// cancel`): the two tokens at 3 s and the one at 4 s are what burst + rate allow over
/// [3 s, 4 s], so the next token is due at 5 s. But the cancel stops only at the
/// highest of the bookings' own turn-plus-tokens (5 s for both), not at what they need
/// together (6 s): a new caller is booked at 4 s beside the third waiter, four tokens
/// within one second from a bucket of two.
#[test]
fn a_cancel_before_two_bookings_gives_away_neither_turn() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(quota(1, 2), clock.clone());
    let keyed = seawall::rate_limit::KeyedRateLimiter::with_clock(quota(1, 2), clock.clone());
    let max = Duration::from_secs(10);
    limiter.try_acquire(2).unwrap();
    keyed.try_acquire("k", 2).unwrap();
    let first = limiter.reserve(1, max).unwrap();
    let second = limiter.reserve(2, max).unwrap();
    let third = limiter.reserve(1, max).unwrap();
    let turns = [first.wait, second.wait, third.wait];
    assert_eq!(turns.map(|w| w.as_secs()), [1, 3, 4]);
    let keyed_first = keyed.reserve("k", 1, max).unwrap();
    let keyed_turns = [
        keyed.reserve("k", 2, max).unwrap().wait,
        keyed.reserve("k", 1, max).unwrap().wait,
    ];
    assert_eq!(keyed_turns.map(|w| w.as_secs()), [3, 4]);
    limiter.cancel(first);
    keyed.cancel("k", keyed_first);
    let late = limiter.reserve(1, max).unwrap();
    let keyed_late = keyed.reserve("k", 1, max).unwrap();
    assert!(
        late.wait >= Duration::from_secs(5),
        "booked at {:?}, beside the waiter at 4 s: 4 tokens in [3 s, 4 s] with a burst of 2",
        late.wait
    );
    assert!(
        keyed_late.wait >= Duration::from_secs(5),
        "per key: booked at {:?}",
        keyed_late.wait
    );
}

/// The same through `LimitLayer::wait`: the first waiter's client goes away (its future
/// dropped), and a request arriving then is served at 4 s, at the same instant as the
/// third waiter, the fourth token within [3 s, 4 s] from a bucket of two.
#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_before_two_others_gives_away_neither_turn() {
    use std::sync::{Arc, Mutex};
    let limiter = RateLimiter::new(quota(1, 2));
    let served: Arc<Mutex<Vec<(u32, Duration)>>> = Arc::default();
    let start = tokio::time::Instant::now();
    let log = served.clone();
    let svc = ServiceBuilder::new()
        .layer(
            LimitLayer::new(limiter)
                .cost(|n: &u32| *n % 10)
                .wait(Duration::from_secs(10)),
        )
        .service_fn(move |n: u32| {
            log.lock().unwrap().push((n, start.elapsed()));
            async move { Ok::<_, BoxError>(n) }
        });
    svc.clone().oneshot(2).await.unwrap(); // the burst, at 0
    let mut first = Box::pin(svc.clone().oneshot(1));
    assert!(futures::poll!(&mut first).is_pending());
    let second = tokio::spawn(svc.clone().oneshot(12));
    let third = tokio::spawn(svc.clone().oneshot(21));
    tokio::task::yield_now().await;
    drop(first); // its client went away
    let late = tokio::spawn(svc.clone().oneshot(31));
    for task in [second, third, late] {
        task.await.unwrap().unwrap();
    }
    let served = served.lock().unwrap().clone();
    let at = |n: u32| served.iter().find(|s| s.0 == n).unwrap().1;
    assert_eq!(at(12), Duration::from_secs(3));
    assert_eq!(at(21), Duration::from_secs(4));
    assert!(
        at(31) >= Duration::from_secs(5),
        "served at {:?}: 2 + 1 + 1 tokens within [3 s, 4 s] from a bucket of 2 ({served:?})",
        at(31)
    );
}
