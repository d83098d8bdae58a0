//! Any configuration, any sequence of calls, pauses and manual operations: building the
//! configuration never panics, the breaker never panics, and half-open never has more
//! probes in flight than its permits.
#![no_main]

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use seawall::BoxError;
use seawall::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, Outcome, SlidingWindow, State,
};
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Debug, Arbitrary)]
struct Input {
    failure_rate: f64,
    slow_rate: f64,
    slow_ms: Option<u16>,
    time_window: Option<(u16, u16)>,
    window: u16,
    minimum: u16,
    wait_ms: u16,
    backoff: Option<(f64, u32)>,
    jitter: f64,
    permitted: u8,
    half_open_max_ms: Option<u16>,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Call {
        fail: bool,
        ignore: bool,
        ms: u8,
    },
    /// Reserve a permit (poll_ready) and keep it, to release or use later.
    Reserve,
    UseReserved {
        fail: bool,
    },
    DropReserved,
    Advance {
        ms: u16,
    },
    ForceOpen,
    Disable,
    Reset,
}

fuzz_target!(|input: Input| {
    let mut b = CircuitBreakerConfig::builder()
        .failure_rate_threshold(input.failure_rate)
        .slow_call_rate_threshold(input.slow_rate)
        .minimum_calls(u32::from(input.minimum))
        .wait_in_open(Duration::from_millis(u64::from(input.wait_ms)))
        .jitter(input.jitter)
        .permitted_calls_in_half_open(u32::from(input.permitted));
    b = match input.time_window {
        Some((ms, buckets)) => b.sliding_window(SlidingWindow::time_based(
            Duration::from_millis(u64::from(ms)),
            u32::from(buckets),
        )),
        None => b.sliding_window(SlidingWindow::count_based(u32::from(input.window))),
    };
    if let Some(ms) = input.slow_ms {
        b = b.slow_call_duration(Duration::from_millis(u64::from(ms)));
    }
    if let Some((m, max_ms)) = input.backoff {
        b = b.exponential_backoff(m, Duration::from_millis(u64::from(max_ms)));
    }
    if let Some(ms) = input.half_open_max_ms {
        b = b.max_wait_in_half_open(Duration::from_millis(u64::from(ms)));
    }
    let Ok(config) = b.build() else { return };
    let permits = config.permitted_calls_in_half_open() as usize;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let layer =
            CircuitBreakerLayer::new(config).with_classifier(|r: Result<&(), &BoxError>| match r {
                Ok(()) => Outcome::Success,
                Err(e) if e.to_string() == "ignore" => Outcome::Ignored,
                Err(_) => Outcome::Failure,
            });
        let breaker = layer.breaker().clone();
        let in_flight = Rc::new(Cell::new(0usize));
        let counter = in_flight.clone();
        let svc = ServiceBuilder::new().layer(layer).service_fn(
            move |(fail, ignore, ms): (bool, bool, u8)| {
                let counter = counter.clone();
                counter.set(counter.get() + 1);
                async move {
                    tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
                    counter.set(counter.get() - 1);
                    match (fail, ignore) {
                        (_, true) => Err::<(), BoxError>("ignore".into()),
                        (true, _) => Err("fail".into()),
                        _ => Ok(()),
                    }
                }
            },
        );
        let mut reserved: Vec<_> = Vec::new();
        let mut main = svc.clone();
        for op in input.ops.into_iter().take(256) {
            match op {
                Op::Call { fail, ignore, ms } => {
                    let _ = main.ready().await.unwrap().call((fail, ignore, ms)).await;
                }
                Op::Reserve => {
                    let mut s = svc.clone();
                    s.ready().await.unwrap();
                    reserved.push(s);
                }
                Op::UseReserved { fail } => {
                    if let Some(mut s) = reserved.pop() {
                        let _ = s.call((fail, false, 0)).await;
                    }
                }
                Op::DropReserved => {
                    reserved.pop();
                }
                Op::Advance { ms } => {
                    tokio::time::advance(Duration::from_millis(u64::from(ms))).await;
                }
                Op::ForceOpen => breaker.force_open(),
                Op::Disable => breaker.disable(),
                Op::Reset => breaker.reset(),
            }
            if breaker.state() == State::HalfOpen {
                assert!(in_flight.get() <= permits);
            }
            let snap = breaker.snapshot();
            assert!(snap.failed_calls <= snap.calls && snap.slow_calls <= snap.calls);
        }
    });
});
