//! HTTPS on the scheduler's own listener: `[scheduler.tls]` names a PEM certificate chain
//! and its private key, and every connection then speaks TLS 1.2 or 1.3 (rustls, ring),
//! choosing HTTP/2 or HTTP/1.1 by ALPN. Without the section the listener is plain HTTP, for
//! a proxy or load balancer that terminates TLS in front of it.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::ServerConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl TlsSection {
    /// The listener's TLS settings, None without TLS. Errors name the file and what is
    /// wrong with it, never the key's contents.
    pub fn load(&self) -> Result<Option<Arc<ServerConfig>>, String> {
        let (cert_file, key_file) = match (&self.cert_file, &self.key_file) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err("scheduler.tls: set both cert_file and key_file, or neither".to_owned());
            }
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| {
                format!(
                    "scheduler.tls.cert_file: cannot read certificates from {}: {e}",
                    cert_file.display()
                )
            })?;
        if certs.is_empty() {
            return Err(format!(
                "scheduler.tls.cert_file: no PEM certificate in {}",
                cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
            format!(
                "scheduler.tls.key_file: cannot read a private key from {}: {e}",
                key_file.display()
            )
        })?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("scheduler.tls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("scheduler.tls: the key does not fit the certificate: {e}"))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(cfg)))
    }
}
