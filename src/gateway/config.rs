//! The gateway's declarative configuration, read from TOML.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::ConfigError;

/// The longest duration any setting accepts (a day): longer values are mistakes.
const MAX_SETTING: Duration = Duration::from_secs(24 * 3600);

/// The whole configuration: the listener, authentication, routes and static services.
///
/// Read with [`from_toml_str`](Self::from_toml_str) or [`from_file`](Self::from_file),
/// which reject unknown keys and validate every value (see [`ConfigError`]). The keys are
/// documented in the [module docs](super).
///
/// ```
/// use seawall::gateway::GatewayConfig;
///
/// let config = GatewayConfig::from_toml_str(r#"
///     [gateway]
///     listen = "127.0.0.1:8080"
///
///     [[routes]]
///     name = "users"
///     path_prefix = "/api/users"
///     service = "users"
///     timeout = "2s"
///     breaker = { failure_rate = "50%", window = 20, minimum_calls = 10 }
///     rate_limit = { per_client = { per_second = 10, burst = 20 } }
///
///     [[services]]
///     name = "users"
///     instances = ["127.0.0.1:9001", "127.0.0.1:9002"]
/// "#)?;
/// assert_eq!(config.routes[0].breaker.as_ref().map(|b| b.failure_rate), Some(0.5));
///
/// // A share above 1 reads like a percentage: refused, naming the key and the fix.
/// let err = GatewayConfig::from_toml_str(r#"
///     [gateway]
///     listen = "127.0.0.1:8080"
///     [[routes]]
///     name = "users"
///     path_prefix = "/api/users"
///     service = "users"
///     breaker = { failure_rate = 50 }
///     [[services]]
///     name = "users"
///     instances = ["127.0.0.1:9001"]
/// "#).unwrap_err();
/// assert_eq!(err.field(), "routes[0].breaker.failure_rate");
/// assert!(err.reason().contains("write 0.5"), "{err}");
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// `[gateway]`: the server itself.
    pub gateway: ServerConfig,
    /// `[auth]`: credentials checked on routes with `auth = true`.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[admin]`: where `/metrics`, `/status` and `/status.json` are served.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[[routes]]`: matched by longest path prefix.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// `[[services]]`: statically listed services; the others are discovered.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// `[redis]`: where limits with `policy = "redis"` keep their buckets, shared by every
    /// gateway replica with the same configuration.
    #[serde(default)]
    pub redis: Option<RedisSettings>,
}

/// `[redis]`: the store of the limits with `policy = "redis"` (feature `redis`).
///
/// Each such limit is a
#[cfg_attr(
    feature = "redis",
    doc = "[`RedisRateLimiter`](crate::rate_limit::redis::RedisRateLimiter)"
)]
#[cfg_attr(not(feature = "redis"), doc = "`RedisRateLimiter`")]
/// of its own (one connection, one breaker around Redis), keyed
/// `<prefix>:<route>:global:{all}` or `<prefix>:<route>:client:{<client>}`, so replicas
/// with the same routes share the same buckets. A client key longer than 64 bytes is
/// stored as its SHA-256 digest (the same in every replica).
///
/// Its `Debug` output hides the user and password of the URLs
/// (`redis://***@host:6379/`), so that logging the configuration does not log them.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisSettings {
    /// One Redis server: `redis://host:port/`, `rediss://host:port/` (TLS, with seawall's
    /// `redis-tls` feature; see [`tls`](Self::tls)) or `redis+unix://…`. Parsed when the
    /// configuration loads as the limiter's Redis client parses it (without connecting),
    /// whether or not a limit uses the section.
    pub url: Option<String>,
    /// A Redis Cluster's seed nodes, instead of `url`, checked at load as `url` is and as
    /// a cluster client checks them together (no Unix sockets).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The keys' prefix (default `seawall`). It must not hold `{` or `}`, nor may the
    /// name of a route with a limit in Redis: a Redis Cluster hashes only what lies
    /// between the first `{` of a key and the next `}`, so a brace there would put every
    /// bucket on one slot. The configuration is refused.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// How long a check may wait for Redis before the failure policy answers it (default
    /// 200ms; see the
    #[cfg_attr(
        feature = "redis",
        doc = "[Redis limiter's defaults](crate::rate_limit::redis))."
    )]
    #[cfg_attr(not(feature = "redis"), doc = "Redis limiter's defaults).")]
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// While Redis cannot answer: `"open"` (the default) limits each replica with its
    /// [`local_share`](Self::local_share); `"closed"` answers `503` with `Retry-After: 1`.
    #[serde(default)]
    pub failure: RedisFailure,
    /// The share of each limit (its rate and burst) one replica enforces on its own while
    /// Redis is away, a fraction in `(0, 1]` or a percentage (`"34%"`): about 1 / the
    /// number of replicas keeps the fleet near the limit; 1 (the default) lets each
    /// replica admit the whole limit, so a fleet of N admits up to N times it.
    #[serde(default = "default_local_share", deserialize_with = "fraction")]
    pub local_share: f64,
    /// Tokens taken from Redis per round trip (default 1: none ahead). Larger batches
    /// spare round trips for busy keys; tokens a replica holds are not available to the
    /// others, and are used up to `batch_max_age` after they were taken, so over an
    /// interval the fleet admits up to `batch_max_age` of refill more than the limit
    /// would (see
    #[cfg_attr(
        feature = "redis",
        doc = "[`RedisRateLimiterBuilder::batch`](crate::rate_limit::redis::RedisRateLimiterBuilder::batch))."
    )]
    #[cfg_attr(not(feature = "redis"), doc = "`RedisRateLimiterBuilder::batch`).")]
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// How long tokens taken ahead may be used before they are given up (default 100ms).
    #[serde(default = "default_batch_max_age", deserialize_with = "duration")]
    pub batch_max_age: Duration,
    /// `[redis.tls]`: the CA and client certificate for a `rediss://` URL. Without it a
    /// `rediss://` server is checked against webpki-roots and offered no client
    /// certificate.
    #[serde(default)]
    pub tls: Option<RedisTlsSettings>,
}

/// `[redis.tls]`: how the gateway checks a `rediss://` Redis, and what it shows it (feature
/// `redis-tls`; see
#[cfg_attr(
    feature = "redis-tls",
    doc = "[`RedisTls`](crate::rate_limit::redis::RedisTls))."
)]
#[cfg_attr(not(feature = "redis-tls"), doc = "`RedisTls`).")]
/// The files are read, and their certificates and key parsed, when the configuration loads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisTlsSettings {
    /// Trust the CA certificates in this PEM file, and only them, instead of the Mozilla
    /// roots that webpki-roots ships: for a Redis whose certificate a private CA signed.
    pub ca_file: Option<std::path::PathBuf>,
    /// The client certificate chain (PEM, leaf first) shown when Redis asks for one
    /// (`tls-auth-clients yes`, redis-server's default); needs `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key of `cert_file` (PEM: PKCS #8, PKCS #1 or SEC1).
    pub key_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "nodes",
                &self.nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("failure", &self.failure)
            .field("local_share", &self.local_share)
            .field("batch", &self.batch)
            .field("batch_max_age", &self.batch_max_age)
            .field("tls", &self.tls)
            .finish()
    }
}

/// `url` without its credentials: `redis://user:pass@host/` → `redis://***@host/`, and
/// the `user` and `pass` a `redis+unix://` URL carries in its query (`?pass=…` →
/// `?pass=***`, as the `redis` crate reads them; `username` and `password` too).
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let mut out = match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _))
                    if ["user", "pass", "username", "password"]
                        .iter()
                        .any(|k| key.eq_ignore_ascii_case(k)) =>
                {
                    format!("{key}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// `failure = "..."` of `[redis]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Each replica limits with its local share.
    #[default]
    Open,
    /// Every limited request is answered `503`.
    Closed,
}

fn default_redis_prefix() -> String {
    "seawall".to_owned()
}
fn default_redis_timeout() -> Duration {
    Duration::from_millis(200)
}
fn default_local_share() -> f64 {
    1.0
}
fn default_batch() -> u32 {
    1
}
fn default_batch_max_age() -> Duration {
    Duration::from_millis(100)
}

/// `policy = "..."` of a limit: where its buckets live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitPolicy {
    /// In this process: each replica enforces the whole limit.
    #[default]
    Local,
    /// In Redis (`[redis]`), shared by every replica.
    Redis,
}

impl LimitPolicy {
    /// `local` or `redis`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Redis => "redis",
        }
    }
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The address to listen on (`"127.0.0.1:8080"`); [`Gateway::spawn`](super::Gateway)
    /// callers may bind their own listener instead.
    pub listen: SocketAddr,
    /// How long a write to a client may stay blocked (the client reads nothing) before
    /// its connection is closed, and the upstream connection serving it released (default
    /// 60s, as nginx's `send_timeout`). The bound is on each wait, not on the whole
    /// response: a slow reader that keeps reading is served. An HTTP/2 response waiting
    /// that long for the client to open its stream's flow-control window (found by a
    /// check every quarter of the timeout: one to one and a quarter times it) has its
    /// stream reset and its upstream connection released; the client's connection and
    /// its other streams go on.
    #[serde(default = "default_send_timeout", deserialize_with = "duration")]
    pub send_timeout: Duration,
    /// The largest request body, in bytes, of routes that set none (default 1 MiB;
    /// `0`: no limit). See [`RouteConfig::max_request_body`].
    #[serde(default = "default_max_request_body")]
    pub max_request_body: u64,
    /// The longest header line (name, `: ` and value) a request may carry, in bytes
    /// (default 16 KiB); longer is answered `431`.
    #[serde(default = "default_max_header_line")]
    pub max_header_line: usize,
    /// The largest request head (request line and every header), in bytes (default 64
    /// KiB, at least 8 KiB); larger is answered `431` before any routing.
    #[serde(default = "default_max_headers_size")]
    pub max_headers_size: usize,
    /// Decode escaped unreserved characters and remove dot segments before matching
    /// (default true); when false, paths with dot segments are refused with 400. See
    /// [`path`](super::path).
    #[serde(default = "yes")]
    pub normalize_path: bool,
    /// Merge repeated slashes before matching (default true). See [`path`](super::path).
    #[serde(default = "yes")]
    pub merge_slashes: bool,
    /// Proxies in front of the gateway whose forwarding headers are believed: addresses
    /// or CIDR networks (`["10.0.0.0/8", "::1"]`; default none). From a trusted peer,
    /// `X-Forwarded-For` and `Forwarded` are appended to and its `X-Forwarded-Host` /
    /// `-Proto` kept, and per-client IP limits key on the client it reports in
    /// `X-Forwarded-For`; from any other peer, these headers are replaced by what the
    /// gateway saw. A network of every address (`0.0.0.0/0`, `::/0`) lets any client
    /// name its own address: accepted, and logged as a warning.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The leading bits of an IPv6 client's address that per-client IP limits key on
    /// (default 64: a host's /64, within which it can pick a new address for every
    /// request; 128: each address alone). IPv4 clients are keyed by their address.
    #[serde(default = "default_client_ipv6_prefix")]
    pub client_ipv6_prefix: u8,
    /// The request id header (Kong's correlation id; default `"x-request-id"`, `""`
    /// turns it off): a client's (one value, 1 to 128 bytes of visible ASCII) is passed
    /// on, any other replaced by a new UUID-v4-shaped id; sent upstream and set on the
    /// route's response. See [following a request](super#following-a-request).
    #[serde(default = "default_request_id_header")]
    pub request_id_header: String,
    /// W3C Trace Context (default true): `traceparent` sent upstream with the gateway's
    /// hop as parent, continuing a client's valid trace or starting one. See
    /// [following a request](super#following-a-request).
    #[serde(default = "yes")]
    pub trace_context: bool,
    /// Serve HTTP/2 with prior knowledge (h2c) on a cleartext listener too (default
    /// false): a connection opening with HTTP/2's preface is served as HTTP/2, any other
    /// as HTTP/1.
    #[serde(default)]
    pub h2c: bool,
    /// `[gateway.tls]`: terminate TLS on the listener (feature `tls`); absent: cleartext.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// `[gateway.http2]`: the bounds of HTTP/2 connections (over TLS by ALPN, or h2c).
    #[serde(default)]
    pub http2: Http2Settings,
}

