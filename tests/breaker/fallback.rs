//! Fallback policies, alone and composed with the circuit breaker in both orders.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use seawall::BoxError;
use seawall::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow, State};
use seawall::fallback::{FallbackLayer, LastKnownGood, is_circuit_open};
use tower::{Service, ServiceBuilder, ServiceExt};

fn failing() -> impl Service<u32, Response = String, Error = BoxError> + Clone {
    tower::service_fn(|id: u32| async move { Err::<String, BoxError>(format!("no {id}").into()) })
}

/// A service that answers `item-{id}` until `down` is set.
fn switchable(
    down: Arc<AtomicBool>,
) -> impl Service<u32, Response = String, Error = BoxError> + Clone {
    tower::service_fn(move |id: u32| {
        let down = down.load(SeqCst);
        async move {
            if down {
                Err::<String, BoxError>("down".into())
            } else {
                Ok(format!("item-{id}"))
            }
        }
    })
}

/// A `LastKnownGood` keyed by the request (an id).
type ById = LastKnownGood<u32, String, fn(&u32) -> u32>;

/// [`switchable`] behind a `LastKnownGood` of at most `max_entries` ids: the cache, the
/// service and its switch.
fn cached_by_id(
    max_entries: usize,
) -> (
    ById,
    impl Service<u32, Response = String, Error = BoxError>,
    Arc<AtomicBool>,
) {
    let down = Arc::new(AtomicBool::new(false));
    let by_id: fn(&u32) -> u32 = |id| *id;
    let cache = LastKnownGood::new(by_id).max_entries(max_entries);
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(cache.clone()))
        .service(switchable(down.clone()));
    (cache, svc, down)
}

#[tokio::test]
async fn value_answers_every_failure() {
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::value("default".to_string()))
        .service(failing());
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "default");
}

#[tokio::test]
async fn from_fn_sees_the_error() {
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::from_fn(|e: BoxError| {
            format!("fallback for: {e}")
        }))
        .service(failing());
    assert_eq!(
        svc.ready().await.unwrap().call(7).await.unwrap(),
        "fallback for: no 7"
    );
}

#[tokio::test(start_paused = true)]
async fn from_async_fn_runs_a_future() {
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::from_async_fn(|e: BoxError| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            format!("later: {e}")
        }))
        .service(failing());
    assert_eq!(
        svc.ready().await.unwrap().call(3).await.unwrap(),
        "later: no 3"
    );
}

#[tokio::test]
async fn successes_pass_untouched() {
    let down = Arc::new(AtomicBool::new(false));
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::value("default".to_string()))
        .service(switchable(down));
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "item-1");
}

#[tokio::test]
async fn when_limits_the_fallback_to_matching_errors() {
    let mut svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::value("default".to_string())
                .when(|e: &BoxError| e.to_string() == "no 1"),
        )
        .service(failing());
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "default");
    let err = svc.ready().await.unwrap().call(2).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "no 2",
        "other errors pass through unchanged"
    );
}

/// Eviction takes the key stored longest ago, not the one inserted first: a key whose
/// answers keep coming (the most used) stays while new keys come and go. (A key stored
/// again kept its first place, so a client sending new keys flushed the hottest first.)
#[tokio::test(start_paused = true)]
async fn last_known_good_keeps_the_keys_stored_most_recently() {
    let (cache, mut svc, down) = cached_by_id(2);
    for id in [1, 2, 1, 3, 1, 4, 1, 5] {
        svc.ready().await.unwrap().call(id).await.unwrap();
    }
    assert_eq!(cache.len(), 2);
    down.store(true, SeqCst);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "item-1");
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), "item-5");
    assert!(svc.ready().await.unwrap().call(4).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn last_known_good_serves_the_latest_success_per_key() {
    let (cache, mut svc, down) = cached_by_id(2);
    for id in [1, 2] {
        svc.ready().await.unwrap().call(id).await.unwrap();
    }
    down.store(true, SeqCst);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "item-1");
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), "item-2");
    let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "down",
        "no cached answer: the error passes through"
    );

    // Bounded: a third key evicts the oldest.
    down.store(false, SeqCst);
    svc.ready().await.unwrap().call(3).await.unwrap();
    assert_eq!(cache.len(), 2);
    down.store(true, SeqCst);
    assert!(
        svc.ready().await.unwrap().call(1).await.is_err(),
        "key 1 was evicted"
    );
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), "item-3");
}

