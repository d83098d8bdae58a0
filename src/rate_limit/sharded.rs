//! A limiter that scales across cores: the quota split over per-thread shards, with
//! borrowing between them.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use super::error::RateLimited;
use super::local::bucket::{Admitted, gcra_acquire};
use super::quota::{Quota, Rate};
use crate::ConfigError;
use crate::clock::{Clock, TokioClock};

/// One shard's bucket, alone on its cache lines so that shards do not slow each other.
#[repr(align(128))]
#[derive(Debug)]
struct Shard {
    tat: AtomicU64,
}

struct Inner<C> {
    shards: Box<[Shard]>,
    /// Per shard: nanoseconds per token and burst tolerance.
    interval: u64,
    tau: u64,
    clock: C,
    telemetry: super::telemetry::Telemetry,
}

/// A token bucket for very high rates on many cores: the quota is split into `n` shards
/// (each with `rate / n` and `burst / n`), every thread draws from its own shard, and a
/// thread whose shard is empty borrows from the others before refusing.
///
/// A single [`RateLimiter`](super::RateLimiter) is one atomic word that every core writes,
/// so its checks serialize on that cache line (governor's limiter behaves the same); this
/// one keeps each core on its own line in the common case.
///
/// Accuracy: the shards' limits add up to at most the quota's, so it never admits more
/// than `burst + rate × elapsed`. It may refuse a little early: the burst is split in whole
/// tokens (`burst / n` each, the remainder unused), and a refusal scans the other shards
/// once, without locking them, so a token freed during the scan can be missed.
///
/// Behind a layer (it is a [`Limit`](super::Limit)) an admission reports the whole
/// limiter's figures, which the HTTP layers announce: every shard's capacity, the tokens
/// left in all of them, when all are full (reading each shard once); [`acquire`](Self::acquire)
/// reports the serving shard's.
///
/// ```
/// use seawall::rate_limit::{ManualClock, Quota, Rate, ShardedRateLimiter};
///
/// let limiter = ShardedRateLimiter::with_clock(Quota::new(Rate::per_second(1_000), 8)?, 4, ManualClock::new())?;
/// // Eight tokens in all, whichever threads take them.
/// assert_eq!((0..10).filter(|_| limiter.try_acquire(1).is_ok()).count(), 8);
/// # Ok::<(), seawall::ConfigError>(())
/// ```
pub struct ShardedRateLimiter<C = TokioClock> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for ShardedRateLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C> fmt::Debug for ShardedRateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedRateLimiter")
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// This thread's shard number (taken modulo the shard count).
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn my_shard() -> usize {
    SHARD.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_SHARD.fetch_add(1, Relaxed);
        s.set(v);
        v
    })
}

impl ShardedRateLimiter<TokioClock> {
    /// `quota` split over as many shards as the machine has cores, on the tokio clock.
    pub fn new(quota: Quota) -> Result<Self, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_clock(quota, cores, TokioClock::new())
    }
}

