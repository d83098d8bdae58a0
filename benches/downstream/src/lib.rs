//! The services measured, shared by the criterion bench and the `count` binary (which runs
//! one case a given number of times, for instruction counts under callgrind).
//!
//! Method, as in the independent harness: every service is built once; one loop of
//! `ready().await` + `call().await` runs inside one `block_on` of a current-thread runtime.
//! The rate limiters' direct checks (no `Service`) run the same way: one loop of checks
//! inside one `block_on`, each limiter on its default clock, keyed ones over 1 024 keys
//! (the loop counter modulo 1 024).

use std::hint::black_box;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use failsafe::futures::CircuitBreaker as _;
use failsafe::{FailurePolicy, StateMachine, backoff, failure_policy};
use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
use seawall::rate_limit::{
    KeyedRateLimitLayer, KeyedRateLimiter, Quota, Rate, RateLimitLayer, RateLimiter,
};
use std::num::NonZeroU32;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};

/// Every case, by name.
pub const CASES: &[&str] = &[
    "floor",
    "seawall closed",
    "seawall closed typed",
    "failsafe closed",
    "seawall forced open",
    "seawall forced open typed",
    "seawall tripped open",
    "seawall tripped open typed",
    "failsafe tripped open",
    "seawall check",
    "governor check",
    "seawall keyed",
    "governor keyed",
    "seawall RateLimitLayer",
    "tower RateLimit",
    "seawall KeyedRateLimitLayer",
];

/// Tokens a second for every limiter, and the burst of those that have one: a bucket that
/// never runs dry, so that every check measured admits.
const RATE: u32 = 1_000_000_000;
/// Keys the keyed limiters are checked over.
const KEYS: u64 = 1024;

fn seawall_quota() -> Quota {
    Quota::new(Rate::per_second(RATE), RATE).expect("valid quota")
}

fn governor_quota() -> governor::Quota {
    let rate = NonZeroU32::new(RATE).expect("non-zero");
    governor::Quota::per_second(rate).allow_burst(rate)
}

/// The timed loop of a direct check: `check(i)` must admit.
async fn checks(check: &impl Fn(u64) -> bool, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        if !black_box(check(black_box(i))) {
            panic!("a check was refused");
        }
    }
    start.elapsed()
}

/// A current-thread runtime with timers (a tripped breaker arms one).
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

fn bare() -> impl Service<u64, Response = u64, Error = io::Error> + Clone {
    service_fn(|x: u64| async move { Ok::<u64, io::Error>(x) })
}

fn failable(fail: Arc<AtomicBool>) -> impl Service<u64, Response = u64, Error = io::Error> {
    service_fn(move |x: u64| {
        let fail = fail.load(Relaxed);
        async move {
            if fail {
                Err(io::Error::from(io::ErrorKind::Other))
            } else {
                Ok(x)
            }
        }
    })
}

/// A breaker a user would write: the default configuration, a long wait once open.
fn layer() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .wait_in_open(Duration::from_secs(3600))
            .build()
            .expect("valid config"),
    )
}

/// failsafe has no tower layer: its future API behind a `Service`.
#[derive(Clone)]
struct Failsafe<S, P> {
    inner: S,
    cb: StateMachine<P, ()>,
}

impl<S: Service<u64>, P: FailurePolicy + Send + Sync> Service<u64> for Failsafe<S, P> {
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<S::Future, P, (), failsafe::Any>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: u64) -> Self::Future {
        self.cb.call(self.inner.call(req))
    }
}

fn failsafe_cb() -> StateMachine<impl FailurePolicy + Send + Sync, ()> {
    failsafe::Config::new()
        .failure_policy(failure_policy::consecutive_failures(
            3,
            backoff::constant(Duration::from_secs(3600)),
        ))
        .build()
}

/// The timed loop.
pub async fn drive<S: Service<u64>>(svc: &mut S, iters: u64) -> Duration
where
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for i in 0..iters {
        let result = svc.ready().await.expect("ready").call(black_box(i)).await;
        let _ = black_box(result);
    }
    start.elapsed()
}

