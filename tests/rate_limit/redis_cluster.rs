//! The Redis-backed limiter against a real Redis Cluster on loopback: `redis-server
//! --cluster-enabled yes` processes joined by `redis-cli --cluster create` (both in Debian's
//! `redis-server` / `redis-tools` packages, which `.ci/run` installs). Time here is real,
//! since Redis is: bounds are generous and only what must hold is asserted.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow};
use seawall::rate_limit::redis::{FailurePolicy, RedisLimitError, RedisRateLimiter, Source};
use seawall::rate_limit::{Quota, Rate};
use tokio::time::Instant;

/// One `redis-server --cluster-enabled yes` process, killed when dropped.
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "1000"])
            // Slots of a dead master without a replica fail; the others keep serving.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn query(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        tokio::time::timeout(Duration::from_secs(1), cmd.query_async(&mut conn))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    async fn info(&self, args: &[&str]) -> Option<String> {
        match self.query(args).await.ok()? {
            redis::Value::BulkString(b) => String::from_utf8(b).ok(),
            redis::Value::VerbatimString { text, .. } => Some(text),
            redis::Value::SimpleString(s) => Some(s),
            _ => None,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster of `masters` masters with `replicas` replicas each, on free loopback ports.
struct Cluster {
    nodes: Vec<Node>,
}

fn free_port() -> u16 {
    // Cluster nodes also listen on port + 10000: pick ports where both are free.
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = l.local_addr().expect("local address").port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    async fn start(masters: usize, replicas: usize) -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("seawall-cluster-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let mut node = Node {
                port,
                dir,
                child: None,
            };
            node.spawn();
            nodes.push(node);
        }
        let cluster = Cluster { nodes };
        for node in &cluster.nodes {
            cluster
                .wait_for("a node to answer", || async {
                    node.info(&["PING"]).await.is_some()
                })
                .await;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed (apt-get install -y redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster
            .wait_for("every node to see the cluster ok", || async {
                for node in &cluster.nodes {
                    let info = node.info(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                    if !info.contains("cluster_state:ok") {
                        return false;
                    }
                }
                true
            })
            .await;
        if replicas > 0 {
            cluster
                .wait_for("every replica to be in sync", || async {
                    for node in &cluster.nodes {
                        let info = node
                            .info(&["INFO", "replication"])
                            .await
                            .unwrap_or_default();
                        if info.contains("role:slave") && !info.contains("master_link_status:up") {
                            return false;
                        }
                    }
                    true
                })
                .await;
        }
        cluster
    }

    async fn wait_for<F, Fut>(&self, what: &str, mut ok: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// The port of the master currently serving `key`'s slot, as `node` sees the cluster.
    async fn master_of(&self, key: &str) -> Option<u16> {
        for node in &self.nodes {
            if node.child.is_none() {
                continue;
            }
            let Ok(redis::Value::Int(slot)) = node.query(&["CLUSTER", "KEYSLOT", key]).await else {
                continue;
            };
            let Ok(redis::Value::Array(ranges)) = node.query(&["CLUSTER", "SLOTS"]).await else {
                continue;
            };
            for range in ranges {
                let redis::Value::Array(fields) = range else {
                    continue;
                };
                let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                    (fields.first(), fields.get(1))
                else {
                    continue;
                };
                if (*lo..=*hi).contains(&slot) {
                    if let Some(redis::Value::Array(master)) = fields.get(2) {
                        if let Some(redis::Value::Int(port)) = master.get(1) {
                            return u16::try_from(*port).ok();
                        }
                    }
                }
            }
        }
        None
    }

    fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of the cluster")
    }
}

fn quota(per_minute: u32, burst: u32) -> Quota {
    Quota::new(Rate::per_minute(per_minute), burst).unwrap()
}

/// A breaker that opens after two failures and probes again after 200 ms.
fn quick_breaker() -> CircuitBreakerConfig {
    CircuitBreakerConfig::builder()
        .name("redis-cluster-test")
        .sliding_window(SlidingWindow::count_based(2))
        .minimum_calls(2)
        .wait_in_open(Duration::from_millis(200))
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap()
}

/// Many keys, spread over the three masters' slots, hammered through two limiters (two
/// replicas of a service) at once: every key admits exactly its burst, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_hold_exactly_across_the_slots_of_every_master() {
    let cluster = Cluster::start(3, 0).await;
    let make = || {
        RedisRateLimiter::cluster_builder(cluster.seeds(), quota(1, 5))
            .prefix("acc")
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    };
    let replicas = [make(), make()];
    let keys: Vec<String> = (0..24).map(|i| format!("client-{i}")).collect();

    let mut tasks = Vec::new();
    for key in &keys {
        for limiter in &replicas {
            for _ in 0..4 {
                let (limiter, key) = (limiter.clone(), key.clone());
                tasks.push(tokio::spawn(async move {
                    let result = limiter.acquire(&key, 1).await;
                    (key, result)
                }));
            }
        }
    }
    let mut admitted: HashMap<String, u32> = HashMap::new();
    for task in tasks {
        let (key, result) = task.await.unwrap();
        match result {
            Ok((_, source)) => {
                assert_eq!(source, Source::Redis, "{key}");
                *admitted.entry(key).or_default() += 1;
            }
            Err(RedisLimitError::Limited(_)) => {}
            Err(e) => panic!("{key}: {e}"),
        }
    }
    for key in &keys {
        assert_eq!(admitted.get(key), Some(&5), "{key}: 8 tries, burst 5");
    }
    // The keys really were spread over the masters.
    let mut masters = BTreeSet::new();
    for key in &keys {
        masters.insert(cluster.master_of(&format!("acc:{{{key}}}")).await.unwrap());
    }
    assert_eq!(masters.len(), 3, "keys on every master: {masters:?}");
}

/// A master without a replica dies: its keys are answered by the failure policy within
/// the timeout (fail-open: the local share; fail-closed: unavailable), never hanging; the
/// other masters keep serving theirs; once the master is back, its keys are in Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_without_replica_takes_the_policy_and_recovers() {
    let mut cluster = Cluster::start(3, 0).await;
    let open = RedisRateLimiter::cluster_builder(cluster.seeds(), quota(600, 100))
        .prefix("dead")
        .timeout(Duration::from_millis(300))
        .breaker(quick_breaker())
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(600, 100),
        })
        .build()
        .unwrap();
    let closed = RedisRateLimiter::cluster_builder(cluster.seeds(), quota(600, 100))
        .prefix("dead")
        .timeout(Duration::from_millis(300))
        .breaker(quick_breaker())
        .build()
        .unwrap();
    // Two keys on different masters.
    let mut by_master: HashMap<u16, String> = HashMap::new();
    for i in 0.. {
        let key = format!("k{i}");
        let master = cluster.master_of(&format!("dead:{{{key}}}")).await.unwrap();
        by_master.entry(master).or_insert(key);
        if by_master.len() == 3 {
            break;
        }
    }
    let mut masters: Vec<u16> = by_master.keys().copied().collect();
    masters.sort_unstable();
    let (victim, survivor) = (masters[0], masters[1]);
    let (dead_key, live_key) = (by_master[&victim].clone(), by_master[&survivor].clone());
    for limiter in [&open, &closed] {
        assert_eq!(
            limiter.acquire(&dead_key, 1).await.unwrap().1,
            Source::Redis
        );
        assert_eq!(
            limiter.acquire(&live_key, 1).await.unwrap().1,
            Source::Redis
        );
    }

    cluster.node(victim).kill();
    // Every check is answered within the timeout (plus scheduling slack), by the policy for
    // the dead master's key.
    for _ in 0..10 {
        let started = Instant::now();
        let (_, source) = open.acquire(&dead_key, 1).await.expect("fail-open admits");
        assert_eq!(source, Source::Local);
        let err = closed.acquire(&dead_key, 1).await.unwrap_err();
        assert!(matches!(err, RedisLimitError::Unavailable(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
    }
    // The surviving master still answers, once the breaker lets a probe through.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok((_, Source::Redis)) = closed.acquire(&live_key, 1).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the surviving master was never used again"
        );
    }

    // The master comes back (same port, same cluster configuration): its keys are in
    // Redis again.
    cluster.node(victim).spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok((_, Source::Redis)) = open.acquire(&dead_key, 1).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted master was never used again"
        );
    }
}

