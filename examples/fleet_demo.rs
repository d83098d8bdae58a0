//! A fleet of three gateway replicas sharing their per-client limit through Redis.
//!
//! ```sh
//! cargo run --example fleet_demo --features gateway,redis,consul
//! ```
//!
//! It starts a `redis-server` on a free loopback port, the demo's `users` service (three
//! instances on loopback, registered in the in-process registry, or in Consul when
//! `CONSUL_HTTP_ADDR` is set), and three gateway replicas: separate OS processes (this
//! executable run again with `--replica`), so that the only thing they share is Redis.
//! An in-process registry cannot be shared between processes: without Consul the
//! replicas get the instances' addresses as a static `[[services]]` list; with Consul each
//! replica follows the service in Consul, as a real fleet would.
//!
//! The route's per-client limit (`x-api-key`, 20 a second, burst 20) has
//! `policy = "redis"`, `failure = "open"` and `local_share = 0.34`, about one replica's
//! third. A client spreads requests over the three replicas, round robin:
//!
//! 1. **Shared:** `alice` sends 60 requests a second (three times her limit) and `bob` 10:
//!    the fleet admits alice's limit once, not three times, and all of bob's requests;
//! 2. **Redis killed:** the replicas fall back to their local shares (each admits about a
//!    third of alice's limit; never a 5xx), and their `/status.json` say so (source
//!    `local`, the breaker around Redis open);
//! 3. **Redis back** on the same port: once each replica's breaker lets a probe through,
//!    decisions come from Redis again, and the shared limit holds again.
//!
//! It prints a summary and exits non-zero if any of that did not happen. Every wait is
//! bounded; the children end with this process (killed when it ends or is interrupted by
//! SIGINT or SIGTERM, and the replicas exit when their stdin closes).
#![allow(clippy::print_stdout)]

#[path = "support/demo_services.rs"]
mod demo_services;
#[path = "../tests/support/fleet.rs"]
mod fleet;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use demo_services::{DemoFleet, FleetSpec};
use fleet::{Fleet, Outcome, Stream, bound, offer};
use redis_server::RedisServer;
use seawall::consul::ConsulClient;
use seawall::gateway::{Discovery, Gateway, GatewayConfig};
use tokio::net::TcpListener;
use tokio::time::Instant;

const REPLICAS: usize = 3;
/// Alice's limit, in the fleet: a second's worth of burst.
const PER_SECOND: f64 = 20.0;
const BURST: f64 = 20.0;
const LOCAL_SHARE: f64 = 0.34;
/// How long each phase offers its load.
const PHASE: Duration = Duration::from_secs(3);

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--replica") {
        replica();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    // Interrupted (SIGINT or SIGTERM sent to this process alone: a supervisor, an IDE's
    // stop button), the demo is dropped, and with it `redis-server` and the replicas:
    // a signal's default action would end the process without their `Drop`.
    let Some(failures) = runtime.block_on(async {
        tokio::select! {
            failures = demo() => Some(failures),
            () = interrupted() => None,
        }
    }) else {
        println!("\nfleet demo: interrupted; redis-server and the replicas stopped");
        drop(runtime);
        std::process::exit(130);
    };
    if failures.is_empty() {
        println!("\nfleet demo: every check passed");
    } else {
        println!("\nfleet demo FAILED:");
        for f in &failures {
            println!("  - {f}");
        }
        std::process::exit(1);
    }
}

/// Resolves on SIGINT or, on Unix, SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// A replica: the gateway from the TOML in [`fleet::CHILD_CONFIG`], its discovery Consul
/// when `CONSUL_HTTP_ADDR` is set. Prints its addresses as `tests/support/fleet.rs`'s
/// `Fleet` expects them, and serves until its stdin closes.
fn replica() -> ! {
    let config = std::env::var(fleet::CHILD_CONFIG).expect("a replica's configuration");
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let config = GatewayConfig::from_toml_str(&config).expect("a valid configuration");
        let discovery = match consul() {
            Some(client) => Discovery::Consul(client),
            None => Discovery::Static,
        };
        let gateway = Gateway::build(config, discovery).await.expect("a gateway");
        let admin = gateway
            .clone()
            .spawn_admin(TcpListener::bind("127.0.0.1:0").await.expect("a port"));
        let proxy = gateway.spawn(TcpListener::bind("127.0.0.1:0").await.expect("a port"));
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "seawall-fleet-gateway {} {}",
            proxy.local_addr(),
            admin.local_addr()
        );
        let _ = out.flush();
        drop(out);
        std::future::pending::<()>().await;
    });
    std::process::exit(0);
}

