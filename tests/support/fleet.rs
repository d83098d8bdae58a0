//! A fleet of gateway processes, and an open-loop load client,
//! for `tests/fleet.rs` and `benches/fleet.rs`.
//!
//! Include it with `#[path = "support/fleet.rs"] mod fleet;` (from a bench:
//! `#[path = "../tests/support/fleet.rs"]`), and `support/redis_server.rs` for Redis.
//!
//! Each gateway is a separate OS process: the including binary run again with
//! [`CHILD_CONFIG`] set to the gateway's TOML. The child calls [`serve_if_child`] first
//! (from `main`, or from a `#[test]` the parent selects with `--exact`); it serves its own
//! upstream on loopback (a hyper server answering `200 ok` at once), builds the gateway from
//! the configuration with `{upstream}` replaced by that upstream's address, prints
//! `seawall-fleet-gateway <proxy address> <admin address>` on stdout, and serves until its
//! stdin closes (the parent ended, even killed outright) or it is killed ([`Fleet`]'s drop).
//! Every wait here is bounded.
#![allow(dead_code, unreachable_pub)] // each includer uses what it needs

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};

/// The environment variable that makes a process a fleet member: the gateway's TOML, with
/// `{upstream}` where the child's upstream address goes.
pub const CHILD_CONFIG: &str = "SEAWALL_FLEET_GATEWAY";
/// A child's line on stdout once serving: `<READY> <proxy> <admin>` (after whatever the
/// test harness wrote on that line).
const READY: &str = "seawall-fleet-gateway";
/// A child that could not start says why on stdout: `<FAILED> <reason>`.
const FAILED: &str = "seawall-fleet-failed";
/// A gateway process must be serving within this long of its start (a debug build, on a
/// loaded 2-core machine, takes well under a second).
const START_BOUND: Duration = Duration::from_secs(20);
/// A request through the fleet is answered within this long, or counts as unanswered.
pub const REQUEST_BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The child process.

/// When [`CHILD_CONFIG`] is set: serves a gateway (see the module docs) and never returns.
/// Otherwise returns at once.
pub fn serve_if_child() {
    let Ok(config) = std::env::var(CHILD_CONFIG) else {
        return;
    };
    // Ends with the parent, even when the parent was killed: its end of our stdin closes.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => fail(&format!("cannot build a runtime: {e}")),
    };
    runtime.block_on(async move {
        // Both serve until the process ends (dropping a handle would stop its listener).
        let (proxy, admin) = match start_gateway(&config).await {
            Ok(handles) => handles,
            Err(e) => fail(&e),
        };
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "{READY} {} {}",
            proxy.local_addr(),
            admin.local_addr()
        );
        let _ = stdout.flush();
        drop(stdout);
        std::future::pending::<()>().await;
    });
    std::process::exit(0);
}

fn fail(reason: &str) -> ! {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{FAILED} {}", reason.replace('\n', " "));
    let _ = stdout.flush();
    std::process::exit(2);
}

/// The upstream, the gateway and its admin listener, each on a free loopback port.
async fn start_gateway(config: &str) -> Result<(GatewayHandle, GatewayHandle), String> {
    let upstream = upstream().await.map_err(|e| format!("upstream: {e}"))?;
    let config = GatewayConfig::from_toml_str(&config.replace("{upstream}", &upstream.to_string()))
        .map_err(|e| format!("configuration: {e}"))?;
    let gateway = Gateway::build(config, Discovery::Static)
        .await
        .map_err(|e| format!("build: {e}"))?;
    let bind = || async {
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("bind: {e}"))
    };
    let admin = gateway.clone().spawn_admin(bind().await?);
    let proxy = gateway.spawn(bind().await?);
    Ok((proxy, admin))
}

/// An upstream that answers `200 ok` at once, on keep-alive connections.
async fn upstream() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// The parent: Redis and the fleet.

/// The scripts the Redis at `url` has run (`EVALSHA` and `EVAL` calls, from `INFO
/// commandstats`): one per round trip of a rate-limit check. `None` when Redis does not
/// answer within a second.
pub async fn scripts_run(url: &str) -> Option<u64> {
    let ask = async {
        let client = redis::Client::open(url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .ok()?;
        // `cmdstat_evalsha:calls=12,usec=...`
        let calls = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(":calls="))
                .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Some(calls("cmdstat_evalsha") + calls("cmdstat_eval"))
    };
    timeout(Duration::from_secs(1), ask).await.ok().flatten()
}

