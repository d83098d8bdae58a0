//! The gateway as the HTTP/1 server its clients talk to, pinned with raw bytes over
//! loopback: request framing a hostile client plays against proxies (`Content-Length`
//! with `Transfer-Encoding`, odd codings, conflicting lengths, obsolete folding), head
//! bounds, `Host`, pipelining, keep-alive, `Expect: 100-continue`, chunked request
//! bodies, clients that go or go quiet, how answers are framed toward the client, `Date`,
//! and a graceful shutdown. The upstream is hand-written: it records every request (its
//! request line and decoded body) and the connections it accepted, so that "the upstream
//! was never called" is checked, not assumed. Every wait is bounded; where the gateway's
//! own timers matter, the clock is paused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use parking_lot::Mutex;
use seawall::gateway::GatewayHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use super::limits::{endpoint, route, settled};
use super::raw_http::BOUND;

// ---------------------------------------------------------------------------------
// The upstream.

/// One request as the upstream read it: its request line and its body, decoded.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    body: Vec<u8>,
}

/// What the upstream writes for a request: the pieces of its answer, each written (and
/// flushed) on its own.
type Answer = Box<dyn Fn(&Seen) -> Vec<Vec<u8>> + Send + Sync>;

struct State {
    answer: Answer,
    /// Answers wait for [`Upstream::release`].
    hold: bool,
    accepted: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    /// Requests read so far.
    arrived: watch::Sender<usize>,
    gate: watch::Sender<bool>,
    /// Connections the gateway closed while their answer was held.
    abandoned: watch::Sender<usize>,
}

/// A hand-written HTTP/1.1 upstream on loopback: reads requests (bodies of
/// `Content-Length` bytes or chunked, decoded) on keep-alive connections and answers each
/// with what `answer` gives; counts connections and requests.
struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Upstream {
    async fn start(answer: impl Fn(&Seen) -> Vec<Vec<u8>> + Send + Sync + 'static) -> Self {
        Self::spawn(Box::new(answer), false).await
    }

    /// An upstream whose answers (`echo`) wait until [`Upstream::release`], watching
    /// their connection meanwhile.
    async fn holding() -> Self {
        Self::spawn(Box::new(echo), true).await
    }

    async fn spawn(answer: Answer, hold: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            answer,
            hold,
            accepted: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            arrived: watch::Sender::new(0),
            gate: watch::Sender::new(false),
            abandoned: watch::Sender::new(0),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, SeqCst);
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_upstream(stream, shared.clone()));
            }
        });
        Self { addr, state }
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(SeqCst)
    }

    fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    /// The request lines it read, in order (`GET /x`).
    fn lines(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|s| format!("{} {}", s.method, s.target))
            .collect()
    }

    async fn wait_for_requests(&self, n: usize) {
        let mut arrived = self.state.arrived.subscribe();
        timeout(BOUND, arrived.wait_for(|&got| got >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} requests never reached the upstream"))
            .unwrap();
    }

    fn release(&self) {
        self.state.gate.send_replace(true);
    }

    /// Waits until the gateway closed `n` connections whose answer was held.
    async fn wait_for_abandoned(&self, n: usize) {
        let mut abandoned = self.state.abandoned.subscribe();
        timeout(BOUND, abandoned.wait_for(|&got| got >= n))
            .await
            .expect("the upstream exchange outlived its client")
            .unwrap();
    }

    /// Asserts that nothing reached it, connection or request.
    fn assert_untouched(&self, case: &str) {
        assert_eq!(
            (self.accepted(), self.lines()),
            (0, Vec::<String>::new()),
            "{case}: the upstream was called"
        );
    }
}

async fn serve_upstream(mut stream: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    while let Some(seen) = read_request(&mut stream, &mut buf).await {
        let pieces = (state.answer)(&seen);
        state.seen.lock().push(seen);
        state.arrived.send_modify(|n| *n += 1);
        if state.hold {
            let mut gate = state.gate.subscribe();
            let mut chunk = [0u8; 4096];
            loop {
                tokio::select! {
                    _ = gate.wait_for(|open| *open) => break,
                    read = stream.read(&mut chunk) => match read {
                        Ok(0) | Err(_) => {
                            state.abandoned.send_modify(|n| *n += 1);
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    },
                }
            }
        }
        for piece in pieces {
            if stream.write_all(&piece).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads more of `stream` into `buf`: `false` once it closed or failed.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Takes `n` bytes off the front of `buf`, reading as needed.
async fn take(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<Vec<u8>> {
    while buf.len() < n {
        if !read_more(stream, buf).await {
            return None;
        }
    }
    Some(buf.drain(..n).collect())
}

/// Takes a line off the front of `buf` (without its CRLF), reading as needed.
async fn take_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(at) = find(buf, b"\r\n") {
            let line = buf[..at].to_vec();
            buf.drain(..at + 2);
            return Some(line);
        }
        if !read_more(stream, buf).await {
            return None;
        }
    }
}

/// Decodes a chunked body (extensions and trailers dropped): `None` when it is
/// malformed or cut short.
async fn take_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = take_line(stream, buf).await?;
        let size = String::from_utf8_lossy(&line);
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            while !take_line(stream, buf).await?.is_empty() {}
            return Some(body);
        }
        body.extend(take(stream, buf, size).await?);
        if take(stream, buf, 2).await? != b"\r\n" {
            return None;
        }
    }
}

