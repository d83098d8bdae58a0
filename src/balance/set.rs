//! The endpoints a balancer holds, kept in step with discovery.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::Ordering::*;

use std::time::Duration;

use super::BalanceEndpoint;
use crate::circuit_breaker::{Breaker, CircuitBreakerConfig, State};

use super::stats::{EndpointStats, Member, SetShared};
use super::weights::{Maglev, Schedule, WeightedSampler};

/// One endpoint: its service stack, figures and optional breaker.
pub(crate) struct Slot<S> {
    pub(crate) endpoint: S,
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) breaker: Option<Breaker>,
    pub(crate) weight: u32,
}

impl<S> Slot<S> {
    /// In rotation: not ejected and its breaker (if any) not open. Half-open breakers count
    /// as available; the breaker decides on probes when the endpoint is picked. So does an
    /// open one whose wait is over: its move to half-open is made by the next admission
    /// (its timer task, if it has one, may be late, or gone with the runtime it ran on).
    #[inline]
    pub(crate) fn available(&self) -> bool {
        if self.stats.is_ejected() {
            return false;
        }
        match &self.breaker {
            None => true,
            Some(b) => match b.state() {
                State::ForcedOpen => false,
                State::Open => b.open_wait_over(),
                _ => true,
            },
        }
    }
}

/// What a balancer needs to rebuild after its endpoints change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Index {
    /// Weighted random sampling (power of two choices).
    Sampler,
    /// A smooth weighted round-robin schedule.
    Schedule,
    /// A Maglev lookup table (consistent hashing).
    Maglev,
}

/// The endpoints, dense in a `Vec` for O(1) random access, with a map from key to position.
pub(crate) struct EndpointSet<K, S> {
    pub(crate) slots: Vec<Slot<S>>,
    pub(crate) keys: Vec<K>,
    positions: HashMap<K, usize>,
    pub(crate) shared: Arc<SetShared>,
    breaker: Option<CircuitBreakerConfig>,
    default_rtt: Option<Duration>,
    index: Index,
    pub(crate) sampler: WeightedSampler,
    pub(crate) schedule: Schedule,
    pub(crate) maglev: Maglev,
    /// Bumped on every change, so a reservation can tell its slot moved.
    pub(crate) epoch: u64,
    dirty: bool,
    status: Arc<parking_lot::RwLock<Vec<StatusEntry>>>,
}

/// What a [`BalanceHandle`](super::BalanceHandle) reads: the endpoints as of the last change.
pub(crate) struct StatusEntry {
    pub(crate) key: String,
    pub(crate) address: String,
    pub(crate) weight: u32,
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) breaker: Option<Breaker>,
}

