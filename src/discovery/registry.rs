//! An in-process registry: discovery without any external service.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Health, Instance, InstanceId, InstanceWatch, Publisher};

/// An in-process service registry: services register instances, clients watch a service's
/// healthy instances. The embedded default of the examples and tests when no Consul agent
/// is configured; it follows the same rules (identity by node and service ID, only passing
/// and dialable instances published, registration guards that deregister on drop).
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
    inner: Arc<Mutex<Services>>,
}

#[derive(Default)]
struct Services {
    by_name: HashMap<Arc<str>, ServiceEntry>,
    /// Numbers registrations, so that a superseded guard cannot deregister its successor.
    next_generation: u64,
}

#[derive(Default)]
struct ServiceEntry {
    publisher: Publisher,
    /// Every registered instance, with whether its check passes and the registration it
    /// belongs to.
    instances: BTreeMap<InstanceId, (Instance, bool, u64)>,
}

impl ServiceEntry {
    fn publish(&self) {
        let healthy = self
            .instances
            .values()
            .filter(|(instance, passing, _)| *passing && dialable(instance))
            .map(|(instance, _, _)| instance.clone())
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
    ///
    /// An instance that cannot be dialed (an empty address or port 0) is registered but
    /// never published, as a Consul watch skips such entries (logged at warn with the
    /// `tracing` feature).
    #[must_use = "dropping the guard deregisters the instance"]
    pub fn register(&self, instance: Instance) -> Registration {
        #[cfg(feature = "tracing")]
        if !dialable(&instance) {
            tracing::warn!(
                service = %instance.service,
                id = %instance.id,
                address = %instance.address,
                port = instance.port,
                "registered instance not published: not dialable"
            );
        }
        let service = instance.service.clone();
        let id = instance.id.clone();
        let mut inner = self.inner.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let entry = inner
            .by_name
            .entry(service.clone())
            .or_insert_with(|| ServiceEntry {
                publisher: live_publisher(),
                ..ServiceEntry::default()
            });
        entry
            .instances
            .insert(id.clone(), (instance, true, generation));
        entry.publish();
        Registration {
            registry: self.clone(),
            service,
            id,
            generation,
        }
    }

    /// Removes an instance; returns whether it was registered.
    pub fn deregister(&self, service: &str, id: &InstanceId) -> bool {
        self.deregister_if(service, id, None)
    }

    /// Removes an instance if it still belongs to registration `generation` (any, when
    /// `None`).
    fn deregister_if(&self, service: &str, id: &InstanceId, generation: Option<u64>) -> bool {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.by_name.get_mut(service) else {
            return false;
        };
        let ours = entry
            .instances
            .get(id)
            .is_some_and(|slot| generation.is_none_or(|g| slot.2 == g));
        if ours {
            entry.instances.remove(id);
            entry.publish();
            // The last instance of a service nobody watches: forgotten, as `watch` forgets
            // such services, so that services registered under names of their own (one
            // per job, tenant or canary) and gone do not grow the registry without bound.
            if entry.instances.is_empty() && entry.publisher.watchers() == 0 {
                inner.by_name.remove(service);
            }
        }
        ours
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
        f: impl FnOnce(&mut (Instance, bool, u64)),
    ) -> bool {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.by_name.get_mut(service) else {
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
        // Services nobody registers or watches any more are forgotten, so that watching
        // arbitrary names cannot grow the registry without bound.
        inner
            .by_name
            .retain(|_, e| !e.instances.is_empty() || e.publisher.watchers() > 0);
        inner
            .by_name
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
            .by_name
            .iter()
            .filter(|(_, e)| !e.instances.is_empty())
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }
}

/// Whether `instance` can be dialed: what every source publishes.
fn dialable(instance: &Instance) -> bool {
    !instance.address.is_empty() && instance.port != 0
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
    generation: u64,
}

impl Registration {
    /// The instance's identity.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }

    /// Sets whether the instance's health check passes (while this registration is the
    /// current one of its identity).
    pub fn set_passing(&self, passing: bool) {
        let generation = self.generation;
        self.registry.update(&self.service, &self.id, |slot| {
            if slot.2 == generation {
                slot.1 = passing;
            }
        });
    }

    /// Deregisters now.
    pub fn deregister(self) {
        drop(self);
    }
}

impl Drop for Registration {
    /// Deregisters the instance, unless a later registration of the same identity
    /// replaced this one.
    fn drop(&mut self) {
        self.registry
            .deregister_if(&self.service, &self.id, Some(self.generation));
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
