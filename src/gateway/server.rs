//! The gateway server: building the routes, serving HTTP/1 (`h1_server`) and HTTP/2
//! (hyper), shutting down.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::borrow::Cow;

use http::{Method, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

#[cfg(unix)]
use super::affinity::CpuAffinity;
use super::body::{Body, full, json_error};
use super::client::SendTimeout;
use super::config::GatewayConfig;
use super::headers::check_request;
use super::jwt::JwtVerifier;
use super::metrics::GatewayMetrics;
use super::path::{PathOptions, normalize};
use super::pool::Pools;
use super::route::{Peer, Route};
use super::status::GatewayStatus;
use super::stream_watch::{HasWatch, Stalls, StreamWatch, Stuck, Watched};
use super::timers::ConnTimers;
use crate::BoxError;
use crate::ConfigError;
#[cfg(feature = "consul")]
use crate::consul::{ConsulClient, ConsulWatch, WatchConfig};
use crate::discovery::{Instance, InstanceWatch, Registry};

/// The path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";
/// The path of the JSON status.
pub const STATUS_PATH: &str = "/status.json";
/// The path of the live status page, an HTML page that polls [`STATUS_PATH`].
pub const STATUS_PAGE_PATH: &str = "/status";

/// The live status page: one self-contained HTML file (no external resources).
const STATUS_PAGE: &str = include_str!("status.html");

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where services not listed in `[[services]]` are found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Discovery {
    /// Nowhere: every route's service must be listed statically.
    Static,
    /// An in-process [`Registry`].
    Registry(Registry),
    /// A Consul agent, followed with a [`ConsulWatch`] per service (feature `consul`).
    #[cfg(feature = "consul")]
    Consul(ConsulClient),
}

/// Why a gateway could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// The configuration is invalid for this discovery source.
    Config(ConfigError),
    /// A route's stack could not be built.
    Route {
        /// The route.
        route: String,
        /// Why.
        source: BoxError,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => fmt::Display::fmt(e, f),
            Self::Route { route, source } => write!(f, "route `{route}`: {source}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Route { source, .. } => Some(source.as_ref()),
        }
    }
}

