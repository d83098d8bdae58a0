//! One route's stack: limits, fallback, timeout, and a balancer over the service's
//! endpoints, each a pool of keep-alive connections behind its own breaker.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::body::{Body, full, json_error};
use super::client::{BodyState, ClientBody, ClientFault, UpstreamClassifier, head_too_large};
use super::config::{
    ClientKey, ClientLimitSettings, FallbackSettings, LimitPolicy, OnMissing, RouteConfig,
    RoutePlan, ServerConfig, StrategyName,
};
use super::h1;
use super::headers::remove_hop_by_hop;
use super::jwt::JwtVerifier;
use super::pool::{
    self, EndpointPool, PooledBody, Pools, SendFuture, UpstreamError, UpstreamSettings,
};
#[cfg(feature = "redis")]
use super::shared_limit::{ClientKey as RedisClientKey, MaybeRedis, SharedLimit};
use super::status::{ClientLimit, EndpointReport, GlobalLimit, Limits, RouteStats, RouteStatus};
use super::timers::{ConnTimers, Reused};
use super::trace::{NewFields, TraceSettings};
use crate::BoxError;
use crate::balance::{
    Balance, BalanceHandle, NoEndpoints, ReadyTimeout, SharedBalance, Strategy, WhenEmpty,
};
use crate::circuit_breaker::error::rejection_in;
use crate::circuit_breaker::{HttpClassifier, Rejection};
use crate::discovery::{Instance, InstanceWatch, ServiceDiscover};
use crate::fallback::{FallbackLayer, FromFn};
#[cfg(feature = "redis")]
use crate::rate_limit::Quota;
use crate::rate_limit::http::{ClientIp, HeaderKey, HttpRateLimitPair, PairedHeaders, Refused};
#[cfg(feature = "redis")]
use crate::rate_limit::redis::{RedisLimit, RedisRateLimiter};
use crate::rate_limit::{
    BoundedKey, Decision, KeyedCharge, KeyedRateLimiter, Limit, RateLimiter, TokioClock,
};
use tokio::time::Instant;

type MakeUpstream = Box<dyn FnMut(&Instance) -> Upstream + Send>;
type Upstreams = Balance<ServiceDiscover<MakeUpstream, Upstream>, UpstreamClassifier>;
/// A route's tower stack: the global, then the per-client limit, in one layer (one
/// `RateLimit` field lists both) → (with `policy = "redis"`) the global and per-client
/// limits in Redis → [`Core`]. Concrete, so a request costs no boxed service clone and
/// no boxed future (the core's is [`Forward`]), but one per Redis limit (its round trip)
/// and a clone of the services below it.
type Stack = HttpRateLimitPair<Shared, Option<RateLimiter>, Option<PerClient>>;

/// The limits kept in Redis, innermost: the local ones outside hand their tokens back
/// when these refuse. Of the two, the per-client one first and the global one innermost:
/// Redis hands no token back, so a client refused by its own limit must never have
/// reached the global bucket, or one client over its limit would drain it for all.
#[cfg(feature = "redis")]
type Shared = MaybeRedis<MaybeRedis<Core, RedisRateLimiter>, RedisLimit<RedisClientKey>>;
#[cfg(not(feature = "redis"))]
type Shared = Core;

/// The client end of a connection, its `X-Forwarded-For` entry made once for all the
/// connection's requests. Unknown (`None`) when the gateway is a service of a server that
/// did not say who the peer is.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub(crate) addr: Option<IpAddr>,
    forwarded_for: Option<HeaderValue>,
    /// Whether the connection came over TLS (`X-Forwarded-Proto: https`).
    https: bool,
    /// The connection's reusable timers, when the gateway serves the connection itself.
    timers: Option<ConnTimers>,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self::of(Some(addr.ip()))
    }

    pub(crate) fn of(ip: Option<IpAddr>) -> Self {
        Self {
            addr: ip,
            // An IP address's text is always a valid value.
            forwarded_for: ip.and_then(|ip| HeaderValue::try_from(ip.to_string()).ok()),
            https: false,
            timers: None,
        }
    }

    /// The peer of a connection that came over TLS.
    #[cfg(feature = "tls")]
    pub(crate) fn over_tls(mut self) -> Self {
        self.https = true;
        self
    }

    /// The peer of a connection the gateway serves, whose requests reuse `timers`.
    pub(crate) fn with_timers(mut self, timers: ConnTimers) -> Self {
        self.timers = Some(timers);
        self
    }

    /// For tracing: the address, or `unknown`.
    #[cfg(feature = "tracing")]
    pub(crate) fn shown(&self) -> String {
        self.addr
            .map_or_else(|| String::from("unknown"), |a| a.to_string())
    }
}

/// One endpoint: its pool of connections.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    pool: Arc<EndpointPool>,
}

/// What the forwarding headers say of a request's connection.
#[derive(Clone, Default)]
pub(crate) struct Forwarding {
    /// The peer's `X-Forwarded-For` entry.
    peer: Option<HeaderValue>,
    /// It came over TLS.
    https: bool,
}

/// What an upstream call needs besides the request: when the route timeout passes, the
/// state of the client's request body (`None` without one), and what the endpoint's
/// connection adds to the request.
pub(crate) struct Call {
    deadline: Instant,
    /// The caller's own deadline (`grpc-timeout`), whether or not it is earlier than the
    /// route's: passing it is not the upstream's fault, before the answer's head (when it
    /// is `deadline`) or after (a stream the upstream ends at it).
    caller_deadline: Option<Instant>,
    body: Option<Arc<BodyState>>,
    /// The client connection's timers, to wait for the deadline with.
    timers: Option<ConnTimers>,
    /// What the endpoint's connection writes with the request (or puts into it).
    added: h1::Added,
}

/// A request as the balancer passes it to an endpoint.
type UpstreamRequest = (Request<Body>, Call);

impl Service<UpstreamRequest> for Upstream {
    type Response = Response<PooledBody>;
    type Error = UpstreamError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool has no limit of its own: backpressure is the route's limits' job.
        Poll::Ready(Ok(()))
    }

    /// The route timeout is applied here, inside the balancer's call, so that a timeout
    /// completes the call as an error its classifier sees (a failure of the upstream),
    /// rather than dropping it unrecorded; unless the exchange was waiting on the
    /// client's body then, which is the client's fault.
    fn call(&mut self, (request, call): UpstreamRequest) -> Self::Future {
        #[cfg(feature = "tracing")]
        super::trace::record_upstream(self.pool.authority());
        let (reused, own) = match &call.timers {
            Some(timers) => (Some(timers.deadline(call.deadline)), None),
            None => (None, Some(tokio::time::sleep_until(call.deadline))),
        };
        UpstreamFuture {
            send: self.pool.clone().send(request, call.added),
            reused,
            deadline: own,
            body: call.body,
            caller_deadline: call.caller_deadline,
        }
    }
}

