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
//! Time comes from a [`Clock`]: [`TokioClock`] by default (tests run on tokio's paused
//! time; otherwise it reads the CPU's time-stamp counter, several times cheaper than the OS
//! clock, with the default feature `quanta`), [`ManualClock`], `QuantaClock` (the counter
//! alone), or your own implementation.
//!
//! [`KeyedRateLimiter`] and [`KeyedRateLimitLayer`] keep a bucket per key (client, API key,
//! route…) with a bound on the keys tracked, per-key quotas and quota changes at run time.
//!
//! # One trait, thin layers
//!
//! Every limit is a [`Limit`]: [`RateLimiter`], [`ShardedRateLimiter`], [`PerKey`] (a
//! keyed limiter with the extractor that picks each request's bucket and what to do
//! without a key, [`OnMissingKey`]), `Option<L>` (no limit), with the `redis` feature the
//! Redis-backed limiter (global, or per key with the same extractors and
//! [`OnMissingKey`]), or your own. A check answers a [`Decision`], at once for the local
//! limits, after one round trip for Redis; the layers only turn it into an answer:
//! [`LimitLayer`] (any `Limit`; a refusal is a [`RateLimited`] error; [`LimitLayer::wait`]
//! waits instead, for a limit that can book ahead, a [`Reserve`]), [`RateLimitLayer`] and
//! [`KeyedRateLimitLayer`] (built from a quota, with a waiting mode), and, with the `http`
//! feature, `http::HttpRateLimitLayer` (a refusal is a `429` with rate-limit headers). The
//! modules follow the concepts: `local` (one bucket),
//! `keyed` (a bucket per key), `sharded` (one bucket split across cores),
#![cfg_attr(feature = "redis", doc = "[`redis`]")]
#![cfg_attr(not(feature = "redis"), doc = "`redis`")]
//! (feature `redis`) and
#![cfg_attr(feature = "http", doc = "[`http`]")]
#![cfg_attr(not(feature = "http"), doc = "`http`")]
//! (feature `http`); everything is re-exported here.
//!
//! With the `http` feature,
#![cfg_attr(feature = "http", doc = "[`http`]")]
#![cfg_attr(not(feature = "http"), doc = "`http`")]
//! answers refused requests with 429 and the IETF
//! `RateLimit` headers, extracts keys (client IP behind trusted proxies, API-key header,
//! route), and honours an upstream's `Retry-After` on the client side.
//!
//! With the `redis` feature,
#![cfg_attr(feature = "redis", doc = "[`redis::RedisRateLimiter`]")]
#![cfg_attr(not(feature = "redis"), doc = "`redis::RedisRateLimiter`")]
//! keeps the buckets in Redis for a
//! fleet of replicas (one round trip per check, a circuit breaker around Redis, fail-open
//! to a local share or fail-closed, optional batching), under the same layers.
//! [`ShardedRateLimiter`] scales a single very hot limiter across cores.
//!
//! # Stacked limits
//!
//! Layers stack: a global limit over a per-client one, say. A request is charged only
//! when every limit admits it, as nginx's `limit_req` zones do: each layer takes its
//! tokens on the way in, and when a limit further in refuses the request, the layers
//! outside it hand their tokens back ([`Refund`]). So a client refused by its own
//! per-client limit does not drain the global bucket for everybody else.
//!
//! * [`LimitLayer`], [`RateLimitLayer`] in [`Mode::Reject`] and [`KeyedRateLimitLayer`] refund when the
//!   inner service fails with a [`RateLimited`] (anywhere in the error's source chain):
//!   the refusal of any seawall limit further in, local or Redis; or with a
//!   [`MissingKey`] (a request a keyed limit further in took no key from: kept, a client
//!   leaving its API key out of every request would drain an outer global limit).
#![cfg_attr(feature = "http", doc = "* [`http::HttpRateLimitLayer`]")]
#![cfg_attr(not(feature = "http"), doc = "* `http::HttpRateLimitLayer`")]
//!   (feature `http`) refunds when the inner service's response is a `429` marked
#![cfg_attr(feature = "http", doc = "  [`http::Refused`]:")]
#![cfg_attr(not(feature = "http"), doc = "  `http::Refused`:")]
//!   the refusal of another HTTP layer, local or Redis; or the `400` or `500` of a
//!   missing key (marked
#![cfg_attr(feature = "http", doc = "  [`http::Undecided`]).")]
#![cfg_attr(not(feature = "http"), doc = "  `http::Undecided`).")]
//! * Refunds are exact and bounded ([`RateLimiter::refund`]): at most the tokens taken,
//!   less what the bucket has refilled since, never above the burst. For the instant
//!   between the take and the inner refusal the tokens are out of the bucket, so a
//!   concurrent request may see one token fewer. A refund is one atomic update (a shard
//!   lock for keyed limiters), done only on refusal. An admitted request's receipt
//!   ([`Charge`], [`KeyedCharge`]) takes no reference count on its limiter: it reaches
//!   the limiter through a block the limiter holds for its life, only when it refunds.
//! * Not refunded: [`Mode::Wait`] tokens (waited for, then used), the waiting keyed
//!   layer ([`KeyedRateLimitLayer::wait`]), and the Redis limits as *outer* layers (a
//!   refund there would be another round trip to Redis; see
#![cfg_attr(feature = "redis", doc = "  [`redis`]).")]
#![cfg_attr(not(feature = "redis"), doc = "  `redis`).")]
//!   Put the Redis limit innermost: the local layers outside it refund when it refuses.
//! * HTTP and tower layers do not see each other's refusals (a `429` response is no
//!   error, and an error is no response): stack HTTP layers with HTTP layers, tower
//!   layers with tower layers.
//!
//! # Observing
//!
//! A limiter given a name ([`RateLimiterBuilder::name`], [`KeyedRateLimiterBuilder::name`]) reports
//! each decision: with the `metrics` feature, the counter
//! `seawall_rate_limit_decisions_total` with labels `limiter` (the name) and `decision`
//! (`admitted` or `refused`), keys left out so that their number cannot blow up the
//! metric; with the `tracing` feature, a `DEBUG` event per refusal (fields `limiter`,
//! `retry_after`). Unnamed limiters report nothing and pay one atomic load per check.

