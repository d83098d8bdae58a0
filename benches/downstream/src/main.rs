//! `count <case> <iterations>`: runs one case and prints the CPU time per call, read from
//! `/proc/thread-self/schedstat` (nanoseconds on a CPU, so time the thread spent preempted
//! by other processes does not count: steadier than wall time on a shared machine). Under
//! `valgrind --tool=callgrind`, run it twice with different iteration counts: the
//! difference over the extra iterations is one call's instructions, setup excluded.
//!
//! Then, in a separate run of the same service, it counts allocations per call, and fails
//! if a seawall case allocates at all: every path measured here (closed, and both kinds of
//! rejection, in both error modes) is allocation-free.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

// The counting allocator the crate's own benches use.
#[path = "../../support/counting_alloc.rs"]
mod allocs;

use allocs::{ALLOCATIONS, COUNTING};

#[global_allocator]
static ALLOCATOR: allocs::Counting = allocs::Counting;

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
