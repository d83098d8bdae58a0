//! Clocks for the rate limiters and the balancers: [`TokioClock`] by default (tokio's time:
//! its paused time in tests, the CPU's time-stamp counter otherwise), a manual one for
//! tests, and `QuantaClock` (feature `quanta`), the counter alone. Also re-exported from
//! [`rate_limit`](crate::rate_limit).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU8, AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::time::Duration;

use tokio::time::Instant;

/// A monotonic source of time in nanoseconds since an arbitrary, fixed origin.
///
/// Implemented by [`TokioClock`] (the default, which follows tokio's paused time in tests)
/// and [`ManualClock`]; implement it to drive limiters from your own time source.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since this clock's origin; never decreases.
    ///
    /// Readings must stay below `u64::MAX / 2` (292 years from the origin): a limiter adds
    /// its refill time (up to 146 years, see [`Quota`](crate::rate_limit::Quota)) to a
    /// reading, and past the range that sum saturates and the limiter admits everything.
    /// The process's start (the built-in clocks' origin) and 1970 are both far enough.
    fn now_nanos(&self) -> u64;
}

/// No read inside a runtime yet: reads are real time (as tokio's are outside a runtime).
const UNDECIDED: u8 = 0;
/// Real time: reads come from the fast source.
const REAL: u8 = 1;
/// Reads come from `tokio::time::Instant::now()` (paused time, or [`TokioClock::exact`]).
const TOKIO: u8 = 2;
/// One thread is deciding; the others wait for it (a few hundred nanoseconds, once).
const DECIDING: u8 = 3;
/// Reads outside any runtime after which an undecided clock settles on real time: each
/// undecided read looks for a runtime context (about 10 ns on the project's machines),
/// which a limiter only ever used from plain threads would otherwise pay on every check.
const OUTSIDE_READS: u32 = 1_024;

/// The default clock: tokio's time, read cheaply.
///
/// Tests that pause tokio's clock (`#[tokio::test(start_paused = true)]`,
/// `tokio::time::pause`) and move it with `tokio::time::advance` or auto-advance see
/// limiters and balancers follow it, without choosing a clock. Outside paused time the
/// clock reads the CPU's time-stamp counter through [`quanta`](https://docs.rs/quanta)
/// (feature `quanta`, on by default), a few nanoseconds a read where the OS clock that
/// `tokio::time::Instant::now()` reads costs tens on virtual machines (and tokio's
/// `test-util` feature adds a look at the runtime's clock to each read). Without the
/// feature, or where quanta finds no invariant counter, it reads the OS clock.
///
/// # How it tells paused time from real time
///
/// Once, at its first read made inside a tokio runtime (not when it is built), the clock
/// reads `tokio::time::Instant::now()`, waits for the OS clock to move, and reads it again:
/// under real time tokio's instant is the OS clock's and has moved too; under paused time
/// it has not (nothing can advance a paused clock while this code runs without yielding,
/// auto-advance included). The answer holds for the clock's life: paused time means every
/// later read is `tokio::time::Instant::now()`, real time means the counter. Reads made
/// before that, outside any runtime, are real time, as tokio's own are there.
///
/// Hence:
///
/// * built anywhere (outside a runtime, in a `static`, in a builder's `Default`) and first
///   read inside a paused runtime: follows paused time, `advance` moves it by exactly as
///   much;
/// * read outside any runtime (a setup check before the runtime starts), then inside a
///   paused runtime: follows paused time from there on, never stepping back (the value may
///   jump forward once, to where real time had got);
/// * read more than 1 024 times outside any runtime before its first read inside one (a
///   limiter used from plain threads): settles on real time, as if first read in a
///   real-time runtime;
/// * first read inside a runtime **before** time is paused (`tokio::time::pause()` called
///   after the limiter's first check): stays on real time, so `advance` does not move it.
///   Pause first, or build with [`TokioClock::exact`], which reads tokio's clock every
///   time, whenever it is paused;
/// * one clock read from runtimes of both kinds (a limiter in a `static` shared by paused
///   and real-time tests) follows whichever it was first read in: use
///   [`TokioClock::exact`] there too;
/// * on paused time, after `tokio::time::resume`, reads follow tokio's resumed clock.
///
/// A clone carries the decision made so far; one cloned before any read decides on its own.
///
/// The first clock made in a process calibrates the counter against the OS clock (quanta
/// does it once, for at most 200 ms, typically about a millisecond).
pub struct TokioClock {
    /// The tokio instant at which the clock was built: the origin of tokio reads.
    origin: Instant,
    /// `UNDECIDED`, `REAL`, `TOKIO` or `DECIDING`.
    mode: AtomicU8,
    /// Added to tokio reads after real reads made outside a runtime, so that the clock
    /// never steps back when it moves on to paused time.
    offset: AtomicU64,
    /// Added to tokio's paused instant before the origin is subtracted, when paused time
    /// was behind the origin at the decision (a clock built, in real time, after the
    /// paused runtime it is read in: its reads stood at 0 until paused time caught up).
    shift: AtomicU64,
    /// Real reads made while undecided, outside any runtime.
    outside_reads: AtomicU32,
    /// The counter (or the OS clock), anchored at the same moment as `origin`.
    fast: Fast,
}

