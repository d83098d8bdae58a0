//! HTTP/2 clients over loopback on a cleartext listener (h2c, prior knowledge): HTTP/1
//! still served on the same port, the stream and header-list bounds, rapid reset
//! (CVE-2023-44487) answered with `GOAWAY`, and a graceful shutdown that lets streams in
//! flight finish. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::gateway::GatewayHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::timeout;

use super::limits::{exchange, get, status_of};

const BOUND: Duration = Duration::from_secs(10);

/// An upstream that answers `200` once `release` is notified (or at once when `hold` is
/// false); counts the requests it got and the most it held at once.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

async fn upstream(hold: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hits, most, now) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let release = Arc::new(Notify::new());
    let state = (hits.clone(), most.clone(), now, release.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            let svc = hyper::service::service_fn(move |_: Request<Incoming>| {
                let (hits, most, now, release) = state.clone();
                async move {
                    hits.fetch_add(1, SeqCst);
                    let held = now.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(held, SeqCst);
                    if hold {
                        release.notified().await;
                    }
                    now.fetch_sub(1, SeqCst);
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    Upstream {
        addr,
        hits,
        most,
        release,
    }
}

/// A gateway with `h2c` on and `[gateway.http2]` settings `http2`, one route `/api`.
async fn gateway(upstream: SocketAddr, h2c: bool, http2: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = {h2c}\n\n[gateway.http2]\n{http2}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    );
    super::spawn_gateway(&config).await
}

/// An HTTP/2 (prior knowledge) client of `addr`.
async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn request(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_http1_share_the_port_and_h2c_is_off_by_default() {
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "").await;
    let mut client = h2_client(gw.local_addr()).await;
    let response = client
        .send_request(request(gw.local_addr(), "/api/x"))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    // HTTP/1 on the same listener.
    let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    gw.shutdown().await;

    // Without h2c, HTTP/2's preface is an HTTP/1 request line of another version: `505`,
    // and the connection closed. (Read as bytes: hyper's HTTP/2 client, given an answer
    // that is no HTTP/2, now and then never fails the request it had queued.)
    let gw = gateway(up.addr, false, "").await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame, as a client sends right after the preface.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    timeout(BOUND, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .expect("closed, not reset");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 505 "), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_no_more_streams_than_allowed() {
    let up = upstream(true).await;
    let gw = gateway(up.addr, true, "max_concurrent_streams = 2").await;
    let mut client = h2_client(gw.local_addr()).await;
    // One exchange first, so that the client has the gateway's SETTINGS (a client that
    // opens streams before it has them gets the extra ones refused: REFUSED_STREAM).
    let unrouted = client
        .send_request(request(gw.local_addr(), "/elsewhere"))
        .await
        .unwrap();
    assert_eq!(unrouted.status(), 404);
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut client = client.clone();
            let request = request(gw.local_addr(), "/api/x");
            tokio::spawn(async move { client.send_request(request).await.map(|r| r.status()) })
        })
        .collect();
    // Two reach the upstream; the others wait for a stream.
    timeout(BOUND, async {
        while up.hits.load(SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(up.hits.load(SeqCst), 2);
    // Released one by one, all five are answered, never more than two at once.
    timeout(BOUND, async {
        while up.hits.load(SeqCst) < 5 || !calls.iter().all(|c| c.is_finished()) {
            up.release.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "hits {} most {} finished {:?}",
            up.hits.load(SeqCst),
            up.most.load(SeqCst),
            calls.iter().map(|c| c.is_finished()).collect::<Vec<_>>()
        )
    });
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 200);
    }
    assert_eq!(up.most.load(SeqCst), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_is_refused_and_the_gateway_keeps_serving() {
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "max_header_list_size = 4096").await;
    let mut client = h2_client(gw.local_addr()).await;
    let mut big = request(gw.local_addr(), "/api/x");
    big.headers_mut()
        .insert("x-big", "a".repeat(8192).parse().unwrap());
    let refused = client.send_request(big).await;
    assert!(
        refused.as_ref().map_or(true, |r| r.status() == 431),
        "{refused:?}"
    );
    assert_eq!(up.hits.load(SeqCst), 0);
    let mut client = h2_client(gw.local_addr()).await;
    let response = client
        .send_request(request(gw.local_addr(), "/api/x"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_with_goaway() {
    const STREAMS: usize = 10_000;
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "").await;
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let uri = format!("http://{}/api/x", gw.local_addr());
    let mut opened = 0;
    let flood = timeout(BOUND, async {
        for _ in 0..STREAMS {
            client = match client.ready().await {
                Ok(client) => client,
                Err(e) => return Some(e),
            };
            let request = http::Request::get(&uri).body(()).unwrap();
            match client.send_request(request, false) {
                Ok((_, mut stream)) => {
                    opened += 1;
                    stream.send_reset(h2::Reason::CANCEL);
                }
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("the flood ends within the bound");
    let ended = timeout(BOUND, connection)
        .await
        .expect("the connection ends")
        .unwrap();
    let reason = flood
        .and_then(|e| e.reason())
        .or_else(|| ended.err().and_then(|e| e.reason()));
    assert_eq!(
        reason,
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "GOAWAY after {opened} streams opened and reset"
    );
    assert!(opened < STREAMS, "stopped before {STREAMS}: {opened}");
    let forwarded = up.hits.load(SeqCst);
    eprintln!("rapid reset: GOAWAY after {opened} streams, {forwarded} forwarded");
    assert!(
        forwarded < 200,
        "{forwarded} of {opened} reset streams reached the upstream"
    );
    // Others are served at once.
    let mut client = h2_client(gw.local_addr()).await;
    let response = timeout(
        Duration::from_secs(2),
        client.send_request(request(gw.local_addr(), "/api/x")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_lets_streams_in_flight_finish() {
    let up = upstream(true).await;
    let gw = gateway(up.addr, true, "").await;
    let mut client = h2_client(gw.local_addr()).await;
    let request = request(gw.local_addr(), "/api/x");
    let call = tokio::spawn(async move { client.send_request(request).await.map(|r| r.status()) });
    timeout(BOUND, async {
        while up.hits.load(SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let addr = gw.local_addr();
    let shutdown = tokio::spawn(gw.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // No new connection is taken.
    assert!(
        timeout(Duration::from_secs(1), TcpStream::connect(addr))
            .await
            .map_or(true, |c| c.is_err())
    );
    up.release.notify_waiters();
    assert_eq!(timeout(BOUND, call).await.unwrap().unwrap().unwrap(), 200);
    timeout(BOUND, shutdown).await.unwrap().unwrap();
}

/// A client's request body over `max_request_body` (chunked: no length to refuse it by
/// up front) is the client's fault: `413`, never counted against the endpoint. So is a
/// malformed chunked body (`400`). Over an HTTP/2 upstream (`protocol = "h2"`) hyper
/// resets the stream on the body's error and reports only the reset: both were a `502`
/// counted against the endpoint, so a client could open its breaker at will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_body_fault_over_an_h2_upstream_is_the_clients() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Reads the whole body, then answers.
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nmax_request_body = 1024\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let chunk = "a".repeat(1000);
    let too_large = format!(
        "POST /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n3e8\r\n{chunk}\r\n3e8\r\n{chunk}\r\n0\r\n\r\n"
    );
    let malformed = "POST /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n5\r\nabcde\r\nzz\r\n";
    let answer = timeout(BOUND, exchange(gw.local_addr(), too_large.as_bytes()))
        .await
        .expect("no hang");
    let large_status = status_of(&answer);
    let answer = timeout(BOUND, exchange(gw.local_addr(), malformed.as_bytes()))
        .await
        .expect("no hang");
    let bad_status = status_of(&answer);
    super::limits::settled(&gw, 2).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (large_status, bad_status, e.failures),
        (413, 400, 0),
        "(too large, malformed, endpoint failures): {e:?}"
    );
    gw.shutdown().await;
}

/// An HTTP/2 upstream whose first connection stalls (read and discarded, never
/// answered: a frozen process, a silent drop) while later ones serve `ok`: its address
/// and how many connections it accepted.
async fn first_connection_stalls() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            if count.fetch_add(1, SeqCst) == 0 {
                // The first connection: read and discard, never answer.
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                });
                continue;
            }
            let svc = hyper::service::service_fn(|_: Request<Incoming>| async {
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, accepted)
}

/// A multiplexed HTTP/2 upstream connection that stalls (its peer stops answering but
/// the socket stays open: a frozen process, a silent network drop) must not black-hole
/// every later request to the endpoint while the endpoint accepts and serves new
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_upstream_connection_is_replaced() {
    let (addr, accepted) = first_connection_stalls().await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"300ms\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let answer = timeout(BOUND, exchange(gw.local_addr(), get("/api/x").as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
    }
    assert!(
        statuses.contains(&200),
        "every request black-holed on the stalled connection: {statuses:?}, \
         connections accepted by the upstream: {}",
        accepted.load(SeqCst)
    );
    gw.shutdown().await;
}

/// SECURITY.md: "a client has 10 s to send a request head (slowloris), idle keep-alive
/// time included". An HTTP/2 client that sends the preface and SETTINGS and then nothing,
/// or a HEADERS frame without END_HEADERS and never its CONTINUATION, must lose its
/// connection after ~10 s as an HTTP/1 client does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_never_sends_a_request_head_is_closed() {
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "").await;
    // SETTINGS, empty.
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    // HEADERS on stream 1, END_STREAM without END_HEADERS: `:method: GET` (0x82) and
    // `:scheme: http` (0x86), the rest of the block never sent.
    let headers = [0u8, 0, 2, 1, 0x01, 0, 0, 0, 1, 0x82, 0x86];
    let mut idle = TcpStream::connect(gw.local_addr()).await.unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    idle.write_all(&settings).await.unwrap();
    let mut half = TcpStream::connect(gw.local_addr()).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    half.write_all(&settings).await.unwrap();
    half.write_all(&headers).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut open = Vec::new();
    for (name, stream) in [("idle", &mut idle), ("half a head", &mut half)] {
        let left = Duration::from_secs(15).saturating_sub(start.elapsed());
        let closed = timeout(left, async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if closed.is_err() {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "still open after 15 s: {open:?}");
    gw.shutdown().await;
}

/// A client whose request is still being answered keeps it when its connection is shut
/// down for idling (it sent nothing for 10 s while the upstream took its time): its
/// library answers the shutdown's `PING`, and the stream finishes on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_shutdown_lets_a_responsive_clients_stream_finish() {
    let up = upstream(true).await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"30s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let mut client = h2_client(gw.local_addr()).await;
    let request = request(gw.local_addr(), "/api/x");
    let call = tokio::spawn(async move { client.send_request(request).await.map(|r| r.status()) });
    timeout(BOUND, async {
        while up.hits.load(SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    // Past the idle bound (10 s) and the time a client has to answer the shutdown.
    tokio::time::sleep(Duration::from_secs(13)).await;
    up.release.notify_waiters();
    assert_eq!(timeout(BOUND, call).await.unwrap().unwrap().unwrap(), 200);
    gw.shutdown().await;
}

/// An upstream over HTTP/1 answering with `chunks` frames of 16 KiB (`None`: without end)
/// after `pause`; counts its open connections.
async fn streaming_upstream(
    chunks: Option<usize>,
    pause: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use futures::StreamExt as _;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let count = open.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(move |_: Request<Incoming>| async move {
                let chunk = || {
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'x'; 16384])))
                };
                let later = futures::stream::once(async move {
                    tokio::time::sleep(pause).await;
                    chunk()
                });
                let rest = futures::stream::repeat_with(chunk)
                    .take(chunks.map_or(usize::MAX, |n| n.saturating_sub(1)));
                let body = StreamBody::new(later.chain(rest));
                Ok::<_, hyper::Error>(Response::new(body))
            });
            count.fetch_add(1, SeqCst);
            let count = count.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                count.fetch_sub(1, SeqCst);
            });
        }
    });
    (addr, open)
}

/// A gateway with h2c on, `send_timeout = "1s"`, one route to `upstream`.
async fn one_second_send_timeout(upstream: SocketAddr) -> GatewayHandle {
    super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\nsend_timeout = \"1s\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         timeout = \"1s\"\nbody_timeout = \"10s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    ))
    .await
}

/// A gateway with a one-second `send_timeout` and an h2c client whose streams' window is
/// one byte, with one answer of 16 KiB under way: its first byte read, the window never
/// opened again. The client, its connection's task, the answer's body and the upstream's
/// open connections.
async fn an_answer_behind_a_shut_window() -> (
    GatewayHandle,
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<()>,
    h2::RecvStream,
    Arc<AtomicUsize>,
) {
    let (addr, open) = streaming_upstream(Some(1), Duration::ZERO).await;
    let gw = one_second_send_timeout(addr).await;
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let url = format!("http://{}/api/x", gw.local_addr());
    let (response, _) = client
        .send_request(Request::get(&url).body(()).unwrap(), true)
        .unwrap();
    let response = timeout(BOUND, response).await.expect("no hang").unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = timeout(BOUND, body.data()).await.expect("no hang");
    assert_eq!(first.map(|d| d.map(|d| d.len()).ok()), Some(Some(1)));
    (gw, client, conn, body, open)
}

/// An HTTP/2 client stops reading a response without blocking a write: it drains its
/// socket and never opens the stream's window again. hyper then stops polling the
/// response body, and the upstream connection streaming it was held for as long as
/// the client liked. `send_timeout` now bounds that wait as it bounds a blocked write:
/// the stream loses its body (the upstream's connection is released) and is reset, while
/// the client's connection and its other streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_with_a_shut_window_cannot_hold_the_upstream() {
    let (addr, open) = streaming_upstream(None, Duration::ZERO).await;
    let gw = one_second_send_timeout(addr).await;
    let mut client = h2_client(gw.local_addr()).await;
    let response = timeout(
        BOUND,
        client.send_request(request(gw.local_addr(), "/api/x")),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(response.status(), 200);
    let start = tokio::time::Instant::now();
    assert_eq!(open.load(SeqCst), 1);
    // The body is not read: the stream's window stays shut.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(open.load(SeqCst), 1, "cut before send_timeout");
    timeout(BOUND, async {
        while open.load(SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the upstream connection is still streaming to a client that reads nothing");
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(6), "released after {waited:?}");
    assert_eq!(gw.gateway().status().send_timeouts, 1);
    // The connection goes on: another request on it is answered.
    let second = timeout(
        BOUND,
        client.send_request(request(gw.local_addr(), "/api/y")),
    )
    .await
    .expect("no hang")
    .expect("the connection is still open");
    assert_eq!(second.status(), 200);
    drop(second);
    // The cut stream ends in a reset once read, not as if the answer were whole.
    let read = timeout(BOUND, response.into_body().collect())
        .await
        .expect("no hang");
    assert!(read.is_err(), "the cut body ended cleanly");
    gw.shutdown().await;
}

/// A client that reads slowly, each wait for its window shorter than `send_timeout`,
/// keeps its stream for as long as the whole answer takes (3 s here, three times the
/// timeout): the bound is on each wait, not on the response. (The client opens the
/// window again each 32 KiB it reads: the stream waits about 300 ms each time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_reading_slowly_keeps_its_stream() {
    let (addr, _open) = streaming_upstream(Some(20), Duration::ZERO).await;
    let gw = one_second_send_timeout(addr).await;
    let mut client = h2_client(gw.local_addr()).await;
    let response = timeout(
        BOUND,
        client.send_request(request(gw.local_addr(), "/api/x")),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut read = 0;
    while let Some(frame) = timeout(BOUND, body.frame()).await.expect("no hang") {
        read += frame.unwrap().into_data().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(read, 20 * 16384);
    assert_eq!(gw.gateway().status().send_timeouts, 0);
    gw.shutdown().await;
}

/// A stream waiting on its upstream (2.5 s before the first byte of the body, a long
/// poll) is not waiting on the client: `send_timeout` does not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_waiting_on_its_upstream_is_not_cut() {
    let (addr, _open) = streaming_upstream(Some(1), Duration::from_millis(2500)).await;
    let gw = one_second_send_timeout(addr).await;
    let mut client = h2_client(gw.local_addr()).await;
    let response = timeout(
        BOUND,
        client.send_request(request(gw.local_addr(), "/api/x")),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(response.status(), 200);
    let body = timeout(BOUND, response.into_body().collect())
        .await
        .expect("no hang")
        .expect("the body came whole");
    assert_eq!(body.to_bytes().len(), 16384);
    assert_eq!(gw.gateway().status().send_timeouts, 0);
    gw.shutdown().await;
}

/// `CONNECT` asks for a tunnel, which the gateway does not make: over HTTP/2 as over
/// HTTP/1 it is refused and never proxied (an upstream's `2xx` to it would make the
/// client take the stream for a tunnel). HTTP/2's carries no `:path`, so it is refused
/// as a request without a valid path (`400`) before any route sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_h2_is_refused_and_never_proxied() {
    let up = upstream(false).await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let mut client = h2_client(gw.local_addr()).await;
    let connect = Request::connect(format!("{}", up.addr))
        .body(Empty::new())
        .unwrap();
    let status = match timeout(BOUND, client.send_request(connect))
        .await
        .expect("no hang")
    {
        Ok(response) => Some(response.status().as_u16()),
        // A reset stream refuses it too.
        Err(_) => None,
    };
    assert!(
        status.is_none_or(|s| s == 501 || s == 400),
        "CONNECT answered {status:?}"
    );
    assert_eq!(up.hits.load(SeqCst), 0, "CONNECT reached the upstream");
    gw.shutdown().await;
}

/// The same, for the request that dialled the connection: a request that times out
/// before its answer's head retires the connection it was sent on, so the next request
/// goes on a new one. The first request to an endpoint finds no connection (it dials
/// the first one itself); if that connection stalls, its timeout must retire it too,
/// not leave it to black-hole the next request (or the whole first burst of requests,
/// which all found no connection when they were sent) as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_connection_is_retired_by_the_request_that_dialled_it() {
    let (addr, accepted) = first_connection_stalls().await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"300ms\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let answer = timeout(BOUND, exchange(gw.local_addr(), get("/api/x").as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
    }
    assert_eq!(
        statuses,
        [504, 200],
        "the stalled connection was not retired by the timeout of the request sent on it; \
         connections accepted by the upstream: {}",
        accepted.load(SeqCst)
    );
    gw.shutdown().await;
}

/// A client's chunked request body may end in a trailer section. Over an HTTP/2
/// upstream (`protocol = "h2"`) the hop-by-hop fields of that section (`Connection`,
/// `Keep-Alive`, `Transfer-Encoding`, `TE`, `Upgrade`: RFC 9110 §7.6.1 and RFC 9113
/// §8.2.2 forbid them in HTTP/2) must be left behind as they are in a head, and the
/// request served: nothing the client writes in its own body may become a failure
/// counted against the endpoint (a client could otherwise open its breaker at will).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_trailers_over_an_h2_upstream_are_not_the_endpoints_fault() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let trailers_seen = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let log = trailers_seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            // Reads the whole body and its trailers, then answers.
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    if let Ok(collected) = req.into_body().collect().await {
                        if let Some(trailers) = collected.trailers() {
                            log.lock()
                                .extend(trailers.keys().map(|k| k.as_str().to_owned()));
                        }
                    }
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"2s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut statuses = Vec::new();
    for trailer in [
        "Connection: close",
        "Keep-Alive: timeout=5",
        "Transfer-Encoding: chunked",
    ] {
        let raw = format!(
            "POST /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n{trailer}\r\nX-Checksum: 1\r\n\r\n"
        );
        let answer = timeout(BOUND, exchange(gw.local_addr(), raw.as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
    }
    super::limits::settled(&gw, 3).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (statuses, e.failures),
        (vec![200, 200, 200], 0),
        "(statuses, endpoint failures): {e:?}; trailers the upstream got: {:?}",
        trailers_seen.lock()
    );
    gw.shutdown().await;
}

/// RFC 9110 §8.6 lets a recipient accept `Content-Length: 5, 5` (or the same value on
/// two lines) only by replacing it with the one decimal value; the gateway accepts it
/// from an HTTP/1 client. Over an HTTP/2 upstream (`protocol = "h2"`) the field must go
/// on as one valid value (or be left to the body's length), and the request be served:
/// a framing the client chose must never become a failure counted against the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_list_accepted_from_a_client_is_sent_to_an_h2_upstream_as_one_value() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lengths = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let log = lengths.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    log.lock().extend(
                        req.headers()
                            .get_all(hyper::header::CONTENT_LENGTH)
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    );
                    let _ = req.into_body().collect().await;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"2s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut statuses = Vec::new();
    for length in [
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
    ] {
        let raw =
            format!("POST /api/x HTTP/1.1\r\nHost: gw\r\n{length}Connection: close\r\n\r\nhello");
        let answer = timeout(BOUND, exchange(gw.local_addr(), raw.as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
    }
    super::limits::settled(&gw, 2).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (statuses, e.failures),
        (vec![200, 200], 0),
        "(statuses, endpoint failures): {e:?}; Content-Length lines the upstream got: {:?}",
        lengths.lock()
    );
    gw.shutdown().await;
}

/// SECURITY.md (Timing): "a client has 10 s to send a request head (slowloris)", and the
/// HTTP/1 server holds a head to one 10 s deadline however it is trickled. An HTTP/2
/// client that sends a HEADERS frame a byte every 2 s (the frame never complete, so no
/// request ever starts) must lose its connection as the HTTP/1 slowloris does: shut down
/// at 10 s and closed once it does not answer the shutdown's `PING` (it cannot: it is in
/// the middle of a frame), well before 20 s. Paused time: the runtime jumps ahead when it
/// has nothing to do.
#[tokio::test]
async fn an_h2_head_trickled_a_byte_at_a_time_is_cut_like_an_http1_one() {
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "").await;
    // A HEADERS frame on stream 1 announcing 16 384 bytes (END_STREAM | END_HEADERS) of
    // which only the first, `:method: GET`, is sent; then one more every 2 s.
    let closed_at = when_a_trickled_frame_is_cut(
        gw.local_addr(),
        &[0x00, 0x40, 0x00, 0x01, 0x05, 0, 0, 0, 1, 0x82],
        0x82,
    )
    .await;
    assert!(
        closed_at.is_some_and(|at| at <= Duration::from_secs(20)),
        "an HTTP/2 connection whose request head was trickled a byte every 2 s was \
         closed at {closed_at:?} (None: still open after 60 s); an HTTP/1 head gets 10 s \
         in all"
    );
    assert_eq!(up.hits.load(SeqCst), 0);
    gw.shutdown().await;
}

/// Connects to the gateway over h2c, sends the preface, an empty SETTINGS and `first`
/// (a frame's header and the first byte of its payload), then `byte` every 2 s of
/// paused time for 60 s, reading and dropping what the gateway sends: when the
/// connection was closed, if it was.
async fn when_a_trickled_frame_is_cut(
    gateway: SocketAddr,
    first: &[u8],
    byte: u8,
) -> Option<Duration> {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    stream.write_all(first).await.unwrap();
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let mut closed_at = None;
    for _ in 0..30 {
        let ended = timeout(Duration::from_secs(2), async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if ended.is_ok() || stream.write_all(&[byte]).await.is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
    }
    tokio::time::resume();
    closed_at
}

/// The HTTP/1 server keeps at most 64 KiB of answer queued for a client that reads
/// nothing (`downstream_h1::a_client_reading_nothing_does_not_make_the_gateway_buffer_a_small_chunked_answer`):
/// backpressure then reaches the upstream. An HTTP/2 client that opens its windows wide
/// (SETTINGS_INITIAL_WINDOW_SIZE and a connection WINDOW_UPDATE of 2³¹ − 1), starts 100
/// streams (the default `max_concurrent_streams`) and then reads nothing must not make
/// the gateway pull much more than that from its upstream either: here one HTTP/2
/// upstream connection (windows of 5 MiB a connection on the gateway's client side) and
/// one client socket, so kernel buffers and windows hold ~15 MiB at most; whatever the
/// upstream sends beyond that is held in the gateway's memory, for `send_timeout` (60 s),
/// on every such connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_reading_nothing_does_not_make_the_gateway_buffer_its_streams() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    const BOUNDED: usize = 24 << 20;
    // An HTTP/2 upstream streaming 16 KiB frames without end; counts the bytes its
    // bodies handed to hyper.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let produced = Arc::new(AtomicUsize::new(0));
    let count = produced.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            let svc = hyper::service::service_fn(move |_: Request<Incoming>| {
                let count = count.clone();
                async move {
                    let body = StreamBody::new(futures::stream::repeat_with(move || {
                        count.fetch_add(16384, SeqCst);
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![
                            b'x';
                            16384
                        ])))
                    }));
                    Ok::<_, hyper::Error>(Response::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         timeout = \"60s\"\nbody_timeout = \"60s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut client = TcpStream::connect(gw.local_addr()).await.unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // SETTINGS: INITIAL_WINDOW_SIZE = 2^31 - 1.
    out.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0x7f, 0xff, 0xff, 0xff]);
    // WINDOW_UPDATE on the connection: up to 2^31 - 1.
    let increment: u32 = 0x7fff_ffff - 65_535;
    out.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&increment.to_be_bytes());
    // HPACK: GET, http, `:path: /api/x`, `:authority: <gateway>` (literals without
    // indexing, indexed names).
    let authority = gw.local_addr().to_string();
    let mut block = vec![0x82, 0x86, 0x04, 6];
    block.extend_from_slice(b"/api/x");
    block.extend_from_slice(&[0x01, u8::try_from(authority.len()).unwrap()]);
    block.extend_from_slice(authority.as_bytes());
    for id in (1u32..200).step_by(2) {
        let len = u32::try_from(block.len()).unwrap().to_be_bytes();
        out.extend_from_slice(&[len[1], len[2], len[3], 1, 0x05]);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&block);
    }
    client.write_all(&out).await.unwrap();
    // The client reads nothing from here on. Wait until the upstream stops producing
    // (its count stands still for 2 s), 30 s at most.
    let start = tokio::time::Instant::now();
    let (mut last, mut still_since) = (0, tokio::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = produced.load(SeqCst);
        if start.elapsed() > Duration::from_secs(30) {
            break;
        }
        if now != last {
            (last, still_since) = (now, tokio::time::Instant::now());
        } else if still_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
    }
    let now = produced.load(SeqCst);
    assert!(
        now > 0,
        "the upstream produced nothing: the requests did not get through"
    );
    assert!(
        now < BOUNDED,
        "the upstream produced {} MiB for 100 streams of an HTTP/2 client that reads \
         nothing (the gateway holds what its windows and sockets do not, ~{} KiB a \
         stream); backpressure should stop it within a few MiB",
        now >> 20,
        (now.saturating_sub(15 << 20) / 100) >> 10
    );
    drop(client);
    gw.shutdown().await;
}

