//! Self-test of the Consul HTTP API double (`mod.rs` beside this file): every rule of
//! `docs/consul-api.md` it reproduces, exercised over loopback with a plain hyper client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::{ConsulDouble, DoubleOptions, agent, go_duration_nanos};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn index(&self) -> u64 {
        self.header("x-consul-index")
            .expect("X-Consul-Index")
            .parse()
            .expect("numeric index")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Api {
    client: HttpClient,
    base: String,
    token: Option<(&'static str, String)>,
}

impl Api {
    fn new(d: &ConsulDouble) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: d.base_url(),
            token: None,
        }
    }

    async fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some((name, value)) = &self.token {
            req = req.header(*name, value.as_str());
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req.body(Full::new(bytes)).map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn get(&self, path: &str) -> Answer {
        self.try_call("GET", path, None).await.expect("GET")
    }

    async fn put(&self, path: &str, body: Value) -> Answer {
        self.try_call("PUT", path, Some(&body)).await.expect("PUT")
    }

    async fn put_empty(&self, path: &str) -> Answer {
        self.try_call("PUT", path, None).await.expect("PUT")
    }

    async fn register(&self, body: Value) {
        let a = self.put("/v1/agent/service/register", body.clone()).await;
        assert_eq!(a.status, 200, "register {body}: {}", a.body);
        assert!(a.body.is_empty());
    }
}

fn entries(a: &Answer) -> Vec<Value> {
    a.json().as_array().expect("array").clone()
}

