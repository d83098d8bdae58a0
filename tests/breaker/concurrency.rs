//! Many tasks, one breaker: half-open never admits more probes than its permits, and the
//! closed window counts every call exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use seawall::BoxError;
use seawall::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, SlidingWindow, State,
};
use tokio::sync::Semaphore;
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_never_admits_more_than_its_permits() {
    const PERMITS: usize = 3;
    for round in 0..20 {
        let layer = CircuitBreakerLayer::new(
            CircuitBreakerConfig::builder()
                .sliding_window(SlidingWindow::count_based(10))
                .minimum_calls(1)
                .wait_in_open(Duration::from_millis(1))
                .permitted_calls_in_half_open(PERMITS as u32)
                .build()
                .unwrap(),
        );
        let breaker = layer.breaker().clone();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(AtomicUsize::new(0));
        // Probes hold here until the test lets them finish.
        let gate = Arc::new(Semaphore::new(0));
        let svc = {
            let (in_flight, max_in_flight, entered, gate) = (
                in_flight.clone(),
                max_in_flight.clone(),
                entered.clone(),
                gate.clone(),
            );
            ServiceBuilder::new()
                .layer(layer)
                .service_fn(move |fail: bool| {
                    let (in_flight, max_in_flight, entered, gate) = (
                        in_flight.clone(),
                        max_in_flight.clone(),
                        entered.clone(),
                        gate.clone(),
                    );
                    async move {
                        if fail {
                            return Err::<(), BoxError>("boom".into());
                        }
                        entered.fetch_add(1, SeqCst);
                        let now = in_flight.fetch_add(1, SeqCst) + 1;
                        max_in_flight.fetch_max(now, SeqCst);
                        gate.acquire().await.unwrap().forget();
                        in_flight.fetch_sub(1, SeqCst);
                        Ok(())
                    }
                })
        };
        // Trip it, then wait (real time, a lower bound only) for half-open.
        let mut s = svc.clone();
        let _ = s.ready().await.unwrap().call(true).await;
        assert_eq!(breaker.state(), State::Open);
        while breaker.state() != State::HalfOpen {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        const TASKS: usize = 64;
        let gave_up = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let mut s = svc.clone();
            let gave_up = gave_up.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    match s.ready().await.unwrap().call(false).await {
                        Ok(()) => return,
                        Err(e) if e.is::<CircuitOpen>() => tokio::task::yield_now().await,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                gave_up.fetch_add(1, SeqCst);
            }));
        }
        // While the probes hang, every other task is rejected until it gives up. Wait for
        // exactly that point: the probes have entered and everyone else has stopped trying.
        // (Counting rejections instead raced with a probe task that had its permit but had
        // not yet been polled into the inner service.) A leaked permit shows up as a timeout.
        tokio::time::timeout(Duration::from_secs(30), async {
            while gave_up.load(SeqCst) < TASKS - PERMITS || entered.load(SeqCst) < PERMITS {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: {} tasks gave up, {} probes entered",
                gave_up.load(SeqCst),
                entered.load(SeqCst)
            )
        });
        assert_eq!(
            entered.load(SeqCst),
            PERMITS,
            "round {round}: probes admitted"
        );
        assert_eq!(
            max_in_flight.load(SeqCst),
            PERMITS,
            "round {round}: probes in flight"
        );
        assert_eq!(breaker.state(), State::HalfOpen);
        gate.add_permits(10_000);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(breaker.state(), State::Closed, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_outcomes_are_counted_once() {
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .sliding_window(SlidingWindow::count_based(1_000))
            .minimum_calls(1_000)
            .failure_rate_threshold(1.0)
            .build()
            .unwrap(),
    );
    let breaker = layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|fail: bool| async move {
            tokio::task::yield_now().await;
            if fail {
                Err::<(), BoxError>("boom".into())
            } else {
                Ok(())
            }
        });
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                // A quarter of all calls fail.
                let _ = s.ready().await.unwrap().call((t * 100 + i) % 4 == 0).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = breaker.snapshot();
    assert_eq!(snap.calls, 800);
    assert_eq!(snap.failed_calls, 200);
    assert_eq!(breaker.state(), State::Closed);
}

