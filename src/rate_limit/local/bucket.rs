//! The token bucket: GCRA on one atomic word.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;

use crate::clock::{Clock, TokioClock};
use crate::rate_limit::error::RateLimited;
use crate::rate_limit::quota::Quota;

/// Quota figures kept in atomics so that the quota can change at run time.
#[derive(Debug)]
struct Shape {
    /// Nanoseconds to replenish one token.
    interval: AtomicU64,
    /// Capacity in tokens.
    burst: AtomicU64,
}

pub(crate) struct Inner<C> {
    /// The way back to this bucket its receipts ([`Charge`]) hold.
    lease: crate::lease::Claim,
    /// Held while the quota changes and while a refund or cancel moves `tat` back, so
    /// that none of these interleave (a refund reads `shifted` and moves `tat` as one
    /// step). Checks never take it.
    quota_change: parking_lot::Mutex<()>,
    /// Theoretical arrival time: when the bucket will next be full, in the clock's
    /// nanoseconds. The bucket holds `(now + burst × interval − tat) / interval` tokens.
    tat: AtomicU64,
    /// The arrival time that bookings waiting for their turn need at least: the bucket
    /// taking each booking's tokens at its turn, in the order they were booked (the
    /// latest turn plus its tokens, after what the earlier bookings need). A refund or
    /// cancel of a take made before them moves `tat` back no further (see
    /// [`RateLimiter::refund`]).
    booked: AtomicU64,
    /// How far, in all, refunds and cancels have moved `tat` back under takes made after
    /// the one they handed back, moving those takes' debt down with it. A receipt holds
    /// its end plus this count as it was at the take; less the count at its refund, that
    /// is where its debt ends now, at the latest (see [`Taken`]). Written after `tat`
    /// (`Release`), read before it by a take (`Acquire`): a take that sees a move's count
    /// sees the move.
    shifted: AtomicU64,
    /// The arrival time when the quota last changed (before it was rescaled): a receipt
    /// taken before the change ends at or before it, its time in the old quota's units,
    /// and is not refunded (it would give back, after a raise, tokens the new rate has
    /// long refilled).
    changed_tat: AtomicU64,
    shape: Shape,
    telemetry: crate::rate_limit::telemetry::Telemetry,
    pub(crate) clock: C,
}

/// A token bucket shared by all its clones, lock-free: one compare-exchange on one word
/// per check (the generic cell rate algorithm, as in governor).
///
/// Starts full. [`try_acquire`](Self::try_acquire) takes tokens or says when they will be
/// there; [`reserve`](Self::reserve) books tokens in the future, first come first served,
/// for callers that wait.
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::{ManualClock, Quota, Rate, RateLimiter};
///
/// let clock = ManualClock::new();
/// let limiter = RateLimiter::with_clock(Quota::new(Rate::per_second(10), 2)?, clock.clone());
/// assert!(limiter.try_acquire(1).is_ok());
/// assert!(limiter.try_acquire(1).is_ok());
/// let denied = limiter.try_acquire(1).unwrap_err();
/// assert_eq!(denied.retry_after(), Some(Duration::from_millis(100)));
/// clock.advance(Duration::from_millis(100));
/// assert!(limiter.try_acquire(1).is_ok());
/// # Ok::<(), seawall::ConfigError>(())
/// ```
pub struct RateLimiter<C = TokioClock> {
    pub(crate) inner: Arc<Inner<C>>,
}

impl<C> Clone for RateLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Clock> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field(
                "interval",
                &Duration::from_nanos(self.inner.shape.interval.load(Relaxed)),
            )
            .field("burst", &self.inner.shape.burst.load(Relaxed))
            .field("available", &self.available())
            .finish()
    }
}

/// What an admitted request learns about the bucket (for rate-limit headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Tokens left in the bucket.
    pub remaining: u32,
    /// How long until the bucket is full again.
    pub full_in: Duration,
    /// The bucket's capacity.
    pub limit: u32,
    /// How long the bucket takes to refill from empty (`limit` × the refill interval).
    pub window: Duration,
}

