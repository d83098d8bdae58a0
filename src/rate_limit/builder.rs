//! Builders for the local limiters: the one place a limiter gets its name, clock and sizes.

use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use super::quota::Quota;
use super::{DEFAULT_MAX_KEYS, KeyedRateLimiter};
use super::{RateLimiter, ShardedRateLimiter};
use crate::ConfigError;
use crate::clock::{Clock, TokioClock};

/// Configures a [`RateLimiter`]: start with [`RateLimiter::builder`].
///
/// ```
/// use seawall::rate_limit::{Quota, Rate, RateLimiter};
///
/// let limiter = RateLimiter::builder(Quota::new(Rate::per_second(100), 20)?)
///     .name("api")
///     .build();
/// assert_eq!(limiter.name(), Some("api"));
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimiterBuilder<C = TokioClock> {
    quota: Quota,
    name: Option<Arc<str>>,
    clock: C,
}

/// Configures a [`KeyedRateLimiter`]: start with [`KeyedRateLimiter::builder`].
///
/// ```
/// use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate};
///
/// let per_user: KeyedRateLimiter<String> =
///     KeyedRateLimiter::builder(Quota::new(Rate::per_second(10), 10)?)
///         .name("per-user")
///         .max_keys(50_000)
///         .build();
/// assert_eq!(per_user.name(), Some("per-user"));
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[must_use]
pub struct KeyedRateLimiterBuilder<K, C = TokioClock> {
    quota: Quota,
    name: Option<Arc<str>>,
    clock: C,
    max_keys: usize,
    _key: PhantomData<fn(K)>,
}

/// Configures a [`ShardedRateLimiter`]: start with [`ShardedRateLimiter::builder`].
///
/// ```
/// use seawall::rate_limit::{Quota, Rate, ShardedRateLimiter};
///
/// let limiter = ShardedRateLimiter::builder(Quota::new(Rate::per_second(10_000), 1_000)?)
///     .name("ingest")
///     .shards(4)
///     .build()?;
/// assert_eq!(limiter.shards(), 4);
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ShardedRateLimiterBuilder<C = TokioClock> {
    quota: Quota,
    name: Option<Arc<str>>,
    clock: C,
    shards: Option<usize>,
}

impl RateLimiter<TokioClock> {
    /// A [`RateLimiterBuilder`] for a bucket of `quota`, unnamed, on the tokio clock.
    pub fn builder(quota: Quota) -> RateLimiterBuilder {
        RateLimiterBuilder {
            quota,
            name: None,
            clock: TokioClock::new(),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedRateLimiter<K, TokioClock> {
    /// A [`KeyedRateLimiterBuilder`] for buckets of `quota` per key, unnamed, on the tokio
    /// clock, tracking up to [`DEFAULT_MAX_KEYS`] keys.
    pub fn builder(quota: Quota) -> KeyedRateLimiterBuilder<K> {
        KeyedRateLimiterBuilder {
            quota,
            name: None,
            clock: TokioClock::new(),
            max_keys: DEFAULT_MAX_KEYS,
            _key: PhantomData,
        }
    }
}

impl ShardedRateLimiter<TokioClock> {
    /// A [`ShardedRateLimiterBuilder`] for `quota` split over as many shards as the machine
    /// has cores, unnamed, on the tokio clock.
    pub fn builder(quota: Quota) -> ShardedRateLimiterBuilder {
        ShardedRateLimiterBuilder {
            quota,
            name: None,
            clock: TokioClock::new(),
            shards: None,
        }
    }
}

impl<C: Clock> RateLimiterBuilder<C> {
    /// Names the limiter for metrics and tracing (see the [module docs](super#observing)).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Reads time from `clock` instead of tokio's.
    pub fn clock<C2: Clock>(self, clock: C2) -> RateLimiterBuilder<C2> {
        RateLimiterBuilder {
            quota: self.quota,
            name: self.name,
            clock,
        }
    }

    /// The limiter, with a full bucket.
    pub fn build(self) -> RateLimiter<C> {
        let limiter = RateLimiter::with_clock(self.quota, self.clock);
        if let Some(name) = self.name {
            limiter.set_name(&name);
        }
        limiter
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> KeyedRateLimiterBuilder<K, C> {
    /// Names the limiter for metrics and tracing (see the [module docs](super#observing)).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Reads time from `clock` instead of tokio's.
    pub fn clock<C2: Clock>(self, clock: C2) -> KeyedRateLimiterBuilder<K, C2> {
        KeyedRateLimiterBuilder {
            quota: self.quota,
            name: self.name,
            clock,
            max_keys: self.max_keys,
            _key: PhantomData,
        }
    }

    /// Tracks at most about `n` keys (rounded up to a multiple of the shard count, at least
    /// one per shard); keys beyond that share one overflow bucket (see
    /// [`KeyedRateLimiter`]). Default [`DEFAULT_MAX_KEYS`].
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// The limiter, every bucket full.
    pub fn build(self) -> KeyedRateLimiter<K, C> {
        let limiter = KeyedRateLimiter::with_clock(self.quota, self.clock);
        limiter.set_max_keys(self.max_keys);
        if let Some(name) = self.name {
            limiter.set_name(&name);
        }
        limiter
    }
}

impl<K, C: std::fmt::Debug> std::fmt::Debug for KeyedRateLimiterBuilder<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedRateLimiterBuilder")
            .field("quota", &self.quota)
            .field("name", &self.name)
            .field("clock", &self.clock)
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl<C: Clock> ShardedRateLimiterBuilder<C> {
    /// Names the limiter for metrics and tracing (see the [module docs](super#observing)).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Reads time from `clock` instead of tokio's.
    pub fn clock<C2: Clock>(self, clock: C2) -> ShardedRateLimiterBuilder<C2> {
        ShardedRateLimiterBuilder {
            quota: self.quota,
            name: self.name,
            clock,
            shards: self.shards,
        }
    }

    /// Splits the quota over `n` shards (at least 1, at most the burst); default: one per
    /// core.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// The limiter.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `rate` when a shard's share would not be a valid quota (a
    /// rate below one token per period per shard: lower the shard count).
    pub fn build(self) -> Result<ShardedRateLimiter<C>, ConfigError> {
        let shards = self
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let limiter = ShardedRateLimiter::with_clock(self.quota, shards, self.clock)?;
        if let Some(name) = self.name {
            limiter.set_name(&name);
        }
        Ok(limiter)
    }
}