/// `[gateway.tls]`: TLS termination (feature `tls`). rustls' safe defaults: TLS 1.2 and
/// 1.3 only, its default cipher suites, no client certificates.
///
/// ```toml
/// [gateway.tls]
/// handshake_timeout = "10s"
/// reload_every = "5s"
/// alpn = ["h2", "http/1.1"]
/// [[gateway.tls.certificates]]
/// cert = "/etc/seawall/example.com.pem"   # the chain, leaf first, PEM
/// key = "/etc/seawall/example.com.key"    # PKCS#8, PKCS#1 or SEC1, PEM
/// # server_names = ["example.com"]        # default: the certificate's DNS names
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSettings {
    /// The certificates; the first also answers handshakes whose SNI names none of them
    /// (or that send no SNI).
    #[serde(default)]
    pub certificates: Vec<CertificateSettings>,
    /// How long a client has to complete its handshake (default 10s); past it, the
    /// connection is closed.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// How often the certificate and key files are checked for changes (default 5s; `0s`:
    /// never). Changed files are loaded and used for new handshakes; files that fail to
    /// load leave the certificates in use as they were.
    #[serde(default = "default_reload_every", deserialize_with = "duration")]
    pub reload_every: Duration,
    /// The protocols offered by ALPN, in order of preference (default `["h2",
    /// "http/1.1"]`; `["http/1.1"]` turns HTTP/2 off). `http/1.1` stands for `http/1.0`
    /// too. A client that offers no ALPN gets HTTP/1.1; one whose offer shares nothing
    /// with the list (an HTTP/2-only client when HTTP/2 is off) is refused in the
    /// handshake (`no_application_protocol`, RFC 7301), as nginx refuses it.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
}

/// One certificate of `[gateway.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CertificateSettings {
    /// The certificate chain, leaf first, in a PEM file.
    pub cert: std::path::PathBuf,
    /// Its private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
    /// The SNI names it answers (`*.example.com` for one label); default: the DNS names
    /// the certificate holds.
    #[serde(default)]
    pub server_names: Vec<String>,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reload_every() -> Duration {
    Duration::from_secs(5)
}
fn default_alpn() -> Vec<String> {
    vec![String::from("h2"), String::from("http/1.1")]
}

/// `[gateway.http2]`: the bounds of each HTTP/2 connection, as Envoy's edge defaults
/// suggest. A client resetting streams it just opened faster than the gateway can
/// accept them (CVE-2023-44487, rapid reset) gets a `GOAWAY` once more than
/// `max_pending_accept_reset_streams` wait; one making the gateway reset its streams
/// (malformed requests) once more than `max_local_error_reset_streams` did.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Http2Settings {
    /// Streams a client may have open at once (default 100).
    pub max_concurrent_streams: u32,
    /// The largest header list (HPACK-decoded, as HTTP/2 counts it) of a request, in
    /// bytes (default: `max_headers_size`; 1024 to 1 MiB).
    pub max_header_list_size: Option<u32>,
    /// Each stream's flow-control window, in bytes (default 65 535, HTTP/2's; 65 535 to
    /// 2³¹ − 1).
    pub initial_stream_window: u32,
    /// The connection's flow-control window, in bytes (default 1 MiB; 65 535 to 2³¹ − 1).
    pub initial_connection_window: u32,
    /// Streams reset by the client before the gateway accepted them, at most, before the
    /// connection is closed with `GOAWAY` (default 20).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the gateway reset for the client's errors, at most, before the connection
    /// is closed with `GOAWAY` (default 1 024).
    pub max_local_error_reset_streams: usize,
    /// Send a `PING` after this long without a frame (default: never). A client's answer
    /// counts as something sent: with this set, the connection of a client that answers
    /// is never idle for the 10 s bound on HTTP/2 clients that send nothing (gRPC clients
    /// that keep connections warm want that); only one that answers nothing is closed,
    /// after `keep_alive_timeout`.
    #[serde(deserialize_with = "optional_duration")]
    pub keep_alive_interval: Option<Duration>,
    /// How long a `PING` may go unanswered before the connection is closed (default 20s).
    #[serde(deserialize_with = "duration")]
    pub keep_alive_timeout: Duration,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            max_header_list_size: None,
            initial_stream_window: 65_535,
            initial_connection_window: 1 << 20,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            keep_alive_interval: None,
            keep_alive_timeout: Duration::from_secs(20),
        }
    }
}

fn default_client_ipv6_prefix() -> u8 {
    crate::rate_limit::http::DEFAULT_IPV6_PREFIX
}

fn default_request_id_header() -> String {
    String::from("x-request-id")
}

fn yes() -> bool {
    true
}

impl ServerConfig {
    /// The path normalisation these settings ask for.
    pub fn path_options(&self) -> super::path::PathOptions {
        super::path::PathOptions {
            normalize: self.normalize_path,
            merge_slashes: self.merge_slashes,
        }
    }
}

fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_request_body() -> u64 {
    1 << 20
}
fn default_max_header_line() -> usize {
    16 << 10
}
fn default_max_headers_size() -> usize {
    64 << 10
}

/// The smallest `max_headers_size` (as hyper's HTTP/1 read buffer had it).
const MIN_HEADERS_SIZE: usize = 8 << 10;
/// The largest `max_headers_size` accepted: larger heads are mistakes or attacks.
const MAX_HEADERS_SIZE: usize = 1 << 20;

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthConfig {
    /// `[auth.jwt]`: HS256 bearer tokens.
    pub jwt: Option<JwtConfig>,
}

/// `[admin]`: the admin endpoints (`/metrics`, `/status`, `/status.json`), which show
/// upstream addresses, routes and limits. They are served on a listener of their own
/// ([`Gateway::spawn_admin`](super::Gateway::spawn_admin)), never on the proxy listener
/// unless `on_proxy_listener = true`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminConfig {
    /// The admin listener's address (keep it on loopback or a private network), for
    /// callers that bind it from the configuration; none by default.
    pub listen: Option<SocketAddr>,
    /// The environment variable holding a bearer token the admin endpoints require
    /// (`Authorization: Bearer <token>`, else `401`); none by default.
    pub token_env: Option<String>,
    /// The file holding that token (instead of `token_env`).
    pub token_file: Option<std::path::PathBuf>,
    /// Also answer the admin paths on the proxy listener, before routing (default
    /// false), for single-port setups; routes under an admin path are then refused. Set
    /// a token too: the proxy listener faces the clients.
    #[serde(default)]
    pub on_proxy_listener: bool,
}

impl AdminConfig {
    /// The admin token, read now from `token_env` or `token_file`; `None` without either.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field, never showing the token: both set, an
    /// unset variable, an unreadable file, or a weak token (the rules of
    /// [`JwtConfig`]'s secret).
    pub fn resolve_token(&self) -> Result<Option<String>, ConfigError> {
        super::secret::resolve(
            "admin",
            "token",
            None,
            self.token_env.as_deref(),
            self.token_file.as_deref(),
            super::secret::MIN_TOKEN_LEN,
        )
    }
}

