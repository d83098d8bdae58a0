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
/// the time limit of requests, and for an `https://` agent how its certificate is
/// verified. Built by [`ConsulConfig::builder`] or [`ConsulConfig::from_env`], validated
/// when built.
///
/// The token is sent as the `X-Consul-Token` header and never appears in `Debug` output,
/// errors or logs.
///
/// # HTTPS
///
/// With the feature `consul-tls`, an `https://` address (or `CONSUL_HTTP_SSL=true`)
/// reaches an agent that serves its API over TLS (`ports.https`), with rustls and the
/// *ring* provider, TLS 1.2 and 1.3. The agent's certificate is always verified: against
/// webpki-roots (Mozilla's roots) unless
#[cfg_attr(
    feature = "consul-tls",
    doc = "[`ca_pem`](ConsulConfigBuilder::ca_pem)"
)]
#[cfg_attr(not(feature = "consul-tls"), doc = "`ca_pem`")]
/// gives the CA that signed it, for the address's host unless
#[cfg_attr(
    feature = "consul-tls",
    doc = "[`tls_server_name`](ConsulConfigBuilder::tls_server_name)"
)]
#[cfg_attr(not(feature = "consul-tls"), doc = "`tls_server_name`")]
/// names another. There is no way to turn verification off. An agent with
/// `verify_incoming` also needs
#[cfg_attr(
    feature = "consul-tls",
    doc = "[`client_certificate`](ConsulConfigBuilder::client_certificate)."
)]
#[cfg_attr(not(feature = "consul-tls"), doc = "`client_certificate`.")]
/// Every certificate and key is parsed when the configuration is built, and the key is
/// never printed.
/// Connections are kept alive and reused as over plain HTTP; a failed handshake is a
/// [`ConsulError`](super::ConsulError) that
/// [`is_tls`](super::ConsulError::is_tls) and [`is_connect`](super::ConsulError::is_connect).
///
/// Without the feature, an `https://` address is rejected with a [`ConfigError`] naming
/// `address` and the feature: reach a TLS-only agent through a local plain-HTTP listener
/// (the usual setup: every host runs an agent listening on loopback) or build with
/// `consul-tls`.
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
    /// The TLS client, for an `https://` agent.
    #[cfg(feature = "consul-tls")]
    pub(crate) tls: Option<std::sync::Arc<super::tls::ConsulTls>>,
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
            https_without_scheme: false,
            #[cfg(feature = "consul-tls")]
            tls: super::tls::TlsSettings::default(),
        }
    }

    /// The configuration Consul's own tools use, from their environment variables:
    ///
    /// * `CONSUL_HTTP_ADDR`: the address (default [`DEFAULT_ADDRESS`]), `host:port` or a
    ///   URL with `http://` or `https://`;
    /// * `CONSUL_HTTP_TOKEN`: the ACL token;
    /// * `CONSUL_HTTP_SSL`: `true` (or `1`) reaches the agent over HTTPS when the address
    ///   has no scheme;
    /// * with the feature `consul-tls`: `CONSUL_CACERT` (a PEM file of the CA certificates
    ///   the agent's is verified against; else `CONSUL_CAPATH`, a directory of such
    ///   files; else webpki-roots), `CONSUL_CLIENT_CERT` and `CONSUL_CLIENT_KEY` (PEM
    ///   files of the client certificate and its key, for `verify_incoming`), and
    ///   `CONSUL_TLS_SERVER_NAME` (the name the agent's certificate is verified for).
    ///
    /// The files are read and parsed here. `CONSUL_HTTP_SSL_VERIFY=false`, which asks
    /// Consul's tools not to verify the agent's certificate, is refused for an agent
    /// reached over HTTPS: seawall always verifies it (give the agent's CA with
    /// `CONSUL_CACERT` instead). With a plain-HTTP agent it has nothing to turn off, and
    /// is let be.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the variable for a value that is not a boolean, a file
    /// that cannot be read or a certificate, key or name that is invalid
    /// (`CONSUL_CACERT`, `CONSUL_CLIENT_KEY`…) or `CONSUL_HTTP_SSL_VERIFY=false` for an
    /// HTTPS agent; naming `address` for an invalid address, an `https://` one (or
    /// `CONSUL_HTTP_SSL=true`) without the feature `consul-tls`, `CONSUL_HTTP_SSL=true`
    /// with an `http://` address, or TLS settings for a plain-HTTP agent; `token` for a
    /// token that is not a valid header value.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let address = var("CONSUL_HTTP_ADDR").filter(|a| !a.trim().is_empty());
        let verify = env_bool(&var, "CONSUL_HTTP_SSL_VERIFY")?;
        let ssl = env_bool(&var, "CONSUL_HTTP_SSL")?.unwrap_or(false);
        let mut builder = Self::builder();
        if ssl {
            if let Some(a) = &address {
                if has_scheme(a, "http") {
                    return Err(ConfigError::invalid(
                        "CONSUL_HTTP_SSL",
                        format!(
                            "true, but CONSUL_HTTP_ADDR is the plain-HTTP address {:?}: use \
                             https:// or no scheme",
                            shown(a)
                        ),
                    ));
                }
            }
            builder.https_without_scheme = true;
        }
        if let Some(address) = address {
            builder = builder.address(address);
        }
        if let Some(token) = var("CONSUL_HTTP_TOKEN") {
            builder = builder.token(token);
        }
        #[cfg(feature = "consul-tls")]
        let (builder, files) = env_tls(&var, builder)?;
        #[cfg(feature = "consul-tls")]
        let config = builder.build().map_err(|e| files.rename(e))?;
        #[cfg(not(feature = "consul-tls"))]
        let config = builder.build()?;
        // Over plain HTTP there is no certificate to verify, and the variable is moot
        // there, as it is for Consul's tools: refused only where it would mean something.
        if verify == Some(false) && config.is_https() {
            return Err(ConfigError::invalid(
                "CONSUL_HTTP_SSL_VERIFY",
                "false would turn off the verification of the agent's certificate, which \
                 seawall always does: give the agent's CA with CONSUL_CACERT instead",
            ));
        }
        Ok(config)
    }

    /// The agent's `host:port`.
    pub fn address(&self) -> &str {
        self.authority.as_str()
    }

    /// Whether the agent is reached over HTTPS (feature `consul-tls`).
    pub fn is_https(&self) -> bool {
        #[cfg(feature = "consul-tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "consul-tls"))]
        false
    }

    /// The scheme of the requests' URIs.
    pub(crate) fn scheme(&self) -> &'static str {
        if self.is_https() { "https" } else { "http" }
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
            #[cfg(feature = "consul-tls")]
            tls: None,
        }
    }
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ConsulConfig");
        d.field("address", &self.authority.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("request_timeout", &self.request_timeout);
        #[cfg(feature = "consul-tls")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

/// Builds a [`ConsulConfig`]; see [`ConsulConfig::builder`].
#[derive(Clone)]
pub struct ConsulConfigBuilder {
    address: Option<String>,
    token: Option<String>,
    datacenter: Option<String>,
    request_timeout: Duration,
    /// `CONSUL_HTTP_SSL=true`: an address without a scheme is reached over HTTPS.
    https_without_scheme: bool,
    #[cfg(feature = "consul-tls")]
    tls: super::tls::TlsSettings,
}

impl ConsulConfigBuilder {
    /// Sets the agent address: `host:port`, `http://host:port` or (feature `consul-tls`)
    /// `https://host:port` (a trailing `/` is ignored). Without a scheme, a missing port
    /// means 8500; with `http://`, it means 80; with `https://`, 443.
    #[must_use]
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Trusts the authorities in `pem` (one or more CA certificates, PEM), and only them,
    /// instead of webpki-roots: for an agent whose certificate a private CA signed (as
    /// `consul tls ca create` makes). Needs an `https://` address.
    #[cfg(feature = "consul-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "consul-tls")))]
    #[must_use]
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_pem = Some(pem.into());
        self
    }

    /// Presents `cert_pem` (the certificate chain, leaf first, PEM) with its private key
    /// `key_pem` (PKCS #8, PKCS #1 or SEC1, PEM) when the agent asks for a client
    /// certificate (`verify_incoming`). The key is never printed. Needs an `https://`
    /// address.
    #[cfg(feature = "consul-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "consul-tls")))]
    #[must_use]
    pub fn client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Verifies the agent's certificate for `name` (a DNS name or an IP address, sent by
    /// SNI when a DNS name) instead of the address's host: for an agent reached by an IP
    /// address or an alias its certificate does not list, such as
    /// `server.dc1.consul` or `localhost`. Needs an `https://` address.
    #[cfg(feature = "consul-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "consul-tls")))]
    #[must_use]
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls.server_name = Some(name.into());
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
    /// queries get `wait + wait/16` on top of it. Connecting to the agent, and the TLS
    /// handshake with an `https://` one, each have this limit alone, whatever the wait.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Validates the configuration, and parses the certificates and key of an `https://`
    /// one.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `address` for an address that is not `host:port`,
    /// `http://host:port` or `https://host:port`, an `https://` one without the feature
    /// `consul-tls`, or a plain-HTTP one with TLS settings; `token` for a token that is
    /// not a valid header value, `request_timeout` for zero, or `datacenter` for an empty
    /// one; `ca_pem` for a PEM without a CA certificate, `client_certificate` for one
    /// without a certificate, `client_key` for a key that is missing, unreadable or does
    /// not match the certificate, `tls_server_name` for a name that is not a DNS name or
    /// an IP address (the key itself is never shown).
    pub fn build(self) -> Result<ConsulConfig, ConfigError> {
        let (authority, https) = match &self.address {
            Some(address) => parse_address(address, self.https_without_scheme)?,
            None => (
                Authority::from_static(DEFAULT_ADDRESS),
                self.https_without_scheme,
            ),
        };
        #[cfg(not(feature = "consul-tls"))]
        if https {
            return Err(super::error::https_error(shown(
                self.address.as_deref().unwrap_or(DEFAULT_ADDRESS),
            )));
        }
        #[cfg(feature = "consul-tls")]
        let tls = if https {
            Some(std::sync::Arc::new(super::tls::ConsulTls::new(
                &self.tls,
                authority.host(),
            )?))
        } else if self.tls.any() {
            return Err(ConfigError::invalid(
                "address",
                format!(
                    "{:?} is plain HTTP, but TLS settings (a CA, a client certificate or a \
                     server name) are given: use an https:// address",
                    shown(self.address.as_deref().unwrap_or(DEFAULT_ADDRESS))
                ),
            ));
        } else {
            None
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
            #[cfg(feature = "consul-tls")]
            tls,
        })
    }
}

