//! The breaker and the rate limiters from a downstream crate: floor (a bare `service_fn`),
//! seawall and failsafe, closed and open; seawall's limiters against governor's and
//! tower's `RateLimit`; every case in one criterion group, allocations per call first.
#![allow(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;

use criterion::Criterion;
use seawall_downstream_bench::{CASES, runtime, with_case};

// The counting allocator the crate's own benches use.
#[path = "../../support/counting_alloc.rs"]
mod allocs;

use allocs::{ALLOCATIONS, COUNTING};

#[global_allocator]
static GLOBAL: allocs::Counting = allocs::Counting;

fn main() {
    let rt = runtime();
    const CALLS: u64 = 10_000;
    for case in CASES {
        let per_call = with_case(&rt, case, |drive| {
            drive(1_000);
            let before = ALLOCATIONS.load(Relaxed);
            COUNTING.store(true, Relaxed);
            drive(CALLS);
            COUNTING.store(false, Relaxed);
            (ALLOCATIONS.load(Relaxed) - before) as f64 / CALLS as f64
        });
        println!("allocs/call  {case:<28} {per_call:.2}");
    }
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("downstream/breaker");
    for case in CASES {
        with_case(&rt, case, |drive| {
            group.bench_function(*case, |b| b.iter_custom(|iters| drive(iters)));
        });
    }
    group.finish();
    c.final_summary();
}
