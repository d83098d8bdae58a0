//! The gateway's upstream connections over loopback: keep-alive reuse, bodies streamed
//! both ways, connections the upstream closes, and bodies abandoned half-way. The upstream
//! counts the connections it accepts, so reuse is checked, not assumed. Every wait is
//! bounded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);
const BIG: usize = 1 << 20;

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An upstream whose answer depends on the path:
/// - `/echo`: the request body back, streamed;
/// - `/big`: `BIG` bytes in 64 KiB chunks (chunked encoding);
/// - `/empty`: `204`, no body;
/// - `/close`: a small body and `Connection: close`;
/// - anything else: `ok`.
///
/// `HEAD` gets the headers of a `GET`. Counts the connections it accepts, and those still
/// open.
struct Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (counter, open_now) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, SeqCst);
            open_now.fetch_add(1, SeqCst);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let response: Response<UpBody> = match req.uri().path() {
                    "/echo" => {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        Response::new(Full::new(body).boxed())
                    }
                    "/big" => {
                        let chunks = (0..BIG / 65536).map(|i| {
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![i as u8; 65536])))
                        });
                        Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed())
                    }
                    "/empty" => {
                        let mut r = Response::new(Empty::new().boxed());
                        *r.status_mut() = StatusCode::NO_CONTENT;
                        r
                    }
                    "/close" => {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"bye")).boxed());
                        r.headers_mut()
                            .insert(http::header::CONNECTION, "close".parse().unwrap());
                        r
                    }
                    _ => Response::new(Full::new(Bytes::from_static(b"ok")).boxed()),
                };
                Ok::<_, Infallible>(response)
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            let open_now = open_now.clone();
            tokio::spawn(async move {
                let _ = connection.await;
                open_now.fetch_sub(1, SeqCst);
            });
        }
    });
    Upstream {
        addr,
        accepted,
        open,
    }
}

async fn gateway(upstream: SocketAddr, timeout: &str) -> GatewayHandle {
    gateway_with(upstream, &format!("timeout = \"{timeout}\"")).await
}

