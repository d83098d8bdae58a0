//! HTTP/1.1 to the clients, spoken by the gateway itself.
//!
//! hyper's server connection reads each request head into a new buffer (its read-ahead,
//! which notices a client gone, cannot reuse the one the head still points into), boxes
//! a timer for every head it waits for, and hands a request body over through a channel.
//! Here a connection keeps one read buffer and one write buffer for all its requests,
//! each request's header map is the emptied map of the response before it, the head
//! timer is one sleep per connection, re-armed once in seconds, and a body-less request
//! (nearly all of them) allocates nothing of its own.
//!
//! Every request head is checked before anything is routed, as strictly as nginx does,
//! and refused with the connection closed after the answer:
//!
//! - `431`: a head larger than `max_headers_size` or with more than [`MAX_HEADERS`]
//!   fields;
//! - `400`: an invalid request line, name or value, obsolete line folding, an HTTP/1.1
//!   request without exactly one `Host`, `Content-Length` with `Transfer-Encoding`,
//!   differing or malformed `Content-Length` values, `Transfer-Encoding` in an HTTP/1.0
//!   request or with `chunked` not last (or twice) (RFC 9112 §6.1, §6.3: the framings
//!   request smuggling plays one proxy against another with);
//! - `501`: a transfer coding other than `chunked` alone, which the gateway cannot
//!   decode, and `CONNECT` (the gateway makes no tunnels; nginx refuses it too);
//! - `505`: a version other than HTTP/1.0 and HTTP/1.1.
//!
//! A request body is `Content-Length` bytes or chunked (RFC 9112 §7.1, decoded strictly:
//! [`ChunkedDecoder`]); it is read as the route reads it, with `100 Continue` sent first
//! when the client asked for it, and the route may answer before it ends. A client that
//! closes its side while its request is served cancels the request (a request body cut
//! short fails as the client's fault instead). A body left unread when the answer is done
//! is skipped if it is already here, and otherwise the connection is closed.
//!
//! Answers are framed by their body: `Content-Length` when its length is known, `chunked`
//! otherwise (read to the close for an HTTP/1.0 client), nothing for `HEAD`, `1xx`,
//! `204` and `304`; every answer gets a `Date`. Requests on a connection are served one
//! after the other, pipelined ones too, and keep-alive follows RFC 9112 §9.3 (HTTP/1.1
//! unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`). A client has
//! 10 s (the gateway's head timeout) to send each head, idle time included.

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::body::Body;
use super::h1::{
    Chunk, ChunkedDecoder, MAX_HEADERS, READ_CHUNK, Role, append_length, canonical_length,
    connection_options, content_length, field_name, tokens,
};

/// A request head the gateway refuses: the status it answers with, then it closes the
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    status: StatusCode,
    reason: &'static str,
}

impl RequestError {
    const fn new(status: StatusCode, reason: &'static str) -> Self {
        Self { status, reason }
    }

    const fn bad(reason: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }

    /// The status answered.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What was wrong, in a few words.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused request ({}): {}", self.status, self.reason)
    }
}

impl std::error::Error for RequestError {}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBodyFraming {
    /// No body.
    None,
    /// `Content-Length` bytes (more than zero).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The request target, as sent.
    pub uri: Uri,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The header fields, as sent, but for a `Connection` field of `close` or
    /// `keep-alive` options only (read into `keep_alive`, and meaning nothing past this
    /// hop); their values share the connection's buffer.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub body: RequestBodyFraming,
    /// Whether the client allows another request on the connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1).
    pub expect_continue: bool,
}

/// Where a header field's name and value are in the head: offsets and lengths.
type Span = [u32; 4];

/// Parses a request head off the front of `buf`: `Ok(None)` while it is incomplete.
/// `max_head`: the largest head accepted (`431` past it).
pub fn parse_request(
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<RequestHead>, RequestError> {
    parse_request_into(buf, max_head, &mut None)
}

/// [`parse_request`], the fields put in `spare` (emptied) if there is one.
fn parse_request_into(
    buf: &mut BytesMut,
    max_head: usize,
    spare: &mut Option<HeaderMap>,
) -> Result<Option<RequestHead>, RequestError> {
    const TOO_LARGE: RequestError = RequestError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request head too large",
    );
    #[cfg(test)]
    tests::PARSES.with(|n| n.set(n.get() + 1));
    let mut spans = super::h1::Spans::<Span>::new();
    let (len, method, target, minor) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut request,
            buf,
            &mut slots,
        );
        match parsed {
            Ok(httparse::Status::Complete(len)) => {
                if len > max_head {
                    return Err(TOO_LARGE);
                }
                let base = buf.as_ptr() as usize;
                let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
                let slots = spans.slots(request.headers.len());
                for (span, field) in slots.iter_mut().zip(request.headers.iter()) {
                    *span = [
                        offset(field.name.as_bytes()),
                        field.name.len() as u32,
                        offset(field.value),
                        field.value.len() as u32,
                    ];
                }
                let method = request.method.unwrap_or_default();
                let method = Method::from_bytes(method.as_bytes())
                    .map_err(|_| RequestError::bad("invalid method"))?;
                if method == Method::CONNECT {
                    // A tunnel, which the gateway does not make: proxied, its 2xx would
                    // make the client take the connection for a tunnel (RFC 9112 §6.3).
                    return Err(RequestError::new(
                        StatusCode::NOT_IMPLEMENTED,
                        "CONNECT is not supported",
                    ));
                }
                let target = request.path.unwrap_or_default();
                let target = [offset(target.as_bytes()), target.len() as u32];
                (len, method, target, request.version.unwrap_or(1))
            }
            Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(TOO_LARGE),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(RequestError::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many header fields",
                ));
            }
            Err(httparse::Error::Version) if names_another_version(buf) => {
                return Err(RequestError::new(
                    StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                    "not HTTP/1.x",
                ));
            }
            Err(e) => {
                return Err(RequestError::bad(
                    super::h1::ProtocolError::from(e).reason(),
                ));
            }
        }
    };
    let head = buf.split_to(len).freeze();
    let [target_at, target_len] = target.map(|n| n as usize);
    let uri = Uri::from_maybe_shared(head.slice(target_at..target_at + target_len))
        .map_err(|_| RequestError::bad("invalid request target"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = spare.take().unwrap_or_default();
    // The last answer's map was emptied when it was written.
    if !headers.is_empty() {
        headers.clear();
    }
    let spans = spans.as_slice();
    headers.reserve(spans.len());
    head_of(headers, &head, spans, method, uri, version).map(Some)
}

/// Whether a request line httparse refused for its version names another version of
/// HTTP (`HTTP/2.0`, `HTTP/1.2`) rather than being malformed (`GET /a b HTTP/1.1`,
/// `HTTP/1.1 x`). Read only up to the byte httparse stopped at, so the answer does not
/// depend on how much of the line has come.
fn names_another_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(version) = line.split(|&b| b == b' ').nth(2) else {
        return false;
    };
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, rest @ ..] if major.is_ascii_digit() => {
            *major != b'1'
                || matches!(rest, [b'.', minor, ..] if minor.is_ascii_digit() && *minor > b'1')
        }
        _ => false,
    }
}

