//! The response futures of the tower rate-limit layers: [`ResponseFuture`] for a limit that
//! decides at once, [`Deferred`] for one that answers after a round trip.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use tower::Service;

use super::error::RateLimited;
use super::{Decision, Refund};
use crate::BoxError;

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit) and
    /// [`KeyedRateLimit`](super::KeyedRateLimit). When the inner service fails with a
    /// [`RateLimited`] (a limit further in refused the request), the tokens this layer
    /// took are handed back (`R`, see [stacked limits](super#stacked-limits)).
    pub struct ResponseFuture<F, R = ()> {
        #[pin]
        kind: Kind<F, R>,
    }
}

pin_project! {
    #[project = KindProj]
    // Two variants, the refusal already boxed (the one allocation a refusal makes, in
    // `call` rather than at the first poll): the future is the inner one and the
    // receipt, and its poll a test rather than a jump table.
    enum Kind<F, R> {
        Called { #[pin] future: F, charge: Option<R> },
        Failed { error: Option<BoxError> },
    }
}

impl<F, R> ResponseFuture<F, R> {
    pub(crate) fn called(future: F, charge: Option<R>) -> Self {
        Self {
            kind: Kind::Called { future, charge },
        }
    }

    /// Refused for want of a key (`MissingKey` is zero-sized: boxing it allocates
    /// nothing).
    pub(crate) fn missing_key() -> Self {
        Self::failed(Box::new(super::MissingKey))
    }

    /// Refused by the limit.
    #[cold]
    pub(crate) fn refused(error: RateLimited) -> Self {
        Self::failed(Box::new(error))
    }

    /// Refused with the limit's own error ([`Decision::Unavailable`]).
    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<F, R> fmt::Debug for ResponseFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, R, T, E> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    R: Refund,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The admitted path inline, the rest out of line: a layer's future is polled
        // inside every caller's loop.
        match self.project().kind.project() {
            KindProj::Called { future, charge } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(response)),
                Err(error) => Poll::Ready(Err(refund_if_refused(error.into(), charge))),
            },
            KindProj::Failed { error } => Poll::Ready(Err(failed(error))),
        }
    }
}

/// The inner service's `error`; if a limit further in refused the request, or took no key
/// from it, this layer's tokens were not used and go back.
#[cold]
#[inline(never)]
fn refund_if_refused<R: Refund>(error: BoxError, charge: &mut Option<R>) -> BoxError {
    if crate::caused_by::<RateLimited>(&error)
        || crate::caused_by::<crate::rate_limit::MissingKey>(&error)
    {
        if let Some(charge) = charge.take() {
            charge.refund();
        }
    }
    error
}

#[cold]
#[inline(never)]
fn failed(error: &mut Option<BoxError>) -> BoxError {
    error
        .take()
        .expect("rate limit ResponseFuture polled after completion")
}

pin_project! {
    /// Response future of [`LimitService`](super::LimitService) over a limit whose check
    /// is a round trip (the Redis limiter): waits for the decision, holding a ready clone
    /// of the inner service and the request, then answers it as [`ResponseFuture`] does.
    pub struct Deferred<C, S, Request, F, Ch> {
        #[pin]
        state: DeferredState<C, S, Request, F, Ch>,
    }
}

pin_project! {
    #[project = DeferredProj]
    enum DeferredState<C, S, Request, F, Ch> {
        Checking {
            #[pin]
            check: C,
            inner: Option<S>,
            request: Option<Request>,
            layer: &'static str,
        },
        Answered { #[pin] future: ResponseFuture<F, Ch> },
    }
}

impl<C, S, Request, F, Ch> Deferred<C, S, Request, F, Ch> {
    pub(crate) fn new(check: C, inner: S, request: Request, layer: &'static str) -> Self {
        Self {
            state: DeferredState::Checking {
                check,
                inner: Some(inner),
                request: Some(request),
                layer,
            },
        }
    }
}

impl<C, S, Request, F, Ch> fmt::Debug for Deferred<C, S, Request, F, Ch> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred").finish_non_exhaustive()
    }
}

impl<C, S, Request, T, E, Ch> Future for Deferred<C, S, Request, S::Future, Ch>
where
    C: Future<Output = Decision<Ch>>,
    S: Service<Request, Response = T, Error = E>,
    E: Into<BoxError>,
    Ch: Refund,
{
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                DeferredProj::Checking {
                    check,
                    inner,
                    request,
                    layer,
                } => {
                    let decision = std::task::ready!(check.poll(cx));
                    let mut inner = inner.take().expect("Deferred polled after completion");
                    let request = request.take().expect("Deferred polled after completion");
                    DeferredState::Answered {
                        future: super::limit::answer(&mut inner, decision, request, layer),
                    }
                }
                DeferredProj::Answered { future } => return future.poll(cx),
            };
            self.as_mut().project().state.set(next);
        }
    }
}
