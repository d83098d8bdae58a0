//! Consul: the client, registration guard and watch against the Consul API double
//! (`double/`, which follows `docs/consul-api.md`), or a real agent when
//! `CONSUL_HTTP_ADDR` is set; discovery end to end with balancing; the demo's services
//! and the gateway discovering them. `double::tests` checks the double itself.

mod client;
#[cfg(feature = "http")]
mod demo;
#[cfg(feature = "http")]
mod discovery_e2e;
mod double;
#[cfg(feature = "gateway")]
mod gateway;
mod stale;

/// The demo's upstream services, shared with `examples/demo_services.rs` and
/// `examples/gateway_demo.rs`.
#[cfg(feature = "http")]
#[path = "../../examples/support/demo_services.rs"]
mod demo_services;
