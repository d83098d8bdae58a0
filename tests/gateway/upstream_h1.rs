//! The gateway's own HTTP/1 client against hand-written upstreams on loopback sockets:
//! what a broken or hostile upstream sends (ambiguous framing, malformed heads and
//! chunks, interim answers, bytes after the answer, early answers, bodies delimited by
//! the close) and what reaches the client, and whether the connection is reused after.
//! The upstream counts the connections it accepts, so reuse is checked, not assumed.
//! Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use seawall::gateway::GatewayHandle;

use super::pool::{connect, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);

/// What a scripted upstream saw: the connections it accepted and every request head.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    heads: Mutex<Vec<String>>,
}

/// Reads one request head (and a body of `Content-Length` bytes if it says so, or a
/// chunked one to its last chunk) off `stream`; `None` once it closed.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    loop {
        let done = match length {
            Some(n) => buf.len() >= n,
            None if chunked => buf.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => true,
        };
        if done {
            let n = length.unwrap_or_else(|| {
                buf.windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .map_or(0, |at| at + 5)
            });
            buf.drain(..n.min(buf.len()));
            return Some(head);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An upstream that answers every request on a connection with the bytes `answer` gives
/// for that request's head, written in `pieces` writes (to cut the answer anywhere), then
/// closes the connection if `close_after` says so.
async fn scripted(
    answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    pieces: usize,
    close_after: bool,
) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let answer = Arc::new(answer);
    let seen_by_upstream = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            seen_by_upstream.accepted.fetch_add(1, SeqCst);
            let (seen, answer) = (seen_by_upstream.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = read_request(&mut stream, &mut buf).await {
                    let bytes = answer(&head);
                    seen.heads.lock().await.push(head);
                    let size = bytes.len().div_ceil(pieces.max(1)).max(1);
                    for piece in bytes.chunks(size) {
                        if stream.write_all(piece).await.is_err() {
                            return;
                        }
                        // Each piece on its own: the gateway reads it apart.
                        let _ = stream.flush().await;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    if close_after {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn gateway(upstream: SocketAddr) -> GatewayHandle {
    super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    ))
    .await
}

/// Sends `request` on a new client connection: status, headers and whole body (or the
/// body's error).
async fn send<B>(
    gw: &GatewayHandle,
    request: Request<B>,
) -> (StatusCode, http::HeaderMap, Result<Bytes, String>)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    timeout(BOUND, async {
        let response = connect(gw)
            .await
            .send_request(request)
            .await
            .expect("an answer");
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string());
        (parts.status, parts.headers, body)
    })
    .await
    .expect("a request hung past its bound")
}

/// Like [`send`], but the whole exchange may fail: the status and the whole body, or
/// what failed.
async fn try_send(
    gw: &GatewayHandle,
    request: Request<Empty<Bytes>>,
) -> Result<(StatusCode, Bytes), String> {
    timeout(BOUND, async {
        let response = connect(gw)
            .await
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, body.to_bytes()))
    })
    .await
    .expect("a request hung past its bound")
}

