//! The upstream side of the proxy: one pool of HTTP/1 keep-alive connections per endpoint.
//!
//! Each endpoint of a route's balancer owns an [`EndpointPool`]: idle HTTP/1 connections
//! (spoken by the gateway's own client, [`h1`]), most recently used first; HTTP/2
//! upstreams get hyper's client, one multiplexed connection per thread. A request takes
//! the most recent idle connection (or dials a new one), sends on it, and its response
//! body puts the connection back once it has been read to the end.
//! A body dropped before its end (the client went away, the route timed out) takes its
//! connection with it: the upstream may still be writing, so it cannot be reused.
//!
//! Compared with hyper-util's legacy client this is less work per request: no pool keyed
//! by scheme and authority behind one lock, no absolute URI built and parsed for every
//! request, and above all no task spawned per request to wait until the connection is
//! ready again — the response body returns it where the request ends, on the task that
//! serves the request.
//!
//! A reused connection may have just been closed by the upstream: an idle keep-alive
//! connection racing the upstream's idle timeout. A request none of which could be
//! written on it (and none of whose body had been taken to go with its head) is sent
//! again on a new connection, once. A request that was written is sent again,
//! once, on a new connection only if sending it twice is harmless and possible, as Go's
//! `net/http` does: its method is idempotent (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`,
//! `DELETE`), it has no body (a client's streamed body cannot be replayed), and the
//! connection failed (reset, closed) before any byte of an answer came, and the
//! connection had idled for 200 ms or more before it (only then can an upstream's idle
//! timer close it under the request; a connection reused sooner, as every connection of a
//! busy pool is, costs no copy of the request's head). A request that failed on a new
//! connection is never sent again. The gateway counts these retries
//! (`retried_stale`). And a connection is not reused past the idle timeout the upstream
//! advertises (`Keep-Alive: timeout=N`): it is closed a little before (a quarter of `N`
//! before, at most 1 s), so the race does not arise with upstreams that say it.
//!
//! An HTTP/2 upstream may refuse a stream unprocessed (RFC 9113 §8.7: above the
//! `last_stream_id` of its `GOAWAY`, or reset with `REFUSED_STREAM`): the request is sent
//! again, once, on a new connection, whatever its method, if it has no body, and the
//! refusal is not the endpoint's failure (one on the new connection is; so is one of a
//! request with a body, which cannot be sent again: an upstream refusing every stream is
//! failing). An upstream
//! that ends the connection with `GOAWAY(ENHANCE_YOUR_CALM)` says the gateway misbehaved
//! on it: above all by resetting the streams of clients that went away, which servers
//! built on the `h2` crate answer so after 20 streams reset before they took them (their
//! rapid-reset guard). That is the clients' doing, not the endpoint's ill health: the
//! requests that fail with the connection are not counted against the endpoint, nor are
//! those on a connection the upstream closed after the gateway had reset a burst of
//! streams on it (10 since its last answer head; its `GOAWAY` may be lost: a server
//! closing its socket with frames unread resets the connection, and what it sent last
//! may never be read); and the
//! idempotent ones without a body are sent again on a new connection (those the upstream
//! did not process, of any method). Only a request without a body can be: the head of
//! each is copied before it goes on an HTTP/2 connection (hyper keeps none it has sent).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::Body;
use super::client::ClientBodyError;
use super::h1::{self, HeadFacts};
use crate::discovery::Instance;

/// How long a new connection may take to be established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay idle in the pool: it is closed by the next use of the
/// pool, or by the gateway's sweep, whichever comes first.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A reused connection idle for this long or more may be closed by the upstream's idle
/// timer just as a request is written on it: the head of an idempotent request without a
/// body is then kept, to send it again on a new connection if the old one fails before
/// any byte of an answer. Upstreams' idle timeouts are seconds (nginx 75 s, Node 5 s);
/// a connection reused sooner than this costs no copy.
const STALE_AFTER: Duration = Duration::from_millis(200);
/// How often the gateway closes the connections idle for longer than [`IDLE_TIMEOUT`] in
/// pools nobody uses: an idle connection lives 30 to 35 s.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Idle connections kept per endpoint (and per thread of
/// [`Gateway::spawn_threads`](super::Gateway::spawn_threads)); more are closed as they are
/// returned.
const MAX_IDLE: usize = 128;

/// Why a request could not be forwarded to an endpoint.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The connection could not be established.
    Connect(io::Error),
    /// The connection took longer than 5 s to establish.
    ConnectTimeout,
    /// The HTTP/2 exchange failed: the connection closed, a malformed response…
    Http(hyper::Error),
    /// The HTTP/1 exchange failed: the connection closed or failed, a malformed
    /// response, the request body failed.
    H1(h1::Failure),
    /// The connection closed before the response came.
    Closed,
    /// The route timeout passed before the response head: the upstream's fault.
    Timeout,
    /// The route timeout passed while the exchange was waiting on the client's request
    /// body: the client's fault, not the upstream's.
    ClientBodyTimeout,
    /// The caller's own deadline (a gRPC call's `grpc-timeout`, shorter than the route
    /// timeout) passed before the response head: the caller's choice, not the upstream's
    /// fault.
    CallerDeadline,
    /// The client's request body failed while the exchange's own error says only how the
    /// exchange ended (an HTTP/2 stream reset): the client's fault.
    ClientBody(ClientBodyError),
    /// The HTTP/2 upstream refused the stream unprocessed, or ended the connection with
    /// `ENHANCE_YOUR_CALM` (see [`H2Refusal`]), and the request could not be sent again:
    /// not the endpoint's failure.
    H2Refused(H2Refusal, hyper::Error),
    /// The TLS handshake with the upstream failed: an unknown CA, a certificate for
    /// another name or expired, no common protocol, an upstream that does not speak TLS.
    #[cfg(feature = "tls")]
    Tls(io::Error),
}

