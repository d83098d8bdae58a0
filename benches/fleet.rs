//! A fleet of K gateway processes sharing one `redis-server` on loopback, at K = 1, 3 and
//! 6, with and without batching (`[redis] batch = 16`): how accurately the fleet holds one
//! Redis-held limit, and the p99 the Redis check adds to a request. Not a criterion bench:
//! each figure comes from one timed run of real processes.
//!
//! - **Accuracy.** An open-loop client in this process sends 3× the limit (1 000/s, burst
//!   200), round-robin over the K gateways, for 3 s; `admitted / bound` is what the fleet
//!   admitted against `burst + rate × (last send − first send)`. The run fails if the
//!   fleet ever admitted more than that bound over the window its admissions were decided
//!   in (+1%: Redis's clock against this process's, see `tests/fleet.rs`). `round trips
//!   / req, saturated` is the scripts Redis ran per request sent (a refusal is answered
//!   from the one Redis gave until it runs out; batching takes up to 16 tokens a round
//!   trip, but a saturated bucket holds one at a time).
//! - **Latency.** Below any limit, the same client sends 700/s through a route limited in
//!   Redis and 700/s through each of two routes limited in each process, interleaved over
//!   the same gateways, in 5 rounds of 1 s; each figure is the median over the rounds (a
//!   stall of a shared machine spoils a round, not the figure). `added` is the Redis
//!   route's p50 or p99 minus the first local route's, `p99 A/A` the second local route's
//!   minus the first's: the difference noise alone makes between two identical routes.
//!   `round trips / req, below` is the scripts Redis ran per request through the Redis
//!   route.
//!
//! The gateways are this program run again (see `tests/support/fleet.rs`): one
//! current-thread runtime each, with their upstream (answering at once) in-process.
//!
//! ```sh
//! cargo bench --features gateway,redis --bench fleet              # about 60 s
//! cargo bench --features gateway,redis --bench fleet -- --quick   # K = 1, 3; 1 s, 1 round
//! ```

#[path = "../tests/support/fleet.rs"]
mod fleet;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::process::Command;
use std::time::Duration;

use fleet::{Fleet, Stream};
use redis_server::RedisServer;

/// The limit whose accuracy is measured.
const LIMIT: (f64, f64) = (1_000.0, 200.0);
/// Offered load in the accuracy phase, as a multiple of the limit.
const OVERLOAD: f64 = 3.0;
/// Requests a second through each of the three latency routes.
const LATENCY_RATE: f64 = 700.0;

struct Settings {
    fleets: &'static [usize],
    accuracy_run: Duration,
    latency_rounds: usize,
    latency_round: Duration,
}

