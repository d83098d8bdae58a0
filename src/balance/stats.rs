//! Per-endpoint figures shared between a balancer and its in-flight calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::time::Duration;

use crate::circuit_breaker::{Breaker, Outcome};
use crate::clock::Clock;

use super::config::{OutlierDetection, Strategy};

/// What every endpoint of one balancer shares.
pub(crate) struct SetShared {
    pub(crate) name: Arc<str>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) outlier: Option<OutlierDetection>,
    /// The inverse of the peak-EWMA decay time constant (per nanosecond), when that
    /// strategy is on: a multiplication on the request path instead of a division.
    pub(crate) ewma_decay_nanos: Option<f64>,
    /// Endpoints in the set.
    pub(crate) endpoints: AtomicUsize,
    /// Endpoints currently ejected.
    pub(crate) ejected: AtomicUsize,
    /// Ejections refused because the ejected share was at its maximum.
    pub(crate) ejections_suppressed: AtomicU64,
    /// Set when an ejection was refused: the balancer then ends ejections that ran out.
    pub(crate) sweep: std::sync::atomic::AtomicBool,
    /// Set when discovery first gave an endpoint, for every replica: a balancer that has
    /// had one no longer waits for one ([`WhenEmpty::WaitAtStart`](super::WhenEmpty)).
    pub(crate) had_endpoints: std::sync::atomic::AtomicBool,
    /// Balancers over this set: one, or several made by
    /// [`Balance::replica`](super::Balance::replica).
    pub(crate) replicas: AtomicUsize,
    /// Each endpoint's figures and breaker, by label, for the replicas to share: one entry
    /// for each address a replica holds it at (replicas see an instance's moves at their
    /// own pace). Touched only when the endpoints change.
    pub(crate) members: parking_lot::Mutex<HashMap<Arc<str>, Vec<Member>>>,
    /// Whether ejections and readmissions go to the facade labelled by endpoint
    /// ([`BalanceBuilder::endpoint_metrics`](super::BalanceBuilder::endpoint_metrics)).
    pub(crate) endpoint_series: bool,
    /// Balancers left pending while a half-open breaker refused them (its probes in
    /// flight): a probe that ends may let them in, and nothing else would wake them (an
    /// endpoint not ready may never).
    probe_waiters: parking_lot::Mutex<Vec<std::task::Waker>>,
    probe_waiting: std::sync::atomic::AtomicBool,
}

/// An endpoint's figures and breaker as the replicas of a balancer share them, with what
/// tells one version of the endpoint from another: its address (an instance that moved
/// starts over; one whose weight or health changed does not).
pub(crate) struct Member {
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) breaker: Option<Breaker>,
    pub(crate) address: String,
}