fn instance_ids(a: &Answer) -> Vec<(String, String)> {
    let mut ids: Vec<(String, String)> = entries(a)
        .iter()
        .map(|e| {
            (
                e["Node"]["Node"].as_str().unwrap().to_owned(),
                e["Service"]["ID"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ids.sort();
    ids
}

fn pair(node: &str, id: &str) -> (String, String) {
    (node.to_owned(), id.to_owned())
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn go_durations_parse_like_go() {
    let ok = [
        ("10s", 10_000_000_000i128),
        ("1m30s", 90_000_000_000),
        ("90m", 5_400_000_000_000),
        ("500ms", 500_000_000),
        ("1h", 3_600_000_000_000),
        ("1.5h", 5_400_000_000_000),
        (".5s", 500_000_000),
        ("250us", 250_000),
        ("250µs", 250_000),
        ("7ns", 7),
        ("0", 0),
        ("-1s", -1_000_000_000),
        ("+2m", 120_000_000_000),
        ("1h2m3s4ms", 3_723_004_000_000),
    ];
    for (s, nanos) in ok {
        assert_eq!(go_duration_nanos(s), Ok(nanos), "{s}");
    }
    assert_eq!(
        go_duration_nanos(""),
        Err("time: invalid duration \"\"".to_owned())
    );
    assert_eq!(
        go_duration_nanos("abc"),
        Err("time: invalid duration \"abc\"".to_owned())
    );
    assert_eq!(
        go_duration_nanos("10"),
        Err("time: missing unit in duration \"10\"".to_owned())
    );
    assert_eq!(
        go_duration_nanos("10x"),
        Err("time: unknown unit \"x\" in duration \"10x\"".to_owned())
    );
    assert!(go_duration_nanos(".s").is_err());
    assert!(go_duration_nanos("1s ").is_err());
    assert!(go_duration_nanos("99999999999999999999h").is_err());
}

#[tokio::test]
async fn registration_is_validated_like_the_agent() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"Port": 80}), "Missing service name"),
        (json!({"Name": ""}), "Missing service name"),
        (
            json!({"Name": "a", "Check": {"Name": "x"}}),
            "Invalid check: TTL must be > 0 for TTL checks",
        ),
        (
            json!({"Name": "a", "Check": {"HTTP": "http://127.0.0.1:1/"}}),
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, or TCP checks",
        ),
        (
            json!({"Name": "a", "Checks": [{"TTL": "5s"}, {"HTTP": "http://127.0.0.1:1/"}]}),
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, or TCP checks",
        ),
        (
            json!({"Name": "a", "Check": {"TTL": "5s", "Interval": "5s"}}),
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            json!({"Name": "a", "Check": {"TTL": "10x"}}),
            "Request decode failed: time: unknown unit \"x\" in duration \"10x\"",
        ),
        (
            json!({"Name": "a", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "soon"}}),
            "Request decode failed: time: invalid duration \"soon\"",
        ),
        (
            json!({"Name": "a", "Port": -1}),
            "Invalid service port -1: must be within 0-65535",
        ),
        (
            json!({"Name": "a", "Port": 65536}),
            "Invalid service port 65536: must be within 0-65535",
        ),
        (
            json!({"Name": "a", "Port": "80"}),
            "Request decode failed: invalid type: string \"80\", expected i64",
        ),
        (
            json!({"Name": "a", "Tags": "v1"}),
            "Request decode failed: invalid type: string \"v1\", expected a sequence",
        ),
        (
            json!({"Name": "a", "Check": {"TTL": "5s", "Status": "ok"}}),
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
        (
            json!({"Name": "a", "Weights": {"Passing": 0, "Warning": 1}}),
            "Invalid Weights: Passing must be greater than 0",
        ),
        (
            json!(["Name"]),
            "Request decode failed: json: cannot unmarshal [\"Name\"] into Go value",
        ),
        // Stricter than Consul: what the double does not model is refused, not ignored.
        (
            json!({"Name": "a", "name": "b"}),
            "Request decode failed: unknown field `name`",
        ),
        (
            json!({"Name": "a", "Check": {"TCP": "127.0.0.1:1", "Interval": "10s"}}),
            "Request decode failed: unknown field `TCP`",
        ),
        (
            json!({"Name": "a", "Check": {"Args": ["/bin/true"], "Interval": "10s"}}),
            "Request decode failed: unknown field `Args`",
        ),
        (
            json!({"Name": "a", "TaggedAddresses": {}}),
            "Request decode failed: unknown field `TaggedAddresses`",
        ),
        (
            json!({"Name": "a", "Check": {}}),
            "Invalid check: TTL must be > 0",
        ),
    ];
    for (body, reason) in cases {
        let a = api.put("/v1/agent/service/register", body.clone()).await;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert!(
            a.body.starts_with(reason),
            "{body}: {:?} should start with {reason:?}",
            a.body
        );
        assert!(a.header("content-type").unwrap().starts_with("text/plain"));
    }
    let a = api
        .try_call("PUT", "/v1/agent/service/register", None)
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.body.as_str()),
        (400, "Request decode failed: EOF")
    );
    assert!(d.service_ids().is_empty(), "nothing invalid was registered");

    // Valid: every field seawall sends, with both Check and Checks.
    api.register(json!({
        "Name": "full", "ID": "full-1", "Port": 8080, "Address": "127.0.0.1", "Tags": ["a"],
        "EnableTagOverride": true, "Meta": {"version": "1"},
        "Weights": {"Passing": 10, "Warning": 1},
        "Check": {"CheckID": "full:ttl", "Name": "ttl", "Notes": "n", "TTL": "30s", "Status": "passing"},
        "Checks": [{
            "HTTP": "http://127.0.0.1:1/health", "Method": "HEAD", "Header": {"X-Probe": ["a"]},
            "Body": "", "TLSSkipVerify": false, "Interval": "1m30s", "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "1h30m0s",
        }],
    }))
    .await;
    // Wrong methods and unknown paths.
    let a = api.get("/v1/agent/service/register").await;
    assert_eq!((a.status, a.body.as_str()), (405, "method GET not allowed"));
    let a = api.get("/v1/nope").await;
    assert_eq!(a.status, 404);
    assert!(a.header("content-type").unwrap().starts_with("text/plain"));
    let services = api.get("/v1/agent/services").await.json();
    let full = &services["full-1"];
    assert_eq!(full["Service"], "full");
    assert_eq!(full["Port"], 8080);
    assert_eq!(full["Tags"], json!(["a"]));
    assert_eq!(full["EnableTagOverride"], true);
    assert_eq!(full["Meta"]["version"], "1");
    assert_eq!(full["Weights"], json!({"Passing": 10, "Warning": 1}));
    assert_eq!(d.check_status("full:ttl").as_deref(), Some("passing"));
    assert!(
        d.check_status("service:full-1:2").is_some(),
        "numbered: two checks in all"
    );
}