/// Issue 12, item 3: threads that race across the end of the open wait, each driving its
/// calls with its own current-thread runtime, admit exactly the permitted probes, whether the
/// breaker's timer task never runs (tripped on a runtime that then sits idle) or runs at the
/// same moment on another runtime's worker. No call is admitted before the wait is over.
#[test]
fn threads_racing_at_the_open_deadline_admit_only_the_permitted_probes() {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Barrier;
    use std::task::{Context, Poll};
    use tokio::time::Instant;

    const PERMITS: usize = 3;
    const THREADS: usize = 8;
    let wait = Duration::from_millis(20);
    for round in 0..16 {
        let idle_timer = round % 2 == 0;
        let trip_rt = if idle_timer {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
        .enable_all()
        .build()
        .unwrap();
        let layer = CircuitBreakerLayer::new(
            CircuitBreakerConfig::builder()
                .sliding_window(SlidingWindow::count_based(10))
                .minimum_calls(1)
                .wait_in_open(wait)
                .permitted_calls_in_half_open(PERMITS as u32)
                .build()
                .unwrap(),
        );
        let breaker = layer.breaker().clone();
        let entered = Arc::new(AtomicUsize::new(0));
        // Probes hang here, so the half-open episode stays open while the threads race.
        let gate = Arc::new(Semaphore::new(0));
        let svc = {
            let (entered, gate) = (entered.clone(), gate.clone());
            // Typed errors: a rejection says the state that refused it.
            ServiceBuilder::new()
                .layer(layer.typed_errors())
                .service_fn(move |fail: bool| {
                    let gate = gate.clone();
                    if !fail {
                        entered.fetch_add(1, SeqCst);
                    }
                    async move {
                        if fail {
                            return Err::<(), BoxError>("boom".into());
                        }
                        gate.acquire().await.unwrap().forget();
                        Ok(())
                    }
                })
        };
        let mut s = svc.clone();
        let before_trip = Instant::now();
        trip_rt.block_on(async {
            let _ = s.ready().await.unwrap().call(true).await;
        });
        assert_eq!(breaker.state(), State::Open);

        let start = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (mut s, start) = (svc.clone(), start.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    start.wait();
                    let give_up = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < give_up {
                        rt.block_on(s.ready()).unwrap();
                        let mut fut = {
                            let _runtime = rt.enter();
                            Box::pin(s.call(false))
                        };
                        match Pin::new(&mut fut).poll(&mut cx) {
                            // Admitted: held, unfinished, to the end of the round.
                            Poll::Pending => return (Some(Instant::now()), Some(fut)),
                            Poll::Ready(Err(e)) => {
                                let open = e.as_open().unwrap();
                                if open.state() == State::HalfOpen {
                                    // Every permit is taken.
                                    return (None, None);
                                }
                            }
                            Poll::Ready(Ok(())) => panic!("a probe completed while gated"),
                        }
                    }
                    panic!("still rejected 5 s after the open wait");
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let probes = results.iter().filter(|(_, fut)| fut.is_some()).count();
        assert_eq!(
            probes, PERMITS,
            "round {round} (idle timer: {idle_timer}): probes admitted"
        );
        assert_eq!(entered.load(SeqCst), PERMITS, "round {round}: inner calls");
        for (at, _) in &results {
            if let Some(at) = at {
                assert!(
                    at.duration_since(before_trip) >= wait,
                    "round {round}: admitted before the open wait was over"
                );
            }
        }
        assert_eq!(breaker.state(), State::HalfOpen, "round {round}");
        gate.add_permits(PERMITS);
        drop(results);
        drop(trip_rt);
    }
}

/// Outcomes of calls admitted before an operator's `reset()` must not count in the closed
/// period the reset starts. The generation check in `record_closed` happens before the
/// window write, and `transition` emptied the one window slot by slot before it published
/// the new state word: every stale outcome recorded while the reset walked the window
/// passed the check and landed in a slot the reset had already emptied. The reset breaker
/// held tens of thousands of old failures, and its first successful call opened it. Closed
/// periods now take turns between two windows.
#[test]
fn outcomes_admitted_before_a_reset_do_not_leak_into_the_fresh_window() {
    use seawall::circuit_breaker::{Breaker, Ticket};
    use std::sync::atomic::AtomicBool;
    const SIZE: u32 = 1 << 20;
    let breaker = Breaker::new(
        CircuitBreakerConfig::builder()
            .name("reset-race")
            .sliding_window(SlidingWindow::count_based(SIZE))
            .minimum_calls(1_000)
            .failure_rate_threshold(0.5)
            .build()
            .unwrap(),
    );
    for round in 0..3 {
        // A healthy window: the failures below stay far under the threshold.
        for _ in 0..SIZE {
            breaker.try_acquire().expect("closed").success();
        }
        // Every one of these calls is admitted before the reset below.
        let tickets: Vec<Ticket> = (0..300_000)
            .map(|_| breaker.try_acquire().expect("closed"))
            .collect();
        let started = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for (i, t) in tickets.into_iter().enumerate() {
                    if i == 2_000 {
                        started.store(true, SeqCst);
                    }
                    t.failure();
                }
            });
            while !started.load(SeqCst) {
                std::hint::spin_loop();
            }
            assert_eq!(
                breaker.state(),
                State::Closed,
                "round {round}: below the threshold"
            );
            breaker.reset();
        });
        let stale = breaker.snapshot().failed_calls;
        // One successful call after the reset.
        breaker.try_acquire().expect("closed after reset").success();
        assert_eq!(
            (stale, breaker.state()),
            (0, State::Closed),
            "round {round}: failures of calls admitted before reset() counted after it, \
             and a success then tripped the reset breaker"
        );
    }
}
