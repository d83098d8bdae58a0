//! End to end over loopback: real hyper upstreams registered in the in-process `Registry`,
//! the gateway in front of them, and an HTTP client. Every wait is bounded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use seawall::discovery::{Instance, Registration, Registry};
use seawall::gateway::jwt::JwtVerifier;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle, GatewayStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const BOUND: Duration = Duration::from_secs(10);
const OK: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;
/// Holds each request until [`Upstream::release`], then answers as `OK` does.
const HOLD: u8 = 3;
/// Answers `429 Too Many Requests` itself.
const BUSY: u8 = 4;
const SECRET: &str = "a test secret of at least 32 bytes";

/// One upstream instance: answers with its name, the path and query it saw, and the
/// `x-forwarded-for` it got; or 500, or never, or once released, depending on its mode.
struct Upstream {
    name: String,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Requests that reached it (counted on arrival, before the mode applies).
    hits: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    /// Opened by [`Upstream::release`]: held requests (mode `HOLD`) wait for it.
    gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn upstream(name: &str) -> Upstream {
    upstream_at(name, "127.0.0.1:0".parse().unwrap(), Arc::default()).await
}

async fn upstream_at(name: &str, addr: SocketAddr, mode: Arc<AtomicU8>) -> Upstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let gate = watch::Sender::new(false);
    let (n, m, h, f, g) = (
        name.to_owned(),
        mode.clone(),
        hits.clone(),
        failures.clone(),
        gate.subscribe(),
    );
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let (n, m, h, f, g) = (n.clone(), m.clone(), h.clone(), f.clone(), g.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (n, m, h, f, mut g) = (n.clone(), m.clone(), h.clone(), f.clone(), g.clone());
                async move {
                    h.fetch_add(1, SeqCst);
                    match m.load(SeqCst) {
                        FAIL => {
                            f.fetch_add(1, SeqCst);
                            let mut r = Response::new(Full::new(Bytes::from("boom")));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            return Ok::<_, Infallible>(r);
                        }
                        HANG => std::future::pending::<()>().await,
                        BUSY => {
                            let mut r = Response::new(Full::new(Bytes::from("slow down")));
                            *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                            return Ok(r);
                        }
                        HOLD => {
                            // Let through as well once the `Upstream`, and its gate, are gone.
                            let _ = g.wait_for(|open| *open).await;
                        }
                        OK => {}
                        _ => unreachable!("unknown mode"),
                    }
                    let body = serde_json::json!({
                        "instance": n,
                        "path": req.uri().path(),
                        "query": req.uri().query(),
                        "xff": req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()),
                        "connection": req.headers().get("x-hop").is_some(),
                    });
                    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
                }
            });
            connections.spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    Upstream {
        name: name.to_owned(),
        addr,
        mode,
        hits,
        failures,
        gate,
        task,
    }
}

impl Upstream {
    fn register(&self, registry: &Registry, service: &str) -> Registration {
        registry.register(Instance::local(service, self.addr))
    }

    /// Kills the server and returns once it is gone, with its connections: `abort` alone
    /// only asks, and on a multi-thread runtime a pooled connection would still answer
    /// until a worker drops the task.
    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    async fn restart(&self) -> Upstream {
        upstream_at(&self.name, self.addr, self.mode.clone()).await
    }

