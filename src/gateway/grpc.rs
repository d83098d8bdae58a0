//! gRPC callers: the gateway's own answers in gRPC's form.
//!
//! A gRPC client reads the outcome of a call from `grpc-status`, not from the HTTP
//! status: a `429` or `503` with a JSON body is, to it, a broken response
//! (`UNKNOWN` or `UNAVAILABLE` with a message about the transport, whatever the reason).
//! So when a request says it is gRPC (`content-type: application/grpc`, alone or followed
//! by a `+proto`-style subtype or `;` parameters, or gRPC-Web's `application/grpc-web`
//! and `application/grpc-web-text`, likewise; not any other type that merely begins with
//! `application/grpc`), every answer the gateway makes itself (limits, open breakers,
//! timeouts, authentication, no route, a malformed request) is sent as a *trailers-only*
//! gRPC response: `200`, `content-type: application/grpc` (to a gRPC-Web caller, its own
//! family, `application/grpc-web` or `application/grpc-web-text`, with `+proto` if it
//! sent it), `grpc-status`, `grpc-message` (the problem's text, percent-encoded as the
//! gRPC spec asks), no body; `Retry-After` becomes `grpc-retry-pushback-ms` as well. The
//! upstream's own answers, and the route's configured fallback, pass unchanged.
//!
//! An upstream's gRPC answer counts for its endpoint by its `grpc-status`: from its head
//! (trailers-only), or, for gRPC over HTTP/2 (`application/grpc`), from the HTTP trailers
//! that end its body. A gRPC-Web answer (`application/grpc-web` or `-web-text`) carries
//! its status inside its body, in a trailers frame, which the gateway does not read:
//! without a `grpc-status` in its head it counts by its HTTP status, as any HTTP answer
//! does (a `200` is a success, whatever status its trailers frame has).
//!
//! | the gateway's answer | `grpc-status` |
//! |---|---|
//! | `429` rate limited, `413` body too large, `431` head too large | `RESOURCE_EXHAUSTED` (8) |
//! | `503` breakers open / no endpoint, `502` upstream unreachable | `UNAVAILABLE` (14) |
//! | `504` upstream timeout, `408` request body too slow | `DEADLINE_EXCEEDED` (4) |
//! | `401` authentication | `UNAUTHENTICATED` (16) |
//! | `404` no route | `UNIMPLEMENTED` (12) |
//! | `400` malformed request | `INTERNAL` (13), as gRPC's HTTP mapping says |
//! | `500` a limit keyed by the client's address and no address known (the gateway served as a `tower::Service` without the peer) | `INTERNAL` (13) |
//! | `503` a Redis limit failing closed while Redis is away | `UNAVAILABLE` (14), with pushback |
//! | anything else | gRPC's HTTP to gRPC mapping ([`GrpcCode::from_http_status`]) |
//!
//! A gRPC call's own deadline (`grpc-timeout`) bounds the route's timeout when it is the
//! shorter: the gateway answers `DEADLINE_EXCEEDED` when it passes, and counts it in the
//! route's `client_errors.deadline`, never against the endpoint (a caller choosing a
//! deadline of a microsecond must not open breakers). However long, it is what the end of
//! the call is judged by: the upstream's `DEADLINE_EXCEEDED` (trailers-only or in the
//! trailers) or a stream it resets once the deadline has passed is the caller's. A
//! malformed `grpc-timeout` is ignored (the route's timeout applies), as gRPC's servers
//! ignore one, and is not sent upstream; of several values the first is kept, and only
//! it is sent.

use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::{HeaderMap, Response, StatusCode};

use super::body::Body;
use super::client::{BodyState, ClientBodyError, ClientFault};
use crate::circuit_breaker::{Outcome, Recorder};
use crate::grpc::{Family, GrpcClassifier, GrpcCode, grpc_family};
use crate::rate_limit::http::{Refused, Undecided};

/// An endpoint's outcome still to record: a gRPC answer whose status comes in its
/// trailers. Carried from the balancer's classifier to the response body in the
/// response's extensions (which want `Clone`), taken out once by the body.
#[derive(Clone)]
pub(crate) struct PendingOutcome(Arc<parking_lot::Mutex<Option<Recorder>>>);

impl PendingOutcome {
    pub(crate) fn new(recorder: Recorder) -> Self {
        Self(Arc::new(parking_lot::Mutex::new(Some(recorder))))
    }

    /// The recorder, to the first taker.
    pub(crate) fn take(&self) -> Option<Recorder> {
        self.0.lock().take()
    }
}