/// A booking made by [`RateLimiter::reserve`] or [`KeyedRateLimiter::reserve`](crate::rate_limit::KeyedRateLimiter::reserve).
/// Neither `Copy` nor `Clone`: a booking is handed back once.
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Tokens booked.
    pub tokens: u32,
    /// How long until they are due (zero: now).
    pub wait: Duration,
    /// Where the booking's debt ends, as [`Taken::until`] for a refund.
    pub(crate) until: u64,
}

/// Tokens an admitted request took, as [`RateLimiter::take`] and
/// [`KeyedRateLimiter::take`](crate::rate_limit::KeyedRateLimiter::take) return them: hand them back
/// with `refund` when a limit further in refuses the request, so that stacked limits
/// charge a request only when every one of them admits it. Neither `Copy` nor `Clone`:
/// a receipt is handed back once.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    /// A whole word, not a `u32` and padding: a receipt is moved whole into the layers'
    /// futures, and a move that reads padding the take never wrote stalls on it.
    pub(crate) tokens: u64,
    /// The bucket's arrival time just after the take, in the clock's nanoseconds (the
    /// tokens taken are the debt just below it, and what time has refilled since is not
    /// handed back), plus the bucket's count of moves back under later takes at the take
    /// (`shifted`, wrapping). Refunds of takes made before this one, handed back after
    /// it, move its debt down: at the refund, this less the count then is where its debt
    /// ends at the latest (lower where refunds of later takes counted as well: a refund
    /// then gives back less than it might, never more).
    pub(crate) until: u64,
}

impl Taken {
    /// The tokens taken.
    pub fn tokens(&self) -> u32 {
        self.tokens as u32
    }
}

/// How far a refund of `tokens` whose debt ends at `end` moves an arrival time back, at
/// `now`, with `interval` nanoseconds a token: the tokens taken, less what has refilled
/// since the take (the debt they made, `end - tokens × interval ..= end`, that is still
/// ahead of `now`).
#[inline]
pub(crate) fn refund_nanos(tokens: u64, end: u64, now: u64, interval: u64) -> u64 {
    tokens.saturating_mul(interval).min(end.saturating_sub(now))
}

/// Where an arrival time `tat` moves to when a take ending at `end` hands back `back`
/// nanoseconds at `now`; `None` if the take's debt cannot be below `tat` (a receipt of
/// another bucket, or from before a quota change). The bucket's last take (its debt
/// ends at `tat`) gives all of it back; an earlier one stops at `floor`, what bookings
/// made since need.
#[inline]
pub(crate) fn moved_back(tat: u64, end: u64, back: u64, now: u64, floor: u64) -> Option<u64> {
    if end > tat {
        return None;
    }
    let moved = tat.saturating_sub(back).max(now.min(tat));
    Some(if tat == end {
        moved
    } else {
        moved.max(floor.min(tat))
    })
}

/// Tokens an admitted request took from a [`RateLimiter`], and the way back to the
/// limiter: handed back with [`Refund::refund`](crate::rate_limit::Refund::refund) when a
/// limit further in refuses the request. Plain words: making and dropping one takes no
/// reference count on the limiter (a refund reaches it, if it is still alive, through a
/// block the limiter holds for its life).
pub struct Charge<C = TokioClock> {
    receipt: Receipt,
    _clock: std::marker::PhantomData<fn() -> C>,
}

/// A receipt's tokens and its lease on the limiter, in three words: what [`Charge`] and
/// [`KeyedCharge`](crate::rate_limit::KeyedCharge) hold.
pub(crate) struct Receipt {
    block: &'static crate::lease::Block,
    /// The tokens taken (at most `u32::MAX`) in the low half, the lease's generation in
    /// the high half: one word written whole (see [`Taken`]).
    tokens_generation: u64,
    until: u64,
}

impl Receipt {
    #[inline(always)]
    pub(crate) fn new(lease: crate::lease::Lease, taken: Taken) -> Self {
        Self {
            block: lease.block(),
            tokens_generation: taken.tokens | u64::from(lease.generation()) << 32,
            until: taken.until,
        }
    }

    pub(crate) fn taken(&self) -> Taken {
        Taken {
            tokens: self.tokens_generation & u64::from(u32::MAX),
            until: self.until,
        }
    }

    /// The limiter, if it is still alive (see [`crate::lease`]).
    pub(crate) fn limiter<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let generation = (self.tokens_generation >> 32) as u32;
        crate::lease::Lease::from_parts(self.block, generation).get::<T>()
    }

    #[cfg(test)]
    pub(crate) fn block(&self) -> &'static crate::lease::Block {
        self.block
    }
}

