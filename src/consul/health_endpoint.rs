//! An HTTP health endpoint for Consul's HTTP checks, driven by the application.

use std::convert::Infallible;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use parking_lot::RwLock;
use tower::Service;

type Checker = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// Set by the application: `Some(reason)` while unhealthy.
    unhealthy: RwLock<Option<String>>,
    /// Set by the application: `Some(reason)` while degraded.
    warning: RwLock<Option<String>>,
    checkers: RwLock<Vec<(String, Checker)>>,
}

/// What the endpoint answers: the state the application set, and its checkers.
///
/// Clones share the state. Unhealthy wins over warning, which wins over healthy; a
/// checker returning `false` makes the endpoint unhealthy, with its name as the reason.
///
/// ```
/// use seawall::consul::{HealthHandle, HealthReport};
///
/// let health = HealthHandle::new();
/// assert_eq!(health.report(), HealthReport::Healthy);
/// health.add_check("database", || true);
/// health.set_unhealthy("draining");
/// assert_eq!(health.report(), HealthReport::Unhealthy("draining".into()));
/// health.set_healthy();
/// assert!(health.report().is_healthy());
/// ```
#[derive(Clone, Default)]
pub struct HealthHandle {
    inner: Arc<Inner>,
}

/// The endpoint's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthReport {
    /// `200 ok`: Consul's check passes.
    Healthy,
    /// `429` with the reason: Consul's check warns (the instance stays in rotation for
    /// queries that accept warning instances, weighted with `Weights.Warning`).
    Warning(String),
    /// `503` with the reason: Consul's check is critical.
    Unhealthy(String),
}

impl HealthReport {
    /// Whether the check passes.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy)
    }

    /// The status the endpoint answers with.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::Healthy => StatusCode::OK,
            Self::Warning(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unhealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl HealthHandle {
    /// A healthy handle without checkers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the service healthy again (clears unhealthy and warning; checkers still
    /// apply).
    pub fn set_healthy(&self) {
        *self.inner.unhealthy.write() = None;
        *self.inner.warning.write() = None;
    }

    /// Marks the service unhealthy (`503`), for `reason`.
    pub fn set_unhealthy(&self, reason: impl Into<String>) {
        *self.inner.unhealthy.write() = Some(reason.into());
    }

    /// Marks the service degraded (`429`, a warning for Consul), for `reason`.
    pub fn set_warning(&self, reason: impl Into<String>) {
        *self.inner.warning.write() = Some(reason.into());
    }

    /// Adds a checker, asked on every probe: `false` makes the endpoint unhealthy with
    /// `name` as the reason. For example `move || breaker.state() != State::Open`.
    /// Checkers run on the request path: keep them cheap and non-blocking.
    pub fn add_check<F>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> bool + Send + Sync + 'static,
    {
        self.inner
            .checkers
            .write()
            .push((name.into(), Arc::new(check)));
    }

    /// The current verdict.
    pub fn report(&self) -> HealthReport {
        if let Some(reason) = &*self.inner.unhealthy.read() {
            return HealthReport::Unhealthy(reason.clone());
        }
        // Run the checkers outside the lock, so a checker may use this handle.
        let checkers: Vec<(String, Checker)> = self.inner.checkers.read().clone();
        let failed: Vec<&str> = checkers
            .iter()
            .filter(|(_, check)| !check())
            .map(|(name, _)| name.as_str())
            .collect();
        if !failed.is_empty() {
            return HealthReport::Unhealthy(format!("failing: {}", failed.join(", ")));
        }
        match &*self.inner.warning.read() {
            Some(reason) => HealthReport::Warning(reason.clone()),
            None => HealthReport::Healthy,
        }
    }

    /// An endpoint answering from this handle.
    pub fn endpoint(&self) -> HealthEndpoint {
        HealthEndpoint::new(self.clone())
    }
}

impl fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthHandle")
            .field("unhealthy", &*self.inner.unhealthy.read())
            .field("warning", &*self.inner.warning.read())
            .field("checkers", &self.inner.checkers.read().len())
            .finish()
    }
}

/// A tower [`Service`] answering health probes from a [`HealthHandle`]: `200 ok`,
/// `429 warning: <reason>` or `503 unhealthy: <reason>` (plain text), whatever the
/// request. Point a Consul [`Check::http`](super::Check::http) at the route it serves.
/// Never fails and is always ready.
///
/// ```
/// use http::{Request, StatusCode};
/// use seawall::consul::HealthHandle;
/// use tower::{Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let health = HealthHandle::new();
/// let mut endpoint = health.endpoint();
/// health.set_unhealthy("draining");
/// let ready = ServiceExt::<Request<()>>::ready(&mut endpoint).await.unwrap();
/// let response = ready.call(Request::new(())).await.unwrap();
/// assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HealthEndpoint {
    handle: HealthHandle,
}

impl HealthEndpoint {
    /// An endpoint answering from `handle`.
    pub fn new(handle: HealthHandle) -> Self {
        Self { handle }
    }

    /// The handle it answers from.
    pub fn handle(&self) -> &HealthHandle {
        &self.handle
    }
}

impl<B> Service<Request<B>> for HealthEndpoint {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let report = self.handle.report();
        let body = match &report {
            HealthReport::Healthy => "ok".to_owned(),
            HealthReport::Warning(reason) => format!("warning: {reason}"),
            HealthReport::Unhealthy(reason) => format!("unhealthy: {reason}"),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = report.status_code();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt;

    async fn probe(endpoint: &HealthEndpoint) -> (StatusCode, String) {
        let response = endpoint.clone().oneshot(Request::new(())).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn answers_from_the_handle_and_checkers() {
        let health = HealthHandle::new();
        let endpoint = health.endpoint();
        assert_eq!(probe(&endpoint).await, (StatusCode::OK, "ok".into()));

        let breaker_open = Arc::new(AtomicBool::new(false));
        let flag = breaker_open.clone();
        health.add_check("breaker", move || !flag.load(Ordering::Relaxed));
        health.set_warning("slow disk");
        assert_eq!(
            probe(&endpoint).await,
            (StatusCode::TOO_MANY_REQUESTS, "warning: slow disk".into())
        );
        breaker_open.store(true, Ordering::Relaxed);
        assert_eq!(
            probe(&endpoint).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy: failing: breaker".into()
            )
        );
        health.set_unhealthy("draining");
        assert_eq!(
            probe(&endpoint).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy: draining".into()
            )
        );
        breaker_open.store(false, Ordering::Relaxed);
        health.set_healthy();
        assert_eq!(probe(&endpoint).await, (StatusCode::OK, "ok".into()));
    }

    #[test]
    fn a_checker_may_use_the_handle() {
        let health = HealthHandle::new();
        // The checker writes to the handle while the report runs: no deadlock.
        let inner = health.clone();
        health.add_check("reads", move || {
            inner.set_warning("seen");
            true
        });
        assert_eq!(health.report(), HealthReport::Warning("seen".into()));
    }
}
