//! The live status page (`GET /status`) in a real headless Chromium: real hyper upstreams
//! on loopback, the gateway in front of them, and `chromium --headless --dump-dom`, which
//! runs the page's JavaScript for a few seconds of virtual time and prints the DOM it
//! built. Every wait is bounded; Chromium runs under `timeout` and is killed after 20 s.
//!
//! Chromium is looked up at `/usr/bin/chromium`, then as `chromium` or `chromium-browser`
//! on `PATH`. Missing, the tests fail, unless `SEAWALL_SKIP_BROWSER_TESTS=1` is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use seawall::discovery::{Instance, Registration, Registry};
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle, GatewayStatus};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);
/// How long Chromium may run before `timeout` kills it and its children.
const BROWSER_BOUND: Duration = Duration::from_secs(20);
/// Virtual time the page's scripts get before the DOM is dumped.
const VIRTUAL_TIME_MS: u32 = 3000;
const HEAD: &str = "[gateway]\nlisten = \"127.0.0.1:0\"\n";

/// One upstream instance answering 200 with its name, until killed.
struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

async fn upstream(name: &str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let name = name.clone();
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = serde_json::json!({ "instance": name }).to_string();
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            connections.spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    Upstream { addr, task }
}

impl Upstream {
    fn register(&self, registry: &Registry, service: &str) -> Registration {
        registry.register(Instance::local(service, self.addr))
    }

    /// Kills the server and returns once it is gone, with its connections: `abort` alone
    /// only asks, and on a multi-thread runtime a pooled connection would still answer
    /// until a worker drops the task.
    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Answer {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap();
    timeout(BOUND, async {
        let response = client.request(req).await.expect("the server answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
    .expect("a request hung past its bound")
}

/// The proxy and, on a listener of its own, the admin endpoints (the status page).
struct Gw {
    proxy: GatewayHandle,
    admin: GatewayHandle,
}

impl Gw {
    fn local_addr(&self) -> SocketAddr {
        self.proxy.local_addr()
    }

    fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.admin.shutdown().await;
    }
}

async fn gateway(config: &str, registry: &Registry) -> Gw {
    let config = GatewayConfig::from_toml_str(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = Gateway::build(config, Discovery::Registry(registry.clone()))
        .await
        .unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gw {
        admin: gw.clone().spawn_admin(admin),
        proxy: gw.spawn(listener),
    }
}

async fn status(client: &HttpClient, gw: &Gw) -> GatewayStatus {
    let answer = get(client, gw.admin_addr(), "/status.json").await;
    assert_eq!(answer.status, StatusCode::OK);
    serde_json::from_str(&answer.body).unwrap()
}

/// Chromium, or `None` when it is missing and `SEAWALL_SKIP_BROWSER_TESTS=1` says to skip.
fn chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    if std::env::var("SEAWALL_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: no Chromium, and SEAWALL_SKIP_BROWSER_TESTS=1");
        return None;
    }
    panic!(
        "Chromium is needed for the status page tests and was not found at /usr/bin/chromium \
         or as chromium / chromium-browser on PATH: install it (Debian: apt-get install -y \
         chromium), or set SEAWALL_SKIP_BROWSER_TESTS=1 to skip these tests"
    );
}

/// A fresh, empty Chromium profile directory, removed when dropped.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "seawall-status-page-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `url` in headless Chromium, lets its scripts run for [`VIRTUAL_TIME_MS`] of
/// virtual time, and returns the DOM it serialized. Under `timeout`, which kills Chromium's
/// whole process group after [`BROWSER_BOUND`].
async fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = Profile::new();
    let mut command = tokio::process::Command::new("timeout");
    command
        .arg("--kill-after=2s")
        .arg(format!("{}s", BROWSER_BOUND.as_secs()))
        .arg(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-proxy-server",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("`timeout` runs Chromium");
    let output = timeout(
        BROWSER_BOUND + Duration::from_secs(5),
        child.wait_with_output(),
    )
    .await
    .expect("Chromium outlived its timeout")
    .expect("Chromium's output");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && dom.contains("</html>"),
        "Chromium failed ({}) on {url}; stderr:\n{}\nstdout:\n{dom}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    dom
}

/// The part of the DOM that renders `route`: its `<section>`, up to the next one.
fn route_section<'a>(dom: &'a str, route: &str) -> &'a str {
    let marker = format!("data-route=\"{route}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let rest = &dom[start..];
    let end = rest[1..].find("<section").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The opening tag of the element carrying `attribute="value"`.
fn tag_with<'a>(html: &'a str, attribute: &str, value: &str) -> &'a str {
    let marker = format!("{attribute}=\"{value}\"");
    let at = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} in:\n{html}"));
    let start = html[..at].rfind('<').unwrap();
    let end = at + html[at..].find('>').unwrap();
    &html[start..=end]
}