/// One gateway process.
pub struct Member {
    child: Child,
    /// Where it proxies.
    pub proxy: SocketAddr,
    /// Its admin listener (`/status.json`, `/metrics`).
    pub admin: SocketAddr,
}

/// Gateway processes, all killed (and reaped) when dropped: at the end of a test, or
/// when it fails or panics.
pub struct Fleet {
    members: Vec<Member>,
    starting: Vec<Child>,
}

impl Fleet {
    /// Starts `k` gateway processes, each `command()` with [`CHILD_CONFIG`] set to
    /// `config`, and waits until every one serves.
    pub async fn start(
        k: usize,
        config: &str,
        command: impl Fn() -> Command,
    ) -> Result<Fleet, String> {
        let mut fleet = Fleet {
            members: Vec::with_capacity(k),
            starting: Vec::with_capacity(k),
        };
        let mut ready = Vec::with_capacity(k);
        for _ in 0..k {
            let mut child = command()
                .env(CHILD_CONFIG, config)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start a gateway process: {e}"))?;
            let stdout = child.stdout.take().expect("piped stdout");
            fleet.starting.push(child);
            let (tx, rx) = oneshot::channel();
            // Reads the ready line, then drains the child's stdout until it ends.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // The marker may follow the test harness's `test <name> ... `.
                    let after = |marker: &str| line.find(marker).map(|i| &line[i + marker.len()..]);
                    let answer = if let Some(rest) = after(READY) {
                        let mut addrs = rest.split_whitespace().map(str::parse::<SocketAddr>);
                        match (addrs.next(), addrs.next()) {
                            (Some(Ok(proxy)), Some(Ok(admin))) => Ok((proxy, admin)),
                            _ => Err(format!("a garbled ready line: {line}")),
                        }
                    } else if let Some(reason) = after(FAILED) {
                        Err(format!("the gateway process failed:{reason}"))
                    } else {
                        continue;
                    };
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(answer);
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err("the gateway process exited before serving".into()));
                }
            });
            ready.push(rx);
        }
        for (n, rx) in ready.into_iter().enumerate() {
            let (proxy, admin) = timeout(START_BOUND, rx)
                .await
                .map_err(|_| format!("gateway {n} not serving after {START_BOUND:?}"))?
                .map_err(|_| format!("gateway {n}: its stdout reader ended"))??;
            let child = fleet.starting.remove(0);
            fleet.members.push(Member {
                child,
                proxy,
                admin,
            });
        }
        Ok(fleet)
    }

    /// The gateway processes, in start order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Their proxy addresses.
    pub fn proxies(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.proxy).collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self
            .members
            .iter_mut()
            .map(|m| &mut m.child)
            .chain(self.starting.iter_mut())
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET http://<addr><path>` on a connection of its own: the status and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    timeout(REQUEST_BOUND, async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .map_err(|_| format!("GET {addr}{path}: no answer within {REQUEST_BOUND:?}"))?
}

/// A member's `/status.json`.
pub async fn status(member: &Member) -> serde_json::Value {
    let (code, body) = get(member.admin, "/status.json")
        .await
        .expect("status.json");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status.json is JSON")
}

// ---------------------------------------------------------------------------------------
// The open-loop load client.

/// Requests sent at a fixed rate, whatever the answers, spread round-robin over the fleet.
#[derive(Debug, Clone)]
pub struct Stream {
    /// The request's path.
    pub path: String,
    /// A header sent with every request (a client key).
    pub header: Option<(&'static str, String)>,
    /// Requests a second, over the whole fleet.
    pub per_second: f64,
}

/// One request's fate.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// The index of the gateway it went to.
    pub target: usize,
    /// When it was sent.
    pub sent: Instant,
    /// When its answer had arrived in full (or the client gave up).
    pub answered: Instant,
    /// The answer's status; `None` for a transport error or no answer within
    /// [`REQUEST_BOUND`].
    pub status: Option<u16>,
}

/// Every request of one [`Stream`].
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// In the order they were sent.
    pub records: Vec<Record>,
}

impl Outcome {
    /// Requests sent.
    pub fn sent(&self) -> usize {
        self.records.len()
    }

    /// Answers with this status.
    pub fn with_status(&self, status: u16) -> usize {
        self.records
            .iter()
            .filter(|r| r.status == Some(status))
            .count()
    }