impl UpstreamError {
    /// Whether the client caused it: its request body failed (malformed, cut short, too
    /// large; found as a [`ClientBodyError`] in the source chain) or stalled past the route
    /// timeout. Such errors never count against the upstream.
    pub(crate) fn is_client_fault(&self) -> bool {
        match self {
            Self::ClientBodyTimeout | Self::CallerDeadline | Self::ClientBody(_) => true,
            Self::Http(_) | Self::H1(_) => {
                let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self);
                while let Some(e) = current {
                    if e.is::<ClientBodyError>() {
                        return true;
                    }
                    current = e.source();
                }
                false
            }
            _ => false,
        }
    }

    /// Whether the HTTP/1 connection was lost: closed or reset by the upstream, before
    /// the response head or during its body.
    pub(crate) fn is_connection_lost(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::H1(e) => e.is_connection_lost(),
            _ => false,
        }
    }

    /// Whether a response body that failed with this error, after its head came, failed
    /// for the upstream's doing (a malformed chunk, a reset, a close before the end): not
    /// the client's body, nor an HTTP/2 connection the upstream ended with
    /// `ENHANCE_YOUR_CALM` for the streams the gateway reset (see [`H2Refusal::Calmed`]).
    pub(crate) fn is_upstreams_in_body(&self) -> bool {
        !self.is_client_fault() && !matches!(self, Self::Http(e) if calmed(e))
    }

    /// Whether the upstream gave the request up for a reason that is not its ill health
    /// ([`UpstreamError::H2Refused`]), or the gateway could not even try for want of its
    /// own resources ([`is_local`](Self::is_local)): not the endpoint's failure either.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, Self::H2Refused(..)) || self.is_local()
    }

    /// A connection the gateway could not open for want of its own resources: no file
    /// descriptor left (`EMFILE`, `ENFILE`), no memory. Counted against the endpoint, a
    /// gateway out of descriptors under a surge would eject every healthy upstream at
    /// once, and keep them out after it recovered. (Not `EADDRNOTAVAIL`: a host without
    /// IPv6 answers it for an IPv6 upstream, a fault of that endpoint for good.)
    fn is_local(&self) -> bool {
        let Self::Connect(e) = self else {
            return false;
        };
        e.kind() == io::ErrorKind::OutOfMemory
            || (cfg!(unix) && matches!(e.raw_os_error(), Some(23 | 24)))
    }
}

/// Why an HTTP/2 upstream gave a request up that is not the endpoint's ill health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum H2Refusal {
    /// The stream was not processed (RFC 9113 §8.7): above the `last_stream_id` of a
    /// `GOAWAY` (a server going away, gracefully or not), or reset with
    /// `REFUSED_STREAM`. Safe to send again, whatever its method.
    Unprocessed,
    /// The upstream ended the connection with `GOAWAY(ENHANCE_YOUR_CALM)`: it found the
    /// gateway's conduct on it abusive, above all the streams the gateway reset for its
    /// clients that went away (the `h2` crate's servers end a connection after 20 streams
    /// reset before they took them: its rapid-reset guard). Or it closed the connection
    /// after the gateway had reset a burst of streams on it (the `GOAWAY` may be lost). The
    /// clients' doing.
    Calmed,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connecting to the upstream: {e}"),
            Self::ConnectTimeout => f.write_str("connecting to the upstream timed out"),
            Self::Http(e) => write!(f, "upstream HTTP exchange: {e}"),
            Self::H1(e) => write!(f, "upstream HTTP exchange: {e}"),
            Self::Closed => f.write_str("the upstream closed the connection before answering"),
            Self::Timeout => f.write_str("the upstream did not answer within the route timeout"),
            Self::ClientBodyTimeout => {
                f.write_str("the client's request body did not come within the route timeout")
            }
            Self::CallerDeadline => f.write_str("the caller's deadline (grpc-timeout) passed"),
            Self::ClientBody(e) => write!(f, "upstream HTTP exchange: {e}"),
            Self::H2Refused(H2Refusal::Unprocessed, e) => {
                write!(f, "the upstream refused the HTTP/2 stream unprocessed: {e}")
            }
            Self::H2Refused(H2Refusal::Calmed, e) => write!(
                f,
                "the upstream ended the HTTP/2 connection for the streams the gateway reset \
                 (ENHANCE_YOUR_CALM, or closed after them): {e}"
            ),
            #[cfg(feature = "tls")]
            Self::Tls(e) => write!(f, "TLS handshake with the upstream: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) => Some(e),
            #[cfg(feature = "tls")]
            Self::Tls(e) => Some(e),
            Self::ConnectTimeout
            | Self::Closed
            | Self::Timeout
            | Self::ClientBodyTimeout
            | Self::CallerDeadline => None,
            Self::Http(e) | Self::H2Refused(_, e) => Some(e),
            Self::H1(e) => Some(e),
            Self::ClientBody(e) => Some(e),
        }
    }
}

/// Where to connect: an address, or a host name resolved on every new connection.
#[derive(Debug, Clone)]
enum Target {
    Addr(SocketAddr),
    Host(Arc<str>, u16),
}

/// An upstream connection's socket: TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// `$body` on the stream inside, whichever it is.
macro_rules! on_stream {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Stream::Plain($s) => $body,
            #[cfg(feature = "tls")]
            Stream::Tls($s) => $body,
        }
    };
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_stream!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// How a service's endpoints are spoken to: `[[services]]`' `protocol` and `tls`.
#[derive(Clone, Default)]
pub(crate) struct UpstreamSettings {
    h2: bool,
    #[cfg(feature = "tls")]
    tls: Option<Arc<super::upstream_tls::UpstreamTls>>,
}

impl UpstreamSettings {
    /// The settings of `service` (none listed: HTTP/1 in cleartext), its TLS client made.
    pub(crate) fn new(
        service: Option<&super::config::ServiceConfig>,
        _index: usize,
    ) -> Result<Self, crate::ConfigError> {
        let Some(service) = service else {
            return Ok(Self::default());
        };
        Ok(Self {
            h2: service.protocol == super::config::UpstreamProtocol::H2,
            #[cfg(feature = "tls")]
            tls: service
                .tls
                .as_ref()
                .map(|tls| {
                    super::upstream_tls::UpstreamTls::new(
                        tls,
                        &service.name,
                        service.protocol == super::config::UpstreamProtocol::H2,
                    )
                })
                .transpose()?,
        })
    }

    fn scheme(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "https";
        }
        "http"
    }
}

/// One HTTP/1 connection, with what the pool knows of it. Driven by whichever task has
/// it (the request's, through its response body), not by a task of its own: no hop
/// between tasks on the way up or down.
struct Conn {
    h1: h1::Conn<Stream>,
    /// How long it may stay idle: [`IDLE_TIMEOUT`], or less if the upstream said so.
    max_idle: Duration,
    /// Checked out after idling for [`STALE_AFTER`] or more: the upstream's idle timer
    /// may close it under the next request.
    idled: bool,
}

/// A connection as the pool and the response body hold it: boxed once when dialled, so
/// that handing it on (taken from the pool, into the exchange, into the response body
/// and every move of the response, back to the pool) moves a pointer, not the
/// connection's state and buffers.
type Pooled = Box<Conn>;

/// What an exchange with an endpoint gives.
type Exchanged = Result<Response<PooledBody>, UpstreamError>;

/// An exchange with an endpoint ([`EndpointPool::send`]). On an HTTP/1 connection taken
/// from the pool and reused at once (nearly every request of a busy route) it is driven
/// in place: no future boxed, no state copied into one. Anything else (a dial, a request
/// sent again, a connection that idled long enough to keep a copy of the head, HTTP/2)
/// is boxed on its own, so that neither carries the other's state.
pub(crate) struct SendFuture(Sending);

