//! A token bucket kept in Redis, shared by a fleet of replicas (feature `redis`).
//!
//! [`RedisRateLimiter`] is a [`Limit`](super::Limit), as the local limiters are: used
//! directly, one global bucket (the Redis key `prefix:{all}`); through
//! [`RedisRateLimiter::per_key`], a [`RedisLimit`], a bucket per key taken from each
//! request (the same extractors and [`OnMissingKey`](super::OnMissingKey) as
//! [`PerKey`](super::PerKey)). The generic layers answer for it: [`LimitLayer`](super::LimitLayer)
//! (a refusal is a [`RateLimited`] error; Redis unavailable under
//! [`FailurePolicy::FailClosed`] is a [`RedisLimitError::Unavailable`] error) and, with
//! the `http` feature, `http::HttpRateLimitLayer` (a `429` with rate-limit headers; `503`
//! with `Retry-After: 1` while Redis is unavailable and the limit fails closed).
//! [`RedisRateLimitLayer`] and `http::HttpRedisRateLimitLayer` name those layers over a
//! [`RedisLimit`]. The check is one round trip, so these layers hold a ready clone of the
//! inner service (which must be `Clone`) until the decision comes.
//!
//! ```no_run
//! use seawall::rate_limit::redis::RedisRateLimiter;
//! use seawall::rate_limit::{LimitLayer, Quota, Rate, RateLimitLayer};
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), seawall::BoxError> {
//! let fleet = RedisRateLimiter::builder("redis://127.0.0.1:6379", Quota::new(Rate::per_second(100), 100)?)
//!     .prefix("tenants")
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     // This replica's own limit outside: it hands its token back when Redis refuses.
//!     .layer(RateLimitLayer::new(Quota::new(Rate::per_second(500), 500)?))
//!     // 100 a second per tenant across the fleet, innermost.
//!     .layer(LimitLayer::new(fleet.per_key(|tenant: &String| Some(tenant.clone()))))
//!     .service_fn(|_tenant: String| async { Ok::<_, seawall::BoxError>("ok") });
//! # let _ = svc;
//! # Ok(())
//! # }
//! ```
//!
//! No refunds: tokens taken in Redis are not handed back when a limit further in refuses
//! the request (see [stacked limits](super#stacked-limits)). A refund would be a second
//! round trip (a script moving the key's arrival time back), paid on every inner refusal,
//! racing the key's expiry, and lost while Redis is unavailable; with batching, tokens
//! are taken ahead, so there would be nothing exact to give back either. Put the Redis
//! limit innermost: the local limits outside it refund when it refuses.
//!
//! # Redis Cluster
//!
//! [`RedisRateLimiter::cluster_builder`] takes a cluster's seed nodes instead of one URL.
//! Each bucket is one key, `prefix:{key}`; its script reads and writes that key only, so it
//! runs on the one master holding the key's slot (the braces are a hash tag: a key the
//! script might add for the same bucket would land in the same slot). `%`, `{` and `}` in
//! a key are written `%25`, `%7B` and `%7D`, so that the whole key is the tag: a client
//! choosing its key cannot cut the tag short to put its buckets on a slot of its choice. A
//! [prefix](RedisRateLimiterBuilder::prefix) holding a brace is refused when the limiter
//! is built: its `{` would open the tag first, putting every bucket on one slot. The client follows
//! the cluster's slot map: `MOVED` / `ASK` redirections, resharding and failovers need no
//! restart. Every check still runs under the timeout and the breaker below, which guard
//! the cluster as a whole.
//!
//! - **A master with a replica fails:** after the cluster's `cluster-node-timeout` the
//!   replica is promoted and holds the buckets as replicated; until then the failed
//!   master's keys are answered by the [`FailurePolicy`], and the client reaches the new
//!   master by itself (tested: promoted within seconds at a 1 s node timeout, with the
//!   bucket's level kept, less any writes not yet replicated).
//! - **A master without a replica fails:** its slots have no owner. With
//!   `cluster-require-full-coverage no` (recommended) the other masters keep serving their
//!   keys; the dead master's keys are answered by the policy, within the timeout. Their
//!   failures count in the one breaker, so when they are a large part of the traffic the
//!   breaker opens and every key goes to the policy until a probe succeeds. When the
//!   master is back (same node, same `nodes.conf`), its keys are in Redis again. With
//!   full coverage required (Redis' default) the whole cluster refuses writes meanwhile
//!   (`CLUSTERDOWN`), and every key takes the policy.
//!
//! When to use a cluster: one Redis on loopback carries tens of thousands of checks a
//! second per connection (see the crate's BENCHMARKS.md); a cluster spreads the keys, and
//! so the load, over its masters, for fleets whose checks outgrow one server's core.
//!
//! # TLS
//!
//! With the `redis-tls` feature, a `rediss://` URL (or cluster nodes) connects over TLS
//! (rustls, TLS 1.2 and 1.3), the server's certificate checked for the URL's host against
//! webpki-roots, or against a private CA given with
#![cfg_attr(feature = "redis-tls", doc = "[`RedisTls`],")]
#![cfg_attr(not(feature = "redis-tls"), doc = "`RedisTls`,")]
//! which also holds a client
//! certificate for a server that asks for one (`valkeys://` is TLS too). Without the
//! feature a `rediss://` URL is refused when the limiter is built, as is a TLS URL with a
//! `#insecure` fragment (also with spaces, tabs or line breaks, which the URL parser
//! drops): the certificate is always checked. The handshake is part of connecting, so it
//! runs under the [timeout](RedisRateLimiterBuilder::timeout), and a server whose
//! certificate fails the check is a Redis that cannot answer: its checks are answered by
//! the [`FailurePolicy`].
//!
//! # Failures, timeouts and recovery
//!
//! Every check waits at most the [timeout](RedisRateLimiterBuilder::timeout) for Redis,
//! and runs behind a [circuit breaker](crate::circuit_breaker); a check Redis could not
//! answer (an error or the timeout) is answered by the [`FailurePolicy`]: this replica's
//! local share, or a refusal.
//!
//! The defaults are chosen so that a *slow but healthy* Redis does not flip replicas to
//! their local shares, while a *dead* one still trips the breaker quickly:
//!
//! | setting | default |
//! |---|---|
//! | timeout | 200 ms |
//! | window | the last 20 calls, evaluated from the 10th |
//! | opens at | 50 % failed (timeouts count as failures) |
//! | open wait | 1 s, doubling on each failed probe, up to 30 s; one probe |
//!
//! - **Slow but healthy.** A healthy Redis answers in well under a millisecond; on a
//!   saturated machine (say load 7 on 2 cores) answers of 20 to 80 ms were seen, with
//!   spikes. Those stay inside 200 ms, and to open the breaker half of the last 20 checks
//!   must have failed: isolated slow answers cannot reach it, only a Redis (or a
//!   machine) slower than 200 ms for most checks can. The old defaults (50 ms, 5 of the
//!   last 10) flipped a replica for about a second after a handful of 50 ms answers.
//! - **Dead (connection refused).** Every check fails at once (two refused connection
//!   attempts, well under a millisecond on a LAN), and is answered by the policy without
//!   waiting; the breaker opens after at most 10 failed checks (half of the window of 20
//!   when Redis had been answering; the minimum of 10 calls from the start). So a dead
//!   Redis costs at most 10 checks of well under a millisecond each before it is no
//!   longer tried.
//! - **Hung (accepts, never answers; or an unreachable host).** Each check waits the
//!   whole timeout, 200 ms, before the policy answers it; the breaker opens after 10 such
//!   checks (with concurrent traffic they overlap: about 200 ms in all). This is the price
//!   of tolerating slow answers: lower the timeout when a request cannot afford 200 ms,
//!   and keep the window large enough that a few timeouts do not reach half of it.
//!
//! While open, checks go straight to the policy; after the open wait one probe goes to
//! Redis, and limiting is distributed again as soon as it succeeds.
//!
//! **Failing open is never silent.** Every check the local share answers under
//! [`FailurePolicy::FailOpen`], from the first failed check on (before the breaker opens,
//! while it is open, and on a failed probe), is counted
//! (`seawall_rate_limit_redis_checks_total{limiter, source="local"}` for a named limiter)
//! and, with the `tracing` feature, logged at warn level: the first, then at most one line
//! every 10 s per limiter, with the error met, the `checks` the local share answered since
//! the line before and how many of them it admitted (`admitted_unchecked`). Failing
//! closed is logged the same way (`checks` refused since the line before), and counted
//! under `source="unavailable"`.
//!
//! **Reconnection.** The connection is re-made by redis' connection manager. After a
//! failed reconnection, it hands the *stale* error (`Reconnecting failed: Connection
//! refused`) to the next call, at once, and only then starts reconnecting; left alone, the
//! first probe after Redis came back would fail that way and re-open the breaker for
//! twice as long. So a check that fails with a connection error (not a timeout) is retried
//! once, at once, inside the same timeout: the retry awaits the fresh reconnection, and the
//! first check after Redis is reachable again succeeds. The manager does not retry with
//! backoff by itself (a failed reconnection fails at once; the next check starts another).
//! Retries are counted ([`RedisRateLimiter::reconnect_retries`], and
//! `seawall_rate_limit_redis_retries_total{limiter}` for a named limiter) and logged at
//! debug level. A retried check may take tokens twice if Redis ran the script but the
//! answer was lost with the connection: the fleet then admits less, never more.
//!
//! A timeout is not an error the manager reconnects on, so a connection that went silent
//! (a flow a NAT, load balancer or firewall dropped without a reset) would carry every
//! probe to nowhere until the kernel gives it up, many minutes later. So a check that
//! times out and leaves the breaker open (the one that opened it, or a probe) drops the
//! connection: the next probe makes a new one.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::error::RateLimited;
use super::quota::Quota;
use super::{Admitted, KeyedRateLimiter, TokioClock};
use crate::circuit_breaker::{Breaker, CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow};
use crate::{BoxError, ConfigError};

mod layer;
#[cfg(feature = "redis-tls")]
mod tls;

pub use layer::{RedisCheck, RedisLimit, RedisRateLimit, RedisRateLimitLayer};
#[cfg(feature = "redis-tls")]
pub use tls::RedisTls;

/// The Redis key suffix of the bucket shared by requests without a key
/// ([`OnMissingKey::Shared`](super::OnMissingKey::Shared)): a NUL byte, which no extracted
/// key holds (header values, addresses and paths cannot).
pub(crate) const SHARED_KEY: &str = "\0shared";

/// Refuses what the `redis` crate would take but this limiter must not: a `rediss://` (or
/// `valkeys://`) URL without TLS built in (the crate's own error says only that a feature
/// is missing), one that turns the certificate check off (`#insecure`, however spelled
/// with spaces, tabs or line breaks the URL parser drops), and TLS settings for a URL
/// that would connect in plain text. `at` names the setting.
fn check_url(at: &str, url: &str, tls_settings: bool) -> Result<(), ConfigError> {
    let crate::util::RedisUrlTls { secure, fragment } = crate::util::RedisUrlTls::of(url);
    if secure && !cfg!(feature = "redis-tls") {
        return Err(ConfigError::invalid(
            at.to_owned(),
            "a `rediss://` URL (TLS) needs seawall's `redis-tls` feature, which this build lacks",
        ));
    }
    if secure && fragment {
        return Err(ConfigError::invalid(
            at.to_owned(),
            "a TLS URL's `#` fragment (`#insecure`) would accept any certificate: not \
             supported (give the CA that signed the server's certificate instead)",
        ));
    }
    if !secure && tls_settings {
        return Err(ConfigError::invalid(
            "tls",
            format!("TLS settings need a `rediss://` URL: `{at}` connects in plain text"),
        ));
    }
    Ok(())
}

/// The default [`timeout`](RedisRateLimiterBuilder::timeout).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

/// GCRA in one atomic step on the server, timed by the server's clock (so replicas'
/// clocks need not agree). Numbers are microseconds; Lua's doubles hold them exactly.
/// Takes at least `need` and at most `want` tokens (batching: as many as are there).
/// Returns `{granted, remaining, full_in}` or `{0, retry_after, full_in}`, and lets the key
/// expire when the bucket would be full again, so idle keys cost nothing.
///
/// The key holds the arrival time and the burst (`tau`) of the replica that wrote it
/// (`tat:tau`; a bare arrival time, as written before, reads as no burst). An arrival
/// time more than the larger of the two bursts ahead of `TIME` (left by a master whose
/// clock was ahead: a failover to a replica behind it, or a clock stepped back) is
/// brought back to an empty bucket, so a clock step locks no key out for longer than its
/// burst takes to refill. One within the writer's burst is not a clock step, though it be
/// beyond this replica's: replicas whose quotas differ (a rolling deploy that lowers the
/// burst) share the bucket, and one with the smaller burst refuses until the debt is
/// within it, where it used to bring the key back to its own burst, and so hand tokens
/// back to the others at every check. Needs Redis 5 or later (a script that reads `TIME`
/// before writing).
const SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local tat, wrote = now, 0
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' and v.err then
  return {-1, 0, 0}
end
if v then
  local sep = string.find(v, ':', 1, true)
  if sep then
    tat = tonumber(string.sub(v, 1, sep - 1)) or now
    wrote = tonumber(string.sub(v, sep + 1)) or 0
  else
    tat = tonumber(v) or now
  end
end
if tat < now then tat = now end
local span = math.max(tau, wrote)
local limit = now + tau
if not (tat <= now + span) then
  tat = now + span
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', tat, span), 'PX', math.floor(span / 1000) + 1)
end
local available = math.floor((limit - tat) / interval)
if need == 0 then
  return {0, math.max(available, 0), tat - now}
end
if available < need then
  return {0, tat + need * interval - limit, tat - now}
end
local grant = math.min(available, want)
local nxt = tat + grant * interval
redis.call('SET', KEYS[1], string.format('%.0f:%.0f', nxt, tau), 'PX', math.floor((nxt - now) / 1000) + 1)
return {grant, math.floor((limit - nxt) / interval), nxt - now}
";

/// What to do while Redis cannot be reached (or answers too slowly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Keep serving from local buckets, one per key, each holding this replica's share of
    /// the key's quota (for example the quota divided by the number of replicas). A
    /// request for more tokens than the share's burst but no more than the quota's is
    /// refused with a wait (until the breaker guarding Redis lets a check through again,
    /// or a second), not as never admissible: Redis admits it once it is back.
    FailOpen {
        /// This replica's share.
        local_share: Quota,
    },
    /// Refuse every request until Redis is back.
    FailClosed,
}

