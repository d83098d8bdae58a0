//! gRPC-aware classification (feature `grpc`).
//!
//! gRPC answers a failed call with HTTP `200 OK` and puts its status in `grpc-status`: in
//! the headers of a trailers-only response (an error before any message), or in the
//! trailers at the end of the body. [`HttpClassifier`](crate::circuit_breaker::HttpClassifier)
//! or [`ErrorsAreFailures`](crate::circuit_breaker::ErrorsAreFailures) would count every
//! such call as a success. [`GrpcClassifier`] reads the status instead:
//!
//! * [`GrpcBodyLayer`], placed *inside* the breaker or under the balancer (around each
//!   endpoint, such as a tonic `Channel`), wraps every response body in a [`GrpcBody`];
//! * the breaker (or balancer) hands the call's [`Recorder`] to the classifier
//!   ([`Classify::record`]). A trailers-only response or a non-200 HTTP status is decided
//!   at once; otherwise the recorder goes into the [`GrpcBody`], which records when the
//!   body ends:
//!   * trailers: their `grpc-status`, classified as configured (missing: `INTERNAL`);
//!   * a body error (a stream reset, a broken connection): a failure;
//!   * the end of the body without trailers: `INTERNAL`, as the gRPC spec says (a
//!     gRPC-Web answer is decided by its head instead: [below](#grpc-web));
//!   * the body dropped before its end (the client cancelled, or stopped reading a
//!     stream): nothing is recorded, as for [`Outcome::Ignored`]: a client's own
//!     cancellation never counts against an upstream.
//!
//! By default `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL` and
//! `UNKNOWN` are failures, `CANCELLED` is ignored and every other code is a success;
//! [`GrpcClassifier::with_failures`], [`fail_on`](GrpcClassifier::fail_on),
//! [`ignore`](GrpcClassifier::ignore) and [`succeed_on`](GrpcClassifier::succeed_on)
//! change that. A non-200 HTTP status is mapped to a code as the gRPC spec's HTTP to gRPC
//! status mapping says (429, 502, 503 and 504 are `UNAVAILABLE`), and a transport error
//! (an `Err` from the service) is a failure.
//!
//! With a tonic client, the stack over a `Channel` is
//! `CircuitBreakerLayer::new(config).with_classifier(GrpcClassifier::new())` over
//! `GrpcBodyLayer`; its response body is a `GrpcBody<tonic::body::Body>`, which tonic's
//! generated clients accept as they accept any `http_body::Body`:
//!
//! ```ignore
//! let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051").connect().await?;
//! let svc = tower::ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(config).with_classifier(GrpcClassifier::new()))
//!     .layer(GrpcBodyLayer)
//!     .service(channel);
//! let mut client = HealthClient::new(svc);
//! ```
//!
//! A runnable example, with a service answering `UNAVAILABLE` in its trailers:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, StreamBody};
//! use http_body::Frame;
//! use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow, State};
//! use seawall::grpc::{GrpcBodyLayer, GrpcClassifier};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), seawall::BoxError> {
//! let layer = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::builder()
//!         .name("inventory")
//!         .sliding_window(SlidingWindow::count_based(2))
//!         .minimum_calls(2)
//!         .build()?,
//! )
//! .with_classifier(GrpcClassifier::new());
//! let breaker = layer.breaker().clone();
//!
//! // HTTP 200, one message, then `grpc-status: 14` (UNAVAILABLE) in the trailers.
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .layer(GrpcBodyLayer)
//!     .service_fn(|_req: http::Request<()>| async {
//!         let mut trailers = http::HeaderMap::new();
//!         trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
//!         let frames = vec![
//!             Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
//!             Ok(Frame::trailers(trailers)),
//!         ];
//!         Ok::<_, Infallible>(http::Response::new(StreamBody::new(futures::stream::iter(frames))))
//!     });
//!
//! for _ in 0..2 {
//!     let response = svc.ready().await?.call(http::Request::new(())).await?;
//!     // Still closed: the status is in the trailers, read with the body.
//!     assert_eq!(breaker.state(), State::Closed);
//!     let _ = response.into_body().collect().await;
//! }
//! assert_eq!(breaker.state(), State::Open);
//! # Ok(())
//! # }
//! ```
//!
//! The balancers ([`Balance`](crate::balance::Balance),
//! [`HashBalance`](crate::balance::HashBalance)) take the classifier through
//! [`BalanceBuilder::classifier`](crate::balance::BalanceBuilder::classifier); with each
//! endpoint wrapped in [`GrpcBodyLayer`], an endpoint's outlier detection, latency and
//! endpoint breaker see the same outcome, recorded when its body ends. An endpoint's call
//! then counts as outstanding until its response body ends or is dropped.
//!
//! A deferred call's duration (for the breaker's slow-call rate and the balancers'
//! latency) runs until its body ends: for long-lived streams, leave the slow-call
//! threshold off or above the streams' lifetime.
//!
//! # gRPC-Web
//!
//! A gRPC-Web answer (`application/grpc-web`, `application/grpc-web-text`, as tonic-web
//! and Envoy's grpc_web filter send them) carries its status inside its body, in a
//! trailers frame (a message flagged `0x80`, PROTOCOL-WEB.md), and its HTTP body ends
//! without trailers. [`GrpcClassifier`] does not read bodies: such an answer is decided by
//! its head, its `grpc-status` when it has one (trailers-only) and otherwise its HTTP
//! status, so a `200` is a success whatever its trailers frame says. (Waiting for HTTP
//! trailers would record every healthy gRPC-Web call as `INTERNAL`.) To count gRPC-Web
//! failures, classify the calls under the gRPC-Web translation, where they are plain
//! gRPC.
//!
//! # Refusals as gRPC statuses
//!
//! A gRPC caller reads `grpc-status`, not errors of the transport: to a tonic client, a
//! stack's error is a `Status` of code `UNKNOWN` (or `UNAVAILABLE`) with the error's
//! text. [`GrpcRefusalLayer`], on top of a client's (or a server's) stack, answers
//! seawall's own refusals as trailers-only gRPC responses instead ([`refusal_response`]),
//! with `grpc-retry-pushback-ms` (gRPC's retry pushback) when the refusal says when to
//! come back:
//!
//! | error, anywhere in the `source()` chain | `grpc-status` |
//! |---|---|
//! | [`RateLimited`](crate::rate_limit::RateLimited) | `RESOURCE_EXHAUSTED` (8), pushback: when a token comes |
//! | [`Rejection`](crate::circuit_breaker::Rejection) (typed errors, `try_acquire`, a balancer's endpoint breakers) | `UNAVAILABLE` (14), pushback: when the breaker probes again |
//! | [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) (the default error mode's zero-sized rejection) | `UNAVAILABLE` (14) |
//! | [`NoEndpoints`](crate::balance::NoEndpoints) | `UNAVAILABLE` (14) |
//! | [`HoldingOff`](crate::rate_limit::http::HoldingOff) | `UNAVAILABLE` (14), pushback: the rest of the hold |
//! | tower's `timeout::error::Elapsed` | `DEADLINE_EXCEEDED` (4) |
//! | anything else | passed on as the error it is (tonic makes its own status of it) |
//!
//! [`Recorder`]: crate::circuit_breaker::Recorder
//! [`Classify::record`]: crate::circuit_breaker::Classify::record
//! [`Outcome::Ignored`]: crate::circuit_breaker::Outcome::Ignored

