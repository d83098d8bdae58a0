//! gRPC's edges, as an attacker and a production gRPC user meet them (a client's body
//! failing mid-stream, a caller's deadline kept by the upstream, `RouteService`'s
//! answers, a stream cut by the body timeout): each test pins a defect found in review,
//! through a real gateway over loopback (or the gateway's public `tower::Service`s), with
//! raw HTTP/2 clients and upstreams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use futures::channel::mpsc;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::gateway::GatewayHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower::ServiceExt;

use super::limits::{BOUND, STRICT, endpoint, settled};

type Frames = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// How the HTTP/2 gRPC upstream answers each call: always its head at once, as gRPC
/// servers of streaming calls do.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads the request's messages and answers none for a minute (a client-streaming
    /// call still taking its input).
    Hold,
    /// One message, then, when the call's `grpc-timeout` passes, `DEADLINE_EXCEEDED` in
    /// the trailers: what grpc-go (and every server that keeps the deadline it is sent)
    /// does to a server-streaming call.
    KeepsTheDeadline,
}

/// An HTTP/2 (h2c) gRPC upstream on a loopback port; returns its address and its calls.
async fn h2_upstream(behaviour: Behaviour) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            let svc = hyper::service::service_fn(move |request: Request<Incoming>| {
                c.fetch_add(1, SeqCst);
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                tokio::spawn(answer(behaviour, request, tx));
                let response = Response::builder()
                    .header("content-type", "application/grpc")
                    .body(StreamBody::new(rx))
                    .unwrap();
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, calls)
}

async fn answer(behaviour: Behaviour, request: Request<Incoming>, mut tx: Frames) {
    match behaviour {
        Behaviour::Hold => {
            let mut body = request.into_body();
            while let Some(Ok(_)) = body.frame().await {}
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        }
        Behaviour::KeepsTheDeadline => {
            let deadline = request
                .headers()
                .get("grpc-timeout")
                .and_then(|v| seawall::gateway::grpc::parse_timeout(v.as_bytes()))
                .unwrap_or(Duration::from_secs(60));
            let started = tokio::time::Instant::now();
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))))
                .await;
            tokio::time::sleep_until(started + deadline).await;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
            trailers.insert(
                "grpc-message",
                http::HeaderValue::from_static("context deadline exceeded"),
            );
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        }
    }
}

/// A gateway serving h2c, its route `/api` forwarding over h2c to `upstream`, with the
/// strict breaker and outlier detection of `limits.rs` and `route` settings.
async fn h2_gateway(upstream: SocketAddr, route: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n{route}\n{STRICT}\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\nprotocol = \"h2\"\n"
    );
    super::spawn_gateway(&config).await
}

async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    client.ready().await.unwrap()
}

fn grpc_request(addr: SocketAddr, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://{addr}/api/svc.Svc/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

/// Reads a response body to its end (or its error); the trailers' `grpc-status`, if any.
async fn drain(body: &mut h2::RecvStream) -> Result<Option<String>, h2::Error> {
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(body.trailers().await?.and_then(|t| {
        t.get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }))
}

/// SECURITY.md: "a body over the limit (413) [...] recorded as client errors, never by the
/// endpoint's circuit breaker or outlier detection [...] So no anonymous client can open a
/// breaker". A client-streaming (or bidi) gRPC call gets its answer's head at once; a
/// client that then sends more than `max_request_body` makes the gateway reset the
/// upstream stream, and the upstream body's error was recorded as the endpoint's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_after_the_head_is_not_the_upstreams_failure() {
    let (addr, calls) = h2_upstream(Behaviour::Hold).await;
    let gw = h2_gateway(addr, "max_request_body = 1024\ntimeout = \"30s\"").await;
    for i in 0..4 {
        let mut client = h2_client(gw.local_addr()).await;
        let (response, mut send) = client
            .send_request(grpc_request(gw.local_addr(), &[]), false)
            .unwrap();
        send.send_data(Bytes::from(vec![0u8; 512]), false).unwrap();
        let response = timeout(BOUND, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200, "call {i}: the upstream's head");
        // Now past the limit.
        send.send_data(Bytes::from(vec![0u8; 4096]), false).unwrap();
        let mut body = response.into_body();
        let ended = timeout(BOUND, drain(&mut body))
            .await
            .expect("the call ends");
        // Told in gRPC's terms, RESOURCE_EXHAUSTED as for a declared length over the
        // limit, not by a reset.
        assert_eq!(ended.ok().flatten().as_deref(), Some("8"), "call {i}");
    }
    settled(&gw, 4).await;
    assert_eq!(super::limits::route(&gw).client_errors.too_large, 4);
    assert_eq!(calls.load(SeqCst), 4);
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.ejected, e.breaker.as_deref()),
        (0, false, Some("closed")),
        "a client's oversized body counted against the upstream: {e:?}"
    );
    gw.shutdown().await;
}

