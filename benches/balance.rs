//! Picking an endpoint: seawall's balancers against tower 0.5's p2c balancer, at 10 and
//! 1,000 endpoints, and the cost of applying a discovery update of 1,000 instances.
//!
//! Every endpoint is the same trivial service (always ready, answers at once), so what is
//! timed is the balancer: discovery polling, the pick, readiness, the call's bookkeeping.
//! Method (as `benches/breaker.rs`): every balancer is built once; `iter_custom` times, with
//! `std::time::Instant`, one loop of `svc.ready().await` + `svc.call(x).await` (result
//! black-boxed) inside one `block_on` of a current-thread tokio runtime. Peers share the
//! group of their endpoint count, so ratios come from one run.
//!
//! * tower `p2c` (outstanding): `tower::balance::p2c::Balance` over
//!   `PendingRequestsDiscover(ServiceList)`.
//! * tower `p2c` (peak-EWMA): over `PeakEwmaDiscover(ServiceList)`, 30 ms default RTT, 10 s
//!   decay (seawall's `Strategy::peak_ewma()` uses the same).
//! * seawall `Balance` over `ServiceDiscover(InstanceWatch::fixed)`: least requests,
//!   peak-EWMA on the default clock (`TokioClock`, on the TSC here) and on `QuantaClock`,
//!   round robin; `HashBalance` (Maglev).
//!
//! `balance/two_threads/10`: two threads, each on its own current-thread runtime, call
//! one balancer at once (10 endpoints, least requests, outlier detection and an endpoint
//! breaker, as the gateway configures a route); the time is the slower thread's loop,
//! divided by the calls per thread. Shared through tower's `Buffer` (its worker on a
//! third thread), through one `SharedBalance` (locked by every call of both threads), as
//! two `Balance::replica`s (each thread its own, sharing the endpoints' figures, ejection
//! and breakers), and as two independent balancers (the floor: nothing shared).
//!
//! `cargo bench --bench balance --features quanta -- --warm-up-time 1 --measurement-time 3`
//!
//! Allocations per call are counted first (counting global allocator) and printed as a
//! table; that allocator needs `unsafe impl GlobalAlloc`.
#![allow(unsafe_code)]

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use tokio::runtime::Runtime;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::{Service, ServiceExt};

use seawall::balance::{Balance, OutlierDetection, SharedBalance, Strategy, hash_key};
use seawall::circuit_breaker::CircuitBreakerConfig;
use seawall::discovery::{Instance, InstanceId, InstanceWatch, Publisher, ServiceDiscover};
use seawall::rate_limit::QuantaClock;

mod stopwatch {
    #![allow(clippy::disallowed_types)]

    pub(crate) fn now() -> std::time::Instant {
        std::time::Instant::now()
    }
}

/// The endpoint: always ready, answers with its number.
#[derive(Clone, Copy, Debug)]
struct Echo(u64);

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, x: u64) -> Self::Future {
        ready(Ok(self.0 ^ x))
    }
}

fn instances(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| {
            Instance::new(
                InstanceId::new("bench-node", format!("echo-{i}")),
                "echo",
                "127.0.0.1",
                1000 + i as u16,
            )
        })
        .collect()
}

fn make(i: &Instance) -> Echo {
    Echo(u64::from(i.port))
}

async fn drive<S>(svc: &mut S, iters: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: Debug,
{
    for i in 0..iters {
        let r = svc.ready().await.unwrap().call(i).await;
        black_box(r.unwrap());
    }
}

/// Something that runs each balancer: criterion timing or allocation counting.
trait Visitor {
    fn visit<S>(&mut self, rt: &Runtime, name: &str, svc: &mut S)
    where
        S: Service<u64, Response = u64>,
        S::Error: Debug;
}

struct Bench<'a, 'b>(&'a mut BenchmarkGroup<'b, WallTime>);

impl Visitor for Bench<'_, '_> {
    fn visit<S>(&mut self, rt: &Runtime, name: &str, svc: &mut S)
    where
        S: Service<u64, Response = u64>,
        S::Error: Debug,
    {
        self.0.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = stopwatch::now();
                    drive(&mut *svc, iters).await;
                    start.elapsed()
                })
            })
        });
    }
}