/// An h2 upstream that records the `Content-Length` lines it got, reads the whole body
/// and answers `200 ok`.
async fn length_logging_h2_upstream() -> (SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lengths = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let log = lengths.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    log.lock().extend(
                        req.headers()
                            .get_all(hyper::header::CONTENT_LENGTH)
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    );
                    let _ = req.into_body().collect().await;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, lengths)
}

/// The gateway's HTTP/1 server accepts a `Content-Length` with leading zeros however many
/// (`9b347d4`: "leading zeros no longer count against Content-Length's 19 digits"), and
/// an all-digit value is passed on as the client wrote it. HTTP/2 (the `h2` crate, which
/// hyper's HTTP/2 servers use) reads at most 19 digits: a 20-digit `Content-Length: 0…05`
/// makes the upstream reset the stream (PROTOCOL_ERROR), the client gets a 502 and the
/// healthy endpoint records a failure. Any anonymous client can so open the breaker of
/// an `h2` upstream. The value must go on as its one decimal value (`5`), and the request
/// be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_padded_content_length_from_a_client_is_not_an_h2_upstreams_failure() {
    let (addr, lengths) = length_logging_h2_upstream().await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"2s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut statuses = Vec::new();
    for length in ["00000000000000000005", "0000000000000000000000000000005"] {
        let raw = format!(
            "POST /api/x HTTP/1.1\r\nHost: gw\r\nContent-Length: {length}\r\n\
             Connection: close\r\n\r\nhello"
        );
        let answer = timeout(BOUND, exchange(gw.local_addr(), raw.as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
    }
    super::limits::settled(&gw, 2).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (statuses, e.failures),
        (vec![200, 200], 0),
        "(statuses, endpoint failures): {e:?}; Content-Length lines the upstream got: {:?}",
        lengths.lock()
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Review probes (this session's changes, their HTTP/2 twins).

/// `upstream_h1::an_invalid_status_code_is_handled_as_a_server_error`, over an HTTP/2
/// upstream (`protocol = "h2"`): RFC 9110 §15 has a client treat a status of 600–999 as
/// a 5xx, and the gateway refuses one from an HTTP/1 upstream as a broken answer (the
/// route's fallback answers in its place). hyper's HTTP/2 client parses `:status: 600`
/// as a status, so the same answer from an HTTP/2 upstream must be refused as well, not
/// passed on to the client and counted as a success.
#[tokio::test]
async fn an_h2_upstreams_invalid_status_code_is_handled_as_a_server_error() {
    let mut wrong = Vec::new();
    for code in [500u16, 600, 999] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(move |_: Request<Incoming>| async move {
                    Ok::<_, hyper::Error>(
                        Response::builder()
                            .status(code)
                            .body(Full::new(Bytes::from_static(b"oops")))
                            .unwrap(),
                    )
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        let gw = super::spawn_gateway(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             timeout = \"5s\"\n\n\
             [routes.fallback]\nstatus = 200\nbody = '{{\"cached\":true}}'\n\n\
             [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
        ))
        .await;
        let answer = timeout(BOUND, exchange(gw.local_addr(), get("/api/x").as_bytes()))
            .await
            .expect("no hang");
        if !answer.to_ascii_lowercase().contains("x-seawall-fallback") {
            wrong.push(format!(
                "{code}: forwarded as {}: {answer:?}",
                status_of(&answer)
            ));
        }
        gw.shutdown().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// `an_h2_head_trickled_a_byte_at_a_time_is_cut_like_an_http1_one`, with a `DATA` frame
/// in place of the `HEADERS` one: the connection's reader counts any byte of a `DATA`
/// frame's payload as the client's progress ("a request body in flight, which the
/// route's timeout bounds"), but this frame is on a stream the client never opened, so
/// no request, route or timeout exists to bound it. A client that sends the preface and
/// then a 16 KiB `DATA` frame a byte every 2 s (hyper sees nothing until the frame is
/// whole: 9 hours) must lose its connection as the trickled head does, well before 20 s.
#[tokio::test]
async fn an_h2_data_frame_trickled_on_no_stream_is_cut_like_a_trickled_head() {
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "").await;
    // A DATA frame on stream 1 (never opened) announcing 16 384 bytes, of which only the
    // first is sent; then one more every 2 s.
    let closed_at = when_a_trickled_frame_is_cut(
        gw.local_addr(),
        &[0x00, 0x40, 0x00, 0x00, 0x00, 0, 0, 0, 1, 0],
        0,
    )
    .await;
    assert!(
        closed_at.is_some_and(|at| at <= Duration::from_secs(20)),
        "an HTTP/2 connection trickling a DATA frame for a stream it never opened, a byte \
         every 2 s, was closed at {closed_at:?} (None: still open after 60 s); a trickled \
         head is cut at 10 s"
    );
    assert_eq!(up.hits.load(SeqCst), 0);
    gw.shutdown().await;
}

/// `a_stalled_h2_connection_is_retired_by_the_request_that_dialled_it`, for a connection
/// dialled in place of one that closed: the upstream's first connection serves one
/// request and closes (a restart, a `max_requests` on the upstream); the request after
/// it dials a second connection, which stalls. That request's timeout must retire the
/// connection it dialled, as the first request's does, so the third request goes on a
/// new (third) connection and is served, not black-holed on the stalled one.
#[tokio::test]
async fn a_stalled_h2_connection_dialled_after_a_closed_one_is_retired() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let first_closed = Arc::new(Notify::new());
    let (count, closed) = (accepted.clone(), first_closed.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, SeqCst);
            if n == 1 {
                // The second connection: read and discard, never answer.
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                });
                continue;
            }
            let served = Arc::new(Notify::new());
            let notify = served.clone();
            let svc = hyper::service::service_fn(move |_: Request<Incoming>| {
                notify.notify_one();
                async { Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
            });
            let closed = closed.clone();
            tokio::spawn(async move {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc);
                let mut conn = std::pin::pin!(conn);
                if n == 0 {
                    // The first connection: one request served, then closed.
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = served.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    closed.notify_one();
                } else {
                    let _ = conn.await;
                }
            });
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"300ms\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let answer = timeout(BOUND, exchange(gw.local_addr(), get("/api/x").as_bytes()))
            .await
            .expect("no hang");
        statuses.push(status_of(&answer));
        if i == 0 {
            // The first connection is gone before the second request.
            timeout(BOUND, first_closed.notified())
                .await
                .expect("the first connection closed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        statuses,
        [200, 504, 200],
        "the stalled connection dialled after a closed one was not retired by the \
         timeout of the request that dialled it; connections accepted by the upstream: {}",
        accepted.load(SeqCst)
    );
    gw.shutdown().await;
}

/// The gateway's HTTP/1 server lets a route answer before its request body ends ("an
/// upstream may stream its answer while it still reads the request"). An HTTP/2 upstream
/// answers at once and reads the upload on (a log or upload endpoint acknowledging
/// early), keeping the request stream open. Once the client's answer is written, the
/// gateway stops feeding the body from the client's connection; the upload the upstream
/// is reading must then end, whole or failed (a reset stream), not stay open: every
/// such request left a stream the upstream waits on for ever, and the gateway's task
/// sending it, on the one connection all the endpoint's requests share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_left_after_an_early_answer_ends_for_the_h2_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // What the upstream's reader of each upload got: its bytes, or its error.
    let (outcome_tx, mut outcome) = tokio::sync::mpsc::unbounded_channel::<Result<usize, String>>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let outcome_tx = outcome_tx.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let outcome_tx = outcome_tx.clone();
                async move {
                    // Answered at once; the upload read on by a task of its own.
                    tokio::spawn(async move {
                        let read = req.into_body().collect().await;
                        let _ = outcome_tx
                            .send(read.map(|b| b.to_bytes().len()).map_err(|e| e.to_string()));
                    });
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"early"))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let mut client = TcpStream::connect(gw.local_addr()).await.unwrap();
    client
        .write_all(b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    // The early answer, whole.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.ends_with(b"early") {
        let n = timeout(BOUND, client.read(&mut chunk))
            .await
            .expect("the early answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&chunk[..n]);
    }
    // The rest of the body, after the answer; whether the gateway forwards it or not,
    // the upstream's upload must end.
    let _ = client.write_all(b"world").await;
    let got = timeout(Duration::from_secs(5), outcome.recv()).await;
    assert!(
        got.is_ok(),
        "the upstream's upload never ended (neither whole nor reset) 5 s after the \
         client's answer: its stream stays open on the shared connection"
    );
    gw.shutdown().await;
}

/// An HTTP/2 upstream spoken frame by frame: its first connection tells the test the type
/// and stream id of each `HEADERS` (1) and `RST_STREAM` (3) it reads and, once `go_away`
/// is notified, sends `GOAWAY(last_stream_id, ENHANCE_YOUR_CALM)` (none if `None`) and
/// closes, answering nothing; later connections answer every stream `200`. Its address,
/// the frames seen, and how many connections it accepted.
async fn calming_upstream(
    last_stream_id: Option<u32>,
    go_away: Arc<Notify>,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u8, u32)>,
    Arc<AtomicUsize>,
) {
    /// Reads one frame: its type, flags and stream id (its payload is skipped).
    async fn frame(stream: &mut TcpStream) -> Option<(u8, u8, u32)> {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.ok()?;
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some((head[3], head[4], id))
    }
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (seen, streams) = tokio::sync::mpsc::unbounded_channel();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let first = count.fetch_add(1, SeqCst) == 0;
            let (seen, go_away) = (seen.clone(), go_away.clone());
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if stream.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = stream.write_all(&SETTINGS).await;
                let told = go_away.notified();
                let mut told = std::pin::pin!(told);
                loop {
                    let next = tokio::select! {
                        next = frame(&mut stream) => next,
                        () = told.as_mut(), if first => {
                            if let Some(last) = last_stream_id {
                                let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                                goaway.extend_from_slice(&last.to_be_bytes());
                                goaway.extend_from_slice(&0xb_u32.to_be_bytes());
                                let _ = stream.write_all(&goaway).await;
                            }
                            let _ = stream.shutdown().await;
                            // Reads what is still coming, so that the close is a FIN.
                            while frame(&mut stream).await.is_some() {}
                            return;
                        }
                    };
                    let Some((kind, flags, id)) = next else {
                        return;
                    };
                    match kind {
                        4 if flags & 1 == 0 => {
                            let _ = stream.write_all(&SETTINGS_ACK).await;
                        }
                        1 | 3 if first => {
                            let _ = seen.send((kind, id));
                        }
                        1 => {
                            // HEADERS (END_STREAM | END_HEADERS): `:status: 200`.
                            let mut answer = vec![0, 0, 1, 1, 5];
                            answer.extend_from_slice(&id.to_be_bytes());
                            answer.push(0x88);
                            let _ = stream.write_all(&answer).await;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, streams, accepted)
}

/// SECURITY.md: a client's own faults are never recorded against an endpoint. Over an
/// `h2` upstream, every client that hangs up has the gateway reset its stream on the one
/// connection the endpoint's requests share, and an HTTP/2 server answers a burst of
/// resets with `GOAWAY(ENHANCE_YOUR_CALM)` (the `h2` crate's rapid-reset guard), ending
/// the connection with other clients' requests on it. That is the gateway's conduct, not
/// the endpoint's ill health: no failure is recorded. A stream above the `GOAWAY`'s
/// `last_stream_id` was not processed (RFC 9113 §6.8) and a processed `GET` is
/// idempotent: both are sent again on a new connection and answered; a processed `POST`
/// cannot be, and is answered `502`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_reset_an_upstreams_enhance_your_calm_is_not_the_endpoints_failure() {
    let go_away = Arc::new(Notify::new());
    let (addr, mut streams, accepted) = calming_upstream(Some(3), go_away.clone()).await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let gw_addr = gw.local_addr();
    let mut answers = Vec::new();
    // Stream 1 (processed, not idempotent), 3 (processed, idempotent), 5 (not processed).
    for (raw, expected) in [
        (
            "POST /api/post HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_owned(),
            1,
        ),
        (get("/api/processed"), 3),
        (get("/api/unprocessed"), 5),
    ] {
        answers.push(tokio::spawn(async move {
            let answer = timeout(BOUND, exchange(gw_addr, raw.as_bytes()))
                .await
                .expect("no hang");
            status_of(&answer)
        }));
        let id = timeout(BOUND, streams.recv())
            .await
            .expect("the request reached the upstream");
        assert_eq!(id, Some((1, expected)));
    }
    go_away.notify_one();
    let mut statuses = Vec::new();
    for answer in answers {
        statuses.push(answer.await.unwrap());
    }
    super::limits::settled(&gw, 3).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (statuses, e.failures, accepted.load(SeqCst)),
        (vec![502, 200, 200], 0, 2),
        "(statuses of the POST, the processed GET and the unprocessed GET, endpoint \
         failures, upstream connections): {e:?}"
    );
    gw.shutdown().await;
}

