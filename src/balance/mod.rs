//! Client-side load balancing over discovered endpoints.
//!
//! [`Balance`] spreads requests over the endpoints of a [`tower::discover::Discover`]
//! stream (usually a [`ServiceDiscover`](crate::discovery::ServiceDiscover) over Consul,
//! the in-process registry or a static list). Each endpoint's service stack (client,
//! timeout, limiter…) is built by the discovery's `make` function when the instance
//! appears and dropped when it goes, so per-endpoint state never leaks.
//!
//! * **Strategies** ([`Strategy`]): power of two choices on outstanding requests (the
//!   default) or on peak-EWMA latency, both weighted by the instances' weights (Consul's
//!   `Weights`), and smooth weighted round robin. [`HashBalance`] adds consistent hashing
//!   by a request key (Maglev).
//! * **Per-endpoint breaking**: with [`endpoint_breaker`](BalanceBuilder::endpoint_breaker)
//!   every endpoint gets its own [`circuit_breaker`](crate::circuit_breaker) (named
//!   `<balancer>/<endpoint>`); open breakers take the endpoint out of rotation, half-open
//!   ones get their probes. [`OutlierDetection`] ejects endpoints that fail in a row or at a
//!   high rate, for a growing time, never more than a maximum share at once.
//! * **Readiness**: endpoints that are not ready are skipped without blocking the others;
//!   with no endpoint at all a request fails at once with [`NoEndpoints`] or waits up to a
//!   configured time ([`WhenEmpty`]), never hangs.
//! * **Observability**: [`BalanceHandle::endpoints`] lists each endpoint's load, breaker
//!   state and ejection; metrics and tracing events are listed in the table below.
//!
//! Picking an endpoint costs no allocation and O(1) work in the number of endpoints (a
//! weighted draw from an alias table, a schedule slot or a Maglev entry).
//!
//! ```
//! use std::time::Duration;
//! use seawall::balance::{Balance, OutlierDetection, Strategy};
//! use seawall::discovery::{Instance, Registry, ServiceDiscover};
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), seawall::BoxError> {
//! let registry = Registry::new();
//! let _a = registry.register(Instance::local("users", "127.0.0.1:8081".parse()?));
//! let _b = registry.register(Instance::local("users", "127.0.0.1:8082".parse()?));
//!
//! // One service stack per instance; a real one would wrap an HTTP client.
//! let discover = ServiceDiscover::new(registry.watch("users"), |i: &Instance| {
//!     let port = i.port;
//!     service_fn(move |_req: ()| async move { Ok::<_, seawall::BoxError>(port) })
//! });
//! let mut users = Balance::builder()
//!     .name("users")
//!     .strategy(Strategy::peak_ewma())
//!     .outlier_detection(OutlierDetection::builder().consecutive_failures(3).build()?)
//!     .build(discover);
//! let port = users.ready().await?.call(()).await?;
//! assert!(port == 8081 || port == 8082);
//! # Ok(())
//! # }
//! ```
//!
//! ## Metrics (feature `metrics`)
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `seawall_balance_ejections_total` | counter | `balancer`, `endpoint` |
//! | `seawall_balance_readmissions_total` | counter | `balancer`, `endpoint` |
//! | `seawall_balance_ejections_suppressed_total` | counter | `balancer` |
//! | `seawall_balance_endpoints` | gauge | `balancer` |
//!
//! Per-endpoint breakers report as any breaker does, under the name `<balancer>/<endpoint>`.

mod config;
pub mod error;
pub mod future;
mod hash;
mod service;
mod set;
mod shared;
mod stats;
mod telemetry;
mod weights;

pub(crate) use future::CallGuard;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering::*;
use std::time::Duration;

use crate::ConfigError;
pub use config::{OutlierDetection, OutlierDetectionBuilder, Strategy, WhenEmpty};
pub use error::{NoEndpoints, ReadyTimeout};
pub use hash::HashBalance;
pub use service::Balance;
pub use shared::{SharedBalance, SharedCall};

use crate::circuit_breaker::{CircuitBreakerConfig, ErrorsAreFailures, State};
use crate::clock::{Clock, TokioClock};
use crate::discovery::Endpoint;
use set::{EndpointSet, Index, StatusEntry};
use stats::SetShared;

/// What a balancer needs to know about an endpoint besides its service: its weight, and
/// an address for status reports. Implemented by [`Endpoint`], what
/// [`ServiceDiscover`](crate::discovery::ServiceDiscover) yields.
pub trait BalanceEndpoint {
    /// The endpoint's relative share of traffic (0 counts as 1).
    fn weight(&self) -> u32;

    /// Where the endpoint is, for status reports.
    fn address(&self) -> String;
}

impl<S> BalanceEndpoint for Endpoint<S> {
    fn weight(&self) -> u32 {
        self.instance().weight.get()
    }

    fn address(&self) -> String {
        self.instance().authority()
    }
}

/// Configures a [`Balance`] or a [`HashBalance`].
///
/// ```
/// use std::time::Duration;
/// use seawall::balance::{Balance, OutlierDetection, Strategy, WhenEmpty};
/// use seawall::circuit_breaker::{CircuitBreakerConfig, HttpClassifier};
///
/// let builder = Balance::builder()
///     .name("users")
///     .strategy(Strategy::peak_ewma())
///     // Eject an endpoint after 5 failures in a row, for 30 s at first.
///     .outlier_detection(OutlierDetection::builder().consecutive_failures(5).build()?)
///     // And give each endpoint its own breaker, named `users/<address>`.
///     .endpoint_breaker(CircuitBreakerConfig::builder().failure_rate_threshold(0.5).build()?)
///     // 5xx answers are failures; wait up to 2 s for an endpoint when there is none.
///     .classifier(HttpClassifier::default())
///     .when_empty(WhenEmpty::Wait(Duration::from_secs(2)));
/// # let _ = builder;
/// # Ok::<(), seawall::ConfigError>(())
/// ```
pub struct BalanceBuilder<C = ErrorsAreFailures> {
    name: Arc<str>,
    strategy: Strategy,
    outlier: Option<OutlierDetection>,
    breaker: Option<CircuitBreakerConfig>,
    classifier: C,
    when_empty: WhenEmpty,
    clock: Arc<dyn Clock>,
    seed: u64,
    endpoint_metrics: bool,
}

impl Balance<Unbuilt> {
    /// A [`BalanceBuilder`] holding the defaults: power of two choices on outstanding
    /// requests, no outlier detection, no per-endpoint breakers, every error a failure
    /// ([`ErrorsAreFailures`]: but a rate limit's own refusals), failing at once when
    /// there is no endpoint, tokio's clock. It builds a [`Balance`]
    /// ([`build`](BalanceBuilder::build)) or a [`HashBalance`]
    /// ([`build_hashed`](BalanceBuilder::build_hashed)).
    ///
    /// ```
    /// use seawall::balance::{Balance, Strategy};
    ///
    /// let builder = Balance::builder().name("users").strategy(Strategy::RoundRobin);
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn builder() -> BalanceBuilder {
        BalanceBuilder::default()
    }
}

/// The type [`Balance::builder`] is defined on, as `HashMap::new` is on `HashMap<K, V,
/// RandomState>`: no balancer is ever built over it.
#[doc(hidden)]
#[derive(Debug)]
pub enum Unbuilt {}

impl futures_core::Stream for Unbuilt {
    type Item = Result<tower::discover::Change<(), ()>, std::convert::Infallible>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match *self {}
    }
}

