//! Rate limiter overhead on the admitted path: seawall against governor 0.10 (direct
//! limiter), tower 0.5's `RateLimit` and tower-resilience 0.13's rate limiter.
//!
//! Every limiter gets a quota so large that nothing is refused while measuring: 10⁹ tokens
//! a second (one per nanosecond, the finest rate seawall and governor can express) with a
//! burst of 10⁹. Each peer accepts that figure as is. Every limiter is checked to admit
//! before it is timed, and again after each timed batch (both untimed).
//!
//! Groups (peers share a group so their ratios come from one run):
//!
//! * `rate_limit/check`: one direct check, no tower, outside any runtime. seawall
//!   `RateLimiter::try_acquire(1)` on its default `TokioClock` (which, outside a runtime,
//!   reads the TSC after looking for a runtime context to decide in), on `QuantaClock` and
//!   on a `ManualClock` (the check without the clock read); governor's
//!   `RateLimiter::direct` on its default clock (quanta, TSC-based), on `MonotonicClock`
//!   (`std::time::Instant`, the OS clock) and on `FakeRelativeClock` (no clock read). The manual/fake clocks never move by
//!   themselves, so before each timed batch (untimed) they are advanced by as much time as
//!   the batch consumes, which keeps the bucket full.
//! * `rate_limit/layer`: through tower, with the method of `benches/breaker.rs`: every
//!   service is built once; `iter_custom` times, with `std::time::Instant`, one loop of
//!   `svc.ready().await.unwrap()` + `svc.call(x).await` (result black-boxed) inside one
//!   `block_on` of a current-thread tokio runtime.
//!   `rate_limit/layer` also times `KeyedRateLimitLayer` over 1 024 keys (the request's
//!   number modulo 1 024).
//! * `rate_limit/http` (with the `http` feature, on with `gateway`): the same loop through
//!   `HttpRateLimitLayer` over a bare `http` service, global and per key over 1 024 keys,
//!   each with headers built on every admitted response and hidden. With the `axum` feature,
//!   the same against tower_governor 0.8 (`GovernorLayer`, the peer a tower user picks for
//!   HTTP 429s), over a bare service answering axum's `Body` (the only bodies its refusals
//!   can be made of without tonic): global (`GlobalKeyExtractor`, its default of no
//!   fields on admitted responses, and with `use_headers`, its `x-ratelimit-*` fields on
//!   each) and per key over the same 1 024 keys (a `KeyExtractor` on the same counter;
//!   seawall with its headers and hidden).
//! * `rate_limit/default_clock`: every limiter on its default clock, as a downstream crate
//!   uses it, all timed inside one `block_on` of a current-thread runtime (as the layer
//!   entries): seawall's direct check (`RateLimiter::new`) against governor's
//!   (`RateLimiter::direct`), seawall's keyed check over 1 024 keys (`KeyedRateLimiter::new`,
//!   the loop counter modulo 1 024) against governor's keyed limiter, and seawall's
//!   `RateLimitLayer::new` and `KeyedRateLimitLayer::new` (1 024 keys) against tower's
//!   `RateLimit`. Each limiter or service is built once, before its runtime's first
//!   `block_on`; checks are black-boxed and each must admit (checked untimed after each
//!   batch).
//! * `rate_limit/two_threads`: one limiter shared by N std threads (1 or 2), each running
//!   `iters` checks after a barrier. The time returned to criterion is the wall time from the
//!   first thread's start to the last thread's end divided by N, so the per-iteration figure
//!   criterion reports is wall time per check across all threads, i.e. 1 / (total checks
//!   per second), and the group's throughput line reads directly as total checks per
//!   second. 1-thread and 2-thread entries of the same limiter are therefore directly
//!   comparable: a 2-thread time below the 1-thread time means the pair got more checks
//!   done per second than one thread alone.
//!
//! `cargo bench --bench rate_limit -- --warm-up-time 1 --measurement-time 3`
//!
//! Before the groups, allocations per call are counted with a counting global allocator and
//! printed as a table. That allocator needs `unsafe impl GlobalAlloc`, so this file needs
//! `unsafe_code` at `deny` (not `forbid`) in `[lints.rust]`.
#![allow(unsafe_code)]

use std::fmt::Debug;
use std::hint::black_box;
use std::io;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};