/// Whether an upstream's `200` answer is a gRPC one whose status is still to come, in
/// its HTTP trailers: gRPC over HTTP/2's content type (`application/grpc`, alone or with
/// a subtype or parameters, [`grpc_family`]) and no `grpc-status` in its head.
///
/// A gRPC-Web answer (`application/grpc-web`, `application/grpc-web-text`) is not: its
/// status comes inside its body, in a trailers frame (a message flagged `0x80`,
/// PROTOCOL-WEB.md), and its HTTP body ends without trailers. Waited for here, every
/// call of a healthy gRPC-Web upstream ended as `INTERNAL`, its failure. Such an answer
/// is classified by its head alone, as the gateway reads no body: its `grpc-status`
/// when it has one (trailers-only), else its HTTP status (`200`: a success).
pub(crate) fn status_in_trailers(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| grpc_family(v.as_bytes()))
        .is_some_and(|(family, _)| family == Family::Grpc)
        && !headers.contains_key(&crate::grpc::GRPC_STATUS)
}

/// What the end of a gRPC answer's body is judged against, besides the upstream: the
/// client's own request body (an upstream stream the gateway reset because that body
/// failed or grew past the limit is the client's doing) and the caller's own deadline
/// (a gRPC server keeps the `grpc-timeout` it is sent, for the whole call).
/// Put in the response's extensions by the endpoint's call, for gRPC answers whose status
/// is still to come.
#[derive(Clone)]
pub(crate) struct CallContext {
    pub(crate) body: Option<Arc<BodyState>>,
    /// The caller's deadline (`grpc-timeout`), when it bounded the call.
    pub(crate) caller_deadline: Option<tokio::time::Instant>,
}

/// Records a gRPC answer's outcome once `frame` ends its body: the `grpc-status` of its
/// trailers (none: `INTERNAL`, as gRPC's clients read it), `INTERNAL` for a body ended
/// without trailers, a failure for a body that broke. A data frame records nothing.
///
/// The client's doing is never the upstream's: a body that broke because the client's
/// request body failed (the gateway reset the upstream's stream for it), and a
/// `DEADLINE_EXCEEDED` once the caller's own deadline has passed (the upstream kept the
/// `grpc-timeout` it was sent), are recorded as ignored and returned, for the route's
/// `client_errors`.
pub(crate) fn settle<E>(
    pending: &mut Option<Recorder>,
    call: Option<&CallContext>,
    frame: &Option<Result<hyper::body::Frame<bytes::Bytes>, E>>,
) -> Option<ClientFault> {
    let code = match frame {
        Some(Ok(frame)) => match frame.trailers_ref() {
            Some(trailers) => GrpcCode::from_headers(trailers).unwrap_or(GrpcCode::Internal),
            None => return None,
        },
        Some(Err(_)) => {
            let recorder = pending.take()?;
            // The client's body broke, or the caller's deadline has passed (a server that
            // cancels a call at its deadline resets the stream rather than ending it with
            // `DEADLINE_EXCEEDED`, as grpc-java does).
            let fault = call
                .and_then(|c| c.body.as_ref())
                .and_then(|b| b.failure())
                .map(|failure| match failure {
                    ClientBodyError::TooLarge(_) => ClientFault::TooLarge,
                    ClientBodyError::Read(_) => ClientFault::BadBody,
                })
                .or_else(|| {
                    call.and_then(|c| c.caller_deadline)
                        .is_some_and(|deadline| tokio::time::Instant::now() >= deadline)
                        .then_some(ClientFault::Deadline)
                });
            recorder.record(match fault {
                Some(_) => Outcome::Ignored,
                None => Outcome::Failure,
            });
            return fault;
        }
        None => GrpcCode::Internal,
    };
    let recorder = pending.take()?;
    if code == GrpcCode::DeadlineExceeded
        && call
            .and_then(|c| c.caller_deadline)
            .is_some_and(|deadline| tokio::time::Instant::now() >= deadline)
    {
        recorder.record(Outcome::Ignored);
        return Some(ClientFault::Deadline);
    }
    recorder.record(GrpcClassifier::new().classify_code(code));
    None
}

/// The trailers that end a gRPC answer the gateway cut after its head: `grpc-status` as
/// the gateway's own answer of `status` would have it ([`code_for`]), and `message`
/// percent-encoded as `grpc-message` is.
pub(crate) fn cut_trailers(status: StatusCode, message: &str) -> hyper::body::Frame<bytes::Bytes> {
    let mut trailers = HeaderMap::new();
    trailers.insert(
        crate::grpc::GRPC_STATUS,
        http::HeaderValue::from(code_for(status).as_i32()),
    );
    if let Ok(value) = http::HeaderValue::from_str(&crate::grpc::percent_encode(message)) {
        trailers.insert("grpc-message", value);
    }
    hyper::body::Frame::trailers(trailers)
}

