//! The server-side 429 layer over the Redis-backed limiter (features `http` and `redis`).

use std::fmt;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::layer::{HeaderSettings, OnMissingKey, header_settings_methods};
use crate::problem::ProblemBody;
use crate::rate_limit::redis::{RedisLimitError, RedisRateLimiter, SHARED_KEY};
use crate::rate_limit::{KeyExtractor, KeyOf, key_of};

/// [`HttpRateLimitLayer`](super::HttpRateLimitLayer) for a fleet: each request's key (a
/// client IP, an API key, a route…) is checked against a [`RedisRateLimiter`] shared by
/// every replica. A refused request is answered here with `429`, `Retry-After` and the
/// same `RateLimit-Policy` / `RateLimit` (and optionally Kong-style) headers, marked
/// [`Refused`](super::Refused) in its extensions; admitted responses carry the headers
/// too. When Redis cannot answer and the limiter fails closed, the answer is `503` with
/// `Retry-After: 1`; with [`FailOpen`](crate::rate_limit::redis::FailurePolicy::FailOpen)
/// the local share decides and the headers describe it. A request without a key follows
/// the layer's [`OnMissingKey`] (`500` and an error log by default).
///
/// The check is a round trip before the inner service is called, so the call holds a
/// ready clone of the inner service (tower's usual pattern) and its future is boxed.
///
/// ```no_run
/// use seawall::rate_limit::http::{ClientIp, HttpRedisRateLimitLayer};
/// use seawall::rate_limit::redis::RedisRateLimiter;
/// use seawall::rate_limit::{Quota, Rate};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::BoxError> {
/// let limiter = RedisRateLimiter::builder("redis://127.0.0.1:6379", Quota::new(Rate::per_minute(600), 60)?)
///     .prefix("per-ip")
///     .build()?;
/// let svc = ServiceBuilder::new()
///     .layer(HttpRedisRateLimitLayer::new(limiter, ClientIp::peer()).name("per-ip"))
///     .service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
///     });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpRedisRateLimitLayer<E> {
    limiter: RedisRateLimiter,
    extractor: E,
    settings: HeaderSettings,
    on_missing_key: OnMissingKey,
}

impl<E> HttpRedisRateLimitLayer<E> {
    /// Limits each request under the key `extractor` takes from it.
    pub fn new(limiter: RedisRateLimiter, extractor: E) -> Self {
        Self {
            limiter,
            extractor,
            settings: HeaderSettings::default(),
            on_missing_key: OnMissingKey::default(),
        }
    }

    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]: `500` with a problem+json body, and an error log).
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.on_missing_key = policy;
        self
    }

    header_settings_methods!();
}

impl<E> fmt::Debug for HttpRedisRateLimitLayer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRedisRateLimitLayer")
            .field("limiter", &self.limiter)
            .field("settings", &self.settings)
            .field("on_missing_key", &self.on_missing_key)
            .finish_non_exhaustive()
    }
}

impl<S, E: Clone> Layer<S> for HttpRedisRateLimitLayer<E> {
    type Service = HttpRedisRateLimit<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpRedisRateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`HttpRedisRateLimitLayer`].
#[derive(Clone)]
pub struct HttpRedisRateLimit<S, E> {
    inner: S,
    layer: HttpRedisRateLimitLayer<E>,
}

impl<S, E> HttpRedisRateLimit<S, E> {
    crate::util::inner_service_accessors!();

    /// The key extractor, to change per request on a clone of the service (the gateway
    /// sets the client's address there, rather than in the request's extensions).
    pub fn extractor_mut(&mut self) -> &mut E {
        &mut self.layer.extractor
    }

    /// The limiter.
    pub fn limiter(&self) -> &RedisRateLimiter {
        &self.layer.limiter
    }
}

impl<S: fmt::Debug, E> fmt::Debug for HttpRedisRateLimit<S, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRedisRateLimit")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, E, ReqB, ResB> Service<Request<ReqB>> for HttpRedisRateLimit<S, E>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    E: KeyExtractor<Request<ReqB>>,
    E::Key: fmt::Display,
    ReqB: Send + 'static,
    ResB: ProblemBody + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ResB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The ready service goes into the future; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = &self.layer;
        let key = match key_of(
            &layer.extractor,
            &request,
            layer.on_missing_key,
            "http redis",
        ) {
            KeyOf::Key(key) => key.to_string(),
            KeyOf::Shared => SHARED_KEY.to_owned(),
            KeyOf::Unlimited => return Box::pin(inner.call(request)),
            KeyOf::Missing => {
                let response = layer.settings.missing_key();
                return Box::pin(async move { Ok(response) });
            }
        };
        let (limiter, settings) = (layer.limiter.clone(), layer.settings.clone());
        Box::pin(async move {
            match limiter.acquire(&key, 1).await {
                Ok((admitted, _source)) => {
                    let headers = settings.admitted(admitted);
                    let mut response = inner.call(request).await?;
                    if let Some(headers) = headers {
                        headers.apply(response.headers_mut());
                    }
                    Ok(response)
                }
                Err(RedisLimitError::Limited(refused)) => Ok(settings.refusal(refused)),
                Err(RedisLimitError::Unavailable(_)) => {
                    let mut response = crate::problem::problem::<ResB>(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the rate limiter's store is unavailable",
                    );
                    response
                        .headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    Ok(response)
                }
            }
        })
    }
}