impl Default for BalanceBuilder {
    fn default() -> Self {
        Self {
            name: Arc::from("balance"),
            strategy: Strategy::default(),
            outlier: None,
            breaker: None,
            classifier: ErrorsAreFailures,
            when_empty: WhenEmpty::Fail,
            clock: Arc::new(TokioClock::new()),
            // Differs between balancers and processes: balancers do not draw in lockstep.
            seed: crate::util::seed("balance"),
            endpoint_metrics: true,
        }
    }
}

impl<C> BalanceBuilder<C> {
    /// The balancer's name, in metrics, events and per-endpoint breaker names.
    #[must_use]
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// How endpoints are picked ([`HashBalance`] ignores it).
    #[must_use]
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Ejects failing endpoints from rotation for a while.
    #[must_use]
    pub fn outlier_detection(mut self, detection: OutlierDetection) -> Self {
        self.outlier = Some(detection);
        self
    }

    /// Gives every endpoint its own circuit breaker configured from `template` (named
    /// `<balancer>/<endpoint>`); an endpoint whose breaker is open is out of rotation.
    #[must_use]
    pub fn endpoint_breaker(mut self, template: CircuitBreakerConfig) -> Self {
        self.breaker = Some(template);
        self
    }

    /// Whether the series labelled by endpoint go to the `metrics` facade (default: on):
    /// the endpoint breakers' `seawall_circuit_breaker_*` and
    /// `seawall_balance_ejections_total` / `seawall_balance_readmissions_total`.
    ///
    /// The facade cannot remove a series, so with endpoints that come and go (a new
    /// address or ID at each deploy) every endpoint the balancer ever had keeps its series
    /// for the life of the process, an open breaker's state gauge included. Turn them off
    /// for such fleets and read each endpoint's figures from
    /// [`BalanceHandle::endpoints`] (as the gateway's `/metrics` does); the balancer's own
    /// series (`seawall_balance_endpoints`, `seawall_balance_ejections_suppressed_total`)
    /// stay, and an endpoint breaker then completes its calls on the path a breaker takes
    /// without the `metrics` feature.
    #[must_use]
    pub fn endpoint_metrics(mut self, on: bool) -> Self {
        self.endpoint_metrics = on;
        self
    }