pin_project_lite::pin_project! {
    /// An endpoint's exchange, bounded by the route's deadline: past it, an
    /// [`UpstreamError::Timeout`] (the upstream's failure), or an
    /// [`UpstreamError::ClientBodyTimeout`] when the exchange was waiting on the client's
    /// body.
    pub(crate) struct UpstreamFuture {
        send: SendFuture,
        // The deadline: a timer of the client connection's, or one of its own (the
        // gateway as a service of another server).
        reused: Option<Reused>,
        #[pin]
        deadline: Option<tokio::time::Sleep>,
        body: Option<Arc<BodyState>>,
        // The caller's own deadline (`grpc-timeout`), however far.
        caller_deadline: Option<Instant>,
    }
}

impl Future for UpstreamFuture {
    type Output = Result<Response<PooledBody>, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = Pin::new(&mut *this.send).poll(cx) {
            let mut result = result;
            // An answer that came while the client still sends its body (an upstream
            // streaming its answer to the upload): a stall of that answer may be the
            // client's (see `BodyTimeout`).
            if let Ok(response) = &mut result
                && let Some(body) = this.body.as_ref().filter(|body| !body.is_done())
            {
                response.extensions_mut().insert(Upload(body.clone()));
            }
            // A gRPC answer whose status is still to come: how it ends is judged against
            // the client's body and the caller's deadline too. In place: no move of the
            // response for the answers that are not.
            if let Ok(response) = &mut result
                && response.body().head_facts().grpc()
                && (this.body.is_some() || this.caller_deadline.is_some())
                && response.status() == StatusCode::OK
            {
                if super::grpc::status_in_trailers(response.headers()) {
                    response.extensions_mut().insert(super::grpc::CallContext {
                        body: this.body.clone(),
                        caller_deadline: *this.caller_deadline,
                    });
                } else if super::grpc::past_callers_deadline(
                    response.headers(),
                    *this.caller_deadline,
                ) {
                    // A trailers-only `DEADLINE_EXCEEDED` once the caller's deadline has
                    // passed (the upstream kept the `grpc-timeout` it was sent, and its
                    // answer came before the gateway's timer fired): the caller's.
                    response
                        .extensions_mut()
                        .insert(super::grpc::CallersDeadline);
                }
            }
            return Poll::Ready(result.map_err(|e| {
                let Some(body) = this.body.as_ref() else {
                    return e;
                };
                match body.failure() {
                    // An exchange that failed with the client's body: the client's fault,
                    // whether or not the exchange's error says so (HTTP/2's does not).
                    Some(failure) if !e.is_client_fault() => UpstreamError::ClientBody(failure),
                    // The upstream dropped the connection while the exchange waited on the
                    // client's body (its own read timeout passed on a stalled upload, as
                    // Go's `ReadTimeout` or gunicorn's worker timeout do): the client's
                    // slowness, as when the route timeout passes then, not the upstream's
                    // ill health.
                    None if body.waiting_on_client() && e.is_connection_lost() => {
                        UpstreamError::ClientBodyTimeout
                    }
                    _ => e,
                }
            }));
        }
        let elapsed = match (this.reused, this.deadline.as_pin_mut()) {
            (Some(reused), _) => Pin::new(reused).poll(cx).is_ready(),
            (None, Some(own)) => own.poll(cx).is_ready(),
            (None, None) => true,
        };
        if !elapsed {
            return Poll::Pending;
        }
        Poll::Ready(Err(
            if this.body.as_ref().is_some_and(|b| b.waiting_on_client()) {
                UpstreamError::ClientBodyTimeout
            } else if this
                .caller_deadline
                .is_some_and(|deadline| deadline <= Instant::now())
            {
                UpstreamError::CallerDeadline
            } else {
                this.send.timed_out();
                UpstreamError::Timeout
            },
        ))
    }
}

/// The client's request body, still coming when the answer's head came (see
/// [`UpstreamFuture`]).
#[derive(Clone)]
struct Upload(Arc<BodyState>);

/// Who a per-client limit charges: a client's address, or its key header's value (of
/// bounded size, however long the value).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientId {
    Ip(IpAddr),
    Key(BoundedKey),
}

/// An address is hashed in one write of a tag and its bytes: the limiter's SipHash
/// costs about as much per write as per eight bytes, and the derived `Hash` makes four
/// (two tags, a length, the bytes). Distinct tags and fixed lengths keep it consistent
/// with `Eq`.
impl std::hash::Hash for ClientId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Self::Ip(IpAddr::V4(ip)) => {
                let [a, b, c, d] = ip.octets();
                state.write(&[4, a, b, c, d]);
            }
            Self::Ip(IpAddr::V6(ip)) => {
                let mut bytes = [6; 17];
                bytes[1..].copy_from_slice(&ip.octets());
                state.write(&bytes);
            }
            Self::Key(key) => {
                state.write_u8(0);
                key.hash(state);
            }
        }
    }
}

/// How a per-client limit (local or in Redis) tells clients apart.
#[derive(Clone)]
pub(crate) struct ClientKeying {
    /// `None`: keyed by IP.
    header: Option<HeaderName>,
    on_missing: OnMissing,
    /// The client's address (the peer's, or what a trusted proxy reports), set on the
    /// stack's clone for each request: no allocation, where the request's extensions
    /// would take three.
    client: Option<IpAddr>,
}

/// A request's client key, as [`ClientKeying`] reads it.
pub(crate) enum ClientKeyOf<'a> {
    Ip(IpAddr),
    /// The key header's value (visible ASCII).
    Header(&'a str),
    /// Without the key header, under `on_missing = "shared"`.
    Shared,
    /// Not limited per client: without the header under `"allow"` (or `"reject"`, refused
    /// before the stack); or with no client address known, which
    /// [`rejects_unkeyed`](ClientKeying::rejects_unkeyed) refuses.
    Unlimited,
}

impl ClientKeying {
    fn new(settings: &ClientLimitSettings) -> Self {
        Self {
            header: match settings.key.clone() {
                ClientKey::Ip => None,
                ClientKey::Header(h) => Some(h),
            },
            on_missing: settings.on_missing,
            client: None,
        }
    }

    pub(crate) fn key<'a, B>(&self, request: &'a Request<B>) -> ClientKeyOf<'a> {
        let ip = || self.client.map_or(ClientKeyOf::Unlimited, ClientKeyOf::Ip);
        let Some(h) = &self.header else {
            return ip();
        };
        // An empty value is no key (as `HeaderKey::key_of` reads it): keyed as `""`,
        // every client sending one would share a bucket, past `on_missing`. Nor is a
        // repeated one (`HeaderKey`'s rule): keyed on the first, a fresh first value
        // would pass the limit while the upstream read the second.
        match crate::rate_limit::http::key::single(request.headers(), h)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            Some(value) => ClientKeyOf::Header(value),
            None => match self.on_missing {
                OnMissing::Ip => ip(),
                OnMissing::Shared => ClientKeyOf::Shared,
                OnMissing::Allow | OnMissing::Reject => ClientKeyOf::Unlimited,
            },
        }
    }

    /// Whether the request lacks the key header and must be refused for it, or sends it
    /// more than once (refused whatever `on_missing` says: keyed on neither value, or on
    /// the client's address, a fresh first value beside the real key would pass while
    /// the upstream read the second).
    fn rejects<B>(&self, request: &Request<B>) -> bool {
        self.header.as_ref().is_some_and(|h| {
            let mut values = request.headers().get_all(h).iter();
            let first = values.next();
            values.next().is_some()
                || (self.on_missing == OnMissing::Reject
                    && first.and_then(HeaderKey::key_of).is_none())
        })
    }

    /// Whether a request with no key (see [`ClientKeyOf::Unlimited`]) is refused (`500`,
    /// logged): when the limit needed the client's address and the gateway was not told
    /// the peer (a service of a server that sets neither a `SocketAddr` extension nor
    /// axum's connect info). Never let through unlimited.
    fn rejects_unkeyed(&self) -> bool {
        self.client.is_none() && (self.header.is_none() || self.on_missing == OnMissing::Ip)
    }

    /// The same rule for the Redis layer, which asks only when the key is missing.
    #[cfg(feature = "redis")]
    pub(crate) fn on_missing_key(&self) -> crate::rate_limit::OnMissingKey {
        use crate::rate_limit::OnMissingKey;
        match (&self.header, self.on_missing) {
            (Some(_), OnMissing::Shared) => OnMissingKey::Shared,
            (Some(_), OnMissing::Allow) => OnMissingKey::Allow,
            // Keyed by address and none known: refused.
            _ => OnMissingKey::Reject,
        }
    }
}

