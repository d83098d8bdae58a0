//! Service registrations and their health checks, validated when built.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::ConfigError;
use crate::go_duration::{MAX_GO_DURATION, format_go_duration};

/// The shortest `deregister_critical_after` Consul honours (it raises shorter values to
/// it): one minute.
pub const MIN_DEREGISTER_CRITICAL_AFTER: Duration = Duration::from_secs(60);

/// Most metadata pairs Consul accepts on a service.
const MAX_META_PAIRS: usize = 64;
const MAX_META_KEY_LEN: usize = 128;
const MAX_META_VALUE_LEN: usize = 512;

/// A health check's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckStatus {
    /// Healthy.
    Passing,
    /// Degraded: still served by `passing`-less queries, and weighted with
    /// `Weights.Warning`.
    Warning,
    /// Unhealthy: not served.
    Critical,
}

impl CheckStatus {
    /// `passing`, `warning` or `critical`, as Consul writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CheckKind {
    Http { url: String, interval: Duration },
    Tcp { addr: String, interval: Duration },
    Ttl { ttl: Duration },
}

/// A health check run by the agent for a registered service: HTTP, TCP or TTL.
///
/// Checks are validated when the [`ServiceRegistration`] holding them is built.
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::{Check, CheckStatus};
///
/// let http = Check::http("http://10.0.0.5:8081/health", Duration::from_secs(10))
///     .timeout(Duration::from_secs(2))
///     .deregister_critical_after(Duration::from_secs(90 * 60));
/// let ttl = Check::ttl(Duration::from_secs(15))
///     .id("users-1:ttl")
///     .initial_status(CheckStatus::Critical);
/// assert!(ttl.is_ttl());
/// # let _ = http;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    kind: CheckKind,
    id: Option<String>,
    name: Option<String>,
    notes: Option<String>,
    status: Option<CheckStatus>,
    timeout: Option<Duration>,
    deregister_critical_after: Option<Duration>,
    method: Option<String>,
    headers: BTreeMap<String, Vec<String>>,
    body: Option<String>,
    tls_skip_verify: Option<bool>,
}

impl Check {
    fn new(kind: CheckKind) -> Self {
        Self {
            kind,
            id: None,
            name: None,
            notes: None,
            status: None,
            timeout: None,
            deregister_critical_after: None,
            method: None,
            headers: BTreeMap::new(),
            body: None,
            tls_skip_verify: None,
        }
    }

    /// The agent calls `url` every `interval`: a 2xx answer passes, 429 warns, anything
    /// else (or no answer within the timeout, 10 s by default) is critical. `url` must be
    /// an `http://` or `https://` URL the agent can reach (the agent does the TLS).
    pub fn http(url: impl Into<String>, interval: Duration) -> Self {
        Self::new(CheckKind::Http {
            url: url.into(),
            interval,
        })
    }

    /// The agent connects to `addr` (`host:port`) every `interval`: a connection passes,
    /// anything else is critical.
    pub fn tcp(addr: impl Into<String>, interval: Duration) -> Self {
        Self::new(CheckKind::Tcp {
            addr: addr.into(),
            interval,
        })
    }

    /// The application reports the status itself, at least every `ttl` (see
    /// [`RegistrationGuard`](super::RegistrationGuard), which does it); a check not
    /// reported within `ttl` turns critical.
    pub fn ttl(ttl: Duration) -> Self {
        Self::new(CheckKind::Ttl { ttl })
    }

    /// Sets the check ID (unique on the agent). Default: `service:<service-id>` for a
    /// registration's only check, `service:<service-id>:<n>` (from 1) for each of several.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the check's name (default: Consul's `Service '<name>' check`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets human-readable notes.
    #[must_use]
    pub fn notes(mut self, notes: impl Into<String>) -> Self {
        self.notes = Some(notes.into());
        self
    }