    /// What a balancer with no endpoint does with a request.
    #[must_use]
    pub fn when_empty(mut self, when_empty: WhenEmpty) -> Self {
        self.when_empty = when_empty;
        self
    }

    /// The clock for latency and ejection times (default: [`TokioClock`], which follows
    /// tokio's paused time in tests and reads the CPU's time-stamp counter otherwise).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Seeds the random draws, for reproducible tests.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// How call outcomes count for outlier detection and the endpoint breakers (default:
    /// every error is a failure; see [`HttpClassifier`](crate::circuit_breaker) for HTTP).
    #[must_use]
    pub fn classifier<C2>(self, classifier: C2) -> BalanceBuilder<C2> {
        BalanceBuilder {
            name: self.name,
            strategy: self.strategy,
            outlier: self.outlier,
            breaker: self.breaker,
            classifier,
            when_empty: self.when_empty,
            clock: self.clock,
            seed: self.seed,
            endpoint_metrics: self.endpoint_metrics,
        }
    }

    /// Checks the settings that are not checked by their own types.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for a peak-EWMA duration of zero or above 365 days, or an empty
    /// wait above 365 days.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Strategy::PeakEwma { default_rtt, decay } = self.strategy {
            for d in [default_rtt, decay] {
                if d.is_zero() || d > config::MAX_DURATION {
                    return Err(ConfigError::invalid(
                        "strategy",
                        format!(
                            "a peak-EWMA duration of {d:?}: must be above zero and at most 365 days"
                        ),
                    ));
                }
            }
        }
        if let WhenEmpty::Wait(d) | WhenEmpty::WaitAtStart(d) = self.when_empty {
            if d > config::MAX_DURATION {
                return Err(ConfigError::invalid(
                    "when_empty",
                    format!("a wait of {d:?}: at most 365 days"),
                ));
            }
        }
        Ok(())
    }

    /// A [`Balance`] over `discover`.
    ///
    /// # Panics
    ///
    /// Never for settings that pass [`validate`](Self::validate); use
    /// [`try_build`](Self::try_build) to get the error instead.
    pub fn build<D>(self, discover: D) -> Balance<D, C>
    where
        D: tower::discover::Discover + Unpin,
        D::Key: Hash + Eq + Clone + fmt::Display,
        D::Service: BalanceEndpoint,
    {
        Balance::from_builder(self.sanitized(), discover)
    }

    /// A [`Balance`] over `discover`, after [`validate`](Self::validate).
    ///
    /// # Errors
    ///
    /// The first invalid setting.
    pub fn try_build<D>(self, discover: D) -> Result<Balance<D, C>, ConfigError>
    where
        D: tower::discover::Discover + Unpin,
        D::Key: Hash + Eq + Clone + fmt::Display,
        D::Service: BalanceEndpoint,
    {
        self.validate()?;
        Ok(Balance::from_builder(self, discover))
    }

    /// A [`HashBalance`] over `discover`, routing by `key` (a stable hash of the request's
    /// key, see [`hash_key`]; `None` for requests without one).
    pub fn build_hashed<D, F>(self, discover: D, key: F) -> HashBalance<D, F, C>
    where
        D: tower::discover::Discover + Unpin,
        D::Key: Hash + Eq + Clone + fmt::Display,
        D::Service: BalanceEndpoint,
    {
        HashBalance::from_builder(self.sanitized(), discover, key)
    }

    /// Settings that fail [`validate`](Self::validate) replaced by their defaults, so that
    /// `build` cannot panic.
    fn sanitized(mut self) -> Self {
        if let Err(_e) = self.validate() {
            #[cfg(feature = "tracing")]
            tracing::warn!(target: "seawall::balance", error = %_e, "invalid balancer setting replaced by its default");
            if matches!(self.strategy, Strategy::PeakEwma { .. }) {
                self.strategy = Strategy::peak_ewma();
            }
            match self.when_empty {
                WhenEmpty::Wait(d) => {
                    self.when_empty = WhenEmpty::Wait(d.min(config::MAX_DURATION));
                }
                WhenEmpty::WaitAtStart(d) => {
                    self.when_empty = WhenEmpty::WaitAtStart(d.min(config::MAX_DURATION));
                }
                WhenEmpty::Fail => {}
            }
        }
        self
    }

    pub(crate) fn endpoint_set<K, S>(&self, index: Index) -> (EndpointSet<K, S>, BalanceHandle)
    where
        K: Hash + Eq + Clone + fmt::Display,
        S: BalanceEndpoint,
    {
        let mut shared = SetShared::new(
            self.name.clone(),
            self.clock.clone(),
            self.outlier.clone(),
            self.strategy,
        );
        shared.endpoint_series = self.endpoint_metrics;
        let shared = Arc::new(shared);
        let status = Arc::new(parking_lot::RwLock::new(Vec::new()));
        let default_rtt = match self.strategy {
            Strategy::PeakEwma { default_rtt, .. } => Some(default_rtt),
            _ => None,
        };
        let handle = BalanceHandle {
            shared: shared.clone(),
            status: status.clone(),
        };
        let breaker = self.breaker.clone().map(|mut template| {
            template.facade_metrics = self.endpoint_metrics;
            template
        });
        let set = EndpointSet::new(shared, breaker, default_rtt, index, status);
        (set, handle)
    }
}

