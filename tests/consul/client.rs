//! The Consul client, registration guard and watch against the Consul API double (or a
//! real agent when `CONSUL_HTTP_ADDR` is set: tests that need the double's controls are
//! skipped then).

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::double::{ConsulDouble, DoubleOptions, TestAgent, agent};
use seawall::consul::{
    Check, CheckStatus, ConsulClient, ConsulConfig, ConsulWatch, GuardConfig, HealthQuery,
    RegistrationGuard, ServiceRegistration, WatchConfig,
};
use seawall::discovery::{Health, Instance, InstanceWatch, SourceStatus};
use serde_json::json;
use tokio::time::{Instant, timeout};

/// The longest any single condition is waited for.
const PATIENCE: Duration = Duration::from_secs(5);

/// A service name unique to this test run (a real agent is shared between runs).
fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "seawall-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn client_for(addr: &str, token: Option<&str>) -> ConsulClient {
    let mut config = ConsulConfig::builder()
        .address(addr)
        .request_timeout(Duration::from_secs(3));
    if let Some(token) = token {
        config = config.token(token);
    }
    ConsulClient::new(config.build().expect("valid config"))
}

/// A client of the test agent (with `CONSUL_HTTP_TOKEN` for a real one).
fn client(agent: &TestAgent) -> ConsulClient {
    client_for(&agent.http_addr, agent.token.as_deref())
}

/// Short waits, a quick token bucket and a bounded backoff: every test stays fast.
fn quick_watch() -> WatchConfig {
    WatchConfig::builder()
        .wait(Duration::from_secs(2))
        .min_interval(Duration::from_millis(20), 2)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .expect("valid watch config")
}

/// An instance of `service` on loopback with a TTL check that starts passing.
pub(crate) fn instance(service: &str, id: &str, port: u16) -> ServiceRegistration {
    ServiceRegistration::builder(service)
        .id(id)
        .address("127.0.0.1")
        .port(port)
        .check(
            Check::ttl(Duration::from_secs(60))
                .id(format!("{id}:ttl"))
                .initial_status(CheckStatus::Passing),
        )
        .build()
        .expect("valid registration")
}

/// Waits until `f` holds, polling; fails the test after `within`. Returns how long it took.
async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the watched snapshot satisfies `f`; returns how long it took.
async fn watch_until(
    watch: &mut InstanceWatch,
    what: &str,
    within: Duration,
    f: impl FnMut(&[Instance]) -> bool,
) -> Duration {
    let start = Instant::now();
    match timeout(within, watch.wait_for(f)).await {
        Ok(Ok(_)) => start.elapsed(),
        Ok(Err(closed)) => panic!("{what}: {closed}"),
        Err(_) => panic!(
            "timed out after {within:?} waiting for {what}; have {:?}",
            watch.peek()
        ),
    }
}

fn ids(instances: &[Instance]) -> Vec<String> {
    instances
        .iter()
        .map(|i| i.id.service_id().to_owned())
        .collect()
}

async fn registered(client: &ConsulClient, id: &str) -> bool {
    client
        .agent_services()
        .await
        .expect("agent services")
        .iter()
        .any(|s| s.id == id)
}

/// A registration body for the double's `register_on_node`.
fn node_registration(service: &str, id: &str, port: u16, check: Option<&str>) -> serde_json::Value {
    let mut body = json!({ "ID": id, "Name": service, "Port": port });
    if let Some(check_id) = check {
        body["Check"] = json!({ "CheckID": check_id, "TTL": "10m", "Status": "passing" });
    }
    body
}

// --- registration -------------------------------------------------------------------

#[tokio::test]
async fn register_and_deregister() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("reg");
    let registration = ServiceRegistration::builder(&service)
        .id(format!("{service}-1"))
        .address("127.0.0.1")
        .port(9001)
        .tag("v1")
        .meta("version", "1")
        .weights(5, 1)
        .check(Check::ttl(Duration::from_secs(30)).id(format!("{service}:ttl")))
        .build()
        .unwrap();
    client.register(&registration).await.unwrap();
    // Idempotent.
    client.register(&registration).await.unwrap();
    let services = client.agent_services().await.unwrap();
    let mine = services
        .iter()
        .find(|s| s.id == registration.id())
        .expect("registered");
    assert_eq!(mine.service, service);
    assert_eq!(mine.port, 9001);
    assert_eq!(mine.tags, ["v1"]);

    // A TTL check starts critical: the instance is known but not healthy.
    let all = client
        .health_service(&HealthQuery::new(&service))
        .await
        .unwrap();
    assert!(all.instances.is_empty());
    assert_eq!(all.unhealthy, 1);
    assert!(all.index >= 1);
    client
        .check_pass(&format!("{service}:ttl"), Some("ready"))
        .await
        .unwrap();
    let healthy = client
        .health_service(&HealthQuery::new(&service).passing(true))
        .await
        .unwrap();
    assert_eq!(ids(&healthy.instances), [format!("{service}-1")]);
    assert_eq!(healthy.instances[0].weight.get(), 5);
    assert_eq!(&*healthy.instances[0].address, "127.0.0.1");

    client.deregister(registration.id()).await.unwrap();
    assert!(!registered(&client, registration.id()).await);
    // Deregistering again is no error (a 404 `Unknown service ID` or a 200).
    client.deregister(registration.id()).await.unwrap();
}

#[tokio::test]
async fn deregistering_an_unknown_service_tolerates_404_and_200() {
    for is_404 in [true, false] {
        let double = ConsulDouble::start_with(DoubleOptions {
            deregister_unknown_is_404: is_404,
            ..DoubleOptions::default()
        })
        .await;
        let client = client_for(&double.http_addr(), None);
        client.deregister("never-registered").await.unwrap();
        assert_eq!(double.request_count("/v1/agent/service/deregister/"), 1);
    }
}

#[tokio::test]
async fn invalid_registrations_are_typed_errors() {
    let agent = agent().await;
    let client = client(&agent);
    // Refused before anything is sent.
    let e = ServiceRegistration::builder("")
        .build()
        .expect_err("empty name");
    assert_eq!(e.field(), "name");
    let e = ServiceRegistration::builder("s")
        .check(Check::http("http://127.0.0.1:1/health", Duration::ZERO))
        .build()
        .expect_err("zero interval");
    assert_eq!(e.field(), "checks[0].interval", "{e:?}");

    // Refused by the agent: a 400 with its reason, as a status error.
    let Some(double) = &agent.double else { return };
    double.fail_next(1, 400, "Invalid check: TTL must be > 0");
    let e = client
        .register(&instance(&unique("bad"), "bad-1", 1))
        .await
        .expect_err("refused");
    assert!(e.is_status());
    assert_eq!(e.status_code(), Some(400));
    assert_eq!(e.body(), Some("Invalid check: TTL must be > 0"));
}

#[tokio::test]
async fn acl_token_is_sent_and_a_refusal_is_typed() {
    let double = ConsulDouble::start_with(DoubleOptions {
        acl_token: Some("s3cret-token".into()),
        ..DoubleOptions::default()
    })
    .await;
    let service = unique("acl");
    let anonymous = client_for(&double.http_addr(), None);
    let e = anonymous
        .register(&instance(&service, "acl-1", 1))
        .await
        .expect_err("no token");
    assert!(e.is_permission_denied(), "{e:?}");

    let wrong = client_for(&double.http_addr(), Some("wrong"));
    let e = wrong
        .health_service(&HealthQuery::new(&service))
        .await
        .expect_err("wrong token");
    assert_eq!(e.status_code(), Some(403));

    let authorized = client_for(&double.http_addr(), Some("s3cret-token"));
    authorized
        .register(&instance(&service, "acl-1", 1))
        .await
        .unwrap();
    let requests = double.requests();
    let last = requests.last().expect("recorded");
    assert_eq!(last.token.as_deref(), Some("s3cret-token"));
    assert!(!format!("{authorized:?}").contains("s3cret"));
}

