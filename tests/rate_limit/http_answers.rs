//! The HTTP rate-limit layer over loopback: a real hyper server and client, checking
//! status codes and every header value. Limiters run on a manual clock, so the figures
//! are exact.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::rate_limit::http::{ClientIp, HeaderKey, HttpRateLimitLayer, Refused, Undecided};
use seawall::rate_limit::{KeyedRateLimiter, ManualClock, Quota, Rate, RateLimiter};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// Serves `trusted`-aware limits on a loopback port: a global 100/s and a per-client
/// 2 per 2 s (a minute's 60, burst 2).
async fn server(trusted: &[&str]) -> SocketAddr {
    let clock = ManualClock::new();
    let global = RateLimiter::with_clock(
        Quota::new(Rate::per_second(100), 100).unwrap(),
        clock.clone(),
    );
    let per_ip = KeyedRateLimiter::with_clock(Quota::new(Rate::per_minute(60), 2).unwrap(), clock);
    let svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::global(global).name("global"))
        .layer(
            HttpRateLimitLayer::per_key(per_ip, ClientIp::trusting(trusted).unwrap())
                .name("per-ip")
                .legacy_headers(true),
        )
        .service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(String::from("hello")))
        });
    serve(svc).await
}

/// Serves `svc` on a loopback port, over hyper's HTTP/1 with the peer's address in each
/// request's extensions.
async fn serve<S>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<String>> + Clone + Send + 'static,
    S::Error: Into<seawall::BoxError>,
    S::Future: Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let svc = svc.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(peer);
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

async fn get(
    client: &Client<HttpConnector, Empty<bytes::Bytes>>,
    addr: SocketAddr,
    forwarded_for: &str,
) -> (StatusCode, HeaderMap, String) {
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
        .header("x-forwarded-for", forwarded_for)
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), client.request(req))
        .await
        .expect("answered in time")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
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

