//! Buckets per key, with bounded memory.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};

use crate::clock::{Clock, TokioClock};
use crate::rate_limit::error::RateLimited;
use crate::rate_limit::local::bucket::{
    Admitted, Receipt, Reservation, Step, Taken, gcra_acquire, moved_back, refund_nanos,
    rescale_tat,
};
use crate::rate_limit::quota::Quota;

/// Default number of keys a [`KeyedRateLimiter`] tracks.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

const SHARDS: usize = 64;

type QuotaFn<K> = Arc<dyn Fn(&K) -> Quota + Send + Sync>;

/// One key's bucket: its theoretical arrival time and the quota it was built with.
#[derive(Debug, Clone, Copy)]
struct Entry {
    tat: u64,
    interval: u64,
    burst: u32,
    /// The low bits of the limiter's quota version this entry was built under.
    version: u32,
    /// How far a refund (or cancel) of a take that is not the bucket's last may move
    /// `tat` back: the latest waiting turn booked plus its tokens, after what the
    /// bookings before it need (a waiter handing its booking back does not give the one
    /// booked behind it its slot as well), and the arrival time when the quota last
    /// changed (a take from before a raise is in the old quota's units: refunded, it gave
    /// back tokens the new rate had long refilled), as
    /// [`RateLimiter::refund`](crate::rate_limit::RateLimiter::refund) keeps them.
    mark: u64,
    /// How far, in all, refunds and cancels have moved `tat` back under takes made after
    /// the one they handed back (as the single bucket's count, see
    /// [`Taken::until`](crate::rate_limit::Taken)). A new bucket starts at the limiter's
    /// `shift_floor`, at or above every bucket's count, so that a receipt of a dropped
    /// bucket of the same key ends, in the new one, at or before its old end.
    shifted: u64,
}

/// One row: a key and its bucket. The key's hash is not kept: computed once per check
/// (its low bits chose the shard), it is computed again only when the table grows, and a
/// row is 8 bytes smaller for it.
type Row<K> = (K, Entry);

/// One shard: its rows, and when the next of its buckets refills.
struct Shard<K> {
    table: HashTable<Row<K>>,
    /// A full table is not swept before this time, when enough of its buckets will have
    /// refilled to pay for the sweep (see [`make_room`]): a flood of new keys costs no
    /// scan per request.
    next_idle: u64,
    /// Rows visited by sweeps, for the tests of their cost.
    #[cfg(test)]
    scanned: u64,
}

/// Token buckets per key (client IP, API key, route, …), sharded, with a bound on how
/// many keys are tracked, so that keys chosen by callers cannot grow memory without bound.
///
/// When the table is full, buckets that have refilled completely are dropped (they hold
/// nothing a fresh bucket would not). A bucket that still holds a debt is never dropped
/// to make room: that would hand its key the tokens it owes. If no bucket is refilled, a
/// new key gets no bucket of its own: every such key draws from one shared **overflow
/// bucket** with the default quota, until buckets refill and make room. So a flood of
/// fresh keys (a client inventing a new API key per request) can neither evict real
/// clients' buckets nor go unlimited: beyond the table's capacity, all the fresh keys
/// together get one key's quota. Real new clients arriving during such a flood share
/// that bucket too, and may be refused with it. Finding refilled buckets takes a scan of
/// the table's shard (a 64th of it), so a full shard is scanned only once an eighth of
/// its buckets will have refilled: new keys arriving as fast as buckets refill cost a
/// bounded number of rows scanned each, not a shard's, and wait in the overflow bucket
/// until then. Size `max_keys` for the clients you
/// expect (a tracked key takes a row, the key padded to 8 bytes and a 40-byte bucket, and
/// about a third more for the table's spare room: 64 bytes with a `u64` key, 85 with an
/// `IpAddr`, about 148 with a [`BoundedKey`](crate::rate_limit::BoundedKey), whose
/// 100 000 keys, the default maximum, take about 15 MB).
/// With the `tracing` feature, a key sent to the overflow bucket is a `DEBUG` event.
///
/// Each key's quota comes from a function of the key (for example a customer's tier) or
/// the default, and both can be changed at run time.
///
/// Keys are owned values (`Send + Sync + 'static`: `String`, `IpAddr`, `u64`, …), so that
/// an admitted request's receipt ([`KeyedCharge`]) can reach the limiter again without
/// holding a reference count on it.
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::{KeyedRateLimiter, ManualClock, Quota, Rate};
///
/// let clock = ManualClock::new();
/// let limiter = KeyedRateLimiter::builder(Quota::new(Rate::per_second(1), 2)?)
///     .clock(clock.clone())
///     .max_keys(10_000)
///     .build();
/// assert!(limiter.try_acquire("alice", 2).is_ok());
/// assert!(limiter.try_acquire("alice", 1).is_err());
/// assert!(limiter.try_acquire("bob", 1).is_ok(), "every key has its own bucket");
/// # Ok::<(), seawall::ConfigError>(())
/// ```
pub struct KeyedRateLimiter<K, C = TokioClock> {
    inner: Arc<KeyedInner<K, C>>,
}

struct KeyedInner<K, C> {
    /// The way back to this limiter its receipts ([`KeyedCharge`]) hold.
    lease: crate::lease::Claim,
    shards: Box<[Mutex<Shard<K>>]>,
    /// The bucket shared by new keys while the table is full (default quota).
    overflow: AtomicU64,
    /// At or above every bucket's `Entry::shifted`, raised under the shard's lock: where
    /// a new bucket starts counting.
    shift_floor: AtomicU64,
    hasher: RandomState,
    per_shard: AtomicUsize,
    default: RwLock<Quota>,
    quota_fn: RwLock<Option<QuotaFn<K>>>,
    /// Bumped on every quota change; entries built under an older version are rescaled.
    version: AtomicU64,
    /// When the quotas last changed (the clock's nanoseconds): a bucket built under an
    /// older version and rescaled late is rescaled as of then.
    changed_at: AtomicU64,
    /// Held by a quota change from before it takes effect until its pass over the table
    /// is over, so that each change moves every bucket before the next takes effect
    /// (re-entrant: a quota function may change the quotas, see `rescale_all`).
    changing: parking_lot::ReentrantMutex<()>,
    /// Changes that found another in progress and waited for it (tests' handshake).
    #[cfg(test)]
    waited_changes: AtomicUsize,
    telemetry: crate::rate_limit::telemetry::Telemetry,
    clock: C,
}

