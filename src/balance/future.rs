//! Response futures of the balancers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::Service;

use crate::BoxError;
use crate::circuit_breaker::{Classify, Outcome, Recorder, Ticket};

use super::stats::EndpointStats;

/// One call in flight on an endpoint: counted in its outstanding requests until dropped.
pub(crate) struct CallGuard {
    stats: Arc<EndpointStats>,
    /// Clock nanoseconds at the call, 0 when latency is not tracked.
    start: u64,
    /// The endpoint breaker's ticket for this call, if the endpoint has a breaker.
    breaker: Option<Ticket>,
}

impl CallGuard {
    #[inline]
    pub(crate) fn new(stats: &Arc<EndpointStats>, start: u64, breaker: Option<Ticket>) -> Self {
        stats.start_call();
        Self {
            stats: stats.clone(),
            start,
            breaker,
        }
    }

    #[inline]
    pub(crate) fn complete(mut self, outcome: Outcome) {
        self.stats.complete(outcome, self.start);
        if let Some(ticket) = self.breaker.take() {
            let probe = ticket.is_probe();
            ticket.record(outcome);
            if probe {
                // A probe's outcome may have closed its breaker (or handed its permit
                // back): balancers a half-open breaker left pending look again.
                self.stats.set.wake_probe_waiters();
            }
        }
    }

    /// A probe dropped unfinished: its permit goes back to the breaker, then the balancers
    /// waiting for one are woken.
    #[cold]
    #[inline(never)]
    fn let_go_of_probe(&mut self) {
        drop(self.breaker.take());
        self.stats.set.wake_probe_waiters();
    }
}

impl Drop for CallGuard {
    #[inline]
    fn drop(&mut self) {
        self.stats.end_call();
        // Only a probe's end can let in a balancer a half-open breaker left pending (the
        // probes in flight held every permit): other calls pay one test for it.
        if self.breaker.as_ref().is_some_and(Ticket::is_probe) {
            self.let_go_of_probe();
        }
    }
}

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    ///
    /// Records the outcome (for outlier detection, the endpoint's breaker and latency)
    /// when the call completes; dropped unfinished, it records nothing and the call stops
    /// counting as outstanding.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Called {
            #[pin]
            future: F,
            guard: Option<CallGuard>,
            classifier: C,
        },
        Failed { error: Option<BoxError> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn called(future: F, guard: CallGuard, classifier: C) -> Self {
        Self {
            kind: Kind::Called {
                future,
                guard: Some(guard),
                classifier,
            },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called {
                future,
                guard,
                classifier,
            } => {
                let mut result = ready!(future.poll(cx));
                if let Some(guard) = guard.take() {
                    classifier.record(&mut result, Recorder::call(guard));
                }
                Poll::Ready(result.map_err(Into::into))
            }
            KindProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .expect("balance ResponseFuture polled after completion"))),
        }
    }
}

pin_project! {
    /// Response future of [`HashBalance`](super::HashBalance): waits for the chosen
    /// endpoint's readiness, then calls it.
    pub struct HashResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        state: HashState<S, Req, C>,
    }
}

pin_project! {
    #[project = HashProj]
    enum HashState<S, Req, C>
    where
        S: Service<Req>,
    {
        Waiting {
            service: S,
            request: Option<Req>,
            guard: Option<CallGuard>,
            classifier: Option<C>,
        },
        Called {
            #[pin]
            inner: ResponseFuture<S::Future, C>,
        },
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req, C> HashResponseFuture<S, Req, C> {
    pub(crate) fn waiting(service: S, request: Req, guard: CallGuard, classifier: C) -> Self {
        Self {
            state: HashState::Waiting {
                service,
                request: Some(request),
                guard: Some(guard),
                classifier: Some(classifier),
            },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            state: HashState::Failed { error: Some(error) },
        }
    }
}

impl<S: Service<Req>, Req, C> fmt::Debug for HashResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req, C> Future for HashResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                HashProj::Waiting {
                    service,
                    request,
                    guard,
                    classifier,
                } => {
                    if let Err(e) = ready!(service.poll_ready(cx)) {
                        if let Some(guard) = guard.take() {
                            guard.complete(Outcome::Failure);
                        }
                        return Poll::Ready(Err(e.into()));
                    }
                    let request = request.take().expect("polled after completion");
                    let guard = guard.take().expect("polled after completion");
                    let classifier = classifier.take().expect("polled after completion");
                    HashState::Called {
                        inner: ResponseFuture::called(service.call(request), guard, classifier),
                    }
                }
                HashProj::Called { inner } => return inner.poll(cx),
                HashProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .expect("balance HashResponseFuture polled after completion")));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}