impl TokioClock {
    /// A clock whose origin is now; it picks paused or real time at its first read inside
    /// a runtime (see the type's docs).
    pub fn new() -> Self {
        Self::with_mode(UNDECIDED)
    }

    /// A clock that reads `tokio::time::Instant::now()` every time (what the default clock
    /// did before it read the counter): it follows tokio's clock whenever that is paused,
    /// resumed or advanced, at the cost of an OS clock read (and, with tokio's `test-util`,
    /// a look at the runtime's clock) per read.
    pub fn exact() -> Self {
        Self::with_mode(TOKIO)
    }

    fn with_mode(mode: u8) -> Self {
        Self {
            origin: Instant::now(),
            mode: AtomicU8::new(mode),
            offset: AtomicU64::new(0),
            shift: AtomicU64::new(0),
            outside_reads: AtomicU32::new(0),
            fast: Fast::new(),
        }
    }

    /// The tokio instant `nanos` after this clock's origin. On real time the counter and
    /// the OS clock agree to within parts per million.
    pub fn instant(&self, nanos: u64) -> Instant {
        match self.mode.load(Acquire) {
            TOKIO => {
                let at = self.origin
                    + Duration::from_nanos(nanos.saturating_sub(self.offset.load(Relaxed)));
                let shift = Duration::from_nanos(self.shift.load(Relaxed));
                at.checked_sub(shift).unwrap_or(at)
            }
            _ => self.origin + Duration::from_nanos(nanos),
        }
    }

    /// Whether reads follow tokio's clock (`Some(true)`: paused time was seen, or
    /// [`exact`](Self::exact)), the counter (`Some(false)`), or nothing has been decided
    /// yet (`None`: no read inside a runtime so far).
    pub fn follows_tokio(&self) -> Option<bool> {
        match self.mode.load(Acquire) {
            TOKIO => Some(true),
            REAL => Some(false),
            _ => None,
        }
    }

    /// Nanoseconds of tokio's clock since the origin, plus the offset.
    #[inline]
    fn tokio_nanos(&self) -> u64 {
        let now = Instant::now() + Duration::from_nanos(self.shift.load(Relaxed));
        crate::util::nanos(now.saturating_duration_since(self.origin))
            .saturating_add(self.offset.load(Relaxed))
    }

    /// A read while undecided: real time outside a runtime, the decision inside one.
    #[cold]
    #[inline(never)]
    fn undecided(&self) -> u64 {
        if tokio::runtime::Handle::try_current().is_err() {
            if self.outside_reads.fetch_add(1, Relaxed) >= OUTSIDE_READS {
                let _ = self
                    .mode
                    .compare_exchange(UNDECIDED, REAL, Release, Relaxed);
            }
            return self.fast.nanos();
        }
        match self
            .mode
            .compare_exchange(UNDECIDED, DECIDING, Acquire, Acquire)
        {
            Ok(_) => {}
            // Another thread decides (or has decided): wait for it.
            Err(_) => loop {
                match self.mode.load(Acquire) {
                    DECIDING => std::hint::spin_loop(),
                    _ => return self.now_nanos(),
                }
            },
        }
        if tokio_is_paused() {
            let paused = Instant::now();
            if paused < self.origin {
                // Built after the runtime, in real time: paused time starts from here.
                self.shift
                    .store(crate::util::nanos(self.origin - paused), Relaxed);
            }
            if self.outside_reads.load(Relaxed) > 0 {
                // Real reads came first: start paused time no earlier than where they got.
                let gap = self.fast.nanos().saturating_sub(self.tokio_nanos());
                self.offset.store(gap, Relaxed);
            }
            self.mode.store(TOKIO, Release);
            self.tokio_nanos()
        } else {
            self.mode.store(REAL, Release);
            self.fast.nanos()
        }
    }
}