fn consul() -> Option<ConsulClient> {
    match std::env::var("CONSUL_HTTP_ADDR") {
        Ok(addr) if !addr.trim().is_empty() => ConsulClient::from_env().ok(),
        _ => None,
    }
}

/// One phase's figures, for the summary.
struct Phase {
    name: &'static str,
    alice: Outcome,
    bob: Option<Outcome>,
}

async fn demo() -> Vec<String> {
    let mut failures = Vec::new();
    let port = RedisServer::free_port();
    let redis = RedisServer::start(port).await;
    let consul = consul();
    let mut spec = FleetSpec::new(3, 0);
    spec.consul = consul.clone();
    let services = DemoFleet::start(spec).await.expect("the demo services");
    let instances: Vec<String> = services
        .service("users")
        .iter()
        .map(|i| format!("\"{}\"", i.addr()))
        .collect();
    let services_section = if consul.is_some() {
        String::new()
    } else {
        format!(
            "[[services]]\nname = \"users\"\ninstances = [{}]\n",
            instances.join(", ")
        )
    };
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [redis]\nurl = \"{}\"\ntimeout = \"200ms\"\nfailure = \"open\"\nlocal_share = {LOCAL_SHARE}\n\n\
         [[routes]]\nname = \"users\"\npath_prefix = \"/api/users\"\nservice = \"users\"\n\
         strip_prefix = true\ntimeout = \"2s\"\n\n\
         [routes.rate_limit]\n\
         per_client = {{ per_second = {PER_SECOND}, burst = {BURST}, key = \"header:x-api-key\", policy = \"redis\" }}\n\n\
         {services_section}",
        redis.url()
    );
    println!(
        "fleet demo: {REPLICAS} gateway processes, redis-server on 127.0.0.1:{port}, users \
         service on {} ({})",
        instances.join(", "),
        if consul.is_some() {
            "discovered in Consul"
        } else {
            "static list; set CONSUL_HTTP_ADDR to discover it in Consul"
        }
    );
    let exe = std::env::current_exe().expect("this executable");
    let fleet = match Fleet::start(REPLICAS, &config, || {
        let mut c = Command::new(&exe);
        c.arg("--replica");
        c
    })
    .await
    {
        Ok(fleet) => fleet,
        Err(e) => return vec![format!("the replicas did not start: {e}")],
    };
    let proxies = fleet.proxies();
    let alice = Stream {
        path: "/api/users/users".to_owned(),
        header: Some(("x-api-key", "alice".to_owned())),
        per_second: 3.0 * PER_SECOND,
    };
    let bob = Stream {
        header: Some(("x-api-key", "bob".to_owned())),
        per_second: 10.0,
        ..alice.clone()
    };
    let mut phases = Vec::new();

    // 1. Shared: alice gets her limit once across the fleet, bob all he asks.
    let mut out = offer(&proxies, &[alice.clone(), bob.clone()], PHASE).await;
    let (a, b) = (out.remove(0), out.remove(0));
    let most = bound(PER_SECOND, BURST, a.admitted_window()) * 1.01;
    let least = bound(PER_SECOND, BURST, a.offered_window()) * 0.9;
    let admitted = a.with_status(200) as f64;
    if admitted > most || admitted < least {
        failures.push(format!(
            "shared: alice admitted {admitted}, expected {least:.0} to {most:.0} (one limit \
             for the fleet; local limits would admit about {:.0})",
            3.0 * bound(PER_SECOND, BURST, a.offered_window())
        ));
    }
    if b.with_status(200) != b.sent() {
        failures.push(format!(
            "shared: bob, under his limit, got {} of {} admitted",
            b.with_status(200),
            b.sent()
        ));
    }
    unexpected("shared", &a, &mut failures);
    for m in fleet.members() {
        let s = fleet::status(m).await;
        let source = s["routes"][0]["limits"]["per_client"]["redis"]["source"].clone();
        if !matches!(source.as_str(), Some("redis" | "cached")) {
            failures.push(format!(
                "shared: a replica's decisions came from {source}, not Redis"
            ));
        }
    }
    phases.push(Phase {
        name: "1. shared in Redis",
        alice: a,
        bob: Some(b),
    });

    // 2. Redis killed: the local shares decide, and the status says so.
    drop(redis);
    println!("redis-server killed");
    let a = offer(&proxies, std::slice::from_ref(&alice), PHASE)
        .await
        .remove(0);
    // Each replica's share: 34% of the rate and burst (ceil), a third of alice's load.
    let share_most = REPLICAS as f64
        * bound(
            PER_SECOND * LOCAL_SHARE,
            (BURST * LOCAL_SHARE).ceil(),
            a.admitted_window(),
        )
        * 1.05;
    let admitted = a.with_status(200) as f64;
    if admitted > share_most || admitted < 0.5 * share_most {
        failures.push(format!(
            "Redis down: alice admitted {admitted}, expected up to {share_most:.0} from the \
             three local shares"
        ));
    }
    unexpected("Redis down", &a, &mut failures);
    for m in fleet.members() {
        let s = fleet::status(m).await;
        let shared = &s["routes"][0]["limits"]["per_client"]["redis"];
        let (source, breaker) = (shared["source"].as_str(), shared["breaker"].as_str());
        if source != Some("local") || !matches!(breaker, Some("open" | "half_open")) {
            failures.push(format!(
                "Redis down: a replica's status shows source {source:?}, breaker {breaker:?}"
            ));
        }
    }
    phases.push(Phase {
        name: "2. Redis down: local shares",
        alice: a,
        bob: None,
    });

    // 3. Redis back: each replica returns to it at its breaker's next probe.
    let _redis = RedisServer::start(port).await;
    println!("redis-server restarted on the same port");
    let back = Instant::now();
    // The breaker's open wait doubles with each failed probe (1 s, 2 s, 4 s... up to
    // 30 s): a replica probes again within its current wait, when traffic comes.
    let deadline = back + Duration::from_secs(35);
    let mut pending: Vec<usize> = (0..REPLICAS).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        let _ = offer(
            &proxies,
            std::slice::from_ref(&bob),
            Duration::from_millis(500),
        )
        .await;
        let mut still = Vec::new();
        for &i in &pending {
            let s = fleet::status(&fleet.members()[i]).await;
            let shared = &s["routes"][0]["limits"]["per_client"]["redis"];
            if !(matches!(shared["source"].as_str(), Some("redis" | "cached"))
                && shared["breaker"].as_str() == Some("closed"))
            {
                still.push(i);
            }
        }
        pending = still;
    }
    if pending.is_empty() {
        println!(
            "every replica back on Redis {:.1} s after the restart",
            back.elapsed().as_secs_f64()
        );
    } else {
        failures.push(format!(
            "Redis back: replicas {pending:?} still not on Redis after 35 s"
        ));
    }
    // A fresh client key, so that what phase 2 left in the local shares does not count.
    let carol = Stream {
        header: Some(("x-api-key", "carol".to_owned())),
        ..alice.clone()
    };
    let a = offer(&proxies, &[carol], PHASE).await.remove(0);
    let most = bound(PER_SECOND, BURST, a.admitted_window()) * 1.01;
    let least = bound(PER_SECOND, BURST, a.offered_window()) * 0.9;
    let admitted = a.with_status(200) as f64;
    if admitted > most || admitted < least {
        failures.push(format!(
            "Redis back: admitted {admitted}, expected {least:.0} to {most:.0}"
        ));
    }
    unexpected("Redis back", &a, &mut failures);
    phases.push(Phase {
        name: "3. Redis back: shared",
        alice: a,
        bob: None,
    });

    println!(
        "\n{:<30} {:>6} {:>9} {:>6} {:>22} {:>9}",
        "phase", "sent", "admitted", "429", "per replica", "limit"
    );
    for p in &phases {
        let limit = bound(PER_SECOND, BURST, p.alice.offered_window());
        println!(
            "{:<30} {:>6} {:>9} {:>6} {:>22} {:>9.0}",
            p.name,
            p.alice.sent(),
            p.alice.with_status(200),
            p.alice.with_status(429),
            format!("{:?}", p.alice.admitted_per_target(REPLICAS)),
            limit
        );
        if let Some(b) = &p.bob {
            println!(
                "{:<30} {:>6} {:>9} {:>6}",
                "   bob (under his limit)",
                b.sent(),
                b.with_status(200),
                b.with_status(429)
            );
        }
    }
    drop(fleet);
    drop(services);
    failures
}

/// Anything but 200 and 429 is a failure: the fleet fails open, never with a 5xx.
fn unexpected(phase: &str, outcome: &Outcome, failures: &mut Vec<String>) {
    let odd = outcome.unexpected();
    if !odd.is_empty() {
        failures.push(format!(
            "{phase}: answers other than 200 and 429 (status, count; 0 = none): {odd:?}"
        ));
    }
}