/// The per-client limit, keyed by the client's IP or by a header.
#[derive(Clone)]
struct PerClient {
    limiter: KeyedRateLimiter<ClientId, TokioClock>,
    keying: ClientKeying,
    /// Whether a limit further in (in Redis) may refuse what this one admitted: then the
    /// token is handed back, which costs a reference count per request; otherwise this
    /// is the innermost limit and takes none.
    refunds: bool,
}

impl PerClient {
    fn clients(&self) -> usize {
        self.limiter.len()
    }
}

impl Limit<Request<Body>> for PerClient {
    /// `None` when nothing further in can refuse, or for the shared bucket.
    type Charge = Option<KeyedCharge<ClientId, TokioClock>>;
    type Check = Decision<Self::Charge>;

    fn check(&self, request: &Request<Body>, tokens: u32) -> Decision<Self::Charge> {
        let id = match self.keying.key(request) {
            ClientKeyOf::Ip(ip) => ClientId::Ip(ip),
            ClientKeyOf::Header(value) => ClientId::Key(BoundedKey::new(value.as_bytes())),
            ClientKeyOf::Shared => {
                return self
                    .limiter
                    .acquire_shared(tokens)
                    .map(|a| (a, None))
                    .into();
            }
            ClientKeyOf::Unlimited if self.keying.rejects_unkeyed() => {
                return Decision::MissingKey;
            }
            ClientKeyOf::Unlimited => return Decision::Unlimited,
        };
        if self.refunds {
            return self
                .limiter
                .charge(id, tokens)
                .map(|(a, c)| (a, Some(c)))
                .into();
        }
        self.limiter.acquire(&id, tokens).map(|a| (a, None)).into()
    }
}

/// A discovery of the route's instances, for another replica of its balancer.
type Rediscover = Box<dyn Fn() -> ServiceDiscover<MakeUpstream, Upstream> + Send + Sync>;

/// The route's balancer, one replica per thread shard ([`pool::thread_shard`]): each
/// thread of [`Gateway::spawn_threads`](super::Gateway::spawn_threads) picks endpoints
/// without taking a lock another thread takes, while the replicas share every
/// endpoint's figures, ejection and breaker ([`Balance::replica`]). Threads of other
/// runtimes share the first. A replica is made when its thread first needs it.
struct RouteBalance {
    first: SharedBalance<Upstreams>,
    /// Shards 1 and up.
    others: Box<[std::sync::OnceLock<SharedBalance<Upstreams>>]>,
    rediscover: Rediscover,
}

