//! The HTTP client of the agent's API.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::config::ConsulConfig;
use super::conn::{Exchanges, WatchedConnector, exchanges_of};
use super::error::{ConsulError, MAX_ERROR_BODY};
use super::parse::{self, SkippedEntry};
use super::registration::{CheckStatus, ServiceRegistration};
use crate::ConfigError;
use crate::discovery::Instance;

/// The longest `wait` Consul honours.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The largest answer read, in bytes (a health answer for thousands of instances is a few
/// MiB).
const MAX_BODY: usize = 64 << 20;

/// How long the start of an error answer's body is waited for once its head has come:
/// an agent's error text is a line, sent with the head; the status is the error, and is
/// not held back for a body that stalls.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(1);

/// A client of the Consul agent's HTTP API.
///
/// Cheap to clone: clones share one connection pool. Every request has a time limit: the
/// configured [`request_timeout`](ConsulConfig::request_timeout), plus `wait + wait/16`
/// for blocking queries (the agent adds up to `wait/16` of jitter), so a healthy long poll
/// is never cut.
///
/// An agent closes a keep-alive connection that has been idle for its timeout; a request
/// sent on it in that instant fails with `Connection reset by peer` or an early EOF. Every
/// request this client sends is idempotent (`GET`, `PUT`) with a body it can send again,
/// so, as Go's `net/http` does, one that fails that way (a reused connection, reset or
/// closed after the request was written and before any byte of an answer) is sent once
/// more, on a new connection, within the same time limit; [`retried_stale`] counts them.
/// A request that fails on a new connection, or after part of an answer, is not sent
/// again, nor is a blocking query (its connection was held, not idle: closed unanswered,
/// the agent went away, and the one answering now may not know its index).
///
/// [`retried_stale`]: ConsulClient::retried_stale
///
/// ```no_run
/// use seawall::consul::{ConsulClient, ConsulConfig, HealthQuery};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = ConsulClient::new(ConsulConfig::from_env()?);
/// let healthy = client.health_service(&HealthQuery::new("users").passing(true)).await?;
/// for instance in &healthy.instances {
///     println!("{} at {}", instance.id, instance.authority());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<WatchedConnector, Full<Bytes>>,
    /// For a request sent again after a reused connection failed under it: a client
    /// without a pool, so that it goes on a new connection.
    fresh: Client<WatchedConnector, Full<Bytes>>,
    config: ConsulConfig,
    /// Requests sent again after a reused connection failed under them.
    retried_stale: AtomicU64,
}

/// Which servers may answer a health query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Consistency {
    /// The leader answers (Consul's default).
    #[default]
    Default,
    /// Any server answers: cheaper and available without a leader, possibly lagging (see
    /// [`HealthResponse::last_contact`]).
    Stale,
    /// The leader answers after confirming its leadership: slower, never stale.
    Consistent,
}

/// A query of `GET /v1/health/service/:service`.
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::{Consistency, HealthQuery};
///
/// let query = HealthQuery::new("users")
///     .passing(true)
///     .tag("v1")
///     .filter(r#"Service.Meta.version == "2""#)
///     .consistency(Consistency::Stale)
///     .index(42)
///     .wait(Duration::from_secs(60));
/// assert_eq!(query.service(), "users");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthQuery {
    service: String,
    index: Option<u64>,
    wait: Option<Duration>,
    passing: bool,
    tags: Vec<String>,
    filter: Option<String>,
    datacenter: Option<String>,
    consistency: Consistency,
    near: Option<String>,
    node_meta: Vec<(String, String)>,
}

