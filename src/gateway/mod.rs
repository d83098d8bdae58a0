//! An embeddable API gateway (feature `gateway`): an HTTP server (HTTP/1.1 of its own,
//! and hyper's HTTP/2 by ALPN over TLS or h2c) configured by a TOML file in the spirit of Kong's declarative
//! configuration, built from seawall's layers.
//!
//! Every request's path is first normalised ([`path`]: escaped unreserved characters
//! decoded, slashes merged, dot segments removed, as Envoy's `normalize_path` and
//! `merge_slashes` do; `400` for an encoded `/` or `\`, a `..` above the root, a
//! `..;` segment, a control byte or a bad escape). It is then matched to the route with
//! the longest path prefix (on segment boundaries, a `;` ending one too; none matches:
//! `404`), so `/api/open/../admin` is matched, and forwarded, as `/api/admin`, and goes
//! through that route's stack:
//!
//! 1. **JWT auth** (`auth = true`): an HS256 `Authorization: Bearer` token, its signature,
//!    `exp`/`nbf`, `iss`/`aud` ([`jwt`]); any failure is `401` with
//!    `WWW-Authenticate: Bearer error="invalid_token"` (`Bearer` alone when the request
//!    carried no bearer token, RFC 6750 §3.1);
//! 2. **global limit**, then **per-client limit** (by client IP or by a header), checked
//!    in one layer that answers as two stacked
//!    [`HttpRateLimitLayer`](crate::rate_limit::http::HttpRateLimitLayer)s do: `429` with
//!    `Retry-After` and the `RateLimit-Policy` / `RateLimit` headers (which admitted
//!    responses carry too), or `Retry-After` alone with `hide_client_headers = true`. On
//!    an admitted response, one `RateLimit-Policy` and one `RateLimit` field list the
//!    per-client policy, then the global one (`"per-client";r=4;t=1, "global";r=99;t=1`);
//!    a 429 has a field line for each. A request is charged only if both admit it: one the per-client limit refuses gets its
//!    global token back, so a client hammering the route is refused by its own limit
//!    without draining the global one for the others ([stacked
//!    limits](crate::rate_limit#stacked-limits)). The client IP is the peer's address, or,
//!    when the peer is one of `trusted_proxies`, the client it reports in
//!    `X-Forwarded-For` (read from the right, as
//!    [`ClientIp`](crate::rate_limit::http::ClientIp) does). A header key of over 64
//!    bytes is kept as a 128-bit digest (see
//!    [`BoundedKey`](crate::rate_limit::BoundedKey)), so every client costs the same
//!    memory whatever it sends. A request with the key header twice is refused (`400`:
//!    which value an upstream reads is its own choice). A request without the key header
//!    (or with an empty one) is limited by its IP
//!    (`on_missing = "ip"`, the default, as Kong does), refused with `400`
//!    (`"reject"`), limited together in one shared bucket of the per-client quota
//!    (`"shared"`) or let through (`"allow"`). Each limit tracks up to 100 000 clients;
//!    when its table is full of clients still holding a debt, new clients share one
//!    overflow bucket of the per-client quota (never evicting a client mid-debt), so a
//!    flood of invented keys gets one client's quota in all. Each limit is kept in this
//!    process (`policy = "local"`, the default: N replicas admit N times the limit) or
//!    in Redis (`policy = "redis"`, with a gateway-level `[redis]` section): one bucket
//!    shared by every replica with the same routes, checked after the local limits
//!    (which hand their tokens back when it refuses), with the same answers and
//!    headers; while Redis cannot answer, each replica limits with its `local_share` of
//!    the limit (`failure = "open"`, the default) or answers `503` with `Retry-After: 1`
//!    (`failure = "closed"`). See [`RedisSettings`] and [fleets](#a-fleet-of-gateways);
//! 3. **fallback**: the configured response (marked `x-seawall-fallback: true`) in place
//!    of any upstream failure: a timeout, open breakers, no endpoint, a transport error or
//!    a 5xx answer but `501` (the answer to the client's method, passed on as it came).
//!    Without one, failures are `504` (timeout), `503` (no endpoint, every breaker open)
//!    or `502` (transport error), with a small JSON body;
//! 4. **timeout**: the route's bound, until the upstream's response head (`504` past it);
//!    then `body_timeout` (by default the same) bounds each wait for more of the body: a
//!    body stalled that long is cut, closing the client's connection, as nginx's
//!    `proxy_read_timeout` does (a gRPC answer is ended with `DEADLINE_EXCEEDED`
//!    instead: raise `body_timeout` on routes with quiet server-streaming calls, see
//!    [gRPC callers](#grpc-callers)). A stall after the head reaches neither the breaker
//!    nor outlier detection, which have seen a good head: it is counted as a timeout;
//! 5. a [`Balance`](crate::balance::Balance) over the service's instances (listed in
//!    `[[services]]`, or discovered through the [`Discovery`] given to
//!    [`Gateway::build`]), each endpoint a pool of HTTP/1 keep-alive connections with its own
//!    circuit breaker and outlier ejection. Failures, for both, are 5xx answers but `501`
//!    (the answer to a method the upstream does not implement, which any client can send)
//!    ([`HttpClassifier`](crate::circuit_breaker::HttpClassifier)), refused or timed-out
//!    connections, connections reset or closed before the response head, and the route
//!    timeout passing before the head (the timeout is applied inside the balancer's call,
//!    so it completes as a failure rather than a cancellation). What the *client* causes
//!    never counts against an upstream: see [Client faults and limits](#client-faults-and-limits).
//!
//! A prefix ends a segment only at `/` or `;`: `/api/admin` covers `/api/admin`,
//! `/api/admin/x` and `/api/admin;x`, not `/api/admin.json` or `/api/admin-old`, which
//! go to the route with the next longest prefix that covers them (a catch-all `/`, say).
//! Routes are matched on the path as the upstreams behind read it
//! ([`path::match_form`]): each segment's `;` parameters dropped, with the segments they
//! leave empty, as servlet containers do (`/api;x/admin`, `/;/api/admin` are under
//! `/api/admin`), and the escapes of `:@!$&'()*+,=` decoded; the path forwarded keeps
//! them, and `strip_prefix` strips the prefix's segments as they were written.
//! An upstream framework that matches suffixes (Rails' `.:format`, Spring MVC's old
//! suffix pattern matching, static files served with extensions) may serve
//! `/api/admin.json` as `/api/admin`, under the catch-all route's policy rather than the
//! admin route's. Guard such paths with routes of their own that carry the admin route's
//! policy (`path_prefix = "/api/admin.json"`, `auth = true`, its limits), keep the
//! catch-all route off that upstream, or turn suffix matching off in the upstream.
//!
//! Before auth, a request must have exactly one valid `Host` (RFC 9112 §3.2: `400`
//! without one in HTTP/1.1, or with two, or with one that is not `host[:port]`; HTTP/1.0
//! requests, which have no `Host`, may come without, and then get no `X-Forwarded-Host`;
//! an HTTP/1 target in absolute form names the host instead, its authority replacing
//! `Host`, RFC 9112 §3.2.2) and, on routes with `auth = true`, at most one
//! `Authorization` (`400` for two, so the token verified is the one forwarded).
//!
//! Proxying forwards the method, the normalised path (with the prefix stripped if asked;
//! what is left never starts with `//`), the query as the client sent it,
//! the headers and the body, streamed both ways. The upstream's `Host` (HTTP/2's
//! `:authority`) is the endpoint's own address, `host:port` as the instance is listed
//! or discovered (`10.0.0.7:8080`, also with `[services.tls] server_name`), not the
//! client's: the client's `Host` goes in `X-Forwarded-Host`, as nginx's default
//! `proxy_set_header Host $proxy_host` and `X-Forwarded-Host $host` would send them. An
//! upstream that builds links or picks a virtual host from `Host` must read
//! `X-Forwarded-Host` instead (behind a trusted proxy, the one it sent). Hop-by-hop headers are dropped, and so
//! are those `Connection` names, except `Host`, `Authorization` and `Content-Length`
//! (never removed that way). Forwarding headers are the gateway's: from a peer that is
//! not one of `[gateway] trusted_proxies`, `Forwarded`, `X-Real-IP` and every
//! `X-Forwarded-*` the client sent are dropped, and `X-Forwarded-For` (the peer's
//! address), `X-Forwarded-Host` (the `Host`) and `X-Forwarded-Proto` (`http`) are set;
//! from a trusted proxy, the peer is appended to `X-Forwarded-For` (and to `Forwarded`,
//! if sent) and its `X-Forwarded-Host` / `-Proto` / `X-Real-IP` are kept. A request with
//! none of these headers costs one pass over the header names and no allocation.
//!
//! Each endpoint keeps its idle HTTP/1 keep-alive connections (up to 128; those idle for
//! over 30 s, or past the idle timeout the upstream advertises in `Keep-Alive: timeout=N`
//! less a quarter of it (at most 1 s), are closed by the next use of the pool or by a
//! sweep of every pool every 5 s,
//! whichever comes first, and an endpoint that leaves discovery closes them all). A request takes the most recently used one, or dials a new one (5 s connect
//! bound); the request's own task drives that connection, with no task of its own and no
//! hop between tasks, and the response body puts it back once read to the end. A
//! connection is never reused after a body abandoned half-way, an error, or the
//! upstream's `Connection: close`. A reused connection the upstream closes just as a
//! request goes out on it (its idle timeout racing the request) is handled as Go's
//! `net/http` does: a request it could not even send is sent once more on a new
//! connection, and so is one it sent if that is harmless: an idempotent method (`GET`,
//! `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`), no request body (a streamed body cannot
//! be replayed), the connection reset or closed before any byte of an answer came, and
//! it had idled for 200 ms or more (a connection reused sooner is not at risk from an
//! idle timer, and its request's head is not copied). Anything else (a `POST`, a body, a
//! new connection, an answer cut part-way) is a 502.
//! The gateway-wide `retried_stale` counts the requests sent again.
//!
//! The balancer is shared by all of a route's requests behind a `parking_lot` mutex held
//! only to reserve an endpoint and start the call (never across an await), rather than a
//! `tower::buffer::Buffer`: a buffer's worker treats an error from `poll_ready` (no
//! endpoint for a moment) as fatal and would fail every later request of the route, and
//! adds a channel hop and a task per route.
//!
//! ## Client faults and limits
//!
//! A client cannot make an upstream look unhealthy. Errors that come from the client's
//! side of the connection are answered as client errors, counted in the route's
//! `client_errors`, and recorded neither by the endpoint's breaker nor by outlier
//! detection (they are [`Outcome::Ignored`](crate::circuit_breaker::Outcome)), nor in
//! `upstream_errors`:
//!
//! - a request body that cannot be read (malformed chunked encoding; a client that
//!   closes part-way, whose connection is then just closed): `400`;
//! - the route timeout passing while the exchange waits on the client's body (the body is
//!   not over and the last attempt to read more of it found nothing): `408`. The same
//!   timeout passing while the upstream has the whole body, or is not reading it, is the
//!   upstream's failure (`504`). So is an HTTP/1 upstream closing or resetting the
//!   connection before its answer, unless the exchange was waiting on the client's body
//!   then (the upstream's own body read timeout cutting a stalled upload): `408` too;
//! - a body over `max_request_body` (default 1 MiB, per route or `[gateway]`; `0`: no
//!   limit): `413`, at once and without contacting the upstream when `Content-Length`
//!   says so, or when a streamed (chunked) body grows past it, the exchange with the
//!   upstream then aborted (`413` if the upstream has not answered yet);
//! - a header line (`name: value`) over `max_header_line` (default 16 KiB), or a request
//!   head over `max_headers_size` (default 64 KiB): `431`. The HTTP/1 server stops
//!   reading a head at `max_headers_size` and answers `431` itself (counted in
//!   `refused`); the check of each line is one pass over the parsed headers before the
//!   route's stack.
//!
//! These answers carry `Connection: close`. Bodies are forwarded for every method, as RFC
//! 9110 allows: a chunked body on a `GET`, `HEAD` or `DELETE` reaches the upstream chunked;
//! an empty `POST`, `PUT` or `PATCH` goes with `Content-Length: 0`.
//!
//! HTTP/1 clients are served by the gateway's own server, which checks every request head
//! before any route sees it, as strictly as nginx does, and answers with the connection
//! closed after: `400` for `Content-Length` with `Transfer-Encoding`, differing or
//! malformed `Content-Length` values, `Transfer-Encoding` in an HTTP/1.0 request or with
//! `chunked` not last, an HTTP/1.1 request without exactly one `Host`, obsolete line
//! folding or an invalid request line, name or value; `501` for a transfer coding other
//! than `chunked` alone and for `CONNECT`; `431` for a head over `max_headers_size` or
//! with more than 100 fields; `505` for a version other than HTTP/1.x. These are counted
//! in `/status.json`'s `refused`. Requests are served in order, pipelined ones too; keep-alive follows RFC
//! 9112 (HTTP/1.0 only with `Connection: keep-alive`); `Expect: 100-continue` is answered
//! when the route first reads the body; a request body left unread is skipped when it is
//! already there, and otherwise the connection closes after the answer; a client that
//! closes its side while its request is served cancels it. Answers are framed by their
//! body (`Content-Length` when known, else `chunked`, or the close for HTTP/1.0) and carry
//! a `Date`.
//!
//! HTTP/1 upstreams are spoken to by the gateway's own client, which holds their answers
//! to RFC 9112 as strictly as nginx does: a head over 64 KiB or with more than 100
//! fields, obsolete line folding, `Content-Length` with `Transfer-Encoding`, differing
//! `Content-Length` values, `Transfer-Encoding` in an HTTP/1.0 answer, an unasked `101`,
//! or a malformed chunk is the upstream's failure (`502`, or the response body cut if its
//! head has gone to the client), and the connection is closed. Interim `1xx` answers are
//! skipped. A connection goes back to the pool only when its exchange ended cleanly on
//! both sides with nothing after the answer.
//!
//! A client that stops reading its response cannot hold the gateway's connections
//! either: a write to a client that stays blocked for `send_timeout` (default 60s, as
//! nginx's `send_timeout`; each wait, not the whole response) closes the client's
//! connection with a reset and drops the response body, closing the upstream
//! connection that was streaming it (never returned to the pool half-read). An HTTP/2
//! client can stop reading one response without blocking a write (it drains its socket
//! and never opens the stream's window); a response waiting that way for `send_timeout`
//! (checked every quarter of it) has its stream reset and its body dropped, releasing
//! the upstream connection, while the client's other streams go on; a stream hyper
//! cannot reset (it holds a frame of the answer until the window opens) shuts its
//! connection down gracefully one `send_timeout` later (`GOAWAY`: the other streams
//! finish, new ones go to a new connection) and closes it one more later. The
//! gateway-wide `send_timeouts` counts both.
//!
//! A connection the gateway closes while the client may still be sending (a `413` to a
//! body it will not read, an HTTP/2 `GOAWAY`) closes the way nginx's do, with a
//! lingering close: the socket stays open, reading and discarding, until the client
//! closes, is silent for 5 s or 30 s have passed, so that the client reads its answer
//! instead of a reset.
//!
//! ## gRPC callers
//!
//! A request with `content-type: application/grpc` (alone, or followed by a `+proto`-style
//! subtype or `;` parameters) or gRPC-Web's `application/grpc-web` or
//! `application/grpc-web-text` (likewise) is a gRPC call; `application/grpcfoo` is not.
//! The gateway's own answers to it (limits, open breakers, timeouts, no route,
//! authentication, malformed requests) are trailers-only gRPC responses: `200`, the
//! caller's content type family (`application/grpc`; `application/grpc-web` or
//! `application/grpc-web-text` to a gRPC-Web caller, which reads such an answer's
//! headers as its trailers), `grpc-status` and a percent-encoded `grpc-message`, no
//! body, and
//! `grpc-retry-pushback-ms` wherever the HTTP answer has `Retry-After`. A limit's refusal
//! is `RESOURCE_EXHAUSTED` (8); open breakers, no endpoint or an unreachable upstream
//! `UNAVAILABLE` (14); a timeout `DEADLINE_EXCEEDED` (4); `401` `UNAUTHENTICATED`; no
//! route `UNIMPLEMENTED`. The upstream's answers and a route's configured fallback pass
//! unchanged. An upstream's gRPC answer is classified as
//! [`GrpcClassifier`](crate::grpc::GrpcClassifier) does by default, for the endpoint's
//! breaker and outlier detection: `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
//! `RESOURCE_EXHAUSTED`, `INTERNAL` and `UNKNOWN` are failures, `CANCELLED` is ignored,
//! the others (`NOT_FOUND`, say) are successes. The `grpc-status` is read from the
//! answer's head (a trailers-only answer, as gRPC servers send a call that failed at
//! once) or, when the head has none, from the trailers at the end of its body: the call
//! is recorded when the body ends (its endpoint's load counts it until then), as a
//! failure if the body breaks, as `INTERNAL` if it ends without a status, and not at all
//! if the client goes away first. A gRPC-Web upstream's answer (`application/grpc-web`,
//! `application/grpc-web-text`) has its status inside its body, in a trailers frame the
//! gateway does not read, and no HTTP trailers: without a `grpc-status` in its head it
//! counts by its HTTP status, as any HTTP answer (a `200` is a success, even if its
//! trailers frame says otherwise). A call's own deadline (`grpc-timeout`), when shorter
//! than the route's timeout, bounds it: passing it answers `DEADLINE_EXCEEDED`, counted
//! in the route's `client_errors.deadline` and never against the endpoint (a caller
//! asking for a microsecond must not open breakers). However long, it is what the
//! call's end is judged by: a `DEADLINE_EXCEEDED` (in the head or the trailers) or a reset
//! stream from the upstream once it has passed is the caller's, not the endpoint's. A
//! malformed `grpc-timeout` is ignored, as gRPC servers ignore one, and not sent upstream;
//! of several, the first is kept and the others are not sent.
//!
//! Streaming calls go through message by message, and each wait for the upstream's next
//! message is bounded by the route's `body_timeout`, which defaults to its `timeout`
//! (10 s): a server-streaming call quiet for longer (a watch or subscription API, a
//! stream of rare events) is ended with `DEADLINE_EXCEEDED` in its trailers, whatever
//! the caller's `grpc-timeout` (which only ever shortens the route's bounds). On routes
//! with such calls, set `body_timeout` above the longest quiet spell (at most `"24h"`),
//! or have the server send a message (a heartbeat) more often:
//!
//! ```toml
//! [[routes]]
//! name = "watch"
//! path_prefix = "/inventory.v1.Inventory/"
//! service = "inventory"
//! timeout = "5s"                  # until the answer's head, as for unary calls
//! body_timeout = "1h"             # each wait for the stream's next message
//! ```
//!
//! ## TLS and HTTP/2
//!
//! With the feature `tls`, `[gateway.tls]` terminates TLS on the proxy listener (rustls
//! with *ring*; TLS 1.2 and 1.3 only): certificates and keys from PEM files, chosen by
//! SNI (a certificate's DNS names or its `server_names`, exact first, then `*.` wildcards
//! of one label; the first certificate for anything else and for clients without SNI),
//! reloaded without a restart when the files change (checked every `reload_every`;
//! files that fail to load leave the certificates in use as they were, counted in
//! `/status.json`'s `tls.reload_failures`), each handshake bounded by
//! `handshake_timeout` on its connection's own task. ALPN offers `h2` and `http/1.1`.
//! `[gateway] h2c = true` serves HTTP/2 with prior knowledge on a cleartext listener
//! beside HTTP/1. `[gateway.http2]` bounds every HTTP/2 connection: concurrent streams
//! (100), the header list (`max_headers_size`), flow-control windows (64 KiB a stream,
//! 1 MiB the connection), and resets: a client that opens and resets streams faster
//! than they are accepted (rapid reset, CVE-2023-44487) gets `GOAWAY`
//! (`ENHANCE_YOUR_CALM`) once more than `max_pending_accept_reset_streams` (20) are
//! pending, as does one that makes the gateway reset more than
//! `max_local_error_reset_streams` (1 024) of its streams. An HTTP/2 request's
//! `:authority` is its `Host`; over TLS, `X-Forwarded-Proto` is `https`.
//!
//! Upstreams: a `[[services]]` entry's `protocol = "h2"` speaks HTTP/2 to its instances,
//! every request multiplexed on one connection per endpoint (and per thread of
//! [`Gateway::spawn_threads`]), dialled by the first request and again when it closes (a
//! request the closed connection never took is sent on the new one); requests beyond the
//! upstream's stream limit wait for a stream. A request without a body whose stream the
//! upstream refused unprocessed (`GOAWAY`, `REFUSED_STREAM`) is sent again on a new
//! connection (a refused request with a body, which cannot be, is the endpoint's
//! failure), and a connection the upstream ends with `ENHANCE_YOUR_CALM` (the answer of
//! `h2`-based servers to many streams reset: clients that went away), or closes after the
//! gateway reset a burst of streams on it, is not counted against the endpoint; its idempotent
//! requests without a body are sent again. `[services.tls]` (feature `tls`) speaks TLS
//! to them, certificates always verified, against webpki-roots' Mozilla roots or a
//! `ca_file`, for `server_name` (sent by SNI) or each instance's host; a failed handshake
//! (unknown CA, wrong name, expired, an upstream without TLS) is `502` and a failure of
//! the endpoint for its breaker and outlier detection. An entry without `instances`
//! gives these settings to a service found by discovery.
//!
//! ```toml
//! [gateway]
//! listen = "0.0.0.0:8443"
//!
//! [gateway.tls]
//! [[gateway.tls.certificates]]
//! cert = "/etc/seawall/api.example.com.pem"
//! key = "/etc/seawall/api.example.com.key"
//!
//! [[services]]
//! name = "orders"                      # a gRPC service found in Consul
//! protocol = "h2"
//! [services.tls]
//! server_name = "orders.internal"
//! ca_file = "/etc/seawall/internal-ca.pem"
//! ```
//!
//! ## Serving
//!
//! [`Gateway::serve`] / [`Gateway::serve_with_shutdown`] serve a listener on the caller's
//! runtime, [`Gateway::spawn`] on a task of its own with a [`GatewayHandle`] for graceful
//! shutdown. The admin endpoints (below) are served on a listener of their own:
//! [`Gateway::spawn_admin`] (or [`Gateway::serve_admin`]) with a clone of the gateway.
//! On Unix, [`Gateway::spawn_threads`] serves on threads of its own, each with a
//! current-thread runtime and an `SO_REUSEPORT` listener (nginx's model): no request
//! crosses threads, which costs less CPU per request than a multi-thread runtime when
//! the cores are busy. With as many threads as CPUs the process may run on, each thread
//! is pinned to its own CPU on Linux ([`CpuAffinity`]; nginx's `worker_cpu_affinity
//! auto`), which keeps two of them from waiting on one core for each other.
//!
//! The gateway is also a [`tower::Service`] of `Request<B>` for any body type `B`, so it
//! can be nested in an axum router (`Router::nest_service("/api", gateway)`, the nest's
//! prefix stripped by axum before routing) or served by another server; one route alone is
//! [`Gateway::route`]. The peer is read from the request's extensions (a `SocketAddr`, or
//! axum's `ConnectInfo<SocketAddr>` with the feature `axum`); without one, no client
//! address is forwarded and per-client IP limits refuse with `500` rather than pass.
//! The feature `gateway` does not need `consul`: add it for
//! [`Discovery::Consul`](Discovery). The gateway's TOML has no Consul section: it uses the
//! `ConsulClient` it is given, usually from Consul's environment variables
//! (`ConsulClient::from_env`, as the demos do); with the feature `consul-tls` those
//! include `CONSUL_HTTP_SSL`, `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`
//! and `CONSUL_TLS_SERVER_NAME` for an agent served over HTTPS.
//!
//! The gateway's own error answers (`400`, `401`, `404`, `408`, `413`, `429`, `431`,
//! `500`, `502`, `503`, `504`) carry an RFC 9457 `application/problem+json` body, as
//! [`seawall::problem`](crate::problem) answers for the layers:
//! `{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"no upstream available"}`;
//! a `503` from open breakers says in `Retry-After` when one probes again.
//!
//! Give the gateway as many threads (runtime workers, or `spawn_threads` threads) as
//! cores it has to itself, not as many as the machine has. A proxy thread that shares a
//! core with other busy processes waits behind them for the CPU, and that wait lands in
//! the tail latency. `benches/gateway.rs` shows it on a 2-core machine that also runs the
//! load client and the upstreams (upstream answering in 1 ms, 16 callers, 5 invocations
//! of 5 runs each): the full gateway added −77 to +86 µs at p99 with one worker and +8 to
//! +516 µs with two; nginx, −16 to +100 µs with one worker process and +32 to +184 µs
//! with two. Those figures are unpinned threads; pinned
//! ([`CpuAffinity::Auto`], two threads on the two cores), the p99 of `wrk` through the
//! gateway fell from 2.6–4.0 ms to 0.55–0.65 ms against nginx's 0.5–1.1 ms
//! (`benches/wrk_vs_nginx.sh`).
//!
//! Build the binary that serves the gateway with `lto = "fat"` and `codegen-units = 1` in
//! its `[profile.release]` (this crate's own `release-lto` profile, which that script
//! uses): the request path runs through tower, `http`, `bytes` and tokio, and inlined
//! across them it takes about 8% fewer instructions.
//!
//! ## Configuration
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:8080"
//! send_timeout = "60s"            # each blocked write to a client (default 60s)
//! max_request_body = 1048576      # bytes, routes without their own (default 1 MiB; 0: none)
//! max_header_line = 16384         # bytes per request header line (default 16 KiB), else 431
//! max_headers_size = 65536        # bytes per request head, at least 8192 (default 64 KiB)
//! normalize_path = true           # decode %-escaped unreserved, remove dot segments (default)
//! merge_slashes = true            # /a//b is /a/b (default)
//! trusted_proxies = ["10.0.0.0/8"]   # optional (default none): proxies whose
//!                                    # X-Forwarded-For / Forwarded are believed
//! client_ipv6_prefix = 64         # per-client IP limits key IPv6 clients by their /64
//! request_id_header = "x-request-id"  # passed on or made, echoed ("" turns it off)
//! trace_context = true            # W3C traceparent continued or started (default true)
//!
//! [admin]                         # /metrics, /status, /status.json
//! listen = "127.0.0.1:9901"       # for Gateway::spawn_admin; keep it on loopback
//! token_env = "GATEWAY_ADMIN_TOKEN"   # optional: require `Authorization: Bearer <token>`
//! # token_file = "/run/secrets/admin-token"  # or from a file
//! on_proxy_listener = false       # true: also answer them on the proxy listener (default false)
//!
//! [auth.jwt]                      # optional; needed by routes with auth = true
//! secret_env = "GATEWAY_JWT_SECRET"   # exactly one of secret_env, secret_file, secret
//! # secret_file = "/run/secrets/jwt"  # the file's content, less a final newline
//! # secret = "in the file itself"     # `${...}` is refused: nothing is interpolated
//! issuer = "https://issuer.example"   # optional: required `iss`
//! audience = "api"                    # optional: required in `aud`
//! leeway = "30s"                      # optional clock skew on exp/nbf (default 0s)
//! require_exp = true                  # tokens without `exp` are refused (default true)
//!
//! [[routes]]
//! name = "users"
//! path_prefix = "/api/users"
//! service = "users"
//! strip_prefix = true             # /api/users/42 is sent as /42
//! timeout = "2s"                  # Go-style durations: 500ms, 2s, 1m30s (default 10s)
//! body_timeout = "30s"            # each wait for more of the body (default: timeout);
//!                                 # raise it for quiet streams (gRPC watches, SSE)
//! max_request_body = 10485760     # bytes (default: [gateway] max_request_body), else 413
//! auth = true
//!
//! [routes.breaker]                # a breaker per endpoint
//! failure_rate = 0.5              # a share (or "50%"), over...
//! window = 20                     # ...the last 20 calls, once...
//! minimum_calls = 10              # ...10 are recorded
//! wait_in_open = "5s"
//! permitted_in_half_open = 2
//!
//! [routes.fallback]
//! status = 200
//! body = '{"users":[]}'
//! content_type = "application/json"
//!
//! [routes.rate_limit]
//! global = { per_second = 1000, burst = 200 }
//! per_client = { per_second = 10, burst = 20, key = "ip" }   # or "header:x-api-key"
//! # with a header key, requests without it: on_missing = "ip" (default), "reject" (400),
//! # "shared" (one bucket for all of them), "allow"
//! # policy = "redis" on either limit: its buckets in [redis], shared by the fleet
//! hide_client_headers = false     # true: no RateLimit headers, only Retry-After on 429
//!
//! [routes.balance]
//! strategy = "least-requests"     # or "peak-ewma", "round-robin"
//! outlier = { consecutive_failures = 5, base_ejection = "30s", max_ejected = 0.5 }
//!
//! [[services]]                    # static; other services are discovered
//! name = "users"
//! instances = ["127.0.0.1:9001", "127.0.0.1:9002"]
//!
//! [redis]                         # for limits with policy = "redis" (feature `redis`)
//! url = "redis://127.0.0.1:6379/" # or nodes = ["redis://10.0.0.1:7000/", ...]: a Redis Cluster;
//!                                 # rediss:// for TLS (feature `redis-tls`; [redis.tls] below)
//! prefix = "seawall"              # keys: <prefix>:<route>:global:{all}, <prefix>:<route>:client:{<client>}
//! timeout = "200ms"               # each check's bound
//! failure = "open"                # Redis away: "open" (local shares) or "closed" (503)
//! local_share = 0.34              # a share (or "34%") of each limit per replica while Redis is away (default 1)
//! batch = 1                       # tokens taken per round trip (default 1: none ahead)
//! batch_max_age = "100ms"         # how long tokens taken ahead may wait to be used
//!
//! # [redis.tls]                   # with rediss://: without it, checked against webpki-roots
//! # ca_file = "/etc/seawall/redis-ca.pem"     # trust this CA (PEM) instead
//! # cert_file = "/etc/seawall/redis-client.pem" # a client certificate, for a Redis that
//! # key_file = "/etc/seawall/redis-client.key"  # asks for one (tls-auth-clients yes)
//! ```
//!
//! Unknown keys are rejected, and every invalid value is a [`ConfigError`](crate::ConfigError) naming its
//! field: `routes[1].rate_limit.global.per_second: must be at least 1`. Every value the
//! gateway's build would refuse is refused at load (`per_second = 4294967295`: a refill
//! interval below a nanosecond). So are: a configuration without routes; a `path_prefix`
//! that is not a normal path (dot segments, `//`, `\`) or not written as requests are
//! matched (what clients percent-encode, such as non-ASCII characters, written as
//! upper-case escapes: `/caf%C3%A9`, not `/café`); an instance with port 0 or listed
//! twice; durations below 1 ms (but zero
//! where zero is allowed); and, with `admin.on_proxy_listener = true`, a route whose
//! prefix is or lies under an admin path. Sections are checked whether or not anything
//! uses them: each `[[services]]` entry (its `[services.tls]` client made: the `ca_file`
//! read, the `server_name` parsed), and `[redis]` (its URLs parsed as the Redis client
//! parses them, without connecting). An entry no route names is not an error, so a
//! service can be staged before its route; the build logs a warning for it (feature
//! `tracing`).
//!
//! Secrets (the JWT secret, the admin token) are read from the environment or a file
//! (`*_env`, `*_file`; a literal `secret` is allowed for the JWT secret, not for the
//! token) when the configuration loads and again when the gateway is built. Each must
//! have at least 32 bytes for the JWT secret (RFC 7518 §3.2: an HS256 key as long as the
//! hash) or 16 for the admin token, 8 distinct byte values and no short pattern repeated
//! (no period of half its length or less); an all-whitespace secret, and one shaped like
//! an unresolved placeholder (`${NAME}`, `$NAME`, `{{ ... }}`, `%NAME%`), are refused
//! too. No
//! error shows a secret: TOML syntax errors give the line, the column and the message,
//! without the `toml` crate's excerpt of the source line.
//!
//! ```no_run
//! use seawall::discovery::Registry;
//! use seawall::gateway::{Discovery, Gateway, GatewayConfig};
//!
//! # async fn run() -> Result<(), seawall::BoxError> {
//! let config = GatewayConfig::from_file("gateway.toml")?;
//! let listener = tokio::net::TcpListener::bind(config.gateway.listen).await?;
//! let gateway = Gateway::build(config, Discovery::Registry(Registry::new())).await?;
//! let handle = gateway.spawn(listener);
//! // ...
//! handle.shutdown().await; // graceful: requests in flight finish
//! # Ok(())
//! # }
//! ```
//!
//! ## A fleet of gateways
//!
//! Replicas behind a load balancer each hold their own local limits, so N of them admit N
//! times a local limit. With `policy = "redis"` a limit is one bucket per key in Redis
//! (a GCRA script timed by Redis's clock, so the replicas' clocks need not agree), and
//! the fleet admits the limit once: the
#![cfg_attr(feature = "redis", doc = "[Redis limiter](crate::rate_limit::redis)'s")]
#![cfg_attr(not(feature = "redis"), doc = "Redis limiter's")]
//! (feature `redis`)
//! guarantees apply (never more than burst + rate × elapsed; with `batch`, tokens a
//! replica took ahead are not available to the others until used or given up). A check is
//! a round trip (about 70 µs on loopback) made only for requests the local limits
//! admitted; refusals Redis gave are answered locally until they expire. A client key
//! longer than 64 bytes is stored as its SHA-256, the same in every replica. Each Redis
//! limit has a breaker around Redis (opens when half of the last 20 checks failed, probes
//! after 1 s, doubling up to 30 s); `/status.json` and the status page show where each
//! limit's decisions come from now and the state of that breaker.
//!
//! ## Observability
//!
//! `GET /metrics`, `GET /status.json` and `GET /status` (the admin endpoints) show
//! upstream addresses, routes and limits, so they are not served on the proxy listener:
//! serve them with [`Gateway::spawn_admin`] on a listener of their own (loopback or a
//! private network; `[admin] listen` names one for callers who bind from the
//! configuration). With `[admin] token_env` or `token_file` they answer `401` without
//! `Authorization: Bearer <token>` (compared in constant time; the status page, loaded in
//! a browser, cannot send it: use it through a tunnel or a proxy that adds the header).
//! On the proxy listener these paths are routed like any other, unless
//! `admin.on_proxy_listener = true` (for single-port setups) answers them first, after
//! path normalisation; then set a token, since that listener faces the clients.
//! `/metrics` is rendered by `metrics-exporter-prometheus` from one path, the `metrics`
//! facade: the gateway's `seawall_gateway_*` series, and what its limiters and
//! balancers report, named after the route (`seawall_rate_limit_decisions_total{limiter="<route>/global"}`,
//! the balancer's `seawall_balance_*` under `<route>/<service>`); each endpoint's figures
//! (calls, failures, ejections, its breaker's state) are `seawall_gateway_endpoint_*`
//! series, written at each scrape for the endpoints the route has then. Every name and label is
//! in [`observability`](crate::observability). The first gateway of a process installs a
//! Prometheus recorder as the global one; if the application installed its own first, its
//! series go there (see [`use_prometheus_handle`]). With the `tracing` feature every
//! request is a `DEBUG` event `request` (target `seawall::gateway`) with its route,
//! method, path, peer, status, whether a fallback answered, and the time taken.
//!
//! `/status.json` is a [`GatewayStatus`]:
//!
//! ```json
//! {
//!   "uptime_seconds": 12.5,
//!   "unmatched": 0,                    // requests answered 404 (no route)
//!   "refused": 0,                      // request heads refused before routing (400, 431, ...)
//!   "send_timeouts": 0,                // connections closed, HTTP/2 streams reset, by send_timeout
//!   "retried_stale": 0,                // sent again: a reused upstream connection failed first
//!   "routes": [{
//!     "name": "users", "path_prefix": "/api/users", "service": "users",
//!     "requests": 120,                 // matched to the route
//!     "responses": { "1xx": 0, "2xx": 100, "3xx": 0, "4xx": 15, "5xx": 5 },
//!     "fallbacks": 3,                  // fallback responses served
//!     "rate_limited": 10,              // 429 from the route's limits
//!     "unauthorized": 5,               // 401
//!     "upstream_errors": { "timeout": 1, "unavailable": 2, "bad_gateway": 0, "server_error": 2 },
//!     // the client's doing (400, 408, 413, 431), never counted against the upstream
//!     "client_errors": { "bad_body": 0, "body_timeout": 0, "too_large": 1, "headers_too_large": 0, "deadline": 0 },
//!     "latency_ms": { "p50": 1.2, "p99": 8.7, "samples": 120 },   // last 1024 responses
//!     "limits": {
//!       "global": { "available": 180, "burst": 200, "per_second": 1000,          // or null
//!                   "policy": "local", "redis": null },
//!       "per_client": { "clients": null, "burst": 20, "per_second": 10, "key": "ip", // or null
//!                       "policy": "redis",       // a limit in Redis: available / clients are null
//!                       "redis": { "source": "redis",   // the last decision's: batch, local (the
//!                                                       // local share: Redis away), cached, unavailable,
//!                                                       // exceeds_burst (more than the burst: never asked)
//!                                  "breaker": "closed" } } // the breaker around Redis
//!     },
//!     "endpoints": [{
//!       "key": "local/users-127.0.0.1:9001", "address": "127.0.0.1:9001",
//!       "outstanding": 0, "calls": 60, "failures": 2,
//!       "ejected": false, "ejected_for_ms": null, "ejections": 0,
//!       "breaker": "closed"            // open, half_open, forced_open, disabled; null without [routes.breaker]
//!     }]
//!   }]
//! }
//! ```
//!
//! `/metrics` shows the same numbers as `seawall_gateway_*` series labelled by `route`
//! (and `class`, `kind`, `quantile`, `endpoint`, `address`).
//!
//! ## Following a request
//!
//! Every request routed to an upstream carries, there and back:
//!
//! - **W3C Trace Context** (`[gateway] trace_context = true`, the default): the gateway
//!   is a participant with a hop of its own. A client's `traceparent` (exactly one, valid
//!   per the specification: lowercase hex, non-zero ids, version `ff` refused, a future
//!   version read by the `00` layout) is forwarded with the same trace id, the client's
//!   `sampled` flag and a new parent id (the gateway's span id), with its `tracestate` as
//!   it came. A missing or invalid one is replaced, never forwarded, by a new trace
//!   (random 16-byte trace id, 8-byte span id, flagged sampled: the gateway does not
//!   sample, and services that follow their parent's decision then record it), and the
//!   client's `tracestate`, which belonged to no continued trace, is dropped.
//! - **A request id** (`[gateway] request_id_header`, default `"x-request-id"`, Kong's
//!   correlation id; `""` turns it off): a client's (one value, 1 to 128 bytes of visible
//!   ASCII) is passed on as it is, any other replaced by a new UUID-v4-shaped id; it is
//!   sent upstream and set on the response to the client. A per-client limit cannot be
//!   keyed on it (nor on `traceparent` with `trace_context` on): the gateway makes one for
//!   every request without a valid one, so each such request would be a client of its own
//!   and `on_missing` would never apply; the configuration refuses it. Headers the gateway
//!   or HTTP manage (`Host`, `X-Forwarded-*`, `traceparent`, `Expect`, `Location`,
//!   `Content-*`, `If-*`, …) are refused as its name.
//!
//! Ids come from a per-thread splitmix64 generator seeded from the standard library's
//! random keys: unique enough to follow requests, **not** secret; never use them as
//! tokens. Making them costs no lock and one allocation per header value.
//!
//! With the `tracing` feature, each request is an `INFO` span `request` (target
//! `seawall::gateway`) with the fields `method`, `route`, `upstream` (the endpoint chosen),
//! `status` and `latency_us` (to the response head, not the end of the body), `trace_id`,
//! `span_id` (the parent id sent upstream) and `request_id`; the field values are
//! computed only when a subscriber wants the span. To export the gateway's hops with
//! OpenTelemetry, put `tracing-opentelemetry`'s layer in the subscriber and use the
//! `trace_id` / `span_id` fields to correlate (the span is not linked to the incoming
//! context by itself: that needs the OpenTelemetry propagator, which seawall does not
//! depend on).
//!
//! ## Live status page
//!
//! `GET /status` ([`STATUS_PAGE_PATH`]) serves one self-contained HTML page (inline CSS and
//! a little JavaScript, nothing loaded from elsewhere; `cache-control: no-store`), in the
//! spirit of the Hystrix dashboard. It fetches `status.json` next to it every second
//! (`/status?refresh=500` for every 500 ms, 100 at least) and shows per route the
//! requests, successes, failures, fallbacks, 429s and 401s with their rates per second
//! (computed in the browser from successive snapshots and the gateway's uptime), latency
//! p50/p99 and the limiters' headroom; and per endpoint its address, breaker state as a
//! coloured badge, requests in flight, calls, failures and ejection with the time left.
//! "Failure" is the sum of `upstream_errors` (answered by a fallback or not); "success"
//! is every other response that was neither a 429 nor a 401. A banner says when
//! `/status.json` fails, and the last data stays on screen, faded. Strings from the JSON
//! are set as text, never parsed as markup.
//!
//! For scripts and tests the elements carry stable attributes: `data-route="<name>"` on
//! each route's `<section>`; `data-stat` (`requests`, `success`, `failure`, `fallbacks`,
//! `rate_limited`, `unauthorized`) with `data-count` and `data-rate` (empty until two
//! snapshots); `data-endpoint="<address>"` on each endpoint's row, with `data-breaker`
//! (the JSON's state, or `none` without a breaker) and `data-ejected`; `#last-updated`
//! (with `data-updated`, an ISO time) and `#error` (with `data-error`, empty while
//! `/status.json` answers).