#[tokio::test]
async fn defaults_ids_weights_and_reregistration() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    let before = d.index();
    api.register(
        json!({"Name": "users", "Address": "10.0.0.5", "Port": 8081, "Check": {"TTL": "30s"}}),
    )
    .await;
    assert!(d.index() > before, "a write bumps the index");
    api.register(
        json!({"Name": "multi", "Checks": [{"TTL": "30s"}, {"TTL": "30s", "Status": "passing"}]}),
    )
    .await;
    api.register(json!({"Name": "mixed", "Check": {"TTL": "30s"}, "Checks": [{"TTL": "30s", "CheckID": "own"}, {"TTL": "30s"}]}))
        .await;
    // Consul numbers default IDs whenever the service has more than one check in total, so a
    // lone entry of `Checks` gets the plain `service:<id>`.
    api.register(json!({"Name": "one-of-checks", "Checks": [{"TTL": "30s"}]}))
        .await;

    assert_eq!(
        d.service_ids(),
        vec![
            pair("node-a", "mixed"),
            pair("node-a", "multi"),
            pair("node-a", "one-of-checks"),
            pair("node-a", "users"),
        ]
    );
    assert_eq!(
        d.check_status("service:users").as_deref(),
        Some("critical"),
        "default status"
    );
    assert_eq!(
        d.check_status("service:multi:1").as_deref(),
        Some("critical")
    );
    assert_eq!(
        d.check_status("service:multi:2").as_deref(),
        Some("passing")
    );
    assert!(d.check_status("service:mixed:1").is_some());
    assert!(d.check_status("own").is_some());
    assert!(d.check_status("service:mixed:3").is_some());
    assert!(d.check_status("service:one-of-checks").is_some());

    let a = api.get("/v1/health/service/users").await;
    assert_eq!(a.status, 200);
    let e = &entries(&a)[0];
    assert_eq!(e["Node"]["Node"], "node-a");
    assert_eq!(e["Node"]["Address"], "127.0.0.1");
    assert_eq!(e["Service"]["ID"], "users", "ID defaults to Name");
    assert_eq!(e["Service"]["Service"], "users");
    assert_eq!(e["Service"]["Address"], "10.0.0.5");
    assert_eq!(e["Service"]["Port"], 8081);
    assert_eq!(e["Service"]["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert!(
        e["Service"]["Tags"].is_null(),
        "no Tags given: Go's nil slice"
    );
    let checks = e["Checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[0]["Status"], "passing");
    assert_eq!(checks[0]["ServiceID"], "");
    assert_eq!(checks[1]["CheckID"], "service:users");
    assert_eq!(checks[1]["Name"], "Service 'users' check");
    assert_eq!(checks[1]["ServiceID"], "users");
    assert_eq!(checks[1]["ServiceName"], "users");
    assert_eq!(checks[1]["Status"], "critical");

    // Re-registering the same ID replaces the service but keeps the check's status.
    assert!(d.set_check_status("service:users", "passing", "fine"));
    api.register(json!({"Name": "users", "Port": 9000, "Tags": ["v2"], "Weights": {"Passing": 10, "Warning": 1}, "Check": {"TTL": "30s"}}))
        .await;
    let e = &entries(&api.get("/v1/health/service/users").await)[0];
    assert_eq!(e["Service"]["Port"], 9000);
    assert_eq!(e["Service"]["Tags"], json!(["v2"]));
    assert_eq!(
        e["Service"]["Weights"],
        json!({"Passing": 10, "Warning": 1})
    );
    assert_eq!(d.check_status("service:users").as_deref(), Some("passing"));
    assert_eq!(
        d.service_ids()
            .iter()
            .filter(|(_, id)| id == "users")
            .count(),
        1
    );

    // Without replace-existing-checks, checks missing from the body stay; with it, they go.
    api.register(json!({"Name": "multi", "Checks": [{"TTL": "30s", "CheckID": "fresh"}]}))
        .await;
    assert!(d.check_status("service:multi:1").is_some());
    api.put(
        "/v1/agent/service/register?replace-existing-checks",
        json!({"Name": "multi", "Checks": [{"TTL": "30s", "CheckID": "fresh"}]}),
    )
    .await;
    assert!(d.check_status("service:multi:1").is_none());
    assert!(d.check_status("service:multi:2").is_none());
    assert!(d.check_status("fresh").is_some());
}

#[tokio::test]
async fn deregistration_404_or_200_for_unknown_ids() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    api.register(json!({"Name": "web", "Check": {"TTL": "30s"}}))
        .await;
    let a = api.put_empty("/v1/agent/service/deregister/web").await;
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    assert!(d.service_ids().is_empty());
    assert!(
        d.check_status("service:web").is_none(),
        "checks go with the service"
    );
    let a = api.put_empty("/v1/agent/service/deregister/nope").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (404, "Unknown service ID \"nope\"")
    );
    let a = api.get("/v1/agent/service/deregister/web").await;
    assert_eq!(a.status, 405);

    let old = ConsulDouble::start_with(DoubleOptions {
        deregister_unknown_is_404: false,
        ..DoubleOptions::default()
    })
    .await;
    let a = Api::new(&old)
        .put_empty("/v1/agent/service/deregister/nope")
        .await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn ttl_endpoints_update_status_and_output() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    api.register(json!({"Name": "web", "Check": {"TTL": "30s"}}))
        .await;
    api.register(
        json!({"Name": "probed", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "1h"}}),
    )
    .await;
    for (verb, status) in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ] {
        let a = api
            .put_empty(&format!(
                "/v1/agent/check/{verb}/service:web?note=via%20{verb}"
            ))
            .await;
        assert_eq!((a.status, a.body.as_str()), (200, ""));
        assert_eq!(d.check_status("service:web").as_deref(), Some(status));
        assert_eq!(d.check_output("service:web"), Some(format!("via {verb}")));
    }
    let a = api
        .put(
            "/v1/agent/check/update/service:web",
            json!({"Status": "passing", "Output": "all good"}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(d.check_status("service:web").as_deref(), Some("passing"));
    assert_eq!(d.check_output("service:web").as_deref(), Some("all good"));

    let a = api
        .put(
            "/v1/agent/check/update/service:web",
            json!({"Status": "fine"}),
        )
        .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (400, "Invalid check status: 'fine'")
    );
    let a = api.put_empty("/v1/agent/check/pass/web").await;
    assert_eq!(a.status, 404);
    assert_eq!(
        a.body,
        "Unknown check ID \"web\". Ensure that the check ID is passed, not the check name."
    );
    let a = api
        .put("/v1/agent/check/update/nope", json!({"Status": "passing"}))
        .await;
    assert_eq!(a.status, 404);
    let a = api.put_empty("/v1/agent/check/pass/service:probed").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            500,
            "CheckID \"service:probed\" does not have associated TTL"
        )
    );
    let a = api.get("/v1/agent/check/pass/service:web").await;
    assert_eq!(a.status, 405);

    // An output-only change does not move the index; a status change does.
    let idx = d.index();
    api.put_empty("/v1/agent/check/pass/service:web?note=again")
        .await;
    assert_eq!(d.index(), idx);
    api.put_empty("/v1/agent/check/warn/service:web").await;
    assert_eq!(d.index(), idx + 1);
}