/// A gateway with one route, `/api` to `upstream`, with these route `settings`.
async fn gateway_with(upstream: SocketAddr, settings: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\n{settings}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    );
    let config = GatewayConfig::from_toml_str(&config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

/// A client connection of its own to the gateway (also `upstream_h1`'s).
pub(super) async fn connect<B>(gw: &GatewayHandle) -> Sender<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn exchange<B>(
    sender: &mut Sender<B>,
    req: Request<B>,
) -> (StatusCode, http::HeaderMap, Bytes)
where
    B: hyper::body::Body + Send + 'static,
{
    timeout(BOUND, async {
        sender.ready().await.expect("the connection is ready");
        let response = sender.send_request(req).await.expect("an answer");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        (parts.status, parts.headers, body)
    })
    .await
    .expect("a request hung past its bound")
}

/// A `GET` of `path` (also `upstream_h1`'s).
pub(super) fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(http::header::HOST, "gw")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = upstream().await;
    let gw = gateway(up.addr, "2s").await;
    let mut client = connect(&gw).await;
    for i in 0..50 {
        let path = match i % 4 {
            0 => "/api/item",
            1 => "/api/empty",
            2 => "/api/big",
            _ => "/api/echo",
        };
        let (status, _, body) = exchange(&mut client, get(path)).await;
        assert!(status.is_success(), "{path}: {status}");
        if path == "/api/big" {
            assert_eq!(body.len(), BIG);
        }
    }
    // HEAD answers have no body at all: the connection must come back all the same.
    for _ in 0..5 {
        let req = Request::builder()
            .method(Method::HEAD)
            .uri("/api/item")
            .header(http::header::HOST, "gw")
            .body(Empty::new())
            .unwrap();
        let (status, _, body) = exchange(&mut client, req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
    }
    assert_eq!(
        up.accepted.load(SeqCst),
        1,
        "one request at a time needs one upstream connection"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_open_one_connection_each_then_reuse_them() {
    let up = upstream().await;
    let gw = gateway(up.addr, "2s").await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(connect::<Empty<Bytes>>(&gw).await);
    }
    for _round in 0..10 {
        let tasks: Vec<_> = clients
            .drain(..)
            .map(|mut c| {
                tokio::spawn(async move {
                    let (status, _, body) = exchange(&mut c, get("/api/big")).await;
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(body.len(), BIG);
                    c
                })
            })
            .collect();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
    }
    let accepted = up.accepted.load(SeqCst);
    assert!(
        (1..=8).contains(&accepted),
        "8 clients need at most 8 upstream connections, not {accepted}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_up_whole() {
    let up = upstream().await;
    let gw = gateway(up.addr, "5s").await;
    let mut client = connect(&gw).await;
    let payload: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = payload
            .chunks(10_000)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let req = Request::post("/api/echo")
            .header(http::header::HOST, "gw")
            .body(StreamBody::new(futures::stream::iter(chunks)))
            .unwrap();
        let (status, _, body) = exchange(&mut client, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), payload.len());
        assert!(body[..] == payload[..], "the body came back changed");
    }
    assert_eq!(up.accepted.load(SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_upstream_is_honoured() {
    let up = upstream().await;
    let gw = gateway(up.addr, "2s").await;
    let mut client = connect(&gw).await;
    for _ in 0..10 {
        let (status, headers, body) = exchange(&mut client, get("/api/close")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"bye");
        assert!(
            !headers.contains_key(http::header::CONNECTION),
            "hop-by-hop headers stay on their hop"
        );
    }
    assert_eq!(
        up.accepted.load(SeqCst),
        10,
        "a connection the upstream closes is never reused"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_abandoned_half_way_does_not_poison_the_pool() {
    let up = upstream().await;
    let gw = gateway(up.addr, "2s").await;
    for _ in 0..3 {
        // A client that reads the head of a 1 MiB answer, then goes away.
        let mut client = connect::<Empty<Bytes>>(&gw).await;
        let response = timeout(BOUND, async {
            client.ready().await.unwrap();
            client.send_request(get("/api/big")).await.unwrap()
        })
        .await
        .expect("a head");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = timeout(BOUND, body.frame()).await.expect("a first frame");
        assert!(first.is_some());
        drop(body);
        drop(client);
        // The next request, on a fresh client, is answered in full.
        let mut next = connect(&gw).await;
        let (status, _, body) = exchange(&mut next, get("/api/big")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), BIG);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    let silent = silent_closer().await;
    let gw = gateway(silent.addr, "2s").await;
    let mut client = connect(&gw).await;
    let mut ok = 0;
    for _ in 0..20 {
        let (status, _, body) = exchange(&mut client, get("/api/x")).await;
        if status == StatusCode::OK {
            assert_eq!(&body[..], b"ok");
            ok += 1;
        }
        // The answer is in: the gateway holds the connection idle. Now the upstream
        // closes it; wait until it has.
        silent.close.notify_one();
        timeout(BOUND, silent.closed.notified())
            .await
            .expect("the upstream closes");
    }
    assert_eq!(
        ok, 20,
        "a pooled connection closed by the upstream was used"
    );
    gw.shutdown().await;
}

/// Reads a request head off `stream`; `false` if it closed first.
async fn read_head(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// A hand-written upstream: each accepted connection's request head is read, then
/// `answer` has the connection.
async fn raw_upstream<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                if read_head(&mut stream).await {
                    answer(stream).await;
                }
            });
        }
    });
    addr
}

/// An upstream that answers one request per connection with keep-alive headers, then,
/// when told to (`close`), closes the connection without a word, as an upstream's idle
/// timeout does, and says it has (`closed`).
struct SilentCloser {
    addr: SocketAddr,
    close: Arc<tokio::sync::Notify>,
    closed: Arc<tokio::sync::Notify>,
}

async fn silent_closer() -> SilentCloser {
    use tokio::io::AsyncWriteExt;
    let closed = Arc::new(tokio::sync::Notify::new());
    let close = Arc::new(tokio::sync::Notify::new());
    let (notify, told) = (closed.clone(), close.clone());
    let addr = raw_upstream(move |mut stream| {
        let (notify, told) = (notify.clone(), told.clone());
        async move {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            told.notified().await;
            drop(stream);
            notify.notify_one();
        }
    })
    .await;
    SilentCloser {
        addr,
        close,
        closed,
    }
}

/// Paused time: the runtime jumps ahead whenever it has nothing else to do.
#[tokio::test(start_paused = true)]
async fn idle_upstream_connections_are_closed_after_30_s_even_if_unused() {
    let up = upstream().await;
    let gw = gateway(up.addr, "2s").await;
    let mut client = connect(&gw).await;
    for _ in 0..3 {
        let (status, _, body) = exchange(&mut client, get("/api/x")).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    assert_eq!(up.accepted.load(SeqCst), 1);
    assert_eq!(up.open.load(SeqCst), 1, "idle in the pool");

    // Just under the idle timeout: still there (nobody used the pool since).
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(up.open.load(SeqCst), 1, "closed before its time");

    // The sweep closes it within 5 s of its timeout, with no request to prompt it.
    let mut waited = Duration::ZERO;
    while up.open.load(SeqCst) > 0 {
        assert!(
            waited < Duration::from_secs(8),
            "still open 37 s after its last use"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    assert_eq!(up.accepted.load(SeqCst), 1);

    // The pool still works: a new connection.
    let mut client = connect(&gw).await;
    let (status, ..) = exchange(&mut client, get("/api/x")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.accepted.load(SeqCst), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_stalling_past_the_timeout_is_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers a head announcing 100 bytes, sends 7, then nothing, keeping the connection.
    let addr = raw_upstream(|mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            .await;
        // Held open until the gateway gives up on it.
        let _ = stream.read(&mut [0u8; 64]).await;
    })
    .await;
    let gw = gateway(addr, "300ms").await;
    let mut client = connect::<Empty<Bytes>>(&gw).await;
    let start = tokio::time::Instant::now();
    let response = timeout(BOUND, client.send_request(get("/api/x")))
        .await
        .expect("the head comes")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = timeout(BOUND, response.into_body().collect())
        .await
        .expect("the body does not hang past the route's timeout");
    assert!(
        body.is_err(),
        "a body cut short is an error, not a short body"
    );
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let status = gw.gateway().status();
    assert_eq!(status.routes[0].upstream_errors.timeout, 1);
    gw.shutdown().await;
}

/// An upstream answering every request with a chunked body of `chunks` parts, one every
/// `every`.
async fn trickler(chunks: usize, every: Duration) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    raw_upstream(move |mut stream| async move {
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head).await.is_err() {
            return;
        }
        for i in 0..chunks {
            tokio::time::sleep(every).await;
            let chunk = format!("5\r\npart{i}\r\n");
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    })
    .await
}

/// Paused time: the runtime jumps ahead whenever it has nothing else to do.
#[tokio::test(start_paused = true)]
async fn a_body_that_keeps_coming_is_not_cut_and_body_timeout_is_its_own() {
    let slow = trickler(6, Duration::from_millis(200)).await;
    let read = |gw: GatewayHandle| async move {
        let mut client = connect::<Empty<Bytes>>(&gw).await;
        let response = client.send_request(get("/api/x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        let timeouts = gw.gateway().status().routes[0].upstream_errors.timeout;
        gw.shutdown().await;
        (body, timeouts)
    };

    // 1.2 s in all, never 300 ms without a chunk: delivered whole (the timer is pushed
    // back at each chunk, not set once).
    let (body, timeouts) = read(gateway(slow, "300ms").await).await;
    assert_eq!(&body.unwrap()[..], b"part0part1part2part3part4part5");
    assert_eq!(timeouts, 0);

    // A body timeout of its own, shorter than the gaps: cut at the first gap.
    let settings = "timeout = \"300ms\"\nbody_timeout = \"100ms\"";
    let (body, timeouts) = read(gateway_with(slow, settings).await).await;
    assert!(body.is_err(), "cut");
    assert_eq!(timeouts, 1);

    // Longer than the route timeout: a 500 ms gap passes.
    let slower = trickler(2, Duration::from_millis(500)).await;
    let settings = "timeout = \"300ms\"\nbody_timeout = \"1s\"";
    let (body, timeouts) = read(gateway_with(slower, settings).await).await;
    assert_eq!(&body.unwrap()[..], b"part0part1");
    assert_eq!(timeouts, 0);
}
