//! `GET /metrics`: every series through the [`metrics`] facade, rendered by
//! `metrics-exporter-prometheus`. The names and labels are in [`crate::observability`].
//!
//! Two recorders feed it:
//!
//! - **The process's global recorder**, which receives what breakers, limiters, balancers
//!   and Consul watches report. The first gateway built in a process installs a Prometheus
//!   recorder there, unless the application installed one of its own first (then those
//!   series go to the application's recorder, the gateway says so in a warning under
//!   `tracing`, and its `/metrics` shows its own series only; give it the application's
//!   handle with [`use_prometheus_handle`](super::use_prometheus_handle) to show both).
//! - **The gateway's own recorder**, into which its route, endpoint and connection figures
//!   are written when `/metrics` is scraped, from the same counters `/status.json` reads,
//!   into a recorder made for the scrape (so the two always agree, endpoints discovery
//!   removed leave no series behind, several gateways in one process stay apart, and a
//!   request pays nothing for it).

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::status::{EndpointReport, GatewayStatus, RouteStatus};

/// The handle of the process's global recorder, if it is a Prometheus recorder seawall
/// installed or was given.
static PROCESS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs a Prometheus recorder as the process's global recorder, once; `None` when the
/// application installed another recorder first.
pub(crate) fn process_handle() -> Option<&'static PrometheusHandle> {
    PROCESS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe_library();
                    Some(handle)
                }
                Err(_) => {
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        target: "seawall::gateway",
                        "a metrics recorder was installed before the gateway: breaker, limiter \
                         and balancer series go to it, and /metrics shows the gateway's own \
                         series only (see seawall::gateway::use_prometheus_handle)"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Uses `handle` (the application's own Prometheus recorder, installed as the global
/// recorder) for the library's series in `/metrics`. Call it before the first gateway is
/// built; returns `false` (and changes nothing) when a recorder was already chosen.
pub fn use_prometheus_handle(handle: PrometheusHandle) -> bool {
    PROCESS.set(Some(handle)).is_ok()
}

/// The library's series, described once in the global recorder (`# HELP` lines).
fn describe_library() {
    describe_counter!(
        "seawall_circuit_breaker_calls_total",
        "Calls recorded by a circuit breaker, by outcome."
    );
    describe_counter!(
        "seawall_circuit_breaker_slow_calls_total",
        "Calls slower than the breaker's slow_call_duration."
    );
    describe_counter!(
        "seawall_circuit_breaker_rejected_calls_total",
        "Calls a circuit breaker rejected without calling."
    );
    describe_counter!(
        "seawall_circuit_breaker_transitions_total",
        "Circuit breaker state changes."
    );
    describe_gauge!(
        "seawall_circuit_breaker_state",
        "0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled."
    );
    describe_counter!(
        "seawall_rate_limit_decisions_total",
        "Rate limiter decisions, admitted or refused."
    );
    describe_counter!(
        "seawall_rate_limit_redis_checks_total",
        "Redis-backed limiter checks, by where they were answered."
    );
    describe_counter!(
        "seawall_rate_limit_redis_retries_total",
        "Redis checks retried once after a connection error."
    );
    describe_gauge!(
        "seawall_balance_endpoints",
        "Endpoints a balancer knows of."
    );
    describe_counter!(
        "seawall_balance_ejections_total",
        "Endpoints taken out of rotation by outlier detection."
    );
    describe_counter!(
        "seawall_balance_readmissions_total",
        "Ejected endpoints put back in rotation."
    );
    describe_counter!(
        "seawall_balance_ejections_suppressed_total",
        "Ejections not made: the maximum share of endpoints was already out."
    );
    describe_counter!(
        "seawall_consul_watch_requests_total",
        "Health queries a Consul watch made."
    );
    describe_counter!(
        "seawall_consul_watch_errors_total",
        "Failed Consul health queries."
    );
    describe_gauge!(
        "seawall_consul_instances",
        "Healthy instances a Consul watch publishes."
    );
    describe_gauge!(
        "seawall_consul_watch_stale",
        "1 while a Consul watch's queries fail."
    );
}

/// One gateway's own series.
pub(crate) struct GatewayMetrics(());

impl GatewayMetrics {
    pub(crate) fn new() -> Self {
        // The library's series need the global recorder before any breaker or limiter
        // registers its handles: the routes are built after this.
        let _ = process_handle();
        Self(())
    }

    /// The Prometheus text: the gateway's series as of `status`, then the library's.
    ///
    /// The gateway's are written into a recorder made for this scrape, so they are
    /// exactly what `status` holds: an endpoint discovery removed (or a route gone) has no
    /// series left behind, and instances coming and going (a new port each deploy) do not
    /// grow the output without bound.
    pub(crate) fn render(&self, status: &GatewayStatus) -> String {
        let recorder: PrometheusRecorder = PrometheusBuilder::new().build_recorder();
        let handle: PrometheusHandle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_gateway();
            record(status);
        });
        let mut out = handle.render();
        if let Some(process) = process_handle() {
            out.push_str(&process.render());
        }
        out
    }
}

