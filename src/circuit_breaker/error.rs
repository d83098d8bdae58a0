//! Error types for the circuit breaker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::State;
use super::state::Shared;

/// A call was rejected because the breaker did not admit it: the error of the default
/// [`Boxed`] mode, zero-sized, so that boxing it allocates nothing.
///
/// Returned (boxed in [`BoxError`](crate::BoxError)) when the breaker is open or forced
/// open, or half-open with all its probe permits taken. The inner service was neither called
/// nor reserved. Like tower's own `Overloaded` and `Elapsed`, it says only what happened.
/// Which breaker refused and when it probes again are in a [`Rejection`], which the
/// [`Typed`] mode, [`Breaker::try_acquire`](super::Breaker::try_acquire) and the
/// balancers' endpoint breakers return: use typed errors on a breaker whose retry time you
/// forward (a `Retry-After`, gRPC pushback).
/// [`is_circuit_open`](crate::fallback::is_circuit_open) recognises both.
///
/// ```
/// # use seawall::circuit_breaker::CircuitOpen;
/// fn is_breaker_rejection(err: &seawall::BoxError) -> bool {
///     err.is::<CircuitOpen>()
/// }
/// assert_eq!(std::mem::size_of::<CircuitOpen>(), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CircuitOpen {
    _p: (),
}

impl CircuitOpen {
    /// The rejection, as the breaker returns it.
    #[inline]
    pub const fn new() -> Self {
        Self { _p: () }
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit breaker is open")
    }
}

impl std::error::Error for CircuitOpen {}

/// A rejection with its details: which breaker refused, in which state, and when it probes
/// again.
///
/// The error of [`Breaker::try_acquire`](super::Breaker::try_acquire), of the [`Typed`] mode
/// ([`Error::Open`]) and, boxed, of a balancer whose endpoints' breakers all refuse. The
/// default [`Boxed`] mode returns the zero-sized [`CircuitOpen`] instead, which needs no
/// allocation. [`is_circuit_open`](crate::fallback::is_circuit_open) recognises both.
#[derive(Clone)]
pub struct Rejection {
    shared: Arc<Shared>,
    // The state's code, a whole word: a one-byte `State` left seven bytes of padding,
    // which the compiler moved as overlapping narrow copies that stalled each rejection.
    state: u64,
    until: u64,
}

impl Rejection {
    #[inline(always)]
    pub(crate) fn new(shared: Arc<Shared>, state: State, until: u64) -> Self {
        Self {
            shared,
            state: state.code(),
            until,
        }
    }

    /// The name of the breaker that rejected the call.
    pub fn breaker(&self) -> &str {
        &self.shared.name
    }

    /// The breaker's state when it rejected the call.
    pub fn state(&self) -> State {
        State::from_code(self.state)
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

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("breaker", &self.breaker())
            .field("state", &self.state())
            .field("retry_after", &self.retry_after())
            .finish()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.breaker();
        match self.state() {
            State::HalfOpen => write!(f, "circuit breaker '{name}' is half-open and busy"),
            State::ForcedOpen => write!(f, "circuit breaker '{name}' is forced open"),
            _ => write!(f, "circuit breaker '{name}' is open"),
        }
    }
}

impl std::error::Error for Rejection {}

/// Whether `error` is a breaker's rejection ([`CircuitOpen`] or [`Rejection`]), directly
/// or anywhere in its `source()` chain, and the first [`Rejection`] found there (for its
/// `retry_after`).
pub(crate) fn rejection_in(error: &crate::BoxError) -> Option<Option<&Rejection>> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if let Some(rejection) = e.downcast_ref::<Rejection>() {
            return Some(Some(rejection));
        }
        if e.is::<CircuitOpen>() {
            return Some(None);
        }
        current = e.source();
    }
    None
}

/// How a [`CircuitBreaker`](super::CircuitBreaker) reports errors: its own rejections and
/// the inner service's errors. Chosen with
/// [`CircuitBreakerLayer::typed_errors`](super::CircuitBreakerLayer::typed_errors); sealed.
pub trait ErrorMode<E>: sealed::Sealed {
    /// The service's error type.
    type Error;

    /// The error for a call the breaker rejected, from what its future held.
    #[doc(hidden)]
    fn rejected(refusal: <Self as sealed::Sealed>::Refusal) -> Self::Error;

    /// The error for a call the inner service failed.
    fn inner(error: E) -> Self::Error;
}

pub(crate) use sealed::Sealed as Mode;

mod sealed {
    use super::*;

    /// What each mode keeps of a rejection until its future is polled. Public in a private
    /// module, so nameable by no one outside the crate.
    pub trait Sealed {
        /// Nothing in the [`Boxed`] mode, whose [`CircuitOpen`] says nothing more; the
        /// [`Rejection`] in the [`Typed`] mode. A future that moves a few words less
        /// through memory costs a rejection several nanoseconds less.
        type Refusal;

        /// The refusal of a call `breaker` rejected in `state`, probing again at `until`.
        fn refusal(breaker: &super::super::Breaker, state: State, until: u64) -> Self::Refusal;

        /// The refusal for a rejection already made.
        fn from_rejection(rejection: Rejection) -> Self::Refusal;
    }

    impl Sealed for super::Boxed {
        type Refusal = ();

        #[inline(always)]
        fn refusal(_: &super::super::Breaker, _: State, _: u64) {}

        #[inline(always)]
        fn from_rejection(_: Rejection) {}
    }

    impl Sealed for super::Typed {
        type Refusal = Rejection;

        #[inline(always)]
        fn refusal(breaker: &super::super::Breaker, state: State, until: u64) -> Rejection {
            Rejection::new(breaker.shared.clone(), state, until)
        }

        #[inline(always)]
        fn from_rejection(rejection: Rejection) -> Rejection {
            rejection
        }
    }
}

/// The default [`ErrorMode`]: errors are [`BoxError`](crate::BoxError), as everywhere in
/// tower. Inner errors pass through unchanged (so `err.is::<tower::timeout::error::Elapsed>()`
/// still works) and a rejection is a boxed [`CircuitOpen`], which is zero-sized: rejecting
/// allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Boxed;

impl<E: Into<crate::BoxError>> ErrorMode<E> for Boxed {
    type Error = crate::BoxError;

    #[inline(always)]
    fn rejected((): ()) -> crate::BoxError {
        Box::new(CircuitOpen::new())
    }

    #[inline]
    fn inner(error: E) -> crate::BoxError {
        error.into()
    }
}

/// The typed [`ErrorMode`]: errors are [`Error<E>`], which keeps the inner error's type and
/// a rejection's details ([`Rejection`]), and rejects without allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Typed;

impl<E> ErrorMode<E> for Typed {
    type Error = Error<E>;

    #[inline(always)]
    fn rejected(rejection: Rejection) -> Error<E> {
        Error::Open(rejection)
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
    Open(Rejection),
    /// The inner service failed.
    Inner(E),
}

impl<E> Error<E> {
    /// True for a rejection by the breaker.
    pub fn is_open(&self) -> bool {
        matches!(self, Error::Open(_))
    }

    /// The rejection, if this is one.
    pub fn as_open(&self) -> Option<&Rejection> {
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
/// a tower timeout, too). The result is flat: a rejection becomes a boxed [`Rejection`],
/// details kept (`err.is::<Rejection>()`; [`is_circuit_open`](crate::fallback::is_circuit_open)
/// recognises it as it does the [`Boxed`] mode's [`CircuitOpen`]), an inner error converts
/// as it would have without the breaker (`err.is::<Elapsed>()` still works).
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
