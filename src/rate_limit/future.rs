//! The response future of [`RateLimit`](super::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::Refund;
use super::error::RateLimited;
use crate::BoxError;

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit) and
    /// [`KeyedRateLimit`](super::KeyedRateLimit). When the inner service fails with a
    /// [`RateLimited`] (a limit further in refused the request), the tokens this layer
    /// took are handed back (`R`, see [stacked limits](super#stacked-limits)).
    pub struct ResponseFuture<F, R = ()> {
        #[pin]
        kind: Kind<F, R>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, R> {
        Called { #[pin] future: F, charge: Option<R> },
        Refused { error: Option<RateLimited> },
        MissingKey,
    }
}

impl<F, R> ResponseFuture<F, R> {
    pub(crate) fn called(future: F, charge: Option<R>) -> Self {
        Self {
            kind: Kind::Called { future, charge },
        }
    }

    pub(crate) fn missing_key() -> Self {
        Self {
            kind: Kind::MissingKey,
        }
    }

    pub(crate) fn refused(error: RateLimited) -> Self {
        Self {
            kind: Kind::Refused { error: Some(error) },
        }
    }
}

impl<F, R> fmt::Debug for ResponseFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, R, T, E> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    R: Refund,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { future, charge } => {
                let result = std::task::ready!(future.poll(cx)).map_err(Into::into);
                match &result {
                    // Refused further in: this layer's tokens were not used.
                    Err(e) if crate::caused_by::<RateLimited>(e) => {
                        if let Some(charge) = charge.take() {
                            charge.refund();
                        }
                    }
                    _ => drop(charge.take()),
                }
                Poll::Ready(result)
            }
            KindProj::Refused { error } => Poll::Ready(Err(Box::new(
                error
                    .take()
                    .expect("rate limit ResponseFuture polled after completion"),
            ))),
            KindProj::MissingKey => Poll::Ready(Err(Box::new(super::MissingKey))),
        }
    }
}
