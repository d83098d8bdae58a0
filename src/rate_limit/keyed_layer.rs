use std::fmt;
use std::hash::Hash;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::clock::{Clock, TokioClock};
use super::future::ResponseFuture;
use super::{Cost, KeyExtractor, KeyedRateLimiter};
use crate::BoxError;

/// Limits requests per key: each request draws from the bucket of the key `key_fn` takes
/// from it (any [`KeyExtractor`], closures included), in a shared [`KeyedRateLimiter`].
/// Requests for which `key_fn` returns `None` are not limited by this layer.
///
/// Stack it with a [`RateLimitLayer`](super::RateLimitLayer) for a global limit on top of
/// the per-key ones (as Kong's per-consumer and per-service limits): the outer layer is
/// checked first, and a request refused by the inner one has still used the outer's token.
///
/// ```
/// use seawall::rate_limit::{KeyedRateLimitLayer, Quota, Rate, RateLimitLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::rate_limit::QuotaError> {
/// struct Request { api_key: String }
///
/// let svc = ServiceBuilder::new()
///     // 1000 requests a second in all...
///     .layer(RateLimitLayer::new(Quota::new(Rate::per_second(1000), 1000)?))
///     // ...and 10 a second per API key.
///     .layer(KeyedRateLimitLayer::new(
///         Quota::new(Rate::per_second(10), 10)?,
///         |req: &Request| Some(req.api_key.clone()),
///     ))
///     .service_fn(|_: Request| async { Ok::<_, seawall::BoxError>("ok") });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
pub struct KeyedRateLimitLayer<F, Key, K = u32, C = TokioClock> {
    limiter: KeyedRateLimiter<Key, C>,
    key_fn: F,
    cost: K,
}

impl<F: Clone, Key, K: Clone, C> Clone for KeyedRateLimitLayer<F, Key, K, C> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<F, Key, K, C> fmt::Debug for KeyedRateLimitLayer<F, Key, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("limiter", &self.limiter)
            .field("key_fn", &std::any::type_name::<F>())
            .finish()
    }
}

impl<F, Key: Hash + Eq + Clone> KeyedRateLimitLayer<F, Key> {
    /// Buckets of `quota` per key taken by `key_fn`, on the tokio clock.
    pub fn new<Request>(quota: super::Quota, key_fn: F) -> Self
    where
        F: KeyExtractor<Request, Key = Key>,
    {
        Self::from_limiter(KeyedRateLimiter::new(quota), key_fn)
    }
}

impl<F, Key, C> KeyedRateLimitLayer<F, Key, u32, C> {
    /// A layer over an existing keyed limiter (shared with its other users).
    pub fn from_limiter(limiter: KeyedRateLimiter<Key, C>, key_fn: F) -> Self {
        Self {
            limiter,
            key_fn,
            cost: 1,
        }
    }
}

impl<F, Key, K, C> KeyedRateLimitLayer<F, Key, K, C> {
    /// Charges each request `cost` tokens (a number or a `Fn(&Request) -> u32`).
    #[must_use]
    pub fn cost<K2>(self, cost: K2) -> KeyedRateLimitLayer<F, Key, K2, C> {
        KeyedRateLimitLayer {
            limiter: self.limiter,
            key_fn: self.key_fn,
            cost,
        }
    }

    /// The limiter shared by every service this layer wraps.
    pub fn limiter(&self) -> &KeyedRateLimiter<Key, C> {
        &self.limiter
    }
}

impl<S, F: Clone, Key, K: Clone, C> Layer<S> for KeyedRateLimitLayer<F, Key, K, C> {
    type Service = KeyedRateLimit<S, F, Key, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimit {
            inner,
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            cost: self.cost.clone(),
        }
    }
}

/// A service limited per key. See [`KeyedRateLimitLayer`].
pub struct KeyedRateLimit<S, F, Key, K = u32, C = TokioClock> {
    inner: S,
    limiter: KeyedRateLimiter<Key, C>,
    key_fn: F,
    cost: K,
}

impl<S: Clone, F: Clone, Key, K: Clone, C> Clone for KeyedRateLimit<S, F, Key, K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<S: fmt::Debug, F, Key, K, C> fmt::Debug for KeyedRateLimit<S, F, Key, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, F, Key, K, C> KeyedRateLimit<S, F, Key, K, C> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, F, Key, K, C, Request> Service<Request> for KeyedRateLimit<S, F, Key, K, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    F: KeyExtractor<Request, Key = Key>,
    Key: Hash + Eq + Clone,
    K: Cost<Request>,
    C: Clock,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(key) = self.key_fn.extract(&request) {
            let tokens = self.cost.cost(&request);
            if let Err(refused) = self.limiter.try_acquire(&key, tokens) {
                return ResponseFuture::refused(refused);
            }
        }
        ResponseFuture::called(self.inner.call(request))
    }
}
