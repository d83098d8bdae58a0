//! The response future of [`Fallback`](super::Fallback).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::policy::Handler;

pin_project! {
    /// Response future of [`Fallback`](super::Fallback).
    pub struct ResponseFuture<F, H, HF> {
        #[pin]
        state: State<F, H, HF>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, H, HF> {
        Called { #[pin] future: F, handler: Option<H> },
        Fallback { #[pin] future: HF },
    }
}

impl<F, H, HF> ResponseFuture<F, H, HF> {
    pub(crate) fn new(future: F, handler: H) -> Self {
        Self {
            state: State::Called {
                future,
                handler: Some(handler),
            },
        }
    }
}

impl<F, H, HF> fmt::Debug for ResponseFuture<F, H, HF> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, H, HF, T, E> Future for ResponseFuture<F, H, HF>
where
    F: Future<Output = Result<T, E>>,
    H: Handler<T, E, Future = HF>,
    HF: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let next = match this.state.project() {
                StateProj::Called { future, handler } => {
                    let result = ready!(future.poll(cx));
                    let mut handler = handler
                        .take()
                        .expect("fallback ResponseFuture polled after completion");
                    match result {
                        Ok(response) => {
                            handler.on_success(&response);
                            return Poll::Ready(Ok(response));
                        }
                        Err(error) => handler.on_error(error),
                    }
                }
                StateProj::Fallback { future } => return future.poll(cx),
            };
            self.as_mut()
                .project()
                .state
                .set(State::Fallback { future: next });
        }
    }
}
