//! The Redis-backed limiter as a [`Limit`]: global ([`RedisRateLimiter`] itself) or per
//! key ([`RedisLimit`]), so the generic layers ([`LimitLayer`], and
//! `http::HttpRateLimitLayer`) answer for it as for a local limit.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{RedisLimitError, RedisRateLimiter, SHARED_KEY};
use crate::rate_limit::{
    Decision, KeyExtractor, KeyOf, Limit, LimitLayer, LimitService, OnMissingKey, key_of,
};

/// The one Redis key (after the prefix) of a global limit: [`RedisRateLimiter`] used
/// directly as a [`Limit`]. The gateway's global limits have always used it.
pub(crate) const GLOBAL_KEY: &str = "all";

/// A client's key as the per-key limit asks with it: a client keyed [`GLOBAL_KEY`] drew
/// from the global bucket of the same limiter; it is asked as `\0all` (a NUL byte, which
/// no extracted key holds, as in [`SHARED_KEY`]). Every other key is asked as it is.
fn client_key(key: String) -> String {
    if key == GLOBAL_KEY {
        "\0all".to_owned()
    } else {
        key
    }
}

/// A [`RedisRateLimiter`] with the [`KeyExtractor`] that picks each request's bucket: the
/// per-key Redis [`Limit`], as [`PerKey`](crate::rate_limit::PerKey) is the local one.
/// Built with [`RedisRateLimiter::per_key`]. A request without a key is handled per
/// [`OnMissingKey`]: refused by default ([`Decision::MissingKey`]), never silently
/// unlimited; [`OnMissingKey::Shared`] limits such requests together, under one Redis key
/// of their own.
///
/// Keys are written into the Redis key with their `Display` form (`prefix:{key}`, with
/// `%`, `{` and `}` percent-encoded).
///
/// ```no_run
/// use seawall::rate_limit::redis::RedisRateLimiter;
/// use seawall::rate_limit::{LimitLayer, OnMissingKey, Quota, Rate};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::BoxError> {
/// let limiter = RedisRateLimiter::builder("redis://127.0.0.1:6379", Quota::new(Rate::per_minute(600), 60)?)
///     .build()?;
/// let per_tenant = limiter
///     .per_key(|tenant: &String| Some(tenant.clone()))
///     .on_missing_key(OnMissingKey::Reject);
/// let svc = ServiceBuilder::new()
///     .layer(LimitLayer::new(per_tenant))
///     .service_fn(|_tenant: String| async { Ok::<_, seawall::BoxError>("ok") });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisLimit<E> {
    limiter: RedisRateLimiter,
    extractor: E,
    on_missing_key: OnMissingKey,
}

impl<E> fmt::Debug for RedisLimit<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimit")
            .field("limiter", &self.limiter)
            .field("extractor", &std::any::type_name::<E>())
            .field("on_missing_key", &self.on_missing_key)
            .finish()
    }
}

impl RedisRateLimiter {
    /// This limiter per key: each request draws from the bucket of the key `extractor`
    /// takes from it (any [`KeyExtractor`] whose key is `Display`, closures included). Put
    /// it in a [`LimitLayer`] or an `http::HttpRateLimitLayer`. Used directly, the
    /// limiter is one global bucket for every request.
    pub fn per_key<E>(&self, extractor: E) -> RedisLimit<E> {
        RedisLimit {
            limiter: self.clone(),
            extractor,
            on_missing_key: OnMissingKey::default(),
        }
    }
}

impl<E> RedisLimit<E> {
    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]: the tower layer fails with
    /// [`MissingKey`](crate::rate_limit::MissingKey), the HTTP layer answers `500`, and an
    /// error is logged). [`OnMissingKey::Shared`] limits such requests together, under one
    /// Redis key of their own.
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.on_missing_key = policy;
        self
    }

    pub(crate) fn set_on_missing_key(&mut self, policy: OnMissingKey) {
        self.on_missing_key = policy;
    }

    /// The limiter.
    pub fn limiter(&self) -> &RedisRateLimiter {
        &self.limiter
    }

    /// The key extractor, to change per request on a clone of the service (the gateway
    /// sets the client's address there, rather than in the request's extensions).
    pub fn extractor_mut(&mut self) -> &mut E {
        &mut self.extractor
    }
}

