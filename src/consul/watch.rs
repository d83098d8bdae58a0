//! Following a service's healthy instances through blocking queries.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::{AnsweredOn, Consistency, ConsulClient, HealthQuery, MAX_WAIT};
use crate::ConfigError;
use crate::discovery::{Health, InstanceWatch, Publisher, SourceStatus};
use crate::rate_limit::{Quota, Rate, RateLimiter};

/// How a [`ConsulWatch`] queries: the blocking wait, the rate of the query loop, the full
/// resync period, the backoff on errors, and which instances count.
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::WatchConfig;
///
/// let config = WatchConfig::builder()
///     .wait(Duration::from_secs(30))
///     .min_interval(Duration::from_millis(500), 2)
///     .backoff(Duration::from_millis(100), Duration::from_secs(10))
///     .tag("v2")
///     .build()?;
/// assert_eq!(config.wait(), Duration::from_secs(30));
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    wait: Duration,
    min_interval: Duration,
    burst: u32,
    resync_interval: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    include_warning: bool,
    tags: Vec<String>,
    filter: Option<String>,
    datacenter: Option<String>,
    consistency: Consistency,
    near: Option<String>,
}

impl Default for WatchConfig {
    /// A 60 s wait; at most one query per second on average, in bursts of 2; a full
    /// resync every 5 minutes; backoff from 250 ms to 30 s; passing instances only.
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(60),
            min_interval: Duration::from_secs(1),
            burst: 2,
            resync_interval: Duration::from_secs(300),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            include_warning: false,
            tags: Vec::new(),
            filter: None,
            datacenter: None,
            consistency: Consistency::Default,
            near: None,
        }
    }
}

impl WatchConfig {
    /// A builder starting from the [defaults](WatchConfig::default).
    pub fn builder() -> WatchConfigBuilder {
        WatchConfigBuilder {
            config: Self::default(),
        }
    }

    /// How long each blocking query may be held.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// The average interval between queries, and the burst allowed.
    pub fn min_interval(&self) -> (Duration, u32) {
        (self.min_interval, self.burst)
    }

    /// How often a full, non-blocking query replaces the blocking one.
    pub fn resync_interval(&self) -> Duration {
        self.resync_interval
    }

    /// The first and the longest wait after a failed query.
    pub fn backoff(&self) -> (Duration, Duration) {
        (self.backoff_base, self.backoff_max)
    }

    /// Whether instances with a warning check are published.
    pub fn includes_warning(&self) -> bool {
        self.include_warning
    }

    fn quota(&self) -> Option<Quota> {
        Quota::new(Rate::new(1, self.min_interval), self.burst).ok()
    }

    fn query(&self, service: &str) -> HealthQuery {
        let mut q = HealthQuery::new(service)
            .passing(!self.include_warning)
            .consistency(self.consistency);
        for tag in &self.tags {
            q = q.tag(tag.clone());
        }
        if let Some(f) = &self.filter {
            q = q.filter(f.clone());
        }
        if let Some(dc) = &self.datacenter {
            q = q.datacenter(dc.clone());
        }
        if let Some(near) = &self.near {
            q = q.near(near.clone());
        }
        q
    }
}

/// Builds a [`WatchConfig`]; see [`WatchConfig::builder`].
#[derive(Debug, Clone)]
pub struct WatchConfigBuilder {
    config: WatchConfig,
}

