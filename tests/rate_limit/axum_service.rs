//! seawall in a real axum 0.8 service, over a real loopback socket (issue 13).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate};

fn per_ip_router() -> Router {
    let per_ip =
        KeyedRateLimiter::<std::net::IpAddr>::new(Quota::new(Rate::per_minute(3), 3).unwrap());
    Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).name("per-ip"))
}

async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

async fn fetch(addr: SocketAddr) -> (StatusCode, HeaderMap, String) {
    let client: Client<HttpConnector, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .uri(format!("http://{addr}/"))
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

#[tokio::test]
async fn per_ip_limit_holds_through_axum_connect_info() {
    let (listener, addr) = listener().await;
    let app = per_ip_router().into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });

    for i in 0..3 {
        let (status, headers, body) = fetch(addr).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(body, "hello");
        assert!(
            headers.contains_key("ratelimit"),
            "request {i}: admitted responses carry RateLimit: {headers:?}"
        );
    }
    let (status, headers, body) = fetch(addr).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "past the per-IP limit"
    );
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(headers.contains_key("ratelimit-policy"), "{headers:?}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], 429);
}

#[tokio::test]
async fn a_router_without_connect_info_is_not_silently_unlimited() {
    let (listener, addr) = listener().await;
    tokio::spawn(async move { axum::serve(listener, per_ip_router()).await });

    for _ in 0..2 {
        let (status, headers, body) = fetch(addr).await;
        assert_eq!(
            status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "no key: the documented default answer (OnMissingKey::Reject)"
        );
        assert_eq!(headers["content-type"], "application/problem+json");
        let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["status"], 500);
    }
}

/// `OnMissingKey::Shared`: an axum router served without connect info has no client
/// address; its requests are limited together in one bucket instead of being refused.
#[tokio::test]
async fn requests_without_a_key_can_share_one_bucket_in_axum() {
    let (listener, addr) = listener().await;
    let per_ip =
        KeyedRateLimiter::<std::net::IpAddr>::new(Quota::new(Rate::per_minute(2), 2).unwrap());
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        HttpRateLimitLayer::per_key(per_ip, ClientIp::peer())
            .on_missing_key(seawall::rate_limit::OnMissingKey::Shared)
            .name("per-ip"),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    for i in 0..2 {
        let (status, headers, _) = fetch(addr).await;
        assert_eq!(status, StatusCode::OK, "request {i} fits the shared bucket");
        assert!(headers.contains_key("ratelimit"), "{headers:?}");
    }
    let (status, headers, _) = fetch(addr).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the shared bucket is empty"
    );
    assert!(headers.contains_key("retry-after"), "{headers:?}");
}

