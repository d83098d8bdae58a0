//! gRPC-aware classification with a real tonic server and client over loopback: the
//! breaker and the balancer count a call by its `grpc-status`, in the headers of a
//! trailers-only response or in the trailers at the end of a stream.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use seawall::circuit_breaker::{
    Breaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, SlidingWindow, State,
};
use seawall::grpc::{GrpcBodyLayer, GrpcClassifier};
use tonic::transport::{Channel, Endpoint, Server, server::TcpIncoming};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::{Layer, ServiceBuilder};

mod balance;
mod web;

/// A health service whose answers the request's `service` name chooses, or else its
/// `default`:
/// * `check`: `"ok"` serves, `"unavailable"` is `UNAVAILABLE`, `"not_found"` is
///   `NOT_FOUND` (tonic sends these errors trailers-only: the status in the headers);
/// * `watch`: one message, then `"ok"` ends the stream (`grpc-status: 0` in the
///   trailers), `"unavailable"` ends it with `UNAVAILABLE` in the trailers and `"hang"`
///   sends nothing more.
struct Fixed {
    default: &'static str,
}

impl Fixed {
    fn mode<'a>(&'a self, request: &'a Request<HealthCheckRequest>) -> &'a str {
        match request.get_ref().service.as_str() {
            "" => self.default,
            named => named,
        }
    }
}

fn serving() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Fixed {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        match self.mode(&request) {
            "ok" => Ok(Response::new(serving())),
            "unavailable" => Err(Status::unavailable("draining")),
            "not_found" => Err(Status::not_found("no such service")),
            other => panic!("unknown mode {other}"),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let first = futures::stream::iter([Ok(serving())]);
        let stream: WatchStream = match self.mode(&request) {
            "ok" => Box::pin(first),
            "unavailable" => Box::pin(first.chain(futures::stream::iter([Err(
                Status::unavailable("lost the leader"),
            )]))),
            "hang" => Box::pin(first.chain(futures::stream::pending())),
            other => panic!("unknown mode {other}"),
        };
        Ok(Response::new(stream))
    }
}

