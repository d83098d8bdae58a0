//! Errors of the rate limiters.

use std::fmt;
use std::time::Duration;

/// A request was refused by a rate limiter.
///
/// Either the bucket did not hold enough tokens (then [`retry_after`](Self::retry_after)
/// says when it will), or the request costs more tokens than the bucket can ever hold.
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::{ManualClock, Quota, Rate, RateLimiter};
///
/// let limiter = RateLimiter::with_clock(Quota::new(Rate::per_second(10), 1)?, ManualClock::new());
/// limiter.try_acquire(1).expect("the first token is there");
/// let refused = limiter.try_acquire(1).unwrap_err();
/// assert_eq!(refused.retry_after(), Some(Duration::from_millis(100)));
/// assert_eq!(refused.limit(), 1);
/// // A request costing more than the burst can never pass.
/// assert!(limiter.try_acquire(5).unwrap_err().exceeds_capacity());
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Option<Duration>,
    cost: u32,
    limit: u32,
    window: Duration,
    full_in: Duration,
}

impl RateLimited {
    pub(crate) fn after(
        retry_after: Duration,
        limit: u32,
        window: Duration,
        full_in: Duration,
    ) -> Self {
        Self {
            retry_after: Some(retry_after),
            cost: 0,
            limit,
            window,
            full_in,
        }
    }

    /// The same refusal, `elapsed` later: the waits shrink by that much.
    #[cfg(feature = "redis")]
    pub(crate) fn aged(self, elapsed: Duration) -> Self {
        Self {
            retry_after: self.retry_after.map(|d| d.saturating_sub(elapsed)),
            full_in: self.full_in.saturating_sub(elapsed),
            ..self
        }
    }

    /// The same refusal, with a wait `extra` longer (a request for more tokens).
    #[cfg(feature = "redis")]
    pub(crate) fn later(self, extra: Duration) -> Self {
        Self {
            retry_after: self.retry_after.map(|d| d.saturating_add(extra)),
            ..self
        }
    }

    /// `full_in`: when the bucket is full again (zero when not known).
    pub(crate) fn exceeds_burst(
        cost: u32,
        limit: u32,
        window: Duration,
        full_in: Duration,
    ) -> Self {
        Self {
            retry_after: None,
            cost,
            limit,
            window,
            full_in,
        }
    }

    /// The same refusal, of a bucket of capacity `limit`.
    pub(crate) fn with_limit(self, limit: u32) -> Self {
        Self { limit, ..self }
    }

    /// The same refusal, of a bucket full again in `full_in`.
    pub(crate) fn with_full_in(self, full_in: Duration) -> Self {
        Self { full_in, ..self }
    }

    /// How long until the bucket is full again (what the `RateLimit` header's `t`
    /// reports).
    pub fn full_in(&self) -> Duration {
        self.full_in
    }

    /// How long the bucket takes to refill from empty.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How long until the tokens will be there; `None` when the request costs more than
    /// the bucket's capacity and can never be admitted.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The bucket's capacity (burst) when the request was refused.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// True when the request costs more tokens than the bucket can hold.
    pub fn exceeds_capacity(&self) -> bool {
        self.retry_after.is_none()
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(f, "rate limit exceeded, retry after {d:?}"),
            None => write!(
                f,
                "request costs {} tokens, more than the rate limit's capacity of {}",
                self.cost, self.limit
            ),
        }
    }
}

impl std::error::Error for RateLimited {}