async fn trip<S: Service<u64>>(svc: &mut S, is_open: impl Fn() -> bool)
where
    S::Error: std::fmt::Debug,
{
    for i in 0..1_000 {
        if is_open() {
            return;
        }
        let _ = svc.ready().await.expect("ready").call(i).await;
    }
    assert!(is_open(), "the breaker did not open");
}

/// Builds the service of `case` on `rt` (tripping it if the case says so) and hands it to
/// `run`, which gets the service and whether its calls must fail.
pub fn with_case<R>(
    rt: &Runtime,
    case: &str,
    run: impl FnOnce(&mut dyn FnMut(u64) -> Duration) -> R,
) -> R {
    let fail = Arc::new(AtomicBool::new(true));
    macro_rules! go {
        ($svc:expr, $rejects:expr) => {{
            let mut svc = $svc;
            let result = rt.block_on(async { svc.ready().await.expect("ready").call(7).await });
            assert_eq!(result.is_err(), $rejects, "{case}: wrong outcome");
            run(&mut |iters| rt.block_on(drive(&mut svc, iters)))
        }};
    }
    macro_rules! direct {
        ($check:expr) => {{
            let check = $check;
            assert!(check(0), "{case}: refused in setup");
            run(&mut |iters| rt.block_on(checks(&check, iters)))
        }};
    }
    // tower's `RateLimit` makes its `Sleep` when it is built: that needs the runtime.
    let _guard = rt.enter();
    match case {
        "floor" => go!(bare(), false),
        "seawall check" => {
            let limiter = RateLimiter::new(seawall_quota());
            direct!(|_| limiter.try_acquire(1).is_ok())
        }
        "governor check" => {
            let limiter = governor::RateLimiter::direct(governor_quota());
            direct!(|_| limiter.check().is_ok())
        }
        "seawall keyed" => {
            let limiter: KeyedRateLimiter<u64> = KeyedRateLimiter::new(seawall_quota());
            direct!(|i| limiter.try_acquire(&(i % KEYS), 1).is_ok())
        }
        "governor keyed" => {
            let limiter = governor::RateLimiter::keyed(governor_quota());
            direct!(|i| limiter.check_key(&(i % KEYS)).is_ok())
        }
        "seawall RateLimitLayer" => go!(RateLimitLayer::new(seawall_quota()).layer(bare()), false),
        "tower RateLimit" => go!(
            tower::limit::RateLimitLayer::new(u64::from(RATE), Duration::from_secs(1))
                .layer(bare()),
            false
        ),
        "seawall KeyedRateLimitLayer" => go!(
            KeyedRateLimitLayer::new(seawall_quota(), |x: &u64| Some(*x % KEYS)).layer(bare()),
            false
        ),
        "seawall closed" => go!(layer().layer(bare()), false),
        "seawall closed typed" => go!(layer().typed_errors().layer(bare()), false),
        "failsafe closed" => go!(
            Failsafe {
                inner: bare(),
                cb: failsafe_cb()
            },
            false
        ),
        "seawall forced open" => {
            let layer = layer();
            layer.breaker().force_open();
            go!(layer.layer(bare()), true)
        }
        "seawall forced open typed" => {
            let layer = layer();
            layer.breaker().force_open();
            go!(layer.typed_errors().layer(bare()), true)
        }
        "seawall tripped open" | "seawall tripped open typed" => {
            let layer = layer();
            let breaker = layer.breaker().clone();
            if case.ends_with("typed") {
                let mut svc = layer.typed_errors().layer(failable(fail.clone()));
                rt.block_on(trip(&mut svc, || breaker.state() == State::Open));
                go!(svc, true)
            } else {
                let mut svc = layer.layer(failable(fail.clone()));
                rt.block_on(trip(&mut svc, || breaker.state() == State::Open));
                go!(svc, true)
            }
        }
        "failsafe tripped open" => {
            let cb = failsafe_cb();
            let mut svc = Failsafe {
                inner: failable(fail.clone()),
                cb: cb.clone(),
            };
            rt.block_on(trip(&mut svc, || !cb.is_call_permitted()));
            go!(svc, true)
        }
        other => panic!("unknown case {other:?}; one of {CASES:?}"),
    }
}
