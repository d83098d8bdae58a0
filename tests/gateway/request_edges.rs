//! Requests an attacker shapes against the gateway's client-facing HTTP/1 server and
//! request handling (underscored forwarding fields, `CONNECT`, `;` after a route's
//! prefix, absolute-form targets): each test pins a defect found in review, over a real
//! loopback socket to a spawned gateway, with a hand-written upstream that records the
//! request heads it got.

use seawall::gateway::GatewayHandle;

use super::limits::{exchange, status_of};

/// A hand-written upstream recording the request heads it gets, answering `<name>`.
async fn heads_upstream(name: &'static str) -> Heads {
    super::raw_http::heads_upstream(move |_| name.to_owned()).await
}

type Heads = super::raw_http::HeadsUpstream;

/// A gateway with one route, `/api`, to `up`.
async fn gateway(up: &Heads) -> GatewayHandle {
    super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    ))
    .await
}

/// The fields of a recorded head, names lower-cased.
fn fields(head: &str) -> Vec<(String, String)> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// SECURITY.md: from a peer that is not a trusted proxy, "what a client sent in
/// `X-Forwarded-For`, ... `Forwarded`, `X-Real-IP` and any other `X-Forwarded-*` ... is
/// dropped". A client spells them with underscores (`X_Forwarded_For`, `X-Real_IP`):
/// CGI-style upstreams (Rack, PHP, WSGI/werkzeug, many frameworks reading
/// `HTTP_X_FORWARDED_FOR`) map `-` and `_` to the same variable, so the client's spoofed
/// address reaches them as the forwarded client. nginx never forwards these (fields with
/// `_` are ignored: `underscores_in_headers off`); the gateway must drop them with the
/// dashed spellings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscored_forwarding_fields_from_a_client_are_dropped() {
    let up = heads_upstream("up").await;
    let gw = gateway(&up).await;
    let raw = "GET /api/x HTTP/1.1\r\nHost: gw\r\n\
               X_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Host: evil.example\r\n\
               x_forwarded-proto: https\r\nX_Real_IP: 6.6.6.6\r\nX-Real_Ip: 6.6.6.6\r\n\
               Connection: close\r\n\r\n";
    let answer = exchange(gw.local_addr(), raw.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let spoofed: Vec<_> = fields(&seen[0])
        .into_iter()
        .filter(|(name, _)| {
            let dashed = name.replace('_', "-");
            name.contains('_') && (dashed.starts_with("x-forwarded-") || dashed == "x-real-ip")
        })
        .collect();
    assert!(
        spoofed.is_empty(),
        "the client's forwarding fields reached the upstream: {spoofed:?}\n{}",
        seen[0]
    );
    gw.shutdown().await;
}

/// `CONNECT` asks a proxy for a tunnel (RFC 9110 §9.3.6); the gateway does not make
/// tunnels, yet a `CONNECT` with an origin-form target (`CONNECT /api/x`) is proxied to
/// the upstream as if it were a request, and its `200` comes back with a
/// `Content-Length` and a body. RFC 9110 §8.6 / §9.3.6: a server MUST NOT send
/// `Content-Length` in a 2xx answer to `CONNECT`, and RFC 9112 §6.3 (rule 2) has any
/// client take a 2xx answer to `CONNECT` as the start of a tunnel: the client (or a
/// proxy in front) and the gateway then disagree on what the next bytes on the
/// connection are. nginx answers `CONNECT` with `405`; Envoy refuses it unless tunnelling
/// is configured. The gateway must refuse it before routing and never call the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_never_proxied() {
    let up = heads_upstream("up").await;
    let gw = gateway(&up).await;
    let raw = "CONNECT /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let answer = exchange(gw.local_addr(), raw.as_bytes()).await;
    let status = status_of(&answer);
    assert!(
        matches!(status, 400 | 405 | 501),
        "CONNECT answered {status}:\n{answer}"
    );
    assert!(
        up.seen().is_empty(),
        "CONNECT reached the upstream: {:?}",
        up.seen()
    );
    gw.shutdown().await;
}

