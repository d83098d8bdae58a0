//! The server-side layer: answers refused requests itself with 429 and rate-limit headers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::clock::Clock;
use crate::problem::ProblemBody;
use crate::rate_limit::{
    Admitted, Decision, KeyedRateLimiter, Limit, RateLimited, RateLimiter, Refund,
};
pub use crate::rate_limit::{OnMissingKey, PerKey};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-09).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-09).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// Kong-style `X-RateLimit-Limit`.
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// Kong-style `X-RateLimit-Remaining`.
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

/// Rate limiting for HTTP servers: a refused request is answered here with
/// `429 Too Many Requests`, `Retry-After`, and the `RateLimit-Policy` / `RateLimit`
/// headers of draft-ietf-httpapi-ratelimit-headers-09 (`"name";q=limit;w=window` and
/// `"name";r=remaining;t=seconds-until-full`); admitted responses carry the same two
/// headers, and, if asked, Kong-style `X-RateLimit-Limit` / `X-RateLimit-Remaining`.
///
/// `t` is the time until the bucket is full again, on admitted and refused responses
/// alike; on a 429, `Retry-After` says when the next request will be admitted.
///
/// Stacked layers (a global limit over a per-client one) each add their own, named,
/// entries to the header lists. A request is charged only when every layer admits it, as
/// nginx's `limit_req` zones do: the outer layer takes its token, and hands it back when
/// the response comes back marked [`Refused`] by a layer further in (for the instant in
/// between, the token is out of the bucket). So a client refused by its own per-client
/// limit does not drain the global one for everybody else. The outer layer's headers on
/// such a 429 describe its bucket as it was with the token taken. The inner service's
/// error type is kept: this layer adds no error. The 429 body is an RFC 9457
/// `application/problem+json` document (any [`ProblemBody`]), and the 429 carries
/// [`Refused`] in its extensions. A [`PerKey`] request without a key is answered per
/// [`OnMissingKey`]: `500` by default, never silently unlimited, marked
/// [`Undecided::MissingKey`].
///
/// Over the Redis-backed limiter (feature `redis`: `HttpRateLimitLayer::new(limiter)` for
/// one global bucket, `HttpRateLimitLayer::new(limiter.per_key(extractor))` per key; see
#[cfg_attr(
    feature = "redis",
    doc = "[`HttpRedisRateLimitLayer`](super::HttpRedisRateLimitLayer))"
)]
#[cfg_attr(not(feature = "redis"), doc = "`HttpRedisRateLimitLayer`)")]
/// the answers are the same,
/// after one round trip, and a `503` with `Retry-After: 1` when Redis cannot answer and
/// the limiter fails closed (marked [`Undecided::Unavailable`]). Its refusals are marked
/// [`Refused`] too, so local layers outside it refund; it does not refund itself (a refund
/// would be another round trip to Redis): put it innermost.
///
/// ```
/// use seawall::rate_limit::http::{ClientIp, HttpRateLimitLayer};
/// use seawall::rate_limit::{KeyedRateLimiter, Quota, Rate, RateLimiter};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), seawall::BoxError> {
/// let svc = ServiceBuilder::new()
///     .layer(HttpRateLimitLayer::global(RateLimiter::new(Quota::new(Rate::per_second(1000), 200)?))
///         .name("global"))
///     .layer(HttpRateLimitLayer::per_key(
///         KeyedRateLimiter::<std::net::IpAddr>::new(Quota::new(Rate::per_minute(60), 10)?),
///         ClientIp::trusting(["10.0.0.0/8"])?,
///     ).name("per-ip").legacy_headers(true))
///     .service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
///     });
/// # let _ = svc;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpRateLimitLayer<L> {
    pub(super) limit: L,
    settings: HeaderSettings,
}

impl<L> fmt::Debug for HttpRateLimitLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRateLimitLayer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<C: Clock> HttpRateLimitLayer<RateLimiter<C>> {
    /// One bucket for every request.
    pub fn global(limiter: RateLimiter<C>) -> Self {
        Self::new(limiter)
    }
}

impl<E, Key, C> HttpRateLimitLayer<PerKey<E, Key, C>> {
    /// A bucket per key taken by `extractor`; a request without a key is refused with
    /// `500` by default (see [`on_missing_key`](Self::on_missing_key)).
    pub fn per_key(limiter: KeyedRateLimiter<Key, C>, extractor: E) -> Self {
        Self::new(PerKey::new(limiter, extractor))
    }

    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]: `500` with a problem+json body, and an error log).
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.limit.set_on_missing_key(policy);
        self
    }
}

impl<L> HttpRateLimitLayer<L> {
    /// A layer over any [`Limit`] (each request costs one token).
    pub fn new(limit: L) -> Self {
        Self {
            limit,
            settings: HeaderSettings::default(),
        }
    }

    header_settings_methods!();
}