enum Sending {
    Pooled {
        pool: Arc<EndpointPool>,
        /// Until the response head.
        conn: Option<Pooled>,
    },
    Boxed(Pin<Box<dyn Future<Output = Exchanged> + Send>>),
    /// On the endpoint's HTTP/2 connection, the one numbered `number` when it was sent;
    /// with none yet (0), the one the request dialled or waited for, in `dialled` once
    /// known (the first requests of a connection are those a stalled one holds first).
    H2 {
        pool: Arc<EndpointPool>,
        number: u64,
        dialled: Option<Arc<AtomicU64>>,
        future: Pin<Box<dyn Future<Output = Exchanged> + Send>>,
        /// The future has given its output: dropped before, the request was given up.
        done: bool,
    },
}

impl SendFuture {
    /// The route timeout passed before the answer's head: an HTTP/2 connection is not
    /// given more requests (see [`EndpointPool::h2_timed_out`]).
    pub(crate) fn timed_out(&self) {
        if let Some((pool, number)) = self.h2_connection() {
            pool.h2_timed_out(number);
        }
    }

    /// The endpoint and the number of the HTTP/2 connection the request went on, if known.
    fn h2_connection(&self) -> Option<(&Arc<EndpointPool>, u64)> {
        let Sending::H2 {
            pool,
            number,
            dialled,
            ..
        } = &self.0
        else {
            return None;
        };
        let number = dialled
            .as_ref()
            .map_or(*number, |dialled| dialled.load(Ordering::Relaxed));
        (number != 0).then_some((pool, number))
    }
}

/// An HTTP/2 request given up before its answer's head (its client went away, the route
/// timed out) has its stream reset on the shared connection: marked there, so that the
/// upstream closing the connection for it is not taken for its ill health.
impl Drop for SendFuture {
    fn drop(&mut self) {
        if matches!(self.0, Sending::H2 { done: false, .. })
            && let Some((pool, number)) = self.h2_connection()
        {
            pool.h2_abandoned(number);
        }
    }
}

impl Future for SendFuture {
    type Output = Exchanged;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exchanged> {
        let this = &mut self.get_mut().0;
        loop {
            let (pool, slot) = match this {
                Sending::Boxed(future) => return future.as_mut().poll(cx),
                Sending::H2 { future, done, .. } => {
                    let output = ready!(future.as_mut().poll(cx));
                    *done = true;
                    return Poll::Ready(output);
                }
                Sending::Pooled { pool, conn } => (pool, conn),
            };
            let Some(conn) = slot else {
                return Poll::Ready(Err(UpstreamError::Closed));
            };
            let result = ready!(conn.h1.poll_head(cx));
            let Some(mut conn) = slot.take() else {
                return Poll::Ready(Err(UpstreamError::Closed));
            };
            let e = match result {
                Ok(response) => return Poll::Ready(Ok(pool.respond(conn, response))),
                Err(e) => UpstreamError::H1(e),
            };
            // Not written: a reused connection closed under us. Once more, on a new one.
            let Some(request) = conn.h1.take_unsent() else {
                return Poll::Ready(Err(e));
            };
            pool.count_retry(&e);
            *this = Sending::Boxed(Box::pin(pool.clone().resend(request)));
        }
    }
}

/// Shards of idle connections per endpoint (see [`set_thread_shard`]).
pub(crate) const SHARDS: usize = 16;

std::thread_local! {
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread use its own shard of every pool: the threads of
/// [`Gateway::spawn_threads`](super::Gateway::spawn_threads) each run a runtime of their
/// own, and a connection belongs to the runtime whose reactor it is registered with, so
/// each thread keeps its own idle connections. Threads of any other runtime share shard
/// 0: tasks move between the workers of one runtime, and so may its connections.
pub(crate) fn set_thread_shard(index: usize) {
    SHARD.with(|s| s.set(index % SHARDS));
}

/// This thread's shard (see [`set_thread_shard`]), below [`SHARDS`].
pub(crate) fn thread_shard() -> usize {
    SHARD.with(std::cell::Cell::get)
}

/// Idle connections and when each expires.
type Idle = parking_lot::Mutex<VecDeque<(Pooled, Instant)>>;

/// An HTTP/2 connection's request handle, with the connection's number and how it ended.
type NumberedH2 = (u64, http2::SendRequest<Body>, Arc<H2Ended>);

/// What the gateway did on an HTTP/2 connection, and how it ended.
struct H2Ended {
    /// Told by the task that drives the connection: `None` while it is open; then whether
    /// the upstream ended it with `GOAWAY(ENHANCE_YOUR_CALM)`.
    told: tokio::sync::watch::Sender<Option<bool>>,
    /// Streams the gateway reset on it since it last had an answer's head: requests given
    /// up before theirs (their clients went away, the route timed out).
    abandoned: std::sync::atomic::AtomicU32,
}

/// Resets since a connection's last answer head from which the upstream closing it
/// without a word is taken for its rapid-reset guard, not its ill health: half of the
/// `h2` crate's servers' 20. A few resets (a client gone now and then, on a connection
/// that lives for hours) prove nothing: a connection lost after them is the endpoint's.
const H2_CALM_RESETS: u32 = 10;

impl H2Ended {
    fn new() -> Self {
        Self {
            told: tokio::sync::watch::Sender::new(None),
            abandoned: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// An answer's head came on the connection: the resets before it were no burst the
    /// upstream would end it for (written only when there were some).
    fn heard(&self) {
        if self.abandoned.load(Ordering::Relaxed) != 0 {
            self.abandoned.store(0, Ordering::Relaxed);
        }
    }
}

/// How long a request that failed with its HTTP/2 connection waits for the connection's
/// task to tell how it ended (it has, or is about to, when the connection is lost).
const H2_ENDING_WAIT: Duration = Duration::from_millis(250);

/// The HTTP/2 error behind `error`, if any.
fn h2_error(error: &hyper::Error) -> Option<&h2::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return Some(e);
        }
        current = e.source();
    }
    None
}

/// Whether `error` is the upstream's `GOAWAY(ENHANCE_YOUR_CALM)`.
fn calmed(error: &hyper::Error) -> bool {
    h2_error(error).is_some_and(|e| {
        e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
    })
}

/// One shard's HTTP/2 connection, with its number.
struct H2Shard {
    sender: parking_lot::Mutex<Option<NumberedH2>>,
}

impl H2Shard {
    fn new() -> Self {
        Self {
            sender: parking_lot::Mutex::new(None),
        }
    }

    /// Puts `connection` in the shard (`None`: empties it), under its lock.
    fn set(&self, sender: &mut Option<NumberedH2>, connection: Option<NumberedH2>) {
        *sender = connection;
    }
}

