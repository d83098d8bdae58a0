//! Stale keep-alive connections to an upstream, over loopback (issue 12, item 4): a
//! request written on a reused connection just as the upstream drops it is sent again,
//! once, on a new connection, if it is idempotent and has no body; the gateway counts it
//! (`retried_stale`). An upstream's advertised `Keep-Alive: timeout` is honoured: its idle
//! connections are not reused past it. The upstreams are hand-written, so what happens
//! on each connection is exact. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);

/// What a hand-written upstream saw.
#[derive(Default)]
struct Seen {
    /// Connections accepted.
    accepted: AtomicUsize,
    /// Requests answered `200`.
    answered: AtomicUsize,
    /// Connections reset on their second request.
    reset: AtomicUsize,
}

/// Reads one request (head, and a `Content-Length` body) off `stream`; `false` if the
/// connection closed first. `buf` keeps what was read past it.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..end + 4 + length);
            return true;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An upstream whose first connection answers its first request with keep-alive (and
/// `extra` headers), then resets the connection (`SO_LINGER` 0) when its second request
/// has arrived, without answering: an idle timeout racing the request. Every later
/// connection answers all its requests.
async fn resetting_upstream(extra: &'static str) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let first = state.accepted.fetch_add(1, SeqCst) == 0;
            let state = state.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut n = 0;
                while read_request(&mut stream, &mut buf).await {
                    n += 1;
                    if first && n == 2 {
                        // The request is in: reset, no answer.
                        #[allow(deprecated)]
                        let _ = stream.set_linger(Some(Duration::ZERO));
                        state.reset.fetch_add(1, SeqCst);
                        return;
                    }
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{extra}\r\nok");
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    state.answered.fetch_add(1, SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

/// A gateway with one route, `/api` to `upstream`.
/// Lets the pooled connection idle long enough (the pool's 200 ms) for the upstream's
/// idle close to be possible: only then is a request's head kept to send it again.
async fn idle() {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
}

async fn gateway(upstream: SocketAddr) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    );
    let config = GatewayConfig::from_toml_str(&config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

/// Sends `request` to the gateway on a connection of its own; the status and body.
async fn send<B>(gw: &GatewayHandle, request: Request<B>) -> (StatusCode, Bytes)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    timeout(BOUND, async {
        let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let response = sender.send_request(request).await.expect("an answer");
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    })
    .await
    .expect("a request hung past its bound")
}

fn get() -> Request<Empty<Bytes>> {
    Request::get("/api/x")
        .header(http::header::HOST, "gw")
        .body(Empty::new())
        .unwrap()
}

fn retried_stale(gw: &GatewayHandle) -> u64 {
    gw.gateway().status().retried_stale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_reset_on_a_reused_connection_is_retried_on_a_new_one() {
    let (addr, seen) = resetting_upstream("").await;
    let gw = gateway(addr).await;
    assert_eq!(send(&gw, get()).await, (StatusCode::OK, Bytes::from("ok")));
    assert_eq!(seen.accepted.load(SeqCst), 1);

    idle().await;
    // Goes on the pooled connection, which the upstream resets once it has the request.
    assert_eq!(send(&gw, get()).await, (StatusCode::OK, Bytes::from("ok")));
    assert_eq!(
        seen.reset.load(SeqCst),
        1,
        "the pooled connection was reused"
    );
    assert_eq!(
        seen.accepted.load(SeqCst),
        2,
        "answered on a new connection"
    );
    assert_eq!(seen.answered.load(SeqCst), 2);
    assert_eq!(retried_stale(&gw), 1);
    let metrics = gw.gateway().metrics();
    assert!(
        metrics.contains("seawall_gateway_retried_stale_total 1"),
        "{metrics}"
    );
    let route = &gw.gateway().status().routes[0];
    assert_eq!(route.upstream_errors.bad_gateway, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_reset_on_a_reused_connection_is_not_retried() {
    let (addr, seen) = resetting_upstream("").await;
    let gw = gateway(addr).await;
    assert_eq!(send(&gw, get()).await.0, StatusCode::OK);
    idle().await;
    let post = Request::post("/api/x")
        .header(http::header::HOST, "gw")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&gw, post).await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(seen.reset.load(SeqCst), 1);
    assert_eq!(seen.accepted.load(SeqCst), 1, "not sent again");
    assert_eq!(retried_stale(&gw), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_reset_on_a_reused_connection_is_not_retried() {
    let (addr, seen) = resetting_upstream("").await;
    let gw = gateway(addr).await;
    assert_eq!(send(&gw, get()).await.0, StatusCode::OK);
    idle().await;
    let with_body = Request::get("/api/x")
        .header(http::header::HOST, "gw")
        .body(Full::new(Bytes::from_static(b"query")))
        .unwrap();
    // The client's body was streamed upstream: it cannot be sent again.
    assert_eq!(send(&gw, with_body).await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(seen.accepted.load(SeqCst), 1, "not sent again");
    assert_eq!(retried_stale(&gw), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_reset_on_a_new_connection_is_not_retried() {
    // Every connection resets its first request.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, SeqCst);
            if read_request(&mut stream, &mut Vec::new()).await {
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
            }
        }
    });
    let gw = gateway(addr).await;
    assert_eq!(send(&gw, get()).await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(SeqCst), 1, "not sent again");
    assert_eq!(retried_stale(&gw), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_not_reused_past_the_advertised_keep_alive_timeout() {
    // The upstream says it keeps idle connections 1 s, but does not close them itself:
    // a second connection proves the gateway let the first go.
    let (addr, seen) = resetting_upstream("keep-alive: timeout=1\r\n").await;
    let gw = gateway(addr).await;
    assert_eq!(send(&gw, get()).await.0, StatusCode::OK);
    // Past the advertised timeout the pooled connection must not be used (this upstream
    // would reset a second request on it).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(send(&gw, get()).await, (StatusCode::OK, Bytes::from("ok")));
    assert_eq!(
        seen.accepted.load(SeqCst),
        2,
        "an idle connection was reused past its Keep-Alive timeout"
    );
    assert_eq!(
        seen.reset.load(SeqCst),
        0,
        "the stale connection was not used"
    );
    assert_eq!(retried_stale(&gw), 0);
    gw.shutdown().await;
}