/// The header fields of a head (its first line skipped): names lower-cased, values
/// trimmed, in order.
fn fields(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// The first value of `name` in `fields`.
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn is_chunked(fields: &[(String, String)]) -> bool {
    fields
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"))
}

/// The first of the comma-separated values of a `Content-Length`.
fn length_of(fields: &[(String, String)]) -> Option<usize> {
    field(fields, "content-length")?
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Reads one request: `None` once the connection closed (or the body broke).
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let end = loop {
        if let Some(at) = find(buf, b"\r\n\r\n") {
            break at + 4;
        }
        if !read_more(stream, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut line = head.split("\r\n").next().unwrap_or_default().split(' ');
    let method = line.next().unwrap_or_default().to_owned();
    let target = line.next().unwrap_or_default().to_owned();
    let fields = fields(&head);
    let body = if is_chunked(&fields) {
        take_chunked(stream, buf).await?
    } else if let Some(n) = length_of(&fields) {
        take(stream, buf, n).await?
    } else {
        Vec::new()
    };
    Some(Seen {
        method,
        target,
        body,
    })
}

/// `200` with `<method> <target> <body length>` as its body (`HEAD`: its head alone),
/// with its `Content-Length`.
fn echo(seen: &Seen) -> Vec<Vec<u8>> {
    let body = format!("{} {} {}", seen.method, seen.target, seen.body.len());
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    if seen.method == "HEAD" {
        return vec![head.into_bytes()];
    }
    vec![format!("{head}{body}").into_bytes()]
}

/// By target: `/chunked`, a chunked body (`hello world`) in three writes; `/no-content`,
/// `204`; `/no-content-0`, `204` with `content-length: 0`; `HEAD` anything,
/// `content-length: 1234` and no body; anything else [`echo`].
fn varied(seen: &Seen) -> Vec<Vec<u8>> {
    if seen.method == "HEAD" {
        return vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\nx-up: head\r\n\r\n".to_vec()];
    }
    match seen.target.as_str() {
        "/chunked" => vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
            b"6\r\n world\r\n".to_vec(),
            b"0\r\n\r\n".to_vec(),
        ],
        "/no-content" => vec![b"HTTP/1.1 204 No Content\r\nx-up: 204\r\n\r\n".to_vec()],
        "/no-content-0" => {
            vec![b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nx-up: 204\r\n\r\n".to_vec()]
        }
        _ => echo(seen),
    }
}

/// A gateway with `[gateway]` settings `server` and one route, `/api` (stripped, a 60 s
/// timeout: longer than any bound here) to `up`.
async fn gateway(up: &Upstream, server: &str) -> GatewayHandle {
    super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"60s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    ))
    .await
}

// ---------------------------------------------------------------------------------
// The client.

/// One answer as the client read it.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    fields: Vec<(String, String)>,
    /// Decoded when it came chunked.
    body: Vec<u8>,
}

impl Reply {
    fn field(&self, name: &str) -> Option<&str> {
        field(&self.fields, name)
    }

    fn count(&self, name: &str) -> usize {
        self.fields.iter().filter(|(k, _)| k == name).count()
    }

    fn chunked(&self) -> bool {
        is_chunked(&self.fields)
    }

    fn body(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether `Connection` names `option`.
    fn connection(&self, option: &str) -> bool {
        self.fields.iter().any(|(k, v)| {
            k == "connection" && v.split(',').any(|o| o.trim().eq_ignore_ascii_case(option))
        })
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.head, self.body())
    }
}

/// A raw client connection to the gateway.
struct Client {
    stream: TcpStream,
    /// Read, not yet taken as an answer.
    buf: Vec<u8>,
}

impl Client {
    async fn connect(gw: &GatewayHandle) -> Self {
        let stream = timeout(BOUND, TcpStream::connect(gw.local_addr()))
            .await
            .expect("connected in time")
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Reads more: `false` once the gateway closed (or reset) the connection. Panics
    /// when nothing comes within the bound.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match timeout(BOUND, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "nothing more from the gateway within {BOUND:?}; read so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "the gateway closed in a body of {n} bytes: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
        self.buf.drain(..n).collect()
    }

    async fn take_line(&mut self) -> String {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "the gateway closed in a chunked body: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads one answer (`1xx` included) and its body, framed as it says: none when
    /// `body_allowed` is false (the answer to `HEAD`) or for `1xx`, `204` and `304`;
    /// chunked, decoded strictly; `Content-Length` bytes; or up to the close.
    async fn answer(&mut self, body_allowed: bool) -> Reply {
        let end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                self.fill().await,
                "the gateway closed before a whole answer head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        assert!(head.starts_with("HTTP/1."), "not an answer: {head:?}");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status: {head:?}"));
        let fields = fields(&head);
        let no_body = !body_allowed || status / 100 == 1 || status == 204 || status == 304;
        let body = if no_body {
            Vec::new()
        } else if is_chunked(&fields) {
            let mut body = Vec::new();
            loop {
                let line = self.take_line().await;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("a bad chunk size {line:?} after {head:?}"));
                if size == 0 {
                    while !self.take_line().await.is_empty() {}
                    break body;
                }
                body.extend(self.take(size).await);
                assert_eq!(self.take(2).await, b"\r\n", "a chunk without its CRLF");
            }
        } else if let Some(n) = length_of(&fields) {
            self.take(n).await
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.buf)
        };
        Reply {
            status,
            head,
            fields,
            body,
        }
    }

    /// Whether the gateway closed the connection (or reset it) with nothing more sent:
    /// `Err` with what came instead, or when it stayed open for the bound.
    async fn closed(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "bytes after the answer: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        let mut chunk = [0u8; 4096];
        match timeout(BOUND, self.stream.read(&mut chunk)).await {
            Err(_) => Err(format!("still open {BOUND:?} after the answer")),
            Ok(Ok(0) | Err(_)) => Ok(()),
            Ok(Ok(n)) => Err(format!(
                "more bytes after the answer: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            )),
        }
    }
}

/// `GET <target>` over HTTP/1.1 with `Host: gw` and the `extra` header lines.
fn get(target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n")
}

/// Sends `raw` on a connection of its own: the one answer, and whether the gateway then
/// closed the connection.
async fn one_answer(gw: &GatewayHandle, raw: &[u8]) -> (Reply, Result<(), String>) {
    let mut client = Client::connect(gw).await;
    client.send(raw).await;
    let reply = client.answer(true).await;
    let closed = client.closed().await;
    (reply, closed)
}

/// `raw` is answered with one of `statuses`, the connection is closed after it, and the
/// upstream saw nothing.
async fn assert_refused(
    gw: &GatewayHandle,
    up: &Upstream,
    case: &str,
    raw: &[u8],
    statuses: &[u16],
) {
    let (reply, closed) = one_answer(gw, raw).await;
    assert!(
        statuses.contains(&reply.status),
        "{case}: answered {}, not one of {statuses:?}:\n{reply}",
        reply.status
    );
    if let Err(e) = closed {
        panic!(
            "{case}: after {}, the connection was not closed: {e}",
            reply.status
        );
    }
    up.assert_untouched(case);
}

/// A good request on the same gateway reaches the upstream (so that "never called" above
/// meant something): it is the only one the upstream got.
async fn assert_served_after(gw: &GatewayHandle, up: &Upstream) {
    let (reply, _) = one_answer(gw, get("/api/good", "Connection: close\r\n").as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(up.lines(), ["GET /good"]);
}

// ---------------------------------------------------------------------------------
// Ambiguous framing.

/// A client sends both `Content-Length` and `Transfer-Encoding: chunked` (in either
/// order), the classic request-smuggling desync: a proxy that picks one and an upstream
/// that picks the other disagree on where the request ends. The gateway must refuse it
/// with `400`, close the connection (what follows cannot be trusted to be a request), and
/// never call the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_400_and_closes() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for (case, fields) in [
        (
            "Content-Length first",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "Transfer-Encoding first",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ),
        (
            "Content-Length: 0",
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        // What follows (a request, as a smuggler would hide it) is never served either.
        let raw = format!(
            "POST /api/up HTTP/1.1\r\nHost: gw\r\n{fields}\r\n5\r\nhello\r\n0\r\n\r\n{}",
            get("/api/smuggled", "")
        );
        assert_refused(&gw, &up, case, raw.as_bytes(), &[400]).await;
    }
    // Each refusal is counted, apart from any route's figures.
    assert_eq!(gw.gateway().status().refused, 3);
    assert_served_after(&gw, &up).await;
    gw.shutdown().await;
}

/// A client sends a `Transfer-Encoding` other than exactly `chunked`: a coding the
/// gateway cannot decode (`gzip, chunked`), `chunked` not last (then nothing delimits the
/// body), `identity` (obsolete), `chunked` twice, or `Transfer-Encoding` split over two
/// fields. The gateway must refuse it (`400` or `501`), close the connection, and never
/// call the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_alone_are_refused_and_close() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for fields in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: \r\n",
    ] {
        let raw =
            format!("POST /api/up HTTP/1.1\r\nHost: gw\r\n{fields}\r\n5\r\nhello\r\n0\r\n\r\n");
        assert_refused(&gw, &up, fields, raw.as_bytes(), &[400, 501]).await;
    }
    assert_served_after(&gw, &up).await;
    gw.shutdown().await;
}

