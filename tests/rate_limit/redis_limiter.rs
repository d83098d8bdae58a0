//! The Redis-backed limiter against a real `redis-server` on a free loopback port
//! (`.ci/run` installs it). Time here is real, since Redis is: only upper bounds are
//! asserted.

use std::time::Duration;

use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow, State};
use seawall::rate_limit::redis::{FailurePolicy, RedisLimitError, RedisRateLimiter, Source};
use seawall::rate_limit::{Quota, Rate};
use tokio::time::Instant;

use crate::redis_server::RedisServer;

fn quota(per_minute: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_minute(per_minute), burst).unwrap()
}

/// A breaker that opens after two failures and probes again after 200 ms.
fn quick_breaker() -> CircuitBreakerConfig {
    CircuitBreakerConfig::builder()
        .name("redis-test")
        .sliding_window(SlidingWindow::count_based(2))
        .minimum_calls(2)
        .wait_in_open(Duration::from_millis(200))
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap()
}

#[tokio::test]
async fn replicas_share_one_limit() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let replicas: Vec<RedisRateLimiter> = (0..3)
        .map(|_| {
            RedisRateLimiter::builder(redis.url(), quota(10, 10))
                .prefix("shared")
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap()
        })
        .collect();
    let mut admitted = 0;
    for i in 0..30 {
        match replicas[i % 3].acquire("customer", 1).await {
            Ok((a, Source::Redis)) => {
                admitted += 1;
                assert_eq!(a.limit, 10);
            }
            Ok((_, Source::Local | Source::Batch)) => panic!("Redis is up, no batching"),
            Err(RedisLimitError::Limited(r)) => {
                assert!(r.retry_after().unwrap() <= Duration::from_secs(6), "{r}");
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(admitted, 10, "three replicas, one bucket of 10");
    // Another key has its own bucket.
    assert!(replicas[0].acquire("other", 10).await.is_ok());
}

/// A limiter of `quota` kept in `redis` that fails open to a local share of burst 2 (60 a
/// minute), each check within 200 ms, behind [`quick_breaker`].
fn failing_open(redis: &RedisServer, prefix: &str, quota: Quota) -> RedisRateLimiter {
    RedisRateLimiter::builder(redis.url(), quota)
        .prefix(prefix)
        .timeout(Duration::from_millis(200))
        .failure_policy(FailurePolicy::FailOpen {
            local_share: self::quota(60, 2),
        })
        .breaker(quick_breaker())
        .build()
        .unwrap()
}

#[tokio::test]
async fn redis_down_applies_the_policy_fast_and_recovers_when_it_returns() {
    let port = RedisServer::free_port();
    let redis = RedisServer::start(port).await;
    let open = failing_open(&redis, "policy", quota(60, 60));
    let closed = RedisRateLimiter::builder(redis.url(), quota(60, 60))
        .prefix("policy")
        .timeout(Duration::from_millis(200))
        .breaker(quick_breaker())
        .build()
        .unwrap();
    assert_eq!(open.acquire("k", 1).await.unwrap().1, Source::Redis);
    assert_eq!(closed.acquire("k", 1).await.unwrap().1, Source::Redis);

    drop(redis); // killed mid-test

    // Fail open: this replica's local share (burst 2), each answer within the timeout.
    let mut local = 0;
    for _ in 0..4 {
        let started = Instant::now();
        match open.acquire("k", 1).await {
            Ok((_, Source::Local)) => local += 1,
            Ok((_, Source::Redis | Source::Batch)) => panic!("Redis is down, no batching"),
            Err(RedisLimitError::Limited(_)) => {}
            Err(e) => panic!("fail-open must not fail: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no call hangs past its timeout"
        );
    }
    assert_eq!(local, 2, "the local share holds");
    // The breaker opened: Redis is no longer tried on every call.
    assert_eq!(open.breaker().state(), State::Open);

    // Fail closed: refused, with the cause.
    for _ in 0..3 {
        let started = Instant::now();
        match closed.acquire("k", 1).await {
            Err(RedisLimitError::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    // Redis comes back on the same port: distributed limiting resumes by itself.
    let _redis = RedisServer::start(port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((_, Source::Redis)) = open.acquire("k2", 1).await {
            break;
        }
        assert!(Instant::now() < deadline, "did not resume within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        if let Ok((_, Source::Redis)) = closed.acquire("k3", 1).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fail-closed limiter did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Failing open, a request for more tokens than the local share's burst but no more than
/// the quota's was refused as never admissible (`exceeds_capacity`, no `retry_after`: an
/// HTTP layer's `429` without `Retry-After`), though Redis admits it as soon as it is
/// back. It is refused until the breaker guarding Redis lets a check through again.
#[tokio::test]
async fn redis_down_refuses_a_request_only_redis_can_admit_for_a_while_not_for_ever() {
    let port = RedisServer::free_port();
    let redis = RedisServer::start(port).await;
    let limiter = failing_open(&redis, "share", quota(60, 10));
    assert_eq!(limiter.acquire("big", 5).await.unwrap().1, Source::Redis);

    drop(redis); // killed
    for _ in 0..4 {
        match limiter.acquire("big", 5).await {
            Err(RedisLimitError::Limited(refused)) => {
                assert!(!refused.exceeds_capacity(), "never admissible? {refused:?}");
                let wait = refused.retry_after().expect("a wait");
                assert!(
                    wait > Duration::ZERO && wait <= Duration::from_secs(1),
                    "{wait:?}"
                );
                assert_eq!(refused.limit(), 10, "the quota's burst");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(limiter.breaker().state(), State::Open);
    // A request over the quota's burst stays never admissible.
    match limiter.acquire("big", 11).await {
        Err(RedisLimitError::Limited(refused)) => assert!(refused.exceeds_capacity()),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The local share still serves what it can hold.
    assert_eq!(limiter.acquire("small", 2).await.unwrap().1, Source::Local);

    // Redis is back: the same request is admitted.
    let _redis = RedisServer::start(port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match limiter.acquire("big", 5).await {
            Ok((_, Source::Redis)) => break,
            Err(RedisLimitError::Limited(refused)) => {
                assert!(!refused.exceeds_capacity(), "{refused:?}");
                let wait = refused.retry_after().expect("a wait");
                tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
            }
            other => panic!("unexpected: {other:?}"),
        }
        assert!(Instant::now() < deadline, "not admitted within 10 s");
    }
}

#[test]
fn bad_settings_are_typed_errors() {
    assert!(
        RedisRateLimiter::builder("not a url", quota(1, 1))
            .build()
            .is_err()
    );
    assert!(
        RedisRateLimiter::builder("redis://127.0.0.1:1/", quota(1, 1))
            .timeout(Duration::ZERO)
            .build()
            .is_err()
    );
}

#[tokio::test]
async fn batching_cuts_round_trips_and_never_over_admits() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let replicas: Vec<RedisRateLimiter> = (0..3)
        .map(|_| {
            RedisRateLimiter::builder(redis.url(), quota(20, 20))
                .prefix("batched")
                .timeout(Duration::from_secs(1))
                .batch(4, Duration::from_secs(60))
                .build()
                .unwrap()
        })
        .collect();
    let (mut from_redis, mut from_batch) = (0, 0);
    for i in 0..60 {
        match replicas[i % 3].acquire("customer", 1).await {
            Ok((_, Source::Redis)) => from_redis += 1,
            Ok((_, Source::Batch)) => from_batch += 1,
            Ok((_, Source::Local)) => panic!("Redis is up"),
            Err(RedisLimitError::Limited(_)) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(
        from_redis + from_batch <= 20,
        "never more than the shared limit"
    );
    assert!(
        from_batch > from_redis,
        "most checks served without a round trip"
    );
    // Accuracy cost: tokens held by one replica are not available to the others, so the
    // fleet may admit a little less than the limit, never more.
    assert!(
        from_redis + from_batch >= 20 - 3 * 3,
        "at most size - 1 per replica left unused"
    );
}

#[tokio::test]
async fn the_layer_refuses_without_calling_the_service() {
    use seawall::rate_limit::redis::RedisRateLimitLayer;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tower::{Service, ServiceBuilder, ServiceExt};

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = RedisRateLimiter::builder(redis.url(), quota(2, 2))
        .prefix("layer")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut svc = ServiceBuilder::new()
        .layer(RedisRateLimitLayer::new(limiter.per_key(
            |tenant: &&'static str| (!tenant.is_empty()).then_some(*tenant),
        )))
        .service_fn(move |tenant: &'static str| {
            counter.fetch_add(1, SeqCst);
            async move { Ok::<_, seawall::BoxError>(tenant) }
        });
    assert_eq!(
        svc.ready().await.unwrap().call("acme").await.unwrap(),
        "acme"
    );
    assert_eq!(
        svc.ready().await.unwrap().call("acme").await.unwrap(),
        "acme"
    );
    let err = svc.ready().await.unwrap().call("acme").await.unwrap_err();
    // The generic layer's refusal: a `RateLimited`, as for every other limit.
    assert!(
        err.downcast_ref::<seawall::rate_limit::RateLimited>()
            .is_some(),
        "{err}"
    );
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the refused request did not reach the service"
    );
}

#[tokio::test]
async fn the_layer_never_lets_a_request_without_a_key_pass_silently() {
    use seawall::rate_limit::redis::RedisRateLimitLayer;
    use seawall::rate_limit::{MissingKey, OnMissingKey};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tower::{Service, ServiceBuilder, ServiceExt};

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let service = |policy: Option<OnMissingKey>, prefix: &str| {
        let limiter = RedisRateLimiter::builder(redis.url(), quota(2, 2))
            .prefix(prefix)
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let mut layer = RedisRateLimitLayer::new(
            limiter.per_key(|tenant: &&'static str| (!tenant.is_empty()).then_some(*tenant)),
        );
        if let Some(policy) = policy {
            layer = layer.on_missing_key(policy);
        }
        let counter = calls.clone();
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |tenant: &'static str| {
                counter.fetch_add(1, SeqCst);
                async move { Ok::<_, seawall::BoxError>(tenant) }
            })
    };

    // By default a request without a key fails with `MissingKey`, before the service.
    let mut svc = service(None, "missing-default");
    let err = svc.ready().await.unwrap().call("").await.unwrap_err();
    assert!(err.downcast_ref::<MissingKey>().is_some(), "{err}");
    assert_eq!(calls.load(SeqCst), 0, "refused before the service");

    // Shared: every request without a key draws from one bucket (of 2 here).
    let mut svc = service(Some(OnMissingKey::Shared), "missing-shared");
    svc.ready().await.unwrap().call("").await.unwrap();
    svc.ready().await.unwrap().call("").await.unwrap();
    let err = svc.ready().await.unwrap().call("").await.unwrap_err();
    assert!(
        err.downcast_ref::<seawall::rate_limit::RateLimited>()
            .is_some(),
        "{err}"
    );
    assert_eq!(calls.load(SeqCst), 2);
    // ...apart from the keyed requests' buckets.
    svc.ready().await.unwrap().call("acme").await.unwrap();

    // Allow, asked for: unlimited by this layer.
    let mut svc = service(Some(OnMissingKey::Allow), "missing-allow");
    for _ in 0..5 {
        svc.ready().await.unwrap().call("").await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 3 + 5);
}

#[tokio::test]
async fn fail_open_shares_are_per_key_and_oversized_requests_never_reach_redis() {
    // Nothing listens on this port: Redis is down from the start.
    let url = format!("redis://127.0.0.1:{}/", RedisServer::free_port());
    let limiter = RedisRateLimiter::builder(url, quota(60, 10))
        .timeout(Duration::from_millis(100))
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(60, 1),
        })
        .breaker(quick_breaker())
        .build()
        .unwrap();
    assert_eq!(limiter.acquire("a", 1).await.unwrap().1, Source::Local);
    assert!(limiter.acquire("a", 1).await.is_err(), "a's share is spent");
    assert_eq!(
        limiter.acquire("b", 1).await.unwrap().1,
        Source::Local,
        "b has its own share"
    );
    match limiter.acquire("c", 11).await {
        Err(RedisLimitError::Limited(r)) => assert!(r.exceeds_capacity()),
        other => panic!("expected a capacity refusal, got {other:?}"),
    }
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn a_named_limiter_reports_decisions_and_where_they_were_answered() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let limiter = metrics::with_local_recorder(&recorder, || {
        RedisRateLimiter::builder(redis.url(), quota(10, 3))
            .name("partner-api")
            .prefix("named")
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    assert_eq!(limiter.name(), Some("partner-api"));
    for _ in 0..4 {
        let _ = limiter.acquire("k", 1).await;
    }
    let mut seen: Vec<(String, String, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, value)| {
            // The breaker guarding Redis reports too; only the limiter's figures here.
            key.key().name().starts_with("seawall_rate_limit") && *value != DebugValue::Counter(0)
        })
        .map(|(key, _, _, value)| {
            let k = key.key();
            let label = |name: &str| {
                k.labels()
                    .find(|l| l.key() == name)
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default()
            };
            (
                k.name().to_owned(),
                format!("{}{}", label("decision"), label("source")),
                value,
            )
        })
        .collect();
    seen.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        seen,
        vec![
            (
                "seawall_rate_limit_decisions_total".into(),
                "admitted".into(),
                DebugValue::Counter(3)
            ),
            (
                "seawall_rate_limit_decisions_total".into(),
                "refused".into(),
                DebugValue::Counter(1)
            ),
            (
                "seawall_rate_limit_redis_checks_total".into(),
                "redis".into(),
                DebugValue::Counter(4)
            ),
        ]
    );
}

#[cfg(feature = "http")]
/// One call on a ready service, which must succeed.
async fn ask<S: tower::Service<R>, R>(svc: &mut S, request: R) -> S::Response
where
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    svc.ready().await.unwrap().call(request).await.unwrap()
}

#[cfg(feature = "http")]
#[tokio::test]
async fn the_http_layer_answers_429_with_headers_for_the_fleet_and_503_when_redis_is_gone() {
    use seawall::rate_limit::http::{HeaderKey, HttpRedisRateLimitLayer};
    use tower::{Layer, Service, ServiceExt};

    let redis = RedisServer::start(RedisServer::free_port()).await;
    // The layer, keyed on `x-api-key`, over a service answering "hello".
    let over_hello = |limiter: RedisRateLimiter,
                      configure: fn(
        HttpRedisRateLimitLayer<HeaderKey>,
    ) -> HttpRedisRateLimitLayer<HeaderKey>| {
        configure(HttpRedisRateLimitLayer::new(
            limiter.per_key(HeaderKey(http::HeaderName::from_static("x-api-key"))),
        ))
        .layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
        }))
    };
    let make = |url: String| {
        let limiter = RedisRateLimiter::builder(url, quota(60, 2))
            .prefix("http")
            .timeout(Duration::from_millis(300))
            .breaker(quick_breaker())
            .build()
            .unwrap();
        over_hello(limiter, |l| l.name("per-key").legacy_headers(true))
    };
    // Two replicas, one limit of 2 per key.
    let mut replicas = [make(redis.url()), make(redis.url())];
    let request = |key: &str| {
        http::Request::builder()
            .header("x-api-key", key)
            .body(())
            .unwrap()
    };
    let mut statuses = Vec::new();
    for i in 0..3 {
        let svc = &mut replicas[i % 2];
        let response = ask(svc, request("k1")).await;
        statuses.push(response.status().as_u16());
        let h = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            h("ratelimit-policy").as_deref(),
            Some("\"per-key\";q=2;w=2")
        );
        assert_eq!(h("x-ratelimit-limit").as_deref(), Some("2"));
        match i {
            0 => {
                assert_eq!(response.body(), "hello");
                assert_eq!(h("x-ratelimit-remaining").as_deref(), Some("1"));
            }
            1 => assert_eq!(h("x-ratelimit-remaining").as_deref(), Some("0")),
            _ => {
                assert_eq!(h("retry-after").as_deref(), Some("1"));
                assert!(h("ratelimit").unwrap().starts_with("\"per-key\";r=0;t="));
                assert!(
                    response.body().contains("\"status\":429"),
                    "the 429 body is an RFC 9457 problem: {}",
                    response.body()
                );
            }
        }
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    // Another key passes; a request without one is refused (OnMissingKey::Reject), with
    // 400: the header is the client's to send.
    let svc = &mut replicas[0];
    let other = ask(svc, request("k2")).await;
    assert_eq!(other.status(), 200);
    let keyless = ask(svc, http::Request::new(())).await;
    assert_eq!(keyless.status(), 400);
    assert!(keyless.headers().get("ratelimit").is_none());

    // OnMissingKey::Shared: keyless requests from both replicas share one Redis bucket.
    let shared = |url: String| {
        let limiter = RedisRateLimiter::builder(url, quota(60, 2))
            .prefix("shared")
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        over_hello(limiter, |l| {
            l.on_missing_key(seawall::rate_limit::OnMissingKey::Shared)
        })
    };
    let mut fleet = [shared(redis.url()), shared(redis.url())];
    let keyless: Vec<u16> = {
        let mut out = Vec::new();
        for i in 0..3 {
            out.push(
                ask(&mut fleet[i % 2], http::Request::new(()))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        out
    };
    assert_eq!(
        keyless,
        [200, 200, 429],
        "one shared bucket across the replicas"
    );
    assert_eq!(
        ask(&mut fleet[0], request("k1")).await.status(),
        200,
        "keys are apart"
    );

    // Hidden headers: none when admitted, only Retry-After on the 429 (marked Refused).
    let limiter = RedisRateLimiter::builder(redis.url(), quota(60, 1))
        .prefix("hidden")
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut hidden = over_hello(limiter, |l| l.hide_headers(true));
    let admitted = ask(&mut hidden, request("h")).await;
    assert_eq!(admitted.status(), 200);
    assert!(admitted.headers().is_empty(), "{:?}", admitted.headers());
    let refused = ask(&mut hidden, request("h")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers().keys().collect::<Vec<_>>(),
        [http::header::CONTENT_TYPE, http::header::RETRY_AFTER]
    );
    assert!(
        refused
            .extensions()
            .get::<seawall::rate_limit::http::Refused>()
            .is_some()
    );

    // Redis gone, failing closed: 503 with Retry-After, never a hang.
    drop(redis);
    let response = tokio::time::timeout(
        Duration::from_secs(3),
        svc.ready().await.unwrap().call(request("k3")),
    )
    .await
    .expect("answered within the Redis timeout")
    .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn a_saturated_key_is_refused_without_round_trips_until_redis_said() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = RedisRateLimiter::builder(redis.url(), quota(600, 2)) // 10/s, burst 2
        .prefix("saturated")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let commands = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    assert!(limiter.acquire("k", 2).await.is_ok());
    let first = match limiter.acquire("k", 1).await {
        Err(RedisLimitError::Limited(r)) => r.retry_after().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(first > Duration::from_millis(50) && first <= Duration::from_millis(100));
    let before = commands(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .unwrap(),
    );
    for _ in 0..100 {
        match limiter.acquire("k", 1).await {
            Err(RedisLimitError::Limited(r)) => {
                assert!(r.retry_after().unwrap() <= first, "waits shrink with time")
            }
            Ok(_) => break, // the refusal ran out meanwhile: Redis admits again
            Err(e) => panic!("{e}"),
        }
    }
    let after = commands(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .unwrap(),
    );
    // One INFO of ours in between, and at most one check that outlived the refusal.
    assert!(
        after - before <= 3,
        "{} commands for refused checks",
        after - before
    );
    // Once the refusal has run out, the key is asked again and admitted.
    tokio::time::sleep(first + Duration::from_millis(20)).await;
    assert!(limiter.acquire("k", 1).await.is_ok());
    // A smaller request than the cached refusal is not refused by it: another key, burst 2.
    assert!(limiter.acquire("j", 2).await.is_ok());
    assert!(limiter.acquire("j", 2).await.is_err());
    tokio::time::sleep(Duration::from_millis(110)).await;
    assert!(
        limiter.acquire("j", 1).await.is_ok(),
        "one token is back after 100 ms"
    );
}

/// Breaker transitions received so far, as `from->to`.
fn transitions(
    rx: &mut tokio::sync::broadcast::Receiver<seawall::circuit_breaker::Event>,
) -> Vec<String> {
    use seawall::circuit_breaker::EventKind;
    let mut seen = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let EventKind::StateTransition { from, to } = event.kind() {
            seen.push(format!("{from}->{to}"));
        }
    }
    seen
}

/// Issue 12, item 1: Redis killed, left down until the connection manager's own
/// reconnection has failed (so a stale `Reconnecting failed` error waits in it), then
/// restarted on the same port. `served_by_redis` makes one check: `Some(true)` when Redis
/// answered it, `Some(false)` when the failure policy did. The first Redis-served check
/// must come at most 100 ms after the breaker admits a probe (and so within the open wait
/// + 100 ms of the restart), and the breaker must not have re-opened.
async fn restart_recovers_at_the_first_probe<F, Fut>(
    limiter: &RedisRateLimiter,
    redis: RedisServer,
    wait: Duration,
    mut served_by_redis: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use seawall::circuit_breaker::EventKind;
    let port = redis.port;
    let mut events = limiter.breaker().subscribe();
    assert!(served_by_redis().await, "Redis is up");

    drop(redis);
    let killed = Instant::now();
    // Load goes on: checks until the breaker opens, each answered by the policy.
    let retry_at = loop {
        assert!(!served_by_redis().await, "Redis is down");
        let mut opened = None;
        while let Ok(event) = events.try_recv() {
            if let EventKind::StateTransition {
                to: State::Open, ..
            } = event.kind()
            {
                opened = event.retry_at();
            }
        }
        if let Some(at) = opened {
            break at;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Down for longer than the manager's reconnection takes to fail (one retry after
    // 1 to 2 s in the old configuration), so a stale error waits for the first probe.
    tokio::time::sleep_until(killed + Duration::from_millis(2100)).await;
    let _redis = RedisServer::start(port).await;
    let restarted = Instant::now();
    assert!(
        restarted < retry_at,
        "the restart must come before the probe: lengthen `wait`"
    );

    // Load again: a check every 5 ms, until one is served by Redis.
    let deadline = retry_at + wait * 3;
    let first = loop {
        if served_by_redis().await {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "not served by Redis {:?} after the restart; transitions {:?}",
            restarted.elapsed(),
            transitions(&mut events)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seen = transitions(&mut events);
    assert!(
        first <= retry_at + Duration::from_millis(100),
        "first Redis-served check {:?} after the probe was allowed ({:?} after the restart); \
         transitions {seen:?}",
        first.saturating_duration_since(retry_at),
        first - restarted
    );
    assert!(first - restarted <= wait + Duration::from_millis(100));
    assert_eq!(
        seen,
        ["open->half_open", "half_open->closed"],
        "no second trip"
    );
}

fn restart_breaker(wait: Duration) -> CircuitBreakerConfig {
    CircuitBreakerConfig::builder()
        .name("redis-restart")
        .sliding_window(SlidingWindow::count_based(2))
        .minimum_calls(2)
        .wait_in_open(wait)
        .exponential_backoff(2.0, Duration::from_secs(30))
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_restarted_redis_answers_the_first_probe() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let wait = Duration::from_millis(2600);
    let limiter = RedisRateLimiter::builder(redis.url(), quota(60_000, 1000))
        .prefix("restart")
        .timeout(Duration::from_millis(200))
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(60_000, 1000),
        })
        .breaker(restart_breaker(wait))
        .build()
        .unwrap();
    let check = || async {
        match limiter.acquire("k", 1).await {
            Ok((_, Source::Redis)) => true,
            Ok((_, Source::Local)) => false,
            other => panic!("unexpected: {other:?}"),
        }
    };
    restart_recovers_at_the_first_probe(&limiter, redis, wait, check).await;
    assert!(limiter.reconnect_retries() >= 1, "the retry was counted");
}

#[cfg(feature = "http")]
#[tokio::test]
async fn over_http_503_lasts_only_while_redis_is_down() {
    use seawall::rate_limit::http::{HeaderKey, HttpRedisRateLimitLayer};
    use tower::{Layer, Service, ServiceExt};

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let wait = Duration::from_millis(2600);
    let limiter = RedisRateLimiter::builder(redis.url(), quota(60_000, 1000))
        .prefix("restart-http")
        .timeout(Duration::from_millis(200))
        .breaker(restart_breaker(wait))
        .build()
        .unwrap();
    let svc = HttpRedisRateLimitLayer::new(
        limiter.per_key(HeaderKey(http::HeaderName::from_static("x-api-key"))),
    )
    .layer(tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
    }));
    let check = || {
        let mut svc = svc.clone();
        async move {
            let request = http::Request::builder()
                .header("x-api-key", "k")
                .body(())
                .unwrap();
            let response = svc.ready().await.unwrap().call(request).await.unwrap();
            match response.status().as_u16() {
                200 => true,
                503 => false, // failing closed while Redis is away
                other => panic!("unexpected status {other}"),
            }
        }
    };
    restart_recovers_at_the_first_probe(&limiter, redis, wait, check).await;
}

/// A loopback TCP proxy in front of a real Redis that, once `slow` is set, delays every
/// chunk Redis sends back by 20 to 80 ms (uniform jitter, order kept): a healthy Redis on
/// a saturated machine.
struct SlowProxy {
    port: u16,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    async fn start(upstream: u16) -> SlowProxy {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let slow = Arc::new(AtomicBool::new(false));
        let flag = slow.clone();
        let task = tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                seed = seed.wrapping_add(0x1234_5678_9abc_def1);
                tokio::spawn(Self::pipe(client, server, flag.clone(), seed));
            }
        });
        SlowProxy { port, slow, task }
    }

    async fn pipe(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
        mut seed: u64,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        // Requests pass at once.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        });
        // Replies: each chunk is due 20..80 ms after it arrived, written in order.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if client_tx.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // xorshift64: jitter without a dependency.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let delay = if slow.load(Relaxed) {
                Duration::from_millis(20 + seed % 61)
            } else {
                Duration::ZERO
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 12, item 2: with the default timeout and breaker, a healthy Redis answering in
/// 20 to 80 ms (many answers slower than the old 50 ms timeout) never opens the breaker,
/// and every decision comes from Redis.
#[tokio::test]
async fn a_slow_but_healthy_redis_does_not_flip_the_replica() {
    use std::sync::atomic::Ordering::Relaxed;
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let proxy = SlowProxy::start(redis.port).await;
    let limiter = RedisRateLimiter::builder(proxy.url(), quota(600_000, 10_000))
        .prefix("slow")
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(600_000, 10_000),
        })
        .build()
        .unwrap();
    let mut events = limiter.breaker().subscribe();
    // Connected and the script loaded while Redis is fast; then the machine gets busy.
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Redis);
    proxy.slow.store(true, Relaxed);

    // Four concurrent callers, 15 checks each.
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let mut took = Vec::new();
                for _ in 0..15 {
                    let started = Instant::now();
                    let answer = limiter.acquire("k", 1).await;
                    took.push((started.elapsed(), answer.map(|(_, source)| source)));
                }
                took
            })
        })
        .collect();
    let mut answers = Vec::new();
    for caller in callers {
        answers.extend(caller.await.unwrap());
    }
    let slow = answers
        .iter()
        .filter(|(took, _)| *took > Duration::from_millis(50))
        .count();
    let not_redis: Vec<_> = answers
        .iter()
        .filter(|(_, source)| !matches!(source, Ok(Source::Redis)))
        .collect();
    assert!(
        not_redis.is_empty(),
        "{} of {} checks not served by Redis ({slow} took over 50 ms): {:?}; transitions {:?}",
        not_redis.len(),
        answers.len(),
        not_redis.first(),
        transitions(&mut events)
    );
    assert!(
        slow >= 10,
        "the proxy made Redis slow: {slow} answers over 50 ms"
    );
    assert_eq!(
        transitions(&mut events),
        Vec::<String>::new(),
        "never opened"
    );
    assert_eq!(limiter.breaker().state(), State::Closed);
}