/// The [`RequestHead`] of a complete head whose fields are at `spans`.
fn head_of(
    mut headers: HeaderMap,
    head: &Bytes,
    spans: &[Span],
    method: Method,
    uri: Uri,
    version: Version,
) -> Result<RequestHead, RequestError> {
    let mut length: Option<u64> = None;
    let (mut transfer_encoding, mut codings, mut chunked_last) = (false, 0usize, false);
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    let mut hosts = 0usize;
    for &[name_at, name_len, value_at, value_len] in spans {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let (name_end, value_end) = (name_at + name_len as usize, value_at + value_len as usize);
        let (name, role) = field_name(&head[name_at..name_end])
            .map_err(|_| RequestError::bad("invalid header name"))?;
        let value = &head[value_at..value_end];
        match role {
            Role::ContentLength => {
                let n = content_length(value).map_err(|e| RequestError::bad(e.reason()))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(RequestError::bad("differing Content-Length values"));
                }
                // A list of one length (`5, 5`) or the field repeated is accepted, and
                // passed on as the one value it stands for (RFC 9110 §8.6): as it came,
                // an HTTP/2 upstream resets the stream, and the endpoint is blamed.
                if length.replace(n).is_some() {
                    continue;
                }
                if !canonical_length(value) {
                    append_length(&mut headers, name, n);
                    continue;
                }
            }
            Role::TransferEncoding => {
                transfer_encoding = true;
                for coding in tokens(value) {
                    codings += 1;
                    chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                }
            }
            Role::Host => hosts += 1,
            Role::Connection => {
                if connection_options(value, &mut close, &mut keep_alive) {
                    continue;
                }
            }
            Role::Expect => {
                expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            Role::ContentType | Role::Plain | Role::Other => {}
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_end))
            .map_err(|_| RequestError::bad("invalid header value"))?;
        headers.append(name, value);
    }
    if version == Version::HTTP_11 && hosts != 1 {
        return Err(RequestError::bad(if hosts == 0 {
            "no Host header field"
        } else {
            "more than one Host header field"
        }));
    }
    if hosts > 1 {
        return Err(RequestError::bad("more than one Host header field"));
    }
    let body = if transfer_encoding {
        if length.is_some() {
            return Err(RequestError::bad(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if version == Version::HTTP_10 {
            return Err(RequestError::bad(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if !chunked_last {
            return Err(RequestError::bad("Transfer-Encoding without chunked last"));
        }
        if codings != 1 {
            return Err(RequestError::new(
                StatusCode::NOT_IMPLEMENTED,
                "a transfer coding other than chunked",
            ));
        }
        RequestBodyFraming::Chunked
    } else {
        match length {
            None | Some(0) => RequestBodyFraming::None,
            Some(n) => RequestBodyFraming::Length(n),
        }
    };
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive && !close,
        _ => !close,
    };
    Ok(RequestHead {
        method,
        uri,
        version,
        headers,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    })
}

/// A request body read from the client's connection as the route asks for it.
pub struct RequestBody(BodyInner);

enum BodyInner {
    /// No body, or one that came whole with its head (`None` once taken).
    Here(Option<Bytes>),
    /// Fed by the connection as it is read.
    Fed(Arc<Feed>),
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody").finish_non_exhaustive()
    }
}

/// The hand-over between a request body and the connection reading it: a frame at a
/// time. Both sides are usually polled by the connection's task, which then re-polls the
/// route at once instead of waking itself; a body polled on another task (an HTTP/2
/// upstream's) is woken, and wakes the connection when it wants more.
struct Feed(parking_lot::Mutex<Slot>);

#[derive(Default)]
struct Slot {
    frame: Option<Result<Frame<Bytes>, io::Error>>,
    /// The body has ended (after `frame`).
    ended: bool,
    /// The body was polled and found nothing.
    wanted: bool,
    /// What is left of a `Content-Length` body, not yet taken from the connection.
    remaining: Option<u64>,
    /// The body's task, waiting for a frame.
    body: Option<Waker>,
    /// The connection's task, waiting for the body to want one.
    conn: Option<Waker>,
    /// The body was dropped.
    dropped: bool,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let feed = match &mut self.get_mut().0 {
            BodyInner::Here(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyInner::Fed(feed) => feed,
        };
        let mut slot = feed.0.lock();
        if let Some(frame) = slot.frame.take() {
            return Poll::Ready(Some(frame));
        }
        if slot.ended {
            return Poll::Ready(None);
        }
        slot.wanted = true;
        if !slot.body.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.body = Some(cx.waker().clone());
        }
        if let Some(conn) = &slot.conn {
            if !conn.will_wake(cx.waker()) {
                conn.wake_by_ref();
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyInner::Here(data) => data.is_none(),
            BodyInner::Fed(feed) => {
                let slot = feed.0.lock();
                slot.ended && slot.frame.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let feed = match &self.0 {
            BodyInner::Here(data) => {
                return SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64));
            }
            BodyInner::Fed(feed) => feed,
        };
        let slot = feed.0.lock();
        let ready = match &slot.frame {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        match slot.remaining {
            Some(n) => SizeHint::with_exact(n + ready),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let BodyInner::Fed(feed) = &self.0 {
            feed.0.lock().dropped = true;
        }
    }
}

/// The connection's side of a request body being read.
struct Feeding {
    feed: Arc<Feed>,
    decoding: Decoding,
    /// `100 Continue` is owed before the body is first read.
    continue_owed: bool,
}

impl Drop for Feeding {
    /// An exchange that ends before its body did (answered early, its rest skipped or
    /// never to come) ends the body with an error: a body still held elsewhere (an
    /// HTTP/2 upstream's send task) would otherwise wait for frames for ever, keeping its
    /// stream open on the connection the endpoint's requests share.
    fn drop(&mut self) {
        let mut slot = self.feed.0.lock();
        if slot.ended || slot.dropped {
            return;
        }
        slot.frame = Some(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the exchange ended before the request body",
        )));
        slot.ended = true;
        if let Some(waker) = slot.body.take() {
            waker.wake();
        }
    }
}

enum Decoding {
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Read whole: nothing more is taken from the connection.
    Done,
    /// Failed (malformed, cut short): nothing more is taken, and the connection is not
    /// reused.
    Failed,
}

/// One client connection: its socket and the buffers its requests reuse.
pub(crate) struct ServerConn<IO> {
    io: IO,
    read: BytesMut,
    read_size: usize,
    /// What is to be written.
    outbox: Outbox,
    /// The last response's header map, emptied, for the next request's fields.
    spare: Option<HeaderMap>,
    max_head: usize,
    /// How many bytes the last incomplete parse of a head had (0: none since a head).
    partial: usize,
}

/// A client connection's request, as the connection serves it.
struct Exchange {
    method: Method,
    version: Version,
    keep_alive: bool,
    feeding: Option<Feeding>,
}

/// How much the connection reads ahead while a request is served: the client's next
/// heads (pipelined) or its unread body, at most.
const READ_AHEAD: usize = 64 * 1024;

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerConn<IO> {
    pub(crate) fn new(io: IO, max_head: usize) -> Self {
        Self {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            read_size: READ_CHUNK,
            outbox: Outbox::default(),
            spare: None,
            max_head,
            partial: 0,
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        super::h1::poll_fill(&mut self.io, &mut self.read, &mut self.read_size, cx)
    }

    /// Reads until a request head: `Ok(None)` when the connection should close instead
    /// (the client closed it or went quiet past `deadline`, or the gateway is stopping
    /// and no request has begun).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
        deadline: Instant,
        stopping: &impl Fn() -> bool,
    ) -> Poll<Result<Option<RequestHead>, RequestError>> {
        if self.read.is_empty()
            && (self.read_size > READ_CHUNK || self.read.capacity() > 2 * READ_CHUNK)
        {
            // Between requests, with nothing read ahead: a buffer grown for a large body
            // is given back rather than kept while the connection idles (a client could
            // otherwise hold about 256 KiB on each of its keep-alive connections).
            if self.read.capacity() > 2 * READ_CHUNK {
                self.read = BytesMut::with_capacity(READ_CHUNK);
            }
            self.read_size = READ_CHUNK;
        }
        loop {
            if !self.read.is_empty() && matches!(self.read[0], b'\r' | b'\n') {
                let skipped = super::h1::skip_empty_lines(&mut self.read);
                self.partial = self.partial.saturating_sub(skipped);
            }
            if self.read.is_empty() {
                if stopping() {
                    return Poll::Ready(Ok(None));
                }
            } else if self.partial == 0
                || self.read.len() >= 2 * self.partial
                || self.read.len() > self.max_head
                || super::h1::blank_line_since(&self.read, self.partial)
            {
                // Parsed again only once the head may have ended, or its bytes doubled
                // (a malformed one is still found early), or it is past the bound: a head
                // sent a byte at a time costs linear parsing, not quadratic.
                match parse_request_into(&mut self.read, self.max_head, &mut self.spare)? {
                    Some(head) => {
                        self.partial = 0;
                        return Poll::Ready(Ok(Some(head)));
                    }
                    None => self.partial = self.read.len(),
                }
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Ok(None)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
            // The timer is one per connection, left armed: it is moved only when it
            // fires before the deadline of the head now awaited (once in seconds), or
            // when that deadline is earlier than where it is armed.
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(Ok(None));
                }
                timer.as_mut().reset(deadline);
            }
            return Poll::Pending;
        }
    }

    /// The request of `head`, and the exchange that serves it.
    fn begin(&mut self, head: RequestHead) -> (Request<RequestBody>, Exchange) {
        let mut here = None;
        let feeding = match head.body {
            RequestBodyFraming::None => None,
            // Here whole already (a small body sent with its head): handed over as it is.
            RequestBodyFraming::Length(n)
                if (self.read.len() as u64) >= n && !head.expect_continue =>
            {
                here = Some(self.read.split_to(n as usize).freeze());
                None
            }
            framing => {
                let remaining = match framing {
                    RequestBodyFraming::Length(n) => Some(n),
                    _ => None,
                };
                let feed = Arc::new(Feed(parking_lot::Mutex::new(Slot {
                    remaining,
                    ..Slot::default()
                })));
                Some(Feeding {
                    feed,
                    decoding: match framing {
                        RequestBodyFraming::Length(n) => Decoding::Length(n),
                        _ => Decoding::Chunked(ChunkedDecoder::new()),
                    },
                    continue_owed: head.expect_continue,
                })
            }
        };
        let body = RequestBody(match &feeding {
            Some(feeding) => BodyInner::Fed(feeding.feed.clone()),
            None => BodyInner::Here(here),
        });
        let mut request = Request::new(body);
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = head.uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;
        let exchange = Exchange {
            method: head.method,
            version: head.version,
            keep_alive: head.keep_alive,
            feeding,
        };
        (request, exchange)
    }

    /// Gives the request body the next frame if it wants one and one can be had:
    /// `Ready(true)` when something changed for the body (a frame, its end, an error),
    /// `Ready(false)` when there is nothing to do for it, `Pending` when waiting on the
    /// socket for it.
    fn poll_feed(&mut self, cx: &mut Context<'_>, feeding: &mut Feeding) -> Poll<bool> {
        if matches!(feeding.decoding, Decoding::Done | Decoding::Failed) {
            return Poll::Ready(false);
        }
        {
            let mut slot = feeding.feed.0.lock();
            if slot.dropped {
                return Poll::Ready(false);
            }
            if !slot.wanted || slot.frame.is_some() {
                if !slot.conn.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.conn = Some(cx.waker().clone());
                }
                return Poll::Ready(false);
            }
        }
        if feeding.continue_owed {
            feeding.continue_owed = false;
            if self.read.is_empty() {
                self.outbox
                    .buf()
                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
        }
        if !self.outbox.is_empty() {
            match ready!(self.outbox.poll_write(&mut self.io, cx)) {
                Ok(()) => {}
                Err(e) => return Poll::Ready(self.deliver(cx, feeding, Some(Err(e)), true)),
            }
        }
        loop {
            let frame = match &mut feeding.decoding {
                Decoding::Done | Decoding::Failed => return Poll::Ready(false),
                Decoding::Length(left) if !self.read.is_empty() => {
                    let n =
                        usize::try_from(*left).map_or(self.read.len(), |l| l.min(self.read.len()));
                    *left -= n as u64;
                    let ended = *left == 0;
                    let data = self.read.split_to(n).freeze();
                    return Poll::Ready(self.deliver(
                        cx,
                        feeding,
                        Some(Ok(Frame::data(data))),
                        ended,
                    ));
                }
                Decoding::Chunked(decoder) => match decoder.decode(&mut self.read) {
                    Ok(Some(Chunk::Data(data))) => Some((Ok(Frame::data(data)), false)),
                    Ok(Some(Chunk::Trailers(trailers))) => {
                        Some((Ok(Frame::trailers(trailers)), true))
                    }
                    Ok(Some(Chunk::End)) => {
                        return Poll::Ready(self.deliver(cx, feeding, None, true));
                    }
                    Ok(None) => None,
                    Err(e) => Some((
                        Err(io::Error::new(io::ErrorKind::InvalidData, e.reason())),
                        true,
                    )),
                },
                Decoding::Length(_) => None,
            };
            if let Some((frame, ended)) = frame {
                return Poll::Ready(self.deliver(cx, feeding, Some(frame), ended));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection before the end of the request body",
                    );
                    return Poll::Ready(self.deliver(cx, feeding, Some(Err(e)), true));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(self.deliver(cx, feeding, Some(Err(e)), true)),
            }
        }
    }

    /// Hands `frame` (and the end when `ended`) to the body; wakes it if it waits on
    /// another task than the connection's (which polls the route again at once). Always
    /// `true`.
    fn deliver(
        &mut self,
        cx: &Context<'_>,
        feeding: &mut Feeding,
        frame: Option<Result<Frame<Bytes>, io::Error>>,
        ended: bool,
    ) -> bool {
        if matches!(frame, Some(Err(_))) {
            feeding.decoding = Decoding::Failed;
        } else if ended {
            feeding.decoding = Decoding::Done;
        }
        let mut slot = feeding.feed.0.lock();
        slot.frame = frame;
        slot.wanted = false;
        if ended {
            slot.ended = true;
            slot.remaining = slot.remaining.map(|_| 0);
        } else if let (Some(remaining), Decoding::Length(left)) =
            (&mut slot.remaining, &feeding.decoding)
        {
            *remaining = *left;
        }
        if let Some(waker) = slot.body.take() {
            // The connection's own task polls the route again at once.
            if !waker.will_wake(cx.waker()) {
                waker.wake();
            }
        }
        true
    }

    /// Serves the request until its route answers: the body fed as it is read, and the
    /// connection watched meanwhile. `None`: the client closed the connection (or it
    /// failed) with the request whole, which cancels it.
    fn poll_answer<F: Future<Output = Response<Body>>>(
        &mut self,
        cx: &mut Context<'_>,
        mut route: Pin<&mut F>,
        exchange: &mut Exchange,
    ) -> Poll<Option<Response<Body>>> {
        loop {
            if let Poll::Ready(response) = route.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if let Some(feeding) = &mut exchange.feeding {
                match self.poll_feed(cx, feeding) {
                    Poll::Ready(true) => continue,
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(false) => {}
                }
                let wait = match feeding.decoding {
                    // The body is not wanted now: its bytes wait in the socket (bounded
                    // by the client's window) until it is.
                    Decoding::Length(_) | Decoding::Chunked(_) => !feeding.feed.0.lock().dropped,
                    // It failed (cut short, malformed): the client's fault, which the
                    // route answers, however long it takes; a close, likely now, must not
                    // cancel that.
                    Decoding::Failed => true,
                    Decoding::Done => false,
                };
                if wait {
                    return Poll::Pending;
                }
            }
            // Reads ahead to notice a client gone: a close cancels the request.
            if self.read.len() >= READ_AHEAD {
                return Poll::Pending;
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(None),
                Ok(_) => {}
            }
        }
    }

    /// Writes the answer to `exchange`'s request, feeding the request body meanwhile (an
    /// upstream may stream its answer while it still reads the request): `Ok(true)` when
    /// the connection may serve another request.
    async fn respond(
        &mut self,
        mut response: Response<Body>,
        exchange: &mut Exchange,
        stopping: bool,
    ) -> io::Result<bool> {
        let head = exchange.method == Method::HEAD;
        if head {
            // The gateway's own answer gets the `Content-Length` its `GET` would have.
            super::body::answer_head(&mut response);
        }
        let (mut parts, mut body) = response.into_parts();
        let status = parts.status;
        let no_body = head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let mut keep_alive = exchange.keep_alive && !stopping;
        if let Some(feeding) = &mut exchange.feeding {
            // A body that failed, or that nobody will read and that is not all here
            // (skipped if it is): the connection closes after this answer, and says so.
            let abandoned = feeding.feed.0.lock().dropped;
            if matches!(feeding.decoding, Decoding::Failed)
                || (abandoned && !self.skip_unread_body(exchange))
            {
                keep_alive = false;
            }
        }
        let framing = if no_body {
            Framing::None
        } else if body.is_end_stream() {
            Framing::Length(0)
        } else if let Some(n) = body.size_hint().exact() {
            Framing::Length(n)
        } else if exchange.version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::Close
        };
        if let Some(feeding) = &mut exchange.feeding {
            // The final answer is on its way: no `100 Continue` after it.
            feeding.continue_owed = false;
        }
        // The route's `Connection: close` (its own answers that give up on the
        // connection) closes it too.
        if encode_head(self.outbox.buf(), status, &parts.headers, framing, no_body) {
            keep_alive = false;
        }
        // A request body still unread at the end closes the connection then, without
        // `Connection: close` in this head (the route may still read it meanwhile).
        finish_head(self.outbox.buf(), exchange.version, !keep_alive);
        // The map goes round to the next request, its values (which point into the
        // upstream's buffer) dropped now.
        parts.headers.clear();
        self.spare = Some(parts.headers);
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut ended = no_body || framing == Framing::Length(0);
        // The answer's frames are queued as they come and written together when it has
        // no more for now (or enough is queued): a large body goes in few vectored
        // writes. Meanwhile the request body is fed: an upstream may stream its answer
        // while it still reads the request.
        std::future::poll_fn(|cx| {
            loop {
                if !ended && self.outbox.queued() < WRITE_AHEAD {
                    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        ended = self.outbox.frame(frame, framing, &mut left)?;
                        continue;
                    }
                }
                if !self.outbox.is_empty() {
                    ready!(self.outbox.poll_write(&mut self.io, cx))?;
                    continue;
                }
                if ended {
                    return Pin::new(&mut self.io).poll_flush(cx);
                }
                let fed = match &mut exchange.feeding {
                    Some(feeding) => self.poll_feed(cx, feeding),
                    None => Poll::Ready(false),
                };
                if fed == Poll::Ready(true) {
                    continue;
                }
                // Waiting for the body's next frame: what a TLS stream still holds of the
                // last ones (its records, when the socket was full) goes out meanwhile, or
                // a client would wait for the end of a burst until the upstream sent
                // again. A no-op on plain TCP.
                ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                return Poll::Pending;
            }
        })
        .await?;
        drop(body);
        if framing == Framing::Close {
            return Ok(false);
        }
        Ok(keep_alive && self.skip_unread_body(exchange))
    }

    /// Whether the request body is done with: read whole, absent, or its rest already
    /// here (then skipped). `false`: its rest is still to come, and the connection
    /// cannot serve another request.
    fn skip_unread_body(&mut self, exchange: &mut Exchange) -> bool {
        let Some(feeding) = &mut exchange.feeding else {
            return true;
        };
        loop {
            match &mut feeding.decoding {
                Decoding::Done => return true,
                Decoding::Failed => return false,
                Decoding::Length(left) => {
                    if (self.read.len() as u64) < *left {
                        return false;
                    }
                    self.read.advance(*left as usize);
                    feeding.decoding = Decoding::Done;
                    return true;
                }
                Decoding::Chunked(decoder) => match decoder.decode(&mut self.read) {
                    Ok(Some(Chunk::Data(_))) => {}
                    Ok(Some(Chunk::Trailers(_) | Chunk::End)) => {
                        feeding.decoding = Decoding::Done;
                        return true;
                    }
                    Ok(None) | Err(_) => return false,
                },
            }
        }
    }

    /// Answers a refused request head and closes.
    async fn refuse(&mut self, error: RequestError) {
        let body = crate::problem::problem_json(error.status, error.reason);
        let mut headers = HeaderMap::with_capacity(1);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        let _ = encode_head(
            self.outbox.buf(),
            error.status,
            &headers,
            Framing::Length(body.len() as u64),
            false,
        );
        finish_head(self.outbox.buf(), Version::HTTP_11, true);
        self.outbox.buf().extend_from_slice(&body);
        if std::future::poll_fn(|cx| self.outbox.poll_write(&mut self.io, cx))
            .await
            .is_ok()
        {
            self.close().await;
        }
    }

    /// Closes the connection's write side. The gateway's sockets then linger when dropped
    /// (reading and discarding what the client still sends, see `SendTimeout`): a close
    /// with unread bytes would reset the connection, and the client might lose the
    /// answer.
    async fn close(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

/// How much of an answer's body is queued at most before it is written. Small frames
/// (the first reads of a large answer) go together; a large one is written before the
/// next is read, so that the upstream connection's read buffer, which the frame shares,
/// is free again for that read (reclaimed in place, not allocated anew).
const WRITE_AHEAD: usize = 64 * 1024;
/// The most pieces one vectored write takes.
const MAX_SLICES: usize = 16;
/// Body data up to this size is copied next to the head or chunk line before it (one
/// slice less); larger data is written from its own buffer.
const COPY_AT_MOST: usize = 1024;

/// What is to be written on a connection, in order: bytes of its own (heads, chunk
/// lines, small data copied) and body data written from where it is, in vectored writes.
#[derive(Default)]
struct Outbox {
    /// The connection's own bytes; those from `sealed` on are the last piece, not yet
    /// in `pieces`.
    own: Vec<u8>,
    sealed: usize,
    pieces: std::collections::VecDeque<Piece>,
    /// Bytes of the front piece (or, with no pieces, of `own`) already written.
    front: usize,
    /// Body data queued.
    data: usize,
}

enum Piece {
    Own(std::ops::Range<usize>),
    Data(Bytes),
}

impl Outbox {
    /// The buffer of own bytes, to append to.
    fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.own
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.own.len() == self.sealed
    }

    /// Bytes queued, not written (at most): body data written from where it is, and the
    /// connection's own bytes, small frames copied among them with their chunk lines. (It
    /// counted the former only: an answer streamed in small chunks to a client reading
    /// nothing was read from the upstream and copied here whole, until the send timeout.)
    fn queued(&self) -> usize {
        self.data + self.own.len()
    }

    /// Makes the own bytes appended since the last piece a piece.
    fn seal(&mut self) {
        if self.own.len() > self.sealed {
            let range = self.sealed..self.own.len();
            match self.pieces.back_mut() {
                Some(Piece::Own(last)) if last.end == range.start => last.end = range.end,
                _ => self.pieces.push_back(Piece::Own(range)),
            }
            self.sealed = self.own.len();
        }
    }

    fn push_data(&mut self, data: Bytes) {
        if data.len() <= COPY_AT_MOST {
            self.own.extend_from_slice(&data);
            return;
        }
        self.seal();
        self.data += data.len();
        self.pieces.push_back(Piece::Data(data));
    }

    /// Queues a frame of an answer's body, framed as `framing` says (`left`: what a
    /// `Content-Length` body still owes): `Ok(true)` once the body is whole.
    fn frame(
        &mut self,
        frame: Option<Result<Frame<Bytes>, crate::BoxError>>,
        framing: Framing,
        left: &mut u64,
    ) -> io::Result<bool> {
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(io::Error::other(e)),
            None => {
                return match framing {
                    Framing::Chunked => {
                        self.own.extend_from_slice(b"0\r\n\r\n");
                        Ok(true)
                    }
                    // Shorter than it said: the client would wait for the rest.
                    Framing::Length(_) if *left > 0 => {
                        Err(io::Error::other("response body shorter than its length"))
                    }
                    _ => Ok(true),
                };
            }
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers: sent in a chunked answer (which they end), dropped otherwise.
                let Ok(trailers) = frame.into_trailers() else {
                    return Ok(false);
                };
                if framing != Framing::Chunked {
                    return Ok(false);
                }
                self.own.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    self.own.extend_from_slice(name.as_str().as_bytes());
                    self.own.extend_from_slice(b": ");
                    self.own.extend_from_slice(value.as_bytes());
                    self.own.extend_from_slice(b"\r\n");
                }
                self.own.extend_from_slice(b"\r\n");
                return Ok(true);
            }
        };
        if data.is_empty() {
            return Ok(false);
        }
        let len = data.len() as u64;
        match framing {
            Framing::Length(_) => {
                if len > *left {
                    // Longer than it said: the client cannot tell where it ends.
                    return Err(io::Error::other("response body longer than its length"));
                }
                *left -= len;
                self.push_data(data);
                Ok(*left == 0)
            }
            Framing::Chunked => {
                super::h1::hexadecimal(&mut self.own, len);
                self.own.extend_from_slice(b"\r\n");
                self.push_data(data);
                self.own.extend_from_slice(b"\r\n");
                Ok(false)
            }
            Framing::Close | Framing::None => {
                self.push_data(data);
                Ok(false)
            }
        }
    }

    /// Writes everything queued.
    fn poll_write<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pieces.is_empty() {
            // Own bytes alone (a head, with a small body copied after it: nearly every
            // answer): plain writes, `front` counting into them.
            while self.front < self.own.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.own[self.front..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.front += n;
            }
            self.own.clear();
            self.sealed = 0;
            self.front = 0;
            return Poll::Ready(Ok(()));
        }
        self.seal();
        while !self.pieces.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (i, piece) in self.pieces.iter().take(MAX_SLICES).enumerate() {
                let skip = if i == 0 { self.front } else { 0 };
                let bytes = match piece {
                    Piece::Own(range) => &self.own[range.start + skip..range.end],
                    Piece::Data(data) => &data[skip..],
                };
                slices[i] = io::IoSlice::new(bytes);
                count += 1;
            }
            let write = if count == 1 {
                Pin::new(&mut *io).poll_write(cx, &slices[0])
            } else {
                Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
            };
            let mut n = ready!(write)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while n > 0 {
                let Some(piece) = self.pieces.front() else {
                    break;
                };
                let len = match piece {
                    Piece::Own(range) => range.len(),
                    Piece::Data(data) => data.len(),
                } - self.front;
                if n < len {
                    self.front += n;
                    break;
                }
                n -= len;
                self.front = 0;
                if let Some(Piece::Data(data)) = self.pieces.pop_front() {
                    self.data -= data.len();
                }
            }
        }
        self.own.clear();
        self.sealed = 0;
        Poll::Ready(Ok(()))
    }
}