impl<S, L: Clone> Layer<S> for HttpRateLimitLayer<L> {
    type Service = HttpRateLimit<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpRateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`HttpRateLimitLayer`].
#[derive(Clone)]
pub struct HttpRateLimit<S, L> {
    inner: S,
    layer: HttpRateLimitLayer<L>,
}

impl<S, L> HttpRateLimit<S, L> {
    crate::util::inner_service_accessors!();

    /// The limit, mutably (to hand a clone per-request state, such as the peer's
    /// address, without putting it in the request's extensions).
    pub fn limit_mut(&mut self) -> &mut L {
        &mut self.layer.limit
    }
}

impl<S: fmt::Debug, L> fmt::Debug for HttpRateLimit<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRateLimit")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

/// What an [`HttpRateLimitLayer`] puts in its answers: the policy name, which headers, and
/// the 429's body, set with the layer's methods ([`name`](HttpRateLimitLayer::name),
/// [`legacy_headers`](HttpRateLimitLayer::legacy_headers),
/// [`hide_headers`](HttpRateLimitLayer::hide_headers),
/// [`refusal_body`](HttpRateLimitLayer::refusal_body)). Defined once, for every limit.
#[derive(Clone)]
pub struct HeaderSettings {
    pub(super) name: Arc<PolicyName>,
    pub(super) style: HeaderStyle,
    /// `None`: the RFC 9457 problem.
    pub(super) body: Option<Arc<RefusalBody>>,
}

impl Default for HeaderSettings {
    fn default() -> Self {
        Self {
            name: PolicyName::new("default"),
            style: HeaderStyle::default(),
            body: None,
        }
    }
}

impl fmt::Debug for HeaderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderSettings")
            .field("name", &self.name.as_str())
            .field("style", &self.style)
            .field("custom_body", &self.body.is_some())
            .finish()
    }
}

impl HeaderSettings {
    /// The headers of an admitted request (`None` when hidden).
    #[inline]
    pub(super) fn admitted(&self, admitted: Admitted) -> Option<Headers> {
        // Tested here as well, inline: hidden fields cost no call.
        if self.style.hidden {
            return None;
        }
        Headers::new(&self.name, self.style, &Ok(admitted))
    }

    /// The `429` of a refused request: its headers, [`Refused`], and the body (the
    /// problem, or the custom one).
    pub(super) fn refusal<B: ProblemBody>(&self, refused: RateLimited) -> Response<B> {
        let custom = self.body.as_ref().map(|body| body(&refused));
        let mut response = refusal(Headers::new(&self.name, self.style, &Err(refused)));
        retry_after(&refused, response.headers_mut());
        if let Some((content_type, bytes)) = custom {
            *response.body_mut() = B::from_bytes(bytes);
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, content_type);
        }
        response
    }

    /// The `500` (or, `client`, the `400`) of a request without the key its limit needs
    /// (logged).
    pub(super) fn missing_key<B: ProblemBody>(&self, client: bool) -> Response<B> {
        missing_key(&self.name, client)
    }

    /// What `decision` lets through: the admitted figures and the charge (`None` for a
    /// request the limit does not apply to), or why it does not, answered by
    /// [`refuse`](Self::refuse). Not the answer itself: a `Result` holding a whole
    /// response was built and read back field by field on the admitting path, loads that
    /// stalled on the narrower stores before them (`perf annotate`).
    #[inline]
    pub(crate) fn decide<Ch>(decision: Decision<Ch>) -> Result<Option<(Admitted, Ch)>, Refusal> {
        match decision {
            Decision::Admitted(admitted, charge) => Ok(Some((admitted, charge))),
            Decision::Unlimited => Ok(None),
            Decision::Refused(refused) => Err(Refusal::Limited(refused)),
            Decision::MissingKey => Err(Refusal::MissingKey { client: false }),
            Decision::KeyNotSent => Err(Refusal::MissingKey { client: true }),
            Decision::Unavailable(_) => Err(Refusal::Unavailable),
        }
    }

    /// This layer's answer to a request it does not let through: its `429`, `400`, `500`
    /// or `503`.
    #[cold]
    #[inline(never)]
    pub(crate) fn refuse<B: ProblemBody>(&self, refusal: Refusal) -> Response<B> {
        match refusal {
            Refusal::Limited(refused) => self.refusal(refused),
            Refusal::MissingKey { client } => self.missing_key(client),
            Refusal::Unavailable => unavailable(),
        }
    }

    /// [`refuse`](Self::refuse) for a [`Decision`] that is not an admission.
    #[cold]
    #[inline(never)]
    fn refuse_decision<Ch, B: ProblemBody>(&self, decision: Decision<Ch>) -> Response<B> {
        match Self::decide(decision) {
            Err(refusal) => self.refuse(refusal),
            Ok(_) => unreachable!("an admitted decision is answered by the inner service"),
        }
    }
}

