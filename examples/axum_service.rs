//! seawall in an axum 0.8 service: a per-IP limit read from axum's `ConnectInfo`, an
//! upstream client with a circuit breaker, an HTTP fallback and a timeout, and errors
//! answered the HTTP way (RFC 9457 `application/problem+json`).
//!
//! ```text
//! cargo run --example axum_service --features axum
//! ```
//!
//! It starts, on loopback ports, an "inventory" upstream that can be made to fail or hang
//! and the service under test:
//!
//! ```text
//! Router (served with into_make_service_with_connect_info::<SocketAddr>)
//!   HttpRateLimitLayer::per_key   "per-ip": 10 a minute, burst 10, ClientIp::peer()
//!   /stock  HandleErrorLayer(seawall::problem::handle_error)
//!             FallbackLayer::response(200, {"stock":null}).when(is_circuit_open)
//!               CircuitBreakerLayer "inventory": over the last 3 calls, opens at 50 % failed, for 30 s
//!                 timeout 300 ms
//!                   hyper-util client -> inventory (a 5xx is an error: a failure)
//! ```
//!
//! It then acts as its own client and checks: a healthy answer with rate-limit headers;
//! `502` problems while the upstream fails, then the fallback once the breaker opens; a
//! `504` when the upstream hangs; a `429` with `Retry-After` past the per-IP limit. It ends
//! in about a second, and exits non-zero if a check fails (CI runs it).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use seawall::BoxError;
use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow};
use seawall::fallback::{FallbackLayer, is_circuit_open};
use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate};
use tower::ServiceBuilder;

const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const HANGING: u8 = 2;

/// The upstream: `3 left`, a 500, or no answer for 10 s, as `mode` says.
async fn inventory(mode: Arc<AtomicU8>) -> Result<SocketAddr, BoxError> {
    let app = Router::new().route(
        "/stock",
        get(move || {
            let mode = mode.clone();
            async move {
                match mode.load(Ordering::SeqCst) {
                    HEALTHY => (StatusCode::OK, "3 left"),
                    FAILING => (StatusCode::INTERNAL_SERVER_ERROR, "broken"),
                    _ => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        (StatusCode::OK, "late")
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// The service under test.
fn app(upstream: SocketAddr) -> Result<Router, BoxError> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let call_upstream = move |_: Request<Body>| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{upstream}/stock")).body(Empty::new())?;
            let resp = client.request(req).await?;
            if resp.status().is_server_error() {
                return Err::<Response<Body>, BoxError>(
                    format!("inventory answered {}", resp.status()).into(),
                );
            }
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(parts, Body::new(body)))
        }
    };
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .name("inventory")
            .sliding_window(SlidingWindow::count_based(3))
            .minimum_calls(3)
            .wait_in_open(Duration::from_secs(30))
            .build()?,
    );
    let stock = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(seawall::problem::handle_error))
        .layer(
            FallbackLayer::response(StatusCode::OK, HeaderMap::new(), r#"{"stock":null}"#)
                .content_type(HeaderValue::from_static("application/json"))
                .when(is_circuit_open),
        )
        .layer(breaker)
        .timeout(Duration::from_millis(300))
        .service_fn(call_upstream);
    let per_ip = KeyedRateLimiter::<std::net::IpAddr>::new(Quota::new(Rate::per_minute(10), 10)?);
    Ok(Router::new()
        .route_service("/stock", stock)
        .layer(HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).name("per-ip")))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn fetch(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr) -> Answer {
    let req = Request::get(format!("http://{addr}/stock"))
        .body(Empty::new())
        .expect("a valid request");
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .expect("an answer within 5 s")
        .expect("an answer");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
    println!("GET /stock -> {status} {body}");
    Answer {
        status,
        headers,
        body,
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let mode = Arc::new(AtomicU8::new(HEALTHY));
    let upstream = inventory(mode.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = app(upstream)?.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let mut failures = Vec::new();
    let mut check = |ok: bool, what: &str| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failures.push(what.to_owned());
        }
    };
    let problem = |a: &Answer| {
        a.headers
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json")
    };

    let a = fetch(&client, addr).await;
    check(
        a.status == StatusCode::OK && a.body == "3 left" && a.headers.contains_key("ratelimit"),
        "healthy: 200 with RateLimit headers",
    );

    // Failures until the breaker opens (with the healthy call, 2 of 3 fail: 67 % over the
    // 50 % threshold), then the fallback.
    mode.store(FAILING, Ordering::SeqCst);
    let (mut bad_gateways, mut fell_back) = (0, false);
    for _ in 0..5 {
        let a = fetch(&client, addr).await;
        if a.status == StatusCode::BAD_GATEWAY && problem(&a) {
            bad_gateways += 1;
        } else {
            fell_back = a.status == StatusCode::OK && a.body == r#"{"stock":null}"#;
            break;
        }
    }
    check(
        bad_gateways == 2,
        "failing upstream: 502 problem+json, twice",
    );
    check(fell_back, "breaker open: the fallback answers");

    // The breaker is open for 30 s: a fresh app to show the timeout.
    mode.store(HANGING, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hanging = listener.local_addr()?;
    let service = app(upstream)?.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    let a = fetch(&client, hanging).await;
    check(
        a.status == StatusCode::GATEWAY_TIMEOUT && problem(&a),
        "hanging upstream: 504 problem+json",
    );

    // Four requests so far on the first app; the limit is 10 a minute per IP.
    let mut refused = None;
    for _ in 0..10 {
        let a = fetch(&client, addr).await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(a);
            break;
        }
    }
    check(
        refused.is_some_and(|a| a.headers.contains_key("retry-after") && problem(&a)),
        "past the per-IP limit: 429 with Retry-After, problem+json",
    );

    if failures.is_empty() {
        println!("all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} check(s) failed: {failures:?}", failures.len());
        Ok(ExitCode::FAILURE)
    }
}
