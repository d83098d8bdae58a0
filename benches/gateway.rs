//! Gateway overhead on loopback: throughput, latency percentiles and CPU per request of a
//! load client talking to an upstream directly, against the same client going through
//! the gateway, a bare hyper proxy and nginx. Not a criterion bench: what matters is the
//! latency distribution of real HTTP round trips, so each run sends a fixed number of
//! requests and prints p50 / p90 / p99 / p99.9.
//!
//! Configurations, all on 127.0.0.1:
//!
//! - `direct`: the load client → one upstream (a minimal hyper server answering a small
//!   static JSON body);
//! - `hyper proxy`: a minimal hand-written hyper proxy (server + pooled legacy client,
//!   forwarding to that same upstream): the cost of one more HTTP hop itself, whoever
//!   makes it, for a hyper-based proxy;
//! - `nginx`: nginx as a reference production proxy, started as a child process with as
//!   many worker processes as the gateway runtime has workers, forwarding to that same
//!   upstream over a keep-alive upstream pool (`keepalive 64`, HTTP/1.1, no access log),
//!   listening with `reuseport` (without it one worker took every connection of a run and
//!   the other stayed idle, leaving nginx a single core).
//!   The bench never installs it: if no `nginx` is on `PATH` or at `/usr/sbin/nginx`, or
//!   it fails to start (its error log is printed), the row is skipped
//!   (`apt-get install -y nginx-light`);
//! - `gw routing`: the gateway with one route, prefix routing with `strip_prefix`,
//!   balancing (least requests) over three upstream instances, no limits or breaker;
//! - `gw full`: the same plus a global and a per-client (IP) rate limit set far above
//!   what the run can send, an endpoint breaker, outlier detection, a timeout and a
//!   fallback;
//! - `gw full+jwt`: `gw full` with `auth = true` (HS256, a valid token on every request).
//! - `gw full, threads`: `gw full` served by `Gateway::spawn_threads` on as many threads
//!   as the gateway runtime has workers, each with its own current-thread runtime and
//!   `SO_REUSEPORT` listener (nginx's model); its CPU is that of those threads.
//!
//! Two scenarios, each with its own table, its own upstream instances, proxies and
//! gateways, and its own `direct` baseline for the "vs direct" columns:
//!
//! - a no-op upstream answering at once (at C = 1 and C = 16): the proxy's overhead laid
//!   bare, the worst case for any proxy;
//! - an I/O-bound upstream answering 1 ms after each request arrives, as a service
//!   waiting on a database would (at C = 16 and C = 64, with half the requests per run,
//!   at least 2000, and 5 runs instead of 3: the p99 of these runs moves the most from
//!   one to the next; the 1 ms is kept by a thread of its own with the OS's
//!   high-resolution timer, not by tokio's millisecond wheel, whose ticks would release
//!   every answer in flight at once, see `DelayLine`): the
//!   realistic case, where the hop's cost is set against the service time.
//!
//! Every response must be a 200 from an upstream with the upstream's body: a 429, a 502,
//! a fallback (marked `x-seawall-fallback`) or any other status fails the bench. After
//! each scenario each gateway's status must show no rate-limited request and no fallback,
//! and each of the three instances must have served calls.
//!
//! ## CPU per request
//!
//! For each proxied row, `proxy CPU/req` is the CPU time the proxy spent during the
//! timed run (its connection setup included) divided by the requests sent; `upstream
//! CPU/req` is the same for the upstreams' thread, on every row. Both are read from the
//! first field of `/proc/…/schedstat` (nanoseconds on CPU) before and after the run: for
//! the gateway and the `hyper proxy`, summed over the threads of their runtime (whose ids
//! are recorded as the threads start; the runtime also hosts the idle gateways and proxy
//! of the other configurations, which cost next to nothing); for nginx, over its master
//! and worker processes. Without `/proc` they read `n/a`. On a CPU-bound machine this is
//! what decides throughput: a proxy that needs X µs of CPU per request cannot pass more
//! than (cores / X) requests a second, whatever its latency.
//!
//! ## Threads on a 2-core machine
//!
//! The three parties run on separate threads with separate runtimes, so that none can
//! starve another inside one scheduler and so the gateway is measured as it would be
//! deployed:
//!
//! - the load client: a current-thread runtime on its own thread (C connections as C
//!   tasks, each sending its requests back to back over an HTTP/1 keep-alive connection);
//! - the upstreams: a current-thread runtime on its own thread (a stand-in for another
//!   process; one thread serves all six instances of both scenarios, as one would under
//!   a 2-core budget);
//! - the gateway (and the `hyper proxy`): a multi-thread runtime with one worker per core
//!   the client and the upstreams leave it: all cores but one, at least one (1 on a
//!   2-core machine); nginx gets the same number of worker processes. A proxy deployed
//!   on a machine of its own would have every core; here the load client, the upstreams
//!   and the delay line keep most of a core busy, and a proxy with as many threads as the
//!   machine has cores has them wait behind those for the CPU: with 2 workers on 2 cores,
//!   nginx's and the gateway's p99 with the 1 ms upstream moved by hundreds of µs from
//!   one invocation to the next (`GATEWAY_BENCH_WORKERS=2` measures it).
//!
//! `direct` runs the same client thread against the same upstream thread, so the only
//! difference between configurations is the proxy in the middle. At C = 1 the machine is
//! mostly idle and the difference is the added latency of the hop. At C = 16 with the
//! no-op upstream the 2 cores are saturated and every configuration is CPU-bound: the
//! proxy must parse and write each request and response twice (as a server and as a
//! client), about as much work as the load client and the upstream together, so on 2
//! cores a proxied run cannot keep much more than half of the direct throughput; `hyper
//! proxy` shows that ceiling for any hyper-based proxy and `nginx` for a production C
//! proxy, and the gateway is best judged against them, and by its CPU per request.
//!
//! Configurations are interleaved (direct, proxies, gateways…, direct, proxies, …) and
//! repeated; the table gives the median over the runs of each statistic. Every run is
//! bounded in count (`GATEWAY_BENCH_REQUESTS`, default 20 000, half of it with the 1 ms
//! upstream) and in time (60 s). `GATEWAY_BENCH_WORKERS` sets the gateway runtime's
//! workers and nginx's worker processes (default: all cores but one, at least one). To
//! profile one case:
//! `GATEWAY_BENCH_ONLY` keeps only the configurations whose names contain one of its
//! comma-separated parts (`direct` always runs), e.g. `nginx,gw full`;
//! `GATEWAY_BENCH_SCENARIO` only the scenario whose title contains it (`no-op`, `1 ms`);
//! `GATEWAY_BENCH_C` only the concurrencies it lists (e.g. `16`).
//!
//! ## Allocations per request
//!
//! With `GATEWAY_BENCH_ALLOCS=1` a counting global allocator counts the allocations made
//! on the proxies' threads (those of the gateway runtime and of `spawn_threads`: the
//! load client's, the upstreams' and the delay line's threads are left out) and the
//! tables gain a `proxy allocs/req` column: the allocations the proxy in the middle made
//! per request. `direct` reads 0.0, which checks that nothing else is counted. Counting
//! costs an atomic add per allocation, so take the timings from a run without it. nginx,
//! another process, reads `n/a`.
//!
//! `cargo bench --features gateway --bench gateway`
#![allow(clippy::disallowed_types)] // std's Instant: real time against real servers
#![allow(unsafe_code)] // the counting allocator's `unsafe impl GlobalAlloc`

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::gateway::jwt::JwtVerifier;
use seawall::gateway::{
    Discovery, FALLBACK_HEADER, Gateway, GatewayConfig, GatewayHandle, GatewayThreads,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{ALLOCATIONS, COUNTING};

#[global_allocator]
static ALLOCATOR: counting_alloc::Counting = counting_alloc::Counting;

/// Allocations so far, when counting.
fn allocations() -> Option<u64> {
    COUNTING.load(Relaxed).then(|| ALLOCATIONS.load(Relaxed))
}

/// Runs of each configuration at each concurrency with the no-op upstream.
const RUNS: usize = 3;
/// Runs with the I/O-bound upstream, whose p99 moves the most from run to run on a shared
/// machine (its runs are short: 10 000 requests at C = 16 take about a second).
const SLOW_RUNS: usize = 5;
/// Requests sent before each timed run (connections opened, pools filled).
const WARMUP: usize = 500;
/// The bound on one run.
const RUN_BOUND: Duration = Duration::from_secs(60);
/// Concurrencies with the no-op upstream.
const CONCURRENCY: [usize; 2] = [1, 16];
/// Concurrencies with the I/O-bound upstream (C = 1 would take too long).
const SLOW_CONCURRENCY: [usize; 2] = [16, 64];
/// How long the I/O-bound upstream sleeps before answering.
const SERVICE_TIME: Duration = Duration::from_millis(1);
/// How long nginx may take to listen.
const NGINX_START_BOUND: Duration = Duration::from_secs(5);
const SECRET: &str = "a benchmark secret of enough bytes";
const UPSTREAM_BODY: &str = r#"{"ok":true,"items":[1,2,3],"message":"hello from upstream"}"#;

/// The gateway runtime's workers and nginx's worker processes (`GATEWAY_BENCH_WORKERS`,
/// default: the cores left once one is kept for the load client and the upstreams, at
/// least one).
fn workers() -> usize {
    std::env::var("GATEWAY_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1)
        })
}

