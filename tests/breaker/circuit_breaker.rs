//! Transition rules of the circuit breaker, on paused tokio time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use seawall::BoxError;
use seawall::circuit_breaker::{
    Breaker, CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, EventKind,
    Outcome, Rejection, SlidingWindow, State,
};
use tokio::time::{advance, sleep};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_test::mock;

/// What the test service should do with a request.
#[derive(Debug, Clone, Copy)]
enum Do {
    Succeed,
    Fail,
    /// Fails with an error the classifier ignores.
    Ignore,
    /// Succeeds after this long.
    SucceedAfter(Duration),
}

fn config() -> seawall::circuit_breaker::CircuitBreakerConfigBuilder {
    CircuitBreakerConfig::builder()
        .name("test")
        .sliding_window(SlidingWindow::count_based(10))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(10))
        .permitted_calls_in_half_open(2)
}

type TestSvc = tower::util::BoxCloneService<Do, &'static str, BoxError>;

/// A breaker around a scripted service that counts how often it was called. Typed errors,
/// turned into `BoxError`: a rejection is a boxed [`Rejection`], with its details.
fn scripted(config: CircuitBreakerConfig) -> (TestSvc, Breaker, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer =
        CircuitBreakerLayer::new(config).with_classifier(|r: Result<&&'static str, &BoxError>| {
            match r {
                Ok(_) => Outcome::Success,
                Err(e) if e.to_string() == "ignored" => Outcome::Ignored,
                Err(_) => Outcome::Failure,
            }
        });
    let breaker = layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .map_err(BoxError::from)
        .layer(layer.typed_errors())
        .service_fn(move |what: Do| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                match what {
                    Do::Succeed => Ok("ok"),
                    Do::Fail => Err::<&'static str, BoxError>("boom".into()),
                    Do::Ignore => Err("ignored".into()),
                    Do::SucceedAfter(d) => {
                        sleep(d).await;
                        Ok("slow ok")
                    }
                }
            }
        });
    (tower::util::BoxCloneService::new(svc), breaker, calls)
}

async fn call(svc: &mut TestSvc, what: Do) -> Result<&'static str, BoxError> {
    svc.ready().await?.call(what).await
}

async fn calls(svc: &mut TestSvc, what: Do, n: usize) {
    for _ in 0..n {
        let _ = call(svc, what).await;
    }
}

fn rejection(result: Result<&'static str, BoxError>) -> Rejection {
    let err = result.expect_err("expected a rejection");
    err.downcast_ref::<Rejection>()
        .unwrap_or_else(|| panic!("expected a Rejection, got {err}"))
        .clone()
}

/// Lets spawned timer tasks run after time moved.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// [`config`] letting one probe through half-open.
fn one_probe() -> CircuitBreakerConfig {
    config()
        .minimum_calls(4)
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap()
}

/// Checks a probe that never reached the upstream left `breaker` half-open.
fn still_half_open(breaker: &Breaker) {
    assert_eq!(
        breaker.state(),
        State::HalfOpen,
        "a probe the upstream never saw decided the episode: {:?}",
        breaker.snapshot()
    );
}

/// Checks `breaker` is open, waits out [`config`]'s 10 s, and checks it is half-open.
async fn wait_for_half_open(breaker: &Breaker) {
    assert_eq!(breaker.state(), State::Open);
    advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn stays_closed_below_minimum_calls() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    calls(&mut svc, Do::Fail, 3).await;
    assert_eq!(breaker.state(), State::Closed);
    let snap = breaker.snapshot();
    assert_eq!((snap.calls, snap.failed_calls), (3, 3));
    assert_eq!(snap.failure_rate, None, "no rate below minimum calls");
}

