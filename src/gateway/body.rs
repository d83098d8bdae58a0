//! The gateway's body type and the answers it makes itself, shared by the routes, the
//! upstream pool and the server (so that neither depends on another for them).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

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
