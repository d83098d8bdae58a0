//! The generic layers over the Redis-backed limiter, against a real `redis-server`: the
//! tower `LimitLayer` (global and per key, its errors, fail-open and fail-closed, refunds
//! around it), and `HttpRateLimitLayer` over a real loopback socket (429 and its headers,
//! stacked under a local limit that refunds, 503 when Redis is gone and the limit fails
//! closed).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use seawall::rate_limit::redis::{FailurePolicy, RedisLimitError, RedisRateLimiter};
use seawall::rate_limit::{LimitLayer, MissingKey, Quota, Rate, RateLimited};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::redis_server::RedisServer;

fn quota(per_minute: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_minute(per_minute), burst).unwrap()
}

fn limiter(url: String, prefix: &str, burst: u32) -> RedisRateLimiter {
    RedisRateLimiter::builder(url, quota(60, burst))
        .prefix(prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// A service counting its calls.
fn counted(
    calls: &Arc<AtomicUsize>,
) -> impl Service<&'static str, Response = &'static str, Error = seawall::BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let calls = calls.clone();
    tower::service_fn(move |tenant: &'static str| {
        calls.fetch_add(1, SeqCst);
        async move { Ok::<_, seawall::BoxError>(tenant) }
    })
}

async fn call<S: Service<&'static str>>(
    svc: &mut S,
    request: &'static str,
) -> Result<S::Response, S::Error> {
    svc.ready().await?.call(request).await
}

#[tokio::test]
async fn limit_layer_over_redis_limits_the_fleet_globally_and_per_key() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let calls = Arc::new(AtomicUsize::new(0));

    // Global: two replicas, one bucket of 2 under `prefix:{all}`.
    let mut replicas = [
        LimitLayer::new(limiter(redis.url(), "global", 2)).layer(counted(&calls)),
        LimitLayer::new(limiter(redis.url(), "global", 2)).layer(counted(&calls)),
    ];
    call(&mut replicas[0], "a").await.unwrap();
    call(&mut replicas[1], "b").await.unwrap();
    let err = call(&mut replicas[0], "c").await.unwrap_err();
    let refused = err.downcast_ref::<RateLimited>().expect("a RateLimited");
    assert!(refused.retry_after().is_some_and(|d| d > Duration::ZERO));
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the refusal did not reach the service"
    );
    assert_eq!(redis.keys("global:*").await, ["global:{all}"]);

    // Per key: each tenant its own bucket; a request without a key fails with MissingKey.
    let per_key = limiter(redis.url(), "tenants", 1)
        .per_key(|tenant: &&'static str| (!tenant.is_empty()).then_some(*tenant));
    let mut svc = ServiceBuilder::new()
        .layer(LimitLayer::new(per_key))
        .service(counted(&calls));
    call(&mut svc, "acme").await.unwrap();
    call(&mut svc, "initech").await.unwrap();
    let err = call(&mut svc, "acme").await.unwrap_err();
    assert!(err.downcast_ref::<RateLimited>().is_some(), "{err}");
    let err = call(&mut svc, "").await.unwrap_err();
    assert!(err.downcast_ref::<MissingKey>().is_some(), "{err}");
    assert_eq!(calls.load(SeqCst), 4);
    let mut keys = redis.keys("tenants:*").await;
    keys.sort();
    assert_eq!(keys, ["tenants:{acme}", "tenants:{initech}"]);
}

