//! The HTTP/2 upstream refusal classification (`H2Refusal`): a refusal or a
//! lost connection must not let an upstream that is genuinely failing escape the
//! endpoint's failure accounting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::limits::{exchange, get, status_of};

const BOUND: Duration = Duration::from_secs(10);

fn h2_gateway_toml(upstream: SocketAddr) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\nprotocol = \"h2\"\n"
    )
}

fn post(path: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
}

/// An HTTP/2 upstream (the `h2` crate) that resets every stream it is sent with
/// `REFUSED_STREAM`: up, accepting connections, serving nothing. Counts its streams.
async fn refusing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let count = streams.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    count.fetch_add(1, SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, streams)
}

/// An upstream that refuses every stream is not serving: its refusals of requests with a
/// body (every gRPC call, every upload) must reach the endpoint's failure accounting as
/// a refused `GET`'s does (on its retry), or outlier detection and the breaker never
/// take it out of the balance and its share of the traffic is `502` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_refusing_every_stream_with_a_body_is_failing() {
    let (addr, streams) = refusing_upstream().await;
    let gw = super::spawn_gateway(&h2_gateway_toml(addr)).await;
    let gw_addr = gw.local_addr();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let answer = timeout(BOUND, exchange(gw_addr, post("/api/upload").as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
    }
    super::limits::settled(&gw, 6).await;
    let e = super::limits::endpoint(&gw);
    assert!(
        e.failures > 0,
        "every one of 6 POSTs refused by the upstream (statuses {statuses:?}, {} streams \
         refused), yet no failure recorded against the endpoint: {e:?}",
        streams.load(SeqCst)
    );
    gw.shutdown().await;
}

/// An HTTP/2 upstream (the `h2` crate) that crashes on `/api/crash`: it drops the
/// connection (its socket closed, no `GOAWAY`). `/api/held` is never answered (the test
/// is told when it arrives and when the gateway resets it); any other path is `200`.
async fn crashing_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<&'static str>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    match request.uri().path() {
                        "/api/held" => {
                            let _ = tx.send("held");
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                                let _ = tx.send("reset");
                            });
                        }
                        "/api/crash" => {
                            let _ = tx.send("crash");
                            // The process dies: the connection goes with it.
                            return;
                        }
                        _ => {
                            let _ = respond.send_response(http::Response::new(()), true);
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn next(seen: &mut mpsc::UnboundedReceiver<&'static str>) -> Option<&'static str> {
    timeout(BOUND, seen.recv())
        .await
        .expect("the upstream in time")
}

/// SECURITY.md's promise (a client's fault is never the endpoint's) must not turn into
/// its converse: one client that went away, once, on a long-lived shared HTTP/2
/// connection, must not make every later loss of that connection the clients' doing.
/// Here each connection serves a client that hangs up (one stream reset, far below any
/// rapid-reset guard), then answers more requests normally, then the upstream crashes
/// under a request: three crashes, three connections, and each is the endpoint's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_crashing_after_one_client_hung_up_long_before_is_failing() {
    let (addr, mut seen) = crashing_upstream().await;
    let gw = super::spawn_gateway(&h2_gateway_toml(addr)).await;
    let gw_addr = gw.local_addr();
    let mut crashes = Vec::new();
    for _ in 0..3 {
        // A client asks and goes away: the gateway resets its stream.
        let mut gone = TcpStream::connect(gw_addr).await.unwrap();
        gone.write_all(get("/api/held").as_bytes()).await.unwrap();
        assert_eq!(next(&mut seen).await, Some("held"));
        drop(gone);
        assert_eq!(next(&mut seen).await, Some("reset"));
        // The connection goes on serving, as it would for hours.
        for _ in 0..3 {
            let answer = timeout(BOUND, exchange(gw_addr, get("/api/ok").as_bytes()))
                .await
                .expect("no hang");
            assert_eq!(status_of(&answer), 200, "{answer}");
        }
        // Then the upstream crashes under a request.
        let answer = timeout(BOUND, exchange(gw_addr, post("/api/crash").as_bytes()))
            .await
            .expect("no hang");
        assert_eq!(next(&mut seen).await, Some("crash"));
        crashes.push(status_of(&answer));
    }
    super::limits::settled(&gw, 15).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (crashes, e.failures),
        (vec![502, 502, 502], 3),
        "(the statuses of the requests the upstream crashed under, endpoint failures): \
         {e:?}"
    );
    gw.shutdown().await;
}