impl WatchConfigBuilder {
    /// Sets how long each blocking query may be held (default 60 s, at most 10 minutes).
    /// The agent answers as soon as the result may have changed.
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.config.wait = wait;
        self
    }

    /// Rate-limits the query loop with a token bucket: one query per `interval` on
    /// average, `burst` at once (default 1 s, 2). Updates pass at once in the normal case;
    /// when results churn, the loop degrades to polling every `interval`.
    #[must_use]
    pub fn min_interval(mut self, interval: Duration, burst: u32) -> Self {
        self.config.min_interval = interval;
        self.config.burst = burst;
        self
    }

    /// Sets how often a full, non-blocking query is made instead of a blocking one, to
    /// guard against missed wake-ups (default 5 minutes).
    #[must_use]
    pub fn resync_interval(mut self, interval: Duration) -> Self {
        self.config.resync_interval = interval;
        self
    }

    /// Sets the exponential backoff after failed queries: `base` after the first failure,
    /// doubling up to `max`, each wait drawn at random between half and all of it
    /// (default 250 ms to 30 s).
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max;
        self
    }

    /// Also publishes instances with a warning check (and none critical), weighted with
    /// their `Weights.Warning`; by default only instances whose checks all pass are
    /// (`passing=true`).
    #[must_use]
    pub fn include_warning(mut self, include: bool) -> Self {
        self.config.include_warning = include;
        self
    }

    /// Only instances with this tag (repeatable: all must match).
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.config.tags.push(tag.into());
        self
    }

    /// Only instances matching a filter expression, such as `Service.Meta.version == "2"`.
    #[must_use]
    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        self.config.filter = Some(filter.into());
        self
    }

    /// Queries this datacenter instead of the client's default.
    #[must_use]
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.config.datacenter = Some(dc.into());
        self
    }

    /// Which servers may answer (default: the leader).
    #[must_use]
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.config.consistency = consistency;
        self
    }

    /// Sorts by round-trip time from this node (`_agent`: the local agent).
    #[must_use]
    pub fn near(mut self, node: impl Into<String>) -> Self {
        self.config.near = Some(node.into());
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `wait` (zero or over 10 minutes), `min_interval`
    /// (zero, over a year, or a zero burst), `resync_interval` (zero) or `backoff` (a zero
    /// base, or a max under the base).
    pub fn build(self) -> Result<WatchConfig, ConfigError> {
        let c = self.config;
        if c.wait.is_zero() || c.wait > MAX_WAIT {
            return Err(ConfigError::invalid(
                "wait",
                "must be greater than zero and at most 10m",
            ));
        }
        if c.quota().is_none() {
            return Err(ConfigError::invalid(
                "min_interval",
                "needs an interval between 1ns and 365 days and a burst of at least 1",
            ));
        }
        if c.resync_interval.is_zero() {
            return Err(ConfigError::invalid(
                "resync_interval",
                "must be greater than zero",
            ));
        }
        if c.backoff_base.is_zero() || c.backoff_max < c.backoff_base {
            return Err(ConfigError::invalid(
                "backoff",
                "needs a base greater than zero and a max of at least the base",
            ));
        }
        Ok(c)
    }
}

/// Follows the healthy instances of one service through Consul blocking queries, in a
/// background task, and publishes them as [`Instances`](crate::discovery::Instances)
/// snapshots through an [`InstanceWatch`].
///
/// The loop follows the Consul API rules: it sends back `X-Consul-Index` to wait for a
/// change (resetting when the index goes backwards, never sending one below 1),
/// rate-limits itself with a token bucket, replaces a blocking query with a full one
/// every [`resync_interval`](WatchConfigBuilder::resync_interval) and at once when the
/// agent closes a held query unanswered or the connection of the last answer between two
/// queries (a restart, whose index may be lower), compares
/// before publishing (watchers wake only on real changes), and on errors backs off
/// exponentially with jitter while the last instances stay published and the status
/// turns [`SourceStatus::Stale`]; it reports [`SourceStatus::Live`] again after the next
/// successful query.
///
/// Dropping the `ConsulWatch` (or [`stop`](Self::stop)) stops the task; its watchers keep
/// the last snapshot and see the source closed.
///
/// # Observing
///
/// With the `metrics` feature, labelled `service`: the counters
/// `seawall_consul_watch_requests_total` and `seawall_consul_watch_errors_total`, the
/// gauges `seawall_consul_instances` (instances published) and `seawall_consul_watch_stale`
/// (1 while queries fail). With the `tracing` feature: a `DEBUG` event per published
/// change, `WARN` per failed query and when the index goes backwards, `INFO` on recovery.
///
/// # Example
///
/// Not run here (it needs an agent; `tests/consul/client.rs` runs the same against a Consul API
/// double, or a real agent when `CONSUL_HTTP_ADDR` is set):
///
/// ```no_run
/// use seawall::balance::Balance;
/// use seawall::consul::{ConsulClient, ConsulWatch, WatchConfig};
/// use seawall::discovery::{Instance, ServiceDiscover};
/// use tower::service_fn;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let client = ConsulClient::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN
/// let watch = ConsulWatch::spawn(client, "users", WatchConfig::builder().tag("v2").build()?);
/// let discover = ServiceDiscover::new(watch.instances(), |i: &Instance| {
///     let authority = i.authority();
///     service_fn(move |_: ()| {
///         let authority = authority.clone();
///         async move { Ok::<_, seawall::BoxError>(authority) }
///     })
/// });
/// let users = Balance::builder().name("users").build(discover);
/// # let _ = users;
/// println!("watching users: {:?}", watch.status());
/// # Ok(())
/// # }
/// ```
#[must_use = "dropping the watch stops it"]
pub struct ConsulWatch {
    service: Arc<str>,
    watch: InstanceWatch,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Shared {
    index: AtomicU64,
    requests: AtomicU64,
}

impl ConsulWatch {
    /// Starts following `service`'s instances with `client`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(client: ConsulClient, service: impl Into<String>, config: WatchConfig) -> Self {
        let service: Arc<str> = Arc::from(service.into());
        let publisher = Publisher::new();
        let watch = publisher.subscribe();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(run(
            client,
            service.clone(),
            config,
            publisher,
            shared.clone(),
        ));
        Self {
            service,
            watch,
            shared,
            task,
        }
    }