fn one(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn admitted_and_refused_requests_carry_the_headers() {
    let addr = server(&["127.0.0.1"]).await;
    let client = Client::builder(TokioExecutor::new()).build_http();

    let (status, h, body) = get(&client, addr, "203.0.113.1").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
    assert_eq!(
        all(&h, "ratelimit-policy"),
        ["\"per-ip\";q=2;w=2", "\"global\";q=100;w=1"]
    );
    assert_eq!(
        all(&h, "ratelimit"),
        ["\"per-ip\";r=1;t=1", "\"global\";r=99;t=1"]
    );
    assert_eq!(one(&h, "x-ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(one(&h, "x-ratelimit-remaining").as_deref(), Some("1"));
    assert_eq!(one(&h, "retry-after"), None);

    let (status, h, _) = get(&client, addr, "203.0.113.1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        all(&h, "ratelimit"),
        ["\"per-ip\";r=0;t=2", "\"global\";r=98;t=1"]
    );
    assert_eq!(one(&h, "x-ratelimit-remaining").as_deref(), Some("0"));

    let (status, h, body) = get(&client, addr, "203.0.113.1").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        one(&h, "content-type").as_deref(),
        Some("application/problem+json"),
        "the 429 body is an RFC 9457 problem"
    );
    assert!(body.contains("\"status\":429"), "{body}");
    assert_eq!(one(&h, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        all(&h, "ratelimit-policy"),
        ["\"per-ip\";q=2;w=2", "\"global\";q=100;w=1"]
    );
    // The global layer (outside) admitted it before the per-client one refused it; `t`
    // is still the time until the bucket is full, Retry-After when to come back.
    assert_eq!(
        all(&h, "ratelimit"),
        ["\"per-ip\";r=0;t=2", "\"global\";r=97;t=1"]
    );
    assert_eq!(one(&h, "x-ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(one(&h, "x-ratelimit-remaining").as_deref(), Some("0"));

    // Another client, as reported by the trusted proxy: its own bucket.
    let (status, h, _) = get(&client, addr, "203.0.113.2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one(&h, "x-ratelimit-remaining").as_deref(), Some("1"));
}

#[tokio::test]
async fn an_untrusted_peer_cannot_pick_its_key() {
    // Nothing trusted: X-Forwarded-For is ignored, every request is 127.0.0.1's.
    let addr = server(&[]).await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(get(&client, addr, "198.51.100.1").await.0, StatusCode::OK);
    assert_eq!(get(&client, addr, "198.51.100.2").await.0, StatusCode::OK);
    assert_eq!(
        get(&client, addr, "198.51.100.3").await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "a new X-Forwarded-For did not buy a new bucket"
    );
}

#[tokio::test]
async fn the_layers_own_429s_are_marked_and_an_absent_limit_passes_all() {
    // The inner service answers 429 itself for `/busy`: not marked.
    let inner = tower::service_fn(|req: Request<()>| async move {
        let mut response = Response::new(String::new());
        if req.uri().path() == "/busy" {
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        }
        Ok::<_, Infallible>(response)
    });
    let limiter = RateLimiter::with_clock(
        Quota::new(Rate::per_second(1), 1).unwrap(),
        ManualClock::new(),
    );
    let mut svc = HttpRateLimitLayer::new(Some(limiter)).layer(inner);
    let call = |svc: &mut _, path: &str| {
        let request = Request::get(path).body(()).unwrap();
        tower::Service::call(svc, request)
    };
    let busy = call(&mut svc, "/busy").await.unwrap();
    assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        busy.extensions().get::<Refused>().is_none(),
        "the inner 429"
    );
    assert!(busy.headers().contains_key("ratelimit"));
    let refused = call(&mut svc, "/").await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.extensions().get::<Refused>(), Some(&Refused));

    // Hidden headers: none on admitted responses, only Retry-After on the 429.
    let limiter = RateLimiter::with_clock(
        Quota::new(Rate::per_second(1), 1).unwrap(),
        ManualClock::new(),
    );
    let mut hidden = HttpRateLimitLayer::new(Some(limiter))
        .legacy_headers(true)
        .hide_headers(true)
        .layer(inner);
    let admitted = call(&mut hidden, "/").await.unwrap();
    assert_eq!(admitted.status(), StatusCode::OK);
    assert!(admitted.headers().is_empty(), "{:?}", admitted.headers());
    let refused = call(&mut hidden, "/").await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.extensions().get::<Refused>(), Some(&Refused));
    assert_eq!(
        refused.headers().keys().collect::<Vec<_>>(),
        [http::header::CONTENT_TYPE, http::header::RETRY_AFTER]
    );

    // `None`: no limit, no headers.
    let mut open = HttpRateLimitLayer::new(None::<RateLimiter<ManualClock>>).layer(inner);
    for _ in 0..10 {
        let response = call(&mut open, "/").await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key("ratelimit"));
    }
}

/// A key header sent twice is refused (`HeaderKey`, `400`) whatever the policy: keyed on
/// the first value, a client sending a fresh first key each time had a new bucket per
/// request while a service reading the last value took its real key, past its limit;
/// taken for a missing key, `OnMissingKey::Allow` let it through unlimited.
#[tokio::test]
async fn a_repeated_api_key_is_refused_whatever_the_policy() {
    use seawall::rate_limit::OnMissingKey;
    let quota = Quota::new(Rate::per_minute(1), 1).unwrap();
    for policy in [
        OnMissingKey::Reject,
        OnMissingKey::Allow,
        OnMissingKey::Shared,
    ] {
        let per_key = KeyedRateLimiter::with_clock(quota, ManualClock::new());
        let mut svc = HttpRateLimitLayer::per_key(
            per_key,
            HeaderKey(http::HeaderName::from_static("x-api-key")),
        )
        .on_missing_key(policy)
        .layer(tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
        let mut send = async |keys: &[&'static str]| {
            let mut request = Request::get("/").body(()).unwrap();
            for key in keys {
                request
                    .headers_mut()
                    .append("x-api-key", http::HeaderValue::from_static(key));
            }
            svc.ready()
                .await
                .unwrap()
                .call(request)
                .await
                .unwrap()
                .status()
        };
        assert_eq!(send(&["real"]).await, StatusCode::OK, "{policy:?}");
        assert_eq!(
            send(&["real"]).await,
            StatusCode::TOO_MANY_REQUESTS,
            "{policy:?}"
        );
        for fresh in ["fresh-1", "fresh-2"] {
            assert_eq!(
                send(&[fresh, "real"]).await,
                StatusCode::BAD_REQUEST,
                "{policy:?}: {fresh}"
            );
        }
    }
}

/// A request without the API key header a per-key limit reads is the client's error:
/// it was answered `500 Internal Server Error` (and logged as an error), as if the server
/// were at fault, so any client could make the service report server errors at will. It
/// is a `400`, marked [`Undecided::KeyNotSent`]; a request with the key goes through, and
/// a setup fault (no peer address for `ClientIp`) stays a `500` (the test below).
#[tokio::test]
async fn a_request_without_its_api_key_is_a_400_not_a_500() {
    let api_key = || HeaderKey(http::HeaderName::from_static("x-api-key"));
    let quota = Quota::new(Rate::per_second(100), 100).unwrap();
    let per_key = KeyedRateLimiter::with_clock(quota, ManualClock::new());
    let svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::per_key(per_key, api_key()).name("per-key"))
        .service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(String::from("hello")))
        });
    let addr = serve(svc).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let send = |key: Option<&'static [u8]>| {
        let mut req = Request::builder().uri(format!("http://{addr}/"));
        if let Some(key) = key {
            req = req.header("x-api-key", http::HeaderValue::from_bytes(key).unwrap());
        }
        let req = req.body(Empty::new()).unwrap();
        let client = client.clone();
        async move {
            let resp = tokio::time::timeout(std::time::Duration::from_secs(5), client.request(req))
                .await
                .expect("answered in time")
                .unwrap();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (
                parts.status,
                parts.headers,
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
    };
    let (status, _, body) = send(Some(b"k-1")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
    // No header; a value that is not visible ASCII (no key either).
    for key in [None, Some(&b"caf\xc3\xa9"[..])] {
        let (status, headers, body) = send(key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}: {body}");
        assert_eq!(
            one(&headers, "content-type").as_deref(),
            Some("application/problem+json")
        );
        assert!(body.contains("does not carry the key"), "{body}");
    }
    // Marked, for code further out (through the service, no socket needed).
    let per_key = KeyedRateLimiter::with_clock(quota, ManualClock::new());
    let mut svc = HttpRateLimitLayer::per_key(per_key, api_key()).layer(tower::service_fn(
        |_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) },
    ));
    let request = Request::get("/").body(()).unwrap();
    let missing = svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.extensions().get::<Undecided>(),
        Some(&Undecided::KeyNotSent)
    );
}