/// Routes are matched on segment boundaries (`/api/admin` covers `/api/admin` and
/// `/api/admin/x`). A client adds a `;` path parameter to the route's last segment:
/// `/api/admin;jsessionid=1/secret` is not under `/api/admin` for the gateway, so it is
/// served by the catch-all `/` route (no auth); Tomcat, Jetty and the servlet containers
/// behind it drop `;parameters` from each segment and serve `/api/admin/secret`. The
/// authenticated route is bypassed: the same class as `..;/`, which the gateway refuses
/// for exactly this reason (src/gateway/path.rs). nginx (`location /api/admin`) and
/// Envoy (`prefix: /api/admin`) match that path to the admin route, as plain string
/// prefixes. A `;` ending the prefix's last segment must count as a segment boundary
/// (or the path be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_parameter_does_not_take_a_path_out_of_its_route() {
    let (open, admin) = (heads_upstream("open").await, heads_upstream("admin").await);
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [auth.jwt]\nsecret = \"a test secret of at least 32 bytes\"\n\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/\"\nservice = \"open\"\n\n\
         [[routes]]\nname = \"admin\"\npath_prefix = \"/api/admin\"\nservice = \"admin\"\n\
         auth = true\n\n\
         [[services]]\nname = \"open\"\ninstances = [\"{}\"]\n\n\
         [[services]]\nname = \"admin\"\ninstances = [\"{}\"]\n",
        open.addr, admin.addr
    ))
    .await;
    for target in [
        "/api/admin;jsessionid=1/secret",
        "/api/admin;/secret",
        "/api/admin;x",
    ] {
        let answer = exchange(gw.local_addr(), super::limits::get(target).as_bytes()).await;
        let status = status_of(&answer);
        assert!(
            matches!(status, 400 | 401),
            "{target}: answered {status}, not the admin route's 401 (or a 400):\n{answer}"
        );
    }
    assert!(
        open.seen().is_empty(),
        "the open route served admin paths: {:?}",
        open.seen()
    );
    assert!(admin.seen().is_empty(), "{:?}", admin.seen());
    gw.shutdown().await;
}

/// RFC 9112 §3.2.2: a server that gets a request in absolute form "MUST ignore the
/// received Host header field (if any) and instead use the host information of the
/// request-target". The gateway does the opposite: `GET http://evil.example/api/x` with
/// `Host: gw` reaches the upstream with `X-Forwarded-Host: gw`, the host the request is
/// not for, and the target's authority is never checked at all. Envoy sets the host
/// (`:authority`) from an absolute URL; nginx's `$host` is the request line's host. The
/// upstream must see the target's authority (or the request be refused when the two
/// differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_s_authority_is_the_request_s_host() {
    let up = heads_upstream("up").await;
    let gw = gateway(&up).await;
    let raw = "GET http://evil.example/api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let answer = exchange(gw.local_addr(), raw.as_bytes()).await;
    let status = status_of(&answer);
    if status == 400 {
        assert!(up.seen().is_empty(), "{:?}", up.seen());
    } else {
        assert_eq!(status, 200, "{answer}");
        let seen = up.seen();
        let host: Vec<_> = fields(&seen[0])
            .into_iter()
            .filter(|(n, _)| n == "x-forwarded-host")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(host, ["evil.example"], "{}", seen[0]);
    }
    // An authority that is not a valid host is refused as an invalid `Host` is.
    up.clear();
    let raw =
        "GET http://user@evil.example/api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let answer = exchange(gw.local_addr(), raw.as_bytes()).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    gw.shutdown().await;
}

