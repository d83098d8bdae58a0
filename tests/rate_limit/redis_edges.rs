//! The Redis-backed limiter's edges, as an attacker and a demanding user find them
//! (zero-cost requests, cached refusals, hash tags, clock steps, long keys across
//! processes, batching's bound, black-holed connections, `rediss://`): each test pins a
//! defect found in review, against a real `redis-server` on a free loopback port.

use std::time::Duration;

use seawall::rate_limit::redis::{RedisLimitError, RedisRateLimiter, Source};
use seawall::rate_limit::{Quota, Rate};

use crate::redis_server::RedisServer;

fn quota(per_minute: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_minute(per_minute), burst).unwrap()
}

fn limiter(redis: &RedisServer, prefix: &str, quota: Quota) -> RedisRateLimiter {
    RedisRateLimiter::builder(redis.url(), quota)
        .prefix(prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// A request that costs nothing (`LimitLayer::cost` returning 0 for a health check, say)
/// is admitted by every local limit. The script's answer to it is `{0, remaining, …}`:
/// read as a refusal (`granted == 0`), whose "retry after" is the number of tokens left,
/// taken as microseconds.
#[tokio::test]
async fn a_request_costing_nothing_is_admitted() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = limiter(&redis, "zero-cost", quota(60, 5));
    match limiter.acquire("k", 0).await {
        Ok((admitted, Source::Redis)) => assert_eq!(admitted.remaining, 5),
        other => panic!("a free request on a full bucket: {other:?}"),
    }
    // The same through the generic layer, as the local limits answer it.
    use seawall::rate_limit::LimitLayer;
    use tower::{Service, ServiceBuilder, ServiceExt};
    let mut svc = ServiceBuilder::new()
        .layer(LimitLayer::new(limiter.per_key(|t: &&'static str| Some(*t))).cost(0))
        .service_fn(|t: &'static str| async move { Ok::<_, seawall::BoxError>(t) });
    let answer = svc.ready().await.unwrap().call("j").await;
    assert!(answer.is_ok(), "refused: {:?}", answer.err());
}

/// A refusal Redis gave for one token is kept and answers later requests for more tokens
/// without a round trip, with the one-token wait: a client that asked for 2 tokens and
/// honours `Retry-After` comes back when 1 is there, and is refused again. Redis itself
/// tells it the 2-token wait.
#[tokio::test]
async fn a_cached_refusal_gives_a_larger_request_its_own_wait() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let quota = quota(600, 2); // 10/s, burst 2: a token every 100 ms
    let cached = limiter(&redis, "cached-wait", quota);
    assert!(cached.acquire("k", 2).await.is_ok());
    let one = match cached.acquire("k", 1).await {
        Err(RedisLimitError::Limited(r)) => r.retry_after().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(one <= Duration::from_millis(100), "{one:?}");
    // Another replica, with no cached refusal, asks Redis for 2 tokens.
    let fresh = limiter(&redis, "cached-wait", quota);
    let from_redis = match fresh.acquire("k", 2).await {
        Err(RedisLimitError::Limited(r)) => r.retry_after().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(from_redis > Duration::from_millis(150), "{from_redis:?}");
    let from_cache = match cached.acquire("k", 2).await {
        Err(RedisLimitError::Limited(r)) => r.retry_after().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(
        from_cache > Duration::from_millis(150),
        "2 tokens are 200 ms away, the cached refusal says {from_cache:?}"
    );
    // Following it, the client is refused again.
    tokio::time::sleep(from_cache + Duration::from_millis(5)).await;
    assert!(
        cached.acquire("k", 2).await.is_ok(),
        "refused again after waiting the Retry-After it was given"
    );
}

/// A Redis node started with cluster support, only to ask it `CLUSTER KEYSLOT`: which
/// slot (and so which master) a key name maps to, by Redis's own hash-tag rule.
struct SlotOracle {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl SlotOracle {
    async fn start() -> SlotOracle {
        let port = loop {
            let port = RedisServer::free_port();
            if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                break port;
            }
        };
        let dir = std::env::temp_dir().join(format!(
            "seawall-review-slots-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let oracle = SlotOracle { child, port, dir };
        for _ in 0..250 {
            if oracle.slot("x").await.is_some() {
                return oracle;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the cluster-enabled redis-server did not start");
    }

    async fn slot(&self, key: &str) -> Option<i64> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .ok()
    }
}

impl Drop for SlotOracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bucket of key `k` is `prefix:{k}`, the braces a hash tag: Redis Cluster hashes what
/// is between the first `{` and the first `}` after it. A client choosing its key (an
/// API-key header, say) with a `}` in it cuts the tag short: `victim}1`, `victim}2`, …
/// all hash as `victim`, so an attacker puts every bucket it makes on the slot, and the
/// master, of the key it targets, however many masters the cluster has.
#[tokio::test]
async fn a_key_with_a_closing_brace_cannot_choose_its_cluster_slot() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let oracle = SlotOracle::start().await;
    let limiter = limiter(&redis, "slots", quota(60, 5));
    limiter.acquire("victim", 1).await.unwrap();
    for i in 0..16 {
        limiter.acquire(&format!("victim}}{i}"), 1).await.unwrap();
    }
    let names = redis.keys("slots:*").await;
    assert_eq!(names.len(), 17, "{names:?}");
    let victim = oracle.slot("slots:{victim}").await.unwrap();
    let mut on_victims_slot = 0;
    for name in &names {
        if oracle.slot(name).await.unwrap() == victim {
            on_victims_slot += 1;
        }
    }
    assert!(
        on_victims_slot <= 2,
        "{on_victims_slot} of 17 buckets on the victim's slot {victim}: {names:?}"
    );
}

/// The batch docs said "The fleet never admits more than the quota (the tokens were
/// taken from it)". Tokens one replica took ahead are still served after the shared
/// bucket has refilled, while other replicas take the refill: the fleet admits nearly
/// twice the burst at once (19 in a few ms, burst 10). The docs now give the bound that
/// holds: burst + rate × (interval + `max_age`), which this checks.
#[tokio::test]
async fn batched_tokens_stretch_the_burst_by_at_most_max_age_of_refill() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let quota = Quota::new(Rate::per_second(100), 10).unwrap();
    let batched = RedisRateLimiter::builder(redis.url(), quota)
        .prefix("batch-burst")
        .timeout(Duration::from_secs(1))
        .batch(10, Duration::from_millis(200))
        .build()
        .unwrap();
    let other = limiter(&redis, "batch-burst", quota);
    // One request through the batching replica: it takes the whole burst, keeps 9.
    assert_eq!(batched.acquire("k", 1).await.unwrap().1, Source::Redis);
    // 110 ms later the shared bucket is full again (100/s).
    tokio::time::sleep(Duration::from_millis(110)).await;
    let started = tokio::time::Instant::now();
    let mut admitted = 0;
    for _ in 0..20 {
        if other.acquire("k", 1).await.is_ok() {
            admitted += 1;
        }
        if batched.acquire("k", 1).await.is_ok() {
            admitted += 1;
        }
    }
    let elapsed = started.elapsed();
    // The tokens taken ahead are served on top of the refilled bucket (19 in a few ms
    // on a quiet machine: more than burst + rate × interval, as the docs now say; not
    // asserted, since a slow machine spreads the 40 round trips), but at most
    // burst + rate × (interval + max_age), one more for rounding.
    let bound = 10 + ((elapsed.as_secs_f64() + 0.2) * 100.0).ceil() as u32 + 1;
    assert!(
        admitted <= bound,
        "{admitted} admitted in {elapsed:?}: over the documented {bound}"
    );
}

/// Two processes (the test binary runs itself for the second): a replica keyed by
/// [`HeaderKey`] takes a client's whole burst in Redis in one process, then the same
/// client, on a replica in this process, must be refused. A header value longer than 64
/// bytes (a bearer token, a long API key) becomes a `BoundedKey` digest keyed per
/// process, so each process has its own bucket in Redis for it: a fleet of N replicas
/// admits N times the limit to such clients, and a restarted replica gives them a fresh
/// one.
#[cfg(feature = "http")]
#[tokio::test]
async fn a_long_header_key_is_one_bucket_across_processes() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "redis_edges::child_takes_a_long_keys_burst",
            "--ignored",
            "--test-threads=1",
        ])
        .env("SEAWALL_REVIEW_REDIS_URL", redis.url())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the other process failed");
    assert_eq!(long_key_requests(&redis.url(), 1).await, [429]);
    let names = redis.keys("long-key:*").await;
    assert_eq!(names.len(), 1, "one client, one bucket: {names:?}");
}

/// The other process of [`a_long_header_key_is_one_bucket_across_processes`].
#[cfg(feature = "http")]
#[tokio::test]
#[ignore = "run by a_long_header_key_is_one_bucket_across_processes"]
async fn child_takes_a_long_keys_burst() {
    let Ok(url) = std::env::var("SEAWALL_REVIEW_REDIS_URL") else {
        return;
    };
    assert_eq!(long_key_requests(&url, 2).await, [200, 200]);
}

/// `n` requests with one 100-byte API key through a replica limiting 2 a minute per
/// `x-api-key` in Redis; their statuses.
#[cfg(feature = "http")]
async fn long_key_requests(url: &str, n: usize) -> Vec<u16> {
    let long = "k".repeat(100);
    api_key_statuses(url, "long-key", &vec![long.as_str(); n]).await
}

/// A request with each of `keys` as its `x-api-key`, in turn, through one replica
/// limiting 2 a minute per `x-api-key` in Redis under `prefix`; their statuses.
#[cfg(feature = "http")]
async fn api_key_statuses(url: &str, prefix: &str, keys: &[&str]) -> Vec<u16> {
    use seawall::rate_limit::http::{HeaderKey, HttpRedisRateLimitLayer};
    use tower::{Layer, Service, ServiceExt};

    let limiter = RedisRateLimiter::builder(url, quota(2, 2))
        .prefix(prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut svc = HttpRedisRateLimitLayer::new(
        limiter.per_key(HeaderKey(http::HeaderName::from_static("x-api-key"))),
    )
    .layer(tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    }));
    let mut statuses = Vec::new();
    for key in keys {
        let request = http::Request::builder()
            .header("x-api-key", *key)
            .body(())
            .unwrap();
        let response = svc.ready().await.unwrap().call(request).await.unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses
}

/// The script reads the time from Redis (`TIME`, the wall clock of the master holding the
/// key), and keeps the arrival time it computed in the key. A failover to a replica whose
/// clock is behind (or the master's clock stepped back by NTP) finds arrival times in its
/// future, by the skew: here 10 minutes, as a master 10 minutes ahead left it (written
/// directly, as replication would have). No bucket is ever more than its burst in debt,
/// yet the key is refused, and told to retry, for the whole skew: 10 minutes of
/// lock-out for a client of 60 a minute, burst 5.
#[tokio::test]
async fn a_clock_step_back_locks_a_key_out_for_at_most_its_burst() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = limiter(&redis, "skew", quota(60, 5)); // a token a second, burst 5
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let ahead = secs * 1_000_000 + micros + 600_000_000;
    let _: () = redis::cmd("SET")
        .arg("skew:{k}")
        .arg(ahead.to_string())
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    match limiter.acquire("k", 1).await {
        Err(RedisLimitError::Limited(r)) => {
            let wait = r.retry_after().unwrap();
            assert!(
                wait <= Duration::from_secs(1),
                "an empty bucket refills a token in 1 s; told to wait {wait:?}"
            );
            tokio::time::sleep(wait + Duration::from_millis(20)).await;
        }
        Ok(_) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(
        limiter.acquire("k", 1).await.is_ok(),
        "still locked out after the wait it was told"
    );
}

/// `[redis] url`'s docs said "One Redis server: `redis://host:port/` (or `rediss://`,
/// `redis+unix://`)", and the configuration loaded with a `rediss://` URL; but seawall
/// built `redis` without a TLS feature, so the gateway could not be built with it
/// ("can't connect with TLS, the feature is not enabled"), whatever seawall's features.
/// With the `redis-tls` feature it loads (and connects: `tests/gateway/redis_limits.rs`);
/// without it, it is refused when it loads, naming the field and the feature.
#[cfg(feature = "gateway")]
#[test]
fn a_rediss_url_loads_with_redis_tls_and_is_refused_without() {
    use seawall::gateway::GatewayConfig;
    for (redis, field) in [
        ("url = \"rediss://127.0.0.1:6380/\"", "redis.url"),
        ("nodes = [\"rediss://127.0.0.1:7000\"]", "redis.nodes[0]"),
    ] {
        let loaded = GatewayConfig::from_toml_str(&format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n\
             [redis]\n{redis}\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             rate_limit = {{ global = {{ per_second = 5, policy = \"redis\" }} }}\n\
             [[services]]\nname = \"up\"\ninstances = [\"127.0.0.1:9\"]\n",
        ));
        if cfg!(feature = "redis-tls") {
            loaded.expect("TLS to Redis, with the feature");
        } else {
            let error = loaded.expect_err("refused without the feature").to_string();
            assert!(
                error.contains(field) && error.contains("`redis-tls` feature"),
                "{error}"
            );
        }
    }
}

/// A loopback TCP proxy in front of a real Redis that can black-hole the connections it
/// holds (no bytes either way, no FIN, no RST: a conntrack entry or load balancer that
/// dropped an idle flow silently) while new connections go through as before.
struct BlackHole {
    port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start(upstream: u16) -> BlackHole {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(AtomicU64::new(0));
        let current = generation.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let born = current.load(SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let current = current.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if current.load(SeqCst) != born {
                                // Black-holed: hold both sockets open, forward nothing.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        BlackHole {
            port,
            generation,
            task,
        }
    }

    fn swallow_open_connections(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The connection to Redis is black-holed (an idle flow dropped by a NAT, a cloud load
/// balancer or a firewall, silently), while Redis itself is healthy and a new connection
/// reaches it. Checks time out and the breaker opens, as documented; but a timeout is not
/// an error that makes redis' connection manager reconnect, so every probe goes down the
/// dead connection again: the limiter stays on its failure policy until the kernel gives
/// the socket up (about 15 minutes of retransmissions on Linux), not for the breaker's
/// open wait.
#[tokio::test]
async fn a_black_holed_connection_is_replaced_and_redis_used_again() {
    use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow};
    use seawall::rate_limit::redis::FailurePolicy;
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let hole = BlackHole::start(redis.port).await;
    let limiter = RedisRateLimiter::builder(
        format!("redis://127.0.0.1:{}/", hole.port),
        quota(60_000, 1000),
    )
    .prefix("black-hole")
    .timeout(Duration::from_millis(200))
    .failure_policy(FailurePolicy::FailOpen {
        local_share: quota(60_000, 1000),
    })
    .breaker(
        CircuitBreakerConfig::builder()
            .name("black-hole")
            .sliding_window(SlidingWindow::count_based(2))
            .minimum_calls(2)
            .wait_in_open(Duration::from_millis(300))
            .permitted_calls_in_half_open(1)
            .build()
            .unwrap(),
    )
    .build()
    .unwrap();
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Redis);
    hole.swallow_open_connections();
    let started = tokio::time::Instant::now();
    let mut local = 0;
    loop {
        let checked = tokio::time::Instant::now();
        match limiter.acquire("k", 1).await {
            Ok((_, Source::Redis)) => break,
            Ok((_, Source::Local)) => local += 1,
            other => panic!("{other:?}"),
        }
        assert!(
            checked.elapsed() < Duration::from_millis(500),
            "bounded by the timeout"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "Redis is reachable, yet {local} checks over {:?} went to the local share",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(local > 0, "the black-holed connection was noticed");
}

/// A Redis Cluster hashes only what lies between the first `{` of a key and the next `}`.
/// The client's part of a bucket's key is percent-encoded so that it is the whole tag, but
/// the configured prefix came first, as it was: with `rl:{x}:` every bucket (`rl:{x}::{k}`)
/// had the tag `x`, all on one slot, one master, silently. The builder now refuses a
/// prefix holding a brace, naming the field.
#[tokio::test]
async fn a_prefix_with_braces_is_refused_when_the_limiter_is_built() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    for prefix in ["rl:{x}:", "tenant{", "}x"] {
        for builder in [
            RedisRateLimiter::builder(redis.url(), quota(60, 5)),
            RedisRateLimiter::cluster_builder([redis.url()], quota(60, 5)),
        ] {
            let error = builder
                .prefix(prefix)
                .build()
                .expect_err("a brace in the prefix would be every bucket's hash tag");
            assert_eq!(error.field(), "prefix", "{error}");
            assert_eq!(error.kind(), seawall::ConfigErrorKind::Invalid);
            assert!(error.reason().contains(prefix), "{error}");
        }
    }
    // Braces in a client's key are still fine: encoded, the whole key is its tag.
    let limiter = limiter(&redis, "rl", quota(60, 5));
    limiter.acquire("a{b}c", 1).await.unwrap();
    assert_eq!(redis.keys("rl:*").await, ["rl:{a%7Bb%7Dc}"]);
}

/// A request for more tokens than the burst is refused on the spot: no bucket could ever
/// admit it, so Redis is not asked. It was counted under `source="redis"` all the same,
/// so dashboards showed Redis refusing requests that never reached it (and Redis answering
/// while it was down). It now has a source of its own, `exceeds_burst`.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn a_request_over_the_burst_is_not_counted_as_answered_by_redis() {
    use metrics_util::debugging::DebuggingRecorder;

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let limiter = metrics::with_local_recorder(&recorder, || {
        RedisRateLimiter::builder(redis.url(), quota(60, 10))
            .name("oversized")
            .prefix("oversized")
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    match limiter.acquire("k", 11).await {
        Err(RedisLimitError::Limited(r)) => assert!(r.exceeds_capacity()),
        other => panic!("expected a capacity refusal, got {other:?}"),
    }
    assert!(
        redis.keys("oversized:*").await.is_empty(),
        "Redis was asked"
    );
    assert_eq!(
        crate::redis_server::checks_by_source(&snapshotter),
        [("exceeds_burst".to_owned(), 1)].into()
    );
    assert_eq!(limiter.last_source(), Some("exceeds_burst"));
    // A request Redis does answer is still counted under `redis` (a snapshot gives the
    // counts since the one before).
    limiter.acquire("k", 1).await.unwrap();
    assert_eq!(
        crate::redis_server::checks_by_source(&snapshotter),
        [("redis".to_owned(), 1)].into()
    );
}

/// Redis names a [`HeaderKey`] bucket by the key's text, and a short value spelling out a
/// long value's digest (`#` and 32 hex digits) was named alike: a client sending that
/// text drew from the long key's bucket in Redis (here, refused once the long key's
/// client had taken its burst).
#[cfg(feature = "http")]
#[tokio::test]
async fn a_value_spelling_out_a_digest_has_a_bucket_of_its_own() {
    use seawall::rate_limit::BoundedKey;

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let long = "k".repeat(100);
    let spelled = BoundedKey::new(long.as_bytes()).to_string();
    let statuses = api_key_statuses(&redis.url(), "spelled", &[&long, &long, &spelled]).await;
    assert_eq!(
        statuses,
        [200, 200, 200],
        "the spelled-out digest's own burst"
    );
    assert_eq!(
        redis.keys("spelled:*").await.len(),
        2,
        "two clients, two buckets"
    );
}

/// Replicas sharing a bucket in Redis while their quotas differ: a rolling deploy that
/// lowers the burst (here from 10 to 1, the rate unchanged, 1 a second). The script took
/// an arrival time further ahead than *its* burst allows for a clock step, and wrote it
/// back as an empty bucket of its own, smaller burst: each check of a new replica (even a
/// refused one) handed the old replicas back 9 of their 10 tokens. Five new replicas
/// checking once each let an old one admit 10 + 5 × 9 requests within milliseconds. The
/// key now holds the writer's burst too.
#[tokio::test]
async fn a_replica_with_a_smaller_burst_does_not_refill_the_others_bucket() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let old = limiter(&redis, "rolling", quota(60, 10)); // 1/s, burst 10
    let start = tokio::time::Instant::now();
    let mut admitted = 0;
    for _ in 0..10 {
        if old.acquire("k", 1).await.is_ok() {
            admitted += 1;
        }
    }
    for _ in 0..5 {
        // A new replica (1/s, burst 1) is refused: the bucket is empty for both…
        let new = limiter(&redis, "rolling", quota(60, 1));
        assert!(new.acquire("k", 1).await.is_err());
        // …and the old replica takes 9 more.
        for _ in 0..9 {
            if old.acquire("k", 1).await.is_ok() {
                admitted += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bound = 10 + elapsed.ceil() as u32;
    assert!(
        admitted <= bound,
        "the fleet admitted {admitted} in {elapsed:.3} s: at most the larger burst, 10, and \
         1 a second ({bound})"
    );
}

/// A request that costs nothing (a health check under `LimitLayer::cost` returning 0) on a
/// batching limiter asked Redis for a whole batch (`want = max(tokens, size)`), though it
/// uses none: a replica seeing only such requests took `size` tokens out of the shared
/// bucket, held them for `max_age` and dropped them. Here one free request of one replica
/// emptied the bucket (burst 10, batch 10) and another replica's first real request, on a
/// bucket nobody had used, was refused, still after the reserve expired.
#[tokio::test]
async fn a_free_request_takes_no_batch_out_of_the_shared_bucket() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let batching = |redis: &RedisServer| {
        RedisRateLimiter::builder(redis.url(), quota(60, 10)) // 1/s, burst 10
            .prefix("free-batch")
            .timeout(Duration::from_secs(1))
            .batch(10, Duration::from_millis(50))
            .build()
            .unwrap()
    };
    let prober = batching(&redis);
    let replica = batching(&redis);
    assert!(prober.acquire("k", 0).await.is_ok());
    tokio::time::sleep(Duration::from_millis(60)).await; // the reserve has expired
    let answer = replica.acquire("k", 1).await;
    assert!(
        answer.is_ok(),
        "a free request left the shared bucket empty: {answer:?}"
    );
}

/// The global bucket of a limiter is the Redis key `prefix:{all}`, and a per-key bucket of
/// the same limiter `prefix:{<key>}`: a client whose key is `all` drew from (and drained)
/// the global bucket. The bucket of requests without a key is kept apart with a NUL byte,
/// which no client key can spell; a client keyed `all` now is too.
#[tokio::test]
async fn a_client_keyed_all_does_not_drain_the_global_bucket() {
    use seawall::rate_limit::{Decision, Limit};

    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = limiter(&redis, "global-and-keys", quota(60, 3));
    let per_tenant = limiter.per_key(|tenant: &String| Some(tenant.clone()));
    // A client naming itself `all` spends its own burst…
    for _ in 0..3 {
        let d = Limit::<String>::check(&per_tenant, &"all".to_owned(), 1).await;
        assert!(matches!(d, Decision::Admitted(..)), "{d:?}");
    }
    // …and the global limit, untouched by anyone else, refuses its first request.
    let global = Limit::<String>::check(&limiter, &"anyone".to_owned(), 1).await;
    assert!(
        matches!(global, Decision::Admitted(..)),
        "the global bucket was drained by the client keyed `all`: {global:?}"
    );
}

/// A request that costs nothing, on a key whose bucket a replica with a larger burst left
/// deeper in debt than this replica's burst (a rolling deploy lowering the burst): the
/// script answers `{0, wait, full_in}` (the bucket is short of even zero tokens by
/// `wait` microseconds), and the limiter, reading a free request's answer as an admission,
/// takes the wait, in microseconds, for the tokens remaining. A `RateLimit` header then
/// says millions of requests remain out of a burst of 1.
#[tokio::test]
async fn a_free_request_never_reports_more_remaining_than_the_burst() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let old = limiter(&redis, "free-after-deploy", quota(60, 10)); // 1/s, burst 10
    for _ in 0..10 {
        assert!(old.acquire("k", 1).await.is_ok());
    }
    let new = limiter(&redis, "free-after-deploy", quota(60, 1)); // 1/s, burst 1
    match new.acquire("k", 0).await {
        Ok((admitted, _)) => assert!(
            admitted.remaining <= admitted.limit,
            "a free request is told {} tokens remain of a burst of {}",
            admitted.remaining,
            admitted.limit
        ),
        Err(e) => panic!("a free request was refused: {e:?}"),
    }
}

/// Another program (or an operator's mistake) leaves one bucket's key of another type (a
/// hash): Redis answers that key's checks with `WRONGTYPE`, a reply about that key's data,
/// while Redis itself is up and answering. Those errors count as Redis failures in the one
/// breaker guarding every key: ten checks of the broken key open it, and then every other
/// key, whose bucket is fine, is answered by the failure policy (here `FailClosed`: all
/// refused as unavailable; under `FailOpen`, each replica admits its local share unchecked).
#[tokio::test]
async fn one_key_of_the_wrong_type_does_not_open_the_breaker_for_every_key() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = limiter(&redis, "wrongtype", quota(60, 100));
    {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("HSET")
            .arg("wrongtype:{broken}")
            .arg("field")
            .arg("value")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The broken key's checks fail (with an error, no panic)…
    for _ in 0..12 {
        let answer = limiter.acquire("broken", 1).await;
        assert!(answer.is_err(), "{answer:?}");
    }
    // …but Redis is up: another key's bucket is still Redis's to answer.
    let healthy = limiter.acquire("healthy", 1).await;
    assert!(
        matches!(healthy, Ok((_, Source::Redis))),
        "a healthy key while one key holds a hash: {healthy:?} (breaker {:?})",
        limiter.breaker().state()
    );
}

/// `batch(size, max_age)`: tokens taken ahead serve the next checks "for at most
/// `max_age`", which is what the documented bound (burst + rate × (interval + `max_age`))
/// rests on. A token left over from one batch must not live on because a later batch for
/// the same key was added to the reserve: here the first batch's leftover token, taken
/// 1.2 s before, is served with a `max_age` of 1 s.
#[tokio::test]
async fn a_batch_token_is_never_served_past_max_age() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    // 8 tokens, one more a minute: no refill within the test.
    let batched = RedisRateLimiter::builder(redis.url(), quota(1, 8))
        .prefix("batch-age")
        .timeout(Duration::from_secs(1))
        .batch(4, Duration::from_secs(1))
        .build()
        .unwrap();
    // Checks of 3 tokens: a batch of 4 each time, one left over.
    let (_, source) = batched.acquire("k", 3).await.unwrap();
    assert_eq!(source, Source::Redis);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // One token left (0.6 s old) is too few: a second batch, the bucket now empty; the
    // reserve holds the old token and the new one.
    let (_, source) = batched.acquire("k", 3).await.unwrap();
    assert_eq!(source, Source::Redis);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // 1.2 s after the first batch: its token is past `max_age`; only the second batch's
    // (0.6 s old) may serve, one token, so a check of 2 goes to Redis, whose bucket is
    // empty.
    match batched.acquire("k", 2).await {
        Err(RedisLimitError::Limited(_)) => {}
        Ok((_, source)) => {
            panic!("admitted from {source:?}: a token taken 1.2 s ago served with max_age = 1 s")
        }
        Err(e) => panic!("{e}"),
    }
}

/// A request for more tokens than the burst can never be admitted, and is refused so
/// (`retry_after() == None`, `exceeds_capacity()`, source `exceeds_burst`) without asking
/// Redis. But once Redis has refused a smaller request for the same key, the cached
/// refusal answered first: the oversized request was told a `retry_after` (the cached
/// wait plus a refill interval per extra token), after which it is refused again, for
/// ever; the HTTP layer sends that wait as `Retry-After`, and the metric says `cached`.
#[tokio::test]
async fn a_cached_refusal_never_hides_a_request_over_the_burst() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let limiter = limiter(&redis, "cached-oversized", quota(600, 2));
    assert!(limiter.acquire("k", 2).await.is_ok());
    // Redis refuses one token: the refusal is cached for the key.
    match limiter.acquire("k", 1).await {
        Err(RedisLimitError::Limited(r)) => assert!(r.retry_after().is_some()),
        other => panic!("{other:?}"),
    }
    // Five tokens, with a burst of two: never admissible.
    match limiter.acquire("k", 5).await {
        Err(RedisLimitError::Limited(r)) => assert!(
            r.exceeds_capacity(),
            "a request over the burst was told to retry after {:?}",
            r.retry_after()
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(limiter.last_source(), Some("exceeds_burst"));
}

/// A proxy to Redis that holds each of Redis's replies `delay` before passing it on
/// (requests go through at once): a slow network or a loaded machine, Redis healthy.
async fn slow_replies(upstream: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    tokio::time::sleep(delay).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `batch(size, max_age)` promises that over any interval the fleet admits at most
/// burst + rate × (interval + `max_age`): tokens taken ahead are used at most `max_age`
/// after they were taken from the shared bucket. But a reserve's age was counted from
/// when Redis's answer arrived, not from when Redis took the tokens: with answers slow
/// to come back (here 450 ms; the module docs call 20 to 80 ms answers "slow but
/// healthy", beside a default `max_age` of 100 ms), the reserve served tokens the shared
/// bucket had long refilled, on top of it.
#[tokio::test]
async fn batched_tokens_age_from_when_redis_took_them() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let slow = slow_replies(redis.port, Duration::from_millis(450)).await;
    // 100 a second, burst 40: the bucket refills from empty in 400 ms.
    let quota = Quota::new(Rate::per_second(100), 40).unwrap();
    let batched = RedisRateLimiter::builder(format!("redis://127.0.0.1:{slow}/"), quota)
        .prefix("batch-slow")
        .timeout(Duration::from_secs(3))
        .batch(40, Duration::from_millis(100))
        .build()
        .unwrap();
    let other = limiter(&redis, "batch-slow", quota);
    // The batching replica takes the whole burst (one for its request, 39 ahead); Redis's
    // answer comes 450 ms later, when the shared bucket is full again.
    assert_eq!(batched.acquire("k", 1).await.unwrap().1, Source::Redis);
    let started = tokio::time::Instant::now();
    let mut admitted = 0;
    if other.acquire("k", 40).await.is_ok() {
        admitted += 40;
    }
    let served = batched.acquire("k", 39).await;
    if served.is_ok() {
        admitted += 39;
    }
    let elapsed = started.elapsed();
    // burst + rate × (interval + max_age), one more for rounding.
    let bound = 40 + ((elapsed.as_secs_f64() + 0.1) * 100.0).ceil() as u32 + 1;
    assert!(
        admitted <= bound,
        "{admitted} admitted in {elapsed:?} (the batching replica's 39: {:?}, tokens \
         Redis took 450 ms before, with max_age = 100 ms): over the documented {bound}",
        served.map(|(_, source)| source)
    );
}

/// A refusal Redis gave is kept and answered again without a round trip until its wait
/// has passed. The wait runs from when Redis decided, but was counted from when its
/// answer arrived: with answers slow to come back (here 450 ms), the cached refusal
/// outlived the wait by that much and refused requests Redis would admit.
#[tokio::test]
async fn cached_refusals_age_from_when_redis_gave_them() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let slow = slow_replies(redis.port, Duration::from_millis(450)).await;
    // One a second, burst 1.
    let quota = Quota::new(Rate::per_second(1), 1).unwrap();
    let limiter = RedisRateLimiter::builder(format!("redis://127.0.0.1:{slow}/"), quota)
        .prefix("refusal-slow")
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    assert_eq!(limiter.acquire("k", 1).await.unwrap().1, Source::Redis);
    // Sent at least 450 ms after Redis took the token: refused for what is left of the
    // second, the answer coming 450 ms later still.
    let sent = tokio::time::Instant::now();
    let wait = match limiter.acquire("k", 1).await {
        Err(RedisLimitError::Limited(refused)) => refused.retry_after().expect("a wait"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(wait <= Duration::from_millis(560), "{wait:?}");
    // Past the wait as Redis counted it (and 350 ms before it ends counted from the
    // answer's arrival): Redis is asked, and admits.
    tokio::time::sleep_until(sent + wait + Duration::from_millis(100)).await;
    let again = limiter.acquire("k", 1).await;
    assert_eq!(
        limiter.last_source(),
        Some("redis"),
        "refused from the cache: {again:?}"
    );
    assert_eq!(again.unwrap().1, Source::Redis);
}
