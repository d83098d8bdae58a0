//! Where the agent is and how to talk to it.

use std::fmt;
use std::time::Duration;

use http::HeaderValue;
use http::uri::Authority;

use crate::ConfigError;

/// The agent address used when none is configured.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

/// The default time limit of a request that does not block.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the Consul agent: its address, the ACL token, the default datacenter and
/// the time limit of requests. Built by [`ConsulConfig::builder`] or
/// [`ConsulConfig::from_env`], validated when built.
///
/// The token is sent as the `X-Consul-Token` header and never appears in `Debug` output,
/// errors or logs.
///
/// Plain HTTP only: an `https://` address is rejected with
/// a [`ConfigError`] naming `address`, since seawall has no TLS dependency. Reach a
/// TLS-only agent through a local plain-HTTP listener (the usual setup: every host runs
/// an agent listening on loopback) or a TLS sidecar.
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::ConsulConfig;
///
/// let config = ConsulConfig::builder()
///     .address("http://10.0.0.2:8500")
///     .token("s3cr3t")
///     .datacenter("dc1")
///     .request_timeout(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(config.address(), "10.0.0.2:8500");
/// assert!(!format!("{config:?}").contains("s3cr3t"));
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct ConsulConfig {
    pub(crate) authority: Authority,
    pub(crate) token: Option<HeaderValue>,
    pub(crate) datacenter: Option<String>,
    pub(crate) request_timeout: Duration,
}

impl ConsulConfig {
    /// A builder, starting from the defaults: [`DEFAULT_ADDRESS`], no token, the agent's
    /// datacenter, [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn builder() -> ConsulConfigBuilder {
        ConsulConfigBuilder {
            address: None,
            token: None,
            datacenter: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The configuration Consul's own tools use: the address from `CONSUL_HTTP_ADDR`
    /// (default [`DEFAULT_ADDRESS`]) and the token from `CONSUL_HTTP_TOKEN`.
    ///
    /// # Errors
    ///
    /// An invalid address, an `https://` address or `CONSUL_HTTP_SSL=true` (no TLS here),
    /// or a token that is not a valid header value.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let address = var("CONSUL_HTTP_ADDR").filter(|a| !a.trim().is_empty());
        if let Some(ssl) = var("CONSUL_HTTP_SSL") {
            if matches!(ssl.trim().to_ascii_lowercase().as_str(), "1" | "true") {
                return Err(super::error::https_error(
                    address.unwrap_or_else(|| DEFAULT_ADDRESS.to_owned()),
                ));
            }
        }
        let mut builder = Self::builder();
        if let Some(address) = address {
            builder = builder.address(address);
        }
        if let Some(token) = var("CONSUL_HTTP_TOKEN") {
            builder = builder.token(token);
        }
        builder.build()
    }

    /// The agent's `host:port`.
    pub fn address(&self) -> &str {
        self.authority.as_str()
    }

    /// Whether an ACL token is set.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The datacenter queries go to by default (`None`: the agent's own).
    pub fn datacenter(&self) -> Option<&str> {
        self.datacenter.as_deref()
    }

    /// The time limit of a request that does not block.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
}

impl Default for ConsulConfig {
    /// The agent at [`DEFAULT_ADDRESS`], no token.
    fn default() -> Self {
        Self {
            authority: Authority::from_static(DEFAULT_ADDRESS),
            token: None,
            datacenter: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.authority.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Builds a [`ConsulConfig`]; see [`ConsulConfig::builder`].
#[derive(Clone)]
pub struct ConsulConfigBuilder {
    address: Option<String>,
    token: Option<String>,
    datacenter: Option<String>,
    request_timeout: Duration,
}

impl ConsulConfigBuilder {
    /// Sets the agent address: `host:port` or `http://host:port` (a trailing `/` is
    /// ignored). Without a scheme, a missing port means 8500; with `http://`, it means 80.
    #[must_use]
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Sets the ACL token, sent as `X-Consul-Token` (an empty token means none).
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the datacenter health queries go to by default (`dc=`).
    #[must_use]
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }

    /// Sets the time limit of a request that does not block (default 10 s). Blocking
    /// queries get `wait + wait/16` on top of it.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `address` for an address that is not `host:port` or
    /// `http://host:port` or is an `https://` one, `token` for a token that is not a valid
    /// header value, `request_timeout` for zero, or `datacenter` for an empty one.
    pub fn build(self) -> Result<ConsulConfig, ConfigError> {
        let authority = match &self.address {
            Some(address) => parse_address(address)?,
            None => Authority::from_static(DEFAULT_ADDRESS),
        };
        let token = match self.token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let mut value =
                    HeaderValue::from_str(&token).map_err(|_| super::error::token_error())?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        if self.request_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "request_timeout",
                "must be greater than zero",
            ));
        }
        if let Some(dc) = &self.datacenter {
            if dc.trim().is_empty() || !dc.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::invalid(
                    "datacenter",
                    "must be a non-empty name without spaces",
                ));
            }
        }
        Ok(ConsulConfig {
            authority,
            token,
            datacenter: self.datacenter,
            request_timeout: self.request_timeout,
        })
    }
}