use std::fmt;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::circuit_breaker::{Classify, Outcome, Recorder};

/// `grpc-status`, made once: looking a field up by a `&str` parses the name first, at
/// every response.
pub(crate) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// A gRPC status code (`grpc-status`), 0 to 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum GrpcCode {
    /// 0: not an error.
    Ok = 0,
    /// 1: the operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// 2: an unknown error (also any code outside 0–16).
    Unknown = 2,
    /// 3: the client specified an invalid argument.
    InvalidArgument = 3,
    /// 4: the deadline expired before the operation could complete.
    DeadlineExceeded = 4,
    /// 5: some requested entity was not found.
    NotFound = 5,
    /// 6: the entity that a client attempted to create already exists.
    AlreadyExists = 6,
    /// 7: the caller does not have permission.
    PermissionDenied = 7,
    /// 8: some resource has been exhausted (a quota, the server's capacity).
    ResourceExhausted = 8,
    /// 9: the system is not in a state required for the operation.
    FailedPrecondition = 9,
    /// 10: the operation was aborted (a concurrency conflict).
    Aborted = 10,
    /// 11: the operation was attempted past the valid range.
    OutOfRange = 11,
    /// 12: the operation is not implemented or supported.
    Unimplemented = 12,
    /// 13: an internal error.
    Internal = 13,
    /// 14: the service is currently unavailable.
    Unavailable = 14,
    /// 15: unrecoverable data loss or corruption.
    DataLoss = 15,
    /// 16: the request lacks valid authentication credentials.
    Unauthenticated = 16,
}

