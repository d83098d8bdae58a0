//! Limits with `policy = "redis"`: buckets kept in Redis, shared by every replica of the
//! gateway (features `gateway` and `redis`).
//!
//! Each such limit is the library's [`HttpRateLimit`] over the Redis limiter (global, or
//! per client through a [`RedisLimit`]), placed innermost in the route's stack, after the
//! local limits (which hand their tokens back when it refuses: a Redis token is never
//! refunded, see [the Redis limiter](crate::rate_limit::redis)), so its answers are the
//! library's: `429` with `Retry-After` and the `RateLimit` headers, `503` with
//! `Retry-After: 1` when Redis cannot answer and the limit fails closed.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower::Service;

use super::body::Body;
use super::config::{RedisFailure, RedisSettings};
use super::route::{ClientKeyOf, ClientKeying};
use super::status::RedisLimitStatus;
use crate::BoxError;
use crate::rate_limit::http::{HttpRateLimit, HttpRateLimitLayer};
use crate::rate_limit::redis::{FailurePolicy, RedisLimit, RedisRateLimiter};
use crate::rate_limit::{INLINE_KEY_BYTES, KeyExtractor, Quota, Rate};

/// A Redis limit `L` (the global limiter, or a [`RedisLimit`] per client), or none: `Off`
/// adds nothing (not even a clone of the inner service) to a route without one.
#[derive(Clone)]
pub(crate) enum MaybeRedis<S, L> {
    Off(S),
    On(HttpRateLimit<S, L>),
}

impl<S, L> MaybeRedis<S, L> {
    pub(crate) fn get_mut(&mut self) -> &mut S {
        match self {
            Self::Off(inner) => inner,
            Self::On(limit) => limit.get_mut(),
        }
    }

    /// The limit, to set per-request state on (the client's address).
    pub(crate) fn limit_mut(&mut self) -> Option<&mut L> {
        match self {
            Self::Off(_) => None,
            Self::On(limit) => Some(limit.limit_mut()),
        }
    }
}

impl<S, L> Service<Request<Body>> for MaybeRedis<S, L>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    HttpRateLimit<S, L>: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future =
        MaybeRedisFuture<S::Future, <HttpRateLimit<S, L> as Service<Request<Body>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self {
            Self::Off(inner) => inner.poll_ready(cx),
            Self::On(limit) => limit.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self {
            Self::Off(inner) => MaybeRedisFuture::Off {
                future: inner.call(request),
            },
            Self::On(limit) => MaybeRedisFuture::On {
                future: limit.call(request),
            },
        }
    }
}