impl<K, C> Clone for KeyedRateLimiter<K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K, C> fmt::Debug for KeyedRateLimiter<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("default", &*self.inner.default.read())
            .field("max_keys", &(self.inner.per_shard.load(Relaxed) * SHARDS))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedRateLimiter<K, TokioClock> {
    /// Buckets of `quota` per key, on the tokio clock, tracking up to
    /// [`DEFAULT_MAX_KEYS`] keys.
    pub fn new(quota: Quota) -> Self {
        Self::with_clock(quota, TokioClock::new())
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> KeyedRateLimiter<K, C> {
    /// Buckets of `quota` per key, on `clock`.
    pub fn with_clock(quota: Quota, clock: C) -> Self {
        Self {
            inner: Arc::new_cyclic(|this| KeyedInner {
                lease: crate::lease::POOL.claim(this.clone()),
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard {
                            table: HashTable::new(),
                            next_idle: 0,
                            #[cfg(test)]
                            scanned: 0,
                        })
                    })
                    .collect(),
                overflow: AtomicU64::new(0),
                shift_floor: AtomicU64::new(0),
                hasher: RandomState::new(),
                per_shard: AtomicUsize::new(per_shard(DEFAULT_MAX_KEYS)),
                default: RwLock::new(quota),
                quota_fn: RwLock::new(None),
                version: AtomicU64::new(0),
                changed_at: AtomicU64::new(0),
                changing: parking_lot::ReentrantMutex::new(()),
                #[cfg(test)]
                waited_changes: AtomicUsize::new(0),
                telemetry: crate::rate_limit::telemetry::Telemetry::default(),
                clock,
            }),
        }
    }

    /// Tracks at most about `n` keys (rounded up to a multiple of the shard count, at
    /// least one per shard), for every clone, from now on (the
    /// [builder's](crate::rate_limit::KeyedRateLimiterBuilder::max_keys) setting, changed at run time).
    pub fn set_max_keys(&self, n: usize) {
        self.inner.per_shard.store(per_shard(n), Relaxed);
    }

    /// Waits for a quota change in progress on another thread, if any (see `changing`).
    fn start_change(&self) -> parking_lot::ReentrantMutexGuard<'_, ()> {
        if let Some(guard) = self.inner.changing.try_lock() {
            return guard;
        }
        #[cfg(test)]
        self.inner.waited_changes.fetch_add(1, Relaxed);
        self.inner.changing.lock()
    }

    /// Gives each key the quota `f(key)` instead of the default, from now on: every
    /// tracked bucket moves to its key's new quota at once, keeping its level (its debt in
    /// tokens), as [`RateLimiter::set_quota`](crate::rate_limit::RateLimiter::set_quota)
    /// does. This calls `f` for every key tracked, with no lock held, and takes each
    /// shard's lock twice: time in the number of keys, on the calling thread. Changes are
    /// made one at a time: a change waits for one in progress on another thread to have
    /// moved every bucket. So a quota function, which a change calls, may change the
    /// quotas itself, but must not wait for another thread that changes them (or for
    /// anything such a thread holds): that change would wait for this one, for ever.
    pub fn set_quota_fn<F>(&self, f: F)
    where
        F: Fn(&K) -> Quota + Send + Sync + 'static,
    {
        let _changing = self.start_change();
        let mut quota_fn = self.inner.quota_fn.write();
        *quota_fn = Some(Arc::new(f));
        let (now, version) = self.quotas_changed();
        drop(quota_fn);
        self.rescale_all(now, version);
    }

    /// Replaces the default quota, from now on: the buckets of the keys it applies to move
    /// to it at once, keeping their level, as with [`set_quota_fn`](Self::set_quota_fn).
    pub fn set_default_quota(&self, quota: Quota) {
        let _changing = self.start_change();
        let mut default = self.inner.default.write();
        // The overflow bucket (shared by the keys without a bucket of their own, and by
        // `acquire_shared`) keeps its level too: its debt moves to the new rate as
        // tokens, as `RateLimiter::set_quota` moves its bucket's.
        let old = default.interval_nanos();
        let new = quota.interval_nanos();
        let now = self.inner.clock.now_nanos();
        let _ = self.inner.overflow.fetch_update(Relaxed, Relaxed, |tat| {
            Some(rescale_tat(tat, now, old, new))
        });
        *default = quota;
        let (now, version) = self.quotas_changed();
        drop(default);
        self.rescale_all(now, version);
    }

    /// Records a change of the quotas (made under their write lock): its time, and a new
    /// version. Returns the time.
    fn quotas_changed(&self) -> (u64, u32) {
        let now = self.inner.clock.now_nanos();
        self.inner.changed_at.store(now, Relaxed);
        // `Release`, with the check's `Acquire` load: a check that sees the new version
        // sees the new quotas and the change's time, so no bucket is tagged current with
        // the old quota.
        let version = self.inner.version.fetch_add(1, Release).wrapping_add(1);
        (now, version as u32)
    }

    /// Moves every bucket built under older quotas to its key's quota, as of `at` (when
    /// the quotas changed). Without this, a bucket would move only at its key's next
    /// request, having refilled at the old rate meanwhile (a lowered quota would not hold
    /// until then), and a full shard would judge its buckets refilled by the old rate.
    /// The quotas are looked up with no lock held (a quota function may call back into
    /// this limiter); a bucket moved meanwhile by a check is left as it is. A shard some
    /// of whose buckets now refill sooner may be swept again at its next new key.
    ///
    /// Changes are made one at a time (`changing`), but a quota function may itself
    /// change the quotas: that change's pass moves every bucket, and this one stops
    /// where it was (the buckets it had not reached skip its quota, moving from the one
    /// before it straight to the newest).
    fn rescale_all(&self, at: u64, version: u32) {
        let mut stale: Vec<(K, u32)> = Vec::new();
        for shard in self.inner.shards.iter() {
            stale.extend(
                shard
                    .lock()
                    .table
                    .iter()
                    .filter(|row| row.1.version != version)
                    .map(|row| (row.0.clone(), row.1.version)),
            );
            if stale.is_empty() {
                continue;
            }
            let fresh: Vec<Entry> = stale
                .iter()
                .map(|(key, _)| self.entry_for(key, at, version))
                .collect();
            let mut guard = shard.lock();
            if self.inner.version.load(Acquire) as u32 != version {
                // A later change's pass moves every row not at its version.
                return;
            }
            let mut earlier = false;
            for ((key, seen), fresh) in stale.drain(..).zip(fresh) {
                let hash = self.inner.hasher.hash_one(&key);
                if let Some(row) = guard.table.find_mut(hash, |row| row.0 == key) {
                    // Only a row nobody moved since it was seen (not one a later change
                    // or a check moved on).
                    if row.1.version == seen {
                        let before = row.1.tat;
                        let shifted = rescale(&mut row.1, fresh, at);
                        self.inner.shift_floor.fetch_max(shifted, Relaxed);
                        earlier |= row.1.tat < before;
                    }
                }
            }
            if earlier {
                guard.next_idle = 0;
            }
        }
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().table.len()).sum()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest number of keys tracked at once.
    pub fn capacity(&self) -> usize {
        self.inner.per_shard.load(Relaxed) * SHARDS
    }

    fn quota_for(&self, key: &K) -> Quota {
        // The function is called with no lock held: it may call back into this limiter
        // while another thread waits to change the quotas, and a read lock taken again
        // behind a waiting writer would never be granted.
        let f = self.inner.quota_fn.read().clone();
        match f {
            Some(f) => f(key),
            None => *self.inner.default.read(),
        }
    }

    /// Takes `tokens` from `key`'s bucket now, returning how many are left; otherwise takes
    /// nothing and says when they will be there. A key seen for the first time gets a full
    /// bucket. Looking up an existing key does not allocate.
    pub fn try_acquire<Q>(&self, key: &Q, tokens: u32) -> Result<u32, RateLimited>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.inner.clock.now_nanos();
        let (step, _) = self.book_at(key, tokens, 0, now);
        self.inner.telemetry.report(step, Step::remaining)
    }

    /// Like [`try_acquire`](Self::try_acquire), with what rate-limit headers need.
    pub fn acquire<Q>(&self, key: &Q, tokens: u32) -> Result<Admitted, RateLimited>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.inner.clock.now_nanos();
        let (step, _) = self.book_at(key, tokens, 0, now);
        self.inner.telemetry.report(step, Step::admitted)
    }

    /// Takes `tokens` from the limiter's shared bucket: one bucket of the default quota,
    /// for requests that have no key ([`OnMissingKey::Shared`](crate::rate_limit::OnMissingKey::Shared)),
    /// also drawn from by new keys while the limiter is full. It does not queue and its
    /// tokens are not refunded.
    pub fn acquire_shared(&self, tokens: u32) -> Result<Admitted, RateLimited> {
        let now = self.inner.clock.now_nanos();
        let step = self.acquire_overflow(now, tokens);
        self.inner.telemetry.report(step, Step::admitted)
    }

    fn acquire_overflow(&self, now: u64, tokens: u32) -> Step {
        let quota = *self.inner.default.read();
        let interval = quota.interval_nanos();
        let tau = u64::from(quota.burst()).saturating_mul(interval);
        gcra_acquire(&self.inner.overflow, now, interval, tau, tokens)
    }

    /// Names the limiter for metrics and tracing, if it has no name yet (the builder's).
    pub(crate) fn set_name(&self, name: &str) {
        self.inner.telemetry.name(name);
    }

    /// The limiter's name, if its [builder](KeyedRateLimiter::builder) gave it one.
    pub fn name(&self) -> Option<&str> {
        self.inner.telemetry.get_name()
    }

    /// Books `tokens` from `key`'s bucket for the earliest time they will be there, if that
    /// is within `max_wait` (as [`RateLimiter::reserve`](crate::rate_limit::RateLimiter::reserve), per
    /// key). Bookings for one key are served in the order they were made; a booking that is
    /// not used must be handed back with [`cancel`](Self::cancel).
    pub fn reserve<Q>(
        &self,
        key: &Q,
        tokens: u32,
        max_wait: Duration,
    ) -> Result<Reservation, RateLimited>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let max_wait = crate::util::nanos(max_wait);
        let now = self.inner.clock.now_nanos();
        let (step, own) = self.book_at(key, tokens, max_wait, now);
        let wait = self.inner.telemetry.report(step, Step::wait)?;
        Ok(Reservation {
            tokens,
            wait: Duration::from_nanos(wait),
            // A booking drawn from the overflow bucket hands nothing back (as a refund of
            // its tokens does not): the key's own bucket, if it has one by then, never
            // lent them.
            until: own.map_or(0, |shifted| step.taken(shifted).until),
        })
    }

    /// Hands back a booking of `key` that will not be used, so that its tokens serve later
    /// callers. Nothing happens if the key's bucket has since been dropped, or if the
    /// booking came from the overflow bucket.
    pub fn cancel<Q>(&self, key: &Q, reservation: Reservation)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // As a refund: what of the booking has refilled since is not given back again.
        self.refund(
            key,
            Taken {
                tokens: u64::from(reservation.tokens),
                until: reservation.until,
            },
        );
    }

    /// Like [`acquire`](Self::acquire), with a receipt of the tokens taken, for
    /// [`refund`](Self::refund).
    #[inline]
    pub fn take<Q>(&self, key: &Q, tokens: u32) -> Result<(Admitted, Taken), RateLimited>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.inner.clock.now_nanos();
        let (step, own) = self.book_at(key, tokens, 0, now);
        self.inner
            .telemetry
            .report(step, |step| (step.admitted(), receipt(step, own)))
    }

    /// [`take`](Self::take), the receipt with the key and the way back to this limiter (no
    /// reference count: see [`KeyedCharge`]) for [`Refund`](crate::rate_limit::Refund).
    #[inline]
    pub fn charge(
        &self,
        key: K,
        tokens: u32,
    ) -> Result<(Admitted, KeyedCharge<K, C>), RateLimited> {
        let (admitted, taken) = self.take(&key, tokens)?;
        Ok((
            admitted,
            KeyedCharge::new(self.inner.lease.lease(), key, taken),
        ))
    }

    /// [`charge`](Self::charge) as the layers' [`Decision`](crate::rate_limit::Decision).
    /// Inlined whole (the lookup's slow paths stay out of line): returned from a call,
    /// the decision would come back through memory and stall the layer that reads it.
    #[inline(always)]
    pub(crate) fn decide(
        &self,
        key: K,
        tokens: u32,
    ) -> crate::rate_limit::Decision<Option<KeyedCharge<K, C>>> {
        let now = self.inner.clock.now_nanos();
        let (step, own) = self.book_at(&key, tokens, 0, now);
        self.inner.telemetry.decide(step, |step| {
            Some(KeyedCharge::new(
                self.inner.lease.lease(),
                key,
                receipt(step, own),
            ))
        })
    }

    /// Hands back tokens taken from `key`'s bucket by [`take`](Self::take) (with that
    /// same key) for a request that a limit further in refused. Exact and bounded, as
    /// [`RateLimiter::refund`](crate::rate_limit::RateLimiter::refund): at most the tokens taken, less
    /// what has refilled since, never above the burst; bookings made after the take keep
    /// their turns (a refund stops at what they need; the key's last take or booking
    /// gives all of it back), and a take made before a quota change is not refunded
    /// further than the bucket's arrival time at the change. Nothing happens if the key's
    /// bucket has since been dropped, or if the tokens came from the overflow bucket.
    pub fn refund<Q>(&self, key: &Q, taken: Taken)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.inner.clock.now_nanos();
        let hash = self.inner.hasher.hash_one(key);
        let shard = &self.inner.shards[shard_index(hash)];
        let mut guard = shard.lock();
        // (A bucket refilled early by the refund waits for the shard's next sweep, which
        // is not brought forward: see `make_room`.)
        let Some(row) = guard.table.find_mut(hash, |row| row.0.borrow() == key) else {
            return;
        };
        let entry = &mut row.1;
        // Where the take's debt ends now, at the latest (see `Entry::shifted`).
        let end = taken.until.wrapping_sub(entry.shifted);
        let back = refund_nanos(taken.tokens, end, now, entry.interval);
        let Some(moved) = moved_back(entry.tat, end, back, now, entry.mark) else {
            return;
        };
        let moved = moved.min(entry.tat);
        if entry.tat != end {
            // Not the key's last take: the debt of the takes after it moved down.
            entry.shifted = entry.shifted.saturating_add(entry.tat - moved);
            self.inner.shift_floor.fetch_max(entry.shifted, Relaxed);
        }
        entry.tat = moved;
    }

    /// Takes `tokens` from `key`'s bucket, now or (booked) within `max_wait` nanoseconds,
    /// at `now`; also says whether they came from the key's own bucket (its count of
    /// moves back, for the receipt) or the overflow bucket (`None`). The path of a key whose bucket exists under the current quotas, inline;
    /// the others out of line.
    #[inline(always)]
    fn book_at<Q>(&self, key: &Q, tokens: u32, max_wait: u64, now: u64) -> (Step, Option<u64>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let version = self.inner.version.load(Acquire) as u32;
        let hash = self.inner.hasher.hash_one(key);
        let shard = &self.inner.shards[shard_index(hash)];
        let mut guard = shard.lock();
        let eq = |row: &Row<K>| row.0.borrow() == key;
        if let Some(row) = guard.table.find_mut(hash, eq) {
            if row.1.version == version {
                return (take(&mut row.1, now, tokens, max_wait), Some(row.1.shifted));
            }
        }
        drop(guard);
        self.book_slow(key, hash, version, tokens, max_wait, now)
    }

    /// What a sweep needs to know of the quotas: `current` and the last change.
    fn quotas(&self, current: u32) -> Quotas {
        Quotas {
            version: current,
            changed_at: self.inner.changed_at.load(Relaxed),
            changing: self.inner.changing.is_locked(),
        }
    }

    /// [`book_at`](Self::book_at) for a key without a bucket, or whose bucket was built
    /// under other quotas. The key's quota is looked up outside the shard's lock.
    #[inline(never)]
    fn book_slow<Q>(
        &self,
        key: &Q,
        hash: u64,
        version: u32,
        tokens: u32,
        max_wait: u64,
        now: u64,
    ) -> (Step, Option<u64>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let shard = &self.inner.shards[shard_index(hash)];
        let eq = |row: &Row<K>| row.0.borrow() == key;
        let owned = key.to_owned();
        let mut version = version;
        let mut lookups = 0;
        let (mut entry, mut guard, current) = loop {
            let entry = self.entry_for(&owned, now, version);
            let guard = shard.lock();
            let current = self.inner.version.load(Acquire) as u32;
            lookups += 1;
            if current == version {
                break (entry, guard, current);
            }
            if lookups >= 3 {
                // The quotas keep changing (a quota function changing them itself, or
                // changes made as fast as quotas are looked up): the row keeps the
                // version its quota was looked up under, and is moved at its key's next
                // request (a sweep judges it by its own quota once no change is in
                // progress, see `make_room`).
                break (entry, guard, current);
            }
            // The quotas changed while the quota was looked up: again, under the new
            // ones (a row inserted now under the old version might be missed by the
            // change's rescale).
            drop(guard);
            version = current;
        };
        let shard_state = &mut *guard;
        if let Some(row) = shard_state.table.find_mut(hash, eq) {
            // Built under an older quota (or inserted by another caller meanwhile):
            // rescale it if need be, then charge it.
            let mut earlier = false;
            // (A row already at the current version, moved by a change's pass, is not
            // moved back to a quota looked up before it.)
            if row.1.version != version && row.1.version != current {
                // As of the change (the check's `Acquire` load of the version made its
                // time visible), not of now: the bucket refilled at the new rate since.
                let at = self.inner.changed_at.load(Relaxed).min(now);
                let before = row.1.tat;
                let shifted = rescale(&mut row.1, entry, at);
                self.inner.shift_floor.fetch_max(shifted, Relaxed);
                earlier = row.1.tat < before;
            }
            let step = take(&mut row.1, now, tokens, max_wait);
            if earlier {
                shard_state.next_idle = 0;
            }
            return (step, Some(row.1.shifted));
        }
        // A new key. Its count of moves back starts at the floor as it is now, under the
        // shard's lock (read by `entry_for` before it, it could miss a raise by a refund
        // of this key's old bucket, dropped by a sweep meanwhile).
        entry.shifted = self.inner.shift_floor.load(Relaxed);
        let step = take(&mut entry, now, tokens, max_wait);
        if !step.admitted {
            // A fresh bucket refuses only a request above its burst, which it never
            // admits: no bucket is kept for it.
            return (step, Some(entry.shifted));
        }
        let cap = self.inner.per_shard.load(Relaxed);
        // (What a sweep needs to know of the quotas is read only when the shard is full.)
        if guard.table.len() >= cap
            && !make_room(
                &mut guard,
                now,
                cap,
                self.quotas(current),
                &self.inner.hasher,
            )
        {
            // Full of buckets that still hold a debt: the new key draws from the
            // overflow bucket, shared by every key without a bucket of its own.
            drop(guard);
            #[cfg(feature = "tracing")]
            tracing::debug!(
                target: "seawall::rate_limit",
                limiter = self.inner.telemetry.get_name().unwrap_or(""),
                "keyed limiter full: a new key draws from the overflow bucket"
            );
            return (self.acquire_overflow(now, tokens), None);
        }
        guard.table.insert_unique(hash, (owned, entry), |row| {
            self.inner.hasher.hash_one(&row.0)
        });
        (step, Some(entry.shifted))
    }

    fn entry_for(&self, key: &K, now: u64, version: u32) -> Entry {
        let quota = self.quota_for(key);
        Entry {
            tat: now,
            interval: quota.interval_nanos(),
            burst: quota.burst(),
            version,
            mark: now,
            // Set from the floor under the shard's lock by a new row's insertion (see
            // `book_slow`); a rescale keeps the row's own.
            shifted: 0,
        }
    }

    /// The clock this limiter reads.
    pub fn clock(&self) -> &C {
        &self.inner.clock
    }
}

