//! Redis-backed limiter on loopback: checks per second and latency percentiles, one
//! caller at a time and 16 concurrent callers, against a `redis-server` this program
//! starts on a free port (and stops). Not a criterion bench: what matters here is the
//! latency distribution of a network round trip, so it prints p50 / p99 / p99.9 from one
//! timed run of a fixed number of checks.
//!
//! `cargo bench --features redis --bench redis_limit`
#![allow(clippy::disallowed_types)] // std's Instant: real time against a real server

use std::process::{Command, Stdio};
use std::sync::Arc;
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
    let commands = || async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("total_commands_processed")
    };
    let commands_before = commands().await;
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
    // Our own INFO call counts once.
    let round_trips = commands().await - commands_before - 1;
    let allowed = f64::from(burst) + f64::from(rate) * elapsed.as_secs_f64();
    let admitted: u64 = per_replica.iter().sum();
    println!(
        "fleet of {REPLICAS}, batch({batch}): admitted {admitted} of {allowed:.0} allowed ({:.1}%), \
         {checks} checks, {round_trips} Redis commands, per replica {per_replica:?}",
        admitted as f64 * 100.0 / allowed
    );
    assert!(
        admitted as f64 <= allowed + 1.0,
        "the fleet admitted more than the quota allows"
    );
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
    });
    let _ = server.kill();
    let _ = server.wait();
}
