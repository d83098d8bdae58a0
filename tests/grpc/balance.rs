//! The balancer with the gRPC classifier: an endpoint's `UNAVAILABLE` answers count for its
//! outlier detection and its endpoint breaker; `NOT_FOUND` does not.

use std::net::SocketAddr;
use std::time::Duration;

use seawall::balance::{Balance, OutlierDetection};
use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow, State};
use seawall::discovery::{Instance, InstanceWatch, ServiceDiscover};
use seawall::grpc::{GrpcBodyLayer, GrpcClassifier};
use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;
use tower::Layer;

use super::{named, server};

/// A lazily connected channel to the instance, its bodies wrapped for the classifier.
fn endpoint(instance: &Instance) -> seawall::grpc::GrpcBodyService<tonic::transport::Channel> {
    let uri = format!("http://{}:{}", instance.address, instance.port);
    GrpcBodyLayer.layer(Endpoint::from_shared(uri).expect("uri").connect_lazy())
}

fn instances(addrs: &[SocketAddr]) -> InstanceWatch {
    InstanceWatch::fixed(
        addrs
            .iter()
            .map(|a| Instance::local("health", *a))
            .collect(),
    )
}

#[tokio::test]
async fn unavailable_ejects_the_endpoint_and_not_found_does_not() {
    let draining = server("unavailable").await;
    let missing = server("not_found").await;
    let detection = OutlierDetection::builder()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(60))
        .max_ejected(0.5)
        .build()
        .expect("valid");
    let lb = Balance::builder()
        .name("health")
        .outlier_detection(detection)
        .classifier(GrpcClassifier::new())
        .build(ServiceDiscover::new(
            instances(&[draining, missing]),
            endpoint,
        ));
    let handle = lb.handle().clone();
    let mut client = HealthClient::new(lb);
    let mut unavailable = 0;
    for _ in 0..40 {
        match client.check(named("")).await.unwrap_err().code() {
            tonic::Code::Unavailable => unavailable += 1,
            code => assert_eq!(code, tonic::Code::NotFound),
        }
    }
    assert_eq!(
        unavailable, 3,
        "three in a row eject it; no more calls reach it"
    );
    let endpoints = handle.endpoints();
    let status = |port: u16| {
        endpoints
            .iter()
            .find(|e| e.address.ends_with(&format!(":{port}")))
            .expect("listed")
    };
    assert_eq!(status(draining.port()).failures, 3);
    assert_eq!(status(draining.port()).ejections, 1);
    assert!(status(draining.port()).ejected_for.is_some());
    assert_eq!(status(missing.port()).failures, 0);
    assert_eq!(status(missing.port()).ejections, 0);
    assert_eq!(handle.ejected(), 1);
    // Every call has ended: none is left outstanding.
    assert!(endpoints.iter().all(|e| e.outstanding == 0));
}

#[tokio::test]
async fn unavailable_opens_the_endpoint_breaker() {
    let draining = server("unavailable").await;
    let healthy = server("ok").await;
    let template = CircuitBreakerConfig::builder()
        .sliding_window(SlidingWindow::count_based(4))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .build()
        .expect("valid");
    let lb = Balance::builder()
        .name("health")
        .endpoint_breaker(template)
        .classifier(GrpcClassifier::new())
        .build(ServiceDiscover::new(
            instances(&[draining, healthy]),
            endpoint,
        ));
    let handle = lb.handle().clone();
    let mut client = HealthClient::new(lb);
    let mut served = 0;
    for _ in 0..40 {
        if client.check(named("")).await.is_ok() {
            served += 1;
        }
    }
    assert_eq!(
        served, 36,
        "four calls reach the draining endpoint, then its breaker opens"
    );
    let endpoints = handle.endpoints();
    let breaker = |port: u16| {
        endpoints
            .iter()
            .find(|e| e.address.ends_with(&format!(":{port}")))
            .expect("listed")
            .breaker
    };
    assert_eq!(breaker(draining.port()), Some(State::Open));
    // Its successes came in the trailers (`grpc-status: 0`), and counted as such.
    assert_eq!(breaker(healthy.port()), Some(State::Closed));
}

#[tokio::test]
async fn unavailable_in_the_trailers_counts_for_the_endpoint_when_the_stream_ends() {
    let addr = server("ok").await;
    let detection = OutlierDetection::builder()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(60))
        .max_ejected(1.0)
        .build()
        .expect("valid");
    let lb = Balance::builder()
        .name("watch")
        .outlier_detection(detection)
        .classifier(GrpcClassifier::new())
        .build(ServiceDiscover::new(instances(&[addr]), endpoint));
    let handle = lb.handle().clone();
    let mut client = HealthClient::new(lb);
    for round in 0..3 {
        let mut stream = client
            .watch(named("unavailable"))
            .await
            .expect("the stream starts")
            .into_inner();
        assert!(stream.message().await.expect("one message").is_some());
        // Until the trailers: still outstanding, not yet counted.
        let before = &handle.endpoints()[0];
        assert_eq!((before.outstanding, before.failures), (1, round));
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let after = &handle.endpoints()[0];
        assert_eq!(after.failures, round + 1);
    }
    assert_eq!(
        handle.ejected(),
        1,
        "three failures in a row, read in the trailers"
    );
    // A stream the client drops is not counted, and no longer outstanding.
    let (mut client, handle) = {
        let lb = Balance::builder()
            .name("dropped")
            .outlier_detection(
                OutlierDetection::builder()
                    .consecutive_failures(1)
                    .build()
                    .expect("valid"),
            )
            .classifier(GrpcClassifier::new())
            .build(ServiceDiscover::new(instances(&[addr]), endpoint));
        let handle = lb.handle().clone();
        (HealthClient::new(lb), handle)
    };
    let mut stream = client
        .watch(named("hang"))
        .await
        .expect("starts")
        .into_inner();
    assert!(stream.message().await.expect("one message").is_some());
    drop(stream);
    let status = &handle.endpoints()[0];
    assert_eq!((status.outstanding, status.failures), (0, 0));
    assert_eq!(handle.ejected(), 0);
}
