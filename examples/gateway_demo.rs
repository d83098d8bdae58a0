//! seawall's demo: an API gateway in front of a user service and a product service,
//! several instances each, on loopback.
//!
//! ```sh
//! cargo run --example gateway_demo --features gateway,consul           # about 25 s, then exits
//! cargo run --example gateway_demo --features gateway,consul -- --keep-running  # keeps serving
//! ```
//!
//! The services register themselves (in the in-process registry, or in Consul through the
//! registration guard when `CONSUL_HTTP_ADDR` is set) and the gateway, configured by
//! `examples/gateway.toml`, discovers them: routes by path prefix, per route a global and a
//! per-client rate limit, JWT authentication on `/api/products`, a timeout, a circuit
//! breaker per instance with a fallback answer, and load balancing with outlier ejection.
//!
//! Eight clients send traffic while the demo injects faults: an instance fails and
//! recovers, every product instance goes down and comes back, one client bursts past its
//! rate limit, requests come without a token. A line of figures per second shows what the
//! clients see; a summary at the end counts requests served, fallbacks, 429s, 401s,
//! breaker transitions and endpoints ejected and readmitted. The demo exits non-zero if any
//! of those did not happen, so CI runs it as a test.

#[path = "support/demo_services.rs"]
mod demo_services;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use seawall::BoxError;
use seawall::consul::ConsulClient;
use seawall::discovery::Registry;
use seawall::gateway::jwt::JwtVerifier;
use seawall::gateway::{Discovery, FALLBACK_HEADER, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep};

use demo_services::{DemoFleet, Fault, FleetSpec};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.toml");
const CLIENTS: usize = 8;
/// Each client's pause between requests: about 400 requests a second in all.
const PACE: Duration = Duration::from_millis(20);

type Http = Client<HttpConnector, Empty<Bytes>>;

/// What the clients saw, per route.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    fallbacks: AtomicU64,
    limited: AtomicU64,
    unauthorized: AtomicU64,
    errors: AtomicU64,
}

impl Tally {
    fn count(&self, status: StatusCode, fallback: bool) {
        let counter = match status {
            _ if fallback => &self.fallbacks,
            StatusCode::TOO_MANY_REQUESTS => &self.limited,
            StatusCode::UNAUTHORIZED => &self.unauthorized,
            s if s.is_success() || s == StatusCode::NOT_FOUND => &self.served,
            _ => &self.errors,
        };
        counter.fetch_add(1, Relaxed);
    }

    fn line(&self) -> String {
        format!(
            "{:>5} ok {:>4} fallback {:>4} 429 {:>3} 401 {:>3} err",
            self.served.load(Relaxed),
            self.fallbacks.load(Relaxed),
            self.limited.load(Relaxed),
            self.unauthorized.load(Relaxed),
            self.errors.load(Relaxed)
        )
    }
}

struct Demo {
    base: String,
    http: Http,
    token: String,
    users: Tally,
    products: Tally,
    stop: AtomicBool,
}

impl Demo {
    /// One request through the gateway; counts what came back.
    async fn send(&self, path: &str, client: &str, token: Option<&str>) -> Option<StatusCode> {
        self.send_full(path, client, token)
            .await
            .map(|(status, _)| status)
    }

