//! [`Balance`]: power of two choices or round robin, with readiness reserved in
//! `poll_ready`.

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tower::Service;
use tower::discover::Discover;

use crate::BoxError;
use crate::circuit_breaker::{Admission, Classify, ErrorsAreFailures};

use super::config::{Strategy, WhenEmpty};
use super::error::NoEndpoints;
use super::future::{CallGuard, ResponseFuture};
use super::set::{EndpointSet, Index, Slot};
use super::weights::{mix, reduce};
use super::{BalanceBuilder, BalanceEndpoint, BalanceHandle};

/// A reserved endpoint: picked, ready, and admitted by its breaker.
struct Reserved {
    at: usize,
    /// The endpoint breaker's decision (with its probe slot), `NONE` without a breaker.
    admission: Admission,
}

/// A load balancer over discovered endpoints. See the [module docs](super).
///
/// `poll_ready` applies discovery changes, picks an endpoint with the configured
/// [`Strategy`] among those in rotation (not ejected, breaker not open), and reserves its
/// readiness; `call` sends the request there. Endpoints that are not ready are skipped
/// without waiting for them; it is pending only when none is ready, and then every
/// endpoint (and discovery) will wake it.
///
/// ```
/// use seawall::balance::{Balance, Strategy};
/// use seawall::discovery::{Instance, Registry, ServiceDiscover};
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let registry = Registry::new();
/// let _a = registry.register(Instance::local("users", "127.0.0.1:8081".parse()?));
/// let _b = registry.register(Instance::local("users", "127.0.0.1:8082".parse()?));
/// // One service per instance (in a real program an HTTP client for its address).
/// let discover = ServiceDiscover::new(registry.watch("users"), |i: &Instance| {
///     let port = i.port;
///     service_fn(move |_: ()| async move { Ok::<_, seawall::BoxError>(port) })
/// });
/// let mut users = Balance::builder().strategy(Strategy::RoundRobin).build(discover);
/// let first = users.ready().await?.call(()).await?;
/// let second = users.ready().await?.call(()).await?;
/// assert_ne!(first, second, "round robin alternates");
/// # Ok(())
/// # }
/// ```
pub struct Balance<D, C = ErrorsAreFailures>
where
    D: Discover,
{
    discover: D,
    pub(crate) set: EndpointSet<D::Key, D::Service>,
    strategy: Strategy,
    classifier: C,
    rng: u64,
    cursor: usize,
    ready: Option<Reserved>,
    when_empty: WhenEmpty,
    empty_since: Option<Pin<Box<Sleep>>>,
    handle: BalanceHandle,
    discover_closed: bool,
    /// When the reserved endpoint was picked (peak-EWMA only; 0 otherwise).
    picked_at: u64,
    /// Wakes a pending balancer when an endpoint out of rotation may come back.
    return_timer: Option<Pin<Box<Sleep>>>,
}

impl<D> Balance<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Display,
    D::Service: BalanceEndpoint,
{
    /// A balancer over `discover` with the defaults: power of two choices on outstanding
    /// requests, no outlier detection, no per-endpoint breaker, failing at once when empty.
    pub fn new(discover: D) -> Self {
        Balance::builder().build(discover)
    }
}

