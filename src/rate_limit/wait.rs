//! Waiting for a [`Limit`]'s tokens instead of refusing: the generic waiting layer.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::keyed::{KeyOf, key_of};
use super::{
    Cost, KeyExtractor, KeyedRateLimiter, Limit, MissingKey, PerKey, RateLimited, RateLimiter,
    Reservation, error::log_missing_key,
};
use crate::BoxError;
use crate::clock::Clock;

/// What [`Reserve::reserve`] booked for one request.
#[derive(Debug)]
pub enum Booked<B> {
    /// Admitted now (or not subject to the limit): call at once.
    Now,
    /// Booked for later: hold the request for the wait, then call. Dropping the booking
    /// before then hands its tokens back.
    Later(B, Duration),
    /// Refused: the tokens would not be there within `max_wait`.
    Refused(RateLimited),
    /// Refused: the limit needs a key the request does not carry
    /// ([`OnMissingKey::Reject`](super::OnMissingKey::Reject)).
    MissingKey,
    /// Refused: the request does not carry the key the client must send
    /// ([`KeyExtractor::missing_key_is_clients`]), as [`Decision::KeyNotSent`](super::Decision::KeyNotSent).
    KeyNotSent,
}

/// Tokens booked ahead by [`Reserve::reserve`]: handed back when dropped unused.
pub trait Booking {
    /// The booking's turn came and the request went on: its tokens are spent.
    fn used(self);
}

/// A [`Limit`] that can book tokens ahead, first come first served, for the waiting layer
/// ([`LimitLayer::wait`](super::LimitLayer::wait), [`KeyedRateLimitLayer::wait`](super::KeyedRateLimitLayer::wait)).
pub trait Reserve<Request>: Limit<Request> {
    /// What a booking for later holds; handed back when dropped unused.
    type Booking: Booking;

    /// Books `tokens` for `request` if they are due within `max_wait`.
    fn reserve(&self, request: &Request, tokens: u32, max_wait: Duration) -> Booked<Self::Booking>;
}

impl<Request, L: Reserve<Request>> Reserve<Request> for Option<L>
where
    L::Check: From<super::Decision<L::Charge>>,
{
    type Booking = L::Booking;

    fn reserve(&self, request: &Request, tokens: u32, max_wait: Duration) -> Booked<L::Booking> {
        match self {
            Some(limit) => limit.reserve(request, tokens, max_wait),
            None => Booked::Now,
        }
    }
}

/// Tokens of a [`RateLimiter`] booked ahead; handed back when dropped unused.
pub struct LocalBooking<C: Clock> {
    limiter: RateLimiter<C>,
    reservation: Option<Reservation>,
}

impl<C: Clock> fmt::Debug for LocalBooking<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBooking")
            .field("reservation", &self.reservation)
            .finish_non_exhaustive()
    }
}

impl<C: Clock> Booking for LocalBooking<C> {
    fn used(mut self) {
        self.reservation = None;
    }
}

impl<C: Clock> Drop for LocalBooking<C> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.limiter.cancel(reservation);
        }
    }
}

impl<Request, C: Clock> Reserve<Request> for RateLimiter<C> {
    type Booking = LocalBooking<C>;

    fn reserve(&self, _: &Request, tokens: u32, max_wait: Duration) -> Booked<LocalBooking<C>> {
        match RateLimiter::reserve(self, tokens, max_wait) {
            Err(refused) => Booked::Refused(refused),
            Ok(r) if r.wait.is_zero() => Booked::Now,
            Ok(r) => {
                let wait = r.wait;
                Booked::Later(
                    LocalBooking {
                        limiter: self.clone(),
                        reservation: Some(r),
                    },
                    wait,
                )
            }
        }
    }
}

/// Tokens of one key of a [`KeyedRateLimiter`] booked ahead; handed back when dropped
/// unused.
pub struct KeyedBooking<Key: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> {
    limiter: KeyedRateLimiter<Key, C>,
    key: Key,
    reservation: Option<Reservation>,
}

impl<Key: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> fmt::Debug for KeyedBooking<Key, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBooking")
            .field("reservation", &self.reservation)
            .finish_non_exhaustive()
    }
}

impl<Key: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> Booking for KeyedBooking<Key, C> {
    fn used(mut self) {
        self.reservation = None;
    }
}

impl<Key: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> Drop for KeyedBooking<Key, C> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.limiter.cancel(&self.key, reservation);
        }
    }
}

