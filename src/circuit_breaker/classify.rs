//! Deciding whether a call succeeded, failed, or does not count.

use std::fmt;

use super::admission::Ticket;
use crate::balance::CallGuard;

/// How a completed call counts towards the breaker's rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// The call failed and counts towards the failure rate.
    Failure,
    /// The call is left out of the window entirely (for example a client error, or a
    /// cancellation the dependency is not to blame for).
    Ignored,
}

/// Classifies the result of a call as an [`Outcome`].
///
/// Implemented for every `Fn(Result<&T, &E>) -> Outcome`, so a closure is a classifier:
///
/// ```
/// use seawall::circuit_breaker::{Classify, Outcome};
///
/// #[derive(Debug)]
/// enum DbError { NotFound, Unavailable }
///
/// // A missing row is the caller's business, not a sign the database is down.
/// let classify = |result: Result<&String, &DbError>| match result {
///     Ok(_) => Outcome::Success,
///     Err(DbError::NotFound) => Outcome::Ignored,
///     Err(DbError::Unavailable) => Outcome::Failure,
/// };
/// assert_eq!(classify.classify(Err(&DbError::NotFound)), Outcome::Ignored);
/// ```
///
/// A classifier whose outcome is known only later (gRPC's `grpc-status` arrives in the
/// trailers, after the response) overrides [`record`](Self::record), which the breaker and
/// the balancers call: it may hand the [`Recorder`] to the response (its body) to record
/// when the outcome is known.
pub trait Classify<T, E> {
    /// Classifies one result.
    fn classify(&self, result: Result<&T, &E>) -> Outcome;

    /// Records the outcome of one call with `recorder`, which the breaker and the balancers
    /// call as a call completes. The default classifies the result now and records it; a
    /// classifier may instead keep `recorder` in the result (for example in a response body
    /// that records at its end). A `recorder` dropped unrecorded counts as
    /// [`Outcome::Ignored`].
    #[inline(always)]
    fn record(&self, result: &mut Result<T, E>, recorder: Recorder) {
        recorder.record(self.classify(result.as_ref()));
    }
}

/// Where the outcome of one call goes: a breaker's [`Ticket`], or a balanced endpoint's
/// call (its outlier-detection and latency statistics and its endpoint breaker's ticket).
/// Handed to [`Classify::record`].
///
/// Record it once with [`record`](Self::record); dropped unrecorded, it records nothing (as
/// [`Outcome::Ignored`]) and a half-open probe slot it holds goes back to its breaker.
#[must_use = "a recorder records nothing unless its outcome is recorded"]
pub struct Recorder {
    kind: RecorderKind,
}

enum RecorderKind {
    Ticket(Ticket),
    Call(CallGuard),
}

impl Recorder {
    /// A balanced call's recorder.
    #[inline(always)]
    pub(crate) fn call(guard: CallGuard) -> Self {
        Self {
            kind: RecorderKind::Call(guard),
        }
    }

    /// Records the call's outcome.
    #[inline(always)]
    pub fn record(self, outcome: Outcome) {
        match self.kind {
            RecorderKind::Ticket(ticket) => ticket.record(outcome),
            RecorderKind::Call(guard) => guard.complete(outcome),
        }
    }
}

impl From<Ticket> for Recorder {
    #[inline(always)]
    fn from(ticket: Ticket) -> Self {
        Self {
            kind: RecorderKind::Ticket(ticket),
        }
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RecorderKind::Ticket(ticket) => f.debug_tuple("Recorder").field(ticket).finish(),
            RecorderKind::Call(_) => f.debug_tuple("Recorder").field(&"balanced call").finish(),
        }
    }
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Outcome,
{
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: every `Ok` is a success and every `Err` a failure, but for the
/// refusals a seawall rate limit inside the breaker made itself (see
/// [`refused_locally`]), which are [`Outcome::Ignored`].
///
/// Errors from [`tower::timeout`](https://docs.rs/tower/latest/tower/timeout/index.html)
/// are `Err`s, so a timeout layer inside the breaker makes slow dependencies trip it, as
/// opossum's `timeout` option does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorsAreFailures;

impl<T, E: 'static> Classify<T, E> for ErrorsAreFailures {
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(error) => error_outcome(error),
        }
    }
}

/// The outcome of an `Err` for the crate's classifiers: a failure, unless a seawall rate
/// limit inside the breaker refused the call itself.
#[cold]
#[inline(never)]
pub(crate) fn error_outcome<E: 'static>(error: &E) -> Outcome {
    if refused_locally(error) {
        Outcome::Ignored
    } else {
        Outcome::Failure
    }
}

/// Whether `error` is a refusal a seawall rate limit made itself, never reaching the
/// dependency: [`RateLimited`](crate::rate_limit::RateLimited) (a limit's `429`),
/// [`MissingKey`](crate::rate_limit::MissingKey) (a request without the key a keyed limit
/// reads: the client's own error) or, with the `redis` feature, `RedisLimitError` (the
/// limit's store failing closed), the error itself or a boxed one anywhere in its
/// `source()` chain.
///
/// A client's own refusals are not the dependency's failures: counted, one client's burst
/// against a limit inside the breaker opened it for everybody, and a half-open probe the
/// limit refused decided the episode without reaching the dependency.
/// [`ErrorsAreFailures`], `HttpClassifier` (feature `http`) and `GrpcClassifier`
/// (feature `grpc`) leave such errors out of the window ([`Outcome::Ignored`]); a
/// classifier of one's own can ask the same:
///
/// ```
/// use seawall::circuit_breaker::{Outcome, refused_locally};
/// use seawall::rate_limit::{Quota, Rate, RateLimiter};
///
/// let limiter = RateLimiter::new(Quota::new(Rate::per_second(1), 1)?);
/// let refused: seawall::BoxError = limiter.try_acquire(2).unwrap_err().into();
/// let classify = |result: Result<&(), &seawall::BoxError>| match result {
///     Ok(()) => Outcome::Success,
///     Err(e) if refused_locally(e) => Outcome::Ignored,
///     Err(_) => Outcome::Failure,
/// };
/// assert_eq!(classify(Err(&refused)), Outcome::Ignored);
/// assert_eq!(classify(Err(&"connection reset".into())), Outcome::Failure);
/// # Ok::<(), seawall::ConfigError>(())
/// ```
pub fn refused_locally<E: 'static>(error: &E) -> bool {
    let any: &dyn std::any::Any = error;
    if let Some(boxed) = any.downcast_ref::<crate::BoxError>() {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(boxed.as_ref());
        while let Some(e) = current {
            if is_local_refusal(e) {
                return true;
            }
            current = e.source();
        }
        return false;
    }
    any.is::<crate::rate_limit::RateLimited>() || any.is::<crate::rate_limit::MissingKey>()
}

fn is_local_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    #[cfg(feature = "redis")]
    if e.is::<crate::rate_limit::redis::RedisLimitError>() {
        return true;
    }
    e.is::<crate::rate_limit::RateLimited>() || e.is::<crate::rate_limit::MissingKey>()
}
