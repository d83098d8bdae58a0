use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use tower::Service;

use super::admission::{Admission, Ticket};
use super::classify::{Classify, ErrorsAreFailures};
use super::error::{Boxed, ErrorMode, Mode};
use super::future::ResponseFuture;
use super::{Breaker, CircuitBreakerLayer};

/// A service guarded by a circuit breaker. See the [module docs](super).
///
/// `poll_ready` asks the breaker first (a rejection or a probe permit taken at the first
/// `poll_ready` after a `call` is kept while the inner service is pending; a closed
/// breaker is read again, with one atomic load, in `call`, so a breaker that opened
/// meanwhile is not bypassed). When it rejects, `poll_ready` is ready at once and
/// `call` returns a [`CircuitOpen`](super::CircuitOpen) error without touching the inner
/// service. A half-open probe permit is reserved in `poll_ready` and returned if the
/// service, or the call's future, is dropped before the call completes.
///
/// Errors are [`BoxError`](crate::BoxError) by default; see [`ErrorMode`] for the typed,
/// allocation-free alternative.
///
/// Built by [`CircuitBreakerLayer`], or around a service directly, sharing a [`Breaker`]
/// that other code can watch and control:
///
/// ```
/// use seawall::circuit_breaker::{Breaker, CircuitBreaker, CircuitBreakerConfig, CircuitOpen, State};
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let breaker = Breaker::new(CircuitBreakerConfig::builder().name("search").build()?);
/// let mut svc = CircuitBreaker::with_breaker(
///     service_fn(|q: &'static str| async move { Ok::<_, seawall::BoxError>(q.len()) }),
///     breaker.clone(),
/// );
/// assert_eq!(svc.ready().await?.call("seawall").await?, 7);
///
/// // Manual control: an operator takes the dependency out during maintenance.
/// breaker.force_open();
/// assert_eq!(svc.breaker().state(), State::ForcedOpen);
/// assert!(svc.ready().await?.call("x").await.unwrap_err().is::<CircuitOpen>());
/// breaker.reset();
/// assert_eq!(svc.ready().await?.call("back").await?, 4);
/// # Ok(())
/// # }
/// ```
pub struct CircuitBreaker<S, C = ErrorsAreFailures, M = Boxed> {
    inner: S,
    breaker: Breaker,
    classifier: C,
    /// What the breaker decided for the next call (with a probe's reserved slot).
    admission: Admission,
    _mode: PhantomData<fn() -> M>,
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

impl<S, C, M> CircuitBreaker<S, C, M> {
    /// Wraps `inner` with `breaker` and `classifier`.
    pub fn new(inner: S, breaker: Breaker, classifier: C) -> Self {
        Self {
            inner,
            breaker,
            classifier,
            admission: Admission::NONE,
            _mode: PhantomData,
        }
    }

    /// The breaker guarding this service.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    crate::util::inner_service_accessors!();
}

impl<S: Clone, C: Clone, M> Clone for CircuitBreaker<S, C, M> {
    /// The clone shares the breaker but not this instance's readiness or probe permit.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            admission: Admission::NONE,
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, C, M> fmt::Debug for CircuitBreaker<S, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .field("classifier", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, C, M, Request> Service<Request> for CircuitBreaker<S, C, M>
where
    S: Service<Request>,
    M: ErrorMode<S::Error>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, C, M>;

    // `inline(always)`: when the decision and the future move through an out-of-line call,
    // copying them back costs store-forwarding stalls that double the layer's cost.
    #[inline(always)]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A rejection or a probe is decided once per call, at the first `poll_ready` after
        // the previous `call`: a reserved probe permit is thereby kept until it is used or
        // the service dropped. A closed breaker keeps nothing: `call` reads it again.
        self.admission.ask_if_none(&self.breaker);
        if self.admission.rejects() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(M::inner)
    }

    #[inline(always)]
    fn call(&mut self, request: Request) -> Self::Future {
        // The breaker may have moved since `poll_ready` (the inner service may have been
        // pending for long): a closed breaker is read again and a kept probe decision
        // checked again, and the decision taken again if it moved, so a breaker that
        // opened meanwhile is not bypassed.
        let admitted = match self.admission.start_closed(&self.breaker) {
            Some(ticket) => Ok(ticket),
            None => match self.admission.take_rejection::<M>(&self.breaker) {
                Some(open) => Err(open),
                None => self.admit_other(),
            },
        };
        // Built in one place from what the branches decided, so that the compiler writes
        // the future straight where the caller keeps it (see `ResponseFuture`).
        match admitted {
            Ok(ticket) => {
                ResponseFuture::called(self.inner.call(request), ticket, self.classifier.clone())
            }
            Err(refusal) => ResponseFuture::rejected(refusal),
        }
    }
}

impl<S, C, M> CircuitBreaker<S, C, M> {
    /// Every call neither admitted closed nor rejected: a probe, a disabled breaker, or a
    /// closed admission that no longer holds.
    #[cold]
    #[inline(never)]
    fn admit_other(&mut self) -> Result<Ticket, M::Refusal>
    where
        M: Mode,
    {
        let admission = std::mem::replace(&mut self.admission, Admission::NONE);
        admission.start(&self.breaker).map_err(M::from_rejection)
    }
}
