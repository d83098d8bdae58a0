//! The balancers: strategies, weights, readiness, empty sets, outlier ejection,
//! per-endpoint breakers, discovery changes and consistent hashing.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use seawall::BoxError;
use seawall::balance::{Balance, NoEndpoints, OutlierDetection, Strategy, WhenEmpty, hash_key};
use seawall::circuit_breaker::{CircuitBreakerConfig, Rejection, SlidingWindow, State};
use seawall::discovery::{
    Instance, InstanceId, InstanceWatch, Publisher, Registry, ServiceDiscover,
};
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};

/// A test endpoint: answers with its port; fails while `failing`; not ready while `blocked`;
/// holds calls while `hold` has no permits.
#[derive(Clone)]
struct Node {
    port: u16,
    failing: Arc<AtomicBool>,
    blocked: Arc<AtomicBool>,
    hold: Option<Arc<Semaphore>>,
    calls: Arc<AtomicUsize>,
    _alive: Arc<()>,
}

impl Service<u64> for Node {
    type Response = u16;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u16, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.blocked.load(SeqCst) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: u64) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        let (port, failing, hold) = (self.port, self.failing.load(SeqCst), self.hold.clone());
        Box::pin(async move {
            if let Some(hold) = hold {
                hold.acquire().await.unwrap().forget();
            }
            if failing {
                Err(format!("{port} failed").into())
            } else {
                Ok(port)
            }
        })
    }
}

/// Controls of every node, by port.
#[derive(Default, Clone)]
struct Fleet {
    failing: Arc<parking_lot::Mutex<HashMap<u16, Arc<AtomicBool>>>>,
    blocked: Arc<parking_lot::Mutex<HashMap<u16, Arc<AtomicBool>>>>,
    calls: Arc<parking_lot::Mutex<HashMap<u16, Arc<AtomicUsize>>>>,
    alive: Arc<()>,
    hold: Option<Arc<Semaphore>>,
}

impl Fleet {
    fn make(&self) -> impl FnMut(&Instance) -> Node + use<> {
        let fleet = self.clone();
        move |i: &Instance| {
            let flag = |m: &parking_lot::Mutex<HashMap<u16, Arc<AtomicBool>>>| {
                m.lock().entry(i.port).or_default().clone()
            };
            Node {
                port: i.port,
                failing: flag(&fleet.failing),
                blocked: flag(&fleet.blocked),
                hold: fleet.hold.clone(),
                calls: fleet.calls.lock().entry(i.port).or_default().clone(),
                _alive: fleet.alive.clone(),
            }
        }
    }
    fn fail(&self, port: u16, on: bool) {
        self.failing
            .lock()
            .entry(port)
            .or_default()
            .store(on, SeqCst);
    }
    fn block(&self, port: u16, on: bool) {
        self.blocked
            .lock()
            .entry(port)
            .or_default()
            .store(on, SeqCst);
    }
    fn calls(&self, port: u16) -> usize {
        self.calls.lock().get(&port).map_or(0, |c| c.load(SeqCst))
    }
    /// Node stacks alive (built and not dropped), besides the references of the fleet and
    /// of one `make` closure.
    fn stacks(&self) -> usize {
        Arc::strong_count(&self.alive) - 2
    }
}

fn instance(port: u16) -> Instance {
    Instance::local("svc", ([127, 0, 0, 1], port).into())
}

fn ports(n: u16) -> Vec<Instance> {
    (1..=n).map(instance).collect()
}

async fn send<S: Service<u64, Response = u16, Error = BoxError>>(
    svc: &mut S,
) -> Result<u16, BoxError> {
    svc.ready().await?.call(0).await
}

#[tokio::test]
async fn least_requests_spreads_and_prefers_the_idle() {
    let fleet = Fleet::default();
    let d = ServiceDiscover::new(InstanceWatch::fixed(ports(4)), fleet.make());
    let mut lb = Balance::builder().seed(7).build(d);
    for _ in 0..4000 {
        send(&mut lb).await.unwrap();
    }
    for p in 1..=4 {
        let c = fleet.calls(p);
        assert!((800..1200).contains(&c), "port {p}: {c} calls of 4000");
    }

    // Two endpoints, one with a call in flight: the next call goes to the other.
    let mut fleet = Fleet::default();
    let gate = Arc::new(Semaphore::new(0));
    fleet.hold = Some(gate.clone());
    let d = ServiceDiscover::new(InstanceWatch::fixed(ports(2)), fleet.make());
    let mut lb = Balance::builder().seed(1).build(d);
    let first = lb.ready().await.unwrap().call(0);
    let busy = if fleet.calls(1) == 1 { 1 } else { 2 };
    let mut in_flight = vec![first];
    for _ in 0..10 {
        in_flight.push(lb.ready().await.unwrap().call(0));
    }
    // p2c with two endpoints compares both: load alternates, never piles on one.
    let (a, b) = (fleet.calls(1), fleet.calls(2));
    assert!(a.abs_diff(b) <= 1, "{a} vs {b} (first went to {busy})");
    assert_eq!(
        lb.handle()
            .endpoints()
            .iter()
            .map(|e| e.outstanding)
            .sum::<u32>(),
        11
    );
    gate.add_permits(100);
    for f in in_flight {
        f.await.unwrap();
    }
    assert_eq!(
        lb.handle()
            .endpoints()
            .iter()
            .map(|e| e.outstanding)
            .sum::<u32>(),
        0
    );
}

