//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::admission::Ticket;
use super::classify::{Classify, Recorder};
use super::error::{Boxed, ErrorMode, Mode};

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// Dropping it before completion records nothing; a probe permit it holds goes back
    /// to the breaker.
    pub struct ResponseFuture<F, C, M = Boxed>
    where
        M: Mode,
    {
        #[pin]
        kind: Kind<F, C, M::Refusal>,
        _mode: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C, R> {
        // Admitted (closed, probe or disabled): the ticket records the outcome.
        Called {
            #[pin]
            future: F,
            ticket: Ticket,
            classifier: C,
        },
        // What the error mode keeps of the rejection: nothing by default.
        Rejected { error: Option<R> },
    }
}

impl<F, C, M: Mode> ResponseFuture<F, C, M> {
    #[inline(always)]
    pub(crate) fn called(future: F, ticket: Ticket, classifier: C) -> Self {
        Self {
            kind: Kind::Called {
                future,
                ticket,
                classifier,
            },
            _mode: PhantomData,
        }
    }

    #[inline(always)]
    pub(crate) fn rejected(error: M::Refusal) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
            _mode: PhantomData,
        }
    }
}

impl<F, C, M: Mode> fmt::Debug for ResponseFuture<F, C, M> {
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
            KindProj::Called {
                future,
                ticket,
                classifier,
            } => {
                let mut result = ready!(future.poll(cx));
                if ticket.is_pending() {
                    classifier.record(&mut result, Recorder::from(ticket.take()));
                }
                Poll::Ready(result.map_err(M::inner))
            }
            KindProj::Rejected { error } => Poll::Ready(Err(M::rejected(
                error
                    .take()
                    .expect("circuit breaker ResponseFuture polled after completion"),
            ))),
        }
    }
}