#[tokio::test(start_paused = true)]
async fn last_known_good_respects_max_age() {
    let down = Arc::new(AtomicBool::new(false));
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(
            LastKnownGood::new(|id: &u32| *id).max_age(Duration::from_secs(60)),
        ))
        .service(switchable(down.clone()));
    svc.ready().await.unwrap().call(1).await.unwrap();
    down.store(true, SeqCst);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "item-1");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        svc.ready().await.unwrap().call(1).await.is_err(),
        "too old to serve"
    );
}

#[tokio::test]
async fn last_known_good_memory_is_bounded_under_many_keys() {
    let cache = LastKnownGood::new(|id: &u32| *id).max_entries(100);
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(cache.clone()))
        .service(switchable(Arc::new(AtomicBool::new(false))));
    for id in 0..10_000 {
        svc.ready().await.unwrap().call(id).await.unwrap();
    }
    assert_eq!(cache.len(), 100);
}

fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(
        CircuitBreakerConfig::builder()
            .sliding_window(SlidingWindow::count_based(4))
            .minimum_calls(4)
            .wait_in_open(Duration::from_secs(30))
            .build()
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn outside_the_breaker_it_answers_rejections_and_the_breaker_still_trips() {
    let breaker = breaker();
    let handle = breaker.breaker().clone();
    let down = Arc::new(AtomicBool::new(true));
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::from_fn(|e: BoxError| {
            if is_circuit_open(&e) {
                "breaker open".to_string()
            } else {
                "upstream error".to_string()
            }
        }))
        .layer(breaker)
        .service(switchable(down.clone()));
    for _ in 0..4 {
        assert_eq!(
            svc.ready().await.unwrap().call(1).await.unwrap(),
            "upstream error"
        );
    }
    assert_eq!(handle.state(), State::Open, "the breaker saw the failures");
    assert_eq!(
        svc.ready().await.unwrap().call(1).await.unwrap(),
        "breaker open"
    );
}

#[tokio::test(start_paused = true)]
async fn inside_the_breaker_answered_failures_count_as_successes() {
    let breaker = breaker();
    let handle = breaker.breaker().clone();
    let mut svc = ServiceBuilder::new()
        .layer(breaker)
        .layer(FallbackLayer::value("default".to_string()))
        .service(failing());
    for _ in 0..10 {
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "default");
    }
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.snapshot().failed_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn only_rejections_get_the_fallback_with_is_circuit_open() {
    let breaker = breaker();
    let handle = breaker.breaker().clone();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::value("cached".to_string()).when(is_circuit_open))
        .layer(breaker)
        .service(failing());
    for _ in 0..4 {
        assert!(svc.ready().await.unwrap().call(1).await.is_err());
    }
    assert_eq!(handle.state(), State::Open);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "cached");
}

#[test]
fn is_circuit_open_walks_the_source_chain() {
    #[derive(Debug)]
    struct Wrapper(BoxError);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rejection: BoxError = rt.block_on(async {
        let layer = breaker();
        layer.breaker().force_open();
        let mut svc = ServiceBuilder::new().layer(layer).service(failing());
        svc.ready().await.unwrap().call(1).await.unwrap_err()
    });
    assert!(is_circuit_open(&rejection));
    let wrapped: BoxError = Box::new(Wrapper(rejection));
    assert!(is_circuit_open(&wrapped));
    let other: BoxError = "nope".into();
    assert!(!is_circuit_open(&other));
}