/// The value of `attribute` in an opening tag.
fn attr<'a>(tag: &'a str, attribute: &str) -> &'a str {
    let marker = format!(" {attribute}=\"");
    let start = tag
        .find(&marker)
        .unwrap_or_else(|| panic!("no {attribute} in {tag}"))
        + marker.len();
    let len = tag[start..].find('"').unwrap();
    &tag[start..start + len]
}

/// A route's counter as the page shows it (`data-stat` / `data-count`).
fn count(section: &str, stat: &str) -> u64 {
    attr(tag_with(section, "data-stat", stat), "data-count")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_as_uncached_html() {
    let registry = Registry::new();
    let gw = gateway(
        &format!("{HEAD}[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nservice = \"a\"\n"),
        &registry,
    )
    .await;
    let page = get(&client(), gw.admin_addr(), "/status").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["cache-control"], "no-store");
    assert!(page.body.starts_with("<!DOCTYPE html>"));
    // Self-contained: nothing loaded from elsewhere, and strings never go through innerHTML.
    for external in [
        "<script src",
        "stylesheet",
        "http://",
        "https://",
        "@import",
        "url(",
        "innerHTML",
    ] {
        assert!(!page.body.contains(external), "the page has {external}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_routes_then_open_breakers_and_fallbacks() {
    let Some(chromium) = chromium() else { return };
    let registry = Registry::new();
    let (u1, u2) = (upstream("u1").await, upstream("u2").await);
    let (mut f1, mut f2) = (upstream("f1").await, upstream("f2").await);
    let _r = [
        u1.register(&registry, "users"),
        u2.register(&registry, "users"),
        f1.register(&registry, "flaky"),
        f2.register(&registry, "flaky"),
    ];
    // The flaky route's breakers stay open for far longer than the test.
    let config = format!(
        "{HEAD}
[[routes]]
name = \"users\"
path_prefix = \"/u\"
service = \"users\"

[routes.rate_limit]
global = {{ per_second = 100, burst = 50 }}

[[routes]]
name = \"flaky\"
path_prefix = \"/f\"
service = \"flaky\"
timeout = \"1s\"

[routes.breaker]
failure_rate = 0.5
minimum_calls = 2
window = 4
wait_in_open = \"60s\"
permitted_in_half_open = 1

[routes.fallback]
status = 200
body = '{{\"cached\":true}}'
"
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    for _ in 0..4 {
        assert_eq!(
            get(&http, gw.local_addr(), "/u").await.status,
            StatusCode::OK
        );
        assert_eq!(
            get(&http, gw.local_addr(), "/f").await.status,
            StatusCode::OK
        );
    }
    let url = format!("http://{}/status?refresh=500", gw.admin_addr());

    let dom = dump_dom(&chromium, &url).await;
    let users = route_section(&dom, "users");
    let flaky = route_section(&dom, "flaky");
    assert_eq!(count(users, "requests"), 4, "{users}");
    assert_eq!(count(users, "success"), 4, "{users}");
    assert_eq!(count(flaky, "fallbacks"), 0, "{flaky}");
    for up in [&f1, &f2] {
        let row = tag_with(flaky, "data-endpoint", &up.addr.to_string());
        assert_eq!(attr(row, "data-breaker"), "closed", "{row}");
    }
    for up in [&u1, &u2] {
        let row = tag_with(users, "data-endpoint", &up.addr.to_string());
        // No [routes.breaker] on users.
        assert_eq!(attr(row, "data-breaker"), "none", "{row}");
    }
    assert!(
        users.contains("50 left"),
        "the global limit's headroom: {users}"
    );
    let updated = tag_with(&dom, "id", "last-updated");
    assert!(!attr(updated, "data-updated").is_empty(), "{updated}");
    assert_eq!(attr(tag_with(&dom, "id", "error"), "data-error"), "");
    // Two snapshots or more within the virtual time: rates are computed.
    assert!(
        !attr(tag_with(users, "data-stat", "requests"), "data-rate").is_empty(),
        "{users}"
    );

    // Every instance of flaky goes; traffic opens both breakers and gets the fallback.
    f1.kill().await;
    f2.kill().await;
    for _ in 0..12 {
        let answer = get(&http, gw.local_addr(), "/f").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.headers.contains_key("x-seawall-fallback"));
    }
    let s = status(&http, &gw).await;
    let expected_fallbacks = s.routes[1].fallbacks;
    assert!(
        s.routes[1]
            .endpoints
            .iter()
            .all(|e| e.breaker.as_deref() == Some("open")),
        "{:?}",
        s.routes[1].endpoints
    );

    let dom = dump_dom(&chromium, &url).await;
    let flaky = route_section(&dom, "flaky");
    for up in [&f1, &f2] {
        let row = tag_with(flaky, "data-endpoint", &up.addr.to_string());
        assert_eq!(attr(row, "data-breaker"), "open", "{row}");
    }
    assert!(flaky.contains(">open</span>"), "the badge: {flaky}");
    assert_eq!(count(flaky, "fallbacks"), expected_fallbacks, "{flaky}");
    assert!(count(flaky, "fallbacks") > 0);
    assert!(count(flaky, "failure") > 0, "{flaky}");
    let users = route_section(&dom, "users");
    assert_eq!(count(users, "requests"), 4, "{users}");
    // The page asked for nothing but itself and /status.json (no favicon, say).
    assert_eq!(status(&http, &gw).await.unmatched, 0);
    gw.shutdown().await;
}

/// A stand-in for the gateway: serves the gateway's page, then `/status.json` with hostile
/// strings once and 500 after that.
async fn hostile_server(page: String) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let page = Bytes::from(page);
    let served = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let (page, served) = (page.clone(), served.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (page, served) = (page.clone(), served.clone());
                async move {
                    let mut response = match req.uri().path() {
                        "/status" => Response::new(Full::new(page)),
                        "/status.json" if served.fetch_add(1, SeqCst) == 0 => {
                            Response::new(Full::new(Bytes::from(hostile_status())))
                        }
                        _ => {
                            let mut r = Response::new(Full::new(Bytes::from("down")));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            r
                        }
                    };
                    response
                        .headers_mut()
                        .insert("cache-control", "no-store".parse().unwrap());
                    Ok::<_, Infallible>(response)
                }
            });
            connections.spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    (addr, task)
}