impl GrpcCode {
    const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The code for a number; anything outside 0–16 is [`Unknown`](Self::Unknown), as the
    /// gRPC spec says of codes a client does not know.
    pub const fn from_i32(code: i32) -> Self {
        if code >= 0 && code <= 16 {
            Self::ALL[code as usize]
        } else {
            Self::Unknown
        }
    }

    /// The code's number.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// The code in a `grpc-status` value (ASCII decimal); anything else is
    /// [`Unknown`](Self::Unknown).
    pub const fn from_bytes(value: &[u8]) -> Self {
        match value {
            [d @ b'0'..=b'9'] => Self::from_i32((*d - b'0') as i32),
            [b'1', d @ b'0'..=b'6'] => Self::from_i32(10 + (*d - b'0') as i32),
            _ => Self::Unknown,
        }
    }

    /// The `grpc-status` in `headers` (headers of a trailers-only response, or trailers),
    /// if there is one.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        headers
            .get(&GRPC_STATUS)
            .map(|value| Self::from_bytes(value.as_bytes()))
    }

    /// The code for a response whose HTTP status is not `200 OK`, as the gRPC spec's HTTP
    /// to gRPC status mapping says: 400 `INTERNAL`, 401 `UNAUTHENTICATED`, 403
    /// `PERMISSION_DENIED`, 404 `UNIMPLEMENTED`, 429, 502, 503 and 504 `UNAVAILABLE`,
    /// anything else `UNKNOWN`.
    pub const fn from_http_status(status: http::StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::Internal,
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::Unimplemented,
            429 | 502 | 503 | 504 => Self::Unavailable,
            _ => Self::Unknown,
        }
    }

    /// The code's name as the gRPC spec writes it (`"UNAVAILABLE"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Failures by default: `UNKNOWN`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL`,
/// `UNAVAILABLE`.
const DEFAULT_FAILURES: u32 = GrpcCode::Unknown.bit()
    | GrpcCode::DeadlineExceeded.bit()
    | GrpcCode::ResourceExhausted.bit()
    | GrpcCode::Internal.bit()
    | GrpcCode::Unavailable.bit();

