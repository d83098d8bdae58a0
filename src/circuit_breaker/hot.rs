//! What a call admitted closed needs from its breaker as it completes, reachable without a
//! reference count.
//!
//! A response future may outlive the service and every handle on the breaker, so it must
//! own whatever it reaches: an `Arc` clone when the call starts and a drop when it ends, two
//! locked instructions that were a third of the closed path's cost. In the steady state of
//! a healthy dependency (a count window full of successes, no slow-call timing) recording
//! a success changes nothing, so such a call needs one flag and nothing else. The flag
//! lives in a [`Hot`] block that is never freed: a `&'static` costs nothing to copy or
//! drop. A breaker's block goes back to a process-wide free list when the breaker is
//! dropped and is handed to the next breaker made, so their number is bounded by the most
//! breakers ever alive at once (64 bytes each), not by how many were ever made.
//!
//! A call that must record (a failure, or a success while the window is not clean) reaches
//! the breaker through the block's weak reference, checked against the breaker's unique id:
//! an outcome never lands in a breaker that took over a recycled block.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::state::Shared;

/// Where breakers take their blocks: the process's one pool (tests make their own).
pub(crate) static POOL: Pool = Pool::new();

/// Unique breaker ids; 0 is no breaker's.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Blocks of dropped breakers, for the next breakers made.
pub(crate) struct Pool {
    free: Mutex<Vec<&'static Hot>>,
}

