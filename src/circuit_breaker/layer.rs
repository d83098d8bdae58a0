use tower::Layer;

use std::marker::PhantomData;

use super::classify::ErrorsAreFailures;
use super::error::{Boxed, Typed};
use super::{Breaker, CircuitBreaker, CircuitBreakerConfig};

/// Wraps services in a [`CircuitBreaker`].
///
/// Cloning the layer does **not** create a new breaker: every service it wraps, and every
/// clone of those services, shares one breaker. Build one layer per dependency you protect,
/// or one [`Breaker`] per endpoint when balancing.
///
/// ```
/// use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, SlidingWindow, State};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let layer = CircuitBreakerLayer::new(
///     CircuitBreakerConfig::builder()
///         .name("inventory")
///         .sliding_window(SlidingWindow::count_based(4))
///         .minimum_calls(4)
///         .failure_rate_threshold(0.5)
///         .build()?,
/// );
/// let breaker = layer.breaker().clone();
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|fail: bool| async move { if fail { Err("down") } else { Ok("ok") } });
///
/// for fail in [true, false, true, false] {
///     let _ = svc.ready().await?.call(fail).await;
/// }
/// // Half of the last four calls failed: the breaker opened, and rejects without calling.
/// assert_eq!(breaker.state(), State::Open);
/// let err = svc.ready().await?.call(false).await.unwrap_err();
/// assert!(err.is::<CircuitOpen>());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct CircuitBreakerLayer<C = ErrorsAreFailures, M = Boxed> {
    breaker: Breaker,
    classifier: C,
    _mode: PhantomData<fn() -> M>,
}

impl<C: Clone, M> Clone for CircuitBreakerLayer<C, M> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            _mode: PhantomData,
        }
    }
}

impl CircuitBreakerLayer {
    /// A layer with a new breaker built from `config`, counting every error as a failure.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self::from_breaker(Breaker::new(config))
    }

    /// A layer that shares an existing breaker (for example one from a
    /// [`Registry`](super::Registry)).
    pub fn from_breaker(breaker: Breaker) -> Self {
        Self {
            breaker,
            classifier: ErrorsAreFailures,
            _mode: PhantomData,
        }
    }
}

impl<C, M> CircuitBreakerLayer<C, M> {
    /// Replaces the classifier that decides which results count as failures.
    ///
    /// Any `Fn(Result<&Response, &Error>) -> Outcome` works, as does
    #[cfg_attr(feature = "http", doc = "[`HttpClassifier`](super::HttpClassifier)")]
    #[cfg_attr(not(feature = "http"), doc = "`HttpClassifier`")]
    /// with the `http` feature.
    #[must_use]
    pub fn with_classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, M> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
            _mode: PhantomData,
        }
    }

    /// Reports errors as [`Error<E>`](super::Error) instead of `BoxError`: the inner error
    /// keeps its type and a rejection costs no allocation. See [`ErrorMode`](super::ErrorMode).
    #[must_use]
    pub fn typed_errors(self) -> CircuitBreakerLayer<C, Typed> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier: self.classifier,
            _mode: PhantomData,
        }
    }

    /// The breaker shared by every service this layer wraps.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<S, C: Clone, M> Layer<S> for CircuitBreakerLayer<C, M> {
    type Service = CircuitBreaker<S, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breaker.clone(), self.classifier.clone())
    }
}