/// Paused tokio time drives TTL expiry (no I/O involved).
#[tokio::test]
async fn ttl_expiry_follows_tokio_time() {
    let d = ConsulDouble::start().await;
    d.register(json!({
        "Name": "ttl-svc",
        "Check": {"TTL": "10s", "Status": "passing", "DeregisterCriticalServiceAfter": "30s"},
    }))
    .unwrap();
    d.register(json!({"Name": "keeper", "Check": {"TTL": "10s", "Status": "passing"}}))
        .unwrap();
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let at = |secs: u64| tokio::time::sleep_until(start + Duration::from_secs(secs));
    at(9).await;
    assert_eq!(
        d.check_status("service:ttl-svc").as_deref(),
        Some("passing")
    );
    assert!(
        d.set_check_status("service:ttl-svc", "passing", "still here"),
        "resets the TTL"
    );
    at(18).await;
    assert_eq!(
        d.check_status("service:ttl-svc").as_deref(),
        Some("passing")
    );
    at(20).await;
    assert_eq!(
        d.check_status("service:ttl-svc").as_deref(),
        Some("critical")
    );
    assert_eq!(
        d.check_output("service:ttl-svc").as_deref(),
        Some("TTL expired (last output before timeout follows): still here")
    );
    assert_eq!(
        d.check_status("service:keeper").as_deref(),
        Some("critical")
    );
    // DeregisterCriticalServiceAfter is accepted, but the double reaps nothing.
    at(200).await;
    assert!(d.service_ids().contains(&pair("node-a", "ttl-svc")));
    // A TTL check recovers on its next update.
    assert!(d.set_check_status("service:keeper", "passing", ""));
    at(205).await;
    assert_eq!(d.check_status("service:keeper").as_deref(), Some("passing"));
}

