//! Admission, once: "may this call go ahead?", the probe slot it may take, the check that
//! the answer still holds when the call starts, and the recording of its outcome. The
//! breaker's own service, the balancers and users guarding work that is not a tower
//! service all go through here.

use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use super::classify::Outcome;
use super::error::{Mode, Rejection};
use super::hot::Hot;
use super::state::{Breaker, Decision, ProbePermit, Shared, Start, State};

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

    /// Takes a decision in place, if none is held (the layer's `poll_ready`). A closed
    /// breaker's answer is not kept, so the closed path is one atomic load and no write:
    /// `call` reads the state again anyway (see [`start_closed`](Self::start_closed)) and
    /// takes its ticket from that reading.
    #[inline(always)]
    pub(crate) fn ask_if_none(&mut self, breaker: &Breaker) {
        if self.decision == Decision::NONE {
            let shared = &breaker.shared;
            let decision = shared.admit();
            if decision.tag() != Decision::CLOSED {
                self.decision = decision;
                if decision.tag() == Decision::PROBE {
                    self.hold_probe(shared);
                }
            }
        }
    }

    #[cold]
    fn hold_probe(&mut self, shared: &Arc<Shared>) {
        self.probe = Some(ProbePermit::new(shared.clone(), self.decision.generation()));
    }

    /// Whether the breaker refused.
    #[inline(always)]
    pub(crate) fn rejects(&self) -> bool {
        self.decision.tag() == Decision::REJECTED
    }

    /// The call starts now, on the closed path: a ticket when `poll_ready` kept no other
    /// decision and the breaker is closed now (one atomic load); `None` for every other
    /// case, which [`start`](Self::start) then settles. Split so that the common case
    /// returns its ticket in registers.
    #[inline(always)]
    pub(crate) fn start_closed(&mut self, breaker: &Breaker) -> Option<Ticket> {
        if self.decision != Decision::NONE {
            return None;
        }
        let shared = &breaker.shared;
        let decision = shared.admit_closed()?;
        Some(Ticket::closed(shared, decision.word))
    }

    /// The rejection, when the breaker refused (a rejection is not checked again: the
    /// breaker said no, and a retry after it moved is the caller's to make); `None`
    /// otherwise, as the error mode `M` keeps it.
    #[inline(always)]
    pub(crate) fn take_rejection<M: Mode>(&mut self, breaker: &Breaker) -> Option<M::Refusal> {
        if self.decision.tag() == Decision::REJECTED {
            let decision = std::mem::replace(&mut self.decision, Decision::NONE);
            Some(M::refusal(
                breaker,
                decision.rejecting_state(),
                decision.until,
            ))
        } else {
            None
        }
    }

    /// The call starts now: the decision is taken again if the breaker moved since it was
    /// taken (a pending inner service can take long), so that a breaker that opened
    /// meanwhile is not bypassed; then a [`Ticket`], or the rejection.
    #[inline(always)]
    pub(crate) fn start(self, breaker: &Breaker) -> Result<Ticket, Rejection> {
        let current = match self.decision.tag() {
            Decision::CLOSED | Decision::PROBE => breaker.shared.is_current(self.decision),
            // A disabled breaker may have been forced open (or reset) since: every call
            // would pass it.
            Decision::DISABLED => breaker.shared.state() == State::Disabled,
            // No decision kept: the breaker was closed at `poll_ready` and has moved since.
            0 => false,
            // A rejection stands (see `take_rejection`).
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
    fn into_ticket(mut self, shared: &Arc<Shared>) -> Result<Ticket, Rejection> {
        match self.decision.tag() {
            Decision::CLOSED => Ok(Ticket::closed(shared, self.decision.word)),
            Decision::DISABLED => Ok(Ticket::NONE),
            _ => self.ticket_other(shared),
        }
    }

    /// A probe or a rejection: kept out of line so that the closed path stays small.
    #[cold]
    #[inline(never)]
    fn ticket_other(&mut self, shared: &Arc<Shared>) -> Result<Ticket, Rejection> {
        match self.decision.tag() {
            Decision::PROBE => match self.probe.take() {
                Some(permit) => Ok(Ticket {
                    hold: ManuallyDrop::new(Hold::Shared(permit.disarm())),
                    word: self.decision.word,
                    start: shared.start(),
                }),
                None => unreachable!("a probe decision holds its permit"),
            },
            Decision::REJECTED => Err(Rejection::new(
                shared.clone(),
                self.decision.rejecting_state(),
                self.decision.until,
            )),
            _ => unreachable!("a decision is taken again when none is kept"),
        }
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
    /// The breaker, while the outcome is still to be recorded. Dropped by `Drop` alone
    /// (see there), so that dropping a settled ticket is one inlined test.
    hold: ManuallyDrop<Hold>,
    /// The admitting decision's tag (closed or probe) and generation: an outcome counts
    /// only in the closed period or half-open episode that admitted the call.
    word: u64,
    start: Start,
}

impl Ticket {
    /// A ticket that records nothing.
    pub(crate) const NONE: Ticket = Ticket {
        hold: ManuallyDrop::new(Hold::None),
        word: Decision::NONE.word,
        start: Start::NONE,
    };

    /// A call admitted closed: the completion flag's block while a success would change
    /// nothing (such a breaker does not time calls), a reference to the breaker otherwise.
    #[inline(always)]
    fn closed(shared: &Arc<Shared>, word: u64) -> Ticket {
        if shared.hot.is_clean() {
            Ticket {
                hold: ManuallyDrop::new(Hold::Lean(shared.hot, shared.id)),
                word,
                start: Start::NONE,
            }
        } else {
            Ticket {
                hold: ManuallyDrop::new(Hold::Shared(shared.clone())),
                word,
                start: shared.start(),
            }
        }
    }

    /// Records the call's outcome (an [`Outcome::Ignored`] counts for nothing).
    #[inline(always)]
    pub fn record(self, outcome: Outcome) {
        // Settling takes the breaker reference, the only field with a destructor: nothing
        // is left to drop, and skipping the (out-of-line) drop keeps the closed path short.
        std::mem::ManuallyDrop::new(self).settle(outcome);
    }

    /// Records a success.
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// Records a failure.
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// Whether an outcome is still to be recorded (a disabled breaker records none).
    #[inline(always)]
    pub(crate) fn is_pending(&self) -> bool {
        !matches!(*self.hold, Hold::None)
    }

    /// The ticket, moved out: this one then records nothing (only its breaker reference is
    /// written).
    #[inline(always)]
    pub(crate) fn take(&mut self) -> Ticket {
        Ticket {
            hold: ManuallyDrop::new(std::mem::replace(&mut *self.hold, Hold::None)),
            word: self.word,
            start: self.start,
        }
    }

    /// Records `outcome` in place; the ticket then records nothing more.
    #[inline(always)]
    pub(crate) fn settle(&mut self, outcome: Outcome) {
        let generation = self.word >> 3;
        match std::mem::replace(&mut *self.hold, Hold::None) {
            Hold::None => {}
            // Admitted closed while a success changed nothing: if it still does, there is
            // nothing to write.
            Hold::Lean(hot, id) => {
                if !(outcome == Outcome::Success && hot.is_clean()) {
                    Self::settle_lean(hot, id, generation, outcome, self.start);
                }
            }
            Hold::Shared(shared) => {
                if self.word & 7 == Decision::CLOSED {
                    shared.record_closed(generation, outcome, self.start);
                } else {
                    shared.record_probe(generation, outcome, self.start);
                }
            }
        }
    }

    /// A lean call whose outcome must be written: through the breaker, if it is alive.
    #[cold]
    #[inline(never)]
    fn settle_lean(hot: &Hot, id: u64, generation: u64, outcome: Outcome, start: Start) {
        if outcome == Outcome::Ignored {
            return;
        }
        if let Some(shared) = hot.breaker(id) {
            shared.record_closed(generation, outcome, start);
        }
    }
}

impl Drop for Ticket {
    /// Nothing for a settled ticket (the common case, tested inline); a held breaker
    /// reference is let go, and an unrecorded probe's slot goes back to the breaker.
    #[inline(always)]
    fn drop(&mut self) {
        if !matches!(*self.hold, Hold::None) {
            self.let_go();
        }
    }
}

impl Ticket {
    /// Whether the call was admitted as a half-open probe.
    #[inline]
    pub(crate) fn is_probe(&self) -> bool {
        self.word & 7 == Decision::PROBE
    }

    #[cold]
    #[inline(never)]
    fn let_go(&mut self) {
        // `hold` is dropped here and nowhere else: it is left `None`, which owns nothing.
        if let Hold::Shared(shared) = std::mem::replace(&mut *self.hold, Hold::None)
            && self.word & 7 == Decision::PROBE
        {
            shared.release_probe(self.word >> 3);
        }
    }
}

/// How a [`Ticket`] reaches its breaker.
pub(crate) enum Hold {
    /// Recorded, or a disabled breaker's: nothing to record.
    None,
    /// Admitted closed while the breaker's window was clean: its completion block and the
    /// breaker's id, with no reference count (see [`Hot`]).
    Lean(&'static Hot, u64),
    /// A reference to the breaker.
    Shared(Arc<Shared>),
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match (&*self.hold, self.word & 7) {
            (Hold::None, _) => "recorded or disabled",
            (_, Decision::CLOSED) => "closed",
            (_, _) => "probe",
        };
        f.debug_struct("Ticket").field("kind", &kind).finish()
    }
}

impl Breaker {
    /// Asks for permission to make one call, for work that is not a tower service (the
    /// layers ask by themselves): a [`Ticket`] to record the outcome with, or the
    /// rejection ([`Rejection`], which says when the breaker probes again).
    #[inline]
    pub fn try_acquire(&self) -> Result<Ticket, Rejection> {
        Admission::ask(self).into_ticket(&self.shared)
    }
}