impl HealthQuery {
    /// A query of `service`'s instances (healthy or not, until [`passing`](Self::passing)).
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            index: None,
            wait: None,
            passing: false,
            tags: Vec::new(),
            filter: None,
            datacenter: None,
            consistency: Consistency::Default,
            near: None,
            node_meta: Vec::new(),
        }
    }

    /// The service queried.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Makes the query blocking: the agent holds it until the result's index exceeds
    /// `index` or the wait elapses. `None` or 0: answer at once.
    #[must_use]
    pub fn index(mut self, index: impl Into<Option<u64>>) -> Self {
        self.index = index.into();
        self
    }

    /// How long a blocking query may be held (the agent's default is 5 minutes; capped at
    /// [`MAX_WAIT`]). Zero is the agent's default, as Consul reads `wait=0s` (the request's
    /// time limit then allows for it; it cut such queries short).
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = (!wait.is_zero()).then(|| wait.min(MAX_WAIT));
        self
    }

    /// Only instances whose checks all pass (`passing`): warning ones are left out too.
    #[must_use]
    pub fn passing(mut self, passing: bool) -> Self {
        self.passing = passing;
        self
    }

    /// Only instances with this tag (repeatable: all must match).
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// A filter expression, such as `Service.Meta.version == "2"`.
    #[must_use]
    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// Queries this datacenter instead of the client's default.
    #[must_use]
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// Which servers may answer.
    #[must_use]
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Sorts by round-trip time from this node (`_agent`: the local agent).
    #[must_use]
    pub fn near(mut self, node: impl Into<String>) -> Self {
        self.near = Some(node.into());
        self
    }

    /// Only instances on nodes with this metadata pair (repeatable).
    #[must_use]
    pub fn node_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_meta.push((key.into(), value.into()));
        self
    }

    /// The blocking wait, if this query blocks.
    pub(crate) fn blocking_wait(&self) -> Option<Duration> {
        match self.index {
            Some(i) if i > 0 => Some(self.wait.unwrap_or(Duration::from_secs(300))),
            _ => None,
        }
    }
}

/// An answer to a [`HealthQuery`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HealthResponse {
    /// `X-Consul-Index`: send it back as [`HealthQuery::index`] to wait for a change.
    pub index: u64,
    /// `X-Consul-KnownLeader`, when present.
    pub known_leader: Option<bool>,
    /// `X-Consul-LastContact`: how long since the answering server heard from the leader,
    /// when present.
    pub last_contact: Option<Duration>,
    /// The instances whose checks pass or warn (none is critical), in the agent's order.
    /// [`Instance::health`](crate::discovery::Instance::health) says which; a warning
    /// instance weighs `Weights.Warning`, and one whose warning weight is 0 is left out.
    pub instances: Vec<Instance>,
    /// The first 16 entries left out because they cannot be dialed (no address, port 0)
    /// or are malformed; [`skipped_count`](Self::skipped_count) counts them all.
    pub skipped: Vec<SkippedEntry>,
    /// How many entries were left out because they cannot be dialed or are malformed
    /// (at least `skipped.len()`).
    pub skipped_count: usize,
    /// Entries left out because a check is critical, or a check warns and the warning
    /// weight is 0.
    pub unhealthy: usize,
    /// The connection the answer came on: whether it has closed since tells the watch
    /// that its next query goes to an agent that may have restarted.
    pub(crate) answered_on: AnsweredOn,
}

/// The connection an answer came on, when the client knows it.
#[derive(Clone, Default)]
pub(crate) struct AnsweredOn(Option<Arc<Exchanges>>);

impl AnsweredOn {
    /// Whether the connection is known to have ended (the agent closed it or it failed):
    /// the next request goes on another one, perhaps to another agent process.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.as_ref().is_some_and(|c| c.is_closed())
    }
}

impl fmt::Debug for AnsweredOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("unknown"),
            Some(_) if self.is_closed() => f.write_str("closed"),
            Some(_) => f.write_str("open"),
        }
    }
}

