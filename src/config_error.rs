//! [`ConfigError`]: the one error every builder and the gateway's configuration report.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// An invalid setting, reported when a configuration is built: by every builder's `build()`
/// (breakers, balancers, outlier detection, quotas, limiters, Consul clients, watches and
/// registrations) and by the gateway when its TOML loads.
///
/// One type across the crate, so `?` works the same everywhere. It names the setting at fault
/// ([`field`](Self::field), as its builder method or TOML key is spelled, e.g.
/// `failure_rate_threshold` or `routes[1].rate_limit.global.per_second`) and says what is
/// wrong with it, with the rejected value ([`reason`](Self::reason)). It never contains a
/// secret (an ACL token or a JWT key is named, never shown).
///
/// ```
/// use seawall::circuit_breaker::CircuitBreakerConfig;
///
/// // 50 means 50 % in some libraries; here every share is a fraction in [0, 1].
/// let err = CircuitBreakerConfig::builder()
///     .failure_rate_threshold(50.0)
///     .build()
///     .unwrap_err();
/// assert_eq!(err.field(), "failure_rate_threshold");
/// assert_eq!(err.kind(), seawall::ConfigErrorKind::Invalid);
/// assert!(err.to_string().contains("50"));
/// ```
#[derive(Clone)]
pub struct ConfigError {
    field: Cow<'static, str>,
    reason: Cow<'static, str>,
    source: Source,
}

#[derive(Clone)]
// Files are read and parsed by the gateway (`ConsulConfig::from_env` reads some too).
#[cfg_attr(not(feature = "gateway"), allow(dead_code))]
enum Source {
    Invalid,
    Parse,
    Io(Arc<std::io::Error>),
}

/// What kind of [`ConfigError`] it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// A value out of range, or inconsistent with another.
    Invalid,
    /// A configuration file that is not valid TOML, has an unknown key or a value of the
    /// wrong type (the gateway).
    Parse,
    /// A configuration or secret file that could not be read (the gateway, or a file a
    /// Consul variable names).
    Io,
}

impl ConfigError {
    /// A value out of range or inconsistent with another.
    pub(crate) fn invalid(
        field: impl Into<Cow<'static, str>>,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            source: Source::Invalid,
        }
    }

    /// A file that does not parse; `message` names the line and the key.
    #[cfg(feature = "gateway")]
    pub(crate) fn parse(message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            field: Cow::Borrowed(""),
            reason: message.into(),
            source: Source::Parse,
        }
    }

    /// A file that cannot be read; `field` names the file (or the setting that names it).
    #[cfg(any(feature = "gateway", feature = "consul-tls"))]
    pub(crate) fn io(field: impl Into<Cow<'static, str>>, error: std::io::Error) -> Self {
        Self {
            field: field.into(),
            reason: Cow::Owned(error.to_string()),
            source: Source::Io(Arc::new(error)),
        }
    }

    /// The setting at fault, as its builder method or configuration key is spelled
    /// (`window_size`, `routes[1].timeout`…); the file's path for an unreadable file; empty
    /// for a file that does not parse (the [`reason`](Self::reason) then names line and key).
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong, with the rejected value.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ConfigErrorKind {
        match self.source {
            Source::Invalid => ConfigErrorKind::Invalid,
            Source::Parse => ConfigErrorKind::Parse,
            Source::Io(_) => ConfigErrorKind::Io,
        }
    }
}

impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigError")
            .field("kind", &self.kind())
            .field("field", &self.field)
            .field("reason", &self.reason)
            .finish()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            Source::Invalid => write!(f, "invalid {}: {}", self.field, self.reason),
            Source::Parse => write!(f, "invalid configuration: {}", self.reason),
            Source::Io(_) => write!(f, "cannot read {}: {}", self.field, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.source {
            Source::Io(e) => Some(&**e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_field_and_the_reason() {
        let e = ConfigError::invalid("window_size", "must be at least 1, got 0");
        assert_eq!(e.field(), "window_size");
        assert_eq!(e.kind(), ConfigErrorKind::Invalid);
        assert_eq!(
            e.to_string(),
            "invalid window_size: must be at least 1, got 0"
        );
        assert!(std::error::Error::source(&e).is_none());
    }

    #[cfg(feature = "gateway")]
    #[test]
    fn io_errors_keep_their_source() {
        let e = ConfigError::io(
            "/nope.toml",
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(e.kind(), ConfigErrorKind::Io);
        assert_eq!(e.to_string(), "cannot read /nope.toml: gone");
        assert!(std::error::Error::source(&e).is_some());
    }
}