/// `LastKnownGood::http` remembers `2xx` answers only: an upstream that answers 503 before
/// it drops its connections leaves the good answer in place, and that is what the fallback
/// serves. (`new` stored every `Ok`, 5xx answers included, and served the 503.)
#[cfg(feature = "http")]
#[tokio::test]
async fn last_known_good_over_http_keeps_a_good_answer_through_a_5xx() {
    use std::sync::atomic::AtomicU16;
    let status = Arc::new(AtomicU16::new(200));
    let s = status.clone();
    let mut svc = tower::ServiceBuilder::new()
        .layer(FallbackLayer::new(LastKnownGood::http(
            |req: &http::Request<()>| req.uri().path().to_owned(),
        )))
        .service_fn(move |_: http::Request<()>| {
            let code = s.load(SeqCst);
            async move {
                if code == 0 {
                    return Err::<http::Response<String>, BoxError>("connection refused".into());
                }
                let body = if code == 200 { "3 left" } else { "unavailable" };
                Ok(http::Response::builder()
                    .status(code)
                    .body(body.to_owned())
                    .unwrap())
            }
        });
    let get = || http::Request::get("/stock/1").body(()).unwrap();
    let mut answer = async || svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(answer().await.status(), 200);
    status.store(503, SeqCst); // the upstream starts failing...
    assert_eq!(answer().await.status(), 503);
    status.store(0, SeqCst); // ...then goes away
    let served = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(
        (served.status().as_u16(), served.body().as_str()),
        (200, "3 left"),
        "the last known good answer"
    );
}

/// `LastKnownGood::http` serves only what any caller may see, and only to `GET`s: an
/// answer that set a cookie, was marked private or not to be stored, or varies on
/// request fields the key does not cover is never served to another caller; a failed
/// `POST` or `HEAD` fails rather than be told of the last `GET`'s success, and a `POST`'s
/// answer is never served to a `GET`. (Every 2xx answer was kept, whatever its method or
/// headers: user B got user A's page and session cookie, and a failed `POST /orders`
/// was answered `200`.)
#[cfg(feature = "http")]
#[tokio::test]
async fn last_known_good_over_http_never_serves_one_callers_answer_to_another() {
    use std::sync::Mutex;
    // The upstream's next answer's extra header, or `None`: it fails.
    let next: Arc<Mutex<Option<(&'static str, &'static str)>>> = Arc::new(Mutex::new(None));
    let n = next.clone();
    let mut svc = tower::ServiceBuilder::new()
        .layer(FallbackLayer::new(LastKnownGood::http(
            |req: &http::Request<()>| req.uri().path().to_owned(),
        )))
        .service_fn(move |req: http::Request<()>| {
            let answer = *n.lock().unwrap();
            async move {
                let Some((name, value)) = answer else {
                    return Err::<_, BoxError>("connection refused".into());
                };
                let mut response = http::Response::builder().status(200);
                if !name.is_empty() {
                    response = response.header(name, value);
                }
                Ok(response
                    .body(format!("{} {}", req.method(), req.uri().path()))
                    .unwrap())
            }
        });
    let mut call = async |method: http::Method, path: &str, answer| {
        *next.lock().unwrap() = answer;
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        svc.ready().await.unwrap().call(request).await
    };
    use http::Method;
    for (i, (name, value)) in [
        ("set-cookie", "session=A"),
        ("cache-control", "private"),
        ("cache-control", "max-age=60, No-Store"),
        ("cache-control", "no-cache=\"set-cookie\""),
        ("vary", "Accept-Encoding"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/account/{i}");
        call(Method::GET, &path, Some((name, value))).await.unwrap();
        assert!(
            call(Method::GET, &path, None).await.is_err(),
            "an answer with {name}: {value} was served to another caller"
        );
    }
    // A shareable GET answer is kept, and served to GETs only.
    call(Method::GET, "/orders", Some(("", ""))).await.unwrap();
    assert!(call(Method::POST, "/orders", None).await.is_err(), "POST");
    assert!(call(Method::HEAD, "/orders", None).await.is_err(), "HEAD");
    assert_eq!(
        call(Method::GET, "/orders", None).await.unwrap().body(),
        "GET /orders"
    );
    // A POST's answer is never kept.
    call(Method::POST, "/cart", Some(("", ""))).await.unwrap();
    assert!(
        call(Method::GET, "/cart", None).await.is_err(),
        "a POST's answer"
    );
}

/// `LastKnownGood::http` bounds the bytes it keeps, not only the keys: an upstream's
/// large answers under request-chosen paths (a crawler walking a catalogue of 1 MiB
/// pages) used to be kept up to 10 000 of them, 10 GiB. By default it keeps 64 MiB of
/// answers (header fields and bodies), evicting the keys stored longest ago; an answer
/// over the bound alone is not kept.
#[cfg(feature = "http")]
#[tokio::test]
async fn last_known_good_over_http_bounds_the_bytes_it_keeps() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use seawall::fallback::DEFAULT_MAX_BYTES;
    let page = Bytes::from(vec![b'x'; 1 << 20]);
    let down = Arc::new(AtomicBool::new(false));
    let cache = LastKnownGood::http(|req: &http::Request<()>| req.uri().path().to_owned());
    let (d, p) = (down.clone(), page.clone());
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(cache.clone()))
        .service_fn(move |req: http::Request<()>| {
            let (down, page) = (d.load(SeqCst), p.clone());
            async move {
                if down {
                    return Err::<http::Response<Full<Bytes>>, BoxError>("refused".into());
                }
                // The last page is one byte over the whole bound.
                let body = if req.uri().path() == "/huge" {
                    Bytes::from(vec![b'x'; DEFAULT_MAX_BYTES + 1])
                } else {
                    page
                };
                Ok(http::Response::builder()
                    .header("content-type", "text/html")
                    .body(Full::new(body))
                    .unwrap())
            }
        });
    let mut get = async |path: String| {
        let request = http::Request::get(path).body(()).unwrap();
        svc.ready().await.unwrap().call(request).await
    };
    for i in 0..200 {
        get(format!("/page/{i}")).await.unwrap();
        assert!(
            cache.bytes() <= DEFAULT_MAX_BYTES,
            "{} bytes",
            cache.bytes()
        );
    }
    assert_eq!(cache.len(), 63, "64 MiB of 1 MiB pages and their fields");
    get("/huge".to_owned()).await.unwrap();
    assert_eq!(
        cache.len(),
        63,
        "an answer over the bound alone is not kept"
    );
    down.store(true, SeqCst);
    // The pages stored last are served; those stored first were evicted.
    let served = get("/page/199".to_owned()).await.unwrap().into_body();
    assert_eq!(served.collect().await.unwrap().to_bytes(), page);
    assert!(get("/page/0".to_owned()).await.is_err());
    assert!(get("/huge".to_owned()).await.is_err());
}