/// Only the configurations whose names contain `GATEWAY_BENCH_ONLY` (comma-separated),
/// besides `direct` (for profiling one of them).
fn selected(target: Target) -> bool {
    match std::env::var("GATEWAY_BENCH_ONLY") {
        Ok(only) => {
            target == Target::Direct || only.split(',').any(|o| target.name().contains(o.trim()))
        }
        Err(_) => true,
    }
}

/// Only the scenarios whose titles contain `GATEWAY_BENCH_SCENARIO` (any case), if set:
/// `no-op` or `1 ms`.
fn scenario_selected(title: &str) -> bool {
    std::env::var("GATEWAY_BENCH_SCENARIO").map_or(true, |only| {
        title.to_lowercase().contains(&only.trim().to_lowercase())
    })
}

/// Only the concurrencies listed in `GATEWAY_BENCH_C` (comma-separated), if set (for
/// profiling one of them).
fn concurrency_selected(concurrency: usize) -> bool {
    std::env::var("GATEWAY_BENCH_C").map_or(true, |only| {
        only.split(',').any(|c| c.trim().parse() == Ok(concurrency))
    })
}

fn requests_per_run() -> usize {
    std::env::var("GATEWAY_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Precise service times. tokio's timer rounds every deadline up to its next millisecond
/// tick, so a 1 ms sleep lasts 1 to 2 ms, and the answers of all the requests in flight
/// leave together at each tick: the proxies then see bursts of 16 or 64 answers at once
/// and queue them, which measures the upstream's timer more than the hop. This thread
/// holds the deadlines and releases each at its own time, sleeping with the OS's
/// high-resolution timer (about 50 µs of slack on Linux).
struct DelayLine {
    due: std::sync::Mutex<Vec<(Instant, tokio::sync::oneshot::Sender<()>)>>,
    thread: std::thread::Thread,
}

fn delay_line() -> &'static DelayLine {
    static LINE: std::sync::OnceLock<DelayLine> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        let thread = std::thread::Builder::new()
            .name("delay-line".to_owned())
            .spawn(|| {
                counting_alloc::exclude_this_thread();
                let line = delay_line();
                loop {
                    let now = Instant::now();
                    let next = {
                        let mut due = line.due.lock().expect("delay line");
                        let mut i = 0;
                        while i < due.len() {
                            if due[i].0 <= now {
                                let _ = due.swap_remove(i).1.send(());
                            } else {
                                i += 1;
                            }
                        }
                        due.iter().map(|(at, _)| *at).min()
                    };
                    match next {
                        Some(at) => std::thread::park_timeout(at.saturating_duration_since(now)),
                        None => std::thread::park(),
                    }
                }
            })
            .expect("thread")
            .thread()
            .clone();
        DelayLine {
            due: std::sync::Mutex::new(Vec::new()),
            thread,
        }
    })
}

