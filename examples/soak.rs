//! A chaos soak: the gateway under steady load in front of real upstream processes and a
//! real `redis-server`, with a random fault every few seconds.
//!
//! ```sh
//! cargo run --example soak --features gateway,redis                       # 60 s (CI)
//! cargo run --example soak --features gateway,redis -- --seconds 600      # the long form
//! cargo run --example soak --features gateway,redis -- --seed 42          # replay a run
//! ```
//!
//! The soak starts a `redis-server` on a free loopback port and three upstream instances,
//! each a child process (this same executable, re-run with `--upstream <port> --redis <url>
//! --id <n>`) that serves through [`HttpRateLimitLayer`] over the Redis limiter, with a
//! fleet-wide limit high enough never to refuse the steady load, failing open to a local
//! share. Each answer says which instance gave it (`x-instance`) and where its limit
//! decision came from (`x-limit-source: redis|local`, inferred from the limiter's
//! breaker: the layer does not expose the decision's source). The upstreams are
//! registered in an in-process [`Registry`] that the gateway follows. 16 client tasks send
//! requests on keep-alive connections through the gateway, whose route has a 1 s timeout,
//! a breaker per endpoint, outlier ejection and a fallback.
//!
//! Every few seconds a fault, drawn with a seeded xorshift (the seed is printed; `--seed`
//! replays it): kill and restart an upstream, kill and restart Redis, stall an upstream
//! (SIGSTOP, SIGCONT about 2 s later), make an upstream answer 503 for about 3 s, withdraw
//! an instance from the registry and register it again. Faults come one at a time; the
//! kinds come in shuffled rounds so that every kind is drawn.
//!
//! It checks, and exits non-zero when any check fails:
//! - no panic, in this process or in any child (their stderr is scanned for "panicked");
//! - no request answered later than the route timeout + 100 ms (measured by the client);
//! - every request answered with a 2xx, the fallback, a 429, or a 503 with Retry-After (no
//!   transport error, no dropped connection);
//! - after each fault clears, traffic reaches the recovered component (the first 2xx from
//!   that instance; for Redis, the first Redis-served decision on every instance) within
//!   the configured wait (breaker wait, outlier ejection left, Redis limiter breaker wait)
//!   + 1 s;
//! - the RSS at the end within 10% of the RSS after warm-up;
//! - the gateway's `/metrics` counts consistent with what the clients saw.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use seawall::BoxError;
use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow, State};
use seawall::discovery::{Instance, Registration, Registry};
use seawall::gateway::{Discovery, FALLBACK_HEADER, Gateway, GatewayConfig, GatewayHandle};
use seawall::rate_limit::http::HttpRateLimitLayer;
use seawall::rate_limit::redis::{FailurePolicy, RedisRateLimiter};
use seawall::rate_limit::{Quota, Rate};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};
use tower::{Layer, Service, ServiceExt};

const SERVICE: &str = "soak-up";
const CLIENTS: usize = 16;
/// Each client's pause between requests.
const PACE: Duration = Duration::from_millis(25);
const UPSTREAMS: usize = 3;
/// The route's timeout, breaker wait and outlier base ejection (see `GATEWAY`).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(1);
const BREAKER_WAIT: Duration = Duration::from_secs(1);
/// The upstreams' Redis limiter breaker wait (fixed: no backoff).
const REDIS_BREAKER_WAIT: Duration = Duration::from_secs(1);
/// Recovery may take this much longer than the configured wait.
const RECOVERY_SLACK: Duration = Duration::from_secs(1);
/// A client gives up on a request after this long (counted as unanswered).
const CLIENT_BOUND: Duration = Duration::from_secs(3);

const GATEWAY: &str = r#"
[gateway]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "soak"
path_prefix = "/api"
service = "soak-up"
timeout = "1s"

[routes.breaker]
failure_rate = 0.5
window = 10
minimum_calls = 5
wait_in_open = "1s"
permitted_in_half_open = 2

[routes.fallback]
status = 200
body = '{"fallback":true}'
content_type = "application/json"

[routes.balance]
strategy = "least-requests"
outlier = { consecutive_failures = 3, base_ejection = "1s", max_ejected = 0.5 }
"#;