/// `weigh` and `max_bytes` bound any response type's bytes.
#[tokio::test]
async fn last_known_good_weighs_answers_as_told() {
    let cache = LastKnownGood::new(|id: &u32| *id)
        .weigh(|answer: &String| answer.len())
        .max_bytes(10);
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(cache.clone()))
        .service_fn(|id: u32| async move { Ok::<_, BoxError>("x".repeat(id as usize % 100)) });
    for id in [4, 4, 3, 2, 5] {
        svc.ready().await.unwrap().call(id).await.unwrap();
    }
    // 4 (stored again, counted once), 3, 2, then 5: 4, stored longest ago, evicted to
    // make room for it.
    assert_eq!((cache.len(), cache.bytes()), (3, 10));
    svc.ready().await.unwrap().call(111).await.unwrap();
    assert_eq!(cache.len(), 3, "11 bytes alone: not kept");
}

/// `keep_if` for any response type: answers it refuses pass to the caller and leave the
/// remembered one in place.
#[tokio::test]
async fn last_known_good_remembers_only_what_keep_if_accepts() {
    let answer = Arc::new(std::sync::Mutex::new(Ok::<&str, &str>("full")));
    let a = answer.clone();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(
            LastKnownGood::new(|id: &u32| *id).keep_if(|r: &String| r != "partial"),
        ))
        .service_fn(move |_: u32| {
            let now = *a.lock().unwrap();
            async move { now.map(str::to_owned).map_err(BoxError::from) }
        });
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "full");
    *answer.lock().unwrap() = Ok("partial");
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "partial");
    *answer.lock().unwrap() = Err("down");
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "full");
}

