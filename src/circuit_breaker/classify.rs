//! Deciding whether a call succeeded, failed, or does not count.

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
pub trait Classify<T, E> {
    /// Classifies one result.
    fn classify(&self, result: Result<&T, &E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Outcome,
{
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: every `Ok` is a success and every `Err` a failure.
///
/// Errors from [`tower::timeout`](https://docs.rs/tower/latest/tower/timeout/index.html)
/// are `Err`s, so a timeout layer inside the breaker makes slow dependencies trip it, as
/// opossum's `timeout` option does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorsAreFailures;

impl<T, E> Classify<T, E> for ErrorsAreFailures {
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}
