//! The gateway's body type and the answers it makes itself, shared by the routes, the
//! upstream pool and the server (so that neither depends on another for them).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Body as _;

use crate::BoxError;

/// The body type of every request and response through the gateway.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body of bytes.
/// An empty body: boxes a zero-sized value, so allocates nothing.
pub(crate) fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Makes `response` the answer to a `HEAD` request when it is one the gateway made
/// itself (a `404`, a refusal, a fallback, an admin page): its body, whole here, is
/// dropped, and its length goes in `Content-Length`, as its `GET` would have had it (RFC
/// 9110 §9.3.2, §8.6). An answer that has a `Content-Length` or an empty body (an
/// upstream's answer to `HEAD`) is left as it is.
///
/// Called by the servers for `HEAD` requests only, and does nothing to a proxied answer
/// but read its body's size hint.
pub(crate) fn answer_head(response: &mut Response<Body>) {
    let Some(length) = response.body().size_hint().exact().filter(|&n| n > 0) else {
        return;
    };
    if response.headers().contains_key(header::CONTENT_LENGTH) {
        return;
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    *response.body_mut() = empty();
}

/// The gateway's own error answers: RFC 9457 `application/problem+json`, as
/// [`seawall::problem`](crate::problem) answers for the layers.
/// Marked as the gateway's own ([`Answer`](super::grpc::Answer)): a gRPC caller gets it in
/// gRPC's form.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = crate::problem::problem(status, message);
    response
        .extensions_mut()
        .insert(super::grpc::Answer(message.into()));
    response
}