impl<K, S> EndpointSet<K, S> {
    /// Lets go of `slot`'s endpoint: the last replica holding these figures takes them out
    /// of the shared registry (a newer version registered since stays). Under the
    /// registry's lock, so that no replica adopts figures whose last holder is letting go.
    fn release(&self, slot: &Slot<S>) {
        let mut members = self.shared.members.lock();
        if !slot.stats.release() {
            return;
        }
        // Calls still in flight through this version's breaker record into it: its state
        // is no longer the endpoint's to report (a newer version, at another address, may
        // report under the same name).
        if let Some(breaker) = &slot.breaker {
            breaker.mute_state_series();
        }
        if let Some(versions) = members.get_mut(&slot.stats.label) {
            versions.retain(|m| !Arc::ptr_eq(&m.stats, &slot.stats));
            if versions.is_empty() {
                members.remove(&slot.stats.label);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Ends the ejections that have run out, when an ejection was refused for the cap.
    #[inline]
    pub(crate) fn sweep_if_asked(&self) {
        if self.shared.sweep.load(Relaxed) && self.shared.sweep.swap(false, AcqRel) {
            for slot in &self.slots {
                slot.stats.ejected_for();
            }
        }
    }

    /// How long until an endpoint out of rotation may come back: the earliest end of an
    /// ejection or of a breaker's open wait. `None` when every endpoint is in rotation or
    /// none of them has a known time.
    pub(crate) fn next_return(&self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        self.slots
            .iter()
            .filter_map(|slot| {
                let ejected = slot.stats.ejected_for();
                let open = slot.breaker.as_ref().and_then(|b| {
                    let snapshot = b.snapshot();
                    match snapshot.state {
                        State::Open => Some(
                            snapshot
                                .retry_at
                                .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
                        ),
                        _ => None,
                    }
                });
                match (ejected, open) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl<K, S> EndpointSet<K, S>
where
    K: Hash + Eq + Clone + fmt::Display,
    S: BalanceEndpoint,
{
    pub(crate) fn new(
        shared: Arc<SetShared>,
        breaker: Option<CircuitBreakerConfig>,
        default_rtt: Option<Duration>,
        index: Index,
        status: Arc<parking_lot::RwLock<Vec<StatusEntry>>>,
    ) -> Self {
        shared.replicas.fetch_add(1, AcqRel);
        Self {
            slots: Vec::new(),
            keys: Vec::new(),
            positions: HashMap::new(),
            shared,
            breaker,
            default_rtt,
            index,
            sampler: WeightedSampler::default(),
            schedule: Schedule::default(),
            maglev: Maglev::default(),
            epoch: 0,
            dirty: false,
            status,
        }
    }

    /// Another set over the same endpoints (empty until its own discovery fills it),
    /// sharing this one's figures: each endpoint's stats and breaker, ejections, the
    /// status entries.
    pub(crate) fn replica(&self) -> Self {
        Self::new(
            self.shared.clone(),
            self.breaker.clone(),
            self.default_rtt,
            self.index,
            self.status.clone(),
        )
    }

    /// A replica's random state, drawn from its original's `rng` and the replicas made so
    /// far (this one included): replicas do not draw in lockstep.
    pub(crate) fn replica_rng(&self, rng: u64) -> u64 {
        let replicas = self.shared.replicas.load(Relaxed) as u64;
        super::weights::mix(rng ^ replicas.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Inserts or replaces the endpoint of `key`. A replaced endpoint's figures start over
    /// when its address changed, and are kept otherwise (see `member`).
    pub(crate) fn insert(&mut self, key: K, endpoint: S) {
        self.shared.had_endpoints.store(true, Relaxed);
        let at = self.positions.get(&key).copied();
        let (stats, breaker) = self.member(&key, &endpoint);
        let weight = endpoint.weight().max(1);
        let slot = Slot {
            endpoint,
            stats,
            breaker,
            weight,
        };
        match at {
            Some(at) => {
                let old = std::mem::replace(&mut self.slots[at], slot);
                self.release(&old);
            }
            None => {
                self.positions.insert(key.clone(), self.slots.len());
                self.slots.push(slot);
                self.keys.push(key);
            }
        }
        self.changed();
    }

    /// The figures and breaker for `key`'s `endpoint`: those registered for its address
    /// (made by another replica, or by this set for the endpoint it replaces), or new ones
    /// (registered for the replicas to come) when there are none. An instance whose
    /// weight, health or tags changed keeps its figures: a sick instance whose check flaps
    /// (passing and warning weighted apart) must stay ejected and its breaker open. One
    /// that moved starts over, and comes back to the figures of an address it returns to
    /// while a replica still holds them there: replicas that saw its moves at different
    /// times still share one endpoint's figures.
    fn member(&self, key: &K, endpoint: &S) -> (Arc<EndpointStats>, Option<Breaker>) {
        let label: Arc<str> = Arc::from(key.to_string());
        let address = endpoint.address();
        let mut members = self.shared.members.lock();
        let versions = members.entry(label.clone()).or_default();
        if let Some(m) = versions.iter().find(|m| m.address == address) {
            m.stats.hold();
            return (m.stats.clone(), m.breaker.clone());
        }
        let stats = Arc::new(EndpointStats::new(
            self.shared.clone(),
            label.clone(),
            self.default_rtt,
        ));
        let breaker = self.breaker.as_ref().map(|template| {
            Breaker::new(template.with_name(format!("{}/{}", self.shared.name, label)))
        });
        versions.push(Member {
            stats: stats.clone(),
            breaker: breaker.clone(),
            address,
        });
        (stats, breaker)
    }

    /// Applies every change `discover` has ready, then rebuilds the lookup structures;
    /// returns whether anything changed, and the discovery error that stopped it, if any
    /// (the changes before it are kept). A discovery stream that ends leaves the last
    /// endpoints in place and sets `closed`.
    pub(crate) fn poll_discover<D>(
        &mut self,
        discover: &mut D,
        closed: &mut bool,
        cx: &mut std::task::Context<'_>,
    ) -> (bool, Result<(), crate::BoxError>)
    where
        D: tower::discover::Discover<Key = K, Service = S> + Unpin,
        D::Error: Into<crate::BoxError>,
    {
        use std::task::Poll;
        use tower::discover::Change;
        if *closed {
            return (false, Ok(()));
        }
        let mut changed = false;
        let mut result = Ok(());
        loop {
            match std::pin::Pin::new(&mut *discover).poll_discover(cx) {
                Poll::Ready(Some(Ok(Change::Insert(key, endpoint)))) => {
                    self.insert(key, endpoint);
                    changed = true;
                }
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    self.remove(&key);
                    changed = true;
                }
                Poll::Ready(Some(Err(e))) => {
                    result = Err(e.into());
                    break;
                }
                Poll::Ready(None) => {
                    *closed = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if changed {
            self.rebuild();
            super::telemetry::endpoints(&self.shared.name, self.len());
        }
        (changed, result)
    }

    /// The position of `key`'s endpoint.
    pub(crate) fn position(&self, key: &K) -> Option<usize> {
        self.positions.get(key).copied()
    }

    /// Removes the endpoint of `key`, if present; its stack is dropped.
    pub(crate) fn remove(&mut self, key: &K) {
        let Some(at) = self.positions.remove(key) else {
            return;
        };
        let old = self.slots.swap_remove(at);
        self.keys.swap_remove(at);
        self.release(&old);
        if at < self.slots.len() {
            self.positions.insert(self.keys[at].clone(), at);
        }
        self.changed();
    }

    fn changed(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.dirty = true;
        self.shared.endpoints.store(self.slots.len(), Release);
    }

    /// Rebuilds the lookup structures after a batch of changes.
    pub(crate) fn rebuild(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let weights: Vec<u32> = self.slots.iter().map(|s| s.weight).collect();
        match self.index {
            Index::Sampler => self.sampler = WeightedSampler::new(&weights),
            Index::Schedule => self.schedule = Schedule::new(&weights),
            Index::Maglev => {
                let hashes: Vec<u64> = self.keys.iter().map(|k| super::stable_hash(k)).collect();
                self.maglev = Maglev::new(&hashes, &weights);
            }
        }
        let entries = self
            .keys
            .iter()
            .zip(&self.slots)
            .map(|(key, slot)| StatusEntry {
                key: key.to_string(),
                address: slot.endpoint.address(),
                weight: slot.weight,
                stats: slot.stats.clone(),
                breaker: slot.breaker.clone(),
            })
            .collect();
        *self.status.write() = entries;
    }
}

impl<K, S> Drop for EndpointSet<K, S> {
    fn drop(&mut self) {
        for slot in std::mem::take(&mut self.slots) {
            self.release(&slot);
        }
        if self.shared.replicas.fetch_sub(1, AcqRel) == 1 {
            self.shared.endpoints.store(0, Release);
            // A handle that outlives the balancer reports no endpoints (and holds none).
            self.status.write().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Strategy;
    use crate::clock::TokioClock;

    /// An endpoint at `address` with `weight`.
    struct Fake(String, u32);

    impl BalanceEndpoint for Fake {
        fn weight(&self) -> u32 {
            self.1
        }

        fn address(&self) -> String {
            self.0.clone()
        }
    }

    fn fake(port: u16, weight: u32) -> Fake {
        Fake(format!("127.0.0.1:{port}"), weight)
    }

    fn shared() -> Arc<SetShared> {
        Arc::new(SetShared::new(
            Arc::from("test"),
            Arc::new(TokioClock::new()),
            None,
            Strategy::default(),
        ))
    }

    fn set(shared: &Arc<SetShared>) -> EndpointSet<&'static str, Fake> {
        let status = Arc::new(parking_lot::RwLock::new(Vec::new()));
        EndpointSet::new(shared.clone(), None, None, Index::Sampler, status)
    }

    /// The registry of shared figures holds every figure of the endpoints a replica
    /// holds, and nothing more: once the replicas let go, the figures (which point back at
    /// the shared state) are gone, no cycle keeps them.
    #[test]
    fn the_registry_lets_go_of_what_no_replica_holds() {
        let shared = shared();
        let mut a = set(&shared);
        let mut b = a.replica();
        a.insert("one", fake(1, 1));
        a.insert("two", fake(2, 1));
        b.insert("one", fake(1, 1));
        b.insert("two", fake(2, 1));
        assert!(Arc::ptr_eq(&a.slots[0].stats, &b.slots[0].stats));
        assert_eq!(shared.members.lock().len(), 2);

        // Its weight changed: the same figures.
        let before = a.slots[a.position(&"two").unwrap()].stats.clone();
        a.insert("two", fake(2, 3));
        assert!(Arc::ptr_eq(
            &a.slots[a.position(&"two").unwrap()].stats,
            &before
        ));
        drop(before);
        // Moved by one replica, then by the other: one new set of figures, the old ones
        // registered while the other replica holds them, then gone.
        a.insert("two", fake(3, 3));
        assert_eq!(shared.members.lock()["two"].len(), 2);
        b.insert("two", fake(3, 3));
        assert_eq!(shared.members.lock()["two"].len(), 1);
        assert_eq!(shared.members.lock().len(), 2);
        let two = a.position(&"two").unwrap();
        assert!(Arc::ptr_eq(
            &a.slots[two].stats,
            &b.slots[b.position(&"two").unwrap()].stats
        ));
        assert_eq!(
            Arc::strong_count(&a.slots[two].stats),
            3,
            "a, b, the registry"
        );

        // Removed from one: still registered; from both: gone.
        a.remove(&"one");
        assert_eq!(shared.members.lock().len(), 2);
        b.remove(&"one");
        assert_eq!(shared.members.lock().len(), 1);

        drop(a);
        assert_eq!(shared.members.lock().len(), 1, "b still holds two");
        drop(b);
        assert!(shared.members.lock().is_empty());
        assert_eq!(
            Arc::strong_count(&shared),
            1,
            "figures outlived every replica"
        );
    }
}