#[tokio::test]
async fn weights_set_the_shares() {
    let fleet = Fleet::default();
    let heavy = instance(1).with_weight(NonZeroU32::new(3).unwrap());
    let d = ServiceDiscover::new(InstanceWatch::fixed(vec![heavy, instance(2)]), fleet.make());
    let mut lb = Balance::builder().seed(3).build(d);
    for _ in 0..8000 {
        send(&mut lb).await.unwrap();
    }
    let share = fleet.calls(1) as f64 / 8000.0;
    // Sequential calls tie on load, so the weighted first draw decides: 3/4.
    assert!((share - 0.75).abs() < 0.03, "heavy share {share}");

    let fleet = Fleet::default();
    let heavy = instance(1).with_weight(NonZeroU32::new(2).unwrap());
    let d = ServiceDiscover::new(
        InstanceWatch::fixed(vec![heavy, instance(2), instance(3)]),
        fleet.make(),
    );
    let mut rr = Balance::builder().strategy(Strategy::RoundRobin).build(d);
    let mut order = Vec::new();
    for _ in 0..8 {
        order.push(send(&mut rr).await.unwrap());
    }
    assert_eq!(order.iter().filter(|&&p| p == 1).count(), 4, "{order:?}");
    assert_eq!(order.iter().filter(|&&p| p == 2).count(), 2, "{order:?}");
    // Within a cycle, the heavy endpoint's turns are spread out (nginx's smooth order).
    assert!(
        order[..4].windows(2).all(|w| w[0] != w[1]),
        "interleaved: {order:?}"
    );
}