/// A bucket's key in Redis holds another type than the limiter writes (a hash, a list:
/// another program wrote it): the check fails for that key, answered by the failure
/// policy, without counting against Redis's health (the breaker that turns every key to
/// the policy).
#[derive(Debug)]
struct KeyOfAnotherType(String);

impl fmt::Display for KeyOfAnotherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the rate-limit key {:?} holds another type in Redis (WRONGTYPE)",
            self.0
        )
    }
}

impl std::error::Error for KeyOfAnotherType {}

/// A refusal or failure of the Redis-backed limiter.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisLimitError {
    /// Over the limit (from Redis, or from the local share while Redis is away).
    Limited(RateLimited),
    /// Redis could not be asked and the policy is [`FailurePolicy::FailClosed`]; the cause
    /// is in `source()`.
    Unavailable(BoxError),
}

impl fmt::Display for RedisLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Limited(r) => r.fmt(f),
            Self::Unavailable(_) => f.write_str("distributed rate limiter unavailable"),
        }
    }
}

impl std::error::Error for RedisLimitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Limited(r) => Some(r),
            Self::Unavailable(e) => Some(e.as_ref()),
        }
    }
}

impl Source {
    /// The `source` label of this answer in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Batch => "batch",
            Source::Local => "local",
        }
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared bucket in Redis.
    Redis,
    /// Tokens this replica took from Redis ahead of time ([`batch`](RedisRateLimiterBuilder::batch)).
    Batch,
    /// This replica's local share (Redis unavailable, [`FailurePolicy::FailOpen`]).
    Local,
}