/// The gRPC classifier (feature `grpc`): classifies a call by its `grpc-status`, read from
/// the headers of a trailers-only response or, through a [`GrpcBody`], from the trailers
/// when the body ends (see the [module docs](self)).
///
/// Responses must have a [`GrpcBody`]: put [`GrpcBodyLayer`] inside the breaker or around
/// each balanced endpoint.
///
/// ```
/// use seawall::circuit_breaker::Outcome;
/// use seawall::grpc::{GrpcClassifier, GrpcCode};
///
/// let default = GrpcClassifier::new();
/// assert_eq!(default.classify_code(GrpcCode::Unavailable), Outcome::Failure);
/// assert_eq!(default.classify_code(GrpcCode::NotFound), Outcome::Success);
/// assert_eq!(default.classify_code(GrpcCode::Cancelled), Outcome::Ignored);
///
/// // Only these two are failures; every other code counts as before.
/// let narrow = GrpcClassifier::new()
///     .with_failures([GrpcCode::Unavailable, GrpcCode::DeadlineExceeded])
///     .ignore(GrpcCode::ResourceExhausted);
/// assert_eq!(narrow.classify_code(GrpcCode::Internal), Outcome::Success);
/// assert_eq!(narrow.classify_code(GrpcCode::ResourceExhausted), Outcome::Ignored);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcClassifier {
    /// Bit `c` set: code `c` is a failure.
    failures: u32,
    /// Bit `c` set: code `c` is ignored (never also a failure).
    ignored: u32,
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcClassifier {
    /// `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL` and `UNKNOWN`
    /// are failures, `CANCELLED` is ignored, every other code is a success.
    pub const fn new() -> Self {
        Self {
            failures: DEFAULT_FAILURES,
            ignored: GrpcCode::Cancelled.bit(),
        }
    }

    /// Exactly these codes are failures; the others are successes, or ignored if they
    /// were.
    #[must_use]
    pub fn with_failures(mut self, codes: impl IntoIterator<Item = GrpcCode>) -> Self {
        self.failures = 0;
        for code in codes {
            self = self.fail_on(code);
        }
        self
    }

    /// Counts `code` as a failure.
    #[must_use]
    pub const fn fail_on(mut self, code: GrpcCode) -> Self {
        self.failures |= code.bit();
        self.ignored &= !code.bit();
        self
    }

    /// Leaves `code` out of the window.
    #[must_use]
    pub const fn ignore(mut self, code: GrpcCode) -> Self {
        self.ignored |= code.bit();
        self.failures &= !code.bit();
        self
    }

    /// Counts `code` as a success.
    #[must_use]
    pub const fn succeed_on(mut self, code: GrpcCode) -> Self {
        self.ignored &= !code.bit();
        self.failures &= !code.bit();
        self
    }

    /// The outcome for a status code.
    pub const fn classify_code(&self, code: GrpcCode) -> Outcome {
        if self.failures & code.bit() != 0 {
            Outcome::Failure
        } else if self.ignored & code.bit() != 0 {
            Outcome::Ignored
        } else {
            Outcome::Success
        }
    }

    /// The outcome for a response if its head decides it: a non-200 HTTP status (mapped
    /// with [`GrpcCode::from_http_status`]), a `grpc-status` header (a trailers-only
    /// response), or a gRPC-Web content type (`application/grpc-web`, `-web-text`: a
    /// success, see the [module docs](self#grpc-web)); `None` when the status is to come
    /// in the trailers.
    ///
    /// An answer a seawall rate limit made itself is [`Outcome::Ignored`], whatever its
    /// status: marked [`Refused`](crate::rate_limit::http::Refused) (an HTTP limit's
    /// `429`, or [`GrpcRefusalLayer`]'s `RESOURCE_EXHAUSTED` for a limit's refusal) or
    /// [`Undecided`](crate::rate_limit::http::Undecided) (a missing key, a store that
    /// could not be reached). A client's own refusals are not the dependency's failures.
    pub fn classify_head<B>(&self, response: &http::Response<B>) -> Option<Outcome> {
        if response.status() != http::StatusCode::OK {
            if crate::circuit_breaker::http::answered_by_a_rate_limit(response) {
                return Some(Outcome::Ignored);
            }
            return Some(self.classify_code(GrpcCode::from_http_status(response.status())));
        }
        let headers = response.headers();
        if let Some(code) = GrpcCode::from_headers(headers) {
            if code != GrpcCode::Ok
                && crate::circuit_breaker::http::answered_by_a_rate_limit(response)
            {
                return Some(Outcome::Ignored);
            }
            return Some(self.classify_code(code));
        }
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| grpc_family(v.as_bytes()))
            .is_some_and(|(family, _)| family != Family::Grpc)
            .then(|| self.classify_code(GrpcCode::Ok))
    }
}

impl<B, E: 'static> Classify<http::Response<GrpcBody<B>>, E> for GrpcClassifier {
    /// The outcome as far as the response's head tells: a status still to come in the
    /// trailers is [`Outcome::Ignored`] here. The breaker and the balancers call
    /// [`record`](Classify::record), which waits for the trailers.
    fn classify(&self, result: Result<&http::Response<GrpcBody<B>>, &E>) -> Outcome {
        match result {
            Ok(response) => self.classify_head(response).unwrap_or(Outcome::Ignored),
            Err(error) => crate::circuit_breaker::classify::error_outcome(error),
        }
    }

    /// Records at once when the head decides, else when the body ends.
    fn record(&self, result: &mut Result<http::Response<GrpcBody<B>>, E>, recorder: Recorder) {
        match result {
            Ok(response) => match self.classify_head(response) {
                Some(outcome) => recorder.record(outcome),
                None => response.body_mut().defer(recorder, *self),
            },
            // A limit's own refusal is not the dependency's failure (see
            // `refused_locally`).
            Err(error) => recorder.record(crate::circuit_breaker::classify::error_outcome(error)),
        }
    }
}

/// Which of gRPC's content types a request's (or an answer's) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// gRPC over HTTP/2: `application/grpc`.
    Grpc,
    /// gRPC-Web: `application/grpc-web`.
    Web,
    /// gRPC-Web, base64-encoded: `application/grpc-web-text`.
    WebText,
}

