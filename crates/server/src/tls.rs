//! Certificates for HTTPS/WSS (and TURN over TLS): from PEM files, reloadable, or self-signed for a LAN.

use crate::config::TlsSource;
use axum_server::tls_rustls::RustlsConfig;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot load the TLS certificate {cert} / key {key}: {source} (both must be readable PEM files; the key unencrypted)")]
    Load { cert: PathBuf, key: PathBuf, source: std::io::Error },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// A loaded certificate and what to print about it.
pub struct Tls {
    pub config: RustlsConfig,
    /// SHA-256 of the leaf certificate, as `AA:BB:…`.
    pub fingerprint: String,
    pub source: TlsSource,
}

pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

fn leaf_fingerprint(pem: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD.decode(body).ok()?;
    Some(fingerprint(&der))
}

/// Names the self-signed certificate is valid for: localhost and this machine's host name and addresses.
fn self_signed_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_owned());
        }
    }
    names
}

pub async fn load(source: &TlsSource) -> Result<Tls, TlsError> {
    install_crypto_provider();
    match source {
        TlsSource::Files { cert, key } => {
            let err = |source| TlsError::Load { cert: cert.clone(), key: key.clone(), source };
            let cert_pem = tokio::fs::read(cert).await.map_err(err)?;
            let config = RustlsConfig::from_pem_file(cert, key).await.map_err(err)?;
            let fingerprint = leaf_fingerprint(&cert_pem).unwrap_or_else(|| "unknown".into());
            Ok(Tls { config, fingerprint, source: source.clone() })
        }
        TlsSource::SelfSigned => {
            let certified = rcgen::generate_simple_self_signed(self_signed_names())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let fingerprint = fingerprint(certified.cert.der());
            let config = RustlsConfig::from_pem(
                certified.cert.pem().into_bytes(),
                certified.signing_key.serialize_pem().into_bytes(),
            )
            .await
            .map_err(|e| TlsError::Generate(e.to_string()))?;
            Ok(Tls { config, fingerprint, source: source.clone() })
        }
    }
}

impl Tls {
    /// Re-reads the certificate files (on SIGHUP); connections in progress keep theirs.
    pub async fn reload(&mut self) -> Result<(), TlsError> {
        if let TlsSource::Files { cert, key } = &self.source {
            let err = |source| TlsError::Load { cert: cert.clone(), key: key.clone(), source };
            let cert_pem = tokio::fs::read(cert).await.map_err(err)?;
            self.config.reload_from_pem_file(cert, key).await.map_err(err)?;
            self.fingerprint = leaf_fingerprint(&cert_pem).unwrap_or_else(|| "unknown".into());
        }
        Ok(())
    }
}

/// rustls needs one process-wide provider when several crates enable different ones.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