/// Per key: one round trip to Redis per check (or none: a batch's reserve, a refusal
/// still in force, the failure policy while the breaker is open). No refunds.
impl<Request, E> Limit<Request> for RedisLimit<E>
where
    E: KeyExtractor<Request>,
    E::Key: fmt::Display,
{
    type Charge = ();
    type Check = RedisCheck;

    fn check(&self, request: &Request, tokens: u32) -> RedisCheck {
        let key = match key_of(&self.extractor, request, self.on_missing_key, "redis") {
            KeyOf::Key(key) => client_key(key.to_string()),
            KeyOf::Shared => SHARED_KEY.to_owned(),
            KeyOf::Unlimited => return Decision::Unlimited.into(),
            KeyOf::Missing { client } => return KeyOf::<E::Key>::missing(client).into(),
        };
        let limiter = self.limiter.clone();
        RedisCheck::asking(async move { decide(limiter.acquire(&key, tokens).await) })
    }
}

/// Global: every request draws from one bucket, the Redis key `prefix:{all}`. One round
/// trip per check (or none, as for [`RedisLimit`]). No refunds.
impl<Request> Limit<Request> for RedisRateLimiter {
    type Charge = ();
    type Check = RedisCheck;

    fn check(&self, _: &Request, tokens: u32) -> RedisCheck {
        let limiter = self.clone();
        RedisCheck::asking(async move { decide(limiter.acquire(GLOBAL_KEY, tokens).await) })
    }
}

/// The limiter's answer as a [`Decision`]: Redis unavailable under
/// [`FailClosed`](super::FailurePolicy::FailClosed) is [`Decision::Unavailable`], with the
/// [`RedisLimitError::Unavailable`] (its cause in `source()`) as the error.
fn decide(
    result: Result<(crate::rate_limit::Admitted, super::Source), RedisLimitError>,
) -> Decision<()> {
    match result {
        Ok((admitted, _)) => Decision::Admitted(admitted, ()),
        Err(RedisLimitError::Limited(refused)) => Decision::Refused(refused),
        Err(unavailable @ RedisLimitError::Unavailable(_)) => {
            Decision::Unavailable(Box::new(unavailable))
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The decision of a Redis-backed [`Limit`], to come: the round trip (boxed: the limiter's
/// check is an `async fn`), or a decision taken without one (no key). Never waits longer
/// than the limiter's timeout.
pub struct RedisCheck {
    state: CheckState,
}

enum CheckState {
    Decided(Option<Decision<()>>),
    Asking(BoxFuture<Decision<()>>),
}

impl RedisCheck {
    fn asking(check: impl Future<Output = Decision<()>> + Send + 'static) -> Self {
        Self {
            state: CheckState::Asking(Box::pin(check)),
        }
    }
}

impl From<Decision<()>> for RedisCheck {
    fn from(decision: Decision<()>) -> Self {
        Self {
            state: CheckState::Decided(Some(decision)),
        }
    }
}

impl fmt::Debug for RedisCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            CheckState::Decided(_) => "decided",
            CheckState::Asking(_) => "asking",
        };
        f.debug_struct("RedisCheck").field("state", &state).finish()
    }
}

impl Future for RedisCheck {
    type Output = Decision<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Decision<()>> {
        match &mut self.state {
            CheckState::Decided(decision) => {
                Poll::Ready(decision.take().expect("RedisCheck polled after completion"))
            }
            CheckState::Asking(check) => check.as_mut().poll(cx),
        }
    }
}

/// The generic [`LimitLayer`] over a [`RedisLimit`]: limits requests per key through a
/// [`RedisRateLimiter`], for a fleet sharing one limit. A refused request fails with
/// [`RateLimited`](crate::rate_limit::RateLimited) without reaching the inner service;
/// when Redis cannot answer and the limiter fails closed, with
/// [`RedisLimitError::Unavailable`]. A request without a key is handled per
/// [`OnMissingKey`]: by default it fails with [`MissingKey`](crate::rate_limit::MissingKey),
/// never silently unlimited.
///
/// The check is a round trip before the inner service is called, so the call holds a
/// ready clone of the inner service (tower's usual pattern: it must be `Clone`).
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
///     .layer(RedisRateLimitLayer::new(limiter.per_key(|tenant: &String| Some(tenant.clone()))))
///     .service_fn(|_tenant: String| async { Ok::<_, seawall::BoxError>("ok") });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
pub type RedisRateLimitLayer<E> = LimitLayer<RedisLimit<E>>;

/// The service of [`RedisRateLimitLayer`]: the generic [`LimitService`] over a
/// [`RedisLimit`].
pub type RedisRateLimit<S, E> = LimitService<S, RedisLimit<E>>;

impl<E, K> LimitLayer<RedisLimit<E>, K> {
    /// What to do with a request whose key cannot be taken; see
    /// [`RedisLimit::on_missing_key`].
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.limit_mut().set_on_missing_key(policy);
        self
    }
}
