//! Circuit breaker overhead: seawall against a bare `service_fn` and the peers
//! tower-resilience 0.13 and failsafe 1.3, on the closed (success) path and the open
//! (rejection) path.
//!
//! Method (keep it: the ratios quoted in the issue come from it): every service is built
//! once, outside the measurement; `iter_custom` times, with `std::time::Instant`, one loop of
//! `svc.ready().await.unwrap()` + `svc.call(x).await` (result black-boxed) inside one
//! `block_on` of a current-thread tokio runtime. Peers sit in the same criterion group so
//! their ratios come from one run.
//!
//! `cargo bench --bench breaker -- --warm-up-time 1 --measurement-time 2`
//!
//! Before the groups, allocations per call are counted with a counting global allocator and
//! printed as a table. That allocator needs `unsafe impl GlobalAlloc`, so this file needs
//! `unsafe_code` at `deny` (not `forbid`) in `[lints.rust]`.
#![allow(unsafe_code)]

use std::fmt::Debug;
use std::hint::black_box;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};

use seawall::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, SlidingWindow, State,
};
// tower-resilience (feature "circuitbreaker") re-exports its sub-crate as `circuitbreaker`.
use tower_resilience::circuitbreaker as tr;
// failsafe: only the futures trait. The sync `failsafe::CircuitBreaker` trait also has a
// `call` method; with both in scope `cb.call(..)` is ambiguous.
use failsafe::futures::CircuitBreaker as _;
use failsafe::{FailurePolicy, StateMachine, backoff, failure_policy};

// ------------------------------------------------------------------------ inner services

/// The inner service of every closed-path entry and of the baseline.
fn bare()
-> impl Service<u64, Response = u64, Error = io::Error, Future: Send> + Clone + Send + 'static {
    service_fn(|x: u64| async move { Ok::<u64, io::Error>(x) })
}

/// Times the inner service of an open-path entry actually ran (its future was polled):
/// anything above the setup calls means a call got through an "open" breaker.
static INNER_RAN: AtomicU64 = AtomicU64::new(0);

/// Identity service that fails while `fail` is set; used to trip breakers. The failure is
/// `ErrorKind::Other` (no allocation). It stays failing during the measurement, so a
/// half-open probe (should a wait ever elapse) fails and re-opens the breaker.
fn failable(fail: Arc<AtomicBool>) -> impl Service<u64, Response = u64, Error = io::Error> {
    service_fn(move |x: u64| {
        let fail = fail.load(Relaxed);
        async move {
            INNER_RAN.fetch_add(1, Relaxed);
            if fail {
                Err(io::Error::from(io::ErrorKind::Other))
            } else {
                Ok(x)
            }
        }
    })
}

// ------------------------------------------------------------------ failsafe tower wrapper

/// A tower `Service` around a failsafe breaker (failsafe has no tower layer). No boxing:
/// the future is failsafe's nameable `ResponseFuture`. `StateMachine` is an `Arc` inside.
#[derive(Clone)]
struct FailsafeService<S, P> {
    inner: S,
    cb: StateMachine<P, ()>,
}

#[derive(Clone)]
struct FailsafeLayer<P> {
    cb: StateMachine<P, ()>,
}

impl<S, P> Layer<S> for FailsafeLayer<P> {
    type Service = FailsafeService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        FailsafeService {
            inner,
            cb: self.cb.clone(),
        }
    }
}

impl<S, P, Req> Service<Req> for FailsafeService<S, P>
where
    S: Service<Req>,
    P: FailurePolicy + Send + Sync,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<S::Future, P, (), failsafe::Any>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // failsafe decides on the first poll of its ResponseFuture, not here.
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // NB: the inner `call` runs even when the breaker is open (its future is dropped
        // unpolled): that is how failsafe's future API works.
        self.cb.call(self.inner.call(req))
    }
}