#[tokio::test]
async fn endpoints_that_are_not_ready_are_skipped() {
    let fleet = Fleet::default();
    fleet.block(1, true);
    fleet.block(2, true);
    let d = ServiceDiscover::new(InstanceWatch::fixed(ports(3)), fleet.make());
    for strategy in [
        Strategy::LeastRequests,
        Strategy::RoundRobin,
        Strategy::peak_ewma(),
    ] {
        let mut lb = Balance::builder()
            .strategy(strategy)
            .build(ServiceDiscover::new(
                InstanceWatch::fixed(ports(3)),
                fleet.make(),
            ));
        for _ in 0..30 {
            assert_eq!(send(&mut lb).await.unwrap(), 3, "{strategy:?}");
        }
    }
    // None ready: pending (not an error, not a hang once one is ready).
    fleet.block(3, true);
    let mut lb = Balance::new(d);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(lb.poll_ready(&mut cx).is_pending());
    fleet.block(2, false);
    assert_eq!(send(&mut lb).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_empty_set_fails_fast_or_waits_as_configured() {
    let registry = Registry::new();
    let fleet = Fleet::default();
    let mut lb = Balance::builder()
        .name("users")
        .build(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    let err = send(&mut lb).await.unwrap_err();
    let err = err.downcast_ref::<NoEndpoints>().expect("NoEndpoints");
    assert_eq!(err.balancer(), "users");

    let mut lb = Balance::builder()
        .when_empty(WhenEmpty::Wait(Duration::from_secs(2)))
        .build(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    let start = tokio::time::Instant::now();
    assert!(send(&mut lb).await.unwrap_err().is::<NoEndpoints>());
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    // The wait ran out: still empty, the next call fails at once (the wait is the
    // balancer's, not each call's).
    let start = tokio::time::Instant::now();
    assert!(send(&mut lb).await.unwrap_err().is::<NoEndpoints>());
    assert_eq!(start.elapsed(), Duration::ZERO);

    // An endpoint that arrives during the wait is used.
    let mut lb = Balance::builder()
        .when_empty(WhenEmpty::Wait(Duration::from_secs(2)))
        .build(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    let r2 = registry.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::mem::forget(r2.register(instance(9)));
    });
    let start = tokio::time::Instant::now();
    assert_eq!(send(&mut lb).await.unwrap(), 9);
    assert_eq!(start.elapsed(), Duration::from_millis(500));
}

#[tokio::test]
async fn discovery_changes_move_traffic_and_drop_stacks() {
    let registry = Registry::new();
    let fleet = Fleet::default();
    let a = registry.register(instance(1));
    let b = registry.register(instance(2));
    let mut lb = Balance::new(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    for _ in 0..50 {
        send(&mut lb).await.unwrap();
    }
    assert_eq!(lb.len(), 2);
    assert_eq!(fleet.stacks(), 2);
    drop(a);
    for _ in 0..50 {
        assert_eq!(send(&mut lb).await.unwrap(), 2);
    }
    assert_eq!(fleet.stacks(), 1, "the removed endpoint's stack is dropped");
    b.set_passing(false);
    assert!(send(&mut lb).await.unwrap_err().is::<NoEndpoints>());
    assert_eq!(fleet.stacks(), 0);
    b.set_passing(true);
    assert_eq!(send(&mut lb).await.unwrap(), 2);
    // The same service ID on another node is a separate endpoint.
    let _other = registry.register(Instance::new(
        InstanceId::new("node-b", "svc-2"),
        "svc",
        "127.0.0.2",
        3,
    ));
    send(&mut lb).await.unwrap();
    assert_eq!(lb.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn failing_endpoints_are_ejected_for_a_growing_time_and_readmitted() {
    let fleet = Fleet::default();
    fleet.fail(1, true);
    let detection = OutlierDetection::builder()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(10))
        .max_ejection_time(Duration::from_secs(25))
        .build()
        .unwrap();
    let mut lb = Balance::builder()
        .name("ej")
        .outlier_detection(detection)
        .build(ServiceDiscover::new(
            InstanceWatch::fixed(ports(3)),
            fleet.make(),
        ));
    let handle = lb.handle().clone();
    let mut failures = 0;
    for _ in 0..300 {
        if send(&mut lb).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "three failures in a row eject it; no more calls reach it"
    );
    assert_eq!(handle.ejected(), 1);
    let ejected = handle
        .endpoints()
        .into_iter()
        .find(|e| e.address == "127.0.0.1:1")
        .unwrap();
    assert_eq!(ejected.ejected_for, Some(Duration::from_secs(10)));
    assert_eq!(ejected.ejections, 1);

    // Readmitted after the ejection, still failing: ejected again, for twice as long.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(handle.ejected(), 0);
    for _ in 0..300 {
        let _ = send(&mut lb).await;
    }
    let again = handle
        .endpoints()
        .into_iter()
        .find(|e| e.address == "127.0.0.1:1")
        .unwrap();
    assert_eq!(again.ejections, 2);
    assert_eq!(again.ejected_for, Some(Duration::from_secs(20)));
    // The third ejection is capped at the maximum.
    tokio::time::advance(Duration::from_secs(20)).await;
    for _ in 0..300 {
        let _ = send(&mut lb).await;
    }
    let third = handle
        .endpoints()
        .into_iter()
        .find(|e| e.address == "127.0.0.1:1")
        .unwrap();
    assert_eq!(third.ejected_for, Some(Duration::from_secs(25)));

    // Recovered: readmitted and served.
    fleet.fail(1, false);
    tokio::time::advance(Duration::from_secs(25)).await;
    for _ in 0..300 {
        send(&mut lb).await.unwrap();
    }
    assert!(
        fleet.calls(1) > 9 + 50,
        "readmitted endpoint gets traffic again"
    );
    assert_eq!(handle.ejected(), 0);
}

#[tokio::test(start_paused = true)]
async fn at_most_the_maximum_share_is_ejected_and_traffic_keeps_flowing() {
    let fleet = Fleet::default();
    for p in 1..=4 {
        fleet.fail(p, true);
    }
    let detection = OutlierDetection::builder()
        .consecutive_failures(1)
        .max_ejected(0.5)
        .build()
        .unwrap();
    let mut lb = Balance::builder()
        .outlier_detection(detection)
        .build(ServiceDiscover::new(
            InstanceWatch::fixed(ports(4)),
            fleet.make(),
        ));
    for _ in 0..200 {
        assert!(send(&mut lb).await.is_err());
    }
    assert_eq!(lb.handle().ejected(), 2, "half of four");
    assert!(lb.handle().ejections_suppressed() > 0);
    let served: usize = (1..=4).map(|p| fleet.calls(p)).sum();
    assert_eq!(served, 200, "every request reached an endpoint");
}

#[tokio::test(start_paused = true)]
async fn failure_rate_ejects_too() {
    let fleet = Fleet::default();
    let detection = OutlierDetection::builder()
        .no_consecutive_failures()
        .failure_rate(0.5, 10)
        .build()
        .unwrap();
    let mut lb = Balance::builder()
        .seed(5)
        .outlier_detection(detection)
        .build(ServiceDiscover::new(
            InstanceWatch::fixed(ports(2)),
            fleet.make(),
        ));
    fleet.fail(1, true);
    for _ in 0..100 {
        let _ = send(&mut lb).await;
    }
    assert_eq!(lb.handle().ejected(), 1);
    assert!(
        fleet.calls(1) <= 10,
        "judged at the tenth call: {}",
        fleet.calls(1)
    );
}

/// `failure_rate(0.5, 10)`: "Ejects an endpoint when at least `threshold` of its calls
/// failed, judged over every `calls` calls (a tumbling window)". An endpoint failing every
/// other call (half of its calls, window after window) meets the threshold in every window;
/// it must be ejected whichever call, a failure or a success, closes the window.
#[tokio::test(start_paused = true)]
async fn failure_rate_judges_a_window_that_ends_with_a_success() {
    let fleet = Fleet::default();
    let detection = OutlierDetection::builder()
        .no_consecutive_failures()
        .failure_rate(0.5, 10)
        .build()
        .unwrap();
    let mut lb = Balance::builder()
        .outlier_detection(detection)
        .build(ServiceDiscover::new(
            InstanceWatch::fixed(ports(1)),
            fleet.make(),
        ));
    // Failure, success, failure, success...: 5 of every 10 calls fail (9 of 10 in the
    // first window would do as well: any window whose tenth call succeeds).
    for i in 0..40 {
        fleet.fail(1, i % 2 == 0);
        let _ = send(&mut lb).await;
    }
    let endpoint = &lb.handle().endpoints()[0];
    assert_eq!(endpoint.failures, 20);
    assert!(
        endpoint.ejections >= 1,
        "half of its calls failed in each of 4 windows of 10, never ejected: {endpoint:?}"
    );
}

/// Endpoint breakers that open at half of 4 calls failed, for 5 s, then let one probe.
fn breaker_template() -> CircuitBreakerConfig {
    CircuitBreakerConfig::builder()
        .sliding_window(SlidingWindow::count_based(4))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(5))
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_open_endpoint_breaker_takes_it_out_of_rotation() {
    let fleet = Fleet::default();
    let template = breaker_template();
    let mut lb = Balance::builder()
        .name("users")
        .endpoint_breaker(template)
        .build(ServiceDiscover::new(
            InstanceWatch::fixed(ports(2)),
            fleet.make(),
        ));
    fleet.fail(1, true);
    for _ in 0..100 {
        let _ = send(&mut lb).await;
    }
    let status = lb.handle().endpoints();
    let one = status.iter().find(|e| e.address == "127.0.0.1:1").unwrap();
    assert_eq!(one.breaker, Some(State::Open));
    assert!(one.key.contains("svc-1"));
    assert_eq!(fleet.calls(1), 4, "no calls once its breaker opened");

    // Both open: requests fail fast with the breaker's error.
    fleet.fail(2, true);
    for _ in 0..20 {
        let _ = send(&mut lb).await;
    }
    let err = send(&mut lb).await.unwrap_err();
    assert!(err.is::<Rejection>(), "{err}");
    let before = fleet.calls(1) + fleet.calls(2);

    // After the wait, a single probe each; success closes them.
    fleet.fail(1, false);
    fleet.fail(2, false);
    tokio::time::advance(Duration::from_secs(5)).await;
    tokio::task::yield_now().await;
    // Picks are random (the balancer is seeded per process): send until both have
    // had their probe, each request served, none refused.
    let handle = lb.handle().clone();
    let all_closed = || {
        handle
            .endpoints()
            .iter()
            .all(|e| e.breaker == Some(State::Closed))
    };
    let mut sent = 0;
    while !all_closed() {
        assert!(sent < 200, "an endpoint was never probed");
        send(&mut lb).await.unwrap();
        sent += 1;
    }
    assert!(sent >= 2, "one probe each");
    assert_eq!(fleet.calls(1) + fleet.calls(2), before + sent);
}

/// `endpoint_metrics(false)`: the endpoint breakers and ejections report nothing labelled
/// by endpoint to the facade (which cannot remove a series once an endpoint leaves), the
/// breakers still open and close, and the balancer's own series stay; by default, they
/// are reported.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn endpoint_metrics_off_keeps_endpoint_series_out_of_the_facade() {
    use metrics_util::debugging::DebuggingRecorder;
    for on in [true, false] {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // This thread's recorder while the test's runtime (current thread) runs.
        let _recording = metrics::set_default_local_recorder(&recorder);
        let fleet = Fleet::default();
        let detection = OutlierDetection::builder()
            .consecutive_failures(2)
            .base_ejection_time(Duration::from_secs(1))
            .build()
            .unwrap();
        let mut lb = Balance::builder()
            .name("users")
            .endpoint_breaker(breaker_template())
            .outlier_detection(detection)
            .endpoint_metrics(on)
            .build(ServiceDiscover::new(
                InstanceWatch::fixed(ports(2)),
                fleet.make(),
            ));
        fleet.fail(1, true);
        for _ in 0..40 {
            let _ = send(&mut lb).await;
        }
        let status = lb.handle().endpoints();
        let one = status.iter().find(|e| e.address == "127.0.0.1:1").unwrap();
        assert!(
            one.ejections > 0 || one.breaker == Some(State::Open),
            "{status:?}"
        );
        let names: Vec<String> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, ..)| {
                let k = key.key();
                let labels: Vec<String> = k.labels().map(|l| l.value().to_owned()).collect();
                format!("{} {labels:?}", k.name())
            })
            .collect();
        let per_endpoint: Vec<&String> = names
            .iter()
            .filter(|n| n.contains("users/") || n.contains("svc-"))
            .collect();
        assert_eq!(
            !per_endpoint.is_empty(),
            on,
            "endpoint_metrics({on}): {names:#?}"
        );
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("seawall_balance_endpoints ")),
            "{names:#?}"
        );
    }
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_on_their_endpoint() {
    let publisher = Publisher::live(ports(5));
    let fleet = Fleet::default();
    let mut lb = Balance::builder().build_hashed(
        ServiceDiscover::new(publisher.subscribe(), fleet.make()),
        |key: &u64| Some(hash_key(key)),
    );
    let mut owner = HashMap::new();
    for key in 0..1000u64 {
        let port = lb.ready().await.unwrap().call(key).await.unwrap();
        owner.insert(key, port);
        assert_eq!(lb.ready().await.unwrap().call(key).await.unwrap(), port);
    }
    // Endpoint 3 leaves: only its keys move.
    let mut rest = ports(5);
    rest.remove(2);
    publisher.publish(rest);
    let mut moved = 0;
    for key in 0..1000u64 {
        let port = lb.ready().await.unwrap().call(key).await.unwrap();
        if owner[&key] == 3 {
            assert_ne!(port, 3);
        } else if port != owner[&key] {
            moved += 1;
        }
    }
    assert!(moved < 20, "{moved} keys moved that did not have to");

    // A failing endpoint's keys go to their stable next choice, and come back.
    let detection = OutlierDetection::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let fleet = Fleet::default();
    let mut lb = Balance::builder()
        .outlier_detection(detection)
        .build_hashed(
            ServiceDiscover::new(InstanceWatch::fixed(ports(5)), fleet.make()),
            |key: &u64| Some(hash_key(key)),
        );
    let key = (0..).find(|k| owner[k] == 2).unwrap();
    fleet.fail(2, true);
    assert!(lb.ready().await.unwrap().call(key).await.is_err());
    let next = lb.ready().await.unwrap().call(key).await.unwrap();
    assert_ne!(next, 2);
    assert_eq!(lb.ready().await.unwrap().call(key).await.unwrap(), next);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: crate::regressions_next_to_source(),
        ..ProptestConfig::default()
    })]

    /// Maglev: shares stay near 1/N, and when one of N endpoints leaves, the share of keys
    /// that move stays near 1/N: within twice it and a half, since two endpoints whose
    /// hashes give the same stride through the table pass entries between them on a change
    /// (`n = 14, leaving = 0, salt = 14145809798877825762` moves 0.144, ideal 0.071; the
    /// closer bound for independent strides is `src/balance/weights.rs`'s property). A
    /// table built without regard to the last one would move (N - 1)/N.
    #[test]
    fn consistent_hashing_balances_and_disrupts_minimally(n in 2usize..40, leaving in 0usize..40, salt in any::<u64>()) {
        let leaving = leaving % n;
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async move {
            let instances: Vec<Instance> = (0..n)
                .map(|i| Instance::new(InstanceId::new(format!("node-{salt}"), format!("s-{i}")), "svc", "127.0.0.1", 1000 + i as u16))
                .collect();
            let publisher = Publisher::live(instances.clone());
            let fleet = Fleet::default();
            let mut lb = Balance::builder().build_hashed(
                ServiceDiscover::new(publisher.subscribe(), fleet.make()),
                |key: &u64| Some(hash_key(key)),
            );
            const KEYS: u64 = 20_000;
            let mut before = Vec::with_capacity(KEYS as usize);
            let mut counts = vec![0u32; n];
            for key in 0..KEYS {
                let port = lb.ready().await.unwrap().call(key ^ salt).await.unwrap();
                counts[usize::from(port - 1000)] += 1;
                before.push(port);
            }
            let expected = KEYS as f64 / n as f64;
            for (i, &c) in counts.iter().enumerate() {
                // Maglev tables are balanced to within a few percent; key sampling adds noise.
                let tolerance = 0.12 * expected + 4.0 * expected.sqrt();
                prop_assert!((f64::from(c) - expected).abs() < tolerance, "endpoint {} got {} keys, expected {:.0}", i, c, expected);
            }
            let mut rest = instances.clone();
            let gone = rest.remove(leaving).port;
            publisher.publish(rest);
            let mut moved = 0u64;
            for key in 0..KEYS {
                let port = lb.ready().await.unwrap().call(key ^ salt).await.unwrap();
                prop_assert_ne!(port, gone);
                if port != before[key as usize] {
                    moved += 1;
                }
            }
            let share = moved as f64 / KEYS as f64;
            let ideal = 1.0 / n as f64;
            prop_assert!(share < ideal * 2.5 + 0.01, "{} endpoints: {:.4} of keys moved, ideal {:.4}", n, share, ideal);
            Ok(())
        })?;
    }

    /// However calls fail, no more than the allowed share is ejected at once, and every
    /// request still reaches an endpoint.
    #[test]
    fn ejections_stay_within_the_maximum_share(
        n in 1u16..12,
        percent in 0u8..=100,
        plan in proptest::collection::vec((0u16..12, any::<bool>(), 0u64..3000), 1..200),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let fleet = Fleet::default();
            let detection = OutlierDetection::builder()
                .consecutive_failures(2)
                .failure_rate(0.5, 4)
                .base_ejection_time(Duration::from_secs(1))
                .max_ejected(f64::from(percent) / 100.0)
                .build()
                .unwrap();
            let mut lb = Balance::builder()
                .seed(11)
                .outlier_detection(detection)
                .build(ServiceDiscover::new(InstanceWatch::fixed(ports(n)), fleet.make()));
            let allowed = (usize::from(n) * usize::from(percent) / 100).max(1);
            for (port, fail, advance_ms) in plan {
                fleet.fail(port % n + 1, fail);
                let before: usize = (1..=n).map(|p| fleet.calls(p)).sum();
                let _ = send(&mut lb).await;
                let after: usize = (1..=n).map(|p| fleet.calls(p)).sum();
                prop_assert_eq!(after, before + 1, "a request did not reach an endpoint");
                prop_assert!(lb.handle().ejected() <= allowed);
                tokio::time::advance(Duration::from_millis(advance_ms)).await;
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn service_discover_plugs_into_towers_balancer_too() {
    use tower::load::{CompleteOnResponse, PendingRequestsDiscover};

    let registry = Registry::new();
    let fleet = Fleet::default();
    let a = registry.register(instance(1));
    let _b = registry.register(instance(2));
    let discover = PendingRequestsDiscover::new(
        ServiceDiscover::new(registry.watch("svc"), fleet.make()),
        CompleteOnResponse::default(),
    );
    let mut lb = tower::balance::p2c::Balance::new(discover);
    for _ in 0..100 {
        lb.ready().await.unwrap().call(0).await.unwrap();
    }
    assert!(fleet.calls(1) > 20 && fleet.calls(2) > 20);
    drop(a);
    for _ in 0..50 {
        assert_eq!(lb.ready().await.unwrap().call(0).await.unwrap(), 2);
    }
    assert_eq!(
        fleet.stacks(),
        1,
        "tower dropped the removed endpoint's stack"
    );
}

/// Replicas of a balancer (one per thread) each follow discovery and pick on their own,
/// and share per endpoint what they learn: failures seen by one eject the endpoint for
/// all, an open breaker takes it out of every replica's rotation, an endpoint's figures
/// live until the last replica lets it go, and a changed instance starts over once, not
/// once per replica.
#[tokio::test(start_paused = true)]
async fn replicas_share_ejections_breakers_and_endpoints() {
    let registry = Registry::new();
    let fleet = Fleet::default();
    let one = registry.register(instance(1));
    let _two = registry.register(instance(2));
    let _three = registry.register(instance(3));
    let mut first = Balance::builder()
        .name("users")
        .outlier_detection(
            OutlierDetection::builder()
                .consecutive_failures(2)
                .base_ejection_time(Duration::from_secs(30))
                .max_ejected(1.0)
                .build()
                .unwrap(),
        )
        .build(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    let mut second = first.replica(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    // (`stacks` counts one `make` closure out; the second replica holds another.)
    assert_eq!(fleet.stacks() - 1, 6, "each replica builds its own stacks");

    // Two failures seen by the first: the second sends no more there.
    fleet.fail(1, true);
    let mut sent = 0;
    for _ in 0..200 {
        if fleet.calls(1) == 2 {
            break;
        }
        let _ = send(&mut first).await;
        sent += 1;
    }
    assert_eq!(fleet.calls(1), 2);
    assert_eq!(second.handle().ejected(), 1);
    for _ in 0..100 {
        assert_ne!(send(&mut second).await.unwrap(), 1);
    }
    assert_eq!(
        fleet.calls(1),
        2,
        "the second replica called an ejected endpoint"
    );
    // One set of figures: each endpoint's calls through either replica.
    let status = first.handle().endpoints();
    assert_eq!(status.iter().map(|e| e.calls).sum::<u64>(), sent + 100);

    // Deregistered: gone from the first, still held by the second, so still ejected;
    // once the second lets it go too, its figures go.
    drop(one);
    send(&mut first).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(
        first.handle().ejected(),
        1,
        "the second replica still holds it"
    );
    send(&mut second).await.unwrap();
    assert_eq!(second.len(), 2);
    assert_eq!(first.handle().ejected(), 0);
    assert_eq!(fleet.stacks() - 1, 4);

    // Instance 3 changes (its weight): the first replica to see it starts its figures
    // over; the second takes those, so a failure through each makes two in a row.
    let mut changed = instance(3);
    changed.weight = NonZeroU32::new(5).unwrap();
    let _three = registry.register(changed);
    fleet.fail(3, true);
    let calls = fleet.calls(3);
    while fleet.calls(3) == calls {
        let _ = send(&mut first).await;
    }
    let calls = fleet.calls(3);
    for _ in 0..200 {
        if fleet.calls(3) > calls {
            break;
        }
        let _ = send(&mut second).await;
    }
    assert_eq!(fleet.calls(3), calls + 1);
    assert_eq!(
        first.handle().ejected(),
        1,
        "the replicas counted the changed instance's failures apart"
    );
    for _ in 0..50 {
        assert_eq!(send(&mut first).await.unwrap(), 2);
        assert_eq!(send(&mut second).await.unwrap(), 2);
    }

    // A change of neither address nor weight (its tags): the same endpoint, its figures
    // kept, and still shared.
    let calls_of = |lb: &Balance<_>, port: u16| {
        let status = lb.handle().endpoints();
        let address = format!("127.0.0.1:{port}");
        status.iter().find(|e| e.address == address).unwrap().calls
    };
    fleet.fail(3, false);
    let mut tagged = instance(2);
    tagged.tags = vec![String::from("canary")];
    let _two = registry.register(tagged);
    let before = calls_of(&first, 2);
    assert!(before >= 100);
    send(&mut first).await.unwrap();
    assert_eq!(
        calls_of(&first, 2),
        before + 1,
        "the retagged instance's figures were kept"
    );
    send(&mut second).await.unwrap();
    assert_eq!(
        calls_of(&second, 2),
        before + 2,
        "the replicas still share them"
    );

    // The handle outlives one replica, not both.
    let handle = first.handle().clone();
    drop(first);
    assert_eq!(handle.endpoints().len(), 2);
    drop(second);
    assert!(handle.endpoints().is_empty());
    assert_eq!(handle.len(), 0);
    assert_eq!(
        Arc::strong_count(&fleet.alive),
        1,
        "every stack was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_open_on_every_replica() {
    let fleet = Fleet::default();
    let template = breaker_template();
    let watch = InstanceWatch::fixed(ports(2));
    let mut first = Balance::builder()
        .name("users")
        .endpoint_breaker(template)
        .build(ServiceDiscover::new(watch.clone(), fleet.make()));
    let mut second = first.replica(ServiceDiscover::new(watch, fleet.make()));
    fleet.fail(1, true);
    for _ in 0..100 {
        let _ = send(&mut first).await;
    }
    assert_eq!(fleet.calls(1), 4);
    let status = second.handle().endpoints();
    let one = status.iter().find(|e| e.address == "127.0.0.1:1").unwrap();
    assert_eq!(one.breaker, Some(State::Open));
    for _ in 0..50 {
        assert_eq!(send(&mut second).await.unwrap(), 2);
    }
    assert_eq!(
        fleet.calls(1),
        4,
        "no calls from either replica once it opened"
    );
}

/// Replicas on two threads while discovery churns: endpoints come, go and change weight,
/// some fail (ejections, breakers). No call panics or hangs, the ejected count never runs
/// below zero (it would wrap) or above the endpoints, and once every endpoint is gone
/// nothing is counted ejected, the handle lists nothing and every stack is dropped.
#[test]
fn replicas_on_two_threads_stay_consistent_while_discovery_churns() {
    const PORTS: u16 = 20;
    let fleet = Fleet::default();
    let publisher = Publisher::live(ports(10));
    let first = Balance::builder()
        .outlier_detection(
            OutlierDetection::builder()
                .consecutive_failures(2)
                .base_ejection_time(Duration::from_millis(2))
                .build()
                .unwrap(),
        )
        .endpoint_breaker(
            CircuitBreakerConfig::builder()
                .sliding_window(SlidingWindow::count_based(10))
                .minimum_calls(5)
                .failure_rate_threshold(0.5)
                .wait_in_open(Duration::from_millis(2))
                .build()
                .unwrap(),
        )
        .build(ServiceDiscover::new(publisher.subscribe(), fleet.make()));
    let second = first.replica(ServiceDiscover::new(publisher.subscribe(), fleet.make()));
    let handle = first.handle().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = [first, second]
        .into_iter()
        .map(|mut lb| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    while !stop.load(SeqCst) {
                        // With nothing in rotation a call fails at once: it never waits.
                        let call = tokio::time::timeout(Duration::from_secs(5), send(&mut lb));
                        let _ = call.await.expect("a call hung");
                        calls.fetch_add(1, SeqCst);
                    }
                });
                lb
            })
        })
        .collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..300 {
        let mut snapshot = Vec::new();
        for port in 1..=PORTS {
            let r = next();
            if r % 3 != 0 {
                let mut i = instance(port);
                i.weight = NonZeroU32::new((r >> 8) as u32 % 3 + 1).unwrap();
                snapshot.push(i);
            }
            fleet.fail(port, (r >> 16) % 4 == 0);
        }
        publisher.publish(snapshot);
        // Paced by the callers, not by a clock: each snapshot sees 20 calls at least.
        let seen = calls.load(SeqCst);
        while calls.load(SeqCst) < seen + 20 {
            std::thread::yield_now();
        }
        let ejected = handle.ejected();
        assert!(ejected <= usize::from(PORTS), "{ejected} ejected");
    }
    publisher.publish(Vec::new());
    stop.store(true, SeqCst);
    let replicas: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for mut lb in replicas {
        let err = rt.block_on(send(&mut lb)).unwrap_err();
        assert!(err.is::<NoEndpoints>(), "{err}");
        assert_eq!(lb.len(), 0);
    }
    assert_eq!(handle.ejected(), 0, "an ejection outlived its endpoint");
    assert_eq!(handle.len(), 0);
    assert!(handle.endpoints().is_empty());
    assert!(calls.load(SeqCst) >= 300 * 20);
    assert_eq!(
        Arc::strong_count(&fleet.alive),
        1,
        "a stack outlived its replica"
    );
}