/// Markup that would set `data-pwned="1"` on the body if it were ever parsed as HTML.
const HOSTILE: &str = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">";

fn hostile_status() -> String {
    serde_json::json!({
        "uptime_seconds": 1.0,
        "unmatched": 0,
        "routes": [{
            "name": HOSTILE, "path_prefix": HOSTILE, "service": HOSTILE,
            "requests": 3,
            "responses": { "1xx": 0, "2xx": 3, "3xx": 0, "4xx": 0, "5xx": 0 },
            "fallbacks": 0, "rate_limited": 0, "unauthorized": 0,
            "upstream_errors": { "timeout": 0, "unavailable": 0, "bad_gateway": 0, "server_error": 0 },
            "latency_ms": { "p50": 1.0, "p99": 2.0, "samples": 3 },
            "limits": { "global": null, "per_client": { "clients": 1, "burst": 2, "per_second": 1, "key": HOSTILE } },
            "endpoints": [{
                "key": HOSTILE, "address": HOSTILE, "outstanding": 0, "calls": 3, "failures": 0,
                "ejected": true, "ejected_for_ms": 1500, "ejections": 1, "breaker": HOSTILE
            }]
        }]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_escapes_strings_and_shows_an_error_banner() {
    let Some(chromium) = chromium() else { return };
    let registry = Registry::new();
    let gw = gateway(
        &format!("{HEAD}[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nservice = \"a\"\n"),
        &registry,
    )
    .await;
    let page = get(&client(), gw.admin_addr(), "/status").await.body;
    gw.shutdown().await;
    let (addr, server) = hostile_server(page).await;

    let dom = dump_dom(&chromium, &format!("http://{addr}/status?refresh=200")).await;
    // The strings were rendered as text, not markup: no element was made of them. (Inside
    // attribute values the serializer leaves `<` as it is but escapes `"`.)
    assert!(dom.contains("&lt;img src=x"), "{dom}");
    assert!(!dom.contains("data-pwned=\"1\""), "{dom}");
    assert!(!dom.contains("<img src=x onerror=\""), "{dom}");
    let row = tag_with(&dom, "class", "badge none");
    assert!(
        row.starts_with("<span"),
        "an unknown breaker state gets no class of its own"
    );
    assert!(dom.contains("1.5 s left"), "{dom}");
    // Then /status.json fails: the banner says so and the last data stays, marked stale.
    let banner = tag_with(&dom, "id", "error");
    assert_eq!(attr(banner, "data-error"), "HTTP 500", "{banner}");
    assert!(attr(banner, "class").contains("shown"), "{banner}");
    assert!(dom.contains("/status.json failed: HTTP 500"), "{dom}");
    assert!(dom.contains("class=\"route stale\""), "{dom}");
    server.abort();
}

/// Limits kept in Redis: the page says where each one's decisions come from (the shared
/// bucket, or this replica's local share while Redis is away) and the state of the
/// breaker around Redis.
#[cfg(feature = "redis")]
#[tokio::test]
async fn chromium_shows_where_redis_limits_decide() {
    use crate::redis_server::RedisServer;

    let Some(chromium) = chromium() else { return };
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let registry = Registry::new();
    let u1 = upstream("u1").await;
    let _r = u1.register(&registry, "users");
    let config = format!(
        "{HEAD}
[redis]
url = \"{}\"
local_share = 0.5

[[routes]]
name = \"users\"
path_prefix = \"/u\"
service = \"users\"

[routes.rate_limit]
global = {{ per_second = 100, burst = 50, policy = \"redis\" }}
per_client = {{ per_second = 10, burst = 10 }}
",
        redis.url()
    );
    let gw = gateway(&config, &registry).await;
    let http = client();
    for _ in 0..3 {
        assert_eq!(
            get(&http, gw.local_addr(), "/u").await.status,
            StatusCode::OK
        );
    }
    let url = format!("http://{}/status?refresh=500", gw.admin_addr());
    let dom = dump_dom(&chromium, &url).await;
    let users = route_section(&dom, "users");
    let global = tag_with(users, "data-fact", "global-limit");
    assert!(
        users.contains("[redis: redis, breaker closed]"),
        "the shared bucket decides: {global} in {users}"
    );
    assert!(
        users.contains("10 burst, 10/s"),
        "the local per-client limit: {users}"
    );

    // Redis goes: the local share decides, then the breaker around Redis opens.
    drop(redis);
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        get(&http, gw.local_addr(), "/u").await;
        let s = status(&http, &gw).await;
        let shared = s.routes[0]
            .limits
            .global
            .as_ref()
            .unwrap()
            .redis
            .clone()
            .unwrap();
        if shared.breaker == "open" {
            assert_eq!(shared.source.as_deref(), Some("local"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{shared:?}");
    }
    let dom = dump_dom(&chromium, &url).await;
    let users = route_section(&dom, "users");
    // Open, or half-open by the time the page is read (the open wait is 1 s): either
    // way no probe has succeeded, and the page says the local share decides.
    assert!(
        users.contains("[redis: LOCAL SHARE, breaker open]")
            || users.contains("[redis: LOCAL SHARE, breaker half_open]"),
        "the local share decides: {users}"
    );
    gw.shutdown().await;
}