impl<C: Clock> fmt::Debug for Charge<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge")
            .field("taken", &self.receipt.taken())
            .finish_non_exhaustive()
    }
}

impl<C: Clock> crate::rate_limit::Refund for Charge<C> {
    fn refund(self) {
        // Nothing to hand back to a limiter that is gone.
        if let Some(inner) = self.receipt.limiter::<Inner<C>>() {
            RateLimiter { inner }.refund(self.receipt.taken());
        }
    }
}

impl RateLimiter<TokioClock> {
    /// A full bucket of `quota` on the tokio clock, unnamed: short for
    /// `RateLimiter::builder(quota).build()`.
    pub fn new(quota: Quota) -> Self {
        Self::with_clock(quota, TokioClock::new())
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A full bucket of `quota` on `clock`, unnamed: short for
    /// `RateLimiter::builder(quota).clock(clock).build()`.
    pub fn with_clock(quota: Quota, clock: C) -> Self {
        Self {
            inner: Arc::new_cyclic(|this| Inner {
                lease: crate::lease::POOL.claim(this.clone()),
                quota_change: parking_lot::Mutex::new(()),
                tat: AtomicU64::new(0),
                booked: AtomicU64::new(0),
                shifted: AtomicU64::new(0),
                changed_tat: AtomicU64::new(0),
                shape: Shape {
                    interval: AtomicU64::new(quota.interval_nanos()),
                    burst: AtomicU64::new(u64::from(quota.burst())),
                },
                telemetry: crate::rate_limit::telemetry::Telemetry::default(),
                clock,
            }),
        }
    }

    /// Replaces the quota for every clone, at once, keeping the tokens already taken:
    /// a bucket with 4 of its 10 tokens taken, moved to a burst of 20, has 16 left, and
    /// refills at the new rate from there. Changes are serialized; a check running at the
    /// very moment of a change may see the old shape with the new level (or the reverse),
    /// once.
    pub fn set_quota(&self, quota: Quota) {
        let _serialized = self.inner.quota_change.lock();
        let old = self.inner.shape.interval.load(Relaxed);
        let new = quota.interval_nanos();
        let now = self.inner.clock.now_nanos();
        if let Ok(before) = self.inner.tat.fetch_update(Relaxed, Relaxed, |tat| {
            Some(rescale_tat(tat, now, old, new))
        }) {
            self.inner.changed_tat.fetch_max(before, Relaxed);
        }
        self.inner.shape.interval.store(new, Relaxed);
        self.inner
            .shape
            .burst
            .store(u64::from(quota.burst()), Relaxed);
    }

    /// The current capacity, in tokens.
    pub fn burst(&self) -> u32 {
        self.inner.shape.burst.load(Relaxed) as u32
    }

    /// The current refill interval.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.inner.shape.interval.load(Relaxed))
    }

    /// Tokens available now.
    pub fn available(&self) -> u32 {
        let (interval, tau) = self.shape();
        let now = self.inner.clock.now_nanos();
        let tat = self.inner.tat.load(Relaxed).max(now);
        ((now.saturating_add(tau).saturating_sub(tat)) / interval) as u32
    }

    #[inline]
    fn shape(&self) -> (u64, u64) {
        let interval = self.inner.shape.interval.load(Relaxed);
        let burst = self.inner.shape.burst.load(Relaxed);
        (interval, burst.saturating_mul(interval))
    }

    /// Takes `tokens` now if the bucket holds them, returning how many are left;
    /// otherwise takes nothing and says when they will be there.
    #[inline]
    pub fn try_acquire(&self, tokens: u32) -> Result<u32, RateLimited> {
        self.inner
            .telemetry
            .report(self.step(tokens), Step::remaining)
    }

    /// Like [`try_acquire`](Self::try_acquire), with what rate-limit headers need: the
    /// tokens left and how long until the bucket is full again.
    #[inline]
    pub fn acquire(&self, tokens: u32) -> Result<Admitted, RateLimited> {
        self.inner
            .telemetry
            .report(self.step(tokens), Step::admitted)
    }

