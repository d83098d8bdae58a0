//! The client-side layer: honour an upstream's `429` / `503` with `Retry-After`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::parse;
use crate::BoxError;

/// The longest hold a `Retry-After` can impose unless configured otherwise (one hour):
/// an upstream's typo must not silence a client for days.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(3600);

/// A call not made because the upstream asked the client to hold off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldingOff {
    retry_after: Duration,
}

impl HoldingOff {
    /// How long until the upstream's hold ends.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for HoldingOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upstream asked to retry after {:?}; call not made",
            self.retry_after
        )
    }
}

impl std::error::Error for HoldingOff {}

/// When the hold ends, shared by every clone.
#[derive(Debug)]
struct Hold {
    origin: Instant,
    /// Nanoseconds after `origin` (plus one) when calls may resume; zero: no hold.
    until: AtomicU64,
}

impl Hold {
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin)
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64
    }

    /// The remaining hold, if any; clears an expired one. No clock read while none is set.
    #[inline]
    fn remaining(&self) -> Option<Duration> {
        let until = self.until.load(Relaxed);
        if until == 0 {
            return None;
        }
        let now = self.nanos(Instant::now()) + 1;
        if now >= until {
            let _ = self.until.compare_exchange(until, 0, Relaxed, Relaxed);
            return None;
        }
        Some(Duration::from_nanos(until - now))
    }

    /// Extends the hold to `delay` from now (a later hold wins).
    fn hold_for(&self, delay: Duration) {
        let now = Instant::now();
        let end = now
            .checked_add(delay)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
        let until = self.nanos(end) + 1;
        self.until.fetch_max(until, Relaxed);
    }
}

/// Honours an upstream's `429 Too Many Requests` or `503 Service Unavailable` carrying
/// `Retry-After` (seconds or an HTTP date): until the time given, further calls through
/// this layer (and every clone of its services) are held off, so the client backs off as
/// the server asked instead of hammering it.
///
/// By default a held-off call fails at once with [`HoldingOff`] (without reaching the
/// upstream); [`wait_up_to`](Self::wait_up_to) makes `poll_ready` wait out holds up to a
/// limit instead. Use one layer per upstream: the hold is that upstream's. Holds are
/// capped at [`DEFAULT_MAX_HOLD`] (see [`max_hold`](Self::max_hold)).
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::http::RetryAfterLayer;
/// use tower::ServiceBuilder;
///
/// let client = ServiceBuilder::new()
///     .layer(RetryAfterLayer::new().max_hold(Duration::from_secs(120)))
///     .service_fn(|_req: http::Request<()>| async {
///         Ok::<_, seawall::BoxError>(http::Response::new(()))
///     });
/// # let _ = client;
/// ```
#[derive(Debug, Clone)]
pub struct RetryAfterLayer {
    hold: Arc<Hold>,
    max_hold: Duration,
    max_wait: Option<Duration>,
}

impl Default for RetryAfterLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryAfterLayer {
    /// A layer with no hold yet, failing held-off calls at once.
    pub fn new() -> Self {
        Self {
            hold: Arc::new(Hold {
                origin: Instant::now(),
                until: AtomicU64::new(0),
            }),
            max_hold: DEFAULT_MAX_HOLD,
            max_wait: None,
        }
    }

    /// Caps the hold any single `Retry-After` can impose.
    #[must_use]
    pub fn max_hold(mut self, max: Duration) -> Self {
        self.max_hold = max;
        self
    }

    /// Waits in `poll_ready` for a hold of at most `max_wait` to end, instead of failing.
    #[must_use]
    pub fn wait_up_to(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// The hold still to run, if any.
    pub fn holding_off_for(&self) -> Option<Duration> {
        self.hold.remaining()
    }
}

impl<S> Layer<S> for RetryAfterLayer {
    type Service = RetryAfter<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryAfter {
            inner,
            layer: self.clone(),
            sleep: None,
        }
    }
}

/// The service of [`RetryAfterLayer`].
pub struct RetryAfter<S> {
    inner: S,
    layer: RetryAfterLayer,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S: Clone> Clone for RetryAfter<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
            sleep: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RetryAfter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfter")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

/// The delay a response asks for, if it is a 429 or 503 with a readable `Retry-After`.
fn requested_delay<B>(response: &Response<B>) -> Option<Duration> {
    if response.status() != StatusCode::TOO_MANY_REQUESTS
        && response.status() != StatusCode::SERVICE_UNAVAILABLE
    {
        return None;
    }
    let value = response
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    if let Some(secs) = parse::retry_after_seconds(value) {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RetryAfter<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Some(max_wait) = self.layer.max_wait {
            // Wait out holds within `max_wait` (a hold extended meanwhile is waited out
            // too, if it still fits); a longer one is left for `call` to refuse. Looked at
            // by every `poll_ready`, one after a ready answer too (a ready cache polls
            // again before each use).
            let mut waited = false;
            while !waited {
                match self.layer.hold.remaining() {
                    Some(left) if left <= max_wait => {
                        let deadline = Instant::now() + left;
                        let sleep = self
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if sleep.deadline() != deadline {
                            sleep.as_mut().reset(deadline);
                        }
                        ready!(sleep.as_mut().poll(cx));
                    }
                    _ => waited = true,
                }
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        if let Some(retry_after) = self.layer.hold.remaining() {
            return ResponseFuture {
                kind: Kind::Held {
                    error: Some(HoldingOff { retry_after }),
                },
            };
        }
        ResponseFuture {
            kind: Kind::Called {
                future: self.inner.call(request),
                hold: Some((self.layer.hold.clone(), self.layer.max_hold)),
            },
        }
    }
}

pin_project! {
    /// Response future of [`RetryAfter`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F, hold: Option<(Arc<Hold>, Duration)> },
        Held { error: Option<HoldingOff> },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { future, hold } => {
                let response = ready!(future.poll(cx)).map_err(Into::into)?;
                if let (Some(delay), Some((hold, max))) = (requested_delay(&response), hold.take())
                {
                    if !delay.is_zero() {
                        hold.hold_for(delay.min(max));
                    }
                }
                Poll::Ready(Ok(response))
            }
            KindProj::Held { error } => Poll::Ready(Err(Box::new(
                error
                    .take()
                    .expect("RetryAfter ResponseFuture polled after completion"),
            ))),
        }
    }
}
