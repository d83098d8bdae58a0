//! gRPC-Web answers (as tonic-web or Envoy's `grpc_web` filter send them over HTTP/1.1),
//! from a real hyper server over loopback, through a hyper client guarded by a breaker
//! classifying with `GrpcClassifier` over `GrpcBodyLayer`. A gRPC-Web answer's status is
//! a frame inside its body and its HTTP body ends without trailers: it is decided by its
//! head, never recorded as `INTERNAL` when the body ends.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow, State};
use seawall::grpc::{GrpcBodyLayer, GrpcClassifier};
use tower::{Service, ServiceBuilder, ServiceExt};

/// A gRPC-Web server: a `200` of `content-type: application/grpc-web+proto` whose body
/// is one (empty) message frame and a trailers frame of `grpc-status: 0`, sent in chunks
/// as a streamed answer is; with `x-head-status: N` in the request, a trailers-only
/// answer of `grpc-status: N` in the head instead.
async fn grpc_web_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                        let head_status = request.headers().get("x-head-status").cloned();
                        let mut response = http::Response::builder()
                            .header("content-type", "application/grpc-web+proto");
                        let body = match head_status {
                            Some(code) => {
                                response = response.header("grpc-status", code);
                                Vec::new()
                            }
                            None => {
                                let trailers = b"grpc-status: 0\r\ngrpc-message: \r\n";
                                let mut body = vec![0, 0, 0, 0, 0];
                                body.push(0x80);
                                body.extend_from_slice(&(trailers.len() as u32).to_be_bytes());
                                body.extend_from_slice(trailers);
                                body
                            }
                        };
                        Ok::<_, Infallible>(response.body(Full::new(Bytes::from(body))).unwrap())
                    });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

fn request(addr: SocketAddr, head_status: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    if let Some(code) = head_status {
        request = request.header("x-head-status", code);
    }
    request
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

#[tokio::test]
async fn a_grpc_web_answer_is_decided_by_its_head_not_its_missing_trailers() {
    let addr = grpc_web_server().await;
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .name("grpc-web")
            .sliding_window(SlidingWindow::count_based(4))
            .minimum_calls(4)
            .failure_rate_threshold(0.5)
            .build()
            .unwrap(),
    )
    .with_classifier(GrpcClassifier::new());
    let breaker = layer.breaker().clone();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .layer(GrpcBodyLayer)
        .service(client);

    // Successful calls, each body read to its end (its trailers frame included).
    for _ in 0..8 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(request(addr, None))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap();
        assert!(body.trailers().is_none(), "gRPC-Web sends no HTTP trailers");
    }
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.state, State::Closed, "{snapshot:?}");
    assert_eq!(snapshot.failed_calls, 0, "{snapshot:?}");
    assert_eq!(
        snapshot.calls, 4,
        "the window's four calls recorded: {snapshot:?}"
    );

    // A trailers-only gRPC-Web answer of UNAVAILABLE is the upstream's failure: two of
    // them in the window of four make the failure rate 0.5, and the breaker opens.
    for _ in 0..2 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(request(addr, Some("14")))
            .await
            .unwrap();
        let _ = response.into_body().collect().await;
    }
    assert_eq!(breaker.state(), State::Open);
}
