//! Errors of the balancers.

use std::fmt;
use std::sync::Arc;

/// The balancer had no endpoint to send the request to (none discovered, or none came
/// within the configured wait).
#[derive(Debug, Clone)]
pub struct NoEndpoints {
    name: Arc<str>,
}

impl NoEndpoints {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Self { name }
    }

    /// The balancer's name.
    pub fn balancer(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no endpoints available for {}", self.name)
    }
}

impl std::error::Error for NoEndpoints {}

/// A [`SharedBalance`](super::SharedBalance) caller's deadline passed before the service
/// was ready: nothing was called.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ReadyTimeout;

impl ReadyTimeout {
    pub(crate) fn new() -> Self {
        Self
    }
}

impl fmt::Display for ReadyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no endpoint was ready before the deadline")
    }
}

impl std::error::Error for ReadyTimeout {}
