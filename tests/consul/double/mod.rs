//! A Consul HTTP API double for the integration tests: a real HTTP/1.1 server on loopback
//! answering the part of the agent API that seawall's Consul client uses, as
//! `docs/consul-api.md` describes it. Its own tests are in `tests.rs` beside it.
//!
//! What it models: one local agent (`DoubleOptions::node`) plus instances registered
//! through other agents (`register_on_node`); a single raft-like index bumped by every
//! write, with per-service indexes; blocking health queries; TTL checks expiring on tokio
//! time and HTTP checks run against loopback targets; node health (`serfHealth`); an ACL
//! token; TLS with client certificates (`DoubleOptions::tls`); stop and restart; an index
//! that goes backwards (`set_index`); injected failures
//! (`fail_next`); and a log of the requests received.
//!
//! Endpoints: `PUT /v1/agent/service/register` (`?replace-existing-checks`),
//! `PUT /v1/agent/service/deregister/:id`, `PUT /v1/agent/check/{pass,warn,fail}/:id`
//! (`?note=`), `PUT /v1/agent/check/update/:id`, `GET /v1/agent/services`, and
//! `GET /v1/health/service/:service` (`?passing`, `?index`, `?wait`).
//!
//! Stricter than Consul, so that no test passes on something the double ignores: a query
//! parameter it does not model (`tag`, `filter`, `dc`, `stale`, `near`, `node-meta`…), a
//! body field it does not know and a check that is neither TTL nor HTTP (TCP, gRPC…) are
//! answered `400` naming them. Add the behaviour here, with its self-test in `tests.rs`,
//! when a test needs it.
//!
//! Simplifications: HTTP checks run at once after registration (Consul staggers the first
//! run within the interval) and keep running while the agent is stopped; an output-only
//! check update does not bump the index (Consul defers it by `check_update_interval`);
//! `DeregisterCriticalServiceAfter` is validated but nothing is reaped; a missing or wrong
//! token gets `403` rather than a filtered result. Paused-time tests should drive TTL
//! checks only: HTTP checks do real loopback I/O, which auto-advancing paused time can race.

// Every item serves a test of the full build; with fewer features some go unused.
#![cfg_attr(not(all(feature = "http", feature = "gateway")), allow(dead_code))]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

mod tests;

const PASSING: &str = "passing";
const WARNING: &str = "warning";
const CRITICAL: &str = "critical";

const MAX_RECORDED_REQUESTS: usize = 10_000;
const MAX_CONNECTIONS: usize = 512;
const MAX_BODY_BYTES: usize = 1 << 20;
const MAX_SERVICES: usize = 10_000;
const MAX_CHECKS_PER_SERVICE: usize = 64;
const MAX_OUTPUT_BYTES: usize = 4 * 1024;
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const RESTART_INDEX_JUMP: u64 = 1000;
const INITIAL_INDEX: u64 = 10;

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Options of a double.
#[derive(Clone, Debug)]
pub(crate) struct DoubleOptions {
    /// Name of the local agent's node.
    pub(crate) node: String,
    /// Address of the local agent's node.
    pub(crate) node_address: String,
    /// When set, every request must present this token as `X-Consul-Token`, else `403`.
    pub(crate) acl_token: Option<String>,
    /// `true` (recent Consul): deregistering an unknown ID answers `404`; `false`: `200`.
    pub(crate) deregister_unknown_is_404: bool,
    /// Consul raises HTTP check intervals below 1 s to 1 s; tests may lower the floor.
    pub(crate) min_check_interval: Duration,
    /// When set, the API is served over TLS only (Consul's `ports.https`), with this
    /// rustls configuration (which may require a client certificate, as
    /// `verify_incoming` does). A failed handshake closes the connection unanswered.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for DoubleOptions {
    fn default() -> Self {
        Self {
            node: "node-a".to_owned(),
            node_address: "127.0.0.1".to_owned(),
            acl_token: None,
            deregister_unknown_is_404: true,
            min_check_interval: Duration::from_secs(1),
            tls: None,
        }
    }
}

/// One request the double received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub(crate) method: String,
    /// The raw URL path.
    pub(crate) path: String,
    /// The raw query string (without `?`), empty when none.
    pub(crate) query: String,
    /// The ACL token presented, if any.
    pub(crate) token: Option<String>,
}

/// A handle on a running Consul double (cheap to clone).
#[derive(Clone)]
pub(crate) struct ConsulDouble {
    inner: Arc<Inner>,
}

