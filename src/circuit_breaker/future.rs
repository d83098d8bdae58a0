//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::classify::Classify;
use super::error::{Boxed, CircuitOpen, ErrorMode};
use super::state::{ProbePermit, Shared, Start};

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// Dropping it before completion records nothing; a probe permit it holds goes back
    /// to the breaker.
    pub struct ResponseFuture<F, C, M = Boxed> {
        #[pin]
        kind: Kind<F, C>,
        _mode: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        // Admitted while closed; `shared` is taken when the outcome is recorded.
        Closed {
            #[pin]
            future: F,
            shared: Option<Arc<Shared>>,
            classifier: C,
            generation: u64,
            start: Start,
        },
        // A half-open probe; the permit returns to the breaker if this is dropped unfinished.
        Probe {
            #[pin]
            future: F,
            permit: Option<ProbePermit>,
            classifier: C,
            start: Start,
        },
        Passthrough { #[pin] future: F },
        Rejected { error: Option<CircuitOpen> },
    }
}

impl<F, C, M> ResponseFuture<F, C, M> {
    #[inline(always)]
    pub(crate) fn closed(
        future: F,
        shared: Arc<Shared>,
        classifier: C,
        generation: u64,
        start: Start,
    ) -> Self {
        Self {
            kind: Kind::Closed {
                future,
                shared: Some(shared),
                classifier,
                generation,
                start,
            },
            _mode: PhantomData,
        }
    }

    pub(crate) fn probe(future: F, permit: ProbePermit, classifier: C, start: Start) -> Self {
        Self {
            kind: Kind::Probe {
                future,
                permit: Some(permit),
                classifier,
                start,
            },
            _mode: PhantomData,
        }
    }

    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
            _mode: PhantomData,
        }
    }

    pub(crate) fn rejected(error: CircuitOpen) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
            _mode: PhantomData,
        }
    }
}

impl<F, C, M> fmt::Debug for ResponseFuture<F, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, M, T, E> Future for ResponseFuture<F, C, M>
where
    F: Future<Output = Result<T, E>>,
    M: ErrorMode<E>,
    C: Classify<T, E>,
{
    type Output = Result<T, M::Error>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Closed {
                future,
                shared,
                classifier,
                generation,
                start,
            } => {
                let result = ready!(future.poll(cx));
                if let Some(shared) = shared.take() {
                    let outcome = classifier.classify(result.as_ref());
                    shared.record_closed(*generation, outcome, *start);
                }
                Poll::Ready(result.map_err(M::inner))
            }
            KindProj::Probe {
                future,
                permit,
                classifier,
                start,
            } => {
                let result = ready!(future.poll(cx));
                if let Some(permit) = permit.take() {
                    let outcome = classifier.classify(result.as_ref());
                    permit.complete(outcome, *start);
                }
                Poll::Ready(result.map_err(M::inner))
            }
            KindProj::Passthrough { future } => future.poll(cx).map_err(M::inner),
            KindProj::Rejected { error } => Poll::Ready(Err(M::rejected(
                error
                    .take()
                    .expect("circuit breaker ResponseFuture polled after completion"),
            ))),
        }
    }
}