    /// As `send`, with the response's headers.
    async fn send_full(
        &self,
        path: &str,
        client: &str,
        token: Option<&str>,
    ) -> Option<(StatusCode, hyper::HeaderMap)> {
        let mut request = Request::get(format!("{}{path}", self.base))
            .header("x-client", client)
            .body(Empty::new())
            .ok()?;
        if let Some(token) = token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let answer = tokio::time::timeout(Duration::from_secs(3), self.http.request(request)).await;
        let tally = if path.starts_with("/api/products") {
            &self.products
        } else {
            &self.users
        };
        match answer {
            Ok(Ok(response)) => {
                let status = response.status();
                let headers = response.headers().clone();
                let fallback = headers.contains_key(&FALLBACK_HEADER);
                // Read the body so the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                tally.count(status, fallback);
                Some((status, headers))
            }
            _ => {
                tally.errors.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

/// Breaker states and ejections seen at the gateway, sampled from its status.
#[derive(Default)]
struct Watcher {
    breakers: HashMap<(String, String), String>,
    ejected: HashMap<(String, String), bool>,
    transitions: Vec<String>,
    ejections: u64,
    readmissions: u64,
}

impl Watcher {
    fn sample(&mut self, gateway: &GatewayHandle, t: f64) {
        for route in gateway.gateway().status().routes {
            for endpoint in route.endpoints {
                let key = (route.name.clone(), endpoint.address.clone());
                if let Some(state) = endpoint.breaker {
                    let before = self.breakers.insert(key.clone(), state.clone());
                    if let Some(before) = before.filter(|b| *b != state) {
                        println!(
                            "  {t:>5.1}s  breaker {}/{}: {before} -> {state}",
                            route.name, endpoint.address
                        );
                        self.transitions.push(format!("{before}->{state}"));
                    }
                }
                let was = self.ejected.insert(key.clone(), endpoint.ejected);
                match (was, endpoint.ejected) {
                    (Some(false) | None, true) => {
                        self.ejections += 1;
                        println!(
                            "  {t:>5.1}s  ejected {}/{} for {} ms",
                            route.name,
                            endpoint.address,
                            endpoint.ejected_for_ms.unwrap_or(0)
                        );
                    }
                    (Some(true), false) => {
                        self.readmissions += 1;
                        println!(
                            "  {t:>5.1}s  readmitted {}/{}",
                            route.name, endpoint.address
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

fn token(secret: &str, issuer: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    JwtVerifier::new(secret.as_bytes()).sign(&serde_json::json!({
        "sub": "demo-client",
        "iss": issuer,
        "iat": now,
        "exp": now + 3600,
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let keep_running = std::env::args().any(|a| a == "--keep-running");
    let consul = match std::env::var("CONSUL_HTTP_ADDR") {
        Ok(addr) if !addr.trim().is_empty() => Some(ConsulClient::from_env()?),
        _ => None,
    };

    // The services: three user instances, two product instances.
    let registry = Registry::new();
    let mut spec = FleetSpec::new(3, 2)
        .registry(registry.clone())
        .check_delay(Duration::from_millis(1500));
    if let Some(client) = &consul {
        spec = spec.consul(client.clone());
    }
    let fleet = DemoFleet::start(spec).await?;

    // The gateway, from its configuration file.
    let config = GatewayConfig::from_file(CONFIG)?;
    let jwt = config
        .auth
        .jwt
        .clone()
        .ok_or("examples/gateway.toml has no [auth.jwt]")?;
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let (listen, admin_listen) = if keep_running {
        (
            config.gateway.listen,
            config.admin.listen.unwrap_or(loopback),
        )
    } else {
        (loopback, loopback)
    };
    let discovery = match &consul {
        Some(client) => Discovery::Consul(client.clone()),
        None => Discovery::Registry(registry.clone()),
    };
    let listener = TcpListener::bind(listen).await?;
    // The admin endpoints (status page, metrics) on a loopback listener of their own.
    let admin_listener = TcpListener::bind(admin_listen).await?;
    let gateway = Gateway::build(config, discovery).await?;
    let admin = gateway.clone().spawn_admin(admin_listener);
    let gateway = gateway.spawn(listener);
    let admin_base = format!("http://{}", admin.local_addr());
    let base = format!("http://{}", gateway.local_addr());

    println!("seawall demo: an API gateway in front of two services");
    println!(
        "  discovery: {}",
        if consul.is_some() {
            "Consul (CONSUL_HTTP_ADDR)"
        } else {
            "in-process registry (set CONSUL_HTTP_ADDR to use Consul)"
        }
    );
    for instance in fleet.instances() {
        println!("  {:<11} {}", instance.id(), instance.addr());
    }
    println!("  gateway     {base}  (/api/users, /api/products with a JWT)");
    println!(
        "  admin       {admin_base}/status  (live page)  {admin_base}/status.json  {admin_base}/metrics"
    );
    println!();

    let demo = Arc::new(Demo {
        base: base.clone(),
        http: Client::builder(TokioExecutor::new()).build_http(),
        token: token(&jwt.resolve_secret()?, jwt.issuer.as_deref().unwrap_or("")),
        users: Tally::default(),
        products: Tally::default(),
        stop: AtomicBool::new(false),
    });

    // Wait for discovery to see every instance (bounded).
    let ready = Instant::now();
    while gateway
        .gateway()
        .status()
        .routes
        .iter()
        .map(|r| r.endpoints.len())
        .sum::<usize>()
        < 5
    {
        demo.send("/api/users/1", "warm-up", None).await;
        demo.send("/api/products/1", "warm-up", Some(&demo.token))
            .await;
        if ready.elapsed() > Duration::from_secs(10) {
            return Err("the gateway did not discover the services within 10 s".into());
        }
        sleep(Duration::from_millis(50)).await;
    }

    // Steady traffic: eight clients, users and products in turn.
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let demo = demo.clone();
        clients.push(tokio::spawn(async move {
            let name = format!("client-{c}");
            let mut i = c as u64;
            while !demo.stop.load(Relaxed) {
                i += 1;
                if i % 2 == 0 {
                    let id = i % 3 + 1;
                    demo.send(&format!("/api/users/{id}"), &name, None).await;
                } else {
                    let id = i % 4 + 1;
                    demo.send(&format!("/api/products/{id}"), &name, Some(&demo.token))
                        .await;
                }
                sleep(PACE).await;
            }
        }));
    }

    // The script: (seconds from start, what happens).
    let start = Instant::now();
    let mut watcher = Watcher::default();
    let users_2 = fleet.instance("users-2").ok_or("no users-2")?;
    let products = fleet.service("products");
    type Step<'a> = (f64, &'a str, Box<dyn Fn() + Send + 'a>);
    let script: Vec<Step<'_>> = vec![
        (0.0, "all instances healthy", Box::new(|| {})),
        (
            3.0,
            "users-2 starts failing (503)",
            Box::new(|| users_2.fault().set(Fault::Failing)),
        ),
        (
            8.0,
            "users-2 recovers",
            Box::new(|| users_2.fault().set(Fault::Healthy)),
        ),
        (
            12.0,
            "every product instance goes down",
            Box::new(|| {
                for p in &products {
                    p.fault().set(Fault::Down);
                }
            }),
        ),
        (
            16.0,
            "product instances come back",
            Box::new(|| {
                for p in &products {
                    p.fault().set(Fault::Healthy);
                }
            }),
        ),
    ];
    let end = 22.0;
    let mut next_step = 0;
    let mut next_line = 1.0;
    let mut bursted = false;
    while start.elapsed().as_secs_f64() < end {
        let t = start.elapsed().as_secs_f64();
        if next_step < script.len() && t >= script[next_step].0 {
            let (_, what, action) = &script[next_step];
            println!("  {t:>5.1}s  == {what}");
            action();
            next_step += 1;
        }
        if !bursted && t >= 19.0 {
            bursted = true;
            println!("  {t:>5.1}s  == client-burst sends 300 requests at once, past its limit");
            burst(&demo).await;
            println!(
                "  {:>5.1}s  == requests without a token, and with a forged one",
                start.elapsed().as_secs_f64()
            );
            demo.send("/api/products/1", "client-0", None).await;
            demo.send("/api/products/1", "client-0", Some("forged.token.value"))
                .await;
        }
        let t = start.elapsed().as_secs_f64();
        watcher.sample(&gateway, t);
        if t >= next_line {
            next_line += 1.0;
            println!(
                "  {t:>5.1}s  users {}  | products {}",
                demo.users.line(),
                demo.products.line()
            );
        }
        sleep(Duration::from_millis(100)).await;
    }
    demo.stop.store(true, Relaxed);
    for client in clients {
        let _ = client.await;
    }
    watcher.sample(&gateway, start.elapsed().as_secs_f64());

    let served = demo.users.served.load(Relaxed) + demo.products.served.load(Relaxed);
    let fallbacks = demo.users.fallbacks.load(Relaxed) + demo.products.fallbacks.load(Relaxed);
    let limited = demo.users.limited.load(Relaxed) + demo.products.limited.load(Relaxed);
    let unauthorized =
        demo.users.unauthorized.load(Relaxed) + demo.products.unauthorized.load(Relaxed);
    let errors = demo.users.errors.load(Relaxed) + demo.products.errors.load(Relaxed);
    let opened = watcher
        .transitions
        .iter()
        .filter(|t| t.ends_with("->open"))
        .count();
    let closed = watcher
        .transitions
        .iter()
        .filter(|t| t.ends_with("->closed"))
        .count();
    println!();
    println!("summary after {:.1} s", start.elapsed().as_secs_f64());
    println!("  requests served by an instance  {served}");
    println!("  fallback answers                {fallbacks}");
    println!("  429 (rate limited)              {limited}");
    println!("  401 (no or bad token)           {unauthorized}");
    println!("  other errors                    {errors}");
    println!(
        "  breaker transitions             {} ({opened} opened, {closed} closed)",
        watcher.transitions.len()
    );
    println!(
        "  endpoints ejected / readmitted  {} / {}",
        watcher.ejections, watcher.readmissions
    );

    if keep_running {
        println!();
        println!("still running (Ctrl-C to stop): try");
        println!("  curl -i {base}/api/users/1");
        println!(
            "  curl -i -H 'authorization: Bearer {}' {base}/api/products/1",
            demo.token
        );
        println!("  open {admin_base}/status in a browser, or curl {admin_base}/status.json");
        for instance in fleet.instances() {
            println!(
                "  curl -X POST '{}/fault?mode=failing'   # then ?mode=healthy",
                instance.base_url()
            );
        }
        tokio::signal::ctrl_c().await?;
    }
    gateway.shutdown().await;
    admin.shutdown().await;
    fleet.shutdown().await?;

    // The demo is also a test: each of these must have happened.
    let mut missing = Vec::new();
    for (what, ok) in [
        ("requests served", served > 0),
        ("fallback answers", fallbacks > 0),
        ("429 answers", limited > 0),
        ("401 answers", unauthorized >= 2),
        ("a breaker opening", opened > 0),
        ("a breaker closing again", closed > 0),
        ("an endpoint ejected", watcher.ejections > 0),
        ("no other errors", errors == 0),
    ] {
        if !ok {
            missing.push(what);
        }
    }
    if !missing.is_empty() {
        return Err(format!("the demo did not show: {}", missing.join(", ")).into());
    }
    Ok(())
}

/// One client sends 300 requests at once: its per-client limit (burst 50) answers the rest
/// with 429 and the rate-limit headers; shows the first such answer.
async fn burst(demo: &Arc<Demo>) {
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let demo = demo.clone();
        tasks.push(tokio::spawn(async move {
            demo.send_full("/api/users/1", "client-burst", None).await
        }));
    }
    let mut shown = false;
    for task in tasks {
        if let Ok(Some((status, headers))) = task.await {
            if status == StatusCode::TOO_MANY_REQUESTS && !shown {
                shown = true;
                let mut line = format!("         a refused one: {status}");
                for name in ["retry-after", "ratelimit-policy", "ratelimit"] {
                    if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
                        line.push_str(&format!("  {name}: {v}"));
                    }
                }
                println!("{line}");
            }
        }
    }
}