impl Pool {
    pub(crate) const fn new() -> Self {
        Self {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A block for a new breaker, with the id the breaker's lean calls carry.
    pub(crate) fn claim(&'static self, breaker: Weak<Shared>) -> (&'static Hot, u64) {
        let id = NEXT_ID.fetch_add(1, Relaxed);
        let hot = self.free.lock().pop().unwrap_or_else(|| {
            Box::leak(Box::new(Hot {
                clean: AtomicBool::new(false),
                owner: Mutex::new(Owner {
                    id: 0,
                    breaker: Weak::new(),
                }),
                pool: self,
            }))
        });
        hot.clean.store(false, Relaxed);
        *hot.owner.lock() = Owner { id, breaker };
        (hot, id)
    }
}

/// A breaker's completion flag and a way back to the breaker. Cache-line aligned: blocks of
/// different breakers do not share a line.
#[repr(align(64))]
pub(crate) struct Hot {
    /// A success recorded now would change nothing: the breaker's count window is full and
    /// holds only successes, and its outcomes are not timed. Set and cleared by the
    /// breaker's recording (see [`Shared::record_closed`]); read by completing calls.
    clean: AtomicBool,
    owner: Mutex<Owner>,
    /// The pool it goes back to.
    pool: &'static Pool,
}

struct Owner {
    id: u64,
    breaker: Weak<Shared>,
}

impl Hot {
    /// Gives the block back, when its breaker is dropped: calls still holding it find no
    /// breaker under their id and record nothing, as a dropped breaker's calls would.
    pub(crate) fn release(&'static self) {
        self.clean.store(false, Relaxed);
        let old = std::mem::replace(
            &mut *self.owner.lock(),
            Owner {
                id: 0,
                breaker: Weak::new(),
            },
        );
        drop(old);
        self.pool.free.lock().push(self);
    }

    /// Whether a success recorded now would change nothing.
    #[inline(always)]
    pub(crate) fn is_clean(&self) -> bool {
        self.clean.load(Relaxed)
    }

    /// Sets the flag (see `Shared::update_clean` for when).
    pub(crate) fn set_clean(&self, clean: bool) {
        self.clean.store(clean, Relaxed);
    }

    /// The breaker with id `id`, if this block is still its and it is alive.
    pub(crate) fn breaker(&self, id: u64) -> Option<Arc<Shared>> {
        let owner = self.owner.lock();
        if owner.id == id {
            owner.breaker.upgrade()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use proptest::prelude::*;

    use crate::circuit_breaker::{Breaker, CircuitBreakerConfig, SlidingWindow, State, Ticket};

    fn breaker(size: u32, threshold: f64) -> Breaker {
        breaker_in(&super::POOL, size, threshold)
    }

    /// A pool of its own, so that tests running at the same time take no block from it.
    fn own_pool() -> &'static super::Pool {
        Box::leak(Box::new(super::Pool::new()))
    }

    fn breaker_in(pool: &'static super::Pool, size: u32, threshold: f64) -> Breaker {
        Breaker::lean_for_test(
            pool,
            CircuitBreakerConfig::builder()
                .name("hot")
                .sliding_window(SlidingWindow::count_based(size))
                .minimum_calls(size)
                .failure_rate_threshold(threshold)
                .build()
                .expect("valid config"),
        )
    }

    fn fill(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("closed").success();
        }
    }

    #[test]
    fn a_clean_window_lets_calls_complete_without_a_reference() {
        let b = breaker(4, 0.5);
        let refs = Arc::strong_count(&b.shared);
        // Filling: every call holds the breaker.
        let t = b.try_acquire().expect("closed");
        assert_eq!(Arc::strong_count(&b.shared), refs + 1);
        t.success();
        fill(&b, 3);
        assert!(
            b.shared.hot.is_clean(),
            "a full window of successes is clean"
        );
        // Clean: a call in flight holds no reference, and its success writes nothing.
        let t = b.try_acquire().expect("closed");
        assert_eq!(Arc::strong_count(&b.shared), refs);
        t.success();
        // A failure through a lean ticket still lands in the window and spoils it.
        let t = b.try_acquire().expect("closed");
        t.failure();
        assert_eq!(b.snapshot().failed_calls, 1);
        assert!(!b.shared.hot.is_clean());
        // Not clean: calls hold the breaker again, and successes evict the failure.
        let t = b.try_acquire().expect("closed");
        assert_eq!(Arc::strong_count(&b.shared), refs + 1);
        t.success();
        fill(&b, 3);
        assert_eq!(b.snapshot().failed_calls, 0);
        assert!(
            b.shared.hot.is_clean(),
            "clean again once the failure is evicted"
        );
        // A reset empties the window: not clean.
        b.force_open();
        b.reset();
        assert!(!b.shared.hot.is_clean());
        assert_eq!(b.snapshot().calls, 0);
    }

    #[test]
    fn lean_failures_trip_the_breaker() {
        let b = breaker(4, 0.5);
        fill(&b, 4);
        let tickets: Vec<Ticket> = (0..2).map(|_| b.try_acquire().expect("closed")).collect();
        for t in tickets {
            t.failure();
        }
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn an_outcome_never_lands_in_the_breaker_that_took_over_a_block() {
        let pool = own_pool();
        let a = breaker_in(pool, 2, 1.0);
        fill(&a, 2);
        let stale = a.try_acquire().expect("closed");
        let (hot, id) = (a.shared.hot, a.shared.id);
        drop(a);
        assert!(
            hot.breaker(id).is_none(),
            "the dropped breaker's id finds nothing"
        );
        // The next breaker made takes the block.
        let b = breaker_in(pool, 2, 1.0);
        assert!(std::ptr::eq(b.shared.hot, hot), "the block is reused");
        fill(&b, 2);
        stale.failure();
        assert_eq!(
            b.snapshot().failed_calls,
            0,
            "the stale failure went nowhere"
        );
        assert!(b.shared.hot.is_clean());
    }

    #[test]
    fn blocks_are_bounded_by_the_breakers_alive_not_those_made() {
        let pool = own_pool();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let b = breaker_in(pool, 2, 1.0);
            seen.insert(std::ptr::from_ref(b.shared.hot) as usize);
        }
        assert_eq!(
            seen.len(),
            1,
            "one block serves breakers made one after another"
        );
        let alive: Vec<Breaker> = (0..3).map(|_| breaker_in(pool, 2, 1.0)).collect();
        drop(alive);
        assert_eq!(pool.free.lock().len(), 3, "as many as were alive at once");
    }

    #[test]
    fn many_racing_records_leave_the_flag_true_only_on_a_clean_window() {
        let b = breaker(16, 1.0);
        for round in 0..20u32 {
            std::thread::scope(|s| {
                for t in 0..2u32 {
                    let b = &b;
                    s.spawn(move || {
                        for i in 0..5_000u32 {
                            let ticket = b.try_acquire().expect("closed");
                            if (i + t + round) % 97 == 0 {
                                ticket.failure();
                            } else {
                                ticket.success();
                            }
                        }
                    });
                }
            });
            let snap = b.snapshot();
            if b.shared.hot.is_clean() {
                assert_eq!((snap.calls, snap.failed_calls), (16, 0), "round {round}");
            }
            // Sixteen successes in a row clean the window, and the flag follows.
            fill(&b, 16);
            assert!(b.shared.hot.is_clean(), "round {round}");
        }
    }

    proptest! {
        /// Tickets taken and settled in any order leave the window holding exactly the last
        /// `size` outcomes, whether or not a call went the lean way.
        #[test]
        fn counts_match_the_last_n_outcomes(
            size in 1u32..6,
            steps in proptest::collection::vec((any::<bool>(), 0u8..4), 1..200),
        ) {
            let b = breaker(size, 1.0);
            let mut held: VecDeque<Ticket> = VecDeque::new();
            let mut model: VecDeque<bool> = VecDeque::new();
            for (fail, action) in steps {
                if action == 0 || held.is_empty() {
                    held.push_back(b.try_acquire().expect("closed"));
                    continue;
                }
                let t = if action == 1 { held.pop_front() } else { held.pop_back() }
                    .expect("held");
                if fail { t.failure() } else { t.success() }
                model.push_back(fail);
                if model.len() > size as usize {
                    model.pop_front();
                }
                let failed = model.iter().filter(|&&f| f).count() as u64;
                if failed as usize == model.len() && model.len() == size as usize {
                    // Every outcome a failure: the threshold of 1.0 is met.
                    prop_assert_eq!(b.state(), State::Open);
                    return Ok(());
                }
                let snap = b.snapshot();
                prop_assert_eq!(snap.calls, model.len() as u64);
                prop_assert_eq!(snap.failed_calls, failed);
                prop_assert_eq!(
                    b.shared.hot.is_clean(),
                    failed == 0 && model.len() == size as usize
                );
            }
        }
    }
}
