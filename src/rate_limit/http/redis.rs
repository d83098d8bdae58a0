//! The HTTP layer over the Redis-backed limiter (features `http` and `redis`): the generic
//! [`HttpRateLimitLayer`] over a [`RedisLimit`] (or a global [`RedisRateLimiter`]).

use super::{HttpRateLimit, HttpRateLimitLayer, OnMissingKey};
use crate::rate_limit::redis::RedisLimit;
#[cfg(doc)]
use crate::rate_limit::redis::RedisRateLimiter;

/// [`HttpRateLimitLayer`] for a fleet: each request's key (a client IP, an API key, a
/// route…) is checked against a [`RedisRateLimiter`] shared by every replica. Built as
/// `HttpRateLimitLayer::new(limiter.per_key(extractor))` (this alias names its type); a
/// global limit in Redis is `HttpRateLimitLayer::new(limiter)`.
///
/// A refused request is answered with `429`, `Retry-After` and the same
/// `RateLimit-Policy` / `RateLimit` (and optionally Kong-style) headers as a local limit,
/// marked [`Refused`](super::Refused) in its extensions; admitted responses carry the
/// headers too. When Redis cannot answer and the limiter fails closed, the answer is `503`
/// with `Retry-After: 1`; with
/// [`FailOpen`](crate::rate_limit::redis::FailurePolicy::FailOpen) the local share
/// decides and the headers describe it. A request without a key follows the limit's
/// [`OnMissingKey`] (`500` and an error log by default). Its tokens are never handed back
/// (a refund would be another round trip): put it innermost, under the local layers,
/// which refund when it refuses.
///
/// The check is a round trip before the inner service is called, so the call holds a
/// ready clone of the inner service (tower's usual pattern: it must be `Clone`).
///
/// ```no_run
/// use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
/// use seawall::rate_limit::redis::RedisRateLimiter;
/// use seawall::rate_limit::{Quota, Rate};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::BoxError> {
/// let limiter = RedisRateLimiter::builder("redis://127.0.0.1:6379", Quota::new(Rate::per_minute(600), 60)?)
///     .prefix("per-ip")
///     .build()?;
/// let svc = ServiceBuilder::new()
///     .layer(HttpRateLimitLayer::new(limiter.per_key(ClientIp::peer())).name("per-ip"))
///     .service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
///     });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
pub type HttpRedisRateLimitLayer<E> = HttpRateLimitLayer<RedisLimit<E>>;

/// The service of [`HttpRedisRateLimitLayer`]: the generic [`HttpRateLimit`] over a
/// [`RedisLimit`].
pub type HttpRedisRateLimit<S, E> = HttpRateLimit<S, RedisLimit<E>>;

impl<E> HttpRateLimitLayer<RedisLimit<E>> {
    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]: `500` with a problem+json body, and an error log); see
    /// [`RedisLimit::on_missing_key`].
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.limit.set_on_missing_key(policy);
        self
    }
}
