//! Gateway limits with `policy = "redis"`: replicas (separate gateways, each with its
//! own limiters and connections, as separate processes would have) share one bucket in a
//! real `redis-server` on loopback; a dead Redis hands over to each replica's local share
//! (or to `503` when failing closed), shown in the status, and a restarted one takes back.
//! Rates are slow (1 a second) so that what a burst admits does not depend on timing;
//! every wait is bounded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use crate::redis_server::RedisServer;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::gateway::status::{ClientLimit, GlobalLimit};
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::TcpListener;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    addr
}

/// A gateway with one route `/api` to `upstream`, its `[routes.rate_limit]` and `[redis]`
/// as given.
async fn gateway(upstream: SocketAddr, limits: &str, redis: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n{redis}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [routes.rate_limit]\n{limits}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    );
    let config = GatewayConfig::from_toml_str(&config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

async fn get(
    client: &HttpClient,
    gateway: &GatewayHandle,
    key: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut request = Request::get(format!("http://{}/api/x", gateway.local_addr()));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(request.body(Empty::new()).unwrap()),
    )
    .await
    .expect("answered within 5 s")
    .expect("an answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn global(g: &GatewayHandle) -> GlobalLimit {
    g.gateway().status().routes[0]
        .limits
        .global
        .clone()
        .unwrap()
}

fn per_client(g: &GatewayHandle) -> ClientLimit {
    g.gateway().status().routes[0]
        .limits
        .per_client
        .clone()
        .unwrap()
}

fn redis_section(url: &str, extra: &str) -> String {
    format!("[redis]\nurl = \"{url}\"\ntimeout = \"200ms\"\n{extra}")
}

#[tokio::test]
async fn two_replicas_share_one_global_limit_in_redis() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let up = upstream().await;
    let limits = "global = { per_second = 1, burst = 4, policy = \"redis\" }";
    let section = redis_section(&redis.url(), "");
    let (a, b) = (
        gateway(up, limits, &section).await,
        gateway(up, limits, &section).await,
    );
    let client = client();
    let start = Instant::now();
    let mut admitted = 0;
    let mut refusal = None;
    for i in 0..12 {
        let (status, headers, body) = get(&client, if i % 2 == 0 { &a } else { &b }, None).await;
        match status {
            StatusCode::OK => {
                admitted += 1;
                assert!(headers.contains_key("ratelimit-policy"), "{headers:?}");
            }
            StatusCode::TOO_MANY_REQUESTS => refusal = Some((headers, body)),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // One bucket of 4 refilled at 1 a second, whichever replica is asked: with local
    // buckets the two would have admitted 8.
    let refilled = start.elapsed().as_secs() as usize + 1;
    assert!(
        (4..=4 + refilled).contains(&admitted),
        "admitted {admitted} in {:?}",
        start.elapsed()
    );
    let (headers, body) = refusal.expect("a refusal");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(
        headers.get("ratelimit-policy").unwrap(),
        "\"global\";q=4;w=4",
        "the same headers as a local limit"
    );
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/problem+json"
    );
    assert!(body.contains("429"), "{body}");
    // The status says where the bucket is and where the decisions come from.
    for g in [&a, &b] {
        let limit = global(g);
        assert_eq!(limit.policy, "redis");
        assert_eq!(limit.available, None);
        let shared = limit.redis.expect("redis status");
        // The last decision: Redis's, or a refusal it gave still in force.
        assert!(
            matches!(shared.source.as_deref(), Some("redis" | "cached")),
            "{shared:?}"
        );
        assert_eq!(shared.breaker, "closed");
    }
    let refused: u64 = [&a, &b]
        .iter()
        .map(|g| g.gateway().status().routes[0].rate_limited)
        .sum();
    assert_eq!(
        refused as usize,
        12 - admitted,
        "refusals are counted by each replica"
    );
    assert_eq!(
        redis.keys("seawall:api:global:*").await,
        ["seawall:api:global:{all}"]
    );
}

#[tokio::test]
async fn per_client_keys_are_shared_by_replicas_even_when_long() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let up = upstream().await;
    let limits = "per_client = { per_second = 1, burst = 3, key = \"header:x-api-key\", policy = \"redis\" }";
    let section = redis_section(&redis.url(), "");
    let (a, b) = (
        gateway(up, limits, &section).await,
        gateway(up, limits, &section).await,
    );
    let client = client();
    // A key longer than 64 bytes: kept locally as a per-process digest, it must reach
    // Redis as the same key from both replicas.
    let long = "k".repeat(300);
    for key in ["alice", long.as_str()] {
        let start = Instant::now();
        let mut admitted = 0;
        for i in 0..8 {
            let (status, _, body) = get(&client, if i % 2 == 0 { &a } else { &b }, Some(key)).await;
            match status {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("unexpected {other}: {body}"),
            }
        }
        let refilled = start.elapsed().as_secs() as usize + 1;
        assert!(
            (3..=3 + refilled).contains(&admitted),
            "key of {} bytes: admitted {admitted}",
            key.len()
        );
    }
    // Another client is not affected.
    assert_eq!(get(&client, &a, Some("bob")).await.0, StatusCode::OK);
    let mut keys = redis.keys("seawall:api:client:*").await;
    keys.sort();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(
        keys.contains(&"seawall:api:client:{key:alice}".to_owned()),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("seawall:api:client:{key#") && k.len() < 100),
        "the long key is stored as its digest: {keys:?}"
    );
    // Without the key header: limited by address (the default `on_missing = "ip"`).
    assert_eq!(get(&client, &a, None).await.0, StatusCode::OK);
    assert!(redis.keys("seawall:api:client:{ip:127.0.0.1}").await.len() == 1);
    let limit = per_client(&a);
    assert_eq!((limit.policy.as_str(), limit.clients), ("redis", None));
}