/// A client sends `Content-Length` twice with different values, a list of different
/// values, or a value that is not a plain decimal (`+5`, `0x5`, `-1`, blank, too large):
/// another way to make two parsers disagree on the body's end. The gateway must refuse it
/// with `400`, close, and never call the upstream. The same value repeated (`5, 5`, or
/// two fields of `5`) is one length, and is accepted: the upstream gets the 5 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_or_malformed_content_lengths_are_400_and_close() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for fields in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: -1\r\n",
        "Content-Length:  \r\n",
        "Content-Length: 5 5\r\n",
        "Content-Length: 99999999999999999999\r\n",
    ] {
        let raw = format!("POST /api/up HTTP/1.1\r\nHost: gw\r\n{fields}\r\nhello");
        assert_refused(&gw, &up, fields, raw.as_bytes(), &[400]).await;
    }
    for fields in [
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
    ] {
        let raw = format!(
            "POST /api/same HTTP/1.1\r\nHost: gw\r\n{fields}Connection: close\r\n\r\nhello"
        );
        let (reply, _) = one_answer(&gw, raw.as_bytes()).await;
        assert_eq!(reply.status, 200, "{fields}: {reply}");
        assert_eq!(reply.body(), "POST /same 5", "{fields}");
        let seen = up.requests();
        assert_eq!(seen.last().unwrap().body, b"hello", "{fields}");
    }
    assert_eq!(up.lines(), ["POST /same", "POST /same"]);
    gw.shutdown().await;
}

