//! HTTP response fallbacks (feature `http`).

use std::future::{Ready, ready};
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::policy::{Handler, Policy};

/// Answers every failure with an HTTP response built afresh from a status, headers and
/// bytes (for any body `B: From<Bytes>`: axum's `Body`, `Full<Bytes>`, `Bytes`...). See
/// [`FallbackLayer::response`](super::FallbackLayer::response).
///
/// What it keeps is `Send + Sync` whatever the body type, so the layer fits where a shared
/// `Response<Body>` does not (axum's `route_service` wants a `Sync` service, and
/// [`Value`](super::Value) of a response holds the response itself).
#[derive(Debug)]
pub struct HttpResponse<B> {
    parts: Arc<(StatusCode, HeaderMap, Bytes)>,
    _body: PhantomData<fn() -> B>,
}

impl<B> Clone for HttpResponse<B> {
    fn clone(&self) -> Self {
        Self {
            parts: self.parts.clone(),
            _body: PhantomData,
        }
    }
}

impl<B> HttpResponse<B> {
    pub(crate) fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self {
            parts: Arc::new((status, headers, body)),
            _body: PhantomData,
        }
    }

    /// A `content-type` for the body (replacing any given before).
    #[must_use]
    pub fn content_type(mut self, value: HeaderValue) -> Self {
        let parts = Arc::make_mut(&mut self.parts);
        parts.1.insert(http::header::CONTENT_TYPE, value);
        self
    }

    fn build(&self) -> Response<B>
    where
        B: From<Bytes>,
    {
        let (status, headers, body) = &*self.parts;
        let mut response = Response::new(B::from(body.clone()));
        *response.status_mut() = *status;
        *response.headers_mut() = headers.clone();
        response
    }
}

impl<Req, B: From<Bytes>, E> Policy<Req, Response<B>, E> for HttpResponse<B> {
    type Handler = Self;

    fn handler(&self, _: &Req) -> Self {
        self.clone()
    }
}

impl<B: From<Bytes>, E> Handler<Response<B>, E> for HttpResponse<B> {
    type Future = Ready<Result<Response<B>, E>>;

    fn on_error(self, _: E) -> Self::Future {
        ready(Ok(self.build()))
    }
}