/// SECURITY.md / gateway docs: a call's `grpc-timeout` "passing it answers
/// `DEADLINE_EXCEEDED` [...] never against the endpoint (a caller asking for a microsecond
/// must not open breakers)". The gateway forwards `grpc-timeout`, and a gRPC server keeps
/// it (gRPC over HTTP/2: the deadline is the whole call's): a streaming call's head comes
/// in time, and the upstream ends the call with `DEADLINE_EXCEEDED` in the trailers when
/// the caller's deadline passes; that was the endpoint's failure, so any caller opens
/// breakers with a short deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_kept_by_the_upstream_mid_stream_is_not_its_failure() {
    deadlines_kept_mid_stream_are_the_callers("timeout = \"30s\"", "100m").await;
}

/// Four calls with `grpc_timeout` through a gateway whose route has `route` settings, to
/// an upstream that keeps the deadline (it ends each stream with `DEADLINE_EXCEEDED` in
/// its trailers when the deadline passes): each call ends `4`, none counts against the
/// endpoint, and all four are the route's `client_errors.deadline`.
async fn deadlines_kept_mid_stream_are_the_callers(route: &str, grpc_timeout: &str) {
    let (addr, calls) = h2_upstream(Behaviour::KeepsTheDeadline).await;
    let gw = h2_gateway(addr, route).await;
    for i in 0..4 {
        let mut client = h2_client(gw.local_addr()).await;
        let (response, _send) = client
            .send_request(
                grpc_request(gw.local_addr(), &[("grpc-timeout", grpc_timeout)]),
                true,
            )
            .unwrap();
        let response = timeout(BOUND, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        let mut body = response.into_body();
        let status = timeout(BOUND, drain(&mut body)).await.unwrap().unwrap();
        assert_eq!(status.as_deref(), Some("4"), "call {i}");
    }
    settled(&gw, 4).await;
    assert_eq!(calls.load(SeqCst), 4);
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.ejected, e.breaker.as_deref()),
        (0, false, Some("closed")),
        "the caller's own deadline counted against the upstream: {e:?}"
    );
    assert_eq!(super::limits::route(&gw).client_errors.deadline, 4);
    gw.shutdown().await;
}

/// `Gateway::route`'s `RouteService`: "the same checks and answers as through the
/// gateway, without the routing". Through the gateway a gRPC caller gets the gateway's
/// own answers as gRPC statuses; through the route's service it got HTTP `502` / `429`
/// with a JSON problem, which a gRPC client reads as a broken response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_service_answers_grpc_callers_in_grpc() {
    let unreachable = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let gw = h2_gateway(
        unreachable,
        "[routes.rate_limit]\nglobal = { per_second = 1, burst = 1 }\n",
    )
    .await;
    let route = gw.gateway().route("api").expect("the route");
    let call = || {
        http::Request::post("http://gw/api/svc.Svc/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    // The upstream refuses the connection: UNAVAILABLE.
    let response = route.clone().oneshot(call()).await.unwrap();
    assert_eq!(response.status(), 200, "{response:?}");
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..]),
        "{response:?}"
    );
    // Rate limited: RESOURCE_EXHAUSTED.
    let response = route.clone().oneshot(call()).await.unwrap();
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"8"[..]),
        "{response:?}"
    );
    // Through the gateway itself, for comparison, the answer is gRPC's.
    let through = gw.gateway().clone().oneshot(call()).await.unwrap();
    assert_eq!(
        through.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"8"[..]),
        "{through:?}"
    );
    gw.shutdown().await;
}