#[tokio::test(start_paused = true)]
async fn opens_when_failure_rate_reaches_threshold() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    calls(&mut svc, Do::Succeed, 2).await;
    call(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(
        breaker.state(),
        State::Closed,
        "1 of 3: below minimum calls"
    );
    call(&mut svc, Do::Fail).await.unwrap_err();
    // 2 of 4 = 50 %, threshold is 50 %: opens.
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn does_not_open_just_below_threshold() {
    let (mut svc, breaker, _) = scripted(config().failure_rate_threshold(0.6).build().unwrap());
    calls(&mut svc, Do::Succeed, 3).await;
    calls(&mut svc, Do::Fail, 4).await;
    // 4 of 7 = 57 % < 60 %.
    assert_eq!(breaker.state(), State::Closed);
    call(&mut svc, Do::Fail).await.unwrap_err();
    // 5 of 8 = 62.5 %.
    assert_eq!(breaker.state(), State::Open);
}

/// Thresholds are fractions, compared exactly at the boundary: 3 failures in 10 calls meet
/// 0.3 (where `0.3 × 10` in floating point is 3.0000000000000004, just above 3).
#[tokio::test(start_paused = true)]
async fn a_fractional_threshold_is_met_exactly_at_the_boundary() {
    for (threshold, failures) in [(0.3, 3), (0.7, 7), (0.1, 1)] {
        let (mut svc, breaker, _) = scripted(
            config()
                .minimum_calls(10)
                .failure_rate_threshold(threshold)
                .build()
                .unwrap(),
        );
        calls(&mut svc, Do::Succeed, 10 - failures).await;
        calls(&mut svc, Do::Fail, failures - 1).await;
        assert_eq!(breaker.state(), State::Closed, "{threshold}: below");
        call(&mut svc, Do::Fail).await.unwrap_err();
        assert_eq!(
            breaker.state(),
            State::Open,
            "{threshold}: {failures} of 10"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn count_window_forgets_old_failures() {
    let (mut svc, breaker, _) = scripted(
        config()
            .sliding_window(SlidingWindow::count_based(4))
            .minimum_calls(4)
            .failure_rate_threshold(0.75)
            .build()
            .unwrap(),
    );
    calls(&mut svc, Do::Fail, 2).await;
    calls(&mut svc, Do::Succeed, 4).await; // pushes both failures out
    calls(&mut svc, Do::Fail, 2).await;
    // Window: S S F F = 50 % < 75 %.
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().failed_calls, 2);
    call(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(breaker.state(), State::Open, "S F F F = 75 %");
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_failures_older_than_the_window() {
    let (mut svc, breaker, _) = scripted(
        config()
            .sliding_window(SlidingWindow::time_based(Duration::from_secs(10), 10))
            .minimum_calls(4)
            .build()
            .unwrap(),
    );
    calls(&mut svc, Do::Fail, 3).await;
    advance(Duration::from_secs(11)).await;
    assert_eq!(breaker.snapshot().calls, 0, "all expired");
    call(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(
        breaker.state(),
        State::Closed,
        "only one failure in the window"
    );
    calls(&mut svc, Do::Succeed, 2).await;
    advance(Duration::from_secs(5)).await;
    call(&mut svc, Do::Fail).await.unwrap_err();
    // F S S F within 10 s: 50 %.
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn opens_on_slow_call_rate() {
    let (mut svc, breaker, _) = scripted(
        config()
            .slow_call_duration(Duration::from_millis(100))
            .slow_call_rate_threshold(0.5)
            .build()
            .unwrap(),
    );
    calls(&mut svc, Do::SucceedAfter(Duration::from_millis(99)), 2).await;
    calls(&mut svc, Do::SucceedAfter(Duration::from_millis(100)), 1).await;
    calls(&mut svc, Do::Succeed, 1).await;
    assert_eq!(breaker.state(), State::Closed, "1 slow of 4");
    assert_eq!(breaker.snapshot().slow_calls, 1);
    calls(&mut svc, Do::SucceedAfter(Duration::from_secs(1)), 1).await;
    assert_eq!(breaker.state(), State::Closed, "2 slow of 5 = 40 %");
    calls(&mut svc, Do::SucceedAfter(Duration::from_secs(1)), 1).await;
    assert_eq!(breaker.state(), State::Open, "3 slow of 6 = 50 %");
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_do_not_count() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    calls(&mut svc, Do::Ignore, 10).await;
    assert_eq!(breaker.snapshot().calls, 0);
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_without_touching_the_inner_service() {
    let layer = CircuitBreakerLayer::new(config().build().unwrap());
    let breaker = layer.breaker().clone();
    let (mut svc, mut handle) = mock::spawn_layer::<Do, &'static str, _>(layer);
    breaker.force_open();
    // The inner service is not ready, yet the breaker answers at once.
    handle.allow(0);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let err = svc.call(Do::Succeed).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    // Issue 16, item 3: the default mode's rejection is zero-sized, so boxing it allocated
    // nothing (it was 24 bytes, one allocation per rejection).
    assert_eq!(std::mem::size_of_val(&*err), 0, "{err:?}");
    assert!(
        handle.poll_request().is_pending(),
        "no request reached the inner service"
    );
}

#[tokio::test(start_paused = true)]
async fn open_rejection_carries_retry_after_and_moves_to_half_open_on_time() {
    let (mut svc, breaker, inner_calls) = scripted(config().build().unwrap());
    calls(&mut svc, Do::Fail, 4).await;
    assert_eq!(breaker.state(), State::Open);
    let before = inner_calls.load(Ordering::SeqCst);

    let open = rejection(call(&mut svc, Do::Succeed).await);
    assert_eq!(open.state(), State::Open);
    assert_eq!(open.breaker(), "test");
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
    assert_eq!(breaker.snapshot().retry_at, open.retry_at());

    advance(Duration::from_millis(9_999)).await;
    settle().await;
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(
        rejection(call(&mut svc, Do::Succeed).await).retry_after(),
        Some(Duration::from_millis(1))
    );
    advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(
        breaker.state(),
        State::HalfOpen,
        "moved by the timer, without a call"
    );
    assert_eq!(
        inner_calls.load(Ordering::SeqCst),
        before,
        "no call while open"
    );
    assert_eq!(breaker.snapshot().rejected_calls, 2);
}

async fn open_then_half_open(svc: &mut TestSvc, breaker: &Breaker) {
    calls(svc, Do::Fail, 4).await;
    assert_eq!(breaker.state(), State::Open);
    advance(breaker.config().wait_in_open()).await;
    settle().await;
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_closes_after_successful_probes_with_an_empty_window() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    open_then_half_open(&mut svc, &breaker).await;
    call(&mut svc, Do::Succeed).await.unwrap();
    assert_eq!(breaker.state(), State::HalfOpen, "1 of 2 probes done");
    call(&mut svc, Do::Succeed).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
    let snap = breaker.snapshot();
    assert_eq!(
        (snap.calls, snap.failed_calls, snap.consecutive_trips),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_reopens_when_probes_fail_with_a_growing_wait() {
    let (mut svc, breaker, _) = scripted(
        config()
            .exponential_backoff(2.0, Duration::from_secs(25))
            .build()
            .unwrap(),
    );
    open_then_half_open(&mut svc, &breaker).await;
    call(&mut svc, Do::Succeed).await.unwrap();
    call(&mut svc, Do::Fail).await.unwrap_err();
    // 1 of 2 probes failed = 50 % ≥ 50 %.
    assert_eq!(breaker.state(), State::Open);
    let open = rejection(call(&mut svc, Do::Succeed).await);
    assert_eq!(
        open.retry_after(),
        Some(Duration::from_secs(20)),
        "second trip: 10 s × 2"
    );
    assert_eq!(breaker.snapshot().consecutive_trips, 2);

    advance(Duration::from_secs(20)).await;
    settle().await;
    calls(&mut svc, Do::Fail, 2).await;
    let open = rejection(call(&mut svc, Do::Succeed).await);
    assert_eq!(
        open.retry_after(),
        Some(Duration::from_secs(25)),
        "third trip: capped"
    );

    // Closing resets the growth.
    advance(Duration::from_secs(25)).await;
    settle().await;
    calls(&mut svc, Do::Succeed, 2).await;
    assert_eq!(breaker.state(), State::Closed);
    calls(&mut svc, Do::Fail, 4).await;
    let open = rejection(call(&mut svc, Do::Succeed).await);
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_the_permitted_probes() {
    let layer = CircuitBreakerLayer::new(config().permitted_calls_in_half_open(2).build().unwrap());
    let breaker = layer.breaker().clone();
    let (svc, mut handle) = mock::pair::<Do, &'static str>();
    // Typed errors: a rejection says the state that refused it.
    let svc = ServiceBuilder::new()
        .layer(layer.typed_errors())
        .service(svc);
    handle.allow(100);
    // Trip it.
    for _ in 0..4 {
        let mut s = svc.clone();
        let fut = s.ready().await.unwrap().call(Do::Fail);
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_error("boom");
        fut.await.unwrap_err();
    }
    advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(breaker.state(), State::HalfOpen);

    let mut a = svc.clone();
    let mut b = svc.clone();
    let mut c = svc.clone();
    a.ready().await.unwrap();
    b.ready().await.unwrap();
    // The third is ready too, but only to reject.
    c.ready().await.unwrap();
    let rejected = c.call(Do::Succeed).await.unwrap_err();
    assert_eq!(rejected.as_open().unwrap().state(), State::HalfOpen);

    // Dropping a reserved service gives its permit back.
    drop(b);
    let mut d = svc.clone();
    d.ready().await.unwrap();
    let fut_a = a.call(Do::Succeed);
    // Dropping an in-flight probe's future gives its permit back too.
    let fut_d = d.call(Do::Succeed);
    let (_, ra) = handle.next_request().await.unwrap();
    let (_, _rd) = handle.next_request().await.unwrap();
    drop(fut_d);
    let mut e = svc.clone();
    e.ready().await.unwrap();
    let fut_e = e.call(Do::Succeed);
    let (_, re) = handle.next_request().await.unwrap();
    ra.send_response("ok");
    re.send_response("ok");
    fut_a.await.unwrap();
    fut_e.await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn ignored_probe_frees_its_permit() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    open_then_half_open(&mut svc, &breaker).await;
    calls(&mut svc, Do::Ignore, 5).await;
    assert_eq!(
        breaker.state(),
        State::HalfOpen,
        "ignored probes decide nothing"
    );
    calls(&mut svc, Do::Succeed, 2).await;
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_times_out_when_probes_hang() {
    let (mut svc, breaker, _) = scripted(
        config()
            .max_wait_in_half_open(Duration::from_secs(3))
            .build()
            .unwrap(),
    );
    open_then_half_open(&mut svc, &breaker).await;
    let mut s1 = svc.clone();
    let mut s2 = svc.clone();
    let hang1 =
        tokio::spawn(async move { call(&mut s1, Do::SucceedAfter(Duration::from_secs(12))).await });
    let hang2 =
        tokio::spawn(async move { call(&mut s2, Do::SucceedAfter(Duration::from_secs(12))).await });
    settle().await;
    assert_eq!(
        rejection(call(&mut svc, Do::Succeed).await).state(),
        State::HalfOpen
    );
    advance(Duration::from_secs(3)).await;
    settle().await;
    assert_eq!(breaker.state(), State::Open);
    // The late probes' outcomes belong to a finished episode and change nothing.
    // They complete at +12 s, while open (until +13 s).
    advance(Duration::from_secs(9)).await;
    hang1.await.unwrap().unwrap();
    hang2.await.unwrap().unwrap();
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn forced_open_disabled_and_reset() {
    let (mut svc, breaker, inner_calls) = scripted(config().build().unwrap());
    breaker.force_open();
    let open = rejection(call(&mut svc, Do::Succeed).await);
    assert_eq!(open.state(), State::ForcedOpen);
    assert_eq!(open.retry_after(), None);
    advance(Duration::from_secs(3600)).await;
    settle().await;
    assert_eq!(
        breaker.state(),
        State::ForcedOpen,
        "no timer leaves forced open"
    );

    breaker.disable();
    calls(&mut svc, Do::Fail, 20).await;
    assert_eq!(breaker.state(), State::Disabled);
    assert_eq!(
        breaker.snapshot().calls,
        0,
        "nothing recorded while disabled"
    );
    assert_eq!(inner_calls.load(Ordering::SeqCst), 20);

    breaker.reset();
    assert_eq!(breaker.state(), State::Closed);
    calls(&mut svc, Do::Fail, 4).await;
    assert_eq!(breaker.state(), State::Open);
    breaker.reset();
    call(&mut svc, Do::Succeed).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn events_report_transitions_and_rejections() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    breaker.on_event(move |e| sink.lock().push(*e.kind()));
    let mut rx = breaker.subscribe_all();
    let mut transitions = breaker.subscribe();

    open_then_half_open(&mut svc, &breaker).await;
    calls(&mut svc, Do::Fail, 2).await;
    let _ = call(&mut svc, Do::Succeed).await;

    let expected = vec![
        EventKind::StateTransition {
            from: State::Closed,
            to: State::Open,
        },
        EventKind::StateTransition {
            from: State::Open,
            to: State::HalfOpen,
        },
        EventKind::StateTransition {
            from: State::HalfOpen,
            to: State::Open,
        },
        EventKind::CallRejected { state: State::Open },
    ];
    assert_eq!(*seen.lock(), expected);
    let mut received = Vec::new();
    while let Ok(e) = rx.try_recv() {
        assert_eq!(e.breaker(), "test");
        received.push(*e.kind());
    }
    assert_eq!(received, expected);
    let mut only = Vec::new();
    while let Ok(e) = transitions.try_recv() {
        if e.kind()
            == &(EventKind::StateTransition {
                from: State::HalfOpen,
                to: State::Open,
            })
        {
            assert_eq!(e.retry_at().unwrap() - e.at(), Duration::from_secs(10));
        }
        only.push(*e.kind());
    }
    assert_eq!(only, expected[..3]);
}

#[tokio::test(start_paused = true)]
async fn tower_timeouts_count_as_failures() {
    let layer = CircuitBreakerLayer::new(config().build().unwrap());
    let breaker = layer.breaker().clone();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_millis(100))
        .service_fn(|d: Duration| async move {
            sleep(d).await;
            Ok::<_, BoxError>("done")
        });
    for _ in 0..4 {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            err.is::<tower::timeout::error::Elapsed>(),
            "inner errors pass through unchanged"
        );
    }
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let (svc, breaker, _) = scripted(config().build().unwrap());
    for _ in 0..4 {
        let mut clone = svc.clone();
        let _ = call(&mut clone, Do::Fail).await;
    }
    assert_eq!(breaker.state(), State::Open);
    let mut other = svc.clone();
    rejection(call(&mut other, Do::Succeed).await);
}

#[test]
fn works_without_a_tokio_runtime() {
    // No runtime: no timer task, so the admission path reads the clock.
    let breaker = Breaker::new(
        config()
            .wait_in_open(Duration::from_millis(5))
            .build()
            .unwrap(),
    );
    let mut svc = CircuitBreaker::with_breaker(
        tower::service_fn(|fail: bool| async move { if fail { Err("boom") } else { Ok("ok") } }),
        breaker.clone(),
    );
    futures::executor::block_on(async {
        for _ in 0..4 {
            let _ = svc.ready().await.unwrap().call(true).await;
        }
        assert_eq!(breaker.state(), State::Open);
        assert!(svc.ready().await.unwrap().call(false).await.is_err());
    });
    // A lower bound only: at least the open wait has passed.
    std::thread::sleep(Duration::from_millis(6));
    futures::executor::block_on(async {
        svc.ready().await.unwrap().call(false).await.unwrap();
        assert_eq!(breaker.state(), State::HalfOpen);
    });
}

#[tokio::test(start_paused = true)]
async fn jittered_waits_stay_within_bounds() {
    let (mut svc, breaker, _) = scripted(config().jitter(0.5).build().unwrap());
    let mut seen = Vec::new();
    for _ in 0..20 {
        calls(&mut svc, Do::Fail, 4).await;
        let after = rejection(call(&mut svc, Do::Succeed).await)
            .retry_after()
            .unwrap();
        assert!(
            after >= Duration::from_secs(5) && after <= Duration::from_secs(15),
            "{after:?}"
        );
        seen.push(after);
        breaker.reset();
    }
    seen.sort();
    seen.dedup();
    assert!(seen.len() > 5, "jitter spreads the waits: {seen:?}");
}

#[cfg(feature = "http")]
mod http_classifier {
    use super::*;
    use http::{Response, StatusCode};
    use seawall::circuit_breaker::HttpClassifier;

    #[tokio::test(start_paused = true)]
    async fn server_errors_trip_client_errors_do_not() {
        let layer = CircuitBreakerLayer::new(config().build().unwrap())
            .with_classifier(HttpClassifier::new());
        let breaker = layer.breaker().clone();
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service_fn(|s: u16| async move {
                Ok::<_, BoxError>(Response::builder().status(s).body(()).unwrap())
            });
        for _ in 0..10 {
            let r = svc.ready().await.unwrap().call(404).await.unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND);
        }
        assert_eq!(breaker.snapshot().failed_calls, 0);
        for _ in 0..10 {
            let _ = svc.ready().await.unwrap().call(503).await;
        }
        assert_eq!(breaker.state(), State::Open);
    }

    /// `layer` (a breaker with an `HttpClassifier`) around a per-client rate limit of
    /// `burst` requests, never refilled (its manual clock stands still), around an
    /// upstream that answers every call with `status`; with the count of the upstream's
    /// calls.
    fn rate_limited_upstream(
        layer: CircuitBreakerLayer<HttpClassifier>,
        burst: u32,
        status: StatusCode,
    ) -> (
        impl Service<http::Request<()>, Response = Response<String>, Error = BoxError>,
        Arc<AtomicUsize>,
    ) {
        use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
        use seawall::rate_limit::{KeyedRateLimiter, ManualClock, Quota, Rate};

        let per_client = KeyedRateLimiter::with_clock(
            Quota::new(Rate::per_second(1), burst).unwrap(),
            ManualClock::new(),
        );
        let upstream_calls = Arc::new(AtomicUsize::new(0));
        let counter = upstream_calls.clone();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(HttpRateLimitLayer::per_key(per_client, ClientIp::peer()))
            .service_fn(move |_: http::Request<()>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut answer = Response::new(String::new());
                *answer.status_mut() = status;
                async { Ok::<_, BoxError>(answer) }
            });
        (svc, upstream_calls)
    }

    /// A request from the client at `peer` (its address in the extensions, where the
    /// server puts it).
    fn request_from(peer: &str) -> http::Request<()> {
        let mut request = http::Request::new(());
        request
            .extensions_mut()
            .insert(peer.parse::<std::net::SocketAddr>().unwrap());
        request
    }

    /// A rate-limit layer inside the breaker answers a client over its own limit with its
    /// own `429`, marked [`Refused`](seawall::rate_limit::http::Refused) so that code
    /// further out can tell it from the upstream's. That is the client's doing, not the
    /// upstream's: it must not count against the upstream, even with `fail_on(429)` (the
    /// documented way to count an overloaded upstream's `429`s). Counted, one client
    /// sending a few requests too fast trips the breaker and every other client is
    /// refused with it.
    #[tokio::test(start_paused = true)]
    async fn a_local_rate_limit_refusal_does_not_count_against_the_upstream() {
        use seawall::rate_limit::http::Refused;

        let layer = CircuitBreakerLayer::new(config().build().unwrap())
            .with_classifier(HttpClassifier::new().fail_on(StatusCode::TOO_MANY_REQUESTS));
        let breaker = layer.breaker().clone();
        let (mut svc, upstream_calls) = rate_limited_upstream(layer, 1, StatusCode::OK);
        // One client: its first request goes through, the next nine are its own 429s.
        for i in 0..10 {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(request_from("192.0.2.1:1000"))
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "request {i}: {e}, the breaker tripped by the client's own 429s: {:?}",
                        breaker.snapshot()
                    )
                });
            if i > 0 {
                assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
                assert!(response.extensions().get::<Refused>().is_some());
            }
        }
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            breaker.state(),
            State::Closed,
            "the upstream answered once, and well: {:?}",
            breaker.snapshot()
        );
        // Another client is served.
        let other = svc
            .ready()
            .await
            .unwrap()
            .call(request_from("192.0.2.2:1000"))
            .await;
        assert_eq!(
            other.expect("not rejected by the breaker").status(),
            StatusCode::OK
        );
    }
    /// `HttpClassifier`'s `classify`: "the answers a seawall rate limit inside the breaker
    /// made itself (marked `Refused` or `Undecided`: a `429`, or the `400`, `500` or `503`
    /// of a missing key or store), which are `Outcome::Ignored`". Only those that would
    /// otherwise be failures were ignored: without `fail_on(429)` a local `429` (and a
    /// missing key's `400`) counted as a *success* of the upstream. A half-open probe
    /// refused by the limit, which never reached the upstream, closed the breaker over
    /// an upstream that fails every call (and in the closed state such refusals dilute
    /// the upstream's failure rate).
    #[tokio::test(start_paused = true)]
    async fn a_probe_refused_by_a_local_rate_limit_does_not_close_the_breaker() {
        use seawall::rate_limit::http::Refused;

        let layer = CircuitBreakerLayer::new(one_probe()).with_classifier(HttpClassifier::new());
        let breaker = layer.breaker().clone();
        // Four requests' worth of tokens, never refilled, before an upstream that fails
        // every call it gets.
        let (mut svc, upstream_calls) =
            rate_limited_upstream(layer, 4, StatusCode::SERVICE_UNAVAILABLE);
        let request = || request_from("192.0.2.1:1000");
        for _ in 0..4 {
            let response = svc.ready().await.unwrap().call(request()).await.unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        wait_for_half_open(&breaker).await;
        // The probe: refused by the local limit, it never reaches the upstream.
        let response = svc.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.extensions().get::<Refused>().is_some());
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 4);
        still_half_open(&breaker);
    }
}

/// A seawall rate limit inside the breaker refuses with an error (the tower layers):
/// `RateLimited` past the limit, `MissingKey` for a request without the key a keyed limit
/// reads. Neither reaches the dependency, and neither is its failure (a client's own
/// errors are never counted against an upstream), yet every classifier counted every
/// `Err` as one: one client's burst against the limit opened the breaker for everybody,
/// and a half-open probe the limit refused decided the episode.
mod local_refusals {
    use super::*;
    use seawall::rate_limit::{
        KeyedRateLimitLayer, KeyedRateLimiter, ManualClock, Quota, RateLimitLayer, RateLimited,
        RateLimiter,
    };

    /// A limit of `burst` calls, never refilled (its clock stands still).
    fn limit(burst: u32) -> RateLimitLayer<u32, ManualClock> {
        let quota = Quota::new(seawall::rate_limit::Rate::per_second(1), burst).unwrap();
        RateLimitLayer::from_limiter(RateLimiter::with_clock(quota, ManualClock::new()))
    }

    type Boxed = tower::util::BoxService<u32, u32, BoxError>;

    /// `breaker` around `limit` around an upstream answering every call as `fail` says,
    /// with the count of the upstream's calls.
    fn stack<L>(breaker: CircuitBreakerLayer, limit: L, fail: bool) -> (Boxed, Arc<AtomicUsize>)
    where
        L: Layer<Boxed>,
        L::Service: Service<u32, Response = u32, Error = BoxError> + Send + 'static,
        <L::Service as Service<u32>>::Future: Send + 'static,
    {
        let upstream_calls = Arc::new(AtomicUsize::new(0));
        let counter = upstream_calls.clone();
        let upstream = Boxed::new(tower::service_fn(move |n: u32| {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if fail {
                Err("upstream down".into())
            } else {
                Ok(n)
            })
        }));
        let svc = ServiceBuilder::new()
            .layer(breaker)
            .service(Boxed::new(limit.layer(upstream)));
        (Boxed::new(svc), upstream_calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_burst_against_a_limit_inside_does_not_open_the_breaker() {
        let layer = CircuitBreakerLayer::new(config().build().unwrap());
        let breaker = layer.breaker().clone();
        let (mut svc, upstream_calls) = stack(layer, limit(1), false);
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
        for i in 0..9 {
            let err = svc.ready().await.unwrap().call(i).await.unwrap_err();
            assert!(
                err.is::<RateLimited>(),
                "call {i}: {err}, not the limit's refusal: {:?}",
                breaker.snapshot()
            );
        }
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 1);
        assert_eq!(breaker.state(), State::Closed, "{:?}", breaker.snapshot());
        let snapshot = breaker.snapshot();
        assert_eq!((snapshot.calls, snapshot.failed_calls), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_without_a_key_do_not_open_the_breaker() {
        let layer = CircuitBreakerLayer::new(config().build().unwrap());
        let breaker = layer.breaker().clone();
        let quota = Quota::new(seawall::rate_limit::Rate::per_second(100), 100).unwrap();
        let keyed = KeyedRateLimitLayer::from_limiter(
            KeyedRateLimiter::with_clock(quota, ManualClock::new()),
            |n: &u32| (*n != 0).then_some(*n),
        );
        let (mut svc, upstream_calls) = stack(layer, keyed, false);
        for _ in 0..8 {
            let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
            assert!(err.is::<seawall::rate_limit::MissingKey>(), "{err}");
        }
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 0);
        assert_eq!(breaker.state(), State::Closed, "{:?}", breaker.snapshot());
        assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_refused_by_a_limit_inside_does_not_decide_half_open() {
        let layer = CircuitBreakerLayer::new(one_probe());
        let breaker = layer.breaker().clone();
        // Four calls' worth of tokens before an upstream failing every call.
        let (mut svc, upstream_calls) = stack(layer, limit(4), true);
        for i in 0..4 {
            let err = svc.ready().await.unwrap().call(i).await.unwrap_err();
            assert!(!err.is::<RateLimited>(), "{err}");
        }
        wait_for_half_open(&breaker).await;
        let err = svc.ready().await.unwrap().call(5).await.unwrap_err();
        assert!(err.is::<RateLimited>(), "{err}");
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 4);
        still_half_open(&breaker);
    }

    /// The same through `HttpClassifier` (a generic limit's error, not the HTTP layer's
    /// marked `429`): an error it did not make itself is still a failure.
    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn the_http_classifier_ignores_a_limits_error_too() {
        use seawall::circuit_breaker::{Classify, HttpClassifier};
        let classifier = HttpClassifier::new();
        let limiter = RateLimiter::with_clock(
            Quota::new(seawall::rate_limit::Rate::per_second(1), 1).unwrap(),
            ManualClock::new(),
        );
        let refused: BoxError = Box::new(limiter.try_acquire(2).unwrap_err());
        let other: BoxError = "connection refused".into();
        let result = |e| -> Result<&http::Response<()>, &BoxError> { Err(e) };
        assert_eq!(classifier.classify(result(&refused)), Outcome::Ignored);
        assert_eq!(classifier.classify(result(&other)), Outcome::Failure);
    }
}

#[cfg(feature = "metrics")]
mod metrics_reporting {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[tokio::test(start_paused = true)]
    async fn counters_and_gauge_are_reported() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (mut svc, _breaker, _) = metrics::with_local_recorder(&recorder, || {
            scripted(config().name("metered").build().unwrap())
        });
        calls(&mut svc, Do::Succeed, 1).await;
        calls(&mut svc, Do::Fail, 3).await;
        let _ = call(&mut svc, Do::Succeed).await; // rejected
        // Transition counters are looked up when the transition happens.
        let values: Vec<(String, Vec<String>, DebugValue)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let k = key.key();
                let labels = k
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                (k.name().to_string(), labels, value)
            })
            .collect();
        let find = |name: &str, label: &str| {
            values
                .iter()
                .find(|(n, l, _)| n == name && (label.is_empty() || l.iter().any(|x| x == label)))
                .map(|(_, _, v)| v)
        };
        assert_eq!(
            find("seawall_circuit_breaker_calls_total", "outcome=success"),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(
            find("seawall_circuit_breaker_calls_total", "outcome=failure"),
            Some(&DebugValue::Counter(3))
        );
        assert_eq!(
            find(
                "seawall_circuit_breaker_rejected_calls_total",
                "breaker=metered"
            ),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(
            find("seawall_circuit_breaker_state", "breaker=metered"),
            Some(&DebugValue::Gauge(1.0.into())),
            "gauge shows open"
        );
    }

    /// Once the window is full of successes a success changes nothing in it, but the
    /// metric still counts every one.
    #[tokio::test(start_paused = true)]
    async fn every_success_is_counted_past_a_clean_window() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (mut svc, _breaker, _) = metrics::with_local_recorder(&recorder, || {
            scripted(config().name("clean").build().unwrap())
        });
        calls(&mut svc, Do::Succeed, 25).await;
        let successes = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, ..)| {
                let k = key.key();
                k.name() == "seawall_circuit_breaker_calls_total"
                    && k.labels().any(|l| l.value() == "success")
            })
            .map(|(.., value)| value);
        assert_eq!(successes, Some(DebugValue::Counter(25)));
    }
}

#[tokio::test(start_paused = true)]
async fn typed_errors_keep_the_inner_error_type_and_reject_without_boxing() {
    use seawall::circuit_breaker::Error;

    #[derive(Debug, PartialEq)]
    struct Teapot;
    impl std::fmt::Display for Teapot {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("teapot")
        }
    }
    impl std::error::Error for Teapot {}

    let layer = CircuitBreakerLayer::new(config().build().unwrap()).typed_errors();
    let breaker = layer.breaker().clone();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|fail: bool| async move { if fail { Err(Teapot) } else { Ok("ok") } });
    for _ in 0..4 {
        match svc.ready().await.unwrap().call(true).await {
            Err(Error::Inner(Teapot)) => {}
            other => panic!("expected the inner error, got {other:?}"),
        }
    }
    assert_eq!(breaker.state(), State::Open);
    let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
    assert!(err.is_open());
    let open = err.as_open().unwrap();
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
    assert_eq!(err.to_string(), "circuit breaker 'test' is open");
    assert!(seawall::fallback::is_circuit_open(&err));
    // Converts into `BoxError` for outer layers, flat: the rejection itself.
    let boxed: BoxError = err.into();
    assert!(boxed.is::<Rejection>());
    assert!(seawall::fallback::is_circuit_open(&boxed));
}

