//! seawall in an axum 0.8 service: a per-IP limit read from axum's `ConnectInfo`, per-API-key
//! tiers, an upstream client with a circuit breaker, an HTTP fallback, a timeout and the
//! upstream's `Retry-After` honoured, and errors answered the HTTP way (RFC 9457
//! `application/problem+json`).
//!
//! ```text
//! cargo run --example axum_service --features axum,metrics
//! ```
//!
//! It starts, on loopback ports, an "inventory" upstream that can be made to fail, hang or
//! throttle its callers, and the service under test:
//!
//! ```text
//! Router (served with into_make_service_with_connect_info::<SocketAddr>)
//!   HttpRateLimitLayer::per_key   "per-ip": 10 a minute, burst 10, ClientIp::peer()
//!   /stock   HandleErrorLayer(seawall::problem::handle_error)
//!              FallbackLayer::response(200, {"stock":null}).when(is_circuit_open)
//!                RetryAfterLayer: after the upstream's 429 + Retry-After, hold off
//!                  CircuitBreakerLayer "inventory": over the last 3 calls, opens at 50 % failed, for 30 s
//!                    timeout 300 ms
//!                      hyper-util client -> inventory (a 5xx is an error: a failure)
//!   /report  HttpRateLimitLayer::per_key "tier": by x-api-key, gold-* keys 100 a minute,
//!            others 3; requests without a key share one bucket (OnMissingKey::Shared)
//!   /metrics Prometheus text: the breaker's and the limiters' series, reported through the
//!            `metrics` facade to metrics-exporter-prometheus's recorder
//! ```
//!
//! It then acts as its own client and checks: a healthy answer with rate-limit headers;
//! `502` problems while the upstream fails, then the fallback once the breaker opens; a
//! `504` when the upstream hangs; the upstream's `429` passed on, then `503` with
//! `Retry-After` without calling it again while it asked to be left alone; a `429` with
//! `Retry-After` past the per-IP limit; a basic API key limited where a gold one is not;
//! `/metrics` showing the breaker's trip and the limiters' refusals.
//! It ends in about a second, and exits non-zero if a check fails (CI runs it).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
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
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use seawall::BoxError;
use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow};
use seawall::fallback::{FallbackLayer, is_circuit_open};
use seawall::rate_limit::http::{ClientIp, HeaderKey, HttpRateLimitLayer, RetryAfterLayer};
use seawall::rate_limit::{BoundedKey, KeyedRateLimiter, OnMissingKey, Quota, Rate};
use tower::ServiceBuilder;

const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const HANGING: u8 = 2;
const THROTTLING: u8 = 3;