/// Where the buckets live: one Redis server, or a Redis Cluster.
enum Backend {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// A connection to the [`Backend`], made on the first check and re-made by itself: redis'
/// connection manager for one server; for a cluster, its connection, which follows the
/// slot map (`MOVED` / `ASK` redirections, failovers) and reconnects to each node.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Inner {
    client: Backend,
    /// The connection, made by the first check that finds the cell empty; replaced by a
    /// new cell when a check times out with the breaker no longer closed (see
    /// [`RedisRateLimiter::ask_redis_guarded`]).
    conn: parking_lot::RwLock<Arc<OnceCell<Conn>>>,
    script: redis::Script,
    prefix: String,
    interval_us: u64,
    tau_us: u64,
    limit: u32,
    timeout: Duration,
    policy: FailurePolicy,
    local: Option<KeyedRateLimiter<String, TokioClock>>,
    breaker: Breaker,
    batch: Option<Batching>,
    refusals: Refusals,
    telemetry: super::telemetry::Telemetry,
    /// Checks retried after a connection error.
    retries: AtomicU64,
    /// Where the last decision came from: an index into [`DECISION_SOURCES`], `0` before
    /// the first.
    last_source: AtomicU8,
    /// The warnings of decisions taken without Redis, it being unavailable (by the local
    /// share, or refusals under fail-closed).
    #[cfg(feature = "tracing")]
    fail_open_log: FailOpenLog,
}

/// The shortest interval between two warnings of one limiter failing open.
#[cfg(feature = "tracing")]
const FAIL_OPEN_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The warnings of a limiter failing open: at its first decision by the local share, then
/// at most one every [`FAIL_OPEN_LOG_INTERVAL`], each saying how many checks the local
/// share answered (and how many it admitted, unchecked by Redis) since the one before. A
/// check that fails open is never silent, yet an outage writes a line per interval, not
/// one per request. Atomics only: no lock, no allocation but the line itself.
#[cfg(feature = "tracing")]
struct FailOpenLog {
    origin: tokio::time::Instant,
    /// Milliseconds after `origin` before which no line is written.
    next_line: AtomicU64,
    /// Checks answered by the local share since the last line.
    checks: AtomicU64,
    /// Of those, the admitted ones.
    admitted: AtomicU64,
}