fn balancers(n: usize, v: &mut impl Visitor) {
    let rt = runtime();
    let _guard = rt.enter();
    let services = || (0..n as u64).map(Echo).collect::<Vec<_>>();

    let mut tower_p2c = tower::balance::p2c::Balance::new(PendingRequestsDiscover::new(
        ServiceList::new(services()),
        CompleteOnResponse::default(),
    ));
    v.visit(&rt, "tower p2c outstanding", &mut tower_p2c);

    let mut tower_ewma = tower::balance::p2c::Balance::new(PeakEwmaDiscover::new(
        ServiceList::new(services()),
        Duration::from_millis(30),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    ));
    v.visit(&rt, "tower p2c peak-EWMA", &mut tower_ewma);

    let discover = || ServiceDiscover::new(InstanceWatch::fixed(instances(n)), make);

    let mut least = Balance::builder().build(discover());
    v.visit(&rt, "seawall p2c least-requests", &mut least);

    let mut ewma = Balance::builder()
        .strategy(Strategy::peak_ewma())
        .build(discover());
    v.visit(&rt, "seawall p2c peak-EWMA", &mut ewma);

    let mut ewma_quanta = Balance::builder()
        .strategy(Strategy::peak_ewma())
        .clock(QuantaClock::new())
        .build(discover());
    v.visit(&rt, "seawall p2c peak-EWMA QuantaClock", &mut ewma_quanta);

    let mut rr = Balance::builder()
        .strategy(Strategy::RoundRobin)
        .build(discover());
    v.visit(&rt, "seawall round-robin", &mut rr);

    let mut hashed = Balance::builder().build_hashed(discover(), |x: &u64| Some(hash_key(x)));
    v.visit(&rt, "seawall Maglev hash", &mut hashed);
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ------------------------------------------------------------------ discovery updates

/// Applying a discovery update: a snapshot of 1,000 instances replaces another 1,000 (all
/// removed, all inserted: the worst case), then one request goes through. Alternates
/// between two snapshots.
fn discovery_update(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let a = instances(1000);
    let b: Vec<Instance> = (0..1000)
        .map(|i| {
            Instance::new(
                InstanceId::new("bench-node-b", format!("echo-{i}")),
                "echo",
                "127.0.0.2",
                3000 + i as u16,
            )
        })
        .collect();
    let publisher = Publisher::live(a.clone());
    let mut group = c.benchmark_group("balance/discovery_update");
    group.sample_size(20);
    for (name, strategy, hashed) in [
        (
            "seawall p2c: replace 1000 with 1000",
            Strategy::LeastRequests,
            false,
        ),
        (
            "seawall round-robin: replace 1000 with 1000",
            Strategy::RoundRobin,
            false,
        ),
        (
            "seawall Maglev hash: replace 1000 with 1000",
            Strategy::LeastRequests,
            true,
        ),
    ] {
        let d = ServiceDiscover::new(publisher.subscribe(), make);
        let builder = Balance::builder().strategy(strategy);
        let mut flip = false;
        if hashed {
            let mut svc = builder.build_hashed(d, |x: &u64| Some(hash_key(x)));
            group.bench_function(name, |bch| {
                bch.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            flip = !flip;
                            let next = if flip { b.clone() } else { a.clone() };
                            let start = stopwatch::now();
                            publisher.publish(next);
                            drive(&mut svc, 1).await;
                            total += start.elapsed();
                        }
                        total
                    })
                })
            });
        } else {
            let mut svc = builder.build(d);
            group.bench_function(name, |bch| {
                bch.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            flip = !flip;
                            let next = if flip { b.clone() } else { a.clone() };
                            let start = stopwatch::now();
                            publisher.publish(next);
                            drive(&mut svc, 1).await;
                            total += start.elapsed();
                        }
                        total
                    })
                })
            });
        }
    }
    group.finish();
}

// ------------------------------------------------------------------------ two threads

