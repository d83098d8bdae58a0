//! With the `tracing` feature, transitions and rejections are reported as `tracing` events
//! with the documented fields.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow};
use tower::{Service, ServiceBuilder, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// A minimal subscriber that keeps each event as "LEVEL message field=value …".
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!(" {value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Line(event.metadata().level().to_string());
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn transitions_and_rejections_are_traced() {
    let capture = Capture::default();
    let lines = capture.0.clone();
    tracing::subscriber::with_default(capture, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let layer = CircuitBreakerLayer::new(
                CircuitBreakerConfig::builder()
                    .name("traced")
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
        });
    });
    let lines = lines.lock().unwrap();
    let level = Level::WARN.to_string();
    assert!(
        lines.iter().any(|l| l.starts_with(&level)
            && l.contains("circuit breaker state changed")
            && l.contains("breaker=traced")
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