/// The idle connections of one endpoint.
pub(crate) struct EndpointPool {
    target: Target,
    /// The `Host` header sent upstream: the endpoint's authority.
    host: HeaderValue,
    /// Per shard, oldest first; taken from the back.
    idle: Box<[Idle]>,
    /// HTTP/1 or HTTP/2, cleartext or TLS.
    settings: UpstreamSettings,
    /// HTTP/2: per shard, the connection requests are multiplexed on, and its number
    /// (see [`h2_timed_out`](Self::h2_timed_out)).
    h2: Box<[H2Shard]>,
    /// HTTP/2: the number of the last connection made.
    h2_made: AtomicU64,
    /// HTTP/2: one dial at a time per endpoint, so that requests arriving together share
    /// the connection the first one makes.
    dialing: tokio::sync::Mutex<()>,
    /// The gateway's count of requests sent again ([`Pools::retried_stale`]).
    retried_stale: Arc<AtomicU64>,
}

impl fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointPool")
            .field("target", &self.target)
            .field(
                "idle",
                &self.idle.iter().map(|i| i.lock().len()).sum::<usize>(),
            )
            .finish()
    }
}

impl EndpointPool {
    /// The endpoint's authority (`host:port`), as sent in `Host`.
    #[cfg(feature = "tracing")]
    pub(crate) fn authority(&self) -> &HeaderValue {
        &self.host
    }

    fn new(
        instance: &Instance,
        settings: &UpstreamSettings,
        retried_stale: Arc<AtomicU64>,
    ) -> Arc<Self> {
        let target = match instance.socket_addr() {
            Some(addr) => Target::Addr(addr),
            None => Target::Host(instance.address.clone(), instance.port),
        };
        let host = HeaderValue::from_str(&instance.authority())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid.invalid"));
        Arc::new(Self {
            target,
            host,
            idle: (0..SHARDS)
                .map(|_| parking_lot::Mutex::new(VecDeque::new()))
                .collect(),
            h2: if settings.h2 {
                (0..SHARDS).map(|_| H2Shard::new()).collect()
            } else {
                Box::new([])
            },
            h2_made: AtomicU64::new(0),
            settings: settings.clone(),
            dialing: tokio::sync::Mutex::new(()),
            retried_stale,
        })
    }

    /// This thread's idle connections.
    fn shard(&self) -> &Idle {
        &self.idle[thread_shard()]
    }

    /// The most recently returned idle connection, closing any that idled too long.
    fn checkout(&self) -> Option<Pooled> {
        let now = super::poll_clock::now();
        let mut idle = self.shard().lock();
        let mut expired = expired(&mut idle, now);
        let mut conn = None;
        while let Some((mut newest, expires)) = idle.pop_back() {
            if expires > now {
                // Idle since `expires - max_idle`.
                newest.idled = now + newest.max_idle >= expires + STALE_AFTER;
                conn = Some(newest);
                break;
            }
            // Only with an upstream whose advertised timeout changed.
            expired.push(newest);
        }
        drop(idle);
        // Closed outside the lock.
        drop(expired);
        conn
    }