impl<C> fmt::Debug for BalanceBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceBuilder")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("outlier", &self.outlier)
            .field(
                "breaker",
                &self.breaker.as_ref().map(|b| b.name().to_owned()),
            )
            .field("classifier", &std::any::type_name::<C>())
            .field("when_empty", &self.when_empty)
            .field("endpoint_metrics", &self.endpoint_metrics)
            .finish()
    }
}

/// A handle to a balancer's endpoints, for status pages and tests. Cloning is cheap; it
/// outlives the balancer (and then reports no endpoints).
#[derive(Clone)]
pub struct BalanceHandle {
    shared: Arc<SetShared>,
    status: Arc<parking_lot::RwLock<Vec<StatusEntry>>>,
}

impl BalanceHandle {
    /// The balancer's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// How many endpoints the balancer holds.
    pub fn len(&self) -> usize {
        self.shared.endpoints.load(Acquire)
    }

    /// Whether the balancer holds no endpoint.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many endpoints are ejected now.
    pub fn ejected(&self) -> usize {
        // Ejections that ran out end when read.
        for entry in self.status.read().iter() {
            entry.stats.ejected_for();
        }
        self.shared.ejected.load(Acquire)
    }

    /// Ejections refused so far because the maximum share was already ejected.
    pub fn ejections_suppressed(&self) -> u64 {
        self.shared.ejections_suppressed.load(Relaxed)
    }

    /// Every endpoint's state, read now.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.status
            .read()
            .iter()
            .map(|e| EndpointStatus {
                key: e.key.clone(),
                address: e.address.clone(),
                weight: e.weight,
                outstanding: e.stats.outstanding(),
                calls: e.stats.started(),
                failures: e.stats.failures_total.load(Relaxed),
                ejected_for: e.stats.ejected_for(),
                ejections: e.stats.ejections_total.load(Relaxed),
                breaker: e.breaker.as_ref().map(|b| b.state()),
            })
            .collect()
    }
}

impl fmt::Debug for BalanceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceHandle")
            .field("name", &self.shared.name)
            .field("endpoints", &self.len())
            .field("ejected", &self.shared.ejected.load(Relaxed))
            .finish()
    }
}

/// One endpoint's state, as [`BalanceHandle::endpoints`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The discovery key (for Consul and the registry, `node/service-id`).
    pub key: String,
    /// `host:port`.
    pub address: String,
    /// Its weight.
    pub weight: u32,
    /// Requests in flight.
    pub outstanding: u32,
    /// Calls sent to it.
    pub calls: u64,
    /// Failed calls.
    pub failures: u64,
    /// How much longer it stays ejected, if it is.
    pub ejected_for: Option<Duration>,
    /// How many times it has been ejected.
    pub ejections: u64,
    /// Its breaker's state, with per-endpoint breakers.
    pub breaker: Option<State>,
}

/// A stable 64-bit hash of `key` for [`HashBalance`]: FNV-1a over the value's `Hash`
/// bytes, then mixed. The same in every process of the same build (unlike std's
/// `RandomState`), so replicas agree on where a key goes. Integers hash in native byte
/// order; hash strings or byte slices for agreement across architectures.
pub fn hash_key<T: Hash + ?Sized>(key: &T) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    key.hash(&mut h);
    weights::mix(h.0)
}

/// The stable hash of an endpoint key: of its `Display` text.
pub(crate) fn stable_hash<K: fmt::Display>(key: &K) -> u64 {
    hash_key(key.to_string().as_str())
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
