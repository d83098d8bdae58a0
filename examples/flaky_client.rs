//! A flaky upstream, and an HTTP client that stays standing in front of it.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example flaky_client --features http
//! ```
//!
//! The example starts a small hyper server on `127.0.0.1` (an ephemeral port) whose
//! behaviour changes over four phases, then sends it a request every 50 ms through this
//! stack of tower layers:
//!
//! ```text
//! FallbackLayer::from_fn      answers any error with "fallback: cached greeting"
//!   and_then(collect)         http::Response<Incoming> -> http::Response<String>; 5xx -> error
//!     CircuitBreakerLayer     HttpClassifier: 5xx responses and errors are failures
//!       timeout(200 ms)       a slow upstream becomes an error
//!         hyper-util Client   HTTP/1, HttpConnector
//! ```
//!
//! | phase     | upstream                        | what to watch                                   |
//! |-----------|---------------------------------|-------------------------------------------------|
//! | healthy   | 200 OK                          | every call goes through                         |
//! | failing   | 503                             | the breaker opens; the fallback answers         |
//! | slow      | sleeps longer than the timeout  | half-open probes time out: open again, longer   |
//! | recovered | 200 OK                          | probes succeed and the breaker closes           |
//!
//! Every state transition is printed as it happens (from [`Breaker::subscribe`]), with the
//! open wait, which doubles on each consecutive trip (1 s, 2 s, then the 4 s cap). Each phase
//! ends with a summary line and a strip with one character per request.
//!
//! The example exits with a non-zero status unless the breaker opened at least once and
//! ended closed, so CI running it catches regressions. It takes a little under 10 seconds.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::BoxError;
use seawall::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, EventKind, HttpClassifier, SlidingWindow, State,
};
use seawall::fallback::{FallbackLayer, is_circuit_open};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tower::timeout::error::Elapsed;
use tower::{Service, ServiceBuilder, ServiceExt};

/// Time between two requests of the client loop.
const REQUEST_EVERY: Duration = Duration::from_millis(50);
/// The client gives up on the upstream after this long...
const CLIENT_TIMEOUT: Duration = Duration::from_millis(200);
/// ...and in the slow phase the upstream takes this long to answer.
const UPSTREAM_DELAY: Duration = Duration::from_millis(500);
/// The last phase runs until the breaker closes, or fails the example after this long.
const RECOVERY_LIMIT: Duration = Duration::from_secs(8);
/// Set on responses produced by the fallback, with the reason as value.
const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-fallback");

// ---------------------------------------------------------------------------------------
// The flaky upstream
// ---------------------------------------------------------------------------------------

/// How the upstream behaves; changed by the client loop between phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Healthy = 0,
    Failing = 1,
    Slow = 2,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Mode::Healthy => "upstream answers 200 OK",
            Mode::Failing => "upstream answers 503 Service Unavailable",
            Mode::Slow => "upstream takes 500 ms, the client times out after 200 ms",
        }
    }
}

/// State shared between the server and the client loop.
#[derive(Debug, Default)]
struct Upstream {
    mode: AtomicU8,
    /// Requests that reached the server (calls rejected by the breaker never do).
    hits: AtomicU64,
}

impl Upstream {
    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Relaxed);
    }

    fn mode(&self) -> Mode {
        match self.mode.load(Relaxed) {
            0 => Mode::Healthy,
            1 => Mode::Failing,
            _ => Mode::Slow,
        }
    }
}

async fn handle(
    _req: Request<Incoming>,
    upstream: Arc<Upstream>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    upstream.hits.fetch_add(1, Relaxed);
    let (status, body) = match upstream.mode() {
        Mode::Healthy => (StatusCode::OK, "hello from upstream"),
        Mode::Failing => (StatusCode::SERVICE_UNAVAILABLE, "upstream overloaded"),
        Mode::Slow => {
            tokio::time::sleep(UPSTREAM_DELAY).await;
            (StatusCode::OK, "hello from upstream, eventually")
        }
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}

/// Accepts connections on loopback until the runtime shuts down.
async fn serve(listener: TcpListener, upstream: Arc<Upstream>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("upstream: accept failed: {e}");
                continue;
            }
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, upstream.clone()));
            // In the slow phase the client hangs up before the answer is written, so the
            // connection ends in an error here: expected, not worth reporting.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// The client stack