impl fmt::Debug for ConsulConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ConsulConfigBuilder");
        d.field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("request_timeout", &self.request_timeout);
        #[cfg(feature = "consul-tls")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

/// A boolean variable as Go's `strconv.ParseBool` reads it (`1`, `t`, `true`, `0`, `f`,
/// `false`, any case); unset or empty is `None`.
fn env_bool(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<bool>, ConfigError> {
    let Some(value) = var(name) else {
        return Ok(None);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "1" | "t" | "true" => Ok(Some(true)),
        "0" | "f" | "false" => Ok(Some(false)),
        _ => Err(ConfigError::invalid(
            name,
            format!("{value:?} is not a boolean (true or false)"),
        )),
    }
}

/// Whether `address` starts with `scheme://` (any case).
fn has_scheme(address: &str, scheme: &str) -> bool {
    address
        .trim()
        .split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// The files the TLS variables named, to name them in errors.
#[cfg(feature = "consul-tls")]
#[derive(Default)]
struct EnvFiles {
    ca: Option<(&'static str, String)>,
    cert: Option<String>,
    key: Option<String>,
}

#[cfg(feature = "consul-tls")]
impl EnvFiles {
    /// `e`, a builder's error, naming the variable (and file) it came from instead of the
    /// builder's setting.
    fn rename(&self, e: ConfigError) -> ConfigError {
        let (name, file) = match e.field() {
            "ca_pem" => match &self.ca {
                Some((name, file)) => (*name, Some(file)),
                None => return e,
            },
            "client_certificate" => ("CONSUL_CLIENT_CERT", self.cert.as_ref()),
            "client_key" => ("CONSUL_CLIENT_KEY", self.key.as_ref()),
            "tls_server_name" => ("CONSUL_TLS_SERVER_NAME", None),
            _ => return e,
        };
        match file {
            Some(file) => ConfigError::invalid(name, format!("{file}: {}", e.reason())),
            None => ConfigError::invalid(name, e.reason().to_owned()),
        }
    }
}

/// Reads a file a variable names; an error names the variable and the file.
#[cfg(feature = "consul-tls")]
fn read_env_file(name: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::io(name, std::io::Error::new(e.kind(), format!("{path}: {e}"))))
}

/// The TLS variables: `CONSUL_CACERT` (else `CONSUL_CAPATH`), `CONSUL_CLIENT_CERT` with
/// `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`.
#[cfg(feature = "consul-tls")]
fn env_tls(
    var: &impl Fn(&str) -> Option<String>,
    mut builder: ConsulConfigBuilder,
) -> Result<(ConsulConfigBuilder, EnvFiles), ConfigError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let mut files = EnvFiles::default();
    if let Some(path) = set("CONSUL_CACERT") {
        builder = builder.ca_pem(read_env_file("CONSUL_CACERT", &path)?);
        files.ca = Some(("CONSUL_CACERT", path));
    } else if let Some(dir) = set("CONSUL_CAPATH") {
        // Every file of the directory, as Consul's tools read it.
        let io = |e: std::io::Error| {
            ConfigError::io(
                "CONSUL_CAPATH",
                std::io::Error::new(e.kind(), format!("{dir}: {e}")),
            )
        };
        let mut paths = std::fs::read_dir(&dir)
            .map_err(io)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        paths.retain(|p| p.is_file());
        paths.sort();
        let mut pem = Vec::new();
        for path in paths {
            pem.extend(read_env_file("CONSUL_CAPATH", &path.to_string_lossy())?);
            pem.push(b'\n');
        }
        builder = builder.ca_pem(pem);
        files.ca = Some(("CONSUL_CAPATH", dir));
    }
    match (set("CONSUL_CLIENT_CERT"), set("CONSUL_CLIENT_KEY")) {
        (Some(cert), Some(key)) => {
            builder = builder.client_certificate(
                read_env_file("CONSUL_CLIENT_CERT", &cert)?,
                read_env_file("CONSUL_CLIENT_KEY", &key)?,
            );
            files.cert = Some(cert);
            files.key = Some(key);
        }
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "CONSUL_CLIENT_KEY",
                "unset, but CONSUL_CLIENT_CERT is set: a client certificate needs its key",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "CONSUL_CLIENT_CERT",
                "unset, but CONSUL_CLIENT_KEY is set: a key needs its client certificate",
            ));
        }
        (None, None) => {}
    }
    if let Some(name) = set("CONSUL_TLS_SERVER_NAME") {
        builder = builder.tls_server_name(name);
    }
    Ok((builder, files))
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

