//! The circuit breaker and the fallback layer: transition rules, a reference model,
//! concurrency, and fallbacks composed with the breaker (its `tracing` events are in
//! `tests/traces/`).

use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

mod circuit_breaker;
mod concurrency;
mod fallback;
mod model;

/// Where proptest keeps the failing cases it found: next to the test's file
/// (`model.rs` → `model.proptest-regressions`). Its default would find this `main.rs` and
/// use `tests/proptest-regressions/model.txt`, one folder for every area.
fn regressions_next_to_source() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )))
}
