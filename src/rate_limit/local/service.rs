use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Sleep;
use tower::Service;

use super::layer::Mode;
use crate::BoxError;
use crate::clock::{Clock, TokioClock};
use crate::rate_limit::error::RateLimited;
use crate::rate_limit::future::ResponseFuture;
use crate::rate_limit::{Charge, Cost, RateLimiter, Reservation};

/// A service whose requests draw tokens from a shared [`RateLimiter`]. See the
/// [module docs](crate::rate_limit).
///
/// In [`Mode::Reject`], each `call` takes its request's cost or fails at once with
/// [`RateLimited`]; if the inner service then fails with a [`RateLimited`] (a limit
/// further in refused the request), the tokens are handed back, so stacked limits charge
/// only requests they all admit. In [`Mode::Wait`], `poll_ready` books the tokens (first
/// come, first served) and stays pending until they are due; a booking that is never used
/// (the service dropped or cloned away before `call`) is handed back, but tokens waited
/// for and used are not refunded when a limit further in refuses.
pub struct RateLimit<S, K = u32, C: Clock = TokioClock> {
    inner: S,
    booking: Booking<C>,
    mode: Mode,
    cost: K,
    /// Reused across waits, so that waiting allocates once per service, not per request.
    sleep: Option<Pin<Box<Sleep>>>,
}

#[derive(Debug)]
enum State {
    Idle,
    /// A booking whose tokens are not due yet.
    Waiting(Reservation),
    /// A booking whose tokens are due: the next call may go.
    Reserved(Reservation),
    /// Waiting would take too long: the next call is refused.
    Refused(RateLimited),
}

/// The per-service booking; hands unused tokens back when dropped.
struct Booking<C: Clock> {
    limiter: RateLimiter<C>,
    state: State,
}

impl<C: Clock> Booking<C> {
    fn release(&mut self) {
        if let State::Waiting(r) | State::Reserved(r) =
            std::mem::replace(&mut self.state, State::Idle)
        {
            self.limiter.cancel(r);
        }
    }
}

impl<C: Clock> Drop for Booking<C> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<S, K, C: Clock> RateLimit<S, K, C> {
    /// Wraps `inner`, charging each request `cost` tokens of `limiter`.
    pub fn new(inner: S, limiter: RateLimiter<C>, mode: Mode, cost: K) -> Self {
        Self {
            inner,
            booking: Booking {
                limiter,
                state: State::Idle,
            },
            mode,
            cost,
            sleep: None,
        }
    }

    /// The shared limiter.
    pub fn limiter(&self) -> &RateLimiter<C> {
        &self.booking.limiter
    }

    // `into_inner` hands back a booking not yet used (the booking's drop does).
    crate::util::inner_service_accessors!();
}

impl<S: Clone, K: Clone, C: Clock> Clone for RateLimit<S, K, C> {
    /// The clone shares the limiter but not this instance's booking.
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            self.booking.limiter.clone(),
            self.mode,
            self.cost.clone(),
        )
    }
}

impl<S: fmt::Debug, K, C: Clock> fmt::Debug for RateLimit<S, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.booking.limiter)
            .field("mode", &self.mode)
            .field("state", &self.booking.state)
            .finish()
    }
}

impl<S, K, C, Request> Service<Request> for RateLimit<S, K, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    K: Cost<Request>,
    C: Clock,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Charge<C>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Mode::Wait { max_wait } = self.mode {
            // A refusal decided by an earlier `poll_ready` is decided again: the bucket
            // may have refilled since (a ready cache polls again before each use).
            if matches!(self.booking.state, State::Refused(_)) {
                self.booking.state = State::Idle;
            }
            loop {
                match &self.booking.state {
                    State::Idle => {
                        let tokens = self.cost.fixed();
                        self.booking.state = match self.booking.limiter.reserve(tokens, max_wait) {
                            Ok(r) if r.wait.is_zero() => State::Reserved(r),
                            Ok(r) => {
                                let deadline = tokio::time::Instant::now() + r.wait;
                                match &mut self.sleep {
                                    Some(sleep) => sleep.as_mut().reset(deadline),
                                    None => {
                                        self.sleep =
                                            Some(Box::pin(tokio::time::sleep_until(deadline)));
                                    }
                                }
                                State::Waiting(r)
                            }
                            Err(refused) => State::Refused(refused),
                        };
                    }
                    State::Waiting(_) => {
                        if let Some(sleep) = &mut self.sleep {
                            if sleep.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                        if let State::Waiting(r) =
                            std::mem::replace(&mut self.booking.state, State::Idle)
                        {
                            self.booking.state = State::Reserved(r);
                        }
                    }
                    State::Reserved(_) => break,
                    State::Refused(_) => return Poll::Ready(Ok(())),
                }
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.mode {
            Mode::Reject => {
                let tokens = self.cost.cost(&request);
                let decision = self.booking.limiter.decide(tokens);
                crate::rate_limit::limit::answer(&mut self.inner, decision, request, "local")
            }
            Mode::Wait { .. } => match std::mem::replace(&mut self.booking.state, State::Idle) {
                State::Reserved(_) => ResponseFuture::called(self.inner.call(request), None),
                State::Refused(refused) => ResponseFuture::refused(refused),
                State::Idle | State::Waiting(_) => {
                    panic!("RateLimit::call invoked before poll_ready returned Ready(Ok(()))")
                }
            },
        }
    }
}