use seawall::rate_limit::{
    KeyedRateLimitLayer, KeyedRateLimiter, ManualClock, QuantaClock, Quota, Rate, RateLimitLayer,
    RateLimited, RateLimiter, ShardedRateLimiter, TokioClock,
};
// tower-resilience (feature "ratelimiter") re-exports its sub-crate as `ratelimiter`.
use tower_resilience::ratelimiter as tr;

// ------------------------------------------------------------------------------- quota

/// Tokens per second for every limiter: one per nanosecond.
const RATE: u32 = 1_000_000_000;
/// Burst for every limiter that has one.
const BURST: u32 = 1_000_000_000;
/// Time to replenish one token at `RATE`.
const INTERVAL: Duration = Duration::from_nanos(1_000_000_000 / RATE as u64);

fn seawall_quota() -> Quota {
    Quota::new(Rate::per_second(RATE), BURST).expect("valid seawall quota")
}

fn governor_quota() -> governor::Quota {
    let rate = NonZeroU32::new(RATE).expect("non-zero rate");
    let burst = NonZeroU32::new(BURST).expect("non-zero burst");
    governor::Quota::per_second(rate).allow_burst(burst)
}

// ------------------------------------------------------------------------ std clock

/// clippy.toml bans std's Instant in favour of tokio's (so paused time in tests covers
/// every clock read); a benchmark wants the plain monotonic clock, without the runtime
/// lookup tokio's Instant may do when its test-util feature is on. Callers never name the
/// type, so the allowance stays in this module.
mod stopwatch {
    #![allow(clippy::disallowed_types)]

    pub(crate) fn now() -> std::time::Instant {
        std::time::Instant::now()
    }
}

// ------------------------------------------------------------------- direct limiters

/// Moves a clock that does not move by itself; a no-op for real clocks.
trait Refill {
    fn refill(&self, by: Duration);
}

impl Refill for TokioClock {
    fn refill(&self, _: Duration) {}
}

impl Refill for ManualClock {
    fn refill(&self, by: Duration) {
        self.advance(by);
    }
}

impl Refill for QuantaClock {
    fn refill(&self, _: Duration) {}
}

impl Refill for governor::clock::QuantaClock {
    fn refill(&self, _: Duration) {}
}

impl Refill for governor::clock::MonotonicClock {
    fn refill(&self, _: Duration) {}
}

impl Refill for governor::clock::FakeRelativeClock {
    fn refill(&self, by: Duration) {
        self.advance(by);
    }
}

/// A direct (non-tower) limiter, as the `check` and `two_threads` groups use it.
trait Limiter: Sync {
    /// One check; the result is black-boxed. This is what is timed.
    fn check(&self);
    /// One untimed check: does the limiter admit?
    fn admits(&self) -> bool;
    /// Untimed, before a batch of `checks` checks: advances a manual clock by the time
    /// those checks consume, so the bucket stays full.
    fn prepare(&self, checks: u64);
}

