//! TLS termination (feature `tls`), with rustls and its *ring* provider.
//!
//! - **Safe defaults**: TLS 1.2 and 1.3 only, rustls' default cipher suites (no CBC, no
//!   RSA key exchange), no renegotiation, no client certificates.
//! - **Certificates by SNI**: each `[[gateway.tls.certificates]]` answers the names it
//!   holds (its DNS subject alternative names, or its `server_names`): an exact name
//!   first, then a wildcard (`*.example.com` for one label); the first certificate answers
//!   any other name and handshakes without SNI.
//! - **Reload**: every `reload_every`, the files' modification times and sizes are
//!   checked; when any changed, all are loaded again and new handshakes use them at once
//!   (connections already open keep theirs). Files that fail to load (half written, a key
//!   that does not match its certificate) leave the certificates in use as they were; the
//!   failure is counted (`tls.reload_failures` in `/status.json`) and logged, and the
//!   files are tried again when they change again.
//! - **Handshake timeout**: a client has `handshake_timeout` to complete its handshake,
//!   on its connection's own task (the accept loop never waits on a handshake).
//! - **ALPN**: `h2` (HTTP/2) and `http/1.1`, in the configured order, `http/1.1` standing
//!   for `http/1.0` too; a client that offers no ALPN gets HTTP/1.1, and one whose offer
//!   shares nothing with the list is refused with `no_application_protocol`, as RFC 7301
//!   asks and nginx does.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use super::config::{CertificateSettings, TlsSettings};
use super::status::TlsStatus;
use crate::ConfigError;

/// A listener's TLS: its acceptor, its certificates and counters.
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) handshake_timeout: Duration,
    resolver: Arc<Resolver>,
    handshakes: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("certificates", &self.resolver.current.read().entries.len())
            .finish_non_exhaustive()
    }
}

/// How a handshake ended.
pub(crate) enum Handshake {
    Done,
    Failed,
    TimedOut,
}

impl Tls {
    /// Loads the certificates and builds the acceptor; starts the reload task when
    /// `reload_every` is not zero (in the current runtime).
    pub(crate) fn new(settings: &TlsSettings) -> Result<Arc<Self>, ConfigError> {
        // The files as they were when loaded (read before, so that a change made while
        // they load is a change the reload task sees): where the reload task starts.
        let loaded = fingerprint(&settings.certificates);
        let resolver = Arc::new(Resolver {
            current: parking_lot::RwLock::new(Arc::new(Certificates::load(
                &settings.certificates,
            )?)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::invalid("gateway.tls", e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // `http/1.1` stands for HTTP/1.x: an HTTP/1.0 client (`curl --http1.0`) offers
        // `http/1.0`, and would otherwise be refused.
        config.alpn_protocols = settings
            .alpn
            .iter()
            .flat_map(|p| match p.as_str() {
                "http/1.1" => vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()],
                other => vec![other.as_bytes().to_vec()],
            })
            .collect();
        let tls = Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: settings.handshake_timeout,
            resolver,
            handshakes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        });
        if !settings.reload_every.is_zero() {
            spawn_reloader(
                Arc::downgrade(&tls),
                settings.certificates.clone(),
                settings.reload_every,
                loaded,
            );
        }
        Ok(tls)
    }

    /// Counts a handshake's end.
    pub(crate) fn count(&self, handshake: Handshake) {
        match handshake {
            Handshake::Done => &self.handshakes,
            Handshake::Failed => &self.failed,
            Handshake::TimedOut => &self.timed_out,
        }
        .fetch_add(1, Relaxed);
    }

    /// The counters and certificates, for `/status.json`.
    pub(crate) fn status(&self) -> TlsStatus {
        TlsStatus {
            handshakes: self.handshakes.load(Relaxed),
            handshake_failures: self.failed.load(Relaxed),
            handshake_timeouts: self.timed_out.load(Relaxed),
            reloads: self.reloads.load(Relaxed),
            reload_failures: self.reload_failures.load(Relaxed),
            server_names: self
                .resolver
                .current
                .read()
                .entries
                .iter()
                .map(|e| e.names.clone())
                .collect(),
        }
    }
}

/// Checks the files every `every`; loads them again when any changed.
/// `seen`: the files' fingerprint when they were loaded (not when the task first runs: a
/// renewal written between the two would never be loaded).
fn spawn_reloader(
    tls: Weak<Tls>,
    settings: Vec<CertificateSettings>,
    every: Duration,
    mut seen: Vec<Option<(SystemTime, u64)>>,
) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(tls) = tls.upgrade() else { return };
            let now = fingerprint(&settings);
            if now == seen {
                continue;
            }
            seen = now;
            match Certificates::load(&settings) {
                Ok(certificates) => {
                    *tls.resolver.current.write() = Arc::new(certificates);
                    tls.reloads.fetch_add(1, Relaxed);
                    #[cfg(feature = "tracing")]
                    tracing::info!(target: "seawall::gateway", "TLS certificates reloaded");
                }
                Err(_e) => {
                    tls.reload_failures.fetch_add(1, Relaxed);
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        target: "seawall::gateway",
                        error = %_e,
                        "TLS certificates changed but could not be loaded: the previous ones \
                         stay in use"
                    );
                }
            }
        }
    });
}