/// An HTTP/1.0 client sends `Transfer-Encoding: chunked`, which HTTP/1.0 does not have
/// (an HTTP/1.0 hop behind would read the body by the close, or not at all). The gateway
/// must refuse it with `400` and never call the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_in_http_1_0_is_400() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for raw in [
        "POST /api/up HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /api/up HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        assert_refused(&gw, &up, raw, raw.as_bytes(), &[400]).await;
    }
    assert_served_after(&gw, &up).await;
    gw.shutdown().await;
}

/// A client folds a header value over two lines (a line starting with a space or a tab,
/// obsolete since RFC 7230), which parsers disagree on (a continuation, or a field named
/// ` folded`). The gateway must refuse it with `400`, close, and never call the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obsolete_line_folding_is_400() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for raw in [
        "GET /api/x HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n folded\r\n\r\n",
        "GET /api/x HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n\tfolded\r\n\r\n",
        "POST /api/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\nhello",
        "GET /api/x HTTP/1.1\r\n Host: gw\r\nHost: gw\r\n\r\n",
    ] {
        assert_refused(&gw, &up, raw, raw.as_bytes(), &[400]).await;
    }
    assert_served_after(&gw, &up).await;
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Head bounds and Host.

/// A client sends a request head larger than `[gateway] max_headers_size` (set to its
/// least, 8 KiB, with every line under `max_header_line`), or with more than 100 header
/// fields, each small. The gateway must answer `431` and close, never calling the
/// upstream; a head just within either bound is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_max_headers_size_or_100_fields_are_431_and_close() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "max_headers_size = 8192\nmax_header_line = 4096").await;
    let with = |fields: &[String]| {
        let mut raw = String::from("GET /api/x HTTP/1.1\r\nHost: gw\r\n");
        for f in fields {
            raw.push_str(f);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        raw
    };
    let filler = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("x-fill-{i}: {}", "a".repeat(3000)))
            .collect()
    };
    let many = |n: usize| -> Vec<String> { (0..n).map(|i| format!("x-f-{i}: {i}")).collect() };
    let large = with(&filler(3));
    assert!(large.len() > 9000, "{}", large.len());
    assert_refused(&gw, &up, "a head over 8 KiB", large.as_bytes(), &[431]).await;
    // Host and 100 more.
    let crowded = with(&many(100));
    assert!(crowded.len() < 4096);
    assert_refused(&gw, &up, "101 fields", crowded.as_bytes(), &[431]).await;

    // Within both: about 6 KiB; Host, Connection and 98 more, 100 in all.
    for (case, fields) in [("6 KiB", filler(2)), ("100 fields", many(98))] {
        let mut raw = with(&fields);
        raw.insert_str(raw.len() - 2, "Connection: close\r\n");
        let (reply, _) = one_answer(&gw, raw.as_bytes()).await;
        assert_eq!(reply.status, 200, "{case}: {reply}");
    }
    assert_eq!(up.lines(), ["GET /x", "GET /x"]);
    gw.shutdown().await;
}

/// An HTTP/1.1 client sends no `Host`, or two: the gateway cannot tell which authority
/// is meant (and a hop behind may pick the other one). It must answer `400` and close,
/// never calling the upstream, whatever the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_without_exactly_one_host_is_400() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for raw in [
        "GET /api/x HTTP/1.1\r\n\r\n",
        "GET /api/x HTTP/1.1\r\nX-A: 1\r\n\r\n",
        "GET /api/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "GET /api/x HTTP/1.1\r\nHost: gw\r\nHost: gw\r\n\r\n",
        "GET /nowhere HTTP/1.1\r\n\r\n",
    ] {
        assert_refused(&gw, &up, raw, raw.as_bytes(), &[400]).await;
    }
    assert_served_after(&gw, &up).await;
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Several requests on a connection.

/// A client pipelines two (then three) `GET`s in one write, the last with
/// `Connection: close`. The gateway must answer each, in order, on the same connection,
/// close after the last, and the upstream must see each request exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    for n in [2usize, 3] {
        let mut raw = String::new();
        for i in 1..=n {
            let close = if i == n { "Connection: close\r\n" } else { "" };
            raw.push_str(&get(&format!("/api/{n}-{i}"), close));
        }
        let before = up.requests().len();
        let mut client = Client::connect(&gw).await;
        client.send(&raw).await;
        for i in 1..=n {
            let reply = client.answer(true).await;
            assert_eq!(reply.status, 200, "{n} pipelined, answer {i}: {reply}");
            assert_eq!(
                reply.body(),
                format!("GET /{n}-{i} 0"),
                "{n} pipelined: in order"
            );
        }
        client
            .closed()
            .await
            .unwrap_or_else(|e| panic!("{n} pipelined, after the last: {e}"));
        let mut lines = up.lines().split_off(before);
        lines.sort();
        let expected: Vec<_> = (1..=n).map(|i| format!("GET /{n}-{i}")).collect();
        assert_eq!(lines, expected, "{n} pipelined: each once");
    }
    gw.shutdown().await;
}