// ---------------------------------------------------------------------------------------
// The upstream child process.

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn upstream(port: u16, redis_url: String, id: String) -> Result<(), BoxError> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let breaker = CircuitBreakerConfig::builder()
        .name(format!("soak-redis-{id}"))
        .sliding_window(SlidingWindow::count_based(20))
        .minimum_calls(10)
        .failure_rate_threshold(0.5)
        .wait_in_open(REDIS_BREAKER_WAIT)
        .permitted_calls_in_half_open(1)
        .build()?;
    let limiter =
        RedisRateLimiter::builder(redis_url, Quota::new(Rate::per_second(100_000), 100_000)?)
            .prefix("soak")
            .breaker(breaker)
            .failure_policy(FailurePolicy::FailOpen {
                local_share: Quota::new(Rate::per_second(50_000), 50_000)?,
            })
            .build()?;
    let failing = Arc::new(AtomicBool::new(false));
    let id: Arc<str> = id.into();
    let inner = {
        let (limiter, failing, id) = (limiter.clone(), failing.clone(), id.clone());
        tower::service_fn(move |request: Request<Incoming>| {
            // The layer does not tell where its decision came from: while the breaker
            // around Redis is closed, Redis decided.
            let source = match limiter.breaker().state() {
                State::Closed => "redis",
                _ => "local",
            };
            let fail = failing.load(Relaxed);
            let id = id.clone();
            async move {
                drop(request);
                let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                if fail {
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                let headers = response.headers_mut();
                headers.insert("x-instance", id.parse().expect("instance id"));
                headers.insert("x-limit-source", source.parse().expect("source"));
                Ok::<_, Infallible>(response)
            }
        })
    };
    let key = |_: &Request<Incoming>| Some("soak");
    let service = HttpRateLimitLayer::new(limiter.per_key(key))
        .name("soak")
        .layer(inner);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service.clone();
        let failing = failing.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut service = service.clone();
                let failing = failing.clone();
                async move {
                    // The soak's control endpoint: `/__soak/fail?on=1|0`.
                    if request.uri().path() == "/__soak/fail" {
                        let on = request.uri().query() == Some("on=1");
                        failing.store(on, Relaxed);
                        return Ok(Response::new(Full::new(Bytes::from_static(b"set"))));
                    }
                    service.ready().await?.call(request).await
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// Every child process; all killed on drop, whatever happens (an error, a panic, SIGTERM
/// or Ctrl-C, which drop the soak's future). Were the soak killed outright (SIGKILL), the
/// upstreams would still exit (their stdin, a pipe from the soak, closes); `redis-server`
/// would not.
struct Children {
    dir: PathBuf,
    exe: PathBuf,
    redis_port: u16,
    redis: Option<Child>,
    upstreams: Vec<(u16, Option<Child>)>,
}

impl Children {
    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn log(&self, name: &str) -> Result<File, BoxError> {
        Ok(File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?)
    }

    async fn start_redis(&mut self) -> Result<(), BoxError> {
        let child = Command::new("redis-server")
            .args(["--port", &self.redis_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(self.log("redis.stderr")?)
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        self.redis = Some(child);
        wait_listening(self.redis_port).await
    }

    async fn start_upstream(&mut self, n: usize) -> Result<(), BoxError> {
        let port = self.upstreams[n].0;
        let child = Command::new(&self.exe)
            .args(["--upstream", &port.to_string()])
            .args(["--redis", &self.redis_url()])
            .args(["--id", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(self.log(&format!("upstream-{n}.stderr"))?)
            .spawn()?;
        self.upstreams[n].1 = Some(child);
        wait_listening(port).await
    }

    fn kill_redis(&mut self) {
        if let Some(mut child) = self.redis.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill_upstream(&mut self, n: usize) {
        if let Some(mut child) = self.upstreams[n].1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal_upstream(&self, n: usize, signal: &str) -> Result<(), BoxError> {
        let pid = self.upstreams[n].1.as_ref().ok_or("no such child")?.id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            return Err(format!("kill {signal} {pid} failed").into());
        }
        Ok(())
    }

    /// Lines of the children's stderr that report a panic.
    fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return found;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked")) {
                found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
            }
        }
        found
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for n in 0..self.upstreams.len() {
            let _ = self.signal_upstream(n, "-CONT");
            self.kill_upstream(n);
        }
        self.kill_redis();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16) -> Result<(), BoxError> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("nothing listens on port {port} after 10 s").into());
        }
        sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The clients.

/// What the clients saw.
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    fallback: AtomicU64,
    limited: AtomicU64,
    unavailable: AtomicU64,
    /// Anything else: a status outside the allowed answers.
    bad_status: AtomicU64,
    /// Transport errors, dropped connections.
    transport: AtomicU64,
    /// No answer within `CLIENT_BOUND`.
    unanswered: AtomicU64,
    /// Answered later than the route timeout + 100 ms.
    late: AtomicU64,
    slowest_ms: AtomicU64,
    stop: AtomicBool,
    /// Per instance: the first 2xx after the armed instant.
    ok_watch: Mutex<[Watch; UPSTREAMS]>,
    /// Per instance: the first Redis-sourced decision after the armed instant.
    redis_watch: Mutex<[Watch; UPSTREAMS]>,
    /// Answers per instance since the start.
    per_instance: [AtomicU64; UPSTREAMS],
    redis_decisions: AtomicU64,
    local_decisions: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct Watch {
    armed: Option<Instant>,
    seen: Option<Instant>,
}

impl Seen {
    fn total(&self) -> u64 {
        self.ok.load(Relaxed)
            + self.fallback.load(Relaxed)
            + self.limited.load(Relaxed)
            + self.unavailable.load(Relaxed)
            + self.bad_status.load(Relaxed)
    }

    fn record_ok(&self, instance: usize, redis: bool, at: Instant) {
        self.per_instance[instance].fetch_add(1, Relaxed);
        let mut watch = self.ok_watch.lock();
        if watch[instance].armed.is_some() && watch[instance].seen.is_none() {
            watch[instance].seen = Some(at);
        }
        drop(watch);
        if !redis {
            self.local_decisions.fetch_add(1, Relaxed);
        } else {
            self.redis_decisions.fetch_add(1, Relaxed);
            let mut watch = self.redis_watch.lock();
            if watch[instance].armed.is_some() && watch[instance].seen.is_none() {
                watch[instance].seen = Some(at);
            }
        }
    }
}

fn arm(watch: &Mutex<[Watch; UPSTREAMS]>, instance: Option<usize>, at: Instant) {
    let mut watch = watch.lock();
    for (n, w) in watch.iter_mut().enumerate() {
        if instance.is_none_or(|i| i == n) {
            *w = Watch {
                armed: Some(at),
                seen: None,
            };
        }
    }
}

type Http = Client<HttpConnector, Empty<Bytes>>;

async fn client(seen: Arc<Seen>, base: String, c: usize) {
    // One client per task: its own keep-alive connection.
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let mut i = 0u64;
    while !seen.stop.load(Relaxed) {
        i += 1;
        let Ok(request) = Request::get(format!("{base}/api/item/{c}/{i}")).body(Empty::new())
        else {
            continue;
        };
        let start = Instant::now();
        let answer = timeout(CLIENT_BOUND, async {
            let response = http.request(request).await?;
            let (parts, body) = response.into_parts();
            body.collect().await?;
            Ok::<_, BoxError>(parts)
        })
        .await;
        let at = Instant::now();
        let elapsed = at - start;
        seen.slowest_ms.fetch_max(
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            Relaxed,
        );
        if elapsed > ROUTE_TIMEOUT + Duration::from_millis(100) {
            seen.late.fetch_add(1, Relaxed);
        }
        match answer {
            Err(_) => {
                seen.unanswered.fetch_add(1, Relaxed);
            }
            Ok(Err(_)) => {
                seen.transport.fetch_add(1, Relaxed);
            }
            Ok(Ok(parts)) => {
                let headers = &parts.headers;
                let counter = if headers.contains_key(&FALLBACK_HEADER) {
                    &seen.fallback
                } else if parts.status == StatusCode::TOO_MANY_REQUESTS {
                    &seen.limited
                } else if parts.status == StatusCode::SERVICE_UNAVAILABLE
                    && headers.contains_key(hyper::header::RETRY_AFTER)
                {
                    &seen.unavailable
                } else if parts.status.is_success() {
                    let instance = headers
                        .get("x-instance")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|&n| n < UPSTREAMS);
                    match instance {
                        Some(n) => {
                            let redis = headers
                                .get("x-limit-source")
                                .is_some_and(|v| v.as_bytes() == b"redis");
                            seen.record_ok(n, redis, at);
                            &seen.ok
                        }
                        None => &seen.bad_status,
                    }
                } else {
                    &seen.bad_status
                };
                counter.fetch_add(1, Relaxed);
            }
        }
        sleep(PACE).await;
    }
}

// ---------------------------------------------------------------------------------------
// Faults.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    KillUpstream,
    KillRedis,
    Stall,
    Answer503,
    Withdraw,
}

const KINDS: [Kind; 5] = [
    Kind::KillUpstream,
    Kind::KillRedis,
    Kind::Stall,
    Kind::Answer503,
    Kind::Withdraw,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::KillUpstream => "kill+restart upstream",
            Kind::KillRedis => "kill+restart redis",
            Kind::Stall => "stall upstream 2s",
            Kind::Answer503 => "upstream 503 for 3s",
            Kind::Withdraw => "withdraw+re-register",
        }
    }

    /// What recovery waits for, by configuration.
    fn waits_for(self) -> &'static str {
        match self {
            Kind::KillRedis => "limiter breaker wait",
            Kind::Withdraw => "discovery (no wait)",
            _ => "breaker wait / ejection left",
        }
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One fault's outcome.
struct Outcome {
    kind: Kind,
    /// Fallback answers, and decisions from a local share, from the fault to recovery.
    fallbacks: u64,
    local: u64,
    recovery: Option<Duration>,
    configured: Duration,
}

