//! Snapshots of a service's instances, published by a source and watched by balancers.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Instance;

/// An immutable snapshot of a service's instances, sorted by [`InstanceId`](super::InstanceId),
/// one entry per identity. Cloning is a reference-count increment.
pub type Instances = Arc<[Instance]>;

/// How fresh a source's last snapshot is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceStatus {
    /// No answer yet: the snapshot is empty because nothing is known, not because nothing
    /// is registered.
    Starting,
    /// The last query succeeded; the snapshot is current.
    Live,
    /// Queries are failing: the snapshot is the last one known, kept while the source is
    /// unreachable.
    Stale {
        /// When the first of the current run of failures happened.
        since: Instant,
        /// How many queries in a row have failed.
        failures: u32,
        /// The last error, as text (never containing a token).
        error: Arc<str>,
    },
}

impl SourceStatus {
    /// Whether the snapshot is current.
    pub fn is_live(&self) -> bool {
        matches!(self, SourceStatus::Live)
    }
}

/// The sending side of an [`InstanceWatch`]: what a discovery source holds.
#[derive(Debug)]
pub struct Publisher {
    instances: watch::Sender<Instances>,
    status: watch::Sender<SourceStatus>,
}

impl Publisher {
    /// A publisher with an empty snapshot, in [`SourceStatus::Starting`].
    pub fn new() -> Self {
        Self::with_status(Vec::new(), SourceStatus::Starting)
    }

    /// A publisher starting from `instances`, reported [`SourceStatus::Live`]: a static list.
    pub fn live(instances: Vec<Instance>) -> Self {
        Self::with_status(instances, SourceStatus::Live)
    }

    fn with_status(instances: Vec<Instance>, status: SourceStatus) -> Self {
        Self {
            instances: watch::Sender::new(normalize(instances)),
            status: watch::Sender::new(status),
        }
    }

    /// Publishes a new snapshot, sorted and with one entry per identity (the last wins),
    /// without the instances that cannot be dialed (an empty address or port 0).
    /// Watchers are woken only when it differs from the current one; returns whether it did.
    pub fn publish(&self, instances: Vec<Instance>) -> bool {
        let next = normalize(instances);
        self.instances.send_if_modified(|current| {
            if **current == *next {
                false
            } else {
                *current = next;
                true
            }
        })
    }