#[cfg(feature = "tracing")]
impl FailOpenLog {
    fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            next_line: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        }
    }

    /// Notes one decision of the local share: `Some((checks, admitted))` since the last
    /// line, this one included, if a line is due.
    fn note(&self, admitted: bool) -> Option<(u64, u64)> {
        self.checks.fetch_add(1, Relaxed);
        if admitted {
            self.admitted.fetch_add(1, Relaxed);
        }
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_line.load(Relaxed);
        let after = now.saturating_add(FAIL_OPEN_LOG_INTERVAL.as_millis() as u64);
        if now < next
            || self
                .next_line
                .compare_exchange(next, after, Relaxed, Relaxed)
                .is_err()
        {
            return None;
        }
        Some((self.checks.swap(0, Relaxed), self.admitted.swap(0, Relaxed)))
    }
}

/// The labels of [`RedisRateLimiter::last_source`], by index (`0`: no decision yet).
const DECISION_SOURCES: [&str; 7] = [
    "",
    "redis",
    "batch",
    "local",
    "cached",
    "unavailable",
    "exceeds_burst",
];

/// Refusals Redis gave, per key, until they run out: a saturated key is refused here
/// without a round trip. Exact, not an approximation: Redis's bucket is shared, so no
/// replica can take those tokens before the refusal's `retry_after` either (a request for
/// fewer tokens than the cached refusal's still goes to Redis; one for more is told its own
/// wait: the cached one and a refill interval per extra token). A refusal's wait runs from
/// when its check was sent (Redis decided after it), so a slow answer never keeps it past
/// its end.
struct Refusals {
    max_keys: usize,
    /// The refill interval: each token more than the cached refusal's is that much later.
    interval: Duration,
    by_key: Mutex<HashMap<String, Refusal>>,
}

struct Refusal {
    tokens: u32,
    at: tokio::time::Instant,
    until: tokio::time::Instant,
    refused: RateLimited,
}

impl Refusals {
    fn new(max_keys: usize, interval: Duration) -> Self {
        Self {
            max_keys,
            interval,
            by_key: Mutex::new(HashMap::new()),
        }
    }

    /// A refusal still in force for `tokens` of `key`, aged to now.
    fn check(&self, key: &str, tokens: u32) -> Option<RateLimited> {
        let by_key = self.by_key.lock();
        let refusal = by_key.get(key)?;
        let now = tokio::time::Instant::now();
        (tokens >= refusal.tokens && now < refusal.until).then(|| {
            let extra = self.interval.saturating_mul(tokens - refusal.tokens);
            refusal.refused.aged(now - refusal.at).later(extra)
        })
    }

    /// Keeps `refused`, which Redis gave after `asked` (when the check was sent): its
    /// wait runs from then.
    fn store(&self, key: &str, tokens: u32, refused: RateLimited, asked: tokio::time::Instant) {
        let Some(wait) = refused.retry_after() else {
            return;
        };
        let now = tokio::time::Instant::now();
        if asked + wait <= now {
            return;
        }
        let mut by_key = self.by_key.lock();
        if by_key.len() >= self.max_keys {
            // Bounded: expired refusals go first, then all of them (dropping one only
            // costs a round trip).
            by_key.retain(|_, r| r.until > now);
            if by_key.len() >= self.max_keys {
                by_key.clear();
            }
        }
        by_key.insert(
            key.to_owned(),
            Refusal {
                tokens,
                at: asked,
                until: asked + wait,
                refused,
            },
        );
    }
}

/// Tokens taken from Redis ahead of time, per key.
struct Batching {
    size: u32,
    max_age: Duration,
    max_keys: usize,
    reservoir: Mutex<HashMap<String, Reserve>>,
}

struct Reserve {
    tokens: u32,
    taken: tokio::time::Instant,
    admitted: Admitted,
}

/// A token bucket per key kept in Redis, so that every replica of a service draws from
/// the same limit: one round trip per check (a Lua script loaded once and then called by
/// its hash), atomic on the server, with key expiry so idle keys cost nothing.
///
/// Every Redis call has a timeout, and runs behind a [`circuit breaker`](crate::circuit_breaker):
/// when Redis is down or slow, the breaker opens and checks go straight to the
/// [`FailurePolicy`] (no cost per request, no waiting on a dead server); the breaker
/// probes Redis again later, and limiting is distributed again as soon as Redis answers.
/// The connection is made lazily and re-made by itself (redis' connection manager).
///
/// ```no_run
/// use std::time::Duration;
/// use seawall::rate_limit::{Quota, Rate};
/// use seawall::rate_limit::redis::{FailurePolicy, RedisRateLimiter};
///
/// # async fn run() -> Result<(), seawall::BoxError> {
/// let limiter = RedisRateLimiter::builder("redis://127.0.0.1:6379", Quota::new(Rate::per_second(100), 100)?)
///     .prefix("api")
///     .timeout(Duration::from_millis(200))
///     .failure_policy(FailurePolicy::FailOpen {
///         // Four replicas: each keeps a quarter while Redis is away.
///         local_share: Quota::new(Rate::per_second(25), 25)?,
///     })
///     .build()?;
/// let (admitted, source) = limiter.acquire("customer-42", 1).await?;
/// # let _ = (admitted, source);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisRateLimiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("prefix", &self.inner.prefix)
            .field("policy", &self.inner.policy)
            .field("breaker", &self.inner.breaker.state())
            .finish_non_exhaustive()
    }
}

/// Builder for [`RedisRateLimiter`].
#[derive(Debug)]
pub struct RedisRateLimiterBuilder {
    url: String,
    /// A cluster's seed nodes, for [`RedisRateLimiter::cluster_builder`].
    cluster: Option<Vec<String>>,
    quota: Quota,
    prefix: String,
    timeout: Duration,
    policy: FailurePolicy,
    breaker: Option<CircuitBreakerConfig>,
    batch: Option<(u32, Duration)>,
    name: Option<String>,
    #[cfg(feature = "redis-tls")]
    tls: Option<RedisTls>,
}

impl RedisRateLimiter {
    /// Starts a builder for buckets of `quota` in the Redis at `url`.
    pub fn builder(url: impl Into<String>, quota: Quota) -> RedisRateLimiterBuilder {
        RedisRateLimiterBuilder {
            url: url.into(),
            cluster: None,
            quota,
            prefix: "seawall".to_owned(),
            timeout: DEFAULT_TIMEOUT,
            policy: FailurePolicy::FailClosed,
            breaker: None,
            batch: None,
            name: None,
            #[cfg(feature = "redis-tls")]
            tls: None,
        }
    }

