//! The shared state machine behind every clone of a breaker.

use std::fmt;
use std::sync::atomic::{
    AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst, fence,
};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::clock::{Clock, TokioClock};

use super::classify::Outcome;
use super::config::{CircuitBreakerConfig, SlidingWindow};
use super::events::{Event, EventKind, Events};
use super::hot::Hot;
use super::window::{CountWindow, Counts, FAILED, PRESENT, SLOW, TimeWindow};

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls flow through and their outcomes are recorded in the sliding window.
    Closed,
    /// Calls are rejected at once until the wait elapses.
    Open,
    /// A limited number of probe calls are admitted; their outcomes close or re-open the breaker.
    HalfOpen,
    /// Manually opened: every call is rejected until [`Breaker::reset`] is called.
    ForcedOpen,
    /// Manually disabled: every call flows through and nothing is recorded.
    Disabled,
}

impl State {
    pub(crate) const fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    pub(crate) const fn from_code(code: u64) -> State {
        match code {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::Disabled,
        }
    }

    /// A stable lower-case name (`closed`, `open`, `half_open`, `forced_open`, `disabled`),
    /// used in metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    /// The value of the `seawall_circuit_breaker_state` gauge for this state.
    pub const fn as_gauge(self) -> f64 {
        self.code() as f64
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const STATE_BITS: u32 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;
/// A rejection without a known retry time.
pub(crate) const NO_RETRY: u64 = u64::MAX;

#[inline]
fn state_of(word: u64) -> State {
    State::from_code(word & STATE_MASK)
}

#[inline]
fn gen_of(word: u64) -> u64 {
    word >> STATE_BITS
}

#[inline]
fn word(generation: u64, state: State) -> u64 {
    (generation << STATE_BITS) | state.code()
}

/// A point-in-time view of a breaker's figures.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The state.
    pub state: State,
    /// Calls recorded in the sliding window (closed state).
    pub calls: u64,
    /// Failed calls in the window.
    pub failed_calls: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// Failure rate, a fraction in `[0, 1]`, once the window holds the minimum number of
    /// calls.
    pub failure_rate: Option<f64>,
    /// Slow-call rate, a fraction in `[0, 1]`, once the window holds the minimum number of
    /// calls.
    pub slow_call_rate: Option<f64>,
    /// Calls rejected since the breaker was created.
    pub rejected_calls: u64,
    /// Trips since the breaker last closed (drives the exponential open wait).
    pub consecutive_trips: u32,
    /// When the breaker admits probes again, while open.
    pub retry_at: Option<Instant>,
}

#[derive(Debug)]
enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

/// Probe bookkeeping of one half-open episode (cold path, so a mutex).
#[derive(Debug, Default)]
struct HalfOpen {
    generation: u64,
    available: u32,
    done: u32,
    failed: u32,
    slow: u32,
    /// Nanoseconds on the breaker's clock.
    deadline: Option<u64>,
}

#[derive(Debug)]
struct Transitions {
    consecutive_trips: u32,
    rng: u64,
    /// The task that moves the breaker out of its timed state (open, or a bounded
    /// half-open episode), aborted at the next transition: an episode ended early leaves
    /// no task sleeping to its deadline.
    timer: Option<tokio::task::AbortHandle>,
}

/// When a call started, in nanoseconds on the breaker's clock; [`Start::NONE`] when the
/// configuration does not time calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start(u64);

impl Start {
    /// Not timed.
    pub(crate) const NONE: Start = Start(u64::MAX);
}

/// A breaker's answer to "may this call go ahead?", packed in two plain words so that
/// it moves through registers: a tag in the low bits of `word`, the generation (closed,
/// probe) or the rejecting state's code above it, and for a rejection `until`, the time
/// probes resume (nanoseconds on the breaker's clock, [`NO_RETRY`] if unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) word: u64,
    pub(crate) until: u64,
}

impl Decision {
    /// No decision yet.
    pub(crate) const NONE: Decision = Decision { word: 0, until: 0 };
    pub(crate) const CLOSED: u64 = 1;
    pub(crate) const DISABLED: u64 = 2;
    pub(crate) const REJECTED: u64 = 3;
    pub(crate) const PROBE: u64 = 4;

    #[inline]
    const fn new(tag: u64, payload: u64, until: u64) -> Self {
        Decision {
            word: (payload << 3) | tag,
            until,
        }
    }