// ---------------------------------------------------------------------------------------

/// A 5xx answer, turned into an error above the breaker so that the fallback covers it too.
#[derive(Debug)]
struct UpstreamStatus(StatusCode);

impl fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream answered {}", self.0)
    }
}

impl std::error::Error for UpstreamStatus {}

/// Collects the body, so that the stack answers `http::Response<String>`: a type the
/// fallback can build too. Runs *above* the breaker, see `main`.
async fn collect(response: Response<Incoming>) -> Result<Response<String>, BoxError> {
    let (parts, body) = response.into_parts();
    if parts.status.is_server_error() {
        return Err(UpstreamStatus(parts.status).into());
    }
    let bytes = body.collect().await?.to_bytes();
    Ok(Response::from_parts(
        parts,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// The fallback: a synthetic 200 whose `x-fallback` header says why it was served.
fn fallback(error: BoxError) -> Response<String> {
    let reason = if is_circuit_open(&error) {
        "circuit-open"
    } else if error.is::<Elapsed>() {
        "timeout"
    } else if error.is::<UpstreamStatus>() {
        "upstream-5xx"
    } else {
        "error"
    };
    let mut response = Response::new("fallback: cached greeting".to_string());
    response
        .headers_mut()
        .insert(FALLBACK_HEADER, HeaderValue::from_static(reason));
    response
}

// ---------------------------------------------------------------------------------------
// Watching the breaker
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Transition {
    from: State,
    to: State,
}

fn stamp(at: Duration) -> String {
    format!("[{:>6.2}s]", at.as_secs_f64())
}

/// Prints every transition as it happens and appends it to `log`.
///
/// The client loop reads `log` rather than `breaker.state()` to decide that the breaker has
/// closed: that way the last transition has been printed before the summary.
async fn watch_transitions(
    mut events: broadcast::Receiver<seawall::circuit_breaker::Event>,
    start: Instant,
    log: watch::Sender<Vec<Transition>>,
) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("(missed {n} breaker events)");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // `subscribe` delivers transitions only; rejections show in the per-phase strips.
        let EventKind::StateTransition { from, to } = *event.kind() else {
            continue;
        };
        let at = event.at().saturating_duration_since(start);
        // A move to open says when probes will be let through: the open wait.
        let wait = match event.retry_at() {
            Some(retry_at) => format!(
                " (probes in {:.2}s)",
                retry_at.saturating_duration_since(event.at()).as_secs_f64()
            ),
            _ => String::new(),
        };
        println!(
            "{} breaker '{}': {from} -> {to}{wait}",
            stamp(at),
            event.breaker()
        );
        log.send_modify(|log| log.push(Transition { from, to }));
    }
}

// ---------------------------------------------------------------------------------------
// The client loop
// ---------------------------------------------------------------------------------------

/// What one request ended as, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The upstream's own answer.
    Ok,
    /// The fallback, after the upstream answered 5xx.
    Fallback5xx,
    /// The fallback, after the client timed out.
    FallbackTimeout,
    /// The fallback, because the breaker rejected the call without calling the upstream.
    FallbackOpen,
    /// The fallback, after some other error (connection refused, ...).
    FallbackOther,
    /// An error made it through the fallback (only `poll_ready` errors could).
    Error,
}

impl Seen {
    const ALL: [Seen; 6] = [
        Seen::Ok,
        Seen::Fallback5xx,
        Seen::FallbackTimeout,
        Seen::FallbackOpen,
        Seen::FallbackOther,
        Seen::Error,
    ];

    fn of(result: &Result<Response<String>, BoxError>) -> Seen {
        let Ok(response) = result else {
            return Seen::Error;
        };
        match response
            .headers()
            .get(FALLBACK_HEADER)
            .map(|v| v.as_bytes())
        {
            None => Seen::Ok,
            Some(b"upstream-5xx") => Seen::Fallback5xx,
            Some(b"timeout") => Seen::FallbackTimeout,
            Some(b"circuit-open") => Seen::FallbackOpen,
            Some(_) => Seen::FallbackOther,
        }
    }

    fn symbol(self) -> char {
        match self {
            Seen::Ok => '.',
            Seen::Fallback5xx => 'x',
            Seen::FallbackTimeout => 't',
            Seen::FallbackOpen => 'o',
            Seen::FallbackOther => '?',
            Seen::Error => '!',
        }
    }