impl<C: Clock> ShardedRateLimiter<C> {
    /// `quota` split over `shards` shards (at least 1, at most the burst) on `clock`.
    ///
    /// Fails when a shard's share would not be a valid quota (a rate below one token per
    /// period per shard is not: lower the shard count).
    pub fn with_clock(quota: Quota, shards: usize, clock: C) -> Result<Self, ConfigError> {
        let n = shards.clamp(1, quota.burst() as usize) as u32;
        let rate = quota.rate();
        // Each shard refills n times slower and holds a whole share of the burst.
        let share = Quota::new(
            Rate::new(rate.tokens(), rate.period().saturating_mul(n)),
            quota.burst() / n,
        )?;
        let interval = share.interval_nanos();
        Ok(Self {
            inner: Arc::new(Inner {
                shards: (0..n)
                    .map(|_| Shard {
                        tat: AtomicU64::new(0),
                    })
                    .collect(),
                interval,
                tau: u64::from(share.burst()).saturating_mul(interval),
                clock,
                telemetry: super::telemetry::Telemetry::default(),
            }),
        })
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// Takes `tokens` from this thread's shard, or from another's if it is empty;
    /// returns how many are left in the shard that served. A request larger than one
    /// shard's burst is refused as exceeding capacity.
    #[inline]
    pub fn try_acquire(&self, tokens: u32) -> Result<u32, RateLimited> {
        self.acquire(tokens).map(|a| a.remaining)
    }

    pub(crate) fn set_name(&self, name: &str) {
        self.inner.telemetry.name(name);
    }

    /// The limiter's name, if its [builder](ShardedRateLimiter::builder) gave it one.
    pub fn name(&self) -> Option<&str> {
        self.inner.telemetry.get_name()
    }

    /// Like [`try_acquire`](Self::try_acquire), with the serving shard's figures.
    #[inline]
    pub fn acquire(&self, tokens: u32) -> Result<Admitted, RateLimited> {
        let result = self.acquire_untraced(tokens);
        self.inner.telemetry.record(&result);
        result
    }

    #[inline]
    fn acquire_untraced(&self, tokens: u32) -> Result<Admitted, RateLimited> {
        let inner = &*self.inner;
        let n = inner.shards.len();
        let home = my_shard() % n;
        let now = inner.clock.now_nanos();
        let first = gcra_acquire(
            &inner.shards[home].tat,
            now,
            inner.interval,
            inner.tau,
            tokens,
        );
        if first.admitted {
            return Ok(first.admitted());
        }
        let refused = first.refusal();
        if refused.exceeds_capacity() || n == 1 {
            Err(refused)
        } else {
            self.borrow(home, now, tokens, refused)
        }
    }

    #[cold]
    fn borrow(
        &self,
        home: usize,
        now: u64,
        tokens: u32,
        mut refused: RateLimited,
    ) -> Result<Admitted, RateLimited> {
        let inner = &*self.inner;
        let n = inner.shards.len();
        for i in 1..n {
            let shard = &inner.shards[(home + i) % n];
            let step = gcra_acquire(&shard.tat, now, inner.interval, inner.tau, tokens);
            if step.admitted {
                return Ok(step.admitted());
            }
            // Report the soonest any shard will have the tokens.
            let r = step.refusal();
            if r.retry_after() < refused.retry_after() {
                refused = r;
            }
        }
        Err(refused)
    }

    /// The whole limiter's figures, from a shard's answer: the capacity of every shard,
    /// the tokens left in all of them, and how long until all are full (what HTTP
    /// headers announce: a shard's figures announced a quarter of the quota over four
    /// shards). Reads every shard: for the HTTP layers, not [`acquire`](Self::acquire).
    pub(crate) fn whole(&self, shard: Admitted) -> Admitted {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        let (mut remaining, mut full_in) = (0u64, 0u64);
        for s in inner.shards.iter() {
            let ahead = s.tat.load(Relaxed).saturating_sub(now);
            remaining += inner.tau.saturating_sub(ahead) / inner.interval.max(1);
            full_in = full_in.max(ahead);
        }
        let n = inner.shards.len() as u32;
        Admitted {
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            full_in: std::time::Duration::from_nanos(full_in),
            limit: shard.limit.saturating_mul(n),
            window: shard.window,
        }
    }

    /// The whole limiter's refusal, from a shard's (see [`whole`](Self::whole)). A request
    /// above one shard's burst, which no shard ever admits, keeps the shard's capacity:
    /// told the whole limiter's, its cost would be "more than" a capacity it is within.
    pub(crate) fn whole_refusal(&self, shard: RateLimited) -> RateLimited {
        if shard.exceeds_capacity() {
            return shard;
        }
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        // When all the shards are full, as an admission tells (`whole`), not the shard
        // that answered.
        let full_in = inner
            .shards
            .iter()
            .map(|s| s.tat.load(Relaxed).saturating_sub(now))
            .max()
            .unwrap_or(0);
        let n = inner.shards.len() as u32;
        shard
            .with_limit(shard.limit().saturating_mul(n))
            .with_full_in(std::time::Duration::from_nanos(full_in).max(shard.full_in()))
    }
}