async fn fetch_path(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    let client: Client<HttpConnector, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .uri(format!("http://{addr}{path}"))
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

/// Item 2: errors answered the HTTP way through axum's `HandleErrorLayer`.
#[tokio::test]
async fn handle_error_layer_answers_breaker_limit_timeout_and_the_rest() {
    use axum::error_handling::HandleErrorLayer;
    use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    use seawall::rate_limit::RateLimitLayer;
    use tower::ServiceBuilder;

    type Res = http::Response<axum::body::Body>;
    let ok = || axum::body::Body::from("ok");

    // A breaker that opens after one failure, for 30 s.
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .name("upstream")
            .minimum_calls(1)
            .sliding_window(seawall::circuit_breaker::SlidingWindow::count_based(1))
            .wait_in_open(Duration::from_secs(30))
            .build()
            .unwrap(),
    );
    // Typed errors: its rejections say when it probes again, for `Retry-After`.
    let open = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(seawall::problem::handle_error))
        .layer(breaker.typed_errors())
        .service_fn(|_: Request<axum::body::Body>| async {
            Err::<Res, seawall::BoxError>("upstream refused".into())
        });
    // The default mode's zero-sized rejection says no more than "open": 503 alone.
    let plain = CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .name("plain")
            .minimum_calls(1)
            .sliding_window(seawall::circuit_breaker::SlidingWindow::count_based(1))
            .wait_in_open(Duration::from_secs(30))
            .build()
            .unwrap(),
    );
    plain.breaker().force_open();
    let open_plain = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(seawall::problem::handle_error))
        .layer(plain)
        .service_fn(|_: Request<axum::body::Body>| async {
            Ok::<Res, seawall::BoxError>(http::Response::new(axum::body::Body::empty()))
        });
    let limited = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(seawall::problem::handle_error))
        .layer(RateLimitLayer::new(
            Quota::new(Rate::per_minute(1), 1).unwrap(),
        ))
        .service_fn(move |_: Request<axum::body::Body>| async move {
            Ok::<Res, seawall::BoxError>(http::Response::new(ok()))
        });
    let slow = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(seawall::problem::handle_error))
        .timeout(Duration::from_millis(20))
        .service_fn(|_: Request<axum::body::Body>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<Res, seawall::BoxError>(http::Response::new(axum::body::Body::empty()))
        });
    let app = Router::new()
        .route_service("/open", open)
        .route_service("/open-plain", open_plain)
        .route_service("/limited", limited)
        .route_service("/slow", slow);
    let (listener, addr) = listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (status, _, body) = fetch_path(addr, "/open").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "an upstream error: {body}");
    let (status, headers, body) = fetch_path(addr, "/open").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry), "Retry-After {retry}");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], 503);
    let (status, headers, body) = fetch_path(addr, "/open-plain").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(!headers.contains_key("retry-after"), "{headers:?}");

    assert_eq!(fetch_path(addr, "/limited").await.0, StatusCode::OK);
    let (status, headers, _) = fetch_path(addr, "/limited").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(headers.contains_key("ratelimit"), "{headers:?}");
    assert_eq!(headers["content-type"], "application/problem+json");

    let (status, headers, _) = fetch_path(addr, "/slow").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["content-type"], "application/problem+json");
}

/// Item 2: the 429 body of the HTTP layer can be changed.
#[tokio::test]
async fn the_429_body_is_configurable() {
    let per_ip =
        KeyedRateLimiter::<std::net::IpAddr>::new(Quota::new(Rate::per_minute(1), 1).unwrap());
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).refusal_body(|refused| {
            let secs = refused.retry_after().unwrap_or_default().as_secs();
            (
                http::HeaderValue::from_static("text/plain"),
                format!("slow down for {secs}s").into(),
            )
        }),
    );
    let (listener, addr) = listener().await;
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    assert_eq!(fetch(addr).await.0, StatusCode::OK);
    let (status, headers, body) = fetch(addr).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["content-type"], "text/plain");
    assert!(headers.contains_key("retry-after"));
    assert!(body.starts_with("slow down for "), "{body}");
}

/// Item 4: an HTTP response fallback inside axum's `route_service` (which wants the
/// service `Send + Sync`), answering a breaker's rejections.
#[tokio::test]
async fn an_http_response_fallback_serves_in_route_service() {
    use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    use seawall::fallback::{FallbackLayer, is_circuit_open};
    use tower::ServiceBuilder;

    type Res = http::Response<axum::body::Body>;
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::default());
    breaker.breaker().force_open();
    let mut headers = HeaderMap::new();
    headers.insert("x-fallback", http::HeaderValue::from_static("1"));
    let stock = ServiceBuilder::new()
        .layer(axum::error_handling::HandleErrorLayer::new(
            seawall::problem::handle_error,
        ))
        .layer(
            FallbackLayer::response(StatusCode::OK, headers, r#"{"stock":null}"#)
                .content_type(http::HeaderValue::from_static("application/json"))
                .when(is_circuit_open),
        )
        .layer(breaker)
        .service_fn(|_: Request<axum::body::Body>| async {
            Ok::<Res, seawall::BoxError>(http::Response::new(axum::body::Body::from("3")))
        });
    let app = Router::new().route_service("/stock", stock);
    let (listener, addr) = listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await });
    for _ in 0..2 {
        let (status, headers, body) = fetch_path(addr, "/stock").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-fallback"], "1");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body, r#"{"stock":null}"#);
    }
}