/// Registers a service from its JSON `body` with a plain HTTP/1.1 `PUT`, as a program
/// other than seawall would; panics unless the agent answers `200`.
async fn register_raw(agent: &TestAgent, body: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&agent.http_addr)
        .await
        .unwrap();
    let token = agent
        .token
        .as_deref()
        .map(|t| format!("X-Consul-Token: {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "PUT /v1/agent/service/register HTTP/1.1\r\nHost: {}\r\n{token}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        agent.http_addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the agent answers")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// An instance registered with an address no request can go to (a port in it, spaces,
/// an IPv6 zone) is left out of the answer's instances and reported as skipped: taken,
/// every call to it failed, each counted against it. Host names and IPv6 addresses, bare
/// or in brackets, are kept.
#[tokio::test]
async fn an_address_no_request_can_go_to_is_skipped() {
    use seawall::consul::SkipReason;
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("addresses");
    let addresses = [
        ("good-v4", "127.0.0.1", true),
        ("good-name", "users.service.consul", true),
        ("good-v6", "::1", true),
        ("good-v6-brackets", "[::1]", true),
        ("with-port", "10.0.0.1:8080", false),
        ("spaces", " 10.0.0.2", false),
        ("zone", "fe80::1%eth0", false),
        ("path", "10.0.0.3/admin", false),
    ];
    for (id, address, _) in addresses {
        // Registered by another program: seawall's builder refuses the bad addresses.
        let body = format!(
            r#"{{"Name":"{service}","ID":"{id}","Address":"{}","Port":9004}}"#,
            address.replace('\\', "\\\\").replace('"', "\\\"")
        );
        register_raw(&agent, &body).await;
    }
    let answer = client
        .health_service(&HealthQuery::new(&service))
        .await
        .unwrap();
    let mut kept: Vec<&str> = answer.instances.iter().map(|i| i.id.service_id()).collect();
    kept.sort_unstable();
    let mut expected: Vec<&str> = addresses
        .iter()
        .filter(|(_, _, ok)| *ok)
        .map(|(id, _, _)| *id)
        .collect();
    expected.sort_unstable();
    assert_eq!(kept, expected);
    let mut skipped: Vec<(&str, SkipReason)> = answer
        .skipped
        .iter()
        .map(|s| (s.service_id.as_str(), s.reason))
        .collect();
    skipped.sort_unstable_by_key(|s| s.0);
    assert_eq!(
        skipped,
        [
            ("path", SkipReason::BadAddress),
            ("spaces", SkipReason::BadAddress),
            ("with-port", SkipReason::BadAddress),
            ("zone", SkipReason::BadAddress),
        ]
    );
}

// --- registration guard -------------------------------------------------------------

/// A heartbeat no shorter than a TTL check would let the check lapse to critical between
/// reports, over and over: refused before anything is sent. (It was taken, and the
/// instance flapped in and out of the passing set.)
#[tokio::test]
async fn a_heartbeat_not_shorter_than_a_ttl_is_refused() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("slow-heartbeat");
    let registration = ServiceRegistration::builder(&service)
        .id(format!("{service}-1"))
        .address("127.0.0.1")
        .port(9005)
        .check(Check::ttl(Duration::from_secs(10)).id(format!("{service}:ttl")))
        .build()
        .unwrap();
    let config = GuardConfig::builder()
        .heartbeat(Duration::from_secs(10))
        .build()
        .unwrap();
    let e = RegistrationGuard::register_with(client.clone(), registration, config)
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e:?}");
    assert_eq!(e.config_error().unwrap().field(), "heartbeat", "{e}");
    let answer = client
        .health_service(&HealthQuery::new(&service))
        .await
        .unwrap();
    assert!(answer.instances.is_empty(), "nothing was registered");
}

/// Setting the status the checks already have (a readiness probe's result, set on
/// every request) sends nothing: each set sent an update at once, which the agent writes
/// to disk, and while the agent was down each skipped the heartbeat's back-off. A change
/// is still reported at once.
#[tokio::test]
async fn setting_the_same_status_again_sends_no_update() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("same-status");
    let registration = ServiceRegistration::builder(&service)
        .id(format!("{service}-1"))
        .address("127.0.0.1")
        .port(9003)
        // A heartbeat every 20 s: none falls within the test.
        .check(Check::ttl(Duration::from_secs(60)).id(format!("{service}:ttl")))
        .build()
        .unwrap();
    let guard = RegistrationGuard::register(client.clone(), registration)
        .await
        .unwrap();
    let before = guard.heartbeats();
    for _ in 0..50 {
        guard.set_status(CheckStatus::Passing, None);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    guard.set_status(CheckStatus::Warning, Some("slow"));
    eventually("the warning to be reported", PATIENCE, || {
        let (client, service) = (client.clone(), service.clone());
        async move {
            client
                .health_service(&HealthQuery::new(&service))
                .await
                .is_ok_and(|r| {
                    r.instances
                        .first()
                        .is_some_and(|i| i.health == Health::Warning)
                })
        }
    })
    .await;
    assert_eq!(
        guard.heartbeats(),
        before + 1,
        "one update: the change to warning"
    );
    guard.shutdown(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn ttl_heartbeat_keeps_the_check_passing_and_set_status_flips_it() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("ttl");
    let ttl = Duration::from_millis(600);
    let registration = ServiceRegistration::builder(&service)
        .id(format!("{service}-1"))
        .address("127.0.0.1")
        .port(9002)
        .weights(10, 3)
        .check(Check::ttl(ttl).id(format!("{service}:ttl")))
        .build()
        .unwrap();
    let guard = RegistrationGuard::register(client.clone(), registration)
        .await
        .unwrap();
    let passing = |client: ConsulClient, service: String| async move {
        client
            .health_service(&HealthQuery::new(&service).passing(true))
            .await
            .map(|r| r.instances.len())
            .unwrap_or(0)
    };
    // Passing at once (the guard reports before returning), and still passing after
    // several TTLs: the heartbeat (every ttl/3) keeps it alive.
    assert_eq!(passing(client.clone(), service.clone()).await, 1);
    let start = Instant::now();
    eventually("heartbeats over 3 TTLs", PATIENCE, || {
        let done = start.elapsed() > ttl * 3 && guard.heartbeats() >= 7;
        async move { done }
    })
    .await;
    assert_eq!(passing(client.clone(), service.clone()).await, 1);
    if let Some(double) = &agent.double {
        assert_eq!(
            double.check_status(&format!("{service}:ttl")).as_deref(),
            Some("passing")
        );
    }

    // Critical: out of the passing set, at once.
    guard.set_status(CheckStatus::Critical, Some("database down"));
    eventually("the check to turn critical", PATIENCE, || {
        let (client, service) = (client.clone(), service.clone());
        async move { passing(client, service).await == 0 }
    })
    .await;
    // Warning: visible to a query that accepts it, with the warning weight.
    guard
        .status_handle()
        .set_status(CheckStatus::Warning, Some("slow"));
    eventually("the check to warn", PATIENCE, || {
        let client = client.clone();
        let service = service.clone();
        async move {
            client
                .health_service(&HealthQuery::new(&service))
                .await
                .is_ok_and(|r| {
                    r.instances.len() == 1
                        && r.instances[0].health == Health::Warning
                        && r.instances[0].weight.get() == 3
                })
        }
    })
    .await;
    guard.deregister().await.unwrap();
}

#[tokio::test]
async fn the_guard_registers_again_when_the_agent_lost_the_registration() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("lost");
    let id = format!("{service}-1");
    let guard = RegistrationGuard::register_with(
        client.clone(),
        instance(&service, &id, 9003),
        GuardConfig::builder()
            .heartbeat(Duration::from_millis(50))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(guard.registrations(), 1);
    // The agent forgets the service (as after a restart without its data directory):
    // the next heartbeat hears "unknown check" and registers again.
    client.deregister(&id).await.unwrap();
    eventually("a re-registration", PATIENCE, || {
        let n = guard.registrations();
        async move { n >= 2 }
    })
    .await;
    assert!(registered(&client, &id).await);
    guard.deregister().await.unwrap();
}

#[tokio::test]
async fn shutdown_deregisters_before_the_grace_period_ends() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("drain");
    let id = format!("{service}-1");
    let guard = RegistrationGuard::register(client.clone(), instance(&service, &id, 9004))
        .await
        .unwrap();
    assert!(registered(&client, &id).await);
    let grace = Duration::from_millis(1500);
    let start = Instant::now();
    let shutdown = tokio::spawn(guard.shutdown(grace));
    let took = eventually("the deregistration", PATIENCE, || {
        let client = client.clone();
        let id = id.clone();
        async move { !registered(&client, &id).await }
    })
    .await;
    // Gone while the service is still draining.
    assert!(took < grace, "deregistered after {took:?}");
    assert!(!shutdown.is_finished());
    shutdown.await.unwrap().unwrap();
    assert!(start.elapsed() >= grace);
}