/// Reads a `GET /v1/health/service/:service` body leniently (see the module docs): the
/// parser the client uses, exposed for fuzzing. Header fields of the result are left at
/// 0 and `None`.
///
/// # Errors
///
/// A decode error when the body is not a JSON array (or `null`).
#[doc(hidden)]
pub fn parse_health_response(bytes: &[u8]) -> Result<HealthResponse, ConsulError> {
    let parsed = parse::parse(bytes)?;
    Ok(HealthResponse {
        index: 0,
        known_leader: None,
        last_contact: None,
        instances: parsed.instances,
        skipped: parsed.skipped,
        skipped_count: parsed.skipped_count,
        unhealthy: parsed.unhealthy,
        answered_on: AnsweredOn::default(),
    })
}

/// Parses a `GET /v1/agent/services` answer: a JSON object of services by ID (`null`:
/// none), sorted by ID. An entry that is not a service object is kept as a service of
/// that ID and nothing else. Each entry is read from the body's text where it lies (no
/// tree of JSON values is built), so a hostile agent's body within the client's cap
/// cannot make it allocate more than a small multiple of the body. Public for the
/// memory tests only.
///
/// # Errors
///
/// A decode error when the body is not a JSON object (or `null`).
#[doc(hidden)]
pub fn parse_agent_services(bytes: &[u8]) -> Result<Vec<AgentService>, ConsulError> {
    let map: Option<BTreeMap<String, &serde_json::value::RawValue>> = serde_json::from_slice(bytes)
        .map_err(|e| ConsulError::decode(format!("agent services are not a JSON object: {e}")))?;
    Ok(map
        .unwrap_or_default()
        .into_iter()
        .map(|(id, raw)| {
            let mut service: AgentService = serde_json::from_str(raw.get()).unwrap_or_default();
            if service.id.is_empty() {
                service.id = id;
            }
            service
        })
        .collect())
}

