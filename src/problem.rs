//! HTTP answers in the shape of RFC 9457 (`application/problem+json`), shared by the
//! HTTP layers (feature `http`): the rate limiter's 429 and its missing-key 500, and
//! [`error_response`] / [`handle_error`], which answer a stack's errors the HTTP way (for
//! axum's `HandleErrorLayer`).
//!
//! | error, anywhere in the `source()` chain | answer |
//! |---|---|
//! | [`Rejection`](crate::circuit_breaker::Rejection) (typed errors, `try_acquire`, a balancer's endpoint breakers) | `503 Service Unavailable`, `Retry-After` when the breaker knows when it probes again |
//! | [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) (the default error mode's zero-sized rejection, which says no more) | `503 Service Unavailable` |
//! | [`NoEndpoints`](crate::balance::NoEndpoints) (a balancer with no endpoint to call) | `503 Service Unavailable` |
//! | [`RateLimited`](crate::rate_limit::RateLimited) | `429 Too Many Requests`, `Retry-After`, `RateLimit-Policy` / `RateLimit` (policy `default`) |
//! | [`HoldingOff`](crate::rate_limit::http::HoldingOff) (an upstream's `Retry-After` honoured by [`RetryAfterLayer`](crate::rate_limit::http::RetryAfterLayer)) | `503 Service Unavailable`, `Retry-After` the rest of the hold |
//! | tower's `timeout::error::Elapsed` | `504 Gateway Timeout` |
//! | anything else | `502 Bad Gateway` |
//!
//! ```
//! use std::time::Duration;
//! use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::default());
//! breaker.breaker().force_open();
//! let mut svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .timeout(Duration::from_secs(1))
//!     .service_fn(|_: ()| async { Ok::<_, seawall::BoxError>("hi") });
//! let error = svc.ready().await.unwrap().call(()).await.unwrap_err();
//! let response = seawall::problem::error_response::<String>(&error);
//! assert_eq!(response.status(), 503);
//! assert_eq!(response.headers()["content-type"], "application/problem+json");
//! // With axum: `.layer(HandleErrorLayer::new(seawall::problem::handle_error))`.
//! # }
//! ```

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// `application/problem+json` (RFC 9457).
pub static PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// A response body that can be built from bytes: what the layers that answer requests
/// themselves need. Implemented for the usual bodies (`String`, `Vec<u8>`, `Bytes`,
/// `http_body_util::Full<Bytes>`, `Empty<Bytes>` (the bytes dropped), the boxed bodies of
/// `http_body_util`, and axum's `Body` with the feature `axum`); implement it for your own.
pub trait ProblemBody: Sized {
    /// The body holding `bytes`.
    fn from_bytes(bytes: Bytes) -> Self;
}

impl ProblemBody for Bytes {
    fn from_bytes(bytes: Bytes) -> Self {
        bytes
    }
}

impl ProblemBody for Vec<u8> {
    fn from_bytes(bytes: Bytes) -> Self {
        bytes.into()
    }
}

impl ProblemBody for String {
    fn from_bytes(bytes: Bytes) -> Self {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl ProblemBody for http_body_util::Full<Bytes> {
    fn from_bytes(bytes: Bytes) -> Self {
        http_body_util::Full::new(bytes)
    }
}

impl ProblemBody for http_body_util::Empty<Bytes> {
    fn from_bytes(_: Bytes) -> Self {
        http_body_util::Empty::new()
    }
}

impl<E> ProblemBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

impl<E> ProblemBody for http_body_util::combinators::BoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed()
    }
}

#[cfg(feature = "axum")]
impl ProblemBody for axum::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        axum::body::Body::from(bytes)
    }
}

/// Escapes `s` into a JSON string's contents.
fn json_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// The RFC 9457 body `{"type":"about:blank","title":…,"status":…,"detail":…}`.
pub fn problem_json(status: StatusCode, detail: &str) -> Bytes {
    let mut s = String::with_capacity(96 + detail.len());
    s.push_str("{\"type\":\"about:blank\",\"title\":\"");
    json_escape(status.canonical_reason().unwrap_or("Error"), &mut s);
    s.push_str("\",\"status\":");
    s.push_str(&status.as_u16().to_string());
    s.push_str(",\"detail\":\"");
    json_escape(detail, &mut s);
    s.push_str("\"}");
    Bytes::from(s)
}

/// The body of a rate-limit layer's own 429, made once.
pub(crate) const RATE_LIMITED: &[u8] = br#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit exceeded; see Retry-After"}"#;