    /// Sets the status the check starts in (Consul's default: critical, so that an
    /// instance receives traffic only once a check passed).
    #[must_use]
    pub fn initial_status(mut self, status: CheckStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets how long the agent waits for an HTTP or TCP check (Consul's default: 10 s).
    /// Not valid on TTL checks.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Deregisters the service when this check has been critical for longer than `after`.
    ///
    /// Consul enforces a minimum of one minute (and its reaper runs about every 30 s, so
    /// removal is not instant). Shorter values are rejected when the registration is
    /// built rather than silently raised, so that the registration means what it says.
    #[must_use]
    pub fn deregister_critical_after(mut self, after: Duration) -> Self {
        self.deregister_critical_after = Some(after);
        self
    }

    /// Sets the HTTP method of an HTTP check (default `GET`).
    #[must_use]
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Adds a header to an HTTP check's request (repeat for several values).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers
            .entry(name.into())
            .or_default()
            .push(value.into());
        self
    }

    /// Sets an HTTP check's request body.
    #[must_use]
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Makes an HTTP check to an `https://` URL accept any certificate.
    #[must_use]
    pub fn tls_skip_verify(mut self, skip: bool) -> Self {
        self.tls_skip_verify = Some(skip);
        self
    }

    /// The check ID: the one given, or once the check belongs to a built
    /// [`ServiceRegistration`], the default one.
    pub fn check_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Whether this is a TTL check.
    pub fn is_ttl(&self) -> bool {
        matches!(self.kind, CheckKind::Ttl { .. })
    }

    /// The TTL of a TTL check.
    pub fn ttl_duration(&self) -> Option<Duration> {
        match self.kind {
            CheckKind::Ttl { ttl } => Some(ttl),
            _ => None,
        }
    }

    /// The status the check starts in, if set.
    pub fn status(&self) -> Option<CheckStatus> {
        self.status
    }

    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let err =
            |field, reason: &'static str| Err(super::error::check_error(index, field, reason));
        let positive = |field, d: Duration| {
            if d.is_zero() {
                err(field, "must be greater than zero")
            } else if d > MAX_GO_DURATION {
                err(field, "must be at most 2562047h (Go's longest duration)")
            } else {
                Ok(())
            }
        };
        match &self.kind {
            CheckKind::Http { url, interval } => {
                let lower = url.to_ascii_lowercase();
                let rest = lower
                    .strip_prefix("http://")
                    .or_else(|| lower.strip_prefix("https://"));
                if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                    return err("http", "must be an http:// or https:// URL with a host");
                }
                positive("interval", *interval)?;
            }
            CheckKind::Tcp { addr, interval } => {
                if addr.trim().is_empty() || !addr.contains(':') {
                    return err("tcp", "must be host:port");
                }
                positive("interval", *interval)?;
            }
            CheckKind::Ttl { ttl } => positive("ttl", *ttl)?,
        }
        let http = matches!(self.kind, CheckKind::Http { .. });
        if let Some(t) = self.timeout {
            if self.is_ttl() {
                return err("timeout", "does not apply to TTL checks");
            }
            positive("timeout", t)?;
        }
        if let Some(d) = self.deregister_critical_after {
            if d < MIN_DEREGISTER_CRITICAL_AFTER {
                return err(
                    "deregister_critical_after",
                    "must be at least 1m (Consul's minimum)",
                );
            }
            positive("deregister_critical_after", d)?;
        }
        if !http {
            if self.method.is_some() {
                return err("method", "only applies to HTTP checks");
            }
            if !self.headers.is_empty() {
                return err("header", "only applies to HTTP checks");
            }
            if self.body.is_some() {
                return err("body", "only applies to HTTP checks");
            }
            if self.tls_skip_verify.is_some() {
                return err("tls_skip_verify", "only applies to HTTP checks");
            }
        }
        if let Some(m) = &self.method {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return err("method", "must be an HTTP method such as GET");
            }
        }
        if self.headers.keys().any(|k| {
            k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        }) {
            return err("header", "names must be HTTP header names");
        }
        if self.id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            return err("id", "must not be empty");
        }
        Ok(())
    }

    fn to_wire(&self) -> WireCheck<'_> {
        let go = |d: Option<Duration>| d.map(format_go_duration);
        let (http, tcp, ttl, interval) = match &self.kind {
            CheckKind::Http { url, interval } => (Some(url.as_str()), None, None, Some(*interval)),
            CheckKind::Tcp { addr, interval } => (None, Some(addr.as_str()), None, Some(*interval)),
            CheckKind::Ttl { ttl } => (None, None, Some(*ttl), None),
        };
        WireCheck {
            check_id: self.id.as_deref(),
            name: self.name.as_deref(),
            notes: self.notes.as_deref(),
            status: self.status.map(CheckStatus::as_str),
            http,
            tcp,
            ttl: go(ttl),
            interval: go(interval),
            timeout: go(self.timeout),
            deregister_critical_service_after: go(self.deregister_critical_after),
            method: self.method.as_deref(),
            header: (!self.headers.is_empty()).then_some(&self.headers),
            body: self.body.as_deref(),
            tls_skip_verify: self.tls_skip_verify,
        }
    }
}