/// A service registered on the local agent, as `GET /v1/agent/services` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
#[non_exhaustive]
pub struct AgentService {
    /// The service ID.
    #[serde(rename = "ID", deserialize_with = "null_default")]
    pub id: String,
    /// The service name.
    #[serde(deserialize_with = "null_default")]
    pub service: String,
    /// The tags.
    #[serde(deserialize_with = "null_default")]
    pub tags: Vec<String>,
    /// The address ("" when the node's is used).
    #[serde(deserialize_with = "null_default")]
    pub address: String,
    /// The port.
    #[serde(deserialize_with = "null_default")]
    pub port: u16,
    /// The metadata.
    #[serde(deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl ConsulClient {
    /// A client of the agent `config` points at. Connects lazily: building it sends
    /// nothing. Must be used within a tokio runtime.
    pub fn new(config: ConsulConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.request_timeout));
        let connector = WatchedConnector::new(connector, &config);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector.clone());
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                http,
                fresh,
                config,
                retried_stale: AtomicU64::new(0),
            }),
        }
    }

    /// A client configured from the environment ([`ConsulConfig::from_env`]).
    ///
    /// # Errors
    ///
    /// See [`ConsulConfig::from_env`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self::new(ConsulConfig::from_env()?))
    }

    /// The configuration.
    pub fn config(&self) -> &ConsulConfig {
        &self.inner.config
    }

    /// How many requests were sent again because the pooled keep-alive connection they
    /// went out on failed before any byte of an answer came (see [`ConsulClient`]).
    pub fn retried_stale(&self) -> u64 {
        self.inner.retried_stale.load(Ordering::Relaxed)
    }

    /// Registers (or re-registers) a service with the local agent:
    /// `PUT /v1/agent/service/register?replace-existing-checks`, so that checks no longer
    /// in the registration are removed and registering again is idempotent.
    ///
    /// # Errors
    ///
    /// A [`ConsulError`]: transport, timeout, or the agent's status (400 with its reason for
    /// a registration it refuses, 403 for the token).
    pub async fn register(&self, registration: &ServiceRegistration) -> Result<(), ConsulError> {
        let mut query = Query::default();
        query.push("replace-existing-checks", "true");
        let body = Bytes::from(registration.to_json_bytes());
        self.send(
            Method::PUT,
            "/v1/agent/service/register".into(),
            query,
            Some(body),
            None,
        )
        .await
        .map(drop)
    }

    /// Deregisters a service from the local agent (`PUT /v1/agent/service/deregister/:id`).
    /// A service the agent does not know is no error (recent agents answer `404 Unknown
    /// service ID`, older ones 200).
    ///
    /// # Errors
    ///
    /// A [`ConsulError`]: transport, timeout, or the agent's status.
    pub async fn deregister(&self, service_id: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/service/deregister/{}", encode(service_id, false));
        match self
            .send(Method::PUT, path, Query::default(), None, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_unknown_service() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets a TTL check passing (`PUT /v1/agent/check/pass/:id`), with `note` as its
    /// output.
    ///
    /// # Errors
    ///
    /// A [`ConsulError`]; [`ConsulError::is_unknown_check`] when the agent does not know
    /// the check (it lost the registration).
    pub async fn check_pass(&self, check_id: &str, note: Option<&str>) -> Result<(), ConsulError> {
        self.check_mark("pass", check_id, note).await
    }

    /// Sets a TTL check warning (`PUT /v1/agent/check/warn/:id`).
    ///
    /// # Errors
    ///
    /// See [`check_pass`](Self::check_pass).
    pub async fn check_warn(&self, check_id: &str, note: Option<&str>) -> Result<(), ConsulError> {
        self.check_mark("warn", check_id, note).await
    }

    /// Sets a TTL check critical (`PUT /v1/agent/check/fail/:id`).
    ///
    /// # Errors
    ///
    /// See [`check_pass`](Self::check_pass).
    pub async fn check_fail(&self, check_id: &str, note: Option<&str>) -> Result<(), ConsulError> {
        self.check_mark("fail", check_id, note).await
    }

    async fn check_mark(
        &self,
        verb: &str,
        check_id: &str,
        note: Option<&str>,
    ) -> Result<(), ConsulError> {
        let mut query = Query::default();
        if let Some(note) = note {
            query.push("note", note);
        }
        let path = format!("/v1/agent/check/{verb}/{}", encode(check_id, false));
        self.send(Method::PUT, path, query, None, None)
            .await
            .map(drop)
    }

    /// Sets a TTL check's status and output (`PUT /v1/agent/check/update/:id`).
    ///
    /// # Errors
    ///
    /// See [`check_pass`](Self::check_pass).
    pub async fn check_update(
        &self,
        check_id: &str,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), ConsulError> {
        let body = serde_json::json!({ "Status": status.as_str(), "Output": output });
        let path = format!("/v1/agent/check/update/{}", encode(check_id, false));
        self.send(
            Method::PUT,
            path,
            Query::default(),
            Some(Bytes::from(body.to_string())),
            None,
        )
        .await
        .map(drop)
    }

    /// Queries a service's instances with their health (`GET /v1/health/service/:service`),
    /// blocking when the query has an [`index`](HealthQuery::index).
    ///
    /// The answer is read leniently: unknown fields are ignored, null fields are empty,
    /// and entries that cannot be dialed are [skipped](HealthResponse::skipped) rather than
    /// failing the answer.
    ///
    /// # Errors
    ///
    /// A [`ConsulError`]: transport, timeout, the agent's status (`500 No cluster leader`,
    /// 403…), or a decode error for a body that is not a JSON array or a missing
    /// `X-Consul-Index` header.
    pub async fn health_service(&self, query: &HealthQuery) -> Result<HealthResponse, ConsulError> {
        let mut q = Query::default();
        if query.passing {
            q.push("passing", "true");
        }
        if let Some(index) = query.index.filter(|i| *i > 0) {
            q.push("index", &index.to_string());
            if let Some(wait) = query.wait {
                q.push("wait", &crate::go_duration::format_go_duration(wait));
            }
        }
        for tag in &query.tags {
            q.push("tag", tag);
        }
        if let Some(filter) = &query.filter {
            q.push("filter", filter);
        }
        if let Some(dc) = query
            .datacenter
            .as_ref()
            .or(self.inner.config.datacenter.as_ref())
        {
            q.push("dc", dc);
        }
        match query.consistency {
            Consistency::Default => {}
            Consistency::Stale => q.push("stale", ""),
            Consistency::Consistent => q.push("consistent", ""),
        }
        if let Some(near) = &query.near {
            q.push("near", near);
        }
        for (k, v) in &query.node_meta {
            q.push("node-meta", &format!("{k}:{v}"));
        }
        let path = format!("/v1/health/service/{}", encode(&query.service, false));
        let request = format!("GET {path}");
        let (headers, body, answered_on) = self
            .send(Method::GET, path, q, None, query.blocking_wait())
            .await?;
        let with_request = |e: ConsulError| e.with_request(request.clone());
        let index = headers
            .get("x-consul-index")
            .ok_or_else(|| with_request(ConsulError::decode("missing X-Consul-Index header")))?
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| with_request(ConsulError::decode("invalid X-Consul-Index header")))?;
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let known_leader = header("x-consul-knownleader").and_then(|v| v.parse::<bool>().ok());
        let last_contact = header("x-consul-lastcontact")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let mut response = parse_health_response(&body).map_err(with_request)?;
        for instance in &mut response.instances {
            if instance.service.is_empty() {
                instance.service = Arc::from(query.service.as_str());
            }
        }
        response.index = index;
        response.known_leader = known_leader;
        response.last_contact = last_contact;
        response.answered_on = answered_on;
        Ok(response)
    }

    /// The services registered on the local agent (`GET /v1/agent/services`), sorted by ID.
    ///
    /// # Errors
    ///
    /// A [`ConsulError`]: transport, timeout, the agent's status, or a body that is not a
    /// JSON object.
    pub async fn agent_services(&self) -> Result<Vec<AgentService>, ConsulError> {
        let path = "/v1/agent/services".to_owned();
        let (_, body, _) = self
            .send(Method::GET, path, Query::default(), None, None)
            .await?;
        parse_agent_services(&body).map_err(|e| e.with_request("GET /v1/agent/services".into()))
    }

    /// The leader's address (`GET /v1/status/leader`), `None` when there is no leader: a
    /// cheap liveness probe of the agent.
    ///
    /// # Errors
    ///
    /// A [`ConsulError`]: transport, timeout, the agent's status, or a body that is not a
    /// JSON string.
    pub async fn status_leader(&self) -> Result<Option<String>, ConsulError> {
        let path = "/v1/status/leader".to_owned();
        let (_, body, _) = self
            .send(Method::GET, path, Query::default(), None, None)
            .await?;
        let leader: Option<String> = serde_json::from_slice(&body).map_err(|e| {
            ConsulError::decode(format!("leader is not a JSON string: {e}"))
                .with_request("GET /v1/status/leader".into())
        })?;
        Ok(leader.filter(|l| !l.is_empty()))
    }

    /// Sends one request and reads the whole answer, within the time limit: the request
    /// timeout, plus `blocking + blocking/16` for a blocking query. With the answer, the
    /// connection it came on.
    async fn send(
        &self,
        method: Method,
        path: String,
        query: Query,
        body: Option<Bytes>,
        blocking: Option<Duration>,
    ) -> Result<(HeaderMap, Bytes, AnsweredOn), ConsulError> {
        let request_name = format!("{method} {path}");
        let config = &self.inner.config;
        // Saturating: a `request_timeout` of `Duration::MAX` (a caller's "no limit", which
        // the builder accepts) panicked here and in the deadline below.
        let limit = config
            .request_timeout
            .saturating_add(blocking.map_or(Duration::ZERO, |wait| wait + wait / 16));
        let scheme = config.scheme();
        let uri = if query.0.is_empty() {
            format!("{scheme}://{}{path}", config.authority)
        } else {
            format!("{scheme}://{}{path}?{}", config.authority, query.0)
        };
        let idempotent = is_idempotent(&method);
        let content_type = body.is_some();
        let body = body.unwrap_or_default();
        let request = || {
            let mut builder = Request::builder().method(method.clone()).uri(uri.as_str());
            if let Some(token) = &config.token {
                builder = builder.header("x-consul-token", token.clone());
            }
            if content_type {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
            }
            builder
                .body(Full::new(body.clone()))
                .map_err(|e| ConsulError::transport(false, e).with_request(request_name.clone()))
        };
        let first = request()?;
        let deadline = super::later(limit);
        let exchange = async {
            let transport = |e: hyper_util::client::legacy::Error| {
                let connect = e.is_connect();
                ConsulError::transport(connect, e)
            };
            let response = match self.inner.http.request(first).await {
                Ok(response) => response,
                // Not a blocking query: its connection was held by the agent, not idle,
                // and closing unanswered is the agent going away (a restart). The one
                // answering now may have a lower index, and would hold the query for its
                // whole wait: the caller starts over instead (the watch with a full query).
                Err(e) if idempotent && blocking.is_none() && failed_stale(&e) => {
                    // The agent closed the pooled connection as the request went out:
                    // it never answered. Once more, on a new connection.
                    self.inner.retried_stale.fetch_add(1, Ordering::Relaxed);
                    #[cfg(feature = "tracing")]
                    tracing::debug!(
                        request = %request_name,
                        error = ?e,
                        "a reused connection to the agent failed before answering: \
                         the request is sent again on a new connection"
                    );
                    self.inner
                        .fresh
                        .request(request()?)
                        .await
                        .map_err(transport)?
                }
                Err(e) => return Err(transport(e)),
            };
            let (parts, body) = response.into_parts();
            let answered_on = AnsweredOn(parts.extensions.get::<Arc<Exchanges>>().cloned());
            if !parts.status.is_success() {
                // Only the start of an error's body is kept: read no further, nor wait
                // long for it.
                // Within the request's limit (the limit's timer is polled after this).
                let wait = ERROR_BODY_WAIT
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                let start = body_start(body, MAX_ERROR_BODY + 1, wait).await;
                return Err(status_error(parts.status, &start));
            }
            let bytes = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ConsulError::decode(format!("answer over {MAX_BODY} bytes"))
                    } else {
                        ConsulError::transport(false, e)
                    }
                })?
                .to_bytes();
            Ok((parts.headers, bytes, answered_on))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result.map_err(|e| e.with_request(request_name)),
            Err(_) => Err(ConsulError::timeout(limit).with_request(request_name)),
        }
    }
}