/// A missing key's `500` is marked [`Undecided`], so code further out (the gateway
/// answering a gRPC caller) can tell it from the inner service's own `500`.
#[tokio::test]
async fn a_missing_keys_500_is_marked_and_an_inner_500_is_not() {
    let inner = tower::service_fn(|_: Request<()>| async move {
        let mut response = Response::new(String::new());
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        Ok::<_, Infallible>(response)
    });
    let per_ip = KeyedRateLimiter::<std::net::IpAddr, _>::with_clock(
        Quota::new(Rate::per_second(100), 100).unwrap(),
        ManualClock::new(),
    );
    let mut svc = HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).layer(inner);
    // No peer address in the extensions: no key.
    let request = Request::get("/").body(()).unwrap();
    let missing = svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(missing.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        missing.extensions().get::<Undecided>(),
        Some(&Undecided::MissingKey)
    );
    assert!(missing.extensions().get::<Refused>().is_none());
    // With one: the inner service's own 500, unmarked.
    let mut request = Request::get("/").body(()).unwrap();
    request
        .extensions_mut()
        .insert(SocketAddr::from(([127, 0, 0, 1], 9)));
    let own = svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(own.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(own.extensions().get::<Undecided>().is_none());
}

mod retry_after {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::{Duration, SystemTime};

    use http::{Request, Response, StatusCode};
    use seawall::BoxError;
    use seawall::rate_limit::http::{HoldingOff, RetryAfterLayer};
    use tokio::time::{Instant, advance};
    use tower::{Layer, Service, ServiceBuilder, ServiceExt};

    /// What the test upstream is asked to answer: a status and a `Retry-After` value.
    type Ask = (u16, Option<String>);