#[tokio::test]
async fn ambiguous_or_malformed_answers_are_502_and_the_connection_is_dropped() {
    for (name, answer) in [
        (
            "Content-Length with Transfer-Encoding",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "differing Content-Lengths",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 30\r\n\r\nabc",
        ),
        (
            "a signed Content-Length",
            "HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nabc",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "an unasked upgrade",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
        ),
        (
            "obsolete line folding",
            "HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 3\r\n\r\nabc",
        ),
        (
            "not HTTP/1",
            "HTTP/2.0 200 OK\r\ncontent-length: 3\r\n\r\nabc",
        ),
        (
            "a status of two digits",
            "HTTP/1.1 20 OK\r\ncontent-length: 3\r\n\r\nabc",
        ),
        ("garbage", "\u{0}\u{1}\u{2} hello\r\n\r\n"),
    ] {
        let (addr, seen) = scripted(move |_| answer.as_bytes().to_vec(), 1, false).await;
        let gw = gateway(addr).await;
        let (status, _, body) = send(&gw, get("/api/x")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{name}: {body:?}");
        // The connection it came on is not used again.
        let (status, _, _) = send(&gw, get("/api/x")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{name}");
        assert_eq!(
            seen.accepted.load(SeqCst),
            2,
            "{name}: a new connection each"
        );
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_head_larger_than_64_kib_is_502() {
    let (addr, _) = scripted(
        |_| {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            while head.len() <= 64 * 1024 {
                head.extend_from_slice(
                    format!("x-filler-{}: {}\r\n", head.len(), "a".repeat(100)).as_bytes(),
                );
            }
            head.extend_from_slice(b"content-length: 2\r\n\r\nok");
            head
        },
        1,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    let (status, _, _) = send(&gw, get("/api/x")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    gw.shutdown().await;
}

#[tokio::test]
async fn chunked_answers_cut_anywhere_arrive_whole_and_the_connection_is_reused() {
    const ANSWER: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-up: 1\r\n\r\n\
        5\r\nhello\r\n6;name=\"quoted value\"\r\n world\r\nA  \r\n0123456789\r\n0\r\n\r\n";
    for pieces in [1, 7, ANSWER.len()] {
        let (addr, seen) = scripted(|_| ANSWER.as_bytes().to_vec(), pieces, false).await;
        let gw = gateway(addr).await;
        for _ in 0..2 {
            let (status, headers, body) = send(&gw, get("/api/x")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers["x-up"], "1");
            assert_eq!(body.unwrap(), "hello world0123456789", "in {pieces} pieces");
        }
        assert_eq!(seen.accepted.load(SeqCst), 1, "in {pieces} pieces: reused");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_malformed_chunk_fails_the_body_and_the_connection() {
    let (addr, seen) = scripted(
        |_| {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"
                .to_vec()
        },
        1,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    for _ in 0..2 {
        // The head was good, but the body breaks off: the client never gets a whole
        // answer (the gateway may not have written the head yet when it fails).
        assert!(try_send(&gw, get("/api/x")).await.is_err());
    }
    assert_eq!(seen.accepted.load(SeqCst), 2, "not reused");
    // The gateway's docs: "a malformed chunk is the upstream's failure (`502`, or the
    // response body cut if its head has gone to the client)"; `bad_gateway` counts "a
    // transport error: refused, reset, bad response", as a body stalled after its head is
    // counted (`timeout`). A body broken off after a good head was counted nowhere.
    let route = &gw.gateway().status().routes[0];
    assert_eq!(
        route.upstream_errors.bad_gateway, 2,
        "two answers cut by a malformed chunk: {:?}",
        route.upstream_errors
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_body_delimited_by_the_close_arrives_whole_on_a_connection_of_its_own() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(),
        3,
        true,
    )
    .await;
    let gw = gateway(addr).await;
    for _ in 0..2 {
        let (status, _, body) = send(&gw, get("/api/x")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), "until the end");
    }
    assert_eq!(seen.accepted.load(SeqCst), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn http_1_0_upstreams_keep_the_connection_only_when_they_say_so() {
    for (keep_alive, connections) in [("", 2), ("connection: keep-alive\r\n", 1)] {
        let (addr, seen) = scripted(
            move |_| {
                format!("HTTP/1.0 200 OK\r\n{keep_alive}content-length: 2\r\n\r\nok").into_bytes()
            },
            1,
            keep_alive.is_empty(),
        )
        .await;
        let gw = gateway(addr).await;
        for _ in 0..2 {
            let (status, _, body) = send(&gw, get("/api/x")).await;
            assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
        }
        assert_eq!(seen.accepted.load(SeqCst), connections, "{keep_alive:?}");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    let (addr, seen) = scripted(
        |_| {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\nmade"
                .to_vec()
        },
        5,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    for _ in 0..2 {
        let (status, headers, body) = send(&gw, get("/api/x")).await;
        assert_eq!(
            (status, body.unwrap()),
            (StatusCode::CREATED, Bytes::from("made"))
        );
        assert!(headers.get("link").is_none());
    }
    assert_eq!(seen.accepted.load(SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn bytes_after_the_answer_keep_the_connection_out_of_the_pool() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled".to_vec(),
        1,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    for _ in 0..3 {
        let (status, _, body) = send(&gw, get("/api/x")).await;
        assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    }
    assert_eq!(seen.accepted.load(SeqCst), 3, "never the smuggled answer");
    gw.shutdown().await;
}

#[tokio::test]
async fn head_answers_have_no_body_and_the_connection_is_reused() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n".to_vec(),
        1,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    for _ in 0..2 {
        let request = Request::head("/api/x")
            .header(http::header::HOST, "gw")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (status, headers, body) = send(&gw, request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-length"], "1234");
        assert!(body.unwrap().is_empty());
    }
    assert_eq!(seen.accepted.load(SeqCst), 1);
    let heads = seen.heads.lock().await;
    assert!(
        heads.iter().all(|h| h.starts_with("HEAD /x HTTP/1.1\r\n")),
        "{heads:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn request_framing_comes_from_the_body() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        1,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    // An empty POST says so; a sized body goes with its length; a streamed one chunked,
    // even on GET.
    let empty_post = Request::post("/api/a")
        .header(http::header::HOST, "gw")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send(&gw, empty_post).await.0, StatusCode::OK);
    let sized = Request::put("/api/b")
        .header(http::header::HOST, "gw")
        .body(Full::new(Bytes::from_static(b"12345")))
        .unwrap();
    assert_eq!(send(&gw, sized).await.0, StatusCode::OK);
    let frames = futures::stream::iter(
        ["ab", "cd"].map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s)))),
    );
    // (hyper's client sends a `GET` body of unknown length only when told to.)
    let streamed = Request::get("/api/c")
        .header(http::header::HOST, "gw")
        .header(http::header::TRANSFER_ENCODING, "chunked")
        .body(StreamBody::new(frames))
        .unwrap();
    assert_eq!(send(&gw, streamed).await.0, StatusCode::OK);
    let heads = seen.heads.lock().await;
    assert!(heads[0].starts_with("POST /a HTTP/1.1\r\n"));
    assert!(
        heads[0].contains("\r\ncontent-length: 0\r\n"),
        "{}",
        heads[0]
    );
    assert!(
        heads[1].contains("\r\ncontent-length: 5\r\n"),
        "{}",
        heads[1]
    );
    assert!(!heads[1].contains("transfer-encoding"), "{}", heads[1]);
    assert!(heads[2].starts_with("GET /c HTTP/1.1\r\n"));
    assert!(
        heads[2].contains("\r\ntransfer-encoding: chunked\r\n"),
        "{}",
        heads[2]
    );
    assert!(!heads[2].contains("content-length"), "{}", heads[2]);
    assert_eq!(seen.accepted.load(SeqCst), 1, "all on one connection");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_early_answer_reaches_the_client_while_its_body_is_still_coming() {
    // The upstream refuses at the head, without reading the body, and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 8\r\n\r\ntoo big!")
                    .await;
                let _ = stream.shutdown().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        }
    });
    let gw = gateway(addr).await;
    // A body that keeps coming for longer than the exchange lasts.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    tokio::spawn(async move {
        for _ in 0..50 {
            if tx
                .send(Ok(Frame::data(Bytes::from(vec![b'x'; 1024]))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let request = Request::post("/api/upload")
        .header(http::header::HOST, "gw")
        .body(StreamBody::new(tokio_stream(rx)))
        .unwrap();
    let (status, _, body) = send(&gw, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body.unwrap(), "too big!");
    gw.shutdown().await;
}

/// A stream of what `rx` receives.
fn tokio_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// A gateway (not listening) whose route `/api` forwards to `upstream` with a
/// `max_request_body` of 10 bytes.
async fn limited_gateway(upstream: SocketAddr) -> seawall::gateway::Gateway {
    let config = seawall::gateway::GatewayConfig::from_toml_str(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"5s\"\nmax_request_body = 10\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    ))
    .unwrap();
    seawall::gateway::Gateway::build(config, seawall::gateway::Discovery::Static)
        .await
        .unwrap()
}

/// A request body that fails at its first frame (over `max_request_body`, or an error of
/// the client's body) while the request goes out on a connection reused from the pool:
/// nothing was written, but a frame of the body was taken. It must fail as the client's
/// fault, not be sent again on a new connection with what is left of its body.
#[tokio::test]
async fn a_body_failed_at_its_first_frame_is_not_resent_without_it() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        1,
        false,
    )
    .await;
    let gateway = limited_gateway(addr).await;
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;
    type Case = (&'static str, fn() -> Frames, StatusCode);
    let cases: [Case; 2] = [
        (
            "first frame over max_request_body",
            || {
                vec![
                    Ok(Frame::data(Bytes::from(vec![b'A'; 20]))),
                    Ok(Frame::data(Bytes::from_static(b"tail"))),
                ]
            },
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "first frame an error",
            || vec![Err(std::io::Error::other("the client's body broke"))],
            StatusCode::BAD_REQUEST,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, frames, expected) in cases {
        // A first request leaves a connection in the pool.
        let warm = gateway.handle(get("/api/warm"), peer).await;
        assert_eq!(warm.status(), StatusCode::OK);
        warm.into_body().collect().await.unwrap();
        let posts_before = seen
            .heads
            .lock()
            .await
            .iter()
            .filter(|h| h.starts_with("POST"))
            .count();
        let request = Request::post("/api/upload")
            .header(http::header::HOST, "gw")
            .body(StreamBody::new(futures::stream::iter(frames())))
            .unwrap();
        let response = timeout(BOUND, gateway.handle(request, peer)).await.unwrap();
        let status = response.status();
        let _ = response.into_body().collect().await;
        let posts = seen
            .heads
            .lock()
            .await
            .iter()
            .filter(|h| h.starts_with("POST"))
            .count();
        if status != expected || posts != posts_before {
            wrong.push(format!(
                "{name}: {status} (expected {expected}), POSTs forwarded: {}",
                posts - posts_before
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// RFC 9110 §7.6.1: an intermediary removes every header *or trailer* field named by
/// `Connection`. The upstream's `Connection: x-secret` must take its `x-secret` trailer
/// off the forwarded answer as it takes the header field.
#[tokio::test]
async fn fields_named_by_connection_are_dropped_from_trailers_too() {
    let (addr, _) = scripted(
        |_| {
            b"HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: in-head\r\n\
              transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-secret: in-trailer\r\n\r\n"
                .to_vec()
        },
        1,
        false,
    )
    .await;
    let gw = gateway(addr).await;
    let (status, body) =
        super::raw_http::request(gw.local_addr(), "GET", "/api/x", "te: trailers\r\n").await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("x-secret"), "forwarded: {body:?}");
    gw.shutdown().await;
}

/// A response whose content carries a transfer coding besides `chunked` (`gzip,
/// chunked`): the gateway removes the chunked framing and drops `Transfer-Encoding` as
/// hop-by-hop, so the client gets gzip-coded bytes presented as the content itself.
/// nginx answers 502 (`upstream sent unknown "Transfer-Encoding"`); either that, or the
/// coding must stay declared.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_not_silently_dropped() {
    let mut wrong = Vec::new();
    for te in ["gzip, chunked", "gzip"] {
        let (addr, _) = scripted(
            move |_| {
                let mut answer =
                    format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n").into_bytes();
                let coded: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03";
                if te.ends_with("chunked") {
                    answer.extend_from_slice(format!("{:x}\r\n", coded.len()).as_bytes());
                    answer.extend_from_slice(coded);
                    answer.extend_from_slice(b"\r\n0\r\n\r\n");
                } else {
                    answer.extend_from_slice(coded);
                }
                answer
            },
            1,
            true,
        )
        .await;
        let gw = gateway(addr).await;
        let (status, headers, body) = send(&gw, get("/api/x")).await;
        let declared = headers
            .iter()
            .any(|(_, v)| v.to_str().is_ok_and(|v| v.contains("gzip")));
        if !(status == StatusCode::BAD_GATEWAY || declared) {
            wrong.push(format!("{te}: {status}, {headers:?}, body {body:?}"));
        }
        gw.shutdown().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The same through the gateway's own listener: an h2c client's streamed upload (no
/// `content-length`) whose first DATA frame is over `max_request_body`, sent while an
/// idle connection to the upstream is in the pool.
#[tokio::test]
async fn an_h2_upload_over_the_limit_is_413_not_forwarded_without_its_start() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        1,
        false,
    )
    .await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"5s\"\nmax_request_body = 10\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
    ))
    .await;
    let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let base = format!("http://{}", gw.local_addr());
    let warm = Request::get(format!("{base}/api/warm"))
        .body(http_body_util::Either::Left(Empty::<Bytes>::new()))
        .unwrap();
    let warm = timeout(BOUND, h2.send_request(warm))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(warm.status(), StatusCode::OK);
    warm.into_body().collect().await.unwrap();
    let frames = futures::stream::iter([
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'A'; 20]))),
        Ok(Frame::data(Bytes::from_static(b"tail"))),
    ]);
    let upload = Request::post(format!("{base}/api/upload"))
        .body(http_body_util::Either::Right(StreamBody::new(frames)))
        .unwrap();
    let response = timeout(BOUND, h2.send_request(upload))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let heads = seen.heads.lock().await.clone();
    assert_eq!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the upstream saw {heads:?}"
    );
    gw.shutdown().await;
}

/// Trailers from an HTTP/2 upstream lose the fields no trailer section may carry on
/// (framing, routing, the content's form), as an HTTP/1 upstream's do; `grpc-status`
/// passes.
#[tokio::test]
async fn an_h2_upstreams_trailers_lose_the_fields_they_may_not_carry() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                trailers.insert("content-length", http::HeaderValue::from_static("99"));
                trailers.insert("host", http::HeaderValue::from_static("elsewhere"));
                trailers.insert("content-type", http::HeaderValue::from_static("text/html"));
                let frames = futures::stream::iter([
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ok"))),
                    Ok(Frame::trailers(trailers)),
                ]);
                Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(frames)))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\nprotocol = \"h2\"\n"
    ))
    .await;
    let (status, body) =
        super::raw_http::request(gw.local_addr(), "GET", "/api/x", "te: trailers\r\n").await;
    assert_eq!(status, 200, "{body}");
    let (_, trailer_section) = body.split_once("\r\n0\r\n").expect("a last chunk");
    assert!(trailer_section.contains("grpc-status: 0"), "{body:?}");
    for name in ["content-length", "host", "content-type"] {
        assert!(
            !trailer_section.contains(name),
            "{name} forwarded: {body:?}"
        );
    }
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Review probes.

/// RFC 9110 §15: status codes are 100..=599; "a client that receives a response with an
/// invalid status code SHOULD process the response as if it had a 5xx (Server Error)
/// status code". The gateway is the upstream's client: an answer `600`–`999` is a server
/// error, so a route's fallback ("in place of any upstream failure: … a 5xx answer")
/// must answer in its place, as it does for a `500`.
#[tokio::test]
async fn an_invalid_status_code_is_handled_as_a_server_error() {
    let mut wrong = Vec::new();
    for code in [500, 600, 999] {
        let (addr, _) = scripted(
            move |_| format!("HTTP/1.1 {code} Odd\r\ncontent-length: 4\r\n\r\noops").into_bytes(),
            1,
            false,
        )
        .await;
        let gw = super::spawn_gateway(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             strip_prefix = true\ntimeout = \"5s\"\n\n\
             [routes.fallback]\nstatus = 200\nbody = '{{\"cached\":true}}'\n\n\
             [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
        ))
        .await;
        let (status, headers, body) = send(&gw, get("/api/x")).await;
        if headers.get("x-seawall-fallback").is_none() {
            wrong.push(format!("{code}: forwarded as {status}, body {body:?}"));
        }
        gw.shutdown().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// RFC 9113 §8.2.3: an HTTP/2 client may send its cookies as separate `cookie` fields
/// (browsers do, for HPACK); "if there are multiple Cookie header fields after
/// decompression, these MUST be concatenated into a single octet string using the
/// two-octet delimiter of `; ` before being passed into a non-HTTP/2 context, such as an
/// HTTP/1.1 connection" (and RFC 6265 §5.4: one `Cookie` field). An HTTP/1 upstream
/// must get one `cookie: a=1; b=2`, not two fields (which servers that fold repeated
/// fields with `, ` read as the cookie `a` = `1, b=2`).
#[tokio::test]
async fn an_h2_clients_cookie_crumbs_reach_an_http1_upstream_as_one_field() {
    let (addr, seen) = scripted(
        |_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        1,
        false,
    )
    .await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
    ))
    .await;
    let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = Request::get(format!("http://{}/api/x", gw.local_addr()))
        .header(http::header::COOKIE, "a=1")
        .header(http::header::COOKIE, "b=2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = timeout(BOUND, h2.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let heads = seen.heads.lock().await.clone();
    let head = heads[0].to_ascii_lowercase();
    let cookies: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("cookie:"))
        .map(str::trim)
        .collect();
    assert_eq!(cookies, ["a=1; b=2"], "the upstream got {:?}", heads[0]);
    gw.shutdown().await;
}

/// RFC 9112 §6.3 (5): a `Content-Length` that is a list of one repeated value (`2, 2`)
/// or repeated fields of it, which the gateway accepts as framing, "MUST either [be
/// rejected] as invalid or [the duplicated values replaced] with a single valid
/// Content-Length field containing that decimal value". Forwarded as it came, `2, 2`
/// makes an HTTP/2 client reset the stream (an invalid `content-length`, RFC 9113
/// §8.1.1), and reaches HTTP/1 clients of `HEAD` as it came. Either way the client must
/// get a valid answer: over HTTP/2 the `200` with its body, over HTTP/1 to `HEAD` one
/// `content-length: 2`.
#[tokio::test]
async fn a_repeated_content_length_is_forwarded_as_one_valid_value() {
    let mut wrong = Vec::new();
    for (name, lengths) in [
        ("a list", "content-length: 2, 2\r\n"),
        ("two fields", "content-length: 2\r\ncontent-length: 2\r\n"),
    ] {
        let (addr, _) = scripted(
            move |head| {
                let body = if head.starts_with("HEAD") { "" } else { "ok" };
                format!("HTTP/1.1 200 OK\r\n{lengths}\r\n{body}").into_bytes()
            },
            1,
            false,
        )
        .await;
        let gw = super::spawn_gateway(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             strip_prefix = true\ntimeout = \"5s\"\n\n\
             [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
        ))
        .await;
        // An HTTP/2 client.
        let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
        let (mut h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let request = Request::get(format!("http://{}/api/x", gw.local_addr()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let answer = timeout(BOUND, async {
            let response = h2.send_request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        })
        .await
        .expect("no hang");
        if answer != Ok((StatusCode::OK, Bytes::from_static(b"ok"))) {
            wrong.push(format!("{name}, HTTP/2 client: {answer:?}"));
        }
        // An HTTP/1 client's `HEAD`.
        let mut raw = TcpStream::connect(gw.local_addr()).await.unwrap();
        raw.write_all(b"HEAD /api/x HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        timeout(BOUND, raw.read_to_end(&mut head))
            .await
            .expect("no hang")
            .unwrap();
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let lengths: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("content-length:"))
            .map(str::trim)
            .collect();
        if lengths != ["2"] {
            wrong.push(format!(
                "{name}, HEAD over HTTP/1: content-length {lengths:?}"
            ));
        }
        gw.shutdown().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// An upstream that answers at once with a chunked `200` and then echoes, chunk by chunk,
/// whatever of the request body comes (a streaming transform: the answer's body follows
/// the upload).
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                let end = loop {
                    if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                };
                let mut pending = seen.split_off(end);
                if stream
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    if !pending.is_empty() {
                        let mut chunk = format!("{:x}\r\n", pending.len()).into_bytes();
                        chunk.append(&mut pending);
                        chunk.extend_from_slice(b"\r\n");
                        if stream.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// SECURITY.md: "a client body slower than the route timeout (`408`) [...] recorded as
/// client errors". An upstream streaming its answer as the upload comes (the head at
/// once, then the body following the client's) waits on the client: a client that stops
/// sending its body stops the answer. When the route's `body_timeout` then passes, the
/// stall is the client's, and must be counted as such, not in the route's
/// `upstream_errors.timeout` ("the upstream sent nothing of the response body"), which
/// the status page and the metrics show as the upstream's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stalled_by_the_clients_own_upload_is_not_an_upstream_timeout() {
    let addr = echo_upstream().await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         timeout = \"2s\"\nbody_timeout = \"300ms\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
    ))
    .await;
    // One frame, then nothing more: the sender is held open, the body never ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
        .await
        .unwrap();
    let request = Request::post("/api/transform")
        .header(http::header::HOST, "gw")
        .body(StreamBody::new(tokio_stream(rx)))
        .unwrap();
    let (status, _, body) = send(&gw, request).await;
    drop(tx);
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_err(), "the stalled answer is cut: {body:?}");
    super::limits::settled(&gw, 1).await;
    let route = super::limits::route(&gw);
    assert_eq!(
        route.upstream_errors.timeout, 0,
        "the client's stalled upload counted as an upstream timeout: {:?}; client errors {:?}",
        route.upstream_errors, route.client_errors
    );
    gw.shutdown().await;
}

/// An upstream that implements `GET` only: `200 ok` to it, `501 Not Implemented` to any
/// other method.
async fn get_only_upstream() -> SocketAddr {
    let (addr, _) = scripted(
        |head| {
            if head.starts_with("GET ") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
            } else {
                b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\n\r\n".to_vec()
            }
        },
        1,
        false,
    )
    .await;
    addr
}

/// The statuses of `count` `PROPFIND /api/x` sent to `gw` one after another, each on a
/// connection of its own.
async fn propfinds(gw: &GatewayHandle, count: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..count {
        let answer = super::limits::exchange(
            gw.local_addr(),
            b"PROPFIND /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        statuses.push(super::limits::status_of(&answer));
    }
    statuses
}

/// SECURITY.md: "no anonymous client can open a breaker or eject a healthy upstream".
/// A gateway with one route to `addr` (timeout 5 s) whose breaker and outlier detection
/// are quick to judge (`limits::STRICT`: four calls decide).
async fn strict_gateway(addr: SocketAddr) -> GatewayHandle {
    super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"5s\"\n\
         {}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n",
        super::limits::STRICT
    ))
    .await
}

/// The gateway forwards any method token; servers answer one they do not implement with
/// `501 Not Implemented` (RFC 9110 §15.6.2: "the server does not support the
/// functionality required to fulfill the request": Apache httpd, Python's `http.server`,
/// many frameworks), which says nothing of the server's health (the crate's own
/// `HttpClassifier` docs name 501 as the 5xx to leave out). A client sending `PROPFIND`
/// a few times must not open the breaker of, or eject, a healthy endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_unimplemented_method_does_not_open_the_endpoints_breaker() {
    let addr = get_only_upstream().await;
    let gw = strict_gateway(addr).await;
    let mut statuses = propfinds(&gw, 6).await;
    super::limits::settled(&gw, 6).await;
    let answer =
        super::limits::exchange(gw.local_addr(), super::limits::get("/api/x").as_bytes()).await;
    statuses.push(super::limits::status_of(&answer));
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (statuses, e.failures, e.ejected, e.breaker.as_deref()),
        (
            vec![501, 501, 501, 501, 501, 501, 200],
            0,
            false,
            Some("closed")
        ),
        "(statuses: six PROPFIND then a GET, endpoint failures, ejected, breaker): {e:?}"
    );
    gw.shutdown().await;
}

/// The same `501` (the client's unimplemented method, "which any client can send": the
/// gateway's docs, and `a_clients_unimplemented_method_does_not_open_the_endpoints_breaker`)
/// is not the upstream's failure at the route either: it is passed to the client as the
/// upstream answered, not replaced by the route's fallback (a `200` to a `PROPFIND` or a
/// `DELETE` the upstream never did), and not counted in `upstream_errors`, which the
/// status page and `/metrics` show as the route's failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_method_is_no_upstream_error_nor_fallback() {
    let addr = get_only_upstream().await;
    for fallback in [
        "fallback = { status = 200, body = '{\"fallback\":true}' }",
        "",
    ] {
        let gw = super::spawn_gateway(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             timeout = \"5s\"\n{fallback}\n\n\
             [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
        ))
        .await;
        let statuses = propfinds(&gw, 3).await;
        super::limits::settled(&gw, 3).await;
        let route = super::limits::route(&gw);
        assert_eq!(
            (
                statuses,
                route.fallbacks,
                route.upstream_errors.server_error
            ),
            (vec![501, 501, 501], 0, 0),
            "with {fallback:?}: (statuses, fallbacks, upstream_errors.server_error): {:?}",
            route.upstream_errors
        );
        gw.shutdown().await;
    }
}