#[tokio::test(start_paused = true)]
async fn a_decision_taken_before_the_breaker_opened_is_not_honoured() {
    let (mut svc, breaker, inner_calls) = scripted(config().build().unwrap());
    // Ready while closed...
    svc.ready().await.unwrap();
    // ...then the breaker opens before the call is made.
    breaker.force_open();
    let open = rejection(svc.call(Do::Succeed).await);
    assert_eq!(open.state(), State::ForcedOpen);
    assert_eq!(
        inner_calls.load(Ordering::SeqCst),
        0,
        "the inner service was not called"
    );
    // And a reset in between moves the call to the new closed period.
    breaker.reset();
    svc.ready().await.unwrap();
    breaker.reset();
    call(&mut svc, Do::Fail).await.unwrap_err();
    svc.ready().await.unwrap();
    breaker.reset();
    svc.call(Do::Fail).await.unwrap_err();
    assert_eq!(
        breaker.snapshot().failed_calls,
        1,
        "counted in the current window"
    );
}

#[tokio::test(start_paused = true)]
async fn callbacks_may_use_the_breaker() {
    let (mut svc, breaker, _) = scripted(config().build().unwrap());
    let handle = breaker.clone();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    breaker.on_event(move |e| {
        // Runs after the transition lock is released: reading or driving the breaker from
        // a callback does not deadlock.
        let snap = handle.snapshot();
        sink.lock().push((*e.kind(), snap.state));
        if snap.state == State::Open {
            handle.reset();
        }
    });
    calls(&mut svc, Do::Fail, 4).await;
    assert_eq!(breaker.state(), State::Closed, "the callback reset it");
    assert_eq!(
        *seen.lock(),
        vec![
            (
                EventKind::StateTransition {
                    from: State::Closed,
                    to: State::Open
                },
                State::Open
            ),
            (
                EventKind::StateTransition {
                    from: State::Open,
                    to: State::Closed
                },
                State::Closed
            ),
        ]
    );
}