/// Whether a request with `method` may be sent twice (RFC 9110, 9.2.2). Every body the
/// client sends is a buffer it can send again.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether `error` is a reused connection failing (reset, closed) after the request was
/// written and before any byte of an answer came: the agent closed it as it went idle.
/// A new connection that fails, or one that failed part-way through an answer, is not.
fn failed_stale(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() || !exchanges_of(error).is_some_and(|x| x.reused_and_unanswered()) {
        return false;
    }
    let Some(e) = std::error::Error::source(error).and_then(|s| s.downcast_ref::<hyper::Error>())
    else {
        return false;
    };
    e.is_incomplete_message()
        || e.is_canceled()
        || e.is_closed()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// The first `limit` bytes of `body` or fewer: what came before it ended, failed,
/// reached `limit`, or `wait` passed. The rest is not read (its connection is then not
/// reused).
async fn body_start<B: hyper::body::Body<Data = Bytes>>(
    body: B,
    limit: usize,
    wait: Duration,
) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut body = std::pin::pin!(body);
    let mut start = Vec::new();
    while start.len() < limit {
        let Ok(frame) = tokio::time::timeout_at(deadline, body.frame()).await else {
            break;
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = limit - start.len();
                    start.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            // Ended, or broken part-way: the status says what happened; the text is
            // what came.
            Some(Err(_)) | None => break,
        }
    }
    start
}