/// `h2_reset_an_upstreams_enhance_your_calm_is_not_the_endpoints_failure`, with the
/// `GOAWAY` lost: a server that closes its socket with the gateway's frames (more resets)
/// unread resets the connection, and what it sent last may never be read. An upstream
/// that closes the shared connection just after the gateway reset a burst of streams on
/// it (clients went away) is not counted as failing either, and the idempotent request in
/// flight on it is sent again on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_reset_an_upstream_closing_after_the_gateways_resets_is_not_the_endpoints_failure() {
    let go_away = Arc::new(Notify::new());
    let (addr, mut frames, accepted) = calming_upstream(None, go_away.clone()).await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let gw_addr = gw.local_addr();
    // A well-behaved client's request, in flight on stream 1...
    let honest = tokio::spawn(async move {
        let answer = timeout(BOUND, exchange(gw_addr, get("/api/held").as_bytes()))
            .await
            .expect("no hang");
        status_of(&answer)
    });
    assert_eq!(
        timeout(BOUND, frames.recv()).await.expect("a frame"),
        Some((1, 1))
    );
    // ...and a burst of clients that go away: streams 3 to 21, each reset by the
    // gateway (one reset now and then proves nothing: see the review's test below).
    for id in (3..=21).step_by(2) {
        let mut gone = TcpStream::connect(gw_addr).await.unwrap();
        gone.write_all(get("/api/gone").as_bytes()).await.unwrap();
        assert_eq!(
            timeout(BOUND, frames.recv()).await.expect("a frame"),
            Some((1, id))
        );
        drop(gone);
        assert_eq!(
            timeout(BOUND, frames.recv()).await.expect("a frame"),
            Some((3, id))
        );
    }
    // The upstream closes the connection (its `GOAWAY` lost).
    go_away.notify_one();
    let honest = honest.await.unwrap();
    super::limits::settled(&gw, 2).await;
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (honest, e.failures, accepted.load(SeqCst)),
        (200, 0, 2),
        "(the honest client's status, endpoint failures, upstream connections): {e:?}"
    );
    gw.shutdown().await;
}