impl Outcome {
    fn violated(&self) -> bool {
        self.recovery
            .is_none_or(|r| r > self.configured + RECOVERY_SLACK)
    }
}

struct Soak {
    children: Children,
    registry: Registry,
    registrations: Vec<Option<Registration>>,
    seen: Arc<Seen>,
    gateway: GatewayHandle,
    http: Http,
}

impl Soak {
    fn register(&mut self, n: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.children.upstreams[n].0));
        self.registrations[n] = Some(self.registry.register(Instance::local(SERVICE, addr)));
    }

    async fn control(&self, n: usize, on: bool) -> Result<(), BoxError> {
        let port = self.children.upstreams[n].0;
        let uri = format!("http://127.0.0.1:{port}/__soak/fail?on={}", u8::from(on));
        let response = timeout(
            Duration::from_secs(2),
            self.http.request(Request::get(uri).body(Empty::new())?),
        )
        .await??;
        if !response.status().is_success() {
            return Err(format!("control answered {}", response.status()).into());
        }
        Ok(())
    }

    /// The gateway's view of instance `n`: (breaker open, ejection left).
    fn endpoint(&self, n: usize) -> Option<(bool, Option<Duration>)> {
        let address = format!("127.0.0.1:{}", self.children.upstreams[n].0);
        self.gateway
            .gateway()
            .status()
            .routes
            .into_iter()
            .flat_map(|r| r.endpoints)
            .find(|e| e.address == address)
            .map(|e| {
                (
                    e.breaker.as_deref() == Some("open"),
                    e.ejected_for_ms.map(Duration::from_millis),
                )
            })
    }

    /// Injects one fault and returns once it has cleared: the instant it cleared.
    async fn inject(&mut self, kind: Kind, n: usize) -> Result<Instant, BoxError> {
        match kind {
            Kind::KillUpstream => {
                self.children.kill_upstream(n);
                sleep(Duration::from_millis(1500)).await;
                self.children.start_upstream(n).await?;
            }
            Kind::KillRedis => {
                self.children.kill_redis();
                sleep(Duration::from_millis(1500)).await;
                self.children.start_redis().await?;
            }
            Kind::Stall => {
                self.children.signal_upstream(n, "-STOP")?;
                sleep(Duration::from_secs(2)).await;
                self.children.signal_upstream(n, "-CONT")?;
            }
            Kind::Answer503 => {
                self.control(n, true).await?;
                sleep(Duration::from_secs(3)).await;
                self.control(n, false).await?;
            }
            Kind::Withdraw => {
                self.registrations[n] = None;
                sleep(Duration::from_secs(2)).await;
                self.register(n);
            }
        }
        Ok(Instant::now())
    }

    /// Runs one fault, then waits for recovery (bounded).
    async fn fault(&mut self, kind: Kind, n: usize) -> Result<Outcome, BoxError> {
        let (fallbacks, local) = (
            self.seen.fallback.load(Relaxed),
            self.seen.local_decisions.load(Relaxed),
        );
        let cleared = self.inject(kind, n).await?;
        let redis = kind == Kind::KillRedis;
        let watch = if redis {
            &self.seen.redis_watch
        } else {
            &self.seen.ok_watch
        };
        arm(watch, (!redis).then_some(n), cleared);
        // The configured wait, from the moment the fault cleared: the breaker's wait (it
        // may have opened just before), or longer when the gateway's status shows the
        // endpoint ejected for longer, or its breaker opening again later.
        let mut deadline = cleared
            + match kind {
                Kind::KillRedis => REDIS_BREAKER_WAIT,
                Kind::Withdraw => Duration::ZERO,
                _ => BREAKER_WAIT,
            };
        let mut was_open = true;
        let give_up = cleared + Duration::from_secs(15);
        let recovered = loop {
            let now = Instant::now();
            let done = {
                let watch = watch.lock();
                let mut seen = watch.iter().filter_map(|w| w.armed.and(Some(w.seen)));
                if redis {
                    seen.try_fold(cleared, |latest, s| s.map(|s| latest.max(s)))
                } else {
                    seen.next().flatten()
                }
            };
            if let Some(at) = done {
                break Some(at);
            }
            if !redis && kind != Kind::Withdraw {
                if let Some((open, ejected_for)) = self.endpoint(n) {
                    if open && !was_open {
                        deadline = deadline.max(now + BREAKER_WAIT);
                    }
                    was_open = open;
                    if let Some(left) = ejected_for {
                        deadline = deadline.max(now + left);
                    }
                }
            }
            if now > give_up {
                break None;
            }
            sleep(Duration::from_millis(20)).await;
        };
        let mut watch = watch.lock();
        for w in watch.iter_mut() {
            *w = Watch::default();
        }
        Ok(Outcome {
            kind,
            fallbacks: self.seen.fallback.load(Relaxed) - fallbacks,
            local: self.seen.local_decisions.load(Relaxed) - local,
            recovery: recovered.map(|at| at.saturating_duration_since(cleared)),
            configured: deadline - cleared,
        })
    }
}