/// Tokens an admitted request took from a key's bucket in a [`KeyedRateLimiter`], with
/// the key and the way back to the limiter: handed back with
/// [`Refund::refund`](crate::rate_limit::Refund::refund) when a limit further in refuses the
/// request. Making and dropping one takes no reference count on the limiter (see
/// [`Charge`](crate::rate_limit::Charge)).
pub struct KeyedCharge<K, C = TokioClock> {
    receipt: Receipt,
    key: K,
    _clock: std::marker::PhantomData<fn() -> C>,
}

impl<K, C> KeyedCharge<K, C> {
    #[inline(always)]
    fn new(lease: crate::lease::Lease, key: K, taken: Taken) -> Self {
        Self {
            receipt: Receipt::new(lease, taken),
            key,
            _clock: std::marker::PhantomData,
        }
    }
}

impl<K, C> fmt::Debug for KeyedCharge<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCharge")
            .field("taken", &self.receipt.taken())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, C: Clock> crate::rate_limit::Refund
    for KeyedCharge<K, C>
{
    fn refund(self) {
        // Nothing to hand back to a limiter that is gone.
        if let Some(inner) = self.receipt.limiter::<KeyedInner<K, C>>() {
            KeyedRateLimiter { inner }.refund(&self.key, self.receipt.taken());
        }
    }
}

/// The shard of a key's hash: bits of it that its shard's table does not use. The table
/// starts its search at the hash's low bits and tags rows with its top seven; a shard
/// chosen by the low bits would leave every key of a shard starting at one slot in 64,
/// in long runs, and one chosen by the top bits would leave the tags two values.
#[inline(always)]
fn shard_index(hash: u64) -> usize {
    (hash >> 32) as usize & (SHARDS - 1)
}

