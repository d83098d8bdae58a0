//! The client over HTTPS (feature `consul-tls`): the Consul API double served over TLS
//! with certificates made at test time, requiring a client certificate as an agent with
//! `verify_incoming` does. Registration and a blocking query through it; certificates
//! from another CA or for another name refused before anything is sent; certificates and
//! keys checked when the configuration is built; the gateway discovering its upstream
//! from the TLS agent. Without the feature, an `https://` address is refused.

#[cfg(not(feature = "consul-tls"))]
#[test]
fn https_needs_the_feature() {
    let e = seawall::consul::ConsulConfig::builder()
        .address("https://127.0.0.1:8501")
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "address");
    assert!(e.reason().contains("consul-tls"), "{e}");
}

#[cfg(feature = "consul-tls")]
mod with_tls {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::server::WebPkiClientVerifier;
    use seawall::consul::{ConsulClient, ConsulConfig, ConsulConfigBuilder, HealthQuery};
    use tokio::time::timeout;

    use crate::client::instance;
    use crate::double::{ConsulDouble, DoubleOptions};
    use crate::tls_support::{Leaf, Pki};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A TLS agent's configuration: `leaf` as its certificate, and (as `verify_incoming`)
    /// a client certificate signed by `clients` required.
    fn server_config(leaf: &Leaf, clients: &Pki) -> Arc<rustls::ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(clients.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        Arc::new(config)
    }

    /// A CA, the double served over TLS with a certificate it signed for `names`,
    /// requiring a client certificate it signed, and that client certificate.
    pub(crate) struct TlsAgent {
        pub(crate) pki: Pki,
        pub(crate) double: ConsulDouble,
        pub(crate) client_leaf: Leaf,
    }

    impl TlsAgent {
        pub(crate) async fn start(names: &[&str]) -> Self {
            let pki = Pki::new();
            let server = pki.leaf(names, "consul server");
            let client_leaf = pki.leaf(&["client.seawall.test"], "seawall");
            let double = ConsulDouble::start_with(DoubleOptions {
                tls: Some(server_config(&server, &pki)),
                ..DoubleOptions::default()
            })
            .await;
            Self {
                pki,
                double,
                client_leaf,
            }
        }

        /// `https://127.0.0.1:PORT`.
        pub(crate) fn url(&self) -> String {
            format!("https://{}", self.double.addr())
        }

        /// A configuration trusting the CA, with the client certificate.
        pub(crate) fn config(&self) -> ConsulConfigBuilder {
            ConsulConfig::builder()
                .address(self.url())
                .request_timeout(Duration::from_secs(3))
                .ca_pem(self.pki.ca_pem())
                .client_certificate(
                    self.client_leaf.cert_pem.clone(),
                    self.client_leaf.key_pem.clone(),
                )
        }

        pub(crate) fn client(&self) -> ConsulClient {
            ConsulClient::new(self.config().build().unwrap())
        }
    }

    #[tokio::test]
    async fn register_and_discover_over_https_with_a_client_certificate() {
        let agent = TlsAgent::start(&["127.0.0.1"]).await;
        let client = agent.client();
        assert!(client.config().is_https());

        client
            .register(&instance("users", "users-1", 9001))
            .await
            .unwrap();
        let first = client
            .health_service(&HealthQuery::new("users").passing(true))
            .await
            .unwrap();
        assert_eq!(first.instances.len(), 1);
        assert_eq!(first.instances[0].id.service_id(), "users-1");
        assert_eq!(client.agent_services().await.unwrap().len(), 1);

        // A blocking query, held by the agent until a second instance registers.
        let blocking = tokio::spawn({
            let client = client.clone();
            let query = HealthQuery::new("users")
                .passing(true)
                .index(first.index)
                .wait(Duration::from_secs(5));
            async move { client.health_service(&query).await }
        });
        assert!(
            agent
                .double
                .wait_for_waiting_queries(1, Duration::from_secs(3))
                .await,
            "the blocking query never reached the agent"
        );
        client
            .register(&instance("users", "users-2", 9002))
            .await
            .unwrap();
        let changed = timeout(Duration::from_secs(3), blocking)
            .await
            .expect("the blocking query returned on the change")
            .unwrap()
            .unwrap();
        assert!(changed.index > first.index);
        let mut ids: Vec<_> = changed
            .instances
            .iter()
            .map(|i| i.id.service_id().to_owned())
            .collect();
        ids.sort();
        assert_eq!(ids, ["users-1", "users-2"]);

        // Everything went over TLS to the agent, on kept-alive connections: one for the
        // sequential requests, one more while the blocking query held the first.
        let requests = agent.double.requests();
        assert_eq!(requests.len(), 5, "{requests:?}");
        let connections = agent.double.connections();
        assert!((1..=2).contains(&connections), "{connections} connections");
    }