#[test]
fn half_open_deadline_is_enforced_without_a_runtime() {
    let breaker = Breaker::new(
        config()
            .wait_in_open(Duration::from_millis(2))
            .max_wait_in_half_open(Duration::from_millis(2))
            .build()
            .unwrap(),
    );
    let mut svc = CircuitBreaker::with_breaker(
        tower::service_fn(|fail: bool| async move { if fail { Err("boom") } else { Ok("ok") } }),
        breaker.clone(),
    );
    futures::executor::block_on(async {
        for _ in 0..4 {
            let _ = svc.ready().await.unwrap().call(true).await;
        }
    });
    std::thread::sleep(Duration::from_millis(3));
    futures::executor::block_on(async {
        // Takes a probe permit, then drops it unused.
        svc.ready().await.unwrap();
    });
    assert_eq!(breaker.state(), State::HalfOpen);
    drop(svc);
    std::thread::sleep(Duration::from_millis(3));
    let mut svc = CircuitBreakerLayer::from_breaker(breaker.clone())
        .typed_errors()
        .layer(tower::service_fn(|_: bool| async move {
            Ok::<_, BoxError>("ok")
        }));
    futures::executor::block_on(async {
        // The permit is free again, but the half-open deadline has passed: open again.
        let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
        assert_eq!(err.as_open().unwrap().state(), State::Open);
    });
}