fn describe_gateway() {
    describe_counter!(
        "seawall_gateway_unmatched_total",
        "Requests that matched no route."
    );
    describe_counter!(
        "seawall_gateway_refused_total",
        "Requests refused before routing: HTTP/1 heads (400, 431, 501, 505), refused hosts and paths (400)."
    );
    describe_counter!(
        "seawall_gateway_send_timeouts_total",
        "Client connections closed, and HTTP/2 streams reset, for reading nothing for send_timeout."
    );
    describe_counter!(
        "seawall_gateway_retried_stale_total",
        "Requests sent again after a reused upstream connection failed before answering."
    );
    describe_counter!(
        "seawall_gateway_requests_total",
        "Requests matched to a route."
    );
    describe_counter!(
        "seawall_gateway_responses_total",
        "Responses sent, by status class."
    );
    describe_counter!(
        "seawall_gateway_fallbacks_total",
        "Fallback responses served in place of upstream failures."
    );
    describe_counter!(
        "seawall_gateway_rate_limited_total",
        "Requests refused by the route's rate limits."
    );
    describe_counter!(
        "seawall_gateway_unauthorized_total",
        "Requests refused for a missing or invalid token."
    );
    describe_counter!(
        "seawall_gateway_upstream_errors_total",
        "Upstream failures, by kind."
    );
    describe_counter!(
        "seawall_gateway_client_errors_total",
        "Requests failed by the client's side, by kind (never counted against upstreams)."
    );
    describe_gauge!(
        "seawall_gateway_latency_seconds",
        Unit::Seconds,
        "Latency quantiles over the route's recent responses."
    );
    describe_gauge!(
        "seawall_gateway_global_limit_available",
        "Tokens left in the route's global bucket."
    );
    describe_gauge!(
        "seawall_gateway_endpoint_outstanding",
        "Requests in flight to the endpoint."
    );
    describe_gauge!(
        "seawall_gateway_endpoint_ejected",
        "1 while outlier detection has the endpoint out of rotation."
    );
    describe_counter!(
        "seawall_gateway_endpoint_ejections_total",
        "Times the endpoint was ejected."
    );
    describe_counter!(
        "seawall_gateway_endpoint_calls_total",
        "Calls sent to the endpoint."
    );
    describe_counter!(
        "seawall_gateway_endpoint_failures_total",
        "The endpoint's failed calls (5xx, transport errors, timeouts)."
    );
    describe_gauge!(
        "seawall_gateway_endpoint_breaker_open",
        "1 while the endpoint's circuit breaker rejects calls (open or forced open)."
    );
    describe_gauge!(
        "seawall_gateway_endpoint_breaker_state",
        "The endpoint's circuit breaker: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled."
    );
    describe_counter!(
        "seawall_gateway_tls_handshakes_total",
        "TLS handshakes on the listener, by result (ok, failed, timeout)."
    );
    describe_counter!(
        "seawall_gateway_tls_reloads_total",
        "Certificate reloads after their files changed, by result (ok, failed)."
    );
}