impl RouteBalance {
    fn new(first: Upstreams, rediscover: Rediscover) -> Self {
        Self {
            first: SharedBalance::new(first),
            others: (1..pool::SHARDS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            rediscover,
        }
    }

    /// This thread's replica.
    fn local(&self) -> &SharedBalance<Upstreams> {
        match pool::thread_shard().checked_sub(1) {
            None => &self.first,
            Some(i) => self.others[i].get_or_init(|| {
                let replica = self
                    .first
                    .with(|first, _| first.replica((self.rediscover)()));
                SharedBalance::new(replica)
            }),
        }
    }

    /// Applies the discovery changes that are ready, for a status read, in every
    /// replica: one whose thread is idle still holds the endpoints it last saw (and
    /// keeps a removed endpoint's ejection counted) until it is polled.
    fn refresh(&self) {
        self.first.refresh();
        for replica in self.others.iter().filter_map(std::sync::OnceLock::get) {
            replica.refresh();
        }
    }
}

/// What one route needs to forward a request, shared by the stack's clones.
pub(crate) struct RouteCore {
    pub(crate) name: String,
    pub(crate) prefix: String,
    service: String,
    strip: bool,
    timeout: Duration,
    /// The largest request body (`0`: no limit).
    max_request_body: u64,
    /// The longest request header line, and the largest request head.
    max_header_line: usize,
    max_headers_size: usize,
    /// The bound on each wait for more of a response body.
    body_timeout: Duration,
    fallback: Option<RouteFallback>,
    balance: RouteBalance,
    handle: BalanceHandle,
    pub(crate) stats: RouteStats,
    global: Option<(RateLimiter, u32)>,
    per_client: Option<(PerClient, u32, u32, String)>,
    /// How the per-client limit, local or in Redis, tells clients apart.
    client_keying: Option<ClientKeying>,
    /// The limits in Redis, with their rate (and burst, key).
    #[cfg(feature = "redis")]
    redis_global: Option<(SharedLimit, u32, u32)>,
    #[cfg(feature = "redis")]
    redis_per_client: Option<(SharedLimit, u32, u32, String)>,
    /// `[gateway] trusted_proxies`.
    trusted: ClientIp,
    /// `[gateway] request_id_header`, `trace_context`.
    trace: TraceSettings,
}

/// A route: auth, then the tower stack (limits → fallback → timeout → balancer).
pub(crate) struct Route {
    pub(crate) core: Arc<RouteCore>,
    auth: Option<JwtVerifier>,
    stack: Stack,
}

/// A `400 Bad Request` for a request refused before the route's stack.
fn bad_request(message: &str) -> Response<Body> {
    json_error(StatusCode::BAD_REQUEST, message)
}

impl Route {
    pub(crate) fn new(
        config: &RouteConfig,
        plan: RoutePlan,
        server: &ServerConfig,
        auth: Option<JwtVerifier>,
        watch: InstanceWatch,
        (pools, upstream): (&Arc<Pools>, UpstreamSettings),
        trusted: &ClientIp,
    ) -> Result<Self, BoxError> {
        let redis = plan.redis.as_ref();
        let pools = pools.clone();
        let discover = move || {
            let (pools, upstream) = (pools.clone(), upstream.clone());
            let make: MakeUpstream = Box::new(move |instance: &Instance| Upstream {
                pool: pools.pool(instance, &upstream),
            });
            ServiceDiscover::new(watch.clone(), make)
        };
        let mut builder = Balance::builder()
            .name(format!("{}/{}", config.name, config.service))
            .strategy(match config.balance.strategy {
                StrategyName::LeastRequests => Strategy::default(),
                StrategyName::PeakEwma => Strategy::peak_ewma(),
                StrategyName::RoundRobin => Strategy::RoundRobin,
            })
            // Discovery may still be on its way (Consul's first answer): wait for an
            // endpoint, within the route's timeout. Once the service has had instances and
            // every one has left, answer at once (503, or the fallback).
            .when_empty(WhenEmpty::WaitAtStart(config.timeout))
            // Each endpoint's figures are written into `/metrics` at each scrape, from
            // the balancer's handle: series in the process's recorder would outlive the
            // endpoints discovery removes (the facade cannot remove one).
            .endpoint_metrics(false);
        if let Some(outlier) = plan.outlier {
            builder = builder.outlier_detection(outlier);
        }
        if let Some(breaker) = plan.breaker {
            builder = builder.endpoint_breaker(breaker);
        }
        let balance = builder
            // `501 Not Implemented` answers the client's method (`PROPFIND`, a made-up
            // one), as Apache and most servers do: the client's doing, not a failure of
            // the upstream, or any client could open its breaker.
            .classifier(UpstreamClassifier(
                HttpClassifier::new().ignore(http::StatusCode::NOT_IMPLEMENTED),
            ))
            .try_build(discover())?;
        let handle = balance.handle().clone();
        let limits = &config.rate_limit;
        let local = |policy: LimitPolicy| policy == LimitPolicy::Local;
        let global = match (&limits.global, plan.global) {
            (Some(g), Some(q)) if local(g.policy) => Some((
                // Metrics tell routes apart: `seawall_rate_limit_decisions_total{limiter="users/global"}`.
                RateLimiter::builder(q)
                    .name(format!("{}/global", config.name))
                    .build(),
                g.per_second,
            )),
            _ => None,
        };
        let client_keying = limits.per_client.as_ref().map(ClientKeying::new);
        let trace = TraceSettings::new(server);
        let redis_inside = [
            limits.global.as_ref().map(|g| g.policy),
            limits.per_client.as_ref().map(|c| c.policy),
        ]
        .contains(&Some(LimitPolicy::Redis));
        let per_client = match (&limits.per_client, &client_keying, plan.per_client) {
            (Some(c), Some(keying), Some(q)) if local(c.policy) => {
                let name = format!("{}/per-client", config.name);
                let limiter = PerClient {
                    limiter: KeyedRateLimiter::builder(q).name(name).build(),
                    keying: keying.clone(),
                    refunds: redis_inside,
                };
                Some((limiter, c.per_second, q.burst(), c.key.to_string()))
            }
            _ => None,
        };
        #[cfg(feature = "redis")]
        let (redis_global, redis_per_client) = {
            let shared = |policy: LimitPolicy, scope: &str, name: &str, quota: Quota| match (
                policy, redis,
            ) {
                (LimitPolicy::Redis, Some(settings)) => {
                    SharedLimit::new(settings, &config.name, scope, name, quota).map(Some)
                }
                (LimitPolicy::Redis, None) => {
                    Err(BoxError::from("policy = \"redis\" needs a [redis] section"))
                }
                (LimitPolicy::Local, _) => Ok(None),
            };
            let global = match (&limits.global, plan.global) {
                (Some(g), Some(q)) => {
                    shared(g.policy, "global", "global", q)?.map(|l| (l, g.per_second, q.burst()))
                }
                _ => None,
            };
            let per_client = match (&limits.per_client, plan.per_client) {
                (Some(c), Some(q)) => shared(c.policy, "client", "per-client", q)?
                    .map(|l| (l, c.per_second, q.burst(), c.key.to_string())),
                _ => None,
            };
            (global, per_client)
        };
        #[cfg(not(feature = "redis"))]
        {
            let _ = redis;
            if redis_inside {
                return Err("policy = \"redis\" needs seawall's `redis` feature".into());
            }
        }
        let core = Arc::new(RouteCore {
            name: config.name.clone(),
            prefix: super::config::normalize_prefix(&config.path_prefix).to_owned(),
            service: config.service.clone(),
            strip: config.strip_prefix,
            timeout: config.timeout,
            max_request_body: config.max_request_body.unwrap_or(server.max_request_body),
            max_header_line: server.max_header_line,
            max_headers_size: server.max_headers_size,
            body_timeout: config.body_timeout.unwrap_or(config.timeout),
            fallback: config.fallback.as_ref().map(route_fallback),
            balance: RouteBalance::new(balance, Box::new(discover)),
            handle,
            stats: RouteStats::default(),
            global: global.clone(),
            per_client: per_client.clone(),
            client_keying,
            #[cfg(feature = "redis")]
            redis_global: redis_global.clone(),
            #[cfg(feature = "redis")]
            redis_per_client: redis_per_client.clone(),
            trusted: trusted.clone(),
            trace,
        });
        let hide = config.rate_limit.hide_client_headers;
        let inner = Core {
            route: Some(core.clone()),
            forwarded_for: Forwarding::default(),
            body: None,
            timers: None,
            trace: NewFields::default(),
            grpc: false,
        };
        #[cfg(feature = "redis")]
        let inner = {
            let inner = match &redis_global {
                Some((limit, ..)) => {
                    MaybeRedis::On(limit.global_layer("global", hide).layer(inner))
                }
                None => MaybeRedis::Off(inner),
            };
            match (&redis_per_client, &core.client_keying) {
                (Some((limit, ..)), Some(keying)) => MaybeRedis::On(
                    limit
                        .layer(RedisClientKey(keying.clone()), "per-client", hide)
                        .on_missing_key(keying.on_missing_key())
                        .layer(inner),
                ),
                _ => MaybeRedis::Off(inner),
            }
        };
        let stack = HttpRateLimitPair::new(
            inner,
            global.map(|(l, _)| l),
            per_client.map(|(l, ..)| l),
            PairedHeaders::new("global", "per-client", hide),
        );
        Ok(Self { core, auth, stack })
    }

    /// Whether `path` falls under this route's prefix, on a segment boundary.
    pub(crate) fn matches(&self, path: &str) -> bool {
        super::path::under_prefix(path, &self.core.prefix)
    }

    /// Serves one request matched to this route. Not an `async fn`, nor is `respond`: one
    /// would copy the request from its argument into its state before using it.
    /// `grpc`: the request is a gRPC call ([`super::grpc::grpc_caller`]), whose deadline may
    /// be its own (`grpc-timeout`).
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn handle<B>(
        &self,
        mut request: Request<B>,
        peer: &Peer,
        grpc: bool,
    ) -> impl Future<Output = Response<Body>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        async move {
            let start = super::poll_clock::now();
            let stats = &self.core.stats;
            stats.requests.fetch_add(1, Relaxed);
            #[cfg(feature = "tracing")]
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let (hop, mut fields) = self.core.trace.begin(&mut request, &self.core.name);
            // Lent, not moved in: the call's future is then made where it is awaited,
            // rather than made and copied (twice, a few hundred bytes) with the fields.
            let mut response = hop
                .run(self.respond(request, peer, &mut fields, grpc))
                .await;
            let elapsed = super::poll_clock::now().saturating_duration_since(start);
            hop.finish(&mut response, elapsed);
            stats.record(response.status(), elapsed);
            #[cfg(feature = "tracing")]
            tracing::debug!(
                target: "seawall::gateway",
                route = %self.core.name,
                %method,
                path,
                peer = %peer.shown(),
                status = response.status().as_u16(),
                // The marker only the route's fallback sets: an upstream's answer may
                // carry the header.
                fallback = response.extensions().get::<FellBack>().is_some(),
                elapsed_us = elapsed.as_micros() as u64,
                "request"
            );
            response
        }
    }