/// Why a limit did not let a request through ([`HeaderSettings::decide`]).
pub(crate) enum Refusal {
    /// The limit is exhausted: a `429`, marked [`Refused`].
    Limited(RateLimited),
    /// The request lacks the key the limit needs: a `500`, or, `client` (the key is the
    /// client's to send), a `400`.
    MissingKey { client: bool },
    /// The limit's store did not answer and it fails closed: a `503`.
    Unavailable,
}

/// The header settings' builder methods, for a layer with a `settings: HeaderSettings`
/// field: written once, for every HTTP layer.
macro_rules! header_settings_methods {
    () => {
        /// The body of this layer's 429s, in place of the default RFC 9457
        /// `application/problem+json` document: `body(&refusal)` gives the content type
        /// and the bytes (as tower_governor's error handler does). The status,
        /// `Retry-After`, the rate-limit headers and [`Refused`](super::Refused) stay.
        ///
        /// ```
        /// use http::HeaderValue;
        /// use seawall::rate_limit::http::HttpRateLimitLayer;
        /// use seawall::rate_limit::{Quota, Rate, RateLimiter};
        ///
        /// # fn main() -> Result<(), seawall::BoxError> {
        /// let layer = HttpRateLimitLayer::global(RateLimiter::new(Quota::new(Rate::per_second(10), 10)?))
        ///     .refusal_body(|refused| {
        ///         let secs = refused.retry_after().unwrap_or_default().as_secs();
        ///         (HeaderValue::from_static("text/plain"), format!("slow down, {secs}s").into())
        ///     });
        /// # let _ = layer;
        /// # Ok(())
        /// # }
        /// ```
        #[must_use]
        pub fn refusal_body<F>(mut self, body: F) -> Self
        where
            F: Fn(&crate::rate_limit::RateLimited) -> (http::HeaderValue, bytes::Bytes)
                + Send
                + Sync
                + 'static,
        {
            self.settings.body = Some(std::sync::Arc::new(body));
            self
        }

        /// Names the policy in the `RateLimit-Policy` / `RateLimit` headers (default
        /// `default`).
        #[must_use]
        pub fn name(mut self, name: impl Into<std::sync::Arc<str>>) -> Self {
            self.settings.name = super::layer::PolicyName::new(&name.into());
            self
        }

        /// Also sends `X-RateLimit-Limit` and `X-RateLimit-Remaining`, as Kong does.
        #[must_use]
        pub fn legacy_headers(mut self, on: bool) -> Self {
            self.settings.style.legacy = on;
            self
        }

        /// Sends no rate-limit headers, so clients cannot read the limits (Kong's
        /// `hide_client_headers`): admitted responses get none, refused ones only
        /// `Retry-After`. Admitted requests then cost no header work at all.
        #[must_use]
        pub fn hide_headers(mut self, on: bool) -> Self {
            self.settings.style.hidden = on;
            self
        }
    };
}
pub(super) use header_settings_methods;

/// Rounds up to whole seconds, as `Retry-After` and `t=` want.
pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A policy window in whole seconds: rounded up, except for the rounding of the refill
/// interval itself. A 30/s bucket of 30 refills one token every 33 333 334 ns (rounded up
/// to the nanosecond; to the microsecond in Redis), so its window is 1.00000002 s: that is
/// one second, not two (a policy of `q=60;w=2` would misstate it). Up to a thousandth of a
/// second over a whole number of seconds is taken as that number.
fn policy_secs(window: Duration) -> u64 {
    let secs = window.as_secs();
    let over = window - Duration::from_secs(secs);
    let slack = Duration::from_secs(secs.max(1)) / 1000;
    if secs > 0 && over <= slack {
        secs
    } else {
        ceil_secs(window)
    }
}

/// A policy's name, made a valid sf-string once, and its `RateLimit-Policy` value for the
/// last quota seen (a limiter's quota rarely changes): admitted requests neither format
/// nor allocate it again.
pub(super) struct PolicyName {
    name: Box<str>,
    policy: std::sync::OnceLock<(u32, Duration, HeaderValue)>,
    /// This name's slot key among the thread's last state values (`state_cache`).
    id: u64,
    /// The slot key of its policy for a quota other than the first (`state_cache`).
    policy_id: u64,
}

