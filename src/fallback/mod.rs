//! Fallbacks: answer with something useful when the call fails or the breaker is open.
//!
//! [`FallbackLayer`] turns errors of the inner service into responses:
//!
//! * [`FallbackLayer::value`]: a fixed value;
//! * [`FallbackLayer::from_fn`]: a closure over the error;
//! * [`FallbackLayer::from_async_fn`]: an async closure over the error;
#![cfg_attr(feature = "http", doc = "* [`FallbackLayer::response`]")]
#![cfg_attr(not(feature = "http"), doc = "* `FallbackLayer::response`")]
//!   (feature `http`): an HTTP response built per use from a status, headers and bytes,
//!   for any body `B: From<Bytes>` (axum's included);
//! * [`LastKnownGood`]: the most recent successful response for the same key, a cache
//!   fallback as opossum users write by hand;
//! * [`FallbackLayer::new`] with your own [`Policy`].
//!
//! [`FallbackLayer::when`] restricts any of them to the errors matching a predicate; the
//! others pass through unchanged. [`is_circuit_open`] matches a breaker's rejection.
//!
//! # With a circuit breaker
//!
//! Outside the breaker (`fallback → breaker → service`), the fallback also answers the
//! breaker's rejections, and the breaker still sees every failure. Inside
//! (`breaker → fallback → service`), failures the fallback answers look like successes to
//! the breaker, which then never trips on them: use `when` so it only covers errors that
//! say nothing about the dependency's health.
//!
//! ```
//! use std::time::Duration;
//! use seawall::BoxError;
//! use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow, State};
//! use seawall::fallback::{FallbackLayer, is_circuit_open};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let breaker = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::builder()
//!         .sliding_window(SlidingWindow::count_based(4))
//!         .minimum_calls(2)
//!         .build()?,
//! );
//! let handle = breaker.breaker().clone();
//! let mut svc = ServiceBuilder::new()
//!     // Only the breaker's rejections get the cached answer; real errors surface.
//!     .layer(FallbackLayer::value("cached price: 10").when(is_circuit_open))
//!     .layer(breaker)
//!     .service_fn(|_: ()| async { Err::<&str, BoxError>("database down".into()) });
//!
//! assert!(svc.ready().await?.call(()).await.is_err());
//! assert!(svc.ready().await?.call(()).await.is_err());
//! assert_eq!(handle.state(), State::Open);
//! assert_eq!(svc.ready().await?.call(()).await?, "cached price: 10");
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "http")]
mod http;
mod last_known_good;
mod layer;
mod policy;
mod service;

pub mod future;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use http::HttpResponse;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use last_known_good::HttpKey;
pub use last_known_good::{
    DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, LastKnownGood, LastKnownGoodHandler,
};
pub use layer::FallbackLayer;
pub use policy::{FromAsyncFn, FromFn, Handler, MaybeFallback, OkFuture, Policy, Value, When};
pub use service::Fallback;

/// True when `error` is a circuit breaker's rejection
/// ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen) or
/// [`Rejection`](crate::circuit_breaker::Rejection)), directly or anywhere in its
/// `source()` chain. Made for [`FallbackLayer::when`], in both of the breaker's error
/// modes: `error` is a [`BoxError`](crate::BoxError) or a typed
/// [`circuit_breaker::Error<E>`](crate::circuit_breaker::Error) (see [`BreakerError`]).
pub fn is_circuit_open<E: BreakerError + ?Sized>(error: &E) -> bool {
    error.is_circuit_open()
}

/// The errors [`is_circuit_open`] reads: [`BoxError`](crate::BoxError) (the breaker's
/// default mode, and what most tower layers return) and the typed
/// [`circuit_breaker::Error<E>`](crate::circuit_breaker::Error).
pub trait BreakerError {
    /// Whether this is a breaker's rejection, directly or in its `source()` chain.
    fn is_circuit_open(&self) -> bool;
}

impl BreakerError for crate::BoxError {
    fn is_circuit_open(&self) -> bool {
        crate::circuit_breaker::error::rejection_in(self).is_some()
    }
}

/// A rejection by this breaker, or, for an inner `BoxError`, one by a breaker further in.
impl<E: 'static> BreakerError for crate::circuit_breaker::Error<E> {
    fn is_circuit_open(&self) -> bool {
        match self {
            crate::circuit_breaker::Error::Open(_) => true,
            crate::circuit_breaker::Error::Inner(inner) => (inner as &dyn std::any::Any)
                .downcast_ref::<crate::BoxError>()
                .is_some_and(BreakerError::is_circuit_open),
        }
    }
}
