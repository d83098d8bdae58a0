//! `count <case> <iterations>`: runs one case and prints the CPU time per call, read from
//! `/proc/thread-self/schedstat` (nanoseconds on a CPU, so time the thread spent preempted
//! by other processes does not count: steadier than wall time on a shared machine). Under
//! `valgrind --tool=callgrind`, run it twice with different iteration counts: the
//! difference over the extra iterations is one call's instructions, setup excluded.
//!
//! Then, in a separate run of the same service, it counts allocations per call, and fails
//! if a seawall case allocates at all: every path measured here (closed, and both kinds of
//! rejection, in both error modes) is allocation-free.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Counts allocations (and reallocations) while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNTING.load(Relaxed) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Calls in the allocation-counting run.
const COUNTED_CALLS: u64 = 10_000;

/// Nanoseconds this thread has run on a CPU (Linux), if readable.
fn cpu_nanos() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().expect("usage: count <case> <iterations>");
    let iters: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .expect("iterations");
    let rt = seawall_downstream_bench::runtime();
    let (wall, cpu, allocations) = seawall_downstream_bench::with_case(&rt, &case, |drive| {
        drive(iters.min(100_000)); // warm up
        let before = cpu_nanos();
        let wall: Duration = drive(iters);
        let cpu = before.zip(cpu_nanos()).map(|(b, a)| a - b);
        COUNTING.store(true, Relaxed);
        drive(COUNTED_CALLS);
        COUNTING.store(false, Relaxed);
        (wall, cpu, ALLOCATIONS.load(Relaxed))
    });
    let per_call = |nanos: u128| nanos as f64 / iters as f64;
    let allocs = allocations as f64 / COUNTED_CALLS as f64;
    match cpu {
        Some(cpu) => println!(
            "{case}: {:.1} ns CPU, {:.1} ns wall, {allocs} allocations per call",
            per_call(u128::from(cpu)),
            per_call(wall.as_nanos())
        ),
        None => println!(
            "{case}: {:.1} ns wall, {allocs} allocations per call",
            per_call(wall.as_nanos())
        ),
    }
    if case.starts_with("seawall") && allocations > 0 {
        eprintln!("{case}: {allocations} allocations in {COUNTED_CALLS} calls; expected none");
        std::process::exit(1);
    }
}
