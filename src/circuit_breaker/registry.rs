use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::{Breaker, CircuitBreakerConfig, Snapshot};

/// Breakers kept by name, so that the parts of a program that call one dependency share
/// one breaker and a status page or admin endpoint can list them all.
///
/// Cloning the registry shares it.
///
/// ```
/// use seawall::circuit_breaker::{CircuitBreakerConfig, Registry, State};
///
/// let registry = Registry::new();
/// let config = CircuitBreakerConfig::builder().name("inventory").build()?;
/// let a = registry.get_or_insert(config.clone());
/// let b = registry.get_or_insert(config);
/// a.force_open();
/// assert_eq!(b.state(), State::ForcedOpen);
/// assert_eq!(registry.names(), vec!["inventory".to_string()]);
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Registry {
    breakers: Arc<RwLock<HashMap<String, Breaker>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The breaker named `config.name()`, created from `config` if there is none yet.
    /// An existing breaker keeps its own configuration.
    pub fn get_or_insert(&self, config: CircuitBreakerConfig) -> Breaker {
        if let Some(b) = self.get(config.name()) {
            return b;
        }
        self.breakers
            .write()
            .entry(config.name().to_owned())
            .or_insert_with(|| Breaker::new(config))
            .clone()
    }

    /// The breaker with this name.
    pub fn get(&self, name: &str) -> Option<Breaker> {
        self.breakers.read().get(name).cloned()
    }

    /// Removes the breaker with this name; services holding it keep using it.
    pub fn remove(&self, name: &str) -> Option<Breaker> {
        self.breakers.write().remove(name)
    }

    /// The names of all breakers, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.breakers.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// A snapshot of every breaker, sorted by name.
    pub fn snapshots(&self) -> Vec<(String, Snapshot)> {
        let breakers: Vec<(String, Breaker)> = self
            .breakers
            .read()
            .iter()
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        let mut out: Vec<(String, Snapshot)> = breakers
            .into_iter()
            .map(|(n, b)| (n, b.snapshot()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