/// (a) the simplest failsafe policy. The backoff is long so a tripped breaker stays open
/// for the whole run (the per-call cost does not depend on it).
fn failsafe_consecutive() -> StateMachine<impl FailurePolicy + Send + Sync + 'static, ()> {
    failsafe::Config::new()
        .failure_policy(failure_policy::consecutive_failures(
            3,
            backoff::constant(Duration::from_secs(3600)),
        ))
        .build()
}

/// (b) failsafe's default: success rate over a time window, or else 5 consecutive
/// failures; equal-jittered exponential backoff from 10 s.
fn failsafe_default() -> StateMachine<impl FailurePolicy + Send + Sync + 'static, ()> {
    failsafe::Config::new().build()
}

// ------------------------------------------------------------------------------ seawall

fn seawall_config() -> seawall::circuit_breaker::CircuitBreakerConfigBuilder {
    CircuitBreakerConfig::builder()
        .sliding_window(SlidingWindow::count_based(100))
        .minimum_calls(100)
}

fn seawall_layer(
    builder: seawall::circuit_breaker::CircuitBreakerConfigBuilder,
) -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(builder.build().expect("valid seawall config"))
}

// ------------------------------------------------------------------------------ driving

/// The timed loop.
#[allow(clippy::unwrap_used)] // `ready().await.unwrap()` is the method the figures use
async fn drive<S>(svc: &mut S, iters: u64) -> Duration
where
    S: Service<u64>,
    S::Error: Debug,
{
    // clippy.toml bans std's Instant in favour of tokio's (so paused time in tests covers
    // every clock read); a benchmark wants the plain monotonic clock, without the runtime
    // lookup tokio's Instant does when its test-util feature is on.
    #[allow(clippy::disallowed_types)]
    let start = std::time::Instant::now();
    for i in 0..iters {
        let result = svc.ready().await.unwrap().call(black_box(i)).await;
        let _ = black_box(result);
    }
    start.elapsed()
}

/// One untimed call, outside the measurement: the result must be what the entry claims.
fn check<S>(rt: &Runtime, name: &str, svc: &mut S, expect: Expect<'_, S::Error>)
where
    S: Service<u64, Response = u64>,
    S::Error: Debug,
{
    let result = rt.block_on(async {
        let svc = svc.ready().await.expect("service ready");
        svc.call(7).await
    });
    match (expect, result) {
        (Expect::Success, Ok(7)) => {}
        (Expect::Rejection(is_rejection), Err(e)) if is_rejection(&e) => {}
        (Expect::Success, other) => panic!("{name}: closed path must succeed, got {other:?}"),
        (Expect::Rejection(_), other) => {
            panic!("{name}: open path must reject without calling, got {other:?}")
        }
    }
}

enum Expect<'a, E> {
    Success,
    Rejection(&'a dyn Fn(&E) -> bool),
}

/// What to do with each built service: time it with criterion, or count its allocations.
trait Visitor {
    fn visit<S>(&mut self, rt: &Runtime, name: &str, svc: &mut S)
    where
        S: Service<u64, Response = u64>,
        S::Error: Debug;
}

struct Bench<'g, 'c>(&'g mut BenchmarkGroup<'c, WallTime>);

impl Visitor for Bench<'_, '_> {
    fn visit<S>(&mut self, rt: &Runtime, name: &str, svc: &mut S)
    where
        S: Service<u64, Response = u64>,
        S::Error: Debug,
    {
        let before = INNER_RAN.load(Relaxed);
        self.0.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(drive(&mut *svc, iters)));
        });
        let leaked = INNER_RAN.load(Relaxed) - before;
        if leaked > 0 {
            println!("note: {name}: {leaked} calls reached the failing inner service while timed");
        }
    }
}

// ------------------------------------------------------------------------------ groups