/// A master with a replica dies: the cluster promotes the replica, and the limiter follows
/// the new slot map by itself: the key is in Redis again without the old master returning,
/// and its bucket kept what was taken before the failover (the replica had it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_the_replica_is_followed() {
    let mut cluster = Cluster::start(3, 1).await;
    let limiter = RedisRateLimiter::cluster_builder(cluster.seeds(), quota(1, 10))
        .prefix("fo")
        .timeout(Duration::from_millis(300))
        .breaker(quick_breaker())
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(1, 10),
        })
        .build()
        .unwrap();
    let key = "failover-key";
    for _ in 0..6 {
        assert_eq!(limiter.acquire(key, 1).await.unwrap().1, Source::Redis);
    }
    let old = cluster.master_of(&format!("fo:{{{key}}}")).await.unwrap();
    // Replication is asynchronous: make sure the replica has the writes before its master
    // goes. `WAIT` covers the writes of its own connection, so write a marker in the same
    // slot on that connection first; the replication stream is ordered, so once the
    // replica acknowledged the marker it holds the bucket's writes too.
    let client = redis::Client::open(cluster.node(old).url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (_, acked): (String, i64) = redis::pipe()
        .cmd("SET")
        .arg(format!("fo:{{{key}}}:marker"))
        .arg(1)
        .cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica acknowledged the writes");
    cluster.node(old).kill();

    let deadline = Instant::now() + Duration::from_secs(30);
    let remaining = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match limiter.acquire(key, 1).await {
            Ok((admitted, Source::Redis)) => break admitted.remaining,
            Ok((_, Source::Local)) | Err(_) => {}
            Ok((_, other)) => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the failover was never followed");
    };
    let new = cluster.master_of(&format!("fo:{{{key}}}")).await.unwrap();
    assert_ne!(new, old, "a replica was promoted");
    // 10 tokens, 6 taken before, 1 now: at most 3 left (local answers took none in Redis).
    assert!(
        remaining <= 3,
        "the promoted replica kept the bucket: {remaining} left"
    );
}