/// How an answer's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, `1xx`, `204`, `304`): the fields as the route set them.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    Close,
}

/// Writes the status line and the fields of an answer but `Connection` (and the end of
/// the head): the framing field `framing` says, the route's own framing fields dropped
/// unless the answer has no body, and `Date` unless the route set one. Whether the
/// route's `Connection` said `close`.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    no_body: bool,
) -> bool {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let keep_length = no_body && status != StatusCode::NO_CONTENT && !status.is_informational();
    let (mut dated, mut close) = (false, false);
    for (name, value) in headers.iter() {
        if name == header::CONNECTION {
            close |= tokens(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"));
            continue;
        }
        if name == header::TRANSFER_ENCODING || (name == header::CONTENT_LENGTH && !keep_length) {
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            super::h1::decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    close
}

/// Ends a head: `Connection: close` when the connection closes after it, `keep-alive`
/// for an HTTP/1.0 client whose connection stays.
fn finish_head(out: &mut Vec<u8>, version: Version, close: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The `Date` of answers, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    /// Appends the current date (IMF-fixdate).
    pub(super) fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    cached.1.copy_from_slice(text.as_bytes());
                    cached.0 = second;
                } else {
                    out.extend_from_slice(text.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&cached.1);
        });
    }
}

/// A client connection that can be ended abruptly: reset, not closed, so that the client
/// cannot take what it received for a whole answer.
pub(crate) trait Abort {
    /// Makes dropping the connection reset it.
    fn abort(&mut self);
}