impl fmt::Debug for ConsulDouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDouble")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl ConsulDouble {
    /// Starts a double with default options on `127.0.0.1:0`.
    pub(crate) async fn start() -> ConsulDouble {
        Self::start_with(DoubleOptions::default()).await
    }

    /// Starts a double with `opts` on `127.0.0.1:0`.
    pub(crate) async fn start_with(opts: DoubleOptions) -> ConsulDouble {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("consul double: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("consul double: local addr");
        let mut nodes = BTreeMap::new();
        nodes.insert(opts.node.clone(), NodeEntry::new(opts.node_address.clone()));
        let state = State {
            index: INITIAL_INDEX,
            extinction_index: 0,
            service_index: HashMap::new(),
            abandon_epoch: 0,
            nodes,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            next_generation: 1,
            fail_next: None,
            requests: VecDeque::new(),
        };
        let (changes, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            opts,
            addr,
            handle: tokio::runtime::Handle::current(),
            state: Mutex::new(state),
            changes,
            server: tokio::sync::Mutex::new(None),
            waiting: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        inner.spawn_server(listener).await;
        ConsulDouble { inner }
    }

    /// The listening address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `127.0.0.1:PORT`, what `CONSUL_HTTP_ADDR` would hold.
    pub(crate) fn http_addr(&self) -> String {
        self.inner.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The agent goes down: stops listening and closes every open connection, including held
    /// blocking queries. Registered state is kept.
    pub(crate) async fn stop(&self) {
        let ctl = self.inner.server.lock().await.take();
        if let Some(ctl) = ctl {
            let _ = ctl.shutdown.send(true);
            let _ = ctl.task.await;
        }
    }

    /// Listens again on the same port. Services and checks survive; the index jumps forward by
    /// 1000 and every service's index moves to it (the agent re-syncs). Use `set_index` after
    /// this to force another value.
    pub(crate) async fn restart(&self) {
        self.stop().await;
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.inner.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(
                        tries < 100,
                        "consul double: rebind {}: {e}",
                        self.inner.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        {
            let mut st = self.inner.st();
            let n = st.index + RESTART_INDEX_JUMP;
            st.reindex(n);
        }
        self.inner.changed();
        self.inner.spawn_server(listener).await;
    }

    /// Forces the raft index to `n` (a jump up, or lower to simulate a server whose index went
    /// backwards, e.g. a snapshot restore): every service index becomes `n` and every blocking
    /// query returns at once with the new state, as Consul's abandoned state store does.
    pub(crate) fn set_index(&self, n: u64) {
        {
            let mut st = self.inner.st();
            st.reindex(n.max(1));
            st.abandon_epoch += 1;
        }
        self.inner.changed();
    }

    /// The current raft index.
    pub(crate) fn index(&self) -> u64 {
        self.inner.st().index
    }

    /// Registers an instance as if through the local agent (same body and validation as
    /// `PUT /v1/agent/service/register`).
    pub(crate) fn register(&self, registration: Value) -> Result<(), String> {
        let node = self.inner.opts.node.clone();
        let address = self.inner.opts.node_address.clone();
        self.register_on_node(&node, &address, registration)
    }

    /// Registers an instance on another node (as if through that node's agent). Same body
    /// format and validation as the register endpoint.
    pub(crate) fn register_on_node(
        &self,
        node: &str,
        node_address: &str,
        registration: Value,
    ) -> Result<(), String> {
        let reg = parse_registration(&registration).map_err(|(_, reason)| reason)?;
        self.inner
            .register_service(node, node_address, reg, false)
            .map_err(|(_, reason)| reason)
    }

    /// Deregisters `service_id` on `node`; `false` when it was not there.
    pub(crate) fn deregister_on_node(&self, node: &str, service_id: &str) -> bool {
        self.inner.deregister(node, service_id)
    }

    /// Sets a check's status as if the agent's check runner observed it (bumps the index and
    /// wakes blocking queries when the status changes; resets a TTL check's timer). Looks on the
    /// local node first, else on every node holding that check ID. `false` when no such check or
    /// the status is not `passing`/`warning`/`critical`.
    pub(crate) fn set_check_status(&self, check_id: &str, status: &str, output: &str) -> bool {
        if !valid_status(status) {
            return false;
        }
        let changed = {
            let mut st = self.inner.st();
            let local = (self.inner.opts.node.clone(), check_id.to_owned());
            let keys: Vec<CheckKey> = if st.checks.contains_key(&local) {
                vec![local]
            } else {
                st.checks
                    .keys()
                    .filter(|(_, id)| id == check_id)
                    .cloned()
                    .collect()
            };
            if keys.is_empty() {
                return false;
            }
            let mut changed = false;
            for key in keys {
                st.reset_ttl(&key);
                changed |= st.set_status(&key, status, output);
            }
            changed
        };
        if changed {
            self.inner.changed();
        }
        true
    }

    /// `serfHealth` of `node` (created with the local node address if unknown); a failing node
    /// makes all of its services unhealthy.
    pub(crate) fn set_node_health(&self, node: &str, passing: bool) {
        let changed = {
            let mut st = self.inner.st();
            let status = if passing { PASSING } else { CRITICAL };
            if st.nodes.get(node).is_some_and(|n| n.serf_status == status) {
                false
            } else {
                let idx = st.bump();
                let address = self.inner.opts.node_address.clone();
                st.nodes
                    .entry(node.to_owned())
                    .or_insert_with(|| NodeEntry::new(address))
                    .serf_status = status;
                let names: BTreeSet<String> = st
                    .services
                    .iter()
                    .filter(|((n, _), _)| n == node)
                    .map(|(_, s)| s.name.clone())
                    .collect();
                for name in names {
                    st.service_index.insert(name, idx);
                }
                true
            }
        };
        if changed {
            self.inner.changed();
        }
    }

    /// The next `n` requests (any endpoint) are answered with `status` and `body` (plain text).
    pub(crate) fn fail_next(&self, n: usize, status: u16, body: &str) {
        self.inner.st().fail_next = (n > 0).then(|| FailSpec {
            remaining: n,
            status,
            body: body.to_owned(),
        });
    }

    /// Requests received so far (the most recent 10 000).
    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.st().requests.iter().cloned().collect()
    }

    /// How many recorded requests have a path starting with `path_prefix`.
    pub(crate) fn request_count(&self, path_prefix: &str) -> usize {
        self.inner
            .st()
            .requests
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .count()
    }

    /// Every registered instance as `(node, service id)`, sorted.
    pub(crate) fn service_ids(&self) -> Vec<(String, String)> {
        self.inner.st().services.keys().cloned().collect()
    }

    /// Status of `check_id` (local node first, else the first node holding it).
    pub(crate) fn check_status(&self, check_id: &str) -> Option<String> {
        self.inner.find_check(check_id, |c| c.status.clone())
    }

    /// Output of `check_id` (local node first, else the first node holding it).
    pub(crate) fn check_output(&self, check_id: &str) -> Option<String> {
        self.inner.find_check(check_id, |c| c.output.clone())
    }

    /// How many connections it has served (over TLS: how many handshakes succeeded).
    /// Only the TLS tests read it.
    #[cfg_attr(not(feature = "consul-tls"), allow(dead_code))]
    pub(crate) fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// How many blocking queries are being held right now.
    pub(crate) fn waiting_queries(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Waits (polling) until at least `n` blocking queries are held, up to `timeout` (tokio time:
    /// do not call it with paused time, which would jump past the deadline).
    pub(crate) async fn wait_for_waiting_queries(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.waiting_queries() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// For tests that run against a real agent when `CONSUL_HTTP_ADDR` is set, else the double.
#[derive(Debug)]
pub(crate) struct TestAgent {
    /// The agent's address as `CONSUL_HTTP_ADDR` holds it (`host:port` or a URL).
    pub(crate) http_addr: String,
    /// `CONSUL_HTTP_TOKEN` when running against a real agent.
    pub(crate) token: Option<String>,
    /// The double, when no real agent was configured.
    pub(crate) double: Option<ConsulDouble>,
}

/// Reads `CONSUL_HTTP_ADDR` (and `CONSUL_HTTP_TOKEN`); otherwise starts a double.
pub(crate) async fn agent() -> TestAgent {
    match std::env::var("CONSUL_HTTP_ADDR") {
        Ok(addr) if !addr.trim().is_empty() => TestAgent {
            http_addr: addr.trim().to_owned(),
            token: std::env::var("CONSUL_HTTP_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            double: None,
        },
        _ => {
            let double = ConsulDouble::start().await;
            TestAgent {
                http_addr: double.http_addr(),
                token: None,
                double: Some(double),
            }
        }
    }
}

/// Parses a Go duration string (`"10s"`, `"1m30s"`, `"1.5h"`, `"500ms"`, `"0"`) into
/// nanoseconds, with Go's error texts.
fn go_duration_nanos(orig: &str) -> Result<i128, String> {
    let invalid = || format!("time: invalid duration \"{orig}\"");
    let mut s = orig;
    let mut neg = false;
    if let Some(rest) = s.strip_prefix('-') {
        neg = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        let int_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let int_part = &s[..int_end];
        s = &s[int_end..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            frac_part = &rest[..frac_end];
            s = &rest[frac_end..];
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid());
            }
        } else if int_part.is_empty() {
            return Err(invalid());
        }
        let unit_end = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_end == 0 {
            return Err(format!("time: missing unit in duration \"{orig}\""));
        }
        let unit = &s[..unit_end];
        s = &s[unit_end..];
        let mult: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(format!(
                    "time: unknown unit \"{unit}\" in duration \"{orig}\""
                ));
            }
        };
        let int_value: i128 = if int_part.is_empty() {
            0
        } else if int_part.len() > 20 {
            return Err(invalid());
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = int_value.checked_mul(mult).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: i128 = digits.parse().map_err(|_| invalid())?;
            value += frac * mult / 10i128.pow(digits.len() as u32);
        }
        total += value;
        if total > i64::MAX as i128 {
            return Err(invalid());
        }
    }
    Ok(if neg { -total } else { total })
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

type CheckKey = (String, String);
type Reply = (u16, String);

struct Inner {
    opts: DoubleOptions,
    addr: SocketAddr,
    handle: tokio::runtime::Handle,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    server: tokio::sync::Mutex<Option<ServerCtl>>,
    waiting: AtomicUsize,
    /// Connections served (over TLS: handshakes that succeeded).
    connections: AtomicUsize,
}

struct ServerCtl {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct FailSpec {
    remaining: usize,
    status: u16,
    body: String,
}

struct NodeEntry {
    address: String,
    serf_status: &'static str,
}

impl NodeEntry {
    fn new(address: String) -> Self {
        Self {
            address,
            serf_status: PASSING,
        }
    }
}

#[derive(Clone)]
struct ServiceEntry {
    name: String,
    tags: Option<Vec<String>>,
    address: String,
    port: u16,
    meta: Option<BTreeMap<String, String>>,
    weights: (i64, i64),
    enable_tag_override: bool,
}

#[derive(Clone, Debug)]
enum CheckKind {
    Ttl(Duration),
    Http(HttpSpec),
}

#[derive(Clone, Debug)]
struct HttpSpec {
    url: String,
    method: String,
    headers: Vec<(String, String)>,
    body: String,
}

struct CheckEntry {
    name: String,
    status: String,
    output: String,
    service_id: String,
    kind: CheckKind,
    ttl_deadline: Option<Instant>,
    notify: Arc<Notify>,
    generation: u64,
    task: Option<AbortHandle>,
}

impl Drop for CheckEntry {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct State {
    index: u64,
    extinction_index: u64,
    service_index: HashMap<String, u64>,
    abandon_epoch: u64,
    nodes: BTreeMap<String, NodeEntry>,
    services: BTreeMap<(String, String), ServiceEntry>,
    checks: BTreeMap<CheckKey, CheckEntry>,
    next_generation: u64,
    fail_next: Option<FailSpec>,
    requests: VecDeque<RecordedRequest>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn reindex(&mut self, n: u64) {
        self.index = n;
        for v in self.service_index.values_mut() {
            *v = n;
        }
        if self.extinction_index > 0 {
            self.extinction_index = n;
        }
    }

    /// After a write at `idx` that touched service `name`: its index moves, or the service went
    /// extinct (no instance left) and the extinction index moves.
    fn touch_service(&mut self, name: &str, idx: u64) {
        if self.services.values().any(|s| s.name == name) {
            self.service_index.insert(name.to_owned(), idx);
        } else {
            self.service_index.remove(name);
            self.extinction_index = idx;
        }
    }

    /// Consul's `maxIndexForService`: the service's index, else the last extinction index, else
    /// the catalog's max index; never 0.
    fn service_result_index(&self, name: &str) -> u64 {
        let idx = match self.service_index.get(name) {
            Some(i) => *i,
            None if self.extinction_index > 0 => self.extinction_index,
            None => self.index,
        };
        idx.max(1)
    }

    fn remove_service(&mut self, node: &str, id: &str) -> bool {
        let Some(svc) = self.services.remove(&(node.to_owned(), id.to_owned())) else {
            return false;
        };
        let idx = self.bump();
        self.checks
            .retain(|(n, _), c| !(n == node && c.service_id == id));
        self.touch_service(&svc.name, idx);
        true
    }

    fn reset_ttl(&mut self, key: &CheckKey) {
        if let Some(c) = self.checks.get_mut(key) {
            if let CheckKind::Ttl(ttl) = c.kind {
                c.ttl_deadline = Some(Instant::now() + ttl);
                c.notify.notify_one();
            }
        }
    }

    /// Sets status and output; returns whether the status changed (index bumped).
    fn set_status(&mut self, key: &CheckKey, status: &str, output: &str) -> bool {
        let output = truncate(output, MAX_OUTPUT_BYTES);
        let Some(c) = self.checks.get_mut(key) else {
            return false;
        };
        c.output = output;
        if c.status == status {
            return false;
        }
        c.status = status.to_owned();
        let service_id = c.service_id.clone();
        let idx = self.bump();
        if let Some(svc) = self.services.get(&(key.0.clone(), service_id)) {
            let name = svc.name.clone();
            self.service_index.insert(name, idx);
        }
        true
    }

    fn record(&mut self, req: RecordedRequest) {
        if self.requests.len() >= MAX_RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(req);
    }

    fn take_failure(&mut self) -> Option<Reply> {
        let spec = self.fail_next.as_mut()?;
        spec.remaining -= 1;
        let reply = (spec.status, spec.body.clone());
        if spec.remaining == 0 {
            self.fail_next = None;
        }
        Some(reply)
    }

    /// One entry of `GET /v1/health/service/:service`: the node, the service, and its
    /// checks after the node's `serfHealth`, by check ID.
    fn health_entry(&self, node: &str, id: &str, svc: &ServiceEntry) -> Option<Value> {
        let n = self.nodes.get(node)?;
        let serf_output = if n.serf_status == PASSING {
            "Agent alive and reachable"
        } else {
            "Agent not live or unreachable"
        };
        let mut checks = vec![(
            "serfHealth".to_owned(),
            json!({
                "Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": n.serf_status, "Output": serf_output,
                "ServiceID": "", "ServiceName": "",
            }),
        )];
        for ((cn, cid), c) in &self.checks {
            if cn == node && c.service_id == id {
                let check = json!({
                    "Node": node, "CheckID": cid, "Name": c.name, "Status": c.status,
                    "Output": c.output, "ServiceID": c.service_id, "ServiceName": svc.name,
                });
                checks.push((cid.clone(), check));
            }
        }
        checks.sort_by(|a, b| a.0.cmp(&b.0));
        Some(json!({
            "Node": { "Node": node, "Address": n.address },
            "Service": service_json(id, svc),
            "Checks": checks.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        }))
    }
}

/// A service as both `GET /v1/agent/services` and the health endpoint show it.
fn service_json(id: &str, s: &ServiceEntry) -> Value {
    json!({
        "ID": id, "Service": s.name, "Tags": s.tags, "Address": s.address,
        "Meta": s.meta, "Port": s.port,
        "Weights": { "Passing": s.weights.0, "Warning": s.weights.1 },
        "EnableTagOverride": s.enable_tag_override,
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn valid_status(s: &str) -> bool {
    matches!(s, PASSING | WARNING | CRITICAL)
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn jitter(max: Duration) -> Duration {
    let n = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if n == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(random_u64() % n)
    }
}

impl Inner {
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn find_check<T>(&self, check_id: &str, f: impl Fn(&CheckEntry) -> T) -> Option<T> {
        let st = self.st();
        let local = (self.opts.node.clone(), check_id.to_owned());
        if let Some(c) = st.checks.get(&local) {
            return Some(f(c));
        }
        st.checks
            .iter()
            .find(|((_, id), _)| id == check_id)
            .map(|(_, c)| f(c))
    }

    async fn spawn_server(self: &Arc<Self>, listener: TcpListener) {
        let (tx, rx) = watch::channel(false);
        let tls = self.opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let task = self
            .handle
            .spawn(serve(listener, Arc::downgrade(self), rx, tls));
        *self.server.lock().await = Some(ServerCtl { shutdown: tx, task });
    }

    fn register_service(
        self: &Arc<Self>,
        node: &str,
        node_address: &str,
        reg: Registration,
        replace_existing_checks: bool,
    ) -> Result<(), Reply> {
        let now = Instant::now();
        let key = (node.to_owned(), reg.id.clone());
        let mut spawn = Vec::new();
        {
            let mut st = self.st();
            if !st.services.contains_key(&key) && st.services.len() >= MAX_SERVICES {
                return Err((500, "consul double: too many services".to_owned()));
            }
            let idx = st.bump();
            st.nodes
                .entry(node.to_owned())
                .or_insert_with(|| NodeEntry::new(node_address.to_owned()))
                .address = node_address.to_owned();
            let previous = st.services.get(&key).map(|p| p.name.clone());
            let total = reg.checks.len();
            let service = ServiceEntry {
                name: reg.name.clone(),
                tags: reg.tags,
                address: reg.address,
                port: reg.port,
                meta: reg.meta,
                weights: reg.weights,
                enable_tag_override: reg.enable_tag_override,
            };
            st.services.insert(key.clone(), service);
            let mut keep = BTreeSet::new();
            for (i, def) in reg.checks.into_iter().enumerate() {
                // Consul numbers default IDs when the service has more than one check.
                let check_id = match def.check_id.clone().filter(|s| !s.is_empty()) {
                    Some(id) => id,
                    None if total > 1 => format!("service:{}:{}", reg.id, i + 1),
                    None => format!("service:{}", reg.id),
                };
                keep.insert(check_id.clone());
                let ckey = (node.to_owned(), check_id);
                // Re-registering keeps a check's status and output.
                let (status, output) = match st.checks.get(&ckey) {
                    Some(c) => (c.status.clone(), c.output.clone()),
                    None => (
                        def.status.clone().unwrap_or_else(|| CRITICAL.to_owned()),
                        String::new(),
                    ),
                };
                let generation = st.next_generation;
                st.next_generation += 1;
                let notify = Arc::new(Notify::new());
                let ttl_deadline = match def.kind {
                    CheckKind::Ttl(ttl) => Some(now + ttl),
                    CheckKind::Http(_) => None,
                };
                let entry = CheckEntry {
                    name: def
                        .name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("Service '{}' check", reg.name)),
                    status,
                    output,
                    service_id: reg.id.clone(),
                    kind: def.kind.clone(),
                    ttl_deadline,
                    notify: notify.clone(),
                    generation,
                    task: None,
                };
                st.checks.insert(ckey.clone(), entry);
                spawn.push((ckey, generation, def, notify));
            }
            if replace_existing_checks {
                st.checks.retain(|(n, id), c| {
                    !(n == node && c.service_id == reg.id && !keep.contains(id))
                });
            }
            if let Some(previous) = previous.filter(|p| *p != reg.name) {
                st.touch_service(&previous, idx);
            }
            st.touch_service(&reg.name, idx);
            for (ckey, generation, def, notify) in spawn {
                let task = self.spawn_runner(ckey.clone(), generation, &def, notify);
                if let Some(c) = st.checks.get_mut(&ckey) {
                    c.task = Some(task);
                }
            }
        }
        self.changed();
        Ok(())
    }

    fn deregister(&self, node: &str, id: &str) -> bool {
        let removed = self.st().remove_service(node, id);
        if removed {
            self.changed();
        }
        removed
    }

    fn spawn_runner(
        self: &Arc<Self>,
        key: CheckKey,
        generation: u64,
        def: &CheckDef,
        notify: Arc<Notify>,
    ) -> AbortHandle {
        let weak = Arc::downgrade(self);
        let task = match &def.kind {
            CheckKind::Ttl(_) => self.handle.spawn(ttl_runner(weak, key, generation, notify)),
            CheckKind::Http(spec) => {
                let timeout = def
                    .timeout
                    .filter(|t| !t.is_zero())
                    .unwrap_or(DEFAULT_CHECK_TIMEOUT);
                let interval = def
                    .interval
                    .unwrap_or_default()
                    .max(self.opts.min_check_interval)
                    .max(Duration::from_millis(1));
                self.handle.spawn(http_runner(
                    weak,
                    key,
                    generation,
                    spec.clone(),
                    interval,
                    timeout,
                ))
            }
        };
        task.abort_handle()
    }

    /// Applies a check runner's observation; `false` when the check is gone or replaced.
    fn apply_runner_result(
        &self,
        key: &CheckKey,
        generation: u64,
        status: &str,
        output: &str,
    ) -> bool {
        let changed = {
            let mut st = self.st();
            match st.checks.get(key) {
                Some(c) if c.generation == generation => {}
                _ => return false,
            }
            st.set_status(key, status, output)
        };
        if changed {
            self.changed();
        }
        true
    }

    /// Expires a TTL check whose deadline passed; `None` when the check is gone or replaced,
    /// `Some(expired)` otherwise.
    fn expire_ttl(&self, key: &CheckKey, generation: u64) -> Option<bool> {
        let changed;
        {
            let mut st = self.st();
            let c = st.checks.get(key).filter(|c| c.generation == generation)?;
            let deadline = c.ttl_deadline?;
            if Instant::now() < deadline {
                return Some(false);
            }
            let output = if c.output.is_empty() || c.output.starts_with("TTL expired") {
                "TTL expired".to_owned()
            } else {
                format!(
                    "TTL expired (last output before timeout follows): {}",
                    c.output
                )
            };
            changed = st.set_status(key, CRITICAL, &output);
        }
        if changed {
            self.changed();
        }
        Some(true)
    }
}

// ---------------------------------------------------------------------------------------------
// Check runners
// ---------------------------------------------------------------------------------------------

async fn ttl_runner(weak: Weak<Inner>, key: CheckKey, generation: u64, notify: Arc<Notify>) {
    loop {
        let deadline = {
            let Some(inner) = weak.upgrade() else { return };
            let st = inner.st();
            match st.checks.get(&key) {
                Some(c) if c.generation == generation => c.ttl_deadline,
                _ => return,
            }
        };
        let Some(deadline) = deadline else { return };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                let expired = {
                    let Some(inner) = weak.upgrade() else { return };
                    inner.expire_ttl(&key, generation)
                };
                match expired {
                    None => return,
                    Some(true) => notify.notified().await,
                    Some(false) => {}
                }
            }
            () = notify.notified() => {}
        }
    }
}

async fn http_runner(
    weak: Weak<Inner>,
    key: CheckKey,
    generation: u64,
    spec: HttpSpec,
    interval: Duration,
    timeout: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (status, output) = http_probe(&spec, timeout).await;
        let Some(inner) = weak.upgrade() else { return };
        if !inner.apply_runner_result(&key, generation, status, &output) {
            return;
        }
    }
}

/// `host:port` → a loopback socket address, or why not.
fn loopback_target(host: &str, port: u16) -> Result<SocketAddr, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    match h.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(SocketAddr::new(ip, port)),
        _ => Err(format!(
            "consul double: refusing to contact non-loopback host {host:?}"
        )),
    }
}

fn split_host_port(s: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_owned(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_owned(), default_port?)),
    }
}

async fn http_probe(spec: &HttpSpec, timeout: Duration) -> (&'static str, String) {
    let method = if spec.method.is_empty() {
        "GET".to_owned()
    } else {
        spec.method.to_ascii_uppercase()
    };
    let Some(rest) = spec.url.strip_prefix("http://") else {
        return (
            CRITICAL,
            format!(
                "consul double: only http:// loopback URLs are probed, not {:?}",
                spec.url
            ),
        );
    };
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..split];
    let mut path = rest[split..].split('#').next().unwrap_or("").to_owned();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    let Some((host, port)) = split_host_port(authority, Some(80)) else {
        return (CRITICAL, format!("parse {:?}: invalid URL", spec.url));
    };
    let addr = match loopback_target(&host, port) {
        Ok(a) => a,
        Err(e) => return (CRITICAL, e),
    };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("dial tcp {addr}: connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let mut builder = Request::builder()
            .method(method.as_str())
            .uri(path.as_str())
            .header("host", authority)
            .header("user-agent", "Consul Health Check")
            .header("accept", "text/plain, text/*, */*");
        for (k, v) in &spec.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let req = builder
            .body(Full::new(Bytes::from(spec.body.clone())))
            .map_err(|e| e.to_string())?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while buf.len() < MAX_OUTPUT_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => break,
                }
            }
            buf.truncate(MAX_OUTPUT_BYTES);
            Ok((status, String::from_utf8_lossy(&buf).into_owned()))
        }
        .await;
        conn.abort();
        result
    };
    let url = &spec.url;
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, body))) => {
            let line = format!(
                "HTTP {method} {url}: {} {} Output: {body}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            let verdict = if status.is_success() {
                PASSING
            } else if status.as_u16() == 429 {
                WARNING
            } else {
                CRITICAL
            };
            (verdict, line)
        }
        Ok(Err(e)) => (CRITICAL, format!("{method} \"{url}\": {e}")),
        Err(_) => (
            CRITICAL,
            format!(
                "{method} \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
            ),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Registration parsing and validation
// ---------------------------------------------------------------------------------------------

/// A registration body, as seawall sends it (PascalCase). A field the double does not know
/// is refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct WireRegistration {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    name: String,
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: i64,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<WireWeights>,
    #[serde(default)]
    enable_tag_override: bool,
    check: Option<WireCheck>,
    checks: Option<Vec<WireCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct WireWeights {
    #[serde(default)]
    passing: i64,
    #[serde(default)]
    warning: i64,
}

/// A check of a registration: TTL or HTTP. `Notes`, `TLSSkipVerify` and
/// `DeregisterCriticalServiceAfter` are decoded and otherwise ignored (nothing is reaped).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct WireCheck {
    #[serde(rename = "CheckID")]
    check_id: Option<String>,
    name: Option<String>,
    #[serde(rename = "Notes")]
    _notes: Option<String>,
    status: Option<String>,
    #[serde(rename = "TTL")]
    ttl: Option<String>,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    method: Option<String>,
    header: Option<BTreeMap<String, Vec<String>>>,
    body: Option<String>,
    #[serde(rename = "TLSSkipVerify")]
    _tls_skip_verify: Option<bool>,
    interval: Option<String>,
    timeout: Option<String>,
    #[serde(rename = "DeregisterCriticalServiceAfter")]
    deregister_after: Option<String>,
}