/// The gateway's docs: gRPC callers get the gateway's own answers as gRPC statuses, "a
/// timeout `DEADLINE_EXCEEDED`". A streaming answer whose upstream goes silent for the
/// route's `body_timeout` after its head was cut with a stream reset (`INTERNAL_ERROR`,
/// which a gRPC client reads as `INTERNAL`, "h2 protocol error"), not ended with
/// `grpc-status: 4`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_body_timeout_ends_with_deadline_exceeded() {
    let (addr, _) = h2_upstream(Behaviour::Hold).await;
    let gw = h2_gateway(addr, "body_timeout = \"200ms\"").await;
    let mut client = h2_client(gw.local_addr()).await;
    let (response, mut send) = client
        .send_request(grpc_request(gw.local_addr(), &[]), false)
        .unwrap();
    send.send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
        .unwrap();
    let response = timeout(BOUND, response).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let ended = timeout(BOUND, drain(&mut body)).await.expect("cut in time");
    assert_eq!(
        ended.as_ref().ok().cloned().flatten().as_deref(),
        Some("4"),
        "{ended:?}"
    );
    gw.shutdown().await;
}

/// A loopback address nothing listens on: every call to it is refused.
async fn refusing_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A call to `path` with `content-type` `content_type` through an HTTP/2 client; the
/// answer's head.
async fn call_typed(gw: SocketAddr, path: &str, content_type: &str) -> http::response::Parts {
    let mut client = h2_client(gw).await;
    let request = http::Request::post(format!("http://{gw}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, _send) = client.send_request(request, true).unwrap();
    let response = timeout(BOUND, response).await.unwrap().unwrap();
    response.into_parts().0
}

/// gRPC over HTTP/2: a gRPC call's content type is `application/grpc`, alone or followed
/// by `+` (a subtype, `+proto`) or `;` (parameters); gRPC-Web's are `application/grpc-web`
/// and `application/grpc-web-text`, likewise. Any content type merely beginning with
/// `application/grpc` (`application/grpcfoo`, `application/grpc-webby`) made the request
/// a gRPC call: its answers came as gRPC statuses (`200`, `grpc-status`) to a client that
/// is not a gRPC client, and its `grpc-timeout` bounded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_grpcs_own_content_types_make_a_grpc_call() {
    let gw = h2_gateway(refusing_address().await, "").await;
    for content_type in [
        "application/grpcfoo",
        "application/grpc-webby",
        "application/grpc-web-textual",
        "application/grpc-",
        "application/grpc.proto",
    ] {
        let head = call_typed(gw.local_addr(), "/api/svc.Svc/Call", content_type).await;
        assert!(
            head.status == 502 || head.status == 503,
            "{content_type}: an HTTP answer: {head:?}"
        );
        assert!(
            !head.headers.contains_key("grpc-status"),
            "{content_type} is no gRPC content type: {head:?}"
        );
    }
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc;charset=utf-8",
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
        "application/grpc-web-text+proto",
        "application/grpc-web+json",
    ] {
        let head = call_typed(gw.local_addr(), "/api/svc.Svc/Call", content_type).await;
        assert_eq!(head.status, 200, "{content_type}: {head:?}");
        assert_eq!(
            head.headers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"14"[..]),
            "{content_type}: {head:?}"
        );
    }
    gw.shutdown().await;
}