/// A `LastKnownGood::http` cache keyed by path over an upstream that answers each `GET`
/// with its `Authorization` and `Range` echoed in the body (a `206` for a range), or fails
/// while `down` is set: the service and its switch.
#[cfg(feature = "http")]
fn echoing_cache() -> (
    impl Service<http::Request<()>, Response = http::Response<String>, Error = BoxError>,
    Arc<AtomicBool>,
) {
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(LastKnownGood::http(
            |req: &http::Request<()>| req.uri().path().to_owned(),
        )))
        .service_fn(move |req: http::Request<()>| {
            let down = d.load(SeqCst);
            async move {
                if down {
                    return Err::<http::Response<String>, BoxError>("connection refused".into());
                }
                let header = |name| {
                    req.headers()
                        .get(name)
                        .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
                };
                let response = match header(http::header::RANGE) {
                    Some(_) => http::Response::builder()
                        .status(206)
                        .header("content-range", "bytes 0-9/1000")
                        .body("0123456789".to_owned()),
                    None => http::Response::builder().status(200).body(format!(
                        "answer for {}",
                        header(http::header::AUTHORIZATION).unwrap_or_default()
                    )),
                };
                Ok(response.unwrap())
            }
        });
    (svc, down)
}

/// RFC 9111 §3.5: a shared cache must not serve an answer to a request that carried
/// `Authorization` to anyone else (unless the answer says `public`, `s-maxage` or
/// `must-revalidate`), and `LastKnownGood::http` is documented as "a cache of `GET`
/// answers that is safe to serve to any caller asking for the same key". An API's
/// `GET /me` answer is rarely marked `private` or `Vary: Authorization`: Alice's answer
/// must not be served to Bob when the upstream fails.
#[cfg(feature = "http")]
#[tokio::test]
async fn last_known_good_over_http_never_serves_an_authorized_answer_to_another_caller() {
    let (mut svc, down) = echoing_cache();
    let me = |token: &str| {
        http::Request::get("/me")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
    };
    let alice = svc.ready().await.unwrap().call(me("alice")).await.unwrap();
    assert_eq!(alice.body(), "answer for Bearer alice");
    down.store(true, SeqCst);
    let bob = svc.ready().await.unwrap().call(me("bob")).await;
    assert!(
        bob.is_err(),
        "Bob was served {:?}",
        bob.map(|r| r.into_body())
    );
}

/// A `206 Partial Content` answers the `Range` of one request (RFC 9110 §15.3.7); a cache
/// must not serve it as the whole representation to a request without that range (RFC
/// 9111 §3.4). Any client sending `Range: bytes=0-9` for a page replaced its last known
/// good answer with a 10-byte fragment, served as `206` to every caller of the page when
/// the upstream failed.
#[cfg(feature = "http")]
#[tokio::test]
async fn last_known_good_over_http_never_serves_a_partial_answer_as_the_whole() {
    let (mut svc, down) = echoing_cache();
    let page = || http::Request::get("/page").body(()).unwrap();
    let whole = svc.ready().await.unwrap().call(page()).await.unwrap();
    assert_eq!(whole.status(), 200);
    // One client asks for the first ten bytes.
    let ranged = http::Request::get("/page")
        .header("range", "bytes=0-9")
        .body(())
        .unwrap();
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(ranged)
            .await
            .unwrap()
            .status(),
        206
    );
    down.store(true, SeqCst);
    let served = svc.ready().await.unwrap().call(page()).await.unwrap();
    assert_eq!(
        (served.status().as_u16(), served.body().as_str()),
        (200, "answer for "),
        "a plain GET was served another request's range"
    );
}