    fn label(self) -> &'static str {
        match self {
            Seen::Ok => "ok",
            Seen::Fallback5xx => "5xx",
            Seen::FallbackTimeout => "timeout",
            Seen::FallbackOpen => "rejected",
            Seen::FallbackOther => "other error",
            Seen::Error => "unhandled error",
        }
    }

    fn is_fallback(self) -> bool {
        !matches!(self, Seen::Ok | Seen::Error)
    }
}

/// Per-request outcomes of a phase, or of the whole run.
#[derive(Debug, Default)]
struct Tally {
    counts: [u64; Seen::ALL.len()],
    strip: String,
}

impl Tally {
    fn add(&mut self, seen: Seen) {
        self.counts[seen as usize] += 1;
        self.strip.push(seen.symbol());
    }

    fn count(&self, seen: Seen) -> u64 {
        self.counts[seen as usize]
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn fallbacks(&self) -> u64 {
        Seen::ALL
            .iter()
            .filter(|s| s.is_fallback())
            .map(|&s| self.count(s))
            .sum()
    }

    /// "3 5xx, 12 rejected": the non-zero fallback reasons.
    fn reasons(&self) -> String {
        let parts: Vec<String> = Seen::ALL
            .iter()
            .filter(|s| s.is_fallback() && self.count(**s) > 0)
            .map(|&s| format!("{} {}", self.count(s), s.label()))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }

    fn merge(&mut self, other: &Tally) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Until {
    /// Runs for this long.
    Elapsed(Duration),
    /// Runs until the breaker has closed (at most [`RECOVERY_LIMIT`]).
    Closed,
}

#[derive(Debug)]
struct Phase {
    name: &'static str,
    mode: Mode,
    until: Until,
}

const PHASES: [Phase; 4] = [
    Phase {
        name: "healthy",
        mode: Mode::Healthy,
        until: Until::Elapsed(Duration::from_millis(1500)),
    },
    Phase {
        name: "failing",
        mode: Mode::Failing,
        until: Until::Elapsed(Duration::from_millis(2000)),
    },
    // Long enough to cover the breaker's second half-open episode (~1.75 s + 1 s + 2 s
    // into the run) and both of its probes.
    Phase {
        name: "slow",
        mode: Mode::Slow,
        until: Until::Elapsed(Duration::from_millis(1800)),
    },
    Phase {
        name: "recovered",
        mode: Mode::Healthy,
        until: Until::Closed,
    },
];

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let start = Instant::now();

    // The upstream, on loopback only.
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let upstream = Arc::new(Upstream::default());
    tokio::spawn(serve(listener, upstream.clone()));
    let uri: Uri = format!("http://{addr}/greeting").parse()?;

    // The breaker: judge the last 10 calls once there are 5; open at 50 % failures; wait
    // 1 s, then 2 s, then 4 s on consecutive trips; decide with 2 probes.
    let config = CircuitBreakerConfig::builder()
        .name("flaky-upstream")
        .sliding_window(SlidingWindow::count_based(10))
        .minimum_calls(5)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(1))
        .exponential_backoff(2.0, Duration::from_secs(4))
        .permitted_calls_in_half_open(2)
        .build()?;
    let breaker_layer = CircuitBreakerLayer::new(config).with_classifier(HttpClassifier::new());
    let breaker = breaker_layer.breaker().clone();

    // Subscribe before the first call so that no transition is missed.
    let (log_tx, log) = watch::channel(Vec::new());
    tokio::spawn(watch_transitions(breaker.subscribe(), start, log_tx));

    // Order matters, outermost first:
    //
    // * The fallback is outermost, so it also answers the breaker's rejections (a
    //   `CircuitOpen` error) while the breaker still sees every real failure.
    // * `HttpClassifier` implements `Classify<http::Response<B>, E>`: the breaker must sit
    //   where the response is still an `http::Response`, and a 503 is still an `Ok`. So it
    //   wraps the timeout and the client directly, where it sees `Response<Incoming>`
    //   (5xx: failure) or an error (timeout or transport: failure).
    // * Above the breaker, `and_then(collect)` reads the body into a `String` (an
    //   `http::Response<Incoming>` cannot be built by a fallback) and turns a 5xx into an
    //   error, so that the fallback answers it too. The breaker has recorded the call by
    //   then; a failure while reading the body is not recorded (the response's headers,
    //   which it classified, were fine), but still reaches the fallback.
    // * The timeout is inside the breaker, so a slow upstream counts as a failure.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::from_fn(fallback))
        .and_then(collect)
        .layer(breaker_layer)
        .timeout(CLIENT_TIMEOUT)
        .service(client);