impl From<ConfigError> for BuildError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// An API gateway: routes built from a [`GatewayConfig`]. Cloning is cheap and clones
/// share everything (routes, limiters, balancers, counters).
///
/// Served on a listener of its own ([`spawn`](Self::spawn), [`serve`](Self::serve),
/// [`spawn_threads`](Self::spawn_threads)), or as a [`tower::Service`] inside another
/// server:
///
/// ```
/// use std::net::SocketAddr;
/// use seawall::discovery::{Instance, Registry};
/// use seawall::gateway::{Discovery, Gateway, GatewayConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seawall::BoxError> {
/// let config = GatewayConfig::from_toml_str(r#"
///     [gateway]
///     listen = "127.0.0.1:0"
///     [[routes]]
///     name = "users"
///     path_prefix = "/users"
///     service = "users"
///     rate_limit = { per_client = { per_second = 10, burst = 20 } }
/// "#)?;
/// let registry = Registry::new();
/// let _users = registry.register(Instance::local("users", "127.0.0.1:9001".parse()?));
/// let gateway = Gateway::build(config, Discovery::Registry(registry)).await?;
///
/// // In an axum application, under /api, with the peer's address from connect info.
/// let app = axum::Router::new().nest_service("/api", gateway.clone());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let server = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>());
/// # drop(server);
/// assert_eq!(gateway.status().routes[0].name, "users");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    /// In configuration order.
    routes: Vec<Route>,
    /// Indices into `routes`, longest prefix first.
    by_prefix: Vec<usize>,
    unmatched: AtomicU64,
    /// Request heads the HTTP/1 server refused.
    refused: AtomicU64,
    /// `[gateway] send_timeout`, and the connections it closed.
    send_timeout: Duration,
    send_timeouts: Arc<AtomicU64>,
    /// `[gateway] max_headers_size`: the largest request head, `431` past it.
    max_headers_size: usize,
    started: tokio::time::Instant,
    listen: SocketAddr,
    /// How request paths are normalised before matching.
    paths: PathOptions,
    /// The admin endpoints' settings.
    admin: Admin,
    /// Kept alive for as long as the gateway.
    #[cfg(feature = "consul")]
    _watches: Vec<ConsulWatch>,
    /// Every endpoint's pool; the sweeper stops once this is dropped.
    pools: Arc<Pools>,
    /// The recorder `/metrics` renders.
    metrics: GatewayMetrics,
    /// `[gateway] h2c`: HTTP/2 with prior knowledge on a cleartext listener.
    h2c: bool,
    /// `[gateway.http2]`.
    http2: super::config::Http2Settings,
    /// `[gateway.tls]`, loaded.
    #[cfg(feature = "tls")]
    tls: Option<Arc<super::tls::Tls>>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("listen", &self.inner.listen)
            .field(
                "routes",
                &self
                    .inner
                    .routes
                    .iter()
                    .map(|r| r.core.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Gateway {
    /// Builds every route: its limiters, its balancer over the service's instances (listed
    /// in `[[services]]`, or else found through `discovery`), a pool of keep-alive
    /// connections per endpoint.
    ///
    /// # Errors
    ///
    /// [`BuildError::Config`] when a route's service is unknown with
    /// [`Discovery::Static`], or the configuration does not validate.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the gateway spawns a task that closes upstream
    /// connections left idle for 30 s (and, with
    #[cfg_attr(feature = "consul", doc = "[`Discovery::Consul`]")]
    #[cfg_attr(not(feature = "consul"), doc = "`Discovery::Consul`")]
    /// (feature `consul`), one per watch).
    pub async fn build(config: GatewayConfig, discovery: Discovery) -> Result<Self, BuildError> {
        config.validate()?;
        // Before any breaker or limiter registers its metric handles.
        let metrics = GatewayMetrics::new();
        if matches!(discovery, Discovery::Static) {
            config.check_static_services()?;
        }
        // A service no route names is checked as the others are (at load), and built
        // into nothing: staged for a route to come, or forgotten when its route went.
        #[cfg(feature = "tracing")]
        for service in &config.services {
            if !config.routes.iter().any(|r| r.service == service.name) {
                tracing::warn!(
                    target: "seawall::gateway",
                    service = %service.name,
                    "[[services]] entry used by no route: checked, but not served"
                );
            }
        }
        let verifier = config
            .auth
            .jwt
            .as_ref()
            .map(JwtVerifier::from_config)
            .transpose()?;
        let admin = Admin {
            listen: config.admin.listen,
            on_proxy: config.admin.on_proxy_listener,
            token: config
                .admin
                .resolve_token()?
                .map(|token| Sha256::digest(token.as_bytes()).into()),
        };
        // Allowed (a single-port setup behind a private network), never silently: the
        // upstream addresses, routes and limits are then any client's to read.
        #[cfg(feature = "tracing")]
        if admin.on_proxy && admin.token.is_none() {
            tracing::warn!(
                target: "seawall::gateway",
                "admin.on_proxy_listener without a token: /metrics, /status and \
                 /status.json are served to every client of the proxy listener"
            );
        }
        let trusted = config.trusted_proxies()?;
        #[cfg(feature = "tls")]
        let tls = config
            .gateway
            .tls
            .as_ref()
            .map(super::tls::Tls::new)
            .transpose()?;
        #[cfg(feature = "consul")]
        let mut watches = Vec::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        let pools = Arc::new(Pools::default());
        for (i, route) in config.routes.iter().enumerate() {
            let plan = config.route_plan(i).map_err(BuildError::Config)?;
            let service = config.service(&route.service);
            let upstream = super::pool::UpstreamSettings::new(service, i)?;
            let watch = match (service.filter(|s| !s.instances.is_empty()), &discovery) {
                (Some(s), _) => InstanceWatch::fixed(
                    s.instances
                        .iter()
                        .map(|addr| Instance::local(&s.name, *addr))
                        .collect(),
                ),
                (None, Discovery::Registry(registry)) => registry.watch(&route.service),
                #[cfg(feature = "consul")]
                (None, Discovery::Consul(client)) => {
                    let watch = ConsulWatch::spawn(
                        client.clone(),
                        route.service.clone(),
                        WatchConfig::default(),
                    );
                    let instances = watch.instances();
                    watches.push(watch);
                    instances
                }
                (None, Discovery::Static) => {
                    return Err(config.check_static_services().err().map_or_else(
                        || BuildError::Route {
                            route: route.name.clone(),
                            source: "no instances".into(),
                        },
                        BuildError::Config,
                    ));
                }
            };
            let auth = if route.auth { verifier.clone() } else { None };
            let built = Route::new(
                route,
                plan,
                &config.gateway,
                auth,
                watch,
                (&pools, upstream),
                &trusted,
            )
            .map_err(|source| BuildError::Route {
                route: route.name.clone(),
                source,
            })?;
            routes.push(built);
        }
        // Idle upstream connections are closed on time even where nobody asks for one.
        pools.spawn_sweeper();
        let mut by_prefix: Vec<usize> = (0..routes.len()).collect();
        by_prefix.sort_by_key(|&i| std::cmp::Reverse(routes[i].core.prefix.len()));
        Ok(Self {
            inner: Arc::new(Inner {
                routes,
                by_prefix,
                unmatched: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                send_timeout: config.gateway.send_timeout,
                send_timeouts: Arc::default(),
                max_headers_size: config.gateway.max_headers_size,
                started: tokio::time::Instant::now(),
                listen: config.gateway.listen,
                paths: config.gateway.path_options(),
                admin,
                #[cfg(feature = "consul")]
                _watches: watches,
                pools,
                metrics,
                h2c: config.gateway.h2c,
                http2: config.gateway.http2.clone(),
                #[cfg(feature = "tls")]
                tls,
            }),
        })
    }

    /// The address the configuration says to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// Every route's counters and endpoints, as `GET /status.json` serves them.
    pub fn status(&self) -> GatewayStatus {
        GatewayStatus {
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
            unmatched: self.inner.unmatched.load(Relaxed),
            refused: self.inner.refused.load(Relaxed),
            send_timeouts: self.inner.send_timeouts.load(Relaxed),
            retried_stale: self.inner.pools.retried_stale(),
            #[cfg(feature = "tls")]
            tls: self.inner.tls.as_ref().map(|tls| tls.status()),
            #[cfg(not(feature = "tls"))]
            tls: None,
            routes: self.inner.routes.iter().map(Route::status).collect(),
        }
    }

    /// The Prometheus text `GET /metrics` serves: the gateway's series and those the
    /// breakers, limiters and balancers report through the `metrics` facade (see
    /// [`observability`](crate::observability) for every name and label).
    pub fn metrics(&self) -> String {
        self.inner.metrics.render(&self.status())
    }

    /// Answers one request from `peer` as the proxy listener does: its path normalised
    /// ([`path`](super::path); `400` when refused), then the admin paths if
    /// `admin.on_proxy_listener` is set, else the route with the longest matching prefix,
    /// else 404. Never fails.
    ///
    /// Any body type will do; the gateway is also a [`tower::Service`] of requests (see
    /// [`Gateway`]), which finds the peer in the request's extensions.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_from(request, &Peer::new(peer)).await
    }

    /// The route named `name` as a service of its own: what the gateway does for a request
    /// matched to it (`Host` and path checks, authentication, limits, forwarding), for any
    /// request given to it, whatever its path. `None` when there is no such route.
    ///
    /// A route with `strip_prefix` strips its prefix only from paths under it.
    pub fn route(&self, name: &str) -> Option<RouteService> {
        let index = self.inner.routes.iter().position(|r| r.core.name == name)?;
        Some(RouteService {
            gateway: self.clone(),
            index,
        })
    }

    /// Checks a request's `Host` and normalises its path in place; the answer when refused.
    // The answer is returned by value, on the refusal path only: boxing it would cost an
    // allocation there and change nothing on the path every request takes.
    #[allow(clippy::result_large_err)]
    fn prepare<B>(&self, request: &mut Request<B>, peer: &Peer) -> Result<(), Response<Body>> {
        if request.method() == Method::CONNECT {
            // A tunnel, which the gateway does not make, whatever server hands it the
            // request (its own HTTP/1 server refuses it first; hyper's, under axum or
            // over HTTP/2, does not): proxied, the upstream's 2xx would make the server
            // and the client take the connection for a tunnel (RFC 9110 §9.3.6).
            self.inner.refused.fetch_add(1, Relaxed);
            let mut refused = json_error(StatusCode::NOT_IMPLEMENTED, "CONNECT is not supported");
            // The client may already be sending the tunnel's bytes.
            refused
                .headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            return Err(refused);
        }
        // HTTP/2 names the host in `:authority` (in the URI): as `Host` from here on, so
        // that it is checked, and forwarded, as HTTP/1's is.
        if request.version() == http::Version::HTTP_2
            && !request.headers().contains_key(header::HOST)
        {
            if let Some(host) = request
                .uri()
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            {
                request.headers_mut().insert(header::HOST, host);
            }
        } else if let Some(authority) = request.uri().authority() {
            // An HTTP/1 target in absolute form: its authority is the request's host,
            // whatever `Host` says (RFC 9112 §3.2.2), checked and forwarded as `Host` is.
            match http::HeaderValue::from_str(authority.as_str()) {
                Ok(host) => {
                    request.headers_mut().insert(header::HOST, host);
                }
                Err(_) => {
                    return Err(bad_path(
                        &self.inner.refused,
                        request,
                        peer,
                        "invalid Host header",
                    ));
                }
            }
        }
        // Exactly one valid `Host` (RFC 9112 §3.2), whatever the path: before routing, so
        // that unmatched and admin paths are held to it too.
        if let Err(bad) = check_request(request.version(), request.headers(), false) {
            return Err(bad_path(&self.inner.refused, request, peer, bad.message()));
        }
        // Matched and forwarded on its normal form; rewritten only when not normal.
        let rewritten = match normalize(request.uri().path(), self.inner.paths) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(path)) => Some(path),
            Err(e) => return Err(bad_path(&self.inner.refused, request, peer, &e.to_string())),
        };
        if let Some(mut path) = rewritten {
            if let Some(query) = request.uri().query() {
                path.push('?');
                path.push_str(query);
            }
            match Uri::try_from(path) {
                Ok(uri) => *request.uri_mut() = uri,
                Err(_) => return Err(bad_path(&self.inner.refused, request, peer, "invalid path")),
            }
        }
        Ok(())
    }

    /// [`Gateway::handle`] for a connection's peer, made once per connection.
    ///
    /// Not an `async fn`: one would copy the request from its argument into its state
    /// before using it; the `async` block uses it where it was put.
    #[allow(clippy::manual_async_fn)]
    fn handle_from<B>(
        &self,
        mut request: Request<B>,
        peer: &Peer,
    ) -> impl Future<Output = Response<Body>>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        async move {
            // A gRPC caller gets the gateway's own answers as gRPC statuses.
            let grpc = super::grpc::grpc_caller(request.headers());
            // The route is awaited here, not in an `async fn` of its own: each would keep
            // another copy of the request in its state.
            let response = match self.route_for(&mut request, peer) {
                Ok(route) => route.handle(request, peer, grpc.is_some()).await,
                Err(answer) => answer,
            };
            match grpc {
                Some(caller) => super::grpc::for_grpc_caller(response, caller),
                None => response,
            }
        }
    }

    /// Checks a request and finds its route; the answer when there is none to call (a
    /// refusal, an admin path, or no route matched).
    // The answer is returned by value, as `prepare`'s.
    #[allow(clippy::result_large_err)]
    fn route_for<B>(
        &self,
        request: &mut Request<B>,
        peer: &Peer,
    ) -> Result<&Route, Response<Body>> {
        self.prepare(request, peer)?;
        let path = request.uri().path();
        if self.inner.admin.on_proxy && is_admin_path(path) {
            return Err(self.handle_admin(request));
        }
        // Matched as the upstreams behind read it: `;` parameters dropped, reserved
        // characters' escapes decoded (the path itself for nearly every request).
        let target = super::path::match_form(path);
        let route = self
            .inner
            .by_prefix
            .iter()
            .map(|&i| &self.inner.routes[i])
            .find(|r| r.matches(&target));
        route.ok_or_else(|| {
            self.inner.unmatched.fetch_add(1, Relaxed);
            json_error(StatusCode::NOT_FOUND, "no route")
        })
    }

    /// Answers a request to the admin listener: `GET` or `HEAD` of [`METRICS_PATH`],
    /// [`STATUS_PATH`] or [`STATUS_PAGE_PATH`], with the bearer token when `[admin]` sets
    /// one (`401` without it, compared in constant time); `404` for other paths, `405` for
    /// other methods. Embedders serving the admin endpoints themselves can call it.
    pub fn handle_admin<B>(&self, request: &Request<B>) -> Response<Body> {
        if let Some(expected) = &self.inner.admin.token {
            if !admin_token_matches(request.headers(), expected) {
                #[cfg(feature = "tracing")]
                tracing::debug!(
                    target: "seawall::gateway",
                    path = request.uri().path(),
                    "admin request without a valid token"
                );
                let mut response = json_error(StatusCode::UNAUTHORIZED, "admin token required");
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"seawall-admin\""),
                );
                return response;
            }
        }
        let path = request.uri().path();
        if !is_admin_path(path) {
            return json_error(StatusCode::NOT_FOUND, "no such admin endpoint");
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = json_error(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only");
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            METRICS_PATH => text(self.metrics(), "text/plain; version=0.0.4; charset=utf-8"),
            STATUS_PATH => {
                let json =
                    serde_json::to_string(&self.status()).unwrap_or_else(|_| String::from("{}"));
                text(json, "application/json")
            }
            _ => text(STATUS_PAGE, "text/html; charset=utf-8"),
        }
    }

    /// The admin listener's address from `[admin] listen`, if set.
    pub fn admin_listen_addr(&self) -> Option<SocketAddr> {
        self.inner.admin.listen
    }

    /// Serves the admin endpoints ([`handle_admin`](Self::handle_admin)) on `listener`
    /// until the future is dropped. Bind it to loopback or a private address.
    pub fn serve_admin(self, listener: TcpListener) -> impl Future<Output = ()> + Send {
        self.serve_inner(
            listener,
            std::future::pending(),
            Duration::from_secs(30),
            true,
        )
    }

    /// Serves the admin endpoints on `listener`, on a task of its own, until the returned
    /// handle's [`shutdown`](GatewayHandle::shutdown): the admin counterpart of
    /// [`spawn`](Self::spawn), for the same gateway (or a clone):
    ///
    /// ```no_run
    /// # use seawall::gateway::{Discovery, Gateway, GatewayConfig};
    /// # async fn run(config: GatewayConfig) -> Result<(), seawall::BoxError> {
    /// let proxy = tokio::net::TcpListener::bind(config.gateway.listen).await?;
    /// let admin = tokio::net::TcpListener::bind(
    ///     config.admin.listen.unwrap_or("127.0.0.1:9901".parse()?),
    /// )
    /// .await?;
    /// let gateway = Gateway::build(config, Discovery::Static).await?;
    /// let admin = gateway.clone().spawn_admin(admin);
    /// let proxy = gateway.spawn(proxy);
    /// // ...
    /// proxy.shutdown().await;
    /// admin.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn_admin(self, listener: TcpListener) -> GatewayHandle {
        self.spawn_inner(listener, true)
    }

    /// Serves connections from `listener` until the future is dropped.
    pub fn serve(self, listener: TcpListener) -> impl Future<Output = ()> + Send {
        self.serve_with_shutdown(listener, std::future::pending())
    }

    /// Serves connections from `listener` until `signal` completes, then stops accepting,
    /// lets every connection finish its request in flight (closing idle keep-alive
    /// connections at once) and returns when all are done, or after `drain` at most.
    pub fn serve_with_shutdown(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = ()> + Send {
        self.serve_inner(listener, signal, Duration::from_secs(30), false)
    }

    /// Serves `listener`: the proxy, or the admin endpoints alone when `admin`.
    async fn serve_inner(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send,
        drain: Duration,
        admin: bool,
    ) {
        let stop = Arc::new(Stop::default());
        let mut connections = JoinSet::new();
        let mut signal = std::pin::pin!(signal);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    // Out of file descriptors and the like: wait a little, keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // Reap finished connections as we go.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let gateway = self.clone();
            let stop = stop.clone();
            // Each poll of the connection reads the clock once (see `poll_clock`).
            connections.spawn(super::poll_clock::Polled::new(
                gateway.serve_connection(stream, peer, stop, admin),
            ));
        }
        drop(listener);
        stop.stop();
        let _ = tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.abort_all();
    }

    /// Serves one accepted connection: TLS first if the listener terminates it, then
    /// HTTP/2 (ALPN `h2`, or h2c's preface when `h2c` is on) or HTTP/1.
    async fn serve_connection(
        self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        stop: Arc<Stop>,
        admin: bool,
    ) {
        let _ = stream.set_nodelay(true);
        // Where the wait for the first request head begins (after a TLS handshake, which
        // has its own bound): the opening bytes read to tell HTTP/2 from HTTP/1 count.
        let accepted = tokio::time::Instant::now();
        let inner = &self.inner;
        let mut io = SendTimeout::new(stream, inner.send_timeout, inner.send_timeouts.clone());
        #[cfg(feature = "tls")]
        if let (Some(tls), false) = (&inner.tls, admin) {
            let tls = tls.clone();
            let accepted = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(io));
            let io = match accepted.await {
                Ok(Ok(io)) => io,
                Ok(Err(_)) => return tls.count(super::tls::Handshake::Failed),
                Err(_) => return tls.count(super::tls::Handshake::TimedOut),
            };
            tls.count(super::tls::Handshake::Done);
            let h2 = io.get_ref().1.alpn_protocol() == Some(b"h2");
            let peer = Peer::new(peer).over_tls();
            let started = tokio::time::Instant::now();
            return self.serve_io(io, peer, stop, false, h2, started).await;
        }
        let peer = Peer::new(peer);
        if inner.h2c && !admin {
            let sniffed = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff_preface(&mut io)).await;
            let Ok(Ok((prefix, h2))) = sniffed else {
                return;
            };
            let io = Prefixed {
                prefix,
                read: 0,
                io,
            };
            return self.serve_io(io, peer, stop, false, h2, accepted).await;
        }
        self.serve_io(io, peer, stop, admin, false, accepted).await;
    }

    /// Serves HTTP on `io` (HTTP/2 when `h2`) until the connection ends or the gateway
    /// stops. The client's first head (HTTP/1), or its first progress (HTTP/2), is due
    /// [`HEADER_READ_TIMEOUT`] after `started`.
    async fn serve_io<I>(
        self,
        io: I,
        peer: Peer,
        stop: Arc<Stop>,
        admin: bool,
        h2: bool,
        started: tokio::time::Instant,
    ) where
        I: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + super::h1_server::Abort
            + Unpin
            + Send
            + 'static,
    {
        let max_headers = self.inner.max_headers_size;
        if h2 {
            // Streams are served concurrently: no timers shared by a connection's
            // requests (each request has its own).
            let settings = self.inner.http2.clone();
            let send_timeout = self.inner.send_timeout;
            let send_timeouts = self.inner.send_timeouts.clone();
            let context = Arc::new(H2Context {
                gateway: self,
                peer,
                watch: StreamWatch::default(),
            });
            let stalls = Stalls::new(context.clone(), send_timeout, send_timeouts);
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(settings.max_concurrent_streams)
                .max_header_list_size(
                    settings
                        .max_header_list_size
                        .unwrap_or(u32::try_from(max_headers).unwrap_or(u32::MAX)),
                )
                .initial_stream_window_size(settings.initial_stream_window)
                .initial_connection_window_size(settings.initial_connection_window)
                .max_pending_accept_reset_streams(settings.max_pending_accept_reset_streams)
                .max_local_error_reset_streams(settings.max_local_error_reset_streams)
                .keep_alive_interval(settings.keep_alive_interval)
                .keep_alive_timeout(settings.keep_alive_timeout)
                // What a stream's answer may hold in the gateway beyond the client's
                // window and socket: hyper's default (400 KiB) times 100 streams held
                // about 36 MiB a connection for a client that reads nothing, where an
                // HTTP/1 connection holds 64 KiB ahead of its client.
                .max_send_buf_size(H2_SEND_BUFFER);
            // A client that sends nothing for `HEADER_READ_TIMEOUT` (no request, not the
            // rest of a head, no window update) has its connection shut down gracefully,
            // as an HTTP/1 client waiting that long for its next head is cut off: streams
            // in flight finish, no new ones start.
            let io = ReadClock::new(io, started);
            let last_read = io.last.clone();
            let connection =
                builder.serve_connection(TokioIo::new(io), serve_requests(context, false));
            let _ = Graceful::new(connection, stop)
                .idle_after(HEADER_READ_TIMEOUT, last_read)
                .stalls(stalls)
                .await;
            return;
        }
        // The connection's timers, reused by its requests (see `timers`).
        let peer = peer.with_timers(ConnTimers::default());
        let gateway = &self;
        let peer = &peer;
        let stopping = || stop.is_stopping();
        let refused = || {
            gateway.inner.refused.fetch_add(1, Relaxed);
        };
        // Two calls, not one through an enum or an async block: each is a future of its
        // own type, and the proxy's path takes no extra layer (about 90 instructions).
        let connection = async {
            if admin {
                let route = |request| std::future::ready(gateway.handle_admin(&request));
                super::h1_server::serve(
                    io,
                    max_headers,
                    HEADER_READ_TIMEOUT,
                    started,
                    stopping,
                    refused,
                    route,
                )
                .await;
            } else {
                let route = |request| gateway.handle_from(request, peer);
                super::h1_server::serve(
                    io,
                    max_headers,
                    HEADER_READ_TIMEOUT,
                    started,
                    stopping,
                    refused,
                    route,
                )
                .await;
            }
        };
        let _ = Graceful::new(ReadsTheStop { connection }, stop.clone()).await;
    }

    /// Serves `listener` on a new task, returning a handle to stop it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self, listener: TcpListener) -> GatewayHandle {
        self.spawn_inner(listener, false)
    }

    fn spawn_inner(self, listener: TcpListener, admin: bool) -> GatewayHandle {
        let local_addr = listener.local_addr().unwrap_or(self.inner.listen);
        let (tx, mut rx) = watch::channel(false);
        let gateway = self.clone();
        let task = tokio::spawn(self.serve_inner(
            listener,
            async move { stopped(&mut rx).await },
            Duration::from_secs(10),
            admin,
        ));
        GatewayHandle {
            local_addr,
            gateway,
            stop: tx,
            task,
        }
    }
}

