//! A counter that threads add to without a locked instruction: each thread has a slot of
//! its own, written with a plain load and store, and a read sums the slots.
//!
//! For counts taken on paths measured in nanoseconds (a breaker's rejections), where an
//! atomic add costs a third of the path: `lock xadd` waits for the store buffer to drain,
//! about 5 ns on the project's machines even when no other thread touches the line.
//!
//! A thread's slot is its index, handed out when it first counts and given back when it
//! exits, so indices stay below the number of threads alive at once. Threads with an index
//! past the slots (more threads than a counter has slots), or counting while their
//! thread-locals are being torn down, add to a shared atomic instead. Each slot has one
//! writer at a time: an index is handed to another thread only after its previous owner
//! exited, and the hand-over goes through a mutex, so the new owner's first load sees the
//! last store of the old one. Reads are as exact as an atomic counter's: every add that
//! happened before the read is in it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;

/// Indices given back by exited threads, to be handed out again before new ones.
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// The next index never handed out.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// This thread's index, given back when the thread exits.
struct ThreadIndex(usize);

impl ThreadIndex {
    fn claim() -> Self {
        // The smallest free index, so that indices stay within a counter's slots.
        let mut free = FREE.lock();
        let smallest = free.iter().enumerate().min_by_key(|&(_, &i)| i);
        match smallest.map(|(at, _)| at) {
            Some(at) => Self(free.swap_remove(at)),
            None => Self(NEXT.fetch_add(1, Relaxed)),
        }
    }
}

impl Drop for ThreadIndex {
    fn drop(&mut self) {
        FREE.lock().push(self.0);
    }
}

std::thread_local! {
    static INDEX: ThreadIndex = ThreadIndex::claim();
}

/// Slots per counter: twice the CPUs, at least 8 and at most 64 (8 to 512 bytes). Past
/// that many threads at once, the extra ones share the atomic.
fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(4, usize::from);
        (2 * cpus).clamp(8, 64)
    })
}

/// A count that many threads add to and any thread reads (see the [module](self)).
pub(crate) struct Counter {
    slots: Box<[AtomicU64]>,
    shared: AtomicU64,
}

impl Counter {
    pub(crate) fn new() -> Self {
        Self::with_slots(slots())
    }

    fn with_slots(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            shared: AtomicU64::new(0),
        }
    }

    /// Adds one.
    #[inline]
    pub(crate) fn increment(&self) {
        match INDEX.try_with(|index| self.slots.get(index.0)) {
            // This thread's own slot: no other thread writes it.
            Ok(Some(slot)) => slot.store(slot.load(Relaxed).wrapping_add(1), Relaxed),
            _ => {
                self.shared.fetch_add(1, Relaxed);
            }
        }
    }

    /// The count: every add that happened before this read, and perhaps some concurrent
    /// ones.
    pub(crate) fn get(&self) -> u64 {
        self.slots
            .iter()
            .fold(self.shared.load(Relaxed), |sum, slot| {
                sum.wrapping_add(slot.load(Relaxed))
            })
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Counter").field(&self.get()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    #[test]
    fn one_thread_counts_exactly() {
        let counter = Counter::new();
        for _ in 0..1_000 {
            counter.increment();
        }
        assert_eq!(counter.get(), 1_000);
    }

    /// Threads alive at once, more of them than the counter has slots (so some share the
    /// atomic), then more threads made after those exited (taking their indices over): not
    /// one add lost.
    #[test]
    fn threads_that_come_and_go_lose_no_add() {
        let counter = Arc::new(Counter::with_slots(3));
        for _wave in 0..3 {
            let start = Arc::new(Barrier::new(6));
            let threads: Vec<_> = (0..6)
                .map(|_| {
                    let (counter, start) = (counter.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for _ in 0..10_000 {
                            counter.increment();
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
        }
        assert_eq!(counter.get(), 3 * 6 * 10_000);
    }

    /// A thread made after another exited takes its index, and so its slot, over: indices
    /// stay below the threads alive at once.
    #[test]
    fn an_exited_threads_index_is_handed_out_again() {
        // Other tests' threads come and go at the same time, so what is checked is only
        // that a thread made after many others exited one by one got a small index.
        for _ in 0..200 {
            std::thread::spawn(|| INDEX.with(|_| ())).join().unwrap();
        }
        let index = std::thread::spawn(|| INDEX.with(|i| i.0)).join().unwrap();
        assert!(
            index < 64,
            "index {index} after 200 threads made one at a time"
        );
    }
}
