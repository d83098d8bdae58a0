//! Circuit breaking: stop calling a dependency that is failing, probe it, resume when it heals.
//!
//! A [`CircuitBreaker`] sits in front of an inner service and records the outcome of every
//! call in a sliding window — the last N calls, or the calls of the last N seconds. When,
//! with at least `minimum_calls` in the window, the failure rate or the slow-call rate
//! reaches its threshold, the breaker **opens**: calls are rejected at once with a
//! [`CircuitOpen`] error (or, with [typed errors](CircuitBreakerLayer::typed_errors), a
//! [`Rejection`] that says which breaker refused and its `retry_after`), without calling
//! or reserving the inner service. After the open wait (which can grow exponentially on
//! repeated trips, with jitter) the breaker turns **half-open** and admits a fixed number
//! of probe calls; their outcomes **close** it (with an empty window) or **open** it
//! again. It can also be **forced open** or **disabled** by hand through its [`Breaker`]
//! handle.
//!
//! ```text
//!            rate ≥ threshold              wait elapsed
//!  Closed ─────────────────────▶ Open ───────────────────▶ HalfOpen
//!     ▲                            ▲                          │
//!     │                            └── probes fail / timeout ─┤
//!     └────────────────────────── probes succeed ─────────────┘
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen,
//!     Error, SlidingWindow, State};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), seawall::BoxError> {
//! let config = CircuitBreakerConfig::builder()
//!     .name("flaky")
//!     .sliding_window(SlidingWindow::count_based(10))
//!     .minimum_calls(4)
//!     .failure_rate_threshold(0.5)
//!     .wait_in_open(Duration::from_secs(5))
//!     .build()?;
//! let layer = CircuitBreakerLayer::new(config);
//! let breaker = layer.breaker().clone();
//!
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|fail: bool| async move {
//!         if fail { Err("boom") } else { Ok("fine") }
//!     });
//!
//! for _ in 0..4 {
//!     let _ = svc.ready().await?.call(true).await;
//! }
//! assert_eq!(breaker.state(), State::Open);
//!
//! let err = svc.ready().await?.call(false).await.unwrap_err();
//! assert!(err.is::<CircuitOpen>(), "rejected by the breaker");
//!
//! // Typed errors say more: which breaker refused, and when it probes again.
//! let mut typed = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::from_breaker(breaker.clone()).typed_errors())
//!     .service_fn(|_: bool| async { Ok::<_, std::io::Error>("fine") });
//! match typed.ready().await?.call(false).await {
//!     Err(Error::Open(rejection)) => {
//!         assert_eq!(rejection.breaker(), "flaky");
//!         assert!(rejection.retry_after().unwrap() <= Duration::from_secs(5));
//!     }
//!     other => panic!("expected a rejection, got {other:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Cost
//!
//! With a count-based window and no slow-call detection, the closed path is an atomic load
//! in `poll_ready` and two in `call`, and on completion a load: no lock, no clock read, no
//! allocation, no reference count. That holds while the window is full of successes (the
//! steady state of a healthy dependency), where a success changes nothing in the window:
//! the call then holds no reference to the breaker, only a `&'static` block with the flag
//! that says so. A failure, and any call made while the window is not clean, records: a
//! reference count for the response future, then an atomic add on the window's cursor
//! and a swap when the outcome differs from the one it replaces. The blocks are
//! kept for the breakers made later (64 bytes each, as many as the most breakers alive at
//! once). With the `metrics` feature every outcome is counted, so calls always record. A
//! time-based window reads the clock once per call and takes a short lock; slow-call
//! detection reads it twice.
//!
//! The rejection path of an open breaker reads the clock once, to compare it with the end
//! of the wait: the first call after the wait is admitted as a probe whether or not the
//! task that moves the breaker to half-open on time (on the tokio runtime it tripped on)
//! has run yet, for instance when each call is driven by its own `block_on` or the runtime
//! is too busy. A forced-open breaker reads no clock. Either way a rejection takes no lock
//! and no locked instruction: the count behind [`Snapshot::rejected_calls`] has a slot per
//! thread, written with a plain store, which a snapshot sums. In the default [`Boxed`]
//! error mode it allocates nothing (the [`CircuitOpen`] it boxes is zero-sized) and its
//! future holds nothing of the breaker's; with [`CircuitBreakerLayer::typed_errors`] the
//! [`Rejection`] holds a reference count, and also allocates nothing.
//!
//! Under concurrency the window's running totals are updated with separate atomics, so a
//! reading taken while other calls are being recorded may be off by the number of records
//! in flight; with windows of tens of calls or more this moves the tripping point by at most
//! that many calls.
//!
//! # Half-open and cancellation
//!
//! A probe permit reserved by a ready service that is then neither called nor dropped stays
//! reserved, and a probe whose future is dropped records nothing (its permit is returned).
//! Set [`max_wait_in_half_open`](CircuitBreakerConfigBuilder::max_wait_in_half_open) so that
//! such a half-open episode ends, and put a timeout *inside* the breaker so that a hung
//! dependency produces failures rather than cancellations.
//!
//! # Without a tower service
//!
//! [`Breaker::try_acquire`] guards any work: it answers with a [`Ticket`] to record the
//! outcome with ([`Ticket::success`], [`Ticket::failure`], [`Ticket::record`]), or with a
//! [`Rejection`], as resilience4j's `tryAcquirePermission` and `onResult`. The
//! layer, the balancers' per-endpoint breakers and this API take the same path: one
//! admission, checked again when the call starts, one recording.
//!
//! # Composition
//!
//! * **Timeouts**: put [`tower::timeout`](https://docs.rs/tower/latest/tower/timeout/) *inside*
//!   the breaker (`ServiceBuilder::new().layer(breaker).timeout(d)`) and timeouts count as
//!   failures with the default classifier, as with opossum's `timeout` option.
//! * **Classification**: [`CircuitBreakerLayer::with_classifier`] takes any
//!   `Fn(Result<&Res, &Err>) -> Outcome`;
#![cfg_attr(feature = "http", doc = "  [`HttpClassifier`]")]
#![cfg_attr(not(feature = "http"), doc = "  `HttpClassifier`")]
//!   (feature `http`) counts 5xx responses and transport errors as failures and 4xx as
//!   successes.
//! * **Fallbacks**: [`crate::fallback`] turns a rejection (or any error) into a response.
//! * **Errors**: by default the service's error is [`BoxError`](crate::BoxError), as in
//!   tower: inner errors pass through unchanged and a rejection is a boxed [`CircuitOpen`],
//!   zero-sized like tower's `Overloaded`. [`CircuitBreakerLayer::typed_errors`] switches to
//!   [`Error<E>`], which keeps the inner error's type and a rejection's details
//!   ([`Rejection`]: the breaker's name, its state, `retry_after`); `?` turns it into a
//!   `BoxError` holding the [`Rejection`], which is what
#![cfg_attr(feature = "http", doc = "  [`problem`](crate::problem)")]
#![cfg_attr(not(feature = "http"), doc = "  `problem`")]
//!   (feature `http`) and
#![cfg_attr(feature = "grpc", doc = "  [`grpc`](crate::grpc)")]
#![cfg_attr(not(feature = "grpc"), doc = "  `grpc`")]
//!   (feature `grpc`) need to send `Retry-After` or pushback. Both modes reject without
//!   allocating.
//! * **Sharing**: clones of a service, and every service wrapped by one layer, share one
//!   breaker. Keep breakers by name in a [`Registry`].
//!
//! # Observing
//!
//! [`Breaker::on_event`] (a callback) and [`Breaker::subscribe_all`] (a channel) deliver every
//! [`Event`]: state transitions and rejected calls; [`Breaker::subscribe`] delivers the
//! transitions only. A move to open carries the time probes resume. While nobody listens,
//! events cost one relaxed atomic load.
//!
//! With the `metrics` feature, each breaker reports (label `breaker` = its name):
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `seawall_circuit_breaker_calls_total` | counter | `outcome` = `success`, `failure`, `ignored` | completed calls |
//! | `seawall_circuit_breaker_slow_calls_total` | counter | | calls taking at least `slow_call_duration` |
//! | `seawall_circuit_breaker_rejected_calls_total` | counter | | calls rejected without reaching the service |
//! | `seawall_circuit_breaker_transitions_total` | counter | `from`, `to` (see [`State::as_str`]) | state changes |
//! | `seawall_circuit_breaker_state` | gauge | | 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled |
//!
//! With the `tracing` feature, transitions are logged at `INFO` (`WARN` when opening) and
//! rejections at `DEBUG`, with the fields `breaker`, `from`, `to` and `state`.

mod admission;
pub(crate) mod classify;
mod config;
pub mod error;
mod events;
mod hot;
#[cfg(feature = "http")]
pub(crate) mod http;
mod layer;
mod registry;
mod service;
mod state;
#[cfg(feature = "metrics")]
mod telemetry;
mod window;

pub mod future;

pub(crate) use admission::Admission;
pub use admission::Ticket;
pub use classify::{Classify, ErrorsAreFailures, Outcome, Recorder, refused_locally};
pub use config::{
    CircuitBreakerConfig, CircuitBreakerConfigBuilder, MAX_BUCKETS, MAX_DURATION, MAX_WINDOW_SIZE,
    SlidingWindow,
};
pub use error::{Boxed, CircuitOpen, Error, ErrorMode, Rejection, Typed};
pub use events::{EVENT_CHANNEL_CAPACITY, Event, EventKind};
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use http::HttpClassifier;
pub use layer::CircuitBreakerLayer;
pub use registry::Registry;
pub use service::CircuitBreaker;
pub use state::{Breaker, Snapshot, State};
