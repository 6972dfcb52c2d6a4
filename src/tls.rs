//! HTTPS: the certificate and key from PEM files, checked at start, and picked up again
//! when the files are replaced (as certbot does) without a restart or a dropped stream.
//!
//! Connections already open keep the session they negotiated; only new handshakes see
//! a renewed certificate. A renewed file that cannot be used (half written, a key that
//! does not match) keeps the old certificate and logs a warning: a bad renewal must not
//! take a running server down. ALPN offers HTTP/2 first, then HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::sync::CancellationToken;

/// How often the files are looked at for a renewal: a stat of two files, cheap; a
/// renewed certificate is in use within this long.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The certificate's validity period does not include now.
    #[error("{path}: the certificate {message}")]
    Validity {
        /// The certificate file.
        path: PathBuf,
        /// Expired or not yet valid, with the date.
        message: String,
    },
    /// The key is not the certificate's, or rustls refuses it.
    #[error("{key} does not go with {cert}: {message}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        message: String,
    },
}

/// The two files of a certificate.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate chain, PEM (the server's certificate first).
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertFiles {
    /// Reads, parses and checks both files.
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&self.cert, "certificate", e))?;
        let Some(first) = chain.first() else {
            return Err(TlsError::Pem {
                path: self.cert.clone(),
                message: "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
            });
        };
        check_validity(&self.cert, first)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| pem_error(&self.key, "private key", e))?;
        let provider = ring::default_provider();
        let certified =
            CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                message: e.to_string(),
            })?;
        Ok(certified)
    }

    /// When either file last changed, to notice a renewal.
    fn stamp(&self) -> Option<Stamp> {
        let cert = std::fs::metadata(&self.cert).ok()?;
        let key = std::fs::metadata(&self.key).ok()?;
        Some((
            cert.modified().ok()?,
            key.modified().ok()?,
            cert.len(),
            key.len(),
        ))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

fn pem_error(path: &Path, what: &str, e: rustls_pki_types::pem::Error) -> TlsError {
    let message = match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!("no {what} in it (PEM expected)"),
        other => format!("not a valid {what} in PEM: {other:?}"),
    };
    TlsError::Pem {
        path: path.to_owned(),
        message,
    }
}

/// Refuses a certificate that has expired or is not valid yet: browsers would refuse
/// every connection, and a clear line at start beats a page that never loads.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: format!("the certificate cannot be parsed: {e}"),
        })?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError::Validity {
            path: path.to_owned(),
            message: format!("expired on {}", validity.not_after),
        });
    }
    if now < validity.not_before {
        return Err(TlsError::Validity {
            path: path.to_owned(),
            message: format!("is not valid before {}", validity.not_before),
        });
    }
    Ok(())
}

/// The certificate in use, swapped when the files are renewed.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a whole Arc: the last certificate set.
        let current = match self.0.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        Some(current.clone())
    }
}

/// What the accept loop needs to serve HTTPS.
#[derive(Clone)]
pub struct Tls {
    /// Makes a TLS session of an accepted socket.
    pub acceptor: TlsAcceptor,
    files: CertFiles,
    current: Arc<Current>,
    loaded: Option<Stamp>,
}

/// When each file last changed, and its size.
type Stamp = (SystemTime, SystemTime, u64, u64);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads and checks the files: every problem is an error here, before the server
    /// starts.
    pub fn new(files: CertFiles) -> Result<Self, TlsError> {
        // Stamped before reading: a renewal that lands while the server starts is seen.
        let loaded = files.stamp();
        let certified = files.load()?;
        let current = Arc::new(Current(RwLock::new(Arc::new(certified))));
        let provider = Arc::new(ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| mismatch(&files, e))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            files,
            current,
            loaded,
        })
    }

    /// Looks at the files every [`RELOAD_CHECK`] until `stop`, and puts a renewed
    /// certificate in use.
    pub fn watch(&self, stop: CancellationToken) {
        let files = self.files.clone();
        let current = self.current.clone();
        let mut seen = self.loaded;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RELOAD_CHECK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let stamp = files.stamp();
                if stamp == seen || stamp.is_none() {
                    continue;
                }
                seen = stamp;
                match files.load() {
                    Ok(renewed) => {
                        let mut slot = match current.0.write() {
                            Ok(guard) => guard,
                            Err(poisoned) => poisoned.into_inner(),
                        };
                        *slot = Arc::new(renewed);
                        tracing::info!("TLS certificate reloaded from {}", files.cert.display());
                    }
                    Err(e) => {
                        tracing::warn!("TLS certificate not reloaded, keeping the old one: {e}")
                    }
                }
            }
        });
    }
}

fn mismatch(files: &CertFiles, e: rustls::Error) -> TlsError {
    TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    }
}
