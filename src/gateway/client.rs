//! The client's side of a proxied exchange, and what must never be blamed on the upstream.
//!
//! - [`ClientBody`] wraps the request body read from the client: it enforces
//!   `max_request_body` on streamed bodies, marks every error it yields as a
//!   [`ClientBodyError`], and tells whether the exchange is waiting on the client;
//! - [`UpstreamClassifier`] is the balancer's classifier: errors caused by the client's
//!   body (found through the error's `source()` chain: the upstream client reports a
//!   failed request body as an error whose source is the body's own error) and timeouts
//!   spent waiting on the client's body are [`Outcome::Ignored`], so that neither the
//!   endpoint's breaker nor outlier detection ever sees them; upstream timeouts and
//!   transport errors are failures;
//! - [`SendTimeout`] bounds each blocked write to the client's socket, and closes it
//!   with a lingering close: see [`SendTimeout`]'s `Drop`.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::pool::{PooledBody, UpstreamError};
use crate::BoxError;
use crate::circuit_breaker::{Classify, HttpClassifier, Outcome, Recorder};
use crate::grpc::{GrpcClassifier, GrpcCode};

/// Why the client's request body failed: the client's fault, never the upstream's.
#[derive(Debug)]
pub(crate) enum ClientBodyError {
    /// The body could not be read: malformed chunked encoding, or the client closed its
    /// connection part-way (or whatever error the server's body type reports).
    Read(BoxError),
    /// The body grew past the route's `max_request_body` (the limit).
    TooLarge(u64),
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => write!(f, "reading the client's request body: {e}"),
            Self::TooLarge(limit) => write!(f, "the request body is larger than {limit} bytes"),
        }
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read(e) => Some(e.as_ref()),
            Self::TooLarge(_) => None,
        }
    }
}

/// The body has ended (read to its end, or failed).
const DONE: u8 = 1;
/// The last poll of the body found nothing from the client: the exchange waits on it.
const WAITING: u8 = 2;
/// The body failed: it could not be read.
const FAILED: u8 = 4;
/// The body failed: it grew past the limit.
const TOO_LARGE: u8 = 8;

/// What a [`ClientBody`] tells the upstream call about itself, shared with it. Made only
/// for bodies that are not empty from the start: a `GET` costs no allocation.
#[derive(Debug, Default)]
pub(crate) struct BodyState {
    flags: AtomicU8,
    /// The body's limit, for [`ClientBodyError::TooLarge`].
    limit: u64,
}

impl BodyState {
    /// Whether the exchange is stalled on the client: its body is not over and the last
    /// attempt to read more of it found nothing.
    pub(crate) fn waiting_on_client(&self) -> bool {
        self.flags.load(Relaxed) & (DONE | WAITING) == WAITING
    }

    /// Whether the client's body is over (ended, failed or cut).
    pub(crate) fn is_done(&self) -> bool {
        self.flags.load(Relaxed) & DONE != 0
    }

    /// How the client's body failed, if it did: for an exchange whose own error does not
    /// carry it (hyper's HTTP/2 client resets the stream on a body error and reports only
    /// the reset), so that the client's fault is never taken for the upstream's.
    pub(crate) fn failure(&self) -> Option<ClientBodyError> {
        let flags = self.flags.load(Relaxed);
        if flags & TOO_LARGE != 0 {
            Some(ClientBodyError::TooLarge(self.limit))
        } else if flags & FAILED != 0 {
            Some(ClientBodyError::Read(
                "the client's request body failed".into(),
            ))
        } else {
            None
        }
    }
}

pin_project_lite::pin_project! {
    /// The client's request body, as forwarded upstream: bounded by `max_request_body`,
    /// its errors marked as [`ClientBodyError`]s. Any body type: the HTTP/1 server's or
    /// hyper's HTTP/2 one when the gateway serves, or the body of the server it is a
    /// service of.
    pub(crate) struct ClientBody<B> {
        #[pin]
        body: B,
        // Bytes still allowed; `u64::MAX` without a limit.
        left: u64,
        // The configured limit, for the error.
        limit: u64,
        state: Option<Arc<BodyState>>,
    }
}