    #[inline]
    pub(crate) const fn tag(self) -> u64 {
        self.word & 7
    }

    /// The generation of a closed or probe decision.
    #[inline]
    pub(crate) const fn generation(self) -> u64 {
        self.word >> 3
    }

    /// The state that rejected, for a rejection.
    #[inline]
    pub(crate) const fn rejecting_state(self) -> State {
        State::from_code(self.word >> 3)
    }
}

pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) config: CircuitBreakerConfig,
    pub(crate) times_calls: bool,
    /// Calls admitted closed complete through [`Hot`] while its flag says a success would
    /// change nothing: a count window, untimed, and no per-outcome metrics.
    lean: bool,
    pub(crate) hot: &'static Hot,
    /// This breaker's unique id, which its lean calls carry back to [`Hot::breaker`].
    pub(crate) id: u64,
    word: AtomicU64,
    /// Two windows, the closed periods taking turns (by their generation's parity): an
    /// outcome of a call admitted in one period that is recorded as the next begins lands
    /// in its own period's window, never in the new one (a `reset` emptied the one window
    /// slot by slot while such outcomes kept landing in it, and the reset breaker tripped
    /// on failures from before it).
    windows: [Window; 2],
    /// The generation of the latest closed period: whose window a snapshot reads.
    window_gen: AtomicU64,
    /// Every time the breaker reads: tokio's (paused in tests), read cheaply.
    clock: TokioClock,
    open_until: AtomicU64,
    /// `open_until` as a reading of the time-stamp counter (0: none, see
    /// [`TokioClock::deadline_ticks`]): an open breaker's rejection compares it with the
    /// counter instead of reading the time.
    open_until_ticks: AtomicU64,
    /// Rejections, counted without a locked instruction (a third of a rejection's cost).
    rejected: crate::counter::Counter,
    half_open: Mutex<HalfOpen>,
    transitions: Mutex<Transitions>,
    events: Events,
    #[cfg(feature = "metrics")]
    metrics: super::telemetry::Metrics,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.hot.release();
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &state_of(self.word.load(Relaxed)))
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// `lean_with_metrics`: completes calls through [`Hot`] even with the `metrics` feature,
    /// which then misses the successes written nowhere (tests of the lean path only).
    fn new(
        config: CircuitBreakerConfig,
        this: Weak<Shared>,
        pool: &'static super::hot::Pool,
        lean_with_metrics: bool,
    ) -> Self {
        let window = || match config.window {
            SlidingWindow::CountBased { size } => Window::Count(CountWindow::new(size)),
            SlidingWindow::TimeBased { window, buckets } => {
                let width = crate::util::nanos(window / buckets);
                Window::Time(TimeWindow::new(buckets, width))
            }
        };
        let windows = [window(), window()];
        let name: Arc<str> = Arc::from(config.name.as_ref());
        let seed = crate::util::seed(&*name);
        let lean = matches!(windows[0], Window::Count(_))
            && config.slow_call_duration.is_none()
            && (!cfg!(feature = "metrics") || lean_with_metrics || !config.facade_metrics);
        let (hot, id) = pool.claim(this);
        Self {
            lean,
            hot,
            id,
            #[cfg(feature = "metrics")]
            metrics: super::telemetry::Metrics::new(&name, config.facade_metrics),
            name,
            times_calls: config.slow_call_duration.is_some(),
            word: AtomicU64::new(word(0, State::Closed)),
            windows,
            window_gen: AtomicU64::new(0),
            clock: TokioClock::new(),
            open_until: AtomicU64::new(0),
            open_until_ticks: AtomicU64::new(0),
            rejected: crate::counter::Counter::new(),
            half_open: Mutex::new(HalfOpen::default()),
            transitions: Mutex::new(Transitions {
                consecutive_trips: 0,
                rng: seed,
                timer: None,
            }),
            events: Events::new(),
            config,
        }
    }

    /// Now, in nanoseconds on the breaker's clock.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.clock.instant(nanos)
    }

    pub(crate) fn state(&self) -> State {
        state_of(self.word.load(Acquire))
    }

    /// Decides whether a call may go ahead. The closed path is one atomic load; the open
    /// path two more loads, a reading of the time-stamp counter (on real time; the clock
    /// where there is none) and a counter.
    #[inline]
    pub(crate) fn admit(self: &Arc<Self>) -> Decision {
        let w = self.word.load(Acquire);
        if state_of(w) == State::Closed {
            return Decision::new(Decision::CLOSED, gen_of(w), 0);
        }
        self.admit_open(w)
    }

    /// The rejections an open breaker answers call after call (open before its deadline,
    /// forced open): two loads, at most one counter reading, and a counter, in a function
    /// small enough to save few registers. Everything else goes on to
    /// [`admit_slow`](Self::admit_slow).
    #[cold]
    #[inline(never)]
    fn admit_open(self: &Arc<Self>, w: u64) -> Decision {
        let state = state_of(w);
        if state == State::Open {
            // Published with this state word, which `admit` read with `Acquire`.
            let until = self.open_until.load(Relaxed);
            // Before the deadline by the counter (no clock read, no scaling), or by the
            // clock when the counter cannot tell.
            if self.clock.ticks() < self.open_until_ticks.load(Relaxed) || self.now() < until {
                self.count_rejection(State::Open, until);
                return Decision::new(Decision::REJECTED, State::Open.code(), until);
            }
        } else if state == State::ForcedOpen {
            self.count_rejection(State::ForcedOpen, NO_RETRY);
            return Decision::new(Decision::REJECTED, State::ForcedOpen.code(), NO_RETRY);
        }
        self.admit_slow()
    }

    /// A closed decision, if the breaker is closed now (one atomic load).
    #[inline(always)]
    pub(crate) fn admit_closed(&self) -> Option<Decision> {
        let w = self.word.load(Acquire);
        (state_of(w) == State::Closed).then(|| Decision::new(Decision::CLOSED, gen_of(w), 0))
    }

    /// Whether a closed or probe decision still belongs to the current state.
    #[inline(always)]
    pub(crate) fn is_current(&self, decision: Decision) -> bool {
        let state = if decision.tag() == Decision::CLOSED {
            State::Closed
        } else {
            State::HalfOpen
        };
        self.word.load(Acquire) == word(decision.generation(), state)
    }

    /// Every other admission: open, half-open, forced open, disabled. A probe decision has
    /// taken a permit: the caller must hold it in a [`ProbePermit`].
    #[cold]
    #[inline(never)]
    fn admit_slow(self: &Arc<Self>) -> Decision {
        loop {
            let w = self.word.load(Acquire);
            let generation = gen_of(w);
            let (state, until) = match state_of(w) {
                State::Closed => return Decision::new(Decision::CLOSED, generation, 0),
                State::Disabled => return Decision::new(Decision::DISABLED, 0, 0),
                State::Open => {
                    // The first call after the wait is a probe whether or not the timer
                    // task has run: its runtime may be busy, or driven only by this
                    // caller's own `block_on`, or its time just advanced (paused time).
                    // So one clock read, against the deadline published with this state
                    // word: before it, a plain rejection; after it, the move to half-open,
                    // which only succeeds while the word is still this open period's, so a
                    // stale reading or a late timer can never move a newer period.
                    let until = self.open_until.load(Relaxed);
                    if self.now() >= until {
                        self.transition(Some(w), State::HalfOpen);
                        continue;
                    }
                    (State::Open, until)
                }
                State::HalfOpen => {
                    let mut ho = self.half_open.lock();
                    if ho.generation != generation || self.word.load(Acquire) != w {
                        continue;
                    }
                    // The half-open deadline is enforced here whether or not a timer task
                    // was armed for it: its runtime may be busy, or driven only by a
                    // caller's own `block_on`, as for the open state's deadline.
                    let expired = ho.deadline.is_some_and(|d| self.now() >= d);
                    if expired {
                        drop(ho);
                        self.transition(Some(w), State::Open);
                        continue;
                    }
                    if ho.available > 0 {
                        ho.available -= 1;
                        return Decision::new(Decision::PROBE, generation, 0);
                    }
                    (State::HalfOpen, NO_RETRY)
                }
                State::ForcedOpen => (State::ForcedOpen, NO_RETRY),
            };
            self.count_rejection(state, until);
            return Decision::new(Decision::REJECTED, state.code(), until);
        }
    }

    #[inline]
    fn count_rejection(&self, state: State, until: u64) {
        self.rejected.increment();
        #[cfg(feature = "metrics")]
        self.metrics.rejected.increment(1);
        #[cfg(feature = "tracing")]
        tracing::debug!(breaker = %self.name, %state, "circuit breaker rejected a call");
        if self.events.is_active() {
            self.emit_rejection(state, until);
        }
    }

    #[cold]
    fn emit_rejection(&self, state: State, until: u64) {
        self.events.emit(
            &self.name,
            EventKind::CallRejected { state },
            self.instant(self.now()),
            self.retry_at(until),
        );
    }

    pub(crate) fn retry_at(&self, until: u64) -> Option<Instant> {
        (until != NO_RETRY).then(|| self.instant(until))
    }

    /// Whether a call that started at `start` (read only when slow-call detection is on)
    /// and ends now was slow, and the time now if it had to be read.
    fn slowness(&self, start: Start) -> (bool, Option<u64>) {
        match (start, self.config.slow_call_duration) {
            (Start::NONE, _) | (_, None) => (false, None),
            (Start(start), Some(limit)) => {
                let now = self.now();
                (
                    now.saturating_sub(start) >= crate::util::nanos(limit),
                    Some(now),
                )
            }
        }
    }

    /// When a call starts: read only if slow-call detection is on.
    #[inline]
    pub(crate) fn start(&self) -> Start {
        if self.times_calls {
            Start(self.now())
        } else {
            Start::NONE
        }
    }

    /// Records the outcome of a call admitted in the closed state of `generation`.
    #[inline]
    pub(crate) fn record_closed(self: &Arc<Self>, generation: u64, outcome: Outcome, start: Start) {
        let expected = word(generation, State::Closed);
        if let (Window::Count(w), Start::NONE) = (self.window(generation), start) {
            // The common case: no clock to read, a lock-free window.
            #[cfg(feature = "metrics")]
            self.metrics.outcome(outcome, false);
            let flags = match outcome {
                Outcome::Ignored => return,
                Outcome::Success => PRESENT,
                Outcome::Failure => PRESENT | FAILED,
            };
            // An outcome from an earlier closed period does not count in this one.
            if self.word.load(Relaxed) == expected && w.record(flags) {
                self.check_thresholds(expected, w.counts());
                if self.lean {
                    self.update_clean();
                }
            }
        } else {
            self.record_closed_timed(expected, outcome, start);
        }
    }

    /// The window of the closed period of `generation`.
    #[inline(always)]
    fn window(&self, generation: u64) -> &Window {
        &self.windows[(generation & 1) as usize]
    }

    /// Brings [`Hot`]'s flag to what the current closed period's window says, after a
    /// record (or a reset) that changed a window: read the state word and its window,
    /// store the flag if it differs, and read again until a reading agrees with the flag
    /// under the same word. The fences order each caller's window writes before its reads,
    /// and its flag store before its next read, so whichever caller stores last has read
    /// the window after every change: once records stop, the flag is true exactly when
    /// the current window is clean. Each further turn needs another caller's change (to
    /// the window, or of period) in between. Outside the closed state the flag is left as
    /// it is: a move to closed clears it.
    #[inline(never)]
    fn update_clean(&self) {
        loop {
            fence(SeqCst);
            let current = self.word.load(Relaxed);
            if state_of(current) != State::Closed {
                return;
            }
            let Window::Count(w) = self.window(gen_of(current)) else {
                return;
            };
            let clean = w.is_clean();
            if self.hot.is_clean() == clean && self.word.load(Relaxed) == current {
                return;
            }
            self.hot.set_clean(clean);
        }
    }

    #[cold]
    fn record_closed_timed(self: &Arc<Self>, expected: u64, outcome: Outcome, start: Start) {
        let (slow, now) = self.slowness(start);
        #[cfg(feature = "metrics")]
        self.metrics.outcome(outcome, slow);
        let flags = match outcome {
            Outcome::Ignored => return,
            Outcome::Success => PRESENT,
            Outcome::Failure => PRESENT | FAILED,
        } | if slow { SLOW } else { 0 };
        if self.word.load(Relaxed) != expected {
            return;
        }
        let counts = match self.window(gen_of(expected)) {
            Window::Count(w) => {
                if !w.record(flags) {
                    return;
                }
                w.counts()
            }
            Window::Time(w) => {
                let now = now.unwrap_or_else(|| self.now());
                w.record(now, flags)
            }
        };
        self.check_thresholds(expected, counts);
    }

    #[inline]
    fn check_thresholds(self: &Arc<Self>, expected: u64, counts: Counts) {
        if self.exceeds_thresholds(counts, self.config.minimum_calls) {
            self.transition(Some(expected), State::Open);
        }
    }

    fn exceeds_thresholds(&self, c: Counts, minimum: u32) -> bool {
        if c.total == 0 || c.total < u64::from(minimum) {
            return false;
        }
        // A quotient rounds to the double nearest the exact share, as the threshold literal
        // does: 3 failures in 10 calls meet a threshold of 0.3 (0.3 × 10 would not).
        let total = c.total as f64;
        c.failed as f64 / total >= self.config.failure_rate_threshold
            || c.slow as f64 / total >= self.config.slow_call_rate_threshold
    }

    /// Records the outcome of a probe; decides the half-open episode when all are in.
    pub(crate) fn record_probe(self: &Arc<Self>, generation: u64, outcome: Outcome, start: Start) {
        let (slow, _) = self.slowness(start);
        #[cfg(feature = "metrics")]
        self.metrics.outcome(outcome, slow);
        let mut ho = self.half_open.lock();
        if ho.generation != generation {
            return;
        }
        // An outcome that comes in after the episode's deadline decides nothing: the
        // episode ended at the deadline, open again, whether or not a timer task (or an
        // admission) has made that move yet.
        if ho.deadline.is_some_and(|d| self.now() >= d) {
            drop(ho);
            self.transition(Some(word(generation, State::HalfOpen)), State::Open);
            return;
        }
        match outcome {
            Outcome::Ignored => {
                // Does not count: let another probe take its place.
                ho.available += 1;
                return;
            }
            Outcome::Success => {}
            Outcome::Failure => ho.failed += 1,
        }
        ho.slow += u32::from(slow);
        ho.done += 1;
        if ho.done < self.config.permitted_calls_in_half_open {
            return;
        }
        let counts = Counts {
            total: u64::from(ho.done),
            failed: u64::from(ho.failed),
            slow: u64::from(ho.slow),
        };
        drop(ho);
        let to = if self.exceeds_thresholds(counts, 1) {
            State::Open
        } else {
            State::Closed
        };
        self.transition(Some(word(generation, State::HalfOpen)), to);
    }

    pub(crate) fn release_probe(&self, generation: u64) {
        let mut ho = self.half_open.lock();
        if ho.generation == generation {
            ho.available += 1;
        }
    }

    /// Moves to `to`, if the state word is still `expected` (any state when `None`).
    /// Returns whether this call made the move.
    pub(crate) fn transition(self: &Arc<Self>, expected: Option<u64>, to: State) -> bool {
        let mut tr = self.transitions.lock();
        let current = self.word.load(Acquire);
        if expected.is_some_and(|e| e != current) {
            return false;
        }
        if let Some(timer) = tr.timer.take() {
            // (The timer itself, when it is what moves: it ends with this call.)
            timer.abort();
        }
        let from = state_of(current);
        let generation = gen_of(current) + 1;
        let next = word(generation, to);
        let now = self.now();
        // Set up everything the new state needs, then publish it with one release store.
        match to {
            State::Closed => {
                tr.consecutive_trips = 0;
                // The new period's window (the one before the last): emptied before the
                // period begins, while outcomes of the last one land in the other.
                match self.window(generation) {
                    Window::Count(w) => w.reset(),
                    Window::Time(w) => w.reset(now),
                }
                if self.lean {
                    self.hot.set_clean(false);
                }
                self.window_gen.store(generation, Relaxed);
            }
            State::Open => {
                tr.consecutive_trips = tr.consecutive_trips.saturating_add(1);
                let unit = next_unit(&mut tr.rng);
                let wait = self.config.wait.wait(tr.consecutive_trips, unit);
                let until = now.saturating_add(crate::util::nanos(wait.min(super::MAX_DURATION)));
                self.open_until.store(until, Relaxed);
                self.open_until_ticks
                    .store(self.clock.deadline_ticks(until), Relaxed);
                tr.timer = self.arm_timer(until, next, State::HalfOpen);
            }
            State::HalfOpen => {
                let deadline = self
                    .config
                    .max_wait_in_half_open
                    .map(|d| now.saturating_add(crate::util::nanos(d.min(super::MAX_DURATION))));
                *self.half_open.lock() = HalfOpen {
                    generation,
                    available: self.config.permitted_calls_in_half_open,
                    deadline,
                    ..HalfOpen::default()
                };
                tr.timer = deadline.and_then(|d| self.arm_timer(d, next, State::Open));
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.word.store(next, Release);
        if to == State::Closed && self.lean {
            // A record of the last period racing with the move may have set the flag from
            // its own window: brought back to the new one's.
            self.update_clean();
        }

        // Reported under the transition lock, so that concurrent transitions are reported
        // in the order they happened; user callbacks run after it is released (they may
        // call back into the breaker).
        #[cfg(feature = "metrics")]
        self.metrics.transition(&self.name, from, to);
        #[cfg(feature = "tracing")]
        if to == State::Open || to == State::ForcedOpen {
            tracing::warn!(breaker = %self.name, %from, %to, "circuit breaker state changed");
        } else {
            tracing::info!(breaker = %self.name, %from, %to, "circuit breaker state changed");
        }
        let event = self.events.is_active().then(|| {
            let retry_at = (to == State::Open).then(|| self.instant(self.open_until.load(Relaxed)));
            self.events.publish(
                &self.name,
                EventKind::StateTransition { from, to },
                self.instant(now),
                retry_at,
            )
        });
        drop(tr);
        if let Some(event) = event {
            self.events.call_back(&event);
        }
        true
    }

    /// Schedules the move out of a timed state on the current tokio runtime, so that the
    /// state, events and metrics follow time without calls. The open state does not depend
    /// on it (a rejection compares the clock with the deadline); the half-open deadline,
    /// without a timer (no runtime), is checked by the admission path.
    /// Returns the task's handle, to abort it at the next transition.
    fn arm_timer(
        self: &Arc<Self>,
        deadline: u64,
        expected: u64,
        to: State,
    ) -> Option<tokio::task::AbortHandle> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let deadline = self.instant(deadline);
        let shared = Arc::downgrade(self);
        let task = handle.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(shared) = shared.upgrade() {
                shared.transition(Some(expected), to);
            }
        });
        Some(task.abort_handle())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let w = self.word.load(Acquire);
        let state = state_of(w);
        let counts = match self.window(self.window_gen.load(Relaxed)) {
            Window::Count(win) => win.counts(),
            Window::Time(win) => win.counts(self.now()),
        };
        let rate = |n: u64| {
            (counts.total > 0 && counts.total >= u64::from(self.config.minimum_calls))
                .then(|| n as f64 / counts.total as f64)
        };
        Snapshot {
            state,
            calls: counts.total,
            failed_calls: counts.failed,
            slow_calls: counts.slow,
            failure_rate: rate(counts.failed),
            slow_call_rate: rate(counts.slow),
            rejected_calls: self.rejected.get(),
            consecutive_trips: self.transitions.lock().consecutive_trips,
            retry_at: (state == State::Open).then(|| self.instant(self.open_until.load(Relaxed))),
        }
    }
}

