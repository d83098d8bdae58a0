//! Redis-backed limiter on loopback: checks per second and latency percentiles, one
//! caller at a time and 16 concurrent callers, against a `redis-server` this program
//! starts on a free port (and stops). Not a criterion bench: what matters here is the
//! latency distribution of a network round trip, so it prints p50 / p99 / p99.9 from one
//! timed run of a fixed number of checks.
//!
//! Then a capacity sweep: open-loop offered load (a pacer thread issues checks at a fixed
//! rate whatever earlier checks are doing, so queueing shows in latency) rising
//! a quarter at a time over 1, 4 and 8 limiters (the connections of as many replicas) and
//! 10 000 keys, until p99 reaches 1 ms; the same with `batch(16)` over 100 and 10 000 keys;
//! and against a Redis Cluster of 3 masters. Each step prints the redis-server CPU (from
//! `INFO`) and this process's, since client and servers share the machine's cores.
//!
//! After `1 caller`, the same checks through the generic tower layer and (with the `http`
//! feature) the HTTP layer, over the limiter per key.
//!
//! `cargo bench --features redis --bench redis_limit` (steps of 0.6 s; CI runs it
//! unoptimised, for its checks, not its figures);
//! `REDIS_BENCH_LONG=1 cargo bench --features redis --bench redis_limit` (steps of 3 s).
#![allow(clippy::disallowed_types)] // std's Instant: real time against a real server

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use seawall::rate_limit::redis::{RedisRateLimiter, Source};
use seawall::rate_limit::{Quota, Rate};

const CHECKS: usize = 20_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    println!(
        "{name:<28} {:>9.0} checks/s   p50 {:>7.1} µs   p99 {:>7.1} µs   p99.9 {:>7.1} µs",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        percentile(&latencies, 0.999).as_secs_f64() * 1e6,
    );
}

/// Four replicas (separate limiters, as separate processes would hold) drive one key of
/// 2 000/s with a burst of 200 as hard as they can, four callers each, for two seconds.
/// Prints what the fleet admitted against what the quota allows over that time
/// (burst + rate × elapsed), the checks made, and the commands Redis processed (the
/// round trips: refusals are answered locally until Redis's `retry_after` runs out). Batched tokens are counted when
/// Redis grants them, so the fleet can never admit more than the quota; what batching
/// costs is tokens a replica took but did not use before the run ended (at most
/// `batch - 1` per replica and key) and a less even share between replicas.
async fn fleet(port: u16, batch: u32) {
    const REPLICAS: usize = 4;
    const CALLERS: usize = 4;
    const RUN: Duration = Duration::from_secs(2);
    let (rate, burst) = (2_000u32, 200u32);
    let replicas: Vec<Arc<RedisRateLimiter>> = (0..REPLICAS)
        .map(|_| {
            let mut b = RedisRateLimiter::builder(
                format!("redis://127.0.0.1:{port}/"),
                Quota::new(Rate::per_second(rate), burst).expect("quota"),
            )
            .prefix(format!("fleet-{batch}"))
            .timeout(Duration::from_secs(1));
            if batch > 1 {
                b = b.batch(batch, Duration::from_secs(1));
            }
            Arc::new(b.build().expect("limiter"))
        })
        .collect();
    let mut conn = connect(port).await;
    let (_, scripts_before) = server_counters(std::slice::from_mut(&mut conn)).await;
    let server_start = server_time(&mut conn).await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..REPLICAS * CALLERS)
        .map(|i| {
            let limiter = replicas[i % REPLICAS].clone();
            tokio::spawn(async move {
                let (mut admitted, mut checks) = (0u64, 0u64);
                while start.elapsed() < RUN {
                    checks += 1;
                    if limiter.acquire("fleet", 1).await.is_ok() {
                        admitted += 1;
                    }
                }
                (i % REPLICAS, admitted, checks)
            })
        })
        .collect();
    let mut per_replica = [0u64; REPLICAS];
    let mut checks = 0;
    for t in tasks {
        let (replica, admitted, n) = t.await.expect("task");
        per_replica[replica] += admitted;
        checks += n;
    }
    let elapsed = start.elapsed();
    let server_elapsed = server_time(&mut conn)
        .await
        .checked_sub(server_start)
        .unwrap_or_default();
    let (_, scripts_after) = server_counters(std::slice::from_mut(&mut conn)).await;
    let round_trips = scripts_after - scripts_before;
    let allowed = f64::from(burst) + f64::from(rate) * elapsed.as_secs_f64();
    let server_allowed = f64::from(burst) + f64::from(rate) * server_elapsed.as_secs_f64();
    let admitted: u64 = per_replica.iter().sum();
    println!(
        "fleet of {REPLICAS}, batch({batch}): admitted {admitted} of {allowed:.0} allowed ({:.1}%; \
         {server_allowed:.0} by the server's clock), {checks} checks, {round_trips} Redis \
         round trips, per replica {per_replica:?}",
        admitted as f64 * 100.0 / allowed
    );
    assert!(
        admitted as f64 <= server_allowed + 1.0,
        "the fleet admitted {admitted}, more than the quota allows over the run by the \
         server's clock ({server_allowed:.0}; {allowed:.0} by this process' clock)"
    );
}