/// The gRPC family of a `content-type` value, and what follows its name (empty, a
/// `+subtype` or `;parameters`); `None` for any other content type.
///
/// gRPC over HTTP/2 has `application/grpc` followed by nothing, `+` (a subtype, `+proto`)
/// or `;` (parameters), as grpc-go's `ContentSubtype` reads it; gRPC-Web (PROTOCOL-WEB.md)
/// has `application/grpc-web` and `application/grpc-web-text`, likewise. The match is
/// byte for byte, case-sensitive, as grpc-go's servers match (they do not lowercase the
/// value): `application/grpcfoo`, `application/grpc-webby` or `Application/gRPC` are not
/// gRPC. No allocation: it runs on every request.
#[inline]
pub(crate) fn grpc_family(value: &[u8]) -> Option<(Family, &[u8])> {
    let rest = value.strip_prefix(b"application/grpc")?;
    let (family, rest) = if let Some(rest) = rest.strip_prefix(b"-web-text") {
        (Family::WebText, rest)
    } else if let Some(rest) = rest.strip_prefix(b"-web") {
        (Family::Web, rest)
    } else {
        (Family::Grpc, rest)
    };
    match rest.first() {
        None | Some(b'+' | b';') => Some((family, rest)),
        Some(_) => None,
    }
}

/// An outcome to record when the body ends.
struct Deferred {
    recorder: Recorder,
    classifier: GrpcClassifier,
}

pin_project! {
    /// A response body that records the call's outcome when it ends (feature `grpc`): by
    /// the `grpc-status` of its trailers, `INTERNAL` if it ends without one, a failure on
    /// a body error; dropped before its end, it records nothing. Made by
    /// [`GrpcBodyLayer`]; see the [module docs](self).
    pub struct GrpcBody<B> {
        #[pin]
        inner: B,
        // Empty (no allocation) unless a classifier deferred an outcome to the end.
        deferred: Vec<Deferred>,
    }
}

impl<B: Default> Default for GrpcBody<B> {
    /// An empty body (of a trailers-only answer, say), with nothing to record.
    fn default() -> Self {
        Self::new(B::default())
    }
}

impl<B> GrpcBody<B> {
    /// Wraps `inner`; nothing is recorded until [`defer`](Self::defer) is called.
    pub const fn new(inner: B) -> Self {
        Self {
            inner,
            deferred: Vec::new(),
        }
    }

    /// Records with `recorder` when the body ends, classifying its trailers'
    /// `grpc-status` with `classifier`.
    pub fn defer(&mut self, recorder: Recorder, classifier: GrpcClassifier) {
        self.deferred.push(Deferred {
            recorder,
            classifier,
        });
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body; outcomes still deferred are dropped unrecorded.
    pub fn into_inner(self) -> B {
        self.inner
    }

    fn settle(deferred: &mut Vec<Deferred>, status: Result<GrpcCode, Outcome>) {
        for Deferred {
            recorder,
            classifier,
        } in deferred.drain(..)
        {
            let outcome = match status {
                Ok(code) => classifier.classify_code(code),
                Err(outcome) => outcome,
            };
            recorder.record(outcome);
        }
    }
}

impl<B: Body> Body for GrpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !this.deferred.is_empty() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        let code = GrpcCode::from_headers(trailers).unwrap_or(GrpcCode::Internal);
                        Self::settle(this.deferred, Ok(code));
                    }
                }
                Some(Err(_)) => Self::settle(this.deferred, Err(Outcome::Failure)),
                None => Self::settle(this.deferred, Ok(GrpcCode::Internal)),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // An outcome still to record: one more poll, to see how the body ends.
        self.deferred.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug> fmt::Debug for GrpcBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcBody")
            .field("inner", &self.inner)
            .field("deferred", &self.deferred.len())
            .finish()
    }
}

/// Wraps every response body of the service in a [`GrpcBody`] (feature `grpc`), so that
/// [`GrpcClassifier`] can record outcomes at the end of the body. Goes inside the breaker,
/// or around each balanced endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcBodyLayer;

impl<S> Layer<S> for GrpcBodyLayer {
    type Service = GrpcBodyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcBodyService { inner }
    }
}

/// The service of [`GrpcBodyLayer`]: `inner` with its response bodies wrapped in
/// [`GrpcBody`].
#[derive(Debug, Clone)]
pub struct GrpcBodyService<S> {
    inner: S,
}

