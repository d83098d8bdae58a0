//! Consul: the client, registration guard and watch against the Consul API double
//! (`double/`, which follows `docs/consul-api.md`), or a real agent when
//! `CONSUL_HTTP_ADDR` is set; discovery end to end with balancing; the demo's services
//! and the gateway discovering them; the client over HTTPS (`tls`, feature `consul-tls`).
//! `double::tests` checks the double itself.

mod client;
#[cfg(feature = "http")]
mod demo;
#[cfg(feature = "http")]
mod discovery_e2e;
mod double;
#[cfg(feature = "gateway")]
mod gateway;
mod stale;
mod tls;

/// The demo's upstream services, shared with `examples/demo_services.rs` and
/// `examples/gateway_demo.rs`.
#[cfg(feature = "http")]
#[path = "../../examples/support/demo_services.rs"]
mod demo_services;

/// Certificates made at test time, for the double served over TLS.
#[cfg(feature = "consul-tls")]
#[path = "../support/tls.rs"]
mod tls_support;