struct Registration {
    id: String,
    name: String,
    tags: Option<Vec<String>>,
    address: String,
    port: u16,
    meta: Option<BTreeMap<String, String>>,
    weights: (i64, i64),
    enable_tag_override: bool,
    checks: Vec<CheckDef>,
}

#[derive(Clone, Debug)]
struct CheckDef {
    check_id: Option<String>,
    name: Option<String>,
    status: Option<String>,
    kind: CheckKind,
    interval: Option<Duration>,
    timeout: Option<Duration>,
}

/// A duration field (a Go duration string) in nanoseconds; 0 when absent.
fn nanos(field: &Option<String>) -> Result<i128, String> {
    match field {
        None => Ok(0),
        Some(s) => go_duration_nanos(s).map_err(|e| format!("Request decode failed: {e}")),
    }
}

fn positive(nanos: i128) -> Option<Duration> {
    (nanos > 0).then(|| Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
}

/// Consul's `CheckType.Validate`, for the TTL and HTTP checks the double runs.
fn parse_check(c: WireCheck) -> Result<CheckDef, String> {
    let (ttl, interval, timeout) = (nanos(&c.ttl)?, nanos(&c.interval)?, nanos(&c.timeout)?);
    nanos(&c.deregister_after)?;
    let http = c.http.filter(|u| !u.is_empty());
    if interval > 0 && ttl > 0 {
        return Err("Invalid check: Interval and TTL cannot both be specified".to_owned());
    }
    if http.is_some() && interval <= 0 {
        return Err(
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, or TCP checks"
                .to_owned(),
        );
    }
    if http.is_none() && ttl <= 0 {
        return Err("Invalid check: TTL must be > 0 for TTL checks".to_owned());
    }
    if timeout < 0 {
        return Err("Invalid check: Timeout must be >= 0".to_owned());
    }
    let status = c.status.filter(|s| !s.is_empty());
    if status.as_deref().is_some_and(|s| !valid_status(s)) {
        return Err("Status for checks must 'passing', 'warning', 'critical'".to_owned());
    }
    let kind = match http {
        Some(url) => CheckKind::Http(HttpSpec {
            url,
            method: c.method.unwrap_or_default(),
            headers: c
                .header
                .unwrap_or_default()
                .into_iter()
                .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k.clone(), v)))
                .collect(),
            body: c.body.unwrap_or_default(),
        }),
        None => CheckKind::Ttl(positive(ttl).unwrap_or_default()),
    };
    Ok(CheckDef {
        check_id: c.check_id,
        name: c.name,
        status,
        kind,
        interval: positive(interval),
        timeout: positive(timeout),
    })
}

