//! Path normalisation against hostile request targets, over raw loopback sockets: the
//! gateway matches routes on the normalised path and forwards that path, so a client
//! cannot climb out of an open route into an authenticated one with `..`, `%2e%2e`,
//! `..;/` or an encoded slash, nor make a stripped prefix leave `//host` behind. Each
//! route's upstream is hand-written and records the request line it received.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use proptest::prelude::*;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SECRET: &str = "a test secret of at least 32 bytes";

/// A hand-written upstream: reads request heads (bodiless GETs) on keep-alive
/// connections, records each request target, and answers `200` with `<name> <target>`.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn recorder(name: &'static str) -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let target = head
                        .lines()
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .unwrap_or("")
                        .to_owned();
                    log.lock().push(target.clone());
                    let body = format!("{name} {target}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Recorder { addr, seen }
}

/// Routes: `/api/open` (no auth), `/api/admin` (auth), `/api/public` (strip_prefix).
async fn gateway(extra: &str) -> (GatewayHandle, Recorder, Recorder, Recorder) {
    let (open, admin, public) = (
        recorder("open").await,
        recorder("admin").await,
        recorder("public").await,
    );
    let config = format!(
        "[gateway]
listen = \"127.0.0.1:0\"
{extra}

[auth.jwt]
secret = \"{SECRET}\"

[[routes]]
name = \"open\"
path_prefix = \"/api/open\"
service = \"open\"

[[routes]]
name = \"admin\"
path_prefix = \"/api/admin\"
service = \"admin\"
auth = true

[[routes]]
name = \"public\"
path_prefix = \"/api/public\"
service = \"public\"
strip_prefix = true

[[services]]
name = \"open\"
instances = [\"{}\"]

[[services]]
name = \"admin\"
instances = [\"{}\"]

[[services]]
name = \"public\"
instances = [\"{}\"]
",
        open.addr, admin.addr, public.addr
    );
    let config = GatewayConfig::from_toml_str(&config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener);
    (gw, open, admin, public)
}

/// Sends `GET <target>` as raw bytes; the status and the body.
async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    crate::raw_http::get(addr, target).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_climb_from_an_open_route_into_an_authenticated_one() {
    let (gw, open, admin, public) = gateway("").await;
    let addr = gw.local_addr();
    // Climbing into /api/admin: normalised, then matched to the admin route, which
    // wants a token (401); never served by the open route.
    for target in [
        "/api/open/../admin/secret",
        "/api/open/%2e%2e/admin/secret",
        "/api/open/%2E%2e/admin/secret",
        "/api/open/.%2e/admin/secret",
        "/api/open/./../admin/secret",
        "/api/open/x/../../admin/secret?q=1",
    ] {
        let (status, body) = raw_get(addr, target).await;
        assert_eq!(status, 401, "{target}: {body}");
    }
    // Ambiguous or hostile: refused outright.
    for target in [
        "/api/open/..%2fadmin/secret",
        "/api/open/..%2Fadmin/secret",
        "/api/open/%2e%2e%2fadmin/secret",
        "/api/open/..;/admin/secret",
        "/api/open/..;x=1/admin/secret",
        "/api/open/.;/admin",
        "/api/open/%2e%2e;/admin/secret",
        "/api/open/..%5cadmin/secret",
        "/api/open/..\\admin/secret",
        "/api/open/%00",
        "/api/open/%zz",
        "/api/open/%2",
        "/../etc/passwd",
        "/api/open/../../../etc/passwd",
    ] {
        let (status, body) = raw_get(addr, target).await;
        assert_eq!(status, 400, "{target}: {body}");
    }
    assert!(
        admin.seen.lock().is_empty(),
        "the admin upstream was reached: {:?}",
        admin.seen.lock()
    );
    assert!(
        open.seen.lock().is_empty(),
        "the open upstream was reached: {:?}",
        open.seen.lock()
    );
    // Benign paths are normalised and forwarded in their normal form, query unchanged.
    let cases = [
        ("/api/open/a/./b", "open /api/open/a/b"),
        (
            "/api/open//a///b?x=%2e%2e&y=..",
            "open /api/open/a/b?x=%2e%2e&y=..",
        ),
        ("/api/open/%7euser/%41", "open /api/open/~user/A"),
        ("/api/open/a/b/..", "open /api/open/a/"),
        ("/api/open/sp%20ace", "open /api/open/sp%20ace"),
        ("/api/x/../open/y", "open /api/open/y"),
        ("/api/public//evil.com/x", "public /evil.com/x"),
        ("/api/public/%2e/evil.com", "public /evil.com"),
        ("/api/public", "public /"),
        ("//api//public//x?q", "public /x?q"),
    ];
    for (target, expected) in cases {
        let (status, body) = raw_get(addr, target).await;
        assert_eq!((status, body.as_str()), (200, expected), "{target}");
    }
    assert!(public.seen.lock().iter().all(|p| !p.starts_with("//")));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_merge_slashes_off_a_stripped_prefix_never_leaves_a_leading_double_slash() {
    let (gw, open, _admin, public) = gateway("merge_slashes = false").await;
    let addr = gw.local_addr();
    let (status, body) = raw_get(addr, "/api/public//evil.com/x").await;
    assert_eq!((status, body.as_str()), (200, "public /evil.com/x"));
    let (status, body) = raw_get(addr, "/api/public///evil.com//x").await;
    assert_eq!((status, body.as_str()), (200, "public /evil.com//x"));
    // Kept as sent elsewhere, dot segments still resolved.
    let (status, body) = raw_get(addr, "/api/open/a//b/./c").await;
    assert_eq!((status, body.as_str()), (200, "open /api/open/a//b/c"));
    let (status, _) = raw_get(addr, "/api/open/../admin/x").await;
    assert_eq!(status, 401);
    assert_eq!(open.seen.lock().len(), 1);
    assert!(public.seen.lock().iter().all(|p| !p.starts_with("//")));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_normalize_path_off_paths_needing_it_are_refused_and_others_kept_as_sent() {
    let (gw, open, admin, _public) = gateway("normalize_path = false").await;
    let addr = gw.local_addr();
    for target in [
        "/api/open/../admin/secret",
        "/api/open/%2e%2e/admin/secret",
        "/api/open/./x",
        "/api/open/..;/admin",
        "/api/open/..%2fadmin",
    ] {
        let (status, body) = raw_get(addr, target).await;
        assert_eq!(status, 400, "{target}: {body}");
    }
    let (status, body) = raw_get(addr, "/api/open/%7Ex/a.b").await;
    assert_eq!((status, body.as_str()), (200, "open /api/open/%7Ex/a.b"));
    assert_eq!(open.seen.lock().len(), 1);
    assert!(admin.seen.lock().is_empty());
    gw.shutdown().await;
}

/// The segments generated paths are made of: dots, encoded dots, `;`, empty segments
/// (`//`), and the names of the routes.
fn segment() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        ".", "..", "%2e", "%2E%2e", "%2e.", "", ";", "..;", "a", "admin", "open", "api", "public",
        "%61dmin",
    ])
}

/// What a strict (and aggressive) upstream makes of a forwarded path: every escape
/// decoded, `;params` dropped from each segment (as Tomcat does), empty segments merged,
/// dot segments removed. `None` when it climbs above the root.
fn strict_resolve(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        match segment {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: crate::regressions_next_to_source(),
        ..ProptestConfig::default()
    })]

    /// Whatever reaches the upstream of a route resolves, for a strict upstream, under
    /// that route's prefix and under no other: the route chosen is the one a strict
    /// resolver picks on the forwarded path.
    #[test]
    fn forwarded_paths_resolve_under_their_own_route_only(
        segments in prop::collection::vec(segment(), 0..8),
        lead in prop::sample::select(vec!["/api/open/", "/api/", "/api/public/", "/"]),
    ) {
        let runtime = runtime();
        let addr = *GATEWAY;
        let target = format!("{lead}{}", segments.join("/"));
        let (status, body) = runtime.block_on(raw_get(addr, &target));
        if status == 200 {
            let (route, forwarded) = body.split_once(' ').unwrap();
            let full = if route == "public" {
                format!("/api/public{forwarded}")
            } else {
                forwarded.to_owned()
            };
            prop_assert!(!forwarded.starts_with("//"), "{target} -> {body}");
            let resolved = strict_resolve(&full);
            prop_assert!(resolved.is_some(), "{target} -> {body}: climbs above the root");
            let resolved = resolved.unwrap();
            let strict_route = ["/api/open", "/api/admin", "/api/public"]
                .into_iter()
                .find(|p| under(&resolved, p));
            let chosen = format!("/api/{route}");
            prop_assert_eq!(
                strict_route,
                Some(chosen.as_str()),
                "{} -> {} (resolves to {})", target, body, resolved
            );
        } else {
            prop_assert!(
                [400, 401, 404].contains(&status),
                "{target}: {status} {body}"
            );
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    &RUNTIME
}

static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

/// One gateway (and its upstreams) for every proptest case.
static GATEWAY: std::sync::LazyLock<SocketAddr> = std::sync::LazyLock::new(|| {
    let (gw, open, admin, public) = RUNTIME.block_on(gateway(""));
    let addr = gw.local_addr();
    // Kept for the life of the process.
    std::mem::forget((gw, open, admin, public));
    addr
});

/// A gateway with a catch-all `/` route (no auth) to `open` and an authenticated route
/// on `prefix` to `admin`; the upstreams answer `<name> <target>`.
async fn catch_all_and(
    prefix: &str,
) -> (
    GatewayHandle,
    crate::raw_http::HeadsUpstream,
    crate::raw_http::HeadsUpstream,
) {
    use crate::raw_http::{heads_upstream, target_of};
    let open = heads_upstream(|h| format!("open {}", target_of(h))).await;
    let admin = heads_upstream(|h| format!("admin {}", target_of(h))).await;
    let gw = crate::spawn_gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [auth.jwt]\nsecret = \"{SECRET}\"\n\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/\"\nservice = \"open\"\n\n\
         [[routes]]\nname = \"admin\"\npath_prefix = \"{prefix}\"\nservice = \"admin\"\n\
         auth = true\n\n\
         [[services]]\nname = \"open\"\ninstances = [\"{}\"]\n\n\
         [[services]]\nname = \"admin\"\ninstances = [\"{}\"]\n",
        open.addr, admin.addr
    ))
    .await;
    (gw, open, admin)
}