impl<B: HttpBody> ClientBody<B> {
    /// Wraps `body` with a limit of `limit` bytes (`0`: none). Returns the body, or
    /// `Err(body)` when its declared length is over the limit already, and the state to
    /// share with the upstream call (`None` for an empty body).
    #[allow(clippy::result_large_err)]
    pub(crate) fn new(body: B, limit: u64) -> Result<(Self, Option<Arc<BodyState>>), B> {
        let left = if limit == 0 { u64::MAX } else { limit };
        if body.size_hint().lower() > left {
            return Err(body);
        }
        let state = (!body.is_end_stream()).then(|| {
            Arc::new(BodyState {
                flags: AtomicU8::new(0),
                limit,
            })
        });
        let wrapped = Self {
            body,
            left,
            limit,
            state: state.clone(),
        };
        Ok((wrapped, state))
    }
}

fn set(state: &Option<Arc<BodyState>>, flag: u8, on: bool) {
    if let Some(state) = state {
        if on {
            state.flags.fetch_or(flag, Relaxed);
        } else {
            state.flags.fetch_and(!flag, Relaxed);
        }
    }
}

impl<B> HttpBody for ClientBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = match this.body.as_mut().poll_frame(cx) {
            Poll::Pending => {
                set(this.state, WAITING, true);
                return Poll::Pending;
            }
            Poll::Ready(frame) => frame,
        };
        set(this.state, WAITING, false);
        match frame {
            None => {
                set(this.state, DONE, true);
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                set(this.state, DONE | FAILED, true);
                Poll::Ready(Some(Err(Box::new(ClientBodyError::Read(e.into())))))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.left {
                        set(this.state, DONE | TOO_LARGE, true);
                        #[cfg(feature = "tracing")]
                        tracing::debug!(
                            target: "seawall::gateway",
                            limit = *this.limit,
                            "request body over max_request_body: cut"
                        );
                        return Poll::Ready(Some(Err(Box::new(ClientBodyError::TooLarge(
                            *this.limit,
                        )))));
                    }
                    *this.left -= len;
                }
                let mut frame = frame;
                if let Some(trailers) = frame.trailers_mut() {
                    super::headers::sanitize_request_trailers(trailers);
                }
                if this.body.is_end_stream() {
                    set(this.state, DONE, true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request the client is to blame for, and how it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// A malformed or truncated body: `400` (if the client is still there to read it).
    BadBody,
    /// The route timeout passed while waiting on the client's body: `408`.
    BodyTimeout,
    /// A body over `max_request_body`: `413`.
    TooLarge,
    /// A header line over `max_header_line`: `431`.
    HeaderTooLong,
    /// A gRPC call's own deadline passed: `504`, `DEADLINE_EXCEEDED` to the caller.
    Deadline,
}

impl ClientFault {
    /// The client's fault in the upstream call's error, if any.
    pub(crate) fn of(error: &BoxError) -> Option<Self> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
        while let Some(e) = current {
            if let Some(e) = e.downcast_ref::<ClientBodyError>() {
                return Some(match e {
                    ClientBodyError::Read(_) => Self::BadBody,
                    ClientBodyError::TooLarge(_) => Self::TooLarge,
                });
            }
            match e.downcast_ref::<UpstreamError>() {
                Some(UpstreamError::ClientBodyTimeout) => return Some(Self::BodyTimeout),
                Some(UpstreamError::CallerDeadline) => return Some(Self::Deadline),
                _ => {}
            }
            current = e.source();
        }
        None
    }
}

/// The gateway balancer's classifier: [`HttpClassifier`] on responses (5xx are
/// failures); every upstream error a failure (refused or timed-out connections, resets,
/// malformed answers, the route timeout before the response head) except those the
/// client caused, and an HTTP/2 upstream's refusals that are no ill health of its (a
/// stream it did not process, a connection ended with `ENHANCE_YOUR_CALM`: see
/// [`H2Refusal`](super::pool::H2Refusal)), which are [`Outcome::Ignored`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UpstreamClassifier(pub(crate) HttpClassifier);

impl Classify<Response<PooledBody>, UpstreamError> for UpstreamClassifier {
    #[inline]
    fn classify(&self, result: Result<&Response<PooledBody>, &UpstreamError>) -> Outcome {
        match result {
            // A gRPC answer in one head (trailers-only): its `grpc-status` decides. An
            // answer whose head had neither a gRPC type nor a `grpc-status` (most) is
            // not looked up.
            Ok(response)
                if response.status() == http::StatusCode::OK
                    && response.body().head_facts().grpc() =>
            {
                match GrpcCode::from_headers(response.headers()) {
                    // Past the caller's own deadline (`grpc-timeout`): the caller's.
                    Some(GrpcCode::DeadlineExceeded)
                        if response
                            .extensions()
                            .get::<super::grpc::CallersDeadline>()
                            .is_some() =>
                    {
                        Outcome::Ignored
                    }
                    Some(code) => GrpcClassifier::new().classify_code(code),
                    None => Outcome::Success,
                }
            }
            Ok(response) => self.0.classify_status(response.status()),
            Err(e) if e.is_client_fault() || e.is_refusal() => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        }
    }

    /// A gRPC answer whose status is in its trailers is recorded when its body ends
    /// (the route's response body takes the recorder from the response's extensions);
    /// any other, now.
    #[inline]
    fn record(&self, result: &mut Result<Response<PooledBody>, UpstreamError>, recorder: Recorder) {
        match result {
            Ok(response)
                if response.status() == http::StatusCode::OK
                    && response.body().head_facts().grpc()
                    && super::grpc::status_in_trailers(response.headers()) =>
            {
                response
                    .extensions_mut()
                    .insert(super::grpc::PendingOutcome::new(recorder));
            }
            _ => recorder.record(self.classify(result.as_ref())),
        }
    }
}

/// Whether a request's head is over the limits: a header line (`name: value`) longer
/// than `max_line` bytes, or the whole head (request line and header lines with their
/// line ends) larger than `max_total`. The HTTP/1 server bounds the raw head already;
/// this is the check for HTTP/2 and for the gateway as a service, and of each line: one
/// pass over the parsed headers, no allocation.
#[inline]
pub(crate) fn head_too_large<B>(request: &Request<B>, max_line: usize, max_total: usize) -> bool {
    let uri = request.uri();
    // `GET /path?query HTTP/1.1\r\n`; an absolute-form target with its scheme and host.
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len());
    let mut total = request.method().as_str().len() + 1 + target + 11 + 2;
    for (name, value) in request.headers() {
        let line = name.as_str().len() + 2 + value.len();
        if line > max_line {
            return true;
        }
        total += line + 2;
    }
    total > max_total
}