    /// A new watcher of the instances.
    pub fn instances(&self) -> InstanceWatch {
        self.watch.clone()
    }

    /// Whether the published instances are current.
    pub fn status(&self) -> SourceStatus {
        self.watch.status()
    }

    /// The service followed.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The last `X-Consul-Index` received (0 before the first answer).
    pub fn index(&self) -> u64 {
        self.shared.index.load(Relaxed)
    }

    /// How many queries have been sent.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Relaxed)
    }

    /// Stops the task (as dropping does).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ConsulWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for ConsulWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulWatch")
            .field("service", &self.service)
            .field("index", &self.index())
            .field("watch", &self.watch)
            .finish()
    }
}

/// Exponential backoff with jitter ([`crate::util::backoff`]): `base × 2^(failures − 1)`
/// capped at `max`, drawn between half and all of it.
pub(crate) fn backoff(failures: u32, base: Duration, max: Duration, rng: &mut u64) -> Duration {
    crate::util::backoff(failures, base, 2.0, max, (0.5, 1.0), next_unit(rng))
}

pub(crate) use crate::util::{next_unit, seed};

#[cfg(feature = "metrics")]
struct Metrics {
    requests: metrics::Counter,
    errors: metrics::Counter,
    instances: metrics::Gauge,
    stale: metrics::Gauge,
}

#[cfg(feature = "metrics")]
impl Metrics {
    fn new(service: &str) -> Self {
        let label = || ("service", service.to_owned());
        Self {
            requests: metrics::counter!("seawall_consul_watch_requests_total", &[label()]),
            errors: metrics::counter!("seawall_consul_watch_errors_total", &[label()]),
            instances: metrics::gauge!("seawall_consul_instances", &[label()]),
            stale: metrics::gauge!("seawall_consul_watch_stale", &[label()]),
        }
    }
}

