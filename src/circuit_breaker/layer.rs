use tower::Layer;

use super::classify::ErrorsAreFailures;
use super::{Breaker, CircuitBreaker, CircuitBreakerConfig};

/// Wraps services in a [`CircuitBreaker`].
///
/// Cloning the layer does **not** create a new breaker: every service it wraps, and every
/// clone of those services, shares one breaker. Build one layer per dependency you protect,
/// or one [`Breaker`] per endpoint when balancing.
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = ErrorsAreFailures> {
    breaker: Breaker,
    classifier: C,
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
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Replaces the classifier that decides which results count as failures.
    ///
    /// Any `Fn(Result<&Response, &Error>) -> Outcome` works, as does
    /// [`HttpClassifier`](super::HttpClassifier) with the `http` feature.
    #[must_use]
    pub fn with_classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    /// The breaker shared by every service this layer wraps.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breaker.clone(), self.classifier.clone())
    }
}
