use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tower::Layer;

use super::PerKey;
use crate::clock::TokioClock;
use crate::rate_limit::{
    KeyExtractor, KeyedRateLimiter, LimitService, LimitWait, LimitWaitLayer, OnMissingKey,
};

/// Limits requests per key: each request draws from the bucket of the key `key_fn` takes
/// from it (any [`KeyExtractor`], closures included), in a shared [`KeyedRateLimiter`].
/// A request for which `key_fn` returns `None` fails with [`MissingKey`](crate::rate_limit::MissingKey)
/// by default; [`on_missing_key`](Self::on_missing_key) can let it through unlimited.
///
/// Stack it with a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) for a global limit on top of
/// the per-key ones (as Kong's per-consumer and per-service limits): the outer layer is
/// checked first, and a request refused by the inner one gets the outer's tokens back (see
/// [stacked limits](crate::rate_limit#stacked-limits)), so a client refused by its own limit does not
/// drain the global one.
///
/// ```
/// use seawall::rate_limit::{KeyedRateLimitLayer, Quota, Rate, RateLimitLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::ConfigError> {
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
    limit: PerKey<F, Key, C>,
    cost: K,
}

impl<F: Clone, Key, K: Clone, C> Clone for KeyedRateLimitLayer<F, Key, K, C> {
    fn clone(&self) -> Self {
        Self {
            limit: self.limit.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<F, Key, K, C> fmt::Debug for KeyedRateLimitLayer<F, Key, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("limit", &self.limit)
            .finish()
    }
}

impl<F, Key: Hash + Eq + Clone + Send + Sync + 'static> KeyedRateLimitLayer<F, Key> {
    /// Buckets of `quota` per key taken by `key_fn`, on the tokio clock.
    pub fn new<Request>(quota: crate::rate_limit::Quota, key_fn: F) -> Self
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
            limit: PerKey::new(limiter, key_fn),
            cost: 1,
        }
    }
}

impl<F, Key, K, C> KeyedRateLimitLayer<F, Key, K, C> {
    /// Charges each request `cost` tokens (a number or a `Fn(&Request) -> u32`).
    #[must_use]
    pub fn cost<K2>(self, cost: K2) -> KeyedRateLimitLayer<F, Key, K2, C> {
        KeyedRateLimitLayer {
            limit: self.limit,
            cost,
        }
    }

    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]: it fails with [`MissingKey`](crate::rate_limit::MissingKey)).
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.limit.set_on_missing_key(policy);
        self
    }

    /// The limiter shared by every service this layer wraps.
    pub fn limiter(&self) -> &KeyedRateLimiter<Key, C> {
        self.limit.limiter()
    }

    /// The keyed [`Limit`](crate::rate_limit::Limit) this layer checks.
    pub fn limit(&self) -> &PerKey<F, Key, C> {
        &self.limit
    }

    /// Waits instead of refusing: a request whose key's tokens are due within `max_wait`
    /// is booked and held until then (first come first served per key), later ones are
    /// refused as before. The key is known only in `call`, so the wait happens in the
    /// response future, which holds the inner service's ready clone (tower's usual
    /// pattern: the inner service must be `Clone`). Dropping the future before its turn
    /// hands the booking back. Requests are charged their real [`Cost`](crate::rate_limit::Cost), unlike
    /// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)'s wait mode, which decides in `poll_ready`.
    #[must_use]
    pub fn wait(self, max_wait: Duration) -> KeyedWaitLayer<F, Key, K, C> {
        LimitWaitLayer {
            limit: self.limit,
            cost: self.cost,
            max_wait,
        }
    }
}

/// [`KeyedRateLimitLayer`] in waiting mode: the generic [`LimitWaitLayer`] over a
/// [`PerKey`]; see [`KeyedRateLimitLayer::wait`].
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::{KeyedRateLimitLayer, Quota, Rate};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let mut svc = ServiceBuilder::new()
///     .layer(
///         KeyedRateLimitLayer::new(Quota::new(Rate::per_second(1), 1)?, |user: &&'static str| Some(*user))
///             .wait(Duration::from_secs(5)),
///     )
///     .service_fn(|user: &'static str| async move { Ok::<_, seawall::BoxError>(user) });
/// let start = tokio::time::Instant::now();
/// svc.ready().await?.call("ada").await?;
/// svc.ready().await?.call("ada").await?; // waits for ada's next token
/// svc.ready().await?.call("bob").await?; // bob has his own bucket
/// assert_eq!(start.elapsed(), Duration::from_secs(1));
/// # Ok(())
/// # }
/// ```
pub type KeyedWaitLayer<F, Key, K = u32, C = TokioClock> = LimitWaitLayer<PerKey<F, Key, C>, K>;

impl<F, Key, K, C> LimitWaitLayer<PerKey<F, Key, C>, K> {
    /// The limiter shared by every service this layer wraps.
    pub fn limiter_handle(&self) -> KeyedRateLimiter<Key, C> {
        self.limit.limiter().clone()
    }
}

/// A service limited per key that waits for its key's tokens: the generic [`LimitWait`]
/// over a [`PerKey`]; see [`KeyedRateLimitLayer::wait`].
pub type KeyedRateLimitWait<S, F, Key, K = u32, C = TokioClock> =
    LimitWait<S, PerKey<F, Key, C>, K>;

impl<S, F: Clone, Key, K: Clone, C> Layer<S> for KeyedRateLimitLayer<F, Key, K, C> {
    type Service = KeyedRateLimit<S, F, Key, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitService::new(inner, self.limit.clone(), self.cost.clone())
    }
}

/// A service limited per key: the generic [`LimitService`] over a [`PerKey`]. See
/// [`KeyedRateLimitLayer`].
pub type KeyedRateLimit<S, F, Key, K = u32, C = TokioClock> = LimitService<S, PerKey<F, Key, C>, K>;
