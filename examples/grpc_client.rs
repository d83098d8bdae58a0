//! A tonic (gRPC) client whose channel is seawall's stack, against three tonic servers
//! on loopback, one of which fails every call:
//!
//! ```text
//! HealthClient ─ GrpcRefusal ─ rate limit ─ fallback ─ balancer (p2c) ─ breaker per endpoint ─ Channel
//!                (gRPC codes)   (20, 50/s)   (no endpoint)  (registry)   (gRPC classifier)
//! ```
//!
//! ```sh
//! cargo run --example grpc_client --features grpc
//! ```
//!
//! The scenario, each step checked (the example exits non-zero if one fails):
//!
//! 1. calls spread over the three servers; the failing one answers `UNAVAILABLE`, its
//!    breaker (classified by `grpc-status`, not by HTTP's 200) opens after a few, and the
//!    calls go on at the two healthy ones;
//! 2. a burst beyond the client's rate limit: the extra calls get `RESOURCE_EXHAUSTED`
//!    with gRPC's retry pushback, not an HTTP 429 tonic would call `UNKNOWN`;
//! 3. the two healthy servers stop: their breakers open on the refused connections and
//!    the calls are refused by the breakers, as `UNAVAILABLE` with pushback;
//! 4. every instance leaves the registry: the fallback answers `SERVICE_UNKNOWN` in a
//!    real gRPC answer (a message and `grpc-status: 0` in the trailers).
//!
//! It ends by itself in about two seconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::Message;
use seawall::BoxError;
use seawall::balance::{Balance, NoEndpoints, OutlierDetection, SharedBalance};
use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow};
use seawall::discovery::{Instance, Registry, ServiceDiscover};
use seawall::fallback::FallbackLayer;
use seawall::grpc::{GrpcBody, GrpcBodyLayer, GrpcClassifier, GrpcRefusalLayer};
use seawall::rate_limit::{Quota, Rate, RateLimitLayer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Endpoint, Server, server::TcpIncoming};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::{Layer, ServiceBuilder};

