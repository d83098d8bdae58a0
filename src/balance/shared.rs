//! One balancer shared by many callers, without a worker task.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use tokio::time::Instant;
use tower::Service;

use super::error::ReadyTimeout;
use crate::BoxError;

/// Wakes every task waiting on the service: the service keeps one waker (the last it was
/// polled with), the tasks sharing it are many.
#[derive(Default)]
struct Waiters(Mutex<WaiterSet>);

/// The waiting calls' wakers, by call: a call comes and goes in constant time however
/// many wait beside it (tens of thousands while discovery has no endpoint yet, each
/// request waiting out its route's timeout), where a list searched for each cost time
/// quadratic in them, under the lock every request takes.
#[derive(Default)]
struct WaiterSet {
    wakers: std::collections::HashMap<u64, Waker>,
    /// The id of the next call to wait.
    next: u64,
}

impl WaiterSet {
    /// Registers `waker` for the call waiting as `id` (given one now if it has none yet).
    fn register(&mut self, id: &mut Option<u64>, waker: &Waker) {
        let id = *id.get_or_insert_with(|| {
            self.next += 1;
            self.next
        });
        match self.wakers.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut held) => {
                if !held.get().will_wake(waker) {
                    held.insert(waker.clone());
                }
            }
            std::collections::hash_map::Entry::Vacant(free) => {
                free.insert(waker.clone());
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.wakers.len()
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let woken = std::mem::take(&mut self.0.lock().wakers);
        for (_, waker) in woken {
            waker.wake();
        }
    }
}

struct Inner<S> {
    service: Mutex<S>,
    waiters: Arc<Waiters>,
    /// The waker the service is polled with: it wakes every waiter.
    fanout: Waker,
}