pin_project! {
    /// The future of a [`MaybeRedis`]: the inner service's, or the Redis limit's (which
    /// holds its round trip, boxed, and then the inner service's).
    #[project = MaybeRedisProj]
    pub(crate) enum MaybeRedisFuture<A, B> {
        Off { #[pin] future: A },
        On { #[pin] future: B },
    }
}

impl<A: Future, B: Future<Output = A::Output>> Future for MaybeRedisFuture<A, B> {
    type Output = A::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        match self.project() {
            MaybeRedisProj::Off { future } => future.poll(cx),
            MaybeRedisProj::On { future } => future.poll(cx),
        }
    }
}

/// A client's key in Redis: the same in every replica, so that they share its bucket.
pub(crate) enum FleetKey {
    Ip(IpAddr),
    /// A key header's value of at most [`INLINE_KEY_BYTES`] bytes, as it is.
    Value(String),
    /// A longer value's SHA-256: stable across processes (unlike a
    /// [`BoundedKey`](crate::rate_limit::BoundedKey)'s per-process digest), and no client
    /// can choose two values with the same one.
    Digest([u8; 32]),
}

impl FleetKey {
    fn of_value(value: &str) -> Self {
        if value.len() <= INLINE_KEY_BYTES {
            Self::Value(value.to_owned())
        } else {
            Self::Digest(Sha256::digest(value.as_bytes()).into())
        }
    }
}

impl fmt::Display for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "ip:{ip}"),
            Self::Value(v) => write!(f, "key:{v}"),
            Self::Digest(d) => {
                f.write_str("key#")?;
                d.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

/// The per-client Redis limit's key: the client's address or key header, as the local
/// per-client limit reads them.
#[derive(Clone)]
pub(crate) struct ClientKey(pub(crate) ClientKeying);

impl<B> KeyExtractor<Request<B>> for ClientKey {
    type Key = FleetKey;

    fn extract(&self, request: &Request<B>) -> Option<FleetKey> {
        match self.0.key(request) {
            ClientKeyOf::Ip(ip) => Some(FleetKey::Ip(ip)),
            ClientKeyOf::Header(value) => Some(FleetKey::of_value(value)),
            // Shared, or not limited per client: the layer's `OnMissingKey` says which.
            ClientKeyOf::Shared | ClientKeyOf::Unlimited => None,
        }
    }
}

/// One Redis limit of a route, kept for its status.
#[derive(Clone)]
pub(crate) struct SharedLimit {
    limiter: RedisRateLimiter,
}

impl SharedLimit {
    /// A limit of `per_second` (and `burst`) in Redis, its keys under
    /// `<prefix>:<route>:<scope>`, its metrics named `<route>/<name>`.
    pub(crate) fn new(
        settings: &RedisSettings,
        route: &str,
        scope: &str,
        name: &str,
        quota: Quota,
    ) -> Result<Self, BoxError> {
        let builder = match &settings.url {
            Some(url) => RedisRateLimiter::builder(url.clone(), quota),
            None => RedisRateLimiter::cluster_builder(settings.nodes.clone(), quota),
        };
        let policy = match settings.failure {
            RedisFailure::Open => FailurePolicy::FailOpen {
                local_share: local_share(quota, settings.local_share)?,
            },
            RedisFailure::Closed => FailurePolicy::FailClosed,
        };
        let mut builder = builder
            .prefix(format!("{}:{route}:{scope}", settings.prefix))
            .timeout(settings.timeout)
            .failure_policy(policy)
            .name(format!("{route}/{name}"));
        if settings.batch > 1 {
            builder = builder.batch(settings.batch, settings.batch_max_age);
        }
        #[cfg(feature = "redis-tls")]
        if let Some(tls) = settings.tls_config()? {
            builder = builder.tls(tls);
        }
        Ok(Self {
            limiter: builder.build()?,
        })
    }

    /// The layer answering for this limit per client, keyed by `extractor`.
    pub(crate) fn layer<E>(
        &self,
        extractor: E,
        name: &str,
        hide: bool,
    ) -> HttpRateLimitLayer<RedisLimit<E>> {
        HttpRateLimitLayer::new(self.limiter.per_key(extractor))
            .name(name)
            .hide_headers(hide)
    }

    /// The layer answering for this limit as one global bucket.
    pub(crate) fn global_layer(
        &self,
        name: &str,
        hide: bool,
    ) -> HttpRateLimitLayer<RedisRateLimiter> {
        HttpRateLimitLayer::new(self.limiter.clone())
            .name(name)
            .hide_headers(hide)
    }

    /// Where its last decision came from, and the state of its breaker around Redis.
    pub(crate) fn status(&self) -> RedisLimitStatus {
        RedisLimitStatus {
            source: self.limiter.last_source().map(str::to_owned),
            breaker: super::status::breaker_state(self.limiter.breaker().state()).to_owned(),
        }
    }
}

/// `share` of `quota`, for one replica while Redis is away: the rate scaled, the burst
/// scaled and rounded up (at least one token).
pub(crate) fn local_share(quota: Quota, share: f64) -> Result<Quota, BoxError> {
    let rate = quota.rate();
    let period = rate.period().as_secs_f64() / share;
    // Less a hair, so that 10 × 0.3 (3.0000000000000004) is 3, not 4.
    let burst = (f64::from(quota.burst()) * share - 1e-9).ceil().max(1.0) as u32;
    // A tiny share makes a period no `Duration` holds (1 s / 1e-20): refused, as the
    // quota refuses one too long for it, rather than a panic.
    let period = Duration::try_from_secs_f64(period)
        .map_err(|_| format!("a local share of {share} makes a period of {period} s: too long"))?;
    Ok(Quota::new(Rate::new(rate.tokens(), period), burst)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_digest_the_same_in_every_process() {
        let long = "k".repeat(INLINE_KEY_BYTES + 1);
        let a = FleetKey::of_value(&long).to_string();
        assert_eq!(a, FleetKey::of_value(&long).to_string());
        assert!(a.starts_with("key#") && a.len() == 4 + 64, "{a}");
        // The value at the bound is kept as it is; distinct from an address.
        let short = "k".repeat(INLINE_KEY_BYTES);
        assert_eq!(
            FleetKey::of_value(&short).to_string(),
            format!("key:{short}")
        );
        assert_eq!(
            FleetKey::Ip([10, 0, 0, 1].into()).to_string(),
            "ip:10.0.0.1"
        );
    }

    #[test]
    fn a_local_share_scales_rate_and_burst() {
        let quota = Quota::new(Rate::per_second(30), 12).unwrap();
        let share = local_share(quota, 1.0 / 3.0).unwrap();
        assert_eq!(share.burst(), 4);
        assert_eq!(
            local_share(Quota::new(Rate::per_second(1), 10).unwrap(), 0.3)
                .unwrap()
                .burst(),
            3
        );
        let per_second = share.rate().tokens() as f64 / share.rate().period().as_secs_f64();
        assert!((per_second - 10.0).abs() < 1e-6, "{per_second}");
        // Never below one token.
        let tiny = local_share(Quota::new(Rate::per_second(1), 1).unwrap(), 0.01).unwrap();
        assert_eq!(tiny.burst(), 1);
    }
}