#[tokio::test]
async fn limit_layer_over_redis_applies_the_failure_policy_when_redis_is_down() {
    // Nothing listens on this port: Redis is down from the start.
    let url = format!("redis://127.0.0.1:{}/", RedisServer::free_port());
    let calls = Arc::new(AtomicUsize::new(0));

    // Failing closed: an error naming the store, and the service is not called.
    let closed = RedisRateLimiter::builder(url.clone(), quota(60, 10))
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut svc = LimitLayer::new(closed).layer(counted(&calls));
    let err = tokio::time::timeout(Duration::from_secs(3), call(&mut svc, "a"))
        .await
        .expect("answered within the Redis timeout")
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<RedisLimitError>(),
            Some(RedisLimitError::Unavailable(_))
        ),
        "{err}"
    );
    assert_eq!(calls.load(SeqCst), 0);

    // Failing open: this replica's local share decides, per key.
    let open = RedisRateLimiter::builder(url, quota(60, 10))
        .timeout(Duration::from_millis(200))
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(60, 1),
        })
        .build()
        .unwrap();
    let mut svc = LimitLayer::new(open.per_key(|t: &&'static str| Some(*t))).layer(counted(&calls));
    call(&mut svc, "a").await.unwrap();
    call(&mut svc, "b").await.unwrap();
    let err = call(&mut svc, "a").await.unwrap_err();
    assert!(err.downcast_ref::<RateLimited>().is_some(), "{err}");
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(open.last_source(), Some("local"));
}

#[tokio::test]
async fn local_layers_refund_when_redis_refuses_and_redis_never_refunds() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let calls = Arc::new(AtomicUsize::new(0));

    // A local global limit of 2 over a Redis limit of 1 per tenant: the tenants Redis
    // refuses do not drain the local bucket.
    let local = seawall::rate_limit::RateLimiter::with_clock(
        quota(60, 2),
        seawall::rate_limit::ManualClock::new(),
    );
    let per_tenant = limiter(redis.url(), "stacked", 1).per_key(|t: &&'static str| Some(*t));
    let mut svc = ServiceBuilder::new()
        .layer(LimitLayer::new(local.clone()))
        .layer(LimitLayer::new(per_tenant))
        .service(counted(&calls));
    call(&mut svc, "acme").await.unwrap();
    for _ in 0..3 {
        let err = call(&mut svc, "acme").await.unwrap_err();
        assert!(err.downcast_ref::<RateLimited>().is_some(), "{err}");
    }
    assert_eq!(local.available(), 1, "refused by Redis: handed back");
    call(&mut svc, "initech").await.unwrap();
    assert_eq!(calls.load(SeqCst), 2);

    // Redis outermost, over a local limit of 1: the request the local limit refuses keeps
    // its Redis token (a refund would be a second round trip).
    let redis_limiter = limiter(redis.url(), "outer", 2);
    let inner = seawall::rate_limit::RateLimiter::with_clock(
        quota(60, 1),
        seawall::rate_limit::ManualClock::new(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(LimitLayer::new(redis_limiter.clone()))
        .layer(LimitLayer::new(inner))
        .service(counted(&calls));
    call(&mut svc, "a").await.unwrap();
    let err = call(&mut svc, "b").await.unwrap_err();
    assert!(err.downcast_ref::<RateLimited>().is_some(), "{err}");
    assert!(
        matches!(
            redis_limiter.acquire("all", 1).await,
            Err(RedisLimitError::Limited(_))
        ),
        "both Redis tokens were spent"
    );
}

#[cfg(feature = "http")]
mod over_http {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::time::Duration;

    use http::{HeaderMap, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use seawall::rate_limit::http::{HeaderKey, HttpRateLimitLayer};
    use seawall::rate_limit::redis::RedisRateLimiter;
    use seawall::rate_limit::{ManualClock, Quota, Rate, RateLimiter};
    use tokio::net::TcpListener;
    use tower::{ServiceBuilder, ServiceExt};

    use crate::redis_server::RedisServer;

    /// A replica on a loopback port: a local global limit of 3 (`local`, manual clock)
    /// over a Redis limit of 2 per `x-api-key` (`fleet`, failing closed), over "hello".
    async fn replica(url: String) -> SocketAddr {
        let local = RateLimiter::with_clock(
            Quota::new(Rate::per_minute(60), 3).unwrap(),
            ManualClock::new(),
        );
        let fleet = RedisRateLimiter::builder(url, Quota::new(Rate::per_minute(60), 2).unwrap())
            .prefix("http-layer")
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(HttpRateLimitLayer::global(local).name("local"))
            .layer(
                HttpRateLimitLayer::new(
                    fleet.per_key(HeaderKey(http::HeaderName::from_static("x-api-key"))),
                )
                .name("fleet")
                .legacy_headers(true),
            )
            .service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(String::from("hello")))
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let svc = svc.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        svc.clone().oneshot(req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    async fn get(addr: SocketAddr, key: &str) -> (StatusCode, HeaderMap, String) {
        let client: Client<HttpConnector, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = Request::builder()
            .uri(format!("http://{addr}/"))
            .header("x-api-key", key)
            .body(Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .expect("answered in time")
            .unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn all(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn http_layer_over_redis_answers_429_with_headers_and_503_when_redis_is_gone() {
        let redis = RedisServer::start(RedisServer::free_port()).await;
        let replicas = [replica(redis.url()).await, replica(redis.url()).await];

        // Admitted on either replica, the headers of both limits (innermost first).
        let (status, headers, body) = get(replicas[0], "k1").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
        assert_eq!(
            all(&headers, "ratelimit-policy"),
            ["\"fleet\";q=2;w=2", "\"local\";q=3;w=3"]
        );
        assert_eq!(all(&headers, "x-ratelimit-remaining"), ["1"]);
        let (status, headers, _) = get(replicas[1], "k1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            all(&headers, "x-ratelimit-remaining"),
            ["0"],
            "one bucket in Redis"
        );

        // The fleet's third: a 429 from Redis, with the same headers as a local limit's.
        let (status, headers, body) = get(replicas[0], "k1").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(all(&headers, "retry-after"), ["1"]);
        assert!(
            all(&headers, "ratelimit")[0].starts_with("\"fleet\";r=0;t="),
            "{headers:?}"
        );
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(body.contains("\"status\":429"), "{body}");

        // The local limit outside handed its token back: replica 0 has taken k1 twice
        // and been refused once more, yet still admits a new key with one token to spare.
        let (status, _, _) = get(replicas[0], "k1").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let (status, headers, _) = get(replicas[0], "k2").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            all(&headers, "ratelimit")
                .iter()
                .any(|v| v.starts_with("\"local\";r=1;")),
            "{headers:?}"
        );

        // Redis gone, failing closed: 503 with Retry-After: 1, within the Redis timeout.
        drop(redis);
        let (status, headers, _) = get(replicas[1], "k3").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(all(&headers, "retry-after"), ["1"]);
    }
}