    /// Closes the connections of every shard idle for too long; returns how many.
    fn prune(&self, now: Instant) -> usize {
        self.idle
            .iter()
            .map(|shard| {
                let mut shard = shard.lock();
                let mut expired = expired(&mut shard, now);
                if shard.iter().any(|(_, expires)| *expires <= now) {
                    let (keep, out): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut *shard)
                        .into_iter()
                        .partition(|(_, expires)| *expires > now);
                    *shard = keep;
                    expired.extend(out.into_iter().map(|(conn, _)| conn));
                }
                drop(shard);
                // Closed (dropped) outside the lock.
                expired.len()
            })
            .sum()
    }

    /// Puts a connection whose last exchange is over back in the pool.
    fn put(&self, conn: Pooled) {
        if conn.max_idle.is_zero() {
            // The upstream keeps no idle connection.
            return;
        }
        let expires = super::poll_clock::now() + conn.max_idle;
        let mut idle = self.shard().lock();
        if idle.len() >= MAX_IDLE {
            // The oldest goes: the newest is the one most likely to be reused warm.
            idle.pop_front();
        }
        idle.push_back((conn, expires));
    }

    /// A new connection to the endpoint: TCP, and TLS over it if the service says so.
    async fn dial(&self) -> Result<Stream, UpstreamError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
            match &self.target {
                Target::Addr(addr) => TcpStream::connect(addr).await,
                Target::Host(host, port) => TcpStream::connect((&**host, *port)).await,
            }
        })
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.settings.tls {
            let host = match &self.target {
                Target::Addr(addr) => addr.ip().to_string(),
                Target::Host(host, _) => host.to_string(),
            };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.handshake(stream, &host))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout)?
                .map_err(UpstreamError::Tls)?;
            return Ok(Stream::Tls(Box::new(stream)));
        }
        Ok(Stream::Plain(stream))
    }

    /// A new connection. Boxed: a dial's state (the TCP connect, a TLS handshake, hyper's)
    /// is large, and the exchanges that reuse a connection, nearly all of them, would
    /// otherwise carry it and copy it with them.
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Pooled, UpstreamError>> + Send + '_>> {
        Box::pin(self.open())
    }

    async fn open(&self) -> Result<Pooled, UpstreamError> {
        let stream = self.dial().await?;
        let mut h1 = h1::Conn::new(stream);
        h1.set_host(self.host.clone());
        Ok(Box::new(Conn {
            h1,
            max_idle: IDLE_TIMEOUT,
            idled: false,
        }))
    }

    /// An idle connection ready for a request: one the upstream closed, or sent something
    /// on, is noticed here and dropped.
    fn ready_idle(&self) -> Option<Pooled> {
        while let Some(mut conn) = self.checkout() {
            // A cleartext socket is asked without a poll: no waker, no budget.
            let usable = conn.h1.idle_is_usable(|stream, read| match stream {
                Stream::Plain(tcp) => Some(tcp.try_read_buf(read)),
                #[cfg(feature = "tls")]
                Stream::Tls(_) => None,
            });
            if usable {
                return Some(conn);
            }
        }
        None
    }

    /// Sends `request` with what is `added` to it on an idle connection or a new one,
    /// over HTTP/1 or HTTP/2 as the endpoint speaks: each future boxed on its own, so
    /// neither carries the other's state.
    pub(crate) fn send(
        self: Arc<Self>,
        mut request: Request<Body>,
        added: h1::Added,
    ) -> SendFuture {
        if self.settings.h2 {
            added.apply(&mut request, None);
            let (number, open) = self.h2_held();
            // A shared word only for a request that finds no open connection (none yet,
            // or the one held has closed): it dials or waits for the next, whose number
            // its timeout must retire. One per connection, not per request.
            let dialled = (!open).then(|| Arc::new(AtomicU64::new(0)));
            let pool = self.clone();
            return SendFuture(Sending::H2 {
                pool,
                number,
                future: Box::pin(self.send_h2(request, dialled.clone())),
                dialled,
                done: false,
            });
        }
        match self.ready_idle() {
            // May be closed under the request: the path that keeps a copy of the head.
            Some(conn) if conn.idled => {
                added.apply(&mut request, None);
                SendFuture(Sending::Boxed(Box::pin(self.send_on(conn, true, request))))
            }
            Some(mut conn) => {
                // The endpoint's `Host` (the connection's), the forwarding fields and the
                // target are written with the head, not put into the request first (four
                // insertions into its map, and a URI parsed, saved); they are put there if
                // the request comes back unsent, to go on another connection.
                conn.h1.start_with(request, added);
                SendFuture(Sending::Pooled {
                    pool: self,
                    conn: Some(conn),
                })
            }
            None => {
                added.apply(&mut request, None);
                SendFuture(Sending::Boxed(Box::pin(async move {
                    let conn = self.connect().await?;
                    self.send_on(conn, false, request).await
                })))
            }
        }
    }

    /// `request` sent again, on a new connection, after a reused one failed under it.
    async fn resend(self: Arc<Self>, request: Request<Body>) -> Exchanged {
        let mut conn = self.connect().await?;
        let response = h1::exchange(&mut conn.h1, request)
            .await
            .map_err(UpstreamError::H1)?;
        Ok(self.respond(conn, response))
    }

    /// The response whose head came on `conn`, its body read from it.
    fn respond(self: &Arc<Self>, mut conn: Pooled, response: Response<()>) -> Response<PooledBody> {
        let facts = conn.h1.head_facts();
        // Without a `Keep-Alive` field (nearly always), nothing to look up.
        conn.max_idle = if facts.keep_alive() {
            max_idle(response.headers())
        } else {
            IDLE_TIMEOUT
        };
        response.map(|()| PooledBody::new(conn, self.clone(), facts))
    }

    /// This thread's HTTP/2 connection, if it is open, and its number.
    fn h2_sender(&self) -> Option<NumberedH2> {
        let shard = &self.h2[thread_shard()];
        let mut sender = shard.sender.lock();
        if sender.as_ref().is_some_and(|(_, s, _)| s.is_closed()) {
            shard.set(&mut sender, None);
        }
        sender.clone()
    }

    /// The number of this thread's HTTP/2 connection (0: none yet), and whether it is open
    /// (a closed one is replaced by the next request's dial).
    fn h2_held(&self) -> (u64, bool) {
        self.h2.get(thread_shard()).map_or((0, false), |shard| {
            shard
                .sender
                .lock()
                .as_ref()
                .map_or((0, false), |(n, sender, _)| (*n, !sender.is_closed()))
        })
    }

    /// A request sent while connection `number` was this thread's timed out before its
    /// answer's head: later requests go on a new connection. A connection that stalls
    /// without closing (a frozen upstream, a silent drop on the way) would otherwise get
    /// every request to its endpoint, each timing out, for as long as its socket stays
    /// open; an HTTP/1 connection is given up the same way. Streams still open on it
    /// finish there.
    pub(crate) fn h2_timed_out(&self, number: u64) {
        if let Some(shard) = self.h2.get(thread_shard()) {
            let mut sender = shard.sender.lock();
            if sender.as_ref().is_some_and(|(n, ..)| *n == number) {
                shard.set(&mut sender, None);
            }
        }
    }

    /// A request sent on connection `number` was given up before its answer's head: the
    /// gateway reset its stream there (see [`H2Ended::abandoned`]).
    fn h2_abandoned(&self, number: u64) {
        if let Some(shard) = self.h2.get(thread_shard())
            && let Some((n, _, ended)) = shard.sender.lock().as_ref()
            && *n == number
        {
            ended.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// This thread's HTTP/2 connection, dialled if there is none (or it closed), and its
    /// number.
    async fn h2_connection(&self) -> Result<NumberedH2, UpstreamError> {
        if let Some(sender) = self.h2_sender() {
            return Ok(sender);
        }
        let _dialing = self.dialing.lock().await;
        if let Some(sender) = self.h2_sender() {
            return Ok(sender);
        }
        let stream = self.dial().await?;
        let (sender, connection) =
            http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(UpstreamError::Http)?;
        // Driven by a task of its own: its streams belong to many requests. How it ended
        // tells the requests that failed with it whether that was the endpoint's doing.
        let ended = Arc::new(H2Ended::new());
        let tell = ended.clone();
        #[cfg(feature = "tracing")]
        let upstream = self.target.clone();
        tokio::spawn(async move {
            let calmed = connection.await.is_err_and(|e| calmed(&e));
            #[cfg(feature = "tracing")]
            if calmed {
                tracing::warn!(
                    target: "seawall::gateway",
                    ?upstream,
                    "the upstream ended an HTTP/2 connection with ENHANCE_YOUR_CALM (too many \
                     streams reset for clients that went away?): its requests are not \
                     counted against the endpoint; those it did not process, and idempotent \
                     ones without a body, are sent again on a new connection"
                );
            }
            tell.told.send_replace(Some(calmed));
        });
        let number = self.h2_made.fetch_add(1, Ordering::Relaxed) + 1;
        let connection = (number, sender, ended);
        let shard = &self.h2[thread_shard()];
        shard.set(&mut shard.sender.lock(), Some(connection.clone()));
        Ok(connection)
    }

    /// Why the exchange that failed with `error` on the HTTP/2 connection that `ended` is
    /// not the endpoint's failure, if it is not: a stream the upstream did not process,
    /// or a connection it ended with `ENHANCE_YOUR_CALM` or closed after the gateway reset
    /// streams on it. A request that failed with its
    /// connection (an I/O error: the streams a `GOAWAY` let through die with the socket)
    /// waits for the connection's task to tell how it ended; it has, or is about to.
    async fn h2_refusal(error: &hyper::Error, ended: &H2Ended) -> Option<H2Refusal> {
        match h2_error(error) {
            // Above the `last_stream_id` of a `GOAWAY(ENHANCE_YOUR_CALM)`: ended for the
            // gateway's conduct too.
            Some(e)
                if e.is_remote()
                    && e.is_go_away()
                    && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) =>
            {
                return Some(H2Refusal::Calmed);
            }
            Some(e)
                if e.is_remote()
                    && (e.is_go_away()
                        || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))) =>
            {
                return Some(H2Refusal::Unprocessed);
            }
            Some(e) if !e.is_io() => return None,
            _ => {}
        }
        let connection_lost = {
            let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
            std::iter::from_fn(|| {
                let e = current?;
                current = e.source();
                Some(e)
            })
            .any(|e| e.is::<io::Error>())
        };
        if !connection_lost {
            return None;
        }
        // The upstream closed the connection after the gateway reset streams on it: its
        // `GOAWAY(ENHANCE_YOUR_CALM)` may be lost (a server that closes its socket with
        // the gateway's frames unread resets the connection, and what it sent last may
        // never be read). Not the endpoint's ill health either.
        if ended.abandoned.load(Ordering::Relaxed) >= H2_CALM_RESETS {
            return Some(H2Refusal::Calmed);
        }
        // Bounded: an I/O error in the chain that is not the connection's (a request
        // body's own) leaves the connection open, and its task with nothing to tell.
        let mut told = ended.told.subscribe();
        let ending = tokio::time::timeout(H2_ENDING_WAIT, told.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()
            .map(|ending| *ending)?;
        (ending == Some(true)).then_some(H2Refusal::Calmed)
    }

    /// Sends `request` on the endpoint's HTTP/2 connection; if that connection turns out
    /// closed before the request could be sent on it, once more on a new one.
    /// `dialled`, if given, is told the number of the connection the request went on.
    async fn send_h2(
        self: Arc<Self>,
        mut request: Request<Body>,
        dialled: Option<Arc<AtomicU64>>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let on = |number: u64| {
            if let Some(dialled) = &dialled {
                dialled.store(number, Ordering::Relaxed);
            }
        };
        // HTTP/2 names the target in `:scheme` and `:authority`, not in `Host`.
        let target = http::uri::Builder::new()
            .scheme(self.settings.scheme())
            .authority(self.host.as_bytes())
            .path_and_query(request.uri().path_and_query().map_or("/", |p| p.as_str()))
            .build();
        if let Ok(uri) = target {
            *request.uri_mut() = uri;
        }
        request.headers_mut().remove(header::HOST);
        *request.version_mut() = http::Version::HTTP_2;
        // A request without a body can be sent again if the upstream refuses its stream
        // unprocessed or ends the connection with `ENHANCE_YOUR_CALM` (hyper keeps no
        // request it has sent): a copy of its head. One with a body cannot (its body,
        // streamed, is gone once sent).
        let copy = {
            use hyper::body::Body as _;
            request.body().is_end_stream().then(|| head_of(&request))
        };
        let (number, mut sender, ended) = self.h2_connection().await?;
        on(number);
        let response = match sender.try_send_request(request).await {
            Ok(response) => {
                ended.heard();
                response
            }
            Err(mut e) => match e.take_message() {
                Some(request) => {
                    self.count_retry(&UpstreamError::Closed);
                    if let Some(shard) = self.h2.get(thread_shard()) {
                        shard.set(&mut shard.sender.lock(), None);
                    }
                    self.h2_send_again(request, &on).await?
                }
                None => {
                    let e = e.into_error();
                    let refusal = Self::h2_refusal(&e, &ended).await;
                    // Not processed: whatever its method. Processed (on a connection
                    // the upstream ended for the gateway's conduct): if idempotent.
                    let retry = match refusal {
                        Some(H2Refusal::Unprocessed) => copy,
                        Some(H2Refusal::Calmed) => copy.filter(replayable),
                        None => None,
                    };
                    let (Some(refusal), Some(request)) = (refusal, retry) else {
                        // A stream refused unprocessed and not sent again (it had a body)
                        // is the endpoint's failure: an upstream refusing every stream
                        // (overloaded, stuck draining) would otherwise never be counted.
                        return Err(match refusal {
                            Some(H2Refusal::Calmed) => {
                                UpstreamError::H2Refused(H2Refusal::Calmed, e)
                            }
                            _ => UpstreamError::Http(e),
                        });
                    };
                    let e = UpstreamError::H2Refused(refusal, e);
                    self.count_retry(&e);
                    // Once more, on a new connection (not on the one going away).
                    self.h2_timed_out(number);
                    self.h2_send_again(request, &on).await?
                }
            },
        };
        if response.status().as_u16() > 599 {
            // 600 to 999 are no status codes (RFC 9110 §15), which hyper's HTTP/2 client
            // passes on: refused as an HTTP/1 upstream's are (a `502`, its failure).
            return Err(UpstreamError::H1(h1::Failure::Protocol(h1::ProtocolError(
                "invalid status code",
            ))));
        }
        Ok(response.map(|body| PooledBody::unpooled(body, self)))
    }

    /// Sends `request` once more, on this thread's HTTP/2 connection (a new one: the
    /// caller retired the one it failed on), telling `on` its number.
    async fn h2_send_again(
        &self,
        request: Request<Body>,
        on: &impl Fn(u64),
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let (number, mut sender, ended) = self.h2_connection().await?;
        on(number);
        match sender.send_request(request).await {
            Ok(response) => {
                ended.heard();
                Ok(response)
            }
            Err(e) => Err(Self::h2_failure(e, &ended).await),
        }
    }

    /// The error of a request that failed with `error` on the fresh HTTP/2 connection it
    /// was sent again on (or first sent on, after the one it was given had closed), which
    /// then `ended`: an [`UpstreamError::H2Refused`] if the upstream ended the connection
    /// with `ENHANCE_YOUR_CALM`. A stream refused unprocessed on a fresh connection is
    /// the endpoint's failure: it is not serving.
    async fn h2_failure(error: hyper::Error, ended: &H2Ended) -> UpstreamError {
        match Self::h2_refusal(&error, ended).await {
            Some(H2Refusal::Calmed) => UpstreamError::H2Refused(H2Refusal::Calmed, error),
            _ => UpstreamError::Http(error),
        }
    }

    /// Sends `request` on `conn`. If `conn` was `reused` and failed under the request
    /// (see the module's documentation for when), once more on a new connection.
    async fn send_on(
        self: Arc<Self>,
        mut conn: Pooled,
        reused: bool,
        mut request: Request<Body>,
    ) -> Exchanged {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        // A copy of the head, for a request that may be sent again after it was written.
        // Only for a connection that idled long enough for the upstream to close it: one
        // reused at once (every connection of a busy pool) costs no copy.
        let replay = (reused && conn.idled && replayable(&request)).then(|| head_of(&request));
        let response = match h1::exchange(&mut conn.h1, request).await {
            Ok(response) => response,
            Err(e) => {
                let retry = match conn.h1.take_unsent() {
                    // Not written: a reused connection closed under us.
                    Some(request) if reused => Some(request),
                    // Written, and the connection failed before any byte of an answer.
                    _ if !conn.h1.answered() && e.is_connection_lost() => replay,
                    _ => None,
                };
                let e = UpstreamError::H1(e);
                let Some(request) = retry else {
                    return Err(e);
                };
                // Once more, on a new connection.
                self.count_retry(&e);
                return self.resend(request).await;
            }
        };
        Ok(self.respond(conn, response))
    }

    /// Counts (and logs) a request sent again after `_error` on a reused connection (or a
    /// stream an HTTP/2 upstream refused).
    fn count_retry(&self, _error: &UpstreamError) {
        self.retried_stale.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        tracing::debug!(
            target: "seawall::gateway",
            upstream = ?self.target,
            error = %_error,
            "a reused upstream connection failed before answering: \
             the request is sent again on a new connection"
        );
    }
}

