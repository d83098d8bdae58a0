use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use tower::{Layer, Service};

use super::PerKey;
use super::per_key::{KeyOf, key_of};
use crate::BoxError;
use crate::clock::{Clock, TokioClock};
use crate::rate_limit::{
    Cost, KeyExtractor, KeyedRateLimiter, LimitService, OnMissingKey, RateLimited, Reservation,
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

impl<F, Key: Hash + Eq + Clone> KeyedRateLimitLayer<F, Key> {
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
    /// hands the booking back. Requests are charged their real [`Cost`], unlike
    /// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)'s wait mode, which decides in `poll_ready`.
    #[must_use]
    pub fn wait(self, max_wait: Duration) -> KeyedWaitLayer<F, Key, K, C> {
        KeyedWaitLayer {
            limit: self.limit,
            cost: self.cost,
            max_wait,
        }
    }
}

/// [`KeyedRateLimitLayer`] in waiting mode; see [`KeyedRateLimitLayer::wait`].
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
pub struct KeyedWaitLayer<F, Key, K = u32, C = TokioClock> {
    limit: PerKey<F, Key, C>,
    cost: K,
    max_wait: Duration,
}

impl<F: Clone, Key, K: Clone, C> Clone for KeyedWaitLayer<F, Key, K, C> {
    fn clone(&self) -> Self {
        Self {
            limit: self.limit.clone(),
            cost: self.cost.clone(),
            max_wait: self.max_wait,
        }
    }
}

impl<F, Key, K, C> fmt::Debug for KeyedWaitLayer<F, Key, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedWaitLayer")
            .field("limit", &self.limit)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

impl<F, Key, K, C> KeyedWaitLayer<F, Key, K, C> {
    /// The limiter shared by every service this layer wraps.
    pub fn limiter_handle(&self) -> KeyedRateLimiter<Key, C> {
        self.limit.limiter().clone()
    }
}

impl<S, F: Clone, Key, K: Clone, C> Layer<S> for KeyedWaitLayer<F, Key, K, C> {
    type Service = KeyedRateLimitWait<S, F, Key, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimitWait {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service limited per key that waits for its key's tokens; see
/// [`KeyedRateLimitLayer::wait`].
pub struct KeyedRateLimitWait<S, F, Key, K = u32, C = TokioClock> {
    inner: S,
    layer: KeyedWaitLayer<F, Key, K, C>,
}

impl<S: Clone, F: Clone, Key, K: Clone, C> Clone for KeyedRateLimitWait<S, F, Key, K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, F, Key, K, C> fmt::Debug for KeyedRateLimitWait<S, F, Key, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitWait")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, F, Key, K, C> KeyedRateLimitWait<S, F, Key, K, C> {
    crate::util::inner_service_accessors!();
}

impl<S, F, Key, K, C, Request> Service<Request> for KeyedRateLimitWait<S, F, Key, K, C>
where
    S: Service<Request> + Clone,
    S::Error: Into<BoxError>,
    F: KeyExtractor<Request, Key = Key>,
    Key: Hash + Eq + Clone,
    K: Cost<Request>,
    C: Clock,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = WaitFuture<S, Request, Key, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let limit = &self.layer.limit;
        let key = match key_of(
            limit.extractor(),
            &request,
            limit.missing_key_policy(),
            "keyed wait",
        ) {
            KeyOf::Key(key) => key,
            KeyOf::Missing => {
                crate::rate_limit::error::log_missing_key("keyed wait");
                return WaitFuture::missing_key();
            }
            KeyOf::Shared => {
                let tokens = self.layer.cost.cost(&request);
                if let Err(refused) = limit.limiter().acquire_shared(tokens) {
                    return WaitFuture::refused(refused);
                }
                return WaitFuture::called(self.inner.call(request));
            }
            KeyOf::Unlimited => return WaitFuture::called(self.inner.call(request)),
        };
        let tokens = self.layer.cost.cost(&request);
        match limit.limiter().reserve(&key, tokens, self.layer.max_wait) {
            Err(refused) => WaitFuture::refused(refused),
            Ok(booking) if booking.wait.is_zero() => WaitFuture::called(self.inner.call(request)),
            Ok(booking) => {
                // The ready service goes into the future; this one keeps a fresh clone.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                WaitFuture::waiting(
                    ready,
                    request,
                    Booking {
                        limiter: self.layer.limit.limiter().clone(),
                        key,
                        reservation: Some(booking),
                    },
                )
            }
        }
    }
}