    /// An upstream answering each request with the status and `Retry-After` it names.
    fn upstream(
        layer: RetryAfterLayer,
    ) -> (
        impl Service<Request<Ask>, Response = Response<()>, Error = BoxError> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |req: Request<Ask>| {
                counter.fetch_add(1, SeqCst);
                let (status, retry_after) = req.into_body();
                async move {
                    let mut b = Response::builder().status(status);
                    if let Some(v) = retry_after {
                        b = b.header("retry-after", v);
                    }
                    Ok::<_, BoxError>(b.body(()).unwrap())
                }
            });
        (svc, calls)
    }

    fn req(status: u16, retry_after: Option<&str>) -> Request<Ask> {
        Request::new((status, retry_after.map(str::to_owned)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_with_seconds_holds_every_clone_until_then() {
        let (svc, calls) = upstream(RetryAfterLayer::new());
        let mut a = svc.clone();
        let r = a
            .ready()
            .await
            .unwrap()
            .call(req(429, Some("5")))
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "the 429 itself is returned"
        );
        let mut b = svc.clone();
        let err = b
            .ready()
            .await
            .unwrap()
            .call(req(200, None))
            .await
            .unwrap_err();
        let held = err.downcast_ref::<HoldingOff>().expect("held off");
        assert_eq!(held.retry_after(), Duration::from_secs(5));
        assert_eq!(
            calls.load(SeqCst),
            1,
            "the held-off call did not reach the upstream"
        );
        advance(Duration::from_secs(5)).await;
        let r = b.ready().await.unwrap().call(req(200, None)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_with_an_http_date() {
        let layer = RetryAfterLayer::new();
        let (mut svc, _) = upstream(layer.clone());
        let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        svc.ready()
            .await
            .unwrap()
            .call(req(503, Some(&at)))
            .await
            .unwrap();
        // HTTP dates have whole seconds: 29 to 30 s from now.
        let left = layer.holding_off_for().expect("holding off");
        assert!(
            left > Duration::from_secs(28) && left <= Duration::from_secs(30),
            "{left:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_429_and_503_with_a_readable_retry_after_hold() {
        let layer = RetryAfterLayer::new();
        let (mut svc, _) = upstream(layer.clone());
        for (status, value) in [
            (429, None),
            (200, Some("5")),
            (500, Some("5")),
            (503, Some("soon")),
            (429, Some("0")),
        ] {
            svc.ready()
                .await
                .unwrap()
                .call(req(status, value))
                .await
                .unwrap();
            assert_eq!(layer.holding_off_for(), None, "{status} {value:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn holds_are_capped() {
        let layer = RetryAfterLayer::new().max_hold(Duration::from_secs(60));
        let (mut svc, _) = upstream(layer.clone());
        svc.ready()
            .await
            .unwrap()
            .call(req(429, Some("999999999")))
            .await
            .unwrap();
        assert_eq!(layer.holding_off_for(), Some(Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_mode_waits_out_short_holds_and_refuses_long_ones() {
        let layer = RetryAfterLayer::new().wait_up_to(Duration::from_secs(5));
        let (mut svc, calls) = upstream(layer.clone());
        svc.ready()
            .await
            .unwrap()
            .call(req(429, Some("2")))
            .await
            .unwrap();
        let start = Instant::now();
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(req(200, None))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        svc.ready()
            .await
            .unwrap()
            .call(req(503, Some("10")))
            .await
            .unwrap();
        let start = Instant::now();
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(req(200, None))
            .await
            .unwrap_err();
        assert!(err.is::<HoldingOff>());
        assert_eq!(start.elapsed(), Duration::ZERO, "refused at once");
        assert_eq!(calls.load(SeqCst), 3);
    }

    /// An inner service pending for a while: `poll_ready` must look at the hold again
    /// when it is asked again, not go by what it saw before the inner service was ready.
    #[tokio::test(start_paused = true)]
    async fn wait_mode_waits_out_a_hold_set_while_the_inner_service_was_pending() {
        use std::sync::atomic::AtomicBool;
        use std::task::{Context, Poll};

        /// Ready while `open`; answers 200.
        #[derive(Clone)]
        struct Gate(Arc<AtomicBool>);
        impl Service<Request<Ask>> for Gate {
            type Response = Response<()>;
            type Error = BoxError;
            type Future = std::future::Ready<Result<Response<()>, BoxError>>;
            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                if self.0.load(SeqCst) {
                    Poll::Ready(Ok(()))
                } else {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
            fn call(&mut self, _: Request<Ask>) -> Self::Future {
                std::future::ready(Ok(Response::new(())))
            }
        }

        let layer = RetryAfterLayer::new().wait_up_to(Duration::from_secs(5));
        let open = Arc::new(AtomicBool::new(false));
        let mut gated = layer.layer(Gate(open.clone()));
        let waker = std::task::Waker::noop();
        assert!(
            gated
                .poll_ready(&mut Context::from_waker(waker))
                .is_pending()
        );
        // Meanwhile another service of the layer hears `Retry-After: 1`.
        let (mut other, _) = upstream(layer.clone());
        other
            .ready()
            .await
            .unwrap()
            .call(req(429, Some("1")))
            .await
            .unwrap();
        open.store(true, SeqCst);
        let start = Instant::now();
        let r = gated.ready().await.unwrap().call(req(200, None)).await;
        assert_eq!(r.expect("the hold waited out").status(), StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    /// A service found ready is asked again before its call (tower allows `poll_ready`
    /// any number of times; a balancer's ready cache asks again before each use). A hold
    /// within `wait_up_to` set in between must be waited out by that `poll_ready`, not
    /// turned into a `HoldingOff` by `call`.
    #[tokio::test(start_paused = true)]
    async fn wait_mode_waits_out_a_hold_set_after_an_earlier_ready() {
        let layer = RetryAfterLayer::new().wait_up_to(Duration::from_secs(5));
        let (mut svc, _) = upstream(layer.clone());
        let (mut other, _) = upstream(layer.clone());
        svc.ready().await.unwrap();
        // Meanwhile another service of the layer hears `Retry-After: 1`.
        other
            .ready()
            .await
            .unwrap()
            .call(req(429, Some("1")))
            .await
            .unwrap();
        let start = Instant::now();
        let r = svc.ready().await.unwrap().call(req(200, None)).await;
        assert_eq!(r.expect("the hold waited out").status(), StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}

#[tokio::test]
async fn policy_of_a_sub_second_window_states_the_rate() {
    // 1000 a second with a burst of 200: the window is 200 ms, the policy per second.
    let limiter = RateLimiter::with_clock(
        Quota::new(Rate::per_second(1000), 200).unwrap(),
        ManualClock::new(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::global(limiter))
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(
        all(resp.headers(), "ratelimit-policy"),
        ["\"default\";q=1000;w=1"]
    );
    assert_eq!(all(resp.headers(), "ratelimit"), ["\"default\";r=199;t=1"]);
}

/// Stacked HTTP layers: a request the inner (per-client) layer refuses gets the outer
/// (global) layer's token back, so one client hammering cannot drain the global bucket.
#[tokio::test]
async fn refusals_by_the_inner_layer_never_consume_the_outer() {
    let clock = ManualClock::new();
    let global =
        RateLimiter::with_clock(Quota::new(Rate::per_second(5), 5).unwrap(), clock.clone());
    let per_ip = KeyedRateLimiter::with_clock(Quota::new(Rate::per_second(1), 1).unwrap(), clock);
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::global(global.clone()).name("global"))
        .layer(HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).name("per-ip"))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::from("hello")))
        });
    let from = |peer: &str| {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        req
    };
    let mut admitted = 0;
    for _ in 0..40 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(from("192.0.2.1:1000"))
            .await
            .unwrap();
        if response.status() == StatusCode::OK {
            admitted += 1;
        } else {
            assert!(response.extensions().get::<Refused>().is_some());
        }
    }
    assert_eq!(admitted, 1);
    assert_eq!(
        global.available(),
        4,
        "the refusals cost the global bucket nothing"
    );
    for peer in ["192.0.2.2:1", "192.0.2.3:1", "192.0.2.4:1", "192.0.2.5:1"] {
        let response = svc.ready().await.unwrap().call(from(peer)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{peer}");
    }
}

/// Stacked HTTP layers, the outer one per key: a request the inner layer refuses hands
/// the outer key's token back (the per-key receipt the outer layer's future holds).
#[tokio::test]
async fn refusals_by_the_inner_layer_never_consume_an_outer_key() {
    let clock = ManualClock::new();
    let quota = |burst| Quota::new(Rate::per_second(1), burst).unwrap();
    let per_ip = KeyedRateLimiter::with_clock(quota(3), clock.clone());
    let per_user = KeyedRateLimiter::with_clock(quota(1), clock);
    let user = |req: &Request<()>| {
        req.headers()
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).name("per-ip"))
        .layer(HttpRateLimitLayer::per_key(per_user, user).name("per-user"))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::from("hello")))
        });
    let mut send = async |name: &str| {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert("192.0.2.1:1000".parse::<SocketAddr>().unwrap());
        req.headers_mut().insert("x-user", name.parse().unwrap());
        svc.ready().await.unwrap().call(req).await.unwrap()
    };
    assert_eq!(send("a").await.status(), StatusCode::OK);
    for _ in 0..10 {
        let refused = send("a").await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            all(refused.headers(), "ratelimit-policy")[0].starts_with("\"per-user\""),
            "refused by the inner layer"
        );
    }
    // The address took 1 of its 3 tokens: two more users are admitted.
    assert_eq!(send("b").await.status(), StatusCode::OK);
    assert_eq!(send("c").await.status(), StatusCode::OK);
    let spent = send("d").await;
    assert_eq!(spent.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        all(spent.headers(), "ratelimit-policy")
            .iter()
            .any(|p| p.starts_with("\"per-ip\""))
    );
}

/// An IPv6 client holds a /64 and can send each request from a new address in it: keyed
/// by the whole address, every request had a bucket (and a burst) of its own, and the
/// per-client limit refused nothing. Keyed by the /64, the third request of the network
/// is refused; another /64 has its own bucket. An IPv4 client seen as an IPv4-mapped IPv6
/// address shares its IPv4 address's bucket.
#[tokio::test]
async fn an_ipv6_client_is_limited_by_its_network_not_each_address() {
    let addr = server(&["127.0.0.1"]).await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut statuses = Vec::new();
    for n in 1..=20 {
        let (status, _, _) = get(&client, addr, &format!("2001:db8:0:1::{n:x}")).await;
        statuses.push(status.as_u16());
    }
    assert_eq!(&statuses[..2], [200, 200]);
    assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
    let (status, _, _) = get(&client, addr, "2001:db8:0:2::1").await;
    assert_eq!(status, StatusCode::OK, "another /64");

    let (a, _, _) = get(&client, addr, "::ffff:203.0.113.50").await;
    let (b, _, _) = get(&client, addr, "203.0.113.50").await;
    let (c, _, _) = get(&client, addr, "::ffff:203.0.113.50").await;
    assert_eq!(
        [a.as_u16(), b.as_u16(), c.as_u16()],
        [200, 200, 429],
        "one bucket for the IPv4 address in both forms"
    );
}

/// A proxy appends the client's address to the `X-Forwarded-For` line the client sent.
/// A client that put a byte that is not ASCII in its line had the whole line dropped,
/// the address its proxy appended with it, and was keyed on the proxy: a bucket of its
/// own, whatever its own was. Only the unreadable hop is dropped now.
#[tokio::test]
async fn a_non_ascii_byte_in_the_clients_part_does_not_hide_the_address_appended() {
    let addr = server(&["127.0.0.1"]).await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..2 {
        let (status, _, _) = get(&client, addr, "203.0.113.77").await;
        assert_eq!(status, StatusCode::OK);
    }
    let request = Request::builder()
        .uri(format!("http://{addr}/"))
        .header(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.77").unwrap(),
        )
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "keyed on 203.0.113.77, whose bucket is empty"
    );
}

/// Over a sharded limiter the HTTP layer announced one shard's figures as the policy: a
/// 1000/s quota (burst 200) split in 4 shards was announced as `q=250;w=1`, so a client
/// that paces itself by the header used a quarter of what it is allowed, and `r` counted
/// one shard's tokens, not the 200 the bucket holds. The whole limiter's figures now.
#[tokio::test]
async fn a_sharded_limit_announces_its_whole_quota() {
    use seawall::rate_limit::ShardedRateLimiter;
    let limiter = ShardedRateLimiter::with_clock(
        Quota::new(Rate::per_second(1000), 200).unwrap(),
        4,
        ManualClock::new(),
    )
    .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::new(limiter))
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    // The same answer as the single bucket of the same quota
    // (`policy_of_a_sub_second_window_states_the_rate`).
    assert_eq!(
        all(resp.headers(), "ratelimit-policy"),
        ["\"default\";q=1000;w=1"]
    );
    assert_eq!(all(resp.headers(), "ratelimit"), ["\"default\";r=199;t=1"]);
}

/// The policy's `q` was the rate over `w` rounded to the *nearest* request, so a rate of
/// 1.67 a second (100 a minute, burst 1) was announced as `q=2;w=1`, and a client that
/// kept to it, evenly spaced (one request every 500 ms), was refused. Rounded down now.
#[tokio::test]
async fn the_policy_never_announces_more_than_the_rate() {
    let clock = ManualClock::new();
    let limiter =
        RateLimiter::with_clock(Quota::new(Rate::per_minute(100), 1).unwrap(), clock.clone());
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::global(limiter))
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    let policy = one(first.headers(), "ratelimit-policy").unwrap();
    let field = |key: &str| -> u64 {
        policy
            .split(';')
            .find_map(|p| p.strip_prefix(key))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (q, w) = (field("q="), field("w="));
    // Keep to the announced policy: q requests every w seconds, evenly spaced.
    let gap = std::time::Duration::from_secs(w) / u32::try_from(q).unwrap();
    for n in 1..(4 * q) {
        clock.advance(gap);
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "request {n}, {gap:?} apart, refused under the announced policy {policy}"
        );
    }
}