async fn flip_server(
    code: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (code, hits, seen) = (code.clone(), hits.clone(), seen.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let header = req
                        .headers()
                        .get("x-probe")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    seen.lock()
                        .unwrap()
                        .push(format!("{} {} {header}", req.method(), req.uri()));
                    let status = code.load(Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(format!("status {status}"))))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn http_checks_are_run_by_the_agent() {
    let d = ConsulDouble::start_with(DoubleOptions {
        min_check_interval: Duration::from_millis(20),
        ..DoubleOptions::default()
    })
    .await;
    let code = Arc::new(AtomicU16::new(200));
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let target = flip_server(code.clone(), hits.clone(), seen.clone()).await;
    d.register(json!({
        "Name": "web",
        "Check": {
            "HTTP": format!("http://{target}/health?deep=1"), "Method": "POST",
            "Header": {"X-Probe": ["yes"]}, "Interval": "50ms", "Timeout": "1s",
        },
    }))
    .unwrap();
    let status = |want: &'static str| {
        let d = d.clone();
        move || d.check_status("service:web").as_deref() == Some(want)
    };
    let wait = Duration::from_secs(3);
    eventually("passing on 200", wait, status("passing")).await;
    let output = d.check_output("service:web").unwrap();
    assert_eq!(
        output,
        format!("HTTP POST http://{target}/health?deep=1: 200 OK Output: status 200")
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|s| s == "POST /health?deep=1 yes"),
        "{seen:?}"
    );
    code.store(500, Ordering::SeqCst);
    eventually("critical on 500", wait, status("critical")).await;
    code.store(429, Ordering::SeqCst);
    eventually("warning on 429", wait, status("warning")).await;
    code.store(204, Ordering::SeqCst);
    eventually("passing on 204", wait, status("passing")).await;

    // The health endpoint sees it, and `passing` excludes warning.
    let api = Api::new(&d);
    code.store(429, Ordering::SeqCst);
    eventually("warning again", wait, status("warning")).await;
    assert_eq!(entries(&api.get("/v1/health/service/web").await).len(), 1);
    assert!(entries(&api.get("/v1/health/service/web?passing").await).is_empty());

    // Non-loopback targets are never contacted.
    d.register(json!({"Name": "far", "Check": {"HTTP": "http://10.255.255.1:80/", "Interval": "50ms", "Status": "passing"}}))
        .unwrap();
    eventually("far critical", wait, || {
        d.check_status("service:far").as_deref() == Some("critical")
    })
    .await;
    assert!(
        d.check_output("service:far")
            .unwrap()
            .contains("non-loopback")
    );

    // Deregistering stops the runner.
    assert!(d.deregister_on_node("node-a", "web"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hits.load(Ordering::SeqCst), after);
}

#[tokio::test]
async fn check_intervals_below_one_second_are_raised_like_consul() {
    let d = ConsulDouble::start().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let target = flip_server(Arc::new(AtomicU16::new(200)), hits.clone(), Arc::default()).await;
    d.register(json!({"Name": "slow", "Check": {"HTTP": format!("http://{target}/"), "Interval": "100ms"}}))
        .unwrap();
    // The time between the first two runs, seen from the target (polled every 5 ms; a
    // loaded machine can only lengthen it, so the bound below cannot flake under load).
    let when = |n: usize| {
        let hits = hits.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while hits.load(Ordering::SeqCst) < n {
                assert!(tokio::time::Instant::now() < deadline, "run {n} never came");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::Instant::now()
        }
    };
    let first = when(1).await;
    let second = when(2).await;
    let gap = second - first;
    assert!(
        gap >= Duration::from_millis(900),
        "a 100ms interval is raised to 1 s, as Consul does: {gap:?} between runs"
    );
}

