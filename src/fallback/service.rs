use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::future::ResponseFuture;
use super::policy::{Handler, Policy};

/// A service whose failures are answered by a fallback [`Policy`]. See the [module docs](super).
///
/// The error type is the inner service's: errors the policy declines pass through unchanged,
/// and so do errors from the inner service's `poll_ready` (in tower, a service that fails
/// readiness is broken for good; there is no request to answer yet).
pub struct Fallback<S, P> {
    inner: S,
    policy: Arc<P>,
}

impl<S, P> Fallback<S, P> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: S, policy: P) -> Self {
        Self::from_shared(inner, Arc::new(policy))
    }

    pub(crate) fn from_shared(inner: S, policy: Arc<P>) -> Self {
        Self { inner, policy }
    }

    crate::util::inner_service_accessors!();
}

impl<S: Clone, P> Clone for Fallback<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Fallback<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<S, P, Request> Service<Request> for Fallback<S, P>
where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<
        S::Future,
        P::Handler,
        <P::Handler as Handler<S::Response, S::Error>>::Future,
    >;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let handler = self.policy.handler(&request);
        ResponseFuture::new(self.inner.call(request), handler)
    }
}