impl<S> GrpcBodyService<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, B> Service<Req> for GrpcBodyService<S>
where
    S: Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<GrpcBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Response future of [`GrpcBodyService`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<GrpcBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(self.project().inner.poll(cx))?;
        Poll::Ready(Ok(response.map(GrpcBody::new)))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::*;
    use crate::circuit_breaker::{Breaker, CircuitBreakerConfig, SlidingWindow, State};

    fn breaker() -> Breaker {
        Breaker::new(
            CircuitBreakerConfig::builder()
                .name("grpc-unit")
                .sliding_window(SlidingWindow::count_based(2))
                .minimum_calls(2)
                .build()
                .expect("valid"),
        )
    }

    fn response(status: u16, headers: &[(&'static str, &'static str)]) -> http::Response<()> {
        let mut response = http::Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        response.body(()).expect("valid response")
    }

    /// A body: one data frame, then `trailers` if any (else it just ends), or an error.
    #[derive(Debug)]
    struct TestBody {
        frames: Vec<Result<Frame<Bytes>, &'static str>>,
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            Poll::Ready(if self.frames.is_empty() {
                None
            } else {
                Some(self.frames.remove(0))
            })
        }
    }

    fn body(trailer: Option<&'static str>, error: bool) -> GrpcBody<TestBody> {
        let mut frames = vec![Ok(Frame::data(Bytes::from_static(b"m")))];
        if error {
            frames.push(Err("reset"));
        } else if let Some(status) = trailer {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static(status));
            frames.push(Ok(Frame::trailers(trailers)));
        }
        GrpcBody::new(TestBody { frames })
    }

    /// Records through the classifier twice (the window's size); the breaker's state after.
    async fn twice(
        make: impl Fn() -> Result<http::Response<GrpcBody<TestBody>>, Infallible>,
    ) -> State {
        let breaker = breaker();
        for _ in 0..2 {
            let mut result = make();
            let ticket = breaker.try_acquire().expect("closed");
            GrpcClassifier::new().record(&mut result, Recorder::from(ticket));
            let Ok(response) = result;
            let _ = response.into_body().collect().await;
        }
        breaker.state()
    }

    #[test]
    fn codes() {
        assert_eq!(GrpcCode::from_bytes(b"14"), GrpcCode::Unavailable);
        assert_eq!(GrpcCode::from_bytes(b"0"), GrpcCode::Ok);
        assert_eq!(GrpcCode::from_bytes(b"16"), GrpcCode::Unauthenticated);
        assert_eq!(GrpcCode::from_bytes(b"17"), GrpcCode::Unknown);
        assert_eq!(GrpcCode::from_bytes(b""), GrpcCode::Unknown);
        assert_eq!(GrpcCode::from_bytes(b"x"), GrpcCode::Unknown);
        assert_eq!(GrpcCode::from_i32(-1), GrpcCode::Unknown);
        for (n, code) in GrpcCode::ALL.iter().enumerate() {
            assert_eq!(code.as_i32(), n as i32);
            assert_eq!(GrpcCode::from_bytes(n.to_string().as_bytes()), *code);
        }
        assert_eq!(GrpcCode::Unavailable.to_string(), "UNAVAILABLE");
        for (status, code) in [
            (400, GrpcCode::Internal),
            (401, GrpcCode::Unauthenticated),
            (403, GrpcCode::PermissionDenied),
            (404, GrpcCode::Unimplemented),
            (429, GrpcCode::Unavailable),
            (502, GrpcCode::Unavailable),
            (503, GrpcCode::Unavailable),
            (504, GrpcCode::Unavailable),
            (500, GrpcCode::Unknown),
        ] {
            let status = http::StatusCode::from_u16(status).expect("valid");
            assert_eq!(GrpcCode::from_http_status(status), code, "{status}");
        }
    }

    #[test]
    fn configuration() {
        let c = GrpcClassifier::new();
        for code in GrpcCode::ALL {
            let expected = match code {
                GrpcCode::Unavailable
                | GrpcCode::DeadlineExceeded
                | GrpcCode::ResourceExhausted
                | GrpcCode::Internal
                | GrpcCode::Unknown => Outcome::Failure,
                GrpcCode::Cancelled => Outcome::Ignored,
                _ => Outcome::Success,
            };
            assert_eq!(c.classify_code(code), expected, "{code}");
        }
        let c = c
            .with_failures([GrpcCode::NotFound, GrpcCode::Cancelled])
            .succeed_on(GrpcCode::NotFound);
        assert_eq!(c.classify_code(GrpcCode::Cancelled), Outcome::Failure);
        assert_eq!(c.classify_code(GrpcCode::NotFound), Outcome::Success);
        assert_eq!(c.classify_code(GrpcCode::Unavailable), Outcome::Success);
    }

    #[test]
    fn head_decides() {
        let c = GrpcClassifier::new();
        assert_eq!(
            c.classify_head(&response(200, &[("grpc-status", "14")])),
            Some(Outcome::Failure)
        );
        assert_eq!(
            c.classify_head(&response(200, &[("grpc-status", "5")])),
            Some(Outcome::Success)
        );
        assert_eq!(c.classify_head(&response(503, &[])), Some(Outcome::Failure));
        assert_eq!(c.classify_head(&response(404, &[])), Some(Outcome::Success));
        assert_eq!(c.classify_head(&response(200, &[])), None);
        let ok: Result<_, Infallible> = Ok(response(200, &[]).map(|()| body(None, false)));
        assert_eq!(c.classify(ok.as_ref()), Outcome::Ignored);
        let err: Result<http::Response<GrpcBody<TestBody>>, &str> = Err("refused");
        assert_eq!(c.classify(err.as_ref()), Outcome::Failure);
    }

    #[tokio::test]
    async fn trailers_decide_at_the_end() {
        let ok = |t, e| move || Ok(response(200, &[]).map(|()| body(t, e)));
        assert_eq!(twice(ok(Some("14"), false)).await, State::Open);
        assert_eq!(twice(ok(Some("0"), false)).await, State::Closed);
        assert_eq!(twice(ok(Some("5"), false)).await, State::Closed);
        // A body error, or an end without `grpc-status`: failures.
        assert_eq!(twice(ok(None, true)).await, State::Open);
        assert_eq!(twice(ok(None, false)).await, State::Open);
        // Trailers-only: decided at once, the body is never read for it.
        let head = || Ok(response(200, &[("grpc-status", "14")]).map(|()| body(Some("0"), false)));
        assert_eq!(twice(head).await, State::Open);
    }

    #[test]
    fn a_dropped_body_records_nothing() {
        let breaker = breaker();
        for _ in 0..4 {
            let mut result: Result<_, Infallible> =
                Ok(response(200, &[]).map(|()| body(Some("14"), false)));
            let ticket = breaker.try_acquire().expect("closed");
            GrpcClassifier::new().record(&mut result, Recorder::from(ticket));
            drop(result);
        }
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.snapshot().calls, 0);
    }
}