/// Each file's modification time and size (`None` where it cannot be read).
fn fingerprint(settings: &[CertificateSettings]) -> Vec<Option<(SystemTime, u64)>> {
    settings
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// Picks the certificate for each handshake.
struct Resolver {
    current: parking_lot::RwLock<Arc<Certificates>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().pick(hello.server_name()))
    }
}

/// The loaded certificates, the default first.
struct Certificates {
    entries: Vec<Entry>,
}

struct Entry {
    key: Arc<CertifiedKey>,
    /// Lower case; `*.example.com` for a wildcard.
    names: Vec<String>,
}

impl Certificates {
    fn load(settings: &[CertificateSettings]) -> Result<Self, ConfigError> {
        let entries = settings
            .iter()
            .enumerate()
            .map(|(i, c)| load_one(&format!("gateway.tls.certificates[{i}]"), c))
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Err(ConfigError::invalid(
                "gateway.tls.certificates",
                "no certificate",
            ));
        }
        Ok(Self { entries })
    }

    /// The certificate for `sni`: one naming it exactly, else one whose wildcard covers
    /// it, else the first.
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let by_name = sni.and_then(|name| {
            let exact = |e: &&Entry| e.names.iter().any(|n| n.eq_ignore_ascii_case(name));
            self.entries.iter().find(exact).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.entries.iter().find(|e| {
                    e.names.iter().any(|n| {
                        n.strip_prefix("*.")
                            .is_some_and(|p| p.eq_ignore_ascii_case(parent))
                    })
                })
            })
        });
        by_name.unwrap_or(&self.entries[0]).key.clone()
    }
}

fn load_one(at: &str, settings: &CertificateSettings) -> Result<Entry, ConfigError> {
    let chain = CertificateDer::pem_file_iter(&settings.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(format!("{at}.cert"), &settings.cert, e))?;
    if chain.is_empty() {
        return Err(ConfigError::invalid(
            format!("{at}.cert"),
            format!("{}: no CERTIFICATE in the file", settings.cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| pem_error(format!("{at}.key"), &settings.key, e))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        ConfigError::invalid(
            format!("{at}.key"),
            format!("{}: {e}", settings.key.display()),
        )
    })?;
    let names = if settings.server_names.is_empty() {
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
            ConfigError::invalid(
                format!("{at}.cert"),
                format!("{}: not a valid certificate: {e}", settings.cert.display()),
            )
        })?;
        leaf.valid_dns_names()
            .map(str::to_ascii_lowercase)
            .collect()
    } else {
        settings
            .server_names
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect()
    };
    let key = CertifiedKey::new(chain, signer);
    key.keys_match().map_err(|e| {
        ConfigError::invalid(
            format!("{at}.key"),
            format!(
                "{} does not match the certificate in {}: {e}",
                settings.key.display(),
                settings.cert.display()
            ),
        )
    })?;
    Ok(Entry {
        key: Arc::new(key),
        names,
    })
}

fn pem_error(field: String, path: &Path, error: pem::Error) -> ConfigError {
    match error {
        pem::Error::Io(e) => ConfigError::io(format!("{field}: {}", path.display()), e),
        pem::Error::NoItemsFound => ConfigError::invalid(
            field,
            format!("{}: no PEM item of the expected kind", path.display()),
        ),
        other => ConfigError::invalid(field, format!("{}: {other}", path.display())),
    }
}