/// Builds each closed-path service in turn, checks that it succeeds, hands it to `v`.
fn closed_success(v: &mut impl Visitor) {
    let rt = runtime();

    let mut svc = bare();
    check(&rt, "bare", &mut svc, Expect::Success);
    v.visit(&rt, "bare service_fn", &mut svc);

    let mut svc = seawall_layer(seawall_config()).layer(bare());
    check(&rt, "seawall count", &mut svc, Expect::Success);
    v.visit(&rt, "seawall count-based(100)", &mut svc);

    let time_based =
        seawall_config().sliding_window(SlidingWindow::time_based(Duration::from_secs(10), 10));
    let mut svc = seawall_layer(time_based).layer(bare());
    check(&rt, "seawall time", &mut svc, Expect::Success);
    v.visit(&rt, "seawall time-based(10s,10)", &mut svc);

    let mut svc = seawall_layer(seawall_config()).typed_errors().layer(bare());
    check(&rt, "seawall typed", &mut svc, Expect::Success);
    v.visit(&rt, "seawall count-based(100) typed errors", &mut svc);

    let slow = seawall_config().slow_call_duration(Duration::from_secs(1));
    let mut svc = seawall_layer(slow).layer(bare());
    check(&rt, "seawall slow-call", &mut svc, Expect::Success);
    v.visit(&rt, "seawall count-based(100)+slow_call", &mut svc);

    let (layer, _handle) = tr::CircuitBreakerLayer::builder()
        .build_with_handle()
        .expect("valid tower-resilience config");
    let mut svc = layer.layer(bare());
    check(&rt, "tower-resilience", &mut svc, Expect::Success);
    v.visit(&rt, "tower-resilience default", &mut svc);

    let mut svc = FailsafeLayer {
        cb: failsafe_consecutive(),
    }
    .layer(bare());
    check(&rt, "failsafe (a)", &mut svc, Expect::Success);
    v.visit(&rt, "failsafe consecutive_failures", &mut svc);

    let mut svc = FailsafeLayer {
        cb: failsafe_default(),
    }
    .layer(bare());
    check(&rt, "failsafe (b)", &mut svc, Expect::Success);
    v.visit(&rt, "failsafe default", &mut svc);
}

/// Sends failing calls until `is_open`; panics if it takes more than `max`.
fn trip<S>(rt: &Runtime, name: &str, svc: &mut S, max: u64, is_open: impl Fn() -> bool)
where
    S: Service<u64>,
    S::Error: Debug,
{
    rt.block_on(async {
        for sent in 0..max {
            if is_open() {
                return;
            }
            let svc = svc.ready().await.expect("service ready");
            let result = svc.call(sent).await;
            assert!(result.is_err(), "{name}: a tripping call succeeded");
        }
        assert!(is_open(), "{name}: still closed after {max} failures");
    });
}