/// RFC 9110 §9.3.2: the answer to `HEAD` is the `GET`'s without its content, and (§8.6)
/// may carry the `Content-Length` the `GET` would have. The gateway's own answers (no
/// route, a limit's `429`, `502`, open breakers' `503`, a fallback, the admin pages)
/// went out to `HEAD` without any, where their `GET` had one: a client or cache checking
/// a resource's size with `HEAD` saw none. Each `HEAD` is followed on the same
/// connection by its `GET`, so a body sent after the `HEAD`'s head would be read as the
/// next answer and fail the split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_to_the_gateway_s_own_answers_has_its_get_s_content_length() {
    use super::raw_http::{content_length, pipelined, split_answers};
    let up = heads_upstream("up").await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\non_proxy_listener = true\n\n\
         [[routes]]\nname = \"limited\"\npath_prefix = \"/limited\"\nservice = \"up\"\n\
         rate_limit = {{ global = {{ per_second = 1, burst = 1 }} }}\n\n\
         [[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nservice = \"dead\"\n\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nservice = \"dead\"\n\
         breaker = {{ window = 1, minimum_calls = 1, wait_in_open = \"60s\" }}\n\n\
         [[routes]]\nname = \"fallback\"\npath_prefix = \"/fallback\"\nservice = \"dead\"\n\
         fallback = {{ body = '{{\"fallback\":true}}' }}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n\n\
         [[services]]\nname = \"dead\"\ninstances = [\"127.0.0.1:9\"]\n",
        up.addr
    ))
    .await;
    let addr = gw.local_addr();
    // The limit's one token, and the breaker's one call (which opens it), spent first.
    for target in ["/limited/x", "/open/x"] {
        let _ = super::raw_http::get(addr, target).await;
    }
    for (target, status, same_length) in [
        ("/nowhere", 404, true),
        ("/limited/x", 429, true),
        ("/down/x", 502, true),
        ("/open/x", 503, true),
        ("/fallback/x", 200, true),
        ("/status", 200, true),
        // The counters may change between the two: a length, not the same one.
        ("/status.json", 200, false),
        ("/metrics", 200, false),
    ] {
        let raw = format!(
            "HEAD {target} HTTP/1.1\r\nHost: gw\r\n\r\n\
             GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        );
        let answers = split_answers(&pipelined(addr, &raw).await, &[true, false]);
        let [(head, _), (get, body)] = &answers[..] else {
            unreachable!()
        };
        for answer in [head, get] {
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{target}:\n{answer}"
            );
        }
        let length = content_length(head);
        assert!(
            length.is_some_and(|n| n > 0),
            "{target}: HEAD answered without the GET's Content-Length:\n{head}"
        );
        if same_length {
            assert_eq!(length, Some(body.len()), "{target}:\n{head}\n\n{get}");
        }
    }
    // An upstream's answer to HEAD is passed on as it was (this one has a length).
    let raw = "HEAD /limited/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let answers = split_answers(&pipelined(addr, raw).await, &[true]);
    assert!(
        answers[0].0.starts_with("HTTP/1.1 200 "),
        "{}",
        answers[0].0
    );
    assert_eq!(content_length(&answers[0].0), Some(2), "{}", answers[0].0);
    gw.shutdown().await;
}

/// The same over HTTP/2 (h2c): the `HEAD`'s answer has the `GET`'s `Content-Length`
/// and no `DATA` (a client refuses a `HEAD` answer with content as malformed, RFC 9113
/// §8.1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_http2_to_the_gateway_s_own_answers_has_no_body() {
    use http_body_util::{BodyExt, Empty};
    let up = heads_upstream("up").await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    let (mut client, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut exchange = async |method: http::Method| {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/nowhere", gw.local_addr()))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = tokio::time::timeout(super::raw_http::BOUND, client.send_request(request))
            .await
            .unwrap()
            .expect("an answer");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a well-formed body").to_bytes();
        (parts, body)
    };
    let (get, body) = exchange(http::Method::GET).await;
    let (head, nothing) = exchange(http::Method::HEAD).await;
    assert_eq!((get.status.as_u16(), head.status.as_u16()), (404, 404));
    assert!(!body.is_empty());
    assert!(nothing.is_empty(), "{nothing:?}");
    let length = head.headers.get(http::header::CONTENT_LENGTH);
    assert_eq!(
        length.and_then(|v| v.to_str().ok()),
        Some(body.len().to_string().as_str()),
        "{head:?}"
    );
    gw.shutdown().await;
}