impl PolicyName {
    pub(super) fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: sanitize(name).into(),
            policy: std::sync::OnceLock::new(),
            id: super::state_cache::new_id(),
            policy_id: super::state_cache::new_id(),
        })
    }

    pub(super) fn as_str(&self) -> &str {
        &self.name
    }

    /// `"name";r=remaining;t=reset`: the value this thread made last for the same
    /// figures, if it did (see `state_cache`).
    fn state(&self, remaining: u64, reset: u64) -> HeaderValue {
        super::state_cache::value(self.id, [remaining, reset, 0, 0], || {
            state_value(&self.name, remaining, reset)
        })
    }

    /// `"name";q=…;w=…` for this quota.
    ///
    /// The first quota's value is kept for every thread. A later quota (changed with
    /// `set_quota`, or another key's) is kept by each thread for as long as it stays the
    /// same, rather than formatted and allocated for every response.
    pub(super) fn policy(&self, limit: u32, window: Duration) -> HeaderValue {
        if let Some((l, w, value)) = self.policy.get() {
            if *l == limit && *w == window {
                return value.clone();
            }
            let [a, b] = super::state_cache::quota(limit, window);
            return super::state_cache::value(self.policy_id, [a, b, 0, 0], || {
                self.make_policy(limit, window)
            });
        }
        let value = self.make_policy(limit, window);
        let _ = self.policy.set((limit, window, value.clone()));
        value
    }

    /// `"name";q=…;w=…`, made.
    fn make_policy(&self, limit: u32, window: Duration) -> HeaderValue {
        // The policy in whole seconds: over `w`, the bucket admits its burst or what the
        // rate refills in `w`, whichever is more (a 1000/s bucket of 200 is q=1000;w=1).
        let w = policy_secs(window).max(1);
        let q = if window.is_zero() {
            u64::from(limit)
        } else {
            // Rounded down, never announcing more than the rate (100 a minute is q=1 a
            // second, not 2: a client keeping to 2 was refused), allowing only for the
            // intervals' rounding up to the nanosecond (150/s refills 149.99997 a second
            // and is announced as 150): the window as if each interval were a nanosecond
            // shorter.
            let window_ns = window.as_nanos();
            let exact_at_most = window_ns.saturating_sub(u128::from(limit)).max(1);
            let refilled = u128::from(limit) * u128::from(w) * 1_000_000_000 / exact_at_most;
            u64::try_from(refilled)
                .unwrap_or(u64::MAX)
                .max(u64::from(limit))
        };
        value(format!("\"{}\";q={q};w={w}", self.name))
    }
}

impl fmt::Debug for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.name, f)
    }
}

fn value(s: String) -> HeaderValue {
    // Built from a name sanitized at construction and digits: always valid; fall back to
    // a bare token rather than panic. Takes the string's buffer without copying it.
    HeaderValue::try_from(s).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Marks the responses a rate-limit layer answered itself (its `429`s), so that code
/// further out can tell them from an inner service's own `429`: look for it with
/// `response.extensions().get::<Refused>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// The `429` of a refused request: the decision's headers, [`Refused`] in the
/// extensions, an RFC 9457 `application/problem+json` body.
pub(super) fn refusal<B: ProblemBody>(headers: Option<Headers>) -> Response<B> {
    let mut response =
        crate::problem::problem_static(StatusCode::TOO_MANY_REQUESTS, crate::problem::RATE_LIMITED);
    if let Some(headers) = headers {
        headers.apply(response.headers_mut());
    }
    response.extensions_mut().insert(Refused);
    response
}

/// Marks the responses a rate-limit layer answered itself without a decision of its
/// limit: the `500` of a request without a key ([`OnMissingKey::Reject`]), the `400` of a
/// request without the key the client must send, and the `503`
/// of a limit that could not reach its store and fails closed (the Redis limiter). Code
/// further out can tell them from an inner service's own `500` or `503` (to answer a gRPC
/// caller in gRPC's form, as the gateway does, or to keep them out of an upstream's error
/// count): look for it with `response.extensions().get::<Undecided>()`. Not a
/// [`Refused`], but the layers outside hand their tokens back for a missing key too (the
/// request went no further; kept, a client leaving its key out of every request would
/// drain an outer global limit for everybody); not for a store that did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Undecided {
    /// The `500` of a request the layer could take no key from.
    MissingKey,
    /// The `400` of a request without the key the client must send
    /// ([`KeyExtractor::missing_key_is_clients`](crate::rate_limit::KeyExtractor::missing_key_is_clients)).
    KeyNotSent,
    /// The `503` of a limit whose store could not be reached (`Retry-After: 1`).
    Unavailable,
}

/// The `500` for a request without a key under [`OnMissingKey::Reject`], marked
/// [`Undecided::MissingKey`]; or, `client`, the `400` of a request without the key the
/// client must send, marked [`Undecided::KeyNotSent`].
pub(super) fn missing_key<B: ProblemBody>(name: &PolicyName, client: bool) -> Response<B> {
    crate::rate_limit::error::log_missing_key(name.as_str(), client);
    let (status, detail, mark) = if client {
        (
            StatusCode::BAD_REQUEST,
            "the request does not carry the key its rate limit is taken from",
            Undecided::KeyNotSent,
        )
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the rate limit key could not be taken from the request",
            Undecided::MissingKey,
        )
    };
    let mut response = crate::problem::problem(status, detail);
    response.extensions_mut().insert(mark);
    response
}