impl SetShared {
    pub(crate) fn new(
        name: Arc<str>,
        clock: Arc<dyn Clock>,
        outlier: Option<OutlierDetection>,
        strategy: Strategy,
    ) -> Self {
        let ewma_decay_nanos = match strategy {
            Strategy::PeakEwma { decay, .. } => Some(1.0 / (decay.as_nanos().max(1) as f64)),
            _ => None,
        };
        Self {
            name,
            clock,
            outlier,
            ewma_decay_nanos,
            endpoints: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            ejections_suppressed: AtomicU64::new(0),
            sweep: std::sync::atomic::AtomicBool::new(false),
            had_endpoints: std::sync::atomic::AtomicBool::new(false),
            replicas: AtomicUsize::new(0),
            members: parking_lot::Mutex::new(HashMap::new()),
            endpoint_series: true,
            probe_waiters: parking_lot::Mutex::new(Vec::new()),
            probe_waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Registers `waker` to be woken when an endpoint breaker's probe ends. The caller
    /// checks the breaker again afterwards (see `wake_probe_waiters`).
    pub(crate) fn wait_for_probes(&self, waker: &std::task::Waker) {
        let mut waiters = self.probe_waiters.lock();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
        self.probe_waiting.store(true, SeqCst);
        drop(waiters);
        // Pairs with the fence in `wake_probe_waiters`: either that call sees the flag, or
        // the caller's check of the breakers after this sees the call's outcome.
        std::sync::atomic::fence(SeqCst);
    }

    /// A probe ended (its ticket recorded, or dropped with its permit handed back): wakes
    /// the balancers a half-open breaker left pending.
    #[inline]
    pub(crate) fn wake_probe_waiters(&self) {
        std::sync::atomic::fence(SeqCst);
        if !self.probe_waiting.load(Relaxed) {
            return;
        }
        self.wake_probe_waiters_slow();
    }

    #[cold]
    fn wake_probe_waiters_slow(&self) {
        let woken = {
            let mut waiters = self.probe_waiters.lock();
            self.probe_waiting.store(false, Relaxed);
            std::mem::take(&mut *waiters)
        };
        for waker in woken {
            waker.wake();
        }
    }
}

/// `ejected_until` of an endpoint that has left the set: never ejected again, never
/// counted (a late failure of one of its calls must not eject a ghost).
const REMOVED: u64 = u64::MAX;

/// Bits of [`EndpointStats::calls`] counting calls in flight: up to a million per endpoint.
const IN_FLIGHT_BITS: u32 = 20;
const IN_FLIGHT_MASK: u64 = (1 << IN_FLIGHT_BITS) - 1;
const CALL_STARTED: u64 = (1 << IN_FLIGHT_BITS) + 1;

/// One endpoint's live figures. Calls in flight hold an `Arc` of it.
pub(crate) struct EndpointStats {
    pub(crate) set: Arc<SetShared>,
    pub(crate) label: Arc<str>,
    /// Calls started (high 44 bits) and in flight (low 20 bits), in one word so that a
    /// call costs one atomic add to start and one to finish.
    pub(crate) calls: AtomicU64,
    /// Peak-EWMA latency estimate (f64 nanoseconds, as bits) and when it was last updated.
    ewma_bits: AtomicU64,
    ewma_stamp: AtomicU64,
    consecutive_failures: AtomicU32,
    window_calls: AtomicU32,
    window_failures: AtomicU32,
    /// Clock nanoseconds at which an ejection ends; 0 while in rotation.
    ejected_until: AtomicU64,
    /// Ejections in a row (the multiplier of the next ejection's length).
    ejections_in_row: AtomicU32,
    /// When the last ejection ended (clock nanoseconds), to forget old ejections.
    readmitted_at: AtomicU64,
    pub(crate) ejections_total: AtomicU64,
    pub(crate) failures_total: AtomicU64,
    /// The balancer replicas holding the endpoint with these figures.
    holders: AtomicUsize,
}

impl EndpointStats {
    pub(crate) fn new(set: Arc<SetShared>, label: Arc<str>, default_rtt: Option<Duration>) -> Self {
        let now = if default_rtt.is_some() {
            set.clock.now_nanos()
        } else {
            0
        };
        let rtt = default_rtt.map_or(0.0, |d| d.as_nanos() as f64);
        Self {
            set,
            label,
            calls: AtomicU64::new(0),
            ewma_bits: AtomicU64::new(rtt.to_bits()),
            ewma_stamp: AtomicU64::new(now),
            consecutive_failures: AtomicU32::new(0),
            window_calls: AtomicU32::new(0),
            window_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections_in_row: AtomicU32::new(0),
            readmitted_at: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            holders: AtomicUsize::new(1),
        }
    }

    /// Requests in flight.
    #[inline]
    pub(crate) fn outstanding(&self) -> u32 {
        (self.calls.load(Relaxed) & IN_FLIGHT_MASK) as u32
    }

    /// Calls started.
    pub(crate) fn started(&self) -> u64 {
        self.calls.load(Relaxed) >> IN_FLIGHT_BITS
    }

    /// A call starts.
    #[inline]
    pub(crate) fn start_call(&self) {
        self.calls.fetch_add(CALL_STARTED, Relaxed);
    }

    /// A call ends (completed or dropped).
    #[inline]
    pub(crate) fn end_call(&self) {
        self.calls.fetch_sub(1, Relaxed);
    }

    /// Whether the endpoint is out of rotation now; an ejection that has run out is ended
    /// here (the fast path is one load).
    #[inline]
    pub(crate) fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Acquire);
        until != 0 && self.still_ejected(until)
    }

