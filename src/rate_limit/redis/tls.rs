//! TLS to Redis (`rediss://` URLs, feature `redis-tls`).

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ConfigError;

/// How a [`RedisRateLimiter`](super::RedisRateLimiter) reaches Redis over TLS (a
/// `rediss://` URL; feature `redis-tls`): the authorities its certificate is checked
/// against and, for a server that asks for one, the client's certificate.
///
/// A `rediss://` URL without a `RedisTls` is checked against webpki-roots (Mozilla's
/// roots) and offers no client certificate, which is what managed services with a public
/// certificate expect. A Redis with its own CA needs [`ca_pem`](Self::ca_pem); one
/// started with `tls-auth-clients yes` (`redis-server`'s default when TLS is on) also
/// needs [`client_certificate`](Self::client_certificate). The server's certificate is
/// always checked, for the URL's host: a URL with `#insecure` (which would turn that off)
/// is refused when the limiter is built.
///
/// Everything given here is parsed when the limiter is
/// [built](super::RedisRateLimiterBuilder::build): a PEM without a certificate, a key that
/// cannot be read or does not suit rustls is a [`ConfigError`] then, not a failed
/// connection later. Its `Debug` output leaves the key out.
///
/// The `redis` crate makes each connection's rustls configuration with the process's
/// default crypto provider: *ring*, when it is the only one built in (seawall enables no
/// other). An application whose other dependencies also build in rustls' `aws-lc-rs`
/// must install one (`rustls::crypto::CryptoProvider::install_default`) before the first
/// connection: without a default rustls cannot choose, and panics.
///
/// ```no_run
/// use seawall::rate_limit::redis::{RedisRateLimiter, RedisTls};
/// use seawall::rate_limit::{Quota, Rate};
///
/// # fn main() -> Result<(), seawall::BoxError> {
/// let tls = RedisTls::new()
///     .ca_pem(std::fs::read("/etc/redis/tls/ca.pem")?)
///     .client_certificate(
///         std::fs::read("/etc/redis/tls/client.pem")?,
///         std::fs::read("/etc/redis/tls/client.key")?,
///     );
/// let limiter = RedisRateLimiter::builder("rediss://redis.internal:6380/", Quota::new(Rate::per_second(100), 100)?)
///     .tls(tls)
///     .build()?;
/// # let _ = limiter;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct RedisTls {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.as_ref().map(|_| "PEM"))
            .field(
                "client_certificate",
                &self.identity.as_ref().map(|_| "PEM (key hidden)"),
            )
            .finish()
    }
}

impl RedisTls {
    /// Checks the server against webpki-roots, with no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the authorities in `pem` (one or more certificates, PEM), and only them,
    /// instead of webpki-roots: for a Redis whose certificate a private CA signed.
    #[must_use]
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents `cert_pem` (the certificate chain, leaf first, PEM) with its private key
    /// `key_pem` (PKCS #8, PKCS #1 or SEC1, PEM) when the server asks for a client
    /// certificate.
    #[must_use]
    pub fn client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// The certificates in the form the `redis` crate takes, after checking that rustls
    /// can build a client from them: what it would refuse on every connection is refused
    /// here, naming the setting.
    pub(crate) fn certificates(&self) -> Result<redis::TlsCertificates, ConfigError> {
        // The roots matter here only for a CA given in PEM (webpki-roots are the `redis`
        // crate's default): the store checks the client certificate's setting alone.
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = &self.ca_pem {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConfigError::invalid("tls.ca", e.to_string()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError::invalid(
                    "tls.ca",
                    "no CA certificate in the PEM",
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::invalid("tls", e.to_string()))?
            .with_root_certificates(roots);
        if let Some((cert_pem, key_pem)) = &self.identity {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConfigError::invalid("tls.client_certificate", e.to_string()))?;
            if chain.is_empty() {
                return Err(ConfigError::invalid(
                    "tls.client_certificate",
                    "no certificate in the PEM",
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| ConfigError::invalid("tls.client_key", e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConfigError::invalid("tls.client_key", e.to_string()))?;
        }
        Ok(redis::TlsCertificates {
            client_tls: self
                .identity
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_pem.clone(),
        })
    }
}