/// Writes `status` into the current (the gateway's own) recorder.
fn record(status: &GatewayStatus) {
    metrics::counter!("seawall_gateway_unmatched_total").absolute(status.unmatched);
    metrics::counter!("seawall_gateway_refused_total").absolute(status.refused);
    metrics::counter!("seawall_gateway_send_timeouts_total").absolute(status.send_timeouts);
    metrics::counter!("seawall_gateway_retried_stale_total").absolute(status.retried_stale);
    if let Some(tls) = &status.tls {
        for (result, value) in [
            ("ok", tls.handshakes),
            ("failed", tls.handshake_failures),
            ("timeout", tls.handshake_timeouts),
        ] {
            metrics::counter!("seawall_gateway_tls_handshakes_total", "result" => result)
                .absolute(value);
        }
        for (result, value) in [("ok", tls.reloads), ("failed", tls.reload_failures)] {
            metrics::counter!("seawall_gateway_tls_reloads_total", "result" => result)
                .absolute(value);
        }
    }
    for r in &status.routes {
        record_route(r);
    }
}

fn record_route(r: &RouteStatus) {
    let route = r.name.clone();
    let counter = |name: &'static str, value: u64| {
        metrics::counter!(name, "route" => route.clone()).absolute(value);
    };
    counter("seawall_gateway_requests_total", r.requests);
    counter("seawall_gateway_fallbacks_total", r.fallbacks);
    counter("seawall_gateway_rate_limited_total", r.rate_limited);
    counter("seawall_gateway_unauthorized_total", r.unauthorized);
    let c = &r.responses;
    for (class, n) in [
        ("1xx", c.informational),
        ("2xx", c.success),
        ("3xx", c.redirection),
        ("4xx", c.client_error),
        ("5xx", c.server_error),
    ] {
        metrics::counter!("seawall_gateway_responses_total", "route" => route.clone(), "class" => class)
            .absolute(n);
    }
    let e = &r.upstream_errors;
    for (kind, n) in [
        ("timeout", e.timeout),
        ("unavailable", e.unavailable),
        ("bad_gateway", e.bad_gateway),
        ("server_error", e.server_error),
    ] {
        metrics::counter!("seawall_gateway_upstream_errors_total", "route" => route.clone(), "kind" => kind)
            .absolute(n);
    }
    let e = &r.client_errors;
    for (kind, n) in [
        ("bad_body", e.bad_body),
        ("body_timeout", e.body_timeout),
        ("too_large", e.too_large),
        ("headers_too_large", e.headers_too_large),
        ("deadline", e.deadline),
    ] {
        metrics::counter!("seawall_gateway_client_errors_total", "route" => route.clone(), "kind" => kind)
            .absolute(n);
    }
    for (quantile, ms) in [("0.5", r.latency_ms.p50), ("0.99", r.latency_ms.p99)] {
        metrics::gauge!("seawall_gateway_latency_seconds", "route" => route.clone(), "quantile" => quantile)
            .set(ms / 1000.0);
    }
    // A limit in Redis has no level known here: its decisions are counted by the
    // limiter's own series (`seawall_rate_limit_*{limiter="<route>/global"}`).
    if let Some(available) = r.limits.global.as_ref().and_then(|g| g.available) {
        metrics::gauge!("seawall_gateway_global_limit_available", "route" => route.clone())
            .set(f64::from(available));
    }
    for e in &r.endpoints {
        record_endpoint(&route, e);
    }
}

fn record_endpoint(route: &str, e: &EndpointReport) {
    let labels = [
        ("route", route.to_owned()),
        ("endpoint", e.key.clone()),
        ("address", e.address.clone()),
    ];
    metrics::gauge!("seawall_gateway_endpoint_outstanding", &labels).set(e.outstanding as f64);
    metrics::gauge!("seawall_gateway_endpoint_ejected", &labels).set(u8::from(e.ejected));
    metrics::counter!("seawall_gateway_endpoint_ejections_total", &labels).absolute(e.ejections);
    metrics::counter!("seawall_gateway_endpoint_calls_total", &labels).absolute(e.calls);
    metrics::counter!("seawall_gateway_endpoint_failures_total", &labels).absolute(e.failures);
    if let Some(state) = e.breaker.as_deref() {
        let open = matches!(state, "open" | "forced_open");
        metrics::gauge!("seawall_gateway_endpoint_breaker_open", &labels).set(u8::from(open));
        // The values of `seawall_circuit_breaker_state`.
        let gauge = match state {
            "closed" => 0,
            "open" => 1,
            "half_open" => 2,
            "forced_open" => 3,
            _ => 4,
        };
        metrics::gauge!("seawall_gateway_endpoint_breaker_state", &labels).set(gauge);
    }
}
