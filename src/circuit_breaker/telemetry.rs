//! `metrics` integration (feature `metrics`). Names are listed in the module docs.

use metrics::{Counter, Gauge};

use super::State;
use super::classify::Outcome;

pub(crate) struct Metrics {
    success: Counter,
    failure: Counter,
    ignored: Counter,
    slow: Counter,
    pub(crate) rejected: Counter,
    state: Gauge,
    /// Whether transitions are counted (handles made on the way, so not `noop`).
    on: bool,
    /// Set when the breaker no longer speaks for its name (see `mute_state`).
    muted: std::sync::atomic::AtomicBool,
}

impl Metrics {
    /// The breaker's series, registered now; with `on` false, none (every handle a no-op):
    /// the facade cannot remove a series, so breakers made and dropped as endpoints come
    /// and go stay out of it.
    pub(crate) fn new(name: &str, on: bool) -> Self {
        if !on {
            return Self {
                success: Counter::noop(),
                failure: Counter::noop(),
                ignored: Counter::noop(),
                slow: Counter::noop(),
                rejected: Counter::noop(),
                state: Gauge::noop(),
                on,
                muted: std::sync::atomic::AtomicBool::new(false),
            };
        }
        let calls = |outcome: &'static str| {
            metrics::counter!(
                "seawall_circuit_breaker_calls_total",
                "breaker" => name.to_owned(),
                "outcome" => outcome
            )
        };
        let state = metrics::gauge!("seawall_circuit_breaker_state", "breaker" => name.to_owned());
        state.set(State::Closed.as_gauge());
        Self {
            success: calls("success"),
            failure: calls("failure"),
            ignored: calls("ignored"),
            slow: metrics::counter!(
                "seawall_circuit_breaker_slow_calls_total",
                "breaker" => name.to_owned()
            ),
            rejected: metrics::counter!(
                "seawall_circuit_breaker_rejected_calls_total",
                "breaker" => name.to_owned()
            ),
            state,
            on,
            muted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The state gauge and the transitions are no longer this breaker's to report: another
    /// breaker of the same name has taken over the series (a balancer's endpoint that
    /// moved, whose old version's late calls still reach this one).
    pub(crate) fn mute_state(&self) {
        self.muted.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn outcome(&self, outcome: Outcome, slow: bool) {
        match outcome {
            Outcome::Success => self.success.increment(1),
            Outcome::Failure => self.failure.increment(1),
            Outcome::Ignored => self.ignored.increment(1),
        }
        if slow {
            self.slow.increment(1);
        }
    }

    pub(crate) fn transition(&self, name: &str, from: State, to: State) {
        if !self.on || self.muted.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.state.set(to.as_gauge());
        metrics::counter!(
            "seawall_circuit_breaker_transitions_total",
            "breaker" => name.to_owned(),
            "from" => from.as_str(),
            "to" => to.as_str()
        )
        .increment(1);
    }
}