/// Issue 12, item 3: on paused time, the call made right after `advance()` past the open
/// wait, before the timer task has had a chance to run, is the first probe (it used to be
/// rejected with `retry_after == Some(0)`).
#[tokio::test(start_paused = true)]
async fn first_call_right_after_the_open_wait_is_a_probe_before_the_timer_runs() {
    let (mut svc, breaker, inner_calls) = scripted(config().build().unwrap());
    calls(&mut svc, Do::Fail, 4).await;
    assert_eq!(breaker.state(), State::Open);
    // A rejection while open, as traffic goes on.
    let open = rejection(call(&mut svc, Do::Succeed).await);
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
    let before = inner_calls.load(Ordering::SeqCst);

    advance(Duration::from_secs(10)).await;
    // No yield in between: the timer task may not have run.
    let result = call(&mut svc, Do::Succeed).await;
    if let Err(e) = &result {
        let open = e.downcast_ref::<Rejection>();
        panic!(
            "first call after the open wait: {e} (state {:?}, retry_after {:?})",
            open.map(Rejection::state),
            open.map(Rejection::retry_after)
        );
    }
    assert_eq!(inner_calls.load(Ordering::SeqCst), before + 1, "admitted");
    assert_eq!(breaker.state(), State::HalfOpen);
    // The (late) timer of that open period must not disturb the half-open episode.
    settle().await;
    assert_eq!(breaker.state(), State::HalfOpen);
    call(&mut svc, Do::Succeed).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

/// Issue 12, item 3: a caller that drives each call with its own `block_on` on a
/// current-thread runtime never lets the breaker's timer task run; after the open wait its
/// first call must still be admitted as a probe (it used to take 63 more rejections).
/// Real time: a 50 ms open wait and a bounded sleep just past it.
#[test]
fn first_call_after_the_open_wait_is_a_probe_when_each_call_has_its_own_block_on() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wait = Duration::from_millis(50);
    let (mut svc, breaker, inner_calls) = scripted(config().wait_in_open(wait).build().unwrap());
    for _ in 0..4 {
        let _ = rt.block_on(call(&mut svc, Do::Fail));
    }
    assert_eq!(breaker.state(), State::Open);
    // Tripped inside `block_on`, so the timer task is armed on `rt`, which is never left
    // idle long enough to run it.
    let open = rejection(rt.block_on(call(&mut svc, Do::Succeed)));
    assert!(
        open.retry_after()
            .is_some_and(|d| d > Duration::ZERO && d <= wait)
    );
    let before = inner_calls.load(Ordering::SeqCst);

    std::thread::sleep(wait + Duration::from_millis(10));
    let result = rt.block_on(call(&mut svc, Do::Succeed));
    if let Err(e) = &result {
        let open = e.downcast_ref::<Rejection>();
        panic!(
            "first call after the open wait: {e} (state {:?}, retry_after {:?})",
            open.map(Rejection::state),
            open.map(Rejection::retry_after)
        );
    }
    assert_eq!(inner_calls.load(Ordering::SeqCst), before + 1, "admitted");
    assert_eq!(breaker.state(), State::HalfOpen);
    rt.block_on(call(&mut svc, Do::Succeed)).unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

/// The admission API for work that is not a tower service: tickets record outcomes, a
/// rejected acquisition says when to retry, and a probe ticket dropped unrecorded gives its
/// slot back instead of wedging the breaker half-open.
#[tokio::test(start_paused = true)]
async fn tickets_guard_work_that_is_not_a_service() {
    let breaker = Breaker::new(
        config()
            .sliding_window(SlidingWindow::count_based(4))
            .minimum_calls(4)
            .permitted_calls_in_half_open(1)
            .build()
            .unwrap(),
    );
    breaker.try_acquire().unwrap().success();
    breaker.try_acquire().unwrap().record(Outcome::Ignored);
    for _ in 0..2 {
        breaker.try_acquire().unwrap().failure();
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "3 recorded, ignored one not counted"
    );
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Open, "3 failures of 4");
    let open = breaker.try_acquire().unwrap_err();
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));

    tokio::time::advance(Duration::from_secs(10)).await;
    let probe = breaker.try_acquire().expect("a probe after the open wait");
    assert!(breaker.try_acquire().is_err(), "one probe at a time");
    drop(probe);
    let probe = breaker
        .try_acquire()
        .expect("the dropped probe's slot came back");
    probe.success();
    assert_eq!(breaker.state(), State::Closed);

    breaker.disable();
    let ticket = breaker.try_acquire().unwrap();
    ticket.failure();
    assert_eq!(
        breaker.snapshot().failed_calls,
        0,
        "disabled: nothing recorded"
    );
}

