//! gRPC through the gateway with real tonic clients and servers over loopback: HTTP/2
//! cleartext (h2c) on both sides, trailers carried through, failures counted by
//! `grpc-status` (in the head or in the trailers), the gateway's own refusals as gRPC
//! codes, and a caller's deadline honoured without being blamed on the upstream.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use futures::{Stream, StreamExt};
use seawall::gateway::GatewayHandle;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint, Server, server::TcpIncoming};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::limits::{endpoint, route, settled};

/// A health service answering by the request's `service` name: `"ok"` serves,
/// `"unavailable"` fails at once (trailers-only), `"slow"` answers after 5 s; `watch`
/// sends one message and then ends with `"ok"`'s success or `"unavailable"`'s
/// `UNAVAILABLE`, in the trailers. Counts the calls it gets.
struct Upstream {
    calls: Arc<AtomicUsize>,
}

fn serving() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Upstream {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.calls.fetch_add(1, SeqCst);
        match request.get_ref().service.as_str() {
            "unavailable" => Err(Status::unavailable("draining")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Response::new(serving()))
            }
            _ => Ok(Response::new(serving())),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.calls.fetch_add(1, SeqCst);
        let first = futures::stream::iter([Ok(serving())]);
        let stream: WatchStream = match request.get_ref().service.as_str() {
            "unavailable" => Box::pin(first.chain(futures::stream::iter([Err(
                Status::unavailable("lost the leader"),
            )]))),
            _ => Box::pin(first),
        };
        Ok(Response::new(stream))
    }
}

/// A tonic server on a loopback port; returns its address and its call count.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(
        Server::builder()
            .add_service(HealthServer::new(Upstream {
                calls: calls.clone(),
            }))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (addr, calls)
}

/// A gateway taking h2c and forwarding over h2c to the gRPC service at `upstream`, with
/// a breaker that opens after 4 failures of 4 calls and `route` settings.
async fn gateway(upstream: SocketAddr, route: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"grpc\"\npath_prefix = \"/grpc.health.v1.Health\"\n\
         service = \"health\"\n{route}\n\
         [routes.breaker]\nfailure_rate = 0.5\nminimum_calls = 4\nwindow = 8\n\
         wait_in_open = \"30s\"\n\n\
         [[services]]\nname = \"health\"\ninstances = [\"{upstream}\"]\nprotocol = \"h2\"\n"
    );
    super::spawn_gateway(&config).await
}

async fn client(gw: &GatewayHandle) -> HealthClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", gw.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

fn named(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_streams_go_through_with_their_trailers() {
    let (addr, calls) = upstream().await;
    let gw = gateway(addr, "").await;
    let mut client = client(&gw).await;
    let answer = client.check(named("ok")).await.expect("served");
    assert_eq!(answer.get_ref().status, ServingStatus::Serving as i32);
    // A stream: a message, then `grpc-status: 0` in the trailers, read by tonic.
    let mut stream = client.watch(named("ok")).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert!(stream.message().await.unwrap().is_none(), "ended with OK");
    assert_eq!(calls.load(SeqCst), 2);
    settled(&gw, 2).await;
    assert_eq!(endpoint(&gw).failures, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_in_the_head_or_the_trailers_opens_the_endpoint_breaker() {
    let (addr, calls) = upstream().await;
    let gw = gateway(addr, "").await;
    let mut client = client(&gw).await;
    for _ in 0..2 {
        let status = client.check(named("unavailable")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "draining", "the upstream's own status");
    }
    for _ in 0..2 {
        let mut stream = client
            .watch(named("unavailable"))
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some());
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    settled(&gw, 4).await;
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.breaker.as_deref()),
        (4, Some("open")),
        "{e:?}"
    );
    // The gateway refuses now, as gRPC, without calling the upstream.
    let status = client.check(named("ok")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(calls.load(SeqCst), 4);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_is_resource_exhausted() {
    let (addr, calls) = upstream().await;
    let gw = gateway(
        addr,
        "[routes.rate_limit]\nglobal = { per_second = 1, burst = 2 }\n",
    )
    .await;
    let mut client = client(&gw).await;
    client.check(named("ok")).await.expect("within the burst");
    client.check(named("ok")).await.expect("within the burst");
    let status = client.check(named("ok")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{status:?}"
    );
    assert_eq!(calls.load(SeqCst), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_is_kept_and_never_blamed_on_the_upstream() {
    let (addr, _) = upstream().await;
    let gw = gateway(addr, "timeout = \"30s\"").await;
    let mut client = client(&gw).await;
    let started = tokio::time::Instant::now();
    for _ in 0..6 {
        // Sent as `grpc-timeout` and kept by tonic's channel too: whichever of the
        // client and the gateway gives up first, the call ends at the deadline.
        let mut request = Request::new(named("slow"));
        request.set_timeout(Duration::from_millis(50));
        let status = client.check(request).await.unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    settled(&gw, 6).await;
    let e = endpoint(&gw);
    assert_eq!(
        (e.failures, e.breaker.as_deref()),
        (0, Some("closed")),
        "{e:?}"
    );
    assert!(!e.ejected, "{e:?}");
    // Those the gateway ended are counted as the caller's.
    assert!(route(&gw).client_errors.deadline <= 6);
    gw.shutdown().await;
}