fn status_error(status: StatusCode, body: &[u8]) -> ConsulError {
    ConsulError::status(status.as_u16(), body)
}

impl fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulClient")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// A query string under construction, values percent-encoded.
#[derive(Default)]
struct Query(String);

impl Query {
    /// Adds `key=value`, or the bare flag `key` when `value` is empty.
    fn push(&mut self, key: &str, value: &str) {
        if !self.0.is_empty() {
            self.0.push('&');
        }
        self.0.push_str(key);
        if !value.is_empty() {
            self.0.push('=');
            self.0.push_str(&encode(value, true));
        }
    }
}

/// Percent-encodes `s` for a path segment (keeping `:` and `@`, legal there) or a query
/// value (keeping only unreserved characters).
fn encode(s: &str, query: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (!query && matches!(b, b':' | b'@'));
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode("service:users-1", false), "service:users-1");
        assert_eq!(encode("a/b c", false), "a%2Fb%20c");
        assert_eq!(
            encode(r#"Service.Meta.version == "2""#, true),
            "Service.Meta.version%20%3D%3D%20%222%22"
        );
        assert_eq!(encode("é", true), "%C3%A9");
        let mut q = Query::default();
        q.push("passing", "true");
        q.push("stale", "");
        q.push("tag", "a&b");
        assert_eq!(q.0, "passing=true&stale&tag=a%26b");
    }

    #[test]
    fn blocking_wait_only_with_an_index() {
        assert_eq!(
            HealthQuery::new("s")
                .wait(Duration::from_secs(1))
                .blocking_wait(),
            None
        );
        assert_eq!(HealthQuery::new("s").index(0).blocking_wait(), None);
        assert_eq!(
            HealthQuery::new("s").index(3).blocking_wait(),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            HealthQuery::new("s")
                .index(3)
                .wait(Duration::from_secs(3600))
                .blocking_wait(),
            Some(MAX_WAIT)
        );
    }

    /// A one-answer-per-connection HTTP server: each request gets the next canned
    /// response (`None`: never answer); request heads are recorded.
    struct Canned {
        addr: std::net::SocketAddr,
        heads: Arc<parking_lot::Mutex<Vec<String>>>,
    }

    impl Canned {
        async fn start(responses: Vec<Option<String>>) -> Self {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let heads = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let recorded = heads.clone();
            tokio::spawn(async move {
                for response in responses {
                    let (mut socket, _) = listener.accept().await.unwrap();
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = socket.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    recorded
                        .lock()
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    match response {
                        Some(r) => {
                            let _ = socket.write_all(r.as_bytes()).await;
                            let _ = socket.shutdown().await;
                        }
                        None => {
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                drop(socket);
                            });
                        }
                    }
                }
            });
            Self { addr, heads }
        }

        fn client(&self, timeout: Duration) -> ConsulClient {
            ConsulClient::new(
                ConsulConfig::builder()
                    .address(self.addr.to_string())
                    .token("tok-123")
                    .datacenter("dc9")
                    .request_timeout(timeout)
                    .build()
                    .unwrap(),
            )
        }
    }

    fn answer(status: &str, headers: &str, body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    #[tokio::test]
    async fn health_query_sends_parameters_token_and_reads_headers() {
        let server = Canned::start(vec![answer(
            "200 OK",
            "X-Consul-Index: 7\r\nX-Consul-KnownLeader: true\r\nX-Consul-LastContact: 15\r\n",
            "[]",
        )])
        .await;
        let client = server.client(Duration::from_secs(5));
        let query = HealthQuery::new("users")
            .passing(true)
            .tag("a")
            .tag("b")
            .filter("Service.Port > 1")
            .consistency(Consistency::Stale)
            .near("_agent")
            .index(5)
            .wait(Duration::from_millis(1500));
        let r = client.health_service(&query).await.unwrap();
        assert_eq!(r.index, 7);
        assert_eq!(r.known_leader, Some(true));
        assert_eq!(r.last_contact, Some(Duration::from_millis(15)));
        let head = server.heads.lock()[0].to_ascii_lowercase();
        assert!(
            head.starts_with(
                "get /v1/health/service/users?passing=true&index=5&wait=1.5s&tag=a&tag=b\
                 &filter=service.port%20%3e%201&dc=dc9&stale&near=_agent http/1.1"
            ),
            "{head}"
        );
        assert!(head.contains("x-consul-token: tok-123"), "{head}");
    }

    #[tokio::test]
    async fn a_missing_index_header_is_a_decode_error() {
        let server = Canned::start(vec![answer("200 OK", "", "[]")]).await;
        let e = server
            .client(Duration::from_secs(5))
            .health_service(&HealthQuery::new("users"))
            .await
            .unwrap_err();
        assert!(e.is_decode(), "{e}");
        assert!(e.to_string().contains("X-Consul-Index"), "{e}");
    }

    #[tokio::test]
    async fn status_errors_carry_code_and_body_but_not_the_token() {
        let server = Canned::start(vec![answer("403 Forbidden", "", "Permission denied")]).await;
        let e = server
            .client(Duration::from_secs(5))
            .register(&ServiceRegistration::builder("s").build().unwrap())
            .await
            .unwrap_err();
        assert!(e.is_permission_denied());
        assert_eq!(
            e.to_string(),
            "consul PUT /v1/agent/service/register: status 403: Permission denied"
        );
        assert!(!format!("{e} {e:?}").contains("tok-123"));
    }

    /// A client with a request limit under a second. The agent sends `500` with the
    /// first bytes of its error text, then stalls: the error body was waited for a
    /// second, past the request's limit, and the status lost to a timeout. The wait ends
    /// within the limit.
    #[tokio::test]
    async fn a_stalled_error_body_keeps_its_status_under_a_short_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 500 Internal Server Error\r\n\
                              Transfer-Encoding: chunked\r\n\r\n11\r\nNo cluster leader\r\n",
                        )
                        .await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        let client = ConsulClient::new(
            ConsulConfig::builder()
                .address(addr.to_string())
                .request_timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
        );
        let e = client.status_leader().await.unwrap_err();
        assert_eq!(e.status_code(), Some(500), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn blocking_queries_get_wait_plus_a_sixteenth_plus_the_timeout() {
        let server = Canned::start(vec![None, None]).await;
        let client = server.client(Duration::from_secs(2));
        let start = tokio::time::Instant::now();
        let e = client
            .health_service(&HealthQuery::new("s").index(3).wait(Duration::from_secs(16)))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert_eq!(start.elapsed(), Duration::from_secs(16 + 1 + 2));
        let start = tokio::time::Instant::now();
        let e = client.status_leader().await.unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn connection_refused_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = ConsulClient::new(
            ConsulConfig::builder()
                .address(addr.to_string())
                .build()
                .unwrap(),
        );
        let e = client.status_leader().await.unwrap_err();
        assert!(e.is_connect() && e.is_transport(), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("consul GET /v1/status/leader: cannot connect"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn leader_and_agent_services() {
        let server = Canned::start(vec![
            answer("200 OK", "", "\"\""),
            answer(
                "200 OK",
                "",
                r#"{"b": {"Service": "s", "Port": 1, "Tags": null}, "a": {"ID": "a"}}"#,
            ),
        ])
        .await;
        let client = server.client(Duration::from_secs(5));
        assert_eq!(client.status_leader().await.unwrap(), None);
        let services = client.agent_services().await.unwrap();
        assert_eq!(services.len(), 2);
        assert_eq!(services[1].id, "b");
        assert_eq!(services[1].port, 1);
    }

    #[test]
    fn debug_hides_the_token() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let client = ConsulClient::new(
            ConsulConfig::builder()
                .token("do-not-print-me")
                .build()
                .unwrap(),
        );
        assert!(!format!("{client:?}").contains("do-not-print-me"));
    }
}