#[tokio::test]
async fn dropping_the_guard_deregisters() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("drop");
    let id = format!("{service}-1");
    let guard = RegistrationGuard::register(client.clone(), instance(&service, &id, 9005))
        .await
        .unwrap();
    assert!(registered(&client, &id).await);
    drop(guard);
    eventually("the deregistration", PATIENCE, || {
        let client = client.clone();
        let id = id.clone();
        async move { !registered(&client, &id).await }
    })
    .await;
}

/// A raw HTTP/1.1 agent that sends each request line it receives to `lines` as soon as it
/// has it (the agent acts on the request), then answers `200` after `delay(line)` (its
/// answer is slow).
async fn slow_agent(
    delay: fn(&str) -> Duration,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let _ = tx.send(line.clone());
                tokio::time::sleep(delay(&line)).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// An agent's error answer is read only as far as the error keeps of it, and not waited
/// on for long: an agent (or a proxy in front of it) answering `500` with a body that
/// goes on and on used to be read to the client's 64 MiB cap or to the request's time
/// limit, whichever came first, and the request failed as a timeout, the status lost.
/// It fails with the status, whether the body's first bytes are many (past what the
/// error keeps) or few ("No cluster leader", then nothing).
#[tokio::test]
async fn an_error_answer_with_an_endless_body_fails_with_its_status() {
    use seawall::consul::ErrorKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for text in [
        "rpc error: no leader ".repeat(200),
        "No cluster leader".to_owned(),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let chunk = text.clone();
        let agent = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let chunk = chunk.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n\
                         {:x}\r\n{chunk}\r\n",
                        chunk.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    // The body never ends (the connection stays open past the test).
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        // The request's own limit is 3 s.
        let client = client_for(&addr, None);
        let answer = tokio::time::timeout(Duration::from_secs(2), client.agent_services())
            .await
            .expect("the error answer's body was waited on to the request's limit");
        let error = answer.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Status, "{error}");
        assert_eq!(error.status_code(), Some(500));
        let start = &text[..text.len().min(100)];
        assert!(error.to_string().contains(start.trim()), "{error}");
        agent.abort();
    }
}

/// A timeout around `register` that fires while the register request is in flight (the
/// agent has it, its answer is slow) must not leave the service registered with nobody to
/// remove it.
#[tokio::test]
async fn a_timeout_around_register_does_not_leave_the_service_registered() {
    let (addr, mut lines) = slow_agent(|line| {
        if line.contains("/v1/agent/service/register") {
            Duration::from_secs(60)
        } else {
            Duration::ZERO
        }
    })
    .await;
    let registration = ServiceRegistration::builder("svc")
        .id("svc-1")
        .address("127.0.0.1")
        .port(8080)
        .build()
        .unwrap();
    let register = RegistrationGuard::register(client_for(&addr, None), registration);
    // The "timeout" fires exactly once the agent has the registration.
    tokio::select! {
        _ = register => panic!("the agent's answer is 60 s away"),
        line = lines.recv() => {
            let line = line.unwrap();
            assert!(line.contains("/v1/agent/service/register"), "{line}");
        }
    }
    let line = timeout(PATIENCE, lines.recv())
        .await
        .expect("the service the agent registered was never deregistered")
        .unwrap();
    assert!(
        line.contains("/v1/agent/service/deregister/svc-1"),
        "{line}"
    );
}

/// A registration the agent refuses (a `4xx`: a bad definition, an ACL denial) registered
/// nothing: nothing is deregistered for it, so an earlier registration under the same ID
/// (this instance's previous run, say) stays.
#[tokio::test]
async fn a_refused_registration_deregisters_nothing() {
    let double = ConsulDouble::start_with(DoubleOptions::default()).await;
    let client = client_for(&double.http_addr(), None);
    let service = unique("refused");
    client
        .register(&instance(&service, "r-1", 9201))
        .await
        .unwrap();
    double.fail_next(1, 400, "Invalid check: TTL must be > 0");
    let e = RegistrationGuard::register(client.clone(), instance(&service, "r-1", 9201))
        .await
        .expect_err("refused");
    assert_eq!(e.status_code(), Some(400));
    // Two round trips later a deregistration spawned for the refusal would be in.
    tokio::task::yield_now().await;
    for _ in 0..2 {
        client
            .health_service(&HealthQuery::new(&service))
            .await
            .unwrap();
    }
    let requests = double.requests();
    assert!(
        !requests.iter().any(|r| r.path.contains("deregister")),
        "{:?}",
        requests.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let answer = client
        .health_service(&HealthQuery::new(&service))
        .await
        .unwrap();
    assert_eq!(answer.instances.len(), 1, "the earlier registration stays");
}

// --- watch --------------------------------------------------------------------------

#[tokio::test]
async fn the_watch_reacts_within_one_blocking_round() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("watch");
    let config = WatchConfig::builder()
        .wait(Duration::from_secs(5))
        .min_interval(Duration::from_millis(20), 2)
        .build()
        .unwrap();
    let watch = ConsulWatch::spawn(client.clone(), &service, config);
    let mut instances = watch.instances();
    let mut status = instances.status_receiver();
    timeout(PATIENCE, status.wait_for(SourceStatus::is_live))
        .await
        .expect("live")
        .unwrap();
    assert!(instances.current().is_empty());

    // Each change arrives well before the 5 s wait would have ended the blocked query.
    let round = Duration::from_secs(2);
    client
        .register(&instance(&service, "a", 9101))
        .await
        .unwrap();
    watch_until(&mut instances, "a", round, |s| ids(s) == ["a"]).await;
    client
        .register(&instance(&service, "b", 9102))
        .await
        .unwrap();
    let took = watch_until(&mut instances, "a and b", round, |s| ids(s) == ["a", "b"]).await;
    eprintln!("instance added: seen after {took:?}");
    client.check_fail("b:ttl", Some("boom")).await.unwrap();
    watch_until(&mut instances, "b critical", round, |s| ids(s) == ["a"]).await;
    client.check_pass("b:ttl", None).await.unwrap();
    watch_until(&mut instances, "b back", round, |s| ids(s) == ["a", "b"]).await;
    client.deregister("a").await.unwrap();
    watch_until(&mut instances, "a gone", round, |s| ids(s) == ["b"]).await;
    client.deregister("b").await.unwrap();
    watch_until(&mut instances, "none", round, <[_]>::is_empty).await;
    assert!(watch.index() >= 1);
    assert!(watch.status().is_live());
}

#[tokio::test]
async fn the_watch_can_include_warning_instances() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("warn");
    let registration = ServiceRegistration::builder(&service)
        .id("w")
        .address("127.0.0.1")
        .port(9103)
        .weights(10, 2)
        .check(Check::ttl(Duration::from_secs(60)).id("w:ttl"))
        .build()
        .unwrap();
    let guard = RegistrationGuard::register(client.clone(), registration)
        .await
        .unwrap();
    let passing_only = ConsulWatch::spawn(client.clone(), &service, quick_watch());
    let with_warning = ConsulWatch::spawn(
        client.clone(),
        &service,
        WatchConfig::builder()
            .wait(Duration::from_secs(2))
            .min_interval(Duration::from_millis(20), 2)
            .include_warning(true)
            .build()
            .unwrap(),
    );
    let (mut p, mut w) = (passing_only.instances(), with_warning.instances());
    watch_until(&mut p, "passing", PATIENCE, |s| {
        s.len() == 1 && s[0].weight.get() == 10
    })
    .await;
    guard.set_status(CheckStatus::Warning, Some("degraded"));
    watch_until(&mut w, "warning instance", PATIENCE, |s| {
        s.len() == 1 && s[0].health == Health::Warning && s[0].weight.get() == 2
    })
    .await;
    watch_until(&mut p, "no passing instance", PATIENCE, <[_]>::is_empty).await;
    guard.deregister().await.unwrap();
}