    #[allow(clippy::manual_async_fn)]
    fn respond<B>(
        &self,
        request: Request<B>,
        peer: &Peer,
        fields: &mut NewFields,
        grpc: bool,
    ) -> impl Future<Output = Response<Body>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        async move {
            let core = &self.core;
            if head_too_large(&request, core.max_header_line, core.max_headers_size) {
                return self.core.client_fault(ClientFault::HeaderTooLong);
            }
            // With auth, a single Authorization: the token verified is then the one forwarded.
            // (`Host` was checked before routing.)
            if self.auth.is_some() {
                if let Err(bad) = super::headers::check_authorization(request.headers()) {
                    return bad_request(bad.message());
                }
            }
            if let Some(verifier) = &self.auth {
                if let Err(e) = verifier.check_header(request.headers()) {
                    self.core.stats.unauthorized.fetch_add(1, Relaxed);
                    let mut response = json_error(StatusCode::UNAUTHORIZED, &e.to_string());
                    // RFC 6750 §3.1: a request without credentials (or with another
                    // scheme) gets no error code, only the scheme to use.
                    let challenge = if e == super::jwt::JwtError::Missing {
                        "Bearer"
                    } else {
                        "Bearer error=\"invalid_token\""
                    };
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(challenge),
                    );
                    return response;
                }
            }
            let (parts, body) = request.into_parts();
            let (body, state) = match ClientBody::new(body, self.core.max_request_body) {
                Ok(body) => body,
                // A declared length over the limit: refused before the upstream is contacted.
                Err(_) => return self.core.client_fault(ClientFault::TooLarge),
            };
            let body = match state {
                // Empty from the start (a `GET`): nothing to read from the client's, and an
                // empty body boxed costs no allocation.
                None => super::body::empty(),
                Some(_) => body.boxed_unsync(),
            };
            let request = Request::from_parts(parts, body);
            let mut client = None;
            if let Some(keying) = &self.core.client_keying {
                if keying.rejects(&request) {
                    return bad_request("missing or repeated client key header");
                }
                // The client behind a trusted proxy; the peer itself otherwise (no work). No
                // peer known: a limit that needs the address refuses (see `rejects_unkeyed`).
                // Keyed as `ClientIp` keys it: an IPv6 client by its network's prefix.
                let trusted = &self.core.trusted;
                client = peer
                    .addr
                    .map(|ip| trusted.key_of(trusted.resolve(ip, request.headers())));
            }
            // The clone is a few reference counts. Its per-client limit and its core learn
            // the peer here rather than from the request's extensions (three allocations);
            // the limits see the request as the client sent it, and the core rewrites it for
            // the upstream. Without a local limit, the limit layer would only pass the
            // request on: what is under it is cloned and called alone.
            //
            // Readied as tower's contract asks, though every layer is always ready (limits
            // answer in `call`, the balancer is waited for in the core's future): one poll
            // through the layers. The future owns all it needs.
            let result = if self.core.global.is_none() && self.core.per_client.is_none() {
                let mut shared = self.stack.get_ref().clone();
                self.prime(
                    &mut shared,
                    client,
                    peer,
                    state,
                    std::mem::take(fields),
                    grpc,
                );
                match std::future::poll_fn(|cx| shared.poll_ready(cx)).await {
                    // Pinned where it is made, and awaited through the pin: awaited by value,
                    // the future would be copied twice more.
                    Ok(()) => std::pin::pin!(shared.call(request)).await,
                    Err(never) => Err(never),
                }
            } else {
                let mut stack = self.stack.clone();
                if let Some(limit) = stack.inner_limit_mut() {
                    limit.keying.client = client;
                }
                self.prime(
                    stack.get_mut(),
                    client,
                    peer,
                    state,
                    std::mem::take(fields),
                    grpc,
                );
                match std::future::poll_fn(|cx| stack.poll_ready(cx)).await {
                    Ok(()) => std::pin::pin!(stack.call(request)).await,
                    Err(never) => Err(never),
                }
            };
            let response = match result {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.extensions().get::<Refused>().is_some() {
                self.core.stats.rate_limited.fetch_add(1, Relaxed);
            }
            response
        }
    }

    /// Tells the clone of the stack's inner part made for a request who the client is
    /// (for a per-client limit kept in Redis), and its core what the request's
    /// connection and body are, the trace fields to send with it, and whether it is a
    /// gRPC call.
    fn prime(
        &self,
        shared: &mut Shared,
        client: Option<IpAddr>,
        peer: &Peer,
        body: Option<Arc<BodyState>>,
        fields: NewFields,
        grpc: bool,
    ) {
        #[cfg(feature = "redis")]
        let core = {
            if let Some(limit) = shared.limit_mut() {
                limit.extractor_mut().0.client = client;
            }
            shared.get_mut().get_mut()
        };
        #[cfg(not(feature = "redis"))]
        let (core, _) = (shared, client);
        core.forwarded_for = Forwarding {
            peer: peer.forwarded_for.clone(),
            https: peer.https,
        };
        core.body = body;
        core.timers = peer.timers.clone();
        core.trace = fields;
        core.grpc = grpc;
    }

    /// The route's state now.
    pub(crate) fn status(&self) -> RouteStatus {
        let core = &self.core;
        core.balance.refresh();
        let stats = &core.stats;
        RouteStatus {
            name: core.name.clone(),
            path_prefix: core.prefix.clone(),
            service: core.service.clone(),
            requests: stats.requests.load(Relaxed),
            responses: stats.responses(),
            fallbacks: stats.fallbacks.load(Relaxed),
            rate_limited: stats.rate_limited.load(Relaxed),
            unauthorized: stats.unauthorized.load(Relaxed),
            upstream_errors: stats.upstream_errors(),
            client_errors: stats.client_errors(),
            latency_ms: stats.latency(),
            limits: core.limits(),
            endpoints: core
                .handle
                .endpoints()
                .into_iter()
                .map(|e| EndpointReport {
                    key: e.key,
                    address: e.address,
                    outstanding: e.outstanding,
                    calls: e.calls,
                    failures: e.failures,
                    ejected: e.ejected_for.is_some(),
                    ejected_for_ms: e
                        .ejected_for
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    ejections: e.ejections,
                    breaker: e
                        .breaker
                        .map(|s| super::status::breaker_state(s).to_owned()),
                })
                .collect(),
        }
    }
}