/// Adds the headers of a refusal by a limiter of unknown name (policy `default`):
/// `Retry-After`, `RateLimit-Policy`, `RateLimit`. For [`crate::problem::error_response`].
pub(crate) fn refusal_headers(refused: &RateLimited, headers: &mut http::HeaderMap) {
    static DEFAULT: std::sync::OnceLock<Arc<PolicyName>> = std::sync::OnceLock::new();
    let name = DEFAULT.get_or_init(|| PolicyName::new("default"));
    if let Some(h) = Headers::new(name, HeaderStyle::default(), &Err(*refused)) {
        h.apply(headers);
    }
    retry_after(refused, headers);
}

/// `Retry-After` for `refused`, in whole seconds rounded up; none for a request that can
/// never be admitted (it costs more than the bucket holds). Sent even with the other
/// fields hidden.
fn retry_after(refused: &RateLimited, headers: &mut http::HeaderMap) {
    if let Some(wait) = refused.retry_after() {
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(ceil_secs(wait)),
        );
    }
}

/// The body of a layer's own 429: a content type and the bytes, built per refusal.
pub type RefusalBody = dyn Fn(&RateLimited) -> (HeaderValue, bytes::Bytes) + Send + Sync;

/// `"name";r=remaining;t=reset`, written into the thread's header chunk: no allocation
/// of its own (see `header_arena`).
fn state_value(name: &str, remaining: u64, reset: u64) -> HeaderValue {
    let mut digits = [0u8; 20];
    let mut digits_t = [0u8; 20];
    let r = crate::util::decimal(remaining, &mut digits);
    let t = crate::util::decimal(reset, &mut digits_t);
    let parts: [&[u8]; 6] = [b"\"", name.as_bytes(), b"\";r=", r, b";t=", t];
    // Built from a sanitized name and digits: always valid.
    crate::header_arena::value(&parts).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Which rate-limit headers a layer sends.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct HeaderStyle {
    /// Kong's `X-RateLimit-Limit` / `X-RateLimit-Remaining` too.
    pub(super) legacy: bool,
    /// None but `Retry-After` on refusals.
    pub(super) hidden: bool,
}

/// The fields one decision (or a pair's two) adds to a response, `Retry-After` aside
/// (a refusal's, written with its `429`). An admitted request's response future carries
/// them, so they are kept to 88 bytes: such a future over a small inner one stays within
/// the 128 bytes the compiler moves with register copies rather than a call to `memcpy`.
/// When the Kong pair and `Retry-After` were values here too (200 bytes, the future 232),
/// `rate_limit/http`'s loop made three such calls a request.
#[derive(Debug)]
pub(crate) struct Headers {
    /// `RateLimit-Policy` and `RateLimit`.
    draft: (HeaderValue, HeaderValue),
    /// Kong's `X-RateLimit-Limit` and `X-RateLimit-Remaining`, as figures: their values
    /// are formatted when applied, as they were when made.
    legacy: Option<Legacy>,
}

/// `X-RateLimit-Limit` and `X-RateLimit-Remaining` in one word that is never zero, so
/// that `Option<Legacy>` needs no tag of its own: the limit in the high half, the
/// remaining tokens (at most the limit) in the low half with its bits flipped. Zero would
/// be a limit of 0 with `u32::MAX` remaining, which the clamp rules out.
#[derive(Debug, Clone, Copy)]
struct Legacy(std::num::NonZeroU64);

impl Legacy {
    const FLIP: u64 = u32::MAX as u64;

    fn new(limit: u32, remaining: u32) -> Option<Self> {
        let word = u64::from(limit) << 32 | u64::from(remaining.min(limit));
        std::num::NonZeroU64::new(word ^ Self::FLIP).map(Self)
    }

    /// The limit and the remaining tokens.
    fn figures(self) -> (u32, u32) {
        let word = self.0.get() ^ Self::FLIP;
        ((word >> 32) as u32, word as u32)
    }
}

impl Headers {
    /// `RateLimit-Policy: policy` and `RateLimit: state`, nothing else.
    #[cfg(feature = "gateway")]
    pub(super) fn draft(policy: HeaderValue, state: HeaderValue) -> Self {
        Self {
            draft: (policy, state),
            legacy: None,
        }
    }

    /// `None` when there is nothing to add: the fields hidden.
    pub(super) fn new(
        name: &PolicyName,
        style: HeaderStyle,
        decision: &Result<Admitted, RateLimited>,
    ) -> Option<Self> {
        if style.hidden {
            return None;
        }
        let (limit, window, remaining, reset) = match decision {
            Ok(a) => (a.limit, a.window, a.remaining, a.full_in),
            Err(r) => (r.limit(), r.window(), 0, r.full_in()),
        };
        Some(Self {
            draft: (
                name.policy(limit, window),
                name.state(u64::from(remaining), ceil_secs(reset)),
            ),
            legacy: style
                .legacy
                .then(|| Legacy::new(limit, remaining))
                .flatten(),
        })
    }

    pub(crate) fn apply(self, headers: &mut http::HeaderMap) {
        let (policy, state) = self.draft;
        headers.append(RATELIMIT_POLICY.clone(), policy);
        headers.append(RATELIMIT.clone(), state);
        if let Some(legacy) = self.legacy {
            let (limit, remaining) = legacy.figures();
            // Appended: with stacked layers the innermost (applied first) comes first.
            headers.append(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(limit));
            headers.append(X_RATELIMIT_REMAINING.clone(), HeaderValue::from(remaining));
        }
    }
}

/// Keeps a policy name a valid sf-string: printable ASCII without quotes or backslashes.
fn sanitize(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .filter(|c| *c != '"' && *c != '\\')
        .collect()
}

impl<S, L, ReqB, ResB> Service<Request<ReqB>> for HttpRateLimit<S, L>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    L: Limit<Request<ReqB>>,
    L::Check: Respond<S, Request<ReqB>>,
    ResB: ProblemBody,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = <L::Check as Respond<S, Request<ReqB>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    // `inline(always)`, with the check and `answer` below: a decision or a future returned
    // from an out-of-line call comes back through memory, written by narrow stores and
    // read back by wide loads that stall on them (the per-key layer cost a quarter more).
    #[inline(always)]
    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        self.layer
            .limit
            .check(&request, 1)
            .respond(&mut self.inner, request, &self.layer.settings)
    }
}