async fn run(
    client: ConsulClient,
    service: Arc<str>,
    config: WatchConfig,
    publisher: Publisher,
    shared: Arc<Shared>,
) {
    #[cfg(feature = "metrics")]
    let metrics = Metrics::new(&service);
    // Validated by the builder; the default is valid.
    let quota = config.quota().unwrap_or_else(|| {
        WatchConfig::default()
            .quota()
            .expect("the default quota is valid")
    });
    let limiter = RateLimiter::new(quota);
    let base_query = config.query(&service);
    let mut rng = seed(&service);
    let mut index: u64 = 0;
    let mut next_resync = super::later(config.resync_interval);
    let mut failures: u32 = 0;
    let mut stale_since: Option<Instant> = None;
    // The connection the last answer came on.
    let mut answered_on = AnsweredOn::default();
    loop {
        match limiter.reserve(1, Duration::MAX) {
            Ok(r) if !r.wait.is_zero() => tokio::time::sleep(r.wait).await,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(config.min_interval).await,
        }
        // The last answer's connection closed while the watch waited to send the next
        // query: the agent went away between two queries, and the one the next query
        // reaches (a restart, perhaps with a lower index) would hold a blocking query on
        // the old index for its whole wait. A full query asks it what it has now.
        let reconnected = index != 0 && answered_on.is_closed();
        #[cfg(feature = "tracing")]
        if reconnected {
            tracing::debug!(
                service = %service,
                "the connection of consul's last answer closed; starting over with a full query"
            );
        }
        let full = index == 0 || reconnected || Instant::now() >= next_resync;
        let (query, sent) = if full {
            (base_query.clone(), 0)
        } else {
            (base_query.clone().index(index).wait(config.wait), index)
        };
        shared.requests.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        metrics.requests.increment(1);
        match client.health_service(&query).await {
            Ok(response) => {
                if full {
                    next_resync = super::later(config.resync_interval);
                }
                let mut next = response.index;
                if next < sent || (full && next < index) {
                    // The index went backwards (a restored snapshot, a new leader with a
                    // different raft log, an agent restarted without its data): after a
                    // blocking query, restart the loop; a full query's index is current.
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        service = %service,
                        previous = index,
                        received = next,
                        "consul index went backwards; resetting"
                    );
                    if next < sent {
                        next = 0;
                    }
                }
                // Never send an index below 1: an index of 0 would make every query
                // return at once.
                index = next.max(1);
                shared.index.store(response.index, Relaxed);
                answered_on = response.answered_on;
                let mut instances = response.instances;
                if !config.include_warning {
                    instances.retain(|i| i.health == Health::Passing);
                }
                #[cfg(feature = "metrics")]
                metrics.instances.set(instances.len() as f64);
                let _count = instances.len();
                // Live before the instances: whoever wakes on them sees a current status.
                publisher.set_status(SourceStatus::Live);
                let _changed = publisher.publish(instances);
                #[cfg(feature = "tracing")]
                if _changed {
                    tracing::debug!(
                        service = %service,
                        index = response.index,
                        instances = _count,
                        skipped = response.skipped_count,
                        "consul watch published a change"
                    );
                }
                if failures > 0 {
                    #[cfg(feature = "tracing")]
                    tracing::info!(service = %service, failures, "consul watch recovered");
                    #[cfg(feature = "metrics")]
                    metrics.stale.set(0.0);
                }
                failures = 0;
                stale_since = None;
            }
            // A blocking query's held connection closed without an answer: the agent went
            // away (a restart, perhaps with a lower index, which a query blocking on the
            // old one would wait out) or closed the connection as the query went out.
            // Neither is an outage yet: start over at once with a full query, which the
            // client does not send again on its own; an agent that is down shows on it.
            Err(error) if !full && failures == 0 && error.is_transport() && !error.is_connect() => {
                #[cfg(feature = "tracing")]
                tracing::debug!(
                    service = %service,
                    %error,
                    "consul closed a blocking query unanswered; starting over with a full query"
                );
                #[cfg(not(feature = "tracing"))]
                let _ = error;
                next_resync = Instant::now();
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let since = *stale_since.get_or_insert_with(Instant::now);
                let delay = backoff(failures, config.backoff_base, config.backoff_max, &mut rng);
                #[cfg(feature = "metrics")]
                {
                    metrics.errors.increment(1);
                    metrics.stale.set(1.0);
                }
                #[cfg(feature = "tracing")]
                tracing::warn!(
                    service = %service,
                    %error,
                    failures,
                    retry_in = ?delay,
                    "consul watch query failed; keeping the last instances"
                );
                publisher.set_status(SourceStatus::Stale {
                    since,
                    failures,
                    error: Arc::from(error.to_string()),
                });
                tokio::time::sleep(delay).await;
                // After an outage the agent's index may be anything: start over with a
                // full query instead of blocking on an index it may not reach.
                next_resync = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut rng = 7;
        for failures in 1..200 {
            let full = if failures > 6 {
                max
            } else {
                (base * (1 << (failures - 1))).min(max)
            };
            let d = backoff(failures, base, max, &mut rng);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
        }
        assert!(backoff(u32::MAX, base, max, &mut rng) <= max);
        // Jitter spreads.
        let draws: Vec<_> = (0..20).map(|_| backoff(10, base, max, &mut rng)).collect();
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn config_is_validated() {
        let field = |b: WatchConfigBuilder| b.build().unwrap_err().field().to_owned();
        assert_eq!(field(WatchConfig::builder().wait(Duration::ZERO)), "wait");
        assert_eq!(
            field(WatchConfig::builder().wait(Duration::from_secs(601))),
            "wait"
        );
        assert_eq!(
            field(WatchConfig::builder().min_interval(Duration::ZERO, 2)),
            "min_interval"
        );
        assert_eq!(
            field(WatchConfig::builder().min_interval(Duration::from_secs(1), 0)),
            "min_interval"
        );
        assert_eq!(
            field(WatchConfig::builder().resync_interval(Duration::ZERO)),
            "resync_interval"
        );
        assert_eq!(
            field(WatchConfig::builder().backoff(Duration::from_secs(2), Duration::from_secs(1))),
            "backoff"
        );
        assert_eq!(
            WatchConfig::builder().build().unwrap(),
            WatchConfig::default()
        );
    }

    #[test]
    fn the_query_asks_for_passing_instances_unless_told_otherwise() {
        let q = WatchConfig::default().query("users");
        assert_eq!(q, HealthQuery::new("users").passing(true));
        let c = WatchConfig::builder()
            .include_warning(true)
            .build()
            .unwrap();
        assert_eq!(c.query("users"), HealthQuery::new("users"));
    }
}