/// gRPC-Web (PROTOCOL-WEB.md): its content types are `application/grpc-web` and
/// `application/grpc-web-text`, with an optional `+proto`-style subtype, and a gRPC-Web
/// client rejects an answer of any other (`Unknown Content-type received`). The
/// gateway's own answers to a gRPC-Web caller (no endpoint, no route, limits...) came
/// with `content-type: application/grpc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_web_caller_gets_the_gateways_answers_in_its_own_content_type() {
    let gw = h2_gateway(refusing_address().await, "").await;
    for (sent, answered) in [
        ("application/grpc-web", "application/grpc-web"),
        ("application/grpc-web+proto", "application/grpc-web+proto"),
        ("application/grpc-web-text", "application/grpc-web-text"),
        (
            "application/grpc-web-text+proto",
            "application/grpc-web-text+proto",
        ),
        // Another subtype: the family, at least.
        ("application/grpc-web+json", "application/grpc-web"),
        (
            "application/grpc-web-text;charset=utf-8",
            "application/grpc-web-text",
        ),
        // gRPC over HTTP/2 keeps its own.
        ("application/grpc+proto", "application/grpc"),
    ] {
        // The upstream refuses (UNAVAILABLE), and no route (UNIMPLEMENTED).
        for (path, code) in [
            ("/api/svc.Svc/Call", "14"),
            ("/elsewhere/svc.Svc/Call", "12"),
        ] {
            let head = call_typed(gw.local_addr(), path, sent).await;
            assert_eq!(head.status, 200, "{sent} {path}: {head:?}");
            assert_eq!(
                head.headers.get("grpc-status").map(|v| v.as_bytes()),
                Some(code.as_bytes()),
                "{sent} {path}: {head:?}"
            );
            assert_eq!(
                head.headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some(answered),
                "{sent} {path}: {head:?}"
            );
        }
    }
    // gRPC-Web from a browser is mostly HTTP/1.1: the same answer there.
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut client, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("/api/svc.Svc/Call")
        .header("host", "gw")
        .header("content-type", "application/grpc-web-text+proto")
        .body(Full::new(Bytes::from_static(b"AAAAAAA=")))
        .unwrap();
    let response = timeout(BOUND, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200, "{response:?}");
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..]),
        "{response:?}"
    );
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/grpc-web-text+proto"),
        "{response:?}"
    );
    gw.shutdown().await;
}

/// A gRPC-Web answer's body (PROTOCOL-WEB.md): one message (`08 01`), then the call's
/// status in a trailers frame, a message flagged `0x80` whose payload is the trailers as
/// HTTP/1 header lines.
const GRPC_WEB_ANSWER: &[u8] =
    b"\x00\x00\x00\x00\x02\x08\x01\x80\x00\x00\x00\x1egrpc-status:0\r\ngrpc-message:\r\n";

/// A gRPC-Web upstream (tonic-web, grpc-web-go, Envoy's `grpc_web` filter) on a loopback
/// port, over HTTP/1.1 or (`h2`) h2c: every call succeeds, its status in the body's
/// trailers frame and no HTTP trailers, as gRPC-Web has it. `streamed`: the message and
/// the trailers frame come as they are made, without a length (chunked over HTTP/1.1),
/// as tonic-web sends them; else in one body of known length. Returns its address and
/// its calls.
async fn grpc_web_upstream(h2: bool, streamed: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            let svc = hyper::service::service_fn(move |request: Request<Incoming>| {
                c.fetch_add(1, SeqCst);
                async move {
                    let _ = request.into_body().collect().await;
                    let (message, trailers) = GRPC_WEB_ANSWER.split_at(7);
                    let body = if streamed {
                        let frames = [message, trailers]
                            .map(|part| Ok::<_, Infallible>(Frame::data(Bytes::from_static(part))));
                        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
                    } else {
                        Full::new(Bytes::from_static(GRPC_WEB_ANSWER)).boxed_unsync()
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc-web+proto")
                            .body(body)
                            .unwrap(),
                    )
                }
            });
            let io = TokioIo::new(stream);
            if h2 {
                tokio::spawn(http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc));
            } else {
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, svc));
            }
        }
    });
    (addr, calls)
}