mod builder;
mod error;
mod keyed;
mod limit;
mod local;
mod quota;
mod sharded;
mod telemetry;
mod wait;

pub mod future;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

#[cfg(feature = "quanta")]
pub use crate::clock::QuantaClock;
/// The clocks, defined in [`crate::clock`] (shared with the balancers), re-exported here.
pub use crate::clock::{Clock, ManualClock, TokioClock};
pub use builder::{KeyedRateLimiterBuilder, RateLimiterBuilder, ShardedRateLimiterBuilder};
pub use error::{MissingKey, OnMissingKey, RateLimited};
pub use keyed::{
    BoundedKey, DEFAULT_MAX_KEYS, INLINE_KEY_BYTES, KeyedCharge, KeyedRateLimit,
    KeyedRateLimitLayer, KeyedRateLimitWait, KeyedRateLimiter, KeyedWaitLayer, PerKey,
};
#[cfg(feature = "redis")]
pub(crate) use keyed::{KeyOf, key_of};
pub use limit::{Decision, Limit, LimitLayer, LimitService, Outcome, Proceed};
pub use local::{
    Admitted, Charge, Mode, RateLimit, RateLimitLayer, RateLimiter, Reservation, Taken,
};
pub use quota::{MAX_PERIOD, Quota, Rate};
pub use sharded::ShardedRateLimiter;
pub use wait::{
    Booked, Booking, KeyedBooking, LimitWait, LimitWaitLayer, LocalBooking, Reserve, WaitFuture,
};

/// Hands back what an admitted request took from a limit, when a limit further in
/// refused the request (see [stacked limits](self#stacked-limits)).
pub trait Refund {
    /// Gives the tokens back.
    fn refund(self);
}

/// Nothing to hand back (a request no limit applied to).
impl Refund for () {
    fn refund(self) {}
}

/// Both hand back theirs (two limits checked together).
impl<A: Refund, B: Refund> Refund for (A, B) {
    fn refund(self) {
        self.0.refund();
        self.1.refund();
    }
}

impl<R: Refund> Refund for Option<R> {
    fn refund(self) {
        if let Some(r) = self {
            r.refund();
        }
    }
}

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
#[cfg_attr(
    feature = "http",
    doc = "[`http::ClientIp`], [`http::HeaderKey`] and [`http::PathKey`]"
)]
#[cfg_attr(
    not(feature = "http"),
    doc = "`http::ClientIp`, `http::HeaderKey` and `http::PathKey`"
)]
/// are ready-made. `None` leaves the request out of per-key limiting.
pub trait KeyExtractor<Request> {
    /// The key type.
    type Key;

    /// The key of `request`, if it has one.
    fn extract(&self, request: &Request) -> Option<Self::Key>;

    /// Whether a request without a key is the client's error (it left out what it must
    /// send, such as the API key header of a
    #[cfg_attr(feature = "http", doc = "[`http::HeaderKey`])")]
    #[cfg_attr(not(feature = "http"), doc = "`http::HeaderKey`)")]
    /// rather than the set-up's (no peer address for
    #[cfg_attr(feature = "http", doc = "[`http::ClientIp`]):")]
    #[cfg_attr(not(feature = "http"), doc = "`http::ClientIp`):")]
    /// under [`OnMissingKey::Reject`] the HTTP layers answer the first `400 Bad Request`
    /// ([`Decision::KeyNotSent`], logged at `DEBUG`), the second `500`
    /// ([`Decision::MissingKey`], logged as an error). `false` unless overridden (a
    /// closure's `None`: the set-up's).
    fn missing_key_is_clients(&self) -> bool {
        false
    }

    /// Whether a request without a key (`extract` gave none) carries more than one: an API
    /// key header sent twice. Which one a service behind reads is its own choice, so
    /// keying on either, or on none under [`OnMissingKey::Allow`] or
    /// [`OnMissingKey::Shared`], would let a client pass its limit with a fresh value
    /// beside its real key. Such a request is refused as the client's error, whatever the
    /// policy. `false` unless overridden; asked only when `extract` gave no key.
    fn key_is_ambiguous(&self, request: &Request) -> bool {
        let _ = request;
        false
    }
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
