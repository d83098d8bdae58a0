//! The tower layer over the Redis-backed limiter: a refusal is an error.

use std::fmt;

use tower::Service;

use super::{RedisRateLimiter, SHARED_KEY};
use crate::BoxError;
use crate::rate_limit::{KeyOf, MissingKey, OnMissingKey, error::log_missing_key, key_of};

/// Limits requests per key through a [`RedisRateLimiter`], for a fleet sharing one limit.
/// A refused request fails with [`RedisLimitError`](super::RedisLimitError) (boxed)
/// without reaching the inner service. A request without a key is handled per
/// [`OnMissingKey`]: by default it fails with [`MissingKey`](crate::rate_limit::MissingKey),
/// never silently unlimited.
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
    on_missing_key: OnMissingKey,
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
        Self {
            limiter,
            extractor,
            on_missing_key: OnMissingKey::default(),
        }
    }

    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]: it fails with [`MissingKey`], and an error is logged).
    /// [`OnMissingKey::Shared`] limits such requests together, under one Redis key of
    /// their own.
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.on_missing_key = policy;
        self
    }
}

impl<S, E: Clone> tower::Layer<S> for RedisRateLimitLayer<E> {
    type Service = RedisRateLimit<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisRateLimit {
            inner,
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            on_missing_key: self.on_missing_key,
        }
    }
}

/// The service of [`RedisRateLimitLayer`].
#[derive(Clone)]
pub struct RedisRateLimit<S, E> {
    inner: S,
    limiter: RedisRateLimiter,
    extractor: E,
    on_missing_key: OnMissingKey,
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
        let key = match key_of(&self.extractor, &request, self.on_missing_key, "redis") {
            KeyOf::Key(key) => Some(key.as_ref().to_owned()),
            KeyOf::Shared => Some(SHARED_KEY.to_owned()),
            KeyOf::Unlimited => None,
            KeyOf::Missing => {
                log_missing_key("redis");
                return Box::pin(async { Err(Box::new(MissingKey) as BoxError) });
            }
        };
        let limiter = self.limiter.clone();
        Box::pin(async move {
            if let Some(key) = key {
                limiter.acquire(&key, 1).await?;
            }
            inner.call(request).await.map_err(Into::into)
        })
    }
}