    println!("flaky upstream listening on http://{addr}");
    println!(
        "one request every {} ms; strips: . ok   x 5xx   t timeout   o rejected by the breaker \
         (x, t and o were answered by the fallback)",
        REQUEST_EVERY.as_millis()
    );

    let mut tick = tokio::time::interval(REQUEST_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut total = Tally::default();
    let mut recovered = false;

    for phase in &PHASES {
        upstream.set_mode(phase.mode);
        let phase_start = Instant::now();
        let hits_before = upstream.hits.load(Relaxed);
        println!(
            "{} phase '{}': {}",
            stamp(start.elapsed()),
            phase.name,
            phase.mode.describe()
        );

        let mut tally = Tally::default();
        loop {
            match phase.until {
                Until::Elapsed(d) if phase_start.elapsed() >= d => break,
                Until::Closed => {
                    // Closed, and that transition printed (or none ever happened).
                    let printed = log.borrow().last().is_none_or(|t| t.to == State::Closed);
                    if breaker.state() == State::Closed && printed {
                        recovered = true;
                        break;
                    }
                    if phase_start.elapsed() >= RECOVERY_LIMIT {
                        break;
                    }
                }
                Until::Elapsed(_) => {}
            }
            tick.tick().await;
            let request = Request::get(uri.clone()).body(Empty::new())?;
            let result = match svc.ready().await {
                Ok(svc) => svc.call(request).await,
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                eprintln!("{} unhandled error: {e}", stamp(start.elapsed()));
            }
            tally.add(Seen::of(&result));
        }

        println!(
            "{} phase '{}' done: {} requests, {} from upstream, {} fallbacks{}; \
             upstream saw {}",
            stamp(start.elapsed()),
            phase.name,
            tally.total(),
            tally.count(Seen::Ok),
            tally.fallbacks(),
            tally.reasons(),
            upstream.hits.load(Relaxed) - hits_before,
        );
        for chunk in tally.strip.as_bytes().chunks(60) {
            println!("          {}", String::from_utf8_lossy(chunk));
        }
        total.merge(&tally);
    }

    let elapsed = start.elapsed();
    let transitions = log.borrow().clone();
    let trips = transitions.iter().filter(|t| t.to == State::Open).count();
    let snapshot = breaker.snapshot();
    let path = transitions
        .first()
        .map(|t| t.from.to_string())
        .into_iter()
        .chain(transitions.iter().map(|t| t.to.to_string()))
        .collect::<Vec<_>>()
        .join(" -> ");

    println!();
    println!("summary after {:.2}s", elapsed.as_secs_f64());
    println!("  requests            {}", total.total());
    println!("  upstream successes  {}", total.count(Seen::Ok));
    println!(
        "  fallbacks served    {}{}",
        total.fallbacks(),
        total.reasons()
    );
    println!(
        "  upstream saw        {} requests ({} rejected calls spared it, by the breaker's count)",
        upstream.hits.load(Relaxed),
        snapshot.rejected_calls,
    );
    println!("  transitions seen    {}: {path}", transitions.len());
    println!("  final state         {}", breaker.state());

    let mut problems = Vec::new();
    if trips == 0 {
        problems.push("the breaker never opened".to_string());
    }
    if !recovered || breaker.state() != State::Closed {
        problems.push(format!(
            "the breaker did not close again within {RECOVERY_LIMIT:?} (it is {})",
            breaker.state()
        ));
    }
    if total.count(Seen::Error) > 0 {
        problems.push(format!(
            "{} errors got past the fallback",
            total.count(Seen::Error)
        ));
    }
    if problems.is_empty() {
        println!("ok: the breaker opened {trips} time(s) and closed again");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &problems {
            eprintln!("FAILED: {problem}");
        }
        Ok(ExitCode::FAILURE)
    }
}