/// A service (typically a [`Balance`](super::Balance)) shared by every clone of this
/// handle: each call locks it only to wait for readiness and start the call, never
/// across the response, so concurrent requests run concurrently.
///
/// tower's [`Buffer`](https://docs.rs/tower/latest/tower/buffer/index.html) shares a
/// service through a worker task and a channel (a task hop and an allocation per
/// request); here the caller's own task drives the service. When the service is not
/// ready, every waiting caller is registered and woken together when it may be (the
/// service keeps one waker, which wakes them all); one of them takes the readiness, the
/// others wait again. A caller waits until its deadline at most, then fails with
/// [`ReadyTimeout`] without calling anything.
///
/// Its `tower::Service` implementation is always ready and waits for the inner service
/// in the response future (boxed), without a deadline; [`call`](Self::call) takes one.
///
/// Every call of every clone takes the same lock. Threads that all call at a high rate
/// do better with a [`Balance::replica`](super::Balance::replica) each (in a
/// `SharedBalance` of its own, if its tasks share it): two threads calling one
/// `SharedBalance` took 276 ns a call where a replica each took 142 ns
/// (`benches/balance.rs`, `balance/two_threads`).
///
/// ```
/// use seawall::balance::SharedBalance;
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let shared = SharedBalance::new(service_fn(|n: u32| async move {
///     Ok::<_, seawall::BoxError>(n * 2)
/// }));
/// let (a, b) = (shared.clone(), shared.clone());
/// let (x, y) = tokio::join!(a.call(1, None), b.call(2, None));
/// assert_eq!((x?, y?), (2, 4));
/// # Ok(())
/// # }
/// ```
pub struct SharedBalance<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for SharedBalance<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S> fmt::Debug for SharedBalance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBalance")
            .field("waiting", &self.inner.waiters.0.lock().wakers.len())
            .finish_non_exhaustive()
    }
}

impl<S> SharedBalance<S> {
    /// Shares `service`.
    pub fn new(service: S) -> Self {
        let waiters = Arc::new(Waiters::default());
        Self {
            inner: Arc::new(Inner {
                service: Mutex::new(service),
                fanout: Waker::from(waiters.clone()),
                waiters,
            }),
        }
    }

    /// Runs `f` on the service, with a context whose waker wakes every waiting caller
    /// (to poll it for anything but a call, as [`refresh`](Self::refresh) does).
    pub fn with<R>(&self, f: impl FnOnce(&mut S, &mut Context<'_>) -> R) -> R {
        let mut service = self.inner.service.lock();
        f(&mut service, &mut Context::from_waker(&self.inner.fanout))
    }

    /// Waits until the service is ready (until `deadline` at most) and calls it; the
    /// lock is held only while polling it and starting the call.
    ///
    /// The future fails with the service's error, or with [`ReadyTimeout`] when the
    /// service was not ready by `deadline` (nothing was called).
    pub fn call<Req>(
        &self,
        request: Req,
        deadline: Option<Instant>,
    ) -> SharedCall<S, Req, S::Future>
    where
        S: Service<Req>,
    {
        SharedCall {
            shared: self.clone(),
            deadline,
            waiting: None,
            sleep: None,
            stage: Stage::Waiting {
                request: Some(request),
            },
        }
    }

    /// Polls the service ready for the task of `cx` (registering it as a waiter when it
    /// is not), and starts the call when it is.
    fn poll_start<Req>(
        &self,
        cx: &mut Context<'_>,
        call: &mut CallState<'_, Req>,
    ) -> Poll<Result<S::Future, BoxError>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        let inner = &*self.inner;
        let mut service = inner.service.lock();
        let mut fanout = Context::from_waker(&inner.fanout);
        let mut registered = false;
        let ready = loop {
            match service.poll_ready(&mut fanout) {
                Poll::Ready(ready) => break ready.map_err(Into::into),
                Poll::Pending if registered => {
                    let Some(deadline) = call.deadline else {
                        return Poll::Pending;
                    };
                    let sleep = call
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Not ready by the deadline: nothing was called.
                    break Err(BoxError::from(ReadyTimeout::new()));
                }
                Poll::Pending => {
                    // Registered (again: a wake-up takes every waker), then polled once
                    // more: a wake-up between the first poll and the registration would
                    // otherwise be lost.
                    inner.waiters.0.lock().register(call.waiting, cx.waker());
                    registered = true;
                }
            }
        };
        if let Some(id) = call.waiting.take() {
            inner.waiters.0.lock().wakers.remove(&id);
        }
        Poll::Ready(ready.and_then(|()| match call.request.take() {
            Some(r) => Ok(service.call(r)),
            None => Err(BoxError::from("SharedBalance: polled after completion")),
        }))
    }
}

/// The borrowed parts of a [`SharedCall`] that [`SharedBalance::poll_start`] works on.
struct CallState<'a, Req> {
    request: &'a mut Option<Req>,
    deadline: Option<Instant>,
    /// The call's id among the waiters, if it may be among them: only then is there one
    /// to take out. The common case (ready at once) touches no waiter set.
    waiting: &'a mut Option<u64>,
    /// The deadline's timer, made only once the call has to wait (almost never): a
    /// `Sleep` costs a clone of the runtime's handle and a timer entry, and kept unboxed
    /// it would make every call's future larger.
    sleep: &'a mut Option<Pin<Box<tokio::time::Sleep>>>,
}

pin_project_lite::pin_project! {
    /// The future of [`SharedBalance::call`] (`F` is the service's future).
    //
    // No `S: Service<Req>` bound here: with one, whether the future is `Send` would go
    // through the projection `S::Future`, which rustc cannot always prove inside an
    // `async` block (higher-ranked lifetimes in the request type).
    pub struct SharedCall<S, Req, F> {
        shared: SharedBalance<S>,
        deadline: Option<Instant>,
        waiting: Option<u64>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        #[pin]
        stage: Stage<Req, F>,
    }

    impl<S, Req, F> PinnedDrop for SharedCall<S, Req, F> {
        fn drop(this: Pin<&mut Self>) {
            // Given up while waiting: no waker left behind.
            let this = this.project();
            if let Some(id) = this.waiting.take() {
                this.shared.inner.waiters.0.lock().wakers.remove(&id);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The request until the service is called, then the call's future, in the same
    /// place: the future is as large as the larger of the two, not both.
    #[project = StageProj]
    enum Stage<Req, F> {
        Waiting { request: Option<Req> },
        Calling { #[pin] future: F },
    }
}

impl<S, Req> Future for SharedCall<S, Req, S::Future>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let StageProj::Waiting { request } = this.stage.as_mut().project() {
            let mut state = CallState {
                request,
                deadline: *this.deadline,
                waiting: this.waiting,
                sleep: this.sleep,
            };
            match this.shared.poll_start(cx, &mut state) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(future)) => this.stage.set(Stage::Calling { future }),
            }
        }
        match this.stage.project() {
            StageProj::Calling { future } => future.poll(cx).map_err(Into::into),
            // The request was taken by a call that failed to start.
            StageProj::Waiting { .. } => Poll::Ready(Err(BoxError::from(
                "SharedBalance: polled after completion",
            ))),
        }
    }
}

