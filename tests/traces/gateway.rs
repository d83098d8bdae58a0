//! Following a request through the gateway, over loopback: W3C `traceparent` /
//! `tracestate` propagation, the request id (`x-request-id`) passed on or made and echoed,
//! and the request's `tracing` span with its fields. A hand-written upstream records the
//! headers it received. Every wait is bounded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::TcpListener;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);
const CLIENT_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The headers each request reached the upstream with (name → every value).
type Seen = Arc<Mutex<Vec<HashMap<String, Vec<String>>>>>;

/// An upstream that records the headers of every request, and answers 200 with its own
/// `x-request-id: upstream-made` (which the gateway must replace).
async fn upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let s = s.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut headers: HashMap<String, Vec<String>> = HashMap::new();
                for (name, value) in req.headers() {
                    headers
                        .entry(name.as_str().to_owned())
                        .or_default()
                        .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
                }
                s.lock().unwrap().push(headers);
                async move {
                    let mut r = Response::new(Full::new(Bytes::from("ok")));
                    r.headers_mut()
                        .insert("x-request-id", "upstream-made".parse().unwrap());
                    Ok::<_, Infallible>(r)
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    (addr, seen)
}

async fn gateway(extra: &str, upstream: SocketAddr) -> GatewayHandle {
    spawn(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
         [[routes]]\nname = \"traced\"\npath_prefix = \"/api\"\nservice = \"svc\"\n\
         [[services]]\nname = \"svc\"\ninstances = [\"{upstream}\"]\n"
    ))
    .await
}

/// A gateway serving `config` on a port of its own.
async fn spawn(config: &str) -> GatewayHandle {
    let config = GatewayConfig::from_toml_str(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

/// Sends a GET of `/api/x` with `headers`; returns the response's headers.
async fn get(gw: &GatewayHandle, headers: &[(&str, &[u8])]) -> http::HeaderMap {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut request = Request::get(format!("http://{}/api/x", gw.local_addr()));
    for (name, value) in headers {
        request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
    }
    let request = request.body(Full::default()).unwrap();
    timeout(BOUND, async {
        let response = client.request(request).await.expect("the gateway answers");
        assert_eq!(response.status(), 200);
        let (parts, body) = response.into_parts();
        body.collect().await.expect("a body");
        parts.headers
    })
    .await
    .expect("bounded")
}

/// The one value of `name` the upstream last received.
fn last(seen: &Seen, name: &str) -> Option<String> {
    let seen = seen.lock().unwrap();
    let values = seen
        .last()
        .expect("a request reached the upstream")
        .get(name)?;
    assert_eq!(values.len(), 1, "one {name}: {values:?}");
    Some(values[0].clone())
}

/// A `traceparent` as its parts, checked here independently of the gateway's parser.
#[derive(Debug, PartialEq, Eq)]
struct TraceParent {
    trace_id: String,
    parent_id: String,
    flags: String,
}

fn parse(value: &str) -> TraceParent {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && s.bytes().any(|b| b != b'0')
    };
    let parts: Vec<&str> = value.split('-').collect();
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2),
        "a valid version 00 traceparent: {value}"
    );
    TraceParent {
        trace_id: parts[1].to_owned(),
        parent_id: parts[2].to_owned(),
        flags: parts[3].to_owned(),
    }
}