    /// Starts a builder for buckets of `quota` in the Redis Cluster reached through
    /// `nodes` (seed URLs such as `redis://10.0.0.1:7000`; the client learns the others
    /// from them). Each bucket is one key, `prefix:{key}`, whose script touches that key
    /// only: one slot, on one master. See [the module docs](self#redis-cluster) for what
    /// happens when a master fails.
    pub fn cluster_builder<I, S>(nodes: I, quota: Quota) -> RedisRateLimiterBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut builder = Self::builder(String::new(), quota);
        builder.cluster = Some(nodes.into_iter().map(Into::into).collect());
        builder
    }

    /// The breaker guarding the calls to Redis.
    pub fn breaker(&self) -> &Breaker {
        &self.inner.breaker
    }

    /// Takes `tokens` from `key`'s shared bucket, or, while Redis is unavailable, applies
    /// the failure policy. Never waits longer than the timeout.
    pub async fn acquire(
        &self,
        key: &str,
        tokens: u32,
    ) -> Result<(Admitted, Source), RedisLimitError> {
        let telemetry = &self.inner.telemetry;
        // A request over the burst is never admissible: refused as such (below), not
        // told the wait of a smaller request's cached refusal.
        let cached = (tokens <= self.inner.limit)
            .then(|| self.inner.refusals.check(key, tokens))
            .flatten();
        if let Some(refused) = cached {
            telemetry.record::<()>(&Err(refused));
            self.record_source("cached");
            return Err(RedisLimitError::Limited(refused));
        }
        let (result, source) = self.acquire_untraced(key, tokens).await;
        match &result {
            Ok((admitted, _)) => telemetry.record::<&Admitted>(&Ok(admitted)),
            Err(RedisLimitError::Limited(limited)) => telemetry.record::<()>(&Err(*limited)),
            Err(RedisLimitError::Unavailable(_)) => {}
        }
        self.record_source(source);
        result
    }

    fn record_source(&self, label: &'static str) {
        self.inner.telemetry.record_source(label);
        let index = DECISION_SOURCES
            .iter()
            .position(|s| *s == label)
            .unwrap_or(0);
        self.inner.last_source.store(index as u8, Relaxed);
    }

    /// Where the last decision came from, as its `source` label in metrics: `redis` (the
    /// shared bucket), `batch` (tokens taken ahead), `local` (the local share, Redis being
    /// unavailable), `cached` (a refusal Redis gave, still in force), `unavailable`
    /// (Redis could not answer and the limiter fails closed) or `exceeds_burst` (a request
    /// for more tokens than the burst, refused here without asking Redis, which could
    /// never admit it either); `None` before the first.
    pub fn last_source(&self) -> Option<&'static str> {
        match self.inner.last_source.load(Relaxed) {
            0 => None,
            i => DECISION_SOURCES.get(usize::from(i)).copied(),
        }
    }

    /// The limiter's name, if it was given one.
    pub fn name(&self) -> Option<&str> {
        self.inner.telemetry.get_name()
    }

    /// The decision, and where it came from (its metrics label).
    async fn acquire_untraced(
        &self,
        key: &str,
        tokens: u32,
    ) -> (Result<(Admitted, Source), RedisLimitError>, &'static str) {
        let inner = &self.inner;
        if tokens > inner.limit {
            // (When the bucket is full again is Redis's to say: not known here.)
            let refused = RateLimited::exceeds_burst(
                tokens,
                inner.limit,
                Duration::from_micros(inner.tau_us),
                Duration::ZERO,
            );
            // Never admissible, in Redis or anywhere: the quota's answer, as Redis's,
            // but given here, without a round trip, and counted so.
            return (Err(RedisLimitError::Limited(refused)), "exceeds_burst");
        }
        let mut want = tokens;
        if let Some(batch) = &inner.batch {
            if let Some(admitted) = batch.take(key, tokens) {
                return (Ok((admitted, Source::Batch)), "batch");
            }
            // A request that costs nothing asks for nothing ahead: it took a whole batch,
            // held here unused and then dropped, out of the bucket the fleet shares.
            if tokens > 0 {
                want = want.max(batch.size);
            }
        }
        // Before the round trip: Redis decides after this instant, so a reserve aged from
        // it is never served more than `max_age` after its tokens left the shared bucket,
        // and a refusal kept is never held past its wait (aged from the answer's arrival,
        // a slow answer stretched both).
        let asked = tokio::time::Instant::now();
        match self.ask_redis_guarded(key, tokens, want).await {
            Ok(Ok((admitted, granted))) => {
                if let Some(batch) = &inner.batch {
                    if granted > tokens {
                        batch.store(key, granted - tokens, admitted, asked);
                    }
                }
                (Ok((admitted, Source::Redis)), "redis")
            }
            Ok(Err(limited)) => {
                inner.refusals.store(key, tokens, limited, asked);
                (Err(RedisLimitError::Limited(limited)), "redis")
            }
            Err(error) => self.unavailable(key, tokens, error),
        }
    }

    /// The failure policy, for a check Redis could not answer.
    fn unavailable(
        &self,
        key: &str,
        tokens: u32,
        error: BoxError,
    ) -> (Result<(Admitted, Source), RedisLimitError>, &'static str) {
        match (&self.inner.policy, &self.inner.local) {
            (FailurePolicy::FailOpen { .. }, Some(local)) => {
                let decision = local.acquire(key, tokens).map_err(|refused| {
                    if refused.exceeds_capacity() {
                        // More than the local share's burst, but within the quota's
                        // (checked before asking Redis): admissible once Redis answers
                        // again, so refused until then, not as never admissible (a
                        // caller told "never" gives up on a request it may send again).
                        self.until_redis_may_answer()
                    } else {
                        refused
                    }
                });
                self.failed_open(&error, decision.is_ok());
                (
                    decision
                        .map(|a| (a, Source::Local))
                        .map_err(RedisLimitError::Limited),
                    "local",
                )
            }
            _ => {
                self.failed_closed(&error);
                (Err(RedisLimitError::Unavailable(error)), "unavailable")
            }
        }
    }

    /// The refusal of a request only Redis could admit, Redis being unavailable: retry
    /// when the breaker guarding Redis lets a check through again, or in a second when
    /// that time is not known or has passed (as `Retry-After: 1` when failing closed).
    #[cold]
    fn until_redis_may_answer(&self) -> RateLimited {
        let inner = &self.inner;
        // Read without a lock: under a flood of such requests in an outage, each one.
        let wait = inner
            .breaker
            .open_for()
            .filter(|wait| !wait.is_zero())
            .unwrap_or(Duration::from_secs(1));
        RateLimited::after(
            wait,
            inner.limit,
            Duration::from_micros(inner.tau_us),
            Duration::ZERO,
        )
    }

    /// Reports a check refused because Redis could not answer it
    /// ([`FailurePolicy::FailClosed`]): counted in
    /// `seawall_rate_limit_redis_checks_total{source="unavailable"}` (by the caller), and
    /// logged at warn level as failing open is (the first, then at most one line every
    /// 10 s with how many checks were refused since the line before): every request of an
    /// outage refused, and never a line would say why.
    #[cold]
    fn failed_closed(&self, error: &BoxError) {
        #[cfg(feature = "tracing")]
        if let Some((checks, _)) = self.inner.fail_open_log.note(false) {
            tracing::warn!(
                limiter = self.name().unwrap_or(&self.inner.prefix),
                %error,
                checks,
                "Redis could not answer rate-limit checks: failing closed, the requests \
                 refused (counts since the last such line)"
            );
        }
        let _ = error;
    }

    /// Reports a decision of the local share, Redis being unavailable (`error`: what the
    /// check met, Redis's error, the timeout or the open breaker): never silent, whether
    /// the breaker has opened yet or not. Counted in
    /// `seawall_rate_limit_redis_checks_total{source="local"}` (by the caller), and
    /// logged at warn level, the first and then at most one line every 10 s with how
    /// many checks failed open since the line before.
    #[cold]
    fn failed_open(&self, error: &BoxError, admitted: bool) {
        #[cfg(feature = "tracing")]
        if let Some((checks, admitted_unchecked)) = self.inner.fail_open_log.note(admitted) {
            tracing::warn!(
                limiter = self.name().unwrap_or(&self.inner.prefix),
                %error,
                checks,
                admitted_unchecked,
                "Redis could not answer rate-limit checks: failing open, answered by this \
                 replica's local share (counts since the last such line)"
            );
        }
        let _ = (error, admitted);
    }

    /// One check in Redis, behind the breaker and the timeout.
    async fn ask_redis_guarded(
        &self,
        key: &str,
        need: u32,
        want: u32,
    ) -> Result<Result<(Admitted, u32), RateLimited>, BoxError> {
        let inner = &self.inner;
        let cell = inner.conn.read().clone();
        // A key of another type is one key's fault, not Redis's: not counted by the
        // breaker, which would otherwise turn every key to the failure policy.
        let classify = |result: Result<&_, &BoxError>| match result {
            Err(e) if e.is::<KeyOfAnotherType>() => crate::circuit_breaker::Outcome::Ignored,
            Err(_) => crate::circuit_breaker::Outcome::Failure,
            Ok(_) => crate::circuit_breaker::Outcome::Success,
        };
        let mut svc = ServiceBuilder::new()
            .layer(
                CircuitBreakerLayer::from_breaker(inner.breaker.clone()).with_classifier(classify),
            )
            .timeout(inner.timeout)
            .service_fn(|(key, need, want): (String, u32, u32)| {
                let this = self.clone();
                let cell = cell.clone();
                async move { this.ask_redis(&cell, &key, need, want).await }
            });
        let result = match svc.ready().await {
            Ok(svc) => {
                // `prefix:{key}`: the braces are a hash tag, so in a cluster the bucket's
                // key (and any key a script adds for it later) maps to one slot.
                svc.call((
                    format!("{}:{{{}}}", inner.prefix, hash_tag(key)),
                    need,
                    want,
                ))
                .await
            }
            Err(e) => return Err(e),
        };
        // A timeout that opened the breaker (or a probe that timed out): the connection
        // may be black-holed (a flow dropped silently by a NAT, a load balancer or a
        // firewall), which redis' connection manager never notices, since a timeout is
        // not an error it reconnects on; every probe would go down it again. The next
        // check makes a new connection. Not on every timeout: a slow but healthy Redis
        // would then be reconnected to under load.
        if let Err(error) = &result {
            let timed_out = error.is::<tower::timeout::error::Elapsed>()
                || error
                    .downcast_ref::<redis::RedisError>()
                    .is_some_and(redis::RedisError::is_timeout);
            let open = matches!(
                inner.breaker.state(),
                crate::circuit_breaker::State::Open | crate::circuit_breaker::State::HalfOpen
            );
            if timed_out && open {
                let mut current = inner.conn.write();
                if Arc::ptr_eq(&current, &cell) {
                    *current = Arc::new(OnceCell::new());
                }
            }
        }
        result
    }

    async fn ask_redis(
        &self,
        cell: &OnceCell<Conn>,
        key: &str,
        need: u32,
        want: u32,
    ) -> Result<Result<(Admitted, u32), RateLimited>, BoxError> {
        let inner = &self.inner;
        let conn = cell
            .get_or_try_init(|| async {
                match &inner.client {
                    Backend::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(inner.timeout)
                            .set_response_timeout(inner.timeout)
                            // No retries with backoff inside the manager: a failed
                            // reconnection fails at once (one more is started by the next
                            // call), instead of holding every check until its timeout for
                            // 1 to 2 s.
                            .set_number_of_retries(0);
                        ConnectionManager::new_with_config(client.clone(), config)
                            .await
                            .map(Conn::Single)
                    }
                    Backend::Cluster(client) => {
                        client.get_async_connection().await.map(Conn::Cluster)
                    }
                }
            })
            .await?;
        let mut conn = conn.clone();
        let reply = match self.invoke(&mut conn, key, need, want).await {
            Err(error) if error.is_io_error() && !error.is_timeout() => {
                // A connection error (often the stale `Reconnecting failed` of an earlier
                // reconnection, returned at once): the manager has just started a new
                // reconnection, and one retry awaits it, inside the same timeout. Without
                // it, the first probe after Redis comes back fails and re-opens the
                // breaker for twice as long.
                inner.retries.fetch_add(1, Relaxed);
                inner.telemetry.record_redis_retry();
                #[cfg(feature = "tracing")]
                tracing::debug!(
                    limiter = self.name().unwrap_or(&inner.prefix),
                    %error,
                    "retrying a Redis check once after a connection error"
                );
                let _ = error;
                self.invoke(&mut conn, key, need, want).await?
            }
            result => result?,
        };
        let &[granted, value, full_in] = reply.as_slice() else {
            return Err(format!("unexpected reply from the rate-limit script: {reply:?}").into());
        };
        if granted < 0 {
            // The bucket's key holds another type (a hash, a list: written by another
            // program): this key's fault, not Redis's (see `KeyOfAnotherType`).
            return Err(Box::new(KeyOfAnotherType(key.to_owned())));
        }
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        let window = Duration::from_micros(inner.tau_us);
        // A request for no tokens is never refused by the script (nothing is short), but
        // its answer reads `{0, remaining, full_in}`, as a refusal's leading `0` would.
        Ok(if granted > 0 || need == 0 {
            let admitted = Admitted {
                remaining: u32::try_from(value).unwrap_or(0),
                full_in: us(full_in),
                limit: inner.limit,
                window,
            };
            Ok((admitted, u32::try_from(granted).unwrap_or(need)))
        } else {
            Err(RateLimited::after(
                us(value),
                inner.limit,
                window,
                us(full_in),
            ))
        })
    }
}