/// What a keyed layer does with a request whose key cannot be taken (for
#[cfg_attr(
    feature = "http",
    doc = "[`ClientIp`](crate::rate_limit::http::ClientIp):"
)]
#[cfg_attr(not(feature = "http"), doc = "`ClientIp`:")]
/// no peer address; for
#[cfg_attr(
    feature = "http",
    doc = "[`HeaderKey`](crate::rate_limit::http::HeaderKey):"
)]
#[cfg_attr(not(feature = "http"), doc = "`HeaderKey`:")]
/// no header; for a closure: `None`; `ClientIp` and `HeaderKey` need the `http` feature).
/// Such a request is never silently unlimited unless asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnMissingKey {
    /// Refuse it: the HTTP layers answer `500 Internal Server Error` (an
    /// `application/problem+json` body), the others fail with [`MissingKey`]; an error is
    /// logged (feature `tracing`), as tower_governor does, at most one line a second with
    /// the count of refusals since the last. Such a missing key is a set-up fault, such as
    /// an axum router served without `into_make_service_with_connect_info`. A key the
    /// client must send and left out (an API key header: see
    /// [`KeyExtractor::missing_key_is_clients`](super::KeyExtractor::missing_key_is_clients))
    /// is the client's error instead: `400 Bad Request`, logged at `DEBUG` (at most one
    /// line a second too: a client can leave its key out of every request).
    #[default]
    Reject,
    /// Limit every request without a key together, in one bucket of the limiter's default
    /// quota: for the local keyed limiters, the shared bucket that new keys also draw from
    /// when the limiter is full ([`KeyedRateLimiter::acquire_shared`](super::KeyedRateLimiter::acquire_shared));
    /// for the Redis-backed layer, one Redis key of its own. A warning is logged (feature
    /// `tracing`; at most one line a second, as for `Reject`). The shared bucket does not
    /// queue: a waiting layer refuses at once when it is empty, and tokens taken from it
    /// are not handed back to stacked limits.
    Shared,
    /// Let it through, unlimited by this layer (a limit beside it may hold it).
    Allow,
}

/// A keyed layer under [`OnMissingKey::Reject`] could not take a key from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingKey;

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no rate limit key could be taken from the request")
    }
}

impl std::error::Error for MissingKey {}

/// Logs a request without a key sent to the shared bucket (at most one line a second, as
/// [`log_missing_key`]).
pub(crate) fn log_shared_key(layer: &str) {
    #[cfg(feature = "tracing")]
    {
        static LINES: Throttle = Throttle::new();
        if let Some(suppressed) = LINES.line() {
            tracing::warn!(
                layer,
                suppressed,
                "rate limit: no key could be taken from the request; limited in the shared \
                 bucket"
            );
        }
    }
    let _ = layer;
}

/// Logs a request refused for its missing key: the first, then at most one line a second
/// in the process, each with how many were refused so since the line before
/// (`suppressed`). A client decides whether its requests carry a key (an API key header
/// left out), so one line per refusal would let any client fill the logs. `client`: the
/// key is the client's to send (a `400`): a `DEBUG` line, as for any bad request, where a
/// set-up fault (a `500`) is an `ERROR`.
pub(crate) fn log_missing_key(layer: &str, client: bool) {
    #[cfg(feature = "tracing")]
    {
        static LINES: Throttle = Throttle::new();
        static CLIENT_LINES: Throttle = Throttle::new();
        if client {
            if let Some(suppressed) = CLIENT_LINES.line() {
                tracing::debug!(
                    layer,
                    suppressed,
                    "rate limit: the request does not carry the key the client must send; \
                     refused (400)"
                );
            }
        } else if let Some(suppressed) = LINES.line() {
            tracing::error!(
                layer,
                suppressed,
                "rate limit: no key could be taken from the request (for ClientIp: no peer \
                 address; serve axum with into_make_service_with_connect_info); refused"
            );
        }
    }
    let _ = (layer, client);
}

/// At most one log line a second for events a client can repeat at will.
#[cfg(feature = "tracing")]
struct Throttle {
    /// Milliseconds after `ORIGIN` before which no line is written.
    next_line: std::sync::atomic::AtomicU64,
    /// Events since the last line written.
    suppressed: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "tracing")]
impl Throttle {
    const fn new() -> Self {
        Self {
            next_line: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// For one event: `Some(events not written since the last line)` if a line is due.
    fn line(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
        let now = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_line.load(Relaxed);
        if now < next
            || self
                .next_line
                .compare_exchange(next, now.saturating_add(1000), Relaxed, Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}