/// A service instance to register with the local agent, validated by
/// [`ServiceRegistrationBuilder::build`].
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::{Check, ServiceRegistration};
///
/// let registration = ServiceRegistration::builder("users")
///     .id("users-1")
///     .address("10.0.0.5")
///     .port(8081)
///     .tag("v1")
///     .meta("version", "1")
///     .weights(10, 1)
///     .check(Check::ttl(Duration::from_secs(15)))
///     .build()?;
/// assert_eq!(registration.id(), "users-1");
/// assert_eq!(registration.checks()[0].check_id(), Some("service:users-1"));
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRegistration {
    name: String,
    id: String,
    tags: Vec<String>,
    address: Option<String>,
    port: Option<u16>,
    meta: BTreeMap<String, String>,
    weights: Option<(u32, u32)>,
    enable_tag_override: bool,
    checks: Vec<Check>,
}

impl ServiceRegistration {
    /// A registration of service `name`.
    pub fn builder(name: impl Into<String>) -> ServiceRegistrationBuilder {
        ServiceRegistrationBuilder {
            name: name.into(),
            id: None,
            tags: Vec::new(),
            address: None,
            port: None,
            meta: BTreeMap::new(),
            weights: None,
            enable_tag_override: false,
            checks: Vec::new(),
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service ID (the name when none was given).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tags.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// The address, if one was given (otherwise the agent's node address is used).
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// The port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The metadata.
    pub fn meta(&self) -> &BTreeMap<String, String> {
        &self.meta
    }

    /// The `(passing, warning)` weights, if given (Consul's default: 1 and 1).
    pub fn weights(&self) -> Option<(u32, u32)> {
        self.weights
    }

    /// The checks, each with its ID (given or default).
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// The IDs and TTLs of the TTL checks: what a heartbeat has to report.
    pub fn ttl_checks(&self) -> impl Iterator<Item = (&str, Duration)> + '_ {
        self.checks.iter().filter_map(|c| {
            let ttl = c.ttl_duration()?;
            Some((c.id.as_deref().unwrap_or_default(), ttl))
        })
    }

    /// The JSON body of `PUT /v1/agent/service/register`.
    pub fn to_json(&self) -> serde_json::Value {
        // Serializing plain strings, numbers and maps cannot fail.
        serde_json::to_value(self.to_wire()).unwrap_or(serde_json::Value::Null)
    }

    pub(crate) fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_wire()).unwrap_or_default()
    }

    fn to_wire(&self) -> WireRegistration<'_> {
        WireRegistration {
            id: &self.id,
            name: &self.name,
            tags: &self.tags,
            address: self.address.as_deref(),
            port: self.port,
            meta: &self.meta,
            weights: self
                .weights
                .map(|(passing, warning)| WireWeights { passing, warning }),
            enable_tag_override: self.enable_tag_override,
            checks: self.checks.iter().map(Check::to_wire).collect(),
        }
    }
}

/// Builds a [`ServiceRegistration`]; see [`ServiceRegistration::builder`].
#[derive(Debug, Clone)]
pub struct ServiceRegistrationBuilder {
    name: String,
    id: Option<String>,
    tags: Vec<String>,
    address: Option<String>,
    port: Option<u16>,
    meta: BTreeMap<String, String>,
    weights: Option<(u32, u32)>,
    enable_tag_override: bool,
    checks: Vec<Check>,
}

