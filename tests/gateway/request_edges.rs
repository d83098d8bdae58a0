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
         [auth.jwt]\nsecret = \"a test secret of enough bytes\"\n\n\
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