    /// Like [`acquire`](Self::acquire), with a receipt of the tokens taken, for
    /// [`refund`](Self::refund).
    #[inline]
    pub fn take(&self, tokens: u32) -> Result<(Admitted, Taken), RateLimited> {
        let shifted = self.shifted();
        self.inner.telemetry.report(self.step(tokens), |step| {
            (step.admitted(), step.taken(shifted))
        })
    }

    /// Takes `tokens` now (unreported).
    #[inline]
    fn step(&self, tokens: u32) -> Step {
        let (interval, tau) = self.shape();
        let now = self.inner.clock.now_nanos();
        gcra_acquire(&self.inner.tat, now, interval, tau, tokens)
    }

    /// [`take`](Self::take), the receipt with the way back to this limiter (no reference
    /// count: see [`Charge`]) for [`Refund`](crate::rate_limit::Refund).
    #[inline]
    pub fn charge(&self, tokens: u32) -> Result<(Admitted, Charge<C>), RateLimited> {
        let shifted = self.shifted();
        self.inner.telemetry.report(self.step(tokens), |step| {
            (step.admitted(), self.receipt(step, shifted))
        })
    }

    /// [`charge`](Self::charge) as the layers' [`Decision`](crate::rate_limit::Decision).
    #[inline]
    pub(crate) fn decide(&self, tokens: u32) -> crate::rate_limit::Decision<Charge<C>> {
        let shifted = self.shifted();
        self.inner
            .telemetry
            .decide(self.step(tokens), |step| self.receipt(step, shifted))
    }

    /// The receipt of an admitted step, with the way back to this limiter.
    #[inline]
    fn receipt(&self, step: Step, shifted: u64) -> Charge<C> {
        Charge {
            receipt: Receipt::new(self.inner.lease.lease(), step.taken(shifted)),
            _clock: std::marker::PhantomData,
        }
    }

    /// The count of moves back under later takes, for a receipt: read before the take
    /// reads the arrival time (see `Inner::shifted`).
    #[inline(always)]
    fn shifted(&self) -> u64 {
        self.inner.shifted.load(Acquire)
    }

    /// Hands back tokens taken by [`take`](Self::take) for a request that a limit further
    /// in refused. Exact and bounded: it gives back at most the tokens taken, less what
    /// the bucket has refilled since the take (those would be there anyway), and never
    /// fills the bucket above its burst.
    ///
    /// Bookings made after the take keep their turns: their tokens were counted from the
    /// arrival time they saw, and at their turn they take them. So the tokens are handed
    /// back only as far as those turns allow (a waiter dropped before the one booked
    /// behind it gave its slot to that one, which then took nothing at its turn, and
    /// the bucket admitted two at once with a burst of one); the last take or booking
    /// gives all of it back. Refunds in any order are exact where the takes they hand
    /// back are refunded in the order they were made (or last first); a refund of an
    /// earlier take moves the later takes' debt down with it, and a refund of one of
    /// those, made after a later one's refund, gives back less than it might (never more
    /// than is still owed: the bucket never admits more than burst + rate × elapsed). A
    /// take made before a [`set_quota`](Self::set_quota) is not refunded: its tokens are
    /// in the old quota's units (after a raise they have long refilled); nor, after a
    /// raise, one made while the bucket's debt is still below what it was at the change.
    pub fn refund(&self, taken: Taken) {
        // One step with the other refunds and cancels: the count read is the one the
        // arrival time moved under.
        let _serialized = self.inner.quota_change.lock();
        let interval = self.inner.shape.interval.load(Relaxed);
        let now = self.inner.clock.now_nanos();
        // Where the take's debt ends now, at the latest (see `Taken::until`).
        let end = taken.until.wrapping_sub(self.inner.shifted.load(Relaxed));
        if end <= self.inner.changed_tat.load(Relaxed) {
            // Taken under an earlier quota (or, after a raise, just after it: refused a
            // refund for as long as the bucket's debt is below what it was at the change,
            // never one too many).
            return;
        }
        let back = refund_nanos(taken.tokens, end, now, interval);
        if back == 0 {
            return;
        }
        // Where the arrival time went, as the exchange that moved it computed it: the
        // bookings' floor read again afterwards may have risen meanwhile (a `reserve` on
        // another thread), and the count would then miss part of the move.
        let mut after = 0;
        let Ok(before) = self.inner.tat.fetch_update(Relaxed, Relaxed, |tat| {
            let moved = moved_back(tat, end, back, now, self.inner.booked.load(Relaxed));
            after = moved.unwrap_or(tat);
            moved
        }) else {
            return;
        };
        if before != end {
            // Not the last take: the debt of the takes after it moved down.
            self.inner
                .shifted
                .fetch_add(before.saturating_sub(after), Release);
        }
    }