/// A booking not yet used: handed back when dropped.
struct Booking<Key: Hash + Eq + Clone, C: Clock> {
    limiter: KeyedRateLimiter<Key, C>,
    key: Key,
    reservation: Option<Reservation>,
}

impl<Key: Hash + Eq + Clone, C: Clock> Drop for Booking<Key, C> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.limiter.cancel(&self.key, reservation);
        }
    }
}

pin_project! {
    /// Response future of [`KeyedRateLimitWait`]: waits for the key's turn, then calls.
    pub struct WaitFuture<S, Request, Key, C>
    where
        S: Service<Request>,
        Key: Hash,
        Key: Eq,
        Key: Clone,
        C: Clock,
    {
        #[pin]
        state: WaitState<S, Request, Key, C>,
    }
}

pin_project! {
    #[project = WaitProj]
    enum WaitState<S, Request, Key, C>
    where
        S: Service<Request>,
        Key: Hash,
        Key: Eq,
        Key: Clone,
        C: Clock,
    {
        Waiting {
            #[pin]
            sleep: tokio::time::Sleep,
            service: Option<S>,
            request: Option<Request>,
            booking: Option<Booking<Key, C>>,
        },
        Called { #[pin] future: S::Future },
        Refused { error: Option<RateLimited> },
        MissingKey,
    }
}

impl<S, Request, Key, C> WaitFuture<S, Request, Key, C>
where
    S: Service<Request>,
    Key: Hash + Eq + Clone,
    C: Clock,
{
    fn called(future: S::Future) -> Self {
        Self {
            state: WaitState::Called { future },
        }
    }

    fn refused(error: RateLimited) -> Self {
        Self {
            state: WaitState::Refused { error: Some(error) },
        }
    }

    fn missing_key() -> Self {
        Self {
            state: WaitState::MissingKey,
        }
    }

    fn waiting(service: S, request: Request, booking: Booking<Key, C>) -> Self {
        let wait = booking.reservation.map_or(Duration::ZERO, |r| r.wait);
        Self {
            state: WaitState::Waiting {
                sleep: tokio::time::sleep(wait),
                service: Some(service),
                request: Some(request),
                booking: Some(booking),
            },
        }
    }
}

impl<S, Request, Key, C> fmt::Debug for WaitFuture<S, Request, Key, C>
where
    S: Service<Request>,
    Key: Hash + Eq + Clone,
    C: Clock,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitFuture").finish_non_exhaustive()
    }
}

impl<S, Request, Key, C> Future for WaitFuture<S, Request, Key, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    Key: Hash + Eq + Clone,
    C: Clock,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                WaitProj::Waiting {
                    sleep,
                    service,
                    request,
                    booking,
                } => {
                    std::task::ready!(sleep.poll(cx));
                    // The turn has come: the booking is used, not handed back.
                    if let Some(mut booking) = booking.take() {
                        booking.reservation = None;
                    }
                    let mut service = service.take().expect("WaitFuture polled after completion");
                    let request = request.take().expect("WaitFuture polled after completion");
                    WaitState::Called {
                        future: service.call(request),
                    }
                }
                WaitProj::Called { future } => return future.poll(cx).map_err(Into::into),
                WaitProj::Refused { error } => {
                    return Poll::Ready(Err(Box::new(
                        error.take().expect("WaitFuture polled after completion"),
                    )));
                }
                WaitProj::MissingKey => {
                    return Poll::Ready(Err(Box::new(crate::rate_limit::MissingKey)));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S, F: Clone, Key, K: Clone, C> Layer<S> for KeyedRateLimitLayer<F, Key, K, C> {
    type Service = KeyedRateLimit<S, F, Key, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitService::new(inner, self.limit.clone(), self.cost.clone())
    }
}

/// A service limited per key: the generic [`LimitService`] over a [`PerKey`]. See
/// [`KeyedRateLimitLayer`].
pub type KeyedRateLimit<S, F, Key, K = u32, C = TokioClock> = LimitService<S, PerKey<F, Key, C>, K>;
