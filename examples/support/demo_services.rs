#![allow(dead_code, unreachable_pub)]
//! The API-gateway demo's upstream services: a `users` and a `products` service, each a
//! hyper 1 HTTP/1 server on loopback, with faults injected at run time and registration in
//! the in-process [`Registry`] (and in Consul when a client is given).
//!
//! Shared by examples and tests:
//! `#[path = "support/demo_services.rs"] mod demo_services;` from `examples/`,
//! `#[path = "../../examples/support/demo_services.rs"] mod demo_services;` from
//! `tests/consul/main.rs`.
//! Needs the features `http` and `consul`.
//!
//! Each instance answers:
//!
//! * `GET /users`, `GET /users/{id}` (the users service) or `GET /products`,
//!   `GET /products/{id}` (the products service): JSON; unknown ids and paths `404`, ids that
//!   are not numbers `400`, other methods `405`, all with a JSON `{"error": ...}` body;
//! * `GET /health`: seawall's [`HealthEndpoint`], unhealthy (`503`) while failing or slow,
//!   for Consul's HTTP check;
//! * `POST /fault?mode=healthy|failing|slow|down[&ms=300]`: flips the instance's fault.
//!
//! Every answer carries `x-instance: <instance id>` (`users-1`, `products-2`, ...), and echoes
//! the request id and the trace id it received (`x-request-id`, and `x-trace-id` from a W3C
//! `traceparent`), so that one request can be followed from the gateway to the instance
//! that served it. Paths are routed as received: a gateway in front strips its own prefix
//! (`/api`).
//!
//! Faults ([`Fault`], set through a [`FaultHandle`] or `/fault`): `Failing` answers `503`,
//! `Slow(d)` waits `d` before answering, `Down` closes the listener and every open
//! connection (the port refuses connections) until the instance is set back up, on the same
//! port. `/health` and `/fault` are not delayed or failed by the fault itself.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use seawall::BoxError;
use seawall::consul::{
    Check, CheckStatus, ConsulClient, HealthEndpoint, HealthHandle, RegistrationGuard,
    ServiceRegistration,
};
use seawall::discovery::{Instance, InstanceId, Registration, Registry};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;

/// The header naming the instance that answered.
pub const INSTANCE_HEADER: &str = "x-instance";
/// The node the instances are registered on (in the registry and in Consul's IDs).
pub const NODE: &str = "local";
/// Consul's HTTP check interval for the instances' `/health`.
pub const CONSUL_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Consul deregisters an instance whose check stayed critical this long.
pub const CONSUL_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// The longest `Slow` delay: longer ones are cut to this.
pub const MAX_SLOW: Duration = Duration::from_secs(30);
/// The most instances of one service a fleet starts.
pub const MAX_INSTANCES: usize = 32;
/// The most open connections per instance; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// A connection that has not sent its request head in this long is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long rebinding the port after `Down` is retried.
const REBIND_FOR: Duration = Duration::from_secs(5);

/// The two demo services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// `users`: `/users`, `/users/{id}`.
    Users,
    /// `products`: `/products`, `/products/{id}`.
    Products,
}

impl ServiceKind {
    /// The service name, also the first path segment: `users` or `products`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Users => "users",
            Self::Products => "products",
        }
    }

    /// The fixed data set, by id.
    pub fn data(self) -> BTreeMap<u64, Value> {
        let items = match self {
            Self::Users => vec![
                json!({"id": 1, "name": "Ada Lovelace", "email": "ada@example.com"}),
                json!({"id": 2, "name": "Alan Turing", "email": "alan@example.com"}),
                json!({"id": 3, "name": "Grace Hopper", "email": "grace@example.com"}),
            ],
            Self::Products => vec![
                json!({"id": 1, "name": "sea wall brick", "price_cents": 1299}),
                json!({"id": 2, "name": "breakwater kit", "price_cents": 4999}),
                json!({"id": 3, "name": "tide gauge", "price_cents": 2450}),
                json!({"id": 4, "name": "sandbag (10 pack)", "price_cents": 1800}),
            ],
        };
        items
            .into_iter()
            .map(|item| (item["id"].as_u64().unwrap_or_default(), item))
            .collect()
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an instance does with the requests to its service paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answers normally.
    #[default]
    Healthy,
    /// Answers `503` with a JSON error.
    Failing,
    /// Waits this long (at most [`MAX_SLOW`]), then answers normally.
    Slow(Duration),
    /// Refuses connections: the listener is closed and open connections are dropped.
    Down,
}