#[cfg(unix)]
mod affinity;
mod body;
mod client;
mod config;
#[doc(hidden)]
pub mod grpc;
#[doc(hidden)]
pub mod h1;
#[doc(hidden)]
pub mod h1_server;
#[doc(hidden)]
pub mod headers;
pub mod jwt;
mod metrics;
/// Request path normalisation: [`uri_path`](crate::uri_path), by its older name.
pub use crate::uri_path as path;
mod poll_clock;
mod pool;
mod route;
mod secret;
mod server;
#[cfg(feature = "redis")]
mod shared_limit;
pub mod status;
mod stream_watch;
mod timers;
#[cfg(feature = "tls")]
mod tls;
#[doc(hidden)]
pub mod trace;
#[cfg(feature = "tls")]
mod upstream_tls;

#[cfg(unix)]
pub use affinity::CpuAffinity;
pub use body::Body;
pub use config::{
    AdminConfig, AuthConfig, BalanceSettings, BreakerSettings, CertificateSettings, ClientKey,
    ClientLimitSettings, FallbackSettings, GatewayConfig, Http2Settings, JwtConfig, LimitPolicy,
    LimitSettings, OnMissing, OutlierSettings, RateLimitSettings, RedisFailure, RedisSettings,
    RedisTlsSettings, RouteConfig, ServerConfig, ServiceConfig, StrategyName, TlsSettings,
    UpstreamProtocol, UpstreamTlsSettings,
};
pub use metrics::use_prometheus_handle;
/// The handle [`use_prometheus_handle`] takes, from `metrics-exporter-prometheus`.
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use route::FALLBACK_HEADER;
#[cfg(unix)]
pub use server::GatewayThreads;
pub use server::{
    BuildError, Discovery, Gateway, GatewayHandle, METRICS_PATH, RouteService, STATUS_PAGE_PATH,
    STATUS_PATH,
};
pub use status::GatewayStatus;
