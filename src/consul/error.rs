//! Errors of the Consul client and of its configurations.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// The longest error body kept in a [`ConsulError`], in bytes.
pub(crate) const MAX_ERROR_BODY: usize = 512;

use crate::ConfigError;

/// An invalid field of one of a registration's checks: `checks[1].interval`.
pub(crate) fn check_error(
    index: usize,
    field: &'static str,
    reason: impl Into<Cow<'static, str>>,
) -> ConfigError {
    ConfigError::invalid(format!("checks[{index}].{field}"), reason)
}

/// An agent address that is not `host:port` or `http://host:port`.
pub(crate) fn address_error(shown: String) -> ConfigError {
    ConfigError::invalid(
        "address",
        format!("{shown:?}: expected host:port or http://host:port"),
    )
}

/// An `https://` agent address (or `CONSUL_HTTP_SSL=true`) without the feature
/// `consul-tls`: build with it, or reach the agent through a local plain-HTTP listener.
#[cfg(not(feature = "consul-tls"))]
pub(crate) fn https_error(shown: String) -> ConfigError {
    ConfigError::invalid(
        "address",
        format!(
            "{shown:?}: https needs TLS, which needs seawall's feature `consul-tls`; build \
             with it, or reach the agent through a local plain-HTTP listener"
        ),
    )
}

/// A token that is not a valid header value (the token itself is never shown).
pub(crate) fn token_error() -> ConfigError {
    ConfigError::invalid("token", "not a valid HTTP header value")
}

/// What kind of failure a [`ConsulError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request did not get an answer: connection refused or reset, DNS, a broken
    /// response…
    Transport,
    /// No complete answer within the request's time limit.
    Timeout,
    /// The agent answered with a non-2xx status.
    Status,
    /// The agent's answer could not be understood (malformed JSON, missing header…).
    Decode,
    /// The configuration, registration or check was invalid; nothing was sent.
    Config,
}

/// An error talking to Consul.
///
/// Opaque: ask it what it is with [`kind`](Self::kind) and the predicates. Its text names
/// the request (method and path, never the query string) and never contains the ACL token.
pub struct ConsulError {
    inner: Box<Inner>,
}