/// Answers `decision` for `request`: calls `inner` when it is admitted (its response gets
/// the headers), or answers the refusal. The one check-and-answer of the HTTP layer, at
/// once or after a round trip ([`DeferredResponse`]).
#[inline(always)]
fn answer<S, Ch, ReqB, ResB>(
    inner: &mut S,
    decision: Decision<Ch>,
    request: Request<ReqB>,
    settings: &HeaderSettings,
) -> ResponseFuture<S::Future, ResB, Ch>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: ProblemBody,
{
    match decision {
        Decision::Admitted(admitted, charge) => {
            ResponseFuture::called(inner.call(request), settings.admitted(admitted), charge)
        }
        Decision::Unlimited => ResponseFuture::unlimited(inner.call(request)),
        refused => ResponseFuture::refused(settings.refuse_decision(refused)),
    }
}

/// How [`HttpRateLimit`] goes on from a [`Limit`]'s [`Outcome`](crate::rate_limit::Outcome):
/// implemented for a [`Decision`] (the inner service is called at once) and for a future
/// of one (a ready clone of the inner service, which must be `Clone`, waits in the
/// response future for the decision). Not meant to be implemented or called outside
/// seawall.
pub trait Respond<S: Service<Request>, Request>: Sized {
    /// The response future.
    type Future: Future<Output = Result<S::Response, S::Error>>;

    /// Answers this outcome for `request`, calling `inner` when it is admitted.
    fn respond(self, inner: &mut S, request: Request, settings: &HeaderSettings) -> Self::Future;
}

impl<S, Ch, ReqB, ResB> Respond<S, Request<ReqB>> for Decision<Ch>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: ProblemBody,
    Ch: Refund,
{
    type Future = ResponseFuture<S::Future, ResB, Ch>;

    #[inline(always)]
    fn respond(
        self,
        inner: &mut S,
        request: Request<ReqB>,
        settings: &HeaderSettings,
    ) -> Self::Future {
        answer(inner, self, request, settings)
    }
}

impl<S, Ch, ReqB, ResB, F> Respond<S, Request<ReqB>> for F
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    F: Future<Output = Decision<Ch>>,
    ResB: ProblemBody,
    Ch: Refund,
{
    type Future = DeferredResponse<F, S, Request<ReqB>, S::Future, ResB, Ch>;

    fn respond(
        self,
        inner: &mut S,
        request: Request<ReqB>,
        settings: &HeaderSettings,
    ) -> Self::Future {
        // The ready service goes into the future; this one keeps a fresh clone.
        let clone = inner.clone();
        DeferredResponse {
            state: DeferredState::Checking {
                check: self,
                inner: Some(std::mem::replace(inner, clone)),
                request: Some(request),
                settings: Some(settings.clone()),
            },
        }
    }
}

/// The `503` of a limit that could not decide and fails closed
/// ([`Decision::Unavailable`]): `Retry-After: 1`, marked [`Undecided::Unavailable`], not
/// [`Refused`] (no limit said no: the layers outside keep their tokens).
fn unavailable<B: ProblemBody>() -> Response<B> {
    let mut response = crate::problem::problem::<B>(
        StatusCode::SERVICE_UNAVAILABLE,
        "the rate limiter's store is unavailable",
    );
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response.extensions_mut().insert(Undecided::Unavailable);
    response
}

pin_project! {
    /// Response future of [`HttpRateLimit`] over a limit whose check is a round trip (the
    /// Redis limiter): waits for the decision, holding a ready clone of the inner service
    /// and the request, then answers it as [`ResponseFuture`] does.
    pub struct DeferredResponse<C, S, Request, F, B, Ch> {
        #[pin]
        state: DeferredState<C, S, Request, F, B, Ch>,
    }
}