/// A client sends a `POST` with `Content-Length: 5` and, in the same write, another
/// request right after the body; or a body that is itself the bytes of a request. The
/// upstream must get exactly the declared bytes as the body, and the next request must
/// be served as a request of its own: the body neither swallows the request after it nor
/// is parsed as one (no smuggling either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_content_length_bytes_neither_swallows_nor_leaks_into_the_next_request() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let smuggled = get("/api/smuggled", "");
    for (case, body) in [("plain", "hello"), ("a request as body", smuggled.as_str())] {
        let before = up.requests().len();
        let raw = format!(
            "POST /api/first HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{body}{}",
            body.len(),
            get("/api/second", "Connection: close\r\n")
        );
        let mut client = Client::connect(&gw).await;
        client.send(&raw).await;
        let first = client.answer(true).await;
        assert_eq!(first.status, 200, "{case}: {first}");
        assert_eq!(
            first.body(),
            format!("POST /first {}", body.len()),
            "{case}"
        );
        let second = client.answer(true).await;
        assert_eq!(second.status, 200, "{case}: {second}");
        assert_eq!(second.body(), "GET /second 0", "{case}");
        client
            .closed()
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let seen = up.requests().split_off(before);
        let lines: Vec<_> = seen
            .iter()
            .map(|s| format!("{} {}", s.method, s.target))
            .collect();
        assert_eq!(lines, ["POST /first", "GET /second"], "{case}");
        assert_eq!(seen[0].body, body.as_bytes(), "{case}");
        assert!(seen[1].body.is_empty(), "{case}");
    }
    assert!(!up.lines().iter().any(|l| l.contains("smuggled")));
    gw.shutdown().await;
}

/// Keep-alive as RFC 9112 §9.3 has it. An HTTP/1.0 client without
/// `Connection: keep-alive` reads its answer to the close: the gateway must close after
/// it. An HTTP/1.0 client with `Connection: keep-alive` must get an answer it can delimit
/// (`Content-Length`) with `Connection: keep-alive`, and its next request on the same
/// connection served. An HTTP/1.1 client saying `Connection: close` must be told
/// `Connection: close` and the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_follows_the_version_and_connection() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;

    // HTTP/1.0, no keep-alive: answered, then closed.
    let (reply, closed) = one_answer(&gw, b"GET /api/a HTTP/1.0\r\nHost: gw\r\n\r\n").await;
    assert_eq!(
        (reply.status, reply.body()),
        (200, "GET /a 0".into()),
        "{reply}"
    );
    closed.unwrap_or_else(|e| panic!("HTTP/1.0 without keep-alive: {e}"));

    // HTTP/1.0 with keep-alive: delimited, kept, the next request served.
    let mut client = Client::connect(&gw).await;
    client
        .send("GET /api/b HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let reply = client.answer(true).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.field("content-length"), Some("8"), "{reply}");
    assert!(reply.connection("keep-alive"), "{reply}");
    assert!(!reply.connection("close"), "{reply}");
    assert_eq!(reply.body(), "GET /b 0");
    client.send("GET /api/c HTTP/1.0\r\nHost: gw\r\n\r\n").await;
    let reply = client.answer(true).await;
    assert_eq!(
        (reply.status, reply.body()),
        (200, "GET /c 0".into()),
        "{reply}"
    );
    client
        .closed()
        .await
        .unwrap_or_else(|e| panic!("the second HTTP/1.0 request had no keep-alive: {e}"));

    // HTTP/1.1 with Connection: close: said, and done.
    let (reply, closed) = one_answer(&gw, get("/api/d", "Connection: close\r\n").as_bytes()).await;
    assert_eq!(
        (reply.status, reply.body()),
        (200, "GET /d 0".into()),
        "{reply}"
    );
    assert!(reply.connection("close"), "{reply}");
    closed.unwrap_or_else(|e| panic!("HTTP/1.1 with Connection: close: {e}"));

    assert_eq!(up.lines(), ["GET /a", "GET /b", "GET /c", "GET /d"]);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Request bodies.

/// A client sends a `POST` with `Expect: 100-continue` and holds its body back until told
/// to send it. On a route that forwards it, the gateway must send `100 Continue` first,
/// then the final answer once the body came, and the upstream must get the whole body.
/// To a path no route matches, the client must get the `404` at once, with no
/// `100 Continue` before it (nothing will read the body), and the upstream nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_only_when_the_body_is_wanted() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let head = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
        )
    };

    let mut client = Client::connect(&gw).await;
    client.send(head("/api/upload")).await;
    let interim = client.answer(true).await;
    assert_eq!(interim.status, 100, "the body is waited for: {interim}");
    assert!(
        interim.head.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    client.send("hello world").await;
    let reply = client.answer(true).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body(), "POST /upload 11");
    assert_eq!(up.requests()[0].body, b"hello world");

    let mut client = Client::connect(&gw).await;
    client.send(head("/nowhere")).await;
    let reply = client.answer(true).await;
    assert_eq!(reply.status, 404, "no 100 Continue first: {reply}");
    assert_eq!(up.lines(), ["POST /upload"]);
    gw.shutdown().await;
}

/// A client sends a chunked request body cut into pieces of a few bytes (chunk sizes,
/// an extension, data and CRLFs split anywhere), each written and flushed on its own.
/// The upstream must get the whole body, decoded, and the client its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_in_small_pieces_arrives_whole() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let mut client = Client::connect(&gw).await;
    client
        .send("POST /api/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await;
    let body = b"5;name=value\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\n";
    let mut rest = &body[..];
    let mut size = 1;
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(size.min(rest.len()));
        client.send(piece).await;
        tokio::task::yield_now().await;
        rest = after;
        size = size % 3 + 1;
    }
    let reply = client.answer(true).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body(), "POST /upload 21");
    assert_eq!(up.requests()[0].body, b"hello world0123456789");
    gw.shutdown().await;
}

