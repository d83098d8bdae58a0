#![allow(dead_code, unreachable_pub)]
//! A Consul HTTP API double for integration tests: a real HTTP/1.1 server on loopback that
//! follows `docs/consul-api.md` (and Consul's own behaviour where the sheet is silent).
//!
//! Its own tests are in `tests.rs` beside it.
//!
//! What it models: one local agent (`DoubleOptions::node`) plus instances "registered through
//! other agents" (`register_on_node`), a single raft-like index bumped by every write, per-service
//! modify indexes, blocking queries, an agent check runner (HTTP, TCP and TTL checks, the critical
//! service reaper) driven by tokio time, ACL tokens, leader loss, stop/restart and fault injection.
//!
//! Deliberate simplifications: HTTP/TCP checks run at once after registration (Consul staggers
//! the first run randomly within the interval); check runners keep running while the agent is
//! stopped; output-only check updates change the stored output without bumping the index (Consul
//! defers them by `check_update_interval`); reads with a missing/wrong ACL token get `403` instead of
//! being filtered to an empty result. Paused-time tests should drive TTL checks and the reaper only:
//! HTTP/TCP checks do real loopback I/O, which auto-advancing paused time can race.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::hash::{BuildHasher, DefaultHasher, Hash, Hasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
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
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
const REAP_INTERVAL: Duration = Duration::from_secs(30);
const RESTART_INDEX_JUMP: u64 = 1000;
const INITIAL_INDEX: u64 = 10;
const LEADER_ADDR: &str = "127.0.0.1:8300";

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Options of a double.
#[derive(Clone, Debug)]
pub struct DoubleOptions {
    /// Name of the local agent's node.
    pub node: String,
    /// Address of the local agent's node.
    pub node_address: String,
    /// When set, every request (except `/v1/status/*`, which Consul leaves open) must present
    /// this token (`X-Consul-Token`, `Authorization: Bearer`, or `?token=`), else `403`.
    pub acl_token: Option<String>,
    /// `true` (recent Consul): deregistering an unknown ID answers `404`; `false`: `200`.
    pub deregister_unknown_is_404: bool,
    /// The agent's datacenter; `?dc=` naming another one answers `500 No path to datacenter`.
    pub datacenter: String,
    /// Consul raises HTTP/TCP check intervals below 1 s to 1 s; tests may lower the floor.
    pub min_check_interval: Duration,
}

impl Default for DoubleOptions {
    fn default() -> Self {
        Self {
            node: "node-a".to_owned(),
            node_address: "127.0.0.1".to_owned(),
            acl_token: None,
            deregister_unknown_is_404: true,
            datacenter: "dc1".to_owned(),
            min_check_interval: Duration::from_secs(1),
        }
    }
}

/// One request the double received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// The raw URL path.
    pub path: String,
    /// The raw query string (without `?`), empty when none.
    pub query: String,
    /// The ACL token presented, if any.
    pub token: Option<String>,
}

/// A handle on a running Consul double (cheap to clone).
#[derive(Clone)]
pub struct ConsulDouble {
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
    pub async fn start() -> ConsulDouble {
        Self::start_with(DoubleOptions::default()).await
    }

