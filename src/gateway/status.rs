//! What the gateway reports: per-route counters and latencies, endpoints and limiters, as
//! `GET /status.json` ([`GatewayStatus`]) and `GET /metrics` (Prometheus text).
//!
//! The counters are the gateway's own atomics, so several gateways can live in one
//! process; `/metrics` writes them into the gateway's own recorder when scraped, so the
//! status page and `/metrics` always agree.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How many recent latencies the percentiles are computed over, per route.
pub const LATENCY_WINDOW: usize = 1024;

/// The gateway's state, as served by `GET /status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GatewayStatus {
    /// Seconds since the gateway was built.
    pub uptime_seconds: f64,
    /// Requests that matched no route (answered 404).
    pub unmatched: u64,
    /// Requests refused before any route saw them: HTTP/1 heads malformed or ambiguous
    /// (`400`: conflicting framing, no `Host`, ...), too large (`431`), with a transfer
    /// coding other than `chunked` (`501`) or not HTTP/1.x (`505`), after which the
    /// connection is closed; and requests of either protocol whose `Host` or path is
    /// refused (`400`: an encoded `/`, `..` above the root, an invalid escape, a control
    /// byte; see [`uri_path`](crate::uri_path)).
    #[serde(default)]
    pub refused: u64,
    /// Client connections closed because a write to them stayed blocked for
    /// `send_timeout` (the client read nothing), and HTTP/2 streams reset because their
    /// response waited that long for the client's flow-control window.
    #[serde(default)]
    pub send_timeouts: u64,
    /// Idempotent requests without a body sent again on a new upstream connection because
    /// the reused keep-alive connection they were written on failed before any byte of an
    /// answer came (the upstream closed it as it went idle); and requests without a body
    /// an HTTP/2 upstream refused unprocessed (`GOAWAY`, `REFUSED_STREAM`) or lost with a
    /// connection it ended with `ENHANCE_YOUR_CALM`.
    #[serde(default)]
    pub retried_stale: u64,
    /// The listener's TLS, when it terminates TLS (`[gateway.tls]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
    /// One entry per route, in configuration order.
    pub routes: Vec<RouteStatus>,
}

/// The listener's TLS: handshakes and certificate reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TlsStatus {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Handshakes that failed (no common protocol version or cipher, a client that
    /// rejected the certificate, bytes that are not TLS).
    pub handshake_failures: u64,
    /// Connections closed because their handshake took longer than `handshake_timeout`.
    pub handshake_timeouts: u64,
    /// Times the certificates were loaded again after their files changed.
    pub reloads: u64,
    /// Times changed files could not be loaded (the certificates in use were kept).
    pub reload_failures: u64,
    /// The names each certificate answers, the default one first.
    pub server_names: Vec<Vec<String>>,
}

/// One route's counters and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RouteStatus {
    /// The route's name.
    pub name: String,
    /// Its path prefix.
    pub path_prefix: String,
    /// The upstream service.
    pub service: String,
    /// Requests matched to the route.
    pub requests: u64,
    /// Responses sent, by status class.
    pub responses: ResponseClasses,
    /// Fallback responses served in place of upstream failures.
    pub fallbacks: u64,
    /// Requests refused by the route's rate limits (429).
    pub rate_limited: u64,
    /// Requests refused for a missing or invalid token (401).
    pub unauthorized: u64,
    /// Upstream failures, by kind (whether or not a fallback answered them).
    pub upstream_errors: UpstreamErrors,
    /// Requests failed by the client's side, by kind: never counted against the upstream
    /// (its breaker, outlier detection, `upstream_errors`).
    #[serde(default)]
    pub client_errors: ClientErrors,
    /// Latency percentiles over the last [`LATENCY_WINDOW`] responses.
    pub latency_ms: Latency,
    /// The rate limiters' headroom.
    pub limits: Limits,
    /// The upstream endpoints.
    pub endpoints: Vec<EndpointReport>,
}

/// Responses by status class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResponseClasses {
    /// 1xx.
    #[serde(rename = "1xx")]
    pub informational: u64,
    /// 2xx.
    #[serde(rename = "2xx")]
    pub success: u64,
    /// 3xx.
    #[serde(rename = "3xx")]
    pub redirection: u64,
    /// 4xx.
    #[serde(rename = "4xx")]
    pub client_error: u64,
    /// 5xx.
    #[serde(rename = "5xx")]
    pub server_error: u64,
}

