//! Observing a breaker: state transitions and rejected calls.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::State;

/// Capacity of the channels behind [`Breaker::subscribe`](super::Breaker::subscribe) and
/// [`Breaker::subscribe_all`](super::Breaker::subscribe_all); a subscriber that falls further
/// behind sees `RecvError::Lagged`.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// Something that happened to a breaker.
#[derive(Debug, Clone)]
pub struct Event {
    breaker: Arc<str>,
    at: Instant,
    kind: EventKind,
    retry_at: Option<Instant>,
}

impl Event {
    /// The breaker's name.
    pub fn breaker(&self) -> &str {
        &self.breaker
    }

    /// When it happened.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// What happened.
    pub fn kind(&self) -> &EventKind {
        &self.kind
    }

    /// For a move to [`State::Open`] or a rejection while open: when the breaker will admit
    /// probes.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EventKind::StateTransition { from, to } => {
                write!(f, "circuit breaker '{}': {from} -> {to}", self.breaker)
            }
            EventKind::CallRejected { state } => {
                write!(
                    f,
                    "circuit breaker '{}': call rejected ({state})",
                    self.breaker
                )
            }
        }
    }
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The breaker moved from one state to another.
    StateTransition {
        /// The state left.
        from: State,
        /// The state entered.
        to: State,
    },
    /// A call was rejected without reaching the inner service.
    CallRejected {
        /// The state that rejected it.
        state: State,
    },
}

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// Listeners of one breaker. Costs one relaxed load per event while nobody listens.
pub(crate) struct Events {
    active: AtomicBool,
    callbacks: RwLock<Vec<Callback>>,
    /// Transitions only.
    transitions: OnceLock<broadcast::Sender<Event>>,
    /// Everything.
    all: OnceLock<broadcast::Sender<Event>>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("callbacks", &self.callbacks.read().len())
            .field("transitions", &self.transitions.get().is_some())
            .field("all", &self.all.get().is_some())
            .finish()
    }
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            active: AtomicBool::new(false),
            callbacks: RwLock::new(Vec::new()),
            transitions: OnceLock::new(),
            all: OnceLock::new(),
        }
    }

    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    pub(crate) fn add_callback(&self, f: Callback) {
        self.callbacks.write().push(f);
        self.active.store(true, Relaxed);
    }

    pub(crate) fn subscribe(&self, all: bool) -> broadcast::Receiver<Event> {
        let rx = if all { &self.all } else { &self.transitions }
            .get_or_init(|| broadcast::channel(EVENT_CHANNEL_CAPACITY).0)
            .subscribe();
        self.active.store(true, Relaxed);
        rx
    }

    /// Delivers an event to callbacks and channels; call only after
    /// [`is_active`](Self::is_active) said yes.
    #[cold]
    pub(crate) fn emit(
        &self,
        breaker: &Arc<str>,
        kind: EventKind,
        at: Instant,
        retry_at: Option<Instant>,
    ) {
        let event = self.publish(breaker, kind, at, retry_at);
        self.call_back(&event);
    }

    /// Sends an event to the channels (no user code runs) and returns it for the callbacks.
    #[cold]
    pub(crate) fn publish(
        &self,
        breaker: &Arc<str>,
        kind: EventKind,
        at: Instant,
        retry_at: Option<Instant>,
    ) -> Event {
        let event = Event {
            breaker: breaker.clone(),
            at,
            kind,
            retry_at,
        };
        // No receiver left is not an error worth reporting.
        if matches!(event.kind, EventKind::StateTransition { .. }) {
            if let Some(tx) = self.transitions.get() {
                let _ = tx.send(event.clone());
            }
        }
        if let Some(tx) = self.all.get() {
            let _ = tx.send(event.clone());
        }
        event
    }

    /// Runs the callbacks for an event. An event caused by a callback (one that resets
    /// the breaker it hears from, say) waits until every callback has heard the event
    /// being delivered, so that each callback hears a thread's events in the order they
    /// happened, not a nested transition before the one that caused it.
    #[cold]
    pub(crate) fn call_back(&self, event: &Event) {
        // Clone the list so that a callback may register another without deadlocking.
        let callbacks: Vec<Callback> = self.callbacks.read().clone();
        if callbacks.is_empty() {
            return;
        }
        DELIVERY.with(|delivery| {
            if delivery.busy.replace(true) {
                // Inside a callback on this thread: delivered when it is done.
                delivery
                    .queue
                    .borrow_mut()
                    .push_back((callbacks, event.clone()));
                return;
            }
            // Not busy once this delivery ends, even if a callback panics (what it had
            // queued is then dropped: its channels have it).
            let _done = Done(delivery);
            for cb in &callbacks {
                cb(event);
            }
            loop {
                let next = delivery.queue.borrow_mut().pop_front();
                let Some((callbacks, event)) = next else {
                    break;
                };
                for cb in &callbacks {
                    cb(&event);
                }
            }
        });
    }
}

/// A thread's callback delivery under way, and the events callbacks caused meanwhile.
#[derive(Default)]
struct Delivery {
    busy: std::cell::Cell<bool>,
    queue: std::cell::RefCell<std::collections::VecDeque<(Vec<Callback>, Event)>>,
}

/// Ends a thread's delivery.
struct Done<'a>(&'a Delivery);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.queue.borrow_mut().clear();
        self.0.busy.set(false);
    }
}

std::thread_local! {
    static DELIVERY: Delivery = Delivery::default();
}
