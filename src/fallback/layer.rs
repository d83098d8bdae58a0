use std::sync::Arc;

use tower::Layer;

use super::Fallback;
use super::policy::{FromAsyncFn, FromFn, Value, When};

/// Wraps services in a [`Fallback`]. See the [module docs](super).
///
/// Clones of the layer share the policy (and so a [`LastKnownGood`](super::LastKnownGood)
/// cache).
///
/// ```
/// use seawall::fallback::{FallbackLayer, is_circuit_open};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// // Any failure: a fixed value.
/// let mut quotes = ServiceBuilder::new()
///     .layer(FallbackLayer::value("the sea is calm"))
///     .service_fn(|_: ()| async { Err::<&str, _>("upstream down") });
/// assert_eq!(quotes.ready().await?.call(()).await?, "the sea is calm");
///
/// // A closure that sees the error (by value), only for an open breaker's rejections.
/// let mut prices = ServiceBuilder::new()
///     .layer(FallbackLayer::from_fn(|_err: seawall::BoxError| 0u32).when(is_circuit_open))
///     .service_fn(|_: ()| async { Err::<u32, seawall::BoxError>("timeout".into()) });
/// // Not an open breaker: the error goes through.
/// assert!(prices.ready().await?.call(()).await.is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FallbackLayer<P> {
    policy: Arc<P>,
}

impl<P> FallbackLayer<P> {
    /// A layer applying a custom [`Policy`](super::Policy).
    pub fn new(policy: P) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }

    /// Applies the fallback only to errors for which `predicate` is true; the others are
    /// returned unchanged.
    #[must_use]
    pub fn when<F>(self, predicate: F) -> FallbackLayer<When<P, F>>
    where
        P: Clone,
    {
        let policy = Arc::try_unwrap(self.policy).unwrap_or_else(|shared| P::clone(&shared));
        FallbackLayer::new(When {
            policy,
            predicate: Arc::new(predicate),
        })
    }
}

impl<R> FallbackLayer<Value<R>> {
    /// Answers every failure with a clone of `value`.
    pub fn value(value: R) -> Self {
        Self::new(Value::new(value))
    }
}

#[cfg(feature = "http")]
impl<B> FallbackLayer<super::HttpResponse<B>> {
    /// Answers every failure with an HTTP response of `status`, `headers` and `body`,
    /// built afresh for each use (the layer is `Send + Sync` whatever `B` is, as axum's
    /// `route_service` needs).
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, StatusCode};
    /// use seawall::fallback::{FallbackLayer, is_circuit_open};
    /// use tower::{Service, ServiceBuilder, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut svc = ServiceBuilder::new()
    ///     .layer(
    ///         FallbackLayer::response(StatusCode::OK, HeaderMap::new(), r#"{"stock":null}"#)
    ///             .when(is_circuit_open),
    ///     )
    ///     .service_fn(|_: ()| async {
    ///         Err::<http::Response<http_body_util::Full<bytes::Bytes>>, seawall::BoxError>(
    ///             "down".into(),
    ///         )
    ///     });
    /// let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    /// assert_eq!(err.to_string(), "down"); // not a breaker's rejection: passed through
    /// # }
    /// ```
    pub fn response(
        status: http::StatusCode,
        headers: http::HeaderMap,
        body: impl Into<bytes::Bytes>,
    ) -> Self {
        Self::new(super::HttpResponse::new(status, headers, body.into()))
    }

    /// Sets the fallback response's `content-type`.
    #[must_use]
    pub fn content_type(self, value: http::HeaderValue) -> Self {
        let policy = Arc::try_unwrap(self.policy).unwrap_or_else(|shared| (*shared).clone());
        Self::new(policy.content_type(value))
    }
}

impl<F> FallbackLayer<FromFn<F>> {
    /// Answers a failure with `f(error)`.
    pub fn from_fn(f: F) -> Self {
        Self::new(FromFn::new(f))
    }
}

impl<F> FallbackLayer<FromAsyncFn<F>> {
    /// Answers a failure with the output of `f(error).await`.
    pub fn from_async_fn(f: F) -> Self {
        Self::new(FromAsyncFn::new(f))
    }
}

impl<S, P> Layer<S> for FallbackLayer<P> {
    type Service = Fallback<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback::from_shared(inner, self.policy.clone())
    }
}