    #[tokio::test]
    async fn the_address_or_the_configured_name_is_verified() {
        // The agent's certificate names `consul.seawall.test`, not 127.0.0.1.
        let agent = TlsAgent::start(&["consul.seawall.test"]).await;
        let e = agent
            .client()
            .register(&instance("users", "users-1", 9001))
            .await
            .unwrap_err();
        assert!(e.is_tls() && e.is_connect(), "{e:?}");
        assert!(e.to_string().contains("TLS handshake failed"), "{e}");
        assert!(agent.double.requests().is_empty());

        let client = ConsulClient::new(
            agent
                .config()
                .tls_server_name("consul.seawall.test")
                .build()
                .unwrap(),
        );
        client
            .register(&instance("users", "users-1", 9001))
            .await
            .unwrap();
        assert_eq!(agent.double.service_ids().len(), 1);
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let agent = TlsAgent::start(&["127.0.0.1"]).await;
        let other = Pki::new();
        for config in [
            // Trusting another CA.
            agent.config().ca_pem(other.ca_pem()),
            // Trusting webpki-roots (the default), which the test CA is not among.
            ConsulConfig::builder()
                .address(agent.url())
                .request_timeout(Duration::from_secs(3))
                .client_certificate(
                    agent.client_leaf.cert_pem.clone(),
                    agent.client_leaf.key_pem.clone(),
                ),
        ] {
            let client = ConsulClient::new(config.build().unwrap());
            let e = client
                .register(&instance("users", "users-1", 9001))
                .await
                .unwrap_err();
            assert!(e.is_tls() && e.is_connect() && e.is_transport(), "{e:?}");
            assert!(e.to_string().contains("certificate"), "{e}");
            let e = client
                .health_service(&HealthQuery::new("users"))
                .await
                .unwrap_err();
            assert!(e.is_tls(), "{e:?}");
        }
        assert!(agent.double.service_ids().is_empty());
        assert!(agent.double.requests().is_empty());
        assert_eq!(agent.double.connections(), 0);
    }

