//! TLS to the agent (`https://`, feature `consul-tls`): rustls with the *ring* provider.
//!
//! The agent's certificate is always verified, against webpki-roots or the CA given in
//! PEM, for the address's host or the configured server name (sent by SNI; an IP address
//! is verified against the certificate's IP addresses and sends none). A client
//! certificate is presented when the agent asks for one (`verify_incoming`). Everything is
//! parsed when the configuration is built; the key is never printed.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::ConfigError;

/// The TLS settings of a [`ConsulConfigBuilder`](super::ConsulConfigBuilder), as given.
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) server_name: Option<String>,
}

impl TlsSettings {
    /// Whether any setting was given.
    pub(crate) fn any(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some() || self.server_name.is_some()
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca", &self.ca_pem.as_ref().map(|_| "PEM"))
            .field(
                "client_certificate",
                &self.identity.as_ref().map(|_| "PEM (key hidden)"),
            )
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The TLS client of one agent: the rustls configuration and the name the agent's
/// certificate is verified for.
pub(crate) struct ConsulTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    private_ca: bool,
    client_certificate: bool,
}

impl fmt::Debug for ConsulTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulTls")
            .field("server_name", &self.server_name.to_str())
            .field(
                "roots",
                &if self.private_ca {
                    "ca_pem"
                } else {
                    "webpki-roots"
                },
            )
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, reason.into())
}

impl ConsulTls {
    /// The client for an agent whose address's host is `host` (`[::1]` or `consul.internal`),
    /// after checking every setting: what rustls would refuse on every connection is
    /// refused here, naming the setting.
    pub(crate) fn new(settings: &TlsSettings, host: &str) -> Result<Self, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        match &settings.ca_pem {
            Some(pem) => {
                let certs = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("ca_pem", format!("not valid PEM: {e}")))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(invalid("ca_pem", "no CA certificate in the PEM"));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let server_name = match &settings.server_name {
            Some(name) => ServerName::try_from(name.trim().to_owned()).map_err(|_| {
                invalid(
                    "tls_server_name",
                    format!("{name:?} is not a DNS name or an IP address"),
                )
            })?,
            None => {
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                ServerName::try_from(host.to_owned()).map_err(|_| {
                    invalid(
                        "tls_server_name",
                        format!(
                            "the address's host {host:?} is not a name a certificate can be \
                             verified for: set tls_server_name"
                        ),
                    )
                })?
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| invalid("tls", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match &settings.identity {
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("client_certificate", format!("not valid PEM: {e}")))?;
                if chain.is_empty() {
                    return Err(invalid("client_certificate", "no certificate in the PEM"));
                }
                // The error never quotes the key: only what kind of problem it has.
                let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
                    invalid(
                        "client_key",
                        match e {
                            rustls::pki_types::pem::Error::NoItemsFound => {
                                "no private key in the PEM".to_owned()
                            }
                            _ => "not a valid PEM private key".to_owned(),
                        },
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    invalid(
                        "client_key",
                        match e {
                            rustls::Error::InconsistentKeys(_) => {
                                "does not match the client certificate's public key".to_owned()
                            }
                            e => e.to_string(),
                        },
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            private_ca: settings.ca_pem.is_some(),
            client_certificate: settings.identity.is_some(),
        })
    }

    /// The handshake over `stream`, given up after `limit`: a peer that takes the TCP
    /// connection and never answers the TLS hello would otherwise hold it for the whole
    /// request's time limit (a blocking query's wait and more), and past it, a connection
    /// hyper left to finish in the background, for good.
    pub(crate) async fn handshake(
        &self,
        stream: TcpStream,
        limit: Duration,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        match tokio::time::timeout(
            limit,
            self.connector.connect(self.server_name.clone(), stream),
        )
        .await
        {
            Ok(done) => done.map_err(HandshakeError),
            Err(_) => Err(HandshakeError(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            ))),
        }
    }
}

/// A TLS handshake with the agent that failed: its certificate was refused (unknown CA,
/// another name, expired), it refused ours, or it does not speak TLS.
#[derive(Debug)]
pub(crate) struct HandshakeError(io::Error);

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake failed: {}", self.0)
    }
}

impl std::error::Error for HandshakeError {}

/// A connection to the agent: plain TCP, or TLS over it.
#[derive(Debug)]
pub(crate) enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// What hyper-util's pool is told of the connection.
    pub(crate) fn connected(&self) -> Connected {
        match self {
            Self::Plain(stream) => stream.connected(),
            Self::Tls(stream) => stream.get_ref().0.connected(),
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
