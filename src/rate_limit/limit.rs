//! The one trait every limiter implements (the local ones decide at once, the Redis one
//! after a round trip), and the tower layer over any of them.

use std::fmt;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use super::future::{Deferred, ResponseFuture};
use super::wait::LimitWaitLayer;
use super::{
    Admitted, Charge, Cost, RateLimited, RateLimiter, Refund, ShardedRateLimiter,
    error::log_missing_key,
};
use crate::BoxError;
use crate::clock::Clock;

/// What a [`Limit`] decided for one request.
#[derive(Debug)]
pub enum Decision<Ch> {
    /// Admitted: the limit's figures after the take (what rate-limit headers report), and
    /// what the request took, handed back if a limit further in refuses it.
    Admitted(Admitted, Ch),
    /// Refused: the limit is exhausted (or the request costs more than it can ever hold).
    Refused(RateLimited),
    /// Not subject to this limit: an absent limit (`None`), or a request without a key
    /// under [`OnMissingKey::Allow`](super::OnMissingKey::Allow). It goes on, unlimited here.
    Unlimited,
    /// Refused because the limit needs a key the request does not carry
    /// ([`OnMissingKey::Reject`](super::OnMissingKey::Reject)), a fault of the set-up (no
    /// peer address to key by): the tower layers fail with
    /// [`MissingKey`](super::MissingKey), the HTTP layers answer `500`. Never let through.
    MissingKey,
    /// Refused because the request does not carry the key the client must send, such as
    /// an API key header ([`OnMissingKey::Reject`](super::OnMissingKey::Reject) over an
    /// extractor whose [`missing_key_is_clients`](super::KeyExtractor::missing_key_is_clients)):
    /// the client's error. The tower layers fail with [`MissingKey`](super::MissingKey), the
    /// HTTP layers answer `400 Bad Request`. Never let through.
    KeyNotSent,
    /// Refused because the limit could not decide: its store did not answer and it fails
    /// closed (the Redis limiter, feature `redis`, under
    #[cfg_attr(
        feature = "redis",
        doc = "[`FailurePolicy::FailClosed`](super::redis::FailurePolicy::FailClosed))."
    )]
    #[cfg_attr(not(feature = "redis"), doc = "`FailurePolicy::FailClosed`).")]
    /// The tower layers fail with this error, the HTTP layers answer `503` with
    /// `Retry-After: 1`. Never let through.
    Unavailable(BoxError),
}

impl<Ch> From<Result<(Admitted, Ch), RateLimited>> for Decision<Ch> {
    #[inline]
    fn from(result: Result<(Admitted, Ch), RateLimited>) -> Self {
        match result {
            Ok((admitted, charge)) => Self::Admitted(admitted, charge),
            Err(refused) => Self::Refused(refused),
        }
    }
}

/// A rate limit a request is checked against: the one interface of the local
/// ([`RateLimiter`]), keyed ([`PerKey`](super::PerKey) over a
/// [`KeyedRateLimiter`](super::KeyedRateLimiter)), sharded ([`ShardedRateLimiter`]) and
/// Redis-backed (`redis::RedisRateLimiter`, `redis::RedisLimit`) limiters, and of your own.
///
/// The layers are thin wrappers over it: [`LimitLayer`] (a refusal is an error, for any
/// tower service), [`RateLimitLayer`](super::RateLimitLayer) and
/// [`KeyedRateLimitLayer`](super::KeyedRateLimitLayer) (the same, built from a quota, with
/// a waiting mode), and the HTTP layer `http::HttpRateLimitLayer` (a refusal is a `429`
/// with rate-limit headers).
///
/// A check answers at once or after a round trip, as its [`Check`](Limit::Check) type
/// says. A local limit decides in the call: its `Check` is the [`Decision`] itself, and
/// the layers call the inner service at once, as if the check were written in them (no
/// allocation, no clone of the service). A limit kept in a store (the Redis limiter, one
/// round trip) answers with a future of its decision: the layers then hold a ready clone
/// of the inner service (tower's usual pattern, so the service must be `Clone`) until the
/// decision comes, and answer it the same way.
///
/// ```
/// use seawall::rate_limit::{Decision, Limit, LimitLayer, Quota, Rate, RateLimiter, RateLimited};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// /// Limits writes only; reads pass unlimited.
/// #[derive(Clone)]
/// struct Writes(RateLimiter);
///
/// impl Limit<(&'static str, u32)> for Writes {
///     type Charge = <RateLimiter as Limit<()>>::Charge;
///     type Check = Decision<Self::Charge>;
///
///     fn check(&self, request: &(&'static str, u32), tokens: u32) -> Decision<Self::Charge> {
///         match request.0 {
///             "write" => Limit::<()>::check(&self.0, &(), tokens),
///             _ => Decision::Unlimited,
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let writes = Writes(RateLimiter::new(Quota::new(Rate::per_second(1), 1)?));
/// let mut svc = ServiceBuilder::new()
///     .layer(LimitLayer::new(writes))
///     .service_fn(|(_, n): (&'static str, u32)| async move { Ok::<_, seawall::BoxError>(n) });
/// svc.ready().await?.call(("write", 1)).await?;
/// svc.ready().await?.call(("read", 2)).await?;
/// let refused = svc.ready().await?.call(("write", 3)).await.unwrap_err();
/// assert!(refused.downcast_ref::<RateLimited>().is_some());
/// # Ok(())
/// # }
/// ```
pub trait Limit<Request> {
    /// What an admitted request took, handed back if a limit further in refuses it (see
    /// [stacked limits](super#stacked-limits)); `()` for nothing to hand back.
    type Charge: Refund;