/// `key` as a whole hash tag: `%`, `{` and `}` percent-encoded (`%25`, `%7B`, `%7D`), so
/// that a `}` in a client's key cannot end the tag early and choose the cluster slot of
/// its bucket (`a}1`, `a}2`… would all hash as `a`). Keys without them are unchanged.
fn hash_tag(key: &str) -> std::borrow::Cow<'_, str> {
    if !key.contains(['%', '{', '}']) {
        return key.into();
    }
    let mut tag = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    tag.into()
}

impl RedisRateLimiter {
    /// One run of the script on `conn`.
    async fn invoke(
        &self,
        conn: &mut Conn,
        key: &str,
        need: u32,
        want: u32,
    ) -> redis::RedisResult<Vec<i64>> {
        match conn {
            Conn::Single(c) => self.invoke_on(c, key, need, want).await,
            Conn::Cluster(c) => self.invoke_on(c, key, need, want).await,
        }
    }

    async fn invoke_on<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        key: &str,
        need: u32,
        want: u32,
    ) -> redis::RedisResult<Vec<i64>> {
        let inner = &self.inner;
        inner
            .script
            .key(key)
            .arg(inner.interval_us)
            .arg(inner.tau_us)
            .arg(need)
            .arg(want)
            .invoke_async(conn)
            .await
    }

    /// How many checks were retried once after a connection error (see
    /// [the module docs](self#failures-timeouts-and-recovery)); also reported, for a
    /// named limiter, as `seawall_rate_limit_redis_retries_total{limiter}`.
    pub fn reconnect_retries(&self) -> u64 {
        self.inner.retries.load(Relaxed)
    }
}