/// Marks a response the gateway made itself, with the text a gRPC caller is told.
#[derive(Debug, Clone)]
pub(crate) struct Answer(pub(crate) Box<str>);

/// A gRPC (or gRPC-Web) caller, told by its request's `content-type`: the content type
/// the gateway's own answers to it carry, in its family (a gRPC-Web client rejects an
/// answer of `application/grpc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrpcCaller(&'static str);

impl GrpcCaller {
    /// The `content-type` of the gateway's own answers to this caller.
    fn content_type(self) -> http::HeaderValue {
        http::HeaderValue::from_static(self.0)
    }
}

/// The gRPC (or gRPC-Web) caller a request is from, by its `content-type`
/// ([`grpc_family`]); `None` for any other request.
///
/// Its answers' content type is the request's family (`application/grpc`,
/// `application/grpc-web` or `application/grpc-web-text`), with `+proto` when the request
/// has it (gRPC-Web's usual form); any other subtype or parameters are left out, to
/// allocate nothing: a trailers-only answer has no message to encode.
#[inline]
pub(crate) fn grpc_caller(headers: &HeaderMap) -> Option<GrpcCaller> {
    let (family, rest) = grpc_family(headers.get(header::CONTENT_TYPE)?.as_bytes())?;
    Some(GrpcCaller(match (family, rest) {
        (Family::Grpc, _) => "application/grpc",
        (Family::Web, b"+proto") => "application/grpc-web+proto",
        (Family::Web, _) => "application/grpc-web",
        (Family::WebText, b"+proto") => "application/grpc-web-text+proto",
        (Family::WebText, _) => "application/grpc-web-text",
    }))
}

/// A gRPC call's deadline (the caller has checked [`grpc_caller`]): its `grpc-timeout`
/// (`1*8DIGIT` and a unit, `H`, `M`, `S`, `m`, `u` or `n`), `None` without one or for a
/// malformed value. What goes upstream is the deadline the gateway keeps, or none: a
/// second value (which a server reading the last one would keep, answering
/// `DEADLINE_EXCEEDED` long before the deadline the gateway judges the call by) and a
/// malformed one (ignored here, as gRPC servers ignore one; refused by some) are removed.
#[inline]
pub(crate) fn caller_budget(headers: &mut HeaderMap) -> Option<Duration> {
    const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let mut values = headers.get_all(&GRPC_TIMEOUT).iter();
    let first = values.next()?;
    let budget = parse_timeout(first.as_bytes());
    if values.next().is_some() || budget.is_none() {
        let first = first.clone();
        headers.remove(&GRPC_TIMEOUT);
        if budget.is_some() {
            headers.insert(GRPC_TIMEOUT, first);
        }
    }
    budget
}

/// Marks a trailers-only gRPC answer of `DEADLINE_EXCEEDED` that came once the caller's
/// own deadline had passed: the caller's, not the upstream's failure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallersDeadline;

/// Whether a trailers-only gRPC answer (`headers`) is `DEADLINE_EXCEEDED` and
/// `caller_deadline` has passed.
pub(crate) fn past_callers_deadline(
    headers: &HeaderMap,
    caller_deadline: Option<tokio::time::Instant>,
) -> bool {
    caller_deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline)
        && GrpcCode::from_headers(headers) == Some(GrpcCode::DeadlineExceeded)
}

/// A `grpc-timeout` value: `1*8DIGIT TimeoutUnit`, as the gRPC over HTTP/2 spec has it.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC code for an answer of `status` made by the gateway.
fn code_for(status: StatusCode) -> GrpcCode {
    match status.as_u16() {
        413 | 429 | 431 => GrpcCode::ResourceExhausted,
        408 | 504 => GrpcCode::DeadlineExceeded,
        502 | 503 => GrpcCode::Unavailable,
        _ => GrpcCode::from_http_status(status),
    }
}