    /// Answers that are neither 200 nor 429, by status (0: no answer), with a count.
    pub fn unexpected(&self) -> Vec<(u16, usize)> {
        let mut seen = std::collections::BTreeMap::new();
        for r in &self.records {
            match r.status {
                Some(200 | 429) => {}
                other => *seen.entry(other.unwrap_or(0)).or_insert(0) += 1,
            }
        }
        seen.into_iter().collect()
    }

    /// 200 answers per gateway, for a fleet of `k`.
    pub fn admitted_per_target(&self, k: usize) -> Vec<usize> {
        let mut per = vec![0; k];
        for r in self.records.iter().filter(|r| r.status == Some(200)) {
            per[r.target] += 1;
        }
        per
    }

    /// From the first request sent to the last one sent: how long the load was offered.
    pub fn offered_window(&self) -> Duration {
        let first = self.records.iter().map(|r| r.sent).min();
        let last = self.records.iter().map(|r| r.sent).max();
        match (first, last) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        }
    }

    /// From the first admitted request's send to the last admitted request's answer: every
    /// admission was decided inside this window.
    pub fn admitted_window(&self) -> Duration {
        let ok = || self.records.iter().filter(|r| r.status == Some(200));
        let first = ok().map(|r| r.sent).min();
        let last = ok().map(|r| r.answered).max();
        match (first, last) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        }
    }

    /// Latencies of the answers with `status`, sorted.
    pub fn latencies(&self, status: u16) -> Vec<Duration> {
        let mut l: Vec<Duration> = self
            .records
            .iter()
            .filter(|r| r.status == Some(status))
            .map(|r| r.answered - r.sent)
            .collect();
        l.sort_unstable();
        l
    }
}

/// What a token bucket of `per_second` and `burst` admits at most over `window`, when
/// full at its start: `burst + per_second × window`.
pub fn bound(per_second: f64, burst: f64, window: Duration) -> f64 {
    burst + per_second * window.as_secs_f64()
}

/// The `p` quantile (0 to 1) of sorted latencies.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends every stream at its rate for `run`, open loop (request `i` of a stream leaves at
/// `i / per_second` seconds, whether or not earlier ones were answered), each request to
/// the next of `targets` in turn, over pooled keep-alive connections; waits for every
/// answer ([`REQUEST_BOUND`] at most each). One [`Outcome`] per stream.
pub async fn offer(targets: &[SocketAddr], streams: &[Stream], run: Duration) -> Vec<Outcome> {
    assert!(!targets.is_empty(), "no gateway to send to");
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    // Every stream starts at the same instant, a little ahead so all are scheduled.
    let start = Instant::now() + Duration::from_millis(20);
    let mut schedulers = JoinSet::new();
    for (s, stream) in streams.iter().enumerate() {
        let stream = stream.clone();
        let targets = targets.to_vec();
        let client = client.clone();
        schedulers.spawn(async move {
            let n = (stream.per_second * run.as_secs_f64()).round() as u64;
            let mut requests = JoinSet::new();
            for i in 0..n {
                sleep_until(start + Duration::from_secs_f64(i as f64 / stream.per_second)).await;
                let target = (i as usize + s) % targets.len();
                let mut request =
                    Request::get(format!("http://{}{}", targets[target], stream.path));
                if let Some((name, value)) = &stream.header {
                    request = request.header(*name, value.as_str());
                }
                let request = request.body(Empty::new()).expect("a valid request");
                let client = client.clone();
                requests.spawn(async move {
                    let sent = Instant::now();
                    let status = timeout(REQUEST_BOUND, async {
                        let response = client.request(request).await.ok()?;
                        let status = response.status().as_u16();
                        // Read to the end, so the connection goes back to the pool.
                        response.into_body().collect().await.ok()?;
                        Some(status)
                    })
                    .await
                    .ok()
                    .flatten();
                    (
                        i,
                        Record {
                            target,
                            sent,
                            answered: Instant::now(),
                            status,
                        },
                    )
                });
            }
            let mut records = Vec::with_capacity(n as usize);
            while let Some(done) = requests.join_next().await {
                records.push(done.expect("a request task"));
            }
            records.sort_unstable_by_key(|(i, _)| *i);
            (s, records.into_iter().map(|(_, r)| r).collect::<Vec<_>>())
        });
    }
    let mut outcomes = vec![Outcome::default(); streams.len()];
    while let Some(done) = schedulers.join_next().await {
        let (s, records) = done.expect("a stream's scheduler");
        outcomes[s].records = records;
    }
    outcomes
}