/// A client sends a malformed chunked body: a size that is not hexadecimal, data longer
/// than its size, a size that overflows. The request must fail with the gateway's answer
/// for a client body error (`400`), the connection closed, and it must not count against
/// the upstream (no failure recorded for its endpoint; counted as the client's
/// `bad_body`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_400_and_not_an_upstream_failure() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let bodies = [
        "zz\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\nZZ\r\n",
        "5\r\nhelloXX\r\n0\r\n\r\n",
        "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    ];
    for body in bodies {
        let raw = format!(
            "POST /api/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let (reply, closed) = one_answer(&gw, raw.as_bytes()).await;
        assert_eq!(reply.status, 400, "{body:?}: {reply}");
        closed.unwrap_or_else(|e| panic!("{body:?}: {e}"));
    }
    settled(&gw, bodies.len() as u64).await;
    let e = endpoint(&gw);
    assert_eq!(e.failures, 0, "{e:?}");
    let r = route(&gw);
    assert_eq!(
        r.upstream_errors.bad_gateway + r.upstream_errors.timeout,
        0,
        "{:?}",
        r.upstream_errors
    );
    assert_eq!(
        r.client_errors.bad_body,
        bodies.len() as u64,
        "{:?}",
        r.client_errors
    );
    // No broken body reached the upstream as a whole one.
    assert!(
        up.requests().is_empty(),
        "a malformed body was forwarded as complete: {:?}",
        up.requests()
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Clients that go, or go quiet.

/// A client sends a request and disconnects while the upstream is still working on the
/// answer (held until released). The gateway must drop the upstream exchange: the
/// upstream sees its connection closed while it holds the answer, and the endpoint has
/// nothing outstanding after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_request_cancels_the_upstream_exchange() {
    let up = Upstream::holding().await;
    let gw = gateway(&up, "").await;
    let mut client = Client::connect(&gw).await;
    client.send(get("/api/held", "")).await;
    up.wait_for_requests(1).await;
    drop(client);
    up.wait_for_abandoned(1).await;
    settled(&gw, 1).await;
    assert_eq!(up.lines(), ["GET /held"]);
    gw.shutdown().await;
}

/// With the clock paused: the connection is still open 9 s on and closed by 11 s on
/// (the gateway's 10 s head timeout), with at most a `408` sent. Resumes the clock.
async fn open_at_9_s_closed_by_11_s(client: &mut Client, case: &str) {
    let start = Instant::now();
    let mut byte = [0u8; 1];
    if let Ok(read) = timeout(Duration::from_secs(9), client.stream.read(&mut byte)).await {
        panic!(
            "{case}: the connection ended ({read:?}, {:?}) {:?} on, before the 10 s head timeout",
            String::from_utf8_lossy(&byte),
            start.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::resume();
    // Real time again: the gateway's timer has fired by now, the close is on its way.
    let mut rest = Vec::new();
    let read = timeout(BOUND, client.stream.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(read.is_ok(), "{case}: still open 11 s on (sent {rest:?})");
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408 "),
        "{case}: sent {rest:?} at the head timeout"
    );
}

/// A client opens a connection, sends half a request head and then nothing (slowloris).
/// The gateway must disconnect it at the header read timeout (10 s), not before, not
/// much after; the upstream is never called. Paused time: the runtime jumps ahead when
/// it has nothing to do.
#[tokio::test]
async fn a_half_sent_head_is_cut_at_the_header_read_timeout() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let mut client = Client::connect(&gw).await;
    client.send("GET /api/x HTTP/1.1\r\nHost: g").await;
    // Let the gateway accept the connection and read what came before the clock stops.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    tokio::time::pause();
    open_at_9_s_closed_by_11_s(&mut client, "half a head").await;
    up.assert_untouched("half a head");
    gw.shutdown().await;
}

/// A client keeps a connection open after one answered request and sends nothing more.
/// The gateway must close the idle connection at the header read timeout (10 s after the
/// answer), not before. Paused time, once the request is answered.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_header_read_timeout() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let mut client = Client::connect(&gw).await;
    client.send(get("/api/x", "")).await;
    let reply = client.answer(true).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(!reply.connection("close"), "{reply}");
    tokio::time::pause();
    open_at_9_s_closed_by_11_s(&mut client, "idle after an answer").await;
    assert_eq!(up.lines(), ["GET /x"]);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Answers toward the client.

/// The upstream answers with a chunked body of unknown length. An HTTP/1.1 client must
/// get it chunked (no `Content-Length`), whole once decoded, and its connection kept for
/// the next request. An HTTP/1.0 client, which knows no chunked coding, must get it
/// delimited by the close: no `Transfer-Encoding`, no `Content-Length`, the bytes as they
/// are, then the close, even if it asked for keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_unknown_length_is_chunked_for_http_1_1_and_closed_for_http_1_0() {
    let up = Upstream::start(varied).await;
    let gw = gateway(&up, "").await;

    let mut client = Client::connect(&gw).await;
    client.send(get("/api/chunked", "")).await;
    let reply = client.answer(true).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(reply.chunked(), "{reply}");
    assert_eq!(reply.field("content-length"), None, "{reply}");
    assert_eq!(reply.body(), "hello world");
    client.send(get("/api/next", "Connection: close\r\n")).await;
    let reply = client.answer(true).await;
    assert_eq!(
        (reply.status, reply.body()),
        (200, "GET /next 0".into()),
        "{reply}"
    );

    for extra in ["", "Connection: keep-alive\r\n"] {
        let raw = format!("GET /api/chunked HTTP/1.0\r\nHost: gw\r\n{extra}\r\n");
        let (reply, closed) = one_answer(&gw, raw.as_bytes()).await;
        assert_eq!(reply.status, 200, "{extra:?}: {reply}");
        assert_eq!(reply.field("transfer-encoding"), None, "{extra:?}: {reply}");
        assert_eq!(reply.field("content-length"), None, "{extra:?}: {reply}");
        assert_eq!(reply.body(), "hello world", "{extra:?}");
        closed.unwrap_or_else(|e| panic!("{extra:?}: {e}"));
    }
    assert_eq!(
        up.lines(),
        ["GET /chunked", "GET /next", "GET /chunked", "GET /chunked"]
    );
    gw.shutdown().await;
}

/// A client sends `HEAD`; the upstream answers with `Content-Length: 1234` and no body.
/// The client must get that `Content-Length` and not one body byte: the next request on
/// the same connection is answered from the first byte after the `HEAD` answer's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_keep_the_length_and_send_no_body() {
    let up = Upstream::start(varied).await;
    let gw = gateway(&up, "").await;
    let mut client = Client::connect(&gw).await;
    client
        .send("HEAD /api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    let reply = client.answer(false).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.field("content-length"), Some("1234"), "{reply}");
    assert_eq!(reply.field("x-up"), Some("head"), "{reply}");
    assert!(!reply.chunked(), "{reply}");
    client
        .send(get("/api/after", "Connection: close\r\n"))
        .await;
    let reply = client.answer(true).await;
    assert_eq!(
        (reply.status, reply.body()),
        (200, "GET /after 0".into()),
        "{reply}"
    );
    client.closed().await.unwrap();
    assert_eq!(up.lines(), ["HEAD /x", "GET /after"]);
    gw.shutdown().await;
}

/// The upstream answers `204` (plain, or with a stray `Content-Length: 0`). The client
/// must get `204` with no body and neither `Content-Length` nor `Transfer-Encoding`
/// (RFC 9110 §8.6, RFC 9112 §6.1), and the next request on the connection served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_answers_have_no_body_and_no_framing_fields() {
    let up = Upstream::start(varied).await;
    let gw = gateway(&up, "").await;
    for path in ["/api/no-content", "/api/no-content-0"] {
        let mut client = Client::connect(&gw).await;
        client.send(get(path, "")).await;
        let reply = client.answer(true).await;
        assert_eq!(reply.status, 204, "{path}: {reply}");
        assert_eq!(reply.field("x-up"), Some("204"), "{path}: {reply}");
        assert_eq!(reply.field("content-length"), None, "{path}: {reply}");
        assert_eq!(reply.field("transfer-encoding"), None, "{path}: {reply}");
        client
            .send(get("/api/after", "Connection: close\r\n"))
            .await;
        let reply = client.answer(true).await;
        assert_eq!(
            (reply.status, reply.body()),
            (200, "GET /after 0".into()),
            "{path}: {reply}"
        );
    }
    gw.shutdown().await;
}