/// `[auth.jwt]`: how bearer tokens are checked (HS256 only).
///
/// The secret comes from exactly one of `secret` (in the file), `secret_env` (the name
/// of an environment variable) or `secret_file` (a file holding it; a final newline is
/// dropped). It must be at least 32 bytes (RFC 7518 §3.2: an HS256 key as long as the
/// hash) with at least 8 distinct byte values, not one short pattern repeated, and not
/// shaped like an unresolved placeholder (`${JWT_SECRET}`, `$JWT_SECRET`, `{{ ... }}`,
/// `%JWT_SECRET%`): the file is not interpolated, so `secret = "${JWT_SECRET}"` is refused
/// rather than used as the key (write `secret_env = "JWT_SECRET"`). No error ever shows
/// the secret.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct JwtConfig {
    /// The shared HMAC secret, written in the file. Prefer `secret_env` or `secret_file`;
    /// read the secret in use with [`resolve_secret`](Self::resolve_secret).
    #[serde(default, deserialize_with = "secret_string")]
    pub secret: Option<String>,
    /// The environment variable holding the secret.
    pub secret_env: Option<String>,
    /// The file holding the secret (a regular file, at most 64 KiB).
    pub secret_file: Option<std::path::PathBuf>,
    /// The required `iss` claim, if any (not empty: leave it out to accept any).
    pub issuer: Option<String>,
    /// The required `aud` claim (a string, or one of an array), if any (not empty).
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf` (default 0s).
    #[serde(default, deserialize_with = "duration")]
    pub leeway: Duration,
    /// Whether a token without an `exp` claim is refused (default true): a token that
    /// never expires is valid for as long as the secret is.
    #[serde(default = "yes")]
    pub require_exp: bool,
}

impl JwtConfig {
    /// The secret, from `secret`, `secret_env` or `secret_file` (read now), checked as the
    /// [type's docs](Self) say.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field (`auth.jwt.secret_env: ...`), never
    /// showing the secret: none or several sources, an unset variable, an unreadable
    /// file, an unresolved `${…}`, or a weak secret.
    pub fn resolve_secret(&self) -> Result<String, ConfigError> {
        super::secret::resolve(
            "auth.jwt",
            "secret",
            self.secret.as_deref(),
            self.secret_env.as_deref(),
            self.secret_file.as_deref(),
            super::secret::MIN_HS256_KEY_LEN,
        )?
        .ok_or_else(|| {
            ConfigError::invalid(
                "auth.jwt.secret",
                "one of secret, secret_env or secret_file is required",
            )
        })
    }
}

/// A string; any other type is refused without echoing the value.
fn secret_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
            Err(E::custom("the secret must be a string"))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
            Err(E::custom("the secret must be a string"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
            Err(E::custom("the secret must be a string"))
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
            Err(E::custom("the secret must be a string"))
        }
    }
    d.deserialize_any(Visitor).map(Some)
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("secret_file", &self.secret_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("require_exp", &self.require_exp)
            .finish()
    }
}

/// `[[routes]]`: one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteConfig {
    /// A unique name, in status reports and metrics. With a limit in Redis it is also
    /// part of the limit's Redis keys, and must not hold `{` or `}` (see
    /// [`RedisSettings::prefix`]).
    pub name: String,
    /// The path prefix matched, on segment boundaries: `/api/users` matches `/api/users`,
    /// `/api/users/42` and `/api/users;x`, not `/api/usersx` or `/api/users.json` (only
    /// `/` and `;` end a segment; an upstream that serves `/api/users.json` as
    /// `/api/users` needs a route for that path with this one's policy, see
    /// [the module docs](super)). Written as requests are matched, after
    /// normalisation: what clients percent-encode (non-ASCII characters, `{`, `}`, …) as
    /// upper-case escapes (`/caf%C3%A9` for `/café`).
    pub path_prefix: String,
    /// The upstream service's name.
    pub service: String,
    /// Whether the prefix is removed from the path sent upstream (default false).
    #[serde(default)]
    pub strip_prefix: bool,
    /// The bound on each request until the upstream's response head (default 10s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The bound on each wait for more of the upstream's response body once its head has
    /// come (default: `timeout`): a body the upstream stops sending for this long is cut,
    /// closing the client's connection, as nginx's `proxy_read_timeout` does. Set it
    /// longer on routes that stream with pauses (server-sent events, long polls, gRPC
    /// server-streaming calls such as watches: with the default, one that sends nothing
    /// for `timeout`, 10 s unless set, is ended with `DEADLINE_EXCEEDED`, whatever the
    /// caller's `grpc-timeout`).
    #[serde(default, deserialize_with = "optional_duration")]
    pub body_timeout: Option<Duration>,
    /// The largest request body, in bytes (default: `[gateway] max_request_body`; `0`:
    /// no limit). A larger `Content-Length` is answered `413` without contacting the
    /// upstream; a streamed (chunked) body that grows past it is cut, the exchange with
    /// the upstream aborted, and answered `413` (never counted against the upstream).
    #[serde(default)]
    pub max_request_body: Option<u64>,
    /// Whether a valid bearer token is required (default false; needs `[auth.jwt]`).
    #[serde(default)]
    pub auth: bool,
    /// `[routes.breaker]`: a circuit breaker per upstream endpoint.
    pub breaker: Option<BreakerSettings>,
    /// `[routes.fallback]`: the answer when the upstream fails.
    pub fallback: Option<FallbackSettings>,
    /// `[routes.rate_limit]`: global and per-client limits.
    #[serde(default)]
    pub rate_limit: RateLimitSettings,
    /// `[routes.balance]`: load balancing and outlier ejection.
    #[serde(default)]
    pub balance: BalanceSettings,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[routes.breaker]`: every endpoint of the route's service gets a breaker with these
/// settings; failures are 5xx answers, transport errors and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "BreakerToml")]
#[non_exhaustive]
pub struct BreakerSettings {
    /// The share of failed calls in the window that opens the breaker: a fraction in
    /// `(0, 1]`, or a percentage written as a string (`"50%"`). Default 0.5.
    pub failure_rate: f64,
    /// Calls recorded before the rate counts, at most `window` (default 10, or the
    /// window if smaller).
    pub minimum_calls: u32,
    /// The count-based window: the last this many calls (default 20).
    pub window: u32,
    /// How long the breaker stays open before probing (default 5s).
    pub wait_in_open: Duration,
    /// Probe calls let through when half-open (default 2).
    pub permitted_in_half_open: u32,
}

/// `[routes.breaker]` as written: `minimum_calls` left out defaults to what the window
/// allows.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerToml {
    #[serde(default = "default_failure_rate", deserialize_with = "fraction")]
    failure_rate: f64,
    minimum_calls: Option<u32>,
    #[serde(default = "default_window")]
    window: u32,
    #[serde(default = "default_wait_in_open", deserialize_with = "duration")]
    wait_in_open: Duration,
    #[serde(default = "default_half_open")]
    permitted_in_half_open: u32,
}

impl From<BreakerToml> for BreakerSettings {
    fn from(b: BreakerToml) -> Self {
        Self {
            failure_rate: b.failure_rate,
            minimum_calls: b
                .minimum_calls
                .unwrap_or_else(|| default_minimum_calls().min(b.window.max(1))),
            window: b.window,
            wait_in_open: b.wait_in_open,
            permitted_in_half_open: b.permitted_in_half_open,
        }
    }
}

fn default_failure_rate() -> f64 {
    0.5
}
fn default_minimum_calls() -> u32 {
    10
}
fn default_window() -> u32 {
    20
}
fn default_wait_in_open() -> Duration {
    Duration::from_secs(5)
}
fn default_half_open() -> u32 {
    2
}

/// `[routes.fallback]`: served instead of an upstream failure (an error, a timeout, open
/// breakers, no endpoint, or a 5xx answer but `501`, which answers the client's method).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FallbackSettings {
    /// The status (default 200).
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    /// The body (default empty). JSON when the content type is (`application/json`, the
    /// default, or `…+json`); none for a `204`, `205` or `304`.
    #[serde(default)]
    pub body: String,
    /// The `Content-Type`, a media type (default `application/json`).
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

impl FallbackSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if !(200..=599).contains(&self.status) {
            return Err(ConfigError::invalid(
                format!("{at}.status"),
                "must be an HTTP status in 200..=599",
            ));
        }
        // RFC 9110 requires a field on these answers that a fallback cannot carry (it
        // has a status, a body and a content type).
        let required = match self.status {
            206 => Some("Content-Range (RFC 9110 §15.3.7)"),
            401 => Some("WWW-Authenticate (RFC 9110 §15.5.2)"),
            405 => Some("Allow (RFC 9110 §15.5.6)"),
            407 => Some("Proxy-Authenticate (RFC 9110 §15.5.8)"),
            416 => Some("Content-Range (RFC 9110 §15.5.17)"),
            426 => Some("Upgrade (RFC 9110 §15.5.22)"),
            _ => None,
        };
        if let Some(field) = required {
            return Err(ConfigError::invalid(
                format!("{at}.status"),
                format!(
                    "a {} answer must carry {field}, which a fallback cannot send; choose another status",
                    self.status
                ),
            ));
        }
        // RFC 9110 §15.3.5, §15.3.6, §15.4.5: these answers carry no content.
        if matches!(self.status, 204 | 205 | 304) && !self.body.is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}.body"),
                format!(
                    "a {} answer carries no content: leave the body out",
                    self.status
                ),
            ));
        }
        if http::HeaderValue::from_str(&self.content_type).is_err() {
            return Err(ConfigError::invalid(
                format!("{at}.content_type"),
                "must be a valid header value",
            ));
        }
        // `type/subtype`, then parameters: RFC 9110 §8.3.1.
        let essence = self.content_type.split(';').next().unwrap_or("").trim();
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        if !essence
            .split_once('/')
            .is_some_and(|(kind, sub)| token(kind) && token(sub))
        {
            return Err(ConfigError::invalid(
                format!("{at}.content_type"),
                format!(
                    "{:?} is not a media type (`type/subtype`, such as \"text/plain\")",
                    self.content_type
                ),
            ));
        }
        let essence = essence.to_ascii_lowercase();
        let json = essence == "application/json" || essence.ends_with("+json");
        if json
            && !self.body.is_empty()
            && serde_json::from_str::<serde::de::IgnoredAny>(&self.body).is_err()
        {
            return Err(ConfigError::invalid(
                format!("{at}.body"),
                format!(
                    "is not JSON, but the content type is {} (application/json is the \
                     default): write JSON, or set content_type (\"text/plain\")",
                    self.content_type
                ),
            ));
        }
        Ok(())
    }
}

fn default_fallback_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "application/json".to_owned()
}

/// `[routes.rate_limit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimitSettings {
    /// One bucket for the whole route.
    pub global: Option<LimitSettings>,
    /// One bucket per client.
    pub per_client: Option<ClientLimitSettings>,
    /// Sends no `RateLimit-Policy` / `RateLimit` headers (default false), as Kong's
    /// `hide_client_headers`: clients cannot read the limits; refusals still carry
    /// `Retry-After`.
    #[serde(default)]
    pub hide_client_headers: bool,
}

/// A token bucket: `per_second` tokens a second, at most `burst` at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitSettings {
    /// The refill rate, at least 1.
    pub per_second: u32,
    /// The bucket size (default: `per_second`).
    pub burst: Option<u32>,
    /// `"local"` (the default) or `"redis"` (shared through `[redis]`).
    #[serde(default)]
    pub policy: LimitPolicy,
}

/// A token bucket per client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientLimitSettings {
    /// The refill rate, at least 1.
    pub per_second: u32,
    /// The bucket size (default: `per_second`).
    pub burst: Option<u32>,
    /// How clients are told apart: `"ip"` (the client's address: the peer's, or the one
    /// a trusted proxy reports) or `"header:<name>"` (for example `"header:x-api-key"`;
    /// not the request id header, nor `traceparent` with `trace_context` on, which the
    /// gateway makes for requests without one). Header values longer than 64 bytes are kept as a 128-bit keyed digest, so a key
    /// costs the same memory whatever its length.
    #[serde(default)]
    pub key: ClientKey,
    /// With a `header:` key, what a request without the header (or with a value that is
    /// not visible ASCII) gets: `"ip"` (the default, as Kong does) limits it by the
    /// client's address instead; `"reject"` answers `400`; `"allow"` lets it through
    /// without a per-client limit. With `key = "ip"` anything but `"ip"` is refused, as
    /// there is no header to miss.
    #[serde(default)]
    pub on_missing: OnMissing,
    /// `"local"` (the default) or `"redis"` (shared through `[redis]`).
    #[serde(default)]
    pub policy: LimitPolicy,
}