#[tokio::test]
async fn a_local_limit_hands_back_its_token_when_redis_refuses() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let up = upstream().await;
    // Per client locally (2), globally in Redis (1): the second request of a client is
    // refused by Redis, and its per-client token handed back.
    let limits = "global = { per_second = 1, burst = 1, policy = \"redis\" }\n\
                  per_client = { per_second = 1, burst = 2, key = \"header:x-api-key\" }";
    let g = gateway(up, limits, &redis_section(&redis.url(), "")).await;
    let client = client();
    let (first, ..) = get(&client, &g, Some("alice")).await;
    let (second, headers, _) = get(&client, &g, Some("alice")).await;
    assert_eq!(
        (first, second),
        (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS)
    );
    // Refused by the Redis limit (the outer, local one adds its own state).
    let states: Vec<_> = headers.get_all("ratelimit").iter().collect();
    assert!(
        states[0].to_str().unwrap().starts_with("\"global\";r=0;"),
        "{states:?}"
    );
    // Alice's bucket got its token back (1 left, not 0): once the global bucket has
    // refilled, her next request leaves 1 (2 with the refill, less this one), where
    // without the refund it would leave 0.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (third, headers, _) = get(&client, &g, Some("alice")).await;
    assert_eq!(third, StatusCode::OK, "{headers:?}");
    let per_client = headers
        .get_all("ratelimit")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("\"per-client\""))
        .expect("the per-client state");
    assert!(
        per_client.starts_with("\"per-client\";r=1;"),
        "{per_client}"
    );
}