/// `response` as a gRPC caller is to get it: a trailers-only gRPC response in place of
/// one the gateway made itself, in the caller's content type; an upstream's answer (or a
/// fallback) unchanged.
pub(crate) fn for_grpc_caller(response: Response<Body>, caller: GrpcCaller) -> Response<Body> {
    let extensions = response.extensions();
    let (message, code) = match extensions.get::<Answer>() {
        Some(answer) => (answer.0.clone(), None),
        None if extensions.get::<Refused>().is_some() => ("rate limit exceeded".into(), None),
        // A limit's own `500` or `503`, which an upstream's answer of the same status is not.
        None => match extensions.get::<Undecided>() {
            Some(Undecided::MissingKey) => (
                "the rate limit key could not be taken from the request".into(),
                Some(GrpcCode::Internal),
            ),
            Some(Undecided::KeyNotSent) => (
                "the request does not carry the key its rate limit is taken from".into(),
                Some(GrpcCode::InvalidArgument),
            ),
            Some(_) => (
                "the rate limiter's store is unavailable".into(),
                Some(GrpcCode::Unavailable),
            ),
            None => return response,
        },
    };
    let (mut parts, _) = response.into_parts();
    let code = code.unwrap_or_else(|| code_for(parts.status));
    let pushback = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    crate::grpc::set_status_headers(&mut parts.headers, code, &message, pushback);
    parts
        .headers
        .insert(header::CONTENT_TYPE, caller.content_type());
    parts.status = StatusCode::OK;
    Response::from_parts(parts, super::body::full(bytes::Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse_timeout(b"0n"), Some(Duration::ZERO));
        assert_eq!(parse_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [
            &b""[..],
            b"m",
            b"100",
            b"123456789S",
            b"-1S",
            b"1.5S",
            b"10s",
            b" 1S",
        ] {
            assert_eq!(
                parse_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn grpc_requests_are_told_by_their_content_type() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_caller(&headers), None);
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc+json", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpc+", true),
            ("application/grpc-web", true),
            ("application/grpc-web+proto", true),
            ("application/grpc-web;charset=utf-8", true),
            ("application/grpc-web-text", true),
            ("application/grpc-web-text+proto", true),
            ("application/json", false),
            ("text/application/grpc", false),
            ("application/grpcfoo", false),
            ("application/grpc-", false),
            ("application/grpc-webby", false),
            ("application/grpc-web-", false),
            ("application/grpc-web-textual", false),
            ("application/grpc-text", false),
            ("application/grpc proto", false),
            ("Application/gRPC", false),
            ("application/gr", false),
            ("", false),
        ] {
            headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(value));
            assert_eq!(grpc_caller(&headers).is_some(), grpc, "{value}");
        }
    }

    #[test]
    fn grpc_web_callers_are_answered_in_their_own_content_type() {
        let mut headers = HeaderMap::new();
        for (value, answered) in [
            ("application/grpc", "application/grpc"),
            ("application/grpc+proto", "application/grpc"),
            ("application/grpc-web", "application/grpc-web"),
            ("application/grpc-web+proto", "application/grpc-web+proto"),
            ("application/grpc-web+json", "application/grpc-web"),
            ("application/grpc-web;charset=utf-8", "application/grpc-web"),
            ("application/grpc-web-text", "application/grpc-web-text"),
            (
                "application/grpc-web-text+proto",
                "application/grpc-web-text+proto",
            ),
            (
                "application/grpc-web-text+thrift",
                "application/grpc-web-text",
            ),
        ] {
            headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(value));
            assert_eq!(
                grpc_caller(&headers).map(GrpcCaller::content_type),
                Some(http::HeaderValue::from_static(answered)),
                "{value}"
            );
        }
    }

    #[test]
    fn only_grpc_over_http2_answers_wait_for_their_status_in_http_trailers() {
        let mut headers = HeaderMap::new();
        assert!(!status_in_trailers(&headers));
        for (value, waits) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc;charset=utf-8", true),
            // gRPC-Web: the status is in the body's trailers frame.
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/grpc-web-text", false),
            ("application/grpc-web-text+proto", false),
            // No gRPC content type.
            ("application/grpcfoo", false),
            ("application/json", false),
        ] {
            headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(value));
            assert_eq!(status_in_trailers(&headers), waits, "{value}");
        }
        // Trailers-only: the status is in the head.
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            crate::grpc::GRPC_STATUS,
            http::HeaderValue::from_static("0"),
        );
        assert!(!status_in_trailers(&headers));
    }

    #[test]
    fn answers_map_to_the_codes_in_the_table() {
        for (status, code) in [
            (429, GrpcCode::ResourceExhausted),
            (413, GrpcCode::ResourceExhausted),
            (431, GrpcCode::ResourceExhausted),
            (503, GrpcCode::Unavailable),
            (502, GrpcCode::Unavailable),
            (504, GrpcCode::DeadlineExceeded),
            (408, GrpcCode::DeadlineExceeded),
            (401, GrpcCode::Unauthenticated),
            (404, GrpcCode::Unimplemented),
            (400, GrpcCode::Internal),
            (500, GrpcCode::Unknown),
        ] {
            assert_eq!(code_for(StatusCode::from_u16(status).unwrap()), code);
        }
    }
}
