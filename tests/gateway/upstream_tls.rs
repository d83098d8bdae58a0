//! HTTPS and HTTP/2 upstreams over loopback, with certificates made at test time: the
//! certificate verified (CA file, name, SNI), every TLS failure counted against the
//! endpoint (a plain-HTTP upstream too, without hanging), HTTP/2 requests multiplexed on
//! one connection per endpoint, and a closed HTTP/2 connection dialled again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use seawall::gateway::GatewayHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::limits::{STRICT, endpoint, exchange, get, settled, status_of};
use crate::tls_support::{Leaf, Pki, temp_dir};

const BOUND: Duration = Duration::from_secs(10);

/// Serves `leaf` whatever the SNI, and remembers the SNI it was asked for.
#[derive(Debug)]
struct Recording {
    key: Arc<CertifiedKey>,
    sni: parking_lot::Mutex<Vec<Option<String>>>,
}

impl ResolvesServerCert for Recording {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.sni.lock().push(hello.server_name().map(str::to_owned));
        Some(self.key.clone())
    }
}

/// An upstream answering `200` with the protocol it was asked in; over TLS with `leaf`
/// when given (ALPN `h2` and `http/1.1`); HTTP/2 or HTTP/1 by ALPN, or by `h2` when
/// cleartext. Returns its address, the SNI names it saw, the connections it accepted and
/// the tasks serving them (aborted to cut every connection).
struct TestUpstream {
    addr: SocketAddr,
    resolver: Option<Arc<Recording>>,
    accepted: Arc<AtomicUsize>,
    connections: Arc<parking_lot::Mutex<JoinSet<()>>>,
}

async fn upstream(leaf: Option<&Leaf>, h2: bool) -> TestUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resolver = leaf.map(|leaf| {
        use rustls::pki_types::pem::PemObject;
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        Arc::new(Recording {
            key: Arc::new(CertifiedKey::new(vec![leaf.der.clone()], signer)),
            sni: parking_lot::Mutex::new(Vec::new()),
        })
    });
    let acceptor = resolver.clone().map(|resolver| {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let accepted = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(parking_lot::Mutex::new(JoinSet::new()));
    let (a, c) = (accepted.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, SeqCst);
            let acceptor = acceptor.clone();
            c.lock().spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    // The forwarding fields it got, its target, then its version.
                    let field = |name| {
                        let values = req.headers().get_all(name).iter();
                        values
                            .map(|v| v.to_str().unwrap_or("?"))
                            .collect::<Vec<_>>()
                    };
                    let body = format!(
                        "for={:?} proto={:?} target={} {:?}",
                        field("x-forwarded-for"),
                        field("x-forwarded-proto"),
                        req.uri().path_and_query().map_or("", |p| p.as_str()),
                        req.version()
                    );
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body))))
                });
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        }
                    }
                    None if h2 => {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    }
                    None => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    }
                }
            });
        }
    });
    TestUpstream {
        addr,
        resolver,
        accepted,
        connections,
    }
}

/// A gateway with one route `/api` (and `route` settings) to service `up` at `upstream`,
/// whose `[[services]]` entry adds `service`.
async fn gateway(upstream: SocketAddr, route: &str, service: &str) -> GatewayHandle {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n{route}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n{service}\n"
    );
    super::spawn_gateway(&config).await
}

/// `[services.tls]` trusting the CA in `ca`, verifying `server_name`.
fn tls_settings(ca: &std::path::Path, server_name: &str, extra: &str) -> String {
    format!(
        "{extra}\n[services.tls]\nserver_name = \"{server_name}\"\nca_file = {:?}\n",
        ca.display().to_string()
    )
}