impl Gateway {
    /// Serves `addr` on `threads` threads of its own, each with its own current-thread
    /// runtime and its own listening socket (`SO_REUSEPORT`: the kernel spreads the
    /// connections), the way nginx runs its worker processes. A connection and its
    /// upstream connections stay on one thread, so no request wakes another thread, and
    /// each thread keeps its own idle upstream connections and picks endpoints with its
    /// own replica of each route's balancer
    /// ([`Balance::replica`](crate::balance::Balance::replica): no lock shared with the
    /// other threads on the request path); routes, limits, breakers, ejections and
    /// counters stay shared by all the threads. On a 2-core machine, with two threads
    /// against a 2-worker multi-thread runtime, it served 8–12% more requests
    /// when the cores were saturated, with 5–10% less CPU per request, and in front of an
    /// upstream taking 1 ms at 16 concurrent callers it added 50–200 µs at p99 against
    /// 100–290 µs (`benches/gateway.rs`).
    ///
    /// With as many threads as CPUs the process may run on, each thread is pinned to one
    /// of them (Linux; [`CpuAffinity::Auto`]): left to the scheduler, two of them now and
    /// then share a core and wait a whole scheduler tick for each other, which showed as
    /// a p99 four times nginx's on a busy 2-core machine. [`spawn_threads_with`](Self::spawn_threads_with)
    /// chooses otherwise.
    ///
    /// Consul discovery and the sweep of idle upstream connections go on in the runtime
    /// that built the gateway, which must keep running. Unix only.
    ///
    /// # Errors
    ///
    /// When a socket cannot be bound (the address is taken) or a runtime cannot be
    /// built; no thread is left running then.
    #[cfg(unix)]
    pub fn spawn_threads(
        self,
        addr: SocketAddr,
        threads: std::num::NonZeroUsize,
    ) -> std::io::Result<GatewayThreads> {
        self.spawn_threads_with(addr, threads, CpuAffinity::default())
    }

