//! The admin surface and the configuration's secrets, over raw loopback sockets: the admin
//! endpoints live on a listener of their own (the proxy listener routes their paths like
//! any other), a bearer token guards them when set, and the JWT secret can come from the
//! environment.

use std::net::SocketAddr;

use seawall::gateway::jwt::JwtVerifier;
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::net::TcpListener;

const TOKEN: &str = "an admin token of enough bytes";

/// A hand-written upstream answering every request `200` with `upstream <target>`.
async fn upstream() -> SocketAddr {
    super::raw_http::heads_upstream(|head| format!("upstream {}", super::raw_http::target_of(head)))
        .await
        .addr
}

async fn start(config: &str) -> GatewayHandle {
    let config = GatewayConfig::from_toml_str(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(config, Discovery::Static)
        .await
        .unwrap()
        .spawn(listener)
}

/// Sends a raw request (`extra` headers, each ending in `\r\n`); the status and body.
async fn raw(addr: SocketAddr, method: &str, target: &str, extra: &str) -> (u16, String) {
    crate::raw_http::request(addr, method, target, extra).await
}

fn config(upstream: SocketAddr, extra: &str, prefix: &str) -> String {
    format!(
        "[gateway]
listen = \"127.0.0.1:0\"
{extra}
[[routes]]
name = \"all\"
path_prefix = \"{prefix}\"
service = \"svc\"

[[services]]
name = \"svc\"
instances = [\"{upstream}\"]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_listener_routes_admin_paths_like_any_other() {
    let up = upstream().await;
    // A catch-all route: the admin paths reach the upstream, not the gateway's status.
    let gw = start(&config(up, "", "/")).await;
    for path in ["/metrics", "/status.json", "/status"] {
        let (status, body) = raw(gw.local_addr(), "GET", path, "").await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("upstream {path}").as_str())
        );
    }
    gw.shutdown().await;
    // No route for them: 404, nothing about routes or upstreams.
    let gw = start(&config(up, "", "/api")).await;
    for path in ["/metrics", "/status.json", "/status"] {
        let (status, body) = raw(gw.local_addr(), "GET", path, "").await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains(&up.to_string()), "{path}: {body}");
        assert!(!body.contains("seawall_gateway"), "{path}: {body}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_the_admin_paths_behind_its_token() {
    let up = upstream().await;
    let dir = std::env::temp_dir().join(format!("seawall-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    let config = GatewayConfig::from_toml_str(&config(up, &extra, "/api")).unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind(config.admin.listen.unwrap())
        .await
        .unwrap();
    let gateway = Gateway::build(config, Discovery::Static).await.unwrap();
    let admin = gateway.clone().spawn_admin(admin);
    let gw = gateway.spawn(proxy);
    let (a, p) = (admin.local_addr(), gw.local_addr());

    let (status, body) = raw(p, "GET", "/api/x", "").await;
    assert_eq!((status, body.as_str()), (200, "upstream /api/x"));
    let bearer = format!("authorization: Bearer {TOKEN}\r\n");
    let (status, body) = raw(a, "GET", "/status.json", &bearer).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["routes"][0]["requests"], 1);
    let (status, body) = raw(a, "GET", "/metrics", &bearer).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("seawall_gateway_requests_total{route=\"all\"} 1"),
        "{body}"
    );
    let (status, body) = raw(a, "GET", "/status?refresh=500", &bearer).await;
    assert_eq!(status, 200);
    assert!(body.contains("<html"), "{body}");
    // The token is enforced.
    for headers in [
        String::new(),
        "authorization: Bearer wrong token of enough bytes\r\n".to_owned(),
        format!("authorization: Basic {TOKEN}\r\n"),
        format!("authorization: Bearer {TOKEN}x\r\n"),
        format!("{bearer}{bearer}"),
    ] {
        let (status, body) = raw(a, "GET", "/status.json", &headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert!(!body.contains("routes"), "{body}");
    }
    // The scheme in any case, and more than one space before the token, as RFC 9110
    // §11.1 and `auth.jwt` read it (`BEARER <token>` was refused).
    for scheme in ["BEARER ", "bearer ", "BeArEr ", "Bearer   "] {
        let headers = format!("authorization: {scheme}{TOKEN}\r\n");
        let (status, body) = raw(a, "GET", "/status.json", &headers).await;
        assert_eq!(status, 200, "{headers:?}: {body}");
    }
    let (status, _) = raw(a, "POST", "/status.json", &bearer).await;
    assert_eq!(status, 405);
    let (status, _) = raw(a, "GET", "/api/x", &bearer).await;
    assert_eq!(status, 404);
    // The proxy port still routes the admin paths (404: no route).
    let (status, _) = raw(p, "GET", "/status.json", &bearer).await;
    assert_eq!(status, 404);
    gw.shutdown().await;
    admin.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_on_the_proxy_listener_is_opt_in_and_refuses_colliding_routes() {
    let up = upstream().await;
    let gw = start(&config(up, "[admin]\non_proxy_listener = true\n", "/api")).await;
    let (status, body) = raw(gw.local_addr(), "GET", "/status.json", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"routes\""), "{body}");
    // Matched on the normalised path too.
    let (status, body) = raw(gw.local_addr(), "GET", "/api/../metrics", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("seawall_gateway"), "{body}");
    let (status, body) = raw(gw.local_addr(), "GET", "/api/x", "").await;
    assert_eq!((status, body.as_str()), (200, "upstream /api/x"));
    gw.shutdown().await;

    for prefix in [
        "/metrics",
        "/status",
        "/status.json",
        "/status/x",
        "/metrics/",
    ] {
        let e = GatewayConfig::from_toml_str(&config(
            up,
            "[admin]\non_proxy_listener = true\n",
            prefix,
        ))
        .unwrap_err();
        assert_eq!(e.field(), "routes[0].path_prefix", "{prefix}: {e}");
        assert!(e.to_string().contains("admin path"), "{e}");
    }
    // Without the opt-in, such routes are the proxy's to serve.
    let gw = start(&config(up, "", "/metrics")).await;
    let (status, body) = raw(gw.local_addr(), "GET", "/metrics", "").await;
    assert_eq!((status, body.as_str()), (200, "upstream /metrics"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)]
async fn a_gateway_reads_its_jwt_secret_from_the_environment() {
    const VAR: &str = "SEAWALL_TEST_GATEWAY_ADMIN_RS_JWT_SECRET";
    const SECRET: &str = "the environment's secret, 32 bytes";
    // SAFETY: no other code in this test binary reads or writes this variable.
    unsafe { std::env::set_var(VAR, SECRET) };
    let up = upstream().await;
    let jwt = format!("[auth.jwt]\nsecret_env = \"{VAR}\"\n");
    let text =
        config(up, &jwt, "/api").replace("service = \"svc\"\n", "service = \"svc\"\nauth = true\n");
    let gw = start(&text).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let good = JwtVerifier::new(SECRET.as_bytes()).sign(&serde_json::json!({ "exp": exp }));
    let (status, body) = raw(
        gw.local_addr(),
        "GET",
        "/api/x",
        &format!("authorization: Bearer {good}\r\n"),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "upstream /api/x"));
    // Signed with the variable's *name* (what `secret = "${VAR}"` used to verify with).
    let literal =
        JwtVerifier::new(format!("${{{VAR}}}").as_bytes()).sign(&serde_json::json!({ "exp": exp }));
    let (status, _) = raw(
        gw.local_addr(),
        "GET",
        "/api/x",
        &format!("authorization: Bearer {literal}\r\n"),
    )
    .await;
    assert_eq!(status, 401);
    // No exp: refused by default.
    let forever = JwtVerifier::new(SECRET.as_bytes()).sign(&serde_json::json!({ "sub": "x" }));
    let (status, body) = raw(
        gw.local_addr(),
        "GET",
        "/api/x",
        &format!("authorization: Bearer {forever}\r\n"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    gw.shutdown().await;
    // And the placeholder itself is refused at load, without being shown.
    let e = GatewayConfig::from_toml_str(&text.replace(
        &format!("secret_env = \"{VAR}\""),
        "secret = \"${GATEWAY_JWT_SECRET}\"",
    ))
    .unwrap_err();
    assert_eq!(e.field(), "auth.jwt.secret");
    assert!(!e.to_string().contains("GATEWAY_JWT_SECRET"), "{e}");
}