#[tokio::test]
async fn a_dead_redis_hands_over_to_local_shares_and_back() {
    let port = RedisServer::free_port();
    let redis = RedisServer::start(port).await;
    let up = upstream().await;
    let limits = "global = { per_second = 1, burst = 10, policy = \"redis\" }";
    let g = gateway(
        up,
        limits,
        &redis_section(&redis.url(), "local_share = 0.25"),
    )
    .await;
    let client = client();
    assert_eq!(get(&client, &g, None).await.0, StatusCode::OK);
    assert_eq!(global(&g).redis.unwrap().source.as_deref(), Some("redis"));

    drop(redis);
    // Redis is gone: this replica admits its share, 3 of the burst of 10 (2.5 rounded
    // up), then refuses
    // with the same 429; never a 5xx.
    let mut admitted = 0;
    for _ in 0..8 {
        match get(&client, &g, None).await {
            (StatusCode::OK, ..) => admitted += 1,
            (StatusCode::TOO_MANY_REQUESTS, headers, _) => {
                assert!(headers.contains_key("retry-after"));
            }
            (other, _, body) => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(admitted, 3, "the local share admitted {admitted}");
    let shared = global(&g).redis.unwrap();
    assert_eq!(shared.source.as_deref(), Some("local"));
    // Eight failed checks (the minimum of ten calls is not reached): keep failing until
    // the breaker opens, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while global(&g).redis.unwrap().breaker != "open" {
        assert!(
            Instant::now() < deadline,
            "the breaker around Redis never opened"
        );
        get(&client, &g, None).await;
    }

    // Back on the same port: the breaker's probe (after its 1 s open wait) finds it,
    // and decisions come from Redis again.
    let _redis = RedisServer::start(port).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        get(&client, &g, None).await;
        let shared = global(&g).redis.unwrap();
        if shared.source.as_deref() == Some("redis") {
            assert_eq!(shared.breaker, "closed");
            break;
        }
        assert!(Instant::now() < deadline, "never back to Redis: {shared:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn failing_closed_answers_503_while_redis_is_away() {
    let port = RedisServer::free_port();
    let up = upstream().await;
    // No Redis at all on that port.
    let limits = "global = { per_second = 100, policy = \"redis\" }";
    let g = gateway(
        up,
        limits,
        &redis_section(
            &format!("redis://127.0.0.1:{port}/"),
            "failure = \"closed\"",
        ),
    )
    .await;
    let (status, headers, body) = get(&client(), &g, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/problem+json"
    );
    assert_eq!(
        global(&g).redis.unwrap().source.as_deref(),
        Some("unavailable")
    );
}

/// The same `503` to a gRPC caller: a trailers-only `UNAVAILABLE` with the reason and
/// `grpc-retry-pushback-ms` for the `Retry-After`, as every other answer the gateway makes
/// itself; before, the limiter's `503` and its JSON body went out as they were.
#[tokio::test]
async fn failing_closed_is_unavailable_to_grpc_callers() {
    let port = RedisServer::free_port();
    let up = upstream().await;
    let limits = "global = { per_second = 100, policy = \"redis\" }";
    let g = gateway(
        up,
        limits,
        &redis_section(
            &format!("redis://127.0.0.1:{port}/"),
            "failure = \"closed\"",
        ),
    )
    .await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(format!("http://{}/api/svc.Echo/Say", g.local_addr()))
        .header("content-type", "application/grpc+proto")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .expect("answered within 5 s")
        .expect("an answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(parts.status, StatusCode::OK, "{parts:?}");
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(parts.headers["grpc-status"], "14", "{parts:?}");
    assert_eq!(parts.headers["grpc-retry-pushback-ms"], "1000");
    let message = parts.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("unavailable"), "{message}");
    assert!(body.is_empty(), "{body:?}");
}

#[test]
fn redis_settings_are_checked_at_load() {
    let config = |redis: &str, limits: &str| {
        GatewayConfig::from_toml_str(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n{redis}\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             rate_limit = {{ {limits} }}\n\
             [[services]]\nname = \"up\"\ninstances = [\"127.0.0.1:9\"]\n"
        ))
    };
    let redis_limit = "global = { per_second = 5, policy = \"redis\" }";
    let err = config("", redis_limit).unwrap_err();
    assert_eq!(err.field(), "routes[0].rate_limit.global.policy");
    assert!(err.reason().contains("[redis]"), "{err}");
    let err = config(
        "[redis]\nurl = \"redis://127.0.0.1:6379/\"\nlocal_share = 34",
        redis_limit,
    )
    .unwrap_err();
    assert_eq!(err.field(), "redis.local_share");
    assert!(err.reason().contains("write 0.34"), "{err}");
    let err = config("[redis]\nurl = \"127.0.0.1:6379\"", redis_limit).unwrap_err();
    assert_eq!(err.field(), "redis.url");
    let err = config(
        "[redis]\nurl = \"redis://a/\"\nnodes = [\"redis://b/\"]",
        redis_limit,
    )
    .unwrap_err();
    assert_eq!(err.field(), "redis.nodes");
    let err = config("[redis]\nurl = \"redis://a/\"\nbatch = 0", redis_limit).unwrap_err();
    assert_eq!(err.field(), "redis.batch");
    let err = config("", "per_client = { per_second = 5, policy = \"cluster\" }").unwrap_err();
    assert!(
        err.to_string().contains("expected `local` or `redis`"),
        "{err}"
    );
    // A percentage is read as a fraction, as every share in the configuration.
    let ok = config(
        "[redis]\nurl = \"redis://127.0.0.1:6379/\"\nlocal_share = \"34%\"\nbatch = 8",
        redis_limit,
    )
    .unwrap();
    let redis = ok.redis.unwrap();
    assert!((redis.local_share - 0.34).abs() < 1e-9);
    assert_eq!(redis.batch, 8);
}

/// A 30/s bucket refills every 33 333 334 ns (33 334 µs in Redis): 30 tokens take a hair
/// over a second, which is still a one-second policy, not `q=60;w=2`.
#[tokio::test]
async fn the_policy_header_is_not_stretched_by_rounded_intervals() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let up = upstream().await;
    let client = client();
    for policy in ["local", "redis"] {
        let limits = format!("global = {{ per_second = 30, policy = \"{policy}\" }}");
        let g = gateway(up, &limits, &redis_section(&redis.url(), "")).await;
        let (status, headers, _) = get(&client, &g, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers.get("ratelimit-policy").unwrap(),
            "\"global\";q=30;w=1",
            "{policy}"
        );
    }
}