use crate::util::next_unit;

/// A half-open probe slot, reserved in `poll_ready`; returned when dropped unused.
pub(crate) struct ProbePermit {
    shared: Arc<Shared>,
    generation: u64,
    live: bool,
}

impl fmt::Debug for ProbePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbePermit")
            .field("generation", &self.generation)
            .finish()
    }
}

impl ProbePermit {
    /// Holds the permit a [`Decision::PROBE`] took.
    pub(crate) fn new(shared: Arc<Shared>, generation: u64) -> Self {
        Self {
            shared,
            generation,
            live: true,
        }
    }

    /// The breaker, for a ticket that now holds the slot (and returns it if dropped
    /// unrecorded).
    pub(crate) fn disarm(mut self) -> Arc<Shared> {
        self.live = false;
        self.shared.clone()
    }
}

impl Drop for ProbePermit {
    fn drop(&mut self) {
        if self.live {
            self.shared.release_probe(self.generation);
        }
    }
}

/// A handle on one circuit breaker: its state, its figures, and manual control.
///
/// Cheap to clone; every clone, every [`CircuitBreakerLayer`](super::CircuitBreakerLayer)
/// made from it and every service those layers wrap share the same breaker.
///
/// ```
/// use seawall::circuit_breaker::{Breaker, CircuitBreakerConfig, State};
///
/// let breaker = Breaker::new(CircuitBreakerConfig::default());
/// assert_eq!(breaker.state(), State::Closed);
/// breaker.force_open();
/// assert_eq!(breaker.state(), State::ForcedOpen);
/// breaker.reset();
/// assert_eq!(breaker.state(), State::Closed);
/// ```
#[derive(Clone)]
pub struct Breaker {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl Breaker {
    /// Creates a breaker, closed, with an empty window.
    ///
    /// With the `metrics` feature, its metric handles are registered here: install the
    /// metrics recorder before creating breakers.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            shared: Arc::new_cyclic(|this| {
                Shared::new(config, this.clone(), &super::hot::POOL, false)
            }),
        }
    }

    /// A breaker whose clean-window calls go the lean way whatever the features, so that
    /// tests run with `metrics` exercise that path too.
    #[cfg(test)]
    pub(crate) fn lean_for_test(
        pool: &'static super::hot::Pool,
        config: CircuitBreakerConfig,
    ) -> Self {
        Self {
            shared: Arc::new_cyclic(|this| Shared::new(config, this.clone(), pool, true)),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.shared.config
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.shared.state()
    }

    /// Stops the breaker's state gauge and transitions from reaching the `metrics` facade:
    /// a breaker let go of while calls through it are in flight (a balancer's endpoint
    /// version gone), whose name a newer breaker reports under.
    pub(crate) fn mute_state_series(&self) {
        #[cfg(feature = "metrics")]
        self.shared.metrics.mute_state();
    }

    /// How long until the open breaker's wait is over (zero once it is), `None` when it
    /// is not open: lock-free, unlike [`snapshot`](Self::snapshot)'s `retry_at`.
    #[cfg(feature = "redis")]
    pub(crate) fn open_for(&self) -> Option<std::time::Duration> {
        // `open_until` is published with the state word, read here with `Acquire`.
        let w = self.shared.word.load(Acquire);
        (state_of(w) == State::Open).then(|| {
            let until = self.shared.open_until.load(Relaxed);
            std::time::Duration::from_nanos(until.saturating_sub(self.shared.now()))
        })
    }

    /// Whether the breaker is open with its wait over: its next admission is a probe,
    /// whether or not its timer task (if any) has moved it to half-open yet.
    #[cold]
    #[inline(never)]
    pub(crate) fn open_wait_over(&self) -> bool {
        // `open_until` is published with the state word, read here with `Acquire`.
        let w = self.shared.word.load(Acquire);
        state_of(w) == State::Open && self.shared.now() >= self.shared.open_until.load(Relaxed)
    }

    /// The window's figures and the state, read now.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Opens the breaker until [`reset`](Self::reset): every call is rejected.
    pub fn force_open(&self) {
        self.shared.transition(None, State::ForcedOpen);
    }

    /// Disables the breaker until [`reset`](Self::reset): every call passes, nothing is recorded.
    pub fn disable(&self) {
        self.shared.transition(None, State::Disabled);
    }

    /// Closes the breaker with an empty window and forgets past trips, whatever its state.
    pub fn reset(&self) {
        self.shared.transition(None, State::Closed);
    }

    /// Calls `f` with every later event, synchronously, on the task that caused it.
    ///
    /// Keep `f` short; while no callback and no subscriber exist, events cost nothing.
    pub fn on_event<F>(&self, f: F)
    where
        F: Fn(&Event) + Send + Sync + 'static,
    {
        self.shared.events.add_callback(Arc::new(f));
    }

    /// A channel of later state transitions (capacity
    /// [`EVENT_CHANNEL_CAPACITY`](super::EVENT_CHANNEL_CAPACITY)). Rejections are left out,
    /// so a flood of them cannot push transitions out of a slow subscriber's buffer.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.shared.events.subscribe(false)
    }

    /// A channel of every later event, rejections included (capacity
    /// [`EVENT_CHANNEL_CAPACITY`](super::EVENT_CHANNEL_CAPACITY)).
    pub fn subscribe_all(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.shared.events.subscribe(true)
    }

    /// A layer that wraps services with this breaker.
    pub fn layer(&self) -> super::CircuitBreakerLayer {
        super::CircuitBreakerLayer::from_breaker(self.clone())
    }
}
