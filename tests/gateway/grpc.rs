//! gRPC callers through a real gateway over loopback: the gateway's own answers (limits,
//! open breakers, timeouts, no route) come as trailers-only gRPC statuses, not HTTP
//! errors with a JSON body; an upstream's `grpc-status` in a trailers-only answer counts
//! for the endpoint's breaker and outlier detection as gRPC says, whatever the HTTP 200.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::limits::{
    STRICT, endpoint, exchange, gateway, get, settled, silent_upstream, status_of,
};

/// A gRPC call's head as a client sends it (the body is one empty message).
fn grpc_call(path: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/grpc\r\nTE: trailers\r\n\
         Content-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0"
    )
}

/// The value of header `name` in a raw answer.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A trailers-only gRPC answer with `code`: `200`, gRPC's content type, no body.
#[track_caller]
fn assert_grpc_status(answer: &str, code: &str) {
    assert_eq!(status_of(answer), 200, "{answer}");
    assert_eq!(header(answer, "grpc-status"), Some(code), "{answer}");
    assert_eq!(
        header(answer, "content-type"),
        Some("application/grpc"),
        "{answer}"
    );
    assert!(header(answer, "grpc-message").is_some(), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");
}

/// An upstream answering every request as a gRPC server whose calls fail with `code`, in
/// one head (trailers-only, as tonic answers an error); returns how many it served.
async fn grpc_upstream(code: u8) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let h = h.clone();
            let svc = hyper::service::service_fn(move |_: Request<Incoming>| {
                h.fetch_add(1, SeqCst);
                let response = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", code.to_string())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                async move { Ok::<_, hyper::Error>(response) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_grpc_call_is_resource_exhausted_with_pushback() {
    let (addr, _) = grpc_upstream(0).await;
    let gw = gateway(
        addr,
        "",
        "[routes.rate_limit]\nglobal = { per_second = 1, burst = 1 }\n",
    )
    .await;
    let first = exchange(gw.local_addr(), grpc_call("/api/svc/Method").as_bytes()).await;
    assert_eq!(header(&first, "grpc-status"), Some("0"), "{first}");
    let refused = exchange(gw.local_addr(), grpc_call("/api/svc/Method").as_bytes()).await;
    assert_grpc_status(&refused, "8");
    let pushback: u64 = header(&refused, "grpc-retry-pushback-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pushback: {refused}"));
    assert!((1..=2_000).contains(&pushback), "{refused}");
    // The same refusal to a plain HTTP caller stays a 429.
    let plain = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
    assert_eq!(status_of(&plain), 429, "{plain}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_open_upstreams_are_unavailable_to_grpc_callers() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let gw = gateway(addr, "", STRICT).await;
    // Refused connections (502), then every endpoint ejected and its breaker open (503).
    for _ in 0..4 {
        let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
        assert_grpc_status(&answer, "14");
    }
    settled(&gw, 4).await;
    assert_eq!(endpoint(&gw).breaker.as_deref(), Some("open"));
    let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
    assert_grpc_status(&answer, "14");
    // No route: UNIMPLEMENTED, as gRPC's HTTP mapping has it for 404.
    let answer = exchange(gw.local_addr(), grpc_call("/elsewhere/M").as_bytes()).await;
    assert_grpc_status(&answer, "12");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_is_deadline_exceeded_to_a_grpc_caller() {
    let (addr, _) = silent_upstream().await;
    let gw = gateway(addr, "", "timeout = \"100ms\"").await;
    let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
    assert_grpc_status(&answer, "4");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_grpc_unavailable_opens_the_endpoint_breaker() {
    let (addr, hits) = grpc_upstream(14).await;
    let gw = gateway(addr, "", STRICT).await;
    for i in 0..4 {
        let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
        // The upstream's own answer, passed on as it is.
        assert_eq!(
            header(&answer, "grpc-status"),
            Some("14"),
            "call {i}: {answer}"
        );
    }
    settled(&gw, 4).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 4, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("open"), "{e:?}");
    // Refused by the gateway now, without a call upstream.
    let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
    assert_grpc_status(&answer, "14");
    assert_eq!(hits.load(SeqCst), 4);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_grpc_not_found_is_not_a_failure() {
    let (addr, hits) = grpc_upstream(5).await;
    let gw = gateway(addr, "", STRICT).await;
    for i in 0..8 {
        let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
        assert_eq!(
            header(&answer, "grpc-status"),
            Some("5"),
            "call {i}: {answer}"
        );
    }
    settled(&gw, 8).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 0, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("closed"), "{e:?}");
    assert_eq!(hits.load(SeqCst), 8);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_short_deadline_is_deadline_exceeded_and_never_blamed_on_the_upstream() {
    let (addr, accepted) = silent_upstream().await;
    let route = format!("timeout = \"30s\"\n{STRICT}");
    let gw = gateway(addr, "", &route).await;
    let call = grpc_call("/api/svc/M").replace("TE: trailers", "TE: trailers\r\ngrpc-timeout: 50m");
    let started = tokio::time::Instant::now();
    for i in 0..6 {
        let answer = exchange(gw.local_addr(), call.as_bytes()).await;
        assert_grpc_status(&answer, "4");
        assert!(answer.contains("grpc-timeout"), "call {i}: {answer}");
    }
    // Six calls at the caller's 50 ms, not the route's 30 s.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    settled(&gw, 6).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 0, "{e:?}");
    assert!(!e.ejected, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("closed"), "{e:?}");
    assert_eq!(super::limits::route(&gw).client_errors.deadline, 6);
    assert!(accepted.load(SeqCst) >= 1, "the calls reached the upstream");
    gw.shutdown().await;
}

/// An HTTP/1 upstream written by hand that answers every request as a gRPC server does a
/// call that sent a message and then failed: `200`, one message, and `grpc-status: code`
/// in the trailers of a chunked body. Returns how many requests it answered.
async fn trailers_upstream(code: u8) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request at a time: its head, then its 5-byte body.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    while buf.len() < end + 5 {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 5);
                    h.fetch_add(1, SeqCst);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n\
                         transfer-encoding: chunked\r\n\r\n5\r\n\0\0\0\0\0\r\n\
                         0\r\ngrpc-status: {code}\r\ngrpc-message: failed\r\n\r\n"
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_in_the_trailers_counts_when_the_body_ends() {
    let (addr, hits) = trailers_upstream(14).await;
    let gw = gateway(addr, "", STRICT).await;
    for i in 0..4 {
        let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
        // (HTTP/1 sends trailers only where the response declares them, in `Trailer`,
        // which the gateway does not forward: HTTP/2 callers get them.)
        assert_eq!(status_of(&answer), 200, "call {i}: {answer}");
    }
    settled(&gw, 4).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 4, "{e:?}");
    assert_eq!(e.breaker.as_deref(), Some("open"), "{e:?}");
    let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
    assert_grpc_status(&answer, "14");
    assert_eq!(hits.load(SeqCst), 4);
    gw.shutdown().await;

    // NOT_FOUND in the trailers is an answer, not a failure.
    let (addr, _) = trailers_upstream(5).await;
    let gw = gateway(addr, "", STRICT).await;
    for _ in 0..6 {
        let answer = exchange(gw.local_addr(), grpc_call("/api/svc/M").as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{answer}");
    }
    settled(&gw, 6).await;
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.breaker.as_deref()),
        (0, Some("closed")),
        "{e:?}"
    );
    gw.shutdown().await;
}