/// A `;` path parameter on a segment *inside* a route's prefix took the path out of the
/// route: `under_prefix` counted a `;` as a segment boundary only right after the whole
/// prefix (`/api/admin;x`), so `/api;jsessionid=1/admin/secret`, `/;/api/admin/secret`
/// and `/api/;x/admin/secret` were not under `/api/admin`, and the catch-all `/` route
/// (no auth) served them as they came. Tomcat, Jetty and Spring's `UrlPathHelper` drop
/// `;parameters` from every segment (and merge the empty segment left), and serve
/// `/api/admin/secret`: the authenticated route was bypassed (the Apache Shiro `/;/admin`
/// class, CVE-2020-11989 / CVE-2020-13933). Routes are now matched on the path as those
/// containers read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_parameter_inside_a_route_prefix_does_not_escape_it() {
    let (open, admin) = (heads_upstream("open").await, heads_upstream("admin").await);
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [auth.jwt]\nsecret = \"a test secret of at least 32 bytes\"\n\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/\"\nservice = \"open\"\n\n\
         [[routes]]\nname = \"admin\"\npath_prefix = \"/api/admin\"\nservice = \"admin\"\n\
         auth = true\n\n\
         [[services]]\nname = \"open\"\ninstances = [\"{}\"]\n\n\
         [[services]]\nname = \"admin\"\ninstances = [\"{}\"]\n",
        open.addr, admin.addr
    ))
    .await;
    let mut served = Vec::new();
    for target in [
        "/api;jsessionid=1/admin/secret",
        "/api;/admin/secret",
        "/;/api/admin/secret",
        "/api/;x/admin/secret",
        // Escaped: a framework that decodes before it drops parameters reads a `;`.
        "/api%3Bx/admin/secret",
    ] {
        let answer = exchange(gw.local_addr(), super::limits::get(target).as_bytes()).await;
        let status = status_of(&answer);
        if !matches!(status, 400 | 401) {
            served.push(format!("{target}: {status}"));
        }
    }
    assert!(
        served.is_empty() && open.seen().is_empty(),
        "admin paths served without auth by the open route: {served:?}\nopen upstream saw: {:?}",
        open.seen()
            .iter()
            .map(|h| super::raw_http::target_of(h).to_owned())
            .collect::<Vec<_>>()
    );
    assert!(admin.seen().is_empty(), "{:?}", admin.seen());
    gw.shutdown().await;
}

/// A path matched to its route through its match form (a `;` parameter inside the
/// prefix, an escaped reserved character) has the prefix's segments stripped as they
/// were written: the upstream gets what follows them, not a path cut in a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_matched_through_its_parameters_is_stripped_by_segments() {
    let up = heads_upstream("up").await;
    let gw = super::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api/v1:beta\"\nservice = \"up\"\n\
         strip_prefix = true\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    ))
    .await;
    for target in [
        "/api/v1:beta/users?x=1",
        "/api;j=1/v1:beta/users?x=1",
        "/;/api/v1%3Abeta;y/users?x=1",
    ] {
        let answer = exchange(gw.local_addr(), super::limits::get(target).as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{target}");
    }
    let targets: Vec<String> = up
        .seen()
        .iter()
        .map(|h| super::raw_http::target_of(h).to_owned())
        .collect();
    assert_eq!(targets, ["/users?x=1"; 3], "as the upstream got them");
    gw.shutdown().await;
}