impl RouteCore {
    /// The route's limits now.
    fn limits(&self) -> Limits {
        let global = self.global.as_ref().map(|(l, per_second)| GlobalLimit {
            available: Some(l.available()),
            burst: l.burst(),
            per_second: *per_second,
            policy: LimitPolicy::Local.as_str().to_owned(),
            redis: None,
        });
        let per_client = self
            .per_client
            .as_ref()
            .map(|(l, per_second, burst, key)| ClientLimit {
                clients: Some(l.clients()),
                burst: *burst,
                per_second: *per_second,
                key: key.clone(),
                policy: LimitPolicy::Local.as_str().to_owned(),
                redis: None,
            });
        #[cfg(feature = "redis")]
        let global = global.or_else(|| {
            self.redis_global
                .as_ref()
                .map(|(l, per_second, burst)| GlobalLimit {
                    available: None,
                    burst: *burst,
                    per_second: *per_second,
                    policy: LimitPolicy::Redis.as_str().to_owned(),
                    redis: Some(l.status()),
                })
        });
        #[cfg(feature = "redis")]
        let per_client = per_client.or_else(|| {
            self.redis_per_client
                .as_ref()
                .map(|(l, per_second, burst, key)| ClientLimit {
                    clients: None,
                    burst: *burst,
                    per_second: *per_second,
                    key: key.clone(),
                    policy: LimitPolicy::Redis.as_str().to_owned(),
                    redis: Some(l.status()),
                })
        });
        Limits { global, per_client }
    }
}

/// The innermost service of a route's stack: fallback, timeout and the balancer. It
/// never fails: every error becomes a response.
#[derive(Clone)]
struct Core {
    /// Taken by `call`: the clone of the stack made for a request is called once.
    route: Option<Arc<RouteCore>>,
    /// The peer's `X-Forwarded-For` entry and whether it came over TLS, set on the
    /// stack's clone for each request.
    forwarded_for: Forwarding,
    /// The state of the request's body, if it has one, set likewise.
    body: Option<Arc<BodyState>>,
    /// The client connection's timers, set likewise.
    timers: Option<ConnTimers>,
    /// The trace fields the gateway made for the request, set likewise.
    trace: NewFields,
    /// The request is a gRPC call, set likewise.
    grpc: bool,
}

impl Service<Request<Body>> for Core {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Forward;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Forward {
        // A clone of the stack is made for each request and called once: its reference
        // is moved into the future, not counted again.
        let Some(route) = self.route.take() else {
            // Called twice: cannot happen (`Route::respond` clones the stack each time).
            return Forward {
                call: ForwardCall::Done {
                    response: Some(stack_reused()),
                },
                route: None,
            };
        };
        let added = route.upstream_request(
            &mut request,
            std::mem::take(&mut self.forwarded_for),
            std::mem::take(&mut self.trace),
        );
        // A gRPC caller's own deadline: the call's, when it is the earlier one, and what
        // the end of its answer is judged against in any case.
        let budget = if self.grpc {
            super::grpc::caller_budget(request.headers_mut())
        } else {
            None
        };
        let now = super::poll_clock::now();
        let call = Call {
            deadline: now + budget.map_or(route.timeout, |b| b.min(route.timeout)),
            caller_deadline: budget.and_then(|b| now.checked_add(b)),
            body: self.body.take(),
            timers: self.timers.take(),
            added,
        };
        let mut upstream = UpstreamCall {
            route: route.clone(),
        };
        let call = match &route.fallback {
            Some(fallback) => ForwardCall::Fallback {
                future: fallback.layer(upstream).call((request, call)),
            },
            None => ForwardCall::Plain {
                future: upstream.call((request, call)),
            },
        };
        Forward {
            call,
            route: Some(route),
        }
    }
}

/// The answer of a [`Core`] called twice (or a [`Forward`] polled after completion).
fn stack_reused() -> Response<Body> {
    json_error(StatusCode::INTERNAL_SERVER_ERROR, "route stack reused")
}

/// The future of the route's fallback around [`UpstreamCall`].
type FallbackCall = <crate::fallback::Fallback<UpstreamCall, FromFn<FallbackFn>> as Service<
    UpstreamRequest,
>>::Future;

pin_project_lite::pin_project! {
    /// The future of [`Core`]: the upstream call, through the route's fallback if it has
    /// one; its error answered. Named, not boxed: no allocation per request.
    pub(crate) struct Forward {
        #[pin]
        call: ForwardCall,
        route: Option<Arc<RouteCore>>,
    }
}

pin_project_lite::pin_project! {
    #[project = ForwardCallProj]
    enum ForwardCall {
        Plain { #[pin] future: Classified },
        Fallback { #[pin] future: FallbackCall },
        // Answered without a call.
        Done { response: Option<Response<Body>> },
    }
}

impl Future for Forward {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.call.project() {
            ForwardCallProj::Plain { future } => std::task::ready!(future.poll(cx)),
            ForwardCallProj::Fallback { future } => std::task::ready!(future.poll(cx)),
            ForwardCallProj::Done { response } => {
                return Poll::Ready(Ok(response.take().unwrap_or_else(stack_reused)));
            }
        };
        let Some(route) = this.route.take() else {
            // Polled after completion.
            return Poll::Ready(Ok(stack_reused()));
        };
        Poll::Ready(Ok(match result {
            Ok(response) => {
                if response.extensions().get::<FellBack>().is_some() {
                    route.stats.fallbacks.fetch_add(1, Relaxed);
                }
                response
            }
            Err(e) => route.failure_response(&e),
        }))
    }
}

/// Why an upstream call produced no usable response.
#[derive(Clone, Copy)]
enum Failure {
    Timeout,
    /// Breakers open or no endpoint; when an open breaker knows when it probes again.
    Unavailable(Option<Duration>),
    BadGateway,
    ServerError,
}

/// `Some` when `error` is, anywhere in its source chain, a breaker's rejection or a
/// balancer's [`NoEndpoints`]: with when the first open breaker admits a probe again, if
/// its rejection says. One walk of the chain.
fn unavailable(error: &BoxError) -> Option<Option<Duration>> {
    match rejection_in(error) {
        Some(rejection) => Some(rejection.and_then(Rejection::retry_after)),
        None => crate::caused_by::<NoEndpoints>(error).then_some(None),
    }
}

/// A failed upstream call, as [`UpstreamCall`] classified and counted it: answered by the
/// route's fallback, or by [`RouteCore::failure_response`].
#[derive(Debug)]
struct RouteFailure(Failure);

impl std::fmt::Display for RouteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Failure::Timeout => "upstream timed out",
            Failure::Unavailable(_) => "no upstream available",
            Failure::BadGateway | Failure::ServerError => "upstream failed",
        })
    }
}

impl std::error::Error for RouteFailure {}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Failure::Timeout => "Timeout",
            Failure::Unavailable(_) => "Unavailable",
            Failure::BadGateway => "BadGateway",
            Failure::ServerError => "ServerError",
        })
    }
}

/// Marks a response the route's fallback made (in its extensions: an upstream cannot set
/// it, as it could a header).
#[derive(Clone, Copy)]
struct FellBack;

/// The route's `[routes.fallback]`: a [`FallbackLayer`] answering every upstream failure
/// with the configured response, marked `x-seawall-fallback: true`.
type RouteFallback = FallbackLayer<FromFn<FallbackFn>>;
type FallbackFn = Box<dyn Fn(BoxError) -> Response<Body> + Send + Sync>;