    pub(crate) fn set_name(&self, name: &str) {
        self.inner.telemetry.name(name);
    }

    /// The limiter's name, if its [builder](RateLimiter::builder) gave it one.
    pub fn name(&self) -> Option<&str> {
        self.inner.telemetry.get_name()
    }

    /// Books `tokens` for the earliest time they will be there, if that is within
    /// `max_wait`. Bookings are served in the order they were made; a booking that is not
    /// used must be handed back with [`cancel`](Self::cancel).
    pub fn reserve(&self, tokens: u32, max_wait: Duration) -> Result<Reservation, RateLimited> {
        let (interval, tau) = self.shape();
        let now = self.inner.clock.now_nanos();
        let max_wait = crate::util::nanos(max_wait);
        let shifted = self.shifted();
        let step = gcra_update(&self.inner.tat, now, interval, tau, tokens, max_wait);
        if !step.admitted {
            return Err(step.refusal());
        }
        let wait = step.wait();
        if wait > 0 {
            // Its turn, and the tokens it takes then, after those the bookings before it
            // take at theirs: what the arrival time must keep. (Each booking's own turn
            // plus tokens is not enough: two bookings due a second apart, of 2 and 1
            // tokens from a bucket of 2 at 1/s, need 6 s together, 5 s each.)
            let turn = now.saturating_add(wait);
            let cost = u64::from(tokens).saturating_mul(interval);
            let _ = self.inner.booked.fetch_update(Relaxed, Relaxed, |booked| {
                Some(booked.max(turn).saturating_add(cost))
            });
        }
        Ok(Reservation {
            tokens,
            wait: Duration::from_nanos(wait),
            until: step.taken(shifted).until,
        })
    }

    /// Hands back a booking that will not be used, so that its tokens serve later callers.
    /// Bookings made after it keep their turns, and their tokens: its tokens are handed
    /// back only as far as those turns allow (the last booking's all of them). Exact and
    /// bounded, as a [`refund`](Self::refund): what of the booking time has already
    /// refilled (a booking handed back after its turn) is not given back again.
    pub fn cancel(&self, reservation: Reservation) {
        self.refund(Taken {
            tokens: u64::from(reservation.tokens),
            until: reservation.until,
        });
    }

    /// The clock this limiter reads.
    pub fn clock(&self) -> &C {
        &self.inner.clock
    }
}

/// One GCRA decision, in the clock's nanoseconds: the words [`Admitted`] and
/// [`RateLimited`] are made of, in a plain struct rather than a `Result` of two different
/// payloads, which the optimiser keeps in memory and copies at each step out. The checks
/// pass a `Step` along in registers and make the public figures only where a caller reads
/// them, so that a caller that does not (the tower layers) pays for neither their
/// divisions nor their moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) now: u64,
    pub(crate) interval: u64,
    /// The burst tolerance: `burst × interval`.
    pub(crate) tau: u64,
    /// The arrival time the decision was made on.
    pub(crate) tat: u64,
    /// The arrival time after the take (meaningful when admitted).
    pub(crate) next: u64,
    pub(crate) tokens: u32,
    pub(crate) admitted: bool,
}

impl Step {
    /// The GCRA for a bucket whose theoretical arrival time is `tat`, at `now`: `tokens`
    /// fit if they are due within `max_wait` (zero: now) under the burst tolerance `tau`.
    #[inline]
    pub(crate) fn new(
        tat: u64,
        now: u64,
        interval: u64,
        tau: u64,
        tokens: u32,
        max_wait: u64,
    ) -> Self {
        // Saturating: a request above the burst (refused below) may cost more than a word
        // holds; one within it costs at most `tau`.
        let next = tat
            .max(now)
            .saturating_add(u64::from(tokens).saturating_mul(interval));
        let mut step = Self {
            now,
            interval,
            tau,
            tat,
            next,
            tokens,
            admitted: false,
        };
        // Within the burst (`tokens <= tau / interval`, without the division) and due
        // soon enough.
        step.admitted =
            u128::from(tokens) * u128::from(interval) <= u128::from(tau) && step.wait() <= max_wait;
        step
    }

