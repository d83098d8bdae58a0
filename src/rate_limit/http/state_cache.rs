//! The `RateLimit` values a thread made last, and the figures each was made from.
//!
//! A limit far from its quota reports the same state request after request: its bucket
//! refills faster than traffic drains it, so `r` stays at the burst less one, and `t`
//! is whole seconds. Made afresh, each value is two or four numbers formatted, written
//! into the thread's header chunk and checked byte by byte. From here it is a reference
//! count. A limit near its quota reports a new state each time: that costs a comparison
//! more than before.
//!
//! A policy's `RateLimit-Policy` value for a quota other than its first (changed with
//! `set_quota`, or another key's) is kept the same way: it was formatted and allocated
//! for every response.
//!
//! A few slots a thread, each policy (or pair of policies) in the slot its id picks, so
//! that routes served by one thread do not keep evicting each other. What a thread keeps
//! is bounded: a value a slot, and the header chunk (4 KiB) that value was cut from.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http::HeaderValue;

/// The slots of a thread.
const SLOTS: usize = 4;

/// A policy's (or pair's) state figures: remaining and reset, per policy; or a quota
/// (see [`quota`]).
pub(super) type Figures = [u64; 4];

/// A quota as two figures, exactly: the limit with the window's nanoseconds, and the
/// window's seconds.
pub(super) fn quota(limit: u32, window: std::time::Duration) -> [u64; 2] {
    [
        u64::from(limit) << 32 | u64::from(window.subsec_nanos()),
        window.as_secs(),
    ]
}

type Slot = Option<(u64, Figures, HeaderValue)>;

thread_local! {
    static LAST: RefCell<[Slot; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// A new id for the names one state value is made with: never reused, so a slot cannot
/// hand one policy's value to another made later where it was.
pub(super) fn new_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Relaxed)
}

/// The value for the names `id` stands for and `figures`: the one this thread made last
/// for them if the figures are the same, else `make()`'s, kept for next time.
pub(super) fn value(id: u64, figures: Figures, make: impl FnOnce() -> HeaderValue) -> HeaderValue {
    let slot = (id % SLOTS as u64) as usize;
    let kept = LAST.try_with(|last| match &last.borrow()[slot] {
        Some((kept_id, kept, value)) if *kept_id == id && *kept == figures => Some(value.clone()),
        _ => None,
    });
    if let Ok(Some(value)) = kept {
        return value;
    }
    // Made with the slots let go: `make` may ask for another value (a pair's policy asks
    // for each of its two).
    let value = make();
    let _ = LAST.try_with(|last| last.borrow_mut()[slot] = Some((id, figures, value.clone())));
    value
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text(id: u64, figures: Figures) -> String {
        format!("{id}:{figures:?}")
    }

    fn made(id: u64, figures: Figures) -> HeaderValue {
        HeaderValue::from_str(&text(id, figures)).unwrap()
    }

    #[test]
    fn the_same_figures_get_the_same_value_and_new_figures_a_new_one() {
        let id = new_id();
        let first = value(id, [9, 1, 0, 0], || made(id, [9, 1, 0, 0]));
        let again = value(id, [9, 1, 0, 0], || panic!("made again"));
        // The same bytes, not a copy of them.
        assert_eq!(first.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        let next = value(id, [8, 1, 0, 0], || made(id, [8, 1, 0, 0]));
        assert_eq!(next, text(id, [8, 1, 0, 0]).as_str());
    }

    #[test]
    fn ids_are_never_reused() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
    }

    proptest! {
        /// A quota's two figures tell every quota apart.
        #[test]
        fn quotas_are_told_apart(
            a in (any::<u32>(), any::<u64>(), 0..1_000_000_000u32),
            b in (any::<u32>(), any::<u64>(), 0..1_000_000_000u32),
        ) {
            let window = |(_, s, n): (u32, u64, u32)| std::time::Duration::new(s, n);
            prop_assert_eq!(quota(a.0, window(a)) == quota(b.0, window(b)), a == b);
        }

        /// Whatever the order of policies and figures (ids sharing a slot, figures
        /// repeating), each value is the one made for its own id and figures.
        #[test]
        fn a_value_is_always_its_own_ids_and_figures(
            steps in proptest::collection::vec((0..9usize, 0..3u64, 0..2u64), 1..200),
        ) {
            let ids: Vec<u64> = (0..9).map(|_| new_id()).collect();
            for (which, r, t) in steps {
                let (id, figures) = (ids[which], [r, t, r + t, 0]);
                let got = value(id, figures, || made(id, figures));
                let expected = text(id, figures);
                prop_assert_eq!(got, expected.as_str());
            }
        }
    }
}