impl fmt::Debug for ConsulConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfigBuilder")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// The address as errors show it: credentials in a URL's user-info are replaced, so that
/// an `http://user:secret@host` mistake does not print the secret.
fn shown(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((before, after)) => match before.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<redacted>@{after}"),
            None => format!("<redacted>@{after}"),
        },
        None => address.to_owned(),
    }
}

fn parse_address(address: &str) -> Result<Authority, ConfigError> {
    let invalid = || super::error::address_error(shown(address));
    let trimmed = address.trim();
    let (rest, default_port) = match trimmed.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (rest, 80),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(super::error::https_error(shown(address)));
        }
        Some(_) => return Err(invalid()),
        None => (trimmed, 8500),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(invalid());
    }
    let authority: Authority = rest.parse().map_err(|_| invalid())?;
    if authority.host().is_empty() {
        return Err(invalid());
    }
    if authority.port_u16().is_some() {
        return Ok(authority);
    }
    if rest.ends_with(':') {
        return Err(invalid());
    }
    format!("{rest}:{default_port}")
        .parse()
        .map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: &str) -> Result<String, ConfigError> {
        ConsulConfig::builder()
            .address(a)
            .build()
            .map(|c| c.address().to_owned())
    }

    #[test]
    fn credentials_in_an_address_never_reach_the_error() {
        let err = addr("http://admin:s3cret@consul:8500").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.to_string().contains("<redacted>@consul:8500"), "{err}");
        let err = addr("https://t0ken@consul:8501").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("t0ken"));
    }

    #[test]
    fn addresses() {
        assert_eq!(addr("127.0.0.1:8500").unwrap(), "127.0.0.1:8500");
        assert_eq!(addr("http://consul:8500/").unwrap(), "consul:8500");
        assert_eq!(addr("HTTP://consul:8501").unwrap(), "consul:8501");
        assert_eq!(addr("consul").unwrap(), "consul:8500");
        assert_eq!(addr("http://consul").unwrap(), "consul:80");
        assert_eq!(addr("[::1]:8500").unwrap(), "[::1]:8500");
        let e = addr("https://consul:8501").unwrap_err();
        assert!(e.reason().contains("https needs TLS"), "{e}");
        for bad in [
            "",
            "unix:///tmp/consul.sock",
            "http://",
            "consul:8500/v1",
            "consul:port",
            "consul:",
            "user@consul:8500",
            "consul:99999",
        ] {
            let e = addr(bad).unwrap_err();
            assert!(
                e.field() == "address" && e.reason().contains("expected host:port"),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(ConsulConfig::default().address(), DEFAULT_ADDRESS);
    }

    #[test]
    fn settings_are_validated() {
        let e = ConsulConfig::builder()
            .request_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "request_timeout");
        let e = ConsulConfig::builder().datacenter(" ").build().unwrap_err();
        assert_eq!(e.field(), "datacenter");
        let e = ConsulConfig::builder()
            .token("bad\ntoken-value")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "token");
        assert!(!e.to_string().contains("token-value"));
    }

    #[test]
    fn token_is_never_printed() {
        let builder = ConsulConfig::builder().token("hunter2-secret");
        assert!(!format!("{builder:?}").contains("hunter2"));
        let config = builder.build().unwrap();
        assert!(config.has_token());
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"));
        assert!(config.token.as_ref().unwrap().is_sensitive());
    }

    #[test]
    fn environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = ConsulConfig::from_vars(env(&[])).unwrap();
        assert_eq!(c.address(), DEFAULT_ADDRESS);
        assert!(!c.has_token());
        let c = ConsulConfig::from_vars(env(&[
            ("CONSUL_HTTP_ADDR", "http://10.1.2.3:8500"),
            ("CONSUL_HTTP_TOKEN", "abc"),
        ]))
        .unwrap();
        assert_eq!(c.address(), "10.1.2.3:8500");
        assert!(c.has_token());
        let e = ConsulConfig::from_vars(env(&[("CONSUL_HTTP_SSL", "true")])).unwrap_err();
        assert!(e.reason().contains("https needs TLS"), "{e}");
    }
}