    /// [`spawn_threads`](Self::spawn_threads), with the threads pinned to CPUs as
    /// `affinity` says. A thread that cannot be pinned (the CPU was taken from the
    /// process meanwhile) runs unpinned, logged with the `tracing` feature;
    /// [`GatewayThreads::cpus`] tells where each thread runs.
    ///
    /// # Errors
    ///
    /// As [`spawn_threads`](Self::spawn_threads).
    #[cfg(unix)]
    pub fn spawn_threads_with(
        self,
        addr: SocketAddr,
        threads: std::num::NonZeroUsize,
        affinity: CpuAffinity,
    ) -> std::io::Result<GatewayThreads> {
        // Every socket takes SO_REUSEPORT before its bind; the first resolves port 0.
        let bind = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpSocket> {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            Ok(socket)
        };
        let first = bind(addr)?;
        let local_addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..threads.get() {
            sockets.push(bind(local_addr)?);
        }
        let (stop, stop_rx) = watch::channel(false);
        let allowed: Arc<[usize]> = super::affinity::allowed().into();
        let plan = super::affinity::assign(affinity, sockets.len(), &allowed);
        let mut handles = Vec::with_capacity(sockets.len());
        let mut started = Vec::with_capacity(sockets.len());
        for ((i, socket), cpu) in sockets.into_iter().enumerate().zip(plan) {
            let (gateway, mut stop_rx) = (self.clone(), stop_rx.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let allowed = allowed.clone();
            let thread = std::thread::Builder::new()
                .name(format!("seawall-gw-{i}"))
                .spawn(move || {
                    super::pool::set_thread_shard(i + 1);
                    let cpu = cpu.filter(|&cpu| match super::affinity::confine(&[cpu]) {
                        Ok(()) => true,
                        Err(_e) => {
                            #[cfg(feature = "tracing")]
                            tracing::warn!(
                                target: "seawall::gateway",
                                thread = i,
                                cpu,
                                error = %_e,
                                "cannot pin a gateway thread to its CPU: it runs unpinned"
                            );
                            false
                        }
                    });
                    // Sockets and timers only: no signal or process driver to check at
                    // every park. The blocking pool's threads (host name lookups) are
                    // created by this thread and would inherit its pin: they may run on
                    // any CPU the process may.
                    let mut builder = tokio::runtime::Builder::new_current_thread();
                    builder
                        .enable_io()
                        .enable_time()
                        .thread_name(format!("seawall-gw-{i}-b"));
                    if cpu.is_some() {
                        builder.on_thread_start(move || {
                            let _ = super::affinity::confine(&allowed);
                        });
                    }
                    let runtime = match builder.build() {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let listener = match socket.listen(1024) {
                            Ok(listener) => listener,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = tx.send(Ok(cpu));
                        gateway
                            .serve_inner(
                                listener,
                                async move { stopped(&mut stop_rx).await },
                                Duration::from_secs(10),
                                false,
                            )
                            .await;
                    });
                });
            match thread {
                Ok(handle) => {
                    handles.push(handle);
                    started.push(rx);
                }
                Err(e) => {
                    let _ = stop.send(true);
                    return Err(e);
                }
            }
        }
        let mut threads = GatewayThreads {
            local_addr,
            gateway: self,
            stop,
            threads: handles,
            cpus: Vec::with_capacity(started.len()),
        };
        for rx in started {
            match rx.recv() {
                Ok(Ok(cpu)) => threads.cpus.push(cpu),
                Ok(Err(e)) => {
                    threads.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    threads.shutdown();
                    return Err(std::io::Error::other(
                        "a gateway thread died while starting",
                    ));
                }
            }
        }
        Ok(threads)
    }
}

/// A gateway serving on threads of its own ([`Gateway::spawn_threads`]).
#[derive(Debug)]
pub struct GatewayThreads {
    local_addr: SocketAddr,
    gateway: Gateway,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Where each thread is pinned.
    cpus: Vec<Option<usize>>,
}

impl GatewayThreads {
    /// The address every thread listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// For each thread in order (named `seawall-gw-<i>`), the CPU it is pinned to, or
    /// `None` when it runs wherever the operating system puts it ([`CpuAffinity`]).
    pub fn cpus(&self) -> &[Option<usize>] {
        &self.cpus
    }

