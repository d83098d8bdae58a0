//! Token-bucket rate limiting, lock-free, shared by every clone.
//!
//! A [`RateLimiter`] is a token bucket defined by a [`Quota`]: a [`Rate`] of refill and a
//! burst capacity. It keeps its whole state in one atomic word (the generic cell rate
//! algorithm), so clones of a service share it, as they must under axum's router, and a
//! check is one clock read and one compare-exchange.
//!
//! [`RateLimitLayer`] puts a limiter in front of a service, in one of two [`Mode`]s:
//!
//! * [`Mode::Reject`]: a request beyond the quota fails at once with [`RateLimited`]
//!   (carrying `retry_after`) without reaching the inner service. Requests may weigh
//!   several tokens ([`Cost`]).
//! * [`Mode::Wait`]: `poll_ready` books a token and stays pending until it is due, first
//!   come first served, up to a maximum wait beyond which it rejects. Cancel-safe: a
//!   booking that is dropped unused is handed back.
//!
//! ```
//! use std::time::Duration;
//! use seawall::rate_limit::{Quota, Rate, RateLimitLayer, RateLimited};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), seawall::BoxError> {
//! let layer = RateLimitLayer::new(Quota::new(Rate::per_second(10), 2)?);
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_: ()| async { Ok::<_, seawall::BoxError>("ok") });
//!
//! svc.ready().await?.call(()).await?;
//! svc.ready().await?.call(()).await?;
//! let err = svc.ready().await?.call(()).await.unwrap_err();
//! let limited = err.downcast_ref::<RateLimited>().expect("rate limited");
//! assert_eq!(limited.retry_after(), Some(Duration::from_millis(100)));
//! # Ok(())
//! # }
//! ```
//!
//! Time comes from a [`Clock`]: [`TokioClock`] by default (so tests run on tokio's paused
//! time), `QuantaClock` (feature `quanta`), several times cheaper to read where the OS
//! clock is slow, [`ManualClock`], or your own implementation.
//!
//! [`KeyedRateLimiter`] and [`KeyedRateLimitLayer`] keep a bucket per key (client, API key,
//! route…) with a bound on the keys tracked, per-key quotas and quota changes at run time.
//!
//! With the `http` feature, [`http`] answers refused requests with 429 and the IETF
//! `RateLimit` headers, extracts keys (client IP behind trusted proxies, API-key header,
//! route), and honours an upstream's `Retry-After` on the client side.
//!
//! With the `redis` feature, [`redis::RedisRateLimiter`] keeps the buckets in Redis for a
//! fleet of replicas (one round trip per check, a circuit breaker around Redis, fail-open
//! to a local share or fail-closed, optional batching). [`ShardedRateLimiter`] scales a
//! single very hot limiter across cores.
//!
//! # Observing
//!
//! A limiter given a name ([`RateLimiter::named`], [`KeyedRateLimiter::named`]) reports
//! each decision: with the `metrics` feature, the counter
//! `seawall_rate_limit_decisions_total` with labels `limiter` (the name) and `decision`
//! (`admitted` or `refused`), keys left out so that their number cannot blow up the
//! metric; with the `tracing` feature, a `DEBUG` event per refusal (fields `limiter`,
//! `retry_after`). Unnamed limiters report nothing and pay one atomic load per check.

mod bucket;
mod clock;
mod error;
mod keyed;
mod keyed_layer;
mod layer;
mod quota;
mod service;
mod sharded;
mod telemetry;

pub mod future;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use bucket::{Admitted, RateLimiter, Reservation};
#[cfg(feature = "quanta")]
pub use clock::QuantaClock;
pub use clock::{Clock, ManualClock, TokioClock};
pub use error::RateLimited;
pub use keyed::{DEFAULT_MAX_KEYS, KeyedRateLimiter};
pub use keyed_layer::{
    KeyedRateLimit, KeyedRateLimitLayer, KeyedRateLimitWait, KeyedWaitLayer, WaitFuture,
};
pub use layer::{Mode, RateLimitLayer};
pub use quota::{MAX_PERIOD, Quota, QuotaError, Rate};
pub use service::RateLimit;
pub use sharded::ShardedRateLimiter;

/// How many tokens a request costs.
///
/// Implemented for `u32` (every request costs that much) and for any
/// `Fn(&Request) -> u32` (weights, for example by body size or endpoint).
pub trait Cost<Request> {
    /// The cost of `request`.
    fn cost(&self, request: &Request) -> u32;

    /// The cost charged when the request is not known yet ([`Mode::Wait`] books tokens in
    /// `poll_ready`); one token unless the implementation says otherwise.
    fn fixed(&self) -> u32 {
        1
    }
}

impl<Request> Cost<Request> for u32 {
    #[inline]
    fn cost(&self, _: &Request) -> u32 {
        *self
    }

    fn fixed(&self) -> u32 {
        *self
    }
}

impl<Request, F> Cost<Request> for F
where
    F: Fn(&Request) -> u32,
{
    #[inline]
    fn cost(&self, request: &Request) -> u32 {
        self(request)
    }
}

/// Takes the key a request is limited under (client, API key, route…).
///
/// Implemented for every `Fn(&Request) -> Option<Key>`; with the `http` feature,
/// [`http::ClientIp`], [`http::HeaderKey`] and [`http::PathKey`] are ready-made. `None`
/// leaves the request out of per-key limiting.
pub trait KeyExtractor<Request> {
    /// The key type.
    type Key;

    /// The key of `request`, if it has one.
    fn extract(&self, request: &Request) -> Option<Self::Key>;
}

impl<Request, Key, F> KeyExtractor<Request> for F
where
    F: Fn(&Request) -> Option<Key>,
{
    type Key = Key;

    #[inline]
    fn extract(&self, request: &Request) -> Option<Key> {
        self(request)
    }
}