#[tokio::test]
async fn the_watch_follows_node_health_and_keys_by_node() {
    let agent = agent().await;
    let Some(double) = &agent.double else { return };
    let service = unique("nodes");
    // The same service ID on two nodes is two instances.
    double
        .register_on_node(
            "node-a",
            "10.0.0.1",
            node_registration(&service, "web", 80, None),
        )
        .unwrap();
    double
        .register_on_node(
            "node-b",
            "10.0.0.2",
            node_registration(&service, "web", 80, None),
        )
        .unwrap();
    let watch = ConsulWatch::spawn(client(&agent), &service, quick_watch());
    let mut instances = watch.instances();
    watch_until(&mut instances, "two nodes", PATIENCE, |s| s.len() == 2).await;
    let now = instances.current();
    assert_eq!(now[0].id.node(), "node-a");
    assert_eq!(now[1].id.node(), "node-b");
    assert_eq!(now[0].id.service_id(), now[1].id.service_id());
    // The address falls back to the node's.
    assert_eq!(&*now[1].address, "10.0.0.2");

    // node-b fails serfHealth: its instance goes, node-a's stays.
    double.set_node_health("node-b", false);
    watch_until(&mut instances, "node-b out", Duration::from_secs(1), |s| {
        s.len() == 1 && s[0].id.node() == "node-a"
    })
    .await;
    double.set_node_health("node-b", true);
    watch_until(&mut instances, "node-b back", Duration::from_secs(1), |s| {
        s.len() == 2
    })
    .await;
    assert!(double.deregister_on_node("node-a", "web"));
    watch_until(&mut instances, "node-a gone", Duration::from_secs(1), |s| {
        s.len() == 1 && s[0].id.node() == "node-b"
    })
    .await;
}

#[tokio::test]
async fn the_index_resets_when_it_goes_backwards_and_is_never_sent_below_1() {
    let agent = agent().await;
    let Some(double) = &agent.double else { return };
    let service = unique("index");
    let path = format!("/v1/health/service/{service}");
    double.set_index(1000);
    let watch = ConsulWatch::spawn(client(&agent), &service, quick_watch());
    let mut instances = watch.instances();
    eventually("index 1000", PATIENCE, || {
        let i = watch.index();
        async move { i >= 1000 }
    })
    .await;

    // The index goes backwards (a restored snapshot): the blocked query ends at most one
    // wait later with a lower index, the watch restarts from 1, sees the change, and
    // follows the new, lower index.
    double.set_index(5);
    double
        .register_on_node(
            "node-z",
            "10.0.0.9",
            node_registration(&service, "z", 80, None),
        )
        .unwrap();
    watch_until(&mut instances, "z", Duration::from_secs(4), |s| {
        ids(s) == ["z"]
    })
    .await;
    let sent = || -> Vec<Option<u64>> {
        double
            .requests()
            .iter()
            .filter(|r| r.path == path)
            .map(|r| query_index(&r.query))
            .collect()
    };
    // Then blocks on the new, lower index.
    eventually("a restart from 1, then the lower index", PATIENCE, || {
        let sent = sent();
        let restarted = sent.iter().position(|i| *i == Some(1));
        let followed = restarted.is_some_and(|at| {
            sent[at + 1..]
                .iter()
                .any(|i| i.is_some_and(|i| (5..1000).contains(&i)))
        });
        async move { followed }
    })
    .await;
    let sent = sent();
    assert!(
        sent.iter().all(|i| *i != Some(0)),
        "an index of 0 was sent: {sent:?}"
    );
    assert!((5..1000).contains(&watch.index()));
}

fn query_index(query: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("index="))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_minimum_interval_holds_when_answers_come_at_once() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("rate");
    // A resync due at every query: each one is a full, non-blocking query answered at
    // once, so only the token bucket paces the loop.
    let interval = Duration::from_millis(100);
    let config = WatchConfig::builder()
        .wait(Duration::from_secs(2))
        .min_interval(interval, 2)
        .resync_interval(Duration::from_nanos(1))
        .build()
        .unwrap();
    let start = Instant::now();
    let watch = ConsulWatch::spawn(client, &service, config);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let elapsed = start.elapsed();
    let sent = watch.requests();
    let allowed = 2 + (elapsed.as_millis() / interval.as_millis()) as u64 + 1;
    assert!(
        sent <= allowed,
        "{sent} queries in {elapsed:?} (allowed {allowed})"
    );
    assert!(sent >= 5, "the loop stalled: {sent} queries in {elapsed:?}");
    if let Some(double) = &agent.double {
        let seen = double.request_count(&format!("/v1/health/service/{service}")) as u64;
        assert!(seen <= allowed, "{seen} queries reached the agent");
    }
}

#[tokio::test]
async fn the_watch_keeps_the_last_instances_while_the_agent_is_down_and_recovers() {
    let agent = agent().await;
    let Some(double) = &agent.double else { return };
    let client = client(&agent);
    let service = unique("outage");
    client
        .register(&instance(&service, "o-1", 9201))
        .await
        .unwrap();
    let watch = ConsulWatch::spawn(client.clone(), &service, quick_watch());
    let mut instances = watch.instances();
    let mut status = instances.status_receiver();
    watch_until(&mut instances, "o-1", PATIENCE, |s| ids(s) == ["o-1"]).await;

    double.stop().await;
    // Failures pile up at a bounded pace: the backoff (20 ms doubling, capped at 200 ms)
    // reaches 8 failures in about a second, where an uncapped one would take 5 s.
    timeout(
        Duration::from_secs(3),
        status.wait_for(|s| matches!(s, SourceStatus::Stale { failures, .. } if *failures >= 8)),
    )
    .await
    .expect("stale with 8 failures within 3 s")
    .unwrap();
    let SourceStatus::Stale { error, .. } = watch.status() else {
        panic!("not stale: {:?}", watch.status());
    };
    assert!(!error.is_empty());
    // The last instances are kept.
    assert_eq!(ids(&instances.peek()), ["o-1"]);

    double.restart().await;
    let start = Instant::now();
    timeout(
        Duration::from_secs(2),
        status.wait_for(SourceStatus::is_live),
    )
    .await
    .expect("live again")
    .unwrap();
    eprintln!("recovered {:?} after the restart", start.elapsed());
    assert_eq!(ids(&instances.peek()), ["o-1"]);
    // And follows changes again.
    client
        .register(&instance(&service, "o-2", 9202))
        .await
        .unwrap();
    watch_until(&mut instances, "o-2", PATIENCE, |s| s.len() == 2).await;
}

