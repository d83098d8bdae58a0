//! [`HashBalance`]: consistent hashing by a request key over a Maglev table.

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::Service;
use tower::discover::Discover;

use crate::BoxError;
use crate::circuit_breaker::{Classify, ErrorsAreFailures, Rejection, Ticket};

use super::error::NoEndpoints;
use super::future::{CallGuard, HashResponseFuture};
use super::set::{EndpointSet, Index};
use super::{BalanceBuilder, BalanceEndpoint, BalanceHandle};

/// Consistent hashing: requests with the same key go to the same endpoint while it is in
/// rotation, and when one of N endpoints leaves, only about 1/N of the keys move (a Maglev
/// table of 65 537 entries, Envoy's default, whatever N up to that, so that no change of
/// size remaps every key; entries shared in proportion to weight). Rarely (a chance of
/// about N²/131 074), two endpoints' hashes give them the same walk through the table,
/// and a change then moves up to about twice that share, as in other Maglev
/// implementations; above about 650 endpoints such pairs become common, and each endpoint
/// holds fewer than 100 entries.
///
/// The key comes from the request, so the endpoint is chosen in `call`, not in
/// `poll_ready`: `poll_ready` applies discovery changes and is ready as soon as there is an
/// endpoint; `call` picks the key's endpoint (or, if it is out of rotation or its breaker
/// refuses the request, being half-open with its probe in flight, the key's next choices
/// in a fixed order, so a key's fallback is stable too, down to any endpoint in rotation
/// when there is one), clones its service (`S: Clone`, as hyper's client is) and the
/// response future waits for that clone's readiness before calling it. Requests without
/// a key go to a random endpoint in rotation.
///
/// ```
/// use seawall::balance::{Balance, hash_key};
/// use seawall::discovery::{Instance, InstanceWatch, ServiceDiscover};
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let instances = (0..3)
///     .map(|i| Instance::local("cache", ([127, 0, 0, 1], 7000 + i).into()))
///     .collect();
/// let discover = ServiceDiscover::new(InstanceWatch::fixed(instances), |i: &Instance| {
///     let port = i.port;
///     service_fn(move |_user: String| async move { Ok::<_, seawall::BoxError>(port) })
/// });
/// let mut balance = Balance::builder()
///     .name("cache")
///     .build_hashed(discover, |user: &String| Some(hash_key(user)));
/// let first = balance.ready().await?.call("ada".to_string()).await?;
/// let again = balance.ready().await?.call("ada".to_string()).await?;
/// assert_eq!(first, again);
/// # Ok(())
/// # }
/// ```
pub struct HashBalance<D, F, C = ErrorsAreFailures>
where
    D: Discover,
{
    discover: D,
    pub(crate) set: EndpointSet<D::Key, D::Service>,
    key: F,
    classifier: C,
    rng: u64,
    handle: BalanceHandle,
    discover_closed: bool,
    when_empty: super::WhenEmpty,
    empty_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<D, F, C> HashBalance<D, F, C>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Display,
    D::Service: BalanceEndpoint,
{
    pub(crate) fn from_builder(builder: BalanceBuilder<C>, discover: D, key: F) -> Self {
        let (set, handle) = builder.endpoint_set(Index::Maglev);
        Self {
            discover,
            set,
            key,
            rng: builder.seed,
            classifier: builder.classifier,
            handle,
            discover_closed: false,
            when_empty: builder.when_empty,
            empty_since: None,
        }
    }

    /// Another hashing balancer over the same endpoints, for another thread, as
    /// [`Balance::replica`](super::Balance::replica) is: it follows `discover` and builds
    /// its own Maglev table (the same one, as the endpoints are the same: a key goes to
    /// the same endpoint through either), and shares per endpoint the figures, outlier
    /// detection, ejections and breaker, and the [`handle`](Self::handle).
    ///
    /// ```
    /// use seawall::balance::{Balance, hash_key};
    /// use seawall::discovery::{Instance, InstanceWatch, ServiceDiscover};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), seawall::BoxError> {
    /// let instances: Vec<_> = (0..3)
    ///     .map(|i| Instance::local("cache", ([127, 0, 0, 1], 7000 + i).into()))
    ///     .collect();
    /// let make = |i: &Instance| {
    ///     let port = i.port;
    ///     service_fn(move |_user: String| async move { Ok::<_, seawall::BoxError>(port) })
    /// };
    /// let watch = InstanceWatch::fixed(instances);
    /// let key = |user: &String| Some(hash_key(user));
    /// let mut first = Balance::builder().build_hashed(ServiceDiscover::new(watch.clone(), make), key);
    /// let mut second = first.replica(ServiceDiscover::new(watch, make));
    /// let a = first.ready().await?.call("ada".to_string()).await?;
    /// let b = second.ready().await?.call("ada".to_string()).await?;
    /// assert_eq!(a, b);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn replica(&self, discover: D) -> Self
    where
        F: Clone,
        C: Clone,
    {
        let set = self.set.replica();
        let replicas = set
            .shared
            .replicas
            .load(std::sync::atomic::Ordering::Relaxed) as u64;
        Self {
            discover,
            set,
            key: self.key.clone(),
            rng: super::weights::mix(self.rng ^ replicas.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            classifier: self.classifier.clone(),
            handle: self.handle.clone(),
            discover_closed: false,
            when_empty: self.when_empty,
            empty_since: None,
        }
    }

    /// A handle to the endpoints' live state.
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

    /// The endpoint `hash` goes to now, with its breaker's ticket: the first of the key's
    /// choices that is in rotation and whose breaker (if any) admits the request (one
    /// half-open with its probes in flight does not). The owner, else its next choices in
    /// the table; past a bound (2N + 8 choices, so that a fleet-wide outage costs O(N)),
    /// the first such endpoint around a ring of the endpoints' hashes from the key's
    /// point, which finds one whenever there is one. When every endpoint in rotation
    /// refuses, a breaker's rejection (as [`Balance`](super::Balance) fails fast); with
    /// none in rotation, the owner, if its breaker admits the request.
    ///
    /// The owner in rotation and admitting the request (nearly every call) is decided
    /// inline, the rest out of line.
    #[inline(always)]
    pub(crate) fn pick(&self, hash: u64) -> Result<(usize, Option<Ticket>), Rejection> {
        let at = self.set.maglev.lookup(hash, 0);
        let slot = &self.set.slots[at];
        let refused = if slot.available() {
            match &slot.breaker {
                None => return Ok((at, None)),
                Some(breaker) => match breaker.try_acquire() {
                    Ok(ticket) => return Ok((at, Some(ticket))),
                    Err(rejection) => Some(rejection),
                },
            }
        } else {
            None
        };
        self.pick_next(hash, refused)
    }

    /// [`pick`](Self::pick) past the owner, with its breaker's refusal if it refused.
    #[cold]
    #[inline(never)]
    fn pick_next(
        &self,
        hash: u64,
        mut refused: Option<Rejection>,
    ) -> Result<(usize, Option<Ticket>), Rejection> {
        let n = self.set.len() as u64;
        for attempt in 1..(2 * n + 8) {
            let at = self.set.maglev.lookup(hash, attempt);
            if let Some(ticket) = self.admit(at, &mut refused) {
                return Ok((at, ticket));
            }
        }
        // The key's choices in the table are spent.
        for at in self.set.maglev.ring(hash) {
            if let Some(ticket) = self.admit(at, &mut refused) {
                return Ok((at, ticket));
            }
        }
        if let Some(rejection) = refused {
            return Err(rejection);
        }
        let at = self.set.maglev.lookup(hash, 0);
        let ticket = match &self.set.slots[at].breaker {
            None => None,
            Some(breaker) => Some(breaker.try_acquire()?),
        };
        Ok((at, ticket))
    }

    /// The ticket for a request to the endpoint at `at` (`None` without a breaker) when it
    /// is in rotation and its breaker admits the request; a breaker's refusal is kept in
    /// `refused` (the first one).
    fn admit(&self, at: usize, refused: &mut Option<Rejection>) -> Option<Option<Ticket>> {
        let slot = &self.set.slots[at];
        if !slot.available() {
            return None;
        }
        match &slot.breaker {
            None => Some(None),
            Some(breaker) => match breaker.try_acquire() {
                Ok(ticket) => Some(Some(ticket)),
                Err(rejection) => {
                    refused.get_or_insert(rejection);
                    None
                }
            },
        }
    }

    fn poll_discover(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError>
    where
        D::Error: Into<BoxError>,
    {
        self.set
            .poll_discover(&mut self.discover, &mut self.discover_closed, cx)
            .1
    }
}

impl<D, F, C, Req> Service<Req> for HashBalance<D, F, C>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Display,
    D::Error: Into<BoxError>,
    D::Service: BalanceEndpoint + Service<Req> + Clone,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    F: Fn(&Req) -> Option<u64>,
    C: Classify<<D::Service as Service<Req>>::Response, <D::Service as Service<Req>>::Error>
        + Clone,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = HashResponseFuture<D::Service, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll_discover(cx)?;
        if self.set.is_empty() {
            return super::service::poll_empty(
                self.when_empty,
                self.set
                    .shared
                    .had_endpoints
                    .load(std::sync::atomic::Ordering::Relaxed),
                &mut self.empty_since,
                &self.set.shared.name,
                cx,
            );
        }
        self.empty_since = None;
        self.set.sweep_if_asked();
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if self.set.is_empty() {
            return HashResponseFuture::failed(
                NoEndpoints::new(self.set.shared.name.clone()).into(),
            );
        }
        let hash = match (self.key)(&request) {
            Some(hash) => hash,
            None => crate::util::next_u64(&mut self.rng),
        };
        let (at, ticket) = match self.pick(hash) {
            Ok(picked) => picked,
            Err(rejection) => return HashResponseFuture::failed(Box::new(rejection)),
        };
        let slot = &self.set.slots[at];
        let guard = CallGuard::new(&slot.stats, 0, ticket);
        HashResponseFuture::waiting(
            slot.endpoint.clone(),
            request,
            guard,
            self.classifier.clone(),
        )
    }
}

impl<D, F, C> fmt::Debug for HashBalance<D, F, C>
where
    D: Discover + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashBalance")
            .field("name", &self.set.shared.name)
            .field("endpoints", &self.set.len())
            .field("discover", &self.discover)
            .finish()
    }
}