pin_project! {
    #[project = DeferredProj]
    enum DeferredState<C, S, Request, F, B, Ch> {
        Checking {
            #[pin]
            check: C,
            inner: Option<S>,
            request: Option<Request>,
            settings: Option<HeaderSettings>,
        },
        Answered { #[pin] future: ResponseFuture<F, B, Ch> },
    }
}

impl<C, S, Request, F, B, Ch> fmt::Debug for DeferredResponse<C, S, Request, F, B, Ch> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredResponse").finish_non_exhaustive()
    }
}

impl<C, S, ReqB, B, E, Ch> Future for DeferredResponse<C, S, Request<ReqB>, S::Future, B, Ch>
where
    C: Future<Output = Decision<Ch>>,
    S: Service<Request<ReqB>, Response = Response<B>, Error = E>,
    B: ProblemBody,
    Ch: Refund,
{
    type Output = Result<Response<B>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                DeferredProj::Checking {
                    check,
                    inner,
                    request,
                    settings,
                } => {
                    let decision = ready!(check.poll(cx));
                    let gone = "DeferredResponse polled after completion";
                    let mut inner = inner.take().expect(gone);
                    let request = request.take().expect(gone);
                    let settings = settings.take().expect(gone);
                    DeferredState::Answered {
                        future: answer(&mut inner, decision, request, &settings),
                    }
                }
                DeferredProj::Answered { future } => return future.poll(cx),
            };
            self.as_mut().project().state.set(next);
        }
    }
}