impl Fault {
    /// Whether a health check sees the instance healthy (`/health` answers `200` and the
    /// port accepts connections): only when `Healthy`.
    pub fn is_healthy(self) -> bool {
        self == Self::Healthy
    }

    /// Parses the `/fault` query: `mode=healthy|failing|slow|down`, and for `slow` an
    /// optional `ms=<milliseconds>` (300 by default).
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut mode = None;
        let mut ms = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "mode" => mode = Some(value),
                "ms" => {
                    let n: u64 = value.parse().map_err(|_| {
                        format!("ms must be a number of milliseconds, not {value:?}")
                    })?;
                    ms = Some(n);
                }
                _ => {}
            }
        }
        match mode {
            Some("healthy") | Some("up") => Ok(Self::Healthy),
            Some("failing") => Ok(Self::Failing),
            Some("slow") => Ok(Self::Slow(Duration::from_millis(ms.unwrap_or(300)))),
            Some("down") => Ok(Self::Down),
            Some(other) => Err(format!(
                "unknown mode {other:?}: use healthy, failing, slow or down"
            )),
            None => Err("missing mode: use mode=healthy|failing|slow|down".to_owned()),
        }
    }

    fn label(self) -> String {
        match self {
            Self::Healthy => "healthy".to_owned(),
            Self::Failing => "failing".to_owned(),
            Self::Slow(d) => format!("slow {}ms", d.as_millis()),
            Self::Down => "down".to_owned(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Sets an instance's [`Fault`] at run time. Clones share the instance.
///
/// Setting a fault also sets the instance's `/health` (unhealthy unless `Healthy`) at once;
/// the registry follows after the fleet's check delay.
#[derive(Clone)]
pub struct FaultHandle {
    fault: Arc<watch::Sender<Fault>>,
    health: HealthHandle,
}

impl FaultHandle {
    fn new(health: HealthHandle) -> Self {
        Self {
            fault: Arc::new(watch::Sender::new(Fault::Healthy)),
            health,
        }
    }

    /// Sets the fault (a `Slow` delay is cut to [`MAX_SLOW`]).
    pub fn set(&self, fault: Fault) {
        let fault = match fault {
            Fault::Slow(d) => Fault::Slow(d.min(MAX_SLOW)),
            other => other,
        };
        if fault.is_healthy() {
            self.health.set_healthy();
        } else {
            self.health.set_unhealthy(fault.label());
        }
        self.fault.send_if_modified(|current| {
            let changed = *current != fault;
            *current = fault;
            changed
        });
    }

    /// The current fault.
    pub fn get(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Back to `Healthy` (and up again on the same port after `Down`).
    pub fn heal(&self) {
        self.set(Fault::Healthy);
    }

    /// The instance's health handle (what `/health` answers from).
    pub fn health(&self) -> &HealthHandle {
        &self.health
    }

    fn subscribe(&self) -> watch::Receiver<Fault> {
        self.fault.subscribe()
    }
}

impl fmt::Debug for FaultHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultHandle")
            .field("fault", &self.get())
            .finish()
    }
}

/// What [`DemoFleet::start`] starts.
#[derive(Clone)]
pub struct FleetSpec {
    /// How many `users` instances (at most [`MAX_INSTANCES`]).
    pub users: usize,
    /// How many `products` instances (at most [`MAX_INSTANCES`]).
    pub products: usize,
    /// How long after a fault changes the registry takes the instance out (or puts it
    /// back): like Consul's check interval (default 1 s).
    pub check_delay: Duration,
    /// The registry to register in (a new one when `None`).
    pub registry: Option<Registry>,
    /// Also register in Consul through this client, with an HTTP check on `/health`.
    pub consul: Option<ConsulClient>,
}

impl FleetSpec {
    /// `users` and `products` instances, registered in a new registry, check delay 1 s.
    pub fn new(users: usize, products: usize) -> Self {
        Self {
            users,
            products,
            check_delay: Duration::from_secs(1),
            registry: None,
            consul: None,
        }
    }

    /// Sets the check delay.
    #[must_use]
    pub fn check_delay(mut self, delay: Duration) -> Self {
        self.check_delay = delay;
        self
    }

    /// Registers in `registry`.
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Registers in Consul too.
    #[must_use]
    pub fn consul(mut self, client: ConsulClient) -> Self {
        self.consul = Some(client);
        self
    }
}

impl Default for FleetSpec {
    /// Two instances of each service.
    fn default() -> Self {
        Self::new(2, 2)
    }
}

impl fmt::Debug for FleetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetSpec")
            .field("users", &self.users)
            .field("products", &self.products)
            .field("check_delay", &self.check_delay)
            .field("consul", &self.consul.is_some())
            .finish()
    }
}