/// The agent's `host:port`, and whether it is reached over HTTPS (an `https://` address,
/// or `https_without_scheme` for one without a scheme).
fn parse_address(
    address: &str,
    https_without_scheme: bool,
) -> Result<(Authority, bool), ConfigError> {
    let invalid = || super::error::address_error(shown(address));
    let trimmed = address.trim();
    let (rest, default_port, https) = match trimmed.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (rest, 80, false),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (rest, 443, true),
        Some(_) => return Err(invalid()),
        None => (trimmed, 8500, https_without_scheme),
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
        return Ok((authority, https));
    }
    if rest.ends_with(':') {
        return Err(invalid());
    }
    let authority = format!("{rest}:{default_port}")
        .parse()
        .map_err(|_| invalid())?;
    Ok((authority, https))
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
        assert!(!c.is_https());
        let e = ConsulConfig::from_vars(env(&[("CONSUL_HTTP_SSL", "maybe")])).unwrap_err();
        assert_eq!(e.field(), "CONSUL_HTTP_SSL");
        let c = ConsulConfig::from_vars(env(&[("CONSUL_HTTP_SSL", "false")])).unwrap();
        assert!(!c.is_https());
    }

    fn env(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    /// No insecure mode for an HTTPS agent; over plain HTTP, where there is nothing to
    /// verify, the variable is let be (a `consul`-only service with it exported starts).
    #[test]
    fn ssl_verify_false_is_refused_for_https_only() {
        for value in ["false", "0", "FALSE"] {
            #[cfg(feature = "consul-tls")]
            for https in [
                vec![("CONSUL_HTTP_ADDR", "https://consul:8501".to_owned())],
                vec![("CONSUL_HTTP_SSL", "true".to_owned())],
            ] {
                let mut vars = https;
                vars.push(("CONSUL_HTTP_SSL_VERIFY", value.into()));
                let e = ConsulConfig::from_vars(env(vars)).unwrap_err();
                assert_eq!(e.field(), "CONSUL_HTTP_SSL_VERIFY", "{e}");
                assert!(e.reason().contains("CONSUL_CACERT"), "{e}");
            }
            for plain in [None, Some("127.0.0.1:8500"), Some("http://consul:8500")] {
                let mut vars = vec![("CONSUL_HTTP_SSL_VERIFY", value.to_owned())];
                vars.extend(plain.map(|a| ("CONSUL_HTTP_ADDR", a.to_owned())));
                let config = ConsulConfig::from_vars(env(vars)).expect(value);
                assert!(!config.is_https());
            }
        }
        let e = ConsulConfig::from_vars(env(vec![("CONSUL_HTTP_SSL_VERIFY", "nope".into())]))
            .unwrap_err();
        assert_eq!(e.field(), "CONSUL_HTTP_SSL_VERIFY");
    }

    #[cfg(not(feature = "consul-tls"))]
    #[test]
    fn https_needs_the_feature() {
        let e = addr("https://consul:8501").unwrap_err();
        assert_eq!(e.field(), "address");
        assert!(e.reason().contains("https needs TLS"), "{e}");
        assert!(e.reason().contains("consul-tls"), "{e}");
        let e = ConsulConfig::from_vars(env(vec![("CONSUL_HTTP_SSL", "true".into())])).unwrap_err();
        assert_eq!(e.field(), "address");
        assert!(e.reason().contains("consul-tls"), "{e}");
    }

    #[cfg(feature = "consul-tls")]
    mod tls {
        use super::*;

        struct Files {
            dir: std::path::PathBuf,
            ca: String,
            cert: String,
            key: String,
        }

        impl Drop for Files {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }

        /// A CA and a client certificate signed by it, as PEM strings.
        fn pki() -> (String, String, String) {
            use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["client".to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (ca.pem(), cert.pem(), key.serialize_pem())
        }

        fn files() -> Files {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "seawall-consul-env-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let (ca, cert, key) = pki();
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).unwrap();
                path.to_string_lossy().into_owned()
            };
            Files {
                ca: write("ca.pem", &ca),
                cert: write("client.pem", &cert),
                key: write("client.key", &key),
                dir,
            }
        }

        #[test]
        fn https_addresses() {
            let c = ConsulConfig::builder()
                .address("https://consul.internal")
                .build()
                .unwrap();
            assert!(c.is_https());
            assert_eq!(c.address(), "consul.internal:443");
            assert_eq!(addr("HTTPS://consul:8501/").unwrap(), "consul:8501");
            let c = ConsulConfig::builder()
                .address("[::1]:8501")
                .build()
                .unwrap();
            assert!(!c.is_https());
            let debug = format!(
                "{:?}",
                ConsulConfig::builder()
                    .address("https://[::1]:8501")
                    .build()
                    .unwrap()
            );
            assert!(
                debug.contains("webpki-roots") && debug.contains("::1"),
                "{debug}"
            );
        }

        #[test]
        fn tls_settings_need_https() {
            let (ca, _, _) = pki();
            let e = ConsulConfig::builder()
                .address("http://consul:8500")
                .ca_pem(ca)
                .build()
                .unwrap_err();
            assert_eq!(e.field(), "address");
            assert!(e.reason().contains("https://"), "{e}");
        }

        #[test]
        fn environment_with_tls() {
            let f = files();
            let c = ConsulConfig::from_vars(env(vec![
                ("CONSUL_HTTP_ADDR", "https://127.0.0.1:8501".into()),
                ("CONSUL_CACERT", f.ca.clone()),
                ("CONSUL_CLIENT_CERT", f.cert.clone()),
                ("CONSUL_CLIENT_KEY", f.key.clone()),
                ("CONSUL_TLS_SERVER_NAME", "server.dc1.consul".into()),
                ("CONSUL_HTTP_SSL_VERIFY", "true".into()),
            ]))
            .unwrap();
            assert!(c.is_https());
            let debug = format!("{c:?}");
            assert!(
                debug.contains("server.dc1.consul") && debug.contains("ca_pem"),
                "{debug}"
            );
            assert!(!debug.contains("PRIVATE KEY"), "{debug}");

            // CONSUL_HTTP_SSL=true: an address without a scheme is reached over HTTPS,
            // on its port (8500 when none).
            let c = ConsulConfig::from_vars(env(vec![
                ("CONSUL_HTTP_ADDR", "consul:8501".into()),
                ("CONSUL_HTTP_SSL", "true".into()),
                ("CONSUL_CACERT", f.ca.clone()),
            ]))
            .unwrap();
            assert!(c.is_https());
            assert_eq!(c.address(), "consul:8501");
            let c = ConsulConfig::from_vars(env(vec![("CONSUL_HTTP_SSL", "1".into())])).unwrap();
            assert!(c.is_https());
            assert_eq!(c.address(), DEFAULT_ADDRESS);
            let e = ConsulConfig::from_vars(env(vec![
                ("CONSUL_HTTP_ADDR", "http://consul:8500".into()),
                ("CONSUL_HTTP_SSL", "true".into()),
            ]))
            .unwrap_err();
            assert_eq!(e.field(), "CONSUL_HTTP_SSL");

            // CONSUL_CAPATH: every file of a directory.
            let capath = f.dir.join("cas");
            std::fs::create_dir_all(&capath).unwrap();
            std::fs::copy(&f.ca, capath.join("a.pem")).unwrap();
            std::fs::write(capath.join("b.pem"), pki().0).unwrap();
            let c = ConsulConfig::from_vars(env(vec![
                ("CONSUL_HTTP_ADDR", "https://consul:8501".into()),
                ("CONSUL_CAPATH", capath.to_string_lossy().into_owned()),
            ]))
            .unwrap();
            assert!(c.is_https());
        }

        #[test]
        fn environment_errors_name_the_variable_and_the_file() {
            let f = files();
            let https = || ("CONSUL_HTTP_ADDR", "https://consul:8501".to_owned());
            let missing = f.dir.join("missing.pem").to_string_lossy().into_owned();
            let e = ConsulConfig::from_vars(env(vec![https(), ("CONSUL_CACERT", missing.clone())]))
                .unwrap_err();
            assert_eq!(
                (e.field(), e.kind()),
                ("CONSUL_CACERT", crate::ConfigErrorKind::Io)
            );
            assert!(e.to_string().contains(&missing), "{e}");

            // A CA file that holds a key, not a certificate.
            let e = ConsulConfig::from_vars(env(vec![https(), ("CONSUL_CACERT", f.key.clone())]))
                .unwrap_err();
            assert_eq!(e.field(), "CONSUL_CACERT", "{e}");
            assert!(e.reason().contains(&f.key), "{e}");
            assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");

            // The certificate's file given as the key.
            let e = ConsulConfig::from_vars(env(vec![
                https(),
                ("CONSUL_CLIENT_CERT", f.cert.clone()),
                ("CONSUL_CLIENT_KEY", f.cert.clone()),
            ]))
            .unwrap_err();
            assert_eq!(e.field(), "CONSUL_CLIENT_KEY", "{e}");

            // Another key than the certificate's.
            let other_key = f.dir.join("other.key");
            std::fs::write(&other_key, pki().2).unwrap();
            let e = ConsulConfig::from_vars(env(vec![
                https(),
                ("CONSUL_CLIENT_CERT", f.cert.clone()),
                (
                    "CONSUL_CLIENT_KEY",
                    other_key.to_string_lossy().into_owned(),
                ),
            ]))
            .unwrap_err();
            assert_eq!(e.field(), "CONSUL_CLIENT_KEY", "{e}");
            assert!(e.reason().contains("does not match"), "{e}");

            let e =
                ConsulConfig::from_vars(env(vec![https(), ("CONSUL_CLIENT_CERT", f.cert.clone())]))
                    .unwrap_err();
            assert_eq!(e.field(), "CONSUL_CLIENT_KEY", "{e}");
            let e = ConsulConfig::from_vars(env(vec![
                https(),
                ("CONSUL_TLS_SERVER_NAME", "not a name".into()),
            ]))
            .unwrap_err();
            assert_eq!(e.field(), "CONSUL_TLS_SERVER_NAME", "{e}");

            // TLS settings with a plain-HTTP agent are a mistake, not ignored.
            let e = ConsulConfig::from_vars(env(vec![
                ("CONSUL_HTTP_ADDR", "consul:8500".into()),
                ("CONSUL_CACERT", f.ca.clone()),
            ]))
            .unwrap_err();
            assert_eq!(e.field(), "address", "{e}");
        }
    }
}
