//! Hostile and broken clients against a real gateway over loopback, with raw bytes: request
//! bodies that break, stall or never end, clients that never read, oversized heads; and
//! upstreams that never answer or refuse connections, which must count as failures where
//! client faults must not. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use seawall::gateway::status::{EndpointReport, RouteStatus};
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

pub(crate) const BOUND: Duration = Duration::from_secs(10);

/// A healthy upstream: reads the whole request body, then answers `200` with the method,
/// the body's length and its first bytes as JSON. A request whose body fails is dropped
/// (the connection closes), as most servers do.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let h = h.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, SeqCst);
                    let method = req.method().to_string();
                    let body = req.into_body().collect().await?.to_bytes();
                    let json = serde_json::json!({
                        "method": method,
                        "len": body.len(),
                        "body": String::from_utf8_lossy(&body[..body.len().min(64)]),
                    });
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(json.to_string()))))
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    Upstream { addr, hits }
}

/// An upstream that accepts connections and never answers; returns how many it accepted.
pub(crate) async fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted)
}

/// A gateway with `[gateway]` settings `server` and one route `/api` (plus `route`
/// settings) to a static service at `upstream`.
pub(crate) async fn gateway(upstream: SocketAddr, server: &str, route: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n{route}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    );
    let config = GatewayConfig::from_toml_str(&config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

/// A breaker that opens after 4 failures of 4 calls, and outlier detection that ejects
/// after 3 failures in a row, even the only endpoint.
pub(crate) const STRICT: &str = "
[routes.breaker]
failure_rate = 0.5
minimum_calls = 4
window = 8
wait_in_open = \"30s\"

[routes.balance]
outlier = { consecutive_failures = 3, base_ejection = \"30s\", max_ejected = 1.0 }
";

/// Writes `raw`, then reads until the peer closes or the bound passes; returns what was
/// read (empty when the connection was reset).
pub(crate) async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    read_answer(&mut stream).await
}

/// Reads one answer: its head, and its body if it has a `Content-Length`; or what comes
/// until the peer closes.
pub(crate) async fn read_answer(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = timeout(BOUND, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(usize::MAX);
                if out.len() >= (end + 4).saturating_add(length) {
                    return;
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
}

pub(crate) fn route(gw: &GatewayHandle) -> RouteStatus {
    gw.gateway().status().routes.remove(0)
}

pub(crate) fn endpoint(gw: &GatewayHandle) -> EndpointReport {
    route(gw).endpoints.remove(0)
}

/// Waits until the route has seen `requests` and none is in flight to its endpoint.
pub(crate) async fn settled(gw: &GatewayHandle, requests: u64) {
    timeout(BOUND, async {
        loop {
            let r = route(gw);
            if r.requests >= requests && r.endpoints.iter().all(|e| e.outstanding == 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the route did not settle: {:?}", route(gw)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_body_errors_never_count_against_the_upstream() {
    const N: usize = 6;
    let up = upstream().await;
    let gw = gateway(up.addr, "", STRICT).await;
    let addr = gw.local_addr();
    for _ in 0..N {
        // A broken chunk: `ZZ` is no chunk size.
        let answer = exchange(
            addr,
            b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\nZZ\r\n",
        )
        .await;
        assert_eq!(status_of(&answer), 400, "{answer}");
    }
    for _ in 0..N {
        // An upload that stops part-way, and the client goes.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n0123456789",
            )
            .await
            .unwrap();
        drop(stream);
    }
    settled(&gw, 2 * N as u64).await;
    // Another client is served: the breaker is closed and the endpoint in rotation.
    let answer = exchange(addr, get("/api/ok").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let e = endpoint(&gw);
    assert_eq!(e.failures, 0, "{e:?}");
    assert!(!e.ejected, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("closed"), "{e:?}");
    let r = route(&gw);
    let upstream_errors = r.upstream_errors;
    assert_eq!(
        upstream_errors.bad_gateway + upstream_errors.timeout,
        0,
        "{upstream_errors:?}"
    );
    assert!(
        r.client_errors.bad_body >= N as u64,
        "{:?}",
        r.client_errors
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_body_slower_than_the_route_timeout_is_408_and_not_counted() {
    let up = upstream().await;
    let gw = gateway(up.addr, "", &format!("timeout = \"300ms\"\n{STRICT}")).await;
    for _ in 0..5 {
        let started = Instant::now();
        // 10 bytes of 100, then nothing: the upstream waits for the rest.
        let answer = exchange(
            gw.local_addr(),
            b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await;
        assert_eq!(status_of(&answer), 408, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    settled(&gw, 5).await;
    let e = endpoint(&gw);
    assert_eq!((e.failures, e.ejected), (0, false), "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("closed"), "{e:?}");
    let r = route(&gw);
    assert_eq!(r.upstream_errors.timeout, 0, "{:?}", r.upstream_errors);
    assert_eq!(r.client_errors.body_timeout, 5, "{:?}", r.client_errors);
    let answer = exchange(gw.local_addr(), get("/api/ok").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeouts_count_as_failures() {
    let (addr, accepted) = silent_upstream().await;
    let route = "timeout = \"200ms\"

[routes.breaker]
failure_rate = 0.5
minimum_calls = 8
window = 8
wait_in_open = \"30s\"

[routes.balance]
outlier = { consecutive_failures = 5, base_ejection = \"30s\", max_ejected = 1.0 }
";
    let gw = gateway(addr, "", route).await;
    for i in 0..8 {
        let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
        assert_eq!(status_of(&answer), 504, "request {i}: {answer}");
    }
    settled(&gw, 8).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 8, "{e:?}");
    assert!(e.ejected, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("open"), "{e:?}");
    assert!(accepted.load(SeqCst) >= 1);
    // The breaker is open: the next request is refused without waiting.
    let started = Instant::now();
    let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_count_as_failures() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let gw = gateway(addr, "", STRICT).await;
    for i in 0..4 {
        let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
        assert_eq!(status_of(&answer), 502, "request {i}: {answer}");
    }
    settled(&gw, 4).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 4, "{e:?}");
    assert!(e.ejected, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("open"), "{e:?}");
    gw.shutdown().await;
}

/// An upstream answering every request with a body of `len` bytes, written in 64 KiB
/// pieces until done or its connection fails; `closed` is set when a write fails.
async fn streaming_upstream(len: usize) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let c = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    c.store(true, SeqCst);
                    return;
                }
                let piece = vec![b'x'; 65536];
                let mut sent = 0;
                while sent < len {
                    let n = piece.len().min(len - sent);
                    if stream.write_all(&piece[..n]).await.is_err() {
                        c.store(true, SeqCst);
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    (addr, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_after_the_send_timeout() {
    const LEN: usize = 256 << 20;
    let (up, upstream_closed) = streaming_upstream(LEN).await;
    let gw = gateway(up, "send_timeout = \"300ms\"", "timeout = \"5s\"").await;
    // A small receive window, so that the gateway's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(gw.local_addr()).await.unwrap();
    client.write_all(get("/api/big").as_bytes()).await.unwrap();
    let started = Instant::now();
    // The client never reads: the gateway gives up on it, and on its upstream connection.
    timeout(Duration::from_secs(5), async {
        while !upstream_closed.load(SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the upstream connection is closed once the send timeout fires");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // What the client reads now ends: the gateway closed its connection.
    let mut total = 0usize;
    let mut buf = vec![0u8; 65536];
    timeout(BOUND, async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the client connection was closed");
    assert!(total < LEN, "{total} bytes: the whole answer was sent");
    assert_eq!(gw.gateway().status().send_timeouts, 1);
    // The gateway still serves.
    let (ok_up, _) = streaming_upstream(10).await;
    let gw2 = gateway(ok_up, "send_timeout = \"300ms\"", "").await;
    let answer = exchange(gw2.local_addr(), get("/api/x").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    gw2.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_the_limit_is_413_without_reaching_the_upstream() {
    let up = upstream().await;
    let gw = gateway(up.addr, "", "max_request_body = 1000").await;
    let answer = exchange(
        gw.local_addr(),
        b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1001\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(up.hits.load(SeqCst), 0);
    // At the limit: through.
    let mut request =
        b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
            .to_vec();
    request.extend_from_slice(&[b'a'; 1000]);
    let answer = exchange(gw.local_addr(), &request).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("\"len\":1000"), "{answer}");
    gw.shutdown().await;
}

/// A client that sends its whole body before reading (as most do) must get its 413, not
/// a connection reset: the gateway closes with a lingering close, reading and discarding
/// the body it refused instead of closing a socket with unread bytes in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_a_refused_body_reads_its_413() {
    const BODY: usize = 32 << 20;
    let up = upstream().await;
    let gw = gateway(up.addr, "", "max_request_body = 1000").await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let head = format!("POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {BODY}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 64 << 10];
    let sent = timeout(BOUND, async {
        let mut sent = 0;
        while sent < BODY {
            stream.write_all(&chunk).await?;
            sent += chunk.len();
        }
        Ok::<_, std::io::Error>(sent)
    })
    .await
    .expect("the body is taken within the bound");
    assert_eq!(sent.as_ref().ok(), Some(&BODY), "{sent:?}");
    let answer = read_answer(&mut stream).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(up.hits.load(SeqCst), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_wide_body_limit_applies_by_default() {
    let up = upstream().await;
    let gw = gateway(up.addr, "max_request_body = 2048", "").await;
    let answer = exchange(
        gw.local_addr(),
        b"PUT /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 4096\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    gw.shutdown().await;
    // 1 MiB without any setting.
    let gw = gateway(up.addr, "", "").await;
    let answer = exchange(
        gw.local_addr(),
        b"PUT /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1048577\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(up.hits.load(SeqCst), 0);
    gw.shutdown().await;
    // A route's own setting wins; 0 is no limit.
    let gw = gateway(up.addr, "max_request_body = 100", "max_request_body = 0").await;
    let mut request =
        b"PUT /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"
            .to_vec();
    request.extend_from_slice(&[b'a'; 5000]);
    let answer = exchange(gw.local_addr(), &request).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("\"len\":5000"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_is_413_and_not_counted() {
    let up = upstream().await;
    let gw = gateway(up.addr, "", &format!("max_request_body = 1000\n{STRICT}")).await;
    let chunk = format!("{:x}\r\n{}\r\n", 400, "b".repeat(400));
    for _ in 0..5 {
        let mut request =
            b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            request.extend_from_slice(chunk.as_bytes());
        }
        request.extend_from_slice(b"0\r\n\r\n");
        let answer = exchange(gw.local_addr(), &request).await;
        assert_eq!(status_of(&answer), 413, "{answer}");
    }
    settled(&gw, 5).await;
    let e = endpoint(&gw);
    assert_eq!((e.failures, e.ejected), (0, false), "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("closed"), "{e:?}");
    assert_eq!(route(&gw).client_errors.too_large, 5);
    // Under the limit, chunked: through whole.
    let mut request =
        b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    request.extend_from_slice(chunk.as_bytes());
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(gw.local_addr(), &request).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("\"len\":400"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lines_and_heads_are_431() {
    let up = upstream().await;
    let gw = gateway(up.addr, "", "").await;
    let with_headers = |headers: &[(String, String)]| {
        let mut raw = String::from("GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        raw
    };
    // 10 KiB in one line, 48 KiB in all: within the defaults.
    let fine: Vec<_> = (0..5)
        .map(|i| (format!("x-fine-{i}"), "a".repeat(10 * 1024 - 20)))
        .collect();
    let answer = exchange(gw.local_addr(), with_headers(&fine).as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    // One line of 20 KiB.
    let long = vec![("x-long".to_owned(), "a".repeat(20 * 1024))];
    let answer = exchange(gw.local_addr(), with_headers(&long).as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(route(&gw).client_errors.headers_too_large, 1);
    // 80 KiB of lines of 10 KiB each: refused by the server before routing.
    let many: Vec<_> = (0..8)
        .map(|i| (format!("x-many-{i}"), "a".repeat(10 * 1024)))
        .collect();
    let answer = exchange(gw.local_addr(), with_headers(&many).as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(gw.gateway().status().refused, 1);
    // A head far larger than the bound, sent in pieces: the server gives up reading it
    // at the bound (it never holds ~400 KB) and answers 431 itself.
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: gw\r\nx-huge: ")
        .await
        .unwrap();
    let piece = [b'a'; 16 * 1024];
    let mut sent = 0;
    for _ in 0..25 {
        match stream.write_all(&piece).await {
            Ok(()) => sent += piece.len(),
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let answer = read_answer(&mut stream).await;
    assert_eq!(status_of(&answer), 431, "after {sent} bytes: {answer}");
    assert_eq!(gw.gateway().status().refused, 2);
    assert_eq!(up.hits.load(SeqCst), 1, "only the fine request reached it");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_are_configurable() {
    let up = upstream().await;
    let gw = gateway(
        up.addr,
        "max_header_line = 1024\nmax_headers_size = 16384",
        "",
    )
    .await;
    let raw = format!(
        "GET /api/x HTTP/1.1\r\nHost: gw\r\nx-a: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1100)
    );
    let answer = exchange(gw.local_addr(), raw.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    let raw = format!(
        "GET /api/x HTTP/1.1\r\nHost: gw\r\n{}Connection: close\r\n\r\n",
        (0..20)
            .map(|i| format!("x-{i}: {}\r\n", "a".repeat(900)))
            .collect::<String>()
    );
    let answer = exchange(gw.local_addr(), raw.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(up.hits.load(SeqCst), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_method_are_forwarded() {
    let up = upstream().await;
    let gw = gateway(up.addr, "", "").await;
    for method in ["GET", "DELETE", "OPTIONS", "POST"] {
        let chunked = format!(
            "{method} /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        let answer = exchange(gw.local_addr(), chunked.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert!(
            answer.contains("\"len\":11") && answer.contains("hello world"),
            "{method} chunked: {answer}"
        );
        let sized = format!(
            "{method} /api/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        let answer = exchange(gw.local_addr(), sized.as_bytes()).await;
        assert!(
            answer.contains("\"len\":5") && answer.contains("hello"),
            "{method} sized: {answer}"
        );
    }
    gw.shutdown().await;
}

#[test]
fn limit_settings_are_validated() {
    let err = |server: &str, route: &str| {
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n{route}\n"
        );
        let e = GatewayConfig::from_toml_str(&config).unwrap_err();
        format!("{}: {}", e.field(), e.reason())
    };
    assert_eq!(
        err("max_headers_size = 4096", ""),
        "gateway.max_headers_size: must be at least 8192 (8 KiB)"
    );
    assert_eq!(
        err("max_header_line = 0", ""),
        "gateway.max_header_line: must be at least 1"
    );
    assert_eq!(
        err("send_timeout = \"0s\"", ""),
        "gateway.send_timeout: must be more than zero"
    );
    assert!(
        err("max_request_body = -1", "").contains("max_request_body"),
        "a negative size is a parse error naming the key"
    );
}
