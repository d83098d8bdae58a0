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

/// Trusting every address as a proxy (`0.0.0.0/0`, `::/0`) lets any client name the
/// address it is limited as: accepted, but never silently. It was not logged at all.
/// A gateway trusting it logs it once (its configuration's check does not log it again).
#[tokio::test]
async fn trusting_every_address_as_a_proxy_is_a_warning() {
    use seawall::rate_limit::http::ClientIp;
    let recorded = crate::recorded();
    let lines = || -> Vec<String> {
        let events = recorded.events.lock().unwrap();
        let ours = events
            .iter()
            .filter(|l| l.contains("every address is trusted as a proxy"));
        ours.cloned().collect()
    };
    let before = lines().len();
    ClientIp::trusting(["10.0.0.0/8", "::1"]).unwrap();
    assert_eq!(lines().len(), before, "{:?}", lines());
    ClientIp::trusting(["10.0.0.0/8", "0.0.0.0/0"]).unwrap();
    ClientIp::trusting_nets(["::/0".parse().unwrap()]);
    let new = &lines()[before..];
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(
        new[0].starts_with("WARN") && new[0].contains("net=0.0.0.0/0"),
        "{new:?}"
    );
    assert!(new[1].contains("net=::/0"), "{new:?}");
    #[cfg(feature = "gateway")]
    {
        use seawall::gateway::{Discovery, Gateway, GatewayConfig};
        let before = lines().len();
        let config = GatewayConfig::from_toml_str(
            "[gateway]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"0.0.0.0/0\"]\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nservice = \"svc\"\n\
             [[services]]\nname = \"svc\"\ninstances = [\"127.0.0.1:9\"]\n",
        )
        .unwrap();
        let _gateway = Gateway::build(config, Discovery::Static).await.unwrap();
        assert_eq!(lines().len(), before + 1, "{:?}", &lines()[before..]);
    }
}
