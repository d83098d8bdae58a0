//! Reading `GET /v1/health/service/:service` answers into instances, leniently.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use serde::Deserialize;
use serde_json::Value;

use super::error::ConsulError;
use crate::discovery::{Health, Instance, InstanceId};

/// Why an entry of a health answer was left out of [`HealthResponse::instances`](super::HealthResponse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// Neither `Service.Address` nor `Node.Address` is set.
    NoAddress,
    /// The port is 0 or not a port number.
    NoPort,
    /// The entry is not an object with a `Service` object.
    Malformed,
}

/// An entry of a health answer that could not be used: not dialable, or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkippedEntry {
    /// The entry's `Node.Node` (empty when missing).
    pub node: String,
    /// The entry's `Service.ID` (empty when missing).
    pub service_id: String,
    /// Why it was skipped.
    pub reason: SkipReason,
}

/// What a health answer's body holds.
#[derive(Debug, Default)]
pub(crate) struct ParsedHealth {
    pub(crate) instances: Vec<Instance>,
    pub(crate) skipped: Vec<SkippedEntry>,
    pub(crate) unhealthy: usize,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Entry {
    #[serde(deserialize_with = "lenient")]
    node: NodeInfo,
    #[serde(deserialize_with = "lenient")]
    service: Option<ServiceInfo>,
    #[serde(deserialize_with = "lenient")]
    checks: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct NodeInfo {
    #[serde(deserialize_with = "lenient")]
    node: String,
    #[serde(deserialize_with = "lenient")]
    address: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct ServiceInfo {
    #[serde(rename = "ID", deserialize_with = "lenient")]
    id: String,
    #[serde(deserialize_with = "lenient")]
    service: String,
    #[serde(deserialize_with = "lenient")]
    tags: Vec<Value>,
    #[serde(deserialize_with = "lenient")]
    address: String,
    #[serde(deserialize_with = "lenient")]
    port: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    meta: BTreeMap<String, Value>,
    #[serde(deserialize_with = "lenient")]
    weights: Weights,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Weights {
    #[serde(deserialize_with = "lenient")]
    passing: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    warning: Option<Value>,
}

/// A field of the wrong type (null included) reads as its default instead of failing the
/// whole answer.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let value = Value::deserialize(d)?;
    Ok(T::deserialize(value).unwrap_or_default())
}

/// The worst status among an entry's checks; `None` when some check is critical (or has
/// a status this client does not know, such as a maintenance mode), `Some(Passing)` when
/// there are no checks.
fn entry_health(checks: &[Value]) -> Option<Health> {
    let mut health = Health::Passing;
    for check in checks {
        match check.get("Status").and_then(Value::as_str) {
            Some("passing") => {}
            Some("warning") => health = Health::Warning,
            _ => return None,
        }
    }
    Some(health)
}

/// A JSON number as a `u64`, when it is a non-negative integer.
fn as_u64(v: Option<&Value>) -> Option<u64> {
    v?.as_u64()
}

/// Reads a health answer's body. Lenient, as the Consul API fact sheet requires:
/// unknown fields are ignored, null or mistyped fields read as empty, missing weights as
/// 1/1; an entry without a dialable address or port is skipped and reported, not an
/// error. Instances are keyed by node and service ID. Only a body that is not a JSON array
/// (or `null`) is an error.
pub(crate) fn parse(bytes: &[u8]) -> Result<ParsedHealth, ConsulError> {
    let entries: Option<Vec<Value>> = serde_json::from_slice(bytes).map_err(|e| {
        ConsulError::decode(format!("health answer is not a JSON array of entries: {e}"))
    })?;
    let entries = entries.unwrap_or_default();
    let mut out = ParsedHealth {
        instances: Vec::with_capacity(entries.len()),
        ..ParsedHealth::default()
    };
    for raw in entries {
        let entry = Entry::deserialize(raw).unwrap_or_default();
        let Some(service) = entry.service else {
            out.skipped
                .push(skipped(&entry.node.node, "", SkipReason::Malformed));
            continue;
        };
        let service_id = if service.id.is_empty() {
            service.service.clone()
        } else {
            service.id
        };
        let address = if service.address.is_empty() {
            entry.node.address
        } else {
            service.address
        };
        if address.is_empty() {
            out.skipped.push(skipped(
                &entry.node.node,
                &service_id,
                SkipReason::NoAddress,
            ));
            continue;
        }
        let port = match as_u64(service.port.as_ref()).and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p != 0 => p,
            _ => {
                out.skipped
                    .push(skipped(&entry.node.node, &service_id, SkipReason::NoPort));
                continue;
            }
        };
        let Some(health) = entry_health(&entry.checks) else {
            out.unhealthy += 1;
            continue;
        };
        // Consul requires a passing weight of at least 1; 0 or missing reads as 1. A
        // warning weight of 0 takes the instance out of rotation while it warns.
        let passing = as_u64(service.weights.passing.as_ref()).unwrap_or(1);
        let warning = as_u64(service.weights.warning.as_ref()).unwrap_or(1);
        let weight = match health {
            Health::Warning => warning,
            _ => passing.max(1),
        };
        let Some(weight) = NonZeroU32::new(weight.min(u64::from(u32::MAX)) as u32) else {
            out.unhealthy += 1;
            continue;
        };
        let mut instance = Instance::new(
            InstanceId::new(entry.node.node, service_id),
            service.service,
            address,
            port,
        )
        .with_weight(weight)
        .with_health(health)
        .with_tags(
            service
                .tags
                .into_iter()
                .filter_map(|t| t.as_str().map(str::to_owned)),
        );
        instance.meta = service
            .meta
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect();
        out.instances.push(instance);
    }
    Ok(out)
}

fn skipped(node: &str, service_id: &str, reason: SkipReason) -> SkippedEntry {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        node,
        service_id,
        ?reason,
        "consul health entry skipped: not dialable"
    );
    SkippedEntry {
        node: node.to_owned(),
        service_id: service_id.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(node: &str, id: &str, port: u16, statuses: &[&str]) -> Value {
        let checks: Vec<Value> = statuses
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"CheckID": format!("c{i}"), "Status": s}))
            .collect();
        json!({
            "Node": {"Node": node, "Address": "10.0.0.1"},
            "Service": {"ID": id, "Service": "users", "Address": "", "Port": port},
            "Checks": checks,
        })
    }

    fn parse_json(v: Value) -> ParsedHealth {
        parse(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    #[test]
    fn the_fact_sheet_example() {
        let body = br#"[{
          "Node":    { "ID": "x", "Node": "node-a", "Address": "10.0.0.5", "Datacenter": "dc1",
                       "TaggedAddresses": { "lan": "10.0.0.5", "wan": "10.0.0.5" }, "Meta": {} },
          "Service": { "ID": "users-1", "Service": "users", "Tags": ["v1"], "Address": "10.0.0.5", "Port": 8081,
                       "Meta": { "version": "1" }, "Weights": { "Passing": 1, "Warning": 1 },
                       "TaggedAddresses": { "lan": { "address": "10.0.0.5", "port": 8081 } }, "EnableTagOverride": false },
          "Checks":  [ { "Node": "node-a", "CheckID": "service:users-1", "Name": "Service 'users' check",
                         "Status": "passing", "Notes": "", "Output": "HTTP GET: 200 OK", "ServiceID": "users-1",
                         "ServiceName": "users", "ServiceTags": ["v1"] },
                       { "Node": "node-a", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                         "ServiceID": "", "ServiceName": "" } ]
        }]"#;
        let p = parse(body).unwrap();
        assert_eq!(p.instances.len(), 1);
        let i = &p.instances[0];
        assert_eq!(i.id, InstanceId::new("node-a", "users-1"));
        assert_eq!(&*i.service, "users");
        assert_eq!(i.authority(), "10.0.0.5:8081");
        assert_eq!(i.tags, ["v1"]);
        assert_eq!(i.meta.get("version").map(String::as_str), Some("1"));
        assert_eq!(i.weight.get(), 1);
        assert_eq!(i.health, Health::Passing);
    }

    #[test]
    fn same_service_id_on_two_nodes_is_two_instances() {
        let p = parse_json(json!([
            entry("node-a", "users", 8081, &["passing"]),
            entry("node-b", "users", 8081, &["passing"]),
        ]));
        assert_eq!(p.instances.len(), 2);
        assert_ne!(p.instances[0].id, p.instances[1].id);
    }

    #[test]
    fn address_falls_back_to_the_node() {
        let p = parse_json(json!([entry("n", "users-1", 1, &[])]));
        assert_eq!(&*p.instances[0].address, "10.0.0.1");
    }

    #[test]
    fn nulls_missing_and_extra_fields_are_tolerated() {
        let p = parse_json(json!([{
            "Node": {"Node": "n", "Address": "10.0.0.1", "Partition": "default", "Meta": null},
            "Service": {
                "ID": "users-1", "Service": "users", "Port": 80, "Tags": null, "Meta": null,
                "Weights": null, "Namespace": "default", "Proxy": {"Mode": ""},
                "CreateIndex": 10, "ModifyIndex": 12, "Address": null
            },
            "Checks": null,
            "SomethingNew": [1, 2, 3]
        }]));
        assert_eq!(p.instances.len(), 1);
        let i = &p.instances[0];
        assert!(i.tags.is_empty() && i.meta.is_empty());
        assert_eq!(i.weight.get(), 1);
        assert_eq!(&*i.address, "10.0.0.1");
        // A null body and an empty array are no instances, not errors.
        assert!(parse(b"null").unwrap().instances.is_empty());
        assert!(parse(b"[]").unwrap().instances.is_empty());
    }

    #[test]
    fn mistyped_fields_read_as_empty() {
        let p = parse_json(json!([{
            "Node": {"Node": "n", "Address": "10.0.0.1"},
            "Service": {"ID": "a", "Service": "users", "Port": 80, "Tags": "v1",
                        "Meta": {"k": 1, "ok": "yes"}, "Weights": {"Passing": "x", "Warning": -1}},
        }]));
        let i = &p.instances[0];
        assert!(i.tags.is_empty());
        assert_eq!(i.meta.len(), 1);
        assert_eq!(i.weight.get(), 1);
    }

    #[test]
    fn undialable_entries_are_skipped_and_counted() {
        let mut no_address = entry("n", "b", 80, &[]);
        no_address["Node"]["Address"] = json!("");
        let p = parse_json(json!([
            entry("n", "a", 0, &["passing"]),
            no_address,
            {"Node": {"Node": "n"}},
            42,
            entry("n", "ok", 80, &["passing"]),
            {"Node": {"Node": "n", "Address": "h"}, "Service": {"ID": "big", "Port": 70000}},
        ]));
        assert_eq!(p.instances.len(), 1);
        let reasons: Vec<_> = p.skipped.iter().map(|s| s.reason).collect();
        assert_eq!(
            reasons,
            [
                SkipReason::NoPort,
                SkipReason::NoAddress,
                SkipReason::Malformed,
                SkipReason::Malformed,
                SkipReason::NoPort
            ]
        );
        assert_eq!(p.skipped[0].service_id, "a");
    }

    #[test]
    fn health_is_the_worst_check() {
        let mut warned = entry("n", "w", 80, &["passing", "warning"]);
        warned["Service"]["Weights"] = json!({"Passing": 10, "Warning": 2});
        let mut out_while_warning = entry("n", "w0", 80, &["warning"]);
        out_while_warning["Service"]["Weights"] = json!({"Passing": 10, "Warning": 0});
        let mut passing = entry("n", "p", 80, &["passing", "passing"]);
        passing["Service"]["Weights"] = json!({"Passing": 10, "Warning": 0});
        let p = parse_json(json!([
            warned,
            out_while_warning,
            passing,
            entry("n", "c", 80, &["warning", "critical"]),
            entry("n", "m", 80, &["maintenance"]),
            entry("n", "none", 80, &[]),
        ]));
        let got: Vec<_> = p
            .instances
            .iter()
            .map(|i| (i.id.service_id().to_owned(), i.health, i.weight.get()))
            .collect();
        assert_eq!(
            got,
            [
                ("w".to_owned(), Health::Warning, 2),
                ("p".to_owned(), Health::Passing, 10),
                ("none".to_owned(), Health::Passing, 1),
            ]
        );
        assert_eq!(p.unhealthy, 3);
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn malformed_json_is_a_decode_error() {
        for body in [&b"{"[..], b"{}", b"\"x\"", b"[1,", b"", b"\xff"] {
            let e = parse(body).unwrap_err();
            assert!(e.is_decode(), "{e}");
        }
    }
}