/// Keys a shard tracks for `max_keys` in all: at least one, and so that the total
/// (`per_shard * SHARDS`) is a `usize` (`usize::MAX` asks for no bound but memory's).
fn per_shard(max_keys: usize) -> usize {
    max_keys.div_ceil(SHARDS).clamp(1, usize::MAX / SHARDS)
}

/// The receipt of an admitted step, from the key's own bucket (its count of moves back,
/// see `Entry::shifted`) or from the overflow bucket (`None`): tokens from the overflow
/// bucket are not handed back to any key's bucket.
#[inline]
fn receipt(step: Step, own: Option<u64>) -> Taken {
    let mut taken = step.taken(own.unwrap_or(0));
    if own.is_none() {
        taken.tokens = 0;
    }
    taken
}

/// Moves `entry` to a new quota, keeping its debt in tokens; returns its count of moves
/// back, for the limiter's `shift_floor`.
fn rescale(entry: &mut Entry, fresh: Entry, now: u64) -> u64 {
    let tat = rescale_tat(entry.tat, now, entry.interval, fresh.interval);
    // A faster quota moves the debt back under the receipts of the takes made before
    // it, whose ends are in the old quota's units: one ending just where the new debt
    // ends would read as the key's last take and come back in full, past the mark.
    // Counted as a move back as far as `now`, every such receipt reads as refilled.
    let shifted = if tat < entry.tat {
        entry.shifted.saturating_add(entry.tat - now)
    } else {
        entry.shifted
    };
    *entry = Entry {
        tat,
        mark: entry.mark.max(entry.tat),
        shifted,
        ..fresh
    };
    shifted
}

/// The GCRA step of [`RateLimiter`](crate::rate_limit::RateLimiter), on a bucket held under its
/// shard's lock.
#[inline(always)]
fn take(entry: &mut Entry, now: u64, tokens: u32, max_wait: u64) -> Step {
    let tau = u64::from(entry.burst).saturating_mul(entry.interval);
    let step = Step::new(entry.tat, now, entry.interval, tau, tokens, max_wait);
    if step.admitted {
        entry.tat = step.next;
        let wait = step.wait();
        if wait > 0 {
            // A booking's turn, and the tokens it takes then, after those the bookings
            // before it take at theirs: what refunds of the takes before it must leave
            // (see `Entry::mark`).
            let turn = now.saturating_add(wait);
            let cost = u64::from(tokens).saturating_mul(entry.interval);
            entry.mark = entry.mark.max(turn).saturating_add(cost);
        }
    }
    step
}

/// Drops the shard's idle (refilled) buckets; whether there is room now.
///
/// A sweep scans the whole shard, so it happens only when it frees enough rows to pay for
/// it: at least [`sweep_yield`] of them, an eighth of the shard. After a sweep that freed
/// that many, the next waits until the table is full again (the rows freed are taken
/// first); after one that freed fewer, until that many of the buckets it kept will have
/// refilled (`next_idle`). Until then a new key finding the shard full draws from the
/// overflow bucket, though a few rows may have refilled: new keys arriving about as fast
/// as rows refill would otherwise each scan the shard to free about one row. The scan is
/// amortised over the rows freed: a bounded number of rows visited per new key, whatever
/// the table's size.
///
/// While a change is in progress, a bucket built under older quotas, which the change's
/// pass over the table ([`KeyedRateLimiter::rescale_all`]) has not reached yet, is kept
/// if it owed tokens when the quotas changed: its arrival time, by its old rate, does not
/// say when it refills. Once no change is in progress such a bucket (left by a check
/// that raced changes past its lookups) is judged by its own quota, as a bucket is.
fn make_room<K: Hash>(
    shard: &mut Shard<K>,
    now: u64,
    cap: usize,
    quotas: Quotas,
    hasher: &RandomState,
) -> bool {
    if now < shard.next_idle {
        return false;
    }
    #[cfg(test)]
    {
        shard.scanned += shard.table.len() as u64;
    }
    let (mut earliest, mut latest) = (u64::MAX, 0);
    shard.table.retain(|row| {
        let kept = row.1.tat > now
            || (quotas.changing
                && row.1.version != quotas.version
                && row.1.tat > quotas.changed_at);
        if kept {
            earliest = earliest.min(row.1.tat);
            latest = latest.max(row.1.tat);
        }
        kept
    });
    // The rows dropped leave markers that new rows may not fill, and a table out of room
    // because of them doubles, though it holds no more rows: one sized for the rows
    // kept (rebuilt only when that is smaller) keeps the memory to the keys tracked.
    shard
        .table
        .shrink_to(shard.table.len(), |row| hasher.hash_one(&row.0));
    let len = shard.table.len();
    let want = sweep_yield(cap);
    shard.next_idle = if len.saturating_add(want) <= cap {
        // Room for `want` new keys at least: they pay for the next sweep.
        0
    } else {
        refilled_by(&shard.table, want, earliest, latest)
    };
    len < cap
}

/// The quotas' version (its low bits, as entries keep it), when they last changed, and
/// whether a change is in progress (its pass over the table not over).
#[derive(Clone, Copy)]
struct Quotas {
    version: u32,
    changed_at: u64,
    changing: bool,
}

/// The rows a sweep of a shard of `cap` rows must be able to free: an eighth of them.
fn sweep_yield(cap: usize) -> usize {
    (cap / 8).max(1)
}