/// A health server that serves, or fails every call with `UNAVAILABLE`.
struct Fixed {
    failing: bool,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for Fixed {
    async fn check(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.calls.fetch_add(1, SeqCst);
        if self.failing {
            return Err(Status::unavailable("draining"));
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not in this example"))
    }
}

/// A started server: its address, its call count, and how to stop it.
struct Started {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(failing: bool) -> Result<Started, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = oneshot::channel::<()>();
    let service = HealthServer::new(Fixed {
        failing,
        calls: calls.clone(),
    });
    let done = tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(Started {
        addr,
        calls,
        stop,
        done,
    })
}

type Body = GrpcBody<tonic::body::Body>;

/// The fallback's answer: a real gRPC answer, `SERVICE_UNKNOWN`, in a message framed as
/// gRPC frames it, then `grpc-status: 0` in the trailers.
fn service_unknown(_: BoxError) -> http::Response<Body> {
    let message = HealthCheckResponse {
        status: ServingStatus::ServiceUnknown as i32,
    }
    .encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(&message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Infallible>(Frame::data(framed.freeze())),
        Ok(Frame::trailers(trailers)),
    ];
    let body = tonic::body::Body::new(StreamBody::new(futures::stream::iter(frames)));
    let mut response = http::Response::new(GrpcBody::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Whether a `T` is in `error`'s `source()` chain.
fn caused_by<T: std::error::Error + 'static>(error: &BoxError) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The fallback's case: the balancer has no endpoint at all.
fn no_endpoint(error: &BoxError) -> bool {
    caused_by::<NoEndpoints>(error)
}

fn check(cond: bool, what: &str) -> Result<(), BoxError> {
    if cond {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}").into())
    }
}

fn request() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let servers = [start(false).await?, start(false).await?, start(true).await?];
    let registry = Registry::new();
    let mut registrations: Vec<_> = servers
        .iter()
        .map(|s| registry.register(Instance::local("health", s.addr)))
        .collect();
    println!(
        "three health servers: {} and {} serve, {} fails every call",
        servers[0].addr, servers[1].addr, servers[2].addr
    );

    // Each endpoint a lazily connected channel, its bodies wrapped so that a status in
    // the trailers is counted when the body ends.
    let endpoint = |instance: &Instance| {
        let uri = format!("http://{}:{}", instance.address, instance.port);
        GrpcBodyLayer.layer(
            Endpoint::from_shared(uri)
                .expect("a valid URI")
                .connect_timeout(Duration::from_millis(200))
                .connect_lazy(),
        )
    };
    let balancer = Balance::builder()
        .name("health")
        .endpoint_breaker(
            CircuitBreakerConfig::builder()
                .sliding_window(SlidingWindow::count_based(4))
                .minimum_calls(4)
                .failure_rate_threshold(0.5)
                .wait_in_open(Duration::from_secs(30))
                .build()?,
        )
        .outlier_detection(
            OutlierDetection::builder()
                .consecutive_failures(5)
                .max_ejected(0.34)
                .build()?,
        )
        .classifier(GrpcClassifier::new())
        .build(ServiceDiscover::new(registry.watch("health"), endpoint));
    let handle = balancer.handle().clone();
    let limit = RateLimitLayer::new(Quota::new(Rate::per_second(50), 20)?);
    let stack = ServiceBuilder::new()
        .layer(GrpcRefusalLayer)
        .layer(limit)
        .layer(FallbackLayer::from_fn(service_unknown).when(no_endpoint))
        // One balancer for every clone of the client.
        .service(SharedBalance::new(balancer));
    let mut client = HealthClient::new(stack);

    println!("\n1. calls one at a time, until the failing server's breaker opens");
    let failing_port = format!(":{}", servers[2].addr.port());
    let failing_open = || {
        handle.endpoints().iter().any(|e| {
            e.address.ends_with(&failing_port)
                && e.breaker == Some(seawall::circuit_breaker::State::Open)
        })
    };
    let (mut calls, mut unavailable) = (0, 0);
    while !failing_open() && calls < 200 {
        calls += 1;
        match client.check(request()).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::Unavailable => unavailable += 1,
            Err(status) => return Err(format!("unexpected {status:?}").into()),
        }
        // Paced below the client's rate limit (50/s): p2c may take more calls than the
        // burst of 20 before the failing server has had its 4, and none may be refused.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let failing_calls = servers[2].calls.load(SeqCst);
    println!(
        "  {calls} calls: {} / {} / {} (failing) per server; {unavailable} answered UNAVAILABLE",
        servers[0].calls.load(SeqCst),
        servers[1].calls.load(SeqCst),
        failing_calls,
    );
    check(
        failing_open() && failing_calls == 4 && unavailable == 4,
        "the failing server's breaker opened on its 4 UNAVAILABLE answers (each an HTTP 200)",
    )?;
    // Step 1's calls may have taken the whole burst: let the bucket refill (20 tokens at
    // 50/s) before calls that must all be admitted.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..10 {
        client.check(request()).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check(
        servers[2].calls.load(SeqCst) == 4,
        "10 more calls, all served by the two healthy servers",
    )?;

    println!("\n2. a burst of 30 calls at once, beyond the limit (burst 20, 50/s)");
    let mut exhausted = 0;
    let mut pushback = None;
    let mut burst = Vec::new();
    for _ in 0..30 {
        let mut client = client.clone();
        burst.push(tokio::spawn(async move { client.check(request()).await }));
    }
    for call in burst {
        if let Err(status) = call.await? {
            if status.code() == Code::ResourceExhausted {
                exhausted += 1;
                pushback = status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            }
        }
    }
    println!("  {exhausted} RESOURCE_EXHAUSTED, retry pushback {pushback:?} ms");
    check(
        exhausted >= 5,
        "calls beyond the burst were RESOURCE_EXHAUSTED",
    )?;
    check(
        pushback.is_some_and(|ms| ms <= 1_000),
        "with gRPC's retry pushback",
    )?;
    // Let the bucket refill.
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!("\n3. the two healthy servers stop");
    let [a, b, failing_server] = servers;
    for server in [a, b] {
        let _ = server.stop.send(());
        let _ = server.done.await;
    }
    let mut refused = 0;
    let mut pushback = None;
    for _ in 0..12 {
        if let Err(status) = client.check(request()).await {
            if status.code() == Code::Unavailable
                && status.metadata().contains_key("grpc-retry-pushback-ms")
            {
                refused += 1;
                pushback = status.metadata().get("grpc-retry-pushback-ms").cloned();
            }
        }
    }
    println!("  {refused} refused by open breakers as UNAVAILABLE, pushback {pushback:?} ms");
    check(
        refused >= 1,
        "open breakers answer UNAVAILABLE with pushback",
    )?;

    println!("\n4. every instance leaves the registry");
    registrations.clear();
    let answer = client.check(request()).await?;
    println!("  answer: {:?}", answer.get_ref());
    check(
        answer.get_ref().status == ServingStatus::ServiceUnknown as i32,
        "the fallback answered SERVICE_UNKNOWN as a real gRPC answer",
    )?;

    let _ = failing_server.stop.send(());
    println!("\nall expectations met");
    Ok(())
}
