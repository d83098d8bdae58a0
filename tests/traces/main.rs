//! What the crate reports through `tracing`: the circuit breaker's events and the
//! gateway's request spans, recorded by one process-wide subscriber.
//!
//! These tests are a binary of their own, and each installs the subscriber (`recorded()`)
//! before anything else it does: tracing caches each callsite's interest when the callsite
//! is first hit, and a subscriber that is scoped, or set while other tests already run,
//! races that cache (an event hit first elsewhere can stay disabled for it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

mod breaker;
#[cfg(feature = "gateway")]
mod gateway;
#[cfg(feature = "http")]
mod rate_limit;
#[cfg(all(feature = "redis", feature = "metrics"))]
mod redis;
#[cfg(all(feature = "redis", feature = "metrics"))]
#[path = "../support/redis_server.rs"]
mod redis_server;

/// What the subscriber saw: every event as "LEVEL message field=value …", and the fields
/// of every `request` span of `seawall::gateway`, with the span stack per thread that
/// `Span::current()` needs.
#[derive(Clone, Default)]
struct Recorded {
    events: Arc<Mutex<Vec<String>>>,
    spans: Arc<Mutex<HashMap<u64, HashMap<String, String>>>>,
    next: Arc<AtomicU64>,
    metadata: Arc<Mutex<HashMap<u64, &'static Metadata<'static>>>>,
}

thread_local! {
    static STACK: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The process-wide subscriber, installed by the first test to call this.
fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorded = Recorded::default();
        tracing::subscriber::set_global_default(recorded.clone()).expect("the only subscriber");
        recorded
    })
}

/// A span's fields by name, values without quotes.
struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// An event as one line: the message, then `field=value` (values in `Debug` form).
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

impl Subscriber for Recorded {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, SeqCst) + 1;
        let meta = attrs.metadata();
        self.metadata.lock().unwrap().insert(id, meta);
        if meta.name() == "request" && meta.target() == "seawall::gateway" {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            fields.insert("level".into(), meta.level().to_string());
            self.spans.lock().unwrap().insert(id, fields);
        }
        Id::from_u64(id)
    }
    fn record(&self, id: &Id, values: &Record<'_>) {
        if let Some(fields) = self.spans.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Line(event.metadata().level().to_string());
        event.record(&mut line);
        self.events.lock().unwrap().push(line.0);
    }
    fn enter(&self, id: &Id) {
        STACK.with(|s| s.borrow_mut().push(id.into_u64()));
    }
    fn exit(&self, id: &Id) {
        STACK.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(at) = s.iter().rposition(|&i| i == id.into_u64()) {
                s.remove(at);
            }
        });
    }
    fn current_span(&self) -> tracing_core::span::Current {
        let top = STACK.with(|s| s.borrow().last().copied());
        match top.and_then(|id| Some((id, *self.metadata.lock().unwrap().get(&id)?))) {
            Some((id, meta)) => tracing_core::span::Current::new(Id::from_u64(id), meta),
            None => tracing_core::span::Current::none(),
        }
    }
}