/// Whether `request` may be sent a second time after it was written: its method is
/// idempotent (RFC 9110, 9.2.2) and it has no body (a client's body, streamed, is gone
/// once sent).
fn replayable(request: &Request<Body>) -> bool {
    use hyper::body::Body as _;
    matches!(
        *request.method(),
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    ) && request.body().is_end_stream()
}

/// A copy of the head of `request`, with an empty body. Its extensions are not copied:
/// the upstream request has none that matter to hyper's HTTP/1 client.
fn head_of(request: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(super::body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// `Keep-Alive` (RFC 2068, 19.7.1.1; not a registered name of the `http` crate).
static KEEP_ALIVE: header::HeaderName = header::HeaderName::from_static("keep-alive");

/// How long a connection whose last response had these `headers` may stay idle: the
/// upstream's advertised `Keep-Alive: timeout=N` less a margin (a quarter of it, at most
/// 1 s: the upstream's clock starts a little before ours), at most [`IDLE_TIMEOUT`].
fn max_idle(headers: &http::HeaderMap) -> Duration {
    let Some(timeout) = headers
        .get(&KEEP_ALIVE)
        .and_then(|v| keep_alive_timeout(v.as_bytes()))
    else {
        return IDLE_TIMEOUT;
    };
    if timeout >= IDLE_TIMEOUT.as_secs() {
        return IDLE_TIMEOUT;
    }
    let timeout = Duration::from_secs(timeout);
    timeout - (timeout / 4).min(Duration::from_secs(1))
}

/// The `timeout` parameter of a `Keep-Alive` header value (`timeout=5, max=1000`), in
/// seconds; `None` without one, or if it is not a number. One pass over the bytes, no
/// allocation.
fn keep_alive_timeout(value: &[u8]) -> Option<u64> {
    value.split(|&b| b == b',').find_map(|param| {
        let param = param.trim_ascii();
        let eq = param.iter().position(|&b| b == b'=')?;
        let (name, value) = (param[..eq].trim_ascii(), param[eq + 1..].trim_ascii());
        if !name.eq_ignore_ascii_case(b"timeout") {
            return None;
        }
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        value.iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    })
}

/// Takes the connections expired by `now` off the front of a shard (oldest first, so
/// with one upstream's timeout, expired ones are at its front).
fn expired(idle: &mut VecDeque<(Pooled, Instant)>, now: Instant) -> Vec<Pooled> {
    let mut expired = Vec::new();
    while idle.front().is_some_and(|(_, expires)| *expires <= now) {
        expired.extend(idle.pop_front().map(|(conn, _)| conn));
    }
    expired
}

/// Every endpoint pool of a gateway, so that idle connections are closed on time even in
/// the pools of routes that have gone quiet.
#[derive(Default)]
pub(crate) struct Pools {
    all: parking_lot::Mutex<Vec<Weak<EndpointPool>>>,
    /// Requests sent again after a reused connection failed under them, in every pool.
    retried_stale: Arc<AtomicU64>,
}

impl Pools {
    /// A new pool for `instance`, swept with the others.
    pub(crate) fn pool(
        &self,
        instance: &Instance,
        settings: &UpstreamSettings,
    ) -> Arc<EndpointPool> {
        let pool = EndpointPool::new(instance, settings, self.retried_stale.clone());
        self.all.lock().push(Arc::downgrade(&pool));
        pool
    }

    /// How many requests were sent again on a new connection because the reused one
    /// they were written on failed before any byte of an answer (the gateway's
    /// `retried_stale`).
    pub(crate) fn retried_stale(&self) -> u64 {
        self.retried_stale.load(Ordering::Relaxed)
    }

    /// Closes the connections idle for too long in every pool, and forgets the pools of
    /// endpoints gone from discovery. Returns how many connections it closed.
    fn sweep(&self) -> usize {
        let pools: Vec<Arc<EndpointPool>> = {
            let mut all = self.all.lock();
            all.retain(|p| p.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        let now = Instant::now();
        pools.iter().map(|p| p.prune(now)).sum()
    }

    /// Sweeps every [`SWEEP_EVERY`] on a task of the current runtime, until the pools are
    /// dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(crate) fn spawn_sweeper(self: &Arc<Self>) {
        let pools = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(pools) = pools.upgrade() else { return };
                let _closed = pools.sweep();
                #[cfg(feature = "tracing")]
                if _closed > 0 {
                    tracing::debug!(
                        target: "seawall::gateway",
                        closed = _closed,
                        "idle upstream connections closed"
                    );
                }
            }
        });
    }
}