/// One running instance, as callers see it. Clones share the instance.
#[derive(Debug, Clone)]
pub struct InstanceHandle {
    kind: ServiceKind,
    id: Arc<str>,
    addr: SocketAddr,
    fault: FaultHandle,
    requests: Arc<AtomicU64>,
}

impl InstanceHandle {
    /// The service: `users` or `products`.
    pub fn service(&self) -> &'static str {
        self.kind.name()
    }

    /// The service kind.
    pub fn kind(&self) -> ServiceKind {
        self.kind
    }

    /// The instance (and service) ID: `users-1`; what `x-instance` carries.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its identity in the registry: node [`NODE`], service ID [`id`](Self::id).
    pub fn instance_id(&self) -> InstanceId {
        InstanceId::new(NODE, self.id.clone())
    }

    /// The loopback address it listens on (the same while down and after).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its fault handle.
    pub fn fault(&self) -> &FaultHandle {
        &self.fault
    }

    /// Requests received on the service paths (not `/health` or `/fault`), answered or
    /// failed.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The Consul check ID of its `/health` check.
    pub fn consul_check_id(&self) -> String {
        format!("service:{}", self.id)
    }
}

struct Running {
    handle: InstanceHandle,
    server: JoinHandle<()>,
    mirror: JoinHandle<()>,
    registration: Option<Registration>,
    guard: Option<RegistrationGuard>,
}

/// The demo's upstream instances, running and registered.
///
/// Dropped without [`shutdown`](Self::shutdown), it stops the servers and deregisters (from
/// Consul best effort, from a spawned task).
pub struct DemoFleet {
    registry: Registry,
    running: Vec<Running>,
}

impl DemoFleet {
    /// Starts `spec.users` users and `spec.products` products instances on `127.0.0.1:0`
    /// and registers each.
    ///
    /// # Errors
    ///
    /// Binding a port, an invalid count (more than [`MAX_INSTANCES`]) or a Consul
    /// registration failing; what was started is stopped again.
    pub async fn start(spec: FleetSpec) -> Result<Self, BoxError> {
        if spec.users > MAX_INSTANCES || spec.products > MAX_INSTANCES {
            return Err(format!("at most {MAX_INSTANCES} instances per service").into());
        }
        let registry = spec.registry.clone().unwrap_or_default();
        let mut fleet = Self {
            registry,
            running: Vec::new(),
        };
        for (kind, n) in [
            (ServiceKind::Users, spec.users),
            (ServiceKind::Products, spec.products),
        ] {
            for i in 1..=n {
                let running = fleet.start_one(kind, i, &spec).await?;
                fleet.running.push(running);
            }
        }
        Ok(fleet)
    }