/// gRPC-Web (PROTOCOL-WEB.md) carries a call's status in a trailers frame at the end of
/// the body, not in HTTP trailers. The gateway waited for HTTP trailers from any answer
/// whose content type began with `application/grpc`, and recorded a gRPC-Web answer's
/// body ending without them as `INTERNAL`: every successful call through a gRPC-Web
/// upstream was the endpoint's failure, and a healthy upstream was ejected and its
/// breaker opened after a handful of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_web_upstreams_successful_calls_are_not_its_failures() {
    const CALLS: usize = 8;
    for (h2, streamed) in [(false, true), (true, true), (false, false), (true, false)] {
        let (addr, calls) = grpc_web_upstream(h2, streamed).await;
        let protocol = if h2 { "h2" } else { "http1" };
        let case = format!("{protocol}, streamed: {streamed}");
        let gw = super::spawn_gateway(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n{STRICT}\n\
             [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"{protocol}\"\n"
        ))
        .await;
        // A browser's gRPC-Web client: HTTP/1.1, one connection.
        let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
        let (mut client, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        for i in 0..CALLS {
            let request = http::Request::post("/api/svc.Svc/Call")
                .header("host", "gw")
                .header("content-type", "application/grpc-web+proto")
                .header("x-grpc-web", "1")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap();
            client.ready().await.unwrap();
            let response = timeout(BOUND, client.send_request(request))
                .await
                .unwrap()
                .unwrap();
            let (head, body) = response.into_parts();
            let body = timeout(BOUND, body.collect())
                .await
                .unwrap()
                .unwrap()
                .to_bytes();
            assert_eq!(head.status, 200, "{case}, call {i}: {head:?}");
            assert!(
                !head.headers.contains_key("grpc-status"),
                "{case}, call {i}: the gateway answered itself: {head:?}"
            );
            assert_eq!(
                head.headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some("application/grpc-web+proto"),
                "{case}, call {i}: {head:?}"
            );
            assert_eq!(&body[..], GRPC_WEB_ANSWER, "{case}, call {i}");
        }
        settled(&gw, CALLS as u64).await;
        assert_eq!(calls.load(SeqCst), CALLS, "{case}");
        let e = endpoint(&gw);
        assert_eq!(
            (e.calls, e.failures, e.ejected, e.breaker.as_deref()),
            (CALLS as u64, 0, false, Some("closed")),
            "{case}: a gRPC-Web upstream's successful calls counted as its failures: {e:?}"
        );
        gw.shutdown().await;
    }
}

/// How [`deadline_upstream`] ends a call once the `grpc-timeout` it was sent has passed.
#[derive(Clone, Copy)]
enum AtTheDeadline {
    /// A trailers-only `DEADLINE_EXCEEDED` when the deadline passes (a unary call whose
    /// handler honours its context's deadline, as grpc-go's do).
    TrailersOnly,
    /// Head and one message at once, then `RST_STREAM(CANCEL)` when the deadline passes:
    /// what grpc-java's server does to a streaming call whose deadline expires
    /// (`ServerImpl`'s `ContextCloser` cancels the stream).
    Reset,
}

/// An HTTP/2 (h2c) gRPC upstream, written with `h2` so that it can reset streams, that
/// keeps the deadline each call carries and ends the call as `how` says when it passes;
/// returns its address and its calls. It runs on a thread and runtime of its own, as a
/// server in another process would: its timing does not wait on the gateway's workers.
async fn deadline_upstream(how: AtTheDeadline) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(serve_deadlines(listener, how, c));
    });
    (addr, calls)
}