/// A response body: on HTTP/1, read from its connection, which goes back in the pool
/// once the body has been read to its end; on HTTP/2, a stream of the shared connection.
pub(crate) struct PooledBody {
    inner: Inner,
    pool: Arc<EndpointPool>,
    /// What the parse of the response head saw ([`HeadFacts::UNKNOWN`] over HTTP/2).
    facts: HeadFacts,
}

enum Inner {
    /// The connection, until the body has ended (or failed).
    H1(Option<Pooled>),
    H2(Incoming),
}

impl PooledBody {
    fn new(conn: Pooled, pool: Arc<EndpointPool>, facts: HeadFacts) -> Self {
        let mut body = Self {
            inner: Inner::H1(Some(conn)),
            pool,
            facts,
        };
        // No body (`HEAD`, `204`, `Content-Length: 0`): the connection is free at once.
        body.release_if_done();
        body
    }

    /// A body of a multiplexed (HTTP/2) connection: nothing to put back.
    fn unpooled(body: Incoming, pool: Arc<EndpointPool>) -> Self {
        Self {
            inner: Inner::H2(body),
            pool,
            facts: HeadFacts::UNKNOWN,
        }
    }

    /// What the parse of the response's head saw of the fields the gateway looks up in
    /// every response: a field it rules out need not be looked up.
    pub(crate) fn head_facts(&self) -> HeadFacts {
        self.facts
    }