/// Every answer a client gets carries one valid `Date` (RFC 9110 §6.6.1: an origin with
/// a clock must send it; the upstreams here send none): proxied ones, chunked, to
/// `HEAD`, `204`, to HTTP/1.0, and the gateway's own `404`, `400`, `431` and `501`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_has_a_date() {
    let up = Upstream::start(varied).await;
    let gw = gateway(&up, "").await;
    let close = "Connection: close\r\n";
    let many: String = (0..100).map(|i| format!("x-f-{i}: {i}\r\n")).collect();
    for (case, raw, body_allowed) in [
        ("200", get("/api/x", close), true),
        ("chunked", get("/api/chunked", close), true),
        (
            "HEAD",
            format!("HEAD /api/x HTTP/1.1\r\nHost: gw\r\n{close}\r\n"),
            false,
        ),
        ("204", get("/api/no-content", close), true),
        (
            "HTTP/1.0",
            "GET /api/chunked HTTP/1.0\r\nHost: gw\r\n\r\n".to_owned(),
            true,
        ),
        ("404", get("/nowhere", close), true),
        ("400", "GET /api/x HTTP/1.1\r\n\r\n".to_owned(), true),
        ("431", get("/api/x", &many), true),
        (
            "501",
            "POST /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
                .to_owned(),
            true,
        ),
    ] {
        let mut client = Client::connect(&gw).await;
        client.send(&raw).await;
        let reply = client.answer(body_allowed).await;
        assert_eq!(reply.count("date"), 1, "{case}: {reply}");
        let date = reply.field("date").unwrap();
        assert!(
            httpdate::parse_http_date(date).is_ok(),
            "{case}: Date {date:?}"
        );
    }
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Shutdown.

/// A client's request is in flight (the upstream holds the answer) when the gateway
/// starts a graceful shutdown (`GatewayHandle::shutdown`). The gateway must stop
/// accepting connections, still deliver that answer whole, then close the connection
/// (not wait for another request on it), and the shutdown must then complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_request_in_flight_then_closes() {
    let up = Upstream::holding().await;
    let gw = gateway(&up, "").await;
    let addr = gw.local_addr();
    let mut client = Client::connect(&gw).await;
    client.send(get("/api/held", "")).await;
    up.wait_for_requests(1).await;

    let shutdown = tokio::spawn(gw.shutdown());
    // The shutdown has begun once the listener is gone.
    timeout(BOUND, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("still accepting connections after shutdown()");
    assert!(
        !shutdown.is_finished(),
        "the shutdown did not wait for the request"
    );

    up.release();
    let reply = client.answer(true).await;
    assert_eq!(
        (reply.status, reply.body()),
        (200, "GET /held 0".into()),
        "{reply}"
    );
    client
        .closed()
        .await
        .unwrap_or_else(|e| panic!("after the answer in flight: {e}"));
    timeout(BOUND, shutdown)
        .await
        .expect("the shutdown did not complete")
        .unwrap();
    assert_eq!(up.lines(), ["GET /held"]);
}