fn write_ca(pki: &Pki) -> std::path::PathBuf {
    let path = temp_dir("upstream-ca").join("ca.pem");
    std::fs::write(&path, pki.ca_pem()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_verified_and_told_its_name_by_sni() {
    let pki = Pki::new();
    let up = upstream(Some(&pki.leaf(&["up.test"], "up")), false).await;
    let ca = write_ca(&pki);
    let gw = gateway(up.addr, "", &tls_settings(&ca, "up.test", "")).await;
    for _ in 0..3 {
        let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert!(answer.ends_with("HTTP/1.1"), "{answer}");
        assert!(
            answer.contains("for=[\"127.0.0.1\"] proto=[\"http\"] target=/api/x "),
            "{answer}"
        );
    }
    let sni = up.resolver.as_ref().unwrap().sni.lock().clone();
    assert_eq!(sni, [Some("up.test".to_owned())], "one connection, reused");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_count_against_the_endpoint() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let leaf = pki.leaf(&["up.test"], "up");
    let ca = write_ca(&pki);
    let strange_ca = write_ca(&stranger);
    // An unknown CA; a certificate for another name; an upstream that speaks no TLS.
    let cases = [
        (
            upstream(Some(&leaf), false).await,
            tls_settings(&strange_ca, "up.test", ""),
        ),
        (
            upstream(Some(&leaf), false).await,
            tls_settings(&ca, "other.test", ""),
        ),
        (
            upstream(None, false).await,
            tls_settings(&ca, "up.test", ""),
        ),
    ];
    for (up, service) in cases {
        let gw = gateway(up.addr, STRICT, &service).await;
        for i in 0..4 {
            let answer = timeout(BOUND, exchange(gw.local_addr(), get("/api/x").as_bytes()))
                .await
                .expect("no hang");
            assert_eq!(status_of(&answer), 502, "{service} call {i}: {answer}");
        }
        settled(&gw, 4).await;
        let e = endpoint(&gw);
        assert_eq!(e.failures, 4, "{service}: {e:?}");
        assert_eq!(e.breaker.as_deref(), Some("open"), "{service}: {e:?}");
        assert!(e.ejected, "{service}: {e:?}");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_requests_share_one_connection_over_tls_and_h2c() {
    let pki = Pki::new();
    let ca = write_ca(&pki);
    let tls_up = upstream(Some(&pki.leaf(&["up.test"], "up")), true).await;
    let h2c_up = upstream(None, true).await;
    for (up, service) in [
        (&tls_up, tls_settings(&ca, "up.test", "protocol = \"h2\"")),
        (&h2c_up, "protocol = \"h2\"".to_owned()),
    ] {
        let gw = gateway(up.addr, "strip_prefix = true", &service).await;
        let mut calls = JoinSet::new();
        for _ in 0..20 {
            let addr = gw.local_addr();
            calls.spawn(async move { exchange(addr, get("/api/x").as_bytes()).await });
        }
        while let Some(answer) = calls.join_next().await {
            let answer = answer.unwrap();
            assert_eq!(status_of(&answer), 200, "{service}: {answer}");
            assert!(answer.ends_with("HTTP/2.0"), "{service}: {answer}");
            // Over HTTP/2 as over HTTP/1, the forwarding fields, once each, and the
            // target without the route's prefix.
            assert!(
                answer.contains("for=[\"127.0.0.1\"] proto=[\"http\"] target=/x "),
                "{service}: {answer}"
            );
        }
        assert_eq!(up.accepted.load(SeqCst), 1, "{service}: one connection");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_h2_upstream_connection_is_dialled_again() {
    let up = upstream(None, true).await;
    let gw = gateway(up.addr, "", "protocol = \"h2\"").await;
    let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    // The upstream drops every connection it has.
    up.connections.lock().abort_all();
    timeout(BOUND, async {
        while !up.connections.lock().is_empty() {
            let _ = up.connections.lock().try_join_next();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    for i in 0..3 {
        let answer = exchange(gw.local_addr(), get("/api/x").as_bytes()).await;
        assert_eq!(
            status_of(&answer),
            200,
            "call {i} after the close: {answer}"
        );
    }
    assert_eq!(up.accepted.load(SeqCst), 2);
    gw.shutdown().await;
}