/// A client connection whose writes may stay blocked (the client reads nothing) for
/// `timeout` at most: past it, the write fails with [`io::ErrorKind::TimedOut`], which
/// ends the connection (and drops the response body, closing the upstream connection
/// that was streaming it). The timer is made the first time a write blocks, once per
/// connection, then reset each time one blocks again; any write that goes through
/// disarms it.
pub(crate) struct SendTimeout {
    io: TcpStream,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Counts the connections closed this way (the gateway's `send_timeouts`).
    fired: Arc<AtomicU64>,
    /// The server shut its side down (a closing answer, or a GOAWAY sent): the socket
    /// lingers when dropped. Never after the send timeout reset the connection.
    shut: bool,
    /// The send timeout reset the connection: it never lingers.
    reset: bool,
}

impl SendTimeout {
    pub(crate) fn new(io: TcpStream, timeout: Duration, fired: Arc<AtomicU64>) -> Self {
        Self {
            io,
            timeout,
            sleep: None,
            armed: false,
            fired,
            shut: false,
            reset: false,
        }
    }

    /// A write would block: arms the timer if it is not, and fails once it has fired.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let sleep = if self.armed {
            match &mut self.sleep {
                Some(sleep) => sleep,
                None => return Poll::Pending,
            }
        } else {
            self.armed = true;
            let deadline = tokio::time::Instant::now() + self.timeout;
            match &mut self.sleep {
                Some(sleep) => {
                    sleep.as_mut().reset(deadline);
                    sleep
                }
                None => self
                    .sleep
                    .insert(Box::pin(tokio::time::sleep_until(deadline))),
            }
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.fired.fetch_add(1, Relaxed);
        #[cfg(feature = "tracing")]
        tracing::debug!(
            target: "seawall::gateway",
            peer = ?self.io.peer_addr().ok(),
            timeout_ms = self.timeout.as_millis() as u64,
            "the client read nothing for send_timeout: connection closed"
        );
        // Reset rather than closed: the kernel drops what the client never read at once
        // instead of trying to deliver it for minutes. A zero linger never blocks.
        #[allow(deprecated)]
        let _ = self.io.set_linger(Some(Duration::ZERO));
        self.reset = true;
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for the send timeout",
        ))
    }

    /// A write's result: progress disarms the timer; a blocked write arms it.
    fn written(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match poll {
            Poll::Pending => self.blocked(cx).map(Err),
            Poll::Ready(Ok(0)) => poll,
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl AsyncRead for SendTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.written(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.written(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // Neither ever waits on a TCP socket: no timer.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        if matches!(poll, Poll::Ready(Ok(()))) && !this.reset {
            this.shut = true;
        }
        poll
    }
}

impl super::h1_server::Abort for SendTimeout {
    fn abort(&mut self) {
        // A zero linger never blocks; the connection does not linger either.
        #[allow(deprecated)]
        let _ = self.io.set_linger(Some(Duration::ZERO));
        self.reset = true;
    }
}

/// The longest a closed connection lingers, reading and discarding what the client
/// still sends (nginx's `lingering_time`).
const LINGER_TIME: Duration = Duration::from_secs(30);
/// A lingering connection is closed once the client has sent nothing for this long
/// (nginx's `lingering_timeout`).
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// A lingering close. Once the gateway has shut its side of a connection down (an
/// answer that closes the connection, such as a 413 to a body it will not read, or an
/// HTTP/2 `GOAWAY`), closing the socket while the client is still sending would make
/// the kernel answer the client's next bytes with a reset, and a client that is
/// writing then fails on its write before it reads the answer or the `GOAWAY` meant for
/// it. So, unless the client has already closed its side, the socket is kept open on a
/// task of its own that reads and discards until the client closes, is silent for
/// [`LINGER_IDLE`], or [`LINGER_TIME`] has passed, as nginx does.
impl Drop for SendTimeout {
    fn drop(&mut self) {
        if self.shut && !self.reset {
            linger(&self.io);
        }
    }
}

#[cfg(unix)]
fn linger(io: &TcpStream) {
    use std::os::fd::AsFd;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // The same socket under a second descriptor: it stays open once `io` is closed.
    let Ok(fd) = io.as_fd().try_clone_to_owned() else {
        return;
    };
    let socket = std::net::TcpStream::from(fd);
    match socket.peek(&mut [0; 1]) {
        // The client has closed its side: nothing can be reset.
        Ok(0) => return,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => return,
    }
    // Registered with this runtime's reactor: `try_current` found one, so this is
    // inside its context.
    let Ok(socket) = TcpStream::from_std(socket) else {
        return;
    };
    runtime.spawn(drain(socket));
}

#[cfg(not(unix))]
fn linger(_: &TcpStream) {}

/// Reads and discards until the client closes, goes quiet or the lingering time ends. The
/// buffer lives on the stack between waits, not in the task: a lingering connection holds
/// its socket and a small task, however many linger at once.
async fn drain(socket: TcpStream) {
    let give_up = tokio::time::Instant::now() + LINGER_TIME;
    loop {
        let deadline = give_up.min(tokio::time::Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(deadline, socket.readable()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        let mut buf = [0; 8192];
        // What is there now, within a bound, then back to waiting (and to the runtime's
        // other tasks): a client sending without pause does not hold the thread.
        for _ in 0..16 {
            match socket.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection pair on loopback: (client, server side wrapped as the gateway wraps
    /// it).
    async fn linger_pair() -> (TcpStream, SendTimeout) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        // Each write leaves at once (no Nagle delay, which runs on real time).
        client.set_nodelay(true).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let server = SendTimeout::new(server, Duration::from_secs(60), Arc::default());
        (client, server)
    }

    /// Whether the server side has closed the socket for good: a write gets a reset back,
    /// and the next write fails.
    async fn fully_closed(client: &mut TcpStream) -> bool {
        use tokio::io::AsyncWriteExt;
        for _ in 0..2 {
            if client.write_all(b"x").await.is_err() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_connection_ends_after_silence_or_at_the_lingering_time() {
        use tokio::io::AsyncWriteExt;
        // A client that goes quiet: closed LINGER_IDLE after its last bytes.
        let (mut client, mut server) = linger_pair().await;
        client
            .write_all(b"a body the server will not read")
            .await
            .unwrap();
        server.write_all(b"HTTP/1.1 413 \r\n\r\n").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        tokio::time::sleep(LINGER_IDLE - Duration::from_secs(1)).await;
        assert!(
            !fully_closed(&mut client).await,
            "closed before the idle time"
        );
        tokio::time::sleep(LINGER_IDLE + Duration::from_secs(1)).await;
        assert!(
            fully_closed(&mut client).await,
            "still open after the idle time"
        );

        // A client that keeps sending: closed at LINGER_TIME, not later.
        let (mut client, mut server) = linger_pair().await;
        client.write_all(b"more").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let start = tokio::time::Instant::now();
        while !fully_closed(&mut client).await {
            assert!(start.elapsed() <= LINGER_TIME + Duration::from_secs(1));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(start.elapsed() >= LINGER_TIME - Duration::from_secs(1));

        // A client that has closed its side: nothing lingers, no task is spawned; one
        // that has not: a task.
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let (mut client, mut server) = linger_pair().await;
        client.shutdown().await.unwrap();
        tokio::task::yield_now().await;
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(tasks(), 0);
        let (_client, mut server) = linger_pair().await;
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(tasks(), 1);
    }

    #[tokio::test]
    async fn a_lingering_connection_keeps_no_buffer_in_its_task() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let drain = drain(client);
        assert!(std::mem::size_of_val(&drain) < 1024);
    }

    #[test]
    fn heads_are_measured_line_by_line_and_whole() {
        let request = |value: &'static str| {
            Request::get("/abc")
                .header("x-a", http::HeaderValue::from_static(value))
                .body(())
                .unwrap()
        };
        // "x-a: 12345" is 10 bytes.
        assert!(!head_too_large(&request("12345"), 10, 1000));
        assert!(head_too_large(&request("12345"), 9, 1000));
        // "GET /abc HTTP/1.1\r\n" (19) + "x-a: 12345\r\n" (12) + "\r\n" (2).
        assert!(!head_too_large(&request("12345"), 10, 33));
        assert!(head_too_large(&request("12345"), 10, 32));
    }

    #[test]
    fn body_state_waits_on_the_client_only_while_the_body_is_open() {
        let s = BodyState::default();
        assert!(!s.waiting_on_client());
        s.flags.fetch_or(WAITING, Relaxed);
        assert!(s.waiting_on_client());
        s.flags.fetch_or(DONE, Relaxed);
        assert!(!s.waiting_on_client());
        assert!(s.failure().is_none());
        s.flags.fetch_or(FAILED, Relaxed);
        assert!(matches!(s.failure(), Some(ClientBodyError::Read(_))));
    }

    #[test]
    fn client_faults_are_found_through_the_source_chain() {
        let e: BoxError = Box::new(UpstreamError::ClientBodyTimeout);
        assert_eq!(ClientFault::of(&e), Some(ClientFault::BodyTimeout));
        let e: BoxError = Box::new(ClientBodyError::TooLarge(10));
        assert_eq!(ClientFault::of(&e), Some(ClientFault::TooLarge));
        let e: BoxError = Box::new(UpstreamError::Timeout);
        assert_eq!(ClientFault::of(&e), None);
    }
}