/// A tonic server on a loopback port, answering as `default`; it stops with the test's
/// runtime.
async fn server(default: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(
        Server::builder()
            .add_service(HealthServer::new(Fixed { default }))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn config() -> CircuitBreakerConfig {
    CircuitBreakerConfig::builder()
        .name("health")
        .sliding_window(SlidingWindow::count_based(4))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .build()
        .expect("valid")
}

/// A breaker classifying by `grpc-status`, and a limit of one call, never refilled (its
/// manual clock stands still), to put inside it.
fn breaker_and_one_call() -> (
    CircuitBreakerLayer<GrpcClassifier>,
    Breaker,
    seawall::rate_limit::RateLimiter<seawall::rate_limit::ManualClock>,
) {
    use seawall::rate_limit::{ManualClock, Quota, Rate, RateLimiter};

    let layer = CircuitBreakerLayer::new(config()).with_classifier(GrpcClassifier::new());
    let breaker = layer.breaker().clone();
    let limiter = RateLimiter::with_clock(
        Quota::new(Rate::per_second(1), 1).unwrap(),
        ManualClock::new(),
    );
    (layer, breaker, limiter)
}

/// The breaker counted the one call that reached the server, a success, and none of the
/// limit's refusals.
fn only_the_served_call_counted(breaker: &Breaker) {
    assert_eq!(breaker.state(), State::Closed, "{:?}", breaker.snapshot());
    let snapshot = breaker.snapshot();
    assert_eq!((snapshot.calls, snapshot.failed_calls), (1, 0));
}

/// A health client whose channel is guarded by a breaker classifying by `grpc-status`.
async fn guarded(
    addr: SocketAddr,
) -> (
    HealthClient<
        seawall::circuit_breaker::CircuitBreaker<
            seawall::grpc::GrpcBodyService<Channel>,
            GrpcClassifier,
        >,
    >,
    Breaker,
) {
    let layer = CircuitBreakerLayer::new(config()).with_classifier(GrpcClassifier::new());
    let breaker = layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(GrpcBodyLayer)
        .service(channel(addr).await);
    (HealthClient::new(svc), breaker)
}

fn named(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_string(),
    }
}

#[tokio::test]
async fn unavailable_opens_the_breaker() {
    let (mut client, breaker) = guarded(server("ok").await).await;
    for _ in 0..4 {
        let status = client.check(named("unavailable")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(breaker.state(), State::Open);
    // Rejected without reaching the server: tonic reports the breaker's error.
    let status = client.check(named("unavailable")).await.unwrap_err();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&status);
    while let Some(e) = cause.filter(|e| !e.is::<CircuitOpen>()) {
        cause = e.source();
    }
    assert!(cause.is_some(), "the breaker's error: {status:?}");
}

/// A seawall rate limit inside the breaker refuses with its own error (`RateLimited`):
/// the call never reaches the server, and is not the server's failure. `GrpcClassifier`
/// counted every error as a failure, so one client's burst against the limit opened the
/// breaker in front of a healthy server.
#[tokio::test]
async fn a_limit_inside_the_breaker_does_not_open_it() {
    use seawall::rate_limit::{RateLimitLayer, RateLimited};

    let (layer, breaker, limiter) = breaker_and_one_call();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(RateLimitLayer::from_limiter(limiter))
        .layer(GrpcBodyLayer)
        .service(channel(server("ok").await).await);
    let mut client = HealthClient::new(svc);
    client.check(named("ok")).await.expect("served");
    for _ in 0..8 {
        let status = client.check(named("ok")).await.unwrap_err();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&status);
        while let Some(e) = cause.filter(|e| !e.is::<RateLimited>()) {
            cause = e.source();
        }
        assert!(cause.is_some(), "the limit's refusal: {status:?}");
    }
    only_the_served_call_counted(&breaker);
}

/// The same limit answered in gRPC's form inside the breaker (`GrpcRefusalLayer` below
/// it, turning the limit's refusals into `RESOURCE_EXHAUSTED` answers): `GrpcClassifier`
/// counts `RESOURCE_EXHAUSTED` as a failure by default, and counted the limit's own
/// answers, so a burst against the client's limit opened the breaker in front of a
/// healthy server.
#[tokio::test]
async fn a_limit_answered_as_a_grpc_status_inside_the_breaker_does_not_open_it() {
    use seawall::grpc::GrpcRefusalLayer;
    use seawall::rate_limit::RateLimitLayer;

    let (layer, breaker, limiter) = breaker_and_one_call();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(GrpcBodyLayer)
        .layer(GrpcRefusalLayer)
        .layer(RateLimitLayer::from_limiter(limiter))
        .service(channel(server("ok").await).await);
    let mut client = HealthClient::new(svc);
    client.check(named("ok")).await.expect("served");
    for _ in 0..8 {
        let status = client.check(named("ok")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    only_the_served_call_counted(&breaker);
}

/// An HTTP rate limit inside the breaker (`HttpRateLimitLayer` in a gRPC client's stack
/// over hyper) answers a call over the limit with its own `429`, marked `Refused`, which
/// gRPC reads as `UNAVAILABLE` (the HTTP status mapping). `HttpClassifier` ignores
/// marked answers; `GrpcClassifier` counted them as the server's failures.
#[tokio::test(start_paused = true)]
async fn an_http_limit_inside_the_breaker_does_not_open_it() {
    use bytes::Bytes;
    use http_body_util::Full;
    use seawall::rate_limit::http::{HttpRateLimitLayer, Refused};
    use tower::{Service, ServiceExt};

    let (layer, breaker, limiter) = breaker_and_one_call();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .layer(GrpcBodyLayer)
        .layer(HttpRateLimitLayer::global(limiter))
        .service_fn(move |_: http::Request<()>| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // A trailers-only OK.
            let answer = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "0")
                .body(Full::new(Bytes::new()))
                .unwrap();
            async { Ok::<_, seawall::BoxError>(answer) }
        });
    for i in 0..9 {
        let answer = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}: {:?}", breaker.snapshot()));
        if i > 0 {
            assert_eq!(answer.status(), http::StatusCode::TOO_MANY_REQUESTS);
            assert!(answer.extensions().get::<Refused>().is_some());
        }
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    only_the_served_call_counted(&breaker);
}

#[tokio::test]
async fn not_found_and_ok_do_not_open_it() {
    let (mut client, breaker) = guarded(server("ok").await).await;
    for _ in 0..8 {
        let status = client.check(named("not_found")).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    assert_eq!(breaker.state(), State::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!((snapshot.calls, snapshot.failed_calls), (4, 0));

    // A unary success: `grpc-status: 0` comes in the trailers, read by tonic's client
    // before it returns; the window then holds it.
    client.check(named("ok")).await.expect("serving");
    assert_eq!(breaker.snapshot().failed_calls, 0);
    // Failures after successes: the window (4) is half failures, the threshold.
    for _ in 0..2 {
        client.check(named("unavailable")).await.unwrap_err();
    }
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test]
async fn unavailable_in_the_trailers_counts_when_the_stream_ends() {
    let (mut client, breaker) = guarded(server("ok").await).await;
    for round in 0..4 {
        let mut stream = client
            .watch(named("unavailable"))
            .await
            .expect("the stream starts")
            .into_inner();
        // The response head said 200 and nothing yet: not counted until the end.
        assert_eq!(breaker.snapshot().calls, round);
        assert!(stream.message().await.expect("one message").is_some());
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(breaker.snapshot().failed_calls, round + 1);
    }
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test]
async fn ok_in_the_trailers_is_a_success() {
    let (mut client, breaker) = guarded(server("ok").await).await;
    for round in 1..=6 {
        let mut stream = client
            .watch(named("ok"))
            .await
            .expect("starts")
            .into_inner();
        assert!(stream.message().await.expect("one message").is_some());
        assert!(stream.message().await.expect("a clean end").is_none());
        let snapshot = breaker.snapshot();
        assert_eq!((snapshot.calls, snapshot.failed_calls), (round.min(4), 0));
    }
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test]
async fn a_stream_dropped_by_the_client_is_not_counted() {
    let (mut client, breaker) = guarded(server("ok").await).await;
    for _ in 0..6 {
        let mut stream = client
            .watch(named("hang"))
            .await
            .expect("starts")
            .into_inner();
        assert!(stream.message().await.expect("one message").is_some());
        // The client has what it wanted and goes: its cancellation is not the server's
        // failure, nor a success.
        drop(stream);
    }
    let snapshot = breaker.snapshot();
    assert_eq!((snapshot.calls, snapshot.failed_calls), (0, 0));
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test]
async fn a_probe_dropped_mid_stream_returns_its_slot() {
    let config = CircuitBreakerConfig::builder()
        .name("probe")
        .sliding_window(SlidingWindow::count_based(2))
        .minimum_calls(2)
        .permitted_calls_in_half_open(1)
        .wait_in_open(Duration::from_millis(20))
        .build()
        .expect("valid");
    let layer = CircuitBreakerLayer::new(config).with_classifier(GrpcClassifier::new());
    let breaker = layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(GrpcBodyLayer)
        .service(channel(server("ok").await).await);
    let mut client = HealthClient::new(svc);
    for _ in 0..2 {
        client.check(named("unavailable")).await.unwrap_err();
    }
    assert_eq!(breaker.state(), State::Open);
    // At least the open wait (the breaker admits probes once it has passed).
    tokio::time::sleep(Duration::from_millis(25)).await;
    for _ in 0..3 {
        let mut stream = client
            .watch(named("hang"))
            .await
            .expect("a probe")
            .into_inner();
        assert!(stream.message().await.expect("one message").is_some());
        drop(stream);
        assert_eq!(breaker.state(), State::HalfOpen);
    }
    // The slot came back each time: a probe that ends in `UNAVAILABLE` reopens it.
    let mut stream = client
        .watch(named("unavailable"))
        .await
        .expect("a probe")
        .into_inner();
    while stream.message().await.is_ok_and(|m| m.is_some()) {}
    assert_eq!(breaker.state(), State::Open);
}

/// The layer alone changes nothing for a plain client: responses pass through.
#[tokio::test]
async fn the_body_layer_is_transparent() {
    let svc = GrpcBodyLayer.layer(channel(server("ok").await).await);
    let mut client = HealthClient::new(svc);
    let response = client.check(named("ok")).await.expect("serving");
    assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
}

/// `GrpcRefusalLayer` on a real tonic client: a rate limit's refusal reaches the caller as
/// `RESOURCE_EXHAUSTED` and an open breaker's as `UNAVAILABLE`, each with gRPC's retry
/// pushback, where without the layer tonic would see a transport error (`UNKNOWN`); a
/// server's own status passes untouched.
#[tokio::test]
async fn refusals_reach_a_tonic_client_as_grpc_statuses() {
    use seawall::grpc::GrpcRefusalLayer;
    use seawall::rate_limit::{Quota, Rate, RateLimitLayer};

    let addr = server("ok").await;
    let breaker_layer = CircuitBreakerLayer::new(config()).with_classifier(GrpcClassifier::new());
    let breaker = breaker_layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(GrpcRefusalLayer)
        .layer(RateLimitLayer::new(
            Quota::new(Rate::per_minute(1), 2).expect("quota"),
        ))
        .layer(breaker_layer)
        .layer(GrpcBodyLayer)
        .service(channel(addr).await);
    let mut client = HealthClient::new(svc);

    // The server's own answers, OK and NOT_FOUND, pass as they are.
    client.check(named("ok")).await.expect("served");
    let not_found = client
        .check(named("not_found"))
        .await
        .expect_err("not found");
    assert_eq!(not_found.code(), Code::NotFound);
    assert!(not_found.metadata().get("grpc-retry-pushback-ms").is_none());

    // The burst of 2 is spent: the limit refuses, as RESOURCE_EXHAUSTED with pushback.
    let limited = client.check(named("ok")).await.expect_err("limited");
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    let pushback: u64 = limited
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("milliseconds");
    assert!((1..=60_000).contains(&pushback), "pushback {pushback} ms");

    // A breaker opened by the server's UNAVAILABLE answers: its refusals are UNAVAILABLE
    // too, but with pushback until the half-open probe, and the server is not called.
    // Typed errors: the rejection carries when the breaker probes again.
    let failing = server("unavailable").await;
    let breaker_layer = CircuitBreakerLayer::new(config())
        .with_classifier(GrpcClassifier::new())
        .typed_errors();
    let tripped = breaker_layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(GrpcRefusalLayer)
        .layer(breaker_layer)
        .layer(GrpcBodyLayer)
        .service(channel(failing).await);
    let mut client = HealthClient::new(svc);
    for _ in 0..4 {
        let served = client.check(named("")).await.expect_err("draining");
        assert_eq!(served.code(), Code::Unavailable);
        assert_eq!(served.message(), "draining");
        assert!(served.metadata().get("grpc-retry-pushback-ms").is_none());
    }
    assert_eq!(tripped.state(), State::Open);
    let open = client.check(named("")).await.expect_err("open");
    assert_eq!(open.code(), Code::Unavailable, "{open:?}");
    assert_ne!(open.message(), "draining");
    assert!(
        open.metadata().contains_key("grpc-retry-pushback-ms"),
        "{open:?}"
    );
    // The first breaker saw two calls, both recorded (OK and NOT_FOUND are not failures).
    assert_eq!(breaker.state(), State::Closed);
}

/// The same layers on a real tonic *server*: a limit in front of the service refuses the
/// extra calls as `RESOURCE_EXHAUSTED`, which the tonic client reads as such, and the
/// service is not called for them.
#[tokio::test]
async fn a_tonic_server_behind_a_limit_answers_resource_exhausted() {
    use seawall::grpc::GrpcRefusalLayer;
    use seawall::rate_limit::{Quota, Rate, RateLimitLayer};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(
        Server::builder()
            .layer(
                ServiceBuilder::new()
                    .layer(GrpcRefusalLayer)
                    .layer(RateLimitLayer::new(
                        Quota::new(Rate::per_minute(1), 2).expect("quota"),
                    ))
                    .into_inner(),
            )
            .add_service(HealthServer::new(Fixed { default: "ok" }))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let mut client = HealthClient::new(channel(addr).await);
    client.check(named("ok")).await.expect("first");
    client.check(named("ok")).await.expect("second");
    let limited = client.check(named("ok")).await.expect_err("limited");
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert!(limited.metadata().contains_key("grpc-retry-pushback-ms"));
    // The connection is still usable, and still limited.
    let again = client.check(named("ok")).await.expect_err("still limited");
    assert_eq!(again.code(), Code::ResourceExhausted);
}