#[tokio::test]
async fn health_query_parameters_and_headers() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    for (id, tags, version, status) in [
        ("api-1", json!(["primary", "v1"]), "1", "passing"),
        ("api-2", json!(["Secondary", "v2"]), "2", "passing"),
        ("api-3", json!(["v2"]), "2", "warning"),
    ] {
        api.register(json!({
            "Name": "api", "ID": id, "Tags": tags, "Port": 9000,
            "Meta": {"version": version, "zone": "a"},
            "Check": {"TTL": "1m", "Status": status},
        }))
        .await;
    }
    let ids =
        |a: &Answer| -> Vec<String> { instance_ids(a).into_iter().map(|(_, id)| id).collect() };
    let a = api.get("/v1/health/service/api").await;
    assert_eq!(ids(&a), ["api-1", "api-2", "api-3"]);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("x-consul-knownleader"), Some("true"));
    assert_eq!(a.header("x-consul-lastcontact"), Some("0"));
    assert!(a.index() >= 1);
    for q in ["passing", "passing=true", "passing=1"] {
        assert_eq!(
            ids(&api.get(&format!("/v1/health/service/api?{q}")).await),
            ["api-1", "api-2"],
            "{q}"
        );
    }
    assert_eq!(
        ids(&api.get("/v1/health/service/api?passing=false").await).len(),
        3
    );
    assert_eq!(
        api.get("/v1/health/service/api?passing=maybe").await.status,
        400
    );
    // Parameters Consul acts on and the double does not model are refused, not ignored.
    for q in [
        "tag=v2",
        "filter=Service.Port%20%3D%3D%209000",
        "dc=dc1",
        "stale",
        "consistent",
        "near=_agent",
        "node-meta=rack:r1",
        "token=s3cr3t",
    ] {
        let a = api.get(&format!("/v1/health/service/api?{q}")).await;
        let name = q.split('=').next().unwrap();
        assert_eq!(a.status, 400, "{q}");
        assert_eq!(
            a.body,
            format!("consul double: query parameter {name:?} is not modelled")
        );
    }
    assert_eq!(api.get("/v1/agent/services?filter=x").await.status, 400);
    assert_eq!(
        api.put_empty("/v1/agent/check/pass/x?status=passing")
            .await
            .status,
        400
    );
    // Unknown service: [] with 200 and a non-zero index.
    let a = api.get("/v1/health/service/nope").await;
    assert_eq!((a.status, a.body.as_str()), (200, "[]"));
    assert!(a.index() >= 1);
    assert_eq!(api.get("/v1/health/service/api?index=x").await.status, 400);
    assert_eq!(
        api.get("/v1/health/service/api?index=1&wait=soon")
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn identity_is_node_and_service_id() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    // Both agents use the default ID (= Name).
    api.register(
        json!({"Name": "cache", "Port": 6379, "Check": {"TTL": "1m", "Status": "passing"}}),
    )
    .await;
    d.register_on_node(
        "node-b",
        "10.0.0.2",
        json!({"Name": "cache", "Port": 6379, "Check": {"TTL": "1m", "Status": "passing"}}),
    )
    .unwrap();
    assert!(
        d.register_on_node("node-b", "10.0.0.2", json!({"Port": 1}))
            .unwrap_err()
            .contains("Missing service name")
    );
    let a = api.get("/v1/health/service/cache").await;
    assert_eq!(
        instance_ids(&a),
        vec![pair("node-a", "cache"), pair("node-b", "cache")]
    );
    let b = entries(&a)
        .into_iter()
        .find(|e| e["Node"]["Node"] == "node-b")
        .unwrap();
    assert_eq!(b["Node"]["Address"], "10.0.0.2");
    assert_eq!(
        b["Service"]["Address"], "",
        "dial Node.Address when Service.Address is empty"
    );
    // The agent only lists its own.
    let local = api.get("/v1/agent/services").await.json();
    assert_eq!(local.as_object().unwrap().len(), 1);

    // serfHealth of node-b failing makes its instance unhealthy.
    let idx = a.index();
    d.set_node_health("node-b", false);
    let a = api.get("/v1/health/service/cache").await;
    assert!(a.index() > idx);
    let b = entries(&a)
        .into_iter()
        .find(|e| e["Node"]["Node"] == "node-b")
        .unwrap();
    assert_eq!(b["Checks"][0]["CheckID"], "serfHealth");
    assert_eq!(b["Checks"][0]["Status"], "critical");
    assert_eq!(
        instance_ids(&api.get("/v1/health/service/cache?passing").await),
        vec![pair("node-a", "cache")]
    );
    d.set_node_health("node-b", true);
    assert_eq!(
        instance_ids(&api.get("/v1/health/service/cache?passing").await).len(),
        2
    );

    // Same check ID on two nodes: the local one is set first.
    assert!(d.set_check_status("service:cache", "critical", "down"));
    assert_eq!(
        d.check_status("service:cache").as_deref(),
        Some("critical"),
        "local node first"
    );
    assert_eq!(
        instance_ids(&api.get("/v1/health/service/cache?passing").await),
        vec![pair("node-b", "cache")]
    );
    assert!(d.deregister_on_node("node-b", "cache"));
    assert!(!d.deregister_on_node("node-b", "cache"));
    assert_eq!(
        instance_ids(&api.get("/v1/health/service/cache").await),
        vec![pair("node-a", "cache")]
    );
}

