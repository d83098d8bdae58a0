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
    });
    let _ = server.kill();
    let _ = server.wait();
}