/// Issue 12, item 2: the defaults that tolerate a slow Redis still trip fast on a dead
/// one (connection refused): at most 10 checks, each answered by the policy at once.
/// The timeout is raised far above the default so that "at once" (a refused connection)
/// and "after the timeout" stay apart on a loaded machine: a busy CI host delays a
/// check by tens of milliseconds, so a bound of a few ms cannot tell them apart.
#[tokio::test]
async fn a_killed_redis_trips_the_default_breaker_within_the_documented_bound() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let timeout = Duration::from_secs(10);
    let limiter = RedisRateLimiter::builder(redis.url(), quota(60_000, 1000))
        .prefix("dead")
        .timeout(timeout)
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(60_000, 1000),
        })
        .build()
        .unwrap();
    // A full window of successes first: the worst case for tripping.
    for _ in 0..25 {
        assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Redis);
    }
    drop(redis);
    let killed = Instant::now();
    let mut checks = 0;
    while limiter.breaker().state() != State::Open {
        let started = Instant::now();
        let (_, source) = limiter.acquire("k", 1).await.unwrap();
        assert_eq!(source, Source::Local, "Redis is dead");
        assert!(
            started.elapsed() < timeout / 2,
            "a refused connection is answered at once, not after the timeout: {:?}",
            started.elapsed()
        );
        checks += 1;
        assert!(checks <= 10, "still closed after {checks} failed checks");
    }
    // All ten checks together took less than one timeout.
    assert!(killed.elapsed() < timeout / 2, "{:?}", killed.elapsed());
    assert!(checks >= 2);
}