/// Hashing replicas send a key to the same endpoint, and an endpoint ejected through one
/// sends its keys to their next choice through both.
#[tokio::test(start_paused = true)]
async fn hashing_replicas_agree_on_keys_and_share_ejections() {
    let publisher = Publisher::live(ports(5));
    let fleet = Fleet::default();
    let key = |key: &u64| Some(hash_key(key));
    let mut first = Balance::builder()
        .outlier_detection(
            OutlierDetection::builder()
                .consecutive_failures(1)
                .build()
                .unwrap(),
        )
        .build_hashed(
            ServiceDiscover::new(publisher.subscribe(), fleet.make()),
            key,
        );
    let mut second = first.replica(ServiceDiscover::new(publisher.subscribe(), fleet.make()));
    let mut owner = HashMap::new();
    for k in 0..200u64 {
        let a = first.ready().await.unwrap().call(k).await.unwrap();
        let b = second.ready().await.unwrap().call(k).await.unwrap();
        assert_eq!(a, b, "key {k}");
        owner.insert(k, a);
    }
    let (&victim_key, &victim) = owner.iter().next().unwrap();
    fleet.fail(victim, true);
    assert!(first.ready().await.unwrap().call(victim_key).await.is_err());
    let before = fleet.calls(victim);
    for (&k, &port) in &owner {
        let through_second = second.ready().await.unwrap().call(k).await.unwrap();
        let through_first = first.ready().await.unwrap().call(k).await.unwrap();
        assert_eq!(through_first, through_second, "key {k}");
        if port == victim {
            assert_ne!(through_second, victim);
        } else {
            assert_eq!(
                through_second, port,
                "key {k} moved though its endpoint is fine"
            );
        }
    }
    assert_eq!(
        fleet.calls(victim),
        before,
        "an ejected endpoint was called"
    );
}