#[cfg(test)]
impl Abort for tokio::io::DuplexStream {
    fn abort(&mut self) {}
}

/// Serves HTTP/1.1 on `io` until the client closes it, a request or answer ends it, or
/// `stopping` says so between requests. Each request is answered by `route`; `refused` is
/// called for a request head refused. The first head has `head_timeout` from `started`
/// (when the connection began waiting for it: its bytes may have been read before, to
/// tell HTTP/2's preface from HTTP/1), each later one from the end of the last answer.
pub(crate) async fn serve<IO, R, F>(
    io: IO,
    max_head: usize,
    head_timeout: Duration,
    started: Instant,
    stopping: impl Fn() -> bool,
    refused: impl Fn(),
    mut route: R,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Abort,
    R: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    let mut conn = ServerConn::new(io, max_head);
    let timer = tokio::time::sleep_until(started + head_timeout);
    let mut timer = std::pin::pin!(timer);
    let mut first = true;
    loop {
        let deadline = if std::mem::take(&mut first) {
            started + head_timeout
        } else {
            super::poll_clock::now() + head_timeout
        };
        let head =
            std::future::poll_fn(|cx| conn.poll_head(cx, timer.as_mut(), deadline, &stopping))
                .await;
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(error) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(
                    target: "seawall::gateway",
                    status = error.status().as_u16(),
                    reason = error.reason(),
                    "request head refused"
                );
                refused();
                conn.refuse(error).await;
                return;
            }
        };
        let (request, mut exchange) = conn.begin(head);
        let answer = {
            let answer = route(request);
            let mut answer = std::pin::pin!(answer);
            std::future::poll_fn(|cx| conn.poll_answer(cx, answer.as_mut(), &mut exchange)).await
        };
        let Some(response) = answer else {
            // The client went: the request was cancelled by dropping it.
            return;
        };
        match conn.respond(response, &mut exchange, stopping()).await {
            Ok(true) => {}
            Ok(false) => {
                conn.close().await;
                return;
            }
            Err(_) => {
                // The answer failed part-way (its body's error, usually the upstream's),
                // or the client did: reset. An answer delimited by the close (to an
                // HTTP/1.0 client, its length unknown) would otherwise end as a whole
                // one does, and the client (a cache) would keep the part as the whole.
                conn.io.abort();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    use http::header::HeaderName;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    thread_local! {
        /// Calls of `parse_request_into` on this thread.
        pub(super) static PARSES: Cell<usize> = const { Cell::new(0) };
    }

    #[test]
    fn every_field_is_read_however_many_the_head_has() {
        use super::super::h1::head_tests::{FIELD_COUNTS, listed, numbered};
        for n in FIELD_COUNTS {
            let (lines, mut sent) = numbered(1..n);
            let head = format!("GET /a HTTP/1.1\r\nhost: a\r\n{lines}\r\nnext");
            let mut buf = BytesMut::from(head.as_str());
            let head = parse_request(&mut buf, 64 * 1024).unwrap().unwrap();
            sent.insert(0, ("host".into(), "a".into()));
            assert_eq!(listed(&head.headers), sent, "{n} fields");
            assert_eq!(&buf[..], b"next");
        }
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_not_parsed_at_every_byte() {
        let (mut client, _, _) = serve_echo(false);
        let mut head = String::from("GET /slow-loris HTTP/1.1\r\nHost: a\r\n");
        for i in 0..70 {
            head.push_str(&format!("x-{i}: {}\r\n", "v".repeat(90)));
        }
        head.push_str("Connection: close\r\n\r\n");
        assert!(head.len() > 6 * 1024);
        PARSES.with(|n| n.set(0));
        for byte in head.as_bytes() {
            client.write_all(std::slice::from_ref(byte)).await.unwrap();
            tokio::task::yield_now().await;
        }
        let text = read_to_end(&mut client).await;
        assert!(text.ends_with("GET /slow-loris "), "{text}");
        // Once at each doubling and once at the end, not once a byte (or a line).
        let parses = PARSES.with(Cell::get);
        assert!(
            parses <= 16,
            "{parses} parses of a {}-byte head",
            head.len()
        );
    }

    /// A client sends empty lines (`CRLF`) before its request line, which RFC 9112 §2.2
    /// lets a server ignore, one pair of bytes a write. Every read ended in a blank line
    /// (`LF CR LF` across the last two pairs), so `poll_head` re-parsed the whole buffer,
    /// from its start, at every pair: quadratic work (4 000 parses of up to 8 KiB here,
    /// some 32 000 of up to 64 KiB with the default `max_headers_size`) for bytes the
    /// client chose, where SECURITY.md promises that a head sent a byte at a time is
    /// parsed in linear time. Empty lines are dropped as they come.
    #[tokio::test]
    async fn leading_empty_lines_sent_a_pair_at_a_time_are_not_parsed_at_every_pair() {
        let (mut client, _, _) = serve_echo(false);
        PARSES.with(|n| n.set(0));
        // Just under the 8 KiB head bound of `serve_echo` with the request after them.
        for _ in 0..4000 {
            client.write_all(b"\r\n").await.unwrap();
            tokio::task::yield_now().await;
        }
        client
            .write_all(b"GET /after-empty-lines HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let parses = PARSES.with(Cell::get);
        assert!(
            parses <= 32,
            "{parses} parses of 8 000 bytes of empty lines sent two at a time (answer: {:?})",
            text.lines().next()
        );
    }

    /// A connection that notes how much room each read offers: the read buffer's spare
    /// capacity.
    struct Offered {
        io: DuplexStream,
        last: Arc<AtomicUsize>,
    }

    impl Abort for Offered {
        fn abort(&mut self) {}
    }

    impl AsyncRead for Offered {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.last.store(buf.remaining(), SeqCst);
            Pin::new(&mut this.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Offered {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// A client uploads a 4 MiB body in one go, reads its answer, and keeps the
    /// connection idle (a tiny request every few seconds keeps it past the head timeout).
    /// The read buffer grew to `MAX_READ`-sized reads for the upload and the connection
    /// kept all of it while it idled: the read that waits for the next head was offered
    /// about 250 KiB, where a fresh connection is offered `READ_CHUNK` (8 KiB). As the
    /// upstream side does (`Conn::shrink_idle`), the buffer is given back between
    /// requests.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_does_not_keep_the_buffer_a_large_upload_grew() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let last = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve(
            Offered {
                io: server,
                last: last.clone(),
            },
            64 * 1024,
            Duration::from_secs(10),
            Instant::now(),
            || false,
            || {},
            |request: Request<RequestBody>| async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                Response::new(super::super::body::full(format!("{}", body.len())))
            },
        ));
        const SIZE: usize = 4 << 20;
        let mut upload =
            format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes();
        upload.resize(upload.len() + SIZE, b'x');
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let answer = async {
            let mut text = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&text).ends_with(&SIZE.to_string()) {
                let n = reader.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&text));
                text.extend_from_slice(&buf[..n]);
            }
        };
        let (written, ()) = tokio::join!(writer.write_all(&upload), answer);
        written.unwrap();
        // The connection idles, waiting for the next head.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let offered = last.load(SeqCst);
        assert!(
            offered <= 2 * READ_CHUNK,
            "an idle connection's read is offered {} KiB of buffer after a large upload",
            offered / 1024
        );
    }

    fn parse(text: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_request(&mut BytesMut::from(text), 64 * 1024)
    }

    fn refused(text: &str) -> (u16, &'static str) {
        let e = parse(text).expect_err(text);
        (e.status().as_u16(), e.reason())
    }

    #[test]
    fn connection_is_left_out_when_it_names_nothing_else() {
        let head = |extra: &str| {
            parse(&format!("GET / HTTP/1.1\r\nHost: a\r\n{extra}\r\n"))
                .unwrap()
                .unwrap()
        };
        let h = head("Connection: keep-alive\r\n");
        assert!(!h.headers.contains_key(header::CONNECTION));
        assert!(h.keep_alive);
        let h = head("connection: Close\r\n");
        assert!(!h.headers.contains_key(header::CONNECTION));
        assert!(!h.keep_alive);
        // Naming another field: kept, for the gateway to remove that one too.
        let h = head("Connection: keep-alive, x-b\r\nx-b: 1\r\n");
        assert_eq!(h.headers[header::CONNECTION], "keep-alive, x-b");
        assert!(h.keep_alive);
    }

    #[test]
    fn framing_follows_rfc_9112_and_ambiguity_is_refused() {
        let head = |extra: &str| format!("POST / HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
        let framing = |extra: &str| parse(&head(extra)).unwrap().unwrap().body;
        assert_eq!(framing(""), RequestBodyFraming::None);
        assert_eq!(framing("Content-Length: 0\r\n"), RequestBodyFraming::None);
        assert_eq!(
            framing("Content-Length: 5\r\n"),
            RequestBodyFraming::Length(5)
        );
        assert_eq!(
            framing("Content-Length: 5, 5\r\nContent-Length: 5\r\n"),
            RequestBodyFraming::Length(5)
        );
        // Leading zeros are valid, however many.
        assert_eq!(
            framing("Content-Length: 000000000000000000000005\r\n"),
            RequestBodyFraming::Length(5)
        );
        // The list is passed on as its one value.
        let parsed = parse(&head("Content-Length: 5, 5\r\nContent-Length: 5\r\n"))
            .unwrap()
            .unwrap();
        let lengths: Vec<_> = parsed.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"]);
        assert_eq!(
            framing("Transfer-Encoding: chunked\r\n"),
            RequestBodyFraming::Chunked
        );
        assert_eq!(
            framing("Transfer-Encoding: CHUNKED\r\n"),
            RequestBodyFraming::Chunked
        );
        for (extra, status) in [
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
            ("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", 400),
            ("Content-Length: 5\r\nContent-Length: 6\r\n", 400),
            ("Content-Length: 5, 6\r\n", 400),
            ("Content-Length: +5\r\n", 400),
            ("Content-Length: 0x5\r\n", 400),
            ("Content-Length: -1\r\n", 400),
            ("Content-Length: 99999999999999999999\r\n", 400),
            ("Content-Length: 00099999999999999999999\r\n", 400),
            ("Transfer-Encoding: chunked, chunked\r\n", 501),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                501,
            ),
            ("Transfer-Encoding: gzip, chunked\r\n", 501),
            ("Transfer-Encoding: chunked, gzip\r\n", 400),
            ("Transfer-Encoding: identity\r\n", 400),
            ("Transfer-Encoding: \r\n", 400),
        ] {
            assert_eq!(refused(&head(extra)).0, status, "{extra:?}");
        }
        assert_eq!(
            refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").0,
            400
        );
    }

    #[test]
    fn hosts_versions_folding_and_sizes() {
        assert_eq!(
            refused("GET / HTTP/1.1\r\n\r\n"),
            (400, "no Host header field")
        );
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").0,
            400
        );
        assert_eq!(
            refused("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n").0,
            400
        );
        assert!(parse("GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n").0,
            400
        );
        assert_eq!(refused("GET / HTTP/2.0\r\nHost: a\r\n\r\n").0, 505);
        assert_eq!(refused("GET / HTTP/1.2\r\nHost: a\r\n\r\n").0, 505);
        assert_eq!(refused("GET / HTTP/0.9\r\n\r\n").0, 505);
        // However much of the line has come (found by the fuzz target).
        for cut in [
            "GET / HTTP/0",
            "GET / HTTP/0.",
            "GET / HTTP/0.0",
            "GET / HTTP/1.2",
        ] {
            assert_eq!(refused(cut).0, 505, "{cut}");
        }
        assert_eq!(refused("GET / HTTP/1x").0, 400);
        assert_eq!(refused("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n").0, 400);
        assert_eq!(refused("GET / HTTP/1.1 x\r\nHost: a\r\n\r\n").0, 400);
        assert_eq!(refused("GET / HTTP/1.1\r\nHost : a\r\n\r\n").0, 400);
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: 1\r\n".repeat(100)
        );
        assert_eq!(refused(&many), (431, "too many header fields"));
        let large = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(9000)
        );
        let e = parse_request(&mut BytesMut::from(&large[..]), 8 * 1024).unwrap_err();
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // Incomplete, past the bound: refused without waiting for the rest.
        let e = parse_request(&mut BytesMut::from(&large[..8500]), 8 * 1024).unwrap_err();
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert!(
            parse_request(&mut BytesMut::from(&large[..8000]), 8 * 1024)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn keep_alive_and_expectations() {
        let head = |text: &str| parse(text).unwrap().unwrap();
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let post =
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n";
        assert!(head(post).expect_continue);
        assert!(!head("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        // The head is taken off the buffer; what follows stays.
        let mut buf = BytesMut::from("GET /a?b HTTP/1.1\r\nHost: a\r\n\r\nGET /c");
        let parsed = parse_request(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(parsed.uri, "/a?b");
        assert_eq!(&buf[..], b"GET /c");
        assert!(parse_request(&mut buf, 8192).unwrap().is_none());
        assert_eq!(&buf[..], b"GET /c");
    }

    /// Serves a connection over an in-memory pipe with a route answering `echo`: the
    /// method, path and body it read, as its body. Returns the client's end and a flag
    /// the route's future sets when dropped unanswered.
    fn serve_echo(read_body: bool) -> (DuplexStream, Arc<AtomicBool>, Arc<AtomicUsize>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let cancelled = Arc::new(AtomicBool::new(false));
        let maps = Arc::new(AtomicUsize::new(0));
        let (cancelled2, maps2) = (cancelled.clone(), maps.clone());
        tokio::spawn(serve(
            server,
            8 * 1024,
            Duration::from_secs(10),
            Instant::now(),
            || false,
            || {},
            move |request: Request<RequestBody>| {
                let cancelled = cancelled2.clone();
                let maps = maps2.clone();
                async move {
                    struct Guard(Arc<AtomicBool>, bool);
                    impl Drop for Guard {
                        fn drop(&mut self) {
                            if !self.1 {
                                self.0.store(true, SeqCst);
                            }
                        }
                    }
                    let mut guard = Guard(cancelled, false);
                    // A map with room already: the last answer's, reused.
                    if request.headers().capacity() >= 8 {
                        maps.fetch_add(1, SeqCst);
                    }
                    let (parts, body) = request.into_parts();
                    let text = if read_body {
                        let data = body.collect().await.map(|c| c.to_bytes());
                        match data {
                            Ok(data) => String::from_utf8_lossy(&data).into_owned(),
                            Err(e) => format!("error: {e}"),
                        }
                    } else {
                        String::new()
                    };
                    if parts.uri.path() == "/slow" {
                        std::future::pending::<()>().await;
                    }
                    if parts.uri.path() == "/late" {
                        // An answer that takes a moment after the body failed (a route
                        // recording the client's fault, say).
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    guard.1 = true;
                    let mut response = Response::new(super::super::body::full(format!(
                        "{} {} {text}",
                        parts.method,
                        parts.uri.path()
                    )));
                    if parts.uri.path() == "/close" {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    for i in 0..8 {
                        response.headers_mut().insert(
                            HeaderName::from_static(
                                ["x-a", "x-b", "x-c", "x-d", "x-e", "x-f", "x-g", "x-h"][i],
                            ),
                            HeaderValue::from_static("1"),
                        );
                    }
                    response
                }
            },
        ));
        (client, cancelled, maps)
    }

    async fn read_until(client: &mut DuplexStream, needle: &str) -> String {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&text).contains(needle) {
            let n = client.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&text)
            );
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(text).unwrap()
    }

    async fn read_to_end(client: &mut DuplexStream) -> String {
        let mut text = Vec::new();
        client.read_to_end(&mut text).await.unwrap();
        String::from_utf8(text).unwrap()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_with_maps_reused() {
        let (mut client, _, maps) = serve_echo(true);
        client
            .write_all(
                b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n\
                  POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
                  POST /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                  2\r\nde\r\n1;x=y\r\nf\r\n0\r\n\r\n\
                  GET /four HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        let bodies: Vec<_> = text
            .split("HTTP/1.1 200 OK\r\n")
            .skip(1)
            .map(|answer| answer.split_once("\r\n\r\n").unwrap().1)
            .collect();
        assert_eq!(
            bodies,
            [
                "GET /one ",
                "POST /two abc",
                "POST /three def",
                "GET /four "
            ],
            "{text}"
        );
        assert!(text.contains("content-length: 9\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert!(
            text.ends_with("connection: close\r\n\r\nGET /four "),
            "{text}"
        );
        // Every request after the first was parsed into the answer before it's map.
        assert_eq!(maps.load(SeqCst), 3);
    }

    #[tokio::test]
    async fn a_route_s_connection_close_closes_the_connection() {
        let (mut client, _, _) = serve_echo(false);
        client
            .write_all(
                b"GET /close HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert_eq!(text.matches("connection").count(), 1, "{text}");
        assert!(!text.contains("/next"), "{text}");
    }

    #[tokio::test]
    async fn continue_is_sent_when_the_body_is_read_and_only_then() {
        let (mut client, _, _) = serve_echo(true);
        client
            .write_all(
                b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            )
            .await
            .unwrap();
        read_until(&mut client, "HTTP/1.1 100 Continue\r\n\r\n").await;
        client.write_all(b"hi").await.unwrap();
        let text = read_until(&mut client, "POST /x hi").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");

        // A route that answers without reading: no 100, and the connection closes (the
        // body may still come).
        let (mut client, _, _) = serve_echo(false);
        client
            .write_all(
                b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(!text.contains("100 Continue"), "{text}");
    }

    #[tokio::test]
    async fn an_unread_body_already_here_is_skipped_and_the_connection_kept() {
        let (mut client, _, _) = serve_echo(false);
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz\
                  GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.contains("POST /a "), "{text}");
        assert!(text.ends_with("GET /b "), "{text}");
    }

    #[tokio::test]
    async fn a_client_gone_cancels_its_request_and_a_cut_body_fails_it() {
        let (mut client, cancelled, _) = serve_echo(false);
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        assert!(!cancelled.load(SeqCst));
        client.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !cancelled.load(SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the request cancelled");

        let (mut client, _, _) = serve_echo(true);
        client
            .write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.contains("POST /x error: "), "{text}");
        assert!(text.contains("connection: close"), "{text}");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_answered_even_when_the_answer_takes_a_while() {
        let (mut client, cancelled, _) = serve_echo(true);
        client
            .write_all(b"POST /late HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.contains("POST /late error: "), "{text}");
        assert!(!cancelled.load(SeqCst));
    }

    #[tokio::test]
    async fn a_refused_head_is_answered_then_closed() {
        let (mut client, _, _) = serve_echo(true);
        client
            .write_all(
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(!text.contains("smuggled"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_come_within_the_timeout_idle_time_included() {
        let (mut client, _, _) = serve_echo(false);
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET /a ").await;
        // Idle, then half a head: the bound counts from the end of the last answer.
        tokio::time::sleep(Duration::from_secs(6)).await;
        client.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
        let start = Instant::now();
        let rest = read_to_end(&mut client).await;
        assert_eq!(rest, "");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_secs(5),
            "{waited:?}"
        );
    }

    /// A writer taking at most `at_most` bytes a call, counting its calls.
    struct Trickle {
        written: Vec<u8>,
        at_most: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let n = buf.len().min(this.at_most);
            this.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(this.at_most - n);
                this.written.extend_from_slice(&buf[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn queued_frames_go_out_whole_in_few_writes_however_the_socket_takes_them() {
        let frames: Vec<Bytes> = [10usize, 3000, 5, 70_000, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![b'a' + i as u8; n]))
            .collect();
        let mut expected = b"HEAD\r\n".to_vec();
        for frame in &frames {
            expected.extend_from_slice(format!("{:x}\r\n", frame.len()).as_bytes());
            expected.extend_from_slice(frame);
            expected.extend_from_slice(b"\r\n");
        }
        expected.extend_from_slice(b"0\r\nx-t: 1\r\n\r\n");
        for at_most in [1, 7, 4096, usize::MAX] {
            let mut outbox = Outbox::default();
            let mut io = Trickle {
                written: Vec::new(),
                at_most,
                calls: 0,
            };
            outbox.buf().extend_from_slice(b"HEAD\r\n");
            let mut left = 0;
            for frame in &frames {
                let done = outbox
                    .frame(
                        Some(Ok(Frame::data(frame.clone()))),
                        Framing::Chunked,
                        &mut left,
                    )
                    .unwrap();
                assert!(!done);
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("x-t", HeaderValue::from_static("1"));
            assert!(
                outbox
                    .frame(
                        Some(Ok(Frame::trailers(trailers))),
                        Framing::Chunked,
                        &mut left
                    )
                    .unwrap()
            );
            // Everything not written: the frames, their lines, the head, the trailers.
            assert_eq!(outbox.queued(), expected.len());
            let mut cx = Context::from_waker(Waker::noop());
            assert!(outbox.poll_write(&mut io, &mut cx).is_ready());
            assert!(outbox.is_empty());
            assert_eq!(outbox.queued(), 0);
            assert_eq!(io.written, expected, "at most {at_most} a write");
            if at_most == usize::MAX {
                // Head, lines and small frames copied around the two large ones: one
                // vectored write of five slices.
                assert_eq!(io.calls, 1);
            }
        }
    }

    #[test]
    fn own_bytes_alone_go_in_plain_writes_and_data_may_follow_a_partial_one() {
        let mut outbox = Outbox::default();
        let mut io = Trickle {
            written: Vec::new(),
            at_most: 3,
            calls: 0,
        };
        let mut cx = Context::from_waker(Waker::noop());
        outbox
            .buf()
            .extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nsmall");
        assert!(outbox.poll_write(&mut io, &mut cx).is_ready());
        assert_eq!(io.written, b"HTTP/1.1 200 OK\r\n\r\nsmall");
        assert_eq!(io.calls, 8);
        assert!(outbox.is_empty());
        // Written in part (the socket full), then large data queued behind it.
        io.written.clear();
        outbox.buf().extend_from_slice(b"head:");
        outbox.front = 2;
        io.written.extend_from_slice(b"he");
        let mut left = 0;
        let large = Bytes::from(vec![b'x'; 2000]);
        outbox
            .frame(
                Some(Ok(Frame::data(large.clone()))),
                Framing::Close,
                &mut left,
            )
            .unwrap();
        io.at_most = usize::MAX;
        assert!(outbox.poll_write(&mut io, &mut cx).is_ready());
        assert_eq!(io.written, [&b"head:"[..], &large].concat());
    }

    #[test]
    fn a_length_body_must_be_as_long_as_it_said() {
        let mut outbox = Outbox::default();
        let mut left = 5;
        let data = |s: &'static str| Some(Ok(Frame::data(Bytes::from_static(s.as_bytes()))));
        assert!(
            !outbox
                .frame(data("abc"), Framing::Length(5), &mut left)
                .unwrap()
        );
        assert!(
            outbox
                .frame(data("abcd"), Framing::Length(5), &mut left)
                .is_err()
        );
        assert!(outbox.frame(None, Framing::Length(5), &mut left).is_err());
        assert!(
            outbox
                .frame(data("de"), Framing::Length(5), &mut left)
                .unwrap()
        );
    }

    #[tokio::test]
    async fn a_body_sent_with_its_head_is_handed_over_whole_and_a_streamed_one_fed() {
        let (mut client, _, _) = serve_echo(true);
        client
            .write_all(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        read_until(&mut client, "POST /a hello").await;
        client
            .write_all(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nwor")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        client.write_all(b"lds").await.unwrap();
        read_until(&mut client, "POST /b worlds").await;
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any run of pipelined requests, bodies by length or chunked (with an extension
        /// and a trailer or not), written in pieces cut anywhere, is served request by
        /// request: each route call sees its own method, path and body, and the answers
        /// come back in order.
        #[test]
        fn pipelined_requests_cut_anywhere_are_served_exactly(
            requests in proptest::collection::vec(
                (0u8..3, proptest::collection::vec(b'a'..=b'z', 0..40), 1usize..5),
                1..6,
            ),
            cuts in proptest::collection::vec(1usize..50, 1..20),
        ) {
            let mut wire = Vec::new();
            let mut expected = String::new();
            for (i, (kind, body, chunk)) in requests.iter().enumerate() {
                let body_text = String::from_utf8(body.clone()).unwrap();
                match kind {
                    0 => {
                        wire.extend_from_slice(format!("GET /r{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
                        expected.push_str(&format!("GET /r{i} |"));
                    }
                    1 => {
                        wire.extend_from_slice(
                            format!("POST /r{i} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body_text}", body.len())
                                .as_bytes(),
                        );
                        expected.push_str(&format!("POST /r{i} {body_text}|"));
                    }
                    _ => {
                        wire.extend_from_slice(
                            format!("PUT /r{i} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
                        );
                        for piece in body.chunks(*chunk) {
                            wire.extend_from_slice(format!("{:x};e=1\r\n", piece.len()).as_bytes());
                            wire.extend_from_slice(piece);
                            wire.extend_from_slice(b"\r\n");
                        }
                        wire.extend_from_slice(if chunk % 2 == 0 { &b"0\r\nx-t: 1\r\n\r\n"[..] } else { b"0\r\n\r\n" });
                        expected.push_str(&format!("PUT /r{i} {body_text}|"));
                    }
                }
            }
            wire.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            expected.push_str("GET /last |");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let answers = runtime.block_on(async {
                let (mut client, _, _) = serve_echo(true);
                let mut rest = &wire[..];
                let mut cut = cuts.iter().cycle();
                while !rest.is_empty() {
                    let (piece, after) = rest.split_at((*cut.next().unwrap()).min(rest.len()));
                    client.write_all(piece).await.unwrap();
                    tokio::task::yield_now().await;
                    rest = after;
                }
                read_to_end(&mut client).await
            });
            let bodies: String = answers
                .split("HTTP/1.1 200 OK\r\n")
                .skip(1)
                .map(|a| format!("{}|", a.split_once("\r\n\r\n").unwrap().1))
                .collect();
            proptest::prop_assert_eq!(bodies, expected);
        }
    }
}