/// TLS to Redis from the gateway's configuration: `rediss://` with `[redis.tls]` (the
/// private CA that signed the server's certificate, and the client certificate
/// redis-server asks for), against a real `redis-server` taking TLS on loopback. Two
/// replicas share the bucket over TLS; a replica trusting another CA cannot verify the
/// server, so its checks take the failure policy (`503` failing closed), not Redis'.
#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn replicas_share_a_limit_in_redis_over_tls() {
    use crate::tls_support::{self, Pki};
    let pki = Pki::new();
    let dir = tls_support::temp_dir("gateway-redis-tls");
    let (server_cert, server_key) =
        tls_support::write(&dir, "server", &pki.leaf(&["127.0.0.1"], "redis"));
    let (client_cert, client_key) =
        tls_support::write(&dir, "client", &pki.leaf(&["gateway"], "gateway"));
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&other_ca, Pki::new().ca_pem()).unwrap();
    let tls_port = RedisServer::free_port();
    let redis = RedisServer::start_tls(
        RedisServer::free_port(),
        tls_port,
        &server_cert,
        &server_key,
        &ca,
    )
    .await;
    let section = |ca: &std::path::Path| {
        format!(
            "[redis]\nurl = \"rediss://127.0.0.1:{tls_port}/\"\ntimeout = \"2s\"\n\
             failure = \"closed\"\n\n[redis.tls]\nca_file = \"{}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca.display(),
            client_cert.display(),
            client_key.display()
        )
    };
    let up = upstream().await;
    let limits = "global = { per_second = 1, burst = 2, policy = \"redis\" }";
    let (a, b) = (
        gateway(up, limits, &section(&ca)).await,
        gateway(up, limits, &section(&ca)).await,
    );
    let client = client();
    let statuses = [
        get(&client, &a, None).await.0,
        get(&client, &b, None).await.0,
        get(&client, &a, None).await.0,
        get(&client, &b, None).await.0,
    ];
    // A burst of 2 in one bucket (a token a second may refill meanwhile).
    let admitted = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(
        (2..=3).contains(&admitted)
            && statuses
                .iter()
                .all(|s| { *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS }),
        "{statuses:?}"
    );
    assert_eq!(global(&a).redis.unwrap().source.as_deref(), Some("redis"));
    assert_eq!(redis.keys("seawall:api:global:*").await.len(), 1);
    // Trusting another CA: the server is not verified, Redis cannot answer.
    let stranger = gateway(up, limits, &section(&other_ca)).await;
    let (status, _, body) = get(&client, &stranger, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        global(&stranger).redis.unwrap().source.as_deref(),
        Some("unavailable")
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `[redis.tls]` is checked when the configuration loads: it needs a `rediss://` URL
/// (with `redis://` it would be ignored, in plain text), a certificate with its key, and
/// files that hold what they should; `#insecure` (however spelled) and a cluster mixing
/// schemes are refused.
#[cfg(feature = "redis-tls")]
#[test]
fn redis_tls_settings_are_checked_at_load() {
    use crate::tls_support::{self, Pki};
    let pki = Pki::new();
    let dir = tls_support::temp_dir("gateway-redis-tls-load");
    let (cert, key) = tls_support::write(&dir, "client", &pki.leaf(&["gateway"], "gateway"));
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let load = |redis: &str| {
        GatewayConfig::from_toml_str(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n{redis}\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             rate_limit = {{ global = {{ per_second = 5, policy = \"redis\" }} }}\n\
             [[services]]\nname = \"up\"\ninstances = [\"127.0.0.1:9\"]\n"
        ))
    };
    let refused = |redis: String, field: &str| {
        let err = load(&redis).expect_err(&redis);
        assert_eq!(err.field(), field, "{err}");
    };
    let tls = "rediss://127.0.0.1:6380/";
    load(&format!(
        "[redis]\nurl = \"{tls}\"\n[redis.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        ca.display(),
        cert.display(),
        key.display()
    ))
    .expect("a full [redis.tls]");
    load(&format!("[redis]\nurl = \"{tls}\"")).expect("webpki-roots, no client certificate");
    refused(
        format!(
            "[redis]\nurl = \"redis://127.0.0.1:6379/\"\n[redis.tls]\nca_file = \"{}\"",
            ca.display()
        ),
        "redis.tls",
    );
    refused(format!("[redis]\nurl = \"{tls}#insecure\""), "redis.url");
    // Spelled as the URL parser still reads `#insecure`: a line break (a TOML escape
    // here, as a URL pasted with its line ending), a trailing space, a tab inside.
    refused(format!("[redis]\nurl = \"{tls}#insecure\\n\""), "redis.url");
    refused(format!("[redis]\nurl = \"{tls}#insecure \""), "redis.url");
    refused(format!("[redis]\nurl = \"{tls}#insec\\ture\""), "redis.url");
    refused(
        "[redis]\nnodes = [\"rediss://10.0.0.1:7000/\", \"redis://10.0.0.2:7000/\"]".to_owned(),
        "redis.nodes[1]",
    );
    refused(
        format!(
            "[redis]\nurl = \"{tls}\"\n[redis.tls]\ncert_file = \"{}\"",
            cert.display()
        ),
        "redis.tls.key_file",
    );
    refused(
        format!(
            "[redis]\nurl = \"{tls}\"\n[redis.tls]\nca_file = \"{}\"",
            dir.join("missing.pem").display()
        ),
        "redis.tls.ca_file",
    );
    // A key file given as the CA: no certificate in it.
    refused(
        format!(
            "[redis]\nurl = \"{tls}\"\n[redis.tls]\nca_file = \"{}\"",
            key.display()
        ),
        "redis.tls.ca_file",
    );
    // Another certificate's key.
    let (_, stranger_key) = tls_support::write(&dir, "other", &pki.leaf(&["other"], "other"));
    refused(
        format!(
            "[redis]\nurl = \"{tls}\"\n[redis.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
            cert.display(),
            stranger_key.display()
        ),
        "redis.tls.key_file",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A Redis Cluster hashes only what lies between the first `{` of a key and the next `}`.
/// A limit's keys are `<prefix>:<route>:<scope>:{<client>}`: a `[redis] prefix` (or the
/// name of a route with a limit in Redis) holding `{…}` made that every bucket's hash tag,
/// all clients on one slot, and the configuration loaded without a word. It is now
/// refused at load, naming the field.
#[test]
fn braces_in_the_parts_of_redis_keys_are_refused_at_load() {
    let config = |prefix: &str, route: &str, policy: &str| {
        GatewayConfig::from_toml_str(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n\
             [redis]\nurl = \"redis://127.0.0.1:6379/\"\nprefix = \"{prefix}\"\n\
             [[routes]]\nname = \"{route}\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             rate_limit = {{ per_client = {{ per_second = 5, policy = \"{policy}\" }} }}\n\
             [[services]]\nname = \"up\"\ninstances = [\"127.0.0.1:9\"]\n"
        ))
    };
    for prefix in ["rl:{x}", "rl{", "rl}"] {
        let err = config(prefix, "api", "redis").expect_err(prefix);
        assert_eq!(err.field(), "redis.prefix", "{err}");
        assert!(err.reason().contains("slot"), "{err}");
    }
    let err = config("rl", "api{tenant}", "redis").expect_err("a brace in a route's name");
    assert_eq!(err.field(), "routes[0].name", "{err}");
    assert!(err.reason().contains("api{tenant}"), "{err}");
    // A route whose limits stay local puts nothing in Redis: its name may hold braces.
    config("rl", "api{tenant}", "local").unwrap();
    config("rl:x", "api", "redis").unwrap();
}

/// `[redis] local_share` is checked at load to be a fraction in `(0, 1]`, and a tiny one
/// (`1e-20`, or `"0.000000000000000001%"`) passes; building the route then divided the
/// limit's period by it (1 s / 1e-20 = 1e20 s) and handed that to
/// `Duration::from_secs_f64`, which panics above `u64::MAX` seconds: the gateway panicked
/// while it was built instead of refusing the setting (a share of `1e-8` is refused, as a
/// period over a year).
#[tokio::test]
async fn a_tiny_local_share_is_refused_not_a_panic() {
    let config = GatewayConfig::from_toml_str(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\
         [redis]\nurl = \"redis://127.0.0.1:9/\"\nlocal_share = 1e-20\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         rate_limit = { global = { per_second = 5, policy = \"redis\" } }\n\
         [[services]]\nname = \"up\"\ninstances = [\"127.0.0.1:9\"]\n",
    );
    let Ok(config) = config else {
        return; // refused at load: fine
    };
    let built = tokio::spawn(Gateway::build(config, Discovery::Static)).await;
    match built {
        Ok(result) => assert!(result.is_err(), "a local share of 1e-20 was accepted"),
        Err(panicked) => panic!("building the gateway panicked: {panicked}"),
    }
}

/// Both limits in Redis: a client hammering the route past its own (per-client) limit
/// must not drain the global bucket the other clients share. The gateway's docs: "A
/// request is charged only if both admit it: one the per-client limit refuses gets its
/// global token back, so a client hammering the route is refused by its own limit
/// without draining the global one for the others" (SECURITY.md says the same). Redis
/// tokens are never refunded, so the limit that may refuse without a refund must be
/// checked first.
#[tokio::test]
async fn a_client_refused_by_its_redis_limit_does_not_drain_the_redis_global_one() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let up = upstream().await;
    // Global: 10 tokens, refilling one a second (nothing to speak of within the test);
    // per client: 2.
    let limits = "global = { per_second = 1, burst = 10, policy = \"redis\" }\n\
                  per_client = { per_second = 1, burst = 2, key = \"header:x-api-key\", policy = \"redis\" }";
    let g = gateway(up, limits, &redis_section(&redis.url(), "")).await;
    let client = client();
    // Alice: 2 admitted, then 10 refused by her own limit.
    let mut alice = Vec::new();
    for _ in 0..12 {
        alice.push(get(&client, &g, Some("alice")).await.0.as_u16());
    }
    assert_eq!(&alice[..2], &[200, 200], "{alice:?}");
    assert!(alice[2..].iter().all(|&s| s == 429), "{alice:?}");
    // Bob, who sent nothing yet: the global bucket has 8 tokens left for him (10, less
    // alice's two admitted requests).
    let (status, headers, body) = get(&client, &g, Some("bob")).await;
    let states: Vec<_> = headers.get_all("ratelimit").iter().collect();
    assert_eq!(
        status,
        StatusCode::OK,
        "bob refused after alice was refused by her own limit: the global bucket was \
         drained by requests it never admitted ({states:?}, {body})"
    );
}