impl ServiceRegistrationBuilder {
    /// Sets the service ID, unique on the agent (default: the name).
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a tag.
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds tags.
    #[must_use]
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Sets the address to dial (default: the agent's node address).
    #[must_use]
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Sets the port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Adds a metadata pair. Keys: up to 128 ASCII letters, digits, `-` and `_`, not
    /// starting with `consul-`; values: up to 512 bytes; at most 64 pairs.
    #[must_use]
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets the weights: the share of traffic while passing (at least 1) and while a check
    /// warns (0 keeps a warning instance out of rotation).
    #[must_use]
    pub fn weights(mut self, passing: u32, warning: u32) -> Self {
        self.weights = Some((passing, warning));
        self
    }

    /// Lets anti-entropy keep tags changed in the catalog by others.
    #[must_use]
    pub fn enable_tag_override(mut self, enable: bool) -> Self {
        self.enable_tag_override = enable;
        self
    }

    /// Adds a check.
    #[must_use]
    pub fn check(mut self, check: Check) -> Self {
        self.checks.push(check);
        self
    }

    /// Adds checks.
    #[must_use]
    pub fn checks(mut self, checks: impl IntoIterator<Item = Check>) -> Self {
        self.checks.extend(checks);
        self
    }

    /// Validates the registration and gives the checks their default IDs.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: an empty name or ID, an address that is not an
    /// IP address or host name (`10.0.0.5:8081`, `fe80::1%eth0`), passing weight 0,
    /// invalid metadata, or an invalid check (named `checks[i].field`, with its position):
    /// a zero interval or TTL, an HTTP URL without scheme, `deregister_critical_after`
    /// under a minute, an HTTP-only setting on another kind, a duplicate check ID.
    pub fn build(self) -> Result<ServiceRegistration, ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::invalid("name", "must not be empty"));
        }
        let id = match self.id {
            Some(id) if id.trim().is_empty() => {
                return Err(ConfigError::invalid("id", "must not be empty"));
            }
            Some(id) => id,
            None => self.name.clone(),
        };
        if let Some(address) = self.address.as_deref().filter(|a| !a.is_empty()) {
            // What the watches dial (`parse::dialable`): anything else registers an
            // instance every watch skips, which no one would hear about.
            if !super::parse::dialable(address) {
                return Err(ConfigError::invalid(
                    "address",
                    format!(
                        "{address:?} is not an IP address or host name (the port goes in `port`)"
                    ),
                ));
            }
        }
        if let Some((passing, _)) = self.weights {
            if passing == 0 {
                return Err(ConfigError::invalid(
                    "weights",
                    "the passing weight must be at least 1",
                ));
            }
        }
        if self.meta.len() > MAX_META_PAIRS {
            return Err(ConfigError::invalid(
                "meta",
                format!("at most {MAX_META_PAIRS} pairs"),
            ));
        }
        for (k, v) in &self.meta {
            let valid = !k.is_empty()
                && k.len() <= MAX_META_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !k.starts_with("consul-");
            if !valid {
                return Err(ConfigError::invalid(
                    "meta",
                    format!(
                        "invalid key {k:?}: up to 128 letters, digits, - and _, not starting with consul-"
                    ),
                ));
            }
            if v.len() > MAX_META_VALUE_LEN {
                return Err(ConfigError::invalid(
                    "meta",
                    format!("the value of {k:?} is over 512 bytes"),
                ));
            }
        }
        let mut checks = self.checks;
        let single = checks.len() == 1;
        for (index, check) in checks.iter_mut().enumerate() {
            check.validate(index)?;
            if check.id.is_none() {
                check.id = Some(if single {
                    format!("service:{id}")
                } else {
                    format!("service:{id}:{}", index + 1)
                });
            }
        }
        for (index, check) in checks.iter().enumerate() {
            if checks[..index].iter().any(|c| c.id == check.id) {
                return Err(super::error::check_error(
                    index,
                    "id",
                    "duplicates another check's ID",
                ));
            }
        }
        Ok(ServiceRegistration {
            name: self.name,
            id,
            tags: self.tags,
            address: self.address.filter(|a| !a.is_empty()),
            port: self.port,
            meta: self.meta,
            weights: self.weights,
            enable_tag_override: self.enable_tag_override,
            checks,
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireRegistration<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tags: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weights: Option<WireWeights>,
    enable_tag_override: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<WireCheck<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireWeights {
    passing: u32,
    warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireCheck<'a> {
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none")]
    check_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notes: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    http: Option<&'a str>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    tcp: Option<&'a str>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deregister_critical_service_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<&'a BTreeMap<String, Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "Option::is_none")]
    tls_skip_verify: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn serializes_pascal_case_with_go_durations() {
        let r = ServiceRegistration::builder("users")
            .id("users-1")
            .address("10.0.0.5")
            .port(8081)
            .tags(["v1", "primary"])
            .meta("version", "1")
            .weights(10, 1)
            .check(
                Check::http("http://10.0.0.5:8081/health", secs(10))
                    .timeout(secs(2))
                    .deregister_critical_after(secs(90 * 60))
                    .method("HEAD")
                    .header("X-Probe", "consul"),
            )
            .check(Check::ttl(Duration::from_millis(1500)).initial_status(CheckStatus::Passing))
            .build()
            .unwrap();
        assert_eq!(
            r.to_json(),
            json!({
                "ID": "users-1",
                "Name": "users",
                "Tags": ["v1", "primary"],
                "Address": "10.0.0.5",
                "Port": 8081,
                "Meta": {"version": "1"},
                "Weights": {"Passing": 10, "Warning": 1},
                "EnableTagOverride": false,
                "Checks": [
                    {
                        "CheckID": "service:users-1:1",
                        "HTTP": "http://10.0.0.5:8081/health",
                        "Interval": "10s",
                        "Timeout": "2s",
                        "DeregisterCriticalServiceAfter": "1h30m0s",
                        "Method": "HEAD",
                        "Header": {"X-Probe": ["consul"]}
                    },
                    {"CheckID": "service:users-1:2", "Status": "passing", "TTL": "1.5s"}
                ]
            })
        );
        assert_eq!(
            r.ttl_checks().collect::<Vec<_>>(),
            [("service:users-1:2", Duration::from_millis(1500))]
        );
    }

    #[test]
    fn defaults_follow_consul() {
        let r = ServiceRegistration::builder("users")
            .check(Check::tcp("10.0.0.5:8081", secs(5)))
            .build()
            .unwrap();
        assert_eq!(r.id(), "users");
        assert_eq!(r.checks()[0].check_id(), Some("service:users"));
        assert_eq!(
            r.to_json(),
            json!({
                "ID": "users",
                "Name": "users",
                "EnableTagOverride": false,
                "Checks": [{"CheckID": "service:users", "TCP": "10.0.0.5:8081", "Interval": "5s"}]
            })
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        let field = |b: ServiceRegistrationBuilder| b.build().unwrap_err();
        let reg = || ServiceRegistration::builder("users");
        assert_eq!(field(ServiceRegistration::builder(" ")).field(), "name");
        assert_eq!(field(reg().id("")).field(), "id");
        assert_eq!(field(reg().weights(0, 1)).field(), "weights");
        assert_eq!(field(reg().meta("consul-x", "1")).field(), "meta");
        assert_eq!(field(reg().meta("a b", "1")).field(), "meta");
        assert_eq!(field(reg().meta("k", "v".repeat(513))).field(), "meta");
        let check_err = |c: Check| {
            let e = field(reg().check(Check::ttl(secs(1))).check(c));
            e.field()
                .strip_prefix("checks[1].")
                .unwrap_or_else(|| panic!("{e:?}"))
                .to_owned()
        };
        assert_eq!(
            check_err(Check::http("http://x/h", Duration::ZERO)),
            "interval"
        );
        assert_eq!(check_err(Check::http("x/h", secs(1))), "http");
        assert_eq!(check_err(Check::http("http://", secs(1))), "http");
        assert_eq!(check_err(Check::tcp("", secs(1))), "tcp");
        assert_eq!(check_err(Check::ttl(Duration::ZERO)), "ttl");
        assert_eq!(check_err(Check::ttl(secs(1)).timeout(secs(1))), "timeout");
        assert_eq!(
            check_err(Check::tcp("x:1", secs(1)).method("GET")),
            "method"
        );
        assert_eq!(
            check_err(Check::tcp("x:1", secs(1)).header("a", "b")),
            "header"
        );
        assert_eq!(
            check_err(Check::http("http://x", secs(1)).method("")),
            "method"
        );
        assert_eq!(
            check_err(Check::ttl(secs(1)).deregister_critical_after(secs(59))),
            "deregister_critical_after"
        );
        assert_eq!(check_err(Check::ttl(Duration::MAX)), "ttl");
        assert_eq!(check_err(Check::ttl(secs(1)).id("service:users:1")), "id");
        let e = field(reg().check(Check::tcp("x:1", Duration::ZERO)));
        assert_eq!(
            e.to_string(),
            "invalid checks[0].interval: must be greater than zero"
        );
        // A minute is fine.
        reg()
            .check(Check::ttl(secs(1)).deregister_critical_after(secs(60)))
            .build()
            .unwrap();
    }
}
