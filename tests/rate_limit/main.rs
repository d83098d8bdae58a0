//! Rate limiting: the local, keyed and sharded buckets and their layer, the HTTP answers
//! (also inside an axum service), and the Redis-backed limiter, alone and under the
//! generic layers, against a real `redis-server` and a real Redis Cluster on loopback.

use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

#[cfg(feature = "axum")]
mod axum_service;
mod bookings;
#[cfg(feature = "http")]
mod http_answers;
mod keyed_refunds;
mod limiters;
#[cfg(feature = "redis")]
mod redis_cluster;
#[cfg(feature = "redis")]
mod redis_edges;
#[cfg(feature = "redis")]
mod redis_layers;
#[cfg(feature = "redis")]
mod redis_limiter;
#[cfg(feature = "redis-tls")]
mod redis_tls;

#[cfg(feature = "redis")]
#[path = "../support/redis_server.rs"]
mod redis_server;
#[cfg(feature = "redis-tls")]
#[path = "../support/tls.rs"]
mod tls_support;

/// Where proptest keeps the failing cases it found: next to the test's file
/// (`limiters.rs` → `limiters.proptest-regressions`). Its default would find this
/// `main.rs` and use `tests/proptest-regressions/limiters.txt`, one folder for every area.
fn regressions_next_to_source() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )))
}