/// How long each offered rate of the capacity sweep runs, and how many times the last
/// passing and first failing rates are bisected: `REDIS_BENCH_LONG=1` for the long form.
struct SweepMode {
    step: Duration,
    refinements: usize,
}

impl SweepMode {
    fn from_env() -> Self {
        if std::env::var_os("REDIS_BENCH_LONG").is_some_and(|v| v != "0") {
            SweepMode {
                step: Duration::from_secs(3),
                refinements: 3,
            }
        } else {
            SweepMode {
                step: Duration::from_millis(600),
                refinements: 1,
            }
        }
    }
}

/// The p99 the capacity is defined by.
const P99_TARGET: Duration = Duration::from_millis(1);

/// One offered rate held for one step, as measured.
struct Step {
    offered: f64,
    completed: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    /// Checks that did not get an answer from Redis or a batch (timeouts, errors).
    failed: u64,
    /// Script runs in Redis per check (1 without batching).
    round_trips_per_check: f64,
    /// redis-server's CPU (user + system) over the step, in cores.
    server_cpu: f64,
    /// This process's CPU (the pacer and the limiters) over the step, in cores.
    client_cpu: f64,
}

impl Step {
    fn passes(&self) -> bool {
        self.p99 < P99_TARGET && self.failed == 0 && self.completed >= self.offered * 0.97
    }
}

/// This process's CPU time (user + system, all threads), from `/proc/self/stat`.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and stime are
    // fields 14 and 15 of the line, 12th and 13th after the `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The server's clock (`TIME`), by which the limiter's script keeps the quota. It need
