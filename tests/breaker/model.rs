//! Property: the breaker, driven by any sequence of call outcomes, call durations and
//! pauses on paused tokio time, agrees at every step with a small reference model of the
//! state machine (count-based window, slow calls, exponential open wait, half-open probes).

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;
use seawall::BoxError;
use seawall::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, Outcome, SlidingWindow, State,
};
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A call that completes after `ms` with this outcome.
    Call { outcome: Outcome, ms: u64 },
    /// Time passes with no call.
    Wait { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        4 => Just(Outcome::Success),
        4 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ];
    prop_oneof![
        4 => (outcome, prop_oneof![3 => Just(0u64), 1 => 0u64..400]).prop_map(|(outcome, ms)| Op::Call { outcome, ms }),
        1 => (1u64..3_000).prop_map(|ms| Op::Wait { ms }),
    ]
}

#[derive(Debug, Clone)]
struct Params {
    window: usize,
    minimum: usize,
    failure_threshold: f64,
    slow_threshold: f64,
    slow_ms: u64,
    wait_ms: u64,
    multiplier: f64,
    max_wait_ms: u64,
    permitted: usize,
}

fn params() -> impl Strategy<Value = Params> {
    (
        1usize..12,
        1u32..=100,
        1u32..=100,
        50u64..300,
        100u64..2_000,
        1u32..4,
        1usize..4,
    )
        .prop_flat_map(|(window, fail, slow, slow_ms, wait_ms, mult, permitted)| {
            (1..=window).prop_map(move |minimum| Params {
                window,
                minimum,
                failure_threshold: f64::from(fail),
                slow_threshold: f64::from(slow),
                slow_ms,
                wait_ms,
                multiplier: f64::from(mult),
                max_wait_ms: wait_ms * 4,
                permitted,
            })
        })
}

/// The reference model, in whole milliseconds.
#[derive(Debug)]
struct Model {
    p: Params,
    now: u64,
    state: State,
    window: VecDeque<(bool, bool)>,
    open_until: u64,
    trips: u32,
    probes_done: usize,
    probes_failed: usize,
    probes_slow: usize,
}

impl Model {
    fn exceeds(&self, total: usize, failed: usize, slow: usize, minimum: usize) -> bool {
        total > 0
            && total >= minimum
            && (failed as f64 * 100.0 >= self.p.failure_threshold * total as f64
                || slow as f64 * 100.0 >= self.p.slow_threshold * total as f64)
    }

    fn open(&mut self) {
        self.trips += 1;
        let wait = (self.p.wait_ms as f64 * self.p.multiplier.powi(self.trips as i32 - 1))
            .min(self.p.max_wait_ms as f64);
        self.open_until = self.now + wait as u64;
        self.state = State::Open;
    }

    fn close(&mut self) {
        self.trips = 0;
        self.window.clear();
        self.state = State::Closed;
    }

    fn half_open(&mut self) {
        self.state = State::HalfOpen;
        self.probes_done = 0;
        self.probes_failed = 0;
        self.probes_slow = 0;
    }

    /// Time passes; the open timer fires on time.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        if self.state == State::Open && self.now >= self.open_until {
            self.half_open();
        }
    }

    /// Returns whether the call was admitted.
    fn call(&mut self, outcome: Outcome, ms: u64) -> bool {
        match self.state {
            State::Closed => {
                self.now += ms;
                let slow = ms >= self.p.slow_ms;
                if outcome != Outcome::Ignored {
                    self.window.push_back((outcome == Outcome::Failure, slow));
                    if self.window.len() > self.p.window {
                        self.window.pop_front();
                    }
                    let failed = self.window.iter().filter(|(f, _)| *f).count();
                    let slow = self.window.iter().filter(|(_, s)| *s).count();
                    if self.exceeds(self.window.len(), failed, slow, self.p.minimum) {
                        self.open();
                    }
                }
                true
            }
            State::HalfOpen => {
                self.now += ms;
                if outcome != Outcome::Ignored {
                    self.probes_done += 1;
                    self.probes_failed += usize::from(outcome == Outcome::Failure);
                    self.probes_slow += usize::from(ms >= self.p.slow_ms);
                    if self.probes_done == self.p.permitted {
                        if self.exceeds(self.probes_done, self.probes_failed, self.probes_slow, 1) {
                            self.open();
                        } else {
                            self.close();
                        }
                    }
                }
                true
            }
            _ => false,
        }
    }
}

fn run(p: Params, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let config = CircuitBreakerConfig::builder()
            .sliding_window(SlidingWindow::count_based(p.window as u32))
            .minimum_calls(p.minimum as u32)
            .failure_rate_threshold(p.failure_threshold / 100.0)
            .slow_call_rate_threshold(p.slow_threshold / 100.0)
            .slow_call_duration(Duration::from_millis(p.slow_ms))
            .wait_in_open(Duration::from_millis(p.wait_ms))
            .exponential_backoff(p.multiplier, Duration::from_millis(p.max_wait_ms))
            .permitted_calls_in_half_open(p.permitted as u32)
            .build()
            .expect("valid config");
        let layer =
            CircuitBreakerLayer::new(config).with_classifier(|r: Result<&Outcome, &BoxError>| {
                match r {
                    Ok(o) => *o,
                    Err(_) => Outcome::Failure,
                }
            });
        let breaker = layer.breaker().clone();
        let mut svc =
            ServiceBuilder::new()
                .layer(layer)
                .service_fn(|(o, ms): (Outcome, u64)| async move {
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    match o {
                        Outcome::Failure => Err::<Outcome, BoxError>("failed".into()),
                        other => Ok(other),
                    }
                });
        let mut model = Model {
            p,
            now: 0,
            state: State::Closed,
            window: VecDeque::new(),
            open_until: 0,
            trips: 0,
            probes_done: 0,
            probes_failed: 0,
            probes_slow: 0,
        };
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Wait { ms } => {
                    tokio::time::advance(Duration::from_millis(ms)).await;
                    model.advance(ms);
                }
                Op::Call { outcome, ms } => {
                    let admitted = model.call(outcome, ms);
                    let result = svc.ready().await.expect("ready").call((outcome, ms)).await;
                    let rejected = result
                        .as_ref()
                        .err()
                        .is_some_and(|e| e.is::<seawall::circuit_breaker::CircuitOpen>());
                    prop_assert_eq!(admitted, !rejected, "step {}: {:?}", i, op);
                }
            }
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            prop_assert_eq!(
                breaker.state(),
                model.state,
                "step {}: {:?}\nmodel: {:?}",
                i,
                op,
                model
            );
            if model.state == State::Closed {
                let snap = breaker.snapshot();
                prop_assert_eq!(snap.calls as usize, model.window.len());
                prop_assert_eq!(
                    snap.failed_calls as usize,
                    model.window.iter().filter(|(f, _)| *f).count()
                );
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: crate::regressions_next_to_source(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn breaker_matches_reference_model(p in params(), ops in prop::collection::vec(op(), 1..120)) {
        run(p, ops)?;
    }
}