/// Sends `raw` (a whole request, `Connection: close`), returns the status.
async fn raw_status(addr: SocketAddr, raw: &[u8]) -> u16 {
    crate::limits::status_of(&crate::limits::exchange(addr, raw).await)
}

/// A route prefix with a non-ASCII character must be written percent-encoded ("`é` comes
/// percent-encoded in requests, and is matched so: write it `%C3%A9`"), but a hostile
/// client need not encode it: the HTTP/1 server accepts raw UTF-8 in the target, and
/// `normalize` passed those bytes through unencoded. `GET /caf\xC3\xA9/secret` was then
/// not under `/caf%C3%A9`, was served by the catch-all route without a token, and reached
/// its upstream as `/café/secret`, which every upstream that decodes its path takes for
/// the protected `/café/secret`. Raw, such bytes are now encoded (normalised to
/// `%C3%A9`), and matched so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_utf8_in_the_path_is_matched_as_its_escapes() {
    let (gw, open, admin) = catch_all_and("/caf%C3%A9").await;
    let addr = gw.local_addr();
    // The encoded spelling is the admin route's (it wants a token).
    let encoded = raw_status(
        addr,
        b"GET /caf%c3%a9/secret HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(encoded, 401);
    let raw = raw_status(
        addr,
        b"GET /caf\xc3\xa9/secret HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        matches!(raw, 400 | 401) && open.seen().is_empty(),
        "raw UTF-8 for the protected prefix answered {raw}; the open route's upstream saw {:?}",
        open.seen()
            .iter()
            .map(|h| crate::raw_http::target_of(h).to_owned())
            .collect::<Vec<_>>()
    );
    assert!(admin.seen().is_empty(), "{:?}", admin.seen());
    gw.shutdown().await;
}

