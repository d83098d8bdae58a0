//! Fallback policies: what to answer when the inner service fails.

use std::fmt;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

/// Decides, per request, how a failure is turned into a response.
///
/// [`handler`](Self::handler) runs before the inner service is called (it sees the request,
/// for example to take a cache key); the returned [`Handler`] hears about the outcome.
/// Implement it for fallbacks the ready-made policies do not cover.
pub trait Policy<Request, Response, Error> {
    /// Per-call state.
    type Handler: Handler<Response, Error>;

    /// Prepares for one call of `request`.
    fn handler(&self, request: &Request) -> Self::Handler;
}

/// The per-call half of a [`Policy`].
pub trait Handler<Response, Error> {
    /// Produces the fallback answer.
    type Future: Future<Output = Result<Response, Error>>;

    /// Called with a successful response before it is returned.
    fn on_success(&mut self, response: &Response) {
        let _ = response;
    }

    /// Called with the inner service's error; resolves to the response to return instead,
    /// or to an error (the same one, to decline).
    fn on_error(self, error: Error) -> Self::Future;
}

/// Answers every failure with a clone of one value. See [`FallbackLayer::value`](super::FallbackLayer::value).
#[derive(Debug)]
pub struct Value<R> {
    value: Arc<R>,
}

impl<R> Value<R> {
    pub(crate) fn new(value: R) -> Self {
        Self {
            value: Arc::new(value),
        }
    }
}

impl<R> Clone for Value<R> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
        }
    }
}

impl<Req, R: Clone, E> Policy<Req, R, E> for Value<R> {
    type Handler = Self;

    fn handler(&self, _: &Req) -> Self {
        self.clone()
    }
}

impl<R: Clone, E> Handler<R, E> for Value<R> {
    type Future = Ready<Result<R, E>>;

    fn on_error(self, _: E) -> Self::Future {
        ready(Ok(R::clone(&self.value)))
    }
}

/// Answers a failure with the result of a closure over the error. See
/// [`FallbackLayer::from_fn`](super::FallbackLayer::from_fn).
pub struct FromFn<F> {
    f: Arc<F>,
}

impl<F> Clone for FromFn<F> {
    fn clone(&self) -> Self {
        Self { f: self.f.clone() }
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<F> FromFn<F> {
    pub(crate) fn new(f: F) -> Self {
        Self { f: Arc::new(f) }
    }
}

impl<Req, R, E, F> Policy<Req, R, E> for FromFn<F>
where
    F: Fn(E) -> R,
{
    type Handler = Self;

    fn handler(&self, _: &Req) -> Self {
        self.clone()
    }
}

impl<R, E, F> Handler<R, E> for FromFn<F>
where
    F: Fn(E) -> R,
{
    type Future = Ready<Result<R, E>>;

    fn on_error(self, error: E) -> Self::Future {
        ready(Ok((self.f)(error)))
    }
}

/// Answers a failure with the output of an async closure over the error. See
/// [`FallbackLayer::from_async_fn`](super::FallbackLayer::from_async_fn).
pub struct FromAsyncFn<F> {
    f: Arc<F>,
}

impl<F> Clone for FromAsyncFn<F> {
    fn clone(&self) -> Self {
        Self { f: self.f.clone() }
    }
}

impl<F> fmt::Debug for FromAsyncFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromAsyncFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<F> FromAsyncFn<F> {
    pub(crate) fn new(f: F) -> Self {
        Self { f: Arc::new(f) }
    }
}

impl<Req, R, E, F, Fut> Policy<Req, R, E> for FromAsyncFn<F>
where
    F: Fn(E) -> Fut,
    Fut: Future<Output = R>,
{
    type Handler = Self;

    fn handler(&self, _: &Req) -> Self {
        self.clone()
    }
}

impl<R, E, F, Fut> Handler<R, E> for FromAsyncFn<F>
where
    F: Fn(E) -> Fut,
    Fut: Future<Output = R>,
{
    type Future = OkFuture<Fut, E>;

    fn on_error(self, error: E) -> Self::Future {
        OkFuture {
            future: (self.f)(error),
            _error: std::marker::PhantomData,
        }
    }
}

pin_project! {
    /// Wraps a future's output in `Ok`.
    pub struct OkFuture<F, E> {
        #[pin]
        future: F,
        _error: std::marker::PhantomData<fn() -> E>,
    }
}

impl<F, E> fmt::Debug for OkFuture<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OkFuture").finish_non_exhaustive()
    }
}

impl<F: Future, E> Future for OkFuture<F, E> {
    type Output = Result<F::Output, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().future.poll(cx).map(Ok)
    }
}

/// Applies a policy only to errors matching a predicate; others pass through unchanged.
/// See [`FallbackLayer::when`](super::FallbackLayer::when).
pub struct When<P, F> {
    pub(crate) policy: P,
    pub(crate) predicate: Arc<F>,
}

impl<P: Clone, F> Clone for When<P, F> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            predicate: self.predicate.clone(),
        }
    }
}

impl<P: fmt::Debug, F> fmt::Debug for When<P, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("When")
            .field("policy", &self.policy)
            .field("predicate", &std::any::type_name::<F>())
            .finish()
    }
}

impl<Req, R, E, P, F> Policy<Req, R, E> for When<P, F>
where
    P: Policy<Req, R, E>,
    F: Fn(&E) -> bool,
{
    type Handler = When<P::Handler, F>;

    fn handler(&self, request: &Req) -> Self::Handler {
        When {
            policy: self.policy.handler(request),
            predicate: self.predicate.clone(),
        }
    }
}

impl<R, E, H, F> Handler<R, E> for When<H, F>
where
    H: Handler<R, E>,
    F: Fn(&E) -> bool,
{
    type Future = MaybeFallback<H::Future, R, E>;

    fn on_success(&mut self, response: &R) {
        self.policy.on_success(response);
    }

    fn on_error(self, error: E) -> Self::Future {
        if (self.predicate)(&error) {
            MaybeFallback::Fallback {
                future: self.policy.on_error(error),
            }
        } else {
            MaybeFallback::PassThrough {
                error: Some(error),
                _response: std::marker::PhantomData,
            }
        }
    }
}

pin_project! {
    /// Either a fallback future or the original error. Future of [`When`].
    #[project = MaybeProj]
    #[allow(missing_docs)]
    pub enum MaybeFallback<F, R, E> {
        /// The fallback runs.
        Fallback { #[pin] future: F },
        /// The error passes through.
        PassThrough { error: Option<E>, _response: std::marker::PhantomData<fn() -> R> },
    }
}

impl<F, R, E> fmt::Debug for MaybeFallback<F, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaybeFallback").finish_non_exhaustive()
    }
}

impl<F, R, E> Future for MaybeFallback<F, R, E>
where
    F: Future<Output = Result<R, E>>,
{
    type Output = Result<R, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            MaybeProj::Fallback { future } => future.poll(cx),
            MaybeProj::PassThrough { error, .. } => Poll::Ready(Err(error
                .take()
                .expect("MaybeFallback polled after completion"))),
        }
    }
}
