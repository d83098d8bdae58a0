//! The API gateway end to end over loopback: proxying, the admin surface, hostile
//! clients, limits (local and in a real `redis-server`), path normalisation, upstream
//! connections, metrics, the gateway as a `tower::Service`, and the status page in a real
//! headless Chromium (its `tracing` spans are in `tests/traces/`).

use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

mod admin;
mod clients;
mod config_edges;
mod downstream_h1;
mod grpc;
mod grpc_edges;
mod grpc_tonic;
mod h2;
mod h2_refusals;
mod limits;
mod metrics_endpoint;
mod paths;
mod pool;
mod proxy;
#[cfg(feature = "redis")]
mod redis_limits;
mod request_edges;
#[cfg(feature = "axum")]
mod service;
mod stale;
mod status_page;
#[cfg(feature = "tls")]
mod tls;
mod upstream_h1;
#[cfg(feature = "tls")]
mod upstream_tls;

mod raw_http;
#[cfg(feature = "redis")]
#[path = "../support/redis_server.rs"]
mod redis_server;
#[cfg(any(feature = "tls", feature = "redis-tls"))]
#[path = "../support/tls.rs"]
mod tls_support;

/// A gateway built from `toml` (services listed statically), on a loopback port of its
/// own.
async fn spawn_gateway(toml: &str) -> seawall::gateway::GatewayHandle {
    let config = seawall::gateway::GatewayConfig::from_toml_str(toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    seawall::gateway::Gateway::build(config, seawall::gateway::Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

/// Where proptest keeps the failing cases it found: next to the test's file
/// (`paths.rs` → `paths.proptest-regressions`). Its default would find this `main.rs` and
/// use `tests/proptest-regressions/paths.txt`, one folder for every area.
fn regressions_next_to_source() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )))
}