    #[cold]
    fn still_ejected(&self, until: u64) -> bool {
        if until == REMOVED {
            return false;
        }
        let now = self.set.clock.now_nanos();
        if now < until {
            return true;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, AcqRel, Acquire)
            .is_ok()
        {
            self.set.ejected.fetch_sub(1, AcqRel);
            self.consecutive_failures.store(0, Relaxed);
            self.readmitted_at.store(now, Relaxed);
            super::telemetry::readmitted(&self.set.name, &self.label, self.set.endpoint_series);
        }
        false
    }

    /// How much longer the endpoint stays ejected; ends an ejection that has run out.
    pub(crate) fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Acquire);
        if until == 0 || until == REMOVED || !self.still_ejected(until) {
            return None;
        }
        Some(Duration::from_nanos(
            until.saturating_sub(self.set.clock.now_nanos()),
        ))
    }

    /// One more balancer replica holds the endpoint with these figures.
    pub(crate) fn hold(&self) {
        self.holders.fetch_add(1, Relaxed);
    }

    /// A replica lets the endpoint go; the last one to do so [`removed`](Self::removed) it.
    /// Returns whether it was the last.
    pub(crate) fn release(&self) -> bool {
        let last = self.holders.fetch_sub(1, AcqRel) == 1;
        if last {
            self.removed();
        }
        last
    }

    /// Called when the endpoint leaves the set: an ejection stops counting, and calls
    /// still in flight can no longer eject it.
    pub(crate) fn removed(&self) {
        let previous = self.ejected_until.swap(REMOVED, AcqRel);
        if previous != 0 && previous != REMOVED {
            self.set.ejected.fetch_sub(1, AcqRel);
        }
    }

    /// The peak-EWMA cost: the latency estimate, decayed to now, times outstanding + 1.
    #[inline]
    pub(crate) fn ewma_cost(&self, now: u64) -> f64 {
        let per_nano = self.set.ewma_decay_nanos.unwrap_or(1.0);
        let rtt = f64::from_bits(self.ewma_bits.load(Relaxed));
        let stamp = self.ewma_stamp.load(Relaxed);
        let elapsed = now.saturating_sub(stamp) as f64;
        let decayed = rtt * decay_weight(elapsed * per_nano);
        decayed * f64::from(self.outstanding() + 1)
    }

    fn observe_rtt(&self, rtt: f64, now: u64) {
        let Some(per_nano) = self.set.ewma_decay_nanos else {
            return;
        };
        let prev = f64::from_bits(self.ewma_bits.load(Relaxed));
        let stamp = self.ewma_stamp.load(Relaxed);
        self.ewma_stamp.store(now, Relaxed);
        let next = if rtt > prev {
            // Peak: a slower response is believed at once.
            rtt
        } else {
            let w = decay_weight(now.saturating_sub(stamp) as f64 * per_nano);
            prev * w + rtt * (1.0 - w)
        };
        // Concurrent completions race benignly: the estimate is approximate by design.
        self.ewma_bits.store(next.to_bits(), Relaxed);
    }

    #[inline]
    /// Records a completed call started at `start` (clock nanoseconds; 0 when untimed).
    pub(crate) fn complete(&self, outcome: Outcome, start: u64) {
        // An ignored call's time is not the endpoint's (a client that cancelled, or was
        // slow to send its body): taken as a latency, a peak, it would be believed at once
        // and keep the endpoint out of the picks for as long as it takes to decay.
        if start != 0 && outcome != Outcome::Ignored {
            let now = self.set.clock.now_nanos();
            self.observe_rtt(now.saturating_sub(start) as f64, now);
        }
        match outcome {
            Outcome::Success => {
                if self.consecutive_failures.load(Relaxed) != 0 {
                    self.consecutive_failures.store(0, Relaxed);
                }
                // A window a success closes is judged as one a failure closes: half
                // failed in each window of ten, every tenth call a success, was never
                // ejected.
                if self.window(false) {
                    if let Some(outlier) = &self.set.outlier {
                        self.try_eject(outlier);
                    }
                }
            }
            Outcome::Failure => {
                self.failures_total.fetch_add(1, Relaxed);
                self.on_failure();
            }
            Outcome::Ignored => {}
        }
    }

    /// The failure-rate window: judged every `calls` calls, then started again.
    #[inline]
    fn window(&self, failed: bool) -> bool {
        let Some((threshold, calls)) = self.set.outlier.as_ref().and_then(|o| o.failure_rate)
        else {
            return false;
        };
        if failed {
            self.window_failures.fetch_add(1, Relaxed);
        }
        let n = self.window_calls.fetch_add(1, AcqRel) + 1;
        if n < calls.get() {
            return false;
        }
        // The caller that completes the window judges it and starts the next.
        if self
            .window_calls
            .compare_exchange(n, 0, AcqRel, Relaxed)
            .is_err()
        {
            return false;
        }
        let failures = self.window_failures.swap(0, AcqRel);
        // The quotient rounds as the threshold literal does: 3 of 10 meets 0.3.
        f64::from(failures) / f64::from(n) >= threshold
    }

    fn on_failure(&self) {
        let Some(outlier) = &self.set.outlier else {
            return;
        };
        let in_row = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let by_rate = self.window(true);
        let by_row = outlier
            .consecutive_failures
            .is_some_and(|n| in_row >= n.get());
        if by_rate || by_row {
            self.try_eject(outlier);
        }
    }

    fn try_eject(&self, outlier: &OutlierDetection) {
        if self.ejected_until.load(Acquire) != 0 {
            return;
        }
        let set = &self.set;
        let allowed = outlier.max_ejected_count(set.endpoints.load(Acquire));
        let admitted = set
            .ejected
            .fetch_update(AcqRel, Acquire, |n| (n < allowed).then_some(n + 1))
            .is_ok();
        if !admitted {
            set.ejections_suppressed.fetch_add(1, Relaxed);
            // Ejections that ran out end only when read: have the balancer sweep them, so
            // that stale ones stop counting against the cap.
            set.sweep.store(true, Release);
            super::telemetry::suppressed(&set.name, &self.label);
            return;
        }
        let now = set.clock.now_nanos();
        let base = crate::util::nanos(outlier.base_ejection);
        let max = crate::util::nanos(outlier.max_ejection);
        // An endpoint that stayed in rotation for as long as its last ejection lasted (at
        // most the maximum) has earned a fresh start: the run of ejections ends, as
        // Envoy's multiplier decays.
        let previous = self.ejections_in_row.load(Relaxed);
        let since = now.saturating_sub(self.readmitted_at.load(Relaxed));
        let last = base.saturating_mul(u64::from(previous)).min(max);
        let in_row = if previous != 0 && since > last {
            1
        } else {
            previous.saturating_add(1)
        };
        self.ejections_in_row.store(in_row, Relaxed);
        let length = base.saturating_mul(u64::from(in_row)).min(max);
        // Never 0: 0 means "in rotation".
        let until = now.saturating_add(length).max(1);
        if self
            .ejected_until
            .compare_exchange(0, until, AcqRel, Acquire)
            .is_err()
        {
            set.ejected.fetch_sub(1, AcqRel);
            return;
        }
        self.consecutive_failures.store(0, Relaxed);
        self.ejections_total.fetch_add(1, Relaxed);
        let length = Duration::from_nanos(length);
        super::telemetry::ejected(&set.name, &self.label, length, set.endpoint_series);
    }
}

/// `e^-x` for `x >= 0`. Between requests `x` is usually tiny (elapsed time over a decay of
/// seconds), where `1 - x + x²/2` is exact to f64 rounding and ten times cheaper.
#[inline]
fn decay_weight(x: f64) -> f64 {
    if x < 1e-4 {
        1.0 - x + 0.5 * x * x
    } else {
        (-x).exp()
    }
}