/// Whether tokio's clock, in the current runtime context, is paused: it has not moved
/// while the OS clock did. Under real time `tokio::time::Instant::now()` is the OS clock's
/// reading, so the second read is strictly later than the first.
fn tokio_is_paused() -> bool {
    let before = Instant::now();
    let os = os_clock::now();
    // The OS clock moves within nanoseconds (a microsecond or so where it is coarse); bounded
    // in case it never does, which then reads as paused: tokio's clock, always right.
    for _ in 0..1_000_000 {
        if os_clock::now() > os {
            break;
        }
        std::hint::spin_loop();
    }
    Instant::now() == before
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for TokioClock {
    fn clone(&self) -> Self {
        let mode = match self.mode.load(Acquire) {
            DECIDING => UNDECIDED,
            mode => mode,
        };
        Self {
            origin: self.origin,
            mode: AtomicU8::new(mode),
            offset: AtomicU64::new(self.offset.load(Relaxed)),
            shift: AtomicU64::new(self.shift.load(Relaxed)),
            outside_reads: AtomicU32::new(self.outside_reads.load(Relaxed)),
            fast: self.fast.clone(),
        }
    }
}

impl fmt::Debug for TokioClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode.load(Acquire) {
            REAL => "real time (counter)",
            TOKIO => "tokio's clock",
            _ => "undecided",
        };
        f.debug_struct("TokioClock")
            .field("origin", &self.origin)
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

impl TokioClock {
    /// The counter's reading at `nanos` on this clock, rounded down, for a deadline that a
    /// hot path compares with [`ticks`] instead of reading the time (no call into quanta,
    /// no scaling); `0` where there is no such reading: paused time, a clock not decided
    /// yet, quanta on the OS clock, or a processor other than x86-64. A reading of
    /// [`ticks`] below it is before `nanos`; at or above it, read the time to know.
    pub(crate) fn deadline_ticks(&self, nanos: u64) -> u64 {
        if self.mode.load(Acquire) != REAL {
            return 0;
        }
        self.fast.ticks_at(nanos)
    }

    /// The counter's reading now, unscaled, for comparing with
    /// [`deadline_ticks`](Self::deadline_ticks) (which is 0, never passed, where there is
    /// none).
    #[inline]
    pub(crate) fn ticks(&self) -> u64 {
        self.fast.ticks()
    }
}

impl Clock for TokioClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        match self.mode.load(Acquire) {
            REAL => self.fast.nanos(),
            TOKIO => self.tokio_nanos(),
            _ => self.undecided(),
        }
    }
}

/// The OS monotonic clock, unaffected by tokio's paused time: clippy.toml bans
/// `std::time::Instant` elsewhere so that every other read goes through tokio.
mod os_clock {
    #![allow(clippy::disallowed_types)]

    pub(super) type Instant = std::time::Instant;

    #[inline]
    pub(super) fn now() -> Instant {
        Instant::now()
    }
}

/// Real time since the clock's origin, read cheaply: the time-stamp counter through
/// quanta (which itself falls back to the OS clock where the counter is not invariant).
#[cfg(feature = "quanta")]
#[derive(Clone)]
struct Fast {
    clock: quanta::Clock,
    origin: u64,
    /// quanta's raw units (the counter's ticks, or nanoseconds on the OS clock) in 2^40
    /// ns, from quanta's own calibration (see [`TokioClock::deadline_ticks`]).
    ticks_per_2_40_ns: u128,
}

/// The process's quanta clock, made once: `quanta::Clock::new` asks the CPU (CPUID) whether
/// its counter is invariant, which a virtual machine traps, tens of microseconds a clock.
#[cfg(feature = "quanta")]
fn quanta_clock() -> quanta::Clock {
    static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new).clone()
}