/// Makes `headers` those of a trailers-only gRPC answer: `content-type:
/// application/grpc`, `grpc-status: code`, `grpc-message` (percent-encoded as the gRPC
/// spec asks: bytes outside printable ASCII, and `%`), and `grpc-retry-pushback-ms` when
/// `pushback` is given; `content-length` removed. Other headers are kept.
pub fn set_status_headers(
    headers: &mut http::HeaderMap,
    code: GrpcCode,
    message: &str,
    pushback: Option<Duration>,
) {
    headers.remove(http::header::CONTENT_LENGTH);
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from(code.as_i32()));
    if let Ok(value) = http::HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    if let Some(pushback) = pushback {
        let millis = u64::try_from(pushback.as_millis()).unwrap_or(u64::MAX);
        headers.insert("grpc-retry-pushback-ms", http::HeaderValue::from(millis));
    }
}

/// `grpc-message`'s encoding: bytes outside printable ASCII (`0x20`–`0x7E`), and `%`
/// itself, as `%XX`.
pub(crate) fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The trailers-only gRPC answer to one of seawall's refusals found in `error`'s
/// `source()` chain (see the [module docs](self#refusals-as-grpc-statuses)), with an
/// empty body; `None` for any other error. A rate limit's refusal
/// (`RESOURCE_EXHAUSTED`) is marked [`Refused`](crate::rate_limit::http::Refused) in the
/// extensions, as the HTTP limit's `429` is, so that a [`GrpcClassifier`] further out
/// does not count it against the dependency.
pub fn refusal_response<B: Default>(error: &crate::BoxError) -> Option<http::Response<B>> {
    use crate::problem::Refusal;
    let (code, message, pushback) = match crate::problem::refusal_of(error) {
        Refusal::Limited(limited) => (
            GrpcCode::ResourceExhausted,
            limited.to_string(),
            limited.retry_after(),
        ),
        Refusal::Open(open, retry_after) => (GrpcCode::Unavailable, open.to_string(), retry_after),
        Refusal::NoEndpoints(none) => (GrpcCode::Unavailable, none.to_string(), None),
        Refusal::HoldingOff(hold) => (
            GrpcCode::Unavailable,
            hold.to_string(),
            Some(hold.retry_after()),
        ),
        Refusal::Timeout(e) => (GrpcCode::DeadlineExceeded, e.to_string(), None),
        Refusal::Other => return None,
    };
    let mut response = http::Response::new(B::default());
    set_status_headers(response.headers_mut(), code, &message, pushback);
    if code == GrpcCode::ResourceExhausted {
        // A limit's refusal, as the HTTP limit's `429` is marked: classifiers further out
        // do not count it against the dependency.
        response
            .extensions_mut()
            .insert(crate::rate_limit::http::Refused);
    }
    Some(response)
}