/// `on_missing = "..."`: requests without the key header of a per-client limit (or with
/// an empty value; one with the header twice is refused, `400`, whatever this says).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Limited by the client's address.
    #[default]
    Ip,
    /// Answered `400 Bad Request`.
    Reject,
    /// Limited together, in one bucket of the per-client quota shared by every request
    /// without the header.
    Shared,
    /// Not limited per client.
    Allow,
}

/// How a per-client limit tells clients apart: `key = "ip"` or `"header:<name>"`, parsed
/// when the configuration is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClientKey {
    /// The client's IP address (the peer's, or what a trusted proxy reports).
    #[default]
    Ip,
    /// A request header's value.
    Header(http::HeaderName),
}

impl std::str::FromStr for ClientKey {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, String> {
        if key == "ip" {
            return Ok(Self::Ip);
        }
        match key.strip_prefix("header:") {
            Some(name) => http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("`{name}` is not a valid header name")),
            None => Err(format!("must be \"ip\" or \"header:<name>\", not `{key}`")),
        }
    }
}

impl fmt::Display for ClientKey {
    /// As written in the configuration: `ip` or `header:<name>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip => f.write_str("ip"),
            Self::Header(name) => write!(f, "header:{name}"),
        }
    }
}

impl<'de> Deserialize<'de> for ClientKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: String| serde::de::Error::custom(format!("key: {e}")))
    }
}

/// `[routes.balance]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BalanceSettings {
    /// How endpoints are picked (default `least-requests`).
    #[serde(default)]
    pub strategy: StrategyName,
    /// Ejection of failing endpoints.
    pub outlier: Option<OutlierSettings>,
}

/// `strategy = "..."`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// Power of two choices on outstanding requests.
    #[default]
    LeastRequests,
    /// Power of two choices on peak-EWMA latency.
    PeakEwma,
    /// Smooth weighted round robin.
    RoundRobin,
}

/// `outlier = { ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OutlierSettings {
    /// Failures in a row that eject an endpoint (default 5).
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// The first ejection's length, growing with each one (default 30s).
    #[serde(default = "default_base_ejection", deserialize_with = "duration")]
    pub base_ejection: Duration,
    /// The largest share of endpoints ejected at once: a fraction in `[0, 1]`, or a
    /// percentage written as a string (`"50%"`). Default 0.5.
    #[serde(default = "default_max_ejected", deserialize_with = "fraction")]
    pub max_ejected: f64,
}

fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejected() -> f64 {
    0.5
}

/// `[[services]]`: a statically listed service.
///
/// Every entry is checked when the configuration loads, whether a route names it or not:
/// its `[services.tls]` client is made as a route's would be (the `ca_file` read, the
/// `server_name` parsed), so an entry staged for a route to come is refused now, with the
/// error it would get then. An entry no route names is no error (it may be staged, or
/// left behind by a route removed): [`Gateway::build`](super::Gateway::build) builds
/// nothing for it and logs a warning (feature `tracing`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The name routes refer to.
    pub name: String,
    /// Its instances, as `ip:port`. Empty (or left out): the instances come from the
    /// gateway's discovery source, spoken to with this entry's `protocol` and `tls`.
    #[serde(default)]
    pub instances: Vec<SocketAddr>,
    /// How its instances are spoken to (default `"http1"`).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// `[services.tls]`: connect to its instances over TLS (feature `tls`), verifying
    /// their certificates. Absent: cleartext.
    #[serde(default)]
    pub tls: Option<UpstreamTlsSettings>,
}

/// How a service's instances are spoken to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UpstreamProtocol {
    /// HTTP/1.1, a pool of keep-alive connections per endpoint (the default).
    #[default]
    Http1,
    /// HTTP/2: its requests multiplexed on one connection per endpoint (and per thread
    /// of [`Gateway::spawn_threads`](super::Gateway::spawn_threads)), over TLS with ALPN
    /// `h2`, or cleartext with prior knowledge (h2c). Needed for gRPC upstreams.
    H2,
}

/// `[services.tls]`: TLS to a service's instances. Certificates are always verified.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UpstreamTlsSettings {
    /// The name sent by SNI and verified in the instances' certificates (default: each
    /// instance's host: a DNS name, or an IP address, verified against the certificate's
    /// IP addresses and sent without SNI).
    pub server_name: Option<String>,
    /// Trust the CA certificates in this PEM file instead of the Mozilla roots that
    /// webpki-roots ships.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Durations as in Go and Consul: `500ms`, `2s`, `1m30s`.
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A share: a number (a fraction, checked against its range later) or a string holding a
/// percentage (`"50%"`), so that a configuration can say either without ambiguity.
fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Share {
        Number(f64),
        Text(String),
    }
    match Share::deserialize(d) {
        Ok(Share::Number(v)) => Ok(v),
        Ok(Share::Text(s)) => s
            .trim()
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<f64>().ok())
            .filter(|p| p.is_finite())
            .map(|p| p / 100.0)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?}: expected a fraction such as 0.5 or a percentage such as \"50%\""
                ))
            }),
        Err(_) => Err(serde::de::Error::custom(
            "expected a fraction such as 0.5 or a percentage such as \"50%\"",
        )),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    crate::go_duration::parse_go_duration(&s).map_err(serde::de::Error::custom)
}

impl GatewayConfig {
    /// Reads and validates a configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first bad field.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        // Without the `toml` crate's excerpt of the source, which could show a secret.
        let config: Self = toml::from_str(text)
            .map_err(|e| ConfigError::parse(super::secret::parse_error(text, &e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a configuration file.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] if the file cannot be read or is invalid.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::io(path.display().to_string(), source))?;
        Self::from_toml_str(&text)
    }