#[tokio::test]
async fn blocking_queries_hold_until_the_service_changes_or_wait_elapses() {
    let d = ConsulDouble::start().await;
    let api = Arc::new(Api::new(&d));
    api.register(json!({"Name": "web", "Check": {"TTL": "1m"}}))
        .await;
    let first = api.get("/v1/health/service/web").await;
    let idx = first.index();
    assert_eq!(idx, d.index());
    // index=0 never blocks.
    let t = Instant::now();
    api.get("/v1/health/service/web?index=0&wait=1s").await;
    assert!(t.elapsed() < Duration::from_millis(500));
    // An older index answers at once.
    let t = Instant::now();
    assert_eq!(
        api.get(&format!("/v1/health/service/web?index={}&wait=1s", idx - 1))
            .await
            .index(),
        idx
    );
    assert!(t.elapsed() < Duration::from_millis(500));

    // Held until the check changes.
    let t = Instant::now();
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            api.get(&format!("/v1/health/service/web?index={idx}&wait=3s"))
                .await
        })
    };
    assert!(d.wait_for_waiting_queries(1, Duration::from_secs(1)).await);
    // A change to another service does not release it.
    api.register(json!({"Name": "other"})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!held.is_finished());
    assert!(d.set_check_status("service:web", "passing", "up"));
    let a = held.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "released by the change, not the wait"
    );
    assert!(a.index() > idx);
    assert_eq!(entries(&a)[0]["Checks"][1]["Status"], "passing");
    assert_eq!(d.waiting_queries(), 0);

    // Nothing changes: returns after wait (+ at most wait/16) with the same index.
    let idx = a.index();
    let t = Instant::now();
    let a = api
        .get(&format!("/v1/health/service/web?index={idx}&wait=200ms"))
        .await;
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
    assert_eq!(a.index(), idx);
    assert_eq!(a.header("x-consul-knownleader"), Some("true"));

    // A blocked query on a service that does not exist yet returns when it appears.
    let none = api.get("/v1/health/service/later").await.index();
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            api.get(&format!("/v1/health/service/later?index={none}&wait=3s"))
                .await
        })
    };
    assert!(d.wait_for_waiting_queries(1, Duration::from_secs(1)).await);
    api.register(json!({"Name": "later"})).await;
    let a = held.await.unwrap();
    assert_eq!(entries(&a).len(), 1);
    assert!(a.index() > none);

    // Deregistration releases too, and the index stays above the sent one.
    let idx = a.index();
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            api.get(&format!("/v1/health/service/later?index={idx}&wait=3s"))
                .await
        })
    };
    assert!(d.wait_for_waiting_queries(1, Duration::from_secs(1)).await);
    api.put_empty("/v1/agent/service/deregister/later").await;
    let a = held.await.unwrap();
    assert_eq!(a.body, "[]");
    assert!(a.index() > idx);
}

