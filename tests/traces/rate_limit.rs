//! A request refused for a missing key is logged, but a client that leaves its key out of
//! every request cannot make every refusal a line of the logs.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use seawall::rate_limit::http::{HeaderKey, HttpRateLimitLayer};
use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate};
use tower::{Layer, Service, ServiceExt};

/// Refuses `n` requests without a key through `svc`, each answered `status`.
async fn refuse<S>(svc: &mut S, n: usize, status: StatusCode)
where
    S: Service<Request<String>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(String::new()))
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
}

/// The recorded lines holding `text`.
fn lines(recorded: &crate::Recorded, text: &str) -> Vec<String> {
    let events = recorded.events.lock().unwrap();
    events
        .iter()
        .filter(|l| l.contains(text))
        .cloned()
        .collect()
}

/// A key missing for a set-up fault (no peer address for `ClientIp`): `500`, an `ERROR`
/// line, at most one a second.
#[tokio::test(start_paused = true)]
async fn refusals_for_a_missing_key_are_logged_at_most_once_a_second() {
    use seawall::rate_limit::http::ClientIp;
    let recorded = crate::recorded();
    let limiter = KeyedRateLimiter::new(Quota::new(Rate::per_second(100), 10).unwrap());
    let mut svc = HttpRateLimitLayer::per_key(limiter, ClientIp::peer()).layer(tower::service_fn(
        |_: Request<String>| async {
            Ok::<_, std::convert::Infallible>(Response::new(String::new()))
        },
    ));
    let ours = || lines(recorded, "no key could be taken");
    refuse(&mut svc, 1_000, StatusCode::INTERNAL_SERVER_ERROR).await;
    let first = ours().into_iter().take(2).collect::<Vec<_>>();
    assert_eq!(
        ours().len(),
        1,
        "{} lines, the first {first:?}",
        ours().len()
    );
    assert!(ours()[0].starts_with("ERROR"), "{:?}", ours());
    assert!(ours()[0].contains("suppressed=0"), "{:?}", ours());
    // A second later, the next refusal is a line again, and says how many were not.
    tokio::time::advance(Duration::from_millis(1_001)).await;
    refuse(&mut svc, 1, StatusCode::INTERNAL_SERVER_ERROR).await;
    assert_eq!(ours().len(), 2, "{:?}", ours());
    assert!(ours()[1].contains("suppressed=999"), "{:?}", ours());
}

/// A key the client must send and left out (an API key header): `400`, the client's
/// error, a `DEBUG` line (not an `ERROR`: any client can leave it out), at most one a
/// second too.
#[tokio::test(start_paused = true)]
async fn refusals_for_a_key_the_client_left_out_are_debug_lines_at_most_once_a_second() {
    let recorded = crate::recorded();
    let limiter = KeyedRateLimiter::new(Quota::new(Rate::per_second(100), 10).unwrap());
    let mut svc = HttpRateLimitLayer::per_key(
        limiter,
        HeaderKey(http::HeaderName::from_static("x-api-key")),
    )
    .layer(tower::service_fn(|_: Request<String>| async {
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    }));
    let ours = || lines(recorded, "does not carry the key the client must send");
    refuse(&mut svc, 1_000, StatusCode::BAD_REQUEST).await;
    assert_eq!(ours().len(), 1, "{:?}", ours().first());
    assert!(ours()[0].starts_with("DEBUG"), "{:?}", ours());
    tokio::time::advance(Duration::from_millis(1_001)).await;
    refuse(&mut svc, 1, StatusCode::BAD_REQUEST).await;
    assert_eq!(ours().len(), 2, "{:?}", ours());
    assert!(ours()[1].contains("suppressed=999"), "{:?}", ours());
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
