//! Admission, once: "may this call go ahead?", the probe slot it may take, the check that
//! the answer still holds when the call starts, and the recording of its outcome. The
//! breaker's own service, the balancers and users guarding work that is not a tower
//! service all go through here.

use std::fmt;
use std::sync::Arc;

use super::classify::Outcome;
use super::error::CircuitOpen;
use super::state::{Breaker, Decision, ProbePermit, Shared, Start};

/// A decision taken ahead of a call (in `poll_ready`), with the probe slot it reserved in
/// the half-open state. Dropped unused, the slot goes back to the breaker.
pub(crate) struct Admission {
    decision: Decision,
    probe: Option<ProbePermit>,
}

impl Admission {
    /// No decision yet.
    pub(crate) const NONE: Admission = Admission {
        decision: Decision::NONE,
        probe: None,
    };

    /// Asks `breaker`; a probe decision takes its slot. The closed path is one atomic
    /// load.
    #[inline(always)]
    pub(crate) fn ask(breaker: &Breaker) -> Self {
        let shared = &breaker.shared;
        let decision = shared.admit();
        let probe = (decision.tag() == Decision::PROBE)
            .then(|| ProbePermit::new(shared.clone(), decision.generation()));
        Self { decision, probe }
    }

    /// Whether the breaker refused.
    #[inline(always)]
    pub(crate) fn rejects(&self) -> bool {
        self.decision.tag() == Decision::REJECTED
    }

    /// The call starts now: the decision is taken again if the breaker moved since it was
    /// taken (a pending inner service can take long), so that a breaker that opened
    /// meanwhile is not bypassed; then a [`Ticket`], or the rejection.
    #[inline(always)]
    pub(crate) fn start(self, breaker: &Breaker) -> Result<Ticket, CircuitOpen> {
        let current = match self.decision.tag() {
            Decision::CLOSED | Decision::PROBE => breaker.shared.is_current(self.decision),
            _ => true,
        };
        if current {
            self.into_ticket(&breaker.shared)
        } else {
            // Its probe slot, if any, goes back first.
            drop(self);
            Self::ask(breaker).into_ticket(&breaker.shared)
        }
    }

    #[inline(always)]
    fn into_ticket(mut self, shared: &Arc<Shared>) -> Result<Ticket, CircuitOpen> {
        let kind = match self.decision.tag() {
            Decision::CLOSED => Kind::Closed {
                shared: shared.clone(),
                generation: self.decision.generation(),
                start: shared.start(),
            },
            Decision::PROBE => match self.probe.take() {
                Some(permit) => Kind::Probe {
                    permit,
                    start: shared.start(),
                },
                None => unreachable!("a probe decision holds its permit"),
            },
            Decision::DISABLED => Kind::Passthrough,
            Decision::REJECTED => {
                return Err(CircuitOpen::new(
                    shared.clone(),
                    self.decision.rejecting_state(),
                    self.decision.until,
                ));
            }
            _ => panic!("a call started before its service was ready (poll_ready)"),
        };
        Ok(Ticket { kind })
    }
}

/// Permission for one call, from [`Breaker::try_acquire`]: do the work, then hand its
/// outcome to [`record`](Self::record) (or [`success`](Self::success) /
/// [`failure`](Self::failure)), as resilience4j's `tryAcquirePermission` and `onResult`.
/// A ticket dropped unrecorded records nothing, and a half-open probe slot it holds goes
/// back to the breaker, so an abandoned call never wedges the breaker half-open.
///
/// ```
/// use seawall::circuit_breaker::{Breaker, CircuitBreakerConfig, SlidingWindow, State};
///
/// let breaker = Breaker::new(
///     CircuitBreakerConfig::builder()
///         .name("ledger")
///         .sliding_window(SlidingWindow::count_based(2))
///         .minimum_calls(2)
///         .build()?,
/// );
/// // Guarding work that is not a tower service: a blocking call, say.
/// for _ in 0..2 {
///     let ticket = breaker.try_acquire().expect("closed");
///     let result: Result<(), &str> = Err("disk full");
///     if result.is_ok() { ticket.success() } else { ticket.failure() }
/// }
/// assert_eq!(breaker.state(), State::Open);
/// let rejected = breaker.try_acquire().unwrap_err();
/// assert!(rejected.retry_after().is_some());
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[must_use = "a ticket records nothing unless its outcome is recorded"]
pub struct Ticket {
    kind: Kind,
}

enum Kind {
    /// Admitted while closed: the outcome counts in that closed period's window.
    Closed {
        shared: Arc<Shared>,
        generation: u64,
        start: Start,
    },
    /// A half-open probe: its outcome decides the half-open episode.
    Probe { permit: ProbePermit, start: Start },
    /// The breaker is disabled: nothing is recorded.
    Passthrough,
}

impl Ticket {
    /// Records the call's outcome (an [`Outcome::Ignored`] counts for nothing).
    #[inline(always)]
    pub fn record(self, outcome: Outcome) {
        match self.kind {
            Kind::Closed {
                shared,
                generation,
                start,
            } => shared.record_closed(generation, outcome, start),
            Kind::Probe { permit, start } => permit.complete(outcome, start),
            Kind::Passthrough => {}
        }
    }

    /// Records a success.
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// Records a failure.
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Closed { .. } => "closed",
            Kind::Probe { .. } => "probe",
            Kind::Passthrough => "disabled",
        };
        f.debug_struct("Ticket").field("kind", &kind).finish()
    }
}

impl Breaker {
    /// Asks for permission to make one call, for work that is not a tower service (the
    /// layers ask by themselves): a [`Ticket`] to record the outcome with, or the
    /// rejection ([`CircuitOpen`], which says when the breaker probes again).
    #[inline]
    pub fn try_acquire(&self) -> Result<Ticket, CircuitOpen> {
        Admission::ask(self).into_ticket(&self.shared)
    }
}
