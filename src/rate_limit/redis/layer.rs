//! The tower layer over the Redis-backed limiter: a refusal is an error.

use std::fmt;

use tower::Service;

use super::RedisRateLimiter;
use crate::BoxError;

/// Limits requests per key through a [`RedisRateLimiter`], for a fleet sharing one limit.
/// A refused request fails with [`RedisLimitError`](super::RedisLimitError) (boxed) without reaching the inner
/// service; requests without a key pass unlimited.
///
/// The check needs a round trip before the inner service is called, so the call holds a
/// ready clone of the inner service (tower's usual pattern) and its future is boxed.
///
/// ```no_run
/// use seawall::rate_limit::redis::{RedisRateLimitLayer, RedisRateLimiter};
/// use seawall::rate_limit::{Quota, Rate};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::BoxError> {
/// let limiter = RedisRateLimiter::builder("redis://127.0.0.1:6379", Quota::new(Rate::per_minute(600), 60)?)
///     .build()?;
/// let svc = ServiceBuilder::new()
///     .layer(RedisRateLimitLayer::new(limiter, |tenant: &String| Some(tenant.clone())))
///     .service_fn(|_tenant: String| async { Ok::<_, seawall::BoxError>("ok") });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisRateLimitLayer<E> {
    limiter: RedisRateLimiter,
    extractor: E,
}

impl<E> fmt::Debug for RedisRateLimitLayer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitLayer")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<E> RedisRateLimitLayer<E> {
    /// Limits each request under the key `extractor` takes from it.
    pub fn new(limiter: RedisRateLimiter, extractor: E) -> Self {
        Self { limiter, extractor }
    }
}

impl<S, E: Clone> tower::Layer<S> for RedisRateLimitLayer<E> {
    type Service = RedisRateLimit<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisRateLimit {
            inner,
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

/// The service of [`RedisRateLimitLayer`].
#[derive(Clone)]
pub struct RedisRateLimit<S, E> {
    inner: S,
    limiter: RedisRateLimiter,
    extractor: E,
}

impl<S: fmt::Debug, E> fmt::Debug for RedisRateLimit<S, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, E, Request> Service<Request> for RedisRateLimit<S, E>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    E: crate::rate_limit::KeyExtractor<Request>,
    E::Key: AsRef<str>,
    Request: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The ready service goes into the future; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let key = self
            .extractor
            .extract(&request)
            .map(|k| k.as_ref().to_owned());
        let limiter = self.limiter.clone();
        Box::pin(async move {
            if let Some(key) = key {
                limiter.acquire(&key, 1).await?;
            }
            inner.call(request).await.map_err(Into::into)
        })
    }
}