    async fn start_one(
        &self,
        kind: ServiceKind,
        n: usize,
        spec: &FleetSpec,
    ) -> Result<Running, BoxError> {
        let id: Arc<str> = Arc::from(format!("{}-{n}", kind.name()));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let health = HealthHandle::new();
        let handle = InstanceHandle {
            kind,
            id: id.clone(),
            addr,
            fault: FaultHandle::new(health.clone()),
            requests: Arc::new(AtomicU64::new(0)),
        };
        let server = tokio::spawn(run_server(listener, handle.clone()));
        let instance = Instance::new(handle.instance_id(), kind.name(), "127.0.0.1", addr.port())
            .with_meta("instance", &*id);
        let registration = self.registry.register(instance);
        let mirror = tokio::spawn(mirror_health(
            handle.fault.subscribe(),
            self.registry.clone(),
            handle.instance_id(),
            kind.name(),
            spec.check_delay,
        ));
        let mut running = Running {
            handle,
            server,
            mirror,
            registration: Some(registration),
            guard: None,
        };
        if let Some(client) = &spec.consul {
            let result = async {
                let registration = ServiceRegistration::builder(kind.name())
                    .id(&*id)
                    .address("127.0.0.1")
                    .port(addr.port())
                    .meta("instance", &*id)
                    .check(
                        Check::http(format!("http://{addr}/health"), CONSUL_CHECK_INTERVAL)
                            .timeout(Duration::from_secs(1))
                            .deregister_critical_after(CONSUL_DEREGISTER_AFTER)
                            .initial_status(CheckStatus::Passing),
                    )
                    .build()?;
                let guard = tokio::time::timeout(
                    Duration::from_secs(10),
                    RegistrationGuard::register(client.clone(), registration),
                )
                .await??;
                Ok::<_, BoxError>(guard)
            }
            .await;
            match result {
                Ok(guard) => running.guard = Some(guard),
                Err(e) => {
                    running.stop();
                    return Err(e);
                }
            }
        }
        Ok(running)
    }

    /// Every instance, users first.
    pub fn instances(&self) -> Vec<InstanceHandle> {
        self.running.iter().map(|r| r.handle.clone()).collect()
    }

    /// The instances of `service` (`users` or `products`).
    pub fn service(&self, service: &str) -> Vec<InstanceHandle> {
        self.running
            .iter()
            .filter(|r| r.handle.service() == service)
            .map(|r| r.handle.clone())
            .collect()
    }

    /// The instance with ID `id` (`users-1`).
    pub fn instance(&self, id: &str) -> Option<InstanceHandle> {
        self.running
            .iter()
            .find(|r| r.handle.id() == id)
            .map(|r| r.handle.clone())
    }

    /// The registry the instances are registered in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Deregisters every instance (registry and Consul), then stops the servers.
    ///
    /// # Errors
    ///
    /// The first Consul deregistration that failed (or took over 5 s); the servers are
    /// stopped regardless.
    pub async fn shutdown(mut self) -> Result<(), BoxError> {
        let mut first_error: Option<BoxError> = None;
        for running in &mut self.running {
            running.mirror.abort();
            drop(running.registration.take());
            if let Some(guard) = running.guard.take() {
                let result = tokio::time::timeout(Duration::from_secs(5), guard.deregister()).await;
                let error: Option<BoxError> = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.into()),
                    Err(e) => Some(e.into()),
                };
                if first_error.is_none() {
                    first_error = error;
                }
            }
        }
        for running in &mut self.running {
            running.server.abort();
            let _ = (&mut running.server).await;
        }
        self.running.clear();
        first_error.map_or(Ok(()), Err)
    }
}

impl Running {
    fn stop(&mut self) {
        self.mirror.abort();
        self.registration = None;
        self.guard = None;
        self.server.abort();
    }
}

impl Drop for DemoFleet {
    fn drop(&mut self) {
        for running in &mut self.running {
            running.stop();
        }
    }
}

impl fmt::Debug for DemoFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoFleet")
            .field("instances", &self.instances())
            .finish()
    }
}

/// Keeps the registry's passing flag in line with the fault, `delay` after each change
/// (the last state within the delay wins), as a periodic health check would.
async fn mirror_health(
    mut fault: watch::Receiver<Fault>,
    registry: Registry,
    id: InstanceId,
    service: &'static str,
    delay: Duration,
) {
    let mut passing = true;
    while fault.changed().await.is_ok() {
        tokio::time::sleep(delay).await;
        let now = fault.borrow_and_update().is_healthy();
        if now != passing {
            passing = now;
            registry.set_passing(service, &id, passing);
        }
    }
}

/// Serves `instance` on `listener` until aborted; while `Down`, the port is closed. If the
/// port cannot be bound again within `REBIND_FOR` (another process took it), the instance
/// stays down.
async fn run_server(listener: TcpListener, instance: InstanceHandle) {
    let mut fault = instance.fault.subscribe();
    let mut listener = Some(listener);
    loop {
        let Some(up) = listener.take() else {
            return;
        };
        serve_until_down(up, &instance, &mut fault).await;
        // Down: the listener and the connections are gone. Wait to be set up again.
        if fault.wait_for(|f| *f != Fault::Down).await.is_err() {
            return;
        }
        listener = rebind(instance.addr).await;
    }
}