    /// Starts a double with `opts` on `127.0.0.1:0`.
    pub async fn start_with(opts: DoubleOptions) -> ConsulDouble {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("consul double: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("consul double: local addr");
        let now = Instant::now();
        let mut nodes = BTreeMap::new();
        nodes.insert(
            opts.node.clone(),
            NodeEntry::new(opts.node_address.clone(), INITIAL_INDEX),
        );
        let state = State {
            datacenter: opts.datacenter.clone(),
            index: INITIAL_INDEX,
            extinction_index: 0,
            service_index: HashMap::new(),
            abandon_epoch: 0,
            leader: true,
            leader_lost_at: now,
            nodes,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            next_generation: 1,
            fail_next: None,
            latency: Duration::ZERO,
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
            reaper: Mutex::new(None),
            waiting: AtomicUsize::new(0),
        });
        let reaper = inner.handle.spawn(reaper(Arc::downgrade(&inner)));
        *lock(&inner.reaper) = Some(reaper.abort_handle());
        inner.spawn_server(listener).await;
        ConsulDouble { inner }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `127.0.0.1:PORT`, what `CONSUL_HTTP_ADDR` would hold.
    pub fn http_addr(&self) -> String {
        self.inner.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The agent goes down: stops listening and closes every open connection, including held
    /// blocking queries. Registered state is kept.
    pub async fn stop(&self) {
        let ctl = self.inner.server.lock().await.take();
        if let Some(ctl) = ctl {
            let _ = ctl.shutdown.send(true);
            let _ = ctl.task.await;
        }
    }

    /// Listens again on the same port. Services and checks survive; the index jumps forward by
    /// 1000 and every service's index moves to it (the agent re-syncs). Use `set_index` after
    /// this to force another value.
    pub async fn restart(&self) {
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

    /// Whether the double is listening.
    pub async fn is_running(&self) -> bool {
        self.inner.server.lock().await.is_some()
    }

    /// Forces the raft index to `n` (a jump up, or lower to simulate a server whose index went
    /// backwards, e.g. a snapshot restore): every service index becomes `n` and every blocking
    /// query returns at once with the new state, as Consul's abandoned state store does.
    pub fn set_index(&self, n: u64) {
        {
            let mut st = self.inner.st();
            st.reindex(n.max(1));
            st.abandon_epoch += 1;
        }
        self.inner.changed();
    }

    /// The current raft index.
    pub fn index(&self) -> u64 {
        self.inner.st().index
    }

    /// Simulates leadership: without a leader `/v1/status/leader` answers `""` and health/catalog
    /// reads answer `500 No cluster leader` unless `?stale`.
    pub fn set_leader(&self, leader: bool) {
        let mut st = self.inner.st();
        if st.leader && !leader {
            st.leader_lost_at = Instant::now();
        }
        st.leader = leader;
    }

    /// Registers an instance as if through the local agent (same body and validation as
    /// `PUT /v1/agent/service/register`).
    pub fn register(&self, registration: Value) -> Result<(), String> {
        let node = self.inner.opts.node.clone();
        let address = self.inner.opts.node_address.clone();
        self.register_on_node(&node, &address, registration)
    }

    /// Registers an instance on another node (as if through that node's agent). Same body
    /// format and validation as the register endpoint.
    pub fn register_on_node(
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
    pub fn deregister_on_node(&self, node: &str, service_id: &str) -> bool {
        self.inner.deregister(node, service_id)
    }

    /// Sets a check's status as if the agent's check runner observed it (bumps the index and
    /// wakes blocking queries when the status changes; resets a TTL check's timer). Looks on the
    /// local node first, else on every node holding that check ID. `false` when no such check or
    /// the status is not `passing`/`warning`/`critical`.
    pub fn set_check_status(&self, check_id: &str, status: &str, output: &str) -> bool {
        let local = (self.inner.opts.node.clone(), check_id.to_owned());
        let keys: Vec<CheckKey> = {
            let st = self.inner.st();
            if st.checks.contains_key(&local) {
                vec![local]
            } else {
                st.checks
                    .keys()
                    .filter(|(_, id)| id == check_id)
                    .cloned()
                    .collect()
            }
        };
        let mut any = false;
        for (node, id) in keys {
            any |= self.set_check_status_on_node(&node, &id, status, output);
        }
        any
    }

    /// `set_check_status` for the check `check_id` of `node`.
    pub fn set_check_status_on_node(
        &self,
        node: &str,
        check_id: &str,
        status: &str,
        output: &str,
    ) -> bool {
        if !valid_status(status) {
            return false;
        }
        let key = (node.to_owned(), check_id.to_owned());
        let changed = {
            let mut st = self.inner.st();
            if !st.checks.contains_key(&key) {
                return false;
            }
            st.reset_ttl(&key);
            st.set_status(&key, status, output)
        };
        if changed {
            self.inner.changed();
        }
        true
    }

    /// `serfHealth` of `node` (created with the local node address if unknown); a failing node
    /// makes all of its services unhealthy.
    pub fn set_node_health(&self, node: &str, passing: bool) {
        let changed = {
            let mut st = self.inner.st();
            let status = if passing { PASSING } else { CRITICAL };
            let exists = st.nodes.contains_key(node);
            if exists && st.nodes[node].serf_status == status {
                false
            } else {
                let idx = st.bump();
                let address = self.inner.opts.node_address.clone();
                let entry = st
                    .nodes
                    .entry(node.to_owned())
                    .or_insert_with(|| NodeEntry::new(address, idx));
                entry.serf_status = status;
                entry.serf_modify_index = idx;
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
    pub fn fail_next(&self, n: usize, status: u16, body: &str) {
        self.inner.st().fail_next = (n > 0).then(|| FailSpec {
            remaining: n,
            status,
            body: body.to_owned(),
        });
    }

    /// Extra delay before every answer (before a blocking query starts waiting).
    pub fn set_latency(&self, d: Duration) {
        self.inner.st().latency = d;
    }

    /// Requests received so far (the most recent 10 000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.st().requests.iter().cloned().collect()
    }

    /// How many recorded requests have a path starting with `path_prefix`.
    pub fn request_count(&self, path_prefix: &str) -> usize {
        self.inner
            .st()
            .requests
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .count()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.inner.st().requests.clear();
    }

    /// Every registered instance as `(node, service id)`, sorted.
    pub fn service_ids(&self) -> Vec<(String, String)> {
        self.inner.st().services.keys().cloned().collect()
    }

    /// Status of `check_id` (local node first, else the first node holding it).
    pub fn check_status(&self, check_id: &str) -> Option<String> {
        self.inner.find_check(check_id, |c| c.status.clone())
    }

    /// Output of `check_id` (local node first, else the first node holding it).
    pub fn check_output(&self, check_id: &str) -> Option<String> {
        self.inner.find_check(check_id, |c| c.output.clone())
    }

    /// Status of `check_id` on `node`.
    pub fn check_status_on_node(&self, node: &str, check_id: &str) -> Option<String> {
        self.inner
            .st()
            .checks
            .get(&(node.to_owned(), check_id.to_owned()))
            .map(|c| c.status.clone())
    }

    /// How many blocking queries are being held right now.
    pub fn waiting_queries(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Waits (polling) until at least `n` blocking queries are held, up to `timeout` (tokio time:
    /// do not call it with paused time, which would jump past the deadline).
    pub async fn wait_for_waiting_queries(&self, n: usize, timeout: Duration) -> bool {
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
pub struct TestAgent {
    /// The agent's address as `CONSUL_HTTP_ADDR` holds it (`host:port` or a URL).
    pub http_addr: String,
    /// `CONSUL_HTTP_TOKEN` when running against a real agent.
    pub token: Option<String>,
    /// The double, when no real agent was configured.
    pub double: Option<ConsulDouble>,
}

/// Reads `CONSUL_HTTP_ADDR` (and `CONSUL_HTTP_TOKEN`); otherwise starts a double.
pub async fn agent() -> TestAgent {
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
pub fn go_duration_nanos(orig: &str) -> Result<i128, String> {
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

/// Parses a non-negative Go duration string.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let nanos = go_duration_nanos(s)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| format!("negative duration \"{s}\""))
}

/// Formats a duration the way Go's `time.Duration.String()` does (`1m30s`, `100ms`, `0s`).
pub fn go_duration_string(d: Duration) -> String {
    fn trim(v: f64) -> String {
        let s = format!("{v:.9}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_owned()
    }
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_owned();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", trim(ns as f64 / 1e3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", trim(ns as f64 / 1e6));
    }
    let secs_total = ns / 1_000_000_000;
    let hours = secs_total / 3600;
    let minutes = (secs_total % 3600) / 60;
    let secs = (ns % 60_000_000_000) as f64 / 1e9;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&format!("{}s", trim(secs)));
    out
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
    reaper: Mutex<Option<AbortHandle>>,
    waiting: AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(reaper) = lock(&self.reaper).take() {
            reaper.abort();
        }
    }
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
    create_index: u64,
    modify_index: u64,
    serf_modify_index: u64,
}

impl NodeEntry {
    fn new(address: String, index: u64) -> Self {
        Self {
            address,
            serf_status: PASSING,
            create_index: index,
            modify_index: index,
            serf_modify_index: index,
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
    tagged: BTreeMap<String, (String, u16)>,
    weights: (i64, i64),
    enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, Debug)]
enum CheckKind {
    Ttl(Duration),
    Http(HttpSpec),
    Tcp(String),
    /// Kinds the double accepts but does not run (gRPC, H2PING, UDP, alias): the status stays
    /// where the registration or `set_check_status` put it.
    NotRun(&'static str),
}

impl CheckKind {
    fn type_name(&self) -> &'static str {
        match self {
            CheckKind::Ttl(_) => "ttl",
            CheckKind::Http(_) => "http",
            CheckKind::Tcp(_) => "tcp",
            CheckKind::NotRun(t) => t,
        }
    }
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
    notes: String,
    status: String,
    output: String,
    service_id: String,
    kind: CheckKind,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    deregister_after: Option<Duration>,
    critical_since: Option<Instant>,
    ttl_deadline: Option<Instant>,
    notify: Arc<Notify>,
    generation: u64,
    task: Option<AbortHandle>,
    create_index: u64,
    modify_index: u64,
}

impl Drop for CheckEntry {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct State {
    datacenter: String,
    index: u64,
    extinction_index: u64,
    service_index: HashMap<String, u64>,
    abandon_epoch: u64,
    leader: bool,
    leader_lost_at: Instant,
    nodes: BTreeMap<String, NodeEntry>,
    services: BTreeMap<(String, String), ServiceEntry>,
    checks: BTreeMap<CheckKey, CheckEntry>,
    next_generation: u64,
    fail_next: Option<FailSpec>,
    latency: Duration,
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
        for node in self.nodes.values_mut() {
            node.create_index = node.create_index.min(n);
            node.modify_index = node.modify_index.min(n);
            node.serf_modify_index = node.serf_modify_index.min(n);
        }
        for s in self.services.values_mut() {
            s.create_index = s.create_index.min(n);
            s.modify_index = n;
        }
        for c in self.checks.values_mut() {
            c.create_index = c.create_index.min(n);
            c.modify_index = c.modify_index.min(n);
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

    fn remove_service(&mut self, node: &str, id: &str) -> Option<u64> {
        let svc = self.services.remove(&(node.to_owned(), id.to_owned()))?;
        let idx = self.bump();
        self.checks
            .retain(|(n, _), c| !(n == node && c.service_id == id));
        self.touch_service(&svc.name, idx);
        Some(idx)
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
        c.critical_since = (status == CRITICAL).then(Instant::now);
        let service_id = c.service_id.clone();
        let idx = self.bump();
        if let Some(c) = self.checks.get_mut(key) {
            c.modify_index = idx;
        }
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

    // --- JSON views -------------------------------------------------------------------------

    fn node_json(&self, name: &str, n: &NodeEntry) -> Value {
        json!({
            "ID": node_uuid(name),
            "Node": name,
            "Address": n.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": n.address, "lan_ipv4": n.address,
                "wan": n.address, "wan_ipv4": n.address,
            },
            "Meta": { "consul-network-segment": "" },
            "CreateIndex": n.create_index,
            "ModifyIndex": n.modify_index,
        })
    }

    fn serf_json(&self, node: &str, n: &NodeEntry) -> Value {
        let output = if n.serf_status == PASSING {
            "Agent alive and reachable"
        } else {
            "Agent not live or unreachable"
        };
        json!({
            "Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
            "Status": n.serf_status, "Notes": "", "Output": output,
            "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
            "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
            "CreateIndex": n.create_index, "ModifyIndex": n.serf_modify_index,
        })
    }

    fn check_json(&self, node: &str, id: &str, c: &CheckEntry) -> Value {
        let svc = self.services.get(&(node.to_owned(), c.service_id.clone()));
        json!({
            "Node": node, "CheckID": id, "Name": c.name, "Status": c.status,
            "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
            "ServiceName": svc.map(|s| s.name.clone()).unwrap_or_default(),
            "ServiceTags": svc.and_then(|s| s.tags.clone()),
            "Type": c.kind.type_name(),
            "Interval": c.interval.map(go_duration_string).unwrap_or_default(),
            "Timeout": c.timeout.map(go_duration_string).unwrap_or_default(),
            "ExposedPort": 0, "Definition": {},
            "CreateIndex": c.create_index, "ModifyIndex": c.modify_index,
        })
    }

    fn health_entry(&self, node: &str, id: &str, svc: &ServiceEntry) -> Option<Value> {
        let n = self.nodes.get(node)?;
        let mut checks = vec![("serfHealth".to_owned(), self.serf_json(node, n))];
        for ((cn, cid), c) in &self.checks {
            if cn == node && c.service_id == id {
                checks.push((cid.clone(), self.check_json(node, cid, c)));
            }
        }
        checks.sort_by(|a, b| a.0.cmp(&b.0));
        Some(json!({
            "Node": self.node_json(node, n),
            "Service": service_json(id, svc, false, &self.datacenter),
            "Checks": checks.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        }))
    }

    fn catalog_entry(&self, node: &str, id: &str, svc: &ServiceEntry) -> Option<Value> {
        let n = self.nodes.get(node)?;
        Some(json!({
            "ID": node_uuid(node), "Node": node, "Address": n.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": { "lan": n.address, "lan_ipv4": n.address, "wan": n.address, "wan_ipv4": n.address },
            "NodeMeta": { "consul-network-segment": "" },
            "ServiceKind": "", "ServiceID": id, "ServiceName": svc.name,
            "ServiceTags": svc.tags, "ServiceAddress": svc.address,
            "ServiceTaggedAddresses": tagged_json(&svc.tagged),
            "ServiceWeights": { "Passing": svc.weights.0, "Warning": svc.weights.1 },
            "ServiceMeta": svc.meta, "ServicePort": svc.port,
            "ServiceEnableTagOverride": svc.enable_tag_override,
            "CreateIndex": svc.create_index, "ModifyIndex": svc.modify_index,
        }))
    }
}

fn tagged_json(tagged: &BTreeMap<String, (String, u16)>) -> Value {
    let mut m = Map::new();
    for (k, (a, p)) in tagged {
        m.insert(k.clone(), json!({ "Address": a, "Port": p }));
    }
    Value::Object(m)
}

fn service_json(id: &str, s: &ServiceEntry, agent_view: bool, dc: &str) -> Value {
    let mut v = json!({
        "ID": id, "Service": s.name, "Tags": s.tags, "Address": s.address,
        "Meta": s.meta, "Port": s.port,
        "Weights": { "Passing": s.weights.0, "Warning": s.weights.1 },
        "EnableTagOverride": s.enable_tag_override,
    });
    let obj = v.as_object_mut().expect("object");
    if !s.tagged.is_empty() {
        obj.insert("TaggedAddresses".to_owned(), tagged_json(&s.tagged));
    }
    if agent_view {
        obj.insert("Datacenter".to_owned(), json!(dc));
    } else {
        obj.insert(
            "Proxy".to_owned(),
            json!({ "Mode": "", "MeshGateway": {}, "Expose": {} }),
        );
        obj.insert("Connect".to_owned(), json!({}));
        obj.insert("PeerName".to_owned(), json!(""));
        obj.insert("CreateIndex".to_owned(), json!(s.create_index));
        obj.insert("ModifyIndex".to_owned(), json!(s.modify_index));
    }
    v
}

fn node_uuid(name: &str) -> String {
    let mut a = DefaultHasher::new();
    name.hash(&mut a);
    let x = a.finish();
    let mut b = DefaultHasher::new();
    (name, 1u8).hash(&mut b);
    let y = b.finish();
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        x >> 32,
        (x >> 16) & 0xffff,
        x & 0xffff,
        y >> 48,
        y & 0xffff_ffff_ffff
    )
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
        let task = self.handle.spawn(serve(listener, Arc::downgrade(self), rx));
        *self.server.lock().await = Some(ServerCtl { shutdown: tx, task });
    }

    fn register_service(
        self: &Arc<Self>,
        node: &str,
        node_address: &str,
        reg: Registration,
        replace_existing_checks: bool,
    ) -> Result<(), Reply> {
        if reg.checks.iter().any(|c| c.script) {
            return Err((
                500,
                "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or 'enable_local_script_checks' to true".to_owned(),
            ));
        }
        let now = Instant::now();
        let key = (node.to_owned(), reg.id.clone());
        let mut spawn = Vec::new();
        {
            let mut st = self.st();
            if !st.services.contains_key(&key) && st.services.len() >= MAX_SERVICES {
                return Err((500, "consul double: too many services".to_owned()));
            }
            let idx = st.bump();
            match st.nodes.get_mut(node) {
                Some(n) => {
                    if n.address != node_address {
                        n.address = node_address.to_owned();
                        n.modify_index = idx;
                    }
                }
                None => {
                    st.nodes.insert(
                        node.to_owned(),
                        NodeEntry::new(node_address.to_owned(), idx),
                    );
                }
            }
            let previous = st.services.get(&key).cloned();
            let total = reg.checks.len();
            let service = ServiceEntry {
                name: reg.name.clone(),
                tags: reg.tags,
                address: reg.address,
                port: reg.port,
                meta: reg.meta,
                tagged: reg.tagged,
                weights: reg.weights,
                enable_tag_override: reg.enable_tag_override,
                create_index: previous.as_ref().map_or(idx, |p| p.create_index),
                modify_index: idx,
            };
            st.services.insert(key.clone(), service);
            let mut keep = HashSet::new();
            for (i, def) in reg.checks.into_iter().enumerate() {
                let check_id = match def.check_id.clone().filter(|s| !s.is_empty()) {
                    Some(id) => id,
                    None if total > 1 => format!("service:{}:{}", reg.id, i + 1),
                    None => format!("service:{}", reg.id),
                };
                keep.insert(check_id.clone());
                let ckey = (node.to_owned(), check_id.clone());
                let prev = st.checks.get(&ckey).map(|c| {
                    (
                        c.status.clone(),
                        c.output.clone(),
                        c.create_index,
                        c.critical_since,
                    )
                });
                let (status, output, create_index, critical_since) = match prev {
                    Some(p) => p,
                    None => {
                        let status = def.status.clone().unwrap_or_else(|| CRITICAL.to_owned());
                        let since = (status == CRITICAL).then_some(now);
                        (status, String::new(), idx, since)
                    }
                };
                let generation = st.next_generation;
                st.next_generation += 1;
                let notify = Arc::new(Notify::new());
                let ttl_deadline = match def.kind {
                    CheckKind::Ttl(ttl) => Some(now + ttl),
                    _ => None,
                };
                let entry = CheckEntry {
                    name: def
                        .name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("Service '{}' check", reg.name)),
                    notes: def.notes.clone(),
                    status,
                    output,
                    service_id: reg.id.clone(),
                    kind: def.kind.clone(),
                    interval: def.interval,
                    timeout: def.timeout,
                    deregister_after: def.deregister_after,
                    critical_since,
                    ttl_deadline,
                    notify: notify.clone(),
                    generation,
                    task: None,
                    create_index,
                    modify_index: idx,
                };
                st.checks.insert(ckey.clone(), entry);
                spawn.push((ckey, generation, def, notify));
            }
            if replace_existing_checks {
                st.checks.retain(|(n, id), c| {
                    !(n == node && c.service_id == reg.id && !keep.contains(id))
                });
            }
            if let Some(p) = previous.filter(|p| p.name != reg.name) {
                st.touch_service(&p.name, idx);
            }
            st.touch_service(&reg.name, idx);
            for (ckey, generation, def, notify) in spawn {
                let task = self.spawn_runner(ckey.clone(), generation, &def, notify);
                if let Some(c) = st.checks.get_mut(&ckey) {
                    c.task = task;
                }
            }
        }
        self.changed();
        Ok(())
    }

    fn deregister(&self, node: &str, id: &str) -> bool {
        let removed = self.st().remove_service(node, id).is_some();
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
    ) -> Option<AbortHandle> {
        let weak = Arc::downgrade(self);
        let timeout = def
            .timeout
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_CHECK_TIMEOUT);
        let interval = def
            .interval
            .unwrap_or_default()
            .max(self.opts.min_check_interval)
            .max(Duration::from_millis(1));
        let task = match &def.kind {
            CheckKind::Ttl(_) => self.handle.spawn(ttl_runner(weak, key, generation, notify)),
            CheckKind::Http(spec) => {
                let probe = Probe::Http(spec.clone());
                self.handle.spawn(probe_runner(
                    weak, key, generation, probe, interval, timeout,
                ))
            }
            CheckKind::Tcp(target) => {
                let probe = Probe::Tcp(target.clone());
                self.handle.spawn(probe_runner(
                    weak, key, generation, probe, interval, timeout,
                ))
            }
            CheckKind::NotRun(_) => return None,
        };
        Some(task.abort_handle())
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

    fn reap(&self) {
        let now = Instant::now();
        let removed = {
            let mut st = self.st();
            let victims: BTreeSet<(String, String)> = st
                .checks
                .iter()
                .filter_map(|((node, _), c)| {
                    let after = c.deregister_after?.max(MIN_DEREGISTER_AFTER);
                    let since = c.critical_since?;
                    (c.status == CRITICAL && now.duration_since(since) > after)
                        .then(|| (node.clone(), c.service_id.clone()))
                })
                .collect();
            let mut any = false;
            for (node, id) in victims {
                any |= st.remove_service(&node, &id).is_some();
            }
            any
        };
        if removed {
            self.changed();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Check runner
// ---------------------------------------------------------------------------------------------

enum Probe {
    Http(HttpSpec),
    Tcp(String),
}

async fn reaper(weak: Weak<Inner>) {
    let mut ticker = tokio::time::interval_at(Instant::now() + REAP_INTERVAL, REAP_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        inner.reap();
    }
}

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

async fn probe_runner(
    weak: Weak<Inner>,
    key: CheckKey,
    generation: u64,
    probe: Probe,
    interval: Duration,
    timeout: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (status, output) = match &probe {
            Probe::Http(spec) => http_probe(spec, timeout).await,
            Probe::Tcp(target) => tcp_probe(target, timeout).await,
        };
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

async fn tcp_probe(target: &str, timeout: Duration) -> (&'static str, String) {
    let Some((host, port)) = split_host_port(target, None) else {
        return (
            CRITICAL,
            format!("dial tcp {target}: missing port in address"),
        );
    };
    let addr = match loopback_target(&host, port) {
        Ok(a) => a,
        Err(e) => return (CRITICAL, e),
    };
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (PASSING, format!("TCP connect {target}: Success")),
        Ok(Err(e)) => (CRITICAL, format!("dial tcp {addr}: connect: {e}")),
        Err(_) => (CRITICAL, format!("dial tcp {addr}: i/o timeout")),
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

struct Registration {
    id: String,
    name: String,
    tags: Option<Vec<String>>,
    address: String,
    port: u16,
    meta: Option<BTreeMap<String, String>>,
    tagged: BTreeMap<String, (String, u16)>,
    weights: (i64, i64),
    enable_tag_override: bool,
    checks: Vec<CheckDef>,
}

#[derive(Clone, Debug)]
struct CheckDef {
    check_id: Option<String>,
    name: Option<String>,
    notes: String,
    status: Option<String>,
    kind: CheckKind,
    script: bool,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    deregister_after: Option<Duration>,
}

/// Key normalisation: Go's JSON decoding is case-insensitive and Consul also accepts snake_case.
fn norm(k: &str) -> String {
    k.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let v = obj.get(name).or_else(|| {
        let n = norm(name);
        obj.iter().find(|(k, _)| norm(k) == n).map(|(_, v)| v)
    })?;
    (!v.is_null()).then_some(v)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn decode_err(v: &Value, field: &str, go_type: &str) -> String {
    format!(
        "Request decode failed: json: cannot unmarshal {} into Go struct field {field} of type {go_type}",
        json_kind(v)
    )
}

fn str_field(obj: &Map<String, Value>, name: &str, ctx: &str) -> Result<Option<String>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(decode_err(v, &format!("{ctx}{name}"), "string")),
    }
}

fn bool_field(obj: &Map<String, Value>, name: &str, ctx: &str) -> Result<bool, String> {
    match field(obj, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(decode_err(v, &format!("{ctx}{name}"), "bool")),
    }
}

fn int_field(obj: &Map<String, Value>, name: &str, ctx: &str) -> Result<Option<i64>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| decode_err(v, &format!("{ctx}{name}"), "int")),
        Some(v) => Err(decode_err(v, &format!("{ctx}{name}"), "int")),
    }
}

fn str_list_field(
    obj: &Map<String, Value>,
    name: &str,
    ctx: &str,
) -> Result<Option<Vec<String>>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                v => Err(decode_err(v, &format!("{ctx}{name}"), "string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(v) => Err(decode_err(v, &format!("{ctx}{name}"), "[]string")),
    }
}

fn str_map_field(
    obj: &Map<String, Value>,
    name: &str,
    ctx: &str,
) -> Result<Option<BTreeMap<String, String>>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                v => Err(decode_err(v, &format!("{ctx}{name}"), "string")),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some),
        Some(v) => Err(decode_err(v, &format!("{ctx}{name}"), "map[string]string")),
    }
}

/// A duration field: a Go duration string or a number of nanoseconds.
fn dur_field(obj: &Map<String, Value>, name: &str, ctx: &str) -> Result<Option<i128>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => go_duration_nanos(s)
            .map(Some)
            .map_err(|e| format!("Request decode failed: {e}")),
        Some(v @ Value::Number(n)) => n
            .as_i64()
            .map(|n| Some(i128::from(n)))
            .ok_or_else(|| decode_err(v, &format!("{ctx}{name}"), "time.Duration")),
        Some(v) => Err(decode_err(v, &format!("{ctx}{name}"), "time.Duration")),
    }
}

fn nanos_to_duration(n: Option<i128>) -> Option<Duration> {
    n.filter(|n| *n > 0)
        .map(|n| Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX)))
}

/// Parses one check object. `Ok(None)` for an empty object (Consul ignores an empty `Check`).
fn parse_check(v: &Value, ctx: &str) -> Result<Option<(CheckDef, CheckShape)>, String> {
    let Value::Object(obj) = v else {
        return Err(decode_err(
            v,
            ctx.trim_end_matches('.'),
            "structs.CheckType",
        ));
    };
    if obj.values().all(Value::is_null) {
        return Ok(None);
    }
    let http = str_field(obj, "HTTP", ctx)?.filter(|s| !s.is_empty());
    let tcp = str_field(obj, "TCP", ctx)?.filter(|s| !s.is_empty());
    let grpc = str_field(obj, "GRPC", ctx)?.filter(|s| !s.is_empty());
    let h2ping = str_field(obj, "H2PING", ctx)?.filter(|s| !s.is_empty());
    let udp = str_field(obj, "UDP", ctx)?.filter(|s| !s.is_empty());
    let alias = str_field(obj, "AliasService", ctx)?.is_some_and(|s| !s.is_empty())
        || str_field(obj, "AliasNode", ctx)?.is_some_and(|s| !s.is_empty());
    let script = str_list_field(obj, "Args", ctx)?.is_some_and(|a| !a.is_empty())
        || str_list_field(obj, "ScriptArgs", ctx)?.is_some_and(|a| !a.is_empty());
    let ttl = dur_field(obj, "TTL", ctx)?;
    let interval = dur_field(obj, "Interval", ctx)?;
    let timeout = dur_field(obj, "Timeout", ctx)?;
    let dcsa = dur_field(obj, "DeregisterCriticalServiceAfter", ctx)?;
    let mut headers = Vec::new();
    match field(obj, "Header") {
        None => {}
        Some(Value::Object(m)) => {
            for (k, vals) in m {
                match vals {
                    Value::Array(items) => {
                        for item in items {
                            match item {
                                Value::String(s) => headers.push((k.clone(), s.clone())),
                                other => {
                                    return Err(decode_err(
                                        other,
                                        &format!("{ctx}Header"),
                                        "string",
                                    ));
                                }
                            }
                        }
                    }
                    Value::Null => {}
                    other => return Err(decode_err(other, &format!("{ctx}Header"), "[]string")),
                }
            }
        }
        Some(other) => {
            return Err(decode_err(
                other,
                &format!("{ctx}Header"),
                "map[string][]string",
            ));
        }
    }
    let _tls_skip_verify = bool_field(obj, "TLSSkipVerify", ctx)?;
    let interval_kind = script
        || http.is_some()
        || tcp.is_some()
        || grpc.is_some()
        || h2ping.is_some()
        || udp.is_some();
    let kind = if let Some(url) = http {
        CheckKind::Http(HttpSpec {
            url,
            method: str_field(obj, "Method", ctx)?.unwrap_or_default(),
            headers,
            body: str_field(obj, "Body", ctx)?.unwrap_or_default(),
        })
    } else if let Some(target) = tcp {
        CheckKind::Tcp(target)
    } else if grpc.is_some() {
        CheckKind::NotRun("grpc")
    } else if h2ping.is_some() {
        CheckKind::NotRun("h2ping")
    } else if udp.is_some() {
        CheckKind::NotRun("udp")
    } else if script {
        CheckKind::NotRun("script")
    } else if alias {
        CheckKind::NotRun("alias")
    } else {
        CheckKind::Ttl(nanos_to_duration(ttl).unwrap_or_default())
    };
    let def = CheckDef {
        check_id: str_field(obj, "CheckID", ctx)?.or(str_field(obj, "ID", ctx)?),
        name: str_field(obj, "Name", ctx)?,
        notes: str_field(obj, "Notes", ctx)?.unwrap_or_default(),
        status: str_field(obj, "Status", ctx)?.filter(|s| !s.is_empty()),
        kind,
        script,
        interval: nanos_to_duration(interval),
        timeout: nanos_to_duration(timeout),
        deregister_after: nanos_to_duration(dcsa),
    };
    let shape = CheckShape {
        interval_kind,
        alias,
        ttl: ttl.unwrap_or(0),
        interval: interval.unwrap_or(0),
        timeout: timeout.unwrap_or(0),
    };
    Ok(Some((def, shape)))
}

struct CheckShape {
    interval_kind: bool,
    alias: bool,
    ttl: i128,
    interval: i128,
    timeout: i128,
}

/// Consul's `CheckType.Validate`.
fn validate_check(s: &CheckShape) -> Result<(), String> {
    if s.interval > 0 && s.ttl > 0 {
        return Err("Interval and TTL cannot both be specified".to_owned());
    }
    if s.interval_kind && s.interval <= 0 {
        return Err("Interval must be > 0 for Script, HTTP, H2PING, or TCP checks".to_owned());
    }
    if s.interval_kind && s.alias {
        return Err("Interval cannot be set for Alias checks".to_owned());
    }
    if s.alias && s.ttl > 0 {
        return Err("TTL must be not be set for Alias checks".to_owned());
    }
    if !s.interval_kind && !s.alias && s.ttl <= 0 {
        return Err("TTL must be > 0 for TTL checks".to_owned());
    }
    if s.timeout < 0 {
        return Err("Timeout must be >= 0".to_owned());
    }
    Ok(())
}

fn valid_meta_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parses and validates a registration body the way `PUT /v1/agent/service/register` does.
fn parse_registration(v: &Value) -> Result<Registration, Reply> {
    let bad = |reason: String| (400u16, reason);
    let Value::Object(obj) = v else {
        return Err(bad(format!(
            "Request decode failed: json: cannot unmarshal {} into Go value of type structs.ServiceDefinition",
            json_kind(v)
        )));
    };
    // Decoding (types, durations) comes first, as in Consul.
    let name = str_field(obj, "Name", "").map_err(bad)?.unwrap_or_default();
    let id = str_field(obj, "ID", "").map_err(bad)?.unwrap_or_default();
    let tags = str_list_field(obj, "Tags", "").map_err(bad)?;
    let address = str_field(obj, "Address", "")
        .map_err(bad)?
        .unwrap_or_default();
    let port = int_field(obj, "Port", "").map_err(bad)?.unwrap_or(0);
    let meta = str_map_field(obj, "Meta", "").map_err(bad)?;
    let enable_tag_override = bool_field(obj, "EnableTagOverride", "").map_err(bad)?;
    let mut tagged = BTreeMap::new();
    match field(obj, "TaggedAddresses") {
        None => {}
        Some(Value::Object(m)) => {
            for (k, tv) in m {
                let Value::Object(t) = tv else {
                    return Err(bad(decode_err(
                        tv,
                        "TaggedAddresses",
                        "structs.ServiceAddress",
                    )));
                };
                let a = str_field(t, "Address", "TaggedAddresses.").map_err(bad)?;
                let p = int_field(t, "Port", "TaggedAddresses.").map_err(bad)?;
                tagged.insert(
                    k.clone(),
                    (
                        a.unwrap_or_default(),
                        u16::try_from(p.unwrap_or(0)).unwrap_or(0),
                    ),
                );
            }
        }
        Some(other) => {
            return Err(bad(decode_err(
                other,
                "TaggedAddresses",
                "map[string]structs.ServiceAddress",
            )));
        }
    }
    let weights = match field(obj, "Weights") {
        None => None,
        Some(Value::Object(w)) => Some((
            int_field(w, "Passing", "Weights.")
                .map_err(bad)?
                .unwrap_or(0),
            int_field(w, "Warning", "Weights.")
                .map_err(bad)?
                .unwrap_or(0),
        )),
        Some(other) => return Err(bad(decode_err(other, "Weights", "structs.Weights"))),
    };
    let mut checks = Vec::new();
    if let Some(c) = field(obj, "Check") {
        if let Some(parsed) = parse_check(c, "Check.").map_err(bad)? {
            checks.push(parsed);
        }
    }
    match field(obj, "Checks") {
        None => {}
        Some(Value::Array(items)) => {
            for item in items {
                match parse_check(item, "Checks.").map_err(bad)? {
                    Some(parsed) => checks.push(parsed),
                    // An empty entry of `Checks` is still validated (and fails) in Consul.
                    None => {
                        return Err(bad(
                            "Invalid check: TTL must be > 0 for TTL checks".to_owned()
                        ));
                    }
                }
            }
        }
        Some(other) => return Err(bad(decode_err(other, "Checks", "structs.CheckTypes"))),
    }

    // Validation.
    if name.is_empty() {
        return Err(bad("Missing service name".to_owned()));
    }
    if matches!(address.as_str(), "0.0.0.0" | "::" | "[::]") {
        return Err(bad("Invalid service address".to_owned()));
    }
    if let Some((passing, warning)) = weights {
        if passing < 1 {
            return Err(bad(
                "Invalid Weights: Passing must be greater than 0".to_owned()
            ));
        }
        if warning < 0 {
            return Err(bad(
                "Invalid Weights: Warning must be greater or equal than 0".to_owned(),
            ));
        }
    }
    if let Some(meta) = &meta {
        if meta.len() > 64 {
            return Err(bad(
                "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
                    .to_owned(),
            ));
        }
        for (k, v) in meta {
            let problem = if !valid_meta_key(k) {
                Some(format!("Key contains invalid characters: {k:?}"))
            } else if k.len() > 128 {
                Some(format!("Key is too long (limit: 128 characters): {k:?}"))
            } else if k.starts_with("consul-") {
                Some("Key prefix 'consul-' is reserved for internal use".to_owned())
            } else if v.len() > 512 {
                Some(format!("Value is too long (limit: 512 characters): {k:?}"))
            } else {
                None
            };
            if let Some(p) = problem {
                return Err(bad(format!("Invalid Service Meta: {p}")));
            }
        }
    }
    let port = u16::try_from(port).map_err(|_| {
        bad(format!(
            "Invalid service port {port}: must be within 0-65535"
        ))
    })?;
    if checks.len() > MAX_CHECKS_PER_SERVICE {
        return Err(bad("consul double: too many checks".to_owned()));
    }
    for (_, shape) in &checks {
        validate_check(shape).map_err(|e| bad(format!("Invalid check: {e}")))?;
    }
    for (def, _) in &checks {
        if def.status.as_deref().is_some_and(|s| !valid_status(s)) {
            return Err(bad(
                "Status for checks must 'passing', 'warning', 'critical'".to_owned(),
            ));
        }
    }

    // Consul adds lan/wan tagged addresses for an IP service address.
    if let Ok(ip) = address.parse::<IpAddr>() {
        let (lan, wan) = if ip.is_ipv4() {
            ("lan_ipv4", "wan_ipv4")
        } else {
            ("lan_ipv6", "wan_ipv6")
        };
        for k in [lan, wan] {
            tagged
                .entry(k.to_owned())
                .or_insert_with(|| (address.clone(), port));
        }
    }
    Ok(Registration {
        id: if id.is_empty() { name.clone() } else { id },
        name,
        tags,
        address,
        port,
        meta,
        tagged,
        weights: weights.unwrap_or((1, 1)),
        enable_tag_override,
        checks: checks.into_iter().map(|(d, _)| d).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Filter expressions (a subset of go-bexpr)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Word(String),
    Eq,
    Ne,
    LParen,
    RParen,
}

#[derive(Debug, Clone)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Match {
        selector: Vec<String>,
        op: Op,
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Contains,
    NotContains,
    IsEmpty,
    IsNotEmpty,
}

const KEYWORDS: &[&str] = &[
    "and", "or", "not", "in", "contains", "is", "empty", "matches",
];

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            '=' | '!' => {
                if chars.get(i + 1) != Some(&'=') {
                    return Err(format!("unexpected {c:?} at position {i}"));
                }
                out.push(if c == '=' { Tok::Eq } else { Tok::Ne });
                i += 2;
            }
            '"' | '`' => {
                let quote = c;
                let mut v = String::new();
                i += 1;
                loop {
                    let Some(&ch) = chars.get(i) else {
                        return Err("unterminated string literal".to_owned());
                    };
                    i += 1;
                    if ch == quote {
                        break;
                    }
                    if ch == '\\' && quote == '"' {
                        let Some(&esc) = chars.get(i) else {
                            return Err("unterminated string literal".to_owned());
                        };
                        i += 1;
                        v.push(match esc {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    } else {
                        v.push(ch);
                    }
                }
                out.push(Tok::Str(v));
            }
            _ => {
                let start = i;
                while i < chars.len()
                    && !chars[i].is_whitespace()
                    && !matches!(chars[i], '(' | ')' | '"' | '`' | '=' | '!')
                {
                    i += 1;
                }
                out.push(Tok::Word(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn peek_word(&self, offset: usize, w: &str) -> bool {
        matches!(self.toks.get(self.pos + offset), Some(Tok::Word(x)) if x == w)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek_word(0, "or") {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.peek_word(0, "and") {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_word(0, "not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let e = self.or()?;
            if self.next() != Some(Tok::RParen) {
                return Err("expected \")\"".to_owned());
            }
            return Ok(e);
        }
        self.matcher()
    }
    fn value(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(s),
            Some(Tok::Word(w)) if !KEYWORDS.contains(&w.as_str()) => Ok(w),
            other => Err(format!("expected a value, found {other:?}")),
        }
    }
    fn selector(&mut self) -> Result<Vec<String>, String> {
        match self.next() {
            Some(Tok::Word(w)) if !KEYWORDS.contains(&w.as_str()) => {
                let parts: Vec<String> = w.split('.').map(str::to_owned).collect();
                if parts.iter().any(String::is_empty) {
                    return Err(format!("invalid selector {w:?}"));
                }
                Ok(parts)
            }
            other => Err(format!("expected a selector, found {other:?}")),
        }
    }
    fn in_form(&mut self, value: String) -> Result<Expr, String> {
        let negated = self.peek_word(0, "not");
        self.pos += if negated { 2 } else { 1 };
        let selector = self.selector()?;
        let op = if negated {
            Op::NotContains
        } else {
            Op::Contains
        };
        Ok(Expr::Match {
            selector,
            op,
            value,
        })
    }
    fn matcher(&mut self) -> Result<Expr, String> {
        let first = self.peek().cloned();
        let is_in =
            |p: &Parser| p.peek_word(1, "in") || (p.peek_word(1, "not") && p.peek_word(2, "in"));
        match first {
            Some(Tok::Str(_)) => {
                let value = self.value()?;
                if !(self.peek_word(0, "in")
                    || (self.peek_word(0, "not") && self.peek_word(1, "in")))
                {
                    return Err("expected \"in\" after a value".to_owned());
                }
                self.in_form(value)
            }
            Some(Tok::Word(_)) if is_in(self) => {
                let value = self.value()?;
                self.in_form(value)
            }
            Some(Tok::Word(_)) => {
                let selector = self.selector()?;
                let (op, value) = match self.next() {
                    Some(Tok::Eq) => (Op::Eq, self.value()?),
                    Some(Tok::Ne) => (Op::Ne, self.value()?),
                    Some(Tok::Word(w)) if w == "contains" => (Op::Contains, self.value()?),
                    Some(Tok::Word(w)) if w == "not" && self.peek_word(0, "contains") => {
                        self.pos += 1;
                        (Op::NotContains, self.value()?)
                    }
                    Some(Tok::Word(w)) if w == "is" => {
                        let negated = self.peek_word(0, "not");
                        if negated {
                            self.pos += 1;
                        }
                        if !self.peek_word(0, "empty") {
                            return Err("expected \"empty\" after \"is\"".to_owned());
                        }
                        self.pos += 1;
                        (
                            if negated { Op::IsNotEmpty } else { Op::IsEmpty },
                            String::new(),
                        )
                    }
                    Some(Tok::Word(w)) if w == "matches" || w == "not" => {
                        return Err("the double does not support \"matches\"".to_owned());
                    }
                    other => return Err(format!("expected a match operator, found {other:?}")),
                };
                Ok(Expr::Match {
                    selector,
                    op,
                    value,
                })
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

enum Resolved<'a> {
    Found(&'a Value),
    Missing,
}

/// Walks `selector` through `entry`. Keys under `map_paths` (user maps such as `Service.Meta`)
/// may be missing; any other unknown field makes the selector invalid.
fn resolve<'a>(
    entry: &'a Value,
    selector: &[String],
    map_paths: &[&str],
) -> Result<Resolved<'a>, String> {
    let mut cur = entry;
    let mut path = String::new();
    for seg in selector {
        let in_map = map_paths.contains(&path.as_str());
        let next_path = if path.is_empty() {
            seg.clone()
        } else {
            format!("{path}.{seg}")
        };
        match cur {
            Value::Object(m) => match m.get(seg) {
                Some(v) => cur = v,
                None if in_map || map_paths.contains(&next_path.as_str()) => {
                    return Ok(Resolved::Missing);
                }
                None => return Err(format!("Selector {:?} is not valid", selector.join("."))),
            },
            Value::Null if in_map => return Ok(Resolved::Missing),
            Value::Array(_) => {
                return Err(format!(
                    "selector {:?} goes into a list: not supported by the double",
                    selector.join(".")
                ));
            }
            _ => return Err(format!("Selector {:?} is not valid", selector.join("."))),
        }
        path = next_path;
    }
    Ok(Resolved::Found(cur))
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct Filter {
    expr: Expr,
    map_paths: &'static [&'static str],
}

const HEALTH_MAPS: &[&str] = &[
    "Node.Meta",
    "Node.TaggedAddresses",
    "Service.Meta",
    "Service.TaggedAddresses",
];
const AGENT_SERVICE_MAPS: &[&str] = &["Meta", "TaggedAddresses"];
const CATALOG_MAPS: &[&str] = &[
    "NodeMeta",
    "ServiceMeta",
    "TaggedAddresses",
    "ServiceTaggedAddresses",
];

impl Filter {
    /// Parses `src` and validates its selectors against `template`.
    fn parse(
        src: &str,
        template: &Value,
        map_paths: &'static [&'static str],
    ) -> Result<Self, String> {
        let wrap = |e: String| format!("Failed to create boolean expression evaluator: {e}");
        let toks = tokenize(src).map_err(wrap)?;
        if toks.is_empty() {
            return Err(wrap("empty expression".to_owned()));
        }
        let mut p = Parser { toks, pos: 0 };
        let expr = p.or().map_err(wrap)?;
        if p.pos < p.toks.len() {
            return Err(wrap(format!("unexpected {:?}", p.toks[p.pos])));
        }
        validate_expr(&expr, template, map_paths).map_err(wrap)?;
        Ok(Self { expr, map_paths })
    }

    fn matches(&self, entry: &Value) -> bool {
        eval(&self.expr, entry, self.map_paths)
    }
}

fn validate_expr(e: &Expr, template: &Value, maps: &[&str]) -> Result<(), String> {
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => {
            validate_expr(a, template, maps)?;
            validate_expr(b, template, maps)
        }
        Expr::Not(a) => validate_expr(a, template, maps),
        Expr::Match { selector, op, .. } => match resolve(template, selector, maps)? {
            Resolved::Missing => Ok(()),
            Resolved::Found(v) => {
                let collection = matches!(v, Value::Array(_) | Value::Object(_));
                let ok = match op {
                    Op::Eq | Op::Ne => !collection,
                    Op::Contains | Op::NotContains => collection || v.is_string() || v.is_null(),
                    Op::IsEmpty | Op::IsNotEmpty => true,
                };
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "Invalid match operator for selector {:?}",
                        selector.join(".")
                    ))
                }
            }
        },
    }
}

fn eval(e: &Expr, entry: &Value, maps: &[&str]) -> bool {
    match e {
        Expr::And(a, b) => eval(a, entry, maps) && eval(b, entry, maps),
        Expr::Or(a, b) => eval(a, entry, maps) || eval(b, entry, maps),
        Expr::Not(a) => !eval(a, entry, maps),
        Expr::Match {
            selector,
            op,
            value,
        } => {
            let found = match resolve(entry, selector, maps) {
                Ok(Resolved::Found(v)) => Some(v),
                _ => None,
            };
            let contains = || match found {
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|i| scalar_text(i).as_deref() == Some(value.as_str())),
                Some(Value::Object(m)) => m.contains_key(value),
                Some(Value::String(s)) => s.contains(value.as_str()),
                _ => false,
            };
            let empty = || match found {
                None | Some(Value::Null) => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(m)) => m.is_empty(),
                Some(Value::String(s)) => s.is_empty(),
                Some(_) => false,
            };
            let equal = || found.and_then(scalar_text).as_deref() == Some(value.as_str());
            match op {
                Op::Eq => equal(),
                Op::Ne => !equal(),
                Op::Contains => contains(),
                Op::NotContains => !contains(),
                Op::IsEmpty => empty(),
                Op::IsNotEmpty => !empty(),
            }
        }
    }
}

fn template_service() -> ServiceEntry {
    ServiceEntry {
        name: "t".to_owned(),
        tags: Some(Vec::new()),
        address: String::new(),
        port: 0,
        meta: Some(BTreeMap::new()),
        tagged: BTreeMap::new(),
        weights: (1, 1),
        enable_tag_override: false,
        create_index: 1,
        modify_index: 1,
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------------

type Resp = Response<Full<Bytes>>;

async fn serve(listener: TcpListener, weak: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
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
                conns.spawn(async move {
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
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
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

fn method_not_allowed(m: &Method) -> Resp {
    text(405, format!("method {m} not allowed"))
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
    fn all(&self, k: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
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
}

fn presented_token(req: &Request<Incoming>, q: &Query) -> Option<String> {
    if let Some(t) = q.get("token").filter(|t| !t.is_empty()) {
        return Some(t.to_owned());
    }
    let headers = req.headers();
    if let Some(t) = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(t.to_owned());
    }
    let auth = headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, rest) = auth.split_once(' ')?;
    let rest = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty()).then(|| rest.to_owned())
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let query = Query::parse(&raw_query);
    let token = presented_token(&req, &query);
    let (failure, latency) = {
        let mut st = inner.st();
        st.record(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: raw_query,
            token: token.clone(),
        });
        (st.take_failure(), st.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some((status, body)) = failure {
        return text(status, body);
    }
    let acl = inner
        .opts
        .acl_token
        .as_ref()
        .filter(|_| !path.starts_with("/v1/status/"));
    if let Some(expected) = acl {
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
        return if is_put {
            agent_register(inner, q, body)
        } else {
            method_not_allowed(method)
        };
    }
    if let Some(id) = tail("/v1/agent/service/deregister/") {
        if !is_put {
            return method_not_allowed(method);
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
            let note = q.get("note").unwrap_or("").to_owned();
            return ttl_update(inner, &id, status, &note);
        }
    }
    if let Some(id) = tail("/v1/agent/check/update/") {
        if !is_put {
            return method_not_allowed(method);
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) if body.is_empty() => {
                let _ = e;
                return text(400, "Request decode failed: EOF");
            }
            Err(e) => return text(400, format!("Request decode failed: {e}")),
        };
        let Value::Object(obj) = &v else {
            return text(
                400,
                format!(
                    "Request decode failed: json: cannot unmarshal {} into Go value of type agent.checkUpdate",
                    json_kind(&v)
                ),
            );
        };
        let status = match str_field(obj, "Status", "") {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => return text(400, e),
        };
        let output = match str_field(obj, "Output", "") {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => return text(400, e),
        };
        if !valid_status(&status) {
            return text(400, format!("Invalid check status: '{status}'"));
        }
        return ttl_update(inner, &id, &status, &output);
    }
    if path == "/v1/agent/services" {
        return if is_get {
            agent_services(inner, q).await
        } else {
            method_not_allowed(method)
        };
    }
    if path == "/v1/agent/checks" {
        return if is_get {
            agent_checks(inner)
        } else {
            method_not_allowed(method)
        };
    }
    if let Some(name) = tail("/v1/health/service/") {
        return if is_get {
            health_service(inner, &name, q, false).await
        } else {
            method_not_allowed(method)
        };
    }
    if let Some(name) = tail("/v1/catalog/service/") {
        return if is_get {
            health_service(inner, &name, q, true).await
        } else {
            method_not_allowed(method)
        };
    }
    if path == "/v1/status/leader" {
        if !is_get {
            return method_not_allowed(method);
        }
        let leader = if inner.st().leader { LEADER_ADDR } else { "" };
        return json_response(&json!(leader), &[]);
    }
    if path == "/v1/status/peers" {
        if !is_get {
            return method_not_allowed(method);
        }
        return json_response(&json!([LEADER_ADDR]), &[]);
    }
    text(404, "404 page not found\n")
}

fn agent_register(inner: &Arc<Inner>, q: &Query, body: &Bytes) -> Resp {
    let v: Value = if body.is_empty() {
        return text(400, "Request decode failed: EOF");
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return text(400, format!("Request decode failed: {e}")),
        }
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

fn content_hash(v: &Value) -> String {
    let mut h = DefaultHasher::new();
    serde_json::to_string(v).unwrap_or_default().hash(&mut h);
    format!("{:016x}", h.finish())
}

fn agent_check_json(st: &State, node: &str, id: &str, c: &CheckEntry) -> Value {
    let mut v = st.check_json(node, id, c);
    if let Some(o) = v.as_object_mut() {
        o.remove("CreateIndex");
        o.remove("ModifyIndex");
    }
    v
}

fn agent_checks(inner: &Arc<Inner>) -> Resp {
    let st = inner.st();
    let mut m = Map::new();
    for ((node, id), c) in &st.checks {
        if *node == inner.opts.node {
            m.insert(id.clone(), agent_check_json(&st, node, id, c));
        }
    }
    json_response(&Value::Object(m), &[])
}

async fn agent_services(inner: &Arc<Inner>, q: &Query) -> Resp {
    let filter = match q.get("filter").filter(|f| !f.is_empty()) {
        Some(src) => {
            let template = service_json("t", &template_service(), true, "dc");
            match Filter::parse(src, &template, AGENT_SERVICE_MAPS) {
                Ok(f) => Some(f),
                Err(e) => return text(400, e),
            }
        }
        None => None,
    };
    let wait = match parse_wait(q) {
        Ok(w) => w,
        Err(reason) => return text(400, reason),
    };
    let want_hash = q.get("hash").filter(|h| !h.is_empty()).map(str::to_owned);
    let node = inner.opts.node.clone();
    let compute = |st: &State| {
        let mut m = Map::new();
        for ((n, id), s) in &st.services {
            if *n != node {
                continue;
            }
            let v = service_json(id, s, true, &st.datacenter);
            if filter.as_ref().is_none_or(|f| f.matches(&v)) {
                m.insert(id.clone(), v);
            }
        }
        let v = Value::Object(m);
        (content_hash(&v), v)
    };
    let (hash, value) = match want_hash {
        None => compute(&inner.st()),
        Some(want) => {
            block_until(inner, wait, |st| {
                let (h, v) = compute(st);
                let ready = h != want;
                (ready, (h, v))
            })
            .await
        }
    };
    json_response(&value, &[("x-consul-contenthash", hash)])
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

async fn health_service(inner: &Arc<Inner>, name: &str, q: &Query, catalog: bool) -> Resp {
    if name.is_empty() {
        return text(400, "Missing service name");
    }
    let stale = q.has("stale");
    let consistent = q.has("consistent");
    if stale && consistent {
        return text(
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        );
    }
    if q.get("dc")
        .is_some_and(|dc| !dc.is_empty() && dc != inner.opts.datacenter)
    {
        return text(500, "No path to datacenter");
    }
    let passing = if catalog {
        false
    } else {
        match q.flag("passing") {
            Ok(p) => p,
            Err(()) => return text(400, "Invalid value for ?passing"),
        }
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
    let tags: Vec<String> = q.all("tag").into_iter().map(str::to_lowercase).collect();
    let node_meta: Vec<(String, String)> = q
        .all("node-meta")
        .into_iter()
        .map(|nm| match nm.split_once(':') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (nm.to_owned(), String::new()),
        })
        .collect();
    let filter = match q.get("filter").filter(|f| !f.is_empty()) {
        Some(src) => {
            let st = inner.st();
            let svc = template_service();
            let node = NodeEntry::new(String::new(), 1);
            let mut template = if catalog {
                st.catalog_entry("t", "t", &svc).unwrap_or_default()
            } else {
                json!({
                    "Node": st.node_json("t", &node),
                    "Service": service_json("t", &svc, false, ""),
                    "Checks": [],
                })
            };
            if template.is_null() {
                template = json!({});
            }
            let maps = if catalog { CATALOG_MAPS } else { HEALTH_MAPS };
            match Filter::parse(src, &template, maps) {
                Ok(f) => Some(f),
                Err(e) => return text(400, e),
            }
        }
        None => None,
    };
    {
        let st = inner.st();
        if !st.leader && !stale {
            return text(500, "No cluster leader");
        }
    }
    let compute = |st: &State| {
        let mut out = Vec::new();
        for ((node, id), svc) in &st.services {
            if svc.name != name {
                continue;
            }
            let svc_tags: Vec<String> = svc
                .tags
                .iter()
                .flatten()
                .map(|t| t.to_lowercase())
                .collect();
            if !tags.iter().all(|t| svc_tags.contains(t)) {
                continue;
            }
            let entry = if catalog {
                st.catalog_entry(node, id, svc)
            } else {
                st.health_entry(node, id, svc)
            };
            let Some(entry) = entry else { continue };
            let node_meta_ok = node_meta.iter().all(|(k, v)| {
                let meta = if catalog {
                    &entry["NodeMeta"]
                } else {
                    &entry["Node"]["Meta"]
                };
                meta.get(k).and_then(Value::as_str) == Some(v.as_str())
            });
            if !node_meta_ok {
                continue;
            }
            if passing {
                let all_passing = entry["Checks"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().all(|c| c["Status"] == PASSING));
                if !all_passing {
                    continue;
                }
            }
            if filter.as_ref().is_some_and(|f| !f.matches(&entry)) {
                continue;
            }
            out.push(entry);
        }
        let idx = st.service_result_index(name);
        (idx, Value::Array(out))
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
    let (leader, last_contact) = {
        let st = inner.st();
        let lc = if st.leader {
            0
        } else {
            st.leader_lost_at.elapsed().as_millis()
        };
        (st.leader, lc)
    };
    let consistency = if stale {
        "stale"
    } else if consistent {
        "consistent"
    } else {
        "leader"
    };
    json_response(
        &value,
        &[
            ("x-consul-index", index.to_string()),
            ("x-consul-knownleader", leader.to_string()),
            ("x-consul-lastcontact", last_contact.to_string()),
            ("x-consul-effective-consistency", consistency.to_owned()),
            ("x-consul-query-backend", "blocking-query".to_owned()),
        ],
    )
}
