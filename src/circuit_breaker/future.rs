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
    //
    // A struct rather than an enum of the admitted and the rejected call: both are then
    // built as the same fields at the same places, which the compiler writes straight
    // into the caller's future. As an enum, the variants' differently typed fields at
    // the same offsets had it build the future aside and copy it over in wider words
    // than were written, a store-forwarding stall that was a third of the layer's cost.
    pub struct ResponseFuture<F, C, M = Boxed>
    where
        M: Mode,
    {
        // The admitted call (closed, probe or disabled); `None` for a rejection.
        #[pin]
        call: Option<Called<F, C>>,
        // What the error mode keeps of a rejection: nothing by default.
        refusal: Option<M::Refusal>,
        _mode: PhantomData<fn() -> M>,
    }
}

pin_project! {
    struct Called<F, C> {
        #[pin]
        future: F,
        // Records the call's outcome.
        ticket: Ticket,
        classifier: C,
    }
}

impl<F, C, M: Mode> ResponseFuture<F, C, M> {
    #[inline(always)]
    pub(crate) fn called(future: F, ticket: Ticket, classifier: C) -> Self {
        Self {
            call: Some(Called {
                future,
                ticket,
                classifier,
            }),
            refusal: None,
            _mode: PhantomData,
        }
    }

    #[inline(always)]
    pub(crate) fn rejected(refusal: M::Refusal) -> Self {
        Self {
            call: None,
            refusal: Some(refusal),
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
        let this = self.project();
        match this.call.as_pin_mut() {
            Some(called) => {
                let called = called.project();
                let mut result = ready!(called.future.poll(cx));
                if called.ticket.is_pending() {
                    called
                        .classifier
                        .record(&mut result, Recorder::from(called.ticket.take()));
                }
                Poll::Ready(result.map_err(M::inner))
            }
            None => Poll::Ready(Err(M::rejected(
                this.refusal
                    .take()
                    .expect("circuit breaker ResponseFuture polled after completion"),
            ))),
        }
    }
}
