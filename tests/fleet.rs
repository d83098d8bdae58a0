//! Limits held across processes: three gateway processes (this test binary run again, see
//! `support/fleet.rs`) share one `redis-server` on a free loopback port, and an open-loop
//! client in this process sends through them, round-robin, at four times the limits for a
//! few seconds. With `policy = "redis"` the fleet admits what one limit allows over that
//! time, no more and hardly less; with the default local policy, each process keeps a
//! bucket of its own, and the same fleet admits about three times as much.
//!
//! Time is real here (separate processes, and Redis's clock times the buckets), so the
//! bounds carry reasoned tolerances, stated where they are asserted.
#![cfg(all(feature = "gateway", feature = "redis"))]

#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::process::Command;
use std::time::Duration;

use fleet::{Fleet, Outcome, Stream};
use redis_server::RedisServer;

/// The gateway processes run this test binary's `fleet_gateway_child` alone.
const CHILD: &str = "fleet_gateway_child";
/// Gateway processes.
const K: usize = 3;
/// How long the load is offered.
const RUN: Duration = Duration::from_secs(4);
/// Offered load, as a multiple of each limit.
const OVERLOAD: f64 = 4.0;

/// The route `/shared`: one global limit, in Redis. The burst (a second's worth) absorbs a
/// stall of up to a second of a loaded machine without losing tokens (see `lower_bound`).
const SHARED: (f64, f64) = (100.0, 100.0);
/// The route `/keyed`: a per-client limit by `x-api-key`, in Redis; two clients.
const KEYED: (f64, f64) = (40.0, 40.0);
const CLIENTS: [&str; 2] = ["alice", "bob"];
/// The route `/local`: the same global limit as `/shared`, held by each process.
const LOCAL: (f64, f64) = SHARED;

/// Not a test: the entry point of the gateway processes, which the parent starts with
/// `--exact fleet_gateway_child` and the configuration in `SEAWALL_FLEET_GATEWAY`.
/// Returns at once in an ordinary test run.
#[test]
fn fleet_gateway_child() {
    fleet::serve_if_child();
}

fn child_command() -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
    command.args(["--exact", CHILD, "--nocapture", "--test-threads", "1"]);
    command
}

fn config(redis: &str) -> String {
    let ((shared_rate, shared_burst), (keyed_rate, keyed_burst), (local_rate, local_burst)) =
        (SHARED, KEYED, LOCAL);
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"

[redis]
url = "{redis}"
prefix = "fleet-test"
# A loaded machine may answer slowly; a check waits for Redis rather than being refused,
# and a refusal for want of Redis (503) fails the test.
timeout = "2s"
failure = "closed"

# Touched once through each process before the run: its connection to Redis is up and the
# script loaded before the first measured check.
[[routes]]
name = "warm"
path_prefix = "/warm"
service = "up"
rate_limit = {{ global = {{ per_second = 100000, burst = 100000, policy = "redis" }} }}

[[routes]]
name = "shared"
path_prefix = "/shared"
service = "up"
rate_limit = {{ global = {{ per_second = {shared_rate}, burst = {shared_burst}, policy = "redis" }} }}

[[routes]]
name = "keyed"
path_prefix = "/keyed"
service = "up"
rate_limit = {{ per_client = {{ per_second = {keyed_rate}, burst = {keyed_burst}, key = "header:x-api-key", policy = "redis" }} }}

[[routes]]
name = "local"
path_prefix = "/local"
service = "up"
rate_limit = {{ global = {{ per_second = {local_rate}, burst = {local_burst} }} }}

[[services]]
name = "up"
instances = ["{{upstream}}"]
"#
    )
}

/// The upper bound on what one bucket of `(rate, burst)` can have admitted: every
/// admission was decided by a Redis script run after its request left this process and
/// before its answer came back, so within `Outcome::admitted_window`, and a bucket full at
/// its first decision grants at most `burst + rate × (last decision − first)`. Redis times
/// the bucket by its own clock (`TIME`, the wall clock of this same machine) while the
/// window is measured with the monotonic clock: they advance together but for NTP's slew
/// (at most 500 ppm); the 1% covers that with room to spare.
fn upper_bound(outcome: &Outcome, (rate, burst): (f64, f64)) -> f64 {
    fleet::bound(rate, burst, outcome.admitted_window()) * 1.01
}

/// The lower bound: 95% of `burst + rate × (last send − first send)`. The load is four
/// times the rate, from every process in turn, until the last send, so a token waits for
/// a request a few milliseconds at most. What may be lost: tokens that overflow the bucket
/// while no request reaches Redis, which takes a stall of the whole fleet longer than
/// `burst / rate` (a second here); the 5% allows a further 0.2 s of them. Should this
/// process be starved so badly that it sent fewer requests than that (a quarter of its
/// pace), the bound is 95% of what it sent.
fn lower_bound(outcome: &Outcome, (rate, burst): (f64, f64)) -> f64 {
    fleet::bound(rate, burst, outcome.offered_window()).min(outcome.sent() as f64) * 0.95
}

