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
