//! TLS to upstreams (feature `tls`): `[services.tls]`.
//!
//! Certificates are always verified: against Mozilla's roots (webpki-roots) or the CA
//! certificates of `ca_file`, for `server_name` (sent by SNI) or else for each instance's
//! own host (an IP address is verified against the certificate's IP addresses, and sends
//! no SNI). TLS 1.2 and 1.3, ALPN `http/1.1` or `h2` as the service's protocol says. A
//! handshake that fails is an [`UpstreamError::Tls`](super::pool::UpstreamError), a
//! failure of the endpoint for its breaker and outlier detection (the client has no part
//! in it), answered `502`.

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::config::UpstreamTlsSettings;
use crate::ConfigError;

/// A service's TLS client.
pub(crate) struct UpstreamTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// The client for service `service`'s `[services.tls]`, offering `h2` or `http/1.1`.
    pub(crate) fn new(
        settings: &UpstreamTlsSettings,
        service: &str,
        h2: bool,
    ) -> Result<Arc<Self>, ConfigError> {
        let at = format!("services `{service}`.tls");
        let mut roots = rustls::RootCertStore::empty();
        match &settings.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        ConfigError::invalid(
                            format!("{at}.ca_file"),
                            format!("{}: {e}", path.display()),
                        )
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ConfigError::invalid(
                        format!("{at}.ca_file"),
                        format!("{}: no CA certificate in the file", path.display()),
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let server_name = settings
            .server_name
            .as_ref()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|_| {
                    ConfigError::invalid(
                        format!("{at}.server_name"),
                        format!("{name:?} is not a DNS name or an IP address"),
                    )
                })
            })
            .transpose()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::invalid(at.clone(), e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Ok(Arc::new(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        }))
    }

    /// The handshake over `stream` with an instance whose host is `host`.
    pub(crate) async fn handshake(
        &self,
        stream: TcpStream,
        host: &str,
    ) -> io::Result<TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        self.connector.connect(name, stream).await
    }
}