fn route_fallback(settings: &FallbackSettings) -> RouteFallback {
    let status = StatusCode::from_u16(settings.status).unwrap_or(StatusCode::OK);
    let content_type = HeaderValue::from_str(&settings.content_type).ok();
    let body = Bytes::from(settings.body.clone());
    let answer: FallbackFn = Box::new(move |_failure: BoxError| {
        let mut response = Response::new(full(body.clone()));
        *response.status_mut() = status;
        if let Some(v) = &content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, v.clone());
        }
        response
            .headers_mut()
            .insert(FALLBACK_HEADER.clone(), HeaderValue::from_static("true"));
        response.extensions_mut().insert(FellBack);
        response
    });
    FallbackLayer::from_fn(answer)
}

/// The call to the route's endpoints through its shared balancer, as a service: an
/// answer is a response; the client's own faults are answered here (never by the
/// fallback); upstream failures (and 5xx answers, when the route has a fallback) are
/// counted by kind and become [`RouteFailure`] errors for the fallback layer above.
struct UpstreamCall {
    route: Arc<RouteCore>,
}

impl Service<UpstreamRequest> for UpstreamCall {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Classified;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The shared balancer is waited for in the call, within the route's deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: UpstreamRequest) -> Classified {
        let deadline = request.1.deadline;
        // Waiting for an endpoint counts against the route's timeout too.
        let call = self
            .route
            .balance
            .local()
            .call::<UpstreamRequest>(request, Some(deadline));
        Classified {
            call,
            route: Some(self.route.clone()),
        }
    }
}

type BalanceCall = crate::balance::SharedCall<
    Upstreams,
    UpstreamRequest,
    <Upstreams as Service<UpstreamRequest>>::Future,
>;

pin_project_lite::pin_project! {
    /// The future of [`UpstreamCall`].
    struct Classified {
        #[pin]
        call: BalanceCall,
        route: Option<Arc<RouteCore>>,
    }
}

impl Future for Classified {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.call.poll(cx));
        let Some(route) = this.route.take() else {
            return Poll::Ready(Err("UpstreamCall polled after completion".into()));
        };
        Poll::Ready(route.classify(result))
    }
}

impl RouteCore {
    /// An endpoint's answer or error, as the route passes it on: see [`UpstreamCall`].
    fn classify(
        self: Arc<Self>,
        result: Result<Response<PooledBody>, BoxError>,
    ) -> Result<Response<Body>, BoxError> {
        // A `501` answers the client's method (any client can send one): the client's
        // doing, as for the endpoint's breaker (see `Route::new`), so neither counted as
        // the upstream's error nor replaced by the fallback.
        let server_error =
            |status: StatusCode| status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED;
        let failure = match result {
            Ok(response) if server_error(response.status()) && self.fallback.is_some() => {
                Failure::ServerError
            }
            Ok(response) => {
                if server_error(response.status()) {
                    self.stats.server_errors.fetch_add(1, Relaxed);
                }
                return Ok(downstream_response(response, self));
            }
            Err(e) => match ClientFault::of(&e) {
                // The client's doing: its answer, never the fallback's.
                Some(fault) => return Ok(self.client_fault(fault)),
                None => match unavailable(&e) {
                    Some(retry_after) => Failure::Unavailable(retry_after),
                    // No endpoint ready in time, or no answer in time.
                    None if e.is::<ReadyTimeout>()
                        || matches!(
                            e.downcast_ref::<UpstreamError>(),
                            Some(UpstreamError::Timeout)
                        ) =>
                    {
                        Failure::Timeout
                    }
                    None => Failure::BadGateway,
                },
            },
        };
        let counter = match failure {
            Failure::Timeout => &self.stats.timeouts,
            Failure::Unavailable(_) => &self.stats.unavailable,
            Failure::BadGateway => &self.stats.bad_gateway,
            Failure::ServerError => &self.stats.server_errors,
        };
        counter.fetch_add(1, Relaxed);
        Err(Box::new(RouteFailure(failure)))
    }