/// Answers the refusals of the stack it wraps as gRPC statuses ([`refusal_response`]):
/// put it on top of a tonic client's channel stack (or a tonic server's layers), above the
/// limits, breakers and balancers whose refusals it answers.
///
/// ```
/// use seawall::grpc::GrpcRefusalLayer;
/// use seawall::rate_limit::{Quota, Rate, RateLimitLayer};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// // In a client: `.service(channel)`, a tonic `Channel` or seawall's balancer.
/// let mut stack = ServiceBuilder::new()
///     .layer(GrpcRefusalLayer)
///     .layer(RateLimitLayer::new(Quota::new(Rate::per_second(10), 1)?))
///     .service_fn(|_: ()| async { Ok::<_, seawall::BoxError>(http::Response::new(String::new())) });
/// assert!(stack.ready().await?.call(()).await?.headers().get("grpc-status").is_none());
/// let refused = stack.ready().await?.call(()).await?;
/// assert_eq!(refused.headers()["grpc-status"], "8"); // RESOURCE_EXHAUSTED
/// assert_eq!(refused.headers()["grpc-retry-pushback-ms"], "100");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcRefusalLayer;

impl<S> Layer<S> for GrpcRefusalLayer {
    type Service = GrpcRefusal<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcRefusal { inner }
    }
}

/// The service of [`GrpcRefusalLayer`].
#[derive(Debug, Clone)]
pub struct GrpcRefusal<S> {
    inner: S,
}

impl<S> GrpcRefusal<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req, B> Service<Req> for GrpcRefusal<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<crate::BoxError>,
    B: Default,
{
    type Response = http::Response<B>;
    type Error = crate::BoxError;
    type Future = RefusalFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        RefusalFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The future of [`GrpcRefusal`].
    pub struct RefusalFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F: fmt::Debug> fmt::Debug for RefusalFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusalFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<F, B, E> Future for RefusalFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<crate::BoxError>,
    B: Default,
{
    type Output = Result<http::Response<B>, crate::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(self.project().inner.poll(cx)) {
            Ok(response) => Poll::Ready(Ok(response)),
            Err(e) => {
                let e = e.into();
                Poll::Ready(refusal_response(&e).ok_or(e))
            }
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;
    use crate::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    use tower::ServiceExt;

    #[test]
    fn the_message_is_percent_encoded() {
        assert_eq!(percent_encode("plain text"), "plain text");
        assert_eq!(percent_encode("100% é\n"), "100%25 %C3%A9%0A");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_is_unavailable_with_pushback_and_other_errors_pass() {
        let layer = CircuitBreakerLayer::new(
            CircuitBreakerConfig::builder()
                .wait_in_open(Duration::from_secs(2))
                .build()
                .unwrap(),
        );
        layer.breaker().force_open();
        let mut stack = tower::ServiceBuilder::new()
            .layer(GrpcRefusalLayer)
            .layer(layer)
            .service_fn(|fail: bool| async move {
                if fail {
                    Err(crate::BoxError::from("connection refused"))
                } else {
                    Ok(http::Response::new(String::from("ok")))
                }
            });
        let refused = stack.ready().await.unwrap().call(false).await.unwrap();
        assert_eq!(refused.status(), 200);
        assert_eq!(refused.headers()["grpc-status"], "14");
        assert_eq!(refused.headers()["content-type"], "application/grpc");
        assert!(refused.body().is_empty());
        assert!(refused.headers().contains_key("grpc-message"));

        let other: crate::BoxError = "connection refused".into();
        assert!(refusal_response::<String>(&other).is_none());
        let elapsed: crate::BoxError = Box::new(tower::timeout::error::Elapsed::new());
        let answer = refusal_response::<String>(&elapsed).unwrap();
        assert_eq!(answer.headers()["grpc-status"], "4");
    }
}
