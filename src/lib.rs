//! # seawall
//!
//! Composable [tower] layers that keep services standing when their dependencies fail or
//! their callers surge. They wrap any [`tower::Service`]: a hyper or axum server, an HTTP
//! client, a database client, anything.
//!
//! * [`circuit_breaker`]: closed / open / half-open breaker with failure-rate and slow-call
//!   thresholds, count- or time-based windows, exponential open waits, classification,
//!   events, metrics and manual control.
//! * [`fallback`]: serve a response when a call fails or the breaker is open: a value, a
//!   closure, an async closure, or the last known good response.
//! * [`rate_limit`]: token buckets (local, per key, sharded, Redis-backed) behind one
//!   [`Limit`](rate_limit::Limit) trait, waiting or rejecting, with HTTP 429 answers and
//!   rate-limit headers.
//! * [`discovery`]: where a service's instances are (a static list, an in-process
//!   registry, Consul), as a `tower::discover::Discover` stream of per-instance stacks.
//! * [`balance`]: client-side load balancing over them: power of two choices, round
//!   robin, consistent hashing, per-endpoint breakers and outlier ejection.
//! * `grpc` (feature `grpc`): classification by `grpc-status`, read from the headers or
//!   the trailers at the end of the body, for the breakers and balancers.
//! * `consul` (feature `consul`): a Consul client, registration with health checks, and a
//!   blocking-query watch feeding [`discovery`].
//! * `gateway` (feature `gateway`): an embeddable API gateway configured by a TOML file:
//!   routes with JWT auth, rate limits, fallbacks, timeouts and balanced upstreams, with
//!   Prometheus metrics and a JSON status.
//!
//! ```
//! use std::time::Duration;
//! use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow};
//! use seawall::fallback::FallbackLayer;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), seawall::BoxError> {
//! let breaker = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::builder()
//!         .name("quotes")
//!         .sliding_window(SlidingWindow::count_based(20))
//!         .minimum_calls(5)
//!         .build()?,
//! );
//! let mut svc = ServiceBuilder::new()
//!     // Outermost: whatever fails below, answer with a default quote.
//!     .layer(FallbackLayer::value("the sea is calm".to_string()))
//!     .layer(breaker)
//!     .timeout(Duration::from_millis(250))
//!     .service_fn(|_req: ()| async { Err::<String, _>("upstream down") });
//!
//! let quote = svc.ready().await?.call(()).await?;
//! assert_eq!(quote, "the sea is calm");
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//!
//! | feature | adds |
//! |---|---|
//! | `http` | `HttpClassifier` (5xx and transport errors are failures); `rate_limit::http` (429 layer with RFC 9457 bodies, key extractors, `RetryAfterLayer`); `problem`: HTTP answers for stack errors |
//! | `grpc` | `grpc`: `GrpcClassifier`, `GrpcBodyLayer`: breakers and balancers count gRPC calls by their `grpc-status`, from the headers or the trailers (enables `http`) |
//! | `axum` | `ClientIp` reads axum 0.8's `ConnectInfo<SocketAddr>`; axum's `Body` for the ready-made answers (enables `http`) |
//! | `metrics` | counters and gauges of breakers, limiters, balancers and Consul watches through the `metrics` crate (every name in `observability`) |
//! | `tracing` | events of the same components, and one per gateway request, through `tracing` |
//! | `quanta` | on by default: the default clock (`TokioClock`) reads the CPU's time-stamp counter outside tokio's paused time, several times cheaper than the OS clock; `QuantaClock`, the counter alone. Without it the default clock reads the OS clock |
//! | `redis` | `rate_limit::redis`: the limiter shared by a fleet in Redis or a Redis Cluster, global or per key, under the same layers as the local limits (`LimitLayer`, `HttpRateLimitLayer`) |
//! | `redis-tls` | TLS to Redis (`rediss://`, rustls, *ring*): the server checked against webpki-roots or a private CA, a client certificate for a server that asks for one (`RedisTls`; `[redis.tls]` in the gateway) (enables `redis`) |
//! | `consul` | `consul`: the Consul client, registration guard and discovery watch (`HealthEndpoint` with `http`) |
//! | `consul-tls` | HTTPS to the Consul agent (rustls, *ring*): `https://` addresses and `CONSUL_HTTP_SSL`, the agent verified against webpki-roots or a private CA, a client certificate for `verify_incoming` (`ConsulConfigBuilder::ca_pem`, `client_certificate`, `tls_server_name`; `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`) (enables `consul`) |
//! | `gateway` | `gateway`: the TOML-configured API gateway, a `tower::Service` too, with Prometheus `/metrics`; HTTP/1 and HTTP/2 (h2c) to clients and upstreams, gRPC proxied and answered in gRPC statuses (enables `http`, `metrics` and `grpc`; add `consul` for services found in Consul) |
//! | `tls` | TLS in the gateway (rustls, *ring*): termination with certificates chosen by SNI and reloaded when their files change, HTTP/2 by ALPN; HTTPS upstreams verified against webpki-roots or a CA file (enables `gateway`) |
//! | `full` | all of the above |
//!
//! The core layers need only tower and tokio (`--no-default-features`).
//!
//! ## Conventions
//!
//! * **Builders**: anything with settings to check is configured through `X::builder()`
//!   and `build()` ([`CircuitBreakerConfig::builder`](circuit_breaker::CircuitBreakerConfig::builder),
//!   [`Balance::builder`](balance::Balance::builder),
//!   [`RateLimiter::builder`](rate_limit::RateLimiter::builder), …); a constructor
//!   `new(required)` is a shortcut for the defaults, and layers take their settings as
//!   chained methods, as tower's do.
//! * **Names**: breakers, balancers, limiters and HTTP rate-limit policies are named with
//!   `name(impl Into<Arc<str>>)` (a `&str`, a `String` or an `Arc<str>`), on their builder or
//!   layer; the name labels their metrics and events. Strings sent to Consul (service
//!   names, tags, addresses) are `impl Into<String>`.
//! * **Errors**: every invalid setting is a [`ConfigError`] naming the setting as its
//!   builder method or configuration key is spelled, with the rejected value; nothing
//!   panics on bad configuration.
//! * **Units**: durations are [`Duration`](std::time::Duration)s (`"250ms"` in the
//!   gateway's TOML); rates are [`Rate`](rate_limit::Rate)s whose constructor says its
//!   period; every share or threshold is a fraction in `[0, 1]` (`0.5` is half; the TOML
//!   also takes `"50%"`), and a whole number from 2 to 100 in its place is refused with a
//!   hint rather than read as a percentage.
//!
//! ## What is written here, and why
//!
//! Where a well-kept crate does the job it is used: `ipnet` for trusted-proxy networks,
//! `hmac` / `sha2` for the JWT signature, `toml` and `serde` for configuration, `redis` for
//! Redis, `metrics` and `tracing` for telemetry. A few pieces are written here, each for a
//! reason:
//!
//! * **The Consul client** (`consul`): the crates that exist wrap Consul's whole API over
//!   `reqwest` (a second HTTP stack, with its TLS) or are unmaintained. seawall needs four
//!   endpoints with blocking queries, index resets, a bounded response size and typed
//!   errors that never show the ACL token, on the hyper 1 connection it already has.
//! * **HS256 JWT** (`gateway`): `jsonwebtoken` brings `ring` and every algorithm; the gateway
//!   verifies one (HMAC-SHA256, compared in constant time by `hmac`) and refuses the rest
//!   (`alg: none`, RS/ES confusion) before decoding claims, in one small module.
//! * **Go durations** (`"1h30m"`, `"250ms"`): Consul speaks Go's `time.Duration` format,
//!   which `humantime` does not parse the same way (`"1.5h"`, `"µs"`, no spaces); the
//!   gateway's TOML takes the same format so that one syntax serves both.
//! * **The `Forwarded` / `X-Forwarded-For` parser**: no maintained crate resolves the client
//!   from the right through trusted hops (RFC 7239 quoting, IPv6 brackets, obfuscated
//!   identifiers); a mistake there lets a client pick its own rate-limit key, so it is
//!   fuzzed here (`fuzz/`).
//! * **The gateway's upstream pool**: `hyper-util`'s legacy client keys one pool by scheme
//!   and authority behind one lock, builds an absolute URI and spawns a task per request to
//!   wait for the connection; the gateway's pool is per endpoint, returns the connection
//!   when the response body ends, retries a request written on a keep-alive connection the
//!   upstream closed while idle (only when that is harmless, as Go's `net/http` does), and
//!   honours an upstream's `Keep-Alive: timeout`.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(clippy::unwrap_used)]
#![forbid(unsafe_code)]

pub mod balance;
pub mod circuit_breaker;
pub mod clock;
#[cfg(feature = "consul")]
#[cfg_attr(docsrs, doc(cfg(feature = "consul")))]
pub mod consul;
mod counter;
pub mod discovery;
pub mod fallback;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub mod grpc;
#[cfg(feature = "http")]
mod header_arena;
mod lease;
pub mod observability;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod problem;
pub mod rate_limit;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod uri_path;
mod util;

/// Go's `time.Duration` text (`"1h30m"`), spoken by Consul and the gateway's TOML.
#[cfg(any(feature = "consul", feature = "gateway"))]
#[cfg_attr(not(feature = "consul"), allow(dead_code, unreachable_pub))]
mod go_duration;

mod config_error;
pub use config_error::{ConfigError, ConfigErrorKind};

/// The boxed error type used by layers that add failure modes of their own, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether `error` is a `T`, directly or anywhere in its `source()` chain (layers box and
/// wrap each other's errors, so the type alone is not enough).
pub(crate) fn caused_by<T: std::error::Error + 'static>(error: &BoxError) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The README's example, compiled as a doc test so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
