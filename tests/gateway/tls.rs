//! TLS termination with certificates made at test time (rcgen), real rustls clients and
//! curl over loopback: certificates chosen by SNI, HTTP/2 by ALPN, reload when the files
//! change (and not when they are broken), the handshake timeout, and clients that do not
//! speak TLS (or speak an old one). Every wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use seawall::gateway::{Discovery, Gateway, GatewayConfig, GatewayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

use crate::tls_support::{Leaf, Pki, connect, served, temp_dir, trusting_client, write};

const BOUND: Duration = Duration::from_secs(10);

/// An upstream answering `200` with the request's `x-forwarded-proto` and `host`.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let body = format!(
                    "proto={} host={}",
                    header("x-forwarded-proto"),
                    header("x-forwarded-host")
                );
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

/// A gateway terminating TLS with `certificates` (`(cert, key)` files, the default first)
/// and `tls` settings, one route `/api` to `upstream`.
fn config(upstream: SocketAddr, certificates: &[(PathBuf, PathBuf)], tls: &str) -> String {
    let mut config = format!("[gateway]\nlisten = \"127.0.0.1:0\"\n\n[gateway.tls]\n{tls}\n");
    for (cert, key) in certificates {
        config.push_str(&format!(
            "[[gateway.tls.certificates]]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    config.push_str(&format!(
        "\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    ));
    config
}

async fn gateway(config: &str) -> GatewayHandle {
    super::spawn_gateway(config).await
}

/// Two certificates, A (default: `a.test` and 127.0.0.1) and B (`b.test`,
/// `*.wild.test`), written in a new directory.
struct Certs {
    pki: Pki,
    dir: PathBuf,
    a: Leaf,
    b: Leaf,
    files: Vec<(PathBuf, PathBuf)>,
}

fn certs() -> Certs {
    let pki = Pki::new();
    let dir = temp_dir("tls");
    let a = pki.leaf(&["a.test", "127.0.0.1"], "A");
    let b = pki.leaf(&["b.test", "*.wild.test"], "B");
    let files = vec![write(&dir, "a", &a), write(&dir, "b", &b)];
    Certs {
        pki,
        dir,
        a,
        b,
        files,
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `GET` on a TLS stream: status, body, and the HTTP version it was served in.
async fn get<S>(stream: S, h2: bool, path: &str) -> (u16, String, http::Version)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let request = Request::get(path)
        .header("host", "a.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = {
            let (mut parts, body) = request.into_parts();
            parts.uri = format!("https://a.test{path}").parse().unwrap();
            Request::from_parts(parts, body)
        };
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(request).await.unwrap()
    };
    let (status, version) = (response.status().as_u16(), response.version());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_tls_are_proxied_with_https_forwarded() {
    let c = certs();
    let gw = gateway(&config(upstream().await, &c.files, "")).await;
    let client = c.pki.client(&[b"http/1.1"]);
    let stream = connect(&client, gw.local_addr(), "a.test").await.unwrap();
    let (status, body, version) = get(stream, false, "/api/x").await;
    assert_eq!((status, version), (200, http::Version::HTTP_11), "{body}");
    assert_eq!(body, "proto=https host=a.test");
    // HTTP/2 by ALPN, its `:authority` forwarded as the host.
    let client = c.pki.client(&[b"h2", b"http/1.1"]);
    let stream = connect(&client, gw.local_addr(), "a.test").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, body, version) = get(stream, true, "/api/x").await;
    assert_eq!((status, version), (200, http::Version::HTTP_2), "{body}");
    assert_eq!(body, "proto=https host=a.test");
    let tls = gw.gateway().status().tls.expect("TLS status");
    assert_eq!((tls.handshakes, tls.handshake_failures), (2, 0));
    assert_eq!(tls.server_names[0], ["a.test"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_chosen_by_sni() {
    let c = certs();
    let gw = gateway(&config(upstream().await, &c.files, "")).await;
    let client = trusting_client(&[], rustls::ALL_VERSIONS);
    for (sni, expected, which) in [
        ("a.test", &c.a.der, "A"),
        ("b.test", &c.b.der, "B"),
        ("B.Test", &c.b.der, "B, whatever the case"),
        ("x.wild.test", &c.b.der, "B by its wildcard"),
        (
            "x.y.wild.test",
            &c.a.der,
            "the default: a wildcard is one label",
        ),
        ("unknown.test", &c.a.der, "the default"),
        ("127.0.0.1", &c.a.der, "the default: no SNI for an address"),
    ] {
        let stream = connect(&client, gw.local_addr(), sni).await.unwrap();
        assert_eq!(&served(&stream), expected, "{sni}: expected {which}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_and_old_protocols_are_refused_and_the_gateway_keeps_serving() {
    let c = certs();
    let gw = gateway(&config(upstream().await, &c.files, "")).await;
    // Plain HTTP to the TLS port: the connection is closed, nothing proxied.
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    tcp.write_all(b"GET /api/x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = timeout(BOUND, tcp.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(read.is_err() || !String::from_utf8_lossy(&buf).contains("200"));
    // TLS 1.2 is served; rustls offers nothing older, and curl below tries TLS 1.1.
    let tls12 = trusting_client(&[], &[&rustls::version::TLS12]);
    let stream = connect(&tls12, gw.local_addr(), "a.test").await.unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let client = c.pki.client(&[]);
    let stream = connect(&client, gw.local_addr(), "a.test").await.unwrap();
    assert_eq!(get(stream, false, "/api/x").await.0, 200);
    let tls = gw.gateway().status().tls.unwrap();
    assert_eq!((tls.handshake_failures, tls.handshakes), (1, 2), "{tls:?}");
    // The same counters on the admin listener's /metrics.
    let admin = gw
        .gateway()
        .clone()
        .spawn_admin(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (status, metrics) = crate::raw_http::get(admin.local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    let series =
        |name, result| crate::metrics_endpoint::value(&metrics, name, &[("result", result)]);
    let handshakes = "seawall_gateway_tls_handshakes_total";
    assert_eq!(series(handshakes, "ok"), Some(2.0), "{metrics}");
    assert_eq!(series(handshakes, "failed"), Some(1.0), "{metrics}");
    assert_eq!(series(handshakes, "timeout"), Some(0.0), "{metrics}");
    assert_eq!(
        series("seawall_gateway_tls_reloads_total", "failed"),
        Some(0.0),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_completes_its_handshake_is_closed() {
    let c = certs();
    let gw = gateway(&config(
        upstream().await,
        &c.files,
        "handshake_timeout = \"200ms\"",
    ))
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.local_addr()).await.unwrap();
    // Meanwhile others are served.
    let client = c.pki.client(&[]);
    let stream = connect(&client, gw.local_addr(), "a.test").await.unwrap();
    assert_eq!(get(stream, false, "/api/x").await.0, 200);
    let mut buf = [0u8; 16];
    let read = timeout(BOUND, silent.read(&mut buf))
        .await
        .expect("closed within the bound");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    let tls = gw.gateway().status().tls.unwrap();
    assert_eq!(tls.handshake_timeouts, 1, "{tls:?}");
    gw.shutdown().await;
}

/// Polls new handshakes with SNI `a.test` until the served certificate is `expected`.
async fn until_served(gw: &GatewayHandle, expected: &rustls::pki_types::CertificateDer<'_>) {
    let client = trusting_client(&[], rustls::ALL_VERSIONS);
    timeout(BOUND, async {
        loop {
            let stream = connect(&client, gw.local_addr(), "a.test").await.unwrap();
            if &served(&stream) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new certificate is served within the bound");
}

fn replace(path: &Path, contents: &str) {
    // Written aside and renamed, as deployment tools do: never seen half written.
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_are_served_to_new_handshakes_and_broken_ones_are_not() {
    let c = certs();
    let gw = gateway(&config(
        upstream().await,
        &c.files,
        "reload_every = \"50ms\"",
    ))
    .await;
    let client = c.pki.client(&[]);
    // A connection open before the change, kept alive across it.
    let stream = connect(&client, gw.local_addr(), "a.test").await.unwrap();
    assert_eq!(served(&stream), c.a.der);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);

    let renewed = c.pki.leaf(&["a.test", "127.0.0.1"], "A renewed");
    let (cert, key) = &c.files[0];
    replace(key, &renewed.key_pem);
    replace(cert, &renewed.cert_pem);
    until_served(&gw, &renewed.der).await;
    assert!(gw.gateway().status().tls.unwrap().reloads >= 1);
    let request = Request::get("/api/x")
        .header("host", "a.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);

    // A key that does not match: kept out, the renewed certificate still served.
    let other = c.pki.leaf(&["a.test"], "other");
    replace(key, &other.key_pem);
    timeout(BOUND, async {
        while gw.gateway().status().tls.unwrap().reload_failures == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the failed reload is counted");
    let stream = connect(
        &trusting_client(&[], rustls::ALL_VERSIONS),
        gw.local_addr(),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(served(&stream), renewed.der);
    // Garbage in the certificate file: the same.
    replace(key, &renewed.key_pem);
    replace(cert, "not a certificate");
    timeout(BOUND, async {
        while gw.gateway().status().tls.unwrap().reload_failures < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the second failed reload is counted");
    until_served(&gw, &renewed.der).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_certificate_files_are_refused_when_the_gateway_is_built() {
    let c = certs();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let missing = (c.dir.join("missing.pem"), c.files[0].1.clone());
    let mismatched = (c.files[0].0.clone(), c.files[1].1.clone());
    let garbage = c.dir.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let empty = c.dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (files, expected) in [
        (vec![missing], "missing.pem"),
        (vec![mismatched], "does not match"),
        (vec![(garbage, c.files[0].1.clone())], "garbage.pem"),
        (vec![(empty, c.files[0].1.clone())], "no CERTIFICATE"),
        (vec![], "at least one"),
    ] {
        // Refused when the file is read, or when the gateway is built and loads them.
        let message = match GatewayConfig::from_toml_str(&config(up, &files, "")) {
            Ok(config) => Gateway::build(config, Discovery::Static)
                .await
                .unwrap_err()
                .to_string(),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(expected), "{message}");
        assert!(
            message.contains("gateway.tls"),
            "names the setting: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_through_with_the_ca_and_not_with_tls_1_1() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl is not installed: skipped (apt-get install curl)");
        return;
    }
    let c = certs();
    let ca = c.dir.join("ca.pem");
    std::fs::write(&ca, c.pki.ca_pem()).unwrap();
    let gw = gateway(&config(upstream().await, &c.files, "")).await;
    let port = gw.local_addr().port();
    let curl = |extra: &'static [&'static str]| {
        let ca = ca.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "5", "--cacert"])
                .arg(&ca)
                .arg("--resolve")
                .arg(format!("b.test:{port}:127.0.0.1"))
                .args(extra)
                .arg(format!("https://b.test:{port}/api/x"))
                .output()
                .unwrap()
        })
    };
    let out = curl(&["--http1.1"]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("proto=https host=b.test:{port}")
    );
    let out = curl(&["--http2", "-w", " %{http_version}"]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(" 2"));
    let out = curl(&["--tlsv1.1", "--tls-max", "1.1"]).await.unwrap();
    assert!(!out.status.success(), "TLS 1.1 must be refused");
    gw.shutdown().await;
}

/// An HTTP/1.0 client offering ALPN `http/1.0` (`curl --http1.0`) gets HTTP/1.x, whatever
/// the list: it was refused in the handshake. A client whose offer shares nothing with
/// the list (`h2` only, HTTP/2 off) is refused, as RFC 7301 asks and nginx does (the
/// documentation said it got HTTP/1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_http_1_0_gets_http1_and_an_offer_sharing_nothing_is_refused() {
    let c = certs();
    let up = upstream().await;
    for tls in ["", "alpn = [\"http/1.1\"]"] {
        let gw = gateway(&config(up, &c.files, tls)).await;
        let client = c.pki.client(&[b"http/1.0"]);
        let stream = timeout(BOUND, connect(&client, gw.local_addr(), "a.test"))
            .await
            .expect("no hang")
            .unwrap_or_else(|e| panic!("[{tls}] offering http/1.0: handshake failed: {e}"));
        let (status, body, version) = get(stream, false, "/api/x").await;
        assert_eq!((status, version), (200, http::Version::HTTP_11), "{body}");
        gw.shutdown().await;
    }
    let gw = gateway(&config(up, &c.files, "alpn = [\"http/1.1\"]")).await;
    let client = c.pki.client(&[b"h2"]);
    let refused = timeout(BOUND, connect(&client, gw.local_addr(), "a.test"))
        .await
        .expect("no hang");
    assert!(refused.is_err(), "an h2-only offer with HTTP/2 off");
    gw.shutdown().await;
}

/// A renewal that lands just after the gateway loaded the files (cert-manager or certbot
/// writing while the gateway starts) is reloaded like any later one: the reload task
/// compares the files with what was loaded, not with what it first saw when it ran.
/// Here the task has not run yet when the files change (a current-thread runtime, the
/// build just returned); on a multi-thread runtime the window is the time between the
/// load and the task's first poll.
#[tokio::test(start_paused = true)]
async fn files_renewed_right_after_the_build_are_reloaded() {
    let c = certs();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let toml = config(up, &c.files[..1], "reload_every = \"50ms\"");
    let gateway = Gateway::build(
        GatewayConfig::from_toml_str(&toml).unwrap(),
        Discovery::Static,
    )
    .await
    .unwrap();
    assert_eq!(gateway.status().tls.unwrap().server_names[0], ["a.test"]);
    let renewed = c.pki.leaf(&["renewed.a.test", "127.0.0.1"], "A renewed");
    let (cert, key) = &c.files[0];
    replace(key, &renewed.key_pem);
    replace(cert, &renewed.cert_pem);
    // Twenty reload periods (paused time: no real wait).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tls = gateway.status().tls.unwrap();
    assert_eq!(
        tls.server_names[0],
        ["renewed.a.test"],
        "the renewed files are never loaded: {tls:?}"
    );
    assert_eq!((tls.reloads, tls.reload_failures), (1, 0), "{tls:?}");
}

/// `server_names` are checked to be host names (`is not a host name` otherwise), but a
/// port, a URL or a space passes: such a name can never equal an SNI name (a DNS name,
/// RFC 6066 §3), so the certificate is silently never chosen for it and clients of that
/// name get the default certificate. Each is refused when the gateway is built, naming
/// the setting.
#[tokio::test]
async fn server_names_that_are_not_host_names_are_refused() {
    let c = certs();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for name in ["b.test:8443", "https://b.test/", "b .test", "b.test/api"] {
        let mut toml = config(up, &c.files, "");
        // The second certificate (B) answers `name` only.
        let at = toml.rfind("\n\n[[routes]]").unwrap();
        toml.insert_str(at, &format!("\nserver_names = [{name:?}]"));
        let message = match GatewayConfig::from_toml_str(&toml) {
            Ok(config) => match Gateway::build(config, Discovery::Static).await {
                Ok(_) => panic!("{name:?} accepted as a server name"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains("gateway.tls.certificates[1].server_names"),
            "{name:?}: {message}"
        );
    }
}

/// A server name with an underscore (`api_v2.b.test`: internal names made from service
/// names often have one) is a name rustls accepts in a client's SNI (rustls-pki-types
/// validates DNS names "with underscores allowed") and that the gateway matched before
/// `is_dns_name`: such a configuration must still load, and its certificate be chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_with_an_underscore_is_served() {
    let c = certs();
    let mut toml = config(upstream().await, &c.files, "");
    let at = toml.rfind("\n\n[[routes]]").unwrap();
    toml.insert_str(
        at,
        "\nserver_names = [\"api_v2.b.test\", \"*.b_internal.test\"]",
    );
    let config = GatewayConfig::from_toml_str(&toml).expect("the configuration parses");
    let gateway = match Gateway::build(config, Discovery::Static).await {
        Ok(gateway) => gateway,
        Err(e) => panic!("a server name rustls serves is refused: {e}"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = gateway.spawn(listener);
    let client = trusting_client(&[], rustls::ALL_VERSIONS);
    for sni in ["api_v2.b.test", "x.b_internal.test"] {
        let stream = timeout(BOUND, connect(&client, gw.local_addr(), sni))
            .await
            .expect("no hang")
            .unwrap();
        assert_eq!(&served(&stream), &c.b.der, "{sni}: expected B");
    }
    gw.shutdown().await;
}

/// An IP address in `server_names` passes `is_dns_name` (its labels are digits), yet a
/// client never sends an address as SNI (RFC 6066 §3; rustls sends none, see
/// `the_certificate_is_chosen_by_sni`): the certificate is silently never chosen for it,
/// which is what the check was made to refuse when the gateway is built.
#[tokio::test]
async fn an_ip_address_as_a_server_name_is_refused() {
    let c = certs();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut accepted = Vec::new();
    for name in ["192.0.2.7"] {
        let mut toml = config(up, &c.files, "");
        let at = toml.rfind("\n\n[[routes]]").unwrap();
        toml.insert_str(at, &format!("\nserver_names = [{name:?}]"));
        let refused = match GatewayConfig::from_toml_str(&toml) {
            Ok(config) => Gateway::build(config, Discovery::Static).await.is_err(),
            Err(_) => true,
        };
        if !refused {
            accepted.push(name);
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted as server names: {accepted:?}"
    );
}

/// An upstream that answers `GET /api/stream/<n>` with a chunked body: `n` bytes, then
/// `marker`, then nothing more for as long as the test lasts (a stream pausing between
/// events: server-sent events, a long poll, a log tail).
async fn pausing_upstream(marker: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let size: usize = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|target| target.rsplit('/').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                let mut left = size;
                while left > 0 {
                    let n = left.min(16 * 1024);
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.resize(out.len() + n, b'x');
                    out.extend_from_slice(b"\r\n");
                    left -= n;
                }
                out.extend_from_slice(format!("{:x}\r\n", marker.len()).as_bytes());
                out.extend_from_slice(marker);
                out.extend_from_slice(b"\r\n");
                if stream.write_all(&out).await.is_err() {
                    return;
                }
                // The stream pauses: the connection stays open, the body unfinished.
                std::future::pending::<()>().await;
            });
        }
    });
    addr
}

/// A streamed answer written while the client's socket was full is held in rustls'
/// buffer (tokio-rustls takes the bytes and says they are written) and must still reach
/// the client once it reads. The HTTP/1 server flushes only at the end of a body: when
/// the upstream pauses after a burst larger than the socket takes at once, the burst's
/// tail (here the event the client waits for) stays in the gateway until the upstream
/// sends again, possibly never. Over cleartext the kernel holds those bytes and sends
/// them. Bursts of many sizes, as the socket's room is not known: each one's tail must
/// come once its client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_s_tail_reaches_a_tls_client_while_the_upstream_pauses() {
    const MARKER: &[u8] = b"END-OF-BURST";
    let c = certs();
    let up = pausing_upstream(MARKER).await;
    // Small socket buffers (accepted sockets take the listener's), so that a burst of
    // some hundred KiB fills the socket, as a slow client's larger bursts would.
    let listener = tokio::net::TcpSocket::new_v4().unwrap();
    listener.set_send_buffer_size(16 * 1024).unwrap();
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listener.listen(1024).unwrap();
    let gw = Gateway::build(
        GatewayConfig::from_toml_str(&config(up, &c.files, "")).unwrap(),
        Discovery::Static,
    )
    .await
    .unwrap()
    .spawn(listener);
    let client = c.pki.client(&[b"http/1.1"]);
    let mut clients = Vec::new();
    for size in (1..=64).map(|i| i * 8 * 1024) {
        // A client with a small receive window, as a slow one on a long path has: the
        // socket takes little at a time.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(gw.local_addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let mut tls = client.connect(name, tcp).await.unwrap();
        let request = format!("GET /api/stream/{size} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        clients.push((size, tls));
    }
    // The clients read nothing for a moment: each burst fills the socket as far as it
    // goes, the rest waits in the gateway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut reads = tokio::task::JoinSet::new();
    for (size, mut tls) in clients {
        reads.spawn(async move {
            let mut got = 0usize;
            let mut tail = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let found = timeout(Duration::from_secs(5), async {
                loop {
                    let n = tls.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway closed the connection");
                    got += n;
                    tail.extend_from_slice(&buf[..n]);
                    if tail.windows(MARKER.len()).any(|w| w == MARKER) {
                        return;
                    }
                    let keep = tail.len().min(MARKER.len());
                    tail.drain(..tail.len() - keep);
                }
            })
            .await;
            (size, found.is_ok(), got, tls)
        });
    }
    let mut stuck = Vec::new();
    let mut streams = Vec::new();
    while let Some(read) = reads.join_next().await {
        let (size, found, got, tls) = read.unwrap();
        if !found {
            stuck.push(format!("{size}-byte burst: {got} bytes read"));
        }
        streams.push(tls);
    }
    stuck.sort();
    assert!(stuck.is_empty(), "tails that never came: {stuck:?}");
    // Not shut down gracefully: the answers never end (the runtime's end drops them).
    drop((streams, gw));
}
