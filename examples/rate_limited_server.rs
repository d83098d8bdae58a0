//! An HTTP server behind two rate limits, and a client that runs into them.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example rate_limited_server --features http
//! cargo run --example rate_limited_server --features http -- --serve --port 3000
//! ```
//!
//! The example starts a hyper 1 server on `127.0.0.1` (an ephemeral port unless `--port N`
//! is given; it never listens beyond loopback) answering `hello` behind this stack of
//! tower layers:
//!
//! ```text
//! HttpRateLimitLayer::global      "global": 20 requests per second, burst 20
//!   HttpRateLimitLayer::per_key   "per-ip": 5 per 10 seconds, burst 5, keyed by ClientIp::peer(),
//!                                 with Kong-style X-RateLimit-Limit / X-RateLimit-Remaining
//!     service_fn                  "hello\n"
//! ```
//!
//! It then acts as its own client: 7 requests from one address over loopback (a hyper-util
//! client), printing for each the status line and the rate-limit headers as `curl -i`
//! shows them. The first 5 are admitted; the 6th and 7th are answered by the per-client
//! layer with `429 Too Many Requests` and `Retry-After`, without reaching the handler.
//!
//! The headers follow draft-ietf-httpapi-ratelimit-headers-09: `RateLimit-Policy`
//! (`"name";q=limit;w=window-seconds`) and `RateLimit` (`"name";r=remaining;t=seconds`), one
//! list entry per layer, the innermost first.
//!
//! The example exits with a non-zero status unless exactly the 6th and 7th requests are
//! refused, so CI running it catches regressions. With `--serve` it then keeps serving and
//! prints a `curl -i` command to try; Ctrl-C ends it.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::BoxError;
use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate, RateLimiter};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

/// Requests the built-in client sends.
const REQUESTS: usize = 7;
/// Requests from one client admitted before the per-client limit refuses (its burst).
const PER_IP_BURST: u32 = 5;
/// The client gives up on a request after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The headers printed for each response, in the order they are looked for.
const SHOWN_HEADERS: [&str; 5] = [
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "retry-after",
];

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Args {
    port: u16,
    serve: bool,
}

const USAGE: &str = "usage: rate_limited_server [--port N] [--serve]

  --port N   listen on 127.0.0.1:N (default 0: an ephemeral port)
  --serve    keep serving after the demonstration, until Ctrl-C";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: 0,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let port = match arg.as_str() {
            "--serve" => {
                args.serve = true;
                continue;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "--port" => it.next().ok_or("--port needs a value")?,
            other => match other.strip_prefix("--port=") {
                Some(value) => value.to_owned(),
                None => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
            },
        };
        args.port = port
            .parse()
            .map_err(|_| format!("--port: {port:?} is not a port number (0-65535)"))?;
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

/// Binds `127.0.0.1:port` and serves the rate-limited handler on it until the runtime
/// shuts down; returns the bound address.
async fn start_server(port: u16) -> Result<SocketAddr, BoxError> {
    // The real tokio clock (the default `TokioClock`).
    let global = RateLimiter::new(Quota::new(Rate::per_second(20), 20)?);
    let per_ip = KeyedRateLimiter::new(Quota::new(
        Rate::new(PER_IP_BURST, Duration::from_secs(10)),
        PER_IP_BURST,
    )?);

    let svc = ServiceBuilder::new()
        .layer(HttpRateLimitLayer::global(global).name("global"))
        .layer(
            // The connection's peer address; behind a reverse proxy, use
            // `ClientIp::trusting(["10.0.0.0/8"])` to believe its X-Forwarded-For.
            HttpRateLimitLayer::per_key(per_ip, ClientIp::peer())
                .name("per-ip")
                .legacy_headers(true),
        )
        .service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(String::from("hello\n")))
        });

    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let svc = svc.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    // `ClientIp` reads the peer address from the request's extensions.
                    req.extensions_mut().insert(peer);
                    svc.clone().oneshot(req)
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("server: connection from {peer}: {e}");
                }
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// Sends one GET and returns the status and headers (the body is read and dropped).
async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
) -> Result<(StatusCode, HeaderMap), BoxError> {
    let req = Request::get(format!("http://{addr}/")).body(Empty::new())?;
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("no answer from {addr} within {CLIENT_TIMEOUT:?}"))??;
    let status = resp.status();
    let headers = resp.headers().clone();
    // Read the body so the connection goes back to the pool.
    resp.into_body().collect().await?;
    Ok((status, headers))
}

/// Prints the status line and the rate-limit headers as `curl -i` shows them (hyper sends
/// header names in lower case, one line per value).
fn print_response(status: StatusCode, headers: &HeaderMap) {
    println!(
        "HTTP/1.1 {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for name in SHOWN_HEADERS {
        for value in headers.get_all(name) {
            println!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
        }
    }
}

/// Sends the requests, prints the answers and checks that exactly the ones past the
/// per-client burst are refused, with `Retry-After`.
async fn demonstrate(addr: SocketAddr) -> Result<String, BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut problems = Vec::new();
    let mut admitted = 0;
    let mut refused = Vec::new();
    for i in 1..=REQUESTS {
        let (status, headers) = get(&client, addr).await?;
        println!("# request {i} of {REQUESTS}");
        print_response(status, &headers);
        println!();

        let retry_after = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let expect_refusal = i > PER_IP_BURST as usize;
        match (status, expect_refusal) {
            (StatusCode::OK, false) => admitted += 1,
            (StatusCode::TOO_MANY_REQUESTS, true) => match retry_after {
                Some(secs) => refused.push(secs),
                None => problems.push(format!("request {i}: 429 without Retry-After")),
            },
            (status, _) => problems.push(format!(
                "request {i}: got {status}, expected {}",
                if expect_refusal {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::OK
                }
            )),
        }
        if headers.get_all("ratelimit").iter().count() != 2 {
            problems.push(format!(
                "request {i}: expected a RateLimit entry from each of the two layers"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n").into());
    }
    Ok(format!(
        "summary: {admitted} x 200 OK, then {} x 429 Too Many Requests (Retry-After: {} s) \
         from one client: the per-ip limit of {PER_IP_BURST} per 10 s held",
        refused.len(),
        refused.join(" s, ")
    ))
}

// ---------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };

    let addr = match start_server(args.port).await {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on http://{addr}/");
    println!(
        "limits: \"global\" 20/s, burst 20; \"per-ip\" {PER_IP_BURST} per 10 s, burst {PER_IP_BURST}"
    );
    println!();

    match demonstrate(addr).await {
        Ok(summary) => println!("{summary}"),
        Err(e) => {
            eprintln!("error: the rate limits did not behave as expected:\n{e}");
            return ExitCode::FAILURE;
        }
    }

    if args.serve {
        println!();
        println!("serving until Ctrl-C; try:");
        println!();
        println!("    curl -i http://{addr}/");
        println!();
        println!("(127.0.0.1's per-ip bucket was just emptied: it gets a token back every 2 s)");
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("error: cannot wait for Ctrl-C: {e}");
            return ExitCode::FAILURE;
        }
        println!("bye");
    }
    ExitCode::SUCCESS
}