    /// Once the body has ended, the connection goes back to the pool if it can carry
    /// another request (not if it is closing, or still sending this request's body).
    fn release_if_done(&mut self) {
        if let Inner::H1(slot) = &mut self.inner {
            if slot.as_ref().is_some_and(|conn| conn.h1.body_done()) {
                if let Some(mut conn) = slot.take() {
                    if conn.h1.is_reusable() {
                        conn.h1.shrink_idle();
                        self.pool.put(conn);
                    }
                }
            }
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Inner::H2(body) => {
                return Pin::new(body).poll_frame(cx).map_err(UpstreamError::Http);
            }
            // Ended: released, or failed.
            Inner::H1(None) => return Poll::Ready(None),
            Inner::H1(Some(conn)) => ready!(conn.h1.poll_body(cx)),
        };
        match frame {
            Some(Ok(frame)) => {
                this.release_if_done();
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                this.release_if_done();
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                // A failed body leaves the connection in an unknown state: it goes.
                this.inner = Inner::H1(None);
                Poll::Ready(Some(Err(UpstreamError::H1(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(None) => true,
            Inner::H1(Some(conn)) => conn.h1.body_done(),
            Inner::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(None) => SizeHint::with_exact(0),
            Inner::H1(Some(conn)) => conn
                .h1
                .body_remaining()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            Inner::H2(body) => body.size_hint(),
        }
    }
}

impl fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &matches!(self.inner, Inner::H1(Some(_))))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream whose first connection is closed as soon as it is accepted, and
    /// whose later ones answer `ok`; returns its address, the connections accepted, and
    /// a notice sent once the first is closed.
    async fn closing_first_upstream() -> (
        SocketAddr,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<tokio::sync::Notify>,
    ) {
        use std::sync::atomic::AtomicUsize;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (count, notify) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if count.fetch_add(1, Ordering::SeqCst) == 0 {
                    drop(stream);
                    notify.notify_one();
                    continue;
                }
                // Echoes the fields the pool may write without their being in the map.
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut response =
                        Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")));
                    if let Ok(target) = HeaderValue::from_str(&req.uri().to_string()) {
                        response.headers_mut().insert("x-seen-target", target);
                    }
                    for name in ["host", "x-forwarded-for", "x-forwarded-proto"] {
                        for value in req.headers().get_all(name) {
                            let echoed = format!("x-seen-{name}");
                            response
                                .headers_mut()
                                .append(http::HeaderName::try_from(echoed).unwrap(), value.clone());
                        }
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (addr, accepted, closed)
    }

    fn get() -> Request<Body> {
        Request::get("/")
            .body(super::super::body::full(""))
            .unwrap()
    }

    /// A pool, a connection of it the upstream has closed, the count of connections
    /// the upstream accepted, and the pool's count of requests sent again.
    async fn stale_connection() -> (
        Arc<EndpointPool>,
        Pooled,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<AtomicU64>,
    ) {
        let (addr, accepted, closed) = closing_first_upstream().await;
        let retried = Arc::new(AtomicU64::new(0));
        let pool = EndpointPool::new(
            &Instance::local("up", addr),
            &UpstreamSettings::default(),
            retried.clone(),
        );
        let stale = pool.connect().await.unwrap();
        closed.notified().await;
        (pool, stale, accepted, retried)
    }

    /// Checks that `send` was answered `ok` after being sent once more on a new
    /// connection; the answer's head.
    async fn answered_on_a_second_connection(
        send: impl Future<Output = Exchanged>,
        accepted: &std::sync::atomic::AtomicUsize,
        retried: &AtomicU64,
    ) -> http::HeaderMap {
        let response = send.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let head = response.headers().clone();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "sent again on a new one"
        );
        assert_eq!(retried.load(Ordering::SeqCst), 1);
        head
    }

    #[tokio::test]
    async fn a_reused_connection_closed_under_the_request_is_retried_once_on_a_new_one() {
        let (pool, stale, accepted, retried) = stale_connection().await;
        // As if taken from the pool an instant before the upstream's close arrived.
        let send = pool.clone().send_on(stale, true, get());
        answered_on_a_second_connection(send, &accepted, &retried).await;
    }

    #[tokio::test]
    async fn a_pooled_exchange_closed_under_the_request_is_retried_once_on_a_new_one() {
        let (pool, mut stale, accepted, retried) = stale_connection().await;
        // As `send` drives a connection taken from the pool an instant before the
        // upstream's close arrived: with the `Host` and forwarding fields written besides
        // the map's, which go again with the request.
        let mut request = get();
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("client.example"));
        let peer = HeaderValue::from_static("198.51.100.1");
        let forwarded =
            super::super::headers::rewrite(request.headers_mut(), Some(&peer), false, false)
                .forwarded;
        // `/api/x` was the client's, `/x` is what the upstream gets.
        *request.uri_mut() = http::Uri::from_static("/api/x");
        let added = h1::Added {
            forwarded,
            target_from: Some(5),
            ..h1::Added::default()
        };
        stale.h1.start_with(request, added);
        let send = SendFuture(Sending::Pooled {
            pool: pool.clone(),
            conn: Some(stale),
        });
        let seen = answered_on_a_second_connection(send, &accepted, &retried).await;
        let all = |name: &str| -> Vec<_> { seen.get_all(name).iter().cloned().collect() };
        assert_eq!(all("x-seen-host"), std::slice::from_ref(&pool.host));
        assert_eq!(all("x-seen-x-forwarded-for"), [peer]);
        assert_eq!(all("x-seen-x-forwarded-proto"), ["http"]);
        assert_eq!(all("x-seen-target"), ["/x"]);
    }

    #[test]
    fn the_keep_alive_timeout_is_parsed() {
        for (value, timeout) in [
            (&b"timeout=5"[..], Some(5)),
            (b"timeout=5, max=1000", Some(5)),
            (b"max=100 , Timeout = 15", Some(15)),
            (b"timeout=\"2\"", Some(2)),
            (b"timeout=0", Some(0)),
            (b"max=5", None),
            (b"timeout=", None),
            (b"timeout=-1", None),
            (b"timeout=1.5", None),
            (b"timeout=99999999999999999999", None),
            (b"timeout", None),
            (b"", None),
            (b",,=,", None),
        ] {
            assert_eq!(
                keep_alive_timeout(value),
                timeout,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn an_idle_connection_expires_a_little_before_the_advertised_timeout() {
        let idle = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("keep-alive", HeaderValue::from_static(value));
            max_idle(&headers)
        };
        assert_eq!(max_idle(&http::HeaderMap::new()), IDLE_TIMEOUT);
        assert_eq!(idle("max=10"), IDLE_TIMEOUT);
        assert_eq!(idle("timeout=0"), Duration::ZERO);
        assert_eq!(idle("timeout=1"), Duration::from_millis(750));
        assert_eq!(idle("timeout=2"), Duration::from_millis(1500));
        assert_eq!(idle("timeout=5"), Duration::from_secs(4));
        assert_eq!(idle("timeout=29"), Duration::from_secs(28));
        assert_eq!(idle("timeout=75"), IDLE_TIMEOUT);
    }

    #[tokio::test]
    async fn a_new_connection_closed_under_the_request_is_not_retried() {
        let (addr, accepted, closed) = closing_first_upstream().await;
        let pool = EndpointPool::new(
            &Instance::local("up", addr),
            &UpstreamSettings::default(),
            Arc::default(),
        );
        let fresh = pool.connect().await.unwrap();
        closed.notified().await;
        let error = pool.clone().send_on(fresh, false, get()).await.unwrap_err();
        assert!(matches!(error, UpstreamError::H1(_)), "{error}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "not sent again");
    }
}