/// Upstream failures by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UpstreamErrors {
    /// The route timeout elapsed: before the response head (504), or while waiting for
    /// more of its body (the body cut).
    pub timeout: u64,
    /// No endpoint, or every endpoint's breaker open (503).
    pub unavailable: u64,
    /// A transport error: refused, reset, bad response (502); or the response body
    /// broken off by the upstream after its head (a malformed chunk, a reset, a close
    /// before its end: the body cut).
    pub bad_gateway: u64,
    /// A 5xx answer from the upstream (but `501`, the answer to the client's method).
    pub server_error: u64,
}

/// Requests the client is to blame for, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClientErrors {
    /// A request body that could not be read: malformed chunked encoding, or the client
    /// closed its connection part-way (400, if the client is still there).
    pub bad_body: u64,
    /// The route timeout passed while waiting on the client's request body, or an HTTP/1
    /// upstream dropped the connection then (its own body read timeout) (408).
    pub body_timeout: u64,
    /// A request body over `max_request_body`, declared or streamed (413).
    pub too_large: u64,
    /// A request header line over `max_header_line` (431).
    pub headers_too_large: u64,
    /// A gRPC call whose own deadline (`grpc-timeout`, shorter than the route timeout)
    /// passed before the upstream's answer (`DEADLINE_EXCEEDED`).
    pub deadline: u64,
}

/// Latency percentiles, in milliseconds (0 with no sample).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Latency {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// How many samples they are computed over.
    pub samples: usize,
}

/// The rate limiters' headroom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Limits {
    /// The global bucket, if configured.
    pub global: Option<GlobalLimit>,
    /// The per-client buckets, if configured.
    pub per_client: Option<ClientLimit>,
}

/// The global bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GlobalLimit {
    /// Tokens available now; `null` for a limit kept in Redis (not known here).
    pub available: Option<u32>,
    /// The bucket size.
    pub burst: u32,
    /// Tokens added a second.
    pub per_second: u32,
    /// Where the bucket lives: `local` (this process) or `redis` (shared by the fleet).
    #[serde(default = "local_policy")]
    pub policy: String,
    /// For a limit in Redis: where its decisions come from now, and its breaker.
    #[serde(default)]
    pub redis: Option<RedisLimitStatus>,
}

fn local_policy() -> String {
    "local".to_owned()
}

/// A limit kept in Redis (`policy = "redis"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RedisLimitStatus {
    /// Where the last decision came from: `redis` (the shared bucket), `batch` (tokens
    /// taken ahead), `local` (this replica's local share: Redis unavailable), `cached` (a
    /// refusal Redis gave, still in force), `unavailable` (Redis unavailable, failing
    /// closed), `exceeds_burst` (a request for more tokens than the burst, refused without
    /// asking Redis); `null` before the first request.
    pub source: Option<String>,
    /// The state of the breaker around Redis: `closed`, `open` (decisions are local, or
    /// refusals when failing closed, until a probe succeeds) or `half_open`.
    pub breaker: String,
}

/// The per-client buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClientLimit {
    /// Clients with a bucket now; `null` for a limit kept in Redis (not known here).
    pub clients: Option<usize>,
    /// Each bucket's size.
    pub burst: u32,
    /// Tokens added to each a second.
    pub per_second: u32,
    /// `ip` or `header:<name>`.
    pub key: String,
    /// Where the buckets live: `local` (this process) or `redis` (shared by the fleet).
    #[serde(default = "local_policy")]
    pub policy: String,
    /// For a limit in Redis: where its decisions come from now, and its breaker.
    #[serde(default)]
    pub redis: Option<RedisLimitStatus>,
}

/// One upstream endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EndpointReport {
    /// The discovery key (`node/service-id`).
    pub key: String,
    /// `host:port`.
    pub address: String,
    /// Requests in flight.
    pub outstanding: u32,
    /// Calls sent to it.
    pub calls: u64,
    /// Failed calls (5xx, transport errors).
    pub failures: u64,
    /// Whether outlier detection has it out of rotation.
    pub ejected: bool,
    /// For how much longer, in milliseconds.
    pub ejected_for_ms: Option<u64>,
    /// How many times it has been ejected.
    pub ejections: u64,
    /// Its breaker: `closed`, `open`, `half_open`, `forced_open`, `disabled`, or null
    /// without `[routes.breaker]`.
    pub breaker: Option<String>,
}