    /// Checks every value (done by the constructors; call it again after changing fields).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.gateway.validate()?;
        for (i, net) in self.gateway.trusted_proxies.iter().enumerate() {
            crate::rate_limit::http::parse_net(net).map_err(|e| {
                ConfigError::invalid(format!("gateway.trusted_proxies[{i}]"), e.to_string())
            })?;
        }
        // The prefix checked as `trusted_proxies` checks it, without making (and logging
        // about) the trust itself: the server does that once.
        crate::rate_limit::http::ClientIp::peer()
            .ipv6_prefix(self.gateway.client_ipv6_prefix)
            .map_err(|e| {
                ConfigError::invalid("gateway.client_ipv6_prefix", e.reason().to_owned())
            })?;
        if let Some(jwt) = &self.auth.jwt {
            jwt.resolve_secret()?;
            for (field, value) in [("issuer", &jwt.issuer), ("audience", &jwt.audience)] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        format!("auth.jwt.{field}"),
                        format!("must not be empty (leave it out to accept any {field})"),
                    ));
                }
                // Compared exactly: ` https://issuer.example` (a template's stray space)
                // would refuse every token.
                if value.as_deref().is_some_and(|v| v.trim() != v) {
                    return Err(ConfigError::invalid(
                        format!("auth.jwt.{field}"),
                        "must not start or end with whitespace (claims are compared exactly)",
                    ));
                }
            }
            check_duration("auth.jwt.leeway", jwt.leeway, true)?;
        }
        self.admin.resolve_token()?;
        if let Some(listen) = self.admin.listen {
            if listen == self.gateway.listen && listen.port() != 0 {
                return Err(ConfigError::invalid(
                    "admin.listen",
                    "must differ from gateway.listen (set admin.on_proxy_listener = true to \
                     serve both on one port)",
                ));
            }
        }
        if let Some(redis) = &self.redis {
            redis.validate()?;
        }
        if self.routes.is_empty() {
            return Err(ConfigError::invalid(
                "routes",
                "at least one [[routes]] entry is needed",
            ));
        }
        let mut services = HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if service.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    "must not be empty",
                ));
            }
            if !services.insert(service.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!("duplicate service `{}`", service.name),
                ));
            }
            if service.tls.is_some() && !cfg!(feature = "tls") {
                return Err(ConfigError::invalid(
                    format!("{at}.tls"),
                    "TLS to upstreams needs seawall's `tls` feature",
                ));
            }
            // Its TLS client is made as a route's would be (the CA file read, the server
            // name parsed), whether or not a route uses it yet: an entry staged for later
            // is refused now, not when the route that needs it is added.
            #[cfg(feature = "tls")]
            if let Some(tls) = &service.tls {
                super::upstream_tls::UpstreamTls::new(
                    tls,
                    &service.name,
                    service.protocol == UpstreamProtocol::H2,
                )?;
            }
            let mut instances = HashSet::new();
            for (j, addr) in service.instances.iter().enumerate() {
                if addr.port() == 0 {
                    return Err(ConfigError::invalid(
                        format!("{at}.instances[{j}]"),
                        "port 0 is not an address to connect to",
                    ));
                }
                if addr.ip().is_unspecified() || addr.ip().is_multicast() {
                    return Err(ConfigError::invalid(
                        format!("{at}.instances[{j}]"),
                        format!(
                            "{} is not an address to connect to (a listen address? Linux \
                             connects 0.0.0.0 to this host)",
                            addr.ip()
                        ),
                    ));
                }
                if !instances.insert(addr) {
                    return Err(ConfigError::invalid(
                        format!("{at}.instances[{j}]"),
                        format!("duplicate instance {addr}"),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if route.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    "must not be empty",
                ));
            }
            if !names.insert(route.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!("duplicate route name `{}`", route.name),
                ));
            }
            let prefix = &route.path_prefix;
            super::path::check_prefix(prefix)
                .map_err(|reason| ConfigError::invalid(format!("{at}.path_prefix"), reason))?;
            if self.admin.on_proxy_listener {
                let normal = normalize_prefix(prefix);
                let admin = [
                    super::server::METRICS_PATH,
                    super::server::STATUS_PATH,
                    super::server::STATUS_PAGE_PATH,
                ]
                .into_iter()
                .find(|admin| super::path::under_prefix(normal, admin));
                if let Some(admin) = admin {
                    return Err(ConfigError::invalid(
                        format!("{at}.path_prefix"),
                        format!(
                            "`{prefix}` lies under the admin path `{admin}`, which \
                             admin.on_proxy_listener answers first"
                        ),
                    ));
                }
            }
            if !prefixes.insert(normalize_prefix(prefix)) {
                return Err(ConfigError::invalid(
                    format!("{at}.path_prefix"),
                    format!("duplicate prefix `{prefix}`"),
                ));
            }
            if route.service.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.service"),
                    "must not be empty",
                ));
            }
            check_duration(&format!("{at}.timeout"), route.timeout, false)?;
            if let Some(d) = route.body_timeout {
                check_duration(&format!("{at}.body_timeout"), d, false)?;
            }
            if route.auth && self.auth.jwt.is_none() {
                return Err(ConfigError::invalid(
                    format!("{at}.auth"),
                    "needs an [auth.jwt] section",
                ));
            }
            if let Some(b) = &route.breaker {
                let at = format!("{at}.breaker");
                let r = b.failure_rate;
                if !(r.is_finite() && r > 0.0 && r <= 1.0) {
                    return Err(ConfigError::invalid(
                        format!("{at}.failure_rate"),
                        crate::util::not_a_fraction(r, "(0, 1]"),
                    ));
                }
                if b.window == 0 {
                    return Err(ConfigError::invalid(
                        format!("{at}.window"),
                        "must be at least 1",
                    ));
                }
                if b.minimum_calls == 0 {
                    return Err(ConfigError::invalid(
                        format!("{at}.minimum_calls"),
                        "must be at least 1",
                    ));
                }
                if b.minimum_calls > b.window {
                    return Err(ConfigError::invalid(
                        format!("{at}.minimum_calls"),
                        format!(
                            "{} is more calls than the window ({}) holds: at most the window",
                            b.minimum_calls, b.window
                        ),
                    ));
                }
                if b.permitted_in_half_open == 0 {
                    return Err(ConfigError::invalid(
                        format!("{at}.permitted_in_half_open"),
                        "must be at least 1",
                    ));
                }
                check_duration(&format!("{at}.wait_in_open"), b.wait_in_open, false)?;
            }
            if let Some(f) = &route.fallback {
                f.validate(&format!("{at}.fallback"))?;
            }
            if let Some(c) = &route.rate_limit.per_client {
                if c.key == ClientKey::Ip && c.on_missing != OnMissing::Ip {
                    return Err(ConfigError::invalid(
                        format!("{at}.rate_limit.per_client.on_missing"),
                        "applies to a `key = \"header:<name>\"` only (requests without the \
                         header); this limit is keyed by IP",
                    ));
                }
                // A header the gateway writes itself for every request without a valid
                // one: keyed on it, each such request is a client of its own, and
                // `on_missing` never applies (a client sending none is never limited).
                if let ClientKey::Header(name) = &c.key {
                    let request_id =
                        super::trace::request_id_header(&self.gateway.request_id_header)
                            .ok()
                            .flatten();
                    let made = if request_id.as_ref() == Some(name) {
                        Some(
                            "the request id header, which the gateway makes for each request without one",
                        )
                    } else if self.gateway.trace_context && name == "traceparent" {
                        Some(
                            "`traceparent`, which the gateway makes for each request (`trace_context`)",
                        )
                    } else {
                        None
                    };
                    if let Some(made) = made {
                        return Err(ConfigError::invalid(
                            format!("{at}.rate_limit.per_client.key"),
                            format!(
                                "must not be {made}: every request without a valid one would be \
                                 a client of its own, never limited"
                            ),
                        ));
                    }
                }
            }
            if let Some(o) = &route.balance.outlier {
                let at = format!("{at}.balance.outlier");
                if o.consecutive_failures == 0 {
                    return Err(ConfigError::invalid(
                        format!("{at}.consecutive_failures"),
                        "must be at least 1",
                    ));
                }
                let m = o.max_ejected;
                if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
                    return Err(ConfigError::invalid(
                        format!("{at}.max_ejected"),
                        crate::util::not_a_fraction(m, "[0, 1]"),
                    ));
                }
                check_duration(&format!("{at}.base_ejection"), o.base_ejection, false)?;
            }
            // The values the gateway builds with, converted here once: what fails to
            // convert is refused at load.
            self.route_plan(i)?;
        }
        Ok(())
    }

    /// Route `i`'s limits, breaker and outlier detection in the types the gateway builds
    /// with. The one place they are converted: validation runs it (so every value the
    /// build would refuse is refused at load, naming its field), and the build uses what
    /// it returns.
    pub(crate) fn route_plan(&self, i: usize) -> Result<RoutePlan, ConfigError> {
        let route = &self.routes[i];
        let at = format!("routes[{i}]");
        let mut plan = RoutePlan {
            redis: self.redis.clone(),
            ..RoutePlan::default()
        };
        if let Some(g) = &route.rate_limit.global {
            let at = format!("{at}.rate_limit.global");
            let quota = limit_quota(&at, g.per_second, g.burst)?;
            self.check_policy(&at, g.policy)?;
            self.check_redis_quota(&at, g.policy, quota)?;
            plan.global = Some(quota);
        }
        if let Some(c) = &route.rate_limit.per_client {
            let at = format!("{at}.rate_limit.per_client");
            let quota = limit_quota(&at, c.per_second, c.burst)?;
            self.check_policy(&at, c.policy)?;
            self.check_redis_quota(&at, c.policy, quota)?;
            plan.per_client = Some(quota);
        }
        let policies = [
            route.rate_limit.global.as_ref().map(|g| g.policy),
            route.rate_limit.per_client.as_ref().map(|c| c.policy),
        ];
        if policies.contains(&Some(LimitPolicy::Redis)) {
            // The route's name is part of its Redis keys (`<prefix>:<route>:…`).
            no_hash_tag(&format!("{at}.name"), &route.name)?;
        }
        if let Some(b) = &route.breaker {
            plan.breaker = Some(
                breaker_config(&route.name, b)
                    .map_err(|e| ConfigError::invalid(format!("{at}.breaker"), e.to_string()))?,
            );
        }
        if let Some(o) = &route.balance.outlier {
            plan.outlier = Some(outlier_detection(o).map_err(|e| {
                ConfigError::invalid(format!("{at}.balance.outlier"), e.to_string())
            })?);
        }
        Ok(plan)
    }

    /// A limit's `policy = "redis"` needs a `[redis]` section, and the `redis` feature.
    fn check_policy(&self, at: &str, policy: LimitPolicy) -> Result<(), ConfigError> {
        if policy != LimitPolicy::Redis {
            return Ok(());
        }
        if !cfg!(feature = "redis") {
            return Err(ConfigError::invalid(
                format!("{at}.policy"),
                "\"redis\" needs seawall's `redis` feature, which this build lacks",
            ));
        }
        if self.redis.is_none() {
            return Err(ConfigError::invalid(
                format!("{at}.policy"),
                "\"redis\" needs a [redis] section saying where Redis is",
            ));
        }
        Ok(())
    }

    /// A limit in Redis with `quota`, as the Redis limiter's builder will check it: at
    /// most one token a microsecond (the script's unit), and, failing open, a local share
    /// that makes a quota.
    fn check_redis_quota(
        &self,
        at: &str,
        policy: LimitPolicy,
        quota: crate::rate_limit::Quota,
    ) -> Result<(), ConfigError> {
        if policy != LimitPolicy::Redis {
            return Ok(());
        }
        if quota.interval() < Duration::from_micros(1) {
            return Err(ConfigError::invalid(
                format!("{at}.per_second"),
                "at most 1000000 with policy = \"redis\" (one token a microsecond in Redis)",
            ));
        }
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            if redis.failure == RedisFailure::Open {
                super::shared_limit::local_share(quota, redis.local_share).map_err(|e| {
                    ConfigError::invalid("redis.local_share", format!("for {at}: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// Checks that every route's service is listed in `[[services]]`, for gateways
    /// without a discovery source.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first route with an unknown service.
    pub fn check_static_services(&self) -> Result<(), ConfigError> {
        for (i, route) in self.routes.iter().enumerate() {
            if self
                .service(&route.service)
                .is_none_or(|s| s.instances.is_empty())
            {
                return Err(ConfigError::invalid(
                    format!("routes[{i}].service"),
                    format!(
                        "unknown service `{}` (no instances in [[services]] and no \
                         discovery source)",
                        route.service
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[gateway] trusted_proxies`, parsed.
    pub(crate) fn trusted_proxies(&self) -> Result<crate::rate_limit::http::ClientIp, ConfigError> {
        crate::rate_limit::http::ClientIp::trusting(&self.gateway.trusted_proxies)
            .map_err(|e| ConfigError::invalid("gateway.trusted_proxies", e.to_string()))?
            .ipv6_prefix(self.gateway.client_ipv6_prefix)
            .map_err(|e| ConfigError::invalid("gateway.client_ipv6_prefix", e.reason().to_owned()))
    }

    /// The statically listed service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl RedisSettings {
    /// `[redis.tls]` read and checked: the files read, their certificates and key parsed
    /// and put together as rustls would on each connection, errors naming the file's
    /// setting. `None` without a `[redis.tls]`.
    #[cfg(feature = "redis-tls")]
    pub(crate) fn tls_config(
        &self,
    ) -> Result<Option<crate::rate_limit::redis::RedisTls>, ConfigError> {
        let Some(settings) = &self.tls else {
            return Ok(None);
        };
        let read = |field: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                ConfigError::invalid(
                    format!("redis.tls.{field}"),
                    format!("{}: {e}", path.display()),
                )
            })
        };
        let mut tls = crate::rate_limit::redis::RedisTls::new();
        if let Some(path) = &settings.ca_file {
            tls = tls.ca_pem(read("ca_file", path)?);
        }
        match (&settings.cert_file, &settings.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.client_certificate(read("cert_file", cert)?, read("key_file", key)?);
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "redis.tls.key_file",
                    "missing: `cert_file` needs the key it was issued for",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "redis.tls.cert_file",
                    "missing: `key_file` is the key of a client certificate",
                ));
            }
        }
        tls.certificates().map_err(|e| {
            let (field, path) = match e.field() {
                "tls.ca" => ("ca_file", &settings.ca_file),
                "tls.client_certificate" => ("cert_file", &settings.cert_file),
                _ => ("key_file", &settings.key_file),
            };
            let file = path.as_deref().map(|p| p.display().to_string());
            ConfigError::invalid(
                format!("redis.tls.{field}"),
                format!("{}: {}", file.unwrap_or_default(), e.reason()),
            )
        })?;
        Ok(Some(tls))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.url, self.nodes.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::invalid(
                    "redis.nodes",
                    "give either `url` (one server) or `nodes` (a cluster), not both",
                ));
            }
            (None, true) => {
                return Err(ConfigError::invalid(
                    "redis.url",
                    "missing: where Redis is (`url`), or a cluster's seed nodes (`nodes`)",
                ));
            }
            _ => {}
        }
        let mut secure = None;
        for (i, url) in self.url.iter().chain(&self.nodes).enumerate() {
            let at = if self.url.is_some() {
                "redis.url".to_owned()
            } else {
                format!("redis.nodes[{i}]")
            };
            if !redis_url(url) {
                return Err(ConfigError::invalid(
                    at,
                    "not a Redis URL (`redis://host:port/`, `rediss://host:port/` or \
                     `redis+unix://…`)",
                ));
            }
            let crate::util::RedisUrlTls {
                secure: tls,
                fragment,
            } = crate::util::RedisUrlTls::of(url);
            if tls && !cfg!(feature = "redis-tls") {
                return Err(ConfigError::invalid(
                    at,
                    "a `rediss://` URL (TLS to Redis) needs seawall's `redis-tls` feature, \
                     which this build lacks",
                ));
            }
            if tls && fragment {
                return Err(ConfigError::invalid(
                    at,
                    "a TLS URL's `#` fragment (`#insecure`) would accept any certificate: \
                     not supported (give the CA that signed the server's certificate in \
                     [redis.tls] ca_file)",
                ));
            }
            if *secure.get_or_insert(tls) != tls {
                return Err(ConfigError::invalid(
                    at,
                    "the nodes mix `redis://` and `rediss://`: one cluster, one scheme",
                ));
            }
            // Parsed as the limiter's client will parse it (host, port, database,
            // credentials), without connecting.
            #[cfg(feature = "redis")]
            redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| ConfigError::invalid(at, e.to_string()))?;
        }
        // What a cluster client refuses of its seed nodes together (a Unix socket, nodes
        // with different credentials), refused here, as building one would.
        #[cfg(feature = "redis")]
        if !self.nodes.is_empty() {
            redis::cluster::ClusterClient::builder(self.nodes.clone())
                .build()
                .map_err(|e| ConfigError::invalid("redis.nodes", e.to_string()))?;
        }
        if self.tls.is_some() && secure != Some(true) {
            return Err(ConfigError::invalid(
                "redis.tls",
                "TLS settings need a `rediss://` URL: this one connects in plain text",
            ));
        }
        #[cfg(feature = "redis-tls")]
        self.tls_config()?;
        if self.prefix.is_empty() {
            return Err(ConfigError::invalid("redis.prefix", "must not be empty"));
        }
        no_hash_tag("redis.prefix", &self.prefix)?;
        check_duration("redis.timeout", self.timeout, false)?;
        let share = self.local_share;
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(ConfigError::invalid(
                "redis.local_share",
                crate::util::not_a_fraction(share, "(0, 1]"),
            ));
        }
        if self.batch == 0 {
            return Err(ConfigError::invalid(
                "redis.batch",
                "must be at least 1 (1: no tokens taken ahead)",
            ));
        }
        check_duration("redis.batch_max_age", self.batch_max_age, false)?;
        Ok(())
    }
}

/// Refuses `{` and `}` in `value`, a part of every Redis key of a limit: a Redis Cluster
/// hashes only what lies between the first `{` of a key and the next `}`, so a brace
/// there would make it every bucket's hash tag, all of them on one slot (one master).
fn no_hash_tag(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.contains(['{', '}']) {
        return Err(ConfigError::invalid(
            field.to_owned(),
            format!(
                "`{value}` holds `{{` or `}}`, which would put every Redis bucket on one \
                 cluster slot (a Redis Cluster hashes only what lies between the first `{{` \
                 of a key and the next `}}`)"
            ),
        ));
    }
    Ok(())
}

/// Whether `url` reads as a Redis URL (the `redis` crate has the last word when it
/// connects; this catches a host:port without a scheme at load).
fn redis_url(url: &str) -> bool {
    ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| url.len() > scheme.len() && url.starts_with(scheme))
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_duration("gateway.send_timeout", self.send_timeout, false)?;
        if self.max_header_line == 0 {
            return Err(ConfigError::invalid(
                "gateway.max_header_line",
                "must be at least 1",
            ));
        }
        if self.max_headers_size < MIN_HEADERS_SIZE {
            return Err(ConfigError::invalid(
                "gateway.max_headers_size",
                "must be at least 8192 (8 KiB)",
            ));
        }
        if self.max_headers_size > MAX_HEADERS_SIZE {
            return Err(ConfigError::invalid(
                "gateway.max_headers_size",
                "must be at most 1048576 (1 MiB)",
            ));
        }
        if self.max_header_line > self.max_headers_size {
            return Err(ConfigError::invalid(
                "gateway.max_header_line",
                "must be at most max_headers_size",
            ));
        }
        super::trace::request_id_header(&self.request_id_header)
            .map_err(|reason| ConfigError::invalid("gateway.request_id_header", reason))?;
        self.http2.validate()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        Ok(())
    }
}

/// HTTP/2's bounds on a flow-control window (RFC 9113 §6.9.2).
const WINDOWS: std::ops::RangeInclusive<u32> = 65_535..=(1 << 31) - 1;

impl Http2Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                "gateway.http2.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if self.max_header_list_size.is_some_and(|n| n < 1024) {
            return Err(ConfigError::invalid(
                "gateway.http2.max_header_list_size",
                "must be at least 1024",
            ));
        }
        if self
            .max_header_list_size
            .is_some_and(|n| n as usize > MAX_HEADERS_SIZE)
        {
            return Err(ConfigError::invalid(
                "gateway.http2.max_header_list_size",
                "must be at most 1048576 (1 MiB), as max_headers_size",
            ));
        }
        for (field, window) in [
            (
                "gateway.http2.initial_stream_window",
                self.initial_stream_window,
            ),
            (
                "gateway.http2.initial_connection_window",
                self.initial_connection_window,
            ),
        ] {
            if !WINDOWS.contains(&window) {
                return Err(ConfigError::invalid(
                    field,
                    "must be from 65535 to 2147483647 (HTTP/2's bounds)",
                ));
            }
        }
        if let Some(interval) = self.keep_alive_interval {
            if interval.is_zero() {
                return Err(ConfigError::invalid(
                    "gateway.http2.keep_alive_interval",
                    "must be more than zero (leave it out to send no PING)",
                ));
            }
            check_duration("gateway.http2.keep_alive_interval", interval, false)?;
        }
        check_duration(
            "gateway.http2.keep_alive_timeout",
            self.keep_alive_timeout,
            false,
        )
    }
}