async fn serve_deadlines(listener: std::net::TcpListener, how: AtTheDeadline, c: Arc<AtomicUsize>) {
    let listener = TcpListener::from_std(listener).unwrap();
    {
        while let Ok((tcp, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    c.fetch_add(1, SeqCst);
                    tokio::spawn(async move {
                        let started = tokio::time::Instant::now();
                        // grpc-go reads the header fields in order, the last
                        // `grpc-timeout` winning.
                        let budget = request
                            .headers()
                            .get_all("grpc-timeout")
                            .iter()
                            .next_back()
                            .and_then(|v| seawall::gateway::grpc::parse_timeout(v.as_bytes()))
                            .unwrap_or(Duration::from_secs(60));
                        match how {
                            AtTheDeadline::TrailersOnly => {
                                // Precisely: tokio's timers would round it up to a
                                // millisecond. (This runtime serves nothing else.)
                                std::thread::sleep(budget);
                                let head = http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", "4")
                                    .header("grpc-message", "context deadline exceeded")
                                    .body(())
                                    .unwrap();
                                let _ = respond.send_response(head, true);
                            }
                            AtTheDeadline::Reset => {
                                let head = http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(())
                                    .unwrap();
                                let Ok(mut send) = respond.send_response(head, false) else {
                                    return;
                                };
                                let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\0"), false);
                                tokio::time::sleep_until(started + budget).await;
                                send.send_reset(h2::Reason::CANCEL);
                            }
                        }
                        // The request's stream is kept open until the call is answered.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        drop(request);
                    });
                }
            });
        }
    }
}

/// The gateway's docs (`gateway::grpc`): a gRPC call's own deadline is "never [counted]
/// against the endpoint (a caller choosing a deadline of a microsecond must not open
/// breakers)". A caller sends `grpc-timeout: 2m`; the gateway forwards it, and the
/// upstream answers `DEADLINE_EXCEEDED` in one head (trailers-only) when its deadline,
/// later than the gateway's, passes. That head often reaches the gateway before the
/// gateway's own timer (tokio's, of a millisecond's grain, rounded up) fires, and its
/// `grpc-status` is then classified as is, a failure of the endpoint: calls in a row
/// eject it and open its breaker. (The check the trailers get, "the caller's deadline
/// has passed", is not made for a status in the head.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailers_only_deadline_exceeded_after_the_callers_deadline_is_not_the_upstreams_failure()
{
    const CALLS: u64 = 30;
    let (addr, calls) = deadline_upstream(AtTheDeadline::TrailersOnly).await;
    let gw = h2_gateway(addr, "timeout = \"30s\"").await;
    let mut statuses = Vec::new();
    for i in 0..CALLS {
        let mut client = h2_client(gw.local_addr()).await;
        let (response, _send) = client
            .send_request(
                grpc_request(gw.local_addr(), &[("grpc-timeout", "2m")]),
                true,
            )
            .unwrap();
        let response = timeout(BOUND, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        statuses.push(response.headers().get("grpc-status").cloned());
    }
    settled(&gw, CALLS).await;
    assert!(calls.load(SeqCst) >= 1, "the calls reached the upstream");
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.ejected, e.breaker.as_deref()),
        (0, false, Some("closed")),
        "the caller's own deadline of 2 ms counted against the upstream: {e:?}"
    );
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(
            status.as_ref().map(|v| v.as_bytes()),
            Some(&b"4"[..]),
            "call {i}"
        );
    }
    assert_eq!(super::limits::route(&gw).client_errors.deadline, CALLS);
    gw.shutdown().await;
}