impl<D, C> Balance<D, C>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Display,
    D::Service: BalanceEndpoint,
{
    pub(crate) fn from_builder(builder: BalanceBuilder<C>, discover: D) -> Self {
        let (set, handle) = builder.endpoint_set(match builder.strategy {
            Strategy::RoundRobin => Index::Schedule,
            _ => Index::Sampler,
        });
        Self {
            discover,
            set,
            strategy: builder.strategy,
            rng: builder.seed,
            classifier: builder.classifier,
            cursor: 0,
            ready: None,
            when_empty: builder.when_empty,
            empty_since: None,
            handle,
            discover_closed: false,
            picked_at: 0,
            return_timer: None,
        }
    }

    /// Another balancer over the same endpoints, for another thread: it follows
    /// `discover` (a discovery of the same instances, e.g. over a clone of the same
    /// [`InstanceWatch`](crate::discovery::InstanceWatch)) and shares with this one, per
    /// endpoint, the figures it picks by (requests in flight, peak-EWMA latency), the
    /// outlier detection and ejections, and the breaker; and the [`handle`](Self::handle).
    /// Only the picking is its own: its random draws, its round-robin schedule, its
    /// readiness reservation.
    ///
    /// One balancer shared by threads ([`SharedBalance`](super::SharedBalance)) is locked
    /// by every request of every thread; a replica per thread is locked by none of the
    /// others', and an endpoint ejected or broken on one thread is out of rotation on all.
    /// When an endpoint's instance moves (a new address), the first replica to see the
    /// move starts its figures over and the others take those when they see it; a replica
    /// that sees the instance at an address another still holds it at takes those
    /// figures (one that missed a move and its return keeps sharing); a change of weight,
    /// health or tags keeps the figures.
    /// Each replica applies discovery changes when it is polled (or
    /// [`poll_discovery`](Self::poll_discovery) is called): an endpoint removed from
    /// discovery keeps its figures, and an ejection keeps counting against the maximum
    /// ejected share, until the last replica holding it has let it go.
    ///
    /// ```
    /// use seawall::balance::{Balance, OutlierDetection};
    /// use seawall::discovery::{Instance, Registry, ServiceDiscover};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), seawall::BoxError> {
    /// let registry = Registry::new();
    /// let _a = registry.register(Instance::local("users", "127.0.0.1:8081".parse()?));
    /// let make = |i: &Instance| {
    ///     let port = i.port;
    ///     service_fn(move |_: ()| async move { Err::<u16, _>(format!("{port} is down")) })
    /// };
    /// let watch = registry.watch("users");
    /// let mut first = Balance::builder()
    ///     .outlier_detection(OutlierDetection::builder().consecutive_failures(1).build()?)
    ///     .build(ServiceDiscover::new(watch.clone(), make));
    /// let mut second = first.replica(ServiceDiscover::new(watch, make));
    /// assert!(first.ready().await?.call(()).await.is_err());
    /// // The failure on the first ejected the endpoint for both.
    /// assert_eq!(second.handle().ejected(), 1);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn replica(&self, discover: D) -> Self
    where
        C: Clone,
    {
        let set = self.set.replica();
        Self {
            discover,
            rng: set.replica_rng(self.rng),
            set,
            strategy: self.strategy,
            classifier: self.classifier.clone(),
            cursor: 0,
            ready: None,
            when_empty: self.when_empty,
            empty_since: None,
            handle: self.handle.clone(),
            discover_closed: false,
            picked_at: 0,
            return_timer: None,
        }
    }

    /// A handle to the endpoints' live state (ejections, breakers, load).
    pub fn handle(&self) -> &BalanceHandle {
        &self.handle
    }

    /// How many endpoints are in the set.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Applies the discovery changes that are ready, without reserving an endpoint, and
    /// registers `cx`'s waker for the next ones. `poll_ready` does this on every request; a
    /// status page of an idle balancer calls it to show the current endpoints. Between a
    /// successful `poll_ready` and its `call` it does nothing (a change could take the
    /// reserved endpoint away): the next `poll_ready` applies the changes.
    ///
    /// # Errors
    ///
    /// The discovery stream's error (the changes before it are applied).
    pub fn poll_discovery(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError>
    where
        D::Error: Into<BoxError>,
    {
        if self.ready.is_some() {
            return Ok(());
        }
        self.poll_discover(cx)
    }

    /// Applies every discovery change that is ready.
    fn poll_discover(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError>
    where
        D::Error: Into<BoxError>,
    {
        let (changed, result) =
            self.set
                .poll_discover(&mut self.discover, &mut self.discover_closed, cx);
        if changed {
            self.ready = None;
            // (The round-robin cursor goes on from where it was, taken modulo the new
            // schedule: restarting it at every change, with an instance changing every
            // few requests, starved the endpoints late in the schedule.)
        }
        result
    }

    #[inline]
    fn next_random(&mut self) -> u64 {
        crate::util::next_u64(&mut self.rng)
    }

    /// Tries to reserve endpoint `at`: its breaker first, then its readiness.
    #[inline]
    fn try_reserve<Req>(&mut self, at: usize, cx: &mut Context<'_>) -> Attempt
    where
        D::Service: Service<Req>,
        <D::Service as Service<Req>>::Error: Into<BoxError>,
    {
        let slot = &mut self.set.slots[at];
        let admission = match &slot.breaker {
            None => Admission::NONE,
            Some(breaker) => {
                let admission = Admission::ask(breaker);
                if admission.rejects() {
                    return Attempt::Rejected(admission);
                }
                admission
            }
        };
        match slot.endpoint.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                self.ready = Some(Reserved { at, admission });
                Attempt::Reserved
            }
            Poll::Pending => Attempt::Pending,
            Poll::Ready(Err(e)) => {
                // A broken endpoint counts as a failed call for outlier detection.
                slot.stats
                    .complete(crate::circuit_breaker::Outcome::Failure, 0);
                Attempt::Failed(e.into())
            }
        }
    }

    /// The candidate with less load per unit of weight first.
    #[inline]
    fn order(&self, a: usize, b: usize) -> (usize, usize) {
        let (sa, sb) = (&self.set.slots[a], &self.set.slots[b]);
        let a_first = match self.strategy {
            Strategy::PeakEwma { .. } => {
                let now = self.picked_at;
                sa.stats.ewma_cost(now) * f64::from(sb.weight)
                    <= sb.stats.ewma_cost(now) * f64::from(sa.weight)
            }
            _ => {
                u64::from(sa.stats.outstanding()) * u64::from(sb.weight)
                    <= u64::from(sb.stats.outstanding()) * u64::from(sa.weight)
            }
        };
        if a_first { (a, b) } else { (b, a) }
    }

    fn pick<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        D::Service: Service<Req>,
        <D::Service as Service<Req>>::Error: Into<BoxError>,
    {
        self.set.sweep_if_asked();
        let n = self.set.len();
        if let Strategy::PeakEwma { .. } = self.strategy {
            self.picked_at = self.set.shared.clock.now_nanos().max(1);
        }
        match self.strategy {
            Strategy::RoundRobin => {
                let order_len = self.set.schedule.order.len().max(1);
                let at = self.set.schedule.order[self.cursor % order_len] as usize;
                self.cursor = (self.cursor + 1) % order_len;
                if at < n && self.set.slots[at].available() {
                    match self.try_reserve::<Req>(at, cx) {
                        Attempt::Reserved => return Poll::Ready(Ok(())),
                        Attempt::Failed(e) => self.fail(at, e),
                        _ => {}
                    }
                }
            }
            _ if n == 1 => {}
            _ => {
                let r = self.next_random();
                let a = self.set.sampler.sample(r);
                let mut b = self.set.sampler.sample(mix(r));
                if b == a {
                    // Another endpoint, uniformly: the pair must be two.
                    b = (a + 1 + reduce((r >> 17) as u32, (n - 1) as u32)) % n;
                }
                let (a_in, b_in) = (self.set.slots[a].available(), self.set.slots[b].available());
                let (first, second) = match (a_in, b_in) {
                    (true, true) => self.order(a, b),
                    (true, false) => (a, b),
                    (false, true) => (b, a),
                    (false, false) => (usize::MAX, usize::MAX),
                };
                if first != usize::MAX {
                    match self.try_reserve::<Req>(first, cx) {
                        Attempt::Reserved => return Poll::Ready(Ok(())),
                        // Positions move when an endpoint leaves: look again from scratch.
                        Attempt::Failed(e) => {
                            self.fail(first, e);
                            return self.scan::<Req>(cx);
                        }
                        _ => {}
                    }
                    if a_in && b_in {
                        match self.try_reserve::<Req>(second, cx) {
                            Attempt::Reserved => return Poll::Ready(Ok(())),
                            Attempt::Failed(e) => {
                                self.fail(second, e);
                                return self.scan::<Req>(cx);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        self.scan::<Req>(cx)
    }

    /// An endpoint whose `poll_ready` failed is broken for good (the tower contract): it
    /// leaves the set, as in tower's balancer, and counts as a failure for its figures.
    /// Discovery puts it back if its instance changes.
    fn fail(&mut self, at: usize, _error: BoxError) {
        if at >= self.set.len() {
            return;
        }
        let key = self.set.keys[at].clone();
        #[cfg(feature = "tracing")]
        tracing::warn!(
            target: "seawall::balance",
            balancer = %self.set.shared.name,
            endpoint = %key,
            error = %_error,
            "endpoint failed its readiness check and leaves the balancer"
        );
        // A reservation elsewhere keeps pointing at its endpoint after the swap-remove.
        let reserved = self.ready.as_ref().map(|r| self.set.keys[r.at].clone());
        self.set.remove(&key);
        self.set.rebuild();
        if let (Some(reserved), Some(r)) = (reserved, self.ready.as_mut()) {
            match self.set.position(&reserved) {
                Some(at) => r.at = at,
                None => self.ready = None,
            }
        }
    }

    /// Every endpoint in turn from a random start: the first in rotation that is ready;
    /// failing that, any that is ready (when every endpoint is out of rotation, traffic
    /// still flows: Envoy's panic mode). Broken endpoints leave the set.
    #[cold]
    fn scan<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        D::Service: Service<Req>,
        <D::Service as Service<Req>>::Error: Into<BoxError>,
    {
        loop {
            let n = self.set.len();
            if n == 0 {
                return self.poll_empty(cx);
            }
            let start = reduce(self.next_random() as u32, n as u32);
            let mut in_rotation = 0;
            let mut pending = false;
            let mut failed = None;
            let mut rejected = None;
            let mut half_open = None;
            for pass in 0..2 {
                for i in 0..n {
                    let at = (start + i) % n;
                    let available = self.set.slots[at].available();
                    if available {
                        in_rotation += usize::from(pass == 0);
                    }
                    // First pass: endpoints in rotation; second (panic mode, only when none
                    // is in rotation): all of them.
                    if (pass == 0 && !available) || (pass == 1 && available) {
                        continue;
                    }
                    match self.try_reserve::<Req>(at, cx) {
                        Attempt::Reserved => return Poll::Ready(Ok(())),
                        Attempt::Failed(e) => {
                            failed = Some((at, e));
                            break;
                        }
                        Attempt::Rejected(d) => {
                            if self.set.slots[at].breaker.as_ref().is_some_and(|b| {
                                b.state() == crate::circuit_breaker::State::HalfOpen
                            }) {
                                half_open = Some(at);
                            }
                            rejected = Some((at, d));
                        }
                        Attempt::Pending => pending = true,
                    }
                }
                if failed.is_some() || in_rotation > 0 {
                    break;
                }
            }
            if let Some((at, e)) = failed {
                // Remove it and look again over the rest.
                self.fail(at, e);
                continue;
            }
            if !pending {
                if let Some((at, admission)) = rejected {
                    // Every usable endpoint's breaker refused: fail fast with the breaker's
                    // error, as a single breaker would.
                    self.ready = Some(Reserved { at, admission });
                    return Poll::Ready(Ok(()));
                }
            }
            // Pending: the endpoints polled hold our waker, and so does discovery. Endpoints
            // out of rotation come back by the clock: wake up when the first may.
            self.arm_return_timer(cx);
            if let Some(at) = half_open {
                // A half-open breaker refused, its probes in flight: the end of a probe
                // wakes us (one that closes the breaker puts its endpoint back in
                // rotation, and the endpoints not ready may never wake us).
                self.wait_for_probes(at, cx);
            }
            return Poll::Pending;
        }
    }

    /// Registers `cx` for the end of the next probe of an endpoint breaker, then looks at
    /// the half-open breaker of endpoint `at` again: if it has moved (its probe ended
    /// before the registration), `cx` is woken at once.
    #[cold]
    fn wait_for_probes(&self, at: usize, cx: &mut Context<'_>) {
        self.set.shared.wait_for_probes(cx.waker());
        let moved = self.set.slots[at].breaker.as_ref().is_some_and(|b| {
            b.state() != crate::circuit_breaker::State::HalfOpen || !Admission::ask(b).rejects()
        });
        if moved {
            cx.waker().wake_by_ref();
        }
    }

    /// Registers a wake-up for when the first endpoint out of rotation may come back.
    fn arm_return_timer(&mut self, cx: &mut Context<'_>) {
        let Some(after) = self.set.next_return() else {
            self.return_timer = None;
            return;
        };
        let deadline = tokio::time::Instant::now() + after.max(Duration::from_millis(1));
        let timer = self
            .return_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        if timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    fn poll_empty(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        poll_empty(
            self.when_empty,
            self.set
                .shared
                .had_endpoints
                .load(std::sync::atomic::Ordering::Relaxed),
            &mut self.empty_since,
            &self.set.shared.name,
            cx,
        )
    }
}

/// A balancer with no endpoint: fails at once, or waits (for discovery, which holds the
/// task's waker) up to the configured time (with `WaitAtStart`, only until it has had an
/// endpoint).
pub(crate) fn poll_empty(
    when_empty: WhenEmpty,
    had_endpoints: bool,
    empty_since: &mut Option<Pin<Box<Sleep>>>,
    name: &std::sync::Arc<str>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
    let wait = match when_empty {
        WhenEmpty::Fail => None,
        WhenEmpty::WaitAtStart(_) if had_endpoints => None,
        WhenEmpty::Wait(wait) | WhenEmpty::WaitAtStart(wait) => Some(wait),
    };
    let Some(wait) = wait else {
        *empty_since = None;
        return Poll::Ready(Err(NoEndpoints::new(name.clone()).into()));
    };
    // The wait is the balancer's, from when it found itself empty: once it has run out,
    // its elapsed timer is kept, and every poll fails at once until an endpoint appears
    // (the non-empty path drops it). Dropped on expiry, each caller sharing the balancer
    // woken by it started a wait of its own: the k-th waited k times the bound.
    let sleep = empty_since.get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
    match sleep.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(NoEndpoints::new(name.clone()).into())),
        Poll::Pending => Poll::Pending,
    }
}

use std::future::Future as _;

enum Attempt {
    Reserved,
    Rejected(Admission),
    Pending,
    Failed(BoxError),
}

impl<D, C, Req> Service<Req> for Balance<D, C>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Display,
    D::Error: Into<BoxError>,
    D::Service: BalanceEndpoint + Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    C: Classify<<D::Service as Service<Req>>::Response, <D::Service as Service<Req>>::Error>
        + Clone,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<<D::Service as Service<Req>>::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll_discover(cx)?;
        if self.ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.set.is_empty() {
            return self.poll_empty(cx);
        }
        self.empty_since = None;
        self.pick::<Req>(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let Reserved { at, admission } = self
            .ready
            .take()
            .expect("Balance::call without a successful poll_ready");
        let slot: &mut Slot<D::Service> = &mut self.set.slots[at];
        // The breaker may have moved since poll_ready: `start` decides again if so.
        let ticket = match &slot.breaker {
            None => None,
            Some(breaker) => match admission.start(breaker) {
                Ok(ticket) => Some(ticket),
                Err(open) => return ResponseFuture::failed(Box::new(open)),
            },
        };
        // Read once in poll_ready, next to this call.
        let start = self.picked_at;
        let guard = CallGuard::new(&slot.stats, start, ticket);
        let future = slot.endpoint.call(request);
        ResponseFuture::called(future, guard, self.classifier.clone())
    }
}

impl<D, C> fmt::Debug for Balance<D, C>
where
    D: Discover + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("name", &self.set.shared.name)
            .field("strategy", &self.strategy)
            .field("endpoints", &self.set.len())
            .field("discover", &self.discover)
            .finish()
    }
}
