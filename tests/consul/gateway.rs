//! The gateway discovering its upstreams in Consul (the API double, or a real agent when
//! `CONSUL_HTTP_ADDR` is set): the demo's services register through the registration
//! guard with HTTP checks, the gateway follows them with blocking queries, and an instance
//! that fails its check leaves the gateway's rotation.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use seawall::consul::{ConsulClient, ConsulConfig};
use seawall::gateway::{Discovery, Gateway, GatewayConfig};
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep, timeout};

use crate::demo_services::{DemoFleet, Fault, FleetSpec};

const CONFIG: &str = r#"
[gateway]
listen = "127.0.0.1:0"

[[routes]]
name = "users"
path_prefix = "/api/users"
service = "users"
timeout = "1s"

[routes.fallback]
status = 503
body = '{"fallback":true}'
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_consul() {
    let agent = crate::double::agent().await;
    let mut config = ConsulConfig::builder().address(agent.http_addr.as_str());
    if let Some(token) = &agent.token {
        config = config.token(token.as_str());
    }
    let consul = ConsulClient::new(config.build().unwrap());
    let fleet = DemoFleet::start(FleetSpec::new(2, 0).consul(consul.clone()))
        .await
        .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = Gateway::build(
        GatewayConfig::from_toml_str(CONFIG).unwrap(),
        Discovery::Consul(consul),
    )
    .await
    .unwrap()
    .spawn(listener);
    let url = format!("http://{}/api/users/1", gateway.local_addr());
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    // Waits (bounded) until `n` instances are in the gateway's rotation; the status shows
    // discovery's changes without any request coming.
    let endpoints = |n: usize| {
        let gateway = &gateway;
        async move {
            let start = Instant::now();
            loop {
                let status = gateway.gateway().status();
                if status.routes[0].endpoints.len() == n {
                    return start.elapsed();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the gateway never saw {n} endpoints: {:?}",
                    status.routes[0].endpoints
                );
                sleep(Duration::from_millis(20)).await;
            }
        }
    };
    endpoints(2).await;

    let mut served_by = std::collections::HashSet::new();
    for _ in 0..40 {
        let response = timeout(Duration::from_secs(3), http.get(url.parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        served_by.insert(
            response.headers()["x-instance"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        let _ = response.into_body().collect().await;
    }
    assert_eq!(served_by.len(), 2, "both instances served: {served_by:?}");

    // users-2 fails its HTTP check: Consul marks it critical and the gateway drops it.
    fleet
        .instance("users-2")
        .unwrap()
        .fault()
        .set(Fault::Failing);
    let took = endpoints(1).await;
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for _ in 0..20 {
        let response = timeout(Duration::from_secs(3), http.get(url.parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-instance"], "users-1");
        let _ = response.into_body().collect().await;
    }

    // It recovers and comes back.
    fleet
        .instance("users-2")
        .unwrap()
        .fault()
        .set(Fault::Healthy);
    endpoints(2).await;

    gateway.shutdown().await;
    fleet.shutdown().await.unwrap();
}