/// The gateway's `[redis] nodes`: two gateways (as two replicas would be) share per-client
/// buckets placed over the three masters' slots; each client gets its burst once, whichever
/// replica it reaches.
#[cfg(feature = "gateway")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_per_client_limits_in_a_cluster() {
    use http_body_util::Empty;
    use seawall::gateway::{Discovery, Gateway, GatewayConfig};
    use tower::ServiceExt;

    let cluster = Cluster::start(3, 0).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, svc));
        }
    });
    let nodes: Vec<String> = cluster.seeds().iter().map(|s| format!("\"{s}\"")).collect();
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [redis]\nnodes = [{}]\ntimeout = \"1s\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         rate_limit = {{ per_client = {{ per_second = 1, burst = 5, key = \"header:x-api-key\", policy = \"redis\" }} }}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n",
        nodes.join(", ")
    );
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let config = GatewayConfig::from_toml_str(&config).unwrap();
        replicas.push(Gateway::build(config, Discovery::Static).await.unwrap());
    }
    let keys: Vec<String> = (0..12).map(|i| format!("client-{i}")).collect();
    let start = Instant::now();
    let mut admitted: HashMap<&str, usize> = HashMap::new();
    for round in 0..8 {
        for key in &keys {
            let request = http::Request::get("/api/x")
                .header("host", "gw")
                .header("x-api-key", key.as_str())
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = replicas[round % 2].clone().oneshot(request).await.unwrap();
            match response.status().as_u16() {
                200 => *admitted.entry(key.as_str()).or_default() += 1,
                429 => {}
                other => panic!("{key}: {other}"),
            }
        }
    }
    // Burst 5 at 1 a second: 5, plus what refilled while the rounds ran.
    let refilled = start.elapsed().as_secs() as usize + 1;
    for key in &keys {
        let n = admitted.get(key.as_str()).copied().unwrap_or(0);
        assert!((5..=5 + refilled).contains(&n), "{key}: admitted {n}");
    }
    let mut masters = BTreeSet::new();
    for key in &keys {
        let redis_key = format!("seawall:api:client:{{key:{key}}}");
        masters.insert(cluster.master_of(&redis_key).await.unwrap());
    }
    assert_eq!(masters.len(), 3, "buckets on every master: {masters:?}");
    let status = replicas[0].status();
    let limit = status.routes[0].limits.per_client.as_ref().unwrap();
    assert_eq!(limit.redis.as_ref().unwrap().breaker, "closed");
}