    /// The gateway (for its status).
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Stops accepting connections, lets requests in flight finish (for 10 s at most) and
    /// returns once every thread is done. Blocks the calling thread: from async code, call
    /// it through `tokio::task::spawn_blocking`.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Tells every connection of a server to finish its request in flight and close, without
/// a shared lock on their way: each checks one flag when polled and registers its waker
/// once (a `watch` or `Notify` receiver would lock their shared waiter list at every poll
/// of every connection).
#[derive(Default)]
struct Stop {
    stopping: AtomicBool,
    /// The wakers of the connections still open, by id; the next id.
    wakers: parking_lot::Mutex<(std::collections::HashMap<u64, Waker>, u64)>,
}

impl Stop {
    fn stop(&self) {
        self.stopping.store(true, SeqCst);
        let wakers = std::mem::take(&mut self.wakers.lock().0);
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(SeqCst)
    }
}

/// A served connection that can be asked to finish gracefully: HTTP/1 (after the
/// request in flight) or HTTP/2 (`GOAWAY`, then the streams in flight).
trait ServedConnection: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> ServedConnection for http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}

impl<I, S, E, B> ServedConnection for http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

pin_project_lite::pin_project! {
    /// The gateway's own HTTP/1 connection, which reads [`Stop`]'s flag itself between
    /// requests ([`Graceful`] wakes it).
    struct ReadsTheStop<F> {
        #[pin]
        connection: F,
    }
}

impl<F: Future<Output = ()>> Future for ReadsTheStop<F> {
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().connection.poll(cx).map(Ok)
    }
}