/// A client of `gw` silent for 9 s (paused time) that then sends `bytes` and nothing
/// more: the whole second at which its connection was closed, counted from the connect,
/// or `None` when it was still open 30 s after the bytes.
async fn closed_after_silence_then(gw: &GatewayHandle, bytes: &[u8]) -> Option<u64> {
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(9)).await;
    stream.write_all(bytes).await.unwrap();
    let ended = timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let at = ended.ok().map(|()| start.elapsed().as_secs());
    tokio::time::resume();
    at
}

/// SECURITY.md: "a client has 10 s to send a request head (slowloris)". With `h2c` on,
/// the gateway first reads a connection's opening bytes to tell HTTP/2's preface from an
/// HTTP/1 request line, under a 10 s bound of its own; the HTTP/1 server then gave the
/// head another 10 s from there. A client silent for 9 s that then sends half a head
/// must lose its connection at 10 s, as it does with `h2c` off, not at 19 s. Paused time.
#[tokio::test]
async fn h2c_sniffing_does_not_double_the_head_timeout() {
    let up = upstream(false).await;
    let mut closed = Vec::new();
    for h2c in [false, true] {
        let gw = gateway(up.addr, h2c, "").await;
        let at = closed_after_silence_then(&gw, b"GET /api/x HTTP/1.1\r\nHost: g").await;
        closed.push((h2c, at));
        gw.shutdown().await;
    }
    assert_eq!(
        closed,
        [(false, Some(10)), (true, Some(10))],
        "(h2c, whole seconds from the connection to its close): a head started at 9 s"
    );
    assert_eq!(up.hits.load(SeqCst), 0);
}