    /// What [`check`](Limit::check) returns: `Decision<Self::Charge>` for a limit that
    /// decides in the call (every local one), or a future of it for a limit that asks a
    /// store first (see [`Outcome`]).
    type Check: Outcome<Self::Charge>;

    /// Checks `request`, costing `tokens`, and takes them if it is admitted.
    fn check(&self, request: &Request, tokens: u32) -> Self::Check;
}

mod sealed {
    pub trait Sealed<Ch> {}
}

/// What a [`Limit`]'s check returns: a [`Decision`] at once, or a future of one. Sealed:
/// implemented for `Decision<Ch>` and for every `Future<Output = Decision<Ch>>`, the two
/// shapes the layers know how to answer.
pub trait Outcome<Ch>: sealed::Sealed<Ch> {}

impl<Ch> sealed::Sealed<Ch> for Decision<Ch> {}
impl<Ch> Outcome<Ch> for Decision<Ch> {}
impl<Ch, F: Future<Output = Decision<Ch>>> sealed::Sealed<Ch> for F {}
impl<Ch, F: Future<Output = Decision<Ch>>> Outcome<Ch> for F {}

/// No limit when `None`: a limit that configuration may leave out keeps one service type.
/// For a limit answering with a future, that future must be buildable from a decision
/// (`From<Decision<_>>`, as the Redis limiter's is).
impl<Request, L: Limit<Request>> Limit<Request> for Option<L>
where
    L::Check: From<Decision<L::Charge>>,
{
    type Charge = L::Charge;
    type Check = L::Check;

    #[inline]
    fn check(&self, request: &Request, tokens: u32) -> L::Check {
        match self {
            Some(limit) => limit.check(request, tokens),
            None => Decision::Unlimited.into(),
        }
    }
}

/// One bucket for every request.
impl<Request, C: Clock> Limit<Request> for RateLimiter<C> {
    type Charge = Charge<C>;
    type Check = Decision<Charge<C>>;

    #[inline]
    fn check(&self, _: &Request, tokens: u32) -> Decision<Charge<C>> {
        self.decide(tokens)
    }
}

/// One bucket for every request, split across cores. Its tokens are not refunded.
impl<Request, C: Clock> Limit<Request> for ShardedRateLimiter<C> {
    type Charge = ();
    type Check = Decision<()>;

    #[inline]
    fn check(&self, _: &Request, tokens: u32) -> Decision<()> {
        // The whole limiter's figures, which the HTTP layers announce.
        match self.acquire(tokens) {
            Ok(admitted) => Decision::Admitted(self.whole(admitted), ()),
            Err(refused) => Decision::Refused(self.whole_refusal(refused)),
        }
    }
}

/// Answers `decision` for `request`: calls `inner` unless it is refused. The one
/// check-and-answer of the tower layers ([`LimitService`], [`RateLimit`](super::RateLimit)
/// in reject mode, [`KeyedRateLimit`](super::KeyedRateLimit)), at once or after a round
/// trip ([`Deferred`]).
#[inline]
pub(crate) fn answer<S, Ch, Request>(
    inner: &mut S,
    decision: Decision<Ch>,
    request: Request,
    layer: &str,
) -> ResponseFuture<S::Future, Ch>
where
    S: Service<Request>,
{
    match decision {
        Decision::Admitted(_, charge) => ResponseFuture::called(inner.call(request), Some(charge)),
        Decision::Unlimited => ResponseFuture::called(inner.call(request), None),
        Decision::Refused(refused) => ResponseFuture::refused(refused),
        Decision::MissingKey => {
            log_missing_key(layer, false);
            ResponseFuture::missing_key()
        }
        Decision::KeyNotSent => {
            log_missing_key(layer, true);
            ResponseFuture::missing_key()
        }
        Decision::Unavailable(error) => ResponseFuture::failed(error),
    }
}

/// How the tower layers go on from a [`Limit`]'s [`Outcome`]: implemented for a
/// [`Decision`] (the inner service is called at once) and for a future of one (a ready
/// clone of the inner service, which must be `Clone`, waits in the response future for
/// the decision). Not meant to be implemented or called outside seawall.
pub trait Proceed<S: Service<Request>, Request>: Sized {
    /// The response future.
    type Future: Future<Output = Result<S::Response, BoxError>>;