/// Peak-EWMA takes no latency from a call its classifier ignores (a client that went
/// away, or was slow to send its body): taken as a peak, one 30 s call kept the endpoint
/// out of every pick while its estimate decayed.
#[tokio::test(start_paused = true)]
async fn peak_ewma_takes_no_latency_from_an_ignored_call() {
    use seawall::circuit_breaker::Outcome;
    // The next call to port 1 takes 30 s and fails: the client's doing, ignored.
    let slow = Arc::new(AtomicBool::new(false));
    let make = {
        let slow = slow.clone();
        move |i: &Instance| {
            let port = i.port;
            let slow = slow.clone();
            tower::service_fn(move |_: u64| {
                let this_slow = port == 1 && slow.swap(false, SeqCst);
                async move {
                    if this_slow {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return Err::<u16, BoxError>("the client went away".into());
                    }
                    Ok(port)
                }
            })
        }
    };
    let mut lb = Balance::builder()
        .strategy(Strategy::peak_ewma())
        .classifier(|result: Result<&u16, &BoxError>| {
            if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::Ignored
            }
        })
        .build(ServiceDiscover::new(InstanceWatch::fixed(ports(2)), make));
    slow.store(true, SeqCst);
    let mut tries = 0;
    while send(&mut lb).await.is_ok() {
        tries += 1;
        assert!(tries < 200, "port 1 never picked");
        slow.store(true, SeqCst);
    }
    slow.store(false, SeqCst);
    let mut to_1 = 0;
    for _ in 0..200 {
        if send(&mut lb).await.unwrap() == 1 {
            to_1 += 1;
        }
    }
    assert!(
        (50..=150).contains(&to_1),
        "port 1 got {to_1} of 200 after an ignored slow call"
    );
}