/// A client asks for a large answer and then reads nothing; the upstream streams it
/// chunked in chunks of 1 000 bytes (as many servers stream: every `write` of a handler
/// one chunk). The gateway must stop reading the upstream once it has some `WRITE_AHEAD`
/// (64 KiB) queued for the client, as it does for large frames: the upstream's writes
/// then block on full socket buffers, a few MiB in. Every frame of at most
/// `COPY_AT_MOST` (1 KiB) was copied into the outbox's own buffer, which
/// `Outbox::queued` did not count, so the client's stalled connection made the gateway
/// read and buffer the whole upstream answer in memory (here 160 MiB, and as much as the
/// upstream sent within `send_timeout`, 60 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_nothing_does_not_make_the_gateway_buffer_a_small_chunked_answer() {
    const TOTAL: usize = 160 << 20;
    const BOUNDED: usize = 48 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let sent = written.clone();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        if read_request(&mut stream, &mut buf).await.is_none() {
            return;
        }
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head).await.is_err() {
            return;
        }
        // 64 chunks of 1 000 bytes a write.
        let mut batch = Vec::new();
        for _ in 0..64 {
            batch.extend_from_slice(b"3e8\r\n");
            batch.extend_from_slice(&[b'x'; 1000]);
            batch.extend_from_slice(b"\r\n");
        }
        while sent.load(SeqCst) < TOTAL {
            if stream.write_all(&batch).await.is_err() {
                return;
            }
            sent.fetch_add(64 * 1000, SeqCst);
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        // Held open: the gateway's connection must not end for want of an upstream.
        std::future::pending::<()>().await;
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"60s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
    ))
    .await;
    let mut client = Client::connect(&gw).await;
    client.send(get("/api/large", "")).await;
    // The client reads nothing from here on. Wait until the upstream's writes block (its
    // count stands still for 2 s) or it has sent everything.
    let start = Instant::now();
    let (mut last, mut still_since) = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = written.load(SeqCst);
        if now >= TOTAL || start.elapsed() > Duration::from_secs(40) {
            break;
        }
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
    }
    let now = written.load(SeqCst);
    assert!(
        now < BOUNDED,
        "the upstream wrote {} MiB of its answer to a client that read nothing \
         (the gateway holds it in memory); backpressure should stop it within a few MiB",
        now >> 20
    );
    drop(client);
    gw.shutdown().await;
}

/// A request whose path the gateway refuses (`400`: an encoded `/`, `..` above the root,
/// an invalid escape, a control byte: the path-traversal probes a scanner sends) is
/// counted somewhere in `/status.json` (`refused`: "request heads refused before any
/// route saw them", or a route's or the unmatched figures), as every framing refusal
/// is. Before, it was answered and counted nowhere: a scanner walking
/// `..%2f..%2fetc/passwd` through the gateway left `/metrics` untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_refusals_are_counted_in_the_status() {
    let up = Upstream::start(echo).await;
    let gw = gateway(&up, "").await;
    let targets = [
        "/api/..%2f..%2fetc/passwd",
        "/api/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/../../etc/passwd",
        "/api/%zz",
        "/api/a%00b",
    ];
    for target in targets {
        let raw = get(target, "Connection: close\r\n");
        let (reply, _) = one_answer(&gw, raw.as_bytes()).await;
        assert_eq!(reply.status, 400, "{target}: {reply}");
    }
    up.assert_untouched("refused paths");
    let status = gw.gateway().status();
    let counted =
        status.refused + status.unmatched + status.routes.iter().map(|r| r.requests).sum::<u64>();
    assert_eq!(
        counted,
        targets.len() as u64,
        "{} requests answered 400, counted: refused {}, unmatched {}, routes {:?}",
        targets.len(),
        status.refused,
        status.unmatched,
        status.routes.iter().map(|r| r.requests).collect::<Vec<_>>()
    );
    gw.shutdown().await;
}

/// An answer to an HTTP/1.0 client is delimited by the close when its length is unknown
/// (an upstream's chunked answer): the close is then the only sign that it is whole. An
/// upstream that fails part-way (here: one chunk, then it closes without the last chunk)
/// must not make the gateway end the client's connection as it ends a whole answer,
/// or the client (a cache, `ab`, `curl --http1.0`) takes the part for the whole. A
/// chunked answer to an HTTP/1.1 client cut the same way lacks its last chunk, which the
/// client sees; an HTTP/1.0 client needs the connection reset instead of closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_upstream_is_not_a_clean_close_for_an_http_1_0_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = read_request(&mut stream, &mut buf).await;
                // A chunk of the answer, then the upstream goes, the last chunk unsent.
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         strip_prefix = true\ntimeout = \"5s\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr}\"]\n"
    ))
    .await;
    let mut client = TcpStream::connect(gw.local_addr()).await.unwrap();
    client
        .write_all(b"GET /api/x HTTP/1.0\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let ended = timeout(BOUND, client.read_to_end(&mut answer))
        .await
        .expect("the gateway ended the connection in time");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 200") && !answer.contains("transfer-encoding"),
        "framed by the close: {answer:?}"
    );
    assert!(
        ended.is_err(),
        "the answer was cut upstream, yet its connection ended as a whole answer's \
         does (a clean close): the HTTP/1.0 client takes {answer:?} for all of it"
    );
    gw.shutdown().await;
}
