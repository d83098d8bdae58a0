//! Sliding windows of call outcomes.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, Ordering::Relaxed};

use parking_lot::Mutex;

pub(crate) const PRESENT: u8 = 1;
pub(crate) const FAILED: u8 = 2;
pub(crate) const SLOW: u8 = 4;

/// `count % size`, given `magic = u64::MAX / size + 1` (wrapping).
#[inline(always)]
fn remainder(magic: u64, count: u32, size: u64) -> u64 {
    let low = magic.wrapping_mul(u64::from(count));
    ((u128::from(low) * u128::from(size)) >> 64) as u64
}

/// Figures read off a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) total: u64,
    pub(crate) failed: u64,
    pub(crate) slow: u64,
}

/// The last `N` outcomes, lock-free: one byte per slot, running totals in atomics.
///
/// Recording a success over a success (the steady state of a healthy dependency) costs one
/// atomic add on the cursor and a load of the slot: no other write, no counter.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    /// Counts records; the slot is the count modulo the window's size. It wraps after 2³²
    /// records, when one slot is reused early: harmless.
    cursor: AtomicU32,
    /// `u64::MAX / size + 1`, for the remainder by two multiplications rather than a division
    /// (Lemire, "Faster remainder by direct computation", 2019).
    magic: u64,
    total: AtomicI64,
    failed: AtomicI64,
    slow: AtomicI64,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            cursor: AtomicU32::new(0),
            magic: (u64::MAX / u64::from(size.max(1))).wrapping_add(1),
            total: AtomicI64::new(0),
            failed: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    /// Records one outcome (`PRESENT` plus flags); returns whether any figure changed.
    #[inline]
    pub(crate) fn record(&self, flags: u8) -> bool {
        let count = self.cursor.fetch_add(1, Relaxed);
        let slot = &self.slots[self.index(count)];
        // The same outcome over itself changes nothing: no write. (A reset racing with it
        // may then drop this one outcome, as it would drop one recorded just before it.)
        if slot.load(Relaxed) == flags {
            return false;
        }
        let old = slot.swap(flags, Relaxed);
        if old == flags {
            return false;
        }
        if old & PRESENT == 0 {
            self.total.fetch_add(1, Relaxed);
        }
        let delta = |bit: u8| i64::from(flags & bit != 0) - i64::from(old & bit != 0);
        let f = delta(FAILED);
        if f != 0 {
            self.failed.fetch_add(f, Relaxed);
        }
        let s = delta(SLOW);
        if s != 0 {
            self.slow.fetch_add(s, Relaxed);
        }
        true
    }

    /// Whether the window is full and holds only plain successes, read off the raw totals
    /// (a total a racing reset has made negative is not clean).
    pub(crate) fn is_clean(&self) -> bool {
        self.failed.load(Relaxed) == 0
            && self.slow.load(Relaxed) == 0
            && self.total.load(Relaxed) == self.slots.len() as i64
    }

    /// `count % size`.
    #[inline(always)]
    fn index(&self, count: u32) -> usize {
        remainder(self.magic, count, self.slots.len() as u64) as usize
    }

    pub(crate) fn counts(&self) -> Counts {
        let cap = self.slots.len() as i64;
        let read = |a: &AtomicI64| a.load(Relaxed).clamp(0, cap) as u64;
        Counts {
            total: read(&self.total),
            failed: read(&self.failed),
            slow: read(&self.slow),
        }
    }

    /// Empties the window. Each slot is swapped out and its flags subtracted, like a record
    /// of "nothing", so a record racing with the reset stays counted exactly once.
    pub(crate) fn reset(&self) {
        let (mut total, mut failed, mut slow) = (0i64, 0i64, 0i64);
        for slot in self.slots.iter() {
            let old = slot.swap(0, Relaxed);
            total += i64::from(old & PRESENT != 0);
            failed += i64::from(old & FAILED != 0);
            slow += i64::from(old & SLOW != 0);
        }
        self.total.fetch_sub(total, Relaxed);
        self.failed.fetch_sub(failed, Relaxed);
        self.slow.fetch_sub(slow, Relaxed);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    counts: Counts,
}

#[derive(Debug)]
struct TimeWindowInner {
    buckets: Vec<Bucket>,
    /// The newest epoch the window has been advanced to.
    current: u64,
    totals: Counts,
}

/// Outcomes of the calls completed during the last `buckets × width`, aggregated per bucket.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    width_nanos: u64,
    inner: Mutex<TimeWindowInner>,
}

impl TimeWindow {
    pub(crate) fn new(buckets: u32, width_nanos: u64) -> Self {
        Self {
            width_nanos: width_nanos.max(1),
            inner: Mutex::new(TimeWindowInner {
                buckets: vec![Bucket::default(); buckets as usize],
                current: 0,
                totals: Counts::default(),
            }),
        }
    }

    fn advance(inner: &mut TimeWindowInner, epoch: u64) {
        if epoch <= inner.current {
            return;
        }
        let n = inner.buckets.len() as u64;
        // Expire at most one full turn of buckets; anything older is gone already.
        let first = (inner.current + 1).max(epoch.saturating_sub(n - 1));
        for e in first..=epoch {
            let b = &mut inner.buckets[(e % n) as usize];
            inner.totals.total -= b.counts.total;
            inner.totals.failed -= b.counts.failed;
            inner.totals.slow -= b.counts.slow;
            *b = Bucket {
                epoch: e,
                counts: Counts::default(),
            };
        }
        if epoch - inner.current >= n {
            // Every bucket was replaced: the totals are exactly zero.
            inner.totals = Counts::default();
        }
        inner.current = epoch;
    }