/// Time consumed by `checks` tokens at `INTERVAL` each.
fn consumed(checks: u64) -> Duration {
    let interval = u64::try_from(INTERVAL.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(interval.saturating_mul(checks))
}

impl<C> Limiter for RateLimiter<C>
where
    C: seawall::rate_limit::Clock + Refill,
{
    #[inline]
    fn check(&self) {
        let result: Result<u32, RateLimited> = self.try_acquire(black_box(1));
        let _ = black_box(result);
    }

    fn admits(&self) -> bool {
        self.try_acquire(1).is_ok()
    }

    fn prepare(&self, checks: u64) {
        self.clock().refill(consumed(checks));
    }
}

impl<C> Limiter for ShardedRateLimiter<C>
where
    C: seawall::rate_limit::Clock + Refill,
{
    #[inline]
    fn check(&self) {
        let result: Result<u32, RateLimited> = self.try_acquire(black_box(1));
        let _ = black_box(result);
    }

    fn admits(&self) -> bool {
        self.try_acquire(1).is_ok()
    }

    fn prepare(&self, _: u64) {}
}

type Governor<C> = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    C,
    governor::middleware::NoOpMiddleware<<C as governor::clock::Clock>::Instant>,
>;

impl<C> Limiter for Governor<C>
where
    C: governor::clock::Clock + Refill + Sync,
{
    #[inline]
    fn check(&self) {
        let _ = black_box(self.check());
    }

    fn admits(&self) -> bool {
        self.check().is_ok()
    }

    fn prepare(&self, checks: u64) {
        self.clock().refill(consumed(checks));
    }
}

/// The timed loop of the `check` group.
fn time_checks<L: Limiter>(limiter: &L, iters: u64) -> Duration {
    limiter.prepare(iters);
    let start = stopwatch::now();
    for _ in 0..iters {
        limiter.check();
    }
    let elapsed = start.elapsed();
    limiter.prepare(1);
    assert!(limiter.admits(), "a limiter refused during the measurement");
    elapsed
}

/// The timed body of the `two_threads` group: `threads` threads each run `iters` checks
/// on `limiter`; returns wall time / `threads` (see the module docs).
fn time_threads<L: Limiter>(limiter: &L, threads: u32, iters: u64) -> Duration {
    limiter.prepare(iters * u64::from(threads));
    let barrier = Barrier::new(threads as usize);
    let spans: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = stopwatch::now();
                    for _ in 0..iters {
                        limiter.check();
                    }
                    (start, stopwatch::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("a thread");
    let end = spans.iter().map(|s| s.1).max().expect("a thread");
    limiter.prepare(1);
    assert!(limiter.admits(), "a limiter refused during the measurement");
    (end - start) / threads
}

/// What to do with each direct limiter: time it, or count its allocations.
trait LimiterVisitor {
    fn visit<L: Limiter>(&mut self, name: &str, limiter: &L);
}

/// Builds each direct limiter in turn, checks that it admits, hands it to `v`.
fn direct_checks(v: &mut impl LimiterVisitor) {
    // Outside any runtime, as a plain `try_acquire` caller would be: `TokioClock` decides
    // nothing there (no paused time to follow) and reads the TSC.
    let limiter = RateLimiter::new(seawall_quota());
    assert!(limiter.admits(), "seawall (TokioClock) refused in setup");
    v.visit("seawall try_acquire TokioClock", &limiter);

    let limiter = RateLimiter::with_clock(seawall_quota(), QuantaClock::new());
    assert!(limiter.admits(), "seawall (QuantaClock) refused in setup");
    v.visit("seawall try_acquire QuantaClock", &limiter);

    let limiter = RateLimiter::with_clock(seawall_quota(), ManualClock::new());
    assert!(limiter.admits(), "seawall (ManualClock) refused in setup");
    v.visit("seawall try_acquire ManualClock", &limiter);

    let limiter = governor::RateLimiter::direct(governor_quota());
    assert!(limiter.admits(), "governor refused in setup");
    v.visit("governor check default clock (quanta)", &limiter);

    let limiter =
        governor::RateLimiter::direct_with_clock(governor_quota(), governor::clock::MonotonicClock);
    assert!(
        limiter.admits(),
        "governor (MonotonicClock) refused in setup"
    );
    v.visit("governor check MonotonicClock", &limiter);

    let limiter = governor::RateLimiter::direct_with_clock(
        governor_quota(),
        governor::clock::FakeRelativeClock::default(),
    );
    assert!(
        limiter.admits(),
        "governor (FakeRelativeClock) refused in setup"
    );
    v.visit("governor check FakeRelativeClock", &limiter);
}

struct CheckBench<'g, 'c>(&'g mut BenchmarkGroup<'c, WallTime>);

impl LimiterVisitor for CheckBench<'_, '_> {
    fn visit<L: Limiter>(&mut self, name: &str, limiter: &L) {
        self.0.bench_function(name, |b| {
            b.iter_custom(|iters| time_checks(limiter, iters));
        });
    }
}

/// Builds each shared limiter, checks that it admits, times it on 1 and 2 threads.
fn two_threads(group: &mut BenchmarkGroup<'_, WallTime>) {
    fn both<L: Limiter>(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, limiter: &L) {
        assert!(limiter.admits(), "{name} refused in setup");
        for threads in [1, 2] {
            group.bench_function(format!("{name} {threads} thread(s)"), |b| {
                b.iter_custom(|iters| time_threads(limiter, threads, iters));
            });
        }
    }

    both(
        group,
        "governor default clock",
        &governor::RateLimiter::direct(governor_quota()),
    );
    both(
        group,
        "seawall TokioClock",
        &RateLimiter::new(seawall_quota()),
    );
    both(
        group,
        "seawall QuantaClock",
        &RateLimiter::with_clock(seawall_quota(), QuantaClock::new()),
    );
    both(
        group,
        "seawall sharded(2) QuantaClock",
        &ShardedRateLimiter::with_clock(seawall_quota(), 2, QuantaClock::new())
            .expect("valid sharded quota"),
    );
    both(
        group,
        "seawall ManualClock",
        &RateLimiter::with_clock(seawall_quota(), ManualClock::new()),
    );
}

// ------------------------------------------------------------------------ tower layers

/// The inner service of every layer entry and the baseline.
fn bare()
-> impl Service<u64, Response = u64, Error = io::Error, Future: Send> + Clone + Send + 'static {
    service_fn(|x: u64| async move { Ok::<u64, io::Error>(x) })
}

/// The timed loop.
#[allow(clippy::unwrap_used)] // `ready().await.unwrap()` is the method the figures use
async fn drive<S>(svc: &mut S, iters: u64) -> Duration
where
    S: Service<u64>,
    S::Error: Debug,
{
    let start = stopwatch::now();
    for i in 0..iters {
        let result = svc.ready().await.unwrap().call(black_box(i)).await;
        let _ = black_box(result);
    }
    start.elapsed()
}

/// One untimed call, outside the measurement: it must be admitted and reach the inner
/// service.
fn admits<S>(rt: &Runtime, name: &str, svc: &mut S)
where
    S: Service<u64, Response = u64>,
    S::Error: Debug,
{
    let result = rt.block_on(async {
        let svc = svc.ready().await.expect("service ready");
        svc.call(7).await
    });
    match result {
        Ok(7) => {}
        other => panic!("{name}: must admit, got {other:?}"),
    }
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
        self.0.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(drive(&mut *svc, iters));
                admits(rt, name, &mut *svc);
                elapsed
            });
        });
    }
}

