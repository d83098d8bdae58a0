//! The breaker from a downstream crate: floor (a bare `service_fn`), seawall and failsafe,
//! closed and open, in one criterion group each; allocations per call first.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use criterion::Criterion;
use seawall_downstream_bench::{CASES, runtime, with_case};

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