    /// Lets every request held by mode `HOLD` answer, and the next ones through at once.
    fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Waits until `n` requests have reached this upstream.
    async fn wait_for_hits(&self, n: usize) {
        timeout(BOUND, async {
            while self.hits.load(SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} of {n} requests reached upstream {}",
                self.hits.load(SeqCst),
                self.name
            )
        });
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// A client whose connections come from `local` (any of 127.0.0.0/8 on loopback).
fn client_from(local: &str) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(local.parse().unwrap()));
    Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    fn is_fallback(&self) -> bool {
        self.headers.contains_key("x-seawall-fallback")
    }
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Answer {
    timeout(BOUND, async {
        let response = client.request(req).await.expect("the gateway answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
    .expect("a request hung past its bound")
}

async fn get(client: &HttpClient, gw: &GatewayHandle, path: &str) -> Answer {
    send(client, get_request(gw.local_addr(), path)).await
}

/// A GET of `path` from the gateway at `addr`.
fn get_request(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

async fn gateway(config: &str, registry: &Registry) -> GatewayHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    build(config, registry).await.spawn(listener)
}

/// The gateway of `config` over `registry`, not yet serving.
async fn build(config: &str, registry: &Registry) -> Gateway {
    let config = GatewayConfig::from_toml_str(config).unwrap();
    Gateway::build(config, Discovery::Registry(registry.clone()))
        .await
        .unwrap()
}

/// The gateway's status (the admin endpoints are not on the proxy listener).
async fn status(_client: &HttpClient, gw: &GatewayHandle) -> GatewayStatus {
    gw.gateway().status()
}

const HEAD: &str = "[gateway]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_and_strips_it() {
    let registry = Registry::new();
    let (a, b, o) = (
        upstream("a").await,
        upstream("b").await,
        upstream("o").await,
    );
    let _r = [
        a.register(&registry, "users"),
        b.register(&registry, "users"),
        o.register(&registry, "orders"),
    ];
    let config = format!(
        "{HEAD}
[[routes]]
name = \"users\"
path_prefix = \"/api/users\"
service = \"users\"
strip_prefix = true

[[routes]]
name = \"api\"
path_prefix = \"/api\"
service = \"orders\"
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();

    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let answer = get(&http, &gw, "/api/users/42?x=1").await;
        assert_eq!(answer.status, StatusCode::OK);
        let json = answer.json();
        assert_eq!(json["path"], "/42");
        assert_eq!(json["query"], "x=1");
        assert_eq!(json["xff"], "127.0.0.1");
        seen.insert(json["instance"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "both instances served: {seen:?}");
    let answer = get(&http, &gw, "/api/users").await;
    assert_eq!(answer.json()["path"], "/");
    // Not on a segment boundary: the shorter prefix, not stripped.
    let answer = get(&http, &gw, "/api/usersx").await;
    assert_eq!(answer.json()["instance"], "o");
    assert_eq!(answer.json()["path"], "/api/usersx");
    // Hop-by-hop headers named by Connection are dropped; a client's own XFF is replaced
    // (it is no trusted proxy).
    let req = Request::get(format!("http://{}/api/orders", gw.local_addr()))
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-forwarded-for", "203.0.113.7")
        .body(Full::default())
        .unwrap();
    let json = send(&http, req).await.json();
    assert_eq!(json["connection"], false);
    assert_eq!(json["xff"], "127.0.0.1");

    let answer = get(&http, &gw, "/nowhere").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["detail"], "no route");

    let s = status(&http, &gw).await;
    assert_eq!(s.unmatched, 1);
    assert_eq!(s.routes[0].requests, 21);
    assert_eq!(s.routes[0].responses.success, 21);
    assert_eq!(s.routes[0].endpoints.len(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_and_per_client_limits_answer_429_with_headers() {
    let registry = Registry::new();
    let a = upstream("a").await;
    let busy = upstream("busy").await;
    busy.mode.store(BUSY, SeqCst);
    let _r = (
        a.register(&registry, "g"),
        a.register(&registry, "c"),
        busy.register(&registry, "b"),
    );
    let config = format!(
        "{HEAD}
[[routes]]
name = \"global\"
path_prefix = \"/g\"
service = \"g\"
rate_limit = {{ global = {{ per_second = 1, burst = 3 }} }}

[[routes]]
name = \"busy\"
path_prefix = \"/b\"
service = \"b\"
rate_limit = {{ global = {{ per_second = 100, burst = 100 }} }}

[[routes]]
name = \"hidden\"
path_prefix = \"/h\"
service = \"g\"
rate_limit = {{ global = {{ per_second = 1, burst = 1 }}, hide_client_headers = true }}

[[routes]]
name = \"tenant\"
path_prefix = \"/t\"
service = \"g\"
rate_limit = {{ per_client = {{ per_second = 1, burst = 1, key = \"header:host\" }} }}

[[routes]]
name = \"client\"
path_prefix = \"/c\"
service = \"c\"
rate_limit = {{ per_client = {{ per_second = 1, burst = 2, key = \"header:x-api-key\" }} }}
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();

    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..5 {
        let answer = get(&http, &gw, "/g").await;
        statuses.push(answer.status);
        assert!(answer.headers.contains_key("ratelimit-policy"));
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
        }
    }
    assert_eq!(&statuses[..3], &[StatusCode::OK; 3]);
    let refused = refused.expect("a 429 after the burst");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(refused.headers["ratelimit-policy"], "\"global\";q=3;w=3");
    assert!(
        refused.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"global\";r=0")
    );

    let keyed = |key: &'static str| {
        Request::get(format!("http://{}/c", gw.local_addr()))
            .header("x-api-key", key)
            .body(Full::default())
            .unwrap()
    };
    let mut alice = Vec::new();
    for _ in 0..4 {
        alice.push(send(&http, keyed("alice")).await.status);
    }
    assert_eq!(&alice[..2], &[StatusCode::OK; 2]);
    assert!(alice.contains(&StatusCode::TOO_MANY_REQUESTS), "{alice:?}");
    let bob = send(&http, keyed("bob")).await;
    assert_eq!(
        bob.status,
        StatusCode::OK,
        "another client has its own bucket"
    );

    // The upstream's own 429 passes through, with the gateway's headers, and is not
    // counted as the gateway's.
    for _ in 0..3 {
        let answer = get(&http, &gw, "/b").await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.body, "slow down");
        assert!(answer.headers.contains_key("ratelimit"));
    }

    // Hidden limits: no RateLimit headers, only Retry-After on the 429.
    let admitted = get(&http, &gw, "/h").await;
    assert_eq!(admitted.status, StatusCode::OK);
    assert!(!admitted.headers.contains_key("ratelimit"));
    assert!(!admitted.headers.contains_key("ratelimit-policy"));
    let refused = get(&http, &gw, "/h").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers.contains_key("retry-after"));
    for name in [
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
    ] {
        assert!(!refused.headers.contains_key(name), "{name}");
    }

    // Keyed on Host, which the gateway moves to X-Forwarded-Host for the upstream: the
    // limit sees the request as the client sent it.
    let tenant = |host: &'static str| {
        Request::get(format!("http://{}/t", gw.local_addr()))
            .header("host", host)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(
        send(&http, tenant("a.example")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&http, tenant("a.example")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&http, tenant("b.example")).await.status,
        StatusCode::OK
    );

    let s = status(&http, &gw).await;
    assert_eq!(s.routes[2].name, "hidden");
    assert_eq!(s.routes[2].rate_limited, 1);
    assert_eq!(s.routes[1].name, "busy");
    assert_eq!(
        s.routes[1].rate_limited, 0,
        "the upstream's 429s are not the gateway's"
    );
    assert_eq!(s.routes[1].requests, 3);
    let refused_g = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(s.routes[0].rate_limited, refused_g as u64);
    assert_eq!(s.routes[0].limits.global.as_ref().unwrap().burst, 3);
    assert_eq!(
        s.routes[4].limits.per_client.as_ref().unwrap().clients,
        Some(2)
    );
    assert_eq!(
        s.routes[3].limits.per_client.as_ref().unwrap().clients,
        Some(2)
    );
    let metrics = gw.gateway().metrics();
    assert!(
        metrics.contains(&format!(
            "seawall_gateway_rate_limited_total{{route=\"global\"}} {refused_g}"
        )),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_keyed_by_ip_give_each_peer_its_bucket() {
    let registry = Registry::new();
    let a = upstream("a").await;
    let _r = a.register(&registry, "ip");
    let config = format!(
        "{HEAD}
[[routes]]
name = \"ip\"
path_prefix = \"/ip\"
service = \"ip\"
rate_limit = {{ per_client = {{ per_second = 1, burst = 2 }} }}
"
    );
    let gw = gateway(&config, &registry).await;
    let (one, two) = (client_from("127.0.0.1"), client_from("127.0.0.2"));
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(get(&one, &gw, "/ip").await.status);
    }
    assert_eq!(
        first,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let other = get(&two, &gw, "/ip").await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "another peer has its own bucket"
    );
    assert_eq!(other.json()["xff"], "127.0.0.2");
    // Claiming another address in X-Forwarded-For buys no new bucket.
    let spoofed = Request::get(format!("http://{}/ip", gw.local_addr()))
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::default())
        .unwrap();
    assert_eq!(
        send(&one, spoofed).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    let s = status(&one, &gw).await;
    assert_eq!(
        s.routes[0].limits.per_client.as_ref().unwrap().clients,
        Some(2)
    );
    assert_eq!(s.routes[0].rate_limited, 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_routes_need_a_valid_token() {
    let registry = Registry::new();
    let a = upstream("a").await;
    let _r = a.register(&registry, "users");
    let config = format!(
        "{HEAD}
[auth.jwt]
secret = \"{SECRET}\"
issuer = \"seawall\"

[[routes]]
name = \"users\"
path_prefix = \"/users\"
service = \"users\"
auth = true
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    let with = |auth: Option<String>| {
        let mut req = Request::get(format!("http://{}/users", gw.local_addr()));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.body(Full::default()).unwrap()
    };
    let signer = JwtVerifier::new(SECRET.as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = signer.sign(&serde_json::json!({ "sub": "ada", "iss": "seawall", "exp": now + 60 }));
    let expired =
        signer.sign(&serde_json::json!({ "sub": "ada", "iss": "seawall", "exp": now - 60 }));
    let forged =
        JwtVerifier::new(b"some other secret!!").sign(&serde_json::json!({ "iss": "seawall" }));

    // RFC 6750 §3.1: no error code for a request without credentials (it used to get
    // `error="invalid_token"` as well).
    for (auth, what, challenge) in [
        (None, "missing bearer token", "Bearer"),
        (
            Some(format!("Bearer {expired}")),
            "token expired",
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {forged}")),
            "invalid signature",
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some("Bearer not.a.jwt".to_owned()),
            "malformed token",
            "Bearer error=\"invalid_token\"",
        ),
    ] {
        let answer = send(&http, with(auth)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers["www-authenticate"], challenge, "{what}");
        assert_eq!(answer.json()["detail"], what);
    }
    let answer = send(&http, with(Some(format!("Bearer {good}")))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        a.hits.load(SeqCst),
        1,
        "refused requests never reach the upstream"
    );
    let s = status(&http, &gw).await;
    assert_eq!(s.routes[0].unauthorized, 4);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_while_all_instances_are_down_then_recovery() {
    let registry = Registry::new();
    let (mut a, mut b) = (upstream("a").await, upstream("b").await);
    let _r = (
        a.register(&registry, "flaky"),
        b.register(&registry, "flaky"),
    );
    let config = format!(
        "{HEAD}
[[routes]]
name = \"flaky\"
path_prefix = \"/f\"
service = \"flaky\"
timeout = \"1s\"

[routes.breaker]
failure_rate = 0.5
minimum_calls = 2
window = 4
wait_in_open = \"300ms\"
permitted_in_half_open = 1

[routes.fallback]
status = 200
body = '{{\"cached\":true}}'

[routes.balance]
outlier = {{ consecutive_failures = 2, base_ejection = \"300ms\", max_ejected = 0.5 }}
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    assert!(!get(&http, &gw, "/f").await.is_fallback());

    a.kill().await;
    b.kill().await;
    for _ in 0..20 {
        let answer = get(&http, &gw, "/f").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.is_fallback(), "{}", answer.body);
        assert_eq!(answer.json()["cached"], true);
    }
    let s = status(&http, &gw).await;
    let route = &s.routes[0];
    assert_eq!(route.fallbacks, 20);
    assert!(
        route
            .endpoints
            .iter()
            .all(|e| e.breaker.as_deref() == Some("open")),
        "{:?}",
        route.endpoints
    );
    assert!(
        route.endpoints.iter().any(|e| e.ejections > 0),
        "{:?}",
        route.endpoints
    );
    assert_eq!(
        route.upstream_errors.unavailable + route.upstream_errors.bad_gateway,
        20
    );
    let metrics = gw.gateway().metrics();
    assert!(
        metrics.contains("seawall_gateway_fallbacks_total{route=\"flaky\"} 20"),
        "{metrics}"
    );
    assert!(metrics.contains("seawall_gateway_endpoint_breaker_open{route=\"flaky\""));

    let (_a2, _b2) = (a.restart().await, b.restart().await);
    let start = Instant::now();
    loop {
        let answer = get(&http, &gw, "/f").await;
        if !answer.is_fallback() && answer.status == StatusCode::OK {
            break;
        }
        assert!(start.elapsed() < BOUND, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Recovered: both breakers close again as traffic resumes.
    let start = Instant::now();
    loop {
        let _ = get(&http, &gw, "/f").await;
        let s = status(&http, &gw).await;
        if s.routes[0]
            .endpoints
            .iter()
            .all(|e| e.breaker.as_deref() == Some("closed"))
        {
            break;
        }
        assert!(
            start.elapsed() < BOUND,
            "breakers did not close: {:?}",
            s.routes[0].endpoints
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_is_cut_at_the_route_timeout() {
    let registry = Registry::new();
    let a = upstream("a").await;
    a.mode.store(HANG, SeqCst);
    let _r = a.register(&registry, "slow");
    let config = format!(
        "{HEAD}
[[routes]]
name = \"slow\"
path_prefix = \"/slow\"
service = \"slow\"
timeout = \"300ms\"
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, addr) = (http.clone(), gw.local_addr());
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let req = get_request(addr, "/slow");
            let answer = send(&http, req).await;
            (answer.status, answer.json(), start.elapsed())
        }));
    }
    for task in tasks {
        let (status, json, took) = task.await.unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(json["detail"], "upstream timed out");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
    let s = status(&http, &gw).await;
    assert_eq!(s.routes[0].upstream_errors.timeout, 8);
    assert_eq!(
        s.routes[0].endpoints[0].outstanding, 0,
        "cancelled calls are released"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_first_instance_are_all_served_when_it_comes() {
    const WAITING: usize = 8;
    let registry = Registry::new();
    let config = format!(
        "{HEAD}
[[routes]]
name = \"late\"
path_prefix = \"/late\"
service = \"late\"
timeout = \"30s\"
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    let started = Instant::now();
    let requests: Vec<_> = (0..WAITING)
        .map(|i| {
            let (http, addr) = (http.clone(), gw.local_addr());
            tokio::spawn(async move {
                let req = get_request(addr, &format!("/late/{i}"));
                send(&http, req).await
            })
        })
        .collect();
    // Every request reaches the route and waits on the empty balancer: none is answered.
    timeout(BOUND, async {
        while gw.gateway().status().routes[0].requests < WAITING as u64 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every request reaches the route");
    assert!(requests.iter().all(|r| !r.is_finished()));
    let a = upstream("a").await;
    let _r = a.register(&registry, "late");
    for r in requests {
        let answer = r.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.json()["instance"], "a");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the waiting requests were woken by the new instance, not by their timeout"
    );
    assert_eq!(a.hits.load(SeqCst), WAITING);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_do_not_panic() {
    let registry = Registry::new();
    let a = upstream("a").await;
    let _r = a.register(&registry, "any");
    let config = format!(
        "{HEAD}
[auth.jwt]
secret = \"{SECRET}\"

[[routes]]
name = \"any\"
path_prefix = \"/\"
service = \"any\"
auth = true
"
    );
    let gw = gateway(&config, &registry).await;
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ....\r\n\r\n",
        b"GET http://other.example/x?%%% HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = timeout(BOUND, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            head.is_empty() || head.starts_with("HTTP/1.1 400") || head.starts_with("HTTP/1.1 401"),
            "{head}"
        );
    }
    // Still serving (the route wants a token).
    let answer = get(&client(), &gw, "/x").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_an_instance_failing_mid_run_loses_nothing() {
    const REQUESTS: usize = 3_000;
    const CLIENTS: usize = 32;
    let registry = Registry::new();
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    ];
    let _r: Vec<_> = ups.iter().map(|u| u.register(&registry, "load")).collect();
    let config = format!(
        "{HEAD}
[[routes]]
name = \"load\"
path_prefix = \"/load\"
service = \"load\"
timeout = \"2s\"

[routes.breaker]
failure_rate = 0.5
minimum_calls = 5
window = 10
wait_in_open = \"5s\"

[routes.fallback]
status = 200
body = '{{\"fallback\":true}}'

[routes.balance]
outlier = {{ consecutive_failures = 3, base_ejection = \"5s\", max_ejected = 0.5 }}
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    let next = Arc::new(AtomicUsize::new(0));
    let fallbacks = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let bad = ups[2].mode.clone();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CLIENTS {
        let (http, addr) = (http.clone(), gw.local_addr());
        let (next, fallbacks, served, bad) =
            (next.clone(), fallbacks.clone(), served.clone(), bad.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= REQUESTS {
                    return;
                }
                if i == REQUESTS / 5 {
                    bad.store(FAIL, SeqCst); // instance c starts failing
                }
                let req = get_request(addr, &format!("/load/{i}"));
                let answer = send(&http, req).await;
                assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
                if answer.is_fallback() {
                    assert_eq!(answer.json()["fallback"], true);
                    fallbacks.fetch_add(1, SeqCst);
                } else {
                    assert_ne!(answer.json()["instance"], serde_json::Value::Null);
                    served.fetch_add(1, SeqCst);
                }
            }
        }));
    }
    for w in workers {
        timeout(Duration::from_secs(40), w)
            .await
            .expect("load test bounded")
            .unwrap();
    }
    let elapsed = start.elapsed();
    let (fallbacks, served) = (fallbacks.load(SeqCst), served.load(SeqCst));
    let injected = ups[2].failures.load(SeqCst);
    let s = status(&http, &gw).await;
    let route = &s.routes[0];
    eprintln!(
        "{REQUESTS} requests, {CLIENTS} clients: {elapsed:?} ({:.0} req/s), {served} served, \
         {fallbacks} fallbacks, {injected} injected faults, p50 {} ms, p99 {} ms",
        REQUESTS as f64 / elapsed.as_secs_f64(),
        route.latency_ms.p50,
        route.latency_ms.p99
    );
    assert_eq!(served + fallbacks, REQUESTS, "every request answered");
    assert_eq!(
        fallbacks, injected,
        "one fallback per injected fault, no more"
    );
    assert_eq!(route.fallbacks as usize, injected);
    assert_eq!(route.upstream_errors.server_error as usize, injected);
    assert_eq!(
        route.upstream_errors.bad_gateway + route.upstream_errors.timeout,
        0
    );
    assert_eq!(route.requests as usize, REQUESTS);
    assert!(
        injected > 0 && injected < 50,
        "the breaker and ejection cut the faults short: {injected}"
    );
    let c = route
        .endpoints
        .iter()
        .find(|e| e.address == ups[2].addr.to_string())
        .unwrap();
    assert!(c.ejected || c.breaker.as_deref() == Some("open"), "{c:?}");
    gw.shutdown().await;
}

/// A route to a service that holds its answers (`HOLD`), each answer bounded by `timeout`.
fn held_route(timeout: &str) -> String {
    format!(
        "{HEAD}
[[routes]]
name = \"slow\"
path_prefix = \"/slow\"
service = \"slow\"
timeout = \"{timeout}\"
"
    )
}

/// Whether a new connection to `addr` is turned away: refused, or closed without an answer.
/// `false` when answered: the gateway accepted it before it stopped.
async fn turned_away(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return true;
    };
    let request = b"GET /status.json HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return true;
    }
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer).await {
        Ok(_) => answer.is_empty(),
        Err(_) if answer.is_empty() => true,
        Err(e) => panic!(
            "an answer cut off ({e}): {}",
            String::from_utf8_lossy(&answer)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    const N: usize = 4;
    let registry = Registry::new();
    let a = upstream("a").await;
    a.mode.store(HOLD, SeqCst);
    let _r = a.register(&registry, "slow");
    let gw = gateway(&held_route("30s"), &registry).await;
    let addr = gw.local_addr();
    let mut requests = Vec::new();
    for i in 0..N {
        // A client each, so a connection each.
        let http = client();
        let req = get_request(addr, &format!("/slow/{i}"));
        requests.push(tokio::spawn(async move { send(&http, req).await }));
    }
    a.wait_for_hits(N).await;

    let mut shutdown = tokio::spawn(gw.shutdown());
    // (a) The listener goes: new connections are refused (or closed unanswered if the
    // gateway accepted them just before it stopped). Bounded well within the requests'
    // own bound, so that they are still held after.
    timeout(Duration::from_secs(5), async {
        while !turned_away(addr).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("new connections were neither refused nor closed within 5 s of shutdown()");
    // (b) The shutdown waits for the requests in flight, which are still held.
    assert!(
        timeout(Duration::from_millis(200), &mut shutdown)
            .await
            .is_err(),
        "the shutdown completed while requests were in flight"
    );
    for request in &requests {
        assert!(
            !request.is_finished(),
            "a request in flight ended before its upstream answered"
        );
    }
    assert_eq!(a.hits.load(SeqCst), N);

    // (c) Released, every one of them gets its full answer, and the shutdown completes.
    a.release();
    for (i, request) in requests.into_iter().enumerate() {
        let answer = timeout(BOUND, request)
            .await
            .expect("a request in flight hung after its upstream answered")
            .expect("a request in flight failed");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let json = answer.json();
        assert_eq!(json["instance"], "a", "{}", answer.body);
        assert_eq!(json["path"], format!("/slow/{i}"), "{}", answer.body);
    }
    timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the shutdown did not complete once the requests in flight were answered")
        .expect("the shutdown panicked");
    assert_eq!(a.hits.load(SeqCst), N);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_keep_alive_connections() {
    // Well under both the drain bound and the header read timeout (10 s each), which would
    // close the idle connection anyway.
    const PROMPT: Duration = Duration::from_secs(3);
    let registry = Registry::new();
    let a = upstream("a").await;
    let _r = a.register(&registry, "users");
    let config = format!(
        "{HEAD}
[[routes]]
name = \"users\"
path_prefix = \"/users\"
service = \"users\"
"
    );
    let gw = gateway(&config, &registry).await;
    let addr = gw.local_addr();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = timeout(
        BOUND,
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)),
    )
    .await
    .expect("the handshake hung")
    .unwrap();
    let mut connection = tokio::spawn(connection);
    let request = || {
        Request::get("/users/1")
            .header(http::header::HOST, addr.to_string())
            .body(Full::default())
            .unwrap()
    };
    let (status, body) = timeout(BOUND, async {
        let response = sender
            .send_request(request())
            .await
            .expect("the gateway answers");
        let status = response.status();
        let body = response.into_body().collect().await.expect("a body");
        (status, body.to_bytes())
    })
    .await
    .expect("the request hung");
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["instance"], "a");
    // Kept alive, and idle: ready for the next request.
    timeout(BOUND, sender.ready())
        .await
        .expect("the connection never got ready again")
        .expect("the connection was not kept alive");
    assert!(!connection.is_finished());

    let start = Instant::now();
    let shutdown = tokio::spawn(gw.shutdown());
    let _ = timeout(PROMPT, &mut connection)
        .await
        .expect("the gateway kept an idle keep-alive connection open after shutdown()")
        .expect("the connection task panicked");
    timeout(PROMPT, shutdown)
        .await
        .expect("the shutdown waited on an idle keep-alive connection")
        .expect("the shutdown panicked");
    eprintln!(
        "shutdown with an idle connection took {:?}",
        start.elapsed()
    );
    assert!(sender.is_closed());
    assert!(
        sender.send_request(request()).await.is_err(),
        "a request went through a connection closed by the shutdown"
    );
}

/// The drain bound (10 s with `Gateway::spawn`) without waiting for it: once the request is
/// held, nothing waits on the network until the bound is reached, so the clock is paused
/// and tokio jumps straight to the next timer, the drain's. Needs the current-thread runtime.
#[tokio::test]
async fn shutdown_gives_up_on_a_request_held_past_the_drain_bound() {
    let registry = Registry::new();
    let a = upstream("a").await;
    a.mode.store(HOLD, SeqCst);
    let _r = a.register(&registry, "slow");
    // Longer than the drain: the drain is what ends the request, not the route's timeout.
    let gw = gateway(&held_route("60s"), &registry).await;
    let http = client();
    let req = Request::get(format!("http://{}/slow", gw.local_addr()))
        .body(Full::default())
        .unwrap();
    // Not `send`: its bound would run out with the drain once the clock is paused. This one
    // is bounded below, after the clock resumes.
    let held = tokio::spawn(async move { http.request(req).await.map(|r| r.status()) });
    a.wait_for_hits(1).await;

    tokio::time::pause();
    let start = Instant::now();
    let shutdown = tokio::spawn(gw.shutdown());
    timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("the shutdown did not give up at its drain bound")
        .expect("the shutdown panicked");
    let waited = start.elapsed();
    tokio::time::resume();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "the shutdown gave up after {waited:?}, not at its 10 s drain bound"
    );
    let cut = timeout(BOUND, held)
        .await
        .expect("the held request outlived the shutdown")
        .expect("the request task panicked");
    assert!(cut.is_err(), "the held request was answered: {cut:?}");
    assert_eq!(a.hits.load(SeqCst), 1);
}

/// Held by each test that spawns gateway threads: the affinity test reads every thread of
/// this process named `seawall-gw-*`.
#[cfg(unix)]
static GATEWAY_THREADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each thread of `spawn_threads` picks endpoints with a balancer of its own, and what
/// one thread learns holds on all: a failure seen on one ejects the endpoint for every
/// thread.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_threads_share_ejections() {
    let _serial = GATEWAY_THREADS.lock().await;
    const CLIENTS: usize = 16;
    const EACH: usize = 4;
    let registry = Registry::new();
    let (good, bad) = (upstream("good").await, upstream("bad").await);
    bad.mode.store(FAIL, SeqCst);
    let _r = (
        good.register(&registry, "svc"),
        bad.register(&registry, "svc"),
    );
    let config = format!(
        "{HEAD}
[[routes]]
name = \"api\"
path_prefix = \"/api\"
service = \"svc\"

[routes.balance]
outlier = {{ consecutive_failures = 1, base_ejection = \"60s\", max_ejected = 0.5 }}
"
    );
    let gw = build(&config, &registry).await;
    let threads = gw
        .spawn_threads("127.0.0.1:0".parse().unwrap(), 2.try_into().unwrap())
        .unwrap();
    let addr = threads.local_addr();
    // One client after another, each on a connection of its own: the kernel spreads the
    // connections over both threads (all on one: 1 in 2^15).
    let mut failed = 0;
    for _ in 0..CLIENTS {
        let http = client();
        for i in 0..EACH {
            let answer = send(&http, get_request(addr, &format!("/api/{i}"))).await;
            if answer.status != StatusCode::OK {
                failed += 1;
            }
        }
    }
    assert_eq!(
        bad.hits.load(SeqCst),
        1,
        "a thread called an ejected endpoint"
    );
    assert_eq!(failed, 1);
    assert_eq!(good.hits.load(SeqCst), CLIENTS * EACH - 1);
    let status = threads.gateway().status();
    let ejected: Vec<_> = status.routes[0]
        .endpoints
        .iter()
        .filter(|e| e.ejected)
        .collect();
    assert_eq!(ejected.len(), 1, "{:?}", status.routes[0].endpoints);

    timeout(
        BOUND,
        tokio::task::spawn_blocking(move || threads.shutdown()),
    )
    .await
    .expect("the threads stop within their drain bound")
    .unwrap();
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_threads_serve_with_shared_limits_and_shut_down() {
    let _serial = GATEWAY_THREADS.lock().await;
    const CLIENTS: usize = 8;
    const EACH: usize = 5;
    let registry = Registry::new();
    let a = upstream("a").await;
    let _r = a.register(&registry, "svc");
    let config = format!(
        "{HEAD}
[[routes]]
name = \"api\"
path_prefix = \"/api\"
service = \"svc\"

[routes.rate_limit]
global = {{ per_second = 1, burst = 10 }}
"
    );
    let gw = build(&config, &registry).await;
    // An address taken by a socket without SO_REUSEPORT is refused, with no thread left.
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = gw
        .clone()
        .spawn_threads(taken.local_addr().unwrap(), 2.try_into().unwrap());
    assert!(refused.is_err(), "bound a port in use");
    drop(taken);

    let threads = gw
        .spawn_threads("127.0.0.1:0".parse().unwrap(), 2.try_into().unwrap())
        .unwrap();
    let addr = threads.local_addr();
    let started = Instant::now();
    // Each client its own connection: the kernel spreads them over the threads.
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(async move {
                let http = client();
                let mut statuses = Vec::new();
                for i in 0..EACH {
                    let req = get_request(addr, &format!("/api/{i}"));
                    statuses.push(send(&http, req).await.status);
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + limited, CLIENTS * EACH, "{statuses:?}");
    // One bucket for every thread: its burst, plus what it refilled meanwhile.
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        (10..=10 + refilled).contains(&ok),
        "{ok} admitted: the threads did not share the global limit"
    );
    let status = threads.gateway().status();
    assert_eq!(status.routes[0].requests, (CLIENTS * EACH) as u64);
    assert_eq!(status.routes[0].rate_limited, limited as u64);
    assert_eq!(a.hits.load(SeqCst), ok);

    timeout(
        BOUND,
        tokio::task::spawn_blocking(move || threads.shutdown()),
    )
    .await
    .expect("the threads stop within their drain bound")
    .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens once the threads are down"
    );
}

/// `0-2,5` as `[0, 1, 2, 5]`.
#[cfg(target_os = "linux")]
fn cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// `Cpus_allowed_list` of a `/proc/.../status` file.
#[cfg(target_os = "linux")]
fn allowed_in(status: &std::path::Path) -> Vec<usize> {
    let status = std::fs::read_to_string(status).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    cpu_list(line)
}

/// The CPUs each thread of this process whose name satisfies `pick` may run on, read from
/// `/proc`, by name.
#[cfg(target_os = "linux")]
fn threads_cpus(pick: impl Fn(&str) -> bool) -> Vec<(String, Vec<usize>)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        // A thread that ended since the listing is skipped.
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let name = comm.trim().to_string();
        if pick(&name) {
            found.push((name, allowed_in(&dir.join("status"))));
        }
    }
    found.sort();
    found
}

/// The gateway's threads (not their blocking pools'), by name.
#[cfg(target_os = "linux")]
fn gateway_threads_cpus() -> Vec<(String, Vec<usize>)> {
    threads_cpus(|name| name.starts_with("seawall-gw-") && !name.ends_with("-b"))
}

/// With as many threads as CPUs, each thread is pinned to its own (checked in `/proc`, as
/// `taskset -p` would show it), and the threads their runtimes start to resolve host
/// names are not; with another count, or `Off`, none is pinned; `Pin` pins round robin.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_threads_are_pinned_one_per_cpu() {
    use seawall::gateway::CpuAffinity;
    let _serial = GATEWAY_THREADS.lock().await;
    let allowed = allowed_in("/proc/self/status".as_ref());
    let n = allowed.len();
    let registry = Registry::new();
    let a = upstream("a").await;
    // A host name: each thread's runtime resolves it on a blocking thread of its own.
    let _r = registry.register(Instance::new(
        seawall::discovery::InstanceId::new("local", "a"),
        "svc",
        "localhost",
        a.addr.port(),
    ));
    let config = format!(
        "{HEAD}
[[routes]]
name = \"api\"
path_prefix = \"/api\"
service = \"svc\"
"
    );
    let gw = build(&config, &registry).await;
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let stop = |threads: seawall::gateway::GatewayThreads| async move {
        timeout(
            BOUND,
            tokio::task::spawn_blocking(move || threads.shutdown()),
        )
        .await
        .expect("the threads stop within their drain bound")
        .unwrap();
    };
    let unpinned = |count: usize| -> Vec<(String, Vec<usize>)> {
        (0..count)
            .map(|i| (format!("seawall-gw-{i}"), allowed.clone()))
            .collect()
    };

    // The default: one thread per CPU, each pinned to its own.
    let threads = gw
        .clone()
        .spawn_threads(any, n.try_into().unwrap())
        .unwrap();
    let expected: Vec<_> = allowed.iter().map(|&cpu| Some(cpu)).collect();
    assert_eq!(threads.cpus(), expected);
    let pinned: Vec<_> = allowed
        .iter()
        .enumerate()
        .map(|(i, &cpu)| (format!("seawall-gw-{i}"), vec![cpu]))
        .collect();
    assert_eq!(gateway_threads_cpus(), pinned);
    // Requests on connections of their own, spread by the kernel over the threads: each
    // thread that gets one resolves `localhost` on its blocking pool.
    let addr = threads.local_addr();
    for i in 0..16 {
        let answer = send(&client(), get_request(addr, &format!("/api/{i}"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let blocking = threads_cpus(|name| name.starts_with("seawall-gw-") && name.ends_with("-b"));
    assert!(
        !blocking.is_empty(),
        "no host name lookup on a blocking thread"
    );
    for (name, cpus) in &blocking {
        assert_eq!(cpus, &allowed, "{name} kept its creator's pin");
    }
    assert_eq!(
        gateway_threads_cpus(),
        pinned,
        "a lookup moved a gateway thread"
    );
    stop(threads).await;

    // Another count than the CPUs: left to the scheduler.
    let threads = gw
        .clone()
        .spawn_threads(any, (n + 1).try_into().unwrap())
        .unwrap();
    assert_eq!(threads.cpus(), vec![None; n + 1]);
    assert_eq!(gateway_threads_cpus(), unpinned(n + 1));
    stop(threads).await;

    // Off: never pinned.
    let threads = gw
        .clone()
        .spawn_threads_with(any, n.try_into().unwrap(), CpuAffinity::Off)
        .unwrap();
    assert_eq!(threads.cpus(), vec![None; n]);
    assert_eq!(gateway_threads_cpus(), unpinned(n));
    stop(threads).await;

    // Pin: round robin, whatever the count.
    let threads = gw
        .spawn_threads_with(any, (n + 1).try_into().unwrap(), CpuAffinity::Pin)
        .unwrap();
    let expected: Vec<_> = (0..=n).map(|i| Some(allowed[i % n])).collect();
    assert_eq!(threads.cpus(), expected);
    let pinned: Vec<_> = (0..=n)
        .map(|i| (format!("seawall-gw-{i}"), vec![allowed[i % n]]))
        .collect();
    assert_eq!(gateway_threads_cpus(), pinned);
    let answer = send(&client(), get_request(threads.local_addr(), "/api/x")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    stop(threads).await;
}
