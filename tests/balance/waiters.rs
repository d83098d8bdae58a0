//! Callers waiting on a [`SharedBalance`] that is not ready: the gateway's routes at
//! start while discovery has not answered (`WaitAtStart`: a Consul agent down when the
//! gateway restarts), every request waiting up to the route timeout. Their number is the
//! request rate times the timeout (2 000 a second for 30 s: 60 000), and each one's
//! registration and departure must cost about the same whatever their number.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use seawall::BoxError;
use seawall::balance::{SharedBalance, SharedCall};
use tower::Service;

/// A service never ready (a balancer waiting for its first endpoint).
struct NeverReady;

impl Service<u64> for NeverReady {
    type Response = u16;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u16, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Pending
    }

    fn call(&mut self, _: u64) -> Self::Future {
        std::future::ready(Ok(0))
    }
}

/// A task's waker: one per caller, as each request is a task of its own.
struct Task;

impl Wake for Task {
    fn wake(self: Arc<Self>) {}
}

/// A caller waiting, and its task's waker.
type Waiting = (
    Pin<Box<SharedCall<NeverReady, u64, std::future::Ready<Result<u16, BoxError>>>>>,
    Waker,
);

/// `n` callers, each with a waker of its own, polled once: each waits (registered).
fn waiting(shared: &SharedBalance<NeverReady>, n: usize) -> Vec<Waiting> {
    (0..n)
        .map(|_| {
            let waker = Waker::from(Arc::new(Task));
            let mut call = Box::pin(shared.call(0u64, None));
            let mut cx = Context::from_waker(&waker);
            assert!(call.as_mut().poll(&mut cx).is_pending());
            (call, waker)
        })
        .collect()
}

/// How long 200 callers take to start waiting and to give up (dropped: the client went
/// away, or its deadline passed); the least of three runs.
fn a_few_come_and_go(shared: &SharedBalance<NeverReady>) -> Duration {
    (0..3)
        .map(|_| {
            let start = tokio::time::Instant::now();
            drop(waiting(shared, 200));
            start.elapsed()
        })
        .min()
        .expect("three runs")
}

/// A caller's registration and departure must cost the same however many others wait.
/// They did not: each registration scanned every waiter registered before it
/// (`will_wake` against each, under the service's lock, which every caller takes) and
/// each departure `retain`ed over all of them, so 60 000 waiters cost billions of
/// comparisons (200 callers: 0.7 ms alone, 54 ms beside 15 000). The bound is loose
/// (ten times, and 10 ms) for a loaded machine; the quadratic cost is far past it.
#[tokio::test]
async fn a_waiting_callers_cost_does_not_grow_with_the_others_waiting() {
    let shared = SharedBalance::new(NeverReady);
    // Warm: the allocator's pools.
    a_few_come_and_go(&shared);
    let alone = a_few_come_and_go(&shared);
    let others = waiting(&shared, 15_000);
    let crowded = a_few_come_and_go(&shared);
    drop(others);
    assert!(
        crowded < alone * 10 + Duration::from_millis(10),
        "200 callers came and went in {alone:?} alone, in {crowded:?} beside 15 000 \
         waiting ones"
    );
}
