//! Memory while what a deploy controls comes and goes (service names), counted by a
//! byte-counting global allocator (its own test binary, so that no other test's
//! allocations are counted; its tests take one lock so that they do not count each
//! other's).

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use std::sync::atomic::Ordering::Relaxed;

use counting_alloc::LIVE;
use seawall::discovery::{Instance, Registry};

/// One measuring test at a time.
static MEASURING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Bytes held now beyond `before`.
fn grown(before: usize) -> isize {
    LIVE.load(Relaxed) as isize - before as isize
}

/// A registry whose services are registered and deregistered under names of their own
/// (a service per job, tenant or canary: `batch-<id>`, `checkout-canary-<sha>`) holds
/// what its live services need. The registry forgets a service nobody registers or
/// watches (its own comment: "so that watching arbitrary names cannot grow the registry
/// without bound"), but only when `watch` is called: a process that only registers and
/// deregisters keeps an entry (name, publisher, two watch channels) per name ever used.
#[test]
fn a_registry_forgets_services_registered_and_gone() {
    let _one = MEASURING.lock();
    let registry = Registry::new();
    // A service watched the whole time (the gateway's route), registered once.
    let _watch = registry.watch("users");
    let _users = registry.register(Instance::local("users", "127.0.0.1:8081".parse().unwrap()));
    let warm = |registry: &Registry, from: usize, to: usize| {
        for n in from..to {
            let job = registry.register(Instance::local(
                &format!("batch-{n}"),
                "127.0.0.1:9000".parse().unwrap(),
            ));
            drop(job);
        }
    };
    warm(&registry, 0, 10);
    let before = LIVE.load(Relaxed);
    warm(&registry, 10, 20_010);
    let grown = grown(before);
    assert!(registry.services() == vec!["users".to_owned()]);
    assert!(
        grown < 64 * 1024,
        "{grown} bytes still held after 20 000 services came and went (none is left)"
    );
}
