//! HTTP integration of the rate limiters (feature `http`).
//!
//! * [`HttpRateLimitLayer`]: for servers; answers refused requests itself with 429,
//!   `Retry-After` and the `RateLimit-Policy` / `RateLimit` headers of
//!   draft-ietf-httpapi-ratelimit-headers-09, and adds the same headers to admitted
//!   responses (optionally Kong's `X-RateLimit-Limit` / `X-RateLimit-Remaining` too).
//!   Over any [`Limit`](super::Limit): local, keyed, sharded, or (feature `redis`) kept
//!   in Redis for a fleet.
//! * Key extractors: [`ClientIp`] (the peer address, or what trusted proxies report in
//!   `Forwarded` / `X-Forwarded-For`), [`HeaderKey`] (an API key header) and [`PathKey`]
//!   (the route).
//! * [`parse`]: the total parsers of `X-Forwarded-For`, `Forwarded` and `Retry-After`.
//!
//! * [`RetryAfterLayer`]: for clients; honours an upstream's 429 / 503 with `Retry-After`
//!   (seconds or an HTTP date) by holding further calls to it until the time given.

pub(crate) mod key;
mod layer;
#[cfg(feature = "gateway")]
mod pair;
pub mod parse;
#[cfg(feature = "redis")]
mod redis;
mod retry_after;
mod state_cache;

pub use key::{ClientIp, DEFAULT_IPV6_PREFIX, HeaderKey, InvalidNet, IpNet, PathKey};
#[cfg(feature = "gateway")]
pub(crate) use key::{parse_net, peer_of};
pub(crate) use layer::refusal_headers;
pub use layer::{
    DeferredResponse, HeaderSettings, HttpRateLimit, HttpRateLimitLayer, OnMissingKey, PerKey,
    RATELIMIT, RATELIMIT_POLICY, RefusalBody, Refused, Respond, ResponseFuture, Undecided,
    X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING,
};
#[cfg(feature = "gateway")]
pub(crate) use pair::{HttpRateLimitPair, PairedHeaders};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{HttpRedisRateLimit, HttpRedisRateLimitLayer};
pub use retry_after::{DEFAULT_MAX_HOLD, HoldingOff, RetryAfter, RetryAfterLayer};
