//! One metrics path (issue 13, item 8): `GET /metrics` on the admin listener, scraped over
//! loopback, shows the route series and what the route's breakers, limiters and balancer
//! report through the `metrics` facade. Before, only the hand-rendered `seawall_gateway_*`
//! families were there.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use seawall::discovery::{Instance, Registry};
use seawall::gateway::{Discovery, Gateway, GatewayConfig};
use tokio::net::TcpListener;

use crate::raw_http::get;

/// An upstream answering `200 ok` to everything.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The value of the series whose line starts with `prefix` (name and labels, in the
/// exporter's order), or `None`.
pub(crate) fn value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels_part, v) = match rest.strip_prefix('{') {
            Some(r) => {
                let (l, v) = r.split_once("} ")?;
                (l, v)
            }
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, want)| labels_part.contains(&format!("{k}=\"{want}\"")))
            .then(|| v.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_route_breaker_limiter_and_balancer_series() {
    let (a, b) = (upstream().await, upstream().await);
    let registry = Registry::new();
    let _a = registry.register(Instance::local("metered-svc", a));
    let _b = registry.register(Instance::local("metered-svc", b));
    let config = GatewayConfig::from_toml_str(
        r#"
[gateway]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "metered"
path_prefix = "/m"
service = "metered-svc"
breaker = { failure_rate = 0.5, window = 10, minimum_calls = 5 }
rate_limit = { global = { per_second = 1, burst = 3 } }

[routes.balance]
outlier = { consecutive_failures = 5, base_ejection = "30s" }
"#,
    )
    .unwrap();
    let gateway = Gateway::build(config, Discovery::Registry(registry))
        .await
        .unwrap();
    let admin = gateway
        .clone()
        .spawn_admin(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let proxy = gateway.spawn(TcpListener::bind("127.0.0.1:0").await.unwrap());

    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get(proxy.local_addr(), "/m/x").await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);

    let (status, metrics) = get(admin.local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    let route = [("route", "metered")];
    // The route's own series.
    assert_eq!(
        value(&metrics, "seawall_gateway_requests_total", &route),
        Some(5.0),
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "seawall_gateway_rate_limited_total", &route),
        Some(2.0)
    );
    assert!(
        metrics.contains("# HELP seawall_gateway_requests_total"),
        "{metrics}"
    );
    // The global limiter's decisions, through the facade.
    let limiter = |decision| [("limiter", "metered/global"), ("decision", decision)];
    assert_eq!(
        value(
            &metrics,
            "seawall_rate_limit_decisions_total",
            &limiter("admitted")
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        value(
            &metrics,
            "seawall_rate_limit_decisions_total",
            &limiter("refused")
        ),
        Some(2.0)
    );
    // The balancer's endpoints, and every endpoint's breaker, closed, with its calls
    // (written at the scrape: none of them in the process's recorder).
    assert_eq!(
        value(
            &metrics,
            "seawall_balance_endpoints",
            &[("balancer", "metered/metered-svc")]
        ),
        Some(2.0),
        "{metrics}"
    );
    let breakers: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("seawall_gateway_endpoint_breaker_state{")
                && l.contains("route=\"metered\"")
        })
        .collect();
    assert_eq!(breakers.len(), 2, "{metrics}");
    assert!(
        breakers.iter().all(|l| l.ends_with(" 0")),
        "closed: {breakers:?}"
    );
    let calls: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("seawall_gateway_endpoint_calls_total{")
                && l.contains("route=\"metered\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(calls, 3.0, "the three admitted requests: {metrics}");
    assert!(
        !metrics.contains("breaker=\"metered/metered-svc/"),
        "endpoint breakers' series in the process's recorder: {metrics}"
    );

    // /status.json and /metrics agree.
    let (_, json) = get(admin.local_addr(), "/status.json").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["routes"][0]["requests"], 5);
    proxy.shutdown().await;
    admin.shutdown().await;
}

/// An endpoint discovery removed leaves `/metrics` as it leaves `/status.json`: before,
/// its series stayed for the gateway's life, frozen, and instances coming and going (a
/// new port each deploy) grew the output without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_drop_endpoints_that_discovery_removed() {
    drop_removed_endpoints("churn", "").await;
}

/// Every series of an endpoint discovery removed leaves `/metrics`, its breaker's too:
/// before, the endpoint breakers' `seawall_circuit_breaker_*{breaker="<route>/<service>/<endpoint>"}`
/// stayed in the process's recorder, so an instance that failed (breaker open, gauge 1)
/// and was then taken out by Consul kept an "open breaker" series for the gateway's life,
/// and instances coming and going (a new port or id each deploy) grew `/metrics` without
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_drop_breaker_series_of_removed_endpoints() {
    drop_removed_endpoints(
        "churnb",
        "breaker = { failure_rate = 0.5, window = 10, minimum_calls = 5 }",
    )
    .await;
}

/// A route `name` (with `extra` settings) over two endpoints, one of them removed: no
/// line of `/metrics` names it once `/status.json` no longer lists it.
async fn drop_removed_endpoints(name: &str, extra: &str) {
    let (a, b) = (upstream().await, upstream().await);
    let registry = Registry::new();
    let service = format!("{name}-svc");
    let ra = registry.register(Instance::local(&service, a));
    let _rb = registry.register(Instance::local(&service, b));
    let config = GatewayConfig::from_toml_str(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nname = \"{name}\"\n\
         path_prefix = \"/c\"\nservice = \"{service}\"\n{extra}\n"
    ))
    .unwrap();
    let gateway = Gateway::build(config, Discovery::Registry(registry))
        .await
        .unwrap();
    let admin = gateway
        .clone()
        .spawn_admin(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let proxy = gateway.spawn(TcpListener::bind("127.0.0.1:0").await.unwrap());
    for _ in 0..4 {
        assert_eq!(get(proxy.local_addr(), "/c/x").await.0, 200);
    }
    let a_text = a.to_string();
    let (_, metrics) = get(admin.local_addr(), "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("seawall_gateway_endpoint_") && l.contains(&a_text)),
        "{metrics}"
    );
    if !extra.is_empty() {
        assert!(
            metrics.lines().any(|l| {
                l.starts_with("seawall_gateway_endpoint_breaker_state{") && l.contains(&a_text)
            }),
            "{metrics}"
        );
    }

    drop(ra);
    // Until the gateway's status no longer lists `a`.
    let mut gone = false;
    for _ in 0..100 {
        let (_, json) = get(admin.local_addr(), "/status.json").await;
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let endpoints = json["routes"][0]["endpoints"].as_array().unwrap().clone();
        if endpoints.iter().all(|e| e["address"] != a_text.as_str()) {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gone, "the status still lists {a}");
    let (_, metrics) = get(admin.local_addr(), "/metrics").await;
    let stale: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&a_text))
        .collect();
    assert!(
        stale.is_empty(),
        "/status.json has no endpoint {a}, /metrics still reports it: {stale:#?}"
    );
    proxy.shutdown().await;
    admin.shutdown().await;
}