impl TlsSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !cfg!(feature = "tls") {
            return Err(ConfigError::invalid(
                "gateway.tls",
                "TLS needs seawall's `tls` feature",
            ));
        }
        if self.certificates.is_empty() {
            return Err(ConfigError::invalid(
                "gateway.tls.certificates",
                "at least one [[gateway.tls.certificates]] entry is needed",
            ));
        }
        check_duration(
            "gateway.tls.handshake_timeout",
            self.handshake_timeout,
            false,
        )?;
        check_duration("gateway.tls.reload_every", self.reload_every, true)?;
        if self.alpn.is_empty() {
            return Err(ConfigError::invalid(
                "gateway.tls.alpn",
                "at least one of \"h2\" and \"http/1.1\"",
            ));
        }
        for (i, protocol) in self.alpn.iter().enumerate() {
            if protocol != "h2" && protocol != "http/1.1" {
                return Err(ConfigError::invalid(
                    format!("gateway.tls.alpn[{i}]"),
                    format!("{protocol:?}: only \"h2\" and \"http/1.1\" are served"),
                ));
            }
        }
        for (i, cert) in self.certificates.iter().enumerate() {
            for name in &cert.server_names {
                let bare = name.strip_prefix("*.").unwrap_or(name);
                if !is_dns_name(bare) {
                    return Err(ConfigError::invalid(
                        format!("gateway.tls.certificates[{i}].server_names"),
                        format!("{name:?} is not a host name (or `*.` and one)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `name` is a DNS name as a client's SNI carries it (RFC 6066 §3: no port, no
/// path, no trailing dot, no IP address): labels of 1 to 63 letters, digits, `-` (not
/// first or last) and `_` (which rustls takes, as many internal names have them), 253
/// bytes at most, the last not all digits. A name that is not one can never be matched,
/// and its certificate would never be chosen.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
}

/// `/a/` and `/a` are the same prefix.
pub(crate) fn normalize_prefix(prefix: &str) -> &str {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }
}

fn check_duration(field: &str, d: Duration, zero_ok: bool) -> Result<(), ConfigError> {
    if d.is_zero() && !zero_ok {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "must be more than zero",
        ));
    }
    if !d.is_zero() && d < Duration::from_millis(1) {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "must be at least 1ms",
        ));
    }
    if d > MAX_SETTING {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "must be at most 24h",
        ));
    }
    Ok(())
}

/// A route's settings in the types the gateway builds with: see
/// [`GatewayConfig::route_plan`].
#[derive(Default)]
pub(crate) struct RoutePlan {
    pub(crate) global: Option<crate::rate_limit::Quota>,
    pub(crate) per_client: Option<crate::rate_limit::Quota>,
    pub(crate) breaker: Option<crate::circuit_breaker::CircuitBreakerConfig>,
    pub(crate) outlier: Option<crate::balance::OutlierDetection>,
    /// `[redis]`, for the limits with `policy = "redis"`.
    pub(crate) redis: Option<RedisSettings>,
}

/// A limit's quota: `per_second`, and a `burst` of as many by default.
fn limit_quota(
    at: &str,
    per_second: u32,
    burst: Option<u32>,
) -> Result<crate::rate_limit::Quota, ConfigError> {
    if per_second == 0 {
        return Err(ConfigError::invalid(
            format!("{at}.per_second"),
            "must be at least 1",
        ));
    }
    if burst == Some(0) {
        return Err(ConfigError::invalid(
            format!("{at}.burst"),
            "must be at least 1",
        ));
    }
    // A rate whose refill interval rounds to nothing fails.
    let rate = crate::rate_limit::Rate::per_second(per_second);
    crate::rate_limit::Quota::new(rate, burst.unwrap_or(per_second)).map_err(|e| {
        ConfigError::invalid(format!("{at}.per_second"), format!("cannot be used: {e}"))
    })
}

