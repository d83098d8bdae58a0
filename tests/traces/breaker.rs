//! With the `tracing` feature, transitions and rejections are reported as `tracing` events
//! with the documented fields.

use std::time::Duration;

use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow};
use tower::{Service, ServiceBuilder, ServiceExt};
use tracing::Level;

#[tokio::test(start_paused = true)]
async fn transitions_and_rejections_are_traced() {
    let recorded = crate::recorded();
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .name("traced-breaker")
            .sliding_window(SlidingWindow::count_based(2))
            .minimum_calls(2)
            .wait_in_open(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: ()| async { Err::<(), _>("boom") });
    for _ in 0..3 {
        let _ = svc.ready().await.unwrap().call(()).await;
    }
    // Other tests of this binary report too: only this breaker's lines count.
    let lines: Vec<String> = recorded
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("breaker=traced-breaker"))
        .cloned()
        .collect();
    let level = Level::WARN.to_string();
    assert!(
        lines.iter().any(|l| l.starts_with(&level)
            && l.contains("circuit breaker state changed")
            && l.contains("from=closed")
            && l.contains("to=open")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("DEBUG")
            && l.contains("circuit breaker rejected a call")
            && l.contains("state=open")),
        "{lines:?}"
    );
}