/// A response of `status` with a ready-made problem+json `body`: no formatting, no copy.
pub(crate) fn problem_static<B: ProblemBody>(
    status: StatusCode,
    body: &'static [u8],
) -> Response<B> {
    let mut response = Response::new(B::from_bytes(Bytes::from_static(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, PROBLEM_JSON.clone());
    response
}

/// A response of `status` with an `application/problem+json` body saying `detail`.
pub fn problem<B: ProblemBody>(status: StatusCode, detail: &str) -> Response<B> {
    let mut response = Response::new(B::from_bytes(problem_json(status, detail)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, PROBLEM_JSON.clone());
    response
}

/// Ceil to whole seconds, as `Retry-After` wants.
fn retry_after_secs(d: std::time::Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// The HTTP answer to a stack's `error`, by the first known error in its `source()` chain
/// (see the [module docs](self)), with an `application/problem+json` body whose `detail`
/// is the error's message (the breaker's name and state, say: keep messages you do not
/// want shown out of it, or map those errors yourself first).
pub fn error_response<B: ProblemBody>(error: &crate::BoxError) -> Response<B> {
    let (status, detail, retry_after) = match refusal_of(error) {
        Refusal::Open(open, retry_after) => (
            StatusCode::SERVICE_UNAVAILABLE,
            open.to_string(),
            retry_after,
        ),
        Refusal::NoEndpoints(none) => (StatusCode::SERVICE_UNAVAILABLE, none.to_string(), None),
        Refusal::Limited(limited) => {
            let mut response = problem(StatusCode::TOO_MANY_REQUESTS, &limited.to_string());
            crate::rate_limit::http::refusal_headers(limited, response.headers_mut());
            return response;
        }
        // The upstream asked to be left alone: pass its wait on to the caller.
        Refusal::HoldingOff(hold) => (
            StatusCode::SERVICE_UNAVAILABLE,
            hold.to_string(),
            Some(hold.retry_after()),
        ),
        Refusal::Timeout(e) => (StatusCode::GATEWAY_TIMEOUT, e.to_string(), None),
        Refusal::Other => (StatusCode::BAD_GATEWAY, error.to_string(), None),
    };
    let mut response = problem(status, &detail);
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, retry_after_secs(after));
    }
    response
}

/// What a stack's error is, by the first of seawall's refusals (or a timeout) in its
/// `source()` chain: what [`error_response`] and the gRPC answers
/// (`seawall::grpc::refusal_response`) answer by.
pub(crate) enum Refusal<'a> {
    /// A breaker refused the call: its message, and when it probes again if the error
    /// says ([`Rejection`](crate::circuit_breaker::Rejection) does, the default mode's
    /// zero-sized [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) does not).
    Open(
        &'a (dyn std::error::Error + 'static),
        Option<std::time::Duration>,
    ),
    /// A balancer had no endpoint.
    NoEndpoints(&'a crate::balance::NoEndpoints),
    /// A limit refused it.
    Limited(&'a crate::rate_limit::RateLimited),
    /// An upstream's `Retry-After` is being honoured.
    HoldingOff(&'a crate::rate_limit::http::HoldingOff),
    /// tower's timeout passed.
    Timeout(&'a (dyn std::error::Error + 'static)),
    /// None of these.
    Other,
}

pub(crate) fn refusal_of(error: &crate::BoxError) -> Refusal<'_> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if let Some(rejection) = e.downcast_ref::<crate::circuit_breaker::Rejection>() {
            return Refusal::Open(e, rejection.retry_after());
        }
        if e.is::<crate::circuit_breaker::CircuitOpen>() {
            return Refusal::Open(e, None);
        }
        if let Some(none) = e.downcast_ref::<crate::balance::NoEndpoints>() {
            return Refusal::NoEndpoints(none);
        }
        if let Some(limited) = e.downcast_ref::<crate::rate_limit::RateLimited>() {
            return Refusal::Limited(limited);
        }
        if let Some(hold) = e.downcast_ref::<crate::rate_limit::http::HoldingOff>() {
            return Refusal::HoldingOff(hold);
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return Refusal::Timeout(e);
        }
        current = e.source();
    }
    Refusal::Other
}

/// [`error_response`] as the function axum's `HandleErrorLayer` takes:
/// `.layer(HandleErrorLayer::new(seawall::problem::handle_error))`. It takes any error that
/// converts into a [`BoxError`](crate::BoxError), so a breaker with
/// [typed errors](crate::circuit_breaker::CircuitBreakerLayer::typed_errors) can sit right
/// under it, its rejections answered with `Retry-After`.
pub async fn handle_error<E: Into<crate::BoxError>>(
    error: E,
) -> Response<http_body_util::Full<Bytes>> {
    error_response(&error.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_429_is_the_formatted_one() {
        assert_eq!(
            RATE_LIMITED,
            &problem_json(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded; see Retry-After"
            )[..]
        );
    }

    #[test]
    fn bodies_are_json() {
        let body = problem_json(StatusCode::TOO_MANY_REQUESTS, "a \"quoted\"\n\\ detail");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(v["title"], "Too Many Requests");
        assert_eq!(v["detail"], "a \"quoted\"\n\\ detail");
    }
}
