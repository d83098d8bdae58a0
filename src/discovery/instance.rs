//! What a discovered instance is.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

/// The identity of one service instance: the node (agent) it runs on and its service ID.
///
/// Service IDs are unique per agent only: two nodes commonly register the same ID (for
/// example both use the default ID, the service name). Keying instances by the pair keeps
/// them apart, where keying by the service ID alone makes instances silently vanish.
///
/// Cloning is two reference-count increments.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId {
    node: Arc<str>,
    service_id: Arc<str>,
}

impl InstanceId {
    /// The instance `service_id` on `node`.
    pub fn new(node: impl Into<Arc<str>>, service_id: impl Into<Arc<str>>) -> Self {
        Self {
            node: node.into(),
            service_id: service_id.into(),
        }
    }

    /// The node (agent) the instance is registered on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The service ID, unique on its node.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({}/{})", self.node, self.service_id)
    }
}

impl fmt::Display for InstanceId {
    /// `node/service-id`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.service_id)
    }
}

/// How healthy a discovered instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Health {
    /// Every check passes.
    #[default]
    Passing,
    /// Some check warns and none is critical (only reported by sources told to include
    /// warning instances).
    Warning,
}

/// One instance of a service, as a discovery source reports it.
///
/// Sources publish instances sorted by [`InstanceId`], one entry per identity.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Instance {
    /// Node and service ID.
    pub id: InstanceId,
    /// The service name (`users`).
    pub service: Arc<str>,
    /// The host to dial: an IP address or a host name.
    pub address: Arc<str>,
    /// The port to dial (never 0: sources skip undialable entries).
    pub port: u16,
    /// The instance's tags.
    pub tags: Vec<String>,
    /// The instance's metadata.
    pub meta: BTreeMap<String, String>,
    /// Its relative share of traffic (Consul's `Weights.Passing`, or `Weights.Warning`
    /// while a check warns); 1 when the source has no weights.
    pub weight: NonZeroU32,
    /// Its health.
    pub health: Health,
}

impl Instance {
    /// An instance with weight 1, no tags and no metadata.
    pub fn new(
        id: InstanceId,
        service: impl Into<Arc<str>>,
        address: impl Into<Arc<str>>,
        port: u16,
    ) -> Self {
        Self {
            id,
            service: service.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: NonZeroU32::MIN,
            health: Health::Passing,
        }
    }

    /// An instance of `service` at `addr` on node `local`, with the service ID
    /// `service-<addr>` (`users-10.0.0.7:8080`, `users-[::1]:8080`): the usual shape for
    /// in-process registries and static lists. The whole address, not its port alone:
    /// replicas on different hosts usually share a port, and two instances with one ID
    /// are one (the last listed).
    pub fn local(service: &str, addr: SocketAddr) -> Self {
        let id = InstanceId::new("local", format!("{service}-{addr}"));
        Self::new(id, service, addr.ip().to_string(), addr.port())
    }

    /// Sets the weight.
    #[must_use]
    pub fn with_weight(mut self, weight: NonZeroU32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the tags.
    #[must_use]
    pub fn with_tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one metadata entry.
    #[must_use]
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets the health.
    #[must_use]
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// `host:port`, with an IPv6 address in brackets: what goes into a URI's authority.
    pub fn authority(&self) -> String {
        match self.address.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.address, self.port),
        }
    }

    /// The socket address, when the address is an IP address (not a host name).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.address.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.id)
            .field("service", &self.service)
            .field("address", &self.authority())
            .field("tags", &self.tags)
            .field("meta", &self.meta)
            .field("weight", &self.weight)
            .field("health", &self.health)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_brackets_ipv6() {
        let v4 = Instance::new(InstanceId::new("n", "a"), "s", "127.0.0.1", 80);
        let v6 = Instance::new(InstanceId::new("n", "a"), "s", "::1", 80);
        let host = Instance::new(InstanceId::new("n", "a"), "s", "users.local", 80);
        assert_eq!(v4.authority(), "127.0.0.1:80");
        assert_eq!(v6.authority(), "[::1]:80");
        assert_eq!(host.authority(), "users.local:80");
        assert!(host.socket_addr().is_none());
        assert_eq!(v6.socket_addr(), Some("[::1]:80".parse().unwrap()));
    }

    #[test]
    fn identity_is_node_and_service_id() {
        let a = InstanceId::new("node-a", "users");
        let b = InstanceId::new("node-b", "users");
        assert_ne!(a, b);
        assert_eq!(a.to_string(), "node-a/users");
    }
}