/// A request costing more than the burst was answered (through
/// `problem::error_response`, as axum's `HandleErrorLayer` does for the tower layers) with
/// `RateLimit: "default";r=0;t=0`: `t=0` said the bucket was full, although it had just
/// been emptied and was full only in five seconds. `t` is when it is full.
#[tokio::test]
async fn an_oversized_request_is_not_told_t_0_by_an_empty_bucket() {
    let limiter = RateLimiter::with_clock(
        Quota::new(Rate::per_second(1), 5).unwrap(),
        ManualClock::new(),
    );
    assert_eq!(limiter.try_acquire(5), Ok(0));
    let refused = limiter.try_acquire(6).unwrap_err();
    assert!(refused.exceeds_capacity());
    let error: seawall::BoxError = Box::new(refused);
    let response: Response<String> = seawall::problem::error_response(&error);
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let state = one(response.headers(), "ratelimit").unwrap();
    assert_eq!(
        state, "\"default\";r=0;t=5",
        "the bucket is full in 5 s, not now"
    );
}

/// The key `ClientIp` gives a request from `peer` with these header lines.
fn key_of(key: &ClientIp, peer: &str, lines: &[(&str, &str)]) -> Option<std::net::IpAddr> {
    use seawall::rate_limit::KeyExtractor;
    let mut req = Request::new(());
    for (name, value) in lines {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    req.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    key.extract(&req)
}

/// A client's `Forwarded` value with a quote it never closes must not swallow the
/// element its trusted proxy appended (on its own line, or after a comma on the client's
/// line): a quoted-string ends with its field line, and the proxy's element, the
/// rightmost, is well formed. Read as one element, the whole list was unreadable and the
/// request keyed on the proxy: a bucket other than the client's own, chosen by the client
/// (the case `a_non_ascii_byte_in_the_clients_part_does_not_hide_the_address_appended`
/// fixed for `X-Forwarded-For`).
#[test]
fn an_unclosed_quote_in_the_clients_forwarded_does_not_hide_the_appended_hop() {
    let key = ClientIp::trusting(["10.0.0.0/8"])
        .unwrap()
        .forwarded_header();
    let client: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    // The proxy added its own line.
    assert_eq!(
        key_of(
            &key,
            "10.0.0.2:443",
            &[
                ("forwarded", "for=\"6.6.6.6"),
                ("forwarded", "for=198.51.100.7")
            ]
        ),
        Some(client),
        "a quote cannot span two field lines"
    );
    // The proxy appended to the client's line.
    assert_eq!(
        key_of(
            &key,
            "10.0.0.2:443",
            &[("forwarded", "for=\"6.6.6.6, for=198.51.100.7")]
        ),
        Some(client),
        "the trusted proxy's rightmost element is read"
    );
}

/// A trusted proxy named the way a dual-stack socket reports it (`::ffff:10.0.0.1`, or
/// the network `::ffff:10.0.0.0/104`) was accepted and trusted nothing, not even a peer
/// at that very address: `net_contains` turns the peer into its IPv4 form and tests it
/// against an IPv6 network. Every client behind that proxy was then keyed on the proxy,
/// one bucket for all of them. Such a proxy must be trusted (or refused at build).
#[test]
fn a_trusted_proxy_written_ipv4_mapped_is_trusted() {
    for trusted in ["::ffff:10.0.0.1", "::ffff:10.0.0.0/104"] {
        // Refused at build is a correct answer too; accepted, it must hold.
        let Ok(key) = ClientIp::trusting([trusted]) else {
            continue;
        };
        for peer in ["[::ffff:10.0.0.1]:443", "10.0.0.1:443"] {
            assert!(
                key.trusts(peer.parse::<SocketAddr>().unwrap().ip()),
                "{trusted} trusts {peer}"
            );
            assert_eq!(
                key_of(&key, peer, &[("x-forwarded-for", "203.0.113.9")]),
                Some("203.0.113.9".parse().unwrap()),
                "{trusted}: the client behind {peer}"
            );
        }
    }
}

/// `PathKey` gives "each route or API area its own bucket", but keyed the path as sent:
/// `/api/%6Cogin` and `/%61pi/login` are the same URI as `/api/login` (RFC 3986
/// §6.2.2.1–2: escapes of unreserved characters, and their hex digits' case, do not
/// change a URI), every server decodes them alike, yet each spelling had a bucket of its
/// own. A client hammering a route limited by its path (a login form's) got a fresh
/// burst per spelling, hundreds of them for one path.
#[test]
fn a_path_key_is_the_same_for_every_spelling_of_one_path() {
    use seawall::rate_limit::KeyExtractor;
    use seawall::rate_limit::http::PathKey;
    let key = |extractor: PathKey, path: &str| {
        let req = Request::builder().uri(path).body(()).unwrap();
        extractor.extract(&req)
    };
    for extractor in [PathKey::full(), PathKey::prefix(2)] {
        let plain = key(extractor, "/api/login");
        for spelling in [
            "/api/%6Cogin",
            "/api/%6cogin",
            "/%61pi/login",
            "/api/l%6F%67in",
            "/api//login",
            "/api/x/../login",
            "/api;v=1/login",
        ] {
            assert_eq!(
                key(extractor, spelling),
                plain,
                "{spelling} is /api/login ({extractor:?})"
            );
        }
    }
}

/// Stacked HTTP layers, a global limit over a per-API-key one: a request without its key
/// is the client's own error (`400`, [`Undecided::KeyNotSent`]), as a refusal by its own
/// limit is. Like such a refusal it must hand the global token back: otherwise one client
/// sending requests without the header drains the global bucket at will (each answered
/// `400`), past the per-client bound the inner layer exists for, and every keyed client
/// is then refused by the global limit.
#[tokio::test]
async fn requests_without_their_api_key_do_not_drain_the_global_bucket() {
    let clock = ManualClock::new();
    let global =
        RateLimiter::with_clock(Quota::new(Rate::per_second(5), 5).unwrap(), clock.clone());
    let per_key = KeyedRateLimiter::with_clock(Quota::new(Rate::per_second(1), 1).unwrap(), clock);
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::global(global.clone()).name("global"))
        .layer(
            HttpRateLimitLayer::per_key(
                per_key,
                HeaderKey(http::HeaderName::from_static("x-api-key")),
            )
            .name("per-key"),
        )
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::from("hello")))
        });
    for i in 0..40 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "keyless request {i}: the ones before it took the global bucket's tokens ({:?})",
            all(response.headers(), "ratelimit-policy")
        );
        assert_eq!(
            response.extensions().get::<Undecided>(),
            Some(&Undecided::KeyNotSent)
        );
    }
    assert_eq!(
        global.available(),
        5,
        "requests without their key cost the global bucket nothing"
    );
    for key in ["k-1", "k-2", "k-3", "k-4", "k-5"] {
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert("x-api-key", key.parse().unwrap());
        let response = svc.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{key}");
    }
}

