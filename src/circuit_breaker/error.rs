//! Error types for the circuit breaker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::State;

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
    name: Arc<str>,
    state: State,
    retry_at: Option<Instant>,
}

impl CircuitOpen {
    pub(crate) fn new(name: Arc<str>, state: State, retry_at: Option<Instant>) -> Self {
        Self {
            name,
            state,
            retry_at,
        }
    }

    /// The name of the breaker that rejected the call.
    pub fn breaker(&self) -> &str {
        &self.name
    }

    /// The breaker's state when it rejected the call.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the breaker will next admit a probe, if known: `None` while forced open, or
    /// half-open with every probe permit in use.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// How long from now until the breaker admits a probe, if known (see
    /// [`retry_at`](Self::retry_at)); zero when that moment has passed. For a
    /// `Retry-After` header, round it up to whole seconds.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

impl fmt::Debug for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitOpen")
            .field("breaker", &self.name)
            .field("state", &self.state)
            .field("retry_after", &self.retry_after())
            .finish()
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            State::HalfOpen => write!(f, "circuit breaker '{}' is half-open and busy", self.name),
            State::ForcedOpen => write!(f, "circuit breaker '{}' is forced open", self.name),
            _ => write!(f, "circuit breaker '{}' is open", self.name),
        }
    }
}

impl std::error::Error for CircuitOpen {}
