//! `count <case> <iterations>`: runs one case, for instruction counts under callgrind
//! (run twice with different iteration counts; the difference over the extra iterations is
//! the cost of one call, setup excluded).

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().expect("usage: count <case> <iterations>");
    let iters: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .expect("iterations");
    let rt = seawall_downstream_bench::runtime();
    let took = seawall_downstream_bench::with_case(&rt, &case, |drive| drive(iters));
    eprintln!("{case}: {iters} calls in {took:?}");
}
