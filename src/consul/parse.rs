//! Reading `GET /v1/health/service/:service` answers into instances, leniently.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
    /// The entry is not an object with a `Service` object, or cannot be read (a repeated
    /// field, a number beyond `f64`'s range).
    Malformed,
    /// The address is neither an IP address nor a host name (it holds a port, a path,
    /// spaces, an IPv6 zone...): no request could be sent to it.
    BadAddress,
}

/// Whether `address` can be a request's host: an IP address (an IPv6 one bare or in
/// brackets), or a host name of letters, digits, `-`, `_` and `.` (at most 253 bytes).
pub(crate) fn dialable(address: &str) -> bool {
    let bare = address.strip_prefix('[').and_then(|a| a.strip_suffix(']'));
    if let Some(inner) = bare {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    address.parse::<std::net::IpAddr>().is_ok()
        || (address.len() <= 253
            && address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
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

/// How many skipped entries a parse keeps: every one is counted, the first this many are
/// listed.
pub(crate) const MAX_SKIPPED: usize = 16;

/// What a health answer's body holds.
#[derive(Debug, Default)]
pub(crate) struct ParsedHealth {
    pub(crate) instances: Vec<Instance>,
    /// The first [`MAX_SKIPPED`] entries skipped.
    pub(crate) skipped: Vec<SkippedEntry>,
    /// Every entry skipped.
    pub(crate) skipped_count: usize,
    pub(crate) unhealthy: usize,
}

impl ParsedHealth {
    fn skip(&mut self, node: &str, service_id: &str, reason: SkipReason) {
        self.skipped_count += 1;
        if self.skipped.len() < MAX_SKIPPED {
            self.skipped.push(SkippedEntry {
                node: node.to_owned(),
                service_id: service_id.to_owned(),
                reason,
            });
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Entry {
    node: Obj<NodeInfo>,
    service: Obj<ServiceInfo>,
    checks: Checks,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct NodeInfo {
    node: Loose,
    address: Loose,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct ServiceInfo {
    #[serde(rename = "ID")]
    id: Loose,
    service: Loose,
    tags: Strings,
    address: Loose,
    port: Loose,
    meta: Dict,
    weights: Obj<Weights>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct Weights {
    passing: Loose,
    warning: Loose,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct CheckInfo {
    status: Loose,
}

/// Any JSON value, keeping only what the parser reads (strings and non-negative
/// integers); anything else, null included, is `Other`. Nested values are skipped
/// without being built.
#[derive(Default)]
enum Loose {
    Str(String),
    U64(u64),
    #[default]
    Other,
}

impl Loose {
    fn into_string(self) -> String {
        match self {
            Loose::Str(s) => s,
            _ => String::new(),
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Loose::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Loose::U64(n) => Some(*n),
            _ => None,
        }
    }
}

/// An object read as `T` (whose fields are all lenient); anything else is `None`.
struct Obj<T>(Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

/// The strings of an array, read one at a time (other elements are skipped without being
/// built); anything else is empty.
#[derive(Default)]
struct Strings(Vec<String>);

/// The string values of an object, read one at a time (other values are skipped without
/// being built; a repeated key keeps its last string); anything else is empty.
#[derive(Default)]
struct Dict(BTreeMap<String, String>);

/// The worst status among an array of checks, read one check at a time: `None` when some
/// check is critical (or not an object, or has a status this client does not know, such
/// as a maintenance mode), `Some(Passing)` when there are no checks (or no array).
struct Checks(Option<Health>);

impl Default for Checks {
    fn default() -> Self {
        Checks(Some(Health::Passing))
    }
}

/// A type read from any JSON value without failing: what it does not expect reads as its
/// default, and nested values it does not want are skipped without being built.
trait Lenient: Default {
    fn from_string(_: String) -> Self {
        Self::default()
    }

    fn from_u64(_: u64) -> Self {
        Self::default()
    }

    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }

    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

impl Lenient for Loose {
    fn from_string(s: String) -> Self {
        Loose::Str(s)
    }

    fn from_u64(n: u64) -> Self {
        Loose::U64(n)
    }
}

impl<T: DeserializeOwned> Lenient for Obj<T> {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        // Owned fields only: no borrow of the input outlives the call.
        let t = T::deserialize(OwnedMap(map))?;
        Ok(Obj(Some(t)))
    }
}

impl Lenient for Strings {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element::<Loose>()? {
            if let Loose::Str(s) = item {
                out.push(s);
            }
        }
        Ok(Strings(out))
    }
}

impl Lenient for Dict {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, Loose>()? {
            if let Loose::Str(v) = v {
                out.insert(k, v);
            }
        }
        Ok(Dict(out))
    }
}

impl Lenient for Checks {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut health = Some(Health::Passing);
        while let Some(Obj(check)) = seq.next_element::<Obj<CheckInfo>>()? {
            health = match (health, check.as_ref().and_then(|c| c.status.as_str())) {
                (None, _) => None,
                (health, Some("passing")) => health,
                (_, Some("warning")) => Some(Health::Warning),
                _ => None,
            };
        }
        Ok(Checks(health))
    }
}

/// A map access handed to a [`DeserializeOwned`] type as a deserializer.
struct OwnedMap<A>(A);

impl<'de, A: MapAccess<'de>> Deserializer<'de> for OwnedMap<A> {
    type Error = A::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for LenientVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Ok(u64::try_from(v).map_or_else(|_| T::default(), T::from_u64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::from_u64(v))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok(T::from_string(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
        Ok(T::from_string(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::from_seq(seq)
    }
}

macro_rules! deserialize_leniently {
    ($($ty:ident $(<$gen:ident>)?),*) => {$(
        impl<'de $(, $gen: DeserializeOwned)?> Deserialize<'de> for $ty $(<$gen>)? {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(LenientVisitor(PhantomData))
            }
        }
    )*};
}

deserialize_leniently!(Loose, Obj<T>, Strings, Dict, Checks);

/// The top-level array of a health answer, read one entry at a time: each is turned into
/// an instance (or counted as skipped or unhealthy) and dropped before the next is read,
/// so the parse holds one entry and the results, never the whole array built.
struct Entries;

impl<'de> Visitor<'de> for Entries {
    type Value = ParsedHealth;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of entries")
    }

    fn visit_unit<E: de::Error>(self) -> Result<ParsedHealth, E> {
        Ok(ParsedHealth::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParsedHealth, A::Error> {
        let mut out = ParsedHealth::default();
        // Each entry's extent first (borrowed, not built), then the entry read from it: an
        // entry that is valid JSON but cannot be read (a repeated field, a number beyond
        // `f64`) is skipped as malformed, not an error of the whole answer (which lost
        // every instance beside it).
        while let Some(raw) = seq.next_element::<&'de serde_json::value::RawValue>()? {
            match serde_json::from_str::<Obj<Entry>>(raw.get()) {
                Ok(Obj(entry)) => out.add(entry.unwrap_or_default()),
                Err(_) => out.skip("", "", SkipReason::Malformed),
            }
        }
        Ok(out)
    }
}

impl ParsedHealth {
    fn add(&mut self, entry: Entry) {
        let node = entry.node.0.unwrap_or_default();
        let node_name = node.node.into_string();
        let Some(service) = entry.service.0 else {
            self.skip(&node_name, "", SkipReason::Malformed);
            return;
        };
        let name = service.service.into_string();
        let service_id = match service.id {
            Loose::Str(id) if !id.is_empty() => id,
            _ => name.clone(),
        };
        let address = match service.address {
            Loose::Str(a) if !a.is_empty() => a,
            _ => node.address.into_string(),
        };
        if address.is_empty() {
            self.skip(&node_name, &service_id, SkipReason::NoAddress);
            return;
        }
        // A port, a path, spaces or a zone in the address would make every call to the
        // instance fail, each counted against it as its failure: left out, and reported.
        if !dialable(&address) {
            self.skip(&node_name, &service_id, SkipReason::BadAddress);
            return;
        }
        // An IPv6 address in brackets is published bare, as an IP address: in brackets it
        // would be dialed as a host name, which resolves to nothing.
        let address = match address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
            Some(inner) => inner.to_owned(),
            None => address,
        };
        let port = match service.port.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p != 0 => p,
            _ => {
                self.skip(&node_name, &service_id, SkipReason::NoPort);
                return;
            }
        };
        let Some(health) = entry.checks.0 else {
            self.unhealthy += 1;
            return;
        };
        // Consul requires a passing weight of at least 1; 0 or missing reads as 1. A
        // warning weight of 0 takes the instance out of rotation while it warns.
        let weights = service.weights.0.unwrap_or_default();
        let passing = weights.passing.as_u64().unwrap_or(1);
        let warning = weights.warning.as_u64().unwrap_or(1);
        let weight = match health {
            Health::Warning => warning,
            _ => passing.max(1),
        };
        let Some(weight) = NonZeroU32::new(weight.min(u64::from(u32::MAX)) as u32) else {
            self.unhealthy += 1;
            return;
        };
        let mut instance =
            Instance::new(InstanceId::new(node_name, service_id), name, address, port)
                .with_weight(weight)
                .with_health(health);
        instance.tags = service.tags.0;
        instance.meta = service.meta.0;
        self.instances.push(instance);
    }
}

/// Reads a health answer's body. Lenient, as the Consul API fact sheet requires:
/// unknown fields are ignored, null or mistyped fields read as empty, missing weights as
/// 1/1; an entry without a dialable address or port, or that cannot be read (a repeated
/// field, a number beyond `f64`'s range), is skipped and reported, not an error (all
/// counted, the first [`MAX_SKIPPED`] listed, one warning per answer).
/// Instances are keyed by node and service ID. Only a body that is not a JSON array (or
/// `null`) is an error.
///
/// Entries are read one at a time and dropped once used, so the memory a parse takes is
/// a small multiple of the body at most, whatever the body holds.
pub(crate) fn parse(bytes: &[u8]) -> Result<ParsedHealth, ConsulError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let out = de
        .deserialize_any(Entries)
        .and_then(|out| de.end().map(|()| out))
        .map_err(|e| {
            ConsulError::decode(format!("health answer is not a JSON array of entries: {e}"))
        })?;
    #[cfg(feature = "tracing")]
    if let Some(first) = out.skipped.first() {
        tracing::warn!(
            skipped = out.skipped_count,
            first.node = %first.node,
            first.service_id = %first.service_id,
            first.reason = ?first.reason,
            "consul health entries skipped: not dialable or malformed"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

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
        assert_eq!(p.skipped_count, 5);
    }

    #[test]
    fn skipped_entries_are_all_counted_and_the_first_listed() {
        let entries: Vec<Value> = (0..40)
            .map(|i| entry("n", &format!("s{i}"), 0, &[]))
            .collect();
        let p = parse_json(Value::Array(entries));
        assert_eq!(p.skipped_count, 40);
        assert_eq!(p.skipped.len(), MAX_SKIPPED);
        assert_eq!(
            p.skipped[MAX_SKIPPED - 1].service_id,
            format!("s{}", MAX_SKIPPED - 1)
        );
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
