//! Hostile clients against a real gateway, over raw loopback sockets (issue 11, items 3,
//! 4, 5 and 7): stacked limits, two `Authorization` headers, client-set forwarding
//! headers and `Host`, header-keyed per-client limits. The upstream is hand-written and
//! records every request head it receives. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use seawall::discovery::{Instance, Registry};
use seawall::gateway::jwt::JwtVerifier;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);
const HEAD: &str = "[gateway]\nlisten = \"127.0.0.1:0\"\n";
const SECRET: &str = "a test secret of at least 32 bytes";

/// One request head as the upstream got it: header names lower-cased, in order.
type Seen = Vec<(String, String)>;

/// A hand-written upstream: reads request heads (no bodies: GETs only) on keep-alive
/// connections, records their headers and answers `200 ok` (to `GET /hop`, with
/// hop-by-hop fields of its own).
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

/// An answer with a field of every hop-by-hop kind: `Connection` naming another field,
/// that field, `Keep-Alive`, `Proxy-Connection`, `Upgrade`; and one end-to-end field.
const HOP_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: x-internal\r\nX-Internal: secret\r\n\
    Keep-Alive: timeout=30\r\nProxy-Connection: keep-alive\r\nUpgrade: foo/1\r\n\
    X-Kept: 1\r\nContent-Length: 2\r\n\r\nok";

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (record, count) = (seen.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let headers = head
                            .split("\r\n")
                            .skip(1)
                            .filter_map(|line| line.split_once(':'))
                            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                            .collect();
                        record.lock().push(headers);
                        let answer: &[u8] = if head.starts_with("GET /hop ") {
                            HOP_ANSWER
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            accepted,
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().len()
    }

    /// The values of `name` in the last request received.
    fn last(&self, name: &str) -> Vec<String> {
        let seen = self.seen.lock();
        let last = seen.last().expect("the upstream got a request");
        last.iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

async fn gateway(config: &str, up: &Recorder) -> (GatewayHandle, Registry) {
    let registry = Registry::new();
    std::mem::forget(registry.register(Instance::local("svc", up.addr)));
    let config = GatewayConfig::from_toml_str(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = Gateway::build(config, Discovery::Registry(registry.clone()))
        .await
        .unwrap();
    (gw.spawn(listener), registry)
}

fn route(extra: &str) -> String {
    format!("{HEAD}\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nservice = \"svc\"\n{extra}\n")
}

/// Sends `raw` from `local` (an address of 127.0.0.0/8) on a new connection and reads
/// the answer to the end (the requests say `Connection: close`, or are HTTP/1.0):
/// returns the status and the whole answer.
async fn raw_from(local: &str, gw: SocketAddr, raw: &[u8]) -> (u16, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut stream: TcpStream = timeout(BOUND, socket.connect(gw)).await.unwrap().unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    timeout(BOUND, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway answers and closes")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

async fn raw(gw: SocketAddr, raw: &[u8]) -> (u16, String) {
    raw_from("127.0.0.1", gw, raw).await
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw.example\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

// ---------------------------------------------------------------------------------
// Item 3: stacked limits.

/// Global 5/s over per-client 1/s: one client hammering is refused by its own limit,
/// and those refusals must not drain the global bucket for everybody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_by_its_own_limit_does_not_drain_the_global_limit() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(
        &route("rate_limit = { global = { per_second = 5 }, per_client = { per_second = 1 } }"),
        &up,
    )
    .await;
    let addr = gw.local_addr();
    let mut admitted = 0;
    for _ in 0..40 {
        let (status, answer) = raw(addr, &get("/x", "")).await;
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
        if status == 429 {
            // The client's limit's fields, then those of the global limit, which admitted
            // the request before handing its token back.
            let policies = field_lines(&answer, "ratelimit-policy");
            assert_eq!(policies.len(), 2, "{answer}");
            assert!(policies[0].starts_with("\"per-client\";q=1"), "{answer}");
            assert!(policies[1].starts_with("\"global\";q=5"), "{answer}");
        }
    }
    assert!((1..=2).contains(&admitted), "{admitted} admitted");
    // Three clients that sent nothing yet: the global bucket still has room for them.
    for client in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let (status, answer) = raw_from(client, addr, &get("/x", "")).await;
        assert_eq!(status, 200, "{client}: {answer}");
    }
    gw.shutdown().await;
}

/// The values of the `name` fields in a raw answer's head, one per field line.
fn field_lines(answer: &str, name: &str) -> Vec<String> {
    answer
        .lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// An upstream's hop-by-hop fields stay on its hop, whether the answer before it on the
/// same pooled connection had any or not; its other fields are passed on.
#[tokio::test]
async fn an_upstreams_hop_by_hop_fields_are_not_passed_on() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    for path in ["/hop", "/plain", "/hop"] {
        let (status, answer) = raw(gw.local_addr(), &get(path, "")).await;
        assert_eq!(status, 200, "{answer}");
        for name in ["x-internal", "keep-alive", "proxy-connection", "upgrade"] {
            assert!(field_lines(&answer, name).is_empty(), "{name}: {answer}");
        }
        assert!(
            field_lines(&answer, "connection")
                .iter()
                .all(|v| v == "close"),
            "only the gateway's own Connection: {answer}"
        );
        let kept = if path == "/hop" { vec!["1"] } else { vec![] };
        assert_eq!(field_lines(&answer, "x-kept"), kept, "{answer}");
    }
    assert_eq!(up.count(), 3);
    gw.shutdown().await;
}

/// Both limits on an admitted response: one `RateLimit-Policy` and one `RateLimit` field
/// line, each listing the per-client policy, then the global one. A client's 429 names
/// both policies too, with `Retry-After`; hidden limits send neither field.
#[tokio::test]
async fn both_limits_are_listed_in_one_field_line_each() {
    let up = Recorder::start().await;
    let limits = "global = { per_second = 100 }, per_client = { per_second = 1, burst = 1 }";
    let (gw, _r) = gateway(&route(&format!("rate_limit = {{ {limits} }}")), &up).await;
    let addr = gw.local_addr();
    let (status, answer) = raw(addr, &get("/x", "")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        field_lines(&answer, "ratelimit-policy"),
        ["\"per-client\";q=1;w=1, \"global\";q=100;w=1"],
        "{answer}"
    );
    assert_eq!(
        field_lines(&answer, "ratelimit"),
        ["\"per-client\";r=0;t=1, \"global\";r=99;t=1"],
        "{answer}"
    );

    let (status, answer) = raw(addr, &get("/x", "")).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(field_lines(&answer, "retry-after"), ["1"], "{answer}");
    assert_eq!(
        field_lines(&answer, "ratelimit-policy").join(", "),
        "\"per-client\";q=1;w=1, \"global\";q=100;w=1",
        "{answer}"
    );
    let state = field_lines(&answer, "ratelimit").join(", ");
    assert!(
        state.starts_with("\"per-client\";r=0;t=1, \"global\";r="),
        "{answer}"
    );
    gw.shutdown().await;

    let (gw, _r) = gateway(
        &route(&format!(
            "rate_limit = {{ {limits}, hide_client_headers = true }}"
        )),
        &up,
    )
    .await;
    let (status, answer) = raw(gw.local_addr(), &get("/x", "")).await;
    assert_eq!(status, 200, "{answer}");
    assert!(field_lines(&answer, "ratelimit").is_empty(), "{answer}");
    assert!(
        field_lines(&answer, "ratelimit-policy").is_empty(),
        "{answer}"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Item 4: two Authorization headers.

fn token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    JwtVerifier::new(SECRET.as_bytes()).sign(&serde_json::json!({ "sub": "ada", "exp": now + 60 }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_refused_on_authenticated_routes() {
    let up = Recorder::start().await;
    let config = format!(
        "{HEAD}\n[auth.jwt]\nsecret = \"{SECRET}\"\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nservice = \"svc\"\nauth = true\n"
    );
    let (gw, _r) = gateway(&config, &up).await;
    let addr = gw.local_addr();
    let good = token();
    let forged = JwtVerifier::new(b"some other secret!!").sign(&serde_json::json!({"sub": "root"}));
    let (status, answer) = raw(
        addr,
        &get(
            "/x",
            &format!("Authorization: Bearer {good}\r\nAuthorization: Bearer {forged}\r\n"),
        ),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(up.count(), 0, "never forwarded");
    // One valid token: forwarded, alone.
    let (status, answer) = raw(
        addr,
        &get("/x", &format!("Authorization: Bearer {good}\r\n")),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(up.last("authorization"), [format!("Bearer {good}")]);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Item 5: forwarding headers and Host.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_set_x_forwarded_host_never_reaches_the_upstream() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    let addr = gw.local_addr();
    // With a Host: replaced by the Host the gateway saw.
    let (status, _) = raw(addr, &get("/x", "X-Forwarded-Host: evil.example\r\n")).await;
    assert_eq!(status, 200);
    assert_eq!(up.last("x-forwarded-host"), ["gw.example"]);
    // HTTP/1.0 without a Host (accepted): no X-Forwarded-Host at all, not the client's.
    let (status, _) = raw(
        addr,
        b"GET /x HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.last("x-forwarded-host"), Vec::<String>::new());
    gw.shutdown().await;
}

/// The upstream gets its own authority as `Host`, never the client's: on the connection
/// the gateway dials for the first request, and on that connection reused for the next
/// ones (where the `Host` is the connection's, written with each head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_its_own_host_on_a_new_and_a_reused_connection() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    for _ in 0..3 {
        let (status, _) = raw(gw.local_addr(), &get("/x", "")).await;
        assert_eq!(status, 200);
        assert_eq!(up.last("host"), [up.addr.to_string()]);
        assert_eq!(up.last("x-forwarded-host"), ["gw.example"]);
    }
    assert_eq!(
        up.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection, reused"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_host() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    let raw_request = b"GET /x HTTP/1.1\r\nHost: gw.example\r\nX-Drop: 1\r\nConnection: close, host, x-drop\r\n\r\n";
    let (status, _) = raw(gw.local_addr(), raw_request).await;
    assert_eq!(status, 200);
    assert_eq!(up.last("x-forwarded-host"), ["gw.example"]);
    assert_eq!(up.last("host").len(), 1);
    assert_eq!(
        up.last("x-drop"),
        Vec::<String>::new(),
        "other named headers go"
    );
    assert_eq!(up.last("connection"), Vec::<String>::new());
    gw.shutdown().await;
}

/// Upstreams commonly read the client's address from fields other than `X-Forwarded-For`,
/// and first: Express's `request-ip` and Go's `reqip` try `X-Client-IP`, then
/// `X-Forwarded-For`, `CF-Connecting-IP`, `Fastly-Client-IP`, `True-Client-IP`,
/// `X-Real-IP`, `X-Cluster-Client-IP`, `X-Forwarded`, `Forwarded-For`; many handlers take
/// `CF-Connecting-IP` before anything else. IIS and Symfony take the path to serve from
/// `X-Original-URL` / `X-Rewrite-URL` (a way past a route's auth: the request matches a
/// public route and the upstream serves the path in the field). A client that is not a
/// trusted proxy sent them all, and the gateway forwarded them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_address_and_path_override_fields_from_a_client_are_dropped() {
    const SPOOFED: [&str; 18] = [
        "x-client-ip",
        "cf-connecting-ip",
        "cf-connecting-ipv6",
        "cf-pseudo-ipv4",
        "fastly-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "x-forwarded",
        "forwarded-for",
        "x-original-forwarded-for",
        "x-appengine-user-ip",
        "x-original-url",
        "x-rewrite-url",
        "true_client_ip",
        "client-ip",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
    ];
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    let spoofed: String = SPOOFED
        .iter()
        .map(|name| format!("{name}: 6.6.6.6\r\n"))
        .collect();
    let (status, _) = raw(gw.local_addr(), &get("/x", &spoofed)).await;
    assert_eq!(status, 200);
    for name in SPOOFED {
        assert_eq!(
            up.last(name),
            Vec::<String>::new(),
            "{name} reached the upstream"
        );
    }
    assert_eq!(up.last("x-forwarded-for"), ["127.0.0.1"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    let spoofed = "Forwarded: for=6.6.6.6;host=evil.example;proto=https\r\nX-Real-IP: 6.6.6.6\r\n\
                   X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Port: 8443\r\nX-Forwarded-Proto: https\r\n\
                   X-Forwarded-Prefix: /evil\r\n";
    let (status, _) = raw(gw.local_addr(), &get("/x", spoofed)).await;
    assert_eq!(status, 200);
    assert_eq!(up.last("forwarded"), Vec::<String>::new());
    assert_eq!(up.last("x-real-ip"), Vec::<String>::new());
    assert_eq!(up.last("x-forwarded-port"), Vec::<String>::new());
    assert_eq!(up.last("x-forwarded-prefix"), Vec::<String>::new());
    assert_eq!(up.last("x-forwarded-proto"), ["http"]);
    assert_eq!(up.last("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(up.last("x-forwarded-host"), ["gw.example"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_duplicate_host_is_400() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(&route(""), &up).await;
    let addr = gw.local_addr();
    for bad in [
        &b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a.example, b.example\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.0\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    ] {
        let (status, answer) = raw(addr, bad).await;
        assert_eq!(status, 400, "{}: {answer}", String::from_utf8_lossy(bad));
    }
    assert_eq!(up.count(), 0, "none forwarded");
    for good in [
        &b"GET /x HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.0\r\n\r\n",
    ] {
        let (status, answer) = raw(addr, good).await;
        assert_eq!(status, 200, "{}: {answer}", String::from_utf8_lossy(good));
    }
    gw.shutdown().await;
    // Before routing: a path no route matches is held to the same rule (400, not 404).
    let config =
        format!("{HEAD}\n[[routes]]\nname = \"r\"\npath_prefix = \"/api\"\nservice = \"svc\"\n");
    let (gw, _r) = gateway(&config, &up).await;
    let addr = gw.local_addr();
    let (status, answer) = raw(
        addr,
        b"GET /elsewhere HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = raw(addr, &get("/elsewhere", "")).await;
    assert_eq!(status, 404, "{answer}");
    gw.shutdown().await;
}

/// Behind a trusted proxy (127.0.0.2 here), its forwarding headers are kept and appended
/// to, and the per-client IP limit keys on the client it reports; from anyone else they
/// are replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_appended_to_and_its_clients_are_limited_apart() {
    let up = Recorder::start().await;
    let config = "[gateway]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.2\"]\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nservice = \"svc\"\n\
         rate_limit = { per_client = { per_second = 1 } }\n";
    let (gw, _r) = gateway(config, &up).await;
    let addr = gw.local_addr();
    let from_proxy = |client: &str| {
        get(
            "/x",
            &format!(
                "X-Forwarded-For: {client}\r\nX-Forwarded-Host: shop.example\r\n\
                 X-Forwarded-Proto: https\r\nForwarded: for={client}\r\nX-Real-IP: {client}\r\n\
                 CF-Connecting-IP: {client}\r\n"
            ),
        )
    };
    let (status, _) = raw_from("127.0.0.2", addr, &from_proxy("203.0.113.7")).await;
    assert_eq!(status, 200);
    assert_eq!(up.last("x-forwarded-for"), ["203.0.113.7, 127.0.0.2"]);
    assert_eq!(up.last("x-forwarded-host"), ["shop.example"]);
    assert_eq!(up.last("x-forwarded-proto"), ["https"]);
    assert_eq!(up.last("forwarded"), ["for=203.0.113.7, for=127.0.0.2"]);
    assert_eq!(up.last("x-real-ip"), ["203.0.113.7"]);
    assert_eq!(up.last("cf-connecting-ip"), ["203.0.113.7"]);
    // Its client used up its bucket; another client behind the same proxy has its own.
    let (status, _) = raw_from("127.0.0.2", addr, &from_proxy("203.0.113.7")).await;
    assert_eq!(status, 429);
    let (status, _) = raw_from("127.0.0.2", addr, &from_proxy("203.0.113.8")).await;
    assert_eq!(status, 200);
    // The same headers from an untrusted peer: replaced, and keyed on the peer.
    let (status, _) = raw_from("127.0.0.3", addr, &from_proxy("203.0.113.9")).await;
    assert_eq!(status, 200);
    assert_eq!(up.last("x-forwarded-for"), ["127.0.0.3"]);
    assert_eq!(up.last("x-forwarded-host"), ["gw.example"]);
    assert_eq!(up.last("x-forwarded-proto"), ["http"]);
    assert_eq!(up.last("forwarded"), Vec::<String>::new());
    assert_eq!(up.last("x-real-ip"), Vec::<String>::new());
    assert_eq!(up.last("cf-connecting-ip"), Vec::<String>::new());
    let (status, _) = raw_from("127.0.0.3", addr, &from_proxy("203.0.113.10")).await;
    assert_eq!(status, 429, "an untrusted peer cannot pick its key");
    gw.shutdown().await;
}

/// An IPv6 client behind a trusted proxy keys its per-client limit by its /64 (by
/// default): a new address of the same network for each request no longer gets a
/// bucket of its own. `client_ipv6_prefix = 128` keys each address alone; more than 128
/// is refused at load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_limited_by_its_network() {
    let up = Recorder::start().await;
    for (prefix, expected) in [
        ("", [200, 429, 429]),
        ("client_ipv6_prefix = 128\n", [200, 200, 200]),
    ] {
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.2\"]\n{prefix}\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nservice = \"svc\"\n\
             rate_limit = {{ per_client = {{ per_second = 1 }} }}\n"
        );
        let (gw, _r) = gateway(&config, &up).await;
        let addr = gw.local_addr();
        let mut statuses = Vec::new();
        for n in 1..=3 {
            let request = get("/x", &format!("X-Forwarded-For: 2001:db8:0:1::{n}\r\n"));
            statuses.push(raw_from("127.0.0.2", addr, &request).await.0);
        }
        assert_eq!(statuses, expected, "{prefix:?}");
        gw.shutdown().await;
    }
    let refused = seawall::gateway::GatewayConfig::from_toml_str(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nclient_ipv6_prefix = 129\n",
    )
    .unwrap_err();
    assert_eq!(refused.field(), "gateway.client_ipv6_prefix", "{refused}");
}

// ---------------------------------------------------------------------------------
// Item 7: header-keyed per-client limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_key_header_are_limited_by_ip() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(
        &route("rate_limit = { per_client = { per_second = 1, burst = 2, key = \"header:x-api-key\" } }"),
        &up,
    )
    .await;
    let addr = gw.local_addr();
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(raw(addr, &get("/x", "")).await.0);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429]);
    // Another address without the header has its own bucket; a key has its own too.
    assert_eq!(raw_from("127.0.0.2", addr, &get("/x", "")).await.0, 200);
    assert_eq!(raw(addr, &get("/x", "X-Api-Key: k1\r\n")).await.0, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_header_can_be_rejected_or_allowed() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(
        &route("rate_limit = { per_client = { per_second = 1, key = \"header:x-api-key\", on_missing = \"reject\" } }"),
        &up,
    )
    .await;
    let (status, answer) = raw(gw.local_addr(), &get("/x", "")).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        raw(gw.local_addr(), &get("/x", "X-Api-Key: k\r\n")).await.0,
        200
    );
    gw.shutdown().await;
    let (gw, _r) = gateway(
        &route("rate_limit = { per_client = { per_second = 1, key = \"header:x-api-key\", on_missing = \"allow\" } }"),
        &up,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(raw(gw.local_addr(), &get("/x", "")).await.0, 200);
    }
    gw.shutdown().await;
    // "shared": every request without the header, from any address, shares one bucket.
    let (gw, _r) = gateway(
        &route("rate_limit = { per_client = { per_second = 1, burst = 2, key = \"header:x-api-key\", on_missing = \"shared\" } }"),
        &up,
    )
    .await;
    let addr = gw.local_addr();
    assert_eq!(raw(addr, &get("/x", "")).await.0, 200);
    assert_eq!(raw_from("127.0.0.2", addr, &get("/x", "")).await.0, 200);
    assert_eq!(raw_from("127.0.0.3", addr, &get("/x", "")).await.0, 429);
    assert_eq!(raw(addr, &get("/x", "X-Api-Key: k\r\n")).await.0, 200);
    gw.shutdown().await;
}

/// A huge key: far over the 64 bytes kept inline, under any sane header line limit.
const KEY: usize = 8 * 1024;

/// Huge keys are accepted, each its own client, and a repeated huge key finds its bucket
/// again (it is stored as a digest: the status shows the clients, not their bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_keys_are_accepted_and_limited() {
    let up = Recorder::start().await;
    let (gw, _r) = gateway(
        &route("rate_limit = { per_client = { per_second = 1, key = \"header:x-api-key\" } }"),
        &up,
    )
    .await;
    let addr = gw.local_addr();
    for i in 0..20 {
        let key = format!("{i:04}{}", "k".repeat(KEY));
        let (status, _) = raw(addr, &get("/x", &format!("X-Api-Key: {key}\r\n"))).await;
        assert_eq!(status, 200, "key {i}");
    }
    let key = format!("{:04}{}", 7, "k".repeat(KEY));
    let (status, _) = raw(addr, &get("/x", &format!("X-Api-Key: {key}\r\n"))).await;
    assert_eq!(status, 429, "the same huge key is the same client");
    // Two keys sharing all but their last byte are still two clients.
    let (status, _) = raw(
        addr,
        &get("/x", &format!("X-Api-Key: {}x\r\n", "k".repeat(KEY))),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = raw(
        addr,
        &get("/x", &format!("X-Api-Key: {}y\r\n", "k".repeat(KEY))),
    )
    .await;
    assert_eq!(status, 200);
    let status = gw.gateway().status();
    assert_eq!(
        status.routes[0].limits.per_client.as_ref().unwrap().clients,
        Some(22)
    );
    gw.shutdown().await;
}

/// A key header sent twice (a fresh first value, the real key last: what an upstream
/// reading the last value authenticates) must not take a client past the limit of its
/// key under the other `on_missing` rules either: under `"allow"` such a request passed
/// unlimited, and under `"ip"` (the default) each address of the client had a bucket of
/// its own, where one key is one client whatever its addresses. Whether the gateway
/// refuses it (`400`) or keys it on the value the upstream reads, the key's burst of one
/// lets one request at most reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_header_passes_no_more_than_its_key() {
    let mut bypassed = Vec::new();
    for on_missing in ["allow", "ip"] {
        let up = Recorder::start().await;
        let (gw, _r) = gateway(
            &route(&format!(
                "rate_limit = {{ per_client = {{ per_second = 1, burst = 1, key = \"header:x-api-key\", on_missing = \"{on_missing}\" }} }}"
            )),
            &up,
        )
        .await;
        let addr = gw.local_addr();
        let mut statuses = Vec::new();
        for n in 2..6 {
            let headers = format!("X-Api-Key: junk{n}\r\nX-Api-Key: real\r\n");
            let (status, _) = raw_from(&format!("127.0.0.{n}"), addr, &get("/x", &headers)).await;
            statuses.push(status);
        }
        if up.count() > 1 {
            bypassed.push(format!(
                "on_missing = {on_missing:?}: {} requests with key `real` (burst 1) reached \
                 the upstream, statuses {statuses:?}",
                up.count()
            ));
        }
        gw.shutdown().await;
    }
    assert!(bypassed.is_empty(), "{bypassed:#?}");
}