/// The same promise, for a streaming call to a server that ends an expired call with a
/// stream reset (grpc-java: `RST_STREAM(CANCEL)` when the deadline passes) rather than
/// with `DEADLINE_EXCEEDED` trailers. The fix for a caller's deadline kept by the
/// upstream mid-stream (CHANGELOG, [Unreleased]) looks at trailers only: a body error
/// after the caller's deadline is still the endpoint's failure, so any caller with a
/// short `grpc-timeout` opens breakers against such an upstream. And the caller, whose
/// deadline it was, is told by a stream reset (`INTERNAL` to a gRPC client) where the
/// gateway's own answer to a passed deadline is `DEADLINE_EXCEEDED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_at_the_callers_deadline_is_not_the_upstreams_failure() {
    const CALLS: usize = 4;
    let (addr, calls) = deadline_upstream(AtTheDeadline::Reset).await;
    let gw = h2_gateway(addr, "timeout = \"30s\"").await;
    let mut ends = Vec::new();
    for i in 0..CALLS {
        let mut client = h2_client(gw.local_addr()).await;
        let (response, _send) = client
            .send_request(
                grpc_request(gw.local_addr(), &[("grpc-timeout", "100m")]),
                true,
            )
            .unwrap();
        let response = timeout(BOUND, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        let mut body = response.into_body();
        let ended = timeout(BOUND, drain(&mut body))
            .await
            .expect("the call ends");
        ends.push(ended.map_err(|e| e.to_string()));
    }
    settled(&gw, CALLS as u64).await;
    assert_eq!(calls.load(SeqCst), CALLS);
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.ejected, e.breaker.as_deref()),
        (0, false, Some("closed")),
        "the caller's own deadline counted against the upstream: {e:?}"
    );
    assert_eq!(
        super::limits::route(&gw).client_errors.deadline,
        CALLS as u64
    );
    for (i, ended) in ends.iter().enumerate() {
        assert_eq!(
            ended.as_ref().ok().cloned().flatten().as_deref(),
            Some("4"),
            "call {i}: the caller is told DEADLINE_EXCEEDED: {ended:?}"
        );
    }
    gw.shutdown().await;
}

/// CHANGELOG, [Unreleased]: "a gRPC caller's own deadline is never the upstream's
/// failure, streaming calls included [...] gRPC servers keep it for the whole call". The
/// route's `timeout` bounds the wait for an answer's head only; a streaming call (a
/// watch) lives on after it, and the upstream keeps the caller's `grpc-timeout` to its
/// end. When that deadline is not shorter than the route's timeout (here 300 ms against
/// 100 ms: a watch opened for a minute behind a route of 30 s, say), the gateway does not
/// note it, and the upstream's `DEADLINE_EXCEEDED` at the caller's deadline is the
/// endpoint's failure: every watch that runs to its deadline counts against a healthy
/// upstream, and a few of them eject it and open its breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_longer_than_the_route_timeout_kept_mid_stream_is_not_the_upstreams_failure()
 {
    deadlines_kept_mid_stream_are_the_callers(
        "timeout = \"100ms\"\nbody_timeout = \"10s\"",
        "300m",
    )
    .await;
}

/// The deadline guard reads another `grpc-timeout` than the upstream keeps. A caller
/// sends two: `300m` then `1u`. The gateway takes the first (the caller's deadline is
/// 300 ms away) and forwards both; grpc-go reads the fields in order and keeps the
/// last, a microsecond, and answers `DEADLINE_EXCEEDED` at once, long before the
/// deadline the gateway knows of: the endpoint's failure, however the gateway checks
/// the caller's deadline. Any client opens breakers and ejects a healthy grpc-go
/// upstream at will. (The gateway should forward the one deadline it honours, or the
/// shortest, or refuse the call.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_grpc_timeout_does_not_make_the_callers_deadline_the_upstreams_failure() {
    const CALLS: u64 = 6;
    let (addr, calls) = deadline_upstream(AtTheDeadline::TrailersOnly).await;
    let gw = h2_gateway(addr, "timeout = \"30s\"").await;
    for i in 0..CALLS {
        let mut client = h2_client(gw.local_addr()).await;
        let (response, _send) = client
            .send_request(
                grpc_request(
                    gw.local_addr(),
                    &[("grpc-timeout", "300m"), ("grpc-timeout", "1u")],
                ),
                true,
            )
            .unwrap();
        let response = timeout(BOUND, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        assert!(
            response.headers().contains_key("grpc-status"),
            "call {i}: {response:?}"
        );
    }
    settled(&gw, CALLS).await;
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.ejected, e.breaker.as_deref()),
        (0, false, Some("closed")),
        "a caller's own deadline counted against the upstream ({} calls reached it): {e:?}",
        calls.load(SeqCst)
    );
    gw.shutdown().await;
}
