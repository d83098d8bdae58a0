//! The gateway's live status page in a real headless Chromium: the page loads, shows the
//! routes and their endpoints, and reflects breakers opening during a fault.
//!
//! Needs Chromium (`apt-get install -y chromium`; `.ci/run` installs it). Without it the
//! test fails with that instruction, unless `SEAWALL_SKIP_BROWSER_TESTS=1` is set.
#![cfg(feature = "gateway")]

#[path = "../examples/support/demo_services.rs"]
mod demo_services;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use seawall::discovery::Registry;
use seawall::gateway::{Discovery, Gateway, GatewayConfig};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::{sleep, timeout};

use demo_services::{DemoFleet, Fault, FleetSpec};

const CONFIG: &str = r#"
[gateway]
listen = "127.0.0.1:0"

[[routes]]
name = "users"
path_prefix = "/api/users"
service = "users"
timeout = "500ms"

[routes.breaker]
failure_rate = 50
window = 4
minimum_calls = 2
wait_in_open = "60s"
permitted_in_half_open = 1

[routes.fallback]
status = 200
body = '{"fallback":true}'

[[routes]]
name = "products"
path_prefix = "/api/products"
service = "products"
"#;

/// The Chromium binary, if installed.
fn chromium() -> Option<&'static str> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// The page's DOM after its scripts ran for a while of virtual time.
async fn dump_dom(browser: &str, url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "seawall-chromium-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let output = timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("chromium finished within 30 s")
        .expect("chromium output");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_routes_and_breakers_opening() {
    let Some(browser) = chromium() else {
        if std::env::var("SEAWALL_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: no Chromium, and SEAWALL_SKIP_BROWSER_TESTS=1");
            return;
        }
        panic!("the status page test needs Chromium: apt-get install -y chromium");
    };
    let registry = Registry::new();
    let fleet = DemoFleet::start(
        FleetSpec::new(2, 1)
            .registry(registry.clone())
            .check_delay(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = Gateway::build(
        GatewayConfig::from_toml_str(CONFIG).unwrap(),
        Discovery::Registry(registry),
    )
    .await
    .unwrap()
    .spawn(listener);
    let base = format!("http://{}", gateway.local_addr());
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for _ in 0..10 {
        let response = http
            .get(format!("{base}/api/users/1").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let _ = response.into_body().collect().await;
    }

    let page = format!("{base}/status?refresh=250");
    let dom = dump_dom(browser, &page).await;
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page loaded its status: {dom}"
    );
    assert!(dom.contains(r#"data-route="users""#), "{dom}");
    assert!(dom.contains(r#"data-route="products""#), "{dom}");
    let users = fleet.service("users");
    for instance in &users {
        assert!(
            dom.contains(&format!(r#"data-endpoint="{}""#, instance.addr())),
            "endpoint {} listed",
            instance.addr()
        );
    }
    assert!(dom.contains(r#"data-breaker="closed""#), "{dom}");
    assert!(!dom.contains(r#"data-breaker="open""#), "{dom}");

    // Fault: every user instance fails; traffic opens their breakers and fallbacks answer.
    for instance in &users {
        instance.fault().set(Fault::Failing);
    }
    for _ in 0..20 {
        let response = http
            .get(format!("{base}/api/users/1").parse().unwrap())
            .await
            .unwrap();
        let _ = response.into_body().collect().await;
        sleep(Duration::from_millis(5)).await;
    }
    let status = gateway.gateway().status();
    let route = status.routes.iter().find(|r| r.name == "users").unwrap();
    assert!(
        route
            .endpoints
            .iter()
            .all(|e| e.breaker.as_deref() == Some("open")),
        "{:?}",
        route.endpoints
    );
    let dom = dump_dom(browser, &page).await;
    for instance in &users {
        let row = format!(r#"data-endpoint="{}" data-breaker="open""#, instance.addr());
        assert!(dom.contains(&row), "{row} in {dom}");
    }
    // The users route's section shows the fallbacks served during the fault.
    let section = dom
        .split(r#"data-route="users""#)
        .nth(1)
        .expect("the users section");
    let fallbacks: u64 = section
        .split(r#"data-fallbacks=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .expect("data-fallbacks on the users section");
    assert!(fallbacks > 0, "fallbacks shown: {fallbacks}");
    assert!(fallbacks <= route.fallbacks);

    gateway.shutdown().await;
    fleet.shutdown().await.unwrap();
}
