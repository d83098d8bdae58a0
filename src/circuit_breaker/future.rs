//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::classify::{Classify, Outcome};
use super::error::CircuitOpen;
use super::state::{ProbePermit, Shared};
use crate::BoxError;

pub(crate) enum Ticket {
    Closed {
        shared: Arc<Shared>,
        generation: u64,
    },
    Probe(ProbePermit),
}

impl Ticket {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        match self {
            Ticket::Closed { shared, .. } => shared,
            Ticket::Probe(permit) => permit.shared(),
        }
    }
}

pub(crate) struct Recorder<C> {
    pub(crate) ticket: Ticket,
    pub(crate) classifier: C,
    pub(crate) start: Option<Instant>,
}

impl<C> Recorder<C> {
    fn finish(self, outcome: Outcome) {
        let shared = self.ticket.shared();
        let (slow, now) = match (self.start, shared.config.slow_call_duration) {
            (Some(start), Some(limit)) => {
                let now = Instant::now();
                (now.saturating_duration_since(start) >= limit, Some(now))
            }
            _ => (false, None),
        };
        match self.ticket {
            Ticket::Closed { shared, generation } => {
                shared.record_closed(generation, outcome, slow, now);
            }
            Ticket::Probe(permit) => permit.complete(outcome, slow),
        }
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// Dropping it before completion records nothing; a probe permit it holds goes back
    /// to the breaker.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Called { #[pin] future: F, recorder: Option<Recorder<C>> },
        Passthrough { #[pin] future: F },
        Rejected { error: Option<CircuitOpen> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, recorder: Recorder<C>) -> Self {
        Self {
            kind: Kind::Called {
                future,
                recorder: Some(recorder),
            },
        }
    }

    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn rejected(error: CircuitOpen) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
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
            KindProj::Called { future, recorder } => {
                let result = ready!(future.poll(cx));
                if let Some(recorder) = recorder.take() {
                    let outcome = recorder.classifier.classify(result.as_ref());
                    recorder.finish(outcome);
                }
                Poll::Ready(result.map_err(Into::into))
            }
            KindProj::Passthrough { future } => future.poll(cx).map_err(Into::into),
            KindProj::Rejected { error } => Poll::Ready(Err(Box::new(
                error
                    .take()
                    .expect("circuit breaker ResponseFuture polled after completion"),
            ))),
        }
    }
}