impl DelayLine {
    /// Resolves `after` from now.
    async fn wait(&self, after: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let at = Instant::now() + after;
        let earliest = {
            let mut due = self.due.lock().expect("delay line");
            let earliest = due.iter().all(|(d, _)| *d > at);
            due.push((at, tx));
            earliest
        };
        // Only a new earliest deadline needs the thread awake early.
        if earliest {
            self.thread.unpark();
        }
        let _ = rx.await;
    }
}

/// The upstream: a minimal hyper HTTP/1 server answering a small static JSON body, at once
/// or after `service_time` (kept by the [`DelayLine`]).
async fn upstream(listener: TcpListener, service_time: Option<Duration>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                if let Some(service_time) = service_time {
                    delay_line().wait(service_time).await;
                }
                let mut response =
                    Response::new(Full::new(Bytes::from_static(UPSTREAM_BODY.as_bytes())));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok::<_, Infallible>(response)
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// The baseline proxy: a hyper server forwarding every request to one upstream with the
/// pooled legacy client, as little else as possible (no header rewriting, no routing).
async fn hyper_proxy(listener: TcpListener, upstream: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    *req.uri_mut() = format!("http://{upstream}{path}")
                        .parse()
                        .expect("a valid uri");
                    let response = match client.request(req).await {
                        Ok(r) => r.map(BodyExt::boxed_unsync),
                        Err(_) => {
                            let mut r = Response::new(
                                Empty::new().map_err(|never| match never {}).boxed_unsync(),
                            );
                            *r.status_mut() = StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    Ok::<Response<ProxyBody>, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The calling thread's id (its entry under `/proc/self/task`), if `/proc` is there.
fn current_tid() -> Option<u32> {
    std::fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// The ids of this process's threads whose names start with `prefix`.
fn threads_named(prefix: &str) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with(prefix)
                .then(|| t.file_name().to_str()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Nanoseconds on CPU of one task: the first field of its `schedstat`.
fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whose CPU time a row reports.
#[derive(Clone)]
enum Cpu {
    /// Threads of this process, by id.
    Threads(Arc<Mutex<Vec<u32>>>),
    /// A process and its children (nginx's master and workers), by pid.
    Process(u32),
    /// Nothing to measure (`direct` has no proxy).
    None,
}

/// CPU time of each task of a [`Cpu`] at one moment, in ns, by task id.
type CpuSample = HashMap<u32, u64>;

impl Cpu {
    fn sample(&self) -> Option<CpuSample> {
        let tasks: Vec<(u32, String)> = match self {
            Self::Threads(tids) => tids
                .lock()
                .expect("thread ids")
                .iter()
                .map(|&tid| (tid, format!("/proc/self/task/{tid}/schedstat")))
                .collect(),
            Self::Process(pid) => {
                let children =
                    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
                std::iter::once(*pid)
                    .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
                    .map(|p| (p, format!("/proc/{p}/schedstat")))
                    .collect()
            }
            Self::None => return None,
        };
        let sample: CpuSample = tasks
            .into_iter()
            .filter_map(|(id, path)| Some((id, schedstat_ns(&path)?)))
            .collect();
        (!sample.is_empty()).then_some(sample)
    }

    /// CPU time spent between two samples, in µs: tasks that started in between count in
    /// full, tasks that ended in between are lost.
    fn spent_us(before: Option<CpuSample>, after: Option<CpuSample>) -> Option<f64> {
        let (before, after) = (before?, after?);
        let ns: u64 = after
            .iter()
            .map(|(id, &ns)| ns.saturating_sub(before.get(id).copied().unwrap_or(0)))
            .sum();
        Some(ns as f64 / 1e3)
    }
}

/// The `nginx` binary: on `PATH`, else Debian's `/usr/sbin/nginx`.
fn nginx_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nginx"))
        .chain(std::iter::once(PathBuf::from("/usr/sbin/nginx")))
        .find(|p| p.is_file())
}

/// A free port on 127.0.0.1 (bound, read, released for nginx to take).
fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// nginx's configuration: `workers` worker processes, everything it writes (pid, error
/// log, temporary files) inside `dir`, and one `server` per `(listen, upstream)` pair
/// forwarding over a keep-alive pool. `version` (`nginx -V`) tells which modules with a
/// temporary directory are built in.
fn nginx_config(
    dir: &Path,
    workers: usize,
    servers: &[(SocketAddr, SocketAddr)],
    version: &str,
) -> String {
    let dir = dir.display();
    let mut config = format!(
        "worker_processes {workers};
pid \"{dir}/nginx.pid\";
error_log \"{dir}/error.log\";
events {{ worker_connections 1024; }}
http {{
    access_log off;
    # A load connection sends all its requests over one connection (1000 by default).
    keepalive_requests 1000000;
    client_body_temp_path \"{dir}/client_body\";
    proxy_temp_path \"{dir}/proxy\";
"
    );
    for module in ["fastcgi", "uwsgi", "scgi"] {
        if !version.contains(&format!("--without-http_{module}_module")) {
            config.push_str(&format!("    {module}_temp_path \"{dir}/{module}\";\n"));
        }
    }
    for (i, (listen, upstream)) in servers.iter().enumerate() {
        config.push_str(&format!(
            "    upstream items{i} {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        # One listening socket per worker: with a shared one, one worker took every
        # connection of a run.
        listen {listen} reuseport;
        location / {{
            proxy_pass http://items{i};
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
"
        ));
    }
    config.push_str("}\n");
    config
}

/// nginx running as a child process for the bench; dropping it (a panic included) stops
/// it and removes its directory.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in a fresh directory with one `server` per upstream, and waits until
    /// all of them accept connections; returns it and their addresses, in the order of
    /// `upstreams`. On failure, says why (with nginx's error log).
    fn start(binary: &Path, upstreams: &[SocketAddr]) -> Result<(Self, Vec<SocketAddr>), String> {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "seawall-bench-nginx-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // Readable by the workers when nginx runs as root (they switch to `nobody`).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        }
        let version = Command::new(binary)
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        let mut servers = Vec::with_capacity(upstreams.len());
        for &upstream in upstreams {
            servers.push((
                free_port().map_err(|e| format!("a free port: {e}"))?,
                upstream,
            ));
        }
        let config = dir.join("nginx.conf");
        std::fs::write(&config, nginx_config(&dir, workers(), &servers, &version))
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let output = std::fs::File::create(dir.join("output.log"))
            .map_err(|e| format!("creating nginx's output file: {e}"))?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(output.try_clone().map_err(|e| e.to_string())?)
            .stderr(output)
            .spawn()
            .map_err(|e| format!("running {}: {e}", binary.display()))?;
        let mut nginx = Self { child, dir };
        let deadline = Instant::now() + NGINX_START_BOUND;
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                return Err(format!("nginx exited ({status})\n{}", nginx.logs()));
            }
            let listening = servers.iter().all(|(listen, _)| {
                std::net::TcpStream::connect_timeout(listen, Duration::from_millis(100)).is_ok()
            });
            if listening {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx not listening after {NGINX_START_BOUND:?}\n{}",
                    nginx.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((
            nginx,
            servers.into_iter().map(|(listen, _)| listen).collect(),
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What nginx wrote to its error log and its output.
    fn logs(&self) -> String {
        ["error.log", "output.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.pid();
        let workers =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        // SIGTERM: the master stops its workers and exits (std can only send SIGKILL, which
        // would leave the workers running).
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(Some(_)) => break,
                _ => {
                    let _ = Command::new("sh")
                        .args(["-c", &format!("kill -KILL {workers}")])
                        .status();
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    HyperProxy,
    Nginx,
    GwRouting,
    GwFull,
    GwJwt,
    GwThreads,
}

impl Target {
    const ALL: [Self; 7] = [
        Self::Direct,
        Self::HyperProxy,
        Self::Nginx,
        Self::GwRouting,
        Self::GwFull,
        Self::GwJwt,
        Self::GwThreads,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::HyperProxy => "hyper proxy",
            Self::Nginx => "nginx",
            Self::GwRouting => "gw routing",
            Self::GwFull => "gw full",
            Self::GwJwt => "gw full+jwt",
            Self::GwThreads => "gw full, threads",
        }
    }
}

fn gateway_config(instances: &[SocketAddr], full: bool, jwt: bool) -> String {
    let instances = instances
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut config = String::from("[gateway]\nlisten = \"127.0.0.1:0\"\n");
    if jwt {
        config.push_str(&format!(
            "\n[auth.jwt]\nsecret = \"{SECRET}\"\nissuer = \"bench\"\n"
        ));
    }
    config.push_str(&format!(
        "
[[routes]]
name = \"api\"
path_prefix = \"/api\"
service = \"items\"
strip_prefix = true
auth = {jwt}
"
    ));
    if full {
        config.push_str(
            "timeout = \"2s\"

[routes.rate_limit]
global = { per_second = 10000000, burst = 10000000 }
per_client = { per_second = 10000000, burst = 10000000, key = \"ip\" }

[routes.breaker]
failure_rate = 0.5
window = 100
minimum_calls = 20
wait_in_open = \"5s\"
permitted_in_half_open = 2

[routes.fallback]
status = 200
body = '{\"items\":[]}'
content_type = \"application/json\"

[routes.balance]
strategy = \"least-requests\"
outlier = { consecutive_failures = 5, base_ejection = \"30s\", max_ejected = 0.5 }
",
        );
    }
    config.push_str(&format!(
        "
[[services]]
name = \"items\"
instances = [{instances}]
"
    ));
    config
}

fn start_gateway(rt: &Runtime, instances: &[SocketAddr], full: bool, jwt: bool) -> GatewayHandle {
    rt.block_on(async {
        let config =
            GatewayConfig::from_toml_str(&gateway_config(instances, full, jwt)).expect("toml");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Gateway::build(config, Discovery::Static)
            .await
            .expect("gateway")
            .spawn(listener)
    })
}

/// One upstream behaviour with everything that fronts it: three instances, a `hyper
/// proxy` and nginx (both forwarding to the first instance) and the three gateways
/// (balancing over all three).
struct Scenario {
    title: &'static str,
    concurrency: &'static [usize],
    requests: usize,
    runs: usize,
    instances: Vec<SocketAddr>,
    proxy: SocketAddr,
    nginx: Option<SocketAddr>,
    /// `gw routing`, `gw full`, `gw full+jwt`.
    gateways: [GatewayHandle; 3],
    /// `gw full, threads`: `gw full` served by `Gateway::spawn_threads`.
    threads: GatewayThreads,
}

impl Scenario {
    fn start(
        rt: &Runtime,
        title: &'static str,
        concurrency: &'static [usize],
        (requests, runs): (usize, usize),
        instances: Vec<SocketAddr>,
        nginx: Option<SocketAddr>,
    ) -> Self {
        let proxy = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(hyper_proxy(listener, instances[0]));
            addr
        });
        let gateways = [
            start_gateway(rt, &instances, false, false),
            start_gateway(rt, &instances, true, false),
            start_gateway(rt, &instances, true, true),
        ];
        let threads = rt.block_on(async {
            let config = GatewayConfig::from_toml_str(&gateway_config(&instances, true, false))
                .expect("toml");
            Gateway::build(config, Discovery::Static)
                .await
                .expect("gateway")
                .spawn_threads(
                    "127.0.0.1:0".parse().expect("addr"),
                    workers().try_into().expect("at least one worker"),
                )
                .expect("gateway threads")
        });
        Self {
            title,
            concurrency,
            requests,
            runs,
            instances,
            proxy,
            nginx,
            gateways,
            threads,
        }
    }

    /// Where the load client sends `target`'s requests, if it runs in this scenario.
    fn address(&self, target: Target) -> Option<SocketAddr> {
        match target {
            Target::Direct => Some(self.instances[0]),
            Target::HyperProxy => Some(self.proxy),
            Target::Nginx => self.nginx,
            Target::GwRouting => Some(self.gateways[0].local_addr()),
            Target::GwFull => Some(self.gateways[1].local_addr()),
            Target::GwJwt => Some(self.gateways[2].local_addr()),
            Target::GwThreads => Some(self.threads.local_addr()),
        }
    }

    /// Each selected gateway served every request from an upstream, spread over all three.
    fn check_status(&self) {
        for (gateway, target) in self
            .gateways
            .iter()
            .map(GatewayHandle::gateway)
            .chain([self.threads.gateway()])
            .zip([
                Target::GwRouting,
                Target::GwFull,
                Target::GwJwt,
                Target::GwThreads,
            ])
        {
            if !selected(target) {
                continue;
            }
            let status = gateway.status();
            let route = &status.routes[0];
            assert_eq!(route.rate_limited, 0, "a request was rate limited");
            assert_eq!(route.fallbacks, 0, "a fallback was served");
            assert_eq!(route.unauthorized, 0, "a request was refused");
            assert_eq!(route.endpoints.len(), 3);
            for e in &route.endpoints {
                assert!(e.calls > 0, "balancing: {} served nothing", e.address);
                assert!(!e.ejected, "{} ejected", e.address);
            }
        }
    }
}

/// One run's numbers.
#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    /// The proxy's CPU time per request (µs), when measured.
    proxy_cpu: Option<f64>,
    /// The upstreams' thread's CPU time per request (µs), when measured.
    upstream_cpu: Option<f64>,
    /// The proxy's allocations per request, when counted.
    allocs: Option<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

/// Sends `count` requests over `concurrency` keep-alive connections to `addr`, each
/// connection sending back to back; every answer must be a 200 from an upstream.
async fn load(
    addr: SocketAddr,
    path: &'static str,
    auth: Option<Arc<str>>,
    concurrency: usize,
    count: usize,
) -> Run {
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (next, auth) = (next.clone(), auth.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count / concurrency + 1);
                while next.fetch_add(1, Relaxed) < count {
                    let mut req = Request::get(path).header(http::header::HOST, "bench");
                    if let Some(token) = &auth {
                        req = req.header(http::header::AUTHORIZATION, &**token);
                    }
                    let req = req.body(Empty::new()).expect("request");
                    let t = Instant::now();
                    sender.ready().await.expect("connection ready");
                    let response = sender.send_request(req).await.expect("a response");
                    let (parts, body) = response.into_parts();
                    let body = body.collect().await.expect("a body").to_bytes();
                    latencies.push(t.elapsed());
                    assert_eq!(
                        parts.status,
                        StatusCode::OK,
                        "{}",
                        String::from_utf8_lossy(&body)
                    );
                    assert!(
                        !parts.headers.contains_key(&FALLBACK_HEADER),
                        "a fallback answer during the measurement"
                    );
                    assert_eq!(&body[..], UPSTREAM_BODY.as_bytes());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    let elapsed = start.elapsed();
    assert_eq!(all.len(), count);
    all.sort_unstable();
    Run {
        rps: count as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p90: percentile(&all, 0.9),
        p99: percentile(&all, 0.99),
        p999: percentile(&all, 0.999),
        proxy_cpu: None,
        upstream_cpu: None,
        allocs: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Starts one upstream instance per entry of `service_times` on a thread of their own,
/// driving a current-thread runtime until the program ends (the thread is detached);
/// returns their addresses and the thread's id.
fn spawn_upstreams(service_times: &[Option<Duration>]) -> (Vec<SocketAddr>, Option<u32>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let service_times = service_times.to_vec();
    let n = service_times.len();
    std::thread::Builder::new()
        .name("upstreams".to_owned())
        .spawn(move || {
            counting_alloc::exclude_this_thread();
            tid_tx.send(current_tid()).expect("main");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut servers = tokio::task::JoinSet::new();
                for service_time in service_times {
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    tx.send(listener.local_addr().expect("addr")).expect("main");
                    servers.spawn(upstream(listener, service_time));
                }
                while servers.join_next().await.is_some() {}
            });
        })
        .expect("thread");
    let tid = tid_rx.recv().expect("the upstreams' thread id");
    (
        (0..n).map(|_| rx.recv().expect("an upstream")).collect(),
        tid,
    )
}

/// A CPU-per-request cell.
fn cpu_cell(us: Option<f64>) -> String {
    us.map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1}"))
}

fn main() {
    if std::env::var_os("GATEWAY_BENCH_ALLOCS").is_some_and(|v| v == "1") {
        COUNTING.store(true, Relaxed);
    }
    // The load client runs on this thread.
    counting_alloc::exclude_this_thread();
    let count = requests_per_run();
    let slow_count = (count / 2).max(2000.min(count));
    // Upstreams: their own thread and current-thread runtime; three no-op instances, then
    // three answering after SERVICE_TIME.
    let (all_instances, upstream_tid) = spawn_upstreams(&[
        None,
        None,
        None,
        Some(SERVICE_TIME),
        Some(SERVICE_TIME),
        Some(SERVICE_TIME),
    ]);
    let (fast, slow) = all_instances.split_at(3);
    let upstream_cpu = upstream_tid.map_or(Cpu::None, |tid| {
        Cpu::Threads(Arc::new(Mutex::new(vec![tid])))
    });

    // The gateways and the baseline proxies: a multi-thread runtime whose threads' ids are
    // kept for their CPU time.
    let server_tids = Arc::new(Mutex::new(Vec::new()));
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .enable_all()
        .on_thread_start({
            let tids = server_tids.clone();
            move || {
                if let Some(tid) = current_tid() {
                    tids.lock().expect("thread ids").push(tid);
                }
            }
        })
        .on_thread_stop({
            let tids = server_tids.clone();
            move || {
                if let Some(tid) = current_tid() {
                    tids.lock().expect("thread ids").retain(|&t| t != tid);
                }
            }
        })
        .build()
        .expect("runtime");
    let server_cpu = Cpu::Threads(server_tids);

    // nginx, if there is one: one server per scenario, each forwarding to the instance the
    // `hyper proxy` forwards to. Stopped when `nginx` drops, on a panic too.
    let mut nginx = None;
    let mut nginx_addrs = None;
    if selected(Target::Nginx) {
        match nginx_binary() {
            None => println!(
                "nginx: not found on PATH or at /usr/sbin/nginx, its rows are skipped \
                 (install it with `apt-get install -y nginx-light`)"
            ),
            Some(binary) => match Nginx::start(&binary, &[fast[0], slow[0]]) {
                Ok((n, addrs)) => {
                    nginx = Some(n);
                    nginx_addrs = Some(addrs);
                }
                Err(e) => println!(
                    "nginx ({}) failed to start, its rows are skipped: {e}",
                    binary.display()
                ),
            },
        }
    }
    let nginx_cpu = nginx.as_ref().map_or(Cpu::None, |n| Cpu::Process(n.pid()));

    let scenarios = [
        Scenario::start(
            &server_rt,
            "No-op upstream (answers at once)",
            &CONCURRENCY,
            (count, RUNS),
            fast.to_vec(),
            nginx_addrs.as_ref().map(|a| a[0]),
        ),
        Scenario::start(
            &server_rt,
            "Upstream service time 1 ms (answers 1 ms after each request arrives, as a \
             service waiting on a database would)",
            &SLOW_CONCURRENCY,
            (slow_count, SLOW_RUNS),
            slow.to_vec(),
            nginx_addrs.as_ref().map(|a| a[1]),
        ),
    ];
    // The threads of `Gateway::spawn_threads`, found by their names.
    let threads_cpu = Cpu::Threads(Arc::new(Mutex::new(threads_named("seawall-gw-"))));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token: Arc<str> = format!(
        "Bearer {}",
        JwtVerifier::new(SECRET.as_bytes()).sign(&serde_json::json!({
            "sub": "bench", "iss": "bench", "exp": now + 3600
        }))
    )
    .into();

    // The load client: a current-thread runtime on the main thread.
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let run = |addr: SocketAddr, target: Target, concurrency: usize, n: usize| -> Run {
        let (path, auth) = match target {
            Target::Direct | Target::HyperProxy | Target::Nginx => ("/items/1", None),
            Target::GwRouting | Target::GwFull | Target::GwThreads => ("/api/items/1", None),
            Target::GwJwt => ("/api/items/1", Some(token.clone())),
        };
        let proxy_cpu = match target {
            Target::Direct => &Cpu::None,
            Target::Nginx => &nginx_cpu,
            Target::GwThreads => &threads_cpu,
            _ => &server_cpu,
        };
        let before = (proxy_cpu.sample(), upstream_cpu.sample(), allocations());
        let run = client_rt.block_on(async {
            tokio::time::timeout(RUN_BOUND, load(addr, path, auth, concurrency, n))
                .await
                .expect("a run took longer than its bound")
        });
        let after = (proxy_cpu.sample(), upstream_cpu.sample(), allocations());
        Run {
            proxy_cpu: Cpu::spent_us(before.0, after.0).map(|us| us / n as f64),
            upstream_cpu: Cpu::spent_us(before.1, after.1).map(|us| us / n as f64),
            allocs: before
                .2
                .zip(after.2)
                .map(|(b, a)| (a - b) as f64 / n as f64),
            ..run
        }
    };

    for scenario in scenarios.iter().filter(|s| scenario_selected(s.title)) {
        println!();
        println!("### {}", scenario.title);
        println!();
        println!(
            "{} requests a run, {} runs interleaved per configuration and concurrency; \
             medians of runs (µs); gateway runtime: {} workers, nginx: {} worker processes",
            scenario.requests,
            scenario.runs,
            workers(),
            workers()
        );
        println!();
        println!(
            "| configuration | C | req/s | p50 | p90 | p99 | p99.9 | req/s vs direct | \
             p99 − direct | proxy CPU/req | upstream CPU/req | proxy allocs/req |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for &concurrency in scenario
            .concurrency
            .iter()
            .filter(|&&c| concurrency_selected(c))
        {
            let mut results: Vec<Vec<Run>> = vec![Vec::new(); Target::ALL.len()];
            for round in 0..scenario.runs {
                for (i, &target) in Target::ALL.iter().enumerate() {
                    let Some(addr) = scenario.address(target).filter(|_| selected(target)) else {
                        continue;
                    };
                    run(addr, target, concurrency, WARMUP);
                    let r = run(addr, target, concurrency, scenario.requests);
                    eprintln!(
                        "  run {round}: {:<12} C={concurrency:<3} {:>8.0} req/s  p50 {:>6.1}  \
                         p99 {:>7.1}  p99.9 {:>7.1} µs  CPU/req proxy {} upstream {} µs  \
                         allocs/req (proxy) {}",
                        target.name(),
                        r.rps,
                        r.p50,
                        r.p99,
                        r.p999,
                        cpu_cell(r.proxy_cpu),
                        cpu_cell(r.upstream_cpu),
                        cpu_cell(r.allocs),
                    );
                    results[i].push(r);
                }
            }
            let stat = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
            let cpu = |runs: &[Run], f: fn(&Run) -> Option<f64>| {
                runs.iter().map(f).collect::<Option<Vec<f64>>>().map(median)
            };
            let direct_rps = stat(&results[0], |r| r.rps);
            let direct_p99 = stat(&results[0], |r| r.p99);
            for (i, &target) in Target::ALL.iter().enumerate() {
                let runs = &results[i];
                if runs.is_empty() {
                    continue;
                }
                let (rps, p99) = (stat(runs, |r| r.rps), stat(runs, |r| r.p99));
                let allocs = match target {
                    Target::Nginx => None,
                    _ => cpu(runs, |r| r.allocs),
                };
                let (ratio, diff, proxy_cpu) = if target == Target::Direct {
                    ("–".to_owned(), "–".to_owned(), "–".to_owned())
                } else {
                    (
                        format!("{:.0}%", rps * 100.0 / direct_rps),
                        format!("{:+.0} µs", p99 - direct_p99),
                        cpu_cell(cpu(runs, |r| r.proxy_cpu)),
                    )
                };
                let allocs = cpu_cell(allocs);
                println!(
                    "| {} | {concurrency} | {rps:.0} | {:.0} | {:.0} | {p99:.0} | {:.0} | {ratio} \
                     | {diff} | {proxy_cpu} | {} | {allocs} |",
                    target.name(),
                    stat(runs, |r| r.p50),
                    stat(runs, |r| r.p90),
                    stat(runs, |r| r.p999),
                    cpu_cell(cpu(runs, |r| r.upstream_cpu)),
                );
            }
        }
        scenario.check_status();
    }
    drop(nginx);
    server_rt.block_on(async {
        for scenario in scenarios {
            for handle in scenario.gateways {
                handle.shutdown().await;
            }
            scenario.threads.shutdown();
        }
    });
}
