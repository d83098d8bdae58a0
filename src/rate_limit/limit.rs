//! The one trait every local limiter implements, and the tower layer over any of them.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use super::future::ResponseFuture;
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
    /// ([`OnMissingKey::Reject`](super::OnMissingKey::Reject)): the tower layers fail with
    /// [`MissingKey`](super::MissingKey), the HTTP layers answer `500`. Never let through.
    MissingKey,
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
/// [`KeyedRateLimiter`](super::KeyedRateLimiter)) and sharded ([`ShardedRateLimiter`])
/// limiters, and of your own.
///
/// The layers are thin wrappers over it: [`LimitLayer`] (a refusal is an error, for any
/// tower service), [`RateLimitLayer`](super::RateLimitLayer) and
/// [`KeyedRateLimitLayer`](super::KeyedRateLimitLayer) (the same, built from a quota, with
/// a waiting mode), and the HTTP layer `http::HttpRateLimitLayer` (a refusal is a `429`
/// with rate-limit headers). The check is synchronous: the Redis-backed limiter, one round
/// trip per check, has layers of its own that resolve keys the same way.
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

    /// Checks `request`, costing `tokens`, and takes them if it is admitted.
    fn check(&self, request: &Request, tokens: u32) -> Decision<Self::Charge>;
}

/// No limit when `None`: a limit that configuration may leave out keeps one service type.
impl<Request, L: Limit<Request>> Limit<Request> for Option<L> {
    type Charge = L::Charge;

    #[inline]
    fn check(&self, request: &Request, tokens: u32) -> Decision<L::Charge> {
        match self {
            Some(limit) => limit.check(request, tokens),
            None => Decision::Unlimited,
        }
    }
}

/// One bucket for every request.
impl<Request, C: Clock> Limit<Request> for RateLimiter<C> {
    type Charge = Charge<C>;

    #[inline]
    fn check(&self, _: &Request, tokens: u32) -> Decision<Charge<C>> {
        self.charge(tokens).into()
    }
}

/// One bucket for every request, split across cores. Its tokens are not refunded.
impl<Request, C: Clock> Limit<Request> for ShardedRateLimiter<C> {
    type Charge = ();

    #[inline]
    fn check(&self, _: &Request, tokens: u32) -> Decision<()> {
        match self.acquire(tokens) {
            Ok(admitted) => Decision::Admitted(admitted, ()),
            Err(refused) => Decision::Refused(refused),
        }
    }
}

/// Checks `request` against `limit` and calls `inner` unless it is refused: the one
/// check-and-answer of the tower layers ([`LimitService`], [`RateLimit`](super::RateLimit)
/// in reject mode, [`KeyedRateLimit`](super::KeyedRateLimit)).
#[inline]
pub(crate) fn call<S, L, Request>(
    inner: &mut S,
    limit: &L,
    tokens: u32,
    request: Request,
    layer: &str,
) -> ResponseFuture<S::Future, L::Charge>
where
    S: Service<Request>,
    L: Limit<Request>,
{
    match limit.check(&request, tokens) {
        Decision::Admitted(_, charge) => ResponseFuture::called(inner.call(request), Some(charge)),
        Decision::Unlimited => ResponseFuture::called(inner.call(request), None),
        Decision::Refused(refused) => ResponseFuture::refused(refused),
        Decision::MissingKey => {
            log_missing_key(layer);
            ResponseFuture::missing_key()
        }
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
    K: Cost<Request>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, L::Charge>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let tokens = self.cost.cost(&request);
        call(&mut self.inner, &self.limit, tokens, request, "limit")
    }
}