fn config(redis: &str, k: usize, batch: u32) -> String {
    let (rate, burst) = LIMIT;
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"

[redis]
url = "{redis}"
prefix = "bench-{k}-{batch}"
timeout = "1s"
failure = "closed"
batch = {batch}

[[routes]]
name = "limited"
path_prefix = "/limited"
service = "up"
rate_limit = {{ global = {{ per_second = {rate}, burst = {burst}, policy = "redis" }} }}

[[routes]]
name = "redis"
path_prefix = "/redis"
service = "up"
rate_limit = {{ global = {{ per_second = 1000000, burst = 1000000, policy = "redis" }} }}

[[routes]]
name = "local-a"
path_prefix = "/local-a"
service = "up"
rate_limit = {{ global = {{ per_second = 1000000, burst = 1000000 }} }}

[[routes]]
name = "local-b"
path_prefix = "/local-b"
service = "up"
rate_limit = {{ global = {{ per_second = 1000000, burst = 1000000 }} }}

[[services]]
name = "up"
instances = ["{{upstream}}"]
"#
    )
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One fleet of `k` gateway processes with `batch`: its table row.
async fn measure(redis: &RedisServer, k: usize, batch: u32, settings: &Settings) -> String {
    let command = || Command::new(std::env::current_exe().expect("the bench's path"));
    let fleet = Fleet::start(k, &config(&redis.url(), k, batch), command)
        .await
        .unwrap_or_else(|e| panic!("K = {k}, batch {batch}: {e}"));
    let proxies = fleet.proxies();
    // Each process's connection to Redis up and the script loaded.
    for member in fleet.members() {
        for path in ["/redis", "/local-a", "/local-b"] {
            let (status, body) = fleet::get(member.proxy, path).await.expect("warm-up");
            assert_eq!(status, 200, "warm-up {path}: {body}");
        }
    }

    let (rate, burst) = LIMIT;
    let before = fleet::scripts_run(&redis.url()).await.expect("INFO");
    let accuracy = fleet::offer(
        &proxies,
        &[Stream {
            path: "/limited".into(),
            header: None,
            per_second: rate * OVERLOAD,
        }],
        settings.accuracy_run,
    )
    .await
    .remove(0);
    let round_trips = fleet::scripts_run(&redis.url()).await.expect("INFO") - before;
    assert_eq!(accuracy.unexpected(), [], "K = {k}, batch {batch}");
    let admitted = accuracy.with_status(200) as f64;
    let bound = fleet::bound(rate, burst, accuracy.offered_window());
    let most = fleet::bound(rate, burst, accuracy.admitted_window()) * 1.01;
    assert!(
        admitted <= most,
        "K = {k}, batch {batch}: the fleet admitted {admitted}, more than the limit allows ({most:.1})"
    );

    // Latency, in rounds: a stall of this shared machine spoils one round, not the row.
    let mut rounds = Vec::with_capacity(settings.latency_rounds);
    let (mut checks, before) = (0, fleet::scripts_run(&redis.url()).await.expect("INFO"));
    for _ in 0..settings.latency_rounds {
        let streams: Vec<Stream> = ["/redis", "/local-a", "/local-b"]
            .into_iter()
            .map(|path| Stream {
                path: path.into(),
                header: None,
                per_second: LATENCY_RATE,
            })
            .collect();
        let latency = fleet::offer(&proxies, &streams, settings.latency_round).await;
        for outcome in &latency {
            assert_eq!(outcome.unexpected(), [], "K = {k}, batch {batch}");
            assert_eq!(outcome.with_status(429), 0, "K = {k}, batch {batch}");
        }
        checks += latency[0].sent();
        let p = |n: usize, q| micros(fleet::percentile(&latency[n].latencies(200), q));
        rounds.push(Round {
            p50: [p(0, 0.5), p(1, 0.5), p(2, 0.5)],
            p99: [p(0, 0.99), p(1, 0.99), p(2, 0.99)],
        });
    }
    let below = fleet::scripts_run(&redis.url()).await.expect("INFO") - before;
    drop(fleet);
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    format!(
        "| {k} | {batch} | {admitted:.0} / {bound:.0} = {:.3} | {:.2} | {:.3} | {:.0} / {:.0} | {:.0} / {:.0} | {:+.0} | {:+.0} | {:+.0} |",
        admitted / bound,
        round_trips as f64 / accuracy.sent() as f64,
        below as f64 / checks as f64,
        median(&|r| r.p50[1]),
        median(&|r| r.p99[1]),
        median(&|r| r.p50[0]),
        median(&|r| r.p99[0]),
        median(&|r| r.p50[0] - r.p50[1]),
        median(&|r| r.p99[0] - r.p99[1]),
        median(&|r| r.p99[2] - r.p99[1]),
    )
}

/// One latency round's p50 and p99 (µs) through the Redis-held route and the two local ones.
struct Round {
    p50: [f64; 3],
    p99: [f64; 3],
}

fn main() {
    fleet::serve_if_child();
    let settings = if std::env::args().any(|a| a == "--quick") {
        Settings {
            fleets: &[1, 3],
            accuracy_run: Duration::from_secs(1),
            latency_rounds: 1,
            latency_round: Duration::from_secs(1),
        }
    } else {
        Settings {
            fleets: &[1, 3, 6],
            accuracy_run: Duration::from_secs(3),
            latency_rounds: 5,
            latency_round: Duration::from_secs(1),
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let redis = RedisServer::start(RedisServer::free_port()).await;
        let (rate, burst) = LIMIT;
        println!(
            "K gateway processes, one redis-server, loopback. Accuracy: limit {rate}/s, burst \
             {burst}, offered {}/s for {:?}. Latency (µs): {LATENCY_RATE}/s through a \
             Redis-held and {LATENCY_RATE}/s through each of two local limits, never refusing, \
             {} round(s) of {:?}, medians.",
            rate * OVERLOAD,
            settings.accuracy_run,
            settings.latency_rounds,
            settings.latency_round,
        );
        println!(
            "| K | batch | admitted / bound | round trips / req, saturated | round trips / req, \
             below | local p50 / p99 | redis p50 / p99 | p50 added | p99 added | p99 A/A |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for &k in settings.fleets {
            for batch in [1, 16] {
                println!("{}", measure(&redis, k, batch, &settings).await);
            }
        }
    });
}