/// Builds each layered service in turn, checks that it admits, hands it to `v`.
fn layers(v: &mut impl Visitor) {
    let rt = runtime();
    // tower's RateLimit creates its `Sleep` when built: it needs the runtime's timer.
    let _guard = rt.enter();

    let mut svc = bare();
    admits(&rt, "bare", &mut svc);
    v.visit(&rt, "bare service_fn", &mut svc);

    let mut svc = RateLimitLayer::new(seawall_quota()).layer(bare());
    admits(&rt, "seawall reject", &mut svc);
    v.visit(&rt, "seawall RateLimitLayer reject", &mut svc);

    let limiter = RateLimiter::with_clock(seawall_quota(), QuantaClock::new());
    let mut svc = RateLimitLayer::from_limiter(limiter).layer(bare());
    admits(&rt, "seawall reject quanta", &mut svc);
    v.visit(&rt, "seawall RateLimitLayer reject QuantaClock", &mut svc);

    let mut svc =
        KeyedRateLimitLayer::new(seawall_quota(), |x: &u64| Some(*x % 1024)).layer(bare());
    admits(&rt, "seawall keyed reject", &mut svc);
    v.visit(
        &rt,
        "seawall KeyedRateLimitLayer reject 1024 keys",
        &mut svc,
    );

    let mut svc = RateLimitLayer::new(seawall_quota())
        .wait_up_to(Duration::from_secs(1))
        .layer(bare());
    admits(&rt, "seawall wait", &mut svc);
    v.visit(&rt, "seawall RateLimitLayer wait_up_to(1s)", &mut svc);

    let mut svc =
        tower::limit::RateLimitLayer::new(u64::from(RATE), Duration::from_secs(1)).layer(bare());
    admits(&rt, "tower", &mut svc);
    v.visit(&rt, "tower RateLimitLayer", &mut svc);

    // tower-resilience's default algorithm: a fixed window of 10⁹ permits per second.
    let layer = tr::RateLimiterLayer::builder()
        .limit_for_period(RATE as usize)
        .refresh_period(Duration::from_secs(1))
        .build()
        .expect("valid tower-resilience config");
    let mut svc = layer.layer(bare());
    admits(&rt, "tower-resilience fixed", &mut svc);
    v.visit(&rt, "tower-resilience fixed window (default)", &mut svc);

    // Its token bucket (capacity = limit + burst_size = 10⁹), seawall's algorithm.
    let layer = tr::RateLimiterLayer::burst(RATE as usize, 0)
        .build()
        .expect("valid tower-resilience config");
    let mut svc = layer.layer(bare());
    admits(&rt, "tower-resilience bucket", &mut svc);
    v.visit(&rt, "tower-resilience token bucket", &mut svc);
}