fn summary(name: &str, outcome: &Outcome) -> String {
    format!(
        "{name}: {} sent over {:.2} s, {} admitted {:?} per process, {} refused, unexpected {:?}",
        outcome.sent(),
        outcome.offered_window().as_secs_f64(),
        outcome.with_status(200),
        outcome.admitted_per_target(K),
        outcome.with_status(429),
        outcome.unexpected(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_hold_one_limit_in_redis() {
    let redis = RedisServer::start(RedisServer::free_port()).await;
    let fleet = Fleet::start(K, &config(&redis.url()), child_command)
        .await
        .unwrap();
    for member in fleet.members() {
        let (status, body) = fleet::get(member.proxy, "/warm").await.unwrap();
        assert_eq!(status, 200, "warm-up through {}: {body}", member.proxy);
    }

    let mut streams = vec![Stream {
        path: "/shared".into(),
        header: None,
        per_second: SHARED.0 * OVERLOAD,
    }];
    for client in CLIENTS {
        streams.push(Stream {
            path: "/keyed".into(),
            header: Some(("x-api-key", client.into())),
            per_second: KEYED.0 * OVERLOAD,
        });
    }
    streams.push(Stream {
        path: "/local".into(),
        header: None,
        per_second: LOCAL.0 * OVERLOAD,
    });
    let outcomes = fleet::offer(&fleet.proxies(), &streams, RUN).await;
    let (shared, keyed, local) = (&outcomes[0], &outcomes[1..3], &outcomes[3]);
    let report = [
        summary("shared", shared),
        summary(CLIENTS[0], &keyed[0]),
        summary(CLIENTS[1], &keyed[1]),
        summary("local", local),
    ]
    .join("\n  ");
    println!("  {report}");

    // Every request answered, 200 or 429: no 503 (Redis was there), no transport error.
    for outcome in &outcomes {
        assert_eq!(outcome.unexpected(), [], "{report}");
    }

    // The Redis-held limits: one bucket for the fleet, within the bounds.
    for (name, outcome, limit) in [
        ("shared", shared, SHARED),
        (CLIENTS[0], &keyed[0], KEYED),
        (CLIENTS[1], &keyed[1], KEYED),
    ] {
        let admitted = outcome.with_status(200) as f64;
        let (low, high) = (lower_bound(outcome, limit), upper_bound(outcome, limit));
        println!("  {name}: admitted {admitted}, bounds [{low:.1}, {high:.1}]");
        assert!(
            admitted <= high,
            "{name}: the fleet admitted {admitted}, more than one limit allows ({high:.1})\n  {report}"
        );
        assert!(
            admitted >= low,
            "{name}: the fleet admitted {admitted}, less than 95% of the limit ({low:.1})\n  {report}"
        );
        // Each process decided some of them: the bucket is shared, not one process's.
        assert!(
            outcome.admitted_per_target(K).iter().all(|&n| n > 0),
            "{name}: a process admitted nothing\n  {report}"
        );
    }

    // The contrast: held in each process, the same limit lets the fleet admit about K
    // times as much: each process keeps a bucket of its own, and admits about what it
    // allows (or what it was sent, if less), never more. It is offered only 4/3 of the
    // rate, so when this process sends unevenly (a loaded machine), a catch-up burst may
    // overflow a bucket: hence 80% of that, still well over what one limit allows.
    let admitted = local.with_status(200);
    let (rate, burst) = LOCAL;
    let one = fleet::bound(rate, burst, local.offered_window());
    let (high, mut expected) = (upper_bound(local, LOCAL), 0.0);
    for (n, admitted) in local.admitted_per_target(K).into_iter().enumerate() {
        let sent = local.records.iter().filter(|r| r.target == n).count() as f64;
        expected += one.min(sent);
        assert!(
            admitted as f64 <= high,
            "local limits: process {n} admitted {admitted}, more than its bucket allows ({high:.1})\n  {report}"
        );
    }
    println!(
        "  local: admitted {admitted} = {:.2} × one limit's {one:.1} (expected {expected:.1})",
        admitted as f64 / one
    );
    assert!(
        admitted as f64 >= 0.8 * expected && admitted as f64 > 1.01 * one,
        "local limits: the fleet admitted {admitted}, not about {K} × one limit ({one:.1})\n  {report}"
    );

    // Every process reports its Redis-held limits as such, decided by Redis: the last
    // decision came from the shared bucket, or from a refusal it gave that is still in
    // force (`cached`); never from a local share (Redis was there all along).
    for member in fleet.members() {
        let status = fleet::status(member).await;
        let routes = status["routes"].as_array().expect("routes");
        let route = |name: &str| {
            routes
                .iter()
                .find(|r| r["name"] == name)
                .unwrap_or_else(|| panic!("route {name} in {status}"))
        };
        for (name, limit) in [("shared", "global"), ("keyed", "per_client")] {
            let limit = &route(name)["limits"][limit];
            assert_eq!(limit["policy"], "redis", "{name}: {limit}");
            let source = &limit["redis"]["source"];
            assert!(source == "redis" || source == "cached", "{name}: {limit}");
            assert_eq!(limit["redis"]["breaker"], "closed", "{name}: {limit}");
        }
        let warm = &route("warm")["limits"]["global"];
        assert_eq!(warm["redis"]["source"], "redis", "warm: {warm}");
        let limit = &route("local")["limits"]["global"];
        assert_eq!(limit["policy"], "local", "local: {limit}");
    }
    drop(fleet);
    drop(redis);
}
