//! Turning snapshots into a [`tower::discover::Discover`] stream of per-instance services.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use tower::Service;
use tower::discover::Change;

use super::watch::ChangedFuture;
use super::{Instance, InstanceId, InstanceWatch};

/// A service built for one discovered instance, together with the instance it talks to.
///
/// It is a [`Service`] (every call goes to the inner one), so [`ServiceDiscover`] feeds
/// tower's balancers as well as seawall's, which reads the instance's weight and identity.
#[derive(Clone)]
pub struct Endpoint<S> {
    instance: Arc<Instance>,
    service: S,
}

impl<S> Endpoint<S> {
    /// `service`, talking to `instance`.
    pub fn new(instance: Arc<Instance>, service: S) -> Self {
        Self { instance, service }
    }

    /// The instance this endpoint talks to.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    crate::util::inner_service_accessors!(service);
}

impl<S, Request> Service<Request> for Endpoint<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        self.service.call(request)
    }
}

impl<S: fmt::Debug> fmt::Debug for Endpoint<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("instance", &self.instance.id)
            .field("service", &self.service)
            .finish()
    }
}

/// A [`tower::discover::Discover`] stream over an [`InstanceWatch`]: an insert, with a
/// service built by `make`, for every instance that appears or changes (address, port,
/// weight, tags, metadata or health), and a removal for every instance that goes. Keys are
/// [`InstanceId`]s (node and service ID).
///
/// The service of an instance is built once, when it is inserted, and dropped when it is
/// removed, so per-endpoint state (a connection pool, a breaker, a limiter) lives exactly as
/// long as the instance. When the source is dropped, the stream keeps the last instances
/// and never ends.
///
/// ```
/// use seawall::discovery::{Instance, Registry, ServiceDiscover};
/// use tower::discover::Change;
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = Registry::new();
/// let _a = registry.register(Instance::local("users", "127.0.0.1:8081".parse().unwrap()));
/// let mut discover = ServiceDiscover::new(registry.watch("users"), |i: &Instance| i.authority());
/// match discover.next().await {
///     Some(Ok(Change::Insert(id, endpoint))) => {
///         assert_eq!(id.to_string(), "local/users-127.0.0.1:8081");
///         assert_eq!(endpoint.get_ref(), "127.0.0.1:8081");
///     }
///     other => panic!("{other:?}"),
/// }
/// # }
/// ```
pub struct ServiceDiscover<F, S> {
    watch: InstanceWatch,
    make: F,
    current: HashMap<InstanceId, Arc<Instance>>,
    queue: VecDeque<Change<InstanceId, Endpoint<S>>>,
    changed: Option<(ChangedFuture, std::task::Waker)>,
    closed: bool,
}

impl<F, S> ServiceDiscover<F, S>
where
    F: FnMut(&Instance) -> S,
{
    /// Discovers the instances of `watch`, building each one's service with `make`.
    pub fn new(watch: InstanceWatch, make: F) -> Self {
        let mut this = Self {
            current: HashMap::new(),
            queue: VecDeque::new(),
            changed: None,
            closed: false,
            make,
            watch,
        };
        // Read through the watch kept, which marks this snapshot seen: a snapshot
        // published after it is then the next change (read through a clone first, one
        // published in between was marked seen and never applied).
        let snapshot = this.watch.current();
        this.apply(&snapshot);
        this
    }

    /// The instances currently inserted.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether no instance is inserted.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    fn apply(&mut self, snapshot: &[Instance]) {
        let mut next: HashMap<InstanceId, Arc<Instance>> = HashMap::with_capacity(snapshot.len());
        for instance in snapshot {
            next.insert(instance.id.clone(), Arc::new(instance.clone()));
        }
        for id in self.current.keys() {
            if !next.contains_key(id) {
                self.queue.push_back(Change::Remove(id.clone()));
            }
        }
        for (id, instance) in &next {
            let unchanged = self.current.get(id).is_some_and(|old| **old == **instance);
            if !unchanged {
                let service = (self.make)(instance);
                self.queue.push_back(Change::Insert(
                    id.clone(),
                    Endpoint::new(instance.clone(), service),
                ));
            }
        }
        self.current = next;
    }
}

impl<F, S> Unpin for ServiceDiscover<F, S> {}

impl<F, S> Stream for ServiceDiscover<F, S>
where
    F: FnMut(&Instance) -> S,
{
    type Item = Result<Change<InstanceId, Endpoint<S>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if this.closed {
                return Poll::Pending;
            }
            match this.watch.poll_changed(cx, &mut this.changed) {
                Poll::Ready(Ok(())) => {
                    let snapshot = this.watch.current();
                    this.apply(&snapshot);
                }
                Poll::Ready(Err(_)) => {
                    // The source is gone: keep serving the last instances.
                    this.closed = true;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<F, S> fmt::Debug for ServiceDiscover<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceDiscover")
            .field("watch", &self.watch)
            .field("instances", &self.current.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Publisher, Registry};
    use std::future::poll_fn;
    use std::num::NonZeroU32;

    async fn next<F: FnMut(&Instance) -> u16>(
        d: &mut ServiceDiscover<F, u16>,
    ) -> Change<InstanceId, Endpoint<u16>> {
        poll_fn(|cx| Pin::new(&mut *d).poll_next(cx))
            .await
            .unwrap()
            .unwrap()
    }

    fn pending<F: FnMut(&Instance) -> u16>(d: &mut ServiceDiscover<F, u16>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(d).poll_next(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn inserts_changes_and_removes_by_identity() {
        let registry = Registry::new();
        let a = registry.register(Instance::local("s", "127.0.0.1:1".parse().unwrap()));
        let mut built = 0;
        let mut d = ServiceDiscover::new(registry.watch("s"), |i: &Instance| {
            built += 1;
            i.port
        });
        assert!(matches!(next(&mut d).await, Change::Insert(_, e) if *e.get_ref() == 1));
        assert!(pending(&mut d));

        // The same service ID on another node is another instance.
        let other_node = Instance::new(InstanceId::new("node-b", "s-1"), "s", "127.0.0.2", 1);
        let b = registry.register(other_node);
        assert!(matches!(next(&mut d).await, Change::Insert(id, _) if id.node() == "node-b"));
        assert!(pending(&mut d));

        // A weight change reinserts with the new instance.
        registry.set_health(
            "s",
            a.id(),
            crate::discovery::Health::Warning,
            NonZeroU32::new(3).unwrap(),
        );
        match next(&mut d).await {
            Change::Insert(id, e) => {
                assert_eq!(&id, a.id());
                assert_eq!(e.instance().weight.get(), 3);
            }
            Change::Remove(_) => panic!("expected an insert"),
        }
        a.set_passing(false);
        assert!(matches!(next(&mut d).await, Change::Remove(id) if id.node() == "local"));
        drop(b);
        assert!(matches!(next(&mut d).await, Change::Remove(id) if id.node() == "node-b"));
        assert!(pending(&mut d));
        assert!(d.is_empty());
        drop(d);
        assert_eq!(built, 3);
    }

    #[tokio::test]
    async fn a_dropped_source_keeps_the_last_instances() {
        let p = Publisher::live(vec![Instance::local("s", "127.0.0.1:1".parse().unwrap())]);
        let mut d = ServiceDiscover::new(p.subscribe(), |i: &Instance| i.port);
        next(&mut d).await;
        drop(p);
        assert!(pending(&mut d));
        assert_eq!(d.len(), 1);
    }
}