impl<F: Future<Output = ()>> ServedConnection for ReadsTheStop<F> {
    fn graceful_shutdown(self: Pin<&mut Self>) {}
}

pin_project_lite::pin_project! {
    /// Serves a connection until it ends, shutting it down gracefully once [`Stop`] says so.
    struct Graceful<C> {
        #[pin]
        connection: C,
        stop: Arc<Stop>,
        // This connection's id in `stop`'s wakers, and the waker registered there.
        registered: Option<(u64, Waker)>,
        shutting_down: bool,
        // Shut down once the client has sent nothing for this long (HTTP/2).
        idle: Option<Idle>,
        // Cuts the streams that waited on the client's window for `send_timeout`
        // (HTTP/2).
        stalls: Option<Stalls>,
    }

    impl<C> PinnedDrop for Graceful<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((id, _)) = this.registered.take() {
                this.stop.wakers.lock().0.remove(&id);
            }
        }
    }
}

impl<C> Graceful<C> {
    fn new(connection: C, stop: Arc<Stop>) -> Self {
        Self {
            connection,
            stop,
            registered: None,
            shutting_down: false,
            idle: None,
            stalls: None,
        }
    }

    /// Cuts the streams that wait on the client for `send_timeout` ([`Stalls`]).
    fn stalls(mut self, stalls: Stalls) -> Self {
        self.stalls = Some(stalls);
        self
    }

    /// Shuts the connection down gracefully once the client has sent nothing for
    /// `after`, as `last_read` tells.
    fn idle_after(mut self, after: Duration, last_read: Arc<LastRead>) -> Self {
        self.idle = Some(Idle {
            // From when the client's time began (its preface may have been read first).
            sleep: Box::pin(tokio::time::sleep_until(last_read.origin + after)),
            after,
            last_read,
            shut_at: None,
        });
        self
    }
}

/// [`Graceful`]'s bound on a connection the client sends nothing on.
struct Idle {
    sleep: Pin<Box<tokio::time::Sleep>>,
    after: Duration,
    last_read: Arc<LastRead>,
    /// How many reads the connection had made when it was shut down for idling.
    shut_at: Option<u64>,
}

impl Idle {
    /// The connection is being shut down for idling: the client has a quarter of
    /// `after` to answer (a round trip: HTTP/2's shutdown sends a `PING` its library
    /// answers at once).
    fn shut_down(&mut self) {
        self.shut_at = Some(self.last_read.reads.load(Relaxed));
        let now = tokio::time::Instant::now();
        self.sleep.as_mut().reset(now + self.after / 4);
    }

    /// After [`shut_down`](Self::shut_down): `Some(true)` when the client has sent
    /// nothing since in the time it had to answer, `Some(false)` once it has sent
    /// something, `None` while neither is known.
    fn poll_unanswered(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let shut_at = self.shut_at?;
        if self.last_read.reads.load(Relaxed) != shut_at {
            return Some(false);
        }
        self.sleep.as_mut().poll(cx).is_ready().then_some(true)
    }

    /// Whether the client has sent nothing for `after`; if it has sent something since
    /// the timer was set, the timer is set again from then.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.last_read.at() + self.after;
            if due <= tokio::time::Instant::now() {
                return true;
            }
            self.sleep.as_mut().reset(due);
        }
    }
}

/// When a connection last read anything from its client, in milliseconds from when it
/// was made.
struct LastRead {
    origin: tokio::time::Instant,
    millis: AtomicU64,
    /// Reads that brought anything.
    reads: AtomicU64,
}

impl LastRead {
    fn at(&self) -> tokio::time::Instant {
        self.origin + Duration::from_millis(self.millis.load(Relaxed))
    }
}

pin_project_lite::pin_project! {
    /// A connection's I/O, noting when the client last made progress ([`Idle`]): ended a
    /// frame outside a header block, or sent some of a `DATA` frame (see [`Frames`]).
    struct ReadClock<I> {
        #[pin]
        io: I,
        last: Arc<LastRead>,
        frames: Frames,
    }
}

/// Where a client's HTTP/2 byte stream is, frame by frame (RFC 9113 §4.1), so that
/// bytes trickled into a request's head do not count as the client's activity: a
/// `HEADERS` frame sent a byte every few seconds, or a header block spread over
/// one-byte `CONTINUATION` frames, kept a connection open for ever (slowloris), where
/// an HTTP/1 client has [`HEADER_READ_TIMEOUT`] for a whole head. Nor do the bytes of
/// the preface, of a frame's header, or of any frame's payload but the `DATA` of a stream
/// the client has open (a request body in flight, which the route's timeout bounds): a
/// `DATA` frame trickled on a stream never opened, or already ended, is no progress.
#[derive(Debug)]
struct Frames {
    /// Bytes of the connection preface still to come.
    preface_left: usize,
    /// The frame header being read, and how much of it has come.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes still to come of the frame whose header was read.
    payload_left: usize,
    /// That frame is `DATA`.
    data: bool,
    /// That frame ends a header block (`END_HEADERS`).
    ends_block: bool,
    /// A header block is open: a `HEADERS` or `PUSH_PROMISE` frame was read, and not yet
    /// the frame with `END_HEADERS`.
    in_block: bool,
    /// The streams the client has open for `DATA`: opened by `HEADERS` without
    /// `END_STREAM`, not yet ended by `END_STREAM` or `RST_STREAM` (at most
    /// [`OPEN_STREAMS`], the oldest forgotten past them).
    open: Vec<u32>,
}

/// How many of a client's open streams [`Frames`] follows: more than the server lets a
/// client have at once (`max_concurrent_streams`, 100 by default; a stream the server
/// refused stays here until ended or forgotten).
const OPEN_STREAMS: usize = 1024;

impl Default for Frames {
    fn default() -> Self {
        Self {
            preface_left: H2_PREFACE.len(),
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            data: false,
            ends_block: false,
            in_block: false,
            open: Vec::new(),
        }
    }
}