/// `State::ForcedOpen`: "every call is rejected until reset". A service made ready while
/// the breaker was disabled keeps that decision, and its call reaches the inner service
/// after the breaker was forced open.
#[tokio::test(start_paused = true)]
async fn ready_while_disabled_does_not_bypass_a_force_open() {
    let breaker = Breaker::new(CircuitBreakerConfig::builder().name("r1").build().unwrap());
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let counter = inner_calls.clone();
    let mut svc = CircuitBreaker::with_breaker(
        tower::service_fn(move |_: ()| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>("reached the dependency") }
        }),
        breaker.clone(),
    );
    breaker.disable();
    svc.ready().await.unwrap();
    // The operator takes the dependency out before the call is made.
    breaker.force_open();
    let result = svc.call(()).await;
    assert_eq!(
        inner_calls.load(Ordering::SeqCst),
        0,
        "inner service called while forced open: {result:?}"
    );
    assert!(result.unwrap_err().is::<CircuitOpen>());
}

/// `max_wait_in_half_open`: "Opens the breaker again when the probes have not all
/// completed within max". With each call driven by its own `block_on` (the pattern the
/// open state was fixed for), the armed timer never runs and the admission path skips
/// the deadline check, so the breaker stays half-open and busy past its deadline.
#[test]
fn the_half_open_deadline_holds_when_each_call_has_its_own_block_on() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let breaker = Breaker::new(
        CircuitBreakerConfig::builder()
            .name("r2")
            .sliding_window(SlidingWindow::count_based(4))
            .minimum_calls(4)
            .wait_in_open(Duration::from_millis(20))
            .permitted_calls_in_half_open(1)
            .max_wait_in_half_open(Duration::from_millis(20))
            .build()
            .unwrap(),
    );
    let svc = CircuitBreakerLayer::from_breaker(breaker.clone())
        .typed_errors()
        .layer(tower::service_fn(|fail: bool| async move {
            if fail {
                Err::<&str, BoxError>("boom".into())
            } else {
                Ok("ok")
            }
        }));
    let mut a = svc.clone();
    for _ in 0..4 {
        let _ = rt.block_on(async { a.ready().await.unwrap().call(true).await });
    }
    assert_eq!(breaker.state(), State::Open);
    std::thread::sleep(Duration::from_millis(30));
    // A ready service holds the only probe permit and is neither called nor dropped.
    let mut holder = svc.clone();
    rt.block_on(async {
        holder.ready().await.unwrap();
    });
    assert_eq!(breaker.state(), State::HalfOpen);
    std::thread::sleep(Duration::from_millis(40));
    let mut b = svc.clone();
    let err = rt
        .block_on(async { b.ready().await.unwrap().call(false).await })
        .unwrap_err();
    let state = err.as_open().map(|r| r.state());
    assert_eq!(
        state,
        Some(State::Open),
        "the half-open deadline passed 20 ms ago; breaker state {:?}",
        breaker.state()
    );
    drop(holder);
}