fn is_uuid_v4(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            14 => b == b'4',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

#[tokio::test]
async fn without_client_headers_a_trace_and_request_id_are_made() {
    crate::recorded();
    let (addr, seen) = upstream().await;
    let gw = gateway("", addr).await;
    let response = get(&gw, &[]).await;
    let sent = last(&seen, "traceparent").expect("a traceparent upstream");
    assert!(sent.starts_with("00-") && sent.ends_with("-01"), "{sent}");
    parse(&sent);
    let id = last(&seen, "x-request-id").expect("a request id upstream");
    assert!(is_uuid_v4(&id), "{id}");
    assert_eq!(
        response.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(id.as_str()),
        "the request id sent upstream is echoed, not the upstream's own"
    );
    // Another request: other ids.
    get(&gw, &[]).await;
    assert_ne!(last(&seen, "x-request-id").unwrap(), id);
    assert_ne!(parse(&last(&seen, "traceparent").unwrap()), parse(&sent));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_trace_is_continued_with_a_new_parent() {
    crate::recorded();
    let (addr, seen) = upstream().await;
    let gw = gateway("", addr).await;
    get(
        &gw,
        &[
            ("traceparent", CLIENT_TRACE.as_bytes()),
            ("tracestate", b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ],
    )
    .await;
    let client = parse(CLIENT_TRACE);
    let sent = parse(&last(&seen, "traceparent").unwrap());
    assert_eq!(sent.trace_id, client.trace_id, "same trace");
    assert_ne!(
        sent.parent_id, client.parent_id,
        "the gateway's hop as parent"
    );
    assert_eq!(sent.flags, client.flags);
    assert_eq!(
        last(&seen, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );
    // A future version is read by the 00 layout, and sent as 00.
    let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
    get(&gw, &[("traceparent", future.as_bytes())]).await;
    let text = last(&seen, "traceparent").unwrap();
    assert!(
        text.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_invalid_traceparent_is_replaced_never_forwarded() {
    crate::recorded();
    let (addr, seen) = upstream().await;
    let gw = gateway("", addr).await;
    for bad in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ] {
        get(
            &gw,
            &[("traceparent", bad.as_bytes()), ("tracestate", b"rojo=1")],
        )
        .await;
        let sent = last(&seen, "traceparent").expect("a traceparent upstream");
        assert_ne!(sent, bad);
        let sent = parse(&sent);
        assert_ne!(
            sent.trace_id,
            parse(CLIENT_TRACE).trace_id,
            "{bad}: a new trace"
        );
        assert_eq!(
            last(&seen, "tracestate"),
            None,
            "{bad}: the old trace's tracestate dropped"
        );
    }
    // Two traceparents: invalid too.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{}/api/x", gw.local_addr()))
        .header("traceparent", CLIENT_TRACE)
        .header("traceparent", CLIENT_TRACE)
        .body(Full::default())
        .unwrap();
    timeout(BOUND, client.request(request))
        .await
        .unwrap()
        .unwrap();
    let sent = parse(&last(&seen, "traceparent").unwrap());
    assert_ne!(sent.trace_id, parse(CLIENT_TRACE).trace_id);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_request_id_is_passed_on_and_bad_ones_replaced() {
    crate::recorded();
    let (addr, seen) = upstream().await;
    let gw = gateway("", addr).await;
    let response = get(&gw, &[("x-request-id", b"client-id-42")]).await;
    assert_eq!(last(&seen, "x-request-id").as_deref(), Some("client-id-42"));
    assert_eq!(response.get("x-request-id").unwrap(), "client-id-42");

    let long = [b'a'; 129];
    let non_ascii = "caf\u{e9}-id".as_bytes();
    for bad in [&long[..], non_ascii, b"has space"] {
        let response = get(&gw, &[("x-request-id", bad)]).await;
        let sent = last(&seen, "x-request-id").unwrap();
        assert!(is_uuid_v4(&sent), "{sent}");
        assert_eq!(response.get("x-request-id").unwrap(), sent.as_str());
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn the_header_is_configurable_and_both_can_be_turned_off() {
    crate::recorded();
    let (addr, seen) = upstream().await;
    let gw = gateway("request_id_header = \"x-correlation-id\"", addr).await;
    let response = get(&gw, &[]).await;
    let id = last(&seen, "x-correlation-id").unwrap();
    assert_eq!(response.get("x-correlation-id").unwrap(), id.as_str());
    gw.shutdown().await;

    let gw = gateway("request_id_header = \"\"\ntrace_context = false", addr).await;
    let response = get(&gw, &[("traceparent", b"not one")]).await;
    assert_eq!(last(&seen, "x-request-id"), None);
    assert_eq!(last(&seen, "traceparent").as_deref(), Some("not one"));
    assert_eq!(response.get("x-request-id").unwrap(), "upstream-made");
    gw.shutdown().await;

    let bad = GatewayConfig::from_toml_str(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nrequest_id_header = \"host\"\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nservice = \"s\"\n",
    )
    .unwrap_err();
    assert_eq!(bad.field(), "gateway.request_id_header", "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_a_span_with_its_fields() {
    let recorded = crate::recorded();
    let (addr, seen) = upstream().await;
    let gw = gateway("", addr).await;
    get(
        &gw,
        &[
            ("traceparent", CLIENT_TRACE.as_bytes()),
            ("x-request-id", b"span-test-7"),
        ],
    )
    .await;
    let sent = parse(&last(&seen, "traceparent").unwrap());
    gw.shutdown().await;

    // Other tests of this binary make spans too: this one's carries its request id.
    let all = recorded.spans.lock().unwrap();
    let ours: Vec<_> = all
        .values()
        .filter(|f| f.get("request_id").map(String::as_str) == Some("span-test-7"))
        .collect();
    assert_eq!(ours.len(), 1, "one span per request: {all:?}");
    let span = ours[0];
    let field = |name: &str| span.get(name).map(String::as_str);
    assert_eq!(field("level"), Some("INFO"));
    assert_eq!(field("method"), Some("GET"));
    assert_eq!(field("route"), Some("traced"));
    assert_eq!(field("upstream"), Some(addr.to_string().as_str()));
    assert_eq!(field("status"), Some("200"));
    assert!(
        field("latency_us").is_some_and(|l| l.parse::<u64>().is_ok()),
        "{span:?}"
    );
    assert_eq!(field("trace_id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(
        field("span_id"),
        Some(sent.parent_id.as_str()),
        "the parent id sent upstream"
    );
}

/// `admin.on_proxy_listener` without a token serves `/metrics` and `/status.json` (upstream
/// addresses, routes, limits) to every client of the proxy listener: allowed, for
/// single-port setups on a private network, but never silently. It was built without a
/// word; with a token, nothing is said.
#[tokio::test]
async fn admin_on_the_proxy_listener_without_a_token_is_warned_about() {
    let recorded = crate::recorded();
    let warnings = || {
        recorded
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("WARN") && l.contains("on_proxy_listener without a token"))
            .count()
    };
    let (upstream, _) = upstream().await;
    let open = gateway("[admin]\non_proxy_listener = true\n", upstream).await;
    assert_eq!(warnings(), 1, "{:?}", recorded.events.lock().unwrap());
    open.shutdown().await;

    let dir = std::env::temp_dir().join(format!("seawall-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "kq3V9xT2mZr8Lw4Yp6Hs1Nd7Fb5Cj0Ge").unwrap();
    let closed = gateway(
        &format!(
            "[admin]\non_proxy_listener = true\ntoken_file = {:?}\n",
            token.display().to_string()
        ),
        upstream,
    )
    .await;
    assert_eq!(warnings(), 1, "with a token: no warning");
    closed.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `request` event's `fallback` field says "whether a fallback answered" (the
/// gateway's module docs); it was read from the `x-seawall-fallback` header, which an
/// upstream's own answer can carry (the gateway passes it on): an upstream's `200` was
/// logged as the route's fallback, on a route that has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_header_is_not_logged_as_a_fallback() {
    let recorded = crate::recorded();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                let mut r = Response::new(Full::new(Bytes::from("the upstream's own")));
                r.headers_mut()
                    .insert("x-seawall-fallback", "true".parse().unwrap());
                Ok::<_, Infallible>(r)
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    // A port nothing listens on: the fallback route's upstream.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = spawn(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"spoofed\"\npath_prefix = \"/spoofed\"\nservice = \"svc\"\n\
         [[services]]\nname = \"svc\"\ninstances = [\"{addr}\"]\n\
         [[routes]]\nname = \"fellback\"\npath_prefix = \"/down\"\nservice = \"down\"\n\
         [routes.fallback]\nstatus = 200\nbody = '{{}}'\n\
         [[services]]\nname = \"down\"\ninstances = [\"{dead}\"]\n"
    ))
    .await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    for path in ["/spoofed/x", "/down/x"] {
        let request = Request::get(format!("http://{}{path}", gw.local_addr()))
            .body(Full::default())
            .unwrap();
        timeout(BOUND, async {
            let response = client.request(request).await.expect("the gateway answers");
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.expect("a body");
        })
        .await
        .expect("bounded");
    }
    gw.shutdown().await;

    let events = recorded.events.lock().unwrap();
    let ours: Vec<_> = events
        .iter()
        .filter(|e| e.contains("route=spoofed") && e.contains("status=200"))
        .collect();
    assert_eq!(ours.len(), 1, "one request event: {events:?}");
    assert!(
        ours[0].contains("fallback=false"),
        "the upstream answered, no fallback did: {}",
        ours[0]
    );
    // The route's own fallback is still logged as one.
    let fell: Vec<_> = events
        .iter()
        .filter(|e| e.contains("route=fellback"))
        .collect();
    assert_eq!(fell.len(), 1, "one request event: {events:?}");
    assert!(fell[0].contains("fallback=true"), "{}", fell[0]);
}