impl Frames {
    /// Reads the next `bytes` of the stream: whether they made progress (ended a frame
    /// outside a header block, or carried `DATA` payload).
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        const DATA: u8 = 0x0;
        const HEADERS: u8 = 0x1;
        const PUSH_PROMISE: u8 = 0x5;
        const CONTINUATION: u8 = 0x9;
        const RST_STREAM: u8 = 0x3;
        const END_STREAM: u8 = 0x1;
        const END_HEADERS: u8 = 0x4;
        let mut progress = false;
        if self.preface_left > 0 {
            let n = self.preface_left.min(bytes.len());
            self.preface_left -= n;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            if self.header_len < self.header.len() {
                let n = (self.header.len() - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len < self.header.len() {
                    break;
                }
                let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = self.header;
                self.payload_left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                let stream = u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]);
                let at = self.open.iter().position(|&s| s == stream);
                // Only a stream the client has open carries a body whose bytes count.
                self.data = kind == DATA && at.is_some();
                match (kind, at) {
                    (HEADERS, None) if flags & END_STREAM == 0 && stream != 0 => {
                        if self.open.len() == OPEN_STREAMS {
                            self.open.remove(0);
                        }
                        self.open.push(stream);
                    }
                    (DATA | HEADERS, Some(at)) if flags & END_STREAM != 0 => {
                        self.open.remove(at);
                    }
                    (RST_STREAM, Some(at)) => {
                        self.open.remove(at);
                    }
                    _ => {}
                }
                self.in_block |= kind == HEADERS || kind == PUSH_PROMISE;
                self.ends_block = matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION)
                    && flags & END_HEADERS != 0;
            } else {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                progress |= self.data && n > 0 && !self.in_block;
            }
            if self.payload_left == 0 {
                // The frame is whole.
                self.header_len = 0;
                if self.ends_block {
                    self.in_block = false;
                }
                progress |= !self.in_block;
            }
        }
        progress
    }
}

impl<I> ReadClock<I> {
    /// `io`, whose client's time began at `origin`.
    fn new(io: I, origin: tokio::time::Instant) -> Self {
        Self {
            io,
            last: Arc::new(LastRead {
                origin,
                millis: AtomicU64::new(0),
                reads: AtomicU64::new(0),
            }),
            frames: Frames::default(),
        }
    }
}

impl<I: tokio::io::AsyncRead> tokio::io::AsyncRead for ReadClock<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.io.poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && this.frames.feed(&buf.filled()[before..])
        {
            let millis = this.last.origin.elapsed().as_millis();
            this.last
                .millis
                .store(u64::try_from(millis).unwrap_or(u64::MAX), Relaxed);
            // One writer (this connection's task): no locked instruction needed.
            let reads = this.last.reads.load(Relaxed);
            this.last.reads.store(reads.wrapping_add(1), Relaxed);
        }
        read
    }
}

impl<I: tokio::io::AsyncWrite> tokio::io::AsyncWrite for ReadClock<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl<C: ServedConnection> Future for Graceful<C> {
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Before a graceful shutdown as after it: a stalled stream would hold the drain.
        // A stream cut for send_timeout that hyper never polled again (it holds a frame
        // while it waits for the stream's window) cannot be reset: a send_timeout later
        // the connection is shut down, its other streams left to finish, and another
        // later closed, as a blocked HTTP/1 write closes its own.
        let mut stuck = Stuck::No;
        if let Some(stalls) = this.stalls.as_mut() {
            stuck = stalls.poll(cx);
            if stuck == Stuck::Close {
                return Poll::Ready(Ok(()));
            }
        }
        if !*this.shutting_down {
            // Registered (again only if the task changed), then the flag read: a stop
            // after the read finds the waker; one before it, the flag.
            if !this
                .registered
                .as_ref()
                .is_some_and(|(_, w)| w.will_wake(cx.waker()))
            {
                let mut wakers = this.stop.wakers.lock();
                let id = match this.registered {
                    Some((id, _)) => *id,
                    None => {
                        wakers.1 += 1;
                        wakers.1
                    }
                };
                wakers.0.insert(id, cx.waker().clone());
                *this.registered = Some((id, cx.waker().clone()));
            }
            let idle = this.idle.as_mut().is_some_and(|idle| idle.poll_expired(cx));
            if this.stop.is_stopping() || idle || stuck == Stuck::ShutDown {
                *this.shutting_down = true;
                this.connection.as_mut().graceful_shutdown();
                match this.idle.as_mut() {
                    Some(watch) if idle => watch.shut_down(),
                    _ => *this.idle = None,
                }
            }
        }
        if *this.shutting_down {
            // Shut down for idling: a client that answers nothing of it (HTTP/2's
            // shutdown waits for the answer to a PING) loses the connection at once.
            match this.idle.as_mut().map(|idle| idle.poll_unanswered(cx)) {
                Some(Some(true)) => return Poll::Ready(Ok(())),
                Some(Some(false)) => *this.idle = None,
                _ => {}
            }
        }
        this.connection.poll(cx)
    }
}

/// A connection's requests, answered by the gateway (the admin endpoints alone when
/// `admin`).
fn serve_requests(
    context: Arc<H2Context>,
    admin: bool,
) -> impl hyper::service::HttpService<
    Incoming,
    ResBody = Watched<H2Context>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Watched<H2Context>>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |request| {
        let context = context.clone();
        async move {
            let H2Context { gateway, peer, .. } = &*context;
            let head = request.method() == Method::HEAD;
            let mut response = if admin {
                gateway.handle_admin(&request)
            } else {
                gateway.handle_from(request, peer).await
            };
            if head {
                // hyper sends whatever body it is given, `HEAD` or not: the gateway's own
                // answer goes without its body, with the `Content-Length` of its `GET`.
                super::body::answer_head(&mut response);
            }
            // The body keeps the context this request cloned anyway.
            Ok::<_, Infallible>(response.map(|body| Watched::new(body, context)))
        }
    })
}

/// What an HTTP/2 connection's requests share: the gateway, the client, and the slots in
/// which its response bodies say whether they wait on the client ([`Stalls`]).
struct H2Context {
    gateway: Gateway,
    peer: Peer,
    watch: StreamWatch,
}

impl HasWatch for H2Context {
    fn watch(&self) -> &StreamWatch {
        &self.watch
    }
}

/// The most of a stream's answer the HTTP/2 server holds beyond what its client's window
/// and socket take (hyper's `max_send_buf_size`): the HTTP/1 server's write-ahead.
const H2_SEND_BUFFER: usize = 64 << 10;

/// HTTP/2's connection preface, which an h2c client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a cleartext connection's first bytes, as far as tells HTTP/2's preface from
/// anything else (an HTTP/1 request differs by its second byte at the latest): the bytes
/// read, and whether they are the preface.
async fn sniff_preface<I: tokio::io::AsyncRead + Unpin>(
    io: &mut I,
) -> std::io::Result<(Vec<u8>, bool)> {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; H2_PREFACE.len()];
    loop {
        let n = io.read(&mut chunk[..H2_PREFACE.len() - read.len()]).await?;
        read.extend_from_slice(&chunk[..n]);
        if n == 0 || !H2_PREFACE.starts_with(&read) {
            return Ok((read, false));
        }
        if read.len() == H2_PREFACE.len() {
            return Ok((read, true));
        }
    }
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed<I> {
    prefix: Vec<u8>,
    read: usize,
    io: I,
}

impl<I: super::h1_server::Abort> super::h1_server::Abort for Prefixed<I> {
    fn abort(&mut self) {
        self.io.abort();
    }
}