/// Times an HTTP service as `rate_limit/layer` times the others (a fresh `Request<()>`
/// each call), asking after each batch (untimed) that it still answers `200`.
#[cfg(feature = "http")]
fn run_http<S, B>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, name: &str, mut svc: S)
where
    S: Service<http::Request<()>, Response = http::Response<B>>,
    S::Error: Debug,
{
    let answers = |svc: &mut S| {
        let request = http::Request::new(());
        let response = rt.block_on(async { svc.ready().await.unwrap().call(request).await });
        assert_eq!(
            response.expect("answered").status(),
            http::StatusCode::OK,
            "{name} refused"
        );
    };
    answers(&mut svc);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let elapsed = rt.block_on(async {
                let start = stopwatch::now();
                for _ in 0..iters {
                    let request = http::Request::new(());
                    let result = svc.ready().await.unwrap().call(request).await;
                    let _ = black_box(result);
                }
                start.elapsed()
            });
            answers(&mut svc);
            elapsed
        });
    });
}

/// Keys cycled by the HTTP groups' extractors themselves (a request carries none), one
/// counter for every library, as `keyed_1024`.
#[cfg(feature = "http")]
fn next_http_key() -> u64 {
    static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT_KEY.fetch_add(1, Relaxed) % 1024
}

/// seawall's HTTP cases over `bare` (named with `suffix`): the bare service, the layer
/// global and per key over 1 024 keys, each with the default headers (built on every
/// admitted response) and hidden.
#[cfg(feature = "http")]
fn seawall_http<S, B>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, suffix: &str, bare: S)
where
    S: Service<http::Request<()>, Response = http::Response<B>> + Clone,
    S::Error: Debug,
    B: seawall::problem::ProblemBody,
{
    use seawall::rate_limit::http::HttpRateLimitLayer;

    run_http(
        group,
        rt,
        &format!("bare http service_fn{suffix}"),
        bare.clone(),
    );
    for hidden in [false, true] {
        let hidden_label = if hidden { " hidden headers" } else { "" };
        let layer =
            HttpRateLimitLayer::global(RateLimiter::new(seawall_quota())).hide_headers(hidden);
        run_http(
            group,
            rt,
            &format!("seawall HttpRateLimitLayer global{hidden_label}{suffix}"),
            layer.layer(bare.clone()),
        );
        let keyed = KeyedRateLimiter::<u64>::new(seawall_quota());
        let layer =
            HttpRateLimitLayer::per_key(keyed, |_: &http::Request<()>| Some(next_http_key()))
                .hide_headers(hidden);
        run_http(
            group,
            rt,
            &format!("seawall HttpRateLimitLayer per_key 1024 keys{hidden_label}{suffix}"),
            layer.layer(bare.clone()),
        );
    }
}

/// `rate_limit/http` (feature `http`): the 429-answering layer over a bare `http` service
/// answering `String`s (see [`seawall_http`]); the same timed loop as `rate_limit/layer`.
#[cfg(feature = "http")]
fn http_layers(group: &mut BenchmarkGroup<'_, WallTime>) {
    let bare = service_fn(|_: http::Request<()>| async {
        Ok::<_, io::Error>(http::Response::new(String::new()))
    });
    seawall_http(group, &runtime(), "", bare);
}