    /// Records an outcome completed at `now_nanos` (since the breaker's base instant) and
    /// returns the window's figures afterwards.
    pub(crate) fn record(&self, now_nanos: u64, flags: u8) -> Counts {
        let epoch = now_nanos / self.width_nanos;
        let mut inner = self.inner.lock();
        Self::advance(&mut inner, epoch);
        let n = inner.buckets.len() as u64;
        // A call that read the clock just before another advanced the window may land in
        // an older, still live, bucket; one older than the window is dropped.
        if epoch + n > inner.current {
            let b = &mut inner.buckets[(epoch % n) as usize];
            if b.epoch == epoch {
                b.counts.total += 1;
                b.counts.failed += u64::from(flags & FAILED != 0);
                b.counts.slow += u64::from(flags & SLOW != 0);
                inner.totals.total += 1;
                inner.totals.failed += u64::from(flags & FAILED != 0);
                inner.totals.slow += u64::from(flags & SLOW != 0);
            }
        }
        inner.totals
    }

    pub(crate) fn counts(&self, now_nanos: u64) -> Counts {
        let mut inner = self.inner.lock();
        Self::advance(&mut inner, now_nanos / self.width_nanos);
        inner.totals
    }

    pub(crate) fn reset(&self, now_nanos: u64) {
        let mut inner = self.inner.lock();
        for b in inner.buckets.iter_mut() {
            *b = Bucket::default();
        }
        let epoch = now_nanos / self.width_nanos;
        let n = inner.buckets.len() as u64;
        inner.buckets[(epoch % n) as usize].epoch = epoch;
        inner.current = epoch;
        inner.totals = Counts::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The slot is the record count modulo the size, for every size and count.
        #[test]
        fn index_is_the_remainder(size in 1u32..=1_000_000, count in proptest::prelude::any::<u32>()) {
            let w = CountWindow::new(size);
            proptest::prop_assert_eq!(w.index(count), (count % size) as usize);
        }
    }

    #[test]
    fn index_is_the_remainder_at_the_edges() {
        for size in [1, 2, 3, 7, 100, 1 << 16, u32::MAX / 2, u32::MAX] {
            let magic = (u64::MAX / u64::from(size)).wrapping_add(1);
            for count in [
                0,
                1,
                size - 1,
                size,
                size.wrapping_add(1),
                u32::MAX - 1,
                u32::MAX,
            ] {
                let index = remainder(magic, count, u64::from(size));
                assert_eq!(index, u64::from(count % size), "size {size}, count {count}");
            }
        }
    }

    #[test]
    fn count_window_keeps_the_last_n() {
        let w = CountWindow::new(3);
        assert!(w.record(PRESENT | FAILED));
        assert!(w.record(PRESENT));
        assert!(w.record(PRESENT | SLOW));
        assert_eq!(
            w.counts(),
            Counts {
                total: 3,
                failed: 1,
                slow: 1
            }
        );
        // Overwrites the failure.
        assert!(w.record(PRESENT));
        assert_eq!(
            w.counts(),
            Counts {
                total: 3,
                failed: 0,
                slow: 1
            }
        );
        // Overwrites a success with a success: nothing changes.
        assert!(!w.record(PRESENT));
        w.reset();
        assert_eq!(w.counts(), Counts::default());
    }

    #[test]
    fn reset_racing_with_records_keeps_counts_consistent() {
        let w = std::sync::Arc::new(CountWindow::new(64));
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        w.record(if (i + t) % 3 == 0 {
                            PRESENT | FAILED
                        } else {
                            PRESENT
                        });
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            w.reset();
        }
        for t in writers {
            t.join().expect("writer");
        }
        // The counters must agree with what the slots hold.
        let (mut total, mut failed) = (0, 0);
        for slot in w.slots.iter() {
            let f = slot.load(Relaxed);
            total += u64::from(f & PRESENT != 0);
            failed += u64::from(f & FAILED != 0);
        }
        let c = w.counts();
        assert_eq!((c.total, c.failed), (total, failed));
        assert_eq!(
            w.total.load(Relaxed),
            total as i64,
            "no drift hidden by the clamp"
        );
    }

    #[test]
    fn time_window_expires_old_buckets() {
        let w = TimeWindow::new(3, 10);
        w.record(0, PRESENT | FAILED);
        w.record(15, PRESENT);
        assert_eq!(
            w.counts(25),
            Counts {
                total: 2,
                failed: 1,
                slow: 0
            }
        );
        // Epoch 3 expires epoch 0.
        assert_eq!(
            w.counts(30),
            Counts {
                total: 1,
                failed: 0,
                slow: 0
            }
        );
        // A long gap empties everything.
        assert_eq!(w.counts(1_000), Counts::default());
        assert_eq!(
            w.record(1_001, PRESENT | SLOW),
            Counts {
                total: 1,
                failed: 0,
                slow: 1
            }
        );
    }

    #[test]
    fn time_window_accepts_a_slightly_late_record() {
        let w = TimeWindow::new(3, 10);
        w.counts(25); // window now at epoch 2
        assert_eq!(w.record(12, PRESENT | FAILED).failed, 1);
        // Too old: dropped.
        w.counts(45);
        assert_eq!(w.record(5, PRESENT | FAILED).total, 0);
    }
}