/// An instance that changes in discovery without changing its address or weight (its
/// health going from passing to warning, its tags) is the same endpoint: it keeps its
/// ejection, breaker and figures. (They started over: a sick instance whose check
/// flapped between passing and warning was readmitted at every flip.)
#[tokio::test(start_paused = true)]
async fn an_instance_changing_but_its_address_and_weight_keeps_its_ejection() {
    use seawall::discovery::Health;
    let registry = Registry::new();
    let regs: Vec<_> = (1..=3).map(|p| registry.register(instance(p))).collect();
    let fleet = Fleet::default();
    fleet.fail(1, true);
    let detection = OutlierDetection::builder()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut lb = Balance::builder()
        .outlier_detection(detection)
        .build(ServiceDiscover::new(registry.watch("svc"), fleet.make()));
    let handle = lb.handle().clone();
    for _ in 0..100 {
        let _ = send(&mut lb).await;
    }
    assert_eq!(handle.ejected(), 1);
    let calls_before = fleet.calls(1);

    // Its check goes to warning, same weight: a new version of the instance in discovery.
    assert!(registry.set_health(
        "svc",
        regs[0].id(),
        Health::Warning,
        NonZeroU32::new(1).unwrap()
    ));
    let mut failures = 0;
    for _ in 0..100 {
        if send(&mut lb).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(handle.ejected(), 1, "still ejected");
    assert_eq!(failures, 0, "no call reached it");
    assert_eq!(fleet.calls(1), calls_before);
}

/// An instance moves (same ID, new address) while a call to its old address is in
/// flight; that call then fails, as calls to a host going away do. Its failure is the old
/// version's: the endpoint's breaker series, `users/<endpoint>` (the one name both
/// versions report under), must keep showing the breaker of the endpoint in rotation,
/// which is closed, not the old version's, opened by the late failure and never closed
/// again (no call reaches it any more).
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn a_moved_endpoints_late_failure_does_not_show_its_breaker_open() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let hold = Arc::new(Semaphore::new(0));
    let fleet = Fleet {
        hold: Some(hold.clone()),
        ..Fleet::default()
    };
    let at = |port| Instance::new(InstanceId::new("n", "x"), "svc", "127.0.0.1", port);
    let publisher = Publisher::live(vec![at(1)]);
    let template = CircuitBreakerConfig::builder()
        .sliding_window(SlidingWindow::count_based(1))
        .minimum_calls(1)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut lb = Balance::builder()
        .name("users")
        .endpoint_breaker(template)
        .build(ServiceDiscover::new(publisher.subscribe(), fleet.make()));
    fleet.fail(1, true);
    let late = tokio::spawn(lb.ready().await.unwrap().call(0));
    tokio::task::yield_now().await;
    // The instance moves; the balancer follows.
    publisher.publish(vec![at(2)]);
    std::future::poll_fn(|cx| Poll::Ready(lb.poll_discovery(cx)))
        .await
        .unwrap();
    hold.add_permits(1_000);
    assert!(late.await.unwrap().is_err(), "the old address failed");
    assert_eq!(send(&mut lb).await.unwrap(), 2);
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(send(&mut lb).await.unwrap(), 2);
    }
    let status = lb.handle().endpoints();
    assert_eq!(status[0].breaker, Some(State::Closed), "{status:?}");
    let gauge = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| {
            let k = key.key();
            (k.name() == "seawall_circuit_breaker_state"
                && k.labels().any(|l| l.value() == "users/n/x"))
            .then_some(value)
        });
    assert_eq!(
        gauge,
        Some(DebugValue::Gauge(State::Closed.as_gauge().into())),
        "the endpoint's breaker series shows the old version's breaker"
    );
}