impl<D, C> SharedBalance<super::Balance<D, C>>
where
    D: tower::discover::Discover + Unpin,
    D::Key: std::hash::Hash + Eq + Clone + fmt::Display,
    D::Error: Into<BoxError>,
    D::Service: super::BalanceEndpoint,
{
    /// Applies ready discovery changes, so that an idle balancer's endpoints are current
    /// (for a status page). Waiting callers still hear of new endpoints.
    pub fn refresh(&self) {
        self.with(|balance, cx| {
            let _ = balance.poll_discovery(cx);
        });
    }
}

impl<S, Req> Service<Req> for SharedBalance<S>
where
    S: Service<Req> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    /// Always ready: the response future waits for the shared service.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        Box::pin(SharedBalance::call(self, request, None))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_test::{assert_pending, assert_ready_ok};
    use tower_test::mock;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn callers_wait_together_and_each_gets_one_readiness() {
        let (service, mut handle) = mock::pair::<u32, u32>();
        handle.allow(0);
        let shared = SharedBalance::new(service);
        let (a, b) = (shared.clone(), shared.clone());
        let mut first = tokio_test::task::spawn(async move { a.call(1, None).await });
        let mut second = tokio_test::task::spawn(async move { b.call(2, None).await });
        assert_pending!(first.poll());
        assert_pending!(second.poll());
        assert_eq!(shared.inner.waiters.0.lock().len(), 2);

        // One readiness: both are woken, one takes it, the other waits again.
        handle.allow(1);
        assert!(first.is_woken() && second.is_woken());
        assert_pending!(first.poll());
        assert_pending!(second.poll());
        let (request, respond) = handle.next_request().await.unwrap();
        assert_eq!(request, 1);
        // The lock is not held across the response: the second call starts meanwhile.
        handle.allow(1);
        assert_pending!(second.poll());
        let (request, respond_2) = handle.next_request().await.unwrap();
        assert_eq!(request, 2);
        respond_2.send_response(20);
        respond.send_response(10);
        assert_eq!(assert_ready_ok!(second.poll()), 20);
        assert_eq!(assert_ready_ok!(first.poll()), 10);
        assert!(
            (shared.inner.waiters.0.lock().len() == 0),
            "no waker left behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_gives_up_at_its_deadline_without_calling() {
        let (service, mut handle) = mock::pair::<u32, u32>();
        handle.allow(0);
        let shared = SharedBalance::new(service);
        let deadline = Instant::now() + Duration::from_millis(100);
        let s = shared.clone();
        let mut waiting = tokio_test::task::spawn(async move { s.call(1, Some(deadline)).await });
        assert_pending!(waiting.poll());
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_pending!(waiting.poll());
        tokio::time::advance(Duration::from_millis(1)).await;
        let err = match waiting.poll() {
            Poll::Ready(Err(e)) => e,
            other => panic!("expected a timeout, got {other:?}"),
        };
        assert!(err.is::<ReadyTimeout>(), "{err}");
        assert!((shared.inner.waiters.0.lock().len() == 0));
        // Nothing reached the service.
        handle.allow(1);
        let mut probe = tokio_test::task::spawn(handle.next_request());
        assert_pending!(probe.poll());
    }

    #[tokio::test]
    async fn a_caller_dropped_while_waiting_leaves_no_waker() {
        let (service, mut handle) = mock::pair::<u32, u32>();
        handle.allow(0);
        let shared = SharedBalance::new(service);
        let mut waiting = tokio_test::task::spawn(shared.call(1, None));
        assert_pending!(waiting.poll());
        assert_eq!(shared.inner.waiters.0.lock().len(), 1);
        drop(waiting);
        assert!((shared.inner.waiters.0.lock().len() == 0));
    }

    #[tokio::test]
    async fn errors_of_the_service_pass_through() {
        let (service, mut handle) = mock::pair::<u32, u32>();
        let mut shared = SharedBalance::new(service);
        handle.send_error("refused");
        let ready = tower::ServiceExt::ready(&mut shared).await.unwrap();
        let err = Service::call(ready, 1).await.unwrap_err();
        assert_eq!(err.to_string(), "refused");
    }
}