impl RedisRateLimiterBuilder {
    /// Prefixes every Redis key (default `seawall`). It must not hold `{` or `}`
    /// ([`build`](Self::build) refuses them): a Redis Cluster hashes only what lies
    /// between the first `{` of a key and the next `}`, so a brace in the prefix would
    /// become every bucket's hash tag and put them all on one slot, one master.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a check waits for Redis (default 200 ms), connecting included. See
    /// [the trade-off](self#failures-timeouts-and-recovery) before lowering it: a timeout
    /// counts as a failure for the breaker.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do while Redis is unavailable (default [`FailurePolicy::FailClosed`]).
    #[must_use]
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The breaker around Redis (default: opens when half of the last 20 calls failed,
    /// evaluated from the 10th call on, waits 1 s, then 2 s, 4 s… up to 30 s, before
    /// probing with one call; see [the trade-off](self#failures-timeouts-and-recovery)).
    #[must_use]
    pub fn breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }

    /// Takes up to `size` tokens (at most the burst) per round trip, as many as the shared
    /// bucket holds, and serves the next checks for the same key from them, for at most
    /// `max_age`: fewer round trips at high rates, still one round trip per check at most.
    /// Tokens a replica holds unused make the others refuse early: up to `size - 1` per
    /// replica and key (more while concurrent checks of one key each take a batch), for up
    /// to `max_age`. Every token the fleet admits was taken from the shared bucket, but
    /// up to `max_age` before it is used, when the bucket may have refilled since: over
    /// any interval the fleet admits at most burst + rate × (interval + `max_age`), not
    /// burst + rate × interval. A key's burst can so be served about twice within a
    /// short interval: the bucket's burst again on top of what replicas held.
    #[must_use]
    pub fn batch(mut self, size: u32, max_age: Duration) -> Self {
        self.batch = (size > 1).then_some((size, max_age));
        self
    }