    /// A peer that takes the TCP connection and never answers the TLS hello is given up
    /// on after the request's time limit, as a TLS failure: a blocking query (its limit
    /// the wait and more, 32 s here) no longer waits out its whole wait on a handshake.
    #[tokio::test]
    async fn a_peer_that_never_answers_the_tls_hello_is_given_up_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                held.push(socket);
            }
        });
        let pki = Pki::new();
        let client = ConsulClient::new(
            ConsulConfig::builder()
                .address(format!("https://{addr}"))
                .request_timeout(Duration::from_millis(300))
                .ca_pem(pki.ca_pem())
                .build()
                .unwrap(),
        );
        let started = tokio::time::Instant::now();
        let query = HealthQuery::new("users")
            .index(7)
            .wait(Duration::from_secs(30));
        let e = timeout(Duration::from_secs(5), client.health_service(&query))
            .await
            .expect("given up on within the request's time limit, not the wait's")
            .unwrap_err();
        assert!(e.is_tls() && e.is_connect(), "{e:?}");
        assert!(e.to_string().contains("TLS handshake failed"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        silent.abort();
    }

    #[tokio::test]
    async fn an_agent_with_verify_incoming_refuses_a_client_without_certificate() {
        let agent = TlsAgent::start(&["127.0.0.1"]).await;
        let client = ConsulClient::new(
            ConsulConfig::builder()
                .address(agent.url())
                .request_timeout(Duration::from_secs(3))
                .ca_pem(agent.pki.ca_pem())
                .build()
                .unwrap(),
        );
        let e = client
            .register(&instance("users", "users-1", 9001))
            .await
            .unwrap_err();
        assert!(e.is_transport(), "{e:?}");
        assert!(agent.double.service_ids().is_empty());
        assert!(agent.double.requests().is_empty());
    }

    /// A builder for an https agent with `ca`, `cert` and `key`.
    fn with(ca: &str, cert: &str, key: &str) -> ConsulConfigBuilder {
        ConsulConfig::builder()
            .address("https://consul.internal:8501")
            .ca_pem(ca)
            .client_certificate(cert, key)
    }

    #[test]
    fn certificates_and_keys_are_checked_when_built() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["client"], "client");
        let other = pki.leaf(&["other"], "other");
        let ca = pki.ca_pem();
        assert!(with(&ca, &leaf.cert_pem, &leaf.key_pem).build().is_ok());

        let cases: [(ConsulConfigBuilder, &str, &str); 7] = [
            (
                with("", &leaf.cert_pem, &leaf.key_pem),
                "ca_pem",
                "no CA certificate",
            ),
            (
                with("not a certificate", &leaf.cert_pem, &leaf.key_pem),
                "ca_pem",
                "no CA certificate",
            ),
            (
                with(
                    "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                    &leaf.cert_pem,
                    &leaf.key_pem,
                ),
                "ca_pem",
                "PEM",
            ),
            (
                with(&ca, "", &leaf.key_pem),
                "client_certificate",
                "no certificate",
            ),
            (
                with(&ca, &leaf.cert_pem, ""),
                "client_key",
                "no private key",
            ),
            (
                with(&ca, &leaf.cert_pem, &other.key_pem),
                "client_key",
                "does not match",
            ),
            (
                with(&ca, &leaf.cert_pem, &leaf.key_pem).tls_server_name("not a name"),
                "tls_server_name",
                "not a DNS name",
            ),
        ];
        for (builder, field, reason) in cases {
            let shown = format!("{builder:?}");
            assert!(!shown.contains("PRIVATE KEY"), "{shown}");
            let e = builder.build().unwrap_err();
            assert_eq!(e.field(), field, "{e}");
            assert!(e.reason().contains(reason), "{e}");
            assert!(!format!("{e} {e:?}").contains("PRIVATE KEY"), "{e:?}");
        }

        // A plain-HTTP agent with TLS settings is a mistake, not TLS ignored.
        let e = ConsulConfig::builder()
            .address("http://consul.internal:8500")
            .ca_pem(ca)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "address");

        let config = with(&pki.ca_pem(), &leaf.cert_pem, &leaf.key_pem)
            .build()
            .unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("PRIVATE KEY") && shown.contains("consul.internal"),
            "{shown}"
        );
    }

    #[cfg(feature = "gateway")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gateway_discovers_its_upstream_from_a_tls_agent() {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Empty, Full};
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use seawall::gateway::{Discovery, Gateway, GatewayConfig};
        use tokio::net::TcpListener;

        // The upstream, plain HTTP on loopback.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = upstream.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = upstream.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"from users-1"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });

        let agent = TlsAgent::start(&["127.0.0.1"]).await;
        let consul = agent.client();
        consul
            .register(&instance("users", "users-1", port))
            .await
            .unwrap();

        let config = GatewayConfig::from_toml_str(
            r#"
            [gateway]
            listen = "127.0.0.1:0"

            [[routes]]
            name = "users"
            path_prefix = "/api/users"
            service = "users"
            timeout = "2s"
            "#,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = Gateway::build(config, Discovery::Consul(consul))
            .await
            .unwrap()
            .spawn(listener);
        let start = tokio::time::Instant::now();
        while gateway.gateway().status().routes[0].endpoints.len() != 1 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the gateway never discovered users-1"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let url = format!("http://{}/api/users/1", gateway.local_addr());
        let response = timeout(Duration::from_secs(3), http.get(url.parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"from users-1");
        assert!(agent.double.request_count("/v1/health/service/users") >= 1);
        gateway.shutdown().await;
    }
}
