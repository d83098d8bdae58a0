//! The gateway as a `tower::Service` (issue 13, item 7): nested in a real axum router
//! served over loopback, served by a hyper server the test writes, and one route on its
//! own; the peer found in the request's extensions; the gateway's own answers in RFC 9457
//! problem+json (item 2). The upstream is an axum app that echoes what reached it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request as AxumRequest;
use axum::routing::{any, get};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::discovery::{Instance, Registry};
use seawall::gateway::{Discovery, Gateway, GatewayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceExt;

const BOUND: Duration = Duration::from_secs(10);

/// An upstream answering `{"path": …, "xff": …}` with what it received.
async fn echo_upstream(hits: Arc<AtomicUsize>) -> SocketAddr {
    let app = Router::new().fallback(any(move |req: AxumRequest| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let xff = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            serde_json::json!({
                "path": "",
                "xff": xff,
                "body_len": body.map(|b| b.len()).unwrap_or(usize::MAX),
            })
            .to_string()
        }
    }));
    // The path, separately: the fallback above cannot see it once moved.
    let app = Router::new()
        .route(
            "/whoami",
            get(|headers: HeaderMap| async move {
                let xff = headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                serde_json::json!({ "path": "/whoami", "xff": xff }).to_string()
            }),
        )
        .merge(app);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

const CONFIG: &str = r#"
[gateway]
listen = "127.0.0.1:0"

[[routes]]
name = "open"
path_prefix = "/api/open"
service = "svc"
strip_prefix = true

[[routes]]
name = "per-ip"
path_prefix = "/api/limited"
service = "svc"
strip_prefix = true
rate_limit = { per_client = { per_second = 1, burst = 1 } }

[[routes]]
name = "dead"
path_prefix = "/api/dead"
service = "nowhere"
timeout = "1s"
breaker = { failure_rate = 0.5, window = 2, minimum_calls = 2, wait_in_open = "30s" }
"#;

async fn build(upstream: SocketAddr) -> Gateway {
    let registry = Registry::new();
    std::mem::forget(registry.register(Instance::local("svc", upstream)));
    // A port nothing listens on: every call is refused.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    std::mem::forget(registry.register(Instance::local("nowhere", dead)));
    Gateway::build(
        GatewayConfig::from_toml_str(CONFIG).unwrap(),
        Discovery::Registry(registry),
    )
    .await
    .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

async fn get_path(addr: SocketAddr, path: &str) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(BOUND, client.request(req))
        .await
        .expect("answered in time")
        .unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The gateway nested in an axum router, served with connect info: routed on the path
/// under the nest, the peer's address forwarded, per-IP limits keyed on it. Before, the
/// gateway was no `Service` and could not be nested at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_in_an_axum_router_with_connect_info() {
    let hits = Arc::new(AtomicUsize::new(0));
    let gateway = build(echo_upstream(hits.clone()).await).await;
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .nest_service("/gw", gateway.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    assert_eq!(get_path(addr, "/health").await.body, "ok");
    let a = get_path(addr, "/gw/api/open/whoami").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        a.json()["path"],
        "/whoami",
        "nest and route prefix stripped"
    );
    assert_eq!(
        a.json()["xff"],
        "127.0.0.1",
        "the peer, from axum's connect info"
    );

    // Per-IP limit: burst 1.
    assert_eq!(
        get_path(addr, "/gw/api/limited/whoami").await.status,
        StatusCode::OK
    );
    let refused = get_path(addr, "/gw/api/limited/whoami").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers.contains_key("retry-after"));

    // The gateway's own answers are problem+json.
    let missing = get_path(addr, "/gw/nothing-here").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.headers["content-type"], "application/problem+json");
    assert_eq!(missing.json()["status"], 404);
    assert_eq!(missing.json()["detail"], "no route");
    assert_eq!(gateway.status().routes[0].requests, 1);
}

/// Served without connect info, the gateway knows no peer: nothing is forwarded as the
/// client's address, and a per-IP limit refuses with 500 instead of letting requests
/// through unlimited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_peer_per_ip_limits_refuse_rather_than_pass() {
    let hits = Arc::new(AtomicUsize::new(0));
    let gateway = build(echo_upstream(hits.clone()).await).await;
    let app = Router::new().nest_service("/gw", gateway);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let a = get_path(addr, "/gw/api/open/whoami").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["xff"], "", "no address to forward");
    let before = hits.load(Ordering::SeqCst);
    for _ in 0..3 {
        let refused = get_path(addr, "/gw/api/limited/whoami").await;
        assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(refused.headers["content-type"], "application/problem+json");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "never reached the upstream"
    );
}