/// `normalize` decodes only escaped *unreserved* characters, and prefixes may hold
/// reserved characters written raw (`:`, `@`, `!`, `$`, `'`, `(`, `)`, `*`, `+`, `,`,
/// `=`), as Google-style custom methods have them (`/v1/things:admin`). A client wrote
/// the reserved character escaped: `/v1/things%3Aadmin/secret` was not under
/// `/v1/things:admin` and was served by the catch-all route without a token, while the
/// upstreams that decode their path before routing (Go's `URL.Path`, Spring) act on
/// `/v1/things:admin/secret`. Routes are now matched with such escapes decoded (the path
/// forwarded keeps them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_reserved_character_does_not_escape_its_prefix() {
    let (gw, open, admin) = catch_all_and("/v1/things:admin").await;
    let addr = gw.local_addr();
    let plain = raw_status(
        addr,
        b"GET /v1/things:admin/secret HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(plain, 401);
    let mut served = Vec::new();
    for target in ["/v1/things%3Aadmin/secret", "/v1/things%3aadmin"] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
        let status = raw_status(addr, raw.as_bytes()).await;
        if !matches!(status, 400 | 401) {
            served.push(format!("{target}: {status}"));
        }
    }
    assert!(
        served.is_empty() && open.seen().is_empty(),
        "{served:?}; the open route's upstream saw {:?}",
        open.seen()
            .iter()
            .map(|h| crate::raw_http::target_of(h).to_owned())
            .collect::<Vec<_>>()
    );
    assert!(admin.seen().is_empty(), "{:?}", admin.seen());
    gw.shutdown().await;
}