#[cfg(feature = "quanta")]
impl Fast {
    fn new() -> Self {
        let clock = quanta_clock();
        let origin = clock.raw();
        let ticks_per_2_40_ns = Self::counter_rate(&clock);
        Self {
            clock,
            origin,
            ticks_per_2_40_ns,
        }
    }

    /// quanta's raw units in 2^40 ns: nanoseconds in 2^40 units, inverted (exact to about
    /// a part in 10^11); 0 if quanta says nonsense.
    fn counter_rate(clock: &quanta::Clock) -> u128 {
        let span = 1u64 << 40;
        let nanos = u128::from(clock.delta_as_nanos(0, span));
        (u128::from(span) << 40).checked_div(nanos).unwrap_or(0)
    }

    #[inline]
    fn ticks(&self) -> u64 {
        self.clock.raw()
    }

    /// quanta's raw reading at `nanos` after the origin, rounded down; 0 for none (or
    /// for a time already past). Converted from a reading taken now, so that only the
    /// span to `nanos` is scaled back: a wait of a minute is off by well under a tick
    /// however long the process has run.
    fn ticks_at(&self, nanos: u64) -> u64 {
        let raw = self.clock.raw();
        let now = self.clock.delta_as_nanos(self.origin, raw);
        let Some(span) = nanos.checked_sub(now).filter(|&span| span > 0) else {
            return 0;
        };
        let ticks = (u128::from(span) * self.ticks_per_2_40_ns) >> 40;
        u64::try_from(ticks)
            .ok()
            .and_then(|t| raw.checked_add(t))
            // Rounded down by a tick more: the conversion's last bit is not exact.
            .map_or(0, |t| t.saturating_sub(1))
    }

    #[inline]
    fn nanos(&self) -> u64 {
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }
}

/// Real time since the clock's origin: the OS clock (without the `quanta` feature).
#[cfg(not(feature = "quanta"))]
#[derive(Clone)]
struct Fast {
    origin: os_clock::Instant,
}

#[cfg(not(feature = "quanta"))]
impl Fast {
    fn new() -> Self {
        Self {
            origin: os_clock::now(),
        }
    }

    #[inline]
    fn nanos(&self) -> u64 {
        crate::util::nanos(self.origin.elapsed())
    }

    fn ticks_at(&self, _nanos: u64) -> u64 {
        0
    }

    fn ticks(&self) -> u64 {
        u64::MAX
    }
}

/// A clock that moves only when told to; clones share the time.
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// clock.advance(Duration::from_millis(5));
/// assert_eq!(clock.now_nanos(), 5_000_000);
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("nanos", &self.now_nanos())
            .finish()
    }
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = crate::util::nanos(by);
        let _ = self
            .nanos
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(by)));
    }
}

impl Clock for ManualClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Relaxed)
    }
}

/// A clock read from the CPU's time-stamp counter through the
/// [`quanta`](https://docs.rs/quanta) crate (feature `quanta`), as governor does: a few
/// nanoseconds a read where the OS clock costs tens. It does **not** follow tokio's paused
/// time; the default [`TokioClock`] reads the same counter outside paused time and follows
/// paused time in tests, for one more atomic load a read.
#[cfg(feature = "quanta")]
#[cfg_attr(docsrs, doc(cfg(feature = "quanta")))]
#[derive(Debug, Clone)]
pub struct QuantaClock {
    clock: quanta::Clock,
    /// Raw counter value at the origin; reads are scaled from raw deltas.
    origin: u64,
}

#[cfg(feature = "quanta")]
impl QuantaClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        let clock = quanta_clock();
        let origin = clock.raw();
        Self { clock, origin }
    }
}