    /// What an admitted caller learns: tokens left, time until full, capacity, window.
    #[inline]
    pub(crate) fn admitted(self) -> Admitted {
        Admitted {
            remaining: self.remaining(),
            full_in: Duration::from_nanos(self.next - self.now),
            limit: (self.tau / self.interval) as u32,
            window: Duration::from_nanos(self.tau),
        }
    }

    /// Tokens left after the take.
    #[inline]
    pub(crate) fn remaining(self) -> u32 {
        (self.now.saturating_add(self.tau).saturating_sub(self.next) / self.interval) as u32
    }

    /// How long until the tokens taken are due (zero: now).
    #[inline]
    pub(crate) fn wait(self) -> u64 {
        self.next.saturating_sub(self.now.saturating_add(self.tau))
    }

    /// The receipt of the tokens taken, from a bucket whose count of moves back under
    /// later takes was `shifted` before the take (see [`Taken::until`]).
    #[inline]
    pub(crate) fn taken(self, shifted: u64) -> Taken {
        Taken {
            tokens: u64::from(self.tokens),
            until: self.next.wrapping_add(shifted),
        }
    }

    /// The refusal: the tokens cost more than the bucket holds, or when they will be
    /// there. Out of line: refusals are the rare path.
    #[cold]
    #[inline(never)]
    pub(crate) fn refusal(self) -> RateLimited {
        let burst = self.tau / self.interval;
        if u64::from(self.tokens) > burst {
            return RateLimited::exceeds_burst(
                self.tokens,
                burst as u32,
                Duration::from_nanos(self.tau),
                Duration::from_nanos(self.tat.max(self.now) - self.now),
            );
        }
        RateLimited::after(
            Duration::from_nanos(self.wait()),
            burst as u32,
            Duration::from_nanos(self.tau),
            Duration::from_nanos(self.tat.max(self.now) - self.now),
        )
    }
}

/// [`Step::new`] on a shared arrival time: one compare-exchange when admitted, retried
/// only when another caller moved it meanwhile.
#[inline]
pub(crate) fn gcra_update(
    cell: &AtomicU64,
    now: u64,
    interval: u64,
    tau: u64,
    tokens: u32,
    max_wait: u64,
) -> Step {
    let mut tat = cell.load(Relaxed);
    loop {
        let step = Step::new(tat, now, interval, tau, tokens, max_wait);
        if !step.admitted {
            return step;
        }
        match cell.compare_exchange_weak(tat, step.next, Relaxed, Relaxed) {
            Ok(_) => return step,
            Err(actual) => tat = actual,
        }
    }
}

/// Takes `tokens` now from a shared bucket (see [`Step::new`]).
#[inline]
pub(crate) fn gcra_acquire(
    cell: &AtomicU64,
    now: u64,
    interval: u64,
    tau: u64,
    tokens: u32,
) -> Step {
    gcra_update(cell, now, interval, tau, tokens, 0)
}