/// A sharded limit's admitted responses announce when the whole limiter is full again
/// (`t`, the latest of its shards); its 429 announced one shard's: the soonest to admit.
/// `t` is the time until the bucket is full, on admitted and refused responses alike.
#[tokio::test]
async fn a_sharded_refusal_announces_when_the_whole_limiter_is_full() {
    use seawall::rate_limit::ShardedRateLimiter;
    let clock = ManualClock::new();
    // Two shards of 4 tokens, each refilling one every 10 s.
    let limiter = ShardedRateLimiter::with_clock(
        Quota::new(Rate::new(2, std::time::Duration::from_secs(10)), 8).unwrap(),
        2,
        clock.clone(),
    )
    .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::new(limiter))
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
    macro_rules! send {
        () => {
            svc.ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .unwrap()
        };
    }
    for _ in 0..4 {
        assert_eq!(send!().status(), StatusCode::OK); // this thread's shard
    }
    clock.advance(std::time::Duration::from_secs(39));
    for _ in 0..3 {
        assert_eq!(send!().status(), StatusCode::OK); // its 3 refilled tokens
    }
    let mut last = None;
    for _ in 0..4 {
        let resp = send!(); // borrowed from the other shard
        assert_eq!(resp.status(), StatusCode::OK);
        last = Some(resp);
    }
    let last = last.unwrap();
    assert_eq!(all(last.headers(), "ratelimit"), ["\"default\";r=0;t=40"]);
    let refused = send!();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        all(refused.headers(), "ratelimit"),
        ["\"default\";r=0;t=40"],
        "the whole limiter is full in 40 s, as the response before said"
    );
}