pin_project! {
    /// Response future of [`HttpRateLimit`]: hands the layer's token back when the
    /// response is a [`Refused`] 429 from a layer further in.
    pub struct ResponseFuture<F, B, R = ()> {
        #[pin]
        kind: Kind<F, B, R>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, R> {
        Called { #[pin] future: F, headers: Option<Headers>, charge: Option<R> },
        Refused { response: Option<Response<B>> },
    }
}

impl<F, B, R> ResponseFuture<F, B, R> {
    pub(crate) fn called(future: F, headers: Option<Headers>, charge: R) -> Self {
        Self {
            kind: Kind::Called {
                future,
                headers,
                charge: Some(charge),
            },
        }
    }

    pub(crate) fn unlimited(future: F) -> Self {
        Self {
            kind: Kind::Called {
                future,
                headers: None,
                charge: None,
            },
        }
    }

    pub(crate) fn refused(response: Response<B>) -> Self {
        Self {
            kind: Kind::Refused {
                response: Some(response),
            },
        }
    }
}

impl<F, B, R> fmt::Debug for ResponseFuture<F, B, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E, R: Refund> Future for ResponseFuture<F, B, R>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called {
                future,
                headers,
                charge,
            } => {
                let mut poll = future.poll(cx);
                if let Poll::Ready(Ok(response)) = &mut poll {
                    // Refused further in, or a key missing there: this layer's token was
                    // not used (kept, a client leaving its key out of every request
                    // would drain this limit for everybody).
                    if let Some(charge) = charge.take() {
                        let extensions = response.extensions();
                        if extensions.get::<Refused>().is_some()
                            || matches!(
                                extensions.get::<Undecided>(),
                                Some(Undecided::MissingKey | Undecided::KeyNotSent)
                            )
                        {
                            charge.refund();
                        }
                    }
                    if let Some(h) = headers.take() {
                        h.apply(response.headers_mut());
                    }
                }
                poll
            }
            KindProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("rate limit ResponseFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::{ManualClock, Quota, Rate};

    fn policy_of(name: &PolicyName, per_second: u32, burst: u32) -> String {
        let limiter = RateLimiter::with_clock(
            Quota::new(Rate::per_second(per_second), burst).unwrap(),
            ManualClock::new(),
        );
        let decision = limiter.acquire(1);
        let headers = Headers::new(name, HeaderStyle::default(), &decision).unwrap();
        headers.draft.0.to_str().unwrap().to_owned()
    }

    fn policy(per_second: u32, burst: u32) -> String {
        policy_of(&PolicyName::new("p"), per_second, burst)
    }

    #[test]
    fn a_cached_policy_follows_a_changed_quota() {
        let name = PolicyName::new("p");
        assert_eq!(policy_of(&name, 150, 50), "\"p\";q=150;w=1");
        assert_eq!(policy_of(&name, 150, 50), "\"p\";q=150;w=1");
        assert_eq!(policy_of(&name, 3, 10), "\"p\";q=12;w=4");
        assert_eq!(policy_of(&name, 1000, 200), "\"p\";q=1000;w=1");
    }

    #[test]
    fn a_changed_quota_is_made_once_a_thread_not_once_a_response() {
        let name = PolicyName::new("p");
        let secs = Duration::from_secs;
        let first = name.policy(5, secs(1));
        let changed = name.policy(7, secs(2));
        let again = name.policy(7, secs(2));
        // The same bytes: kept, not formatted and allocated again.
        assert_eq!(changed.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        assert_eq!(again, "\"p\";q=7;w=2");
        let back = name.policy(5, secs(1));
        assert_eq!(back.as_bytes().as_ptr(), first.as_bytes().as_ptr());
        // Quotas that differ only below the second are told apart.
        let (a, b) = (Duration::from_millis(1500), Duration::from_millis(1200));
        assert_eq!(name.policy(9, a), name.make_policy(9, a));
        assert_eq!(name.policy(9, b), name.make_policy(9, b));
        assert_ne!(name.make_policy(9, a), name.make_policy(9, b));
    }

    #[test]
    fn names_are_made_valid_sf_strings_once() {
        let name = PolicyName::new("a \"quoted\"\\ näme");
        assert_eq!(name.as_str(), "a quoted nme");
        assert_eq!(policy_of(&name, 10, 10), "\"a quoted nme\";q=10;w=1");
    }

    #[test]
    fn the_policy_announces_the_configured_rate() {
        // 1/150 s rounds up to 6 666 667 ns: 149.99997 a second, announced as 150.
        assert_eq!(policy(150, 50), "\"p\";q=150;w=1");
        assert_eq!(policy(1000, 200), "\"p\";q=1000;w=1");
        // Over the 4 s window (the 3.3 s refill rounded up) the rate refills 12.
        assert_eq!(policy(3, 10), "\"p\";q=12;w=4");
    }

    #[test]
    fn the_kong_figures_fit_one_word_whole() {
        let max = u32::MAX;
        for (limit, remaining) in [(1, 0), (1, 1), (10, 7), (max, max), (max, 0), (0, 0)] {
            let legacy = Legacy::new(limit, remaining).expect("never zero");
            assert_eq!(legacy.figures(), (limit, remaining));
        }
        // More remaining than the limit (a hand-made `Admitted`) is told as the limit,
        // even at the one word that would otherwise be zero.
        assert_eq!(Legacy::new(5, 7).unwrap().figures(), (5, 5));
        assert_eq!(Legacy::new(0, max).unwrap().figures(), (0, 0));
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_future_over_a_small_one_is_moved_without_a_memcpy_call() {
        // Above 128 bytes the compiler moves a value with a call to `memcpy` (see
        // `Headers`). A refusal's `Response` (88 bytes from `http` 1.6) shares the space.
        // An inner future of a word (`rate_limit/http`'s own is a byte).
        type Small = u64;
        type Global = crate::rate_limit::Charge;
        type Keyed = Option<crate::rate_limit::KeyedCharge<u64>>;
        assert!(std::mem::size_of::<Option<Headers>>() <= 88);
        assert!(std::mem::size_of::<ResponseFuture<Small, String, Global>>() <= 128);
        // The keyed receipt is an `Option` in the future's `Option`, which takes a word
        // of its own: 136 bytes, moved by `memcpy`. (A niche for it, a filler beside a
        // `u32` token count in `Taken`, made `RateLimitLayer` a tenth slower: the two
        // narrow stores stall the wide loads that move a receipt.)
        assert!(std::mem::size_of::<ResponseFuture<Small, String, Keyed>>() <= 136);
    }

    #[tokio::test]
    async fn an_inner_error_passes_through_untouched_and_keeps_its_token() {
        use tower::ServiceExt;
        // The response is edited inside the inner future's `Poll` and that `Poll`
        // returned: an error must come out as it went in, with its token spent (only a
        // refusal further in hands it back), and a response must still get its fields.
        let limiter = RateLimiter::with_clock(
            Quota::new(Rate::per_second(1), 2).unwrap(),
            ManualClock::new(),
        );
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let inner = {
            let fail = fail.clone();
            tower::service_fn(move |_: Request<()>| {
                let fail = fail.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if fail {
                        Err(std::io::Error::other("upstream down"))
                    } else {
                        Ok(Response::new(String::new()))
                    }
                }
            })
        };
        let mut svc = HttpRateLimitLayer::global(limiter.clone()).layer(inner);
        let error = (&mut svc).oneshot(Request::new(())).await;
        assert_eq!(
            error.expect_err("the inner error").to_string(),
            "upstream down"
        );
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let response = (&mut svc).oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["ratelimit"],
            "\"default\";r=0;t=2",
            "the failed call's token stays spent"
        );
        let refused = (&mut svc).oneshot(Request::new(())).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn state_values_are_written_whole() {
        let state = |name, r, t| state_value(name, r, t).to_str().unwrap().to_owned();
        assert_eq!(state("p", 0, 0), "\"p\";r=0;t=0");
        assert_eq!(state("global", 9, 10), "\"global\";r=9;t=10");
        assert_eq!(state("", 1_000_000, 1), "\"\";r=1000000;t=1");
        assert_eq!(
            state("x", u64::MAX, u64::MAX),
            format!("\"x\";r={0};t={0}", u64::MAX)
        );
    }
}