fn breaker_config(
    route: &str,
    b: &BreakerSettings,
) -> Result<crate::circuit_breaker::CircuitBreakerConfig, ConfigError> {
    crate::circuit_breaker::CircuitBreakerConfig::builder()
        .name(route.to_owned())
        .failure_rate_threshold(b.failure_rate)
        .minimum_calls(b.minimum_calls)
        .sliding_window(crate::circuit_breaker::SlidingWindow::count_based(b.window))
        .wait_in_open(b.wait_in_open)
        .permitted_calls_in_half_open(b.permitted_in_half_open)
        .build()
}

fn outlier_detection(o: &OutlierSettings) -> Result<crate::balance::OutlierDetection, ConfigError> {
    crate::balance::OutlierDetection::builder()
        .consecutive_failures(o.consecutive_failures)
        .base_ejection_time(o.base_ejection)
        .max_ejection_time(o.base_ejection.max(Duration::from_secs(300)))
        .max_ejected(o.max_ejected)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[gateway]
listen = "127.0.0.1:8080"

[auth.jwt]
secret = "0123456789abcdefghijklmnopqrstuv"
issuer = "seawall"

[[services]]
name = "users"
instances = ["127.0.0.1:9001", "127.0.0.1:9002"]

[[routes]]
name = "users"
path_prefix = "/api/users"
service = "users"
strip_prefix = true
timeout = "2s"
auth = true

[routes.breaker]
failure_rate = 0.5
minimum_calls = 5
window = 20
wait_in_open = "5s"
permitted_in_half_open = 2

[routes.fallback]
status = 200
body = '{"users":[]}'

[routes.rate_limit]
global = { per_second = 100, burst = 20 }
per_client = { per_second = 5, key = "header:x-api-key" }

[routes.balance]
strategy = "peak-ewma"
outlier = { consecutive_failures = 3, base_ejection = "10s", max_ejected = "50%" }
"#;

    fn err(text: &str) -> String {
        let e = GatewayConfig::from_toml_str(text).unwrap_err();
        match e.kind() {
            crate::ConfigErrorKind::Invalid => format!("{}: {}", e.field(), e.reason()),
            _ => e.to_string(),
        }
    }

    #[test]
    fn full_example_parses() {
        let c = GatewayConfig::from_toml_str(BASE).unwrap();
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!(r.timeout, Duration::from_secs(2));
        assert_eq!(r.balance.strategy, StrategyName::PeakEwma);
        assert_eq!(
            r.rate_limit.per_client.as_ref().unwrap().key,
            ClientKey::Header(http::HeaderName::from_static("x-api-key"))
        );
        assert_eq!(
            r.fallback.as_ref().unwrap().content_type,
            "application/json"
        );
        c.check_static_services().unwrap();
        assert!(!format!("{:?}", c.auth.jwt).contains("0123456789"));
    }

    #[test]
    fn redis_credentials_stay_out_of_debug_output() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://u:p@h/"), "rediss://***@h/");
        assert_eq!(redact_url("redis://h:6379/"), "redis://h:6379/");
        assert_eq!(redact_url("redis://h/k@v"), "redis://h/k@v");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=0&pass=hunter2&user=ada"),
            "redis+unix:///run/redis.sock?db=0&pass=***&user=***"
        );
        assert_eq!(
            redact_url("redis://:s3cret@h/0?password=p&protocol=resp3"),
            "redis://***@h/0?password=***&protocol=resp3"
        );
        let c = GatewayConfig::from_toml_str(&format!(
            "{BASE}\n[redis]\nurl = \"redis://:s3cret@127.0.0.1:6379/\"\n"
        ))
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("***@127.0.0.1"),
            "{shown}"
        );
    }

    #[test]
    fn values_out_of_range_name_their_field() {
        let e = err(&BASE.replace("per_second = 100", "per_second = 0"));
        assert_eq!(
            e,
            "routes[0].rate_limit.global.per_second: must be at least 1"
        );
        let e = err(&BASE.replace("\"/api/users\"", "\"api/users\""));
        assert_eq!(e, "routes[0].path_prefix: must start with '/'");
        let e = err(&BASE.replace("failure_rate = 0.5", "failure_rate = 50"));
        assert_eq!(
            e,
            "routes[0].breaker.failure_rate: 50 is not a fraction in (0, 1]; for 50 % write 0.5"
        );
        let e = err(&BASE.replace("failure_rate = 0.5", "failure_rate = \"150%\""));
        assert_eq!(
            e,
            "routes[0].breaker.failure_rate: 1.5 is not a fraction in (0, 1]"
        );
        let e = err(&BASE.replace("failure_rate = 0.5", "failure_rate = \"half\""));
        assert!(
            e.contains("a fraction such as 0.5 or a percentage such as \"50%\""),
            "{e}"
        );
        let e = err(&BASE.replace("status = 200", "status = 42"));
        assert_eq!(
            e,
            "routes[0].fallback.status: must be an HTTP status in 200..=599"
        );
        // Parsed as it is read: the error says where.
        let e = err(&BASE.replace("header:x-api-key", "cookie"));
        assert!(
            e.contains("(`per_client`): key: must be \"ip\" or \"header:<name>\""),
            "{e}"
        );
        let e = err(&BASE.replace("timeout = \"2s\"", "timeout = \"0s\""));
        assert_eq!(e, "routes[0].timeout: must be more than zero");
        let e = err(&BASE.replace(
            "timeout = \"2s\"",
            "timeout = \"2s\"\nbody_timeout = \"0s\"",
        ));
        assert_eq!(e, "routes[0].body_timeout: must be more than zero");
        let e = err(&BASE.replace("0123456789abcdefghijklmnopqrstuv", "short"));
        assert_eq!(e, "auth.jwt.secret: must be at least 32 bytes");
        let e = err(&BASE.replace("max_ejected = \"50%\"", "max_ejected = 1.5"));
        assert_eq!(
            e,
            "routes[0].balance.outlier.max_ejected: 1.5 is not a fraction in [0, 1]"
        );
    }

    #[test]
    fn trusted_proxies_and_on_missing() {
        let with = |nets: &str| {
            BASE.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\ntrusted_proxies = {nets}"),
            )
        };
        let c = GatewayConfig::from_toml_str(&with("[\"10.0.0.0/8\", \"::1\"]")).unwrap();
        assert_eq!(c.gateway.trusted_proxies.len(), 2);
        let e = err(&with("[\"10.0.0.0/8\", \"10.0.0.0/33\"]"));
        assert!(
            e.starts_with("gateway.trusted_proxies[1]: invalid trusted proxy"),
            "{e}"
        );
        let c = GatewayConfig::from_toml_str(BASE).unwrap();
        assert!(c.gateway.trusted_proxies.is_empty());
        let limit = c.routes[0].rate_limit.per_client.as_ref().unwrap();
        assert_eq!(limit.on_missing, OnMissing::Ip);
        let c = GatewayConfig::from_toml_str(&BASE.replace(
            "key = \"header:x-api-key\"",
            "key = \"header:x-api-key\", on_missing = \"reject\"",
        ))
        .unwrap();
        let limit = c.routes[0].rate_limit.per_client.as_ref().unwrap();
        assert_eq!(limit.on_missing, OnMissing::Reject);
        let e = err(&BASE.replace(
            "key = \"header:x-api-key\"",
            "key = \"header:x-api-key\", on_missing = \"maybe\"",
        ));
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn second_route_errors_carry_its_index() {
        let second = r#"
[[routes]]
name = "orders"
path_prefix = "/api/orders"
service = "orders"
rate_limit = { global = { per_second = 0 } }
"#;
        let e = err(&format!("{BASE}{second}"));
        assert_eq!(
            e,
            "routes[1].rate_limit.global.per_second: must be at least 1"
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        let dup_name =
            "[[routes]]\nname = \"users\"\npath_prefix = \"/other\"\nservice = \"users\"\n";
        assert_eq!(
            err(&format!("{BASE}{dup_name}")),
            "routes[1].name: duplicate route name `users`"
        );
        let dup_prefix =
            "[[routes]]\nname = \"b\"\npath_prefix = \"/api/users/\"\nservice = \"users\"\n";
        assert_eq!(
            err(&format!("{BASE}{dup_prefix}")),
            "routes[1].path_prefix: duplicate prefix `/api/users/`"
        );
        let dup_service = "[[services]]\nname = \"users\"\ninstances = []\n";
        assert_eq!(
            err(&format!("{BASE}{dup_service}")),
            "services[1].name: duplicate service `users`"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_parse_errors() {
        let e =
            GatewayConfig::from_toml_str(&BASE.replace("strip_prefix", "strip_prefx")).unwrap_err();
        assert_eq!(e.kind(), crate::ConfigErrorKind::Parse);
        assert!(e.to_string().contains("strip_prefx"), "{e}");
        let e = err(&BASE.replace("\"2s\"", "\"2 seconds\""));
        assert!(e.contains("invalid configuration"), "{e}");
        let e = err(&BASE.replace("\"peak-ewma\"", "\"random\""));
        assert!(e.contains("random"), "{e}");
        let e = err(&BASE.replace("\"127.0.0.1:9002\"", "\"nowhere\""));
        assert!(e.contains("invalid"), "{e}");
        assert_eq!(
            GatewayConfig::from_toml_str("[gateway").unwrap_err().kind(),
            crate::ConfigErrorKind::Parse
        );
        assert_eq!(
            GatewayConfig::from_file("/nonexistent/gw.toml")
                .unwrap_err()
                .kind(),
            crate::ConfigErrorKind::Io
        );
    }

    #[test]
    fn client_limits_default_and_are_checked() {
        let c = GatewayConfig::from_toml_str(BASE).unwrap();
        let g = &c.gateway;
        assert_eq!(g.send_timeout, Duration::from_secs(60));
        assert_eq!(g.max_request_body, 1 << 20);
        assert_eq!(
            (g.max_header_line, g.max_headers_size),
            (16 << 10, 64 << 10)
        );
        assert_eq!(c.routes[0].max_request_body, None);
        let with = |line: &str| {
            BASE.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{line}"),
            )
        };
        assert_eq!(
            err(&with("max_headers_size = 2000000")),
            "gateway.max_headers_size: must be at most 1048576 (1 MiB)"
        );
        assert_eq!(
            err(&with("max_header_line = 70000")),
            "gateway.max_header_line: must be at most max_headers_size"
        );
        assert_eq!(
            err(&with("send_timeout = \"48h\"")),
            "gateway.send_timeout: must be at most 24h"
        );
        let c = GatewayConfig::from_toml_str(
            &BASE.replace("timeout = \"2s\"", "timeout = \"2s\"\nmax_request_body = 0"),
        )
        .unwrap();
        assert_eq!(c.routes[0].max_request_body, Some(0));
    }

    #[test]
    fn auth_without_jwt_section_and_unknown_services() {
        let no_jwt = BASE
            .replace("[auth.jwt]", "[unused]")
            .replace("secret =", "# ")
            .replace("issuer =", "# ");
        let no_jwt = no_jwt.replace("[unused]\n", "");
        assert_eq!(err(&no_jwt), "routes[0].auth: needs an [auth.jwt] section");
        let c = GatewayConfig::from_toml_str(
            &BASE.replace("service = \"users\"", "service = \"ghosts\""),
        )
        .unwrap();
        let e = c.check_static_services().unwrap_err();
        assert_eq!(e.field(), "routes[0].service");
        assert!(e.to_string().contains("unknown service `ghosts`"));
    }

    fn jwt_with(line: &str) -> String {
        BASE.replace("secret = \"0123456789abcdefghijklmnopqrstuv\"", line)
    }

    #[test]
    fn the_secret_comes_from_exactly_one_source() {
        let e = err(&jwt_with(
            "secret = \"0123456789abcdefghijklmnopqrstuv\"\nsecret_env = \"X\"",
        ));
        assert_eq!(
            e,
            "auth.jwt.secret: set only one of secret, secret_env or secret_file"
        );
        assert_eq!(
            err(&jwt_with("")),
            "auth.jwt.secret: one of secret, secret_env or secret_file is required"
        );
        assert_eq!(
            err(&jwt_with(
                "secret_env = \"SEAWALL_CONFIG_TEST_SURELY_UNSET_VARIABLE\""
            )),
            "auth.jwt.secret_env: the environment variable \
             `SEAWALL_CONFIG_TEST_SURELY_UNSET_VARIABLE` is not set"
        );
        let dir = std::env::temp_dir().join(format!("seawall-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwt");
        std::fs::write(&file, "a file secret, at least 32 bytes long\r\n").unwrap();
        let c = GatewayConfig::from_toml_str(&jwt_with(&format!(
            "secret_file = \"{}\"",
            file.display()
        )))
        .unwrap();
        let jwt = c.auth.jwt.as_ref().unwrap();
        assert_eq!(
            jwt.resolve_secret().unwrap(),
            "a file secret, at least 32 bytes long"
        );
        assert!(!format!("{jwt:?}").contains("file secret"));
        let e = GatewayConfig::from_toml_str(&jwt_with(&format!(
            "secret_file = \"{}\"",
            dir.display()
        )))
        .unwrap_err();
        assert_eq!(e.field(), "auth.jwt.secret_file");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = GatewayConfig::from_toml_str(&jwt_with(&format!(
            "secret_file = \"{}\"",
            dir.join("missing").display()
        )))
        .unwrap_err();
        assert_eq!(e.field(), "auth.jwt.secret_file");
        std::fs::write(&file, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n").unwrap();
        let e = GatewayConfig::from_toml_str(&jwt_with(&format!(
            "secret_file = \"{}\"",
            file.display()
        )))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid auth.jwt.secret_file: is too weak: fewer than 8 distinct bytes"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn placeholders_and_weak_secrets_are_refused_without_showing_them() {
        let e = err(&jwt_with("secret = \"${GATEWAY_JWT_SECRET}\""));
        assert!(
            e.starts_with("auth.jwt.secret: contains an unresolved placeholder"),
            "{e}"
        );
        assert!(!e.contains("GATEWAY_JWT_SECRET"), "{e}");
        let e = err(&jwt_with("secret = \"prefix-${X}-and-more-bytes\""));
        assert!(e.contains("placeholder"), "{e}");
        for (secret, reason) in [
            (
                "                        ",
                "must not be empty or whitespace",
            ),
            ("", "must not be empty or whitespace"),
            (
                "abababababababababababababababababababab",
                "is too weak: fewer than 8 distinct bytes",
            ),
            (
                "Secret!12Secret!12Secret!12Secret!12",
                "is too weak: one short pattern repeated",
            ),
        ] {
            let e = err(&jwt_with(&format!("secret = \"{secret}\"")));
            assert_eq!(e, format!("auth.jwt.secret: {reason}"));
        }
    }

    #[test]
    fn parse_errors_do_not_show_the_source_line() {
        const SECRET: &str = "hunter2-is-not-a-good-secret-987";
        for line in [
            format!("secret = \"{SECRET}\" trailing"),
            format!("secret = \"{SECRET}"),
            format!("secret = \"{SECRET}\"\nsecret = \"{SECRET}\""),
            format!("secret = \"{SECRET}\"\nsecrett = \"{SECRET}\""),
            format!("secret = '{SECRET}' = 1"),
            format!("secret = \"{SECRET}\\q\""),
            "secret = 98765432109876543".to_owned(),
            format!("secret = [\"{SECRET}\"]"),
            format!("secret = {{ a = \"{SECRET}\" }}"),
        ] {
            let e = GatewayConfig::from_toml_str(&jwt_with(&line)).unwrap_err();
            let shown = e.to_string();
            assert_eq!(e.kind(), crate::ConfigErrorKind::Parse, "{line}: {shown}");
            assert!(!shown.contains(SECRET), "{line}: {shown}");
            assert!(!shown.contains("98765432109876543"), "{line}: {shown}");
            assert!(shown.contains("line "), "{shown}");
        }
        let e = err(&jwt_with("secret = \"0123456789abcdefghijklmnopqrstuv\" x"));
        assert!(
            e.starts_with("invalid configuration: line 6, column"),
            "{e}"
        );
    }

    #[test]
    fn values_building_would_refuse_are_refused_at_load() {
        let e = err(&BASE.replace("per_second = 100", "per_second = 4294967295"));
        assert!(
            e.starts_with("routes[0].rate_limit.global.per_second: cannot be used"),
            "{e}"
        );
        let e = err(&BASE.replace("per_second = 5,", "per_second = 4294967295,"));
        assert!(
            e.starts_with("routes[0].rate_limit.per_client.per_second: cannot be used"),
            "{e}"
        );
        let e = err(&BASE.replace("timeout = \"2s\"", "timeout = \"1ns\""));
        assert_eq!(e, "routes[0].timeout: must be at least 1ms");
        let e = err(&BASE.replace("wait_in_open = \"5s\"", "wait_in_open = \"999us\""));
        assert_eq!(e, "routes[0].breaker.wait_in_open: must be at least 1ms");
        GatewayConfig::from_toml_str(&BASE.replace("timeout = \"2s\"", "timeout = \"1ms\""))
            .unwrap();
    }

    #[test]
    fn instances_must_be_listed_once_with_a_port() {
        // No instances: settings for a discovered service, refused without discovery.
        let discovered = GatewayConfig::from_toml_str(&BASE.replace(
            "instances = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]",
            "instances = []\nprotocol = \"h2\"",
        ))
        .unwrap();
        assert_eq!(discovered.services[0].protocol, super::UpstreamProtocol::H2);
        let e = discovered.check_static_services().unwrap_err().to_string();
        assert!(e.contains("no instances in [[services]]"), "{e}");
        let e = err(&BASE.replace("127.0.0.1:9002", "127.0.0.1:0"));
        assert_eq!(
            e,
            "services[0].instances[1]: port 0 is not an address to connect to"
        );
        let e = err(&BASE.replace("127.0.0.1:9002", "127.0.0.1:9001"));
        assert_eq!(
            e,
            "services[0].instances[1]: duplicate instance 127.0.0.1:9001"
        );
    }

    #[test]
    fn a_config_needs_routes_and_normal_prefixes() {
        let routes = BASE.find("[[routes]]").unwrap();
        assert_eq!(
            err(&BASE[..routes].replace("[auth.jwt]", "[auth]").replace(
                "secret = \"0123456789abcdefghijklmnopqrstuv\"\nissuer = \"seawall\"\n",
                ""
            )),
            "routes: at least one [[routes]] entry is needed"
        );
        for prefix in [
            "/api/../admin",
            "/api/./x",
            "/api//x",
            "/api/%2e%2e",
            "/a\\\\b",
            "/..;/x",
        ] {
            let e = GatewayConfig::from_toml_str(
                &BASE.replace("\"/api/users\"", &format!("\"{prefix}\"")),
            )
            .unwrap_err();
            assert_eq!(e.field(), "routes[0].path_prefix", "{prefix}: {e}");
        }
    }

    #[test]
    fn require_exp_defaults_to_true() {
        let c = GatewayConfig::from_toml_str(BASE).unwrap();
        assert!(c.auth.jwt.as_ref().unwrap().require_exp);
        let c = GatewayConfig::from_toml_str(&BASE.replace(
            "issuer = \"seawall\"",
            "issuer = \"seawall\"\nrequire_exp = false",
        ))
        .unwrap();
        assert!(!c.auth.jwt.as_ref().unwrap().require_exp);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let v = crate::gateway::jwt::JwtVerifier::new(b"0123456789abcdefghijklmnopqrstuv");
        let no_exp = v.sign(&serde_json::json!({ "iss": "seawall" }));
        let strict = crate::gateway::jwt::JwtVerifier::from_config(
            GatewayConfig::from_toml_str(BASE)
                .unwrap()
                .auth
                .jwt
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            strict.verify(&no_exp),
            Err(crate::gateway::jwt::JwtError::MissingExpiry)
        );
        let with_exp = v.sign(&serde_json::json!({ "iss": "seawall", "exp": now + 60 }));
        assert!(strict.verify(&with_exp).is_ok());
        assert!(
            v.verify(&no_exp).is_ok(),
            "JwtVerifier::new does not require exp"
        );
    }

    #[test]
    fn admin_settings() {
        let e = err(&format!(
            "{BASE}\n[admin]\ntoken_env = \"A\"\ntoken_file = \"/b\"\n"
        ));
        assert_eq!(e, "admin.token: set only one of token_env or token_file");
        let e = err(&format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:8080\"\n"));
        assert!(e.starts_with("admin.listen: must differ"), "{e}");
        let c = GatewayConfig::from_toml_str(&format!(
            "{BASE}\n[admin]\nlisten = \"127.0.0.1:9901\"\n"
        ))
        .unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9901".parse().unwrap()));
        assert!(!c.admin.on_proxy_listener);
        assert_eq!(c.admin.resolve_token().unwrap(), None);
    }
}