    /// Reports the source's status (woken watchers see the same snapshot).
    pub fn set_status(&self, status: SourceStatus) {
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    /// The current snapshot.
    pub fn current(&self) -> Instances {
        self.instances.borrow().clone()
    }

    /// A new watcher of this publisher.
    pub fn subscribe(&self) -> InstanceWatch {
        InstanceWatch {
            instances: self.instances.subscribe(),
            status: self.status.subscribe(),
        }
    }

    /// How many watchers are alive.
    pub fn watchers(&self) -> usize {
        self.instances.receiver_count()
    }
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

fn normalize(mut instances: Vec<Instance>) -> Instances {
    // What no one can dial (an empty address, port 0) is never published, whichever
    // source sent it: `Instance::port` is "never 0" to every watcher.
    instances.retain(|i| !i.address.is_empty() && i.port != 0);
    // Stable sort, then keep the last entry of each identity.
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out: Vec<Instance> = Vec::with_capacity(instances.len());
    for instance in instances {
        match out.last_mut() {
            Some(last) if last.id == instance.id => *last = instance,
            _ => out.push(instance),
        }
    }
    out.into()
}

/// Watches the instances of one service: the receiving side of every discovery source
/// (a static list, the in-process [`Registry`](super::Registry), Consul).
///
/// Cloning gives an independent watcher of the same source.
#[derive(Clone)]
pub struct InstanceWatch {
    instances: watch::Receiver<Instances>,
    status: watch::Receiver<SourceStatus>,
}

impl InstanceWatch {
    /// A watch of a fixed list that never changes. Instances that cannot be dialed (an
    /// empty address or port 0) are left out, as every source leaves them out.
    pub fn fixed(instances: Vec<Instance>) -> Self {
        // `Publisher` leaves undialable instances out, for every source.
        Publisher::live(instances).subscribe()
    }

    /// The current snapshot, marking it seen.
    pub fn current(&mut self) -> Instances {
        self.instances.borrow_and_update().clone()
    }

    /// The current snapshot, without marking it seen.
    pub fn peek(&self) -> Instances {
        self.instances.borrow().clone()
    }

    /// Whether a snapshot not yet seen through [`current`](Self::current) is waiting. A
    /// closed source reports `false`.
    pub fn has_changed(&self) -> bool {
        self.instances.has_changed().unwrap_or(false)
    }

    /// Waits until a snapshot not yet seen is published. Errors once the source is gone
    /// (its last snapshot stays readable).
    pub async fn changed(&mut self) -> Result<(), SourceClosed> {
        self.instances.changed().await.map_err(|_| SourceClosed(()))
    }

    /// Waits until the snapshot satisfies `f`, and returns it.
    pub async fn wait_for(
        &mut self,
        mut f: impl FnMut(&[Instance]) -> bool,
    ) -> Result<Instances, SourceClosed> {
        let snapshot = self
            .instances
            .wait_for(|s| f(s))
            .await
            .map_err(|_| SourceClosed(()))?;
        Ok(snapshot.clone())
    }

    /// The source's current status.
    pub fn status(&self) -> SourceStatus {
        self.status.borrow().clone()
    }

    /// A receiver of the source's status, to wait for changes.
    pub fn status_receiver(&self) -> watch::Receiver<SourceStatus> {
        self.status.clone()
    }

    pub(crate) fn poll_changed(
        &mut self,
        cx: &mut std::task::Context<'_>,
        pending: &mut Option<(ChangedFuture, std::task::Waker)>,
    ) -> std::task::Poll<Result<(), SourceClosed>> {
        use std::task::Poll;
        match self.instances.has_changed() {
            Ok(true) => {
                *pending = None;
                return Poll::Ready(Ok(()));
            }
            // Nothing new, and the waiting future already holds this task's waker: it
            // will be woken by the next change (a change bumps the version before it
            // notifies, so none can slip between). Balancers poll discovery on every
            // request; this keeps that to one atomic load.
            Ok(false) => {
                if let Some((_, waker)) = pending.as_ref() {
                    if waker.will_wake(cx.waker()) {
                        return Poll::Pending;
                    }
                }
            }
            Err(_) => {}
        }
        // `watch::Receiver::changed` borrows the receiver; a clone in a boxed future polls
        // it without tying the stream's lifetime to it. The future lives while a change is
        // awaited and is replaced after each change, not per request.
        let (fut, waker) = pending.get_or_insert_with(|| {
            let mut rx = self.instances.clone();
            let fut: ChangedFuture =
                Box::pin(async move { rx.changed().await.map_err(|_| SourceClosed(())) });
            (fut, cx.waker().clone())
        });
        if !waker.will_wake(cx.waker()) {
            *waker = cx.waker().clone();
        }
        let out = std::future::Future::poll(fut.as_mut(), cx);
        if out.is_ready() {
            *pending = None;
        }
        out
    }
}

pub(crate) type ChangedFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SourceClosed>> + Send>>;

impl fmt::Debug for InstanceWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceWatch")
            .field("instances", &self.instances.borrow().len())
            .field("status", &*self.status.borrow())
            .finish()
    }
}

/// The discovery source was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceClosed(());

impl fmt::Display for SourceClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("discovery source closed")
    }
}

impl std::error::Error for SourceClosed {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::InstanceId;

    fn inst(node: &str, id: &str, port: u16) -> Instance {
        Instance::new(InstanceId::new(node, id), "s", "127.0.0.1", port)
    }

    #[test]
    fn snapshots_are_sorted_and_deduplicated() {
        let p = Publisher::new();
        assert!(p.publish(vec![
            inst("b", "x", 1),
            inst("a", "x", 2),
            inst("b", "x", 3)
        ]));
        let s = p.current();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].id, InstanceId::new("a", "x"));
        assert_eq!(s[1].port, 3, "the last entry of an identity wins");
    }

    #[tokio::test]
    async fn unchanged_snapshots_do_not_wake_watchers() {
        let p = Publisher::new();
        let mut w = p.subscribe();
        assert!(p.publish(vec![inst("a", "x", 1)]));
        assert!(w.has_changed());
        w.current();
        assert!(!p.publish(vec![inst("a", "x", 1)]));
        assert!(!w.has_changed());
        drop(p);
        assert!(w.changed().await.is_err());
        assert_eq!(w.current().len(), 1, "the last snapshot stays readable");
    }
}
