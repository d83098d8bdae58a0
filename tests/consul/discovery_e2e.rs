//! End to end over loopback: real hyper servers register in Consul (the API double, or a
//! real agent when `CONSUL_HTTP_ADDR` is set) through the registration guard, with an HTTP
//! check on seawall's health endpoint; a client follows them with `ConsulWatch` and
//! balances over them. Instances are deregistered, fail their check, are killed; the agent
//! stops and restarts; a thousand instances come and go. Every wait is bounded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use seawall::BoxError;
use seawall::balance::{Balance, OutlierDetection};
use seawall::consul::{
    Check, CheckStatus, ConsulClient, ConsulConfig, ConsulWatch, HealthHandle, RegistrationGuard,
    ServiceRegistration, WatchConfig,
};
use seawall::discovery::{Instance, ServiceDiscover, SourceStatus};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tower::{Service, ServiceExt};

use crate::double::{ConsulDouble, agent};

/// A bound on every wait for a condition.
const BOUND: Duration = Duration::from_secs(10);

/// Waits until `f` holds, polling every 10 ms, for at most `BOUND`.
async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) -> Duration {
    let start = Instant::now();
    timeout(BOUND, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
    start.elapsed()
}

/// One instance of the `users` service: answers `/` with its name, `/health` from its
/// `HealthHandle`.
struct Server {
    name: String,
    addr: SocketAddr,
    health: HealthHandle,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

async fn serve(name: &str) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = HealthHandle::new();
    let hits = Arc::new(AtomicUsize::new(0));
    let (endpoint, body, counter) = (health.endpoint(), name.to_owned(), hits.clone());
    let task = tokio::spawn(async move {
        // Connections die with the server: aborting this task drops the set, which aborts
        // them (a pooled keep-alive connection must not outlive a "killed" server).
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let (endpoint, body, counter) = (endpoint.clone(), body.clone(), counter.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut endpoint = endpoint.clone();
                let body = body.clone();
                let counter = counter.clone();
                async move {
                    if req.uri().path() == "/health" {
                        return endpoint.call(req).await;
                    }
                    counter.fetch_add(1, SeqCst);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            connections.spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    Server {
        name: name.to_owned(),
        addr,
        health,
        hits,
        task,
    }
}

impl Server {
    fn registration(&self) -> ServiceRegistration {
        ServiceRegistration::builder("users")
            .id(self.name.clone())
            .address("127.0.0.1")
            .port(self.addr.port())
            .check(
                Check::http(
                    format!("http://{}/health", self.addr),
                    Duration::from_millis(200),
                )
                .timeout(Duration::from_secs(1))
                .initial_status(CheckStatus::Passing),
            )
            .build()
            .unwrap()
    }

    /// Kills the server and returns once it is gone: it stops accepting, and its open
    /// connections are closed with it. `abort` alone only asks: on a multi-thread runtime
    /// the task is dropped later, on a worker, and until then a pooled connection to it
    /// still answers.
    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

type BoxFuture = std::pin::Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;
type Call = Box<dyn Fn(()) -> BoxFuture + Send>;

/// An HTTP client stack for one instance: GET / and the body as text; non-2xx is an error.
fn client_for(
    http: Client<HttpConnector, Full<Bytes>>,
) -> impl FnMut(&Instance) -> tower::util::ServiceFn<Call> + Clone {
    move |instance: &Instance| {
        let http = http.clone();
        let uri: hyper::Uri = format!("http://{}/", instance.authority()).parse().unwrap();
        let f: Call = Box::new(move |()| {
            let (http, uri) = (http.clone(), uri.clone());
            Box::pin(async move {
                let response = timeout(Duration::from_secs(2), http.get(uri)).await??;
                if !response.status().is_success() {
                    return Err(format!("status {}", response.status()).into());
                }
                let body = response.into_body().collect().await?.to_bytes();
                Ok(String::from_utf8(body.to_vec())?)
            })
        });
        tower::service_fn(f)
    }
}

fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn consul(http_addr: &str, token: Option<&str>) -> ConsulClient {
    let mut config = ConsulConfig::builder().address(http_addr);
    if let Some(token) = token {
        config = config.token(token);
    }
    ConsulClient::new(config.build().unwrap())
}

fn watch_config() -> WatchConfig {
    WatchConfig::builder()
        .wait(Duration::from_secs(2))
        .backoff(Duration::from_millis(50), Duration::from_millis(400))
        .build()
        .unwrap()
}

/// Sends `n` requests and counts the answers by body; errors under "error".
async fn spread<S>(lb: &mut S, n: usize) -> HashMap<String, usize>
where
    S: Service<(), Response = String, Error = BoxError>,
{
    let mut seen = HashMap::new();
    for _ in 0..n {
        let answer = match timeout(Duration::from_secs(5), async {
            lb.ready().await?.call(()).await
        })
        .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => "error".to_owned(),
            Err(_) => panic!("a request hung past its bound"),
        };
        *seen.entry(answer).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_deregistration_failed_checks_and_killed_instances() {
    let agent = agent().await;
    let client = consul(&agent.http_addr, agent.token.as_deref());
    let mut servers = [
        serve("users-a").await,
        serve("users-b").await,
        serve("users-c").await,
        serve("users-d").await,
    ];
    let mut guards = Vec::new();
    for s in &servers {
        guards.push(Some(
            RegistrationGuard::register(client.clone(), s.registration())
                .await
                .unwrap(),
        ));
    }

    let watch = ConsulWatch::spawn(client.clone(), "users", watch_config());
    let mut instances = watch.instances();
    timeout(BOUND, instances.wait_for(|i| i.len() == 4))
        .await
        .expect("four instances discovered")
        .unwrap();
    eventually("live status", || watch.status().is_live()).await;

    let mut lb = Balance::builder()
        .name("users")
        .outlier_detection(
            OutlierDetection::builder()
                .consecutive_failures(1)
                .base_ejection_time(Duration::from_secs(30))
                .build()
                .unwrap(),
        )
        .build(ServiceDiscover::new(
            watch.instances(),
            client_for(http_client()),
        ));
    let seen = spread(&mut lb, 200).await;
    for s in &servers {
        assert!(seen.get(&s.name).copied().unwrap_or(0) > 20, "{seen:?}");
    }

    // 1. Deregistered (graceful shutdown: deregister first, then drain): traffic moves
    //    away within one blocking-query round, while the instance still serves.
    let queries_before = watch.requests();
    let guard = guards[0].take().unwrap();
    let drain = tokio::spawn(guard.shutdown(Duration::from_millis(500)));
    let took = eventually("users-a gone from the watch", || {
        instances
            .peek()
            .iter()
            .all(|i| i.id.service_id() != "users-a")
    })
    .await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        watch.requests() - queries_before <= 2,
        "one blocking round (and at most one more) saw the change"
    );
    let hits_a = servers[0].hits.load(SeqCst);
    let seen = spread(&mut lb, 100).await;
    assert!(!seen.contains_key("users-a"), "{seen:?}");
    assert!(!seen.contains_key("error"), "{seen:?}");
    assert_eq!(servers[0].hits.load(SeqCst), hits_a);
    drain.await.unwrap().unwrap();

    // 2. Fails its health check: the agent's next check turns it critical and it leaves.
    servers[1].health.set_unhealthy("maintenance");
    let took = eventually("users-b gone after its check failed", || {
        instances
            .peek()
            .iter()
            .all(|i| i.id.service_id() != "users-b")
    })
    .await;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let seen = spread(&mut lb, 100).await;
    assert!(!seen.contains_key("users-b"), "{seen:?}");
    assert!(!seen.contains_key("error"), "{seen:?}");

    // 3. Killed: the balancer ejects it at the first failure, before Consul notices; then its
    //    check fails and it leaves discovery too. No request hangs.
    servers[2].kill().await;
    let seen = spread(&mut lb, 100).await;
    assert!(seen.get("error").copied().unwrap_or(0) <= 1, "{seen:?}");
    assert!(seen.get("users-d").copied().unwrap_or(0) >= 99, "{seen:?}");
    eventually("users-c gone after it was killed", || {
        instances
            .peek()
            .iter()
            .all(|i| i.id.service_id() != "users-c")
    })
    .await;
    lb.ready().await.unwrap(); // discovery changes are applied in poll_ready
    assert_eq!(lb.len(), 1);

    // 4. Back: users-b recovers and is discovered again.
    servers[1].health.set_healthy();
    eventually("users-b back", || {
        instances
            .peek()
            .iter()
            .any(|i| i.id.service_id() == "users-b")
    })
    .await;
    let seen = spread(&mut lb, 100).await;
    assert!(seen.get("users-b").copied().unwrap_or(0) > 20, "{seen:?}");

    for guard in guards.into_iter().flatten() {
        guard.deregister().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_rides_out_an_agent_restart() {
    let double = ConsulDouble::start().await;
    let client = consul(&double.http_addr(), None);
    let a = serve("users-a").await;
    let _guard_a = RegistrationGuard::register(client.clone(), a.registration())
        .await
        .unwrap();
    let watch = ConsulWatch::spawn(client.clone(), "users", watch_config());
    let mut instances = watch.instances();
    timeout(BOUND, instances.wait_for(|i| i.len() == 1))
        .await
        .unwrap()
        .unwrap();
    let mut lb: Balance<_> = Balance::builder().build(ServiceDiscover::new(
        watch.instances(),
        client_for(http_client()),
    ));
    assert_eq!(spread(&mut lb, 10).await.get("users-a"), Some(&10));

    // The agent goes down: the watch reports stale, keeps the last instances, and the
    // balancer keeps serving.
    double.stop().await;
    eventually("stale status", || {
        matches!(watch.status(), SourceStatus::Stale { .. })
    })
    .await;
    assert_eq!(instances.peek().len(), 1);
    assert_eq!(spread(&mut lb, 10).await.get("users-a"), Some(&10));

    // It comes back (index jumped): the watch recovers by itself and sees new instances.
    double.restart().await;
    eventually("live again", || watch.status().is_live()).await;
    let b = serve("users-b").await;
    let _guard_b = RegistrationGuard::register(client.clone(), b.registration())
        .await
        .unwrap();
    eventually("users-b discovered after the restart", || {
        instances.peek().len() == 2
    })
    .await;
    let seen = spread(&mut lb, 100).await;
    assert!(seen.get("users-b").copied().unwrap_or(0) > 20, "{seen:?}");
    assert!(!seen.contains_key("error"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_instances_come_and_go() {
    let double = ConsulDouble::start().await;
    let client = consul(&double.http_addr(), None);
    let watch = ConsulWatch::spawn(client, "echo", watch_config());
    let discover = ServiceDiscover::new(watch.instances(), |i: &Instance| {
        let port = i.port;
        tower::service_fn(move |()| async move { Ok::<_, BoxError>(port) })
    });
    let mut lb = Balance::builder().name("echo").build(discover);

    let start = Instant::now();
    for i in 0..1000u16 {
        let node = format!("node-{}", i % 50);
        double
            .register_on_node(
                &node,
                &format!("10.0.{}.{}", i / 250, i % 250 + 1),
                serde_json::json!({
                    "Name": "echo",
                    "ID": "echo",
                    "Port": 20000 + i,
                    "Check": { "TTL": "30s", "Status": "passing" },
                }),
            )
            .ok();
        // Same service ID on 50 nodes: identities are (node, ID), so IDs repeat per node.
        let _ = double.deregister_on_node(&node, "never-registered");
    }
    // Same ID "echo" on each node replaces per node: 50 distinct instances.
    let mut instances = watch.instances();
    timeout(BOUND, instances.wait_for(|i| i.len() == 50))
        .await
        .expect("50 node-distinct instances")
        .unwrap();

    // Now 1,000 distinct IDs.
    for i in 0..1000u16 {
        double
            .register_on_node(
                &format!("node-{}", i % 50),
                &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                serde_json::json!({
                    "Name": "echo",
                    "ID": format!("echo-{i}"),
                    "Port": 30000 + i,
                    "Check": { "TTL": "30s", "Status": "passing" },
                }),
            )
            .unwrap();
    }
    timeout(BOUND, instances.wait_for(|i| i.len() == 1050))
        .await
        .expect("1,050 instances")
        .unwrap();
    let followed = start.elapsed();
    lb.ready().await.unwrap();
    assert_eq!(lb.len(), 1050);
    let mut ports = std::collections::HashSet::new();
    for _ in 0..5000 {
        ports.insert(lb.ready().await.unwrap().call(()).await.unwrap());
    }
    assert!(
        ports.len() > 900,
        "requests spread over {} endpoints",
        ports.len()
    );

    // Half of them leave.
    for i in (0..1000u16).step_by(2) {
        assert!(double.deregister_on_node(&format!("node-{}", i % 50), &format!("echo-{i}")));
    }
    timeout(BOUND, instances.wait_for(|i| i.len() == 550))
        .await
        .expect("550 instances")
        .unwrap();
    lb.ready().await.unwrap();
    assert_eq!(lb.len(), 550);
    for _ in 0..2000 {
        let port = lb.ready().await.unwrap().call(()).await.unwrap();
        assert!(
            port < 30000 || (port - 30000) % 2 == 1,
            "{port} was deregistered"
        );
    }
    eprintln!("1,050 instances followed in {followed:?}");
}
