//! The API-gateway demo's upstream services (`examples/support/demo_services.rs`), over real
//! loopback: JSON routes and `x-instance`, each fault mode, the `/fault` control endpoint,
//! the registry mirroring the health flag, and registration in Consul (the API double)
//! through the registration guard. Every wait is bounded.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use seawall::consul::{ConsulClient, ConsulConfig};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::demo_services::{DemoFleet, Fault, FleetSpec, INSTANCE_HEADER, InstanceHandle};
use crate::double::ConsulDouble;

const BOUND: Duration = Duration::from_secs(5);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    instance: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

async fn send(client: &HttpClient, method: Method, url: &str) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = timeout(BOUND, client.request(request))
        .await
        .expect("answered in time")
        .expect("answered");
    let status = response.status();
    let instance = response
        .headers()
        .get(INSTANCE_HEADER)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        instance,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(client: &HttpClient, instance: &InstanceHandle, path: &str) -> Answer {
    send(
        client,
        Method::GET,
        &format!("{}{path}", instance.base_url()),
    )
    .await
}

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

fn published(fleet: &DemoFleet, service: &str) -> Vec<String> {
    fleet
        .registry()
        .watch(service)
        .current()
        .iter()
        .map(|i| i.id.service_id().to_owned())
        .collect()
}