#[cfg(feature = "tls")]
impl<I: super::h1_server::Abort> super::h1_server::Abort for tokio_rustls::server::TlsStream<I> {
    fn abort(&mut self) {
        self.get_mut().0.abort();
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The admin endpoints' settings, resolved at build.
struct Admin {
    listen: Option<SocketAddr>,
    on_proxy: bool,
    /// The SHA-256 of the token, if one is required.
    token: Option<[u8; 32]>,
}

fn is_admin_path(path: &str) -> bool {
    matches!(path, METRICS_PATH | STATUS_PATH | STATUS_PAGE_PATH)
}

/// Whether the request carries one `Authorization: Bearer <token>` whose SHA-256 is
/// `expected`. The digests are compared in constant time; comparing digests, not tokens,
/// leaks neither the token's length nor a prefix of it.
fn admin_token_matches(headers: &http::HeaderMap, expected: &[u8; 32]) -> bool {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    // The scheme in any case (RFC 9110 §11.1), then one or more spaces, as `auth.jwt`
    // reads its bearer tokens.
    let value = value.as_bytes().trim_ascii();
    let Some(at) = value.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, token) = value.split_at(at);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return false;
    }
    let digest: [u8; 32] = Sha256::digest(token.trim_ascii_start()).into();
    digest
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// `400` for a path [`normalize`] refuses (or a `Host` [`check_request`] does); logged,
/// counted among the refused requests, never routed.
fn bad_path<B>(
    refused: &AtomicU64,
    request: &Request<B>,
    peer: &Peer,
    reason: &str,
) -> Response<Body> {
    refused.fetch_add(1, Relaxed);
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "seawall::gateway",
        path = request.uri().path(),
        peer = %peer.shown(),
        reason,
        "request path refused"
    );
    let _ = (request, peer);
    json_error(StatusCode::BAD_REQUEST, reason)
}

fn text(body: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// A gateway serving on a task of its own.
#[derive(Debug)]
pub struct GatewayHandle {
    local_addr: SocketAddr,
    gateway: Gateway,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl GatewayHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The gateway (for its status).
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Stops accepting connections, lets requests in flight finish (for 10 s at most) and
    /// waits until the server is down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The gateway as a [`tower::Service`]: [`Gateway::handle`] for requests of any body type,
/// so that it can be nested in an axum router (`Router::nest_service("/api", gateway)`)
/// or served by another server. The peer is read from the request's extensions: a
/// [`SocketAddr`] (insert it where the connection is accepted), or, with the feature
/// `axum`, axum's `ConnectInfo<SocketAddr>` (serve the router with
/// `into_make_service_with_connect_info::<SocketAddr>()`).
///
/// Without a peer, `X-Forwarded-For` carries no client address, and a route whose
/// per-client limit keys on the client's address refuses the request with `500` (and an
/// error log under `tracing`) rather than let it through unlimited. The admin endpoints
/// are served only when `[admin] on_proxy_listener` is set, as on the proxy listener.
///
/// Always ready (limits answer in `call`); never fails: every error is an answer.
impl<B> tower::Service<Request<B>> for Gateway
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let gateway = self.clone();
        Box::pin(async move {
            let peer = Peer::of(crate::rate_limit::http::peer_of(request.extensions()));
            Ok(gateway.handle_from(request, &peer).await)
        })
    }
}

/// One route of a [`Gateway`] as a [`tower::Service`] ([`Gateway::route`]): the same
/// checks and answers as through the gateway, without the routing. The peer is found as
/// for the gateway's own `Service` implementation.
#[derive(Clone)]
pub struct RouteService {
    gateway: Gateway,
    index: usize,
}

impl fmt::Debug for RouteService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteService")
            .field("route", &self.gateway.inner.routes[self.index].core.name)
            .finish()
    }
}

impl<B> tower::Service<Request<B>> for RouteService
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let peer = Peer::of(crate::rate_limit::http::peer_of(request.extensions()));
            // A gRPC caller gets the route's own answers as gRPC statuses, as through the
            // gateway.
            let grpc = super::grpc::grpc_caller(request.headers());
            let response = match this.gateway.prepare(&mut request, &peer) {
                Ok(()) => {
                    let route = &this.gateway.inner.routes[this.index];
                    route.handle(request, &peer, grpc.is_some()).await
                }
                Err(refused) => refused,
            };
            Ok(match grpc {
                Some(caller) => super::grpc::for_grpc_caller(response, caller),
                None => response,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's header: `len` payload bytes, of `kind`, with `flags`, on stream 1.
    fn frame(len: usize, kind: u8, flags: u8) -> Vec<u8> {
        let l = len.to_be_bytes();
        let mut f = vec![
            l[l.len() - 3],
            l[l.len() - 2],
            l[l.len() - 1],
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.resize(9 + len, 0);
        f
    }

    #[test]
    fn only_whole_frames_outside_a_head_and_data_make_progress() {
        let mut frames = Frames::default();
        assert!(!frames.feed(&H2_PREFACE[..10]), "the preface");
        assert!(!frames.feed(&H2_PREFACE[10..]));
        let settings = frame(6, 0x4, 0);
        assert!(!frames.feed(&settings[..5]), "half a frame header");
        assert!(!frames.feed(&settings[5..12]), "part of a SETTINGS payload");
        assert!(frames.feed(&settings[12..]), "a whole SETTINGS frame");

        // A HEADERS frame trickled a byte at a time: no progress until it is whole.
        let headers = frame(20, 0x1, 0x4 | 0x1);
        for byte in &headers[..headers.len() - 1] {
            assert!(!frames.feed(std::slice::from_ref(byte)));
        }
        assert!(
            frames.feed(&headers[headers.len() - 1..]),
            "the head is whole"
        );

        // A header block over CONTINUATION frames: none until END_HEADERS.
        assert!(
            !frames.feed(&frame(3, 0x1, 0)),
            "HEADERS without END_HEADERS"
        );
        for _ in 0..5 {
            assert!(
                !frames.feed(&frame(1, 0x9, 0)),
                "CONTINUATION inside the block"
            );
        }
        assert!(
            frames.feed(&frame(1, 0x9, 0x4)),
            "the block's last CONTINUATION"
        );

        // Some of a DATA frame's payload is progress (a body in flight).
        let data = frame(100, 0x0, 0);
        assert!(!frames.feed(&data[..9]));
        assert!(frames.feed(&data[9..20]));
        assert!(frames.feed(&data[20..]));
        // Ended by END_STREAM: a DATA frame trickled on it after is no progress, nor
        // one on a stream never opened (until whole).
        let last = frame(10, 0x0, 0x1);
        assert!(frames.feed(&last), "the body's last frame");
        let late = frame(100, 0x0, 0);
        assert!(!frames.feed(&late[..50]), "DATA on an ended stream");
        assert!(frames.feed(&late[50..]), "a whole frame");
        // Several frames in one read: the last one decides nothing alone.
        let mut both = frame(8, 0x6, 0);
        both.extend_from_slice(&frame(4, 0x1, 0)[..5]);
        assert!(frames.feed(&both), "a whole PING before a head begun");
        assert!(
            !frames.feed(&frame(4, 0x1, 0)[5..]),
            "the rest of a head without END_HEADERS"
        );
    }
}