struct Inner {
    kind: Repr,
    /// `PUT /v1/agent/service/register`: the request, when there was one.
    request: Option<String>,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

enum Repr {
    Transport { connect: bool },
    Timeout(Duration),
    Status { code: u16, body: String },
    Decode(Cow<'static, str>),
    Config(ConfigError),
}

impl ConsulError {
    fn new(kind: Repr) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                request: None,
                source: None,
            }),
        }
    }

    pub(crate) fn transport(
        connect: bool,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        let mut e = Self::new(Repr::Transport { connect });
        e.inner.source = Some(source.into());
        e
    }

    pub(crate) fn timeout(after: Duration) -> Self {
        Self::new(Repr::Timeout(after))
    }

    pub(crate) fn status(code: u16, body: &[u8]) -> Self {
        Self::new(Repr::Status {
            code,
            body: truncate_body(body),
        })
    }

    pub(crate) fn decode(what: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Repr::Decode(what.into()))
    }

    pub(crate) fn with_request(mut self, request: String) -> Self {
        self.inner.request = Some(request);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self.inner.kind {
            Repr::Transport { .. } => ErrorKind::Transport,
            Repr::Timeout(_) => ErrorKind::Timeout,
            Repr::Status { .. } => ErrorKind::Status,
            Repr::Decode(_) => ErrorKind::Decode,
            Repr::Config(_) => ErrorKind::Config,
        }
    }

    /// Whether the request got no answer (see [`ErrorKind::Transport`]).
    pub fn is_transport(&self) -> bool {
        self.kind() == ErrorKind::Transport
    }

    /// Whether the connection to the agent could not be made (refused, unreachable…).
    pub fn is_connect(&self) -> bool {
        matches!(self.inner.kind, Repr::Transport { connect: true })
    }

    /// Whether the TLS handshake with an `https://` agent failed (feature `consul-tls`):
    /// its certificate was refused (signed by another CA, for another name, expired), it
    /// refused the connection during the handshake, or it does not speak TLS. Such an
    /// error is also [`is_connect`](Self::is_connect); nothing was sent. An agent that
    /// refuses the client certificate after the handshake completed on this side (as TLS
    /// 1.3 allows) fails the request as a [transport](Self::is_transport) error instead.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "consul-tls")]
        {
            let mut cur = self
                .inner
                .source
                .as_deref()
                .map(|e| e as &(dyn StdError + 'static));
            while let Some(e) = cur {
                if e.is::<super::tls::HandshakeError>() {
                    return true;
                }
                cur = e.source();
            }
        }
        false
    }

    /// Whether the request ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.kind() == ErrorKind::Timeout
    }

    /// Whether the agent answered with a non-2xx status.
    pub fn is_status(&self) -> bool {
        self.kind() == ErrorKind::Status
    }

    /// Whether the answer could not be understood.
    pub fn is_decode(&self) -> bool {
        self.kind() == ErrorKind::Decode
    }

    /// Whether a setting was invalid (nothing was sent).
    pub fn is_config(&self) -> bool {
        self.kind() == ErrorKind::Config
    }

    /// The HTTP status the agent answered with.
    pub fn status_code(&self) -> Option<u16> {
        match &self.inner.kind {
            Repr::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The text the agent answered a non-2xx status with, truncated to 512 bytes.
    pub fn body(&self) -> Option<&str> {
        match &self.inner.kind {
            Repr::Status { body, .. } => Some(body),
            _ => None,
        }
    }

    /// The invalid setting, for [`ErrorKind::Config`].
    pub fn config_error(&self) -> Option<&ConfigError> {
        match &self.inner.kind {
            Repr::Config(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the agent refused the ACL token (`403`).
    pub fn is_permission_denied(&self) -> bool {
        self.status_code() == Some(403)
    }

    /// The agent does not know the service ID (`404 Unknown service ID`).
    pub(crate) fn is_unknown_service(&self) -> bool {
        self.status_code() == Some(404)
            && self
                .body()
                .is_some_and(|b| b.to_ascii_lowercase().contains("unknown service"))
    }

    /// The agent does not know the check ID (any status: `404` on recent versions, `500`
    /// on older ones), or the check is no TTL check it knows.
    pub fn is_unknown_check(&self) -> bool {
        let Some(body) = self.body() else {
            return false;
        };
        let body = body.to_ascii_lowercase();
        body.contains("unknown check") || body.contains("does not have associated ttl")
    }
}

impl From<ConfigError> for ConsulError {
    fn from(e: ConfigError) -> Self {
        Self::new(Repr::Config(e))
    }
}

/// The first [`MAX_ERROR_BODY`] bytes of an error body, as trimmed text.
fn truncate_body(body: &[u8]) -> String {
    let mut end = body.len().min(MAX_ERROR_BODY);
    // Cut on a character boundary: never before a UTF-8 continuation byte.
    while end > 0 && end < body.len() && body[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let text = String::from_utf8_lossy(&body[..end]);
    let mut text = text.trim().to_owned();
    if body.len() > MAX_ERROR_BODY {
        text.push('…');
    }
    text
}

/// The innermost cause of an error: the text most worth showing (`Connection refused`).
fn root_cause<'a>(e: &'a (dyn StdError + 'static)) -> &'a (dyn StdError + 'static) {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur
}

impl fmt::Display for ConsulError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.request {
            Some(request) => write!(f, "consul {request}: ")?,
            None => f.write_str("consul: ")?,
        }
        match &self.inner.kind {
            Repr::Transport { connect } => {
                f.write_str(if *connect {
                    "cannot connect to the agent"
                } else {
                    "transport error"
                })?;
                if let Some(source) = &self.inner.source {
                    write!(f, ": {}", root_cause(source.as_ref()))?;
                }
                Ok(())
            }
            Repr::Timeout(after) => write!(f, "timed out after {after:?}"),
            Repr::Status { code, body } if body.is_empty() => write!(f, "status {code}"),
            Repr::Status { code, body } => write!(f, "status {code}: {body}"),
            Repr::Decode(what) => write!(f, "invalid response: {what}"),
            Repr::Config(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Debug for ConsulError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ConsulError");
        d.field("kind", &self.kind());
        if let Some(request) = &self.inner.request {
            d.field("request", request);
        }
        match &self.inner.kind {
            Repr::Transport { connect } => d.field("connect", connect),
            Repr::Timeout(after) => d.field("after", after),
            Repr::Status { code, body } => d.field("status", code).field("body", body),
            Repr::Decode(what) => d.field("what", what),
            Repr::Config(e) => d.field("config", e),
        };
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl StdError for ConsulError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.inner.kind {
            Repr::Config(e) => Some(e),
            _ => self
                .inner
                .source
                .as_deref()
                .map(|e| e as &(dyn StdError + 'static)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lower_case_without_period() {
        let e = ConsulError::status(403, b"Permission denied\n")
            .with_request("GET /v1/health/service/users".into());
        assert_eq!(
            e.to_string(),
            "consul GET /v1/health/service/users: status 403: Permission denied"
        );
        assert!(e.is_permission_denied());
        assert_eq!(e.body(), Some("Permission denied"));
        let e = ConsulError::decode("missing X-Consul-Index header");
        assert!(e.is_decode());
        assert!(!e.to_string().ends_with('.'));
        let e: ConsulError = token_error().into();
        assert!(e.is_config());
        assert_eq!(e.config_error().map(ConfigError::field), Some("token"));
    }

    #[test]
    fn long_bodies_are_truncated_on_a_char_boundary() {
        let body = "é".repeat(400);
        let e = ConsulError::status(500, body.as_bytes());
        let kept = e.body().unwrap();
        assert!(kept.len() <= MAX_ERROR_BODY + '…'.len_utf8());
        assert!(kept.ends_with('…'));
        assert!(kept.trim_end_matches('…').chars().all(|c| c == 'é'));
    }

    #[test]
    fn unknown_ids_are_recognized() {
        assert!(ConsulError::status(404, b"Unknown service ID \"x\"").is_unknown_service());
        assert!(!ConsulError::status(404, b"page not found").is_unknown_service());
        assert!(ConsulError::status(404, b"Unknown check ID \"x\"").is_unknown_check());
        assert!(
            ConsulError::status(500, b"CheckID \"x\" does not have associated TTL")
                .is_unknown_check()
        );
        assert!(!ConsulError::status(500, b"No cluster leader").is_unknown_check());
    }
}