#[tokio::test]
async fn routes_answer_json_with_the_instance() {
    let fleet = DemoFleet::start(FleetSpec::new(2, 1)).await.unwrap();
    let http = client();
    let users = fleet.service("users");
    assert_eq!(users.len(), 2);
    let products = fleet.instance("products-1").unwrap();
    assert!(fleet.instance("products-2").is_none());
    for u in &users {
        assert!(u.addr().ip().is_loopback());
    }

    let list = get(&http, &users[0], "/users").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.instance, "users-1");
    assert_eq!(list.json().as_array().unwrap().len(), 3);

    let one = get(&http, &users[1], "/users/2").await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.instance, "users-2");
    assert_eq!(one.json()["name"], "Alan Turing");

    let missing = get(&http, &users[0], "/users/42").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["error"].is_string());
    assert_eq!(missing.instance, "users-1");

    let products_list = get(&http, &products, "/products").await;
    assert_eq!(products_list.status, StatusCode::OK);
    assert_eq!(products_list.instance, "products-1");
    assert_eq!(products_list.json().as_array().unwrap().len(), 4);
    let product = get(&http, &products, "/products/4").await;
    assert_eq!(product.json()["id"], json!(4));

    // Malformed or foreign paths: JSON errors, never a panic.
    for (path, status) in [
        ("/users/abc", StatusCode::BAD_REQUEST),
        ("/users/1/2", StatusCode::NOT_FOUND),
        ("/products", StatusCode::NOT_FOUND),
        ("/", StatusCode::NOT_FOUND),
        ("/users/99999999999999999999999", StatusCode::BAD_REQUEST),
        ("/api/products/1", StatusCode::NOT_FOUND),
    ] {
        let answer = get(&http, &users[0], path).await;
        assert_eq!(answer.status, status, "{path}");
        assert!(answer.json()["error"].is_string(), "{path}");
        assert_eq!(answer.instance, "users-1");
    }
    // The demo gateway forwards `/api/users/...` as is.
    let via_gateway = get(&http, &users[0], "/api/users/1").await;
    assert_eq!(via_gateway.status, StatusCode::OK);
    assert_eq!(via_gateway.json()["id"], json!(1));
    let post = send(
        &http,
        Method::POST,
        &format!("{}/users", users[0].base_url()),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(users[0].requests() >= 9);
    assert_eq!(fleet.registry().services(), ["products", "users"]);
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn failing_answers_503_and_fails_the_health_check() {
    let fleet = DemoFleet::start(FleetSpec::new(1, 0)).await.unwrap();
    let http = client();
    let users = fleet.instance("users-1").unwrap();
    assert_eq!(get(&http, &users, "/health").await.status, StatusCode::OK);

    users.fault().set(Fault::Failing);
    assert_eq!(users.fault().get(), Fault::Failing);
    let answer = get(&http, &users, "/users/1").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.instance, "users-1");
    assert!(answer.json()["error"].is_string());
    let health = get(&http, &users, "/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);

    users.fault().heal();
    assert_eq!(get(&http, &users, "/users/1").await.status, StatusCode::OK);
    assert_eq!(get(&http, &users, "/health").await.status, StatusCode::OK);
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn slow_answers_after_the_delay() {
    let fleet = DemoFleet::start(FleetSpec::new(0, 1)).await.unwrap();
    let http = client();
    let products = fleet.instance("products-1").unwrap();
    let _ = get(&http, &products, "/products").await; // connect first

    products
        .fault()
        .set(Fault::Slow(Duration::from_millis(200)));
    let start = Instant::now();
    let answer = get(&http, &products, "/products/1").await;
    let took = start.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The health check sees a slow instance as unhealthy, and answers without the delay.
    products.fault().set(Fault::Slow(Duration::from_secs(3)));
    let start = Instant::now();
    assert_eq!(
        get(&http, &products, "/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(start.elapsed() < Duration::from_secs(1));

    // Healed: the next request is not delayed.
    products.fault().heal();
    let start = Instant::now();
    assert_eq!(
        get(&http, &products, "/products/1").await.status,
        StatusCode::OK
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn down_refuses_connections_then_comes_back_on_the_same_port() {
    let fleet = DemoFleet::start(FleetSpec::new(1, 0)).await.unwrap();
    let http = client();
    let users = fleet.instance("users-1").unwrap();
    let addr = users.addr();
    // An open keep-alive connection from the pool, and one idle raw connection.
    assert_eq!(get(&http, &users, "/users").await.status, StatusCode::OK);
    let mut idle = TcpStream::connect(addr).await.unwrap();

    users.fault().set(Fault::Down);
    let refused = async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    timeout(BOUND, refused).await.expect("refused while down");
    // The open connection was closed too.
    let mut buf = [0u8; 16];
    let read = timeout(BOUND, tokio::io::AsyncReadExt::read(&mut idle, &mut buf))
        .await
        .expect("the open connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let request = Request::get(format!("{}/users", users.base_url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let failed = timeout(BOUND, http.request(request)).await.unwrap();
    assert!(failed.is_err(), "a request while down fails");

    users.fault().heal();
    let back = async {
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(BOUND, back).await.expect("back up");
    let answer = get(&http, &users, "/users/3").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.instance, "users-1");
    assert_eq!(users.addr(), addr);
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_fault_endpoint_flips_the_mode() {
    let fleet = DemoFleet::start(FleetSpec::new(1, 1)).await.unwrap();
    let http = client();
    let users = fleet.instance("users-1").unwrap();
    let products = fleet.instance("products-1").unwrap();
    let fault = |mode: &str| format!("{}/fault?{mode}", users.base_url());

    let answer = send(&http, Method::POST, &fault("mode=failing")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["mode"], "failing");
    assert_eq!(users.fault().get(), Fault::Failing);
    assert_eq!(
        get(&http, &users, "/users").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Only this instance.
    assert_eq!(products.fault().get(), Fault::Healthy);

    send(&http, Method::POST, &fault("mode=slow&ms=120")).await;
    assert_eq!(users.fault().get(), Fault::Slow(Duration::from_millis(120)));
    send(&http, Method::POST, &fault("mode=slow")).await;
    assert_eq!(users.fault().get(), Fault::Slow(Duration::from_millis(300)));
    send(&http, Method::POST, &fault("mode=healthy")).await;
    assert_eq!(users.fault().get(), Fault::Healthy);

    for bad in ["mode=sideways", "", "mode=slow&ms=soon"] {
        let answer = send(&http, Method::POST, &fault(bad)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(answer.json()["error"].is_string());
    }
    let answer = send(&http, Method::GET, &fault("mode=failing")).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(users.fault().get(), Fault::Healthy);
    // Control requests are not counted as service requests.
    assert_eq!(users.requests(), 1);

    // Down through the endpoint; back through the handle.
    let answer = send(&http, Method::POST, &fault("mode=down")).await;
    assert_eq!(answer.status, StatusCode::OK);
    timeout(BOUND, async {
        while TcpStream::connect(users.addr()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("down");
    users.fault().heal();
    timeout(BOUND, async {
        while TcpStream::connect(users.addr()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("up");
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_registry_follows_the_health_flag_after_the_check_delay() {
    let delay = Duration::from_millis(150);
    let fleet = DemoFleet::start(FleetSpec::new(2, 1).check_delay(delay))
        .await
        .unwrap();
    assert_eq!(published(&fleet, "users"), ["users-1", "users-2"]);
    assert_eq!(published(&fleet, "products"), ["products-1"]);
    let users1 = fleet.instance("users-1").unwrap();

    users1.fault().set(Fault::Failing);
    let start = Instant::now();
    // Not at once: the balancer and the breaker see it first.
    assert_eq!(published(&fleet, "users"), ["users-1", "users-2"]);
    eventually("users-1 unpublished", || {
        published(&fleet, "users") == ["users-2"]
    })
    .await;
    assert!(start.elapsed() >= delay, "{:?}", start.elapsed());

    users1.fault().heal();
    let start = Instant::now();
    eventually("users-1 published again", || {
        published(&fleet, "users") == ["users-1", "users-2"]
    })
    .await;
    assert!(start.elapsed() >= delay - Duration::from_millis(20));

    // Down too.
    let products1 = fleet.instance("products-1").unwrap();
    products1.fault().set(Fault::Down);
    eventually("products-1 unpublished while down", || {
        published(&fleet, "products").is_empty()
    })
    .await;
    products1.fault().heal();
    eventually("products-1 back", || {
        published(&fleet, "products") == ["products-1"]
    })
    .await;

    let registry = fleet.registry().clone();
    fleet.shutdown().await.unwrap();
    assert!(registry.services().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_in_consul_with_an_http_check_on_health() {
    let double = ConsulDouble::start().await;
    let consul = ConsulClient::new(
        ConsulConfig::builder()
            .address(double.http_addr())
            .build()
            .unwrap(),
    );
    let fleet = DemoFleet::start(FleetSpec::new(2, 1).consul(consul))
        .await
        .unwrap();
    let ids: Vec<String> = double.service_ids().into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["products-1", "users-1", "users-2"]);
    let users2 = fleet.instance("users-2").unwrap();
    let check = users2.consul_check_id();
    eventually("the check passes", || {
        double.check_status(&check).as_deref() == Some("passing")
    })
    .await;

    // The double's HTTP check (every second) sees the failing instance's /health.
    users2.fault().set(Fault::Failing);
    eventually("the check turns critical", || {
        double.check_status(&check).as_deref() == Some("critical")
    })
    .await;
    users2.fault().heal();
    eventually("the check passes again", || {
        double.check_status(&check).as_deref() == Some("passing")
    })
    .await;

    fleet.shutdown().await.unwrap();
    assert!(double.service_ids().is_empty());
}

/// A request can be followed into the instance that served it: the request id and the
/// trace id it received come back with the answer.
#[tokio::test]
async fn instances_echo_the_request_and_trace_ids_they_received() {
    let fleet = DemoFleet::start(FleetSpec::new(1, 1)).await.unwrap();
    let users = fleet.service("users");
    let request = Request::get(format!("{}/users", users[0].base_url()))
        .header("x-request-id", "follow-me-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = timeout(BOUND, client().request(request))
        .await
        .expect("answered in time")
        .expect("answered");
    assert_eq!(response.headers()["x-request-id"], "follow-me-1");
    assert_eq!(
        response.headers()["x-trace-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}