/// Callbacks are documented to receive "every later event"; a callback that drives the
/// breaker (supported: `callbacks_may_use_the_breaker`) makes the *other* callbacks see
/// the nested transition before the one that caused it, while the channel, published
/// under the lock, has them in order.
#[tokio::test(start_paused = true)]
async fn callbacks_see_transitions_in_the_order_they_happened() {
    let breaker = Breaker::new(
        CircuitBreakerConfig::builder()
            .name("r3")
            .sliding_window(SlidingWindow::count_based(2))
            .minimum_calls(2)
            .build()
            .unwrap(),
    );
    // An operator's auto-reset hook...
    let handle = breaker.clone();
    breaker.on_event(move |e| {
        if let EventKind::StateTransition {
            to: State::Open, ..
        } = *e.kind()
        {
            handle.reset();
        }
    });
    // ...and an audit log.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    breaker.on_event(move |e| {
        if let EventKind::StateTransition { from, to } = *e.kind() {
            sink.lock().unwrap().push((from, to));
        }
    });
    let mut channel = breaker.subscribe();
    for _ in 0..2 {
        breaker.try_acquire().unwrap().failure();
    }
    let mut from_channel = Vec::new();
    while let Ok(e) = channel.try_recv() {
        if let EventKind::StateTransition { from, to } = *e.kind() {
            from_channel.push((from, to));
        }
    }
    let expected = vec![(State::Closed, State::Open), (State::Open, State::Closed)];
    assert_eq!(from_channel, expected, "the channel's order");
    assert_eq!(*seen.lock().unwrap(), expected, "the callback's order");
}