/// not run with this process' clock: a step or slew on the server's side moves it alone.
async fn server_time(conn: &mut redis::aio::MultiplexedConnection) -> Duration {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// Counters of the servers a sweep runs against, summed: CPU seconds and script runs.
async fn server_counters(conns: &mut [redis::aio::MultiplexedConnection]) -> (f64, u64) {
    let (mut cpu, mut commands) = (0.0, 0);
    for conn in conns {
        let info: String = redis::cmd("INFO")
            .arg("everything")
            .query_async(conn)
            .await
            .expect("INFO");
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or("0")
                .to_owned()
        };
        cpu += field("used_cpu_user").parse::<f64>().unwrap_or(0.0)
            + field("used_cpu_sys").parse::<f64>().unwrap_or(0.0);
        // Script runs, the round trips: `total_commands_processed` also counts the
        // commands the script makes.
        for name in ["cmdstat_evalsha", "cmdstat_eval"] {
            commands += info
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(":calls="))
                .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (cpu, commands)
}

/// Offers `rate` checks per second for `duration`, open loop: a pacer thread issues each
/// check at its scheduled time (start + i / rate) whatever the earlier ones are doing, over
/// `limiters` in turn and `keys` keys in turn, and each check's latency is counted from
/// the moment the pacer issues it: checks issued while earlier ones are still queued (in
/// the runtime, the connection or Redis) wait behind them, and that shows as latency.
async fn offer(
    limiters: &Arc<Vec<RedisRateLimiter>>,
    keys: usize,
    servers: &mut [redis::aio::MultiplexedConnection],
    rate: f64,
    duration: Duration,
) -> Step {
    let total = (rate * duration.as_secs_f64()).round() as usize;
    // Keys no earlier step used: no batch is left over from one.
    static STEP: AtomicU64 = AtomicU64::new(0);
    let step = STEP.fetch_add(1, Relaxed);
    let keys: Arc<Vec<String>> = Arc::new((0..keys).map(|k| format!("s{step}-k{k}")).collect());
    // Latency in ns + 1 of each check, 0 while it runs.
    let latencies: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(AtomicU64::new(0));
    let (cpu_before, commands_before) = server_counters(servers).await;
    let client_before = process_cpu();
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    let pacer = {
        let (limiters, keys, latencies, failed) =
            (limiters.clone(), keys, latencies.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while i < total {
                let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
                while i < due {
                    let issued = Instant::now();
                    let (limiters, keys, latencies, failed) = (
                        limiters.clone(),
                        keys.clone(),
                        latencies.clone(),
                        failed.clone(),
                    );
                    handle.spawn(async move {
                        let limiter = &limiters[i % limiters.len()];
                        let key = &keys[(i / limiters.len()) % keys.len()];
                        let r = limiter.acquire(key, 1).await;
                        let ns = issued.elapsed().as_nanos() as u64;
                        latencies[i].store(ns + 1, Relaxed);
                        if !matches!(r, Ok((_, Source::Redis | Source::Batch))) {
                            failed.fetch_add(1, Relaxed);
                        }
                    });
                    i += 1;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    tokio::task::spawn_blocking(move || pacer.join().expect("pacer"))
        .await
        .expect("pacer");
    // Every check ends within the limiter's timeout (1 s).
    let deadline = Instant::now() + Duration::from_secs(3);
    while latencies.iter().any(|l| l.load(Relaxed) == 0) {
        assert!(
            Instant::now() < deadline,
            "checks still running 3 s after the step"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let client_cpu = (process_cpu() - client_before).as_secs_f64() / elapsed.as_secs_f64();
    let (cpu_after, commands_after) = server_counters(servers).await;
    let mut sorted: Vec<Duration> = latencies
        .iter()
        .map(|l| Duration::from_nanos(l.load(Relaxed) - 1))
        .collect();
    sorted.sort();
    Step {
        offered: rate,
        completed: total as f64 / elapsed.as_secs_f64(),
        p50: percentile(&sorted, 0.5),
        p99: percentile(&sorted, 0.99),
        p999: percentile(&sorted, 0.999),
        failed: failed.load(Relaxed),
        round_trips_per_check: (commands_after - commands_before) as f64 / total as f64,
        server_cpu: (cpu_after - cpu_before) / elapsed.as_secs_f64(),
        client_cpu,
    }
}

fn print_step(step: &Step) {
    println!(
        "  offered {:>7.0}/s  done {:>7.0}/s  p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  \
         round trips/check {:.3}  Redis CPU {:>3.0}%  client CPU {:>3.0}%{}{}",
        step.offered,
        step.completed,
        step.p50.as_secs_f64() * 1e6,
        step.p99.as_secs_f64() * 1e6,
        step.p999.as_secs_f64() * 1e6,
        step.round_trips_per_check,
        step.server_cpu * 100.0,
        step.client_cpu * 100.0,
        if step.failed > 0 {
            format!("  {} failed", step.failed)
        } else {
            String::new()
        },
        if step.passes() { "" } else { "  (over)" },
    );
}

/// Raises the offered rate by a quarter at a time from `from` until p99 reaches 1 ms (or
/// checks fail or fall behind), bisects between the last rate that held and the first
/// that did not, and prints the highest rate that held: the capacity.
async fn sweep(
    name: &str,
    limiters: Vec<RedisRateLimiter>,
    keys: usize,
    servers: &mut [redis::aio::MultiplexedConnection],
    from: f64,
    mode: &SweepMode,
) {
    println!("{name}:");
    let limiters = Arc::new(limiters);
    // Connect every limiter (and load the script) before measuring.
    for limiter in limiters.iter() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(limiter.acquire("warm", 1).await, Ok((_, Source::Redis))) {
            assert!(Instant::now() < deadline, "Redis did not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    const CEILING: f64 = 400_000.0;
    let (mut best, mut over): (Option<Step>, Option<f64>) = (None, None);
    let mut rate = from;
    while rate <= CEILING {
        let step = offer(&limiters, keys, servers, rate, mode.step).await;
        print_step(&step);
        if !step.passes() {
            over = Some(rate);
            break;
        }
        best = Some(step);
        rate *= 1.25;
        // Let the runtime and Redis settle between steps.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(mut over) = over {
        for _ in 0..mode.refinements {
            let low = best.as_ref().map_or(from / 2.0, |s| s.offered);
            let rate = (low + over) / 2.0;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let step = offer(&limiters, keys, servers, rate, mode.step).await;
            print_step(&step);
            if step.passes() {
                best = Some(step);
            } else {
                over = rate;
            }
        }
    }
    match best {
        Some(s) => println!(
            "  capacity at p99 < 1 ms: {:.0} checks/s (p99 {:.0} µs, Redis CPU {:.0}%, client \
             CPU {:.0}%, {:.3} round trips a check){}",
            s.offered,
            s.p99.as_secs_f64() * 1e6,
            s.server_cpu * 100.0,
            s.client_cpu * 100.0,
            s.round_trips_per_check,
            if over.is_none() {
                " — the sweep's ceiling"
            } else {
                ""
            },
        ),
        None => println!("  capacity at p99 < 1 ms: below {from:.0} checks/s"),
    }
}

/// `n` limiters (each with its own connection, as `n` replicas would hold) whose quota never
/// refuses, so that every check is a Redis round trip or a batch hit.
fn unlimited(port: u16, n: usize, batch: Option<u32>, prefix: &str) -> Vec<RedisRateLimiter> {
    (0..n)
        .map(|_| {
            let mut b = RedisRateLimiter::builder(
                format!("redis://127.0.0.1:{port}/"),
                Quota::new(Rate::per_second(1_000_000), 1_000_000).expect("quota"),
            )
            .prefix(prefix)
            .timeout(Duration::from_secs(1));
            if let Some(size) = batch {
                b = b.batch(size, Duration::from_secs(1));
            }
            b.build().expect("limiter")
        })
        .collect()
}

/// A Redis Cluster of `masters` masters without replicas on free loopback ports, made as
/// `tests/redis_cluster.rs` makes one; the processes are killed when dropped.
struct Cluster {
    nodes: Vec<(u16, std::path::PathBuf, std::process::Child)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, dir, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Cluster {
    async fn start(masters: usize) -> Cluster {
        let mut cluster = Cluster { nodes: Vec::new() };
        for _ in 0..masters {
            // Cluster nodes also listen on port + 10000: pick ports where both are free.
            let port = loop {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
                let port = l.local_addr().expect("local address").port();
                if port < 55_000
                    && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
                {
                    break port;
                }
            };
            let dir = std::env::temp_dir().join(format!(
                "seawall-bench-cluster-{}-{port}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (apt-get install -y redis-server)");
            cluster.nodes.push((port, dir, child));
        }
        let mut conns = Vec::new();
        for (port, _, _) in &cluster.nodes {
            conns.push(connect(*port).await);
        }
        let status = Command::new("redis-cli")
            .args(["--cluster", "create", "--cluster-yes"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|(p, _, _)| format!("127.0.0.1:{p}")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed (apt-get install -y redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        for conn in &mut conns {
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(conn)
                    .await
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, _, _)| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }
}

/// A connection for `INFO` and the like, once the server at `port` answers (5 s at most).
async fn connect(port: u16) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            return conn;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same checks as `1 caller`, through the generic tower layer over the limiter per
/// key: the round trip plus what the layer adds (a ready clone of the inner service held
/// while the check is out, the boxed check).
async fn through_layer(limiter: &RedisRateLimiter) {
    use tower::{Layer, Service, ServiceExt};

    let inner = tower::service_fn(|k: &'static str| async move { Ok::<_, seawall::BoxError>(k) });
    let mut svc =
        seawall::rate_limit::LimitLayer::new(limiter.per_key(|k: &&'static str| Some(*k)))
            .layer(inner);
    let mut latencies = Vec::with_capacity(CHECKS);
    let start = Instant::now();
    for i in 0..CHECKS {
        let t = Instant::now();
        let ready = svc.ready().await.expect("ready");
        let r = ready.call(if i % 2 == 0 { "a" } else { "b" }).await;
        latencies.push(t.elapsed());
        assert!(r.is_ok(), "check {i}: {r:?}");
    }
    report("1 caller, tower layer", latencies, start.elapsed());
}

/// The same checks through the HTTP layer (features `http` and `redis`), keyed on a
/// header: the round trip plus the layer and the rate-limit headers of the answer.
#[cfg(feature = "http")]
async fn through_http_layer(limiter: &RedisRateLimiter) {
    use seawall::rate_limit::http::{HeaderKey, HttpRateLimitLayer};
    use tower::{Layer, Service, ServiceExt};

    let inner = tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    });
    let key = HeaderKey(http::HeaderName::from_static("x-key"));
    let mut svc = HttpRateLimitLayer::new(limiter.per_key(key)).layer(inner);
    let mut latencies = Vec::with_capacity(CHECKS);
    let start = Instant::now();
    for i in 0..CHECKS {
        let request = http::Request::builder()
            .header("x-key", if i % 2 == 0 { "a" } else { "b" })
            .body(())
            .expect("request");
        let t = Instant::now();
        let ready = svc.ready().await.expect("ready");
        let r = ready.call(request).await.expect("answered");
        latencies.push(t.elapsed());
        assert_eq!(r.status(), 200, "check {i}");
    }
    report("1 caller, HTTP layer", latencies, start.elapsed());
}

fn main() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install -y redis-server)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let limiter = RedisRateLimiter::builder(
            format!("redis://127.0.0.1:{port}/"),
            Quota::new(Rate::per_second(1_000_000), 1_000_000).expect("quota"),
        )
        .timeout(Duration::from_secs(1))
        .build()
        .expect("limiter");
        // Wait for the server and load the script.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(limiter.acquire("warm", 1).await, Ok((_, Source::Redis))) {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut latencies = Vec::with_capacity(CHECKS);
        let start = Instant::now();
        for i in 0..CHECKS {
            let t = Instant::now();
            let r = limiter.acquire(if i % 2 == 0 { "a" } else { "b" }, 1).await;
            latencies.push(t.elapsed());
            assert!(matches!(r, Ok((_, Source::Redis))), "check {i}: {r:?}");
        }
        report("1 caller", latencies, start.elapsed());
        through_layer(&limiter).await;
        #[cfg(feature = "http")]
        through_http_layer(&limiter).await;

        let limiter = Arc::new(limiter);
        let start = Instant::now();
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(CHECKS / 16);
                    for _ in 0..CHECKS / 16 {
                        let t0 = Instant::now();
                        let r = limiter.acquire(&format!("key-{t}"), 1).await;
                        latencies.push(t0.elapsed());
                        assert!(matches!(r, Ok((_, Source::Redis))), "{r:?}");
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::with_capacity(CHECKS);
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        report("16 concurrent callers", all, start.elapsed());

        // Batching: 16 tokens per round trip.
        let batched = RedisRateLimiter::builder(
            format!("redis://127.0.0.1:{port}/"),
            Quota::new(Rate::per_second(1_000_000), 1_000_000).expect("quota"),
        )
        .prefix("batched")
        .timeout(Duration::from_secs(1))
        .batch(16, Duration::from_secs(1))
        .build()
        .expect("limiter");
        let mut latencies = Vec::with_capacity(CHECKS);
        let mut round_trips = 0;
        let start = Instant::now();
        for i in 0..CHECKS {
            let t = Instant::now();
            let r = batched.acquire("a", 1).await;
            latencies.push(t.elapsed());
            match r {
                Ok((_, Source::Redis)) => round_trips += 1,
                Ok((_, Source::Batch)) => {}
                other => panic!("check {i}: {other:?}"),
            }
        }
        report("1 caller, batch(16)", latencies, start.elapsed());
        println!("  round trips: {round_trips} for {CHECKS} checks");

        // A fleet on one key, saturated: what batching costs in accuracy.
        println!();
        for batch in [1u32, 16] {
            fleet(port, batch).await;
        }

        // Capacity: open-loop offered load against this one redis-server.
        let mode = SweepMode::from_env();
        println!(
            "\ncapacity sweep, one redis-server, steps of {} ms (REDIS_BENCH_LONG=1: 3 s), \
             load average {}:",
            mode.step.as_millis(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
        let mut servers = vec![connect(port).await];
        for n in [1, 4, 8] {
            sweep(
                &format!("{n} connection(s), 10 000 keys"),
                unlimited(port, n, None, &format!("cap-{n}")),
                10_000,
                &mut servers,
                5_000.0,
                &mode,
            )
            .await;
        }
        for keys in [100, 10_000] {
            sweep(
                &format!("4 connections, batch(16, 1 s), {keys} keys"),
                unlimited(port, 4, Some(16), &format!("cap-batch-{keys}")),
                keys,
                &mut servers,
                20_000.0,
                &mode,
            )
            .await;
        }

        // The same sweep against a Cluster of 3 masters on this machine's cores.
        let cluster = Cluster::start(3).await;
        let mut nodes = Vec::new();
        for (port, _, _) in &cluster.nodes {
            nodes.push(connect(*port).await);
        }
        for n in [4, 8] {
            let limiters = (0..n)
                .map(|_| {
                    RedisRateLimiter::cluster_builder(
                        cluster.seeds(),
                        Quota::new(Rate::per_second(1_000_000), 1_000_000).expect("quota"),
                    )
                    .prefix(format!("cap-cluster-{n}"))
                    .timeout(Duration::from_secs(1))
                    .build()
                    .expect("limiter")
                })
                .collect();
            sweep(
                &format!("Cluster of 3 masters, {n} clients, 10 000 keys"),
                limiters,
                10_000,
                &mut nodes,
                5_000.0,
                &mode,
            )
            .await;
        }
        drop(cluster);
    });
    let _ = server.kill();
    let _ = server.wait();
}