/// Parses and validates a registration body the way `PUT /v1/agent/service/register` does:
/// decoding (types, durations) first, then the rules.
fn parse_registration(v: &Value) -> Result<Registration, Reply> {
    let bad = |reason: String| (400u16, reason);
    // serde would also take a struct from an array of its fields; Consul wants an object.
    if !v.is_object() {
        return Err(bad(format!(
            "Request decode failed: json: cannot unmarshal {v} into Go value of type structs.ServiceDefinition"
        )));
    }
    let wire =
        WireRegistration::deserialize(v).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    let checks = wire
        .check
        .into_iter()
        .chain(wire.checks.into_iter().flatten())
        .map(parse_check)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if wire.name.is_empty() {
        return Err(bad("Missing service name".to_owned()));
    }
    let weights = wire.weights.map_or((1, 1), |w| (w.passing, w.warning));
    if weights.0 < 1 {
        return Err(bad(
            "Invalid Weights: Passing must be greater than 0".to_owned()
        ));
    }
    if weights.1 < 0 {
        return Err(bad(
            "Invalid Weights: Warning must be greater or equal than 0".to_owned(),
        ));
    }
    let port = u16::try_from(wire.port).map_err(|_| {
        bad(format!(
            "Invalid service port {}: must be within 0-65535",
            wire.port
        ))
    })?;
    if checks.len() > MAX_CHECKS_PER_SERVICE {
        return Err(bad("consul double: too many checks".to_owned()));
    }
    Ok(Registration {
        id: if wire.id.is_empty() {
            wire.name.clone()
        } else {
            wire.id
        },
        name: wire.name,
        tags: wire.tags,
        address: wire.address,
        port,
        meta: wire.meta,
        weights,
        enable_tag_override: wire.enable_tag_override,
        checks,
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------------

type Resp = Response<Full<Bytes>>;

async fn serve(
    listener: TcpListener,
    weak: Weak<Inner>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                while conns.try_join_next().is_some() {}
                if conns.len() >= MAX_CONNECTIONS || !peer.ip().is_loopback() {
                    drop(stream);
                    continue;
                }
                let weak = weak.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match tls {
                        None => serve_connection(stream, weak).await,
                        Some(acceptor) => {
                            let accepting = acceptor.accept(stream);
                            if let Ok(Ok(stream)) =
                                tokio::time::timeout(Duration::from_secs(10), accepting).await
                            {
                                serve_connection(stream, weak).await;
                            }
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Serves the API on one connection (TCP, or TLS over it).
async fn serve_connection<I>(io: I, weak: Weak<Inner>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if let Some(inner) = weak.upgrade() {
        inner.connections.fetch_add(1, Ordering::SeqCst);
    }
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let weak = weak.clone();
        async move {
            Ok::<_, Infallible>(match weak.upgrade() {
                Some(inner) => handle(inner, req).await,
                None => text(503, "consul double: agent gone"),
            })
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn text(status: u16, msg: impl Into<String>) -> Resp {
    let status =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(msg.into())))
        .expect("valid response")
}

fn empty_ok() -> Resp {
    Response::builder()
        .status(200)
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

fn json_response(body: &Value, headers: &[(&str, String)]) -> Resp {
    let mut b = Response::builder()
        .status(200)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )))
    .expect("valid response")
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn method_not_allowed(m: &Method) -> Resp {
    text(405, format!("method {m} not allowed"))
}

struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(raw: &str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
                None => (percent_decode(p, true), String::new()),
            })
            .collect();
        Self { pairs }
    }
    fn has(&self, k: &str) -> bool {
        self.pairs.iter().any(|(key, _)| key == k)
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    /// Go's `getBoolQueryParam`: absent → false, present and empty → true, else `ParseBool`.
    fn flag(&self, k: &str) -> Result<bool, ()> {
        match self.get(k) {
            None => Ok(false),
            Some("") => Ok(true),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(_) => Err(()),
        }
    }
    /// `400` naming the first parameter outside `modelled`: Consul would act on it, and the
    /// double does not.
    fn refuse_unmodelled(&self, modelled: &[&str]) -> Option<Resp> {
        let (k, _) = self
            .pairs
            .iter()
            .find(|(k, _)| !modelled.contains(&k.as_str()))?;
        Some(text(
            400,
            format!("consul double: query parameter {k:?} is not modelled"),
        ))
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let query = Query::parse(&raw_query);
    let token = req
        .headers()
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let failure = {
        let mut st = inner.st();
        st.record(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: raw_query,
            token: token.clone(),
        });
        st.take_failure()
    };
    if let Some((status, body)) = failure {
        return text(status, body);
    }
    if let Some(expected) = &inner.opts.acl_token {
        match &token {
            None => return text(403, "Permission denied"),
            Some(t) if t != expected => return text(403, "ACL not found"),
            Some(_) => {}
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(413, "Request body too large"),
    };
    route(&inner, &method, &path, &query, &body).await
}

async fn route(inner: &Arc<Inner>, method: &Method, path: &str, q: &Query, body: &Bytes) -> Resp {
    let is_put = *method == Method::PUT;
    let is_get = *method == Method::GET || *method == Method::HEAD;
    let tail = |prefix: &str| path.strip_prefix(prefix).map(|t| percent_decode(t, false));
    if path == "/v1/agent/service/register" {
        if !is_put {
            return method_not_allowed(method);
        }
        if let Some(refused) = q.refuse_unmodelled(&["replace-existing-checks"]) {
            return refused;
        }
        return agent_register(inner, q, body);
    }
    if let Some(id) = tail("/v1/agent/service/deregister/") {
        if !is_put {
            return method_not_allowed(method);
        }
        if let Some(refused) = q.refuse_unmodelled(&[]) {
            return refused;
        }
        if id.is_empty() {
            return text(400, "Missing service ID");
        }
        let node = inner.opts.node.clone();
        return if inner.deregister(&node, &id) || !inner.opts.deregister_unknown_is_404 {
            empty_ok()
        } else {
            text(404, format!("Unknown service ID \"{id}\""))
        };
    }
    for (prefix, status) in [
        ("/v1/agent/check/pass/", PASSING),
        ("/v1/agent/check/warn/", WARNING),
        ("/v1/agent/check/fail/", CRITICAL),
    ] {
        if let Some(id) = tail(prefix) {
            if !is_put {
                return method_not_allowed(method);
            }
            if let Some(refused) = q.refuse_unmodelled(&["note"]) {
                return refused;
            }
            let note = q.get("note").unwrap_or("").to_owned();
            return ttl_update(inner, &id, status, &note);
        }
    }
    if let Some(id) = tail("/v1/agent/check/update/") {
        if !is_put {
            return method_not_allowed(method);
        }
        if let Some(refused) = q.refuse_unmodelled(&[]) {
            return refused;
        }
        return check_update(inner, &id, body);
    }
    if path == "/v1/agent/services" {
        if !is_get {
            return method_not_allowed(method);
        }
        if let Some(refused) = q.refuse_unmodelled(&[]) {
            return refused;
        }
        return agent_services(inner);
    }
    if let Some(name) = tail("/v1/health/service/") {
        if !is_get {
            return method_not_allowed(method);
        }
        if let Some(refused) = q.refuse_unmodelled(&["passing", "index", "wait"]) {
            return refused;
        }
        return health_service(inner, &name, q).await;
    }
    text(404, "404 page not found\n")
}

fn agent_register(inner: &Arc<Inner>, q: &Query, body: &Bytes) -> Resp {
    if body.is_empty() {
        return text(400, "Request decode failed: EOF");
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return text(400, format!("Request decode failed: {e}")),
    };
    let reg = match parse_registration(&v) {
        Ok(r) => r,
        Err((status, reason)) => return text(status, reason),
    };
    let replace = q.has("replace-existing-checks")
        && matches!(q.get("replace-existing-checks"), Some("" | "true"));
    let node = inner.opts.node.clone();
    let address = inner.opts.node_address.clone();
    match inner.register_service(&node, &address, reg, replace) {
        Ok(()) => empty_ok(),
        Err((status, reason)) => text(status, reason),
    }
}

/// `PUT /v1/agent/check/update/:id` with `{ "Status": …, "Output": … }`.
fn check_update(inner: &Arc<Inner>, id: &str, body: &Bytes) -> Resp {
    if body.is_empty() {
        return text(400, "Request decode failed: EOF");
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return text(400, format!("Request decode failed: {e}")),
    };
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "PascalCase")]
    struct Update {
        #[serde(default)]
        status: String,
        #[serde(default)]
        output: String,
    }
    if !v.is_object() {
        return text(
            400,
            format!(
                "Request decode failed: json: cannot unmarshal {v} into Go value of type agent.checkUpdate"
            ),
        );
    }
    let Update { status, output } = match Update::deserialize(&v) {
        Ok(u) => u,
        Err(e) => return text(400, format!("Request decode failed: {e}")),
    };
    if !valid_status(&status) {
        return text(400, format!("Invalid check status: '{status}'"));
    }
    ttl_update(inner, id, &status, &output)
}

fn ttl_update(inner: &Arc<Inner>, id: &str, status: &str, output: &str) -> Resp {
    let key = (inner.opts.node.clone(), id.to_owned());
    let changed = {
        let mut st = inner.st();
        let Some(c) = st.checks.get(&key) else {
            return text(
                404,
                format!(
                    "Unknown check ID \"{id}\". Ensure that the check ID is passed, not the check name."
                ),
            );
        };
        if !matches!(c.kind, CheckKind::Ttl(_)) {
            return text(
                500,
                format!("CheckID \"{id}\" does not have associated TTL"),
            );
        }
        st.reset_ttl(&key);
        st.set_status(&key, status, output)
    };
    if changed {
        inner.changed();
    }
    empty_ok()
}

/// `GET /v1/agent/services`: the local agent's services by ID.
fn agent_services(inner: &Arc<Inner>) -> Resp {
    let st = inner.st();
    let services: Map<String, Value> = st
        .services
        .iter()
        .filter(|((node, _), _)| *node == inner.opts.node)
        .map(|((_, id), s)| (id.clone(), service_json(id, s)))
        .collect();
    json_response(&Value::Object(services), &[])
}

fn parse_wait(q: &Query) -> Result<Duration, &'static str> {
    match q.get("wait").filter(|w| !w.is_empty()) {
        None => Ok(DEFAULT_WAIT),
        Some(w) => match go_duration_nanos(w) {
            Ok(n) if n > 0 => {
                Ok(Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX)).min(MAX_WAIT))
            }
            Ok(_) => Ok(DEFAULT_WAIT),
            Err(_) => Err("Invalid wait time"),
        },
    }
}

struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Consul's blocking loop: evaluates `f` now and after every change until it reports ready, the
/// state store is abandoned (`set_index`), or `wait` (+ up to `wait/16`) elapses.
async fn block_until<T>(
    inner: &Arc<Inner>,
    wait: Duration,
    mut f: impl FnMut(&State) -> (bool, T),
) -> T {
    let mut rx = inner.changes.subscribe();
    let epoch = {
        let st = inner.st();
        let (ready, out) = f(&st);
        if ready {
            return out;
        }
        st.abandon_epoch
    };
    inner.waiting.fetch_add(1, Ordering::SeqCst);
    let _guard = WaitGuard(&inner.waiting);
    let deadline = Instant::now() + wait + jitter(wait / 16);
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
        let st = inner.st();
        let (ready, out) = f(&st);
        if ready || st.abandon_epoch != epoch {
            return out;
        }
    }
    let st = inner.st();
    f(&st).1
}

/// `GET /v1/health/service/:service`, blocking when `?index` is given.
async fn health_service(inner: &Arc<Inner>, name: &str, q: &Query) -> Resp {
    if name.is_empty() {
        return text(400, "Missing service name");
    }
    let passing = match q.flag("passing") {
        Ok(p) => p,
        Err(()) => return text(400, "Invalid value for ?passing"),
    };
    let min_index = match q.get("index").filter(|i| !i.is_empty()) {
        None => 0,
        Some(i) => match i.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return text(400, "Invalid index"),
        },
    };
    let wait = match parse_wait(q) {
        Ok(w) => w,
        Err(reason) => return text(400, reason),
    };
    let compute = |st: &State| {
        let entries: Vec<Value> = st
            .services
            .iter()
            .filter(|(_, svc)| svc.name == name)
            .filter_map(|((node, id), svc)| st.health_entry(node, id, svc))
            .filter(|entry| {
                !passing
                    || entry["Checks"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().all(|c| c["Status"] == PASSING))
            })
            .collect();
        (st.service_result_index(name), Value::Array(entries))
    };
    let (index, value) = if min_index == 0 {
        compute(&inner.st())
    } else {
        block_until(inner, wait, |st| {
            let (idx, v) = compute(st);
            (idx > min_index, (idx, v))
        })
        .await
    };
    json_response(
        &value,
        &[
            ("x-consul-index", index.to_string()),
            ("x-consul-knownleader", "true".to_owned()),
            ("x-consul-lastcontact", "0".to_owned()),
        ],
    )
}