/// The same over HTTP/2: a client silent for 9 s that then sends the preface, and
/// nothing more (no frame: no progress), has had 10 s: shut down then and closed once it
/// does not answer the shutdown (2.5 s more), not given 10 s afresh from its preface
/// (closed at 21 s). Paused time.
#[tokio::test]
async fn h2c_sniffing_does_not_restart_the_h2_idle_bound() {
    let up = upstream(false).await;
    let gw = gateway(up.addr, true, "").await;
    let closed_at = closed_after_silence_then(&gw, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(
        closed_at.is_some_and(|at| at <= 13),
        "an h2c connection silent for 9 s, then the preface alone, closed at {closed_at:?} s"
    );
    gw.shutdown().await;
}

/// SECURITY.md: "An HTTP/2 client stops reading a stream without blocking a write (it
/// keeps draining its socket and never opens the stream's window): a response waiting
/// on the client's window that long (at most a quarter more) loses its body, releasing
/// the upstream connection, and the stream is reset". A client whose stream window is
/// one byte: hyper polls the body for a frame first (16 KiB here; up to a 256 KiB read
/// of the upstream), keeps it while it waits for the stream's window, and polls the body
/// no more. The watch cuts the body at `send_timeout` (counted in `send_timeouts`, the
/// upstream released), but nothing polls it again to see the cut: the stream was never
/// reset and the frame hyper holds stayed in the gateway's memory for the connection's
/// life (100 streams a connection; a `PING` every 9 s keeps the connection). Such a
/// stream must end: reset, or (hyper offering no way to reset it) its connection shut
/// down and then closed.
#[tokio::test]
async fn an_h2_answer_held_whole_behind_a_shut_window_ends_after_send_timeout() {
    let (gw, _client, _conn, mut body, _open) = an_answer_behind_a_shut_window().await;
    // send_timeout is 1 s: the body is cut by 1.25 s, the connection shut down 1.25 s
    // later and closed 1.25 s after that (paused time: 10 s is ample, and no sleep).
    tokio::time::pause();
    let next = timeout(Duration::from_secs(10), body.data()).await;
    tokio::time::resume();
    let send_timeouts = gw.gateway().status().send_timeouts;
    assert!(
        matches!(next, Ok(Some(Err(_)))) && send_timeouts == 1,
        "after 10 s waiting on the client's window (send_timeout 1 s): next read {:?} \
         (Err(_): still waiting), send_timeouts {send_timeouts}",
        next.map(|n| n.map(|r| r.map(|d| d.len())))
    );
    gw.shutdown().await;
}

/// The same stream, left alone: the client reads nothing more and sends nothing but its
/// library's answers to the gateway's `PING`s. SECURITY.md: "A client that makes no
/// progress for 10 s has its connection shut down gracefully (`GOAWAY`; streams in
/// flight finish)", and the stream waiting on its window is reset at `send_timeout`, so
/// the connection ends. The stream was never reset: the graceful shutdown waited on it
/// for good, and the connection was held with no traffic at all. Paused time (2 min).
#[tokio::test]
async fn an_h2_stream_cut_at_send_timeout_does_not_hold_its_connection() {
    let (gw, client, mut conn, body, _open) = an_answer_behind_a_shut_window().await;
    drop(client);
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let ended = timeout(Duration::from_secs(120), &mut conn).await;
    let held = start.elapsed();
    tokio::time::resume();
    assert!(
        ended.is_ok(),
        "the connection is still open after {held:?} of paused time (send_timeout 1 s, \
         idle bound 10 s); send_timeouts {}",
        gw.gateway().status().send_timeouts
    );
    drop(body);
    gw.shutdown().await;
}

/// The stream of the test above, with the client still there: one `send_timeout` after
/// its cut the connection is shut down gracefully (a new request is refused, the
/// connection stays open for the streams in flight), one more later it is closed.
/// Paused time.
#[tokio::test]
async fn an_h2_stream_held_after_its_cut_shuts_its_connection_down_before_closing_it() {
    let (gw, client, mut conn, body, _open) = an_answer_behind_a_shut_window().await;
    let url = format!("http://{}/api/x", gw.local_addr());
    tokio::time::pause();
    // Cut by 1.25 s, shut down by 2.5 s, closed by 3.75 s.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let send_timeouts = gw.gateway().status().send_timeouts;
    let refused = match client.clone().ready().await {
        Err(_) => true,
        Ok(mut ready) => match ready.send_request(Request::get(&url).body(()).unwrap(), true) {
            Err(_) => true,
            Ok((response, _)) => timeout(BOUND, response).await.expect("no hang").is_err(),
        },
    };
    let open_then = !conn.is_finished();
    let ended = timeout(Duration::from_secs(10), &mut conn).await.is_ok();
    tokio::time::resume();
    assert_eq!(
        (send_timeouts, refused, open_then, ended),
        (1, true, true, true),
        "(send_timeouts, a new request refused 3 s after the stall began, the connection \
         still open then, closed within 10 s more)"
    );
    drop(body);
    gw.shutdown().await;
}