/// `rate_limit/http`'s peers: tower_governor against `HttpRateLimitLayer`, both over a
/// service answering axum's `Body` (see the module docs).
#[cfg(feature = "axum")]
fn http_peers(group: &mut BenchmarkGroup<'_, WallTime>) {
    use axum::body::Body;
    use tower_governor::governor::GovernorConfigBuilder;
    use tower_governor::key_extractor::{GlobalKeyExtractor, KeyExtractor};
    use tower_governor::{GovernorError, GovernorLayer};

    fn bare()
    -> impl Service<http::Request<()>, Response = http::Response<Body>, Error = io::Error> + Clone
    {
        service_fn(|_: http::Request<()>| async {
            Ok::<_, io::Error>(http::Response::new(Body::empty()))
        })
    }
    #[derive(Clone)]
    struct Counter;
    impl KeyExtractor for Counter {
        type Key = u64;
        fn extract<T>(&self, _: &http::Request<T>) -> Result<u64, GovernorError> {
            Ok(next_http_key())
        }
    }
    let period = Duration::from_nanos(1_000_000_000 / u64::from(RATE));

    let rt = runtime();
    seawall_http(group, &rt, ", axum Body", bare());
    let config = GovernorConfigBuilder::default()
        .key_extractor(GlobalKeyExtractor)
        .period(period)
        .burst_size(BURST)
        .finish()
        .expect("valid tower_governor config");
    run_http(
        group,
        &rt,
        "tower_governor global",
        GovernorLayer::new(config).layer(bare()),
    );
    let config = GovernorConfigBuilder::default()
        .key_extractor(GlobalKeyExtractor)
        .period(period)
        .burst_size(BURST)
        .use_headers()
        .finish()
        .expect("valid tower_governor config");
    run_http(
        group,
        &rt,
        "tower_governor global use_headers",
        GovernorLayer::new(config).layer(bare()),
    );
    let config = GovernorConfigBuilder::default()
        .key_extractor(Counter)
        .period(period)
        .burst_size(BURST)
        .finish()
        .expect("valid tower_governor config");
    run_http(
        group,
        &rt,
        "tower_governor per key 1024 keys",
        GovernorLayer::new(config).layer(bare()),
    );
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

impl AllocTable {
    fn count(&self, name: &str, mut run: impl FnMut(u64)) {
        run(ALLOC_WARM_UP);
        let before = allocs::ALLOCATIONS.load(Relaxed);
        allocs::COUNTING.store(true, Relaxed);
        run(ALLOC_CALLS);
        allocs::COUNTING.store(false, Relaxed);
        let per_call = (allocs::ALLOCATIONS.load(Relaxed) - before) as f64 / ALLOC_CALLS as f64;
        println!(
            "allocs/call  {:<56} {per_call:.2}",
            format!("{}: {name}", self.group)
        );
    }
}

impl LimiterVisitor for AllocTable {
    fn visit<L: Limiter>(&mut self, name: &str, limiter: &L) {
        self.count(name, |n| {
            let _ = time_checks(limiter, n);
        });
    }
}

impl Visitor for AllocTable {
    fn visit<S>(&mut self, rt: &Runtime, name: &str, svc: &mut S)
    where
        S: Service<u64, Response = u64>,
        S::Error: Debug,
    {
        self.count(name, |n| {
            let _ = rt.block_on(drive(&mut *svc, n));
        });
    }
}

fn alloc_table() {
    println!("allocations per call ({ALLOC_CALLS} calls after {ALLOC_WARM_UP} warm-up calls)");
    direct_checks(&mut AllocTable { group: "check" });
    layers(&mut AllocTable { group: "layer" });
    println!();
}

/// Keyed limiters over 1 024 keys, cycled: seawall's sharded table against governor's
/// keyed limiter (DashMap), each on its default clock, and seawall on the TSC clock.
fn keyed(group: &mut BenchmarkGroup<'_, WallTime>) {
    const KEYS: u64 = 1024;
    let seawall_tokio: KeyedRateLimiter<u64> = KeyedRateLimiter::new(seawall_quota());
    let seawall_quanta: KeyedRateLimiter<u64, _> =
        KeyedRateLimiter::with_clock(seawall_quota(), QuantaClock::new());
    let governor = governor::RateLimiter::keyed(governor_quota());
    for key in 0..KEYS {
        assert!(
            seawall_tokio.try_acquire(&key, 1).is_ok(),
            "seawall keyed refused"
        );
        assert!(
            seawall_quanta.try_acquire(&key, 1).is_ok(),
            "seawall keyed refused"
        );
        assert!(governor.check_key(&key).is_ok(), "governor keyed refused");
    }
    group.bench_function("seawall keyed TokioClock", |b| {
        let mut key = 0u64;
        b.iter(|| {
            key = (key + 1) % KEYS;
            black_box(seawall_tokio.try_acquire(black_box(&key), 1))
        });
    });
    group.bench_function("seawall keyed QuantaClock", |b| {
        let mut key = 0u64;
        b.iter(|| {
            key = (key + 1) % KEYS;
            black_box(seawall_quanta.try_acquire(black_box(&key), 1))
        });
    });
    group.bench_function("governor keyed default clock", |b| {
        let mut key = 0u64;
        b.iter(|| {
            key = (key + 1) % KEYS;
            black_box(governor.check_key(black_box(&key)))
        });
    });
}

/// `rate_limit/default_clock` (see the module docs).
fn default_clock(group: &mut BenchmarkGroup<'_, WallTime>) {
    const KEYS: u64 = 1024;

    /// Times `iters` calls of `check(i)` inside one `block_on`, then asks `admits`
    /// (untimed).
    fn direct(
        group: &mut BenchmarkGroup<'_, WallTime>,
        rt: &Runtime,
        name: &str,
        check: impl Fn(u64),
        admits: impl Fn() -> bool,
    ) {
        assert!(admits(), "{name} refused in setup");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(async {
                    let start = stopwatch::now();
                    for i in 0..iters {
                        check(black_box(i));
                    }
                    start.elapsed()
                });
                assert!(admits(), "{name} refused during the measurement");
                elapsed
            });
        });
    }

    let rt = runtime();
    // tower's RateLimit creates its `Sleep` when built: it needs the runtime's timer.
    let _guard = rt.enter();

    let seawall = RateLimiter::new(seawall_quota());
    direct(
        group,
        &rt,
        "seawall check default clock",
        |_| {
            let _ = black_box(seawall.try_acquire(1));
        },
        || seawall.try_acquire(1).is_ok(),
    );
    let governor = governor::RateLimiter::direct(governor_quota());
    direct(
        group,
        &rt,
        "governor check default clock",
        |_| {
            let _ = black_box(governor.check());
        },
        || governor.check().is_ok(),
    );

    let seawall: KeyedRateLimiter<u64> = KeyedRateLimiter::new(seawall_quota());
    direct(
        group,
        &rt,
        "seawall keyed 1024 keys default clock",
        |i| {
            let _ = black_box(seawall.try_acquire(&(i % KEYS), 1));
        },
        || seawall.try_acquire(&0, 1).is_ok(),
    );
    let governor = governor::RateLimiter::keyed(governor_quota());
    direct(
        group,
        &rt,
        "governor keyed 1024 keys default clock",
        |i| {
            let _ = black_box(governor.check_key(&(i % KEYS)));
        },
        || governor.check_key(&0).is_ok(),
    );

    let mut v = Bench(group);
    let mut svc = bare();
    admits(&rt, "bare", &mut svc);
    v.visit(&rt, "bare service_fn", &mut svc);

    let mut svc = RateLimitLayer::new(seawall_quota()).layer(bare());
    admits(&rt, "seawall layer", &mut svc);
    v.visit(&rt, "seawall RateLimitLayer default clock", &mut svc);

    let mut svc =
        KeyedRateLimitLayer::new(seawall_quota(), |x: &u64| Some(*x % KEYS)).layer(bare());
    admits(&rt, "seawall keyed layer", &mut svc);
    v.visit(
        &rt,
        "seawall KeyedRateLimitLayer 1024 keys default clock",
        &mut svc,
    );

    let mut svc =
        tower::limit::RateLimitLayer::new(u64::from(RATE), Duration::from_secs(1)).layer(bare());
    admits(&rt, "tower", &mut svc);
    v.visit(&rt, "tower RateLimitLayer", &mut svc);
}

fn main() {
    alloc_table();
    let mut c = Criterion::default().configure_from_args();

    let mut group = c.benchmark_group("rate_limit/check");
    direct_checks(&mut CheckBench(&mut group));
    group.finish();

    let mut group = c.benchmark_group("rate_limit/layer");
    layers(&mut Bench(&mut group));
    group.finish();

    #[cfg(feature = "http")]
    {
        let mut group = c.benchmark_group("rate_limit/http");
        http_layers(&mut group);
        #[cfg(feature = "axum")]
        http_peers(&mut group);
        group.finish();
    }

    let mut group = c.benchmark_group("rate_limit/default_clock");
    default_clock(&mut group);
    group.finish();

    let mut group = c.benchmark_group("rate_limit/two_threads");
    // One element per iteration: with the time returned per check across all threads,
    // criterion's throughput line is total checks per second.
    group.throughput(Throughput::Elements(1));
    two_threads(&mut group);
    group.finish();

    let mut group = c.benchmark_group("rate_limit/keyed_1024");
    keyed(&mut group);
    group.finish();

    c.final_summary();
}