async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    let deadline = tokio::time::Instant::now() + REBIND_FOR;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Some(listener),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => return None,
        }
    }
}

/// Accepts and serves connections until the fault turns `Down` (or the fault handle is
/// gone); dropping the connection set on return closes every open connection.
async fn serve_until_down(
    listener: TcpListener,
    instance: &InstanceHandle,
    fault: &mut watch::Receiver<Fault>,
) {
    let mut connections = JoinSet::new();
    if *fault.borrow_and_update() == Fault::Down {
        return;
    }
    loop {
        tokio::select! {
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow_and_update() == Fault::Down {
                    return;
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off a little.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if connections.len() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                let instance = instance.clone();
                let endpoint = instance.fault.health.endpoint();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    handle(req, instance.clone(), endpoint.clone())
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                connections.spawn(async move {
                    let _ = conn.await;
                });
            }
        }
    }
}

type Answer = Response<Full<Bytes>>;

async fn handle(
    req: Request<Incoming>,
    instance: InstanceHandle,
    mut health: HealthEndpoint,
) -> Result<Answer, Infallible> {
    let path = req.uri().path().to_owned();
    let request_id = req.headers().get("x-request-id").cloned();
    // `00-<trace id>-<parent id>-<flags>`: the trace id is bytes 3..35.
    let trace_id = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.as_bytes().get(3..35))
        .and_then(|id| HeaderValue::from_bytes(id).ok());
    let mut response = if path == "/health" {
        health.call(req).await?
    } else if path == "/fault" {
        control(&req, &instance)
    } else {
        instance.requests.fetch_add(1, Ordering::Relaxed);
        match instance.fault.get() {
            Fault::Healthy => route(instance.kind, req.method(), &path),
            Fault::Slow(delay) => {
                tokio::time::sleep(delay).await;
                route(instance.kind, req.method(), &path)
            }
            Fault::Failing | Fault::Down => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "injected failure", "instance": &*instance.id}),
            ),
        }
    };
    if let Ok(value) = HeaderValue::from_str(instance.id()) {
        response.headers_mut().insert(INSTANCE_HEADER, value);
    }
    if let Some(id) = request_id {
        response.headers_mut().insert("x-request-id", id);
    }
    if let Some(id) = trace_id {
        response.headers_mut().insert("x-trace-id", id);
    }
    Ok(response)
}

/// `POST /fault?mode=...`.
fn control(req: &Request<Incoming>, instance: &InstanceHandle) -> Answer {
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST /fault?mode=...");
    }
    match Fault::from_query(req.uri().query().unwrap_or_default()) {
        Ok(fault) => {
            instance.fault.set(fault);
            let fault = instance.fault.get();
            json_response(
                StatusCode::OK,
                &json!({"instance": &*instance.id, "mode": fault.label()}),
            )
        }
        Err(message) => error(StatusCode::BAD_REQUEST, &message),
    }
}

/// The service's routes, on the path as received: `/users/42`, or `/api/users/42` as the
/// demo gateway forwards it (its routes keep their prefix).
fn route(kind: ServiceKind, method: &Method, path: &str) -> Answer {
    let path = path.trim_start_matches('/');
    let path = path.strip_prefix("api/").unwrap_or(path);
    let mut segments = path.split('/');
    if segments.next() != Some(kind.name()) {
        return error(StatusCode::NOT_FOUND, "no such route");
    }
    let rest: Vec<&str> = segments.collect();
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
    }
    let data = kind.data();
    match rest.as_slice() {
        [] | [""] => json_response(StatusCode::OK, &Value::Array(data.into_values().collect())),
        [id] | [id, ""] => match id.parse::<u64>() {
            Ok(n) => match data.get(&n) {
                Some(item) => json_response(StatusCode::OK, item),
                None => error(
                    StatusCode::NOT_FOUND,
                    &format!("no {} with id {n}", kind.name().trim_end_matches('s')),
                ),
            },
            Err(_) => error(StatusCode::BAD_REQUEST, "the id must be a number"),
        },
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}

fn error(status: StatusCode, message: &str) -> Answer {
    json_response(status, &json!({ "error": message }))
}

fn json_response(status: StatusCode, body: &Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