#[tokio::test]
async fn server_errors_make_the_watch_stale_then_live() {
    let agent = agent().await;
    let Some(double) = &agent.double else { return };
    let service = unique("leaderless");
    let watch = ConsulWatch::spawn(client(&agent), &service, quick_watch());
    let mut status = watch.instances().status_receiver();
    timeout(PATIENCE, status.wait_for(SourceStatus::is_live))
        .await
        .expect("live")
        .unwrap();
    double.fail_next(3, 500, "No cluster leader");
    // Wake the blocked query.
    double
        .register_on_node(
            "node-q",
            "10.0.0.3",
            node_registration(&service, "q", 80, None),
        )
        .unwrap();
    let stale = timeout(PATIENCE, status.wait_for(|s| !s.is_live()))
        .await
        .expect("stale")
        .unwrap()
        .clone();
    match stale {
        SourceStatus::Stale { error, .. } => {
            assert!(error.contains("No cluster leader"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    timeout(PATIENCE, status.wait_for(SourceStatus::is_live))
        .await
        .expect("live again")
        .unwrap();
    let mut instances = watch.instances();
    watch_until(&mut instances, "q", PATIENCE, |s| ids(s) == ["q"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_instances() {
    let agent = agent().await;
    let Some(double) = &agent.double else { return };
    let service = unique("many");
    let start = Instant::now();
    for n in 0..1000u16 {
        let node = format!("node-{}", n % 10);
        let address = format!("10.0.{}.1", n % 10);
        double
            .register_on_node(
                &node,
                &address,
                node_registration(
                    &service,
                    &format!("i-{n}"),
                    1000 + n,
                    Some(&format!("i-{n}:ttl")),
                ),
            )
            .unwrap();
    }
    let registered_in = start.elapsed();

    let start = Instant::now();
    // A 10 s wait: a change seen well before it woke the blocked query.
    let config = WatchConfig::builder()
        .wait(Duration::from_secs(10))
        .min_interval(Duration::from_millis(20), 2)
        .build()
        .unwrap();
    let watch = ConsulWatch::spawn(client(&agent), &service, config);
    let mut instances = watch.instances();
    watch_until(&mut instances, "1000 instances", PATIENCE, |s| {
        s.len() == 1000
    })
    .await;
    let first = start.elapsed();

    // One check turns critical: the watch follows within one round.
    let start = Instant::now();
    assert!(double.set_check_status("i-500:ttl", "critical", "down"));
    watch_until(&mut instances, "999 instances", PATIENCE, |s| {
        s.len() == 999
    })
    .await;
    let change = start.elapsed();

    let start = Instant::now();
    assert!(double.deregister_on_node("node-1", "i-1"));
    watch_until(&mut instances, "998 instances", PATIENCE, |s| {
        s.len() == 998
    })
    .await;
    let removal = start.elapsed();
    eprintln!(
        "1000 instances: registered in {registered_in:?}, first snapshot {first:?}, \
         check change {change:?}, deregistration {removal:?}"
    );
    assert!(change < Duration::from_secs(5) && removal < Duration::from_secs(5));
}

#[tokio::test]
async fn dropping_the_watch_stops_it() {
    let agent = agent().await;
    let service = unique("stop");
    let watch = ConsulWatch::spawn(client(&agent), &service, quick_watch());
    let mut instances = watch.instances();
    let mut status = instances.status_receiver();
    timeout(PATIENCE, status.wait_for(SourceStatus::is_live))
        .await
        .expect("live")
        .unwrap();
    instances.current();
    drop(watch);
    // The source closes; its last snapshot stays readable.
    let closed = timeout(PATIENCE, instances.changed())
        .await
        .expect("closed");
    assert!(closed.is_err());
    assert!(instances.current().is_empty());
    if let Some(double) = &agent.double {
        let path = format!("/v1/health/service/{service}");
        let before = double.request_count(&path);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(double.request_count(&path), before, "still querying");
    }
}

/// The agent's HTTP check probes a [`HealthEndpoint`] served over hyper: the
/// application's verdict reaches the watchers of the service.
#[cfg(feature = "http")]
#[tokio::test]
async fn an_http_check_follows_the_health_endpoint() {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use seawall::consul::HealthHandle;
    use tower::Service;

    let double = ConsulDouble::start_with(DoubleOptions {
        min_check_interval: Duration::from_millis(50),
        ..DoubleOptions::default()
    })
    .await;
    let health = HealthHandle::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let endpoint = health.endpoint();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let mut endpoint = endpoint.clone();
                    endpoint.call(request)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let client = client_for(&double.http_addr(), None);
    let service = unique("http-check");
    let registration = ServiceRegistration::builder(&service)
        .id("h-1")
        .address("127.0.0.1")
        .port(port)
        .weights(4, 1)
        .check(
            Check::http(
                format!("http://127.0.0.1:{port}/health"),
                Duration::from_millis(50),
            )
            .id("h-1:http")
            .timeout(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    let guard = RegistrationGuard::register(client.clone(), registration)
        .await
        .unwrap();
    let watch = ConsulWatch::spawn(
        client.clone(),
        &service,
        WatchConfig::builder()
            .wait(Duration::from_secs(2))
            .min_interval(Duration::from_millis(20), 2)
            .include_warning(true)
            .build()
            .unwrap(),
    );
    let mut instances = watch.instances();
    watch_until(&mut instances, "passing", PATIENCE, |s| {
        s.len() == 1 && s[0].health == Health::Passing && s[0].weight.get() == 4
    })
    .await;
    // 429: a warning.
    health.set_warning("slow");
    watch_until(&mut instances, "warning", PATIENCE, |s| {
        s.len() == 1 && s[0].health == Health::Warning && s[0].weight.get() == 1
    })
    .await;
    // 503: critical, out.
    health.set_unhealthy("draining");
    watch_until(&mut instances, "critical", PATIENCE, <[_]>::is_empty).await;
    assert_eq!(double.check_status("h-1:http").as_deref(), Some("critical"));
    assert!(
        double
            .check_output("h-1:http")
            .is_some_and(|o| o.contains("unhealthy: draining")),
        "{:?}",
        double.check_output("h-1:http")
    );
    health.set_healthy();
    watch_until(&mut instances, "passing again", PATIENCE, |s| s.len() == 1).await;
    guard.deregister().await.unwrap();
}

// Found in a review of the Consul client: each failed on the code before its fix.

/// A raw loopback agent answering every request `200` with `X-Consul-Index: 7` and `body`,
/// one request per connection.
async fn raw_agent(body: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// One entry of a health answer is odd but valid JSON: it repeats a key (RFC 8259 only
/// says names SHOULD be unique; Go's decoder, and so anything written in Go between the
/// agent and the client, keeps the last), or holds a number out of `f64`'s range. The
/// parser is documented to be lenient (only a body that is not a JSON array, or `null`,
/// is an error; a malformed entry is skipped and counted), but such an entry failed the
/// whole answer: the well-formed instance beside it was lost, and a watch of the service
/// never published it and stayed stale for as long as the odd entry was there. The odd
/// entry is skipped.
#[tokio::test]
async fn one_odd_entry_does_not_fail_the_whole_health_answer() {
    let well_formed = r#"{"Node": {"Node": "n2", "Address": "127.0.0.1"},
           "Service": {"ID": "b", "Service": "users", "Port": 8083},
           "Checks": [{"Status": "passing"}]}"#;
    for (what, odd) in [
        (
            "a duplicate key",
            r#"{"Node": {"Node": "n1", "Address": "127.0.0.1"},
                "Service": {"ID": "a", "Service": "users", "Port": 8081, "Port": 8082},
                "Checks": []}"#,
        ),
        (
            "a duplicate check status",
            r#"{"Node": {"Node": "n1", "Address": "127.0.0.1"},
                "Service": {"ID": "a", "Service": "users", "Port": 8081},
                "Checks": [{"Status": "critical", "Status": "passing"}]}"#,
        ),
        (
            "a number out of range",
            r#"{"Node": {"Node": "n1", "Address": "127.0.0.1"},
                "Service": {"ID": "a", "Service": "users", "Port": 1e400},
                "Checks": []}"#,
        ),
    ] {
        let body: &'static str = Box::leak(format!("[{odd}, {well_formed}]").into_boxed_str());
        let addr = raw_agent(body).await;
        let client = client_for(&addr, None);
        let answer = client
            .health_service(&HealthQuery::new("users").passing(true))
            .await
            .unwrap_or_else(|e| panic!("{what} in one entry failed the whole answer: {e}"));
        assert!(
            answer.instances.iter().any(|i| i.id.service_id() == "b"),
            "{what}: the well-formed instance is lost: {:?}",
            answer.instances
        );
        // Through a watch: the well-formed instance is published.
        let watch = ConsulWatch::spawn(client, "users", quick_watch());
        let mut instances = watch.instances();
        watch_until(&mut instances, what, Duration::from_secs(2), |s| {
            ids(s).contains(&"b".to_owned())
        })
        .await;
    }
}

/// The parser accepts an IPv6 `Service.Address` in brackets (`[::1]`) as dialable, but
/// published it as is: the instance's address was then neither an IP address
/// (`socket_addr()` is `None`) nor a host name, so the gateway's pool dialed it as a host
/// name, `("[::1]", port)`, which resolves to nothing: every call to the instance failed,
/// what the `BadAddress` skip exists to prevent. It is published as the bare IP `::1`.
#[tokio::test]
async fn a_bracketed_ipv6_address_is_published_dialable() {
    let addr = raw_agent(
        r#"[{"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": "v6", "Service": "users", "Address": "[::1]", "Port": 8081},
             "Checks": []}]"#,
    )
    .await;
    let answer = client_for(&addr, None)
        .health_service(&HealthQuery::new("users"))
        .await
        .unwrap();
    for instance in &answer.instances {
        assert!(
            instance.socket_addr().is_some() || !instance.address.contains(['[', ']', ':']),
            "published with an address that is neither an IP address nor a host name: \
             {:?} (socket_addr {:?})",
            instance.address,
            instance.socket_addr()
        );
    }
}

/// `HealthQuery::wait(Duration::ZERO)` with an index: the client sent `wait=0s`, which
/// Consul reads as "no wait given" and holds the query for its default of 5 minutes (plus
/// jitter), as the double does, but gave the request only `request_timeout + 0 + 0/16`:
/// every such blocking query failed as a timeout. Zero is the agent's default, and the
/// request's limit allows for it.
#[tokio::test(start_paused = true)]
async fn a_zero_wait_blocking_query_is_not_cut_by_the_client() {
    let double = ConsulDouble::start().await;
    let client = client_for(&double.http_addr(), None);
    let service = unique("zero-wait");
    let first = client
        .health_service(&HealthQuery::new(&service))
        .await
        .unwrap();
    let answer = client
        .health_service(
            &HealthQuery::new(&service)
                .index(first.index)
                .wait(Duration::ZERO),
        )
        .await;
    assert!(
        answer.is_ok(),
        "a blocking query the agent answers in time was cut by the client: {:?}",
        answer.err()
    );
}

// --- review -------------------------------------------------------------------------

/// `RegistrationGuard::set_status` is "reported at once". Set right after `register`
/// returned (an application that registers first, then says it is not ready yet), it was
/// not: the heartbeat task subscribes to the status only when it first runs, after the
/// change, and takes it as already seen, so the agent kept the check passing until the
/// next heartbeat (a third of the TTL: 20 s here), routing traffic to an instance that
/// said it could not serve.
#[tokio::test]
async fn a_status_set_right_after_registering_is_reported_at_once() {
    let agent = agent().await;
    let client = client(&agent);
    let service = unique("early-status");
    let registration = ServiceRegistration::builder(&service)
        .id(format!("{service}-1"))
        .address("127.0.0.1")
        .port(9007)
        // A heartbeat every 20 s: none falls within the test.
        .check(Check::ttl(Duration::from_secs(60)).id(format!("{service}:ttl")))
        .build()
        .unwrap();
    let guard = RegistrationGuard::register(client.clone(), registration)
        .await
        .unwrap();
    guard.set_status(CheckStatus::Critical, Some("warming up"));
    eventually("the critical status to be reported", PATIENCE, || {
        let (client, service) = (client.clone(), service.clone());
        async move {
            client
                .health_service(&HealthQuery::new(&service).passing(true))
                .await
                .is_ok_and(|r| r.instances.is_empty())
        }
    })
    .await;
    guard.shutdown(Duration::ZERO).await.unwrap();
}

/// The agent stalls the answer to the second check update (a slow agent: a disk stall,
/// a hung connection) and answers everything else at once.
fn stall_the_second_update(line: &str) -> Duration {
    static UPDATES: AtomicU32 = AtomicU32::new(0);
    if line.contains("/v1/agent/check/update/") && UPDATES.fetch_add(1, Ordering::SeqCst) == 1 {
        Duration::from_secs(60)
    } else {
        Duration::ZERO
    }
}

/// When the next check update reaches the agent.
async fn next_update(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Instant {
    loop {
        let line = lines.recv().await.expect("the agent is gone");
        if line.contains("/v1/agent/check/update/") {
            return Instant::now();
        }
    }
}

/// The heartbeat is "a third of the shortest TTL by default, so that two reports can be
/// lost before the check lapses". One report whose answer stalls held the heartbeat for
/// the client's whole request limit (10 s by default), with no other report sent: the
/// next came only then, long after the TTL, and the check lapsed to critical (the
/// instance left every rotation) though the agent answered every other request at once.
#[tokio::test]
async fn a_stalled_heartbeat_does_not_let_the_ttl_lapse() {
    let (addr, mut lines) = slow_agent(stall_the_second_update).await;
    // The client's defaults: a 10 s request limit.
    let client = ConsulClient::new(ConsulConfig::builder().address(addr).build().unwrap());
    let ttl = Duration::from_millis(1500);
    let registration = ServiceRegistration::builder("svc")
        .id("svc-1")
        .address("127.0.0.1")
        .port(8080)
        .check(Check::ttl(ttl).id("svc-1:ttl"))
        .build()
        .unwrap();
    let config = GuardConfig::builder()
        .retry_base(Duration::from_millis(10))
        .build()
        .unwrap();
    let guard = RegistrationGuard::register_with(client, registration, config)
        .await
        .unwrap();
    // The first report (answered before `register_with` returned), then the one whose
    // answer stalls, a heartbeat (500 ms) later.
    let answered = next_update(&mut lines).await;
    let _stalled = timeout(PATIENCE, next_update(&mut lines))
        .await
        .expect("a second heartbeat");
    let next = timeout(
        ttl.saturating_sub(answered.elapsed()),
        next_update(&mut lines),
    )
    .await;
    assert!(
        next.is_ok(),
        "no report reached the agent within the TTL ({ttl:?}) of the last one it \
         answered: the check lapsed to critical"
    );
    drop(guard);
}

/// The registration's address is documented as "the address to dial", and a watch skips
/// an instance whose address no request can go to (`SkipReason::BadAddress`: a port in
/// it, a zone, spaces). The builder accepted such an address: the guard registered it
/// and kept its check passing, and every watch left it out, so the instance silently got
/// no traffic. It is a configuration error naming `address`, as an invalid field is.
#[test]
fn a_registration_address_no_watch_can_dial_is_refused_at_build() {
    for address in [
        "127.0.0.1:8081",
        "fe80::1%eth0",
        "users host",
        "10.0.0.5/health",
    ] {
        let built = ServiceRegistration::builder("users")
            .id("users-1")
            .address(address)
            .port(8081)
            .build();
        match built {
            Err(e) => assert_eq!(e.field(), "address", "{address}: {e}"),
            Ok(_) => panic!(
                "{address:?} was accepted at build (and would be registered, its check kept \
                 passing), but every watch skips it as SkipReason::BadAddress"
            ),
        }
    }
    // Dialable addresses stay accepted.
    for address in ["10.0.0.5", "::1", "users-1.internal"] {
        ServiceRegistration::builder("users")
            .address(address)
            .port(8081)
            .build()
            .unwrap_or_else(|e| panic!("{address}: {e}"));
    }
}

/// The agent answers every check update, slowly but well within the TTL (a busy agent
/// syncing its state to disk).
fn every_update_takes_400ms(line: &str) -> Duration {
    if line.contains("/v1/agent/check/update/") {
        Duration::from_millis(400)
    } else {
        Duration::ZERO
    }
}

/// A heartbeat shorter than the agent's answer time is valid (the builder only asks it
/// to be shorter than the TTL), and an agent that answers each report in 400 ms, with a
/// TTL of 3 s, keeps the check passing. Each report is now cut at the heartbeat period
/// (250 ms): every one after the first (unbounded, inside `register_with`) times out and
/// is retried, and is cut again; none succeeds, for ever, though the agent is healthy.
#[tokio::test]
async fn a_slow_but_healthy_agent_keeps_getting_heartbeats() {
    let (addr, _lines) = slow_agent(every_update_takes_400ms).await;
    let client = ConsulClient::new(ConsulConfig::builder().address(addr).build().unwrap());
    let registration = ServiceRegistration::builder("svc")
        .id("svc-slow-1")
        .address("127.0.0.1")
        .port(8080)
        .check(Check::ttl(Duration::from_secs(3)).id("svc-slow-1:ttl"))
        .build()
        .unwrap();
    let config = GuardConfig::builder()
        .heartbeat(Duration::from_millis(250))
        .retry_base(Duration::from_millis(10))
        .build()
        .unwrap();
    let guard = RegistrationGuard::register_with(client, registration, config)
        .await
        .unwrap();
    assert_eq!(
        guard.heartbeats(),
        1,
        "the first report, inside register_with"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        guard.heartbeats() >= 3,
        "an agent answering every report in 400 ms (TTL 3 s) got no report through in \
         2.5 s: {} heartbeats succeeded in all; the check lapses to critical",
        guard.heartbeats()
    );
    drop(guard);
}

// --- review: the watch across an agent restart, and the client's time limit ---------------

/// A TCP proxy in front of an agent: what a load balancer or a service address in front of
/// the local agent is, and what an agent restarting in place looks like from the client.
/// [`switch`](Self::switch) sends new connections to another agent and cuts every open one
/// without an answer, as the old agent's exit does.
struct RestartingAgent {
    addr: std::net::SocketAddr,
    backend: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
    open: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl RestartingAgent {
    async fn start(backend: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = std::sync::Arc::new(std::sync::Mutex::new(backend));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (to, conns) = (backend.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let target = *to.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            addr,
            backend,
            open,
        }
    }

    /// The agent restarts: the old one's connections close unanswered, and the next ones
    /// reach `backend`.
    fn switch(&self, backend: std::net::SocketAddr) {
        *self.backend.lock().unwrap() = backend;
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// An agent about to restart with a lower index, and a watch following it through a
/// [`RestartingAgent`].
struct Restart {
    /// The agent before the restart: `a`, its raft log far along (index 100 000).
    old: ConsulDouble,
    /// The agent after it: started again from a low index, with what it holds now.
    restarted: ConsulDouble,
    agent: RestartingAgent,
    client: ConsulClient,
    watch: ConsulWatch,
    instances: InstanceWatch,
}

impl Restart {
    /// The watch of `service` (a 30 s wait, `min_interval`, a backoff of 20 s) has
    /// published `a` from the old agent and is blocking on it; the restarted agent holds
    /// `holds`.
    async fn watching(service: &str, holds: &[&str], min_interval: (Duration, u32)) -> Self {
        let port = |id: &str| 9300 + u16::from(id.as_bytes()[0] - b'a');
        let old = ConsulDouble::start().await;
        old.register(node_registration(service, "a", port("a"), None))
            .unwrap();
        old.set_index(100_000);
        let restarted = ConsulDouble::start().await;
        for id in holds {
            restarted
                .register(node_registration(service, id, port(id), None))
                .unwrap();
        }
        assert!(restarted.index() < 1_000);

        let agent = RestartingAgent::start(old.addr()).await;
        let client = client_for(&agent.addr.to_string(), None);
        let config = WatchConfig::builder()
            .wait(Duration::from_secs(30))
            .min_interval(min_interval.0, min_interval.1)
            .backoff(Duration::from_secs(20), Duration::from_secs(20))
            .build()
            .unwrap();
        let watch = ConsulWatch::spawn(client.clone(), service, config);
        let mut instances = watch.instances();
        watch_until(&mut instances, "a", PATIENCE, |s| ids(s) == ["a"]).await;
        assert!(
            old.wait_for_waiting_queries(1, PATIENCE).await,
            "the watch blocks on the old agent"
        );
        assert_eq!(watch.index(), 100_000);
        Self {
            old,
            restarted,
            agent,
            client,
            watch,
            instances,
        }
    }
}

/// The agent restarts with a lower index (a dev agent, a single-server cluster rebuilt,
/// its data directory lost) while the watch's blocking query is held. The watch must start
/// over with a full query ("After an outage the agent's index may be anything: start over
/// with a full query instead of blocking on an index it may not reach", src/consul/watch.rs;
/// the fact sheet: "if the returned index is lower than the one sent, reset").
///
/// The held query's connection closes unanswered; the client takes it for a keep-alive
/// connection the agent closed as it went idle and sends the query again at once, on a new
/// connection, with the old index: the restarted agent holds it for the whole wait, and
/// the watch sees nothing of the new agent (here: an instance more) until it ends.
#[tokio::test]
async fn watch_resyncs_after_a_restart_that_lowers_the_index() {
    let service = unique("restart-lower");
    // A backoff longer than the patience below: the restart must not go the error path
    // (a stale watch waiting out a backoff), and the status stays live.
    let Restart {
        old: _old,
        restarted,
        agent,
        client,
        watch,
        mut instances,
    } = Restart::watching(&service, &["a", "b"], (Duration::from_millis(20), 2)).await;
    assert_eq!(watch.index(), 100_000);

    agent.switch(restarted.addr());
    let took = watch_until(
        &mut instances,
        "a and b from the restarted agent",
        PATIENCE,
        |s| ids(s) == ["a", "b"],
    )
    .await;
    eprintln!(
        "resynced {took:?} after the restart (index {}, {} sent again)",
        watch.index(),
        client.retried_stale()
    );
    assert!(watch.index() < 1_000, "index {}", watch.index());
    assert!(
        matches!(watch.status(), SourceStatus::Live),
        "{:?}",
        watch.status()
    );
    assert_eq!(
        client.retried_stale(),
        0,
        "a blocking query is not sent again"
    );

    // The agent closes the held query's connection and stays (a proxy's idle cut, a
    // connection closed as the query went out): the watch starts over at once, follows
    // the same agent, and is not made stale for it.
    assert!(
        restarted.wait_for_waiting_queries(1, PATIENCE).await,
        "the watch blocks on the restarted agent"
    );
    agent.switch(restarted.addr());
    restarted
        .register(node_registration(&service, "c", 9302, None))
        .unwrap();
    watch_until(&mut instances, "a, b and c", PATIENCE, |s| {
        ids(s) == ["a", "b", "c"]
    })
    .await;
    assert!(
        matches!(watch.status(), SourceStatus::Live),
        "{:?}",
        watch.status()
    );
}

/// The agent restarts with a lower index *between* two of the watch's queries: an answer
/// came, the watch waits for its rate limit before the next query, and meanwhile the agent
/// goes away (closing the idle connection the answer came on) and comes back. Nothing
/// failed, so the next query was a blocking one with the old agent's index, on a new
/// connection: the restarted agent held it for the whole wait (30 s here, 60 s by
/// default) and the watch saw nothing of it (here: an instance more) until it ended.
#[tokio::test]
async fn watch_resyncs_after_a_restart_between_two_queries() {
    let service = unique("restart-between");
    // One query in 2 s at most: after an answer the watch waits before the next one, and
    // the restart falls in that wait.
    let Restart {
        old,
        restarted,
        agent,
        client: _client,
        watch,
        mut instances,
    } = Restart::watching(&service, &["a", "b", "c"], (Duration::from_secs(2), 1)).await;
    let requests = watch.requests();

    // A change answers the held query; the watch's next query is up to 2 s away.
    old.register(node_registration(&service, "b", 9301, None))
        .unwrap();
    watch_until(&mut instances, "a and b", PATIENCE, |s| {
        ids(s) == ["a", "b"]
    })
    .await;
    assert_eq!(watch.requests(), requests, "no query sent yet");
    agent.switch(restarted.addr());

    let took = watch_until(
        &mut instances,
        "a, b and c from the restarted agent",
        PATIENCE,
        |s| ids(s) == ["a", "b", "c"],
    )
    .await;
    eprintln!(
        "resynced {took:?} after the restart (index {})",
        watch.index()
    );
    assert!(watch.index() < 1_000, "index {}", watch.index());
    assert!(
        matches!(watch.status(), SourceStatus::Live),
        "{:?}",
        watch.status()
    );
}

/// `request_timeout(Duration::MAX)`, a caller's "no limit", is accepted by the builder
/// (only zero is refused), and then every request panicked adding it to the clock: a
/// direct call panicked in the caller, and a watch's task died with the watch left
/// `Starting` for ever, no error anywhere. The limit saturates instead, as the crate's
/// other periods do (`consul::later`: "a configured period of years must not panic a
/// background task").
#[tokio::test]
async fn an_unbounded_request_timeout_does_not_panic() {
    let agent = ConsulDouble::start().await;
    let service = unique("no-limit");
    agent
        .register(node_registration(&service, "a", 9311, None))
        .unwrap();
    let client = ConsulClient::new(
        ConsulConfig::builder()
            .address(agent.http_addr())
            .request_timeout(Duration::MAX)
            .build()
            .expect("accepted by the builder"),
    );
    let direct = tokio::spawn({
        let client = client.clone();
        let service = service.clone();
        async move {
            client
                .health_service(
                    &HealthQuery::new(service)
                        .index(1)
                        .wait(Duration::from_secs(1)),
                )
                .await
                .map(|r| r.instances.len())
        }
    });
    match direct.await {
        Ok(answer) => assert_eq!(answer.unwrap(), 1),
        Err(e) => panic!("the query panicked: {e}"),
    }
    let watch = ConsulWatch::spawn(client, &service, quick_watch());
    let mut instances = watch.instances();
    watch_until(&mut instances, "a", PATIENCE, |s| ids(s) == ["a"]).await;
    assert!(watch.status().is_live(), "{:?}", watch.status());
}

/// A proxy in front of an agent that holds every request registering a service for
/// `hold` on its way (an agent slow to take it: a disk stall, a busy agent), counting the
/// registrations it saw (`.0`) and those the agent answered (`.1`).
async fn holding_registrations(
    backend: std::net::SocketAddr,
    hold: Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (seen2, answered2) = (seen.clone(), answered.clone());
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(backend).await else {
                continue;
            };
            let (mut cr, mut cw) = downstream.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            let pending = Arc::new(AtomicBool::new(false));
            let (p, answered) = (pending.clone(), answered2.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if p.swap(false, SeqCst) {
                        answered.fetch_add(1, SeqCst);
                    }
                    // The client may be gone: the agent has acted all the same.
                    let _ = cw.write_all(&buf[..n]).await;
                }
            });
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let register = buf[..n].starts_with(b"PUT /v1/agent/service/register");
                    if register {
                        seen.fetch_add(1, SeqCst);
                        tokio::time::sleep(hold).await;
                    }
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if register {
                        pending.store(true, SeqCst);
                    }
                }
                // The client hung up. Consul (Go's `net/http`) runs a handler it has read
                // the request of to its end whatever the client does; the double's hyper
                // server would drop it on the hang-up: passed on once the agent answered.
                let _ = tokio::time::timeout(PATIENCE, async {
                    while pending.load(SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await;
                drop(uw);
            });
        }
    });
    (addr, seen, answered)
}

/// A guard whose heartbeat is registering its service again (the agent forgot it),
/// that registration held on its way for 300 ms.
struct ReRegistering {
    double: ConsulDouble,
    guard: RegistrationGuard,
    /// A client of the agent itself, not through the holding proxy.
    direct: ConsulClient,
    id: String,
    /// Registrations the agent has answered.
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn re_registering(name: &str, port: u16) -> ReRegistering {
    use std::sync::atomic::Ordering::SeqCst;
    let double = ConsulDouble::start().await;
    let (addr, seen, answered) =
        holding_registrations(double.addr(), Duration::from_millis(300)).await;
    let direct = client_for(&double.http_addr(), None);
    let service = unique(name);
    let id = format!("{service}-1");
    let guard = RegistrationGuard::register_with(
        client_for(&addr.to_string(), None),
        instance(&service, &id, port),
        GuardConfig::builder()
            .heartbeat(Duration::from_millis(50))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(seen.load(SeqCst), 1);
    // The agent forgets the service; the next heartbeat hears "unknown check" and
    // registers again.
    direct.deregister(&id).await.unwrap();
    eventually("a registration again, on its way", PATIENCE, || {
        let n = seen.load(SeqCst);
        async move { n >= 2 }
    })
    .await;
    ReRegistering {
        double,
        guard,
        direct,
        id,
        answered,
    }
}

/// The agent lost the registration and the heartbeat is registering it again, the
/// request on its way, when the process shuts down. `shutdown` aborted the heartbeat
/// and deregistered at once: the registration in flight reached the agent after the
/// deregistration, and the service stayed registered (its TTL check passing until it
/// lapsed, for ever without `deregister_critical_after`) with no process behind it and
/// nobody left to remove it. The guard's promise: "shutdown drains gracefully:
/// deregister first, so that clients stop picking the instance".
#[tokio::test]
async fn shutdown_during_a_re_registration_leaves_nothing_registered() {
    let ReRegistering {
        double,
        guard,
        direct,
        id,
        answered,
    } = re_registering("ghost", 9321).await;
    guard.shutdown(Duration::ZERO).await.unwrap();
    // Whatever was on its way has reached the agent.
    eventually("the agent's answer to the registration", PATIENCE, || {
        let n = answered.load(Ordering::SeqCst);
        async move { n >= 2 }
    })
    .await;
    assert!(
        !registered(&direct, &id).await,
        "still registered after shutdown returned: {:?}",
        double.service_ids()
    );
}

/// `InstanceWatch::fixed` now leaves undialable instances out, but `Publisher` (public:
/// "the sending side of an InstanceWatch: what a discovery source holds"), through which
/// `fixed` itself published, still publishes them: `Publisher::live` ("a static list")
/// and `publish`, what any other source (one's own, or a file watched) goes through. A
/// balancer over such a watch gets the endpoint `Instance::port` promises never comes
/// ("never 0: sources skip undialable entries").
#[test]
fn a_publisher_skips_undialable_instances() {
    use seawall::discovery::Publisher;
    let live = Publisher::live(undialable_and_one());
    assert_eq!(authorities(&live.subscribe()), ["127.0.0.1:8080"]);
    let publisher = Publisher::new();
    let watch = publisher.subscribe();
    publisher.publish(undialable_and_one());
    assert_eq!(authorities(&watch), ["127.0.0.1:8080"]);
}

/// Two instances no one can dial (port 0, no address) and one that can be.
fn undialable_and_one() -> Vec<Instance> {
    use seawall::discovery::InstanceId;
    vec![
        Instance::local("s", "127.0.0.1:0".parse().unwrap()),
        Instance::new(InstanceId::new("local", "no-address"), "s", "", 8080),
        Instance::local("s", "127.0.0.1:8080".parse().unwrap()),
    ]
}

fn authorities(watch: &InstanceWatch) -> Vec<String> {
    watch.peek().iter().map(Instance::authority).collect()
}

/// A static list is a source like the others: `Instance::port` promises "never 0: sources
/// skip undialable entries", the `Registry` and a Consul watch leave such instances out,
/// but `InstanceWatch::fixed` published them, and a balancer got an endpoint every call
/// to which fails (and counts against it).
#[test]
fn a_fixed_list_skips_undialable_instances() {
    let watch = InstanceWatch::fixed(undialable_and_one());
    assert_eq!(authorities(&watch), ["127.0.0.1:8080"]);
}

/// As above, but the shutdown is itself bounded by the caller, as `shutdown`'s own code
/// expects ("if this future is dropped before the deregistration completes (a timeout
/// around `shutdown`), `Drop` still deregisters"): a SIGTERM handler giving it 50 ms. The
/// future, dropped while it let the re-registration finish, took the task with it, so
/// `Drop` found none to wait for and deregistered at once: the registration on its way
/// landed after, and the service stayed registered with no process behind it.
#[tokio::test]
async fn a_shutdown_cut_short_during_a_re_registration_leaves_nothing_registered() {
    let ReRegistering {
        // Kept alive to the end: the agent.
        double: _agent,
        guard,
        direct,
        id,
        answered,
    } = re_registering("ghost-cut", 9322).await;
    // The caller's bound on the drain: shorter than the registration's hold.
    let cut = tokio::time::timeout(Duration::from_millis(50), guard.shutdown(Duration::ZERO)).await;
    assert!(cut.is_err(), "shutdown returned within 50 ms: {cut:?}");
    eventually("the agent's answer to the registration", PATIENCE, || {
        let n = answered.load(Ordering::SeqCst);
        async move { n >= 2 }
    })
    .await;
    eventually("the service deregistered after all", PATIENCE, || {
        let direct = direct.clone();
        let id = id.clone();
        async move { !registered(&direct, &id).await }
    })
    .await;
}