    /// Answers this outcome for `request`, calling `inner` when it is admitted.
    fn proceed(self, inner: &mut S, request: Request, layer: &'static str) -> Self::Future;
}

impl<S, Ch, Request> Proceed<S, Request> for Decision<Ch>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    Ch: Refund,
{
    type Future = ResponseFuture<S::Future, Ch>;

    #[inline]
    fn proceed(self, inner: &mut S, request: Request, layer: &'static str) -> Self::Future {
        answer(inner, self, request, layer)
    }
}

impl<S, Ch, Request, F> Proceed<S, Request> for F
where
    S: Service<Request> + Clone,
    S::Error: Into<BoxError>,
    F: Future<Output = Decision<Ch>>,
    Ch: Refund,
{
    type Future = Deferred<F, S, Request, S::Future, Ch>;

    fn proceed(self, inner: &mut S, request: Request, layer: &'static str) -> Self::Future {
        // The ready service goes into the future; this one keeps a fresh clone.
        let clone = inner.clone();
        Deferred::new(self, std::mem::replace(inner, clone), request, layer)
    }
}

/// Puts any [`Limit`] in front of a service: a refused request fails with
/// [`RateLimited`] (a request without the key the limit needs, with
/// [`MissingKey`](super::MissingKey)) without reaching the inner service; the tokens an
/// admitted request took are handed back when the inner service fails with a
/// [`RateLimited`] ([stacked limits](super#stacked-limits)).
///
/// Cloning the layer shares the limit (limiters are handles on shared state). See
/// [`Limit`] for an example.
#[derive(Clone)]
pub struct LimitLayer<L, K = u32> {
    limit: L,
    cost: K,
}

impl<L: fmt::Debug, K> fmt::Debug for LimitLayer<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitLayer")
            .field("limit", &self.limit)
            .field("cost", &std::any::type_name::<K>())
            .finish()
    }
}

impl<L> LimitLayer<L> {
    /// Each request checked against `limit`, costing one token.
    pub fn new(limit: L) -> Self {
        Self { limit, cost: 1 }
    }
}

impl<L, K> LimitLayer<L, K> {
    /// Charges each request `cost` tokens: a number, or any `Fn(&Request) -> u32`.
    #[must_use]
    pub fn cost<K2>(self, cost: K2) -> LimitLayer<L, K2> {
        LimitLayer {
            limit: self.limit,
            cost,
        }
    }

    /// The limit shared by every service this layer wraps.
    pub fn limit(&self) -> &L {
        &self.limit
    }
    /// The limit, mutably (to set it up further: its policy for requests without a key,
    /// say).
    pub fn limit_mut(&mut self) -> &mut L {
        &mut self.limit
    }
}

impl<L, K> LimitLayer<L, K> {
    /// Waits instead of refusing: a request whose tokens are due within `max_wait` is
    /// booked and held until then (first come first served), later ones are refused. The
    /// request is known only in `call`, so the wait happens in the response future, which
    /// holds the inner service's ready clone (tower's usual pattern: the inner service
    /// must be `Clone`). Dropping the future before its turn hands the booking back.
    /// Requests are charged their real [`Cost`](super::Cost), unlike
    /// [`RateLimitLayer`](super::RateLimitLayer)'s wait mode, which books one fixed cost
    /// in `poll_ready` (backpressure before the request is known).
    #[must_use]
    pub fn wait(self, max_wait: Duration) -> LimitWaitLayer<L, K> {
        LimitWaitLayer {
            limit: self.limit,
            cost: self.cost,
            max_wait,
        }
    }
}

impl<S, L: Clone, K: Clone> Layer<S> for LimitLayer<L, K> {
    type Service = LimitService<S, L, K>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitService::new(inner, self.limit.clone(), self.cost.clone())
    }
}

/// A service whose requests are checked against a [`Limit`]. See [`LimitLayer`].
#[derive(Clone)]
pub struct LimitService<S, L, K = u32> {
    inner: S,
    limit: L,
    cost: K,
}

impl<S, L, K> LimitService<S, L, K> {
    /// Wraps `inner`, charging each request `cost` tokens of `limit`.
    pub fn new(inner: S, limit: L, cost: K) -> Self {
        Self { inner, limit, cost }
    }

    /// The limit.
    pub fn limit(&self) -> &L {
        &self.limit
    }

    /// The limit, mutably (to hand a clone per-request state).
    pub fn limit_mut(&mut self) -> &mut L {
        &mut self.limit
    }

    crate::util::inner_service_accessors!();
}

impl<S: fmt::Debug, L: fmt::Debug, K> fmt::Debug for LimitService<S, L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitService")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<S, L, K, Request> Service<Request> for LimitService<S, L, K>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    L: Limit<Request>,
    L::Check: Proceed<S, Request>,
    K: Cost<Request>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = <L::Check as Proceed<S, Request>>::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let tokens = self.cost.cost(&request);
        self.limit
            .check(&request, tokens)
            .proceed(&mut self.inner, request, "limit")
    }
}
