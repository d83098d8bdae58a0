use std::time::Duration;

use tower::Layer;

use super::service::RateLimit;
use crate::clock::{Clock, TokioClock};
use crate::rate_limit::{Quota, RateLimiter};

/// What a limiter does with a request when the bucket is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse at once: the call fails with [`RateLimited`](crate::rate_limit::RateLimited) carrying
    /// `retry_after`, without reaching the inner service.
    Reject,
    /// Hold `poll_ready` until a token is due, first come first served, if that is within
    /// `max_wait`; beyond it, refuse as [`Mode::Reject`] does.
    Wait {
        /// The longest a caller waits.
        max_wait: Duration,
    },
}

/// Wraps services in a [`RateLimit`].
///
/// Cloning the layer does **not** create a new bucket: every service it wraps, and every
/// clone of those (as axum's router makes per request), shares one [`RateLimiter`]. That is
/// what makes the limit hold under axum, unlike tower's `RateLimit`, whose state lives in
/// each service.
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::{Mode, Quota, Rate, RateLimitLayer, RateLimited};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// // 2 requests a second, refusing past the burst of 2.
/// let layer = RateLimitLayer::new(Quota::new(Rate::per_second(2), 2)?);
/// let mut svc = ServiceBuilder::new().layer(layer.clone()).service_fn(|n: u32| async move {
///     Ok::<_, seawall::BoxError>(n)
/// });
/// assert_eq!(svc.ready().await?.call(1).await?, 1);
/// assert_eq!(svc.ready().await?.call(2).await?, 2);
/// let refused = svc.ready().await?.call(3).await.unwrap_err();
/// assert!(refused.downcast_ref::<RateLimited>().is_some_and(|r| r.retry_after().is_some()));
///
/// // The same bucket, shared by a clone of the layer, waiting up to a second instead.
/// let mut patient = ServiceBuilder::new()
///     .layer(layer.mode(Mode::Wait { max_wait: Duration::from_secs(1) }))
///     .service_fn(|n: u32| async move { Ok::<_, seawall::BoxError>(n) });
/// assert_eq!(patient.ready().await?.call(4).await?, 4, "admitted after a wait");
/// # Ok(())
/// # }
/// ```
pub struct RateLimitLayer<K = u32, C = TokioClock> {
    limiter: RateLimiter<C>,
    mode: Mode,
    cost: K,
}

impl<K, C: Clock> std::fmt::Debug for RateLimitLayer<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("mode", &self.mode)
            .field("cost", &std::any::type_name::<K>())
            .finish()
    }
}

impl<K: Clone, C> Clone for RateLimitLayer<K, C> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            mode: self.mode,
            cost: self.cost.clone(),
        }
    }
}

impl RateLimitLayer {
    /// Rejects requests beyond `quota` (one token each) on the tokio clock.
    pub fn new(quota: Quota) -> Self {
        Self::from_limiter(RateLimiter::new(quota))
    }
}

impl<C: Clock> RateLimitLayer<u32, C> {
    /// A layer over an existing limiter (shared with its other users), rejecting requests
    /// beyond its quota, one token each.
    pub fn from_limiter(limiter: RateLimiter<C>) -> Self {
        Self {
            limiter,
            mode: Mode::Reject,
            cost: 1,
        }
    }
}

impl<K, C: Clock> RateLimitLayer<K, C> {
    /// Sets what happens when the bucket is empty.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Waits up to `max_wait` for a token instead of rejecting at once.
    #[must_use]
    pub fn wait_up_to(self, max_wait: Duration) -> Self {
        self.mode(Mode::Wait { max_wait })
    }

    /// Charges each request `cost` tokens: a number, or any `Fn(&Request) -> u32`
    /// (weights). In [`Mode::Wait`] the cost is decided before the request is known, in
    /// `poll_ready`, so waiting layers charge [`Cost::fixed`](crate::rate_limit::Cost::fixed) tokens.
    #[must_use]
    pub fn cost<K2>(self, cost: K2) -> RateLimitLayer<K2, C> {
        RateLimitLayer {
            limiter: self.limiter,
            mode: self.mode,
            cost,
        }
    }

    /// The limiter shared by every service this layer wraps.
    pub fn limiter(&self) -> &RateLimiter<C> {
        &self.limiter
    }
}

impl<S, K: Clone, C: Clock> Layer<S> for RateLimitLayer<K, C> {
    type Service = RateLimit<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limiter.clone(), self.mode, self.cost.clone())
    }
}