/// Runs `run(handle, iters)` on two threads at once, each in a current-thread runtime of
/// its own, started together; returns the slower thread's time.
fn on_two_threads<T, F, Fut>(iters: u64, handles: [T; 2], run: F) -> Duration
where
    T: Send,
    F: Fn(T, u64) -> Fut + Sync,
    Fut: std::future::Future<Output = ()>,
{
    let start_together = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let threads: Vec<_> = handles
            .into_iter()
            .map(|handle| {
                let (start_together, run) = (&start_together, &run);
                s.spawn(move || {
                    runtime().block_on(async move {
                        start_together.wait();
                        let start = stopwatch::now();
                        run(handle, iters).await;
                        start.elapsed()
                    })
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

async fn drive_shared<S>(shared: SharedBalance<S>, iters: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: Into<seawall::BoxError>,
{
    for i in 0..iters {
        black_box(shared.call(i, None).await.unwrap());
    }
}

fn two_threads(c: &mut Criterion) {
    const N: usize = 10;
    let discover = || ServiceDiscover::new(InstanceWatch::fixed(instances(N)), make);
    let builder = || {
        Balance::builder()
            .outlier_detection(
                OutlierDetection::builder()
                    .consecutive_failures(5)
                    .build()
                    .expect("outlier detection"),
            )
            .endpoint_breaker(CircuitBreakerConfig::default())
    };
    let mut group = c.benchmark_group(format!("balance/two_threads/{N}"));

    let services = (0..N as u64).map(Echo).collect::<Vec<_>>();
    let p2c = tower::balance::p2c::Balance::new(PendingRequestsDiscover::new(
        ServiceList::new(services),
        CompleteOnResponse::default(),
    ));
    let (buffer, worker) = tower::buffer::Buffer::pair(p2c, 1024);
    let worker = std::thread::spawn(move || runtime().block_on(worker));
    group.bench_function("tower Buffer(p2c outstanding)", |b| {
        b.iter_custom(|iters| {
            on_two_threads(
                iters,
                [buffer.clone(), buffer.clone()],
                |mut svc, iters| async move {
                    drive(&mut svc, iters).await;
                },
            )
        })
    });
    drop(buffer);
    worker.join().expect("buffer worker");

    let shared = SharedBalance::new(builder().build(discover()));
    group.bench_function("seawall one SharedBalance", |b| {
        b.iter_custom(|iters| on_two_threads(iters, [shared.clone(), shared.clone()], drive_shared))
    });

    let first = builder().build(discover());
    let second = first.replica(discover());
    let replicas = [SharedBalance::new(first), SharedBalance::new(second)];
    group.bench_function("seawall Balance::replica per thread", |b| {
        b.iter_custom(|iters| on_two_threads(iters, replicas.clone(), drive_shared))
    });

    let independent = [
        SharedBalance::new(builder().build(discover())),
        SharedBalance::new(builder().build(discover())),
    ];
    group.bench_function("seawall independent per thread (nothing shared)", |b| {
        b.iter_custom(|iters| on_two_threads(iters, independent.clone(), drive_shared))
    });
    group.finish();
}

// ------------------------------------------------------------------- allocation counting

#[path = "support/counting_alloc.rs"]
mod allocs;

#[global_allocator]
static GLOBAL: allocs::Counting = allocs::Counting;

const ALLOC_WARM_UP: u64 = 1_000;
const ALLOC_CALLS: u64 = 10_000;

struct AllocTable {
    group: String,
}

impl Visitor for AllocTable {
    fn visit<S>(&mut self, rt: &Runtime, name: &str, svc: &mut S)
    where
        S: Service<u64, Response = u64>,
        S::Error: Debug,
    {
        rt.block_on(drive(&mut *svc, ALLOC_WARM_UP));
        let before = allocs::ALLOCATIONS.load(Relaxed);
        allocs::COUNTING.store(true, Relaxed);
        rt.block_on(drive(&mut *svc, ALLOC_CALLS));
        allocs::COUNTING.store(false, Relaxed);
        let per_call = (allocs::ALLOCATIONS.load(Relaxed) - before) as f64 / ALLOC_CALLS as f64;
        println!(
            "allocs/call  {:<56} {per_call:.2}",
            format!("{}: {name}", self.group)
        );
    }
}

fn main() {
    println!("allocations per call ({ALLOC_CALLS} calls after {ALLOC_WARM_UP} warm-up calls)");
    for n in [10, 1000] {
        balancers(
            n,
            &mut AllocTable {
                group: format!("{n} endpoints"),
            },
        );
    }
    println!();
    let mut c = Criterion::default().configure_from_args();
    for n in [10, 1000] {
        let mut group = c.benchmark_group(format!("balance/pick/{n}"));
        balancers(n, &mut Bench(&mut group));
        group.finish();
    }
    discovery_update(&mut c);
    two_threads(&mut c);
    c.final_summary();
}