/// On real time an open breaker's rejections compare the time-stamp counter with the
/// deadline, converted once when it opened, instead of reading the time: before the
/// wait is over it refuses, after it the probe goes through (and the breaker half-opens)
/// as on the clock.
#[tokio::test]
async fn on_real_time_an_open_breaker_refuses_then_probes_after_its_wait() {
    let breaker = Breaker::new(
        CircuitBreakerConfig::builder()
            .sliding_window(SlidingWindow::count_based(2))
            .minimum_calls(2)
            .wait_in_open(Duration::from_millis(500))
            .permitted_calls_in_half_open(1)
            .build()
            .unwrap(),
    );
    for _ in 0..2 {
        breaker.try_acquire().unwrap().failure();
    }
    assert_eq!(breaker.state(), State::Open);
    for _ in 0..1000 {
        let refused = breaker.try_acquire().expect_err("open: refused");
        assert!(refused.retry_after().is_some());
    }
    // Slept past the wait (only a lower bound matters: the deadline has passed), the
    // thread blocked: the breaker's timer, a task of this current-thread runtime, does
    // not run, so the admission itself must see that the wait is over.
    std::thread::sleep(Duration::from_millis(550));
    let probe = breaker.try_acquire().expect("the wait is over: a probe");
    assert_eq!(breaker.state(), State::HalfOpen);
    probe.success();
    assert_eq!(breaker.state(), State::Closed);
}

/// Every half-open episode arms a task that sleeps until `max_wait_in_half_open`, and
/// nothing cancelled it when the episode ended early (its probes succeeded): a dependency
/// that flaps every few seconds with a long half-open bound piled up one sleeping task per
/// episode (each holding the breaker's allocation), `max_wait_in_half_open /
/// wait_in_open` of them per breaker. A transition aborts the timer of the state it
/// leaves: at most one per breaker.
#[tokio::test(start_paused = true)]
async fn finished_half_open_episodes_leave_no_timer_tasks_behind() {
    let (mut svc, breaker, _) = scripted(
        config()
            .sliding_window(SlidingWindow::count_based(1))
            .minimum_calls(1)
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_secs(1))
            .max_wait_in_half_open(Duration::from_secs(3600))
            .build()
            .unwrap(),
    );
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..100 {
        call(&mut svc, Do::Fail).await.unwrap_err();
        assert_eq!(breaker.state(), State::Open);
        advance(Duration::from_secs(1)).await;
        settle().await;
        call(&mut svc, Do::Succeed).await.unwrap();
        assert_eq!(breaker.state(), State::Closed);
        settle().await;
    }
    let alive = metrics.num_alive_tasks() - before;
    assert!(
        alive <= 1,
        "{alive} timer tasks still sleep for half-open episodes that ended long ago"
    );
}

/// `max_wait_in_half_open`: "Opens the breaker again when the probes have not all
/// completed within `max`." Where no timer task can run (`try_acquire` from plain threads,
/// the documented way to guard blocking work), the deadline was enforced only when the
/// next call was admitted: a probe that completed after it still decided the episode,
/// and a late success closed the breaker (with a timer, the same breaker is open by then
/// and the late outcome counts for nothing). Sleeps only set lower bounds here.
#[test]
fn late_probe_after_half_open_deadline_does_not_close_without_a_timer() {
    let breaker = Breaker::new(
        CircuitBreakerConfig::builder()
            .name("late-probe")
            .sliding_window(SlidingWindow::count_based(2))
            .minimum_calls(2)
            .wait_in_open(Duration::from_millis(20))
            .permitted_calls_in_half_open(1)
            .max_wait_in_half_open(Duration::from_millis(20))
            .build()
            .unwrap(),
    );
    for _ in 0..2 {
        breaker.try_acquire().expect("closed").failure();
    }
    assert_eq!(breaker.state(), State::Open);
    std::thread::sleep(Duration::from_millis(30));
    // The open wait is over: the one probe.
    let probe = breaker.try_acquire().expect("a probe after the open wait");
    assert_eq!(breaker.state(), State::HalfOpen);
    // The probe outlives the half-open deadline, then succeeds.
    std::thread::sleep(Duration::from_millis(40));
    probe.success();
    assert_ne!(
        breaker.state(),
        State::Closed,
        "a probe that completed 20 ms after max_wait_in_half_open closed the breaker"
    );
    assert!(
        breaker.try_acquire().is_err(),
        "the episode timed out: open again"
    );
}