/// The same refusal to a gRPC caller: a trailers-only `INTERNAL` (gRPC's code for HTTP's
/// `500`) with the reason in `grpc-message`, as every other answer the gateway makes
/// itself; before, the limiter's `500` and its JSON body went out as they were, which a
/// gRPC client reads as a broken response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_peer_a_grpc_caller_gets_the_refusal_as_a_grpc_status() {
    let hits = Arc::new(AtomicUsize::new(0));
    let gateway = build(echo_upstream(hits.clone()).await).await;
    let app = Router::new().nest_service("/gw", gateway);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(format!("http://{addr}/gw/api/limited/svc.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = tokio::time::timeout(BOUND, client.request(request))
        .await
        .expect("answered in time")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(parts.status, StatusCode::OK, "{parts:?}");
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(parts.headers["grpc-status"], "13", "{parts:?}");
    let message = parts.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("rate limit key"), "{message}");
    assert!(body.is_empty(), "{body:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "never reached the upstream");
}

/// A breaker opened by a dead upstream: `503` problem+json with `Retry-After`, as
/// `seawall::problem` answers an open breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_is_503_with_retry_after() {
    let gateway = build(echo_upstream(Arc::default()).await).await;
    let request = || {
        Request::get("/api/dead/x")
            .header("host", "gw")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    for _ in 0..2 {
        let r = gateway.clone().oneshot(request()).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = gateway.clone().oneshot(request()).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 503);
}

/// Served by a hyper server the test writes (inserting the peer as a `SocketAddr`): a
/// client's truncated body is its own fault, answered 400 and never counted against the
/// upstream, through a body type that is not the gateway's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_by_another_server_client_faults_stay_the_clients() {
    let hits = Arc::new(AtomicUsize::new(0));
    let gateway = build(echo_upstream(hits.clone()).await).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = gateway.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let gateway = served.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let gateway = gateway.clone();
                        req.extensions_mut().insert(peer);
                        // Another body type than hyper's: mapped, as a framework would.
                        let req = req.map(|b| b.map_err(boxed));
                        async move { Ok::<_, Infallible>(gateway.oneshot(req).await.unwrap()) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    // Healthy first, with the peer forwarded.
    let a = get_path(addr, "/api/open/whoami").await;
    assert_eq!(a.json()["xff"], "127.0.0.1");
    // Truncated chunked uploads: the client's fault.
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /api/open/upload HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        )
        .await
        .unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut answer)).await;
    }
    let status = gateway.status();
    let open = &status.routes[0];
    assert!(open.client_errors.bad_body >= 1, "{:?}", open.client_errors);
    assert!(
        open.endpoints.iter().all(|e| e.failures == 0 && !e.ejected),
        "client faults never count against the upstream: {:?}",
        open.endpoints
    );
    assert_eq!(
        get_path(addr, "/api/open/whoami").await.status,
        StatusCode::OK
    );
}

fn boxed(e: hyper::Error) -> seawall::BoxError {
    Box::new(e)
}

/// One route as a service of its own, mounted where the application wants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_route_as_a_service() {
    let gateway = build(echo_upstream(Arc::default()).await).await;
    assert!(gateway.route("missing").is_none());
    let open = gateway.route("open").expect("the route");
    let request = Request::get("/api/open/whoami")
        .header("host", "gw")
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = open.clone().oneshot(request).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["path"], "/whoami");
    // Its checks hold: no Host, 400.
    let bad = Request::get("/api/open/whoami")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(
        open.oneshot(bad).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

/// `CONNECT` asks for a tunnel, which the gateway does not make: its own servers refuse
/// it (`501` over HTTP/1, never proxied; CHANGELOG, SECURITY.md), and `Gateway::handle`
/// and the `Service` answer "as the proxy listener does". Nested in an axum router (the
/// documented embedding), an origin-form `CONNECT` must be refused too, not proxied: an
/// upstream's `2xx` to it makes hyper's server (and the client) take the connection for
/// an established tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_the_service_is_refused_and_never_proxied() {
    let hits = Arc::new(AtomicUsize::new(0));
    let gateway = build(echo_upstream(hits.clone()).await).await;
    let app = Router::new().nest_service("/gw", gateway.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"CONNECT /gw/api/open/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // The head is enough: read until it is whole (or the connection ends).
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(BOUND, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status: u16 = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "CONNECT reached the upstream; the client got: {answer:?}"
    );
    assert!(
        matches!(status, 400 | 405 | 501),
        "CONNECT answered {status} (a 2xx is a tunnel to the client): {answer:?}"
    );

    // The same through the `Service` called directly.
    let connect = Request::builder()
        .method(http::Method::CONNECT)
        .uri("/api/open/x")
        .header("host", "gw")
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = gateway.clone().oneshot(connect).await.unwrap();
    assert!(
        matches!(r.status().as_u16(), 400 | 405 | 501),
        "CONNECT through the Service answered {}",
        r.status()
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "CONNECT reached the upstream"
    );
}