/// Builds each open-path service in turn, checks that it rejects, hands it to `v`.
fn open_rejection(v: &mut impl Visitor) {
    let rt = runtime();
    let seawall_rejects = |e: &seawall::BoxError| e.downcast_ref::<CircuitOpen>().is_some();
    let tr_rejects = |e: &tr::CircuitBreakerError<io::Error>| e.is_circuit_open();
    let failsafe_rejects = |e: &failsafe::Error<io::Error>| matches!(e, failsafe::Error::Rejected);

    let mut svc = bare();
    check(&rt, "bare", &mut svc, Expect::Success);
    v.visit(&rt, "bare service_fn (success)", &mut svc);

    let layer = seawall_layer(seawall_config());
    layer.breaker().force_open();
    assert_eq!(layer.breaker().state(), State::ForcedOpen);
    let mut svc = layer.layer(bare());
    check(
        &rt,
        "seawall forced",
        &mut svc,
        Expect::Rejection(&seawall_rejects),
    );
    v.visit(&rt, "seawall forced open", &mut svc);

    let layer = seawall_layer(seawall_config()).typed_errors();
    layer.breaker().force_open();
    let mut svc = layer.layer(bare());
    let typed_rejects = |e: &seawall::circuit_breaker::Error<io::Error>| e.is_open();
    check(
        &rt,
        "seawall forced typed",
        &mut svc,
        Expect::Rejection(&typed_rejects),
    );
    v.visit(&rt, "seawall forced open typed errors", &mut svc);

    // Tripped on the measuring runtime, so the half-open timer task is armed on it.
    let fail = Arc::new(AtomicBool::new(true));
    let tripped = seawall_config()
        .sliding_window(SlidingWindow::count_based(10))
        .minimum_calls(10)
        .wait_in_open(Duration::from_secs(3600));
    let layer = seawall_layer(tripped);
    let breaker = layer.breaker().clone();
    let mut svc = layer.layer(failable(fail.clone()));
    trip(&rt, "seawall", &mut svc, 10, || {
        breaker.state() == State::Open
    });
    check(
        &rt,
        "seawall tripped",
        &mut svc,
        Expect::Rejection(&seawall_rejects),
    );
    v.visit(&rt, "seawall tripped open", &mut svc);

    let tripped = seawall_config()
        .sliding_window(SlidingWindow::count_based(10))
        .minimum_calls(10)
        .wait_in_open(Duration::from_secs(3600));
    let layer = seawall_layer(tripped).typed_errors();
    let breaker = layer.breaker().clone();
    let mut svc = layer.layer(failable(fail.clone()));
    trip(&rt, "seawall typed", &mut svc, 10, || {
        breaker.state() == State::Open
    });
    check(
        &rt,
        "seawall tripped typed",
        &mut svc,
        Expect::Rejection(&typed_rejects),
    );
    v.visit(&rt, "seawall tripped open typed errors", &mut svc);

    let (layer, handle) = tr::CircuitBreakerLayer::builder()
        .build_with_handle()
        .expect("valid tower-resilience config");
    rt.block_on(handle.force_open());
    assert_eq!(handle.state(), tr::CircuitState::Open);
    let mut svc = layer.layer(bare());
    check(
        &rt,
        "tower-resilience forced",
        &mut svc,
        Expect::Rejection(&tr_rejects),
    );
    v.visit(&rt, "tower-resilience forced open", &mut svc);

    let cb = failsafe_consecutive();
    let mut svc = FailsafeLayer { cb: cb.clone() }.layer(failable(fail.clone()));
    trip(&rt, "failsafe (a)", &mut svc, 100, || {
        !cb.is_call_permitted()
    });
    check(
        &rt,
        "failsafe (a) tripped",
        &mut svc,
        Expect::Rejection(&failsafe_rejects),
    );
    v.visit(&rt, "failsafe consecutive_failures tripped", &mut svc);

    let cb = failsafe_default();
    let mut svc = FailsafeLayer { cb: cb.clone() }.layer(failable(fail.clone()));
    trip(&rt, "failsafe (b)", &mut svc, 100, || {
        !cb.is_call_permitted()
    });
    check(
        &rt,
        "failsafe (b) tripped",
        &mut svc,
        Expect::Rejection(&failsafe_rejects),
    );
    v.visit(&rt, "failsafe default tripped", &mut svc);
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ------------------------------------------------------------------- allocation counting

#[path = "support/counting_alloc.rs"]
mod allocs;

#[global_allocator]
static GLOBAL: allocs::Counting = allocs::Counting;

const ALLOC_WARM_UP: u64 = 1_000;
const ALLOC_CALLS: u64 = 10_000;

/// Counts allocations per call over `ALLOC_CALLS` calls after a warm-up.
struct AllocTable {
    group: &'static str,
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

fn alloc_table() {
    println!("allocations per call ({ALLOC_CALLS} calls after {ALLOC_WARM_UP} warm-up calls)");
    closed_success(&mut AllocTable {
        group: "closed_success",
    });
    open_rejection(&mut AllocTable {
        group: "open_rejection",
    });
    println!();
}

fn main() {
    alloc_table();
    let mut c = Criterion::default().configure_from_args();

    let mut group = c.benchmark_group("breaker/closed_success");
    closed_success(&mut Bench(&mut group));
    group.finish();

    let mut group = c.benchmark_group("breaker/open_rejection");
    open_rejection(&mut Bench(&mut group));
    group.finish();

    c.final_summary();
}