/// The upstream: `3 left`, a 500, no answer for 10 s, or a 429 asking its callers to come
/// back in 30 s, as `mode` says; `hits` counts the requests that reached it.
async fn inventory(mode: Arc<AtomicU8>, hits: Arc<AtomicUsize>) -> Result<SocketAddr, BoxError> {
    let app = Router::new().route(
        "/stock",
        get(move || {
            let mode = mode.clone();
            hits.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut headers = HeaderMap::new();
                let (status, body) = match mode.load(Ordering::SeqCst) {
                    HEALTHY => (StatusCode::OK, "3 left"),
                    FAILING => (StatusCode::INTERNAL_SERVER_ERROR, "broken"),
                    THROTTLING => {
                        headers.insert("retry-after", HeaderValue::from_static("30"));
                        (StatusCode::TOO_MANY_REQUESTS, "slow down")
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        (StatusCode::OK, "late")
                    }
                };
                (status, headers, body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// The service under test.
fn app(upstream: SocketAddr, metrics: PrometheusHandle) -> Result<Router, BoxError> {
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
        // Outside the breaker: holding off is our own choice, not the upstream failing.
        .layer(RetryAfterLayer::new())
        .layer(breaker)
        .timeout(Duration::from_millis(300))
        .service_fn(call_upstream);
    // Tiers by API key: gold keys get 100 requests a minute, the others 3.
    let tiers = KeyedRateLimiter::<BoundedKey>::builder(Quota::new(Rate::per_minute(3), 3)?)
        .name("tier")
        .build();
    let gold = Quota::new(Rate::per_minute(100), 100)?;
    let basic = Quota::new(Rate::per_minute(3), 3)?;
    tiers.set_quota_fn(move |key: &BoundedKey| match key.as_inline() {
        Some(k) if k.starts_with(b"gold-") => gold,
        _ => basic,
    });
    let report = Router::new()
        .route("/report", get(|| async { "report" }))
        .layer(
            HttpRateLimitLayer::per_key(
                tiers,
                HeaderKey(http::HeaderName::from_static("x-api-key")),
            )
            .on_missing_key(OnMissingKey::Shared)
            .name("tier"),
        );
    let per_ip = KeyedRateLimiter::<std::net::IpAddr>::new(Quota::new(Rate::per_minute(10), 10)?);
    Ok(Router::new()
        .route_service("/stock", stock)
        .layer(HttpRateLimitLayer::per_key(per_ip, ClientIp::peer()).name("per-ip"))
        .merge(report)
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        ))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn fetch(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr) -> Answer {
    fetch_with(client, addr, "/stock", None).await
}

async fn fetch_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    api_key: Option<&str>,
) -> Answer {
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(key) = api_key {
        req = req.header("x-api-key", key);
    }
    let req = req.body(Empty::new()).expect("a valid request");
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .expect("an answer within 5 s")
        .expect("an answer");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
    println!(
        "GET {path} ({}) -> {status} {body}",
        api_key.unwrap_or("no key")
    );
    Answer {
        status,
        headers,
        body,
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    // The recorder first: breakers and limiters register their series when built.
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let mode = Arc::new(AtomicU8::new(HEALTHY));
    let hits = Arc::new(AtomicUsize::new(0));
    let upstream = inventory(mode.clone(), hits.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service =
        app(upstream, metrics.clone())?.into_make_service_with_connect_info::<SocketAddr>();
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
    let service =
        app(upstream, metrics.clone())?.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    let a = fetch(&client, hanging).await;
    check(
        a.status == StatusCode::GATEWAY_TIMEOUT && problem(&a),
        "hanging upstream: 504 problem+json",
    );

    // The upstream throttles: its 429 is passed on once, then we hold off as it asked.
    mode.store(THROTTLING, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let throttled = listener.local_addr()?;
    let service =
        app(upstream, metrics.clone())?.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    let first = fetch(&client, throttled).await;
    let before = hits.load(Ordering::SeqCst);
    let second = fetch(&client, throttled).await;
    check(
        first.status == StatusCode::TOO_MANY_REQUESTS,
        "throttling upstream: its 429 passed on",
    );
    check(
        second.status == StatusCode::SERVICE_UNAVAILABLE
            && problem(&second)
            && second
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .is_some_and(|s| (29..=30).contains(&s))
            && hits.load(Ordering::SeqCst) == before,
        "then 503 with the upstream's Retry-After, without calling it",
    );

    // Tiers: a basic key gets 3 reports a minute, a gold key many more.
    let mut basic = Vec::new();
    for _ in 0..4 {
        basic.push(
            fetch_with(&client, addr, "/report", Some("basic-7"))
                .await
                .status,
        );
    }
    check(
        basic
            == [
                StatusCode::OK,
                StatusCode::OK,
                StatusCode::OK,
                StatusCode::TOO_MANY_REQUESTS,
            ],
        "basic API key: 429 after 3",
    );
    let mut gold_ok = true;
    for _ in 0..10 {
        gold_ok &= fetch_with(&client, addr, "/report", Some("gold-1"))
            .await
            .status
            == StatusCode::OK;
    }
    check(gold_ok, "gold API key: 10 reports, all admitted");

    // Four requests so far on the first app's /stock; the limit is 10 a minute per IP.
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

    // One metrics path: the breaker and the limiters, through the `metrics` facade.
    let m = fetch_with(&client, addr, "/metrics", None).await;
    let has = |needle: &str| m.body.lines().any(|l| l.contains(needle));
    check(
        has(
            "seawall_circuit_breaker_transitions_total{breaker=\"inventory\",from=\"closed\",to=\"open\"} 1",
        ) && has("seawall_rate_limit_decisions_total{limiter=\"tier\",decision=\"refused\"}"),
        "/metrics: the breaker's trip and the tier limiter's refusals",
    );

    if failures.is_empty() {
        println!("all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} check(s) failed: {failures:?}", failures.len());
        Ok(ExitCode::FAILURE)
    }
}
