//! A request refused for a missing key is logged, but a client that leaves its key out of
//! every request cannot make every refusal a line of the logs.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use seawall::rate_limit::http::{HeaderKey, HttpRateLimitLayer};
use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate};
use tower::{Layer, Service, ServiceExt};

#[tokio::test(start_paused = true)]
async fn refusals_for_a_missing_key_are_logged_at_most_once_a_second() {
    let recorded = crate::recorded();
    let limiter = KeyedRateLimiter::new(Quota::new(Rate::per_second(100), 10).unwrap());
    let mut svc = HttpRateLimitLayer::per_key(
        limiter,
        HeaderKey(http::HeaderName::from_static("x-api-key")),
    )
    .layer(tower::service_fn(|_: Request<String>| async {
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    }));
    let lines = || -> Vec<String> {
        let events = recorded.events.lock().unwrap();
        let ours = events
            .iter()
            .filter(|l| l.contains("no key could be taken"));
        ours.cloned().collect()
    };
    let mut refuse = async |n: usize| {
        for _ in 0..n {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(Request::new(String::new()))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    refuse(1_000).await;
    let first = lines().into_iter().take(2).collect::<Vec<_>>();
    assert_eq!(
        lines().len(),
        1,
        "{} lines, the first {first:?}",
        lines().len()
    );
    assert!(lines()[0].starts_with("ERROR"), "{:?}", lines());
    assert!(lines()[0].contains("suppressed=0"), "{:?}", lines());
    // A second later, the next refusal is a line again, and says how many were not.
    tokio::time::advance(Duration::from_millis(1_001)).await;
    refuse(1).await;
    assert_eq!(lines().len(), 2, "{:?}", lines());
    assert!(lines()[1].contains("suppressed=999"), "{:?}", lines());
}
