//! The balancers: strategies, weights, outlier ejection, per-endpoint breakers, discovery
//! changes and consistent hashing, and the regressions found in review.

use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

mod balancer;
mod regressions;
mod waiters;

/// Where proptest keeps the failing cases it found: next to the test's file
/// (`balancer.rs` → `balancer.proptest-regressions`). Its default would find this
/// `main.rs` and use `tests/proptest-regressions/balancer.txt`, one folder for every area.
fn regressions_next_to_source() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )))
}