    /// Names the limiter for metrics and tracing: decisions as for
    /// [`RateLimiterBuilder::name`](super::RateLimiterBuilder::name), and where each check was answered
    /// (`seawall_rate_limit_redis_checks_total{limiter, source}` with `source` one of
    /// `redis`, `batch`, `local`, `unavailable`, `cached` for a refusal answered from
    /// the last one Redis gave for that key, without a round trip, and `exceeds_burst`
    /// for a request for more tokens than the burst, refused here without a round trip).
    #[must_use]
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into().to_string());
        self
    }

    /// TLS settings for a `rediss://` URL (or cluster nodes): the CA to trust and a client
    /// certificate (see [`RedisTls`]). A `rediss://` URL without them is checked against
    /// webpki-roots.
    #[cfg(feature = "redis-tls")]
    #[must_use]
    pub fn tls(mut self, tls: RedisTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Checks the URL and settings; does not connect (the first check does).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `url` (or `nodes` for a cluster: not a Redis URL; a
    /// `rediss://` one without the `redis-tls` feature, or with `#insecure`),
    /// `prefix` (holding `{` or `}`), `tls` (settings a `redis://` URL would ignore, a
    /// CA, certificate or key that cannot be read), `timeout` (zero) or `quota` (faster
    /// than one token per microsecond).
    pub fn build(self) -> Result<RedisRateLimiter, ConfigError> {
        if self.prefix.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "prefix",
                format!(
                    "`{}` holds `{{` or `}}`: a Redis Cluster hashes only what lies between \
                     the first `{{` of a key and the next `}}`, so every bucket would be on \
                     one slot",
                    self.prefix
                ),
            ));
        }
        #[cfg(feature = "redis-tls")]
        let certificates = self.tls.as_ref().map(RedisTls::certificates).transpose()?;
        #[cfg(not(feature = "redis-tls"))]
        let certificates: Option<std::convert::Infallible> = None;
        let client = match &self.cluster {
            None => {
                check_url("url", &self.url, certificates.is_some())?;
                let client = match certificates {
                    #[cfg(feature = "redis-tls")]
                    Some(certificates) => {
                        redis::Client::build_with_tls(self.url.as_str(), certificates)
                    }
                    #[cfg(not(feature = "redis-tls"))]
                    Some(never) => match never {},
                    None => redis::Client::open(self.url.as_str()),
                };
                Backend::Single(client.map_err(|e| ConfigError::invalid("url", e.to_string()))?)
            }
            Some(nodes) => {
                if nodes.is_empty() {
                    return Err(ConfigError::invalid("nodes", "needs at least one node"));
                }
                for (i, node) in nodes.iter().enumerate() {
                    check_url(&format!("nodes[{i}]"), node, certificates.is_some())?;
                }
                let builder = ClusterClient::builder(nodes.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout);
                let builder = match certificates {
                    #[cfg(feature = "redis-tls")]
                    Some(certificates) => builder.certs(certificates),
                    #[cfg(not(feature = "redis-tls"))]
                    Some(never) => match never {},
                    None => builder,
                };
                Backend::Cluster(
                    builder
                        .build()
                        .map_err(|e| ConfigError::invalid("nodes", e.to_string()))?,
                )
            }
        };
        if self.timeout.is_zero() {
            return Err(ConfigError::invalid("timeout", "must be greater than zero"));
        }
        let interval_us =
            u64::try_from(self.quota.interval().as_nanos().div_ceil(1000)).unwrap_or(u64::MAX);
        // Rounded up to whole microseconds (the script's unit), so the rate is never
        // exceeded; a quota faster than one token per microsecond is refused.
        if self.quota.interval() < Duration::from_micros(1) {
            return Err(ConfigError::invalid(
                "quota",
                "at most one token per microsecond in Redis",
            ));
        }
        let breaker = match self.breaker {
            Some(config) => config,
            None => CircuitBreakerConfig::builder()
                .name(format!("redis-rate-limit:{}", self.prefix))
                .sliding_window(SlidingWindow::count_based(20))
                .minimum_calls(10)
                .failure_rate_threshold(0.5)
                .wait_in_open(Duration::from_secs(1))
                .exponential_backoff(2.0, Duration::from_secs(30))
                .permitted_calls_in_half_open(1)
                .build()?,
        };
        let local = match self.policy {
            FailurePolicy::FailOpen { local_share } => Some(KeyedRateLimiter::new(local_share)),
            FailurePolicy::FailClosed => None,
        };
        Ok(RedisRateLimiter {
            inner: Arc::new(Inner {
                client,
                conn: parking_lot::RwLock::new(Arc::new(OnceCell::new())),
                script: redis::Script::new(SCRIPT),
                prefix: self.prefix,
                interval_us,
                tau_us: interval_us.saturating_mul(u64::from(self.quota.burst())),
                limit: self.quota.burst(),
                timeout: self.timeout,
                policy: self.policy,
                local,
                breaker: Breaker::new(breaker),
                refusals: Refusals::new(10_000, Duration::from_micros(interval_us)),
                retries: AtomicU64::new(0),
                last_source: AtomicU8::new(0),
                #[cfg(feature = "tracing")]
                fail_open_log: FailOpenLog::new(),
                telemetry: {
                    let t = super::telemetry::Telemetry::default();
                    if let Some(name) = &self.name {
                        t.name_distributed(name);
                    }
                    t
                },
                batch: self.batch.map(|(size, max_age)| Batching {
                    size: size.min(self.quota.burst()),
                    max_age,
                    max_keys: 10_000,
                    reservoir: Mutex::new(HashMap::new()),
                }),
            }),
        })
    }
}

impl Batching {
    /// Serves `tokens` from the key's reserve, if it holds them and is fresh.
    fn take(&self, key: &str, tokens: u32) -> Option<Admitted> {
        let mut reservoir = self.reservoir.lock();
        let reserve = reservoir.get_mut(key)?;
        if reserve.taken.elapsed() > self.max_age {
            reservoir.remove(key);
            return None;
        }
        if reserve.tokens < tokens {
            return None;
        }
        reserve.tokens -= tokens;
        let admitted = reserve.admitted;
        if reserve.tokens == 0 {
            reservoir.remove(key);
        }
        Some(admitted)
    }

    /// `asked`: when the check that took these tokens was sent to Redis (no later than
    /// Redis took them), from which the reserve's age runs.
    fn store(&self, key: &str, tokens: u32, admitted: Admitted, asked: tokio::time::Instant) {
        let mut reservoir = self.reservoir.lock();
        if reservoir.len() >= self.max_keys {
            // Bounded: stale reserves go first, then everything (tokens are only lost,
            // never created).
            let max_age = self.max_age;
            reservoir.retain(|_, r| r.taken.elapsed() <= max_age);
            if reservoir.len() >= self.max_keys {
                reservoir.clear();
            }
        }
        // Concurrent batches for one key add up: no token taken from Redis is dropped.
        let max_age = self.max_age;
        reservoir
            .entry(key.to_owned())
            .and_modify(|r| {
                // A reserve still holding tokens keeps its older time: refreshed, its
                // tokens could be served batch after batch past `max_age`, beyond the
                // bound the docs give (the new ones then expire early: the fleet admits
                // less, never more).
                if r.tokens == 0 || r.taken.elapsed() > max_age {
                    r.tokens = 0;
                    r.taken = asked;
                }
                r.tokens = r.tokens.saturating_add(tokens);
                r.admitted = admitted;
            })
            .or_insert(Reserve {
                tokens,
                taken: asked,
                admitted,
            });
    }
}