/// Waits per key, first come first served per key. A request without a key follows
/// [`OnMissingKey`](super::OnMissingKey); the shared bucket does not queue (it refuses at
/// once when empty).
impl<Request, E, Key, C> Reserve<Request> for PerKey<E, Key, C>
where
    E: KeyExtractor<Request, Key = Key>,
    Key: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock,
{
    type Booking = KeyedBooking<Key, C>;

    fn reserve(
        &self,
        request: &Request,
        tokens: u32,
        max_wait: Duration,
    ) -> Booked<KeyedBooking<Key, C>> {
        let key = match key_of(
            self.extractor(),
            request,
            self.missing_key_policy(),
            "keyed wait",
        ) {
            KeyOf::Key(key) => key,
            KeyOf::Missing { client: false } => return Booked::MissingKey,
            KeyOf::Missing { client: true } => return Booked::KeyNotSent,
            KeyOf::Shared => {
                return match self.limiter().acquire_shared(tokens) {
                    Ok(_) => Booked::Now,
                    Err(refused) => Booked::Refused(refused),
                };
            }
            KeyOf::Unlimited => return Booked::Now,
        };
        match self.limiter().reserve(&key, tokens, max_wait) {
            Err(refused) => Booked::Refused(refused),
            Ok(r) if r.wait.is_zero() => Booked::Now,
            Ok(r) => {
                let wait = r.wait;
                Booked::Later(
                    KeyedBooking {
                        limiter: self.limiter().clone(),
                        key,
                        reservation: Some(r),
                    },
                    wait,
                )
            }
        }
    }
}

/// Waits for any [`Reserve`] limit's tokens; see [`LimitLayer::wait`](super::LimitLayer::wait).
#[derive(Clone)]
pub struct LimitWaitLayer<L, K = u32> {
    pub(crate) limit: L,
    pub(crate) cost: K,
    pub(crate) max_wait: Duration,
}

impl<L: fmt::Debug, K> fmt::Debug for LimitWaitLayer<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitWaitLayer")
            .field("limit", &self.limit)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<L, K> LimitWaitLayer<L, K> {
    /// The limit shared by every service this layer wraps.
    pub fn limit(&self) -> &L {
        &self.limit
    }
}

impl<S, L: Clone, K: Clone> Layer<S> for LimitWaitLayer<L, K> {
    type Service = LimitWait<S, L, K>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitWait {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service that waits for its [`Reserve`] limit's tokens; see
/// [`LimitLayer::wait`](super::LimitLayer::wait).
#[derive(Clone)]
pub struct LimitWait<S, L, K = u32> {
    inner: S,
    layer: LimitWaitLayer<L, K>,
}

impl<S: fmt::Debug, L: fmt::Debug, K> fmt::Debug for LimitWait<S, L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitWait")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, L, K> LimitWait<S, L, K> {
    crate::util::inner_service_accessors!();
}

impl<S, L, K, Request> Service<Request> for LimitWait<S, L, K>
where
    S: Service<Request> + Clone,
    S::Error: Into<BoxError>,
    L: Reserve<Request>,
    K: Cost<Request>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = WaitFuture<S, Request, L::Booking>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let tokens = self.layer.cost.cost(&request);
        match self
            .layer
            .limit
            .reserve(&request, tokens, self.layer.max_wait)
        {
            Booked::Now => WaitFuture::called(self.inner.call(request)),
            Booked::Refused(refused) => WaitFuture::refused(refused),
            Booked::MissingKey => {
                log_missing_key("wait", false);
                WaitFuture::missing_key()
            }
            Booked::KeyNotSent => {
                log_missing_key("wait", true);
                WaitFuture::missing_key()
            }
            Booked::Later(booking, wait) => {
                // The ready service goes into the future; this one keeps a fresh clone.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                WaitFuture::waiting(ready, request, booking, wait)
            }
        }
    }
}

pin_project! {
    /// Response future of [`LimitWait`] (and so of
    /// [`KeyedRateLimitWait`](super::KeyedRateLimitWait)): waits for the booking's turn,
    /// then calls.
    pub struct WaitFuture<S, Request, B>
    where
        S: Service<Request>,
    {
        #[pin]
        state: WaitState<S, Request, B>,
    }
}

pin_project! {
    #[project = WaitProj]
    enum WaitState<S, Request, B>
    where
        S: Service<Request>,
    {
        Waiting {
            #[pin]
            sleep: tokio::time::Sleep,
            service: Option<S>,
            request: Option<Request>,
            booking: Option<B>,
        },
        Called { #[pin] future: S::Future },
        Refused { error: Option<RateLimited> },
        MissingKey,
    }
}

impl<S: Service<Request>, Request, B> WaitFuture<S, Request, B> {
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

    fn waiting(service: S, request: Request, booking: B, wait: Duration) -> Self {
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

impl<S: Service<Request>, Request, B> fmt::Debug for WaitFuture<S, Request, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitFuture").finish_non_exhaustive()
    }
}

impl<S, Request, B> Future for WaitFuture<S, Request, B>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    B: Booking,
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
                    if let Some(booking) = booking.take() {
                        booking.used();
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
                WaitProj::MissingKey => return Poll::Ready(Err(Box::new(MissingKey))),
            };
            self.as_mut().project().state.set(next);
        }
    }
}
