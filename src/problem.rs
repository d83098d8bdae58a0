//! HTTP answers in the shape of RFC 9457 (`application/problem+json`), shared by the
//! HTTP layers (feature `http`): the rate limiter's 429 and its missing-key 500.

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

/// A response of `status` with an `application/problem+json` body saying `detail`.
pub fn problem<B: ProblemBody>(status: StatusCode, detail: &str) -> Response<B> {
    let mut response = Response::new(B::from_bytes(problem_json(status, detail)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, PROBLEM_JSON.clone());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json() {
        let body = problem_json(StatusCode::TOO_MANY_REQUESTS, "a \"quoted\"\n\\ detail");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(v["title"], "Too Many Requests");
        assert_eq!(v["detail"], "a \"quoted\"\n\\ detail");
    }
}