/// Moves an arrival time from one refill interval to another, keeping the debt (`tat -
/// now`) in tokens: the tokens taken stay taken under the new quota.
#[inline]
pub(crate) fn rescale_tat(tat: u64, now: u64, old_interval: u64, new_interval: u64) -> u64 {
    let debt = u128::from(tat.saturating_sub(now)) * u128::from(new_interval)
        / u128::from(old_interval.max(1));
    now.saturating_add(debt.min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn charged(
        clock: &crate::rate_limit::ManualClock,
    ) -> (
        RateLimiter<crate::rate_limit::ManualClock>,
        Charge<crate::rate_limit::ManualClock>,
    ) {
        let quota = Quota::new(crate::rate_limit::Rate::per_second(1), 2).unwrap();
        let limiter = RateLimiter::with_clock(quota, clock.clone());
        let (_, charge) = limiter.charge(2).unwrap();
        assert_eq!(limiter.available(), 0);
        (limiter, charge)
    }

    #[test]
    fn a_charge_hands_its_tokens_back_without_a_handle_on_the_limiter() {
        use crate::rate_limit::Refund;
        let clock = crate::rate_limit::ManualClock::new();
        let (limiter, charge) = charged(&clock);
        // Plain words: no reference count on the limiter.
        assert_eq!(Arc::strong_count(&limiter.inner), 1);
        assert_eq!(
            format!("{charge:?}"),
            "Charge { taken: Taken { tokens: 2, until: 2000000000 }, .. }"
        );
        charge.refund();
        assert_eq!(limiter.available(), 2);
    }

    #[test]
    fn a_charge_outliving_its_limiter_reaches_no_other() {
        use crate::rate_limit::Refund;
        let clock = crate::rate_limit::ManualClock::new();
        let (first, charge) = charged(&clock);
        drop(first);
        // The next limiter made most likely takes over the first one's block (the pool is
        // the process's: a test running beside this one may take it first); either way the
        // first one's receipt must not hand tokens to it.
        let (second, _kept) = charged(&clock);
        let reused = std::ptr::eq(charge.receipt.block(), second.inner.lease.lease().block());
        charge.refund();
        assert_eq!(second.available(), 0, "block reused: {reused}");
    }

    /// The GCRA step as it was written before `Step` (the public figures made at once,
    /// with the burst found by division): what `Step` must keep answering.
    fn reference(
        tat: u64,
        now: u64,
        interval: u64,
        tau: u64,
        tokens: u32,
        max_wait: u64,
    ) -> Result<(u64, Admitted, u64), RateLimited> {
        let burst = tau / interval;
        if u64::from(tokens) > burst {
            return Err(RateLimited::exceeds_burst(
                tokens,
                burst as u32,
                Duration::from_nanos(tau),
                Duration::from_nanos(tat.max(now) - now),
            ));
        }
        let limit = now.saturating_add(tau);
        let next = tat.max(now).saturating_add(u64::from(tokens) * interval);
        let wait = next.saturating_sub(limit);
        if wait > max_wait {
            return Err(RateLimited::after(
                Duration::from_nanos(wait),
                burst as u32,
                Duration::from_nanos(tau),
                Duration::from_nanos(tat.max(now) - now),
            ));
        }
        let admitted = Admitted {
            remaining: (limit.saturating_sub(next) / interval) as u32,
            full_in: Duration::from_nanos(next - now),
            limit: burst as u32,
            window: Duration::from_nanos(tau),
        };
        Ok((next, admitted, wait))
    }

    proptest! {
        /// Every decision, figure and refusal is the reference's, for any bucket state,
        /// quota and request (the debt kept within what a bucket can owe: a day).
        #[test]
        fn step_decides_as_the_reference(
            interval in 1u64..=1_000_000_000_000,
            burst in 1u32..=100_000,
            // Around the burst, where a refusal for cost begins, or anywhere (up to costs
            // whose nanoseconds overflow a word).
            tokens_off in prop_oneof![-2i64..=2, -200_000i64..=200_000, 0i64..=i64::from(u32::MAX)],
            now in 0u64..=1 << 62,
            debt in 0u64..=86_400_000_000_000,
            behind in any::<bool>(),
            max_wait in prop_oneof![Just(0u64), 0u64..=86_400_000_000_000],
        ) {
            let tokens = (i64::from(burst) + tokens_off).clamp(0, i64::from(u32::MAX)) as u32;
            let tau = u64::from(burst).saturating_mul(interval);
            // An arrival time ahead of `now` (a debt) or behind it (a full bucket).
            let tat = if behind { now.saturating_sub(debt) } else { now + debt };
            let step = Step::new(tat, now, interval, tau, tokens, max_wait);
            match reference(tat, now, interval, tau, tokens, max_wait) {
                Ok((next, admitted, wait)) => {
                    prop_assert!(step.admitted);
                    prop_assert_eq!(step.next, next);
                    prop_assert_eq!(step.admitted(), admitted);
                    prop_assert_eq!(step.remaining(), admitted.remaining);
                    prop_assert_eq!(step.wait(), wait);
                    let until = now + admitted.full_in.as_nanos() as u64;
                    prop_assert_eq!(step.taken(0), Taken { tokens: tokens.into(), until });
                }
                Err(refused) => {
                    prop_assert!(!step.admitted);
                    prop_assert_eq!(step.refusal(), refused);
                }
            }
        }
    }
}
