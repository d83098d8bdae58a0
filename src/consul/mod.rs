//! Consul: service registration with health checks, and discovery of healthy instances
//! through blocking queries (feature `consul`).
//!
//! * [`ConsulClient`]: a typed client of the agent's HTTP API (hyper 1, ACL token as
//!   `X-Consul-Token`, a time limit on every request), configured by [`ConsulConfig`] or
//!   from Consul's environment variables (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`…).
//!   Plain HTTP, or with the feature `consul-tls` HTTPS (rustls): the agent's certificate
//!   always verified, against webpki-roots or a private CA, and a client certificate for
//!   an agent with `verify_incoming` (see [`ConsulConfig`]).
//! * [`ServiceRegistration`] and [`Check`] (HTTP, TCP, TTL): validated when built,
//!   serialized as Consul expects (PascalCase, Go duration strings:
//!   [`format_go_duration`], [`parse_go_duration`]).
//! * [`RegistrationGuard`]: registers, keeps TTL checks alive, registers again when the
//!   agent loses the registration, and on shutdown deregisters *before* a grace period
//!   so that clients stop picking the instance while it still serves.
//! * [`ConsulWatch`]: follows a service's healthy instances with blocking queries and
//!   publishes them through a [`discovery::InstanceWatch`](crate::discovery::InstanceWatch),
//!   ready for [`ServiceDiscover`](crate::discovery::ServiceDiscover) and the balancers;
//!   it keeps the last instances (reported [`Stale`](crate::discovery::SourceStatus::Stale))
//!   while the agent is unreachable.
//! * `HealthEndpoint` (feature `http` too): a tower service answering the HTTP check
//!   from a `HealthHandle` the application drives.
//!
//! ```no_run
//! use std::time::Duration;
//! use seawall::consul::{
//!     Check, ConsulClient, ConsulWatch, RegistrationGuard, ServiceRegistration, WatchConfig,
//! };
//! use seawall::discovery::ServiceDiscover;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ConsulClient::from_env()?;
//!
//! // This process is an instance of "quotes".
//! let registration = ServiceRegistration::builder("quotes")
//!     .id("quotes-1")
//!     .address("10.0.0.7")
//!     .port(8080)
//!     .check(Check::ttl(Duration::from_secs(10)).deregister_critical_after(Duration::from_secs(600)))
//!     .build()?;
//! let guard = RegistrationGuard::register(client.clone(), registration).await?;
//!
//! // It calls "users": follow its healthy instances.
//! let users = ConsulWatch::spawn(client, "users", WatchConfig::default());
//! let discover = ServiceDiscover::new(users.instances(), |i| i.authority());
//! # drop(discover);
//!
//! // On SIGTERM: deregister, then drain for 5 s.
//! guard.shutdown(Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How instances are read
//!
//! As the Consul API requires: an instance is identified by its node and service ID
//! ([`InstanceId`](crate::discovery::InstanceId)), since two nodes commonly register the
//! same ID; the address is `Service.Address`, else `Node.Address`; entries with no
//! address or port 0 are skipped (counted in [`HealthResponse::skipped_count`], the first
//! 16 listed in [`HealthResponse::skipped`], with one `tracing` warning per answer);
//! unknown fields are ignored and null ones read as empty; missing weights are 1/1. An
//! instance's health is its worst check, node checks such as
//! `serfHealth` included: all passing is [`Health::Passing`](crate::discovery::Health),
//! any critical (or unknown status) leaves it out, and otherwise it is
//! [`Health::Warning`](crate::discovery::Health) with `Weights.Warning` as its weight
//! (left out when that is 0). A [`ConsulWatch`] publishes passing instances only, unless
//! told to [include warning ones](WatchConfigBuilder::include_warning).
//!
//! # Observing
//!
//! See [`ConsulWatch`] for its metrics and events. The guard emits `tracing` events when
//! a heartbeat fails, when it registers again, and when it drains. Errors never contain
//! the ACL token.

mod client;
mod config;
mod conn;
mod error;
mod guard;
#[cfg(feature = "http")]
mod health_endpoint;
mod parse;
mod registration;
#[cfg(feature = "consul-tls")]
mod tls;
mod watch;

pub use crate::go_duration::{
    MAX_GO_DURATION, ParseDurationError, ParseDurationErrorKind, format_go_duration,
    parse_go_duration,
};
pub use client::{
    AgentService, Consistency, ConsulClient, HealthQuery, HealthResponse, MAX_WAIT,
    parse_agent_services, parse_health_response,
};
pub use config::{ConsulConfig, ConsulConfigBuilder, DEFAULT_ADDRESS, DEFAULT_REQUEST_TIMEOUT};
pub use error::{ConsulError, ErrorKind};
pub use guard::{GuardConfig, GuardConfigBuilder, RegistrationGuard, StatusHandle};
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use health_endpoint::{HealthEndpoint, HealthHandle, HealthReport};
pub use parse::{SkipReason, SkippedEntry};
pub use registration::{
    Check, CheckStatus, MIN_DEREGISTER_CRITICAL_AFTER, ServiceRegistration,
    ServiceRegistrationBuilder,
};
pub use watch::{ConsulWatch, WatchConfig, WatchConfigBuilder};

/// Now plus `d`, saturating far in the future instead of overflowing: a configured period
/// of years must not panic a background task.
pub(crate) fn later(d: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(60 * 60 * 24 * 365 * 30))
}