/// A route's counters.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    pub(crate) requests: AtomicU64,
    classes: [AtomicU64; 5],
    pub(crate) fallbacks: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    pub(crate) bad_gateway: AtomicU64,
    pub(crate) server_errors: AtomicU64,
    pub(crate) bad_body: AtomicU64,
    pub(crate) body_timeouts: AtomicU64,
    pub(crate) too_large: AtomicU64,
    pub(crate) headers_too_large: AtomicU64,
    pub(crate) deadlines: AtomicU64,
    latencies: Latencies,
}

/// The last [`LATENCY_WINDOW`] latencies, in microseconds: a ring of atomics that every
/// response writes one slot of, with no lock (a status read while responses are recorded
/// may see a slot's newer value in place of the older: a percentile over the window
/// either way).
#[derive(Debug)]
struct Latencies {
    slots: Box<[AtomicU32]>,
    /// Latencies recorded so far; the next slot is this modulo the window.
    recorded: AtomicU64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            slots: (0..LATENCY_WINDOW).map(|_| AtomicU32::new(0)).collect(),
            recorded: AtomicU64::new(0),
        }
    }
}

impl RouteStats {
    pub(crate) fn record(&self, status: http::StatusCode, latency: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Relaxed);
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        let at = self.latencies.recorded.fetch_add(1, Relaxed) as usize % LATENCY_WINDOW;
        self.latencies.slots[at].store(micros, Relaxed);
    }

    pub(crate) fn responses(&self) -> ResponseClasses {
        let c = |i: usize| self.classes[i].load(Relaxed);
        ResponseClasses {
            informational: c(0),
            success: c(1),
            redirection: c(2),
            client_error: c(3),
            server_error: c(4),
        }
    }

    pub(crate) fn upstream_errors(&self) -> UpstreamErrors {
        UpstreamErrors {
            timeout: self.timeouts.load(Relaxed),
            unavailable: self.unavailable.load(Relaxed),
            bad_gateway: self.bad_gateway.load(Relaxed),
            server_error: self.server_errors.load(Relaxed),
        }
    }

    pub(crate) fn client_errors(&self) -> ClientErrors {
        ClientErrors {
            bad_body: self.bad_body.load(Relaxed),
            body_timeout: self.body_timeouts.load(Relaxed),
            too_large: self.too_large.load(Relaxed),
            headers_too_large: self.headers_too_large.load(Relaxed),
            deadline: self.deadlines.load(Relaxed),
        }
    }

    pub(crate) fn latency(&self) -> Latency {
        let held = (self.latencies.recorded.load(Relaxed) as usize).min(LATENCY_WINDOW);
        let mut samples: Vec<u32> = self.latencies.slots[..held]
            .iter()
            .map(|slot| slot.load(Relaxed))
            .collect();
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            f64::from(samples[i]) / 1000.0
        };
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            samples: samples.len(),
        }
    }
}

pub(crate) fn breaker_state(state: crate::circuit_breaker::State) -> &'static str {
    use crate::circuit_breaker::State;
    match state {
        State::Closed => "closed",
        State::Open => "open",
        State::HalfOpen => "half_open",
        State::ForcedOpen => "forced_open",
        State::Disabled => "disabled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_the_window() {
        let stats = RouteStats::default();
        assert_eq!(stats.latency(), Latency::default());
        for ms in 1..=100u64 {
            stats.record(http::StatusCode::OK, Duration::from_millis(ms));
        }
        let l = stats.latency();
        assert_eq!((l.p50, l.p99, l.samples), (50.0, 99.0, 100));
        for _ in 0..LATENCY_WINDOW {
            stats.record(http::StatusCode::BAD_GATEWAY, Duration::from_millis(7));
        }
        assert_eq!(stats.latency().p99, 7.0);
        assert_eq!(stats.responses().server_error, LATENCY_WINDOW as u64);
    }
}
