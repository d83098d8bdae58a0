//! The HTTP rate-limit layer over loopback: a real hyper server and client, checking
//! status codes and every header value. Limiters run on a manual clock, so the figures
//! are exact.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
use seawall::rate_limit::{KeyedRateLimiter, ManualClock, Quota, Rate, RateLimiter};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

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
    assert_eq!(body, "", "the 429 body is the body type's default");
    assert_eq!(one(&h, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        all(&h, "ratelimit-policy"),
        ["\"per-ip\";q=2;w=2", "\"global\";q=100;w=1"]
    );
    // The global layer (outside) admitted it before the per-client one refused it.
    assert_eq!(
        all(&h, "ratelimit"),
        ["\"per-ip\";r=0;t=1", "\"global\";r=97;t=1"]
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