#[tokio::test]
async fn set_index_resets_or_jumps_and_wakes_blocked_queries() {
    let d = ConsulDouble::start().await;
    let api = Arc::new(Api::new(&d));
    api.register(json!({"Name": "web", "Check": {"TTL": "1m", "Status": "passing"}}))
        .await;
    let idx = api.get("/v1/health/service/web").await.index();
    assert!(idx > 5);
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            api.get(&format!("/v1/health/service/web?index={idx}&wait=5s"))
                .await
        })
    };
    assert!(d.wait_for_waiting_queries(1, Duration::from_secs(1)).await);
    let t = Instant::now();
    d.set_index(3);
    let a = held.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "woken at once");
    assert_eq!(a.index(), 3, "the index went backwards");
    assert_eq!(entries(&a).len(), 1, "state kept");
    assert_eq!(d.index(), 3);
    api.register(json!({"Name": "other"})).await;
    assert_eq!(d.index(), 4, "writes continue from the forced index");

    // Jump up: a query holding an older index returns with the new one.
    let held = {
        let api = api.clone();
        tokio::spawn(async move { api.get("/v1/health/service/web?index=3&wait=5s").await })
    };
    assert!(d.wait_for_waiting_queries(1, Duration::from_secs(1)).await);
    d.set_index(5000);
    assert_eq!(held.await.unwrap().index(), 5000);
    assert_eq!(api.get("/v1/health/service/web").await.index(), 5000);
    assert_eq!(api.get("/v1/health/service/nope").await.index(), 5000);
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_keeps_state() {
    let d = ConsulDouble::start().await;
    let addr = d.addr();
    let api = Arc::new(Api::new(&d));
    api.register(json!({"Name": "web", "Check": {"TTL": "1m", "Status": "passing"}}))
        .await;
    let idx = api.get("/v1/health/service/web").await.index();
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            api.try_call(
                "GET",
                &format!("/v1/health/service/web?index={idx}&wait=5s"),
                None,
            )
            .await
        })
    };
    assert!(d.wait_for_waiting_queries(1, Duration::from_secs(1)).await);
    let t = Instant::now();
    d.stop().await;
    let cut = held.await.unwrap();
    assert!(cut.is_err(), "the held query is cut: {cut:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "connection refused while stopped"
    );
    assert!(
        Api::new(&d)
            .try_call("GET", "/v1/agent/services", None)
            .await
            .is_err()
    );

    d.restart().await;
    assert_eq!(d.addr(), addr);
    let api = Api::new(&d);
    let a = api.get("/v1/health/service/web").await;
    assert_eq!(
        instance_ids(&a),
        vec![pair("node-a", "web")],
        "state survives a restart"
    );
    assert!(
        a.index() >= idx + 1000,
        "the index jumped: {} after {idx}",
        a.index()
    );
    assert_eq!(d.check_status("service:web").as_deref(), Some("passing"));
    d.set_index(7);
    assert_eq!(api.get("/v1/health/service/web").await.index(), 7);
}

#[tokio::test]
async fn acl_tokens_are_required_when_configured() {
    let d = ConsulDouble::start_with(DoubleOptions {
        acl_token: Some("s3cr3t".to_owned()),
        ..DoubleOptions::default()
    })
    .await;
    let mut api = Api::new(&d);
    let a = api.get("/v1/health/service/web").await;
    assert_eq!((a.status, a.body.as_str()), (403, "Permission denied"));
    let a = api
        .put("/v1/agent/service/register", json!({"Name": "web"}))
        .await;
    assert_eq!(a.status, 403);
    assert!(d.service_ids().is_empty());
    api.token = Some(("x-consul-token", "wrong".to_owned()));
    let a = api.get("/v1/agent/services").await;
    assert_eq!((a.status, a.body.as_str()), (403, "ACL not found"));
    api.token = Some(("x-consul-token", "s3cr3t".to_owned()));
    api.register(json!({"Name": "web", "Check": {"TTL": "1m"}}))
        .await;
    assert_eq!(api.get("/v1/health/service/web").await.status, 200);
    let tokens: Vec<Option<String>> = d.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(
        tokens,
        vec![
            None,
            None,
            Some("wrong".to_owned()),
            Some("s3cr3t".to_owned()),
            Some("s3cr3t".to_owned()),
        ]
    );
}

#[tokio::test]
async fn fail_next_and_the_request_log() {
    let d = ConsulDouble::start().await;
    let api = Api::new(&d);
    d.fail_next(2, 500, "No cluster leader");
    for _ in 0..2 {
        let a = api.get("/v1/health/service/web").await;
        assert_eq!((a.status, a.body.as_str()), (500, "No cluster leader"));
    }
    let a = api.get("/v1/health/service/web").await;
    assert_eq!((a.status, a.body.as_str()), (200, "[]"));
    assert_eq!(d.request_count("/v1/health/"), 3);
    api.get("/v1/agent/services?passing&wait=1s").await;
    let last = d.requests().pop().unwrap();
    assert_eq!(
        (
            last.method.as_str(),
            last.path.as_str(),
            last.query.as_str()
        ),
        ("GET", "/v1/agent/services", "passing&wait=1s"),
        "recorded as received, even when refused"
    );
    assert_eq!(d.requests().len(), 4);
}

#[tokio::test]
async fn test_agent_falls_back_to_the_double() {
    if std::env::var_os("CONSUL_HTTP_ADDR").is_some() {
        return;
    }
    let agent = agent().await;
    let double = agent
        .double
        .as_ref()
        .expect("a double without CONSUL_HTTP_ADDR");
    assert_eq!(agent.http_addr, double.http_addr());
    assert_eq!(
        agent.http_addr,
        format!("127.0.0.1:{}", double.addr().port())
    );
    let stream = TcpStream::connect(&agent.http_addr).await;
    assert!(stream.is_ok());
}