/// A time by which at least `count` of the buckets in `table` (their arrival times
/// within `earliest..=latest`) will have refilled: the earliest such time to within a
/// 64th of their spread, counted in one pass without allocating. `latest` if there are
/// fewer.
fn refilled_by<K>(table: &HashTable<Row<K>>, count: usize, earliest: u64, latest: u64) -> u64 {
    const BINS: usize = 64;
    if count <= 1 || latest <= earliest {
        return table.iter().map(|row| row.1.tat).min().unwrap_or(0);
    }
    // Bins of `width` from `earliest` cover `earliest..=latest`: the spread over the
    // width is below BINS.
    let width = (latest - earliest) / BINS as u64 + 1;
    let mut bins = [0usize; BINS];
    for row in table.iter() {
        let bin = (row.1.tat.saturating_sub(earliest) / width) as usize;
        bins[bin.min(BINS - 1)] += 1;
    }
    let mut refilled = 0;
    for (bin, rows) in bins.iter().enumerate() {
        refilled += rows;
        if refilled >= count {
            // Every bucket of this bin and those before it has refilled by the bin's
            // last instant.
            return earliest.saturating_add((bin as u64 + 1) * width - 1);
        }
    }
    latest
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Arc, OnceLock, mpsc};

    use super::*;
    use crate::clock::ManualClock;
    use crate::rate_limit::Rate;

    fn keyed_charged(
        clock: &ManualClock,
    ) -> (
        KeyedRateLimiter<String, ManualClock>,
        KeyedCharge<String, ManualClock>,
    ) {
        let quota = Quota::new(Rate::per_second(1), 2).unwrap();
        let limiter = KeyedRateLimiter::with_clock(quota, clock.clone());
        let (_, charge) = limiter.charge("k".to_owned(), 2).unwrap();
        assert!(limiter.try_acquire("k", 1).is_err());
        (limiter, charge)
    }

    /// A quota function called by a check may call back into its limiter while another
    /// thread changes the quotas: here the function waits for that change to finish,
    /// which it cannot while a lock the change needs is held around the function. (A
    /// quota function called by a change's pass must not wait for another thread's
    /// change: see `set_quota_fn`.)
    #[test]
    fn quotas_change_while_the_quota_function_runs() {
        let quota = Quota::new(Rate::per_second(10), 1).unwrap();
        let limiter: KeyedRateLimiter<u64> = KeyedRateLimiter::new(quota);
        let handle: Arc<OnceLock<KeyedRateLimiter<u64>>> = Arc::default();
        limiter.set_quota_fn({
            let handle = handle.clone();
            move |key: &u64| {
                if *key == 1 {
                    let limiter = handle.get().unwrap().clone();
                    std::thread::spawn(move || {
                        limiter.set_quota_fn(move |_: &u64| quota);
                        // And a check from the function's own thread's point of view.
                        limiter.try_acquire(&2, 1).is_ok()
                    })
                    .join()
                    .unwrap();
                }
                quota
            }
        });
        handle.set(limiter.clone()).ok().unwrap();
        let (done, finished) = mpsc::channel();
        let checker = limiter.clone();
        std::thread::spawn(move || {
            let _ = done.send(checker.try_acquire(&1, 1));
        });
        let answer = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the quota function waited for good on the quota change (deadlock)");
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(limiter.len(), 2);
    }

    /// The bits that pick a key's shard are not those its shard's table starts its search
    /// at (the low ones) or tags its rows with (the top seven): a shard's keys start
    /// anywhere in its table and carry every tag.
    /// New keys arriving as fast as rows refill (a client inventing a key per request at
    /// the table's refill rate) used to make many new keys sweep their whole shard to free
    /// about one row: CPU a request growing with `max_keys` (140 rows a new key here, a
    /// seventh of the shard; 20 µs a request at a million keys). A sweep now waits until
    /// it can free an eighth of the shard, so its scan is paid for by the rows it frees.
    #[test]
    fn keys_arriving_at_the_refill_rate_do_not_sweep_the_shard_each() {
        let (per_key, admitted) = new_keys_at_the_refill_rate(false);
        assert!(per_key <= 16.0, "{per_key} rows scanned a new key");
        // New keys still get rows as rows refill (and the overflow bucket the rest).
        assert!(admitted >= 0.5, "{admitted} admitted");
    }

    /// The same, with every other new key's token handed back (as when a global limit
    /// further in refuses it): a refund made the shard sweep again at the next new key.
    #[test]
    fn refunds_do_not_make_new_keys_sweep_the_shard() {
        let (per_key, _) = new_keys_at_the_refill_rate(true);
        assert!(per_key <= 16.0, "{per_key} rows scanned a new key");
    }

    /// Rows scanned by sweeps a new key, and the share of new keys admitted, while new
    /// keys arrive a little faster than rows refill (once the table is full, a row
    /// refills every 1/64 000 s); with `refund`, every other admitted key's token is
    /// handed back at once.
    fn new_keys_at_the_refill_rate(refund: bool) -> (f64, f64) {
        const KEYS: u64 = 64_000;
        let clock = ManualClock::new();
        let quota = Quota::new(Rate::per_second(1), 1).unwrap();
        let limiter: KeyedRateLimiter<u64, _> = KeyedRateLimiter::builder(quota)
            .clock(clock.clone())
            .max_keys(KEYS as usize)
            .build();
        // With refunds, twice as fast: the keys that keep their token arrive at the
        // same pace.
        let pace = Duration::from_nanos(1_000_000_000 / KEYS * 4 / 5 / (1 + u64::from(refund)));
        let scanned = |limiter: &KeyedRateLimiter<u64, ManualClock>| -> u64 {
            limiter.inner.shards.iter().map(|s| s.lock().scanned).sum()
        };
        let arrive = |keys: std::ops::Range<u64>| {
            let mut admitted = 0u64;
            for key in keys {
                if let Ok((_, taken)) = limiter.take(&key, 1) {
                    admitted += 1;
                    if refund && key % 2 == 0 {
                        limiter.refund(&key, taken);
                    }
                }
                clock.advance(pace);
            }
            admitted
        };
        // The table fills, then every row freed is taken by a new key.
        arrive(0..3 * KEYS);
        let before = scanned(&limiter);
        let arrivals = 3 * KEYS;
        let admitted = arrive(3 * KEYS..3 * KEYS + arrivals);
        assert!(limiter.len() <= limiter.capacity());
        let per_key = (scanned(&limiter) - before) as f64 / arrivals as f64;
        (per_key, admitted as f64 / arrivals as f64)
    }

    proptest::proptest! {
        /// The time a sweep waits for frees the rows it waits for, and is not much
        /// later than the exact time they would all have refilled: at most a 64th of the
        /// buckets' spread.
        #[test]
        fn refilled_by_is_a_tight_upper_bound(
            tats in proptest::collection::vec(0u64..1 << 40, 1..400),
            count in 1usize..400,
        ) {
            let hasher = RandomState::new();
            let mut table: HashTable<Row<u64>> = HashTable::new();
            for (key, tat) in tats.iter().enumerate() {
                let entry = Entry { tat: *tat, interval: 1, burst: 1, version: 0, mark: 0, shifted: 0 };
                let key = key as u64;
                table.insert_unique(hasher.hash_one(key), (key, entry), |row| {
                    hasher.hash_one(row.0)
                });
            }
            let (earliest, latest) = (*tats.iter().min().unwrap(), *tats.iter().max().unwrap());
            let at = refilled_by(&table, count, earliest, latest);
            let mut sorted = tats.clone();
            sorted.sort_unstable();
            if count <= sorted.len() {
                let exact = sorted[count - 1];
                proptest::prop_assert!(tats.iter().filter(|&&tat| tat <= at).count() >= count);
                proptest::prop_assert!(at >= exact);
                proptest::prop_assert!(at - exact <= (latest - earliest) / 64 + 1, "{at} {exact}");
            } else {
                proptest::prop_assert_eq!(at, latest);
            }
        }
    }

    #[test]
    fn a_shards_keys_start_anywhere_in_its_table() {
        let limiter: KeyedRateLimiter<u64> =
            KeyedRateLimiter::new(Quota::new(Rate::per_second(1), 1).unwrap());
        let hashes: Vec<u64> = (0..200_000u64)
            .map(|key| limiter.inner.hasher.hash_one(key))
            .filter(|hash| shard_index(*hash) == 5)
            .collect();
        let starts: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 63).collect();
        assert_eq!(starts.len(), 64, "the low bits of one shard's keys");
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert_eq!(tags.len(), 128, "the top seven bits of one shard's keys");
    }

    /// A receipt's end is its take's end plus the bucket's count of moves back at the
    /// take; a bucket dropped (refilled, by a sweep) and made again for the same key
    /// starts its count at the limiter's floor, not at zero: from zero, a receipt of the
    /// old bucket, refunded into the new one, read as ending far later than it did and
    /// gave back tokens long refilled.
    #[test]
    fn a_receipt_of_a_dropped_bucket_gives_nothing_back_to_the_new_one() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, _> = KeyedRateLimiter::with_clock(
            Quota::new(Rate::per_second(1), 10).unwrap(),
            clock.clone(),
        );
        // Five refunds of a take with a later one outstanding: five seconds of moves.
        for _ in 0..5 {
            let (_, a) = limiter.take(&7, 1).unwrap();
            let (_, b) = limiter.take(&7, 1).unwrap();
            limiter.refund(&7, a);
            limiter.refund(&7, b);
        }
        assert_eq!(limiter.try_acquire(&7, 0), Ok(10));
        let (_, old) = limiter.take(&7, 1).unwrap();
        // Refilled three seconds later, and dropped as a sweep drops a full bucket.
        clock.advance(Duration::from_secs(3));
        let hash = limiter.inner.hasher.hash_one(7u64);
        let mut shard = limiter.inner.shards[shard_index(hash)].lock();
        let row = shard.table.find_entry(hash, |row| row.0 == 7).ok().unwrap();
        row.remove();
        drop(shard);
        // A new bucket for the key: the old receipt's tokens are not owed to it.
        assert_eq!(limiter.try_acquire(&7, 5), Ok(5));
        limiter.refund(&7, old);
        assert_eq!(limiter.try_acquire(&7, 0), Ok(5));
    }

    /// `usize::MAX` keys is a way to ask for no bound: the capacity says so, and
    /// neither it nor `Debug` overflows.
    #[test]
    fn the_largest_max_keys_is_a_capacity() {
        let limiter: KeyedRateLimiter<u64> =
            KeyedRateLimiter::new(Quota::new(Rate::per_second(1), 1).unwrap());
        limiter.set_max_keys(usize::MAX);
        assert_eq!(limiter.capacity(), usize::MAX / SHARDS * SHARDS);
        assert!(format!("{limiter:?}").contains(&limiter.capacity().to_string()));
        assert!(limiter.try_acquire(&7, 1).is_ok());
        limiter.set_max_keys(0);
        assert_eq!(limiter.capacity(), SHARDS);
    }

    /// A row is the key and its bucket (its arrival time, quota, version, refund mark
    /// and count of moves back), without the key's hash.
    #[test]
    fn a_row_keeps_no_hash() {
        assert_eq!(std::mem::size_of::<Row<u64>>(), 48);
    }

    /// The rows keep no hash, so the table hashes every key again when it grows: each key
    /// must still find its own bucket (a lost one would come back full), borrowed form
    /// included.
    #[test]
    fn every_key_keeps_its_bucket_as_the_table_grows() {
        let quota = Quota::new(Rate::per_second(1), 1).unwrap();
        let limiter = KeyedRateLimiter::with_clock(quota, ManualClock::new());
        // Up to 10 000 keys (156 a shard on average) the tables grow several times.
        for n in [1_u32, 10, 100, 1_000, 10_000] {
            for k in n / 10..n {
                let key = format!("client-{k}");
                assert_eq!(limiter.try_acquire(key.as_str(), 1), Ok(0), "{key}, first");
            }
            for k in 0..n {
                let key = format!("client-{k}");
                assert!(
                    limiter.try_acquire(&key, 1).is_err(),
                    "{key} found full after {n}"
                );
            }
        }
        assert_eq!(limiter.len(), 10_000);
    }

    #[test]
    fn a_keyed_charge_hands_its_tokens_back_without_a_handle_on_the_limiter() {
        use crate::rate_limit::Refund;
        let clock = ManualClock::new();
        let (limiter, charge) = keyed_charged(&clock);
        // Plain words and the key: no reference count on the limiter.
        assert_eq!(Arc::strong_count(&limiter.inner), 1);
        charge.refund();
        assert!(limiter.try_acquire("k", 2).is_ok(), "both tokens back");
    }

    #[test]
    fn a_keyed_charge_outliving_its_limiter_reaches_no_other() {
        use crate::rate_limit::Refund;
        let clock = ManualClock::new();
        let (first, charge) = keyed_charged(&clock);
        drop(first);
        // Most likely the first one's block, taken over (see the local limiter's test).
        let (second, _kept) = keyed_charged(&clock);
        let reused = std::ptr::eq(charge.receipt.block(), second.inner.lease.lease().block());
        charge.refund();
        assert!(
            second.try_acquire("k", 1).is_err(),
            "block reused: {reused}"
        );
    }

    /// Keys of three shards, `z`'s swept before `a`'s by a quota change's pass (shards are
    /// taken in order), and `b` in `a`'s shard.
    fn keys_across_shards(limiter: &KeyedRateLimiter<u64, ManualClock>) -> (u64, u64, u64) {
        let shard_of = |key: &u64| shard_index(limiter.inner.hasher.hash_one(key));
        let a = (0..).find(|key| shard_of(key) > 0).unwrap();
        let b = (a + 1..).find(|key| shard_of(key) == shard_of(&a)).unwrap();
        let z = (0..).find(|key| shard_of(key) < shard_of(&a)).unwrap();
        (a, b, z)
    }

    /// Stops the first caller at `key` (on the thread `only_on` names, if given) until
    /// the returned sender is sent to or dropped; the receiver hears when it stops.
    fn stop_once(
        key: u64,
        only_on: Option<Arc<OnceLock<std::thread::ThreadId>>>,
    ) -> (
        impl Fn(&u64) + Send + Sync + 'static,
        mpsc::Receiver<()>,
        mpsc::Sender<()>,
    ) {
        let (entered, stopped) = mpsc::channel::<()>();
        let (go, wait) = mpsc::channel::<()>();
        let state = std::sync::Mutex::new(Some((entered, wait)));
        let stop = move |at: &u64| {
            let here = only_on
                .as_ref()
                .is_none_or(|id| id.get() == Some(&std::thread::current().id()));
            if *at == key && here {
                let taken = state.lock().unwrap().take();
                if let Some((entered, wait)) = taken {
                    entered.send(()).unwrap();
                    let _ = wait.recv();
                }
            }
        };
        (stop, stopped, go)
    }

    /// Starts a quota change to `quota` on another thread, whose pass over the table
    /// waits in the quota function at key `z` until the returned sender is dropped or
    /// sent to; returns once it waits. `also` runs in the quota function for every other
    /// key.
    fn change_waiting_at(
        limiter: &KeyedRateLimiter<u64, ManualClock>,
        z: u64,
        quota: Quota,
        also: impl Fn(&u64) + Send + Sync + 'static,
    ) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (stop, stopped, go) = stop_once(z, None);
        let change = std::thread::spawn({
            let limiter = limiter.clone();
            move || {
                limiter.set_quota_fn(move |key: &u64| {
                    if *key == z {
                        stop(key)
                    } else {
                        also(key)
                    }
                    quota
                })
            }
        });
        stopped.recv().unwrap();
        (go, change)
    }

    /// Changes the quotas to `quota` (a quota function) on another thread; returns once
    /// the change is made or waits for a change in progress: were changes not made one
    /// at a time, it would be made by then.
    fn change_on_a_thread(
        limiter: &KeyedRateLimiter<u64, ManualClock>,
        quota: Quota,
    ) -> std::thread::JoinHandle<()> {
        let waited = limiter.inner.waited_changes.load(SeqCst);
        let (made, done) = mpsc::channel();
        let change = std::thread::spawn({
            let limiter = limiter.clone();
            move || {
                limiter.set_quota_fn(move |_: &u64| quota);
                let _ = made.send(());
            }
        });
        // (About ten seconds at most: a change that neither completes nor waits hangs.)
        for tries in 0.. {
            if limiter.inner.waited_changes.load(SeqCst) != waited {
                break;
            }
            match done.recv_timeout(std::time::Duration::from_millis(1)) {
                Err(mpsc::RecvTimeoutError::Timeout) => assert!(tries < 10_000, "the change hangs"),
                _ => break,
            }
        }
        change
    }

    /// A key's bucket built under older quotas, dropped to make room for another key
    /// while the check looks the key's new quota up (outside the shard's lock), so that
    /// the key is gone when the lock is taken again. The check must go on as for a new
    /// key. It used to take the shard's lock a second time while still holding it: a
    /// deadlock. (The bucket is under the older quotas while the change's pass over the
    /// table has not reached its shard.)
    #[test]
    fn a_bucket_dropped_while_its_quota_is_looked_up_does_not_deadlock() {
        let quota = Quota::new(Rate::per_second(10), 1).unwrap();
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota, clock.clone());
        // One bucket a shard.
        limiter.set_max_keys(SHARDS);
        let (a, b, z) = keys_across_shards(&limiter);
        assert!(limiter.try_acquire(&a, 1).is_ok());
        assert!(limiter.try_acquire(&z, 1).is_ok());
        // `a` refills: its bucket may now be dropped to make room.
        clock.advance(Duration::from_secs(1));

        let handle: Arc<OnceLock<KeyedRateLimiter<u64, ManualClock>>> = Arc::default();
        let evicted = Arc::new(AtomicBool::new(false));
        let (go, change) = change_waiting_at(&limiter, z, quota, {
            let (handle, evicted) = (handle.clone(), evicted.clone());
            move |key: &u64| {
                if *key == a && handle.get().is_some() && !evicted.swap(true, SeqCst) {
                    // `b` takes the shard's only place: `a`'s idle bucket goes.
                    let limiter = handle.get().unwrap();
                    assert!(limiter.try_acquire(&b, 1).is_ok());
                }
            }
        });
        handle.set(limiter.clone()).ok().unwrap();

        let (done, finished) = mpsc::channel();
        let checker = limiter.clone();
        std::thread::spawn(move || {
            let _ = done.send(checker.try_acquire(&a, 1));
        });
        let answer = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the check of a key dropped meanwhile never returned (deadlock)");
        assert!(evicted.load(SeqCst), "the quota function did not run");
        // The shard is full of `b`'s debt: `a` draws from the overflow bucket.
        assert!(answer.is_ok(), "{answer:?}");
        drop(go);
        change.join().unwrap();
        assert_eq!(limiter.len(), 2, "`z` and `b`");
    }

    fn quota_per_second(per_second: u32, burst: u32) -> Quota {
        Quota::new(Rate::per_second(per_second), burst).unwrap()
    }

    /// Key `k`'s bucket under `start`, `taken` tokens taken; a change to `first` whose
    /// pass over the table is slow (its quota function waits at `z`, before `k`'s shard),
    /// then, `between` later, a change to `second` made on another thread meanwhile.
    /// Returns once both are made.
    fn a_change_made_during_a_slow_one(
        start: Quota,
        taken: u32,
        first: Quota,
        between: Duration,
        second: Quota,
    ) -> (KeyedRateLimiter<u64, ManualClock>, ManualClock, u64) {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(start, clock.clone());
        let (k, _, z) = keys_across_shards(&limiter);
        assert!(limiter.try_acquire(&k, taken).is_ok());
        assert!(limiter.try_acquire(&z, 1).is_ok());
        let (go, first) = change_waiting_at(&limiter, z, first, |_| {});
        clock.advance(between);
        let second = change_on_a_thread(&limiter, second);
        go.send(()).unwrap();
        first.join().unwrap();
        second.join().unwrap();
        (limiter, clock, k)
    }

    /// Two quota changes, the first one's pass over the table slow, the second made
    /// meanwhile on another thread. The first pass used to be overtaken: the second
    /// change moved the bucket, then the first moved it back to its own quota as of its
    /// own time, and the debt taken in between was lost (later, it stopped and its quota
    /// was skipped). Changes are made one at a time: each applies to every bucket, in the
    /// order made.
    #[test]
    fn quota_changes_apply_one_at_a_time() {
        // 1000/s at t = 0, then 1/s at t = 50 ms.
        let (limiter, clock, k) = a_change_made_during_a_slow_one(
            quota_per_second(1, 10),
            1,
            quota_per_second(1000, 10),
            Duration::from_millis(50),
            quota_per_second(1, 10),
        );
        // 50 ms at 1000/s refilled `k`; then 1/s: ten tokens, and none 10 ms later.
        clock.advance(Duration::from_millis(10));
        assert_eq!(limiter.try_acquire(&k, 10), Ok(0));
        clock.advance(Duration::from_millis(10));
        let answer = limiter.try_acquire(&k, 1);
        assert!(answer.is_err(), "{answer:?}: a token in 10 ms at 1/s");
    }

    /// A check that looked its key's quota up before a change and inserted its bucket
    /// after the change's pass left it under the older quotas for good: a sweep judged it
    /// refilled by its old rate and dropped it while it still owed most of its tokens
    /// under the current quota, and its key got a fresh, full bucket. A check that sees
    /// the quotas changed meanwhile looks its quota up again.
    #[test]
    fn a_bucket_inserted_across_a_quota_change_is_under_the_new_quota() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(100, 100), clock.clone());
        limiter.set_max_keys(2 * SHARDS); // two rows a shard
        let shard_of = |key: &u64| shard_index(limiter.inner.hasher.hash_one(key));
        let k = 0u64;
        let mut same = (1..).filter(|key| shard_of(key) == shard_of(&k));
        let (j, n, m) = (
            same.next().unwrap(),
            same.next().unwrap(),
            same.next().unwrap(),
        );
        assert!(limiter.try_acquire(&j, 1).is_ok());

        // `k`'s first check looks its quota (100/s) up and waits there.
        let (entered, in_fn) = mpsc::channel::<()>();
        let (release, wait) = mpsc::channel::<()>();
        let wait = std::sync::Mutex::new(Some(wait));
        limiter.set_quota_fn(move |key: &u64| {
            if *key == k {
                if let Some(wait) = wait.lock().unwrap().take() {
                    entered.send(()).unwrap();
                    wait.recv().unwrap();
                }
            }
            quota_per_second(100, 100)
        });
        let first = std::thread::spawn({
            let limiter = limiter.clone();
            move || limiter.try_acquire(&k, 100)
        });
        in_fn.recv().unwrap();
        // The quota is cut to 1/s meanwhile; then `k` empties its bucket (100 tokens owed).
        limiter.set_quota_fn(|_: &u64| quota_per_second(1, 100));
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap(), Ok(0));

        clock.advance(Duration::from_secs(2));
        // A new key in the full shard sweeps it: `k` owes 98 s, and is kept.
        assert!(limiter.try_acquire(&n, 1).is_ok());
        assert!(
            tracked(&limiter, k),
            "`k`'s bucket was dropped with its debt"
        );
        // Its debt paid, it goes at the next sweep, as any refilled bucket (one left under
        // the old quotas was kept until its key came back).
        clock.advance(Duration::from_secs(200));
        assert!(limiter.try_acquire(&m, 1).is_ok());
        assert!(!tracked(&limiter, k), "a refilled bucket was kept");
        assert!(tracked(&limiter, m));
    }

    /// A raised quota: every tracked bucket of a full shard refills at once, but the
    /// shard's next sweep stayed at the old rate's time (an hour), and new keys drew from
    /// the overflow bucket until then.
    #[test]
    fn a_raised_quota_lets_a_full_shard_make_room() {
        let clock = ManualClock::new();
        let hourly = Quota::new(Rate::per_hour(1), 1).unwrap();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(hourly, clock.clone());
        limiter.set_max_keys(SHARDS); // one row a shard
        let shard_of = |key: &u64| shard_index(limiter.inner.hasher.hash_one(key));
        let a = 0u64;
        let mut same = (1..).filter(|key| shard_of(key) == shard_of(&a));
        let (b, c) = (same.next().unwrap(), same.next().unwrap());
        assert!(limiter.try_acquire(&a, 1).is_ok());
        clock.advance(Duration::from_secs(1));
        // The shard is full of `a`'s debt (an hour): `b` draws from the overflow bucket.
        assert!(limiter.try_acquire(&b, 1).is_ok());

        // 1000/s: `a`'s debt of one token is a millisecond now.
        limiter.set_default_quota(quota_per_second(1000, 1));
        clock.advance(Duration::from_secs(1));
        assert!(limiter.try_acquire(&c, 1).is_ok());
        let hash = limiter.inner.hasher.hash_one(c);
        let tracked = limiter.inner.shards[shard_of(&c)]
            .lock()
            .table
            .find(hash, |row| row.0 == c)
            .is_some();
        assert!(
            tracked,
            "`a` refilled a second ago, yet `c` was sent to the overflow bucket"
        );
    }

    /// While a change's pass over the table has not reached a shard, its buckets are
    /// under the older quotas: a sweep there judged them by their old rates, and dropped
    /// a bucket that owed a hundred tokens under the new quota (one second of them at the
    /// old rate), giving its key a fresh one. Such a bucket is kept if it owed tokens at
    /// the change.
    #[test]
    fn a_sweep_ahead_of_a_quota_change_keeps_the_buckets_it_has_not_moved() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(100, 100), clock.clone());
        limiter.set_max_keys(SHARDS); // one row a shard
        let (a, b, z) = keys_across_shards(&limiter);
        assert_eq!(limiter.try_acquire(&a, 100), Ok(0));
        assert!(limiter.try_acquire(&z, 1).is_ok());
        // Cut to 1/s: `a` owes 100 s. The pass waits at `z`, before `a`'s shard.
        let (go, change) = change_waiting_at(&limiter, z, quota_per_second(1, 100), |_| {});
        // Two seconds on, `a`'s old arrival time (1 s) is past: `b` finds the shard full.
        clock.advance(Duration::from_secs(2));
        assert!(limiter.try_acquire(&b, 1).is_ok());
        go.send(()).unwrap();
        change.join().unwrap();
        assert_eq!(limiter.try_acquire(&a, 2), Ok(0), "two seconds at 1/s");
        let answer = limiter.try_acquire(&a, 1);
        assert!(
            answer.is_err(),
            "{answer:?}: `a`'s bucket was dropped with its debt"
        );
    }

    /// Whether `key` has a bucket of its own.
    fn tracked(limiter: &KeyedRateLimiter<u64, ManualClock>, key: u64) -> bool {
        let hash = limiter.inner.hasher.hash_one(key);
        let shard = limiter.inner.shards[shard_index(hash)].lock();
        shard.table.find(hash, |row| row.0 == key).is_some()
    }

    /// Change A's pass is slow (it waits at `z`, a shard before `a`'s); change B is made
    /// on another thread. B used to complete first, moving every bucket to B's version;
    /// A's pass then reached `a`'s shard, collected `a`'s row (at B's version, "not A's")
    /// and tagged it back with A's older version, and nothing moved it again: a refilled
    /// bucket kept by every sweep (it owed tokens at the change), new keys of the shard
    /// sent to the overflow bucket for good. B now waits for A's pass.
    #[test]
    fn a_pass_overtaken_by_a_later_change_leaves_no_bucket_stale() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(1, 1), clock.clone());
        limiter.set_max_keys(SHARDS); // one row a shard
        let (a, b, z) = keys_across_shards(&limiter);
        assert!(limiter.try_acquire(&a, 1).is_ok()); // `a` owes 1 s
        assert!(limiter.try_acquire(&z, 1).is_ok());
        // Change A at t = 0: its pass waits at `z`.
        let (go, change) = change_waiting_at(&limiter, z, quota_per_second(1, 1), |_| {});
        // Change B at t = 0.5 s, on another thread.
        clock.advance(Duration::from_millis(500));
        let later = change_on_a_thread(&limiter, quota_per_second(1, 1));
        go.send(()).unwrap();
        change.join().unwrap();
        later.join().unwrap();

        let current = limiter.inner.version.load(SeqCst) as u32;
        let stale: Vec<(u64, u32)> = limiter
            .inner
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .table
                    .iter()
                    .filter(|row| row.1.version != current)
                    .map(|row| (row.0, row.1.version))
                    .collect::<Vec<_>>()
            })
            .collect();
        // An hour later `a` has long refilled: a new key of its shard takes its place.
        clock.advance(Duration::from_secs(3600));
        assert!(limiter.try_acquire(&b, 1).is_ok());
        assert!(
            tracked(&limiter, b),
            "`a` refilled an hour ago, yet was kept and `b` sent to the overflow bucket \
             (rows left under an older version: {stale:?}, current {current})"
        );
        assert!(
            stale.is_empty(),
            "{stale:?} under an older version than {current}"
        );
    }

    /// A quota function that changes the quotas when it meets a key (say, a tier table
    /// reloaded on a miss, pushed with `set_default_quota`): every lookup moved the
    /// version, and the check looked the quota up again, for ever. A check looks it up
    /// three times at most.
    #[test]
    fn a_quota_function_that_changes_the_quotas_does_not_livelock_a_check() {
        use std::sync::atomic::AtomicUsize;
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(10, 10), clock.clone());
        let handle: Arc<OnceLock<KeyedRateLimiter<u64, ManualClock>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        limiter.set_quota_fn({
            let (handle, calls) = (handle.clone(), calls.clone());
            move |_: &u64| {
                // Capped, so that the test ends: uncapped, the check never returns.
                if calls.fetch_add(1, SeqCst) < 1000 {
                    if let Some(limiter) = handle.get() {
                        limiter.set_default_quota(quota_per_second(10, 10));
                    }
                }
                quota_per_second(10, 10)
            }
        });
        handle.set(limiter.clone()).ok().unwrap();
        assert!(limiter.try_acquire(&7, 1).is_ok());
        let calls = calls.load(SeqCst);
        assert!(calls <= 3, "the check looked its quota up {calls} times");
    }

    /// A quota change lands during every lookup of a check (a slow quota function, a
    /// stream of changes): the check did not get through while they went on.
    #[test]
    fn a_check_is_not_starved_by_changes_during_its_lookups() {
        use std::sync::atomic::AtomicUsize;
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(10, 10), clock.clone());
        let k = 7u64;
        let (looking, lookups) = mpsc::channel::<()>();
        let (changed, wait_changed) = mpsc::channel::<()>();
        let wait_changed = std::sync::Mutex::new(wait_changed);
        let calls = Arc::new(AtomicUsize::new(0));
        limiter.set_quota_fn({
            let calls = calls.clone();
            move |key: &u64| {
                if *key == k {
                    calls.fetch_add(1, SeqCst);
                    let _ = looking.send(());
                    let _ = wait_changed.lock().unwrap().recv();
                }
                quota_per_second(10, 10)
            }
        });
        let changer = std::thread::spawn({
            let limiter = limiter.clone();
            move || {
                for _ in 0..100 {
                    if lookups.recv().is_err() {
                        break;
                    }
                    limiter.set_default_quota(quota_per_second(10, 10));
                    let _ = changed.send(());
                }
                // `changed` dropped: lookups no longer wait.
            }
        });
        assert!(limiter.try_acquire(&k, 1).is_ok());
        // The changer's channel goes with the quota function.
        limiter.set_quota_fn(|_: &u64| quota_per_second(10, 10));
        changer.join().unwrap();
        let calls = calls.load(SeqCst);
        assert!(
            calls <= 3,
            "the check looked its quota up {calls} times: it waited for the changes to stop"
        );
    }

    /// A raised quota: the pass brought the shard's next sweep forward only for buckets it
    /// moved itself. A bucket whose key came back before the pass reached its shard was
    /// moved by the check, which left the next sweep at the old rate's time (an hour).
    #[test]
    fn a_raised_quota_lets_a_full_shard_make_room_when_a_check_moved_the_bucket() {
        let clock = ManualClock::new();
        let hourly = Quota::new(Rate::per_hour(1), 1).unwrap();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(hourly, clock.clone());
        limiter.set_max_keys(SHARDS); // one row a shard
        let (a, b, z) = keys_across_shards(&limiter);
        let shard_of = |key: &u64| shard_index(limiter.inner.hasher.hash_one(key));
        let c = (b + 1..).find(|key| shard_of(key) == shard_of(&a)).unwrap();
        assert!(limiter.try_acquire(&a, 1).is_ok());
        assert!(limiter.try_acquire(&z, 1).is_ok());
        clock.advance(Duration::from_secs(1));
        // Full of `a`'s debt (an hour): `b` draws from the overflow bucket.
        assert!(limiter.try_acquire(&b, 1).is_ok());
        assert!(!tracked(&limiter, b));

        // 1000/s; the pass waits at `z`, before `a`'s shard; `a`'s key comes back.
        let (go, change) = change_waiting_at(&limiter, z, quota_per_second(1000, 1), |_| {});
        let _ = limiter.try_acquire(&a, 1);
        go.send(()).unwrap();
        change.join().unwrap();

        clock.advance(Duration::from_secs(1));
        let answer = limiter.try_acquire(&c, 1);
        assert!(
            tracked(&limiter, c),
            "{answer:?}: `a` refilled a second ago at 1000/s, yet `c` was sent to the \
             overflow bucket"
        );
    }

    /// A quota function that changes the quotas on a key's first lookups (nested, so
    /// each change's pass is over before the check takes the shard's lock again). After
    /// three lookups the check inserted the row under the version it looked up, no longer
    /// current, with every pass of the later versions over: nothing moved the row again,
    /// and every sweep kept it (it "owed tokens at the change"), an hour after it
    /// refilled. The row is tagged current.
    #[test]
    fn a_check_past_its_lookup_cap_leaves_no_row_stale() {
        use std::sync::atomic::AtomicUsize;
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(1, 1), clock.clone());
        limiter.set_max_keys(SHARDS); // one row a shard
        let (a, b, _) = keys_across_shards(&limiter);
        let handle: Arc<OnceLock<KeyedRateLimiter<u64, ManualClock>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        limiter.set_quota_fn({
            let (handle, calls) = (handle.clone(), calls.clone());
            move |key: &u64| {
                if *key == a && calls.fetch_add(1, SeqCst) < 3 {
                    if let Some(limiter) = handle.get() {
                        limiter.set_default_quota(quota_per_second(1, 1));
                    }
                }
                quota_per_second(1, 1)
            }
        });
        handle.set(limiter.clone()).ok().unwrap();
        assert!(limiter.try_acquire(&a, 1).is_ok()); // `a` owes 1 s
        let current = limiter.inner.version.load(SeqCst) as u32;
        let hash = limiter.inner.hasher.hash_one(a);
        let seen = limiter.inner.shards[shard_index(hash)]
            .lock()
            .table
            .find(hash, |row| row.0 == a)
            .map(|row| row.1.version);
        clock.advance(Duration::from_secs(3600));
        assert!(limiter.try_acquire(&b, 1).is_ok());
        assert!(
            tracked(&limiter, b),
            "`a` refilled an hour ago, yet was kept and `b` sent to the overflow bucket \
             (`a` at version {seen:?}, current {current})"
        );
    }

    /// Change A (1/s) at t = 0, its pass slow; change B (back to 1000/s) at t = 0.5 s on
    /// another thread. B used to complete first; A's pass, overtaken, stopped without
    /// moving the bucket, and B's moved it from the quota before A: it refilled at
    /// 1000/s while A's 1/s held, 500 tokens too many.
    #[test]
    fn an_overtaken_quota_change_is_not_skipped() {
        let (limiter, clock, a) = a_change_made_during_a_slow_one(
            quota_per_second(1000, 1000),
            1000,
            quota_per_second(1, 1000),
            Duration::from_millis(500),
            quota_per_second(1000, 1000),
        );
        clock.advance(Duration::from_millis(500));
        // 0.5 s at 1/s then 0.5 s at 1000/s: 500.5 tokens at most.
        let answer = limiter.try_acquire(&a, 600);
        assert!(
            answer.is_err(),
            "{answer:?}: 600 tokens where 500.5 were due"
        );
    }

    /// A quota function answering `quota` that stops once at `a` (on any thread) until
    /// released.
    fn blocking_at(
        a: u64,
        quota: Quota,
    ) -> (
        impl Fn(&u64) -> Quota + Send + Sync + 'static,
        mpsc::Receiver<()>,
        mpsc::Sender<()>,
    ) {
        let (stop, entered, release) = stop_once(a, None);
        let f = move |key: &u64| {
            stop(key);
            quota
        };
        (f, entered, release)
    }

    /// A check whose three lookups each race a quota change made on another thread
    /// tagged its new row with the current version but the quota of a change before:
    /// every pass skipped it, and the key kept the old quota for good (500 tokens at
    /// once under a burst of 1). Past its lookups a check keeps the version it looked
    /// its quota up under, and the row is moved at the key's next request.
    #[test]
    fn a_check_past_its_lookup_cap_keeps_no_old_quota_as_current() {
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(quota_per_second(1, 1), clock.clone());
        let a = 7u64;
        let fast = quota_per_second(1000, 1000);
        let (f0, entered0, release0) = blocking_at(a, fast);
        limiter.set_quota_fn(f0);
        let checker = {
            let limiter = limiter.clone();
            std::thread::spawn(move || limiter.try_acquire(&a, 1))
        };
        entered0.recv().unwrap();
        let (f1, entered1, release1) = blocking_at(a, fast);
        limiter.set_quota_fn(f1);
        release0.send(()).unwrap();
        entered1.recv().unwrap();
        let (f2, entered2, release2) = blocking_at(a, fast);
        limiter.set_quota_fn(f2);
        release1.send(()).unwrap();
        entered2.recv().unwrap();
        // The quota now is 1/s, burst 1, for every key.
        limiter.set_quota_fn(|_: &u64| quota_per_second(1, 1));
        release2.send(()).unwrap();
        assert!(checker.join().unwrap().is_ok());
        let answer = limiter.try_acquire(&a, 500);
        assert!(
            answer.is_err(),
            "{answer:?}: 500 tokens at once under a burst of 1"
        );
    }

    /// A check on a tracked key whose three quota lookups each race a change made on
    /// another thread, each change's pass moving the key's bucket meanwhile: past its
    /// lookups the check moved the bucket, already at the current quota (10 a second),
    /// back to the quota it had looked up (1 000), and charged it there. A bucket at the
    /// current version is charged as it is.
    #[test]
    fn a_check_past_its_lookups_moves_no_bucket_back() {
        use std::thread::ThreadId;
        let slow = quota_per_second(1, 10);
        let fast = quota_per_second(1000, 1000);
        let clock = ManualClock::new();
        let limiter: KeyedRateLimiter<u64, ManualClock> =
            KeyedRateLimiter::with_clock(slow, clock.clone());
        let (a, _, z) = keys_across_shards(&limiter);
        assert_eq!(limiter.try_acquire(&a, 10), Ok(0));
        assert!(limiter.try_acquire(&z, 1).is_ok());
        // The checking thread's lookups of `a` wait, once for each quota function; the
        // passes' lookups (other threads) do not.
        let checker: Arc<OnceLock<ThreadId>> = Arc::default();
        let stopping = |checker: Arc<OnceLock<ThreadId>>| stop_once(a, Some(checker));
        // Change 1 (1 000/s) at t = 0: its pass waits at `z`, before `a`'s shard.
        let (stop1, in1, go1) = stopping(checker.clone());
        let (pass1, change1) = change_waiting_at(&limiter, z, fast, stop1);
        clock.advance(Duration::from_millis(100));
        let check = std::thread::spawn({
            let (limiter, checker) = (limiter.clone(), checker.clone());
            move || {
                checker.set(std::thread::current().id()).unwrap();
                limiter.try_acquire(&a, 1)
            }
        });
        // Lookup 1 (under change 1) waits; change 1's pass moves `a`; change 2 is made.
        in1.recv().unwrap();
        pass1.send(()).unwrap();
        change1.join().unwrap();
        let (stop2, in2, go2) = stopping(checker.clone());
        limiter.set_quota_fn(move |key: &u64| {
            stop2(key);
            fast
        });
        go1.send(()).unwrap();
        // Lookup 2 (under change 2) waits; change 3 is made.
        in2.recv().unwrap();
        let (stop3, in3, go3) = stopping(checker.clone());
        limiter.set_quota_fn(move |key: &u64| {
            stop3(key);
            fast
        });
        go2.send(()).unwrap();
        // Lookup 3 (under change 3) waits; change 4 (back to 10/s) moves `a` to 10/s.
        in3.recv().unwrap();
        limiter.set_quota_fn(move |_: &u64| slow);
        go3.send(()).unwrap();
        assert_eq!(
            check.join().unwrap(),
            Ok(9),
            "charged under the current quota (burst 10), not the one looked up (1 000)"
        );
    }
}