    /// The answer to an upstream failure the route has no fallback for: `504`, `503`
    /// (with `Retry-After` when an open breaker says when it probes again) or `502`.
    fn failure_response(&self, error: &BoxError) -> Response<Body> {
        let failure = error
            .downcast_ref::<RouteFailure>()
            .map_or(Failure::BadGateway, |f| f.0);
        let status = match failure {
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Failure::BadGateway | Failure::ServerError => StatusCode::BAD_GATEWAY,
        };
        let mut response = json_error(status, &RouteFailure(failure).to_string());
        if let Failure::Unavailable(Some(after)) = failure {
            // Whole seconds, rounded up, as `Retry-After` wants.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }

    /// The answer to a request the client is to blame for, counted in `client_errors`.
    /// The connection is closed after it: the rest of the client's body, if any, is not
    /// read.
    fn client_fault(&self, fault: ClientFault) -> Response<Body> {
        let (status, message) = self.count_client_fault(fault);
        let mut response = json_error(status, message);
        if !matches!(fault, ClientFault::Deadline) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Counts a request the client is to blame for in `client_errors`; its answer's
    /// status and text.
    fn count_client_fault(&self, fault: ClientFault) -> (StatusCode, &'static str) {
        let stats = &self.stats;
        let (counter, status, message) = match fault {
            ClientFault::BadBody => (
                &stats.bad_body,
                StatusCode::BAD_REQUEST,
                "malformed or incomplete request body",
            ),
            ClientFault::BodyTimeout => (
                &stats.body_timeouts,
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not come in time",
            ),
            ClientFault::TooLarge => (
                &stats.too_large,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ),
            ClientFault::HeaderTooLong => (
                &stats.headers_too_large,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request header too large",
            ),
            ClientFault::Deadline => (
                &stats.deadlines,
                StatusCode::GATEWAY_TIMEOUT,
                "the call's deadline (grpc-timeout) passed before the upstream answered",
            ),
        };
        counter.fetch_add(1, Relaxed);
        #[cfg(feature = "tracing")]
        tracing::debug!(
            target: "seawall::gateway",
            route = %self.name,
            status = status.as_u16(),
            "client error: {message}"
        );
        (status, message)
    }

    /// The request's target as sent upstream, in origin form (`/path?query`), the prefix
    /// stripped if asked: `/` then what follows the returned byte of the URI's path and
    /// query, for the endpoint's connection to write (or put into the URI: see
    /// [`h1::Added::apply`]); `None` when it is the path and query as they are. The path
    /// is the normalised one ([`super::path`]); what is left after the prefix never starts
    /// with `//` (`/api//evil.example/x` is sent as `/evil.example/x`), even with
    /// `merge_slashes` off.
    fn upstream_target(&self, uri: &Uri) -> Option<usize> {
        let strip = self.strip && self.prefix != "/";
        if !strip && uri.scheme().is_none() && uri.authority().is_none() {
            // Origin form already, unchanged.
            return None;
        }
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let rest = if strip {
            let path = uri.path();
            let cut = match path.strip_prefix(self.prefix.as_str()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => self.prefix.len(),
                // Matched in its match form (`;` parameters dropped, escapes decoded):
                // the prefix's segments, as they were written.
                _ => super::path::after_prefix_segments(path, &self.prefix),
            };
            &path_and_query[cut..]
        } else {
            path_and_query
        };
        // One `/` first: never `//`, an authority to whoever reads it as a URL; and when
        // the whole path was the prefix, `/api` or `/api?q` becomes `/` or `/?q`.
        let rest = rest.trim_start_matches('/');
        Some(path_and_query.len() - rest.len())
    }

    /// The request as sent upstream: hop-by-hop headers dropped, the forwarding headers
    /// set from what the gateway saw (see [`super::headers`]); and what the endpoint's
    /// connection adds to it: those headers and the target, the prefix stripped.
    ///
    /// Rewritten in place: taking the request apart and putting it together again would
    /// copy it twice more.
    fn upstream_request(
        &self,
        request: &mut Request<Body>,
        forwarding: Forwarding,
        trace: NewFields,
    ) -> h1::Added {
        let Forwarding { peer, https } = forwarding;
        let target_from = self.upstream_target(request.uri());
        // The peer's entry is its address's text: parsed back only if a proxy is trusted.
        let trusted = self.trusted.trusts_any()
            && peer
                .as_ref()
                .and_then(|p| p.to_str().ok()?.parse::<IpAddr>().ok())
                .is_some_and(|ip| self.trusted.trusts(ip));
        let headers = request.headers_mut();
        let rewritten = super::headers::rewrite(headers, peer.as_ref(), trusted, https);
        // `TE: trailers`, and only that, goes on (gRPC servers ask for it); any other `TE`
        // is the client's hop alone.
        if rewritten.te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        *request.version_mut() = http::Version::HTTP_11;
        h1::Added {
            forwarded: rewritten.forwarded,
            target_from,
            trace,
        }
    }
}

/// Set to `true` on fallback responses.
pub static FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-seawall-fallback");

fn downstream_response(response: Response<PooledBody>, route: Arc<RouteCore>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    // A head parsed without hop-by-hop fields (most) has nothing to remove.
    if body.head_facts().hop_by_hop() {
        remove_hop_by_hop(&mut parts.headers);
    }
    if body.head_facts().grpc()
        && parts
            .extensions
            .remove::<super::grpc::CallersDeadline>()
            .is_some()
    {
        route.count_client_fault(ClientFault::Deadline);
    }
    let grpc_outcome = parts
        .extensions
        .remove::<super::grpc::PendingOutcome>()
        .and_then(|pending| pending.take());
    // Only a gRPC answer whose status is still to come has one (and a pending outcome):
    // no second look in the extensions for every other answer.
    let grpc_call = match grpc_outcome {
        Some(_) => parts.extensions.remove::<super::grpc::CallContext>(),
        None => None,
    };
    let upload = match parts.extensions.is_empty() {
        true => None,
        false => parts.extensions.remove::<Upload>().map(|upload| upload.0),
    };
    let body = BodyTimeout {
        body,
        route,
        sleep: None,
        progressed: false,
        failed: false,
        grpc_outcome,
        grpc_call,
        upload,
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// An upstream response body that fails once the upstream has sent nothing of it for the
/// route's timeout: a response whose head came in time cannot hang after it either. The
/// timer is made only when the body first has to wait (most bodies come whole with their
/// head), then pushed back at each frame.
struct BodyTimeout {
    body: PooledBody,
    route: Arc<RouteCore>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    progressed: bool,
    /// Timed out: ended, whoever polls it again.
    failed: bool,
    /// A gRPC answer's outcome, recorded when its trailers (or its end) come. Dropped
    /// unrecorded (ignored) if the body is dropped or times out first: a stall after a
    /// good head is counted as a timeout, as for other answers.
    grpc_outcome: Option<crate::circuit_breaker::Recorder>,
    /// What that outcome is judged against besides the upstream: the client's body and
    /// the caller's deadline.
    grpc_call: Option<super::grpc::CallContext>,
    /// The client's body, if it was still coming when the answer's head came: an answer
    /// stalled while the exchange waits on it is the client's (an upstream streaming its
    /// answer to the upload), not an upstream timeout.
    upload: Option<Arc<BodyState>>,
}

impl hyper::body::Body for BodyTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        if let Poll::Ready(mut frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.progressed = true;
            if this.grpc_outcome.is_some() {
                let fault =
                    super::grpc::settle(&mut this.grpc_outcome, this.grpc_call.as_ref(), &frame);
                if let Some(fault) = fault {
                    let (status, message) = this.route.count_client_fault(fault);
                    if matches!(frame, Some(Err(_))) {
                        // The upstream's stream was reset for the client's body: the
                        // caller is told why in gRPC's trailers, not by a reset.
                        this.failed = true;
                        return Poll::Ready(Some(Ok(super::grpc::cut_trailers(status, message))));
                    }
                }
            }
            // The body broke off after a good head (a malformed chunk, a reset, a close
            // before its `Content-Length`): the upstream's failure, counted as a stall
            // after the head is (`timeouts`), unless it broke for the client's own body
            // (failed, or stalled when the upstream dropped the connection: see
            // `UpstreamFuture`).
            if let Some(Err(e)) = &frame
                && e.is_upstreams_in_body()
            {
                match &this.upload {
                    Some(upload) if upload.failure().is_some() => {}
                    Some(upload) if upload.waiting_on_client() && e.is_connection_lost() => {
                        this.route.count_client_fault(ClientFault::BodyTimeout);
                    }
                    _ => {
                        this.route.stats.bad_gateway.fetch_add(1, Relaxed);
                    }
                }
            }
            // Trailers (HTTP/1 or HTTP/2 upstreams) lose what may not be forwarded in them.
            if let Some(trailers) = frame
                .as_mut()
                .and_then(|f| f.as_mut().ok())
                .and_then(|f| f.trailers_mut())
            {
                super::headers::sanitize_trailers(trailers);
            }
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        let timeout = this.route.body_timeout;
        let sleep = match &mut this.sleep {
            Some(sleep) => {
                if this.progressed {
                    sleep.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                sleep
            }
            None => this.sleep.insert(Box::pin(tokio::time::sleep(timeout))),
        };
        this.progressed = false;
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if this.upload.as_ref().is_some_and(|b| b.waiting_on_client()) {
            this.route.count_client_fault(ClientFault::BodyTimeout);
        } else {
            this.route.stats.timeouts.fetch_add(1, Relaxed);
        }
        this.sleep = None;
        this.failed = true;
        if this.grpc_outcome.take().is_some() {
            // A gRPC answer whose status was to come: the caller is told in gRPC's
            // trailers (a timeout is `DEADLINE_EXCEEDED`), not by a stream reset.
            return Poll::Ready(Some(Ok(super::grpc::cut_trailers(
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream sent nothing for the route's body timeout",
            ))));
        }
        Poll::Ready(Some(Err(BoxError::from(
            "the upstream sent nothing of the response body for the route's body timeout",
        ))))
    }

    fn is_end_stream(&self) -> bool {
        // An outcome still to record: one more poll, to see how the body ends.
        self.failed || (self.grpc_outcome.is_none() && self.body.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.failed {
            return hyper::body::SizeHint::with_exact(0);
        }
        self.body.size_hint()
    }
}
