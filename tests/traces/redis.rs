//! The Redis limiter failing open is logged (throttled) from the first check Redis could
//! not answer, against a real `redis-server` killed under it.

use std::time::Duration;

use seawall::rate_limit::redis::{RedisRateLimiter, Source};
use seawall::rate_limit::{Quota, Rate};

use crate::redis_server::{RedisServer, checks_by_source};

fn quota(per_minute: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_minute(per_minute), burst).unwrap()
}

/// With `FailurePolicy::FailOpen`, a check Redis cannot answer is admitted by the local
/// share. Only the breaker's state changes were logged: the checks that failed before it
/// opened (up to 10 with the defaults, many more under a slow Redis or a breaker that
/// needs more calls) admitted requests unchecked without a line of their own. Every
/// decision of the local share is now logged, throttled: the first at once, then at most
/// a line every 10 s with how many were admitted meanwhile; and counted, under
/// `source="local"`, before the breaker opens as after.
#[tokio::test]
async fn failing_open_is_logged_and_counted_from_the_first_failed_check() {
    let recorded = crate::recorded();
    use metrics_util::debugging::DebuggingRecorder;
    use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow, State};
    use seawall::rate_limit::redis::FailurePolicy;

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let limiter = metrics::with_local_recorder(&recorder, || {
        RedisRateLimiter::builder(redis.url(), quota(60_000, 1000))
            .name("fail-open")
            .prefix("fail-open")
            .timeout(Duration::from_millis(500))
            .failure_policy(FailurePolicy::FailOpen {
                local_share: quota(60_000, 1000),
            })
            // The defaults' window, and an open wait no probe comes within.
            .breaker(
                CircuitBreakerConfig::builder()
                    .name("fail-open-redis")
                    .sliding_window(SlidingWindow::count_based(20))
                    .minimum_calls(10)
                    .failure_rate_threshold(0.5)
                    .wait_in_open(Duration::from_secs(600))
                    .permitted_calls_in_half_open(1)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    });
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Redis);
    let _ = checks_by_source(&snapshotter);
    drop(redis); // killed

    let warnings = || -> Vec<String> {
        let events = recorded.events.lock().unwrap();
        let ours = events
            .iter()
            .filter(|l| l.contains("failing open") && l.contains("limiter=\"fail-open\""));
        ours.cloned().collect()
    };
    // The first failed check: the breaker is still closed.
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Local);
    assert_eq!(limiter.breaker().state(), State::Closed);
    assert_eq!(warnings().len(), 1, "{:?}", recorded.events.lock().unwrap());
    let first = &warnings()[0];
    assert!(first.starts_with("WARN"), "{first}");
    assert!(first.contains("limiter=\"fail-open\""), "{first}");
    assert!(first.contains("admitted_unchecked=1"), "{first}");
    // Until the breaker opens, then while it is open: no line each.
    for _ in 0..29 {
        assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Local);
    }
    assert_eq!(limiter.breaker().state(), State::Open);
    assert_eq!(warnings().len(), 1, "{:?}", warnings());
    assert_eq!(
        checks_by_source(&snapshotter),
        [("local".to_owned(), 30)].into()
    );
    // The interval later, the next one is a line, with the 29 admitted meanwhile.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Local);
    assert_eq!(warnings().len(), 2, "{:?}", warnings());
    let second = &warnings()[1];
    assert!(
        second.contains("checks=30") && second.contains("admitted_unchecked=30"),
        "{second}"
    );
}

/// With `FailurePolicy::FailClosed` (the default), a check Redis cannot answer is
/// refused: counted under `source="unavailable"`, and logged as failing open is. Before,
/// not a line: an outage refused every request and the logs never said why.
#[tokio::test]
async fn failing_closed_is_logged_from_the_first_failed_check() {
    use seawall::rate_limit::redis::RedisLimitError;

    let recorded = crate::recorded();
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = RedisRateLimiter::builder(redis.url(), quota(60_000, 1000))
        .name("fail-closed")
        .prefix("fail-closed")
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Redis);
    drop(redis); // killed

    let warnings = || -> Vec<String> {
        let events = recorded.events.lock().unwrap();
        let ours = events
            .iter()
            .filter(|l| l.contains("failing closed") && l.contains("limiter=\"fail-closed\""));
        ours.cloned().collect()
    };
    let refused = |r: Result<_, RedisLimitError>| matches!(r, Err(RedisLimitError::Unavailable(_)));
    assert!(refused(limiter.acquire("k", 1).await));
    assert_eq!(warnings().len(), 1, "{:?}", recorded.events.lock().unwrap());
    let first = &warnings()[0];
    assert!(
        first.starts_with("WARN") && first.contains("checks=1"),
        "{first}"
    );
    // Throttled: no line each.
    for _ in 0..19 {
        assert!(refused(limiter.acquire("k", 1).await));
    }
    assert_eq!(warnings().len(), 1, "{:?}", warnings());
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(refused(limiter.acquire("k", 1).await));
    assert_eq!(warnings().len(), 2, "{:?}", warnings());
    assert!(warnings()[1].contains("checks=20"), "{:?}", warnings());
}