/// An upstream with a read timeout on request bodies, as most servers have (Go's
/// `http.Server.ReadTimeout`, gunicorn's worker timeout, Node's `requestTimeout`): a
/// request whose body has not come whole within `body_wait` has its connection closed,
/// unanswered. Whole requests get `200 ok`.
async fn body_read_timeout_upstream(body_wait: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    match timeout(body_wait, read_request(&mut stream, &mut buf)).await {
                        Ok(Some(_)) => {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                        // Closed, or the body did not come in time: the connection ends.
                        _ => return,
                    }
                }
            });
        }
    });
    addr
}

/// SECURITY.md: "a client body slower than the route timeout (408) ... [is] recorded as
/// [a] client error, never by the endpoint's circuit breaker or outlier detection ... So no
/// anonymous client can open a breaker or eject a healthy upstream." A client that
/// declares a body and stalls half-way makes a healthy upstream with a body read timeout
/// shorter than the route's (Go's `ReadTimeout`, say) drop the connection: the exchange
/// was waiting on the client's body when it ended. Four such uploads must not open the
/// endpoint's breaker or eject it, nor be counted as the upstream's `bad_gateway`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_the_upstream_gives_up_on_is_not_the_upstreams_failure() {
    let addr = body_read_timeout_upstream(Duration::from_millis(200)).await;
    let gw = strict_gateway(addr).await;
    let mut statuses = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        // 10 bytes of the 100 declared, then nothing; the client stays connected.
        let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
        stream
            .write_all(b"POST /api/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        statuses.push(super::limits::status_of(
            &super::limits::read_answer(&mut stream).await,
        ));
        stalled.push(stream);
    }
    super::limits::settled(&gw, 4).await;
    let answer =
        super::limits::exchange(gw.local_addr(), super::limits::get("/api/x").as_bytes()).await;
    statuses.push(super::limits::status_of(&answer));
    let route = super::limits::route(&gw);
    let e = super::limits::endpoint(&gw);
    assert_eq!(
        (
            statuses.clone(),
            e.failures,
            e.ejected,
            e.breaker.as_deref(),
            route.upstream_errors.bad_gateway,
            route.client_errors.body_timeout
        ),
        (
            vec![408, 408, 408, 408, 200],
            0,
            false,
            Some("closed"),
            0,
            4
        ),
        "(statuses: four stalled uploads then a GET {statuses:?}; endpoint failures, \
         ejected, breaker; bad_gateway): {e:?} {:?} {:?}",
        route.upstream_errors,
        route.client_errors
    );
    drop(stalled);
    gw.shutdown().await;
}