fn rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sums a `/metrics` family, over the samples whose labels contain `filter`.
fn metric(text: &str, family: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

static PANICS: AtomicU64 = AtomicU64::new(0);

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(port) = arg(&args, "--upstream") {
        let redis = arg(&args, "--redis").ok_or("--redis is required")?;
        let id = arg(&args, "--id").ok_or("--id is required")?;
        // Ends with the soak, even when the soak was killed: its end of our stdin closes.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(upstream(port.parse()?, redis, id));
    }
    let seconds: u64 = arg(&args, "--seconds").map_or(Ok(60), |s| s.parse())?;
    let seed: u64 = match arg(&args, "--seed") {
        Some(s) => s.parse()?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Relaxed);
        default_hook(info);
    }));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            // On SIGTERM (`timeout`) or Ctrl-C the soak's future is dropped, and with it the
            // guard that kills the children.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = soak(seconds, seed.max(1)) => result,
                _ = term.recv() => Err("terminated".into()),
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            }
        })
}

async fn soak(seconds: u64, seed: u64) -> Result<(), BoxError> {
    println!("seawall chaos soak: {seconds} s, seed {seed} (replay with --seed {seed})");
    let dir = std::env::temp_dir().join(format!("seawall-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut children = Children {
        dir,
        exe: std::env::current_exe()?,
        redis_port: free_port()?,
        redis: None,
        upstreams: Vec::new(),
    };
    for _ in 0..UPSTREAMS {
        children.upstreams.push((free_port()?, None));
    }
    children.start_redis().await?;
    for n in 0..UPSTREAMS {
        children.start_upstream(n).await?;
    }

    let registry = Registry::new();
    let config = GatewayConfig::from_toml_str(GATEWAY)?;
    let gateway = Gateway::build(config, Discovery::Registry(registry.clone())).await?;
    let admin = gateway
        .clone()
        .spawn_admin(TcpListener::bind("127.0.0.1:0").await?);
    let gateway = gateway.spawn(TcpListener::bind("127.0.0.1:0").await?);
    let base = format!("http://{}", gateway.local_addr());
    let metrics_url = format!("http://{}/metrics", admin.local_addr());
    let seen = Arc::new(Seen::default());
    let mut soak = Soak {
        children,
        registry,
        registrations: (0..UPSTREAMS).map(|_| None).collect(),
        seen: seen.clone(),
        gateway,
        http: Client::builder(TokioExecutor::new()).build_http(),
    };
    for n in 0..UPSTREAMS {
        soak.register(n);
    }
    println!("  gateway {base}, admin {}", admin.local_addr());
    println!(
        "  redis 127.0.0.1:{}, upstreams {:?}",
        soak.children.redis_port,
        soak.children
            .upstreams
            .iter()
            .map(|u| u.0)
            .collect::<Vec<_>>()
    );

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(seen.clone(), base.clone(), c)))
        .collect();

    // Warm-up: every instance serves, from Redis, then a few seconds more.
    let warm = Instant::now();
    loop {
        let served = seen.per_instance.iter().all(|c| c.load(Relaxed) > 0);
        if served && seen.redis_decisions.load(Relaxed) > 0 {
            break;
        }
        if warm.elapsed() > Duration::from_secs(15) {
            return Err("warm-up: not every instance served within 15 s".into());
        }
        sleep(Duration::from_millis(50)).await;
    }
    sleep(Duration::from_secs(4)).await;
    let rss_warm = rss_kib().ok_or("no VmRSS in /proc/self/status")?;
    let warm_requests = seen.total();
    println!(
        "  warm-up done in {:.1} s: {warm_requests} requests, RSS {rss_warm} KiB",
        warm.elapsed().as_secs_f64()
    );

    // Faults, one at a time, kinds in shuffled rounds.
    let mut rng = Rng(seed);
    let mut deck: Vec<Kind> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    while Instant::now() < end {
        if deck.is_empty() {
            deck = KINDS.to_vec();
            for i in (1..deck.len()).rev() {
                deck.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let kind = deck.pop().expect("a full deck");
        let n = rng.below(UPSTREAMS as u64) as usize;
        let t = start.elapsed().as_secs_f64();
        let outcome = soak.fault(kind, n).await?;
        let target = if kind == Kind::KillRedis {
            "redis".to_owned()
        } else {
            format!("upstream {n}")
        };
        println!(
            "  {t:>6.1}s  {:<22} {target:<10} {:>4} fallbacks {:>5} local  recovered in {:>6} ms (configured {:>5} ms){}",
            kind.label(),
            outcome.fallbacks,
            outcome.local,
            outcome
                .recovery
                .map_or_else(|| "never".to_owned(), |r| ms(r).to_string()),
            ms(outcome.configured),
            if outcome.violated() {
                "  VIOLATION"
            } else {
                ""
            }
        );
        outcomes.push(outcome);
        // A pause between faults: 1 to 2.5 s.
        sleep(Duration::from_millis(1000 + rng.below(1500))).await;
    }

    let rss_end = rss_kib().ok_or("no VmRSS in /proc/self/status")?;
    seen.stop.store(true, Relaxed);
    for c in clients {
        c.await?;
    }
    // Let the gateway finish counting the last responses.
    sleep(Duration::from_millis(200)).await;
    let metrics_text = {
        let response = timeout(
            Duration::from_secs(5),
            soak.http
                .request(Request::get(&metrics_url).body(Empty::new())?),
        )
        .await??;
        String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?
    };

    // The report.
    let mut failures: Vec<String> = Vec::new();
    println!();
    println!(
        "{:<24} {:>5} {:>9} {:>9} {:>9} {:>12} {:>10}",
        "fault", "count", "rec. min", "median", "max", "configured", "violations"
    );
    let mut by_kind: BTreeMap<Kind, Vec<&Outcome>> = BTreeMap::new();
    for o in &outcomes {
        by_kind.entry(o.kind).or_default().push(o);
    }
    for kind in KINDS {
        let list = by_kind.get(&kind).cloned().unwrap_or_default();
        let mut times: Vec<u128> = list.iter().filter_map(|o| o.recovery.map(ms)).collect();
        times.sort_unstable();
        let cell = |i: Option<&u128>| i.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
        let configured_min = list.iter().map(|o| ms(o.configured)).min();
        let configured_max = list.iter().map(|o| ms(o.configured)).max();
        let configured = match (configured_min, configured_max) {
            (Some(a), Some(b)) if a == b => format!("{a} ms"),
            (Some(a), Some(b)) => format!("{a}-{b} ms"),
            _ => "-".to_owned(),
        };
        let violations = list.iter().filter(|o| o.violated()).count();
        println!(
            "{:<24} {:>5} {:>9} {:>9} {:>9} {:>12} {:>10}",
            kind.label(),
            list.len(),
            cell(times.first()),
            cell(times.get(times.len() / 2)),
            cell(times.last()),
            configured,
            violations
        );
        if violations > 0 {
            failures.push(format!(
                "{}: {violations} recoveries slower than configured + {} ms ({})",
                kind.label(),
                ms(RECOVERY_SLACK),
                kind.waits_for()
            ));
        }
    }
    if outcomes.is_empty() {
        failures.push("no fault was injected".to_owned());
    }

    let total = seen.total();
    let (ok, fallback, limited, unavailable) = (
        seen.ok.load(Relaxed),
        seen.fallback.load(Relaxed),
        seen.limited.load(Relaxed),
        seen.unavailable.load(Relaxed),
    );
    let (bad, transport, unanswered, late) = (
        seen.bad_status.load(Relaxed),
        seen.transport.load(Relaxed),
        seen.unanswered.load(Relaxed),
        seen.late.load(Relaxed),
    );
    println!();
    println!(
        "requests {total}: {ok} 2xx, {fallback} fallback, {limited} 429, {unavailable} 503+Retry-After; \
         {bad} other status, {transport} transport errors, {unanswered} unanswered; \
         {late} later than {} ms (slowest {} ms)",
        ms(ROUTE_TIMEOUT + Duration::from_millis(100)),
        seen.slowest_ms.load(Relaxed)
    );
    if bad + transport + unanswered > 0 {
        failures.push(format!(
            "{bad} answers with another status, {transport} transport errors, {unanswered} unanswered"
        ));
    }
    if late > 0 {
        failures.push(format!(
            "{late} requests answered later than the route timeout + 100 ms"
        ));
    }

    let growth = (rss_end as f64 - rss_warm as f64) / rss_warm as f64 * 100.0;
    println!("RSS: {rss_warm} KiB after warm-up, {rss_end} KiB at the end ({growth:+.1}%)");
    if growth.abs() > 10.0 {
        failures.push(format!("RSS changed by {growth:+.1}% (more than 10%)"));
    }

    let m_requests = metric(
        &metrics_text,
        "seawall_gateway_requests_total",
        "route=\"soak\"",
    );
    let m_fallbacks = metric(
        &metrics_text,
        "seawall_gateway_fallbacks_total",
        "route=\"soak\"",
    );
    let m_limited = metric(
        &metrics_text,
        "seawall_gateway_rate_limited_total",
        "route=\"soak\"",
    );
    let m_2xx = metric(
        &metrics_text,
        "seawall_gateway_responses_total",
        "class=\"2xx\"",
    );
    let tolerance = CLIENTS as u64;
    let answered = total + transport;
    println!(
        "/metrics: {m_requests} requests (clients: {answered}), {m_2xx} 2xx (clients: {}), \
         {m_fallbacks} fallbacks (clients: {fallback}), {m_limited} 429 (clients: {limited}); tolerance {tolerance}",
        ok + fallback
    );
    for (what, gateway_count, client_count) in [
        ("requests", m_requests, answered),
        ("2xx responses", m_2xx, ok + fallback),
        ("fallbacks", m_fallbacks, fallback),
    ] {
        if gateway_count.abs_diff(client_count) > tolerance {
            failures.push(format!(
                "/metrics counts {gateway_count} {what}, the clients {client_count}"
            ));
        }
    }

    let panics = PANICS.load(Relaxed);
    let child_panics = soak.children.panics();
    println!(
        "panics: {panics} in the soak, {} in the children",
        child_panics.len()
    );
    for line in &child_panics {
        println!("  {line}");
    }
    if panics > 0 || !child_panics.is_empty() {
        failures.push(format!("{} panics", panics + child_panics.len() as u64));
    }

    let Soak {
        children, gateway, ..
    } = soak;
    gateway.shutdown().await;
    admin.shutdown().await;
    drop(children);
    if failures.is_empty() {
        println!("\nsoak passed (seed {seed})");
        Ok(())
    } else {
        println!("\nsoak FAILED (seed {seed}):");
        for f in &failures {
            println!("  - {f}");
        }
        Err(format!("{} checks failed", failures.len()).into())
    }
}