/// What the rule on requests with credentials leaves: an answer marked shared
/// (`Cache-Control: public`) is kept and served to the next caller; a key that covers the
/// caller, with `keep_if`, keeps each caller's own answer for that caller alone.
#[cfg(feature = "http")]
#[tokio::test]
async fn last_known_good_over_http_keeps_shared_or_per_caller_answers_to_requests_with_credentials()
{
    let down = Arc::new(AtomicBool::new(false));
    let upstream = |down: Arc<AtomicBool>| {
        move |req: http::Request<()>| {
            let down = down.load(SeqCst);
            async move {
                if down {
                    return Err::<http::Response<String>, BoxError>("connection refused".into());
                }
                let who = req.headers()["authorization"].to_str().unwrap().to_owned();
                let mut answer = http::Response::builder();
                if req.uri().path() == "/catalog" {
                    answer = answer.header("cache-control", "public, max-age=60");
                }
                Ok(answer
                    .body(format!("{} for {who}", req.uri().path()))
                    .unwrap())
            }
        }
    };
    let get = |path: &str, token: &str| {
        http::Request::get(path)
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
    };

    let mut shared = ServiceBuilder::new()
        .layer(FallbackLayer::new(LastKnownGood::http(
            |req: &http::Request<()>| req.uri().path().to_owned(),
        )))
        .service_fn(upstream(down.clone()));
    shared
        .ready()
        .await
        .unwrap()
        .call(get("/catalog", "alice"))
        .await
        .unwrap();
    down.store(true, SeqCst);
    let bob = shared
        .ready()
        .await
        .unwrap()
        .call(get("/catalog", "bob"))
        .await;
    assert_eq!(bob.unwrap().body(), "/catalog for Bearer alice");

    down.store(false, SeqCst);
    let mut per_caller = ServiceBuilder::new()
        .layer(FallbackLayer::new(
            LastKnownGood::http(|req: &http::Request<()>| {
                (
                    req.uri().path().to_owned(),
                    req.headers().get("authorization").cloned(),
                )
            })
            .keep_if(|answer: &http::Response<String>| answer.status().is_success()),
        ))
        .service_fn(upstream(down.clone()));
    per_caller
        .ready()
        .await
        .unwrap()
        .call(get("/me", "alice"))
        .await
        .unwrap();
    down.store(true, SeqCst);
    let alice = per_caller
        .ready()
        .await
        .unwrap()
        .call(get("/me", "alice"))
        .await;
    assert_eq!(alice.unwrap().body(), "/me for Bearer alice");
    let bob = per_caller
        .ready()
        .await
        .unwrap()
        .call(get("/me", "bob"))
        .await;
    assert!(
        bob.is_err(),
        "Bob was served {:?}",
        bob.map(|r| r.into_body())
    );
}

/// `max_entries(n)`: "Keeps at most `n` keys (at least 1)". `usize::MAX` (no bound on the
/// number of keys, with a `max_bytes` bounding their size instead) made every store
/// compute `2 * max_entries`, which overflows: a panic on the first good answer in a
/// build with overflow checks (debug, tests), the service's call panicking with it.
#[tokio::test]
async fn last_known_good_with_unbounded_max_entries_does_not_panic() {
    let cache = LastKnownGood::new(|id: &u32| *id)
        .max_entries(usize::MAX)
        .weigh(|s: &String| s.len())
        .max_bytes(1 << 20);
    let down = Arc::new(AtomicBool::new(false));
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(cache.clone()))
        .service(switchable(down.clone()));
    // Panicked here: "attempt to multiply with overflow".
    svc.ready().await.unwrap().call(7).await.unwrap();
    assert_eq!(cache.len(), 1);
    down.store(true, SeqCst);
    assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), "item-7");
}

/// A key whose live copies are counted (by the `Arc`'s strong count); equal and hashed
/// by its id alone.
#[derive(Clone)]
struct CountedKey(u32, #[allow(dead_code)] Arc<()>);

impl PartialEq for CountedKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for CountedKey {}

impl std::hash::Hash for CountedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// "Memory is bounded: ... so request-chosen keys cannot grow it without bound; with a
/// weigher, at most `max_bytes` of answers too", and `max_entries(usize::MAX)` is the
/// "no bound on the number of keys, `max_bytes` instead" the overflow fix made work. But
/// every store of a key leaves its earlier place in the eviction queue stale, and the
/// queue is compacted only past `2 * max_entries` entries: never, at `usize::MAX`. A
/// client asking for the same page again and again grows the cache by a key a request,
/// for ever, while it holds one answer.
#[tokio::test]
async fn last_known_good_repeated_key_does_not_grow_without_bound() {
    let cache = LastKnownGood::new(|k: &CountedKey| k.clone())
        .max_entries(usize::MAX)
        .weigh(|s: &String| s.len())
        .max_bytes(1 << 20);
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(cache.clone()))
        .service(tower::service_fn(|k: CountedKey| async move {
            Ok::<_, BoxError>(format!("item-{}", k.0))
        }));
    let marker = Arc::new(());
    for _ in 0..10_000 {
        let request = CountedKey(7, marker.clone());
        svc.ready().await.unwrap().call(request).await.unwrap();
    }
    assert_eq!(cache.len(), 1);
    // The marker itself, the one key in the map, and at most a few stale copies.
    let copies = Arc::strong_count(&marker) - 1;
    assert!(
        copies <= 64,
        "one answer kept, but {copies} copies of its key held after 10 000 stores"
    );
}
