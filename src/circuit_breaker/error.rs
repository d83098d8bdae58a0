//! Error types for the circuit breaker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::State;
use super::state::Shared;

/// A call was rejected because the breaker did not admit it.
///
/// Returned (boxed in [`BoxError`](crate::BoxError)) when the breaker is open or forced open,
/// or half-open with all its probe permits taken. The inner service was neither called nor
/// reserved.
///
/// ```
/// # use seawall::circuit_breaker::CircuitOpen;
/// fn is_breaker_rejection(err: &seawall::BoxError) -> bool {
///     err.is::<CircuitOpen>()
/// }
/// ```
#[derive(Clone)]
pub struct CircuitOpen {
    shared: Arc<Shared>,
    state: State,
    until: u64,
}

impl CircuitOpen {
    pub(crate) fn new(shared: Arc<Shared>, state: State, until: u64) -> Self {
        Self {
            shared,
            state,
            until,
        }
    }

    /// The name of the breaker that rejected the call.
    pub fn breaker(&self) -> &str {
        &self.shared.name
    }

    /// The breaker's state when it rejected the call.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the breaker will next admit a probe, if known: `None` while forced open, or
    /// half-open with every probe permit in use.
    pub fn retry_at(&self) -> Option<Instant> {
        self.shared.retry_at(self.until)
    }

    /// How long from now until the breaker admits a probe, if known (see
    /// [`retry_at`](Self::retry_at)); zero when that moment has passed. For a
    /// `Retry-After` header, round it up to whole seconds.
    pub fn retry_after(&self) -> Option<Duration> {
        let now = self.shared.now();
        (self.until != super::state::NO_RETRY)
            .then(|| Duration::from_nanos(self.until.saturating_sub(now)))
    }
}

impl fmt::Debug for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitOpen")
            .field("breaker", &self.breaker())
            .field("state", &self.state)
            .field("retry_after", &self.retry_after())
            .finish()
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.breaker();
        match self.state {
            State::HalfOpen => write!(f, "circuit breaker '{name}' is half-open and busy"),
            State::ForcedOpen => write!(f, "circuit breaker '{name}' is forced open"),
            _ => write!(f, "circuit breaker '{name}' is open"),
        }
    }
}

impl std::error::Error for CircuitOpen {}

/// How a [`CircuitBreaker`](super::CircuitBreaker) reports errors: its own rejections and
/// the inner service's errors. Chosen with
/// [`CircuitBreakerLayer::typed_errors`](super::CircuitBreakerLayer::typed_errors); sealed.
pub trait ErrorMode<E>: sealed::Sealed {
    /// The service's error type.
    type Error;

    /// The error for a call the breaker rejected.
    fn rejected(open: CircuitOpen) -> Self::Error;

    /// The error for a call the inner service failed.
    fn inner(error: E) -> Self::Error;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Boxed {}
    impl Sealed for super::Typed {}
}

/// The default [`ErrorMode`]: errors are [`BoxError`](crate::BoxError), as everywhere in
/// tower. Inner errors pass through unchanged (so `err.is::<tower::timeout::error::Elapsed>()`
/// still works) and a rejection is a boxed [`CircuitOpen`], which costs one allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Boxed;

impl<E: Into<crate::BoxError>> ErrorMode<E> for Boxed {
    type Error = crate::BoxError;

    #[inline]
    fn rejected(open: CircuitOpen) -> crate::BoxError {
        Box::new(open)
    }

    #[inline]
    fn inner(error: E) -> crate::BoxError {
        error.into()
    }
}

/// The typed [`ErrorMode`]: errors are [`Error<E>`], which keeps the inner error's type and
/// rejects without allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Typed;

impl<E> ErrorMode<E> for Typed {
    type Error = Error<E>;

    #[inline]
    fn rejected(open: CircuitOpen) -> Error<E> {
        Error::Open(open)
    }

    #[inline]
    fn inner(error: E) -> Error<E> {
        Error::Inner(error)
    }
}

/// The error of a breaker in [`Typed`] mode: a rejection, or the inner service's error.
///
/// ```
/// use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, Error};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::default()).typed_errors();
/// layer.breaker().force_open();
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|_: ()| async { Ok::<_, std::io::Error>("hi") });
/// match svc.ready().await.unwrap().call(()).await {
///     Err(Error::Open(open)) => assert_eq!(open.retry_after(), None),
///     other => panic!("expected a rejection, got {other:?}"),
/// }
/// # }
/// ```
///
/// It composes as [`BoxError`](crate::BoxError) does: with a tower timeout inside (inner
/// error `BoxError`), `?` turns it into a `BoxError`, and
/// [`is_circuit_open`](crate::fallback::is_circuit_open) fits
/// [`FallbackLayer::when`](crate::fallback::FallbackLayer::when) in both modes:
///
/// ```
/// use std::time::Duration;
/// use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
/// use seawall::fallback::{FallbackLayer, is_circuit_open};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::default()).typed_errors();
/// let handle = breaker.breaker().clone();
/// let mut client = ServiceBuilder::new()
///     .layer(FallbackLayer::value("stock unknown".to_string()).when(is_circuit_open))
///     .layer(breaker)
///     .timeout(Duration::from_millis(800))
///     .service_fn(|sku: u32| async move { Ok::<_, seawall::BoxError>(format!("{sku}: 3 left")) });
/// let answer = client.ready().await?.call(42).await?; // `?`: Error<BoxError> into BoxError
/// assert_eq!(answer, "42: 3 left");
/// handle.force_open();
/// assert_eq!(client.ready().await?.call(42).await?, "stock unknown");
///
/// // The error converts on its own too, its cause kept.
/// let open: seawall::BoxError = Error::<seawall::BoxError>::Inner("boom".into()).into();
/// assert_eq!(open.to_string(), "boom");
/// # use seawall::circuit_breaker::Error;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub enum Error<E> {
    /// The breaker rejected the call; the inner service was not called.
    Open(CircuitOpen),
    /// The inner service failed.
    Inner(E),
}

impl<E> Error<E> {
    /// True for a rejection by the breaker.
    pub fn is_open(&self) -> bool {
        matches!(self, Error::Open(_))
    }

    /// The rejection, if this is one.
    pub fn as_open(&self) -> Option<&CircuitOpen> {
        match self {
            Error::Open(open) => Some(open),
            Error::Inner(_) => None,
        }
    }

    /// The inner service's error, if this is one.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Error::Open(_) => None,
            Error::Inner(e) => Some(e),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open(open) => open.fmt(f),
            Error::Inner(e) => e.fmt(f),
        }
    }
}

/// `?` into [`BoxError`](crate::BoxError), whatever the inner error (a `BoxError` under
/// a tower timeout, too). The result is flat: a rejection becomes a boxed [`CircuitOpen`]
/// (`err.is::<CircuitOpen>()`, as in the [`Boxed`] mode), an inner error converts as it
/// would have without the breaker (`err.is::<Elapsed>()` still works).
///
/// `Error<E>` is therefore not a `std::error::Error` itself: that would make this
/// conversion overlap std's for every error type, and std's cannot take an inner
/// `BoxError` (not a sized error). Convert it, or match on it.
impl<E: Into<crate::BoxError>> From<Error<E>> for crate::BoxError {
    fn from(error: Error<E>) -> Self {
        match error {
            Error::Open(open) => Box::new(open),
            Error::Inner(inner) => inner.into(),
        }
    }
}
