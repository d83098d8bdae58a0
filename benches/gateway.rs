//! Gateway overhead on loopback: throughput and latency percentiles of a load client
//! talking to an upstream directly, against the same client going through the gateway.
//! Not a criterion bench: what matters is the latency distribution of real HTTP round
//! trips, so each run sends a fixed number of requests and prints p50 / p90 / p99 /
//! p99.9.
//!
//! Configurations, all on 127.0.0.1:
//!
//! - `direct`: the load client → one upstream (a minimal hyper server answering a small
//!   static JSON body);
//! - `hyper proxy`: a minimal hand-written hyper proxy (server + pooled legacy client,
//!   forwarding to one upstream): the cost of one more HTTP hop itself, whoever makes it;
//! - `gw routing`: the gateway with one route, prefix routing with `strip_prefix`,
//!   balancing (least requests) over three upstream instances, no limits or breaker;
//! - `gw full`: the same plus a global and a per-client (IP) rate limit set far above
//!   what the run can send, an endpoint breaker, outlier detection, a timeout and a
//!   fallback;
//! - `gw full+jwt`: `gw full` with `auth = true` (HS256, a valid token on every request).
//!
//! Every response must be a 200 from an upstream: a 429, a fallback (marked
//! `x-seawall-fallback`) or any other status fails the bench. After each gateway run the
//! gateway's status must show no rate-limited request and no fallback, and each of the
//! three instances must have served calls.
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
//!   process; one thread serves all three instances, as one would under a 2-core budget);
//! - the gateway (and the `hyper proxy`): a multi-thread runtime with 2 workers, as
//!   `#[tokio::main]` would give it on this machine.
//!
//! `direct` runs the same client thread against the same upstream thread, so the only
//! difference between configurations is the proxy in the middle. At C = 1 the machine is
//! mostly idle and the difference is the added latency of the hop. At C = 16 the 2 cores
//! are saturated and every configuration is CPU-bound: the proxy must parse and write
//! each request and response twice (as a server and as a client), about as much work as
//! the load client and the upstream together, so on 2 cores a proxied run cannot keep much
//! more than half of the direct throughput; `hyper proxy` shows that ceiling for any
//! hyper-based proxy, and the gateway is best judged against it.
//!
//! Configurations are interleaved (direct, proxy, gateway…, direct, proxy, …) and
//! repeated; the table gives the median over the runs of each statistic. Every run is
//! bounded in count (`GATEWAY_BENCH_REQUESTS`, default 20 000) and in time (60 s).
//!
//! `cargo bench --features gateway --bench gateway`
#![allow(clippy::disallowed_types)] // std's Instant: real time against real servers

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
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
use seawall::gateway::{Discovery, FALLBACK_HEADER, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::{TcpListener, TcpStream};

/// Runs of each configuration at each concurrency.
const RUNS: usize = 3;
/// Requests sent before each timed run (connections opened, pools filled).
const WARMUP: usize = 500;
/// The bound on one run.
const RUN_BOUND: Duration = Duration::from_secs(60);
const CONCURRENCY: [usize; 2] = [1, 16];
const SECRET: &str = "a benchmark secret of enough bytes";
const UPSTREAM_BODY: &str = r#"{"ok":true,"items":[1,2,3],"message":"hello from upstream"}"#;

/// The gateway runtime's workers (`GATEWAY_BENCH_WORKERS`, default 2).
fn workers() -> usize {
    std::env::var("GATEWAY_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
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

fn requests_per_run() -> usize {
    std::env::var("GATEWAY_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// The upstream: a minimal hyper HTTP/1 server answering a small static JSON body.
async fn upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    HyperProxy,
    GwRouting,
    GwFull,
    GwJwt,
}

impl Target {
    const ALL: [Self; 5] = [
        Self::Direct,
        Self::HyperProxy,
        Self::GwRouting,
        Self::GwFull,
        Self::GwJwt,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::HyperProxy => "hyper proxy",
            Self::GwRouting => "gw routing",
            Self::GwFull => "gw full",
            Self::GwJwt => "gw full+jwt",
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
failure_rate = 50
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
outlier = { consecutive_failures = 5, base_ejection = \"30s\", max_ejected_percent = 50 }
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

/// One run's numbers.
#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
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

/// Starts `n` upstream instances on a thread of their own, driving a current-thread
/// runtime until the program ends (the thread is detached); returns their addresses.
fn spawn_upstreams(n: usize) -> Vec<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("upstreams".to_owned())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut servers = tokio::task::JoinSet::new();
                for _ in 0..n {
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    tx.send(listener.local_addr().expect("addr")).expect("main");
                    servers.spawn(upstream(listener));
                }
                while servers.join_next().await.is_some() {}
            });
        })
        .expect("thread");
    (0..n).map(|_| rx.recv().expect("an upstream")).collect()
}

fn main() {
    let count = requests_per_run();
    // Upstreams: their own thread and current-thread runtime.
    let instances = spawn_upstreams(3);

    // The gateway and the baseline proxy: a 2-worker runtime.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .enable_all()
        .build()
        .expect("runtime");
    let proxy_addr = server_rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(hyper_proxy(listener, instances[0]));
        addr
    });
    let gateway = |full: bool, jwt: bool| -> GatewayHandle {
        server_rt.block_on(async {
            let config =
                GatewayConfig::from_toml_str(&gateway_config(&instances, full, jwt)).expect("toml");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            Gateway::build(config, Discovery::Static)
                .await
                .expect("gateway")
                .spawn(listener)
        })
    };
    let gw_routing = gateway(false, false);
    let gw_full = gateway(true, false);
    let gw_jwt = gateway(true, true);
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
    let run = |target: Target, concurrency: usize, n: usize| -> Run {
        let (addr, path, auth) = match target {
            Target::Direct => (instances[0], "/items/1", None),
            Target::HyperProxy => (proxy_addr, "/items/1", None),
            Target::GwRouting => (gw_routing.local_addr(), "/api/items/1", None),
            Target::GwFull => (gw_full.local_addr(), "/api/items/1", None),
            Target::GwJwt => (gw_jwt.local_addr(), "/api/items/1", Some(token.clone())),
        };
        client_rt.block_on(async {
            tokio::time::timeout(RUN_BOUND, load(addr, path, auth, concurrency, n))
                .await
                .expect("a run took longer than its bound")
        })
    };
    let check_status = |handle: &GatewayHandle| {
        let status = handle.gateway().status();
        let route = &status.routes[0];
        assert_eq!(route.rate_limited, 0, "a request was rate limited");
        assert_eq!(route.fallbacks, 0, "a fallback was served");
        assert_eq!(route.unauthorized, 0, "a request was refused");
        assert_eq!(route.endpoints.len(), 3);
        for e in &route.endpoints {
            assert!(e.calls > 0, "balancing: {} served nothing", e.address);
            assert!(!e.ejected, "{} ejected", e.address);
        }
    };

    println!(
        "{count} requests a run, {RUNS} runs interleaved per configuration and concurrency; \
         medians of runs (µs); gateway runtime: {} workers",
        workers()
    );
    println!();
    println!(
        "| configuration | C | req/s | p50 | p90 | p99 | p99.9 | req/s vs direct | p99 − direct |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for concurrency in CONCURRENCY {
        let mut results: Vec<Vec<Run>> = vec![Vec::new(); Target::ALL.len()];
        for round in 0..RUNS {
            for (i, &target) in Target::ALL.iter().enumerate() {
                if !selected(target) {
                    continue;
                }
                run(target, concurrency, WARMUP);
                let r = run(target, concurrency, count);
                eprintln!(
                    "  run {round}: {:<12} C={concurrency:<3} {:>8.0} req/s  p50 {:>6.1}  \
                     p99 {:>7.1}  p99.9 {:>7.1} µs",
                    target.name(),
                    r.rps,
                    r.p50,
                    r.p99,
                    r.p999
                );
                results[i].push(r);
            }
        }
        let stat = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let direct_rps = stat(&results[0], |r| r.rps);
        let direct_p99 = stat(&results[0], |r| r.p99);
        for (i, &target) in Target::ALL.iter().enumerate() {
            let runs = &results[i];
            if runs.is_empty() {
                continue;
            }
            let (rps, p99) = (stat(runs, |r| r.rps), stat(runs, |r| r.p99));
            let (ratio, diff) = if target == Target::Direct {
                ("–".to_owned(), "–".to_owned())
            } else {
                (
                    format!("{:.0}%", rps * 100.0 / direct_rps),
                    format!("{:+.0} µs", p99 - direct_p99),
                )
            };
            println!(
                "| {} | {concurrency} | {rps:.0} | {:.0} | {:.0} | {p99:.0} | {:.0} | {ratio} | {diff} |",
                target.name(),
                stat(runs, |r| r.p50),
                stat(runs, |r| r.p90),
                stat(runs, |r| r.p999),
            );
        }
    }
    for (handle, target) in [
        (&gw_routing, Target::GwRouting),
        (&gw_full, Target::GwFull),
        (&gw_jwt, Target::GwJwt),
    ] {
        if selected(target) {
            check_status(handle);
        }
    }
    server_rt.block_on(async {
        for handle in [gw_routing, gw_full, gw_jwt] {
            handle.shutdown().await;
        }
    });
}
