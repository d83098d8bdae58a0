//! Every metric seawall reports, in one table.
//!
//! With the feature `metrics`, the layers report through the [`metrics`](https://docs.rs/metrics)
//! facade to whatever recorder the application installs (for Prometheus,
//! `metrics-exporter-prometheus`'s `PrometheusBuilder`, as `examples/axum_service.rs`
//! does). Only named components report: a breaker always has a name; limiters and
//! balancers report once given one (`name(...)` on their builder). Label values are
//! those names; keys of keyed limiters are never labels, so their number cannot blow up a
//! metric. The gateway (feature `gateway`) serves all of them, with its own
//! `seawall_gateway_*` series, on `GET /metrics` of its admin listener.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `seawall_circuit_breaker_calls_total` | counter | `breaker`, `outcome` (`success`, `failure`, `ignored`) | calls recorded |
//! | `seawall_circuit_breaker_slow_calls_total` | counter | `breaker` | calls slower than `slow_call_duration` |
//! | `seawall_circuit_breaker_rejected_calls_total` | counter | `breaker` | calls rejected without calling |
//! | `seawall_circuit_breaker_transitions_total` | counter | `breaker`, `from`, `to` (`closed`, `open`, `half_open`, `forced_open`, `disabled`) | state changes |
//! | `seawall_circuit_breaker_state` | gauge | `breaker` | 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled |
//! | `seawall_rate_limit_decisions_total` | counter | `limiter`, `decision` (`admitted`, `refused`) | limiter decisions |
//! | `seawall_rate_limit_redis_checks_total` | counter | `limiter`, `source` (`redis`, `batch`, `local`, `unavailable`, `cached`, `exceeds_burst`) | where a Redis-backed check was answered |
//! | `seawall_rate_limit_redis_retries_total` | counter | `limiter` | Redis checks retried after a connection error |
//! | `seawall_balance_endpoints` | gauge | `balancer` | endpoints known |
//! | `seawall_balance_ejections_total` | counter | `balancer`, `endpoint` | outlier ejections |
//! | `seawall_balance_readmissions_total` | counter | `balancer`, `endpoint` | ejected endpoints put back |
//! | `seawall_balance_ejections_suppressed_total` | counter | `balancer` | ejections not made (max share out) |
//! | `seawall_consul_watch_requests_total` | counter | `service` | health queries made |
//! | `seawall_consul_watch_errors_total` | counter | `service` | failed health queries |
//! | `seawall_consul_instances` | gauge | `service` | healthy instances published |
//! | `seawall_consul_watch_stale` | gauge | `service` | 1 while queries fail |
//! | `seawall_gateway_requests_total` | counter | `route` | requests matched to the route |
//! | `seawall_gateway_responses_total` | counter | `route`, `class` (`1xx` … `5xx`) | responses sent |
//! | `seawall_gateway_fallbacks_total` | counter | `route` | fallback answers |
//! | `seawall_gateway_rate_limited_total` | counter | `route` | 429s from the route's limits |
//! | `seawall_gateway_unauthorized_total` | counter | `route` | 401s |
//! | `seawall_gateway_upstream_errors_total` | counter | `route`, `kind` (`timeout`, `unavailable`, `bad_gateway`, `server_error`) | upstream failures |
//! | `seawall_gateway_client_errors_total` | counter | `route`, `kind` (`bad_body`, `body_timeout`, `too_large`, `headers_too_large`, `deadline`) | the client's own faults |
//! | `seawall_gateway_latency_seconds` | gauge | `route`, `quantile` (`0.5`, `0.99`) | latency over the last 1 024 responses |
//! | `seawall_gateway_global_limit_available` | gauge | `route` | tokens left in the global bucket |
//! | `seawall_gateway_endpoint_outstanding` | gauge | `route`, `endpoint`, `address` | requests in flight |
//! | `seawall_gateway_endpoint_ejected` | gauge | `route`, `endpoint`, `address` | 1 while ejected |
//! | `seawall_gateway_endpoint_ejections_total` | counter | `route`, `endpoint`, `address` | ejections |
//! | `seawall_gateway_endpoint_calls_total` | counter | `route`, `endpoint`, `address` | calls sent |
//! | `seawall_gateway_endpoint_failures_total` | counter | `route`, `endpoint`, `address` | failed calls |
//! | `seawall_gateway_endpoint_breaker_open` | gauge | `route`, `endpoint`, `address` | 1 while the endpoint's breaker rejects |
//! | `seawall_gateway_endpoint_breaker_state` | gauge | `route`, `endpoint`, `address` | as `seawall_circuit_breaker_state` |
//! | `seawall_gateway_unmatched_total` | counter | – | requests no route matched (404) |
//! | `seawall_gateway_send_timeouts_total` | counter | – | client connections cut by `send_timeout` |
//! | `seawall_gateway_retried_stale_total` | counter | – | requests sent again after a stale keep-alive connection failed |
//! | `seawall_gateway_tls_handshakes_total` | counter | `result` (`ok`, `failed`, `timeout`) | TLS handshakes on the proxy listener (feature `tls`) |
//! | `seawall_gateway_tls_reloads_total` | counter | `result` (`ok`, `failed`) | certificate reloads after their files changed |
//!
//! The series labelled by endpoint (`seawall_circuit_breaker_*` of a balancer's endpoint
//! breakers, `seawall_balance_ejections_total`, `seawall_balance_readmissions_total`)
//! stay in the recorder after their endpoint leaves: the facade cannot remove a series.
//! For endpoints that come and go, turn them off with
//! [`BalanceBuilder::endpoint_metrics`](crate::balance::BalanceBuilder::endpoint_metrics)
//! and report [`BalanceHandle::endpoints`](crate::balance::BalanceHandle::endpoints) at
//! each scrape, as the gateway does.
//!
//! In the gateway, the components are named after their route: the limiters
//! `<route>/global` and `<route>/per-client` and the balancer `<route>/<service>`. Its
//! endpoints are reported only as the `seawall_gateway_endpoint_*` series, written at each
//! scrape for the endpoints the route has then: one that discovery removed leaves none
//! behind.
//!
//! With the feature `tracing`, the same components emit events (breaker transitions and
//! rejections, limiter refusals, ejections, Consul watch changes and failures, one `DEBUG`
//! event per gateway request); their targets are `seawall::<module>`.