#[cfg(feature = "quanta")]
impl Default for QuantaClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "quanta")]
impl Clock for QuantaClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::{Quota, Rate, RateLimiter};

    const MS: u64 = 1_000_000;

    /// The counter's deadline for a time says "before" only before it, and "passed" once
    /// the clock has passed it: the open breaker's rejections lean on it (real time).
    #[tokio::test]
    async fn a_deadline_in_ticks_is_passed_when_the_time_is() {
        let clock = TokioClock::new();
        let start = clock.now_nanos();
        assert_eq!(
            clock.mode.load(Acquire),
            REAL,
            "decided in a real-time runtime"
        );
        for wait in [MS / 10, MS, 3 * MS] {
            let until = clock.now_nanos() + wait;
            let deadline = clock.deadline_ticks(until);
            #[cfg(feature = "quanta")]
            assert!(clock.ticks() < deadline, "before the deadline");
            #[cfg(not(feature = "quanta"))]
            assert_eq!(deadline, 0, "no counter: no deadline in ticks");
            // Spun, not slept: the instant the clock passes `until`, so must the ticks.
            while clock.now_nanos() < until {
                std::hint::spin_loop();
            }
            assert!(
                clock.ticks() >= deadline,
                "passed with the time ({wait} ns)"
            );
        }
        assert_eq!(clock.deadline_ticks(start), 0, "a time already past");
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_has_no_deadline_in_ticks() {
        let clock = TokioClock::new();
        let now = clock.now_nanos();
        assert_eq!(clock.deadline_ticks(now + 1_000 * MS), 0);
    }

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// Spins (no sleep) until the OS clock has moved by `by`.
    fn spin(by: Duration) {
        let start = os_clock::now();
        while start.elapsed() < by {
            std::hint::spin_loop();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time() {
        let clock = TokioClock::new();
        assert_eq!(clock.follows_tokio(), None, "nothing is decided at build");
        assert_eq!(clock.now_nanos(), 0);
        assert_eq!(clock.follows_tokio(), Some(true));
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(clock.now_nanos(), 5 * MS);
        // Auto-advance moves it too.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(clock.now_nanos(), 1_005 * MS);
        // Real time passing does not.
        spin(Duration::from_millis(1));
        assert_eq!(clock.now_nanos(), 1_005 * MS);
    }

    #[tokio::test]
    async fn real_time_moves_with_the_os_clock() {
        let outer = os_clock::now();
        let clock = TokioClock::new();
        let inner = os_clock::now();
        let mut last = clock.now_nanos();
        assert_eq!(clock.follows_tokio(), Some(false));
        while inner.elapsed() < Duration::from_millis(2) {
            let now = clock.now_nanos();
            assert!(now >= last, "stepped back from {last} to {now}");
            last = now;
        }
        let at_least = crate::util::nanos(inner.elapsed());
        let read = clock.now_nanos();
        let at_most = crate::util::nanos(outer.elapsed());
        // The counter is calibrated against the OS clock: a few parts per million apart.
        let slack = 1_000 + at_most / 1_000;
        assert!(
            read + slack >= at_least && read <= at_most + slack,
            "{read} ns read, OS clock between {at_least} and {at_most} ns"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_time_on_a_multi_thread_runtime() {
        let clock = TokioClock::new();
        let _ = clock.now_nanos();
        assert_eq!(clock.follows_tokio(), Some(false));
    }

    #[test]
    fn built_outside_a_runtime_follows_paused_time_there() {
        let clock = TokioClock::new();
        paused_runtime().block_on(async {
            let start = clock.now_nanos();
            assert_eq!(clock.follows_tokio(), Some(true));
            tokio::time::advance(Duration::from_millis(7)).await;
            assert_eq!(clock.now_nanos() - start, 7 * MS);
        });
    }

    /// A clock built outside a runtime after that paused runtime was made (a service
    /// built between `Runtime::build` and `block_on`) takes a real-time origin later than
    /// the paused clock's: its reads stayed at zero until paused time caught up, so
    /// `advance` did not move it, against the type's docs ("built anywhere ... and first
    /// read inside a paused runtime: follows paused time"). Paused time is now shifted to
    /// its origin.
    #[test]
    fn built_after_the_paused_runtime_follows_advance() {
        let rt = paused_runtime();
        spin(Duration::from_millis(20));
        let clock = TokioClock::new();
        rt.block_on(async {
            let start = clock.now_nanos();
            assert_eq!(clock.follows_tokio(), Some(true));
            tokio::time::advance(Duration::from_millis(7)).await;
            assert_eq!(clock.now_nanos() - start, 7 * MS, "advance moves it");
        });
    }

    /// The same through a limiter: after `advance` by the refill interval the token was
    /// not there.
    #[test]
    fn a_limiter_built_after_the_paused_runtime_refills_on_advance() {
        let rt = paused_runtime();
        spin(Duration::from_millis(20));
        let limiter = RateLimiter::new(Quota::new(Rate::per_second(100), 1).unwrap());
        rt.block_on(async {
            assert!(limiter.try_acquire(1).is_ok());
            tokio::time::advance(Duration::from_millis(10)).await;
            assert!(limiter.try_acquire(1).is_ok(), "a token refilled in 10 ms");
        });
    }

    #[test]
    fn read_outside_a_runtime_then_paused_never_steps_back() {
        let clock = TokioClock::new();
        let rt = paused_runtime();
        // Real time goes on past the moment tokio's clock was paused.
        spin(Duration::from_millis(2));
        let outside = clock.now_nanos();
        assert_eq!(clock.follows_tokio(), None, "outside a runtime: undecided");
        assert!(outside >= 2 * MS);
        rt.block_on(async {
            let first = clock.now_nanos();
            assert_eq!(clock.follows_tokio(), Some(true));
            assert!(first >= outside, "stepped back from {outside} to {first}");
            tokio::time::advance(Duration::from_millis(7)).await;
            assert_eq!(clock.now_nanos() - first, 7 * MS);
        });
    }

    #[test]
    fn many_reads_outside_a_runtime_settle_on_real_time() {
        let clock = TokioClock::new();
        for _ in 0..OUTSIDE_READS {
            let _ = clock.now_nanos();
        }
        assert_eq!(clock.follows_tokio(), None);
        let _ = clock.now_nanos();
        assert_eq!(clock.follows_tokio(), Some(false));
        paused_runtime().block_on(async {
            let before = clock.now_nanos();
            tokio::time::advance(Duration::from_secs(60)).await;
            assert!(clock.now_nanos() - before < 60_000 * MS);
        });
    }

    #[tokio::test]
    async fn paused_after_the_first_read_stays_on_real_time_unless_exact() {
        let clock = TokioClock::new();
        let exact = TokioClock::exact();
        assert_eq!(exact.follows_tokio(), Some(true));
        let _ = (clock.now_nanos(), exact.now_nanos());
        tokio::time::pause();
        let (before, exact_before) = (clock.now_nanos(), exact.now_nanos());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(clock.now_nanos() - before < 60_000 * MS);
        assert_eq!(exact.now_nanos() - exact_before, 60_000 * MS);
    }

    #[test]
    fn first_read_in_a_real_time_runtime_decides_for_later_paused_ones() {
        let clock = TokioClock::new();
        let real = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        real.block_on(async { clock.now_nanos() });
        assert_eq!(clock.follows_tokio(), Some(false));
        paused_runtime().block_on(async {
            let before = clock.now_nanos();
            tokio::time::advance(Duration::from_secs(60)).await;
            assert!(clock.now_nanos() - before < 60_000 * MS);
        });
    }

    #[tokio::test(start_paused = true)]
    async fn after_resume_follows_tokio_in_real_time() {
        let clock = TokioClock::new();
        let paused = clock.now_nanos();
        assert_eq!(clock.follows_tokio(), Some(true));
        tokio::time::resume();
        spin(Duration::from_millis(1));
        assert!(clock.now_nanos() >= paused + MS);
    }

    #[tokio::test(start_paused = true)]
    async fn clones_carry_the_decision_made_so_far() {
        let early = TokioClock::new();
        let undecided = early.clone();
        let _ = early.now_nanos();
        let decided = early.clone();
        assert_eq!(undecided.follows_tokio(), None);
        assert_eq!(decided.follows_tokio(), Some(true));
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(undecided.now_nanos(), 3 * MS);
        assert_eq!(decided.now_nanos(), 3 * MS);
        assert_eq!(decided.instant(3 * MS), tokio::time::Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_on_the_default_clock_follows_paused_time() {
        let limiter = RateLimiter::new(Quota::new(Rate::per_second(10), 1).unwrap());
        assert!(limiter.try_acquire(1).is_ok());
        let denied = limiter.try_acquire(1).unwrap_err();
        assert_eq!(denied.retry_after(), Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(limiter.try_acquire(1).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(limiter.try_acquire(1).is_ok());
    }
}
