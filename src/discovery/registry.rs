//! An in-process registry: discovery without any external service.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Health, Instance, InstanceId, InstanceWatch, Publisher};

/// An in-process service registry: services register instances, clients watch a service's
/// healthy instances. The embedded default of the examples and tests when no Consul agent
/// is configured; it follows the same rules (identity by node and service ID, only passing
/// instances published, registration guards that deregister on drop).
///
/// Clones share the registry.
///
/// ```
/// use seawall::discovery::{Instance, Registry};
///
/// let registry = Registry::new();
/// let mut users = registry.watch("users");
/// let guard = registry.register(Instance::local("users", "127.0.0.1:8081".parse().unwrap()));
/// assert_eq!(users.current().len(), 1);
/// guard.set_passing(false); // fails its health check: no longer published
/// assert_eq!(users.current().len(), 0);
/// guard.set_passing(true);
/// drop(guard); // deregistered
/// assert_eq!(users.current().len(), 0);
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<Arc<str>, ServiceEntry>>>,
}

#[derive(Default)]
struct ServiceEntry {
    publisher: Publisher,
    /// Every registered instance, with whether its check passes.
    instances: BTreeMap<InstanceId, (Instance, bool)>,
}

impl ServiceEntry {
    fn publish(&self) {
        let healthy = self
            .instances
            .values()
            .filter(|(_, passing)| *passing)
            .map(|(instance, _)| instance.clone())
            .collect();
        self.publisher.publish(healthy);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `instance` (replacing one with the same identity), passing. The returned
    /// guard deregisters it when dropped.
    #[must_use = "dropping the guard deregisters the instance"]
    pub fn register(&self, instance: Instance) -> Registration {
        let service = instance.service.clone();
        let id = instance.id.clone();
        let mut inner = self.inner.lock();
        let entry = inner
            .entry(service.clone())
            .or_insert_with(|| ServiceEntry {
                publisher: live_publisher(),
                ..ServiceEntry::default()
            });
        entry.instances.insert(id.clone(), (instance, true));
        entry.publish();
        Registration {
            registry: self.clone(),
            service,
            id,
        }
    }

    /// Removes an instance; returns whether it was registered.
    pub fn deregister(&self, service: &str, id: &InstanceId) -> bool {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.get_mut(service) else {
            return false;
        };
        let removed = entry.instances.remove(id).is_some();
        if removed {
            entry.publish();
        }
        removed
    }

    /// Sets whether an instance's health check passes (a failing instance stays registered
    /// but is not published); returns whether the instance is registered.
    pub fn set_passing(&self, service: &str, id: &InstanceId, passing: bool) -> bool {
        self.update(service, id, |slot| slot.1 = passing)
    }

    /// Sets an instance's reported health and weight (a warning instance is still published,
    /// with the weight given); returns whether the instance is registered.
    pub fn set_health(
        &self,
        service: &str,
        id: &InstanceId,
        health: Health,
        weight: std::num::NonZeroU32,
    ) -> bool {
        self.update(service, id, |slot| {
            slot.0.health = health;
            slot.0.weight = weight;
        })
    }

    fn update(
        &self,
        service: &str,
        id: &InstanceId,
        f: impl FnOnce(&mut (Instance, bool)),
    ) -> bool {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.get_mut(service) else {
            return false;
        };
        let Some(slot) = entry.instances.get_mut(id) else {
            return false;
        };
        f(slot);
        entry.publish();
        true
    }

    /// Watches the passing instances of `service` (registered or not yet).
    pub fn watch(&self, service: &str) -> InstanceWatch {
        let mut inner = self.inner.lock();
        inner
            .entry(Arc::from(service))
            .or_insert_with(|| ServiceEntry {
                publisher: live_publisher(),
                ..ServiceEntry::default()
            })
            .publisher
            .subscribe()
    }

    /// The services with at least one registered instance.
    pub fn services(&self) -> Vec<String> {
        let inner = self.inner.lock();
        let mut names: Vec<String> = inner
            .iter()
            .filter(|(_, e)| !e.instances.is_empty())
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }
}

/// A registry answers at once: its snapshots are always live.
fn live_publisher() -> Publisher {
    Publisher::live(Vec::new())
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("services", &self.services())
            .finish()
    }
}

/// A registered instance: deregistered when dropped (or by [`deregister`](Self::deregister)).
pub struct Registration {
    registry: Registry,
    service: Arc<str>,
    id: InstanceId,
}

impl Registration {
    /// The instance's identity.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }

    /// Sets whether the instance's health check passes.
    pub fn set_passing(&self, passing: bool) {
        self.registry.set_passing(&self.service, &self.id, passing);
    }

    /// Deregisters now.
    pub fn deregister(self) {
        drop(self);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.deregister(&self.service, &self.id);
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("service", &self.service)
            .field("id", &self.id)
            .finish()
    }
}
