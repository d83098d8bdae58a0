use std::fmt;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::Service;

use super::classify::{Classify, ErrorsAreFailures};
use super::future::{Recorder, ResponseFuture, Ticket};
use super::state::Admission;
use super::{Breaker, CircuitBreakerLayer};
use crate::BoxError;

/// A service guarded by a circuit breaker. See the [module docs](super).
///
/// `poll_ready` asks the breaker first. When it rejects, `poll_ready` is ready at once and
/// `call` returns a [`CircuitOpen`](super::CircuitOpen) error without touching the inner
/// service. A half-open probe permit is reserved in `poll_ready` and returned if the
/// service, or the call's future, is dropped before the call completes.
pub struct CircuitBreaker<S, C = ErrorsAreFailures> {
    inner: S,
    breaker: Breaker,
    classifier: C,
    admission: Option<Admission>,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` with `breaker`, counting every error as a failure.
    pub fn with_breaker(inner: S, breaker: Breaker) -> Self {
        Self::new(inner, breaker, ErrorsAreFailures)
    }

    /// A layer with a new breaker built from `config`.
    pub fn layer(config: super::CircuitBreakerConfig) -> CircuitBreakerLayer {
        CircuitBreakerLayer::new(config)
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// Wraps `inner` with `breaker` and `classifier`.
    pub fn new(inner: S, breaker: Breaker, classifier: C) -> Self {
        Self {
            inner,
            breaker,
            classifier,
            admission: None,
        }
    }

    /// The breaker guarding this service.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service; a reserved probe permit is returned to the breaker.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    /// The clone shares the breaker but not this instance's readiness or probe permit.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            admission: None,
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .field("classifier", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, C, Request> Service<Request> for CircuitBreaker<S, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A reserved probe is kept across polls; anything else is decided afresh.
        if !matches!(self.admission, Some(Admission::Probe(_))) {
            self.admission = Some(self.breaker.shared.admit());
        }
        match self.admission {
            Some(Admission::Rejected(_)) => Poll::Ready(Ok(())),
            _ => self.inner.poll_ready(cx).map_err(Into::into),
        }
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let admission = self
            .admission
            .take()
            .expect("CircuitBreaker::call invoked before poll_ready returned Ready(Ok(()))");
        let ticket = match admission {
            Admission::Rejected(err) => return ResponseFuture::rejected(err),
            Admission::Disabled => return ResponseFuture::passthrough(self.inner.call(request)),
            Admission::Closed(generation) => Ticket::Closed {
                shared: self.breaker.shared.clone(),
                generation,
            },
            Admission::Probe(permit) => Ticket::Probe(permit),
        };
        let start = ticket.shared().times_calls.then(Instant::now);
        let recorder = Recorder {
            ticket,
            classifier: self.classifier.clone(),
            start,
        };
        ResponseFuture::called(self.inner.call(request), recorder)
    }
}
