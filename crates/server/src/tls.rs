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

/// How long a self-signed certificate is valid from now (browsers refuse real certificates valid for more than
/// about 13 months; a year is plenty for a LAN server that makes a new one at each start).
pub const SELF_SIGNED_VALIDITY: time::Duration = time::Duration::days(365);

/// A self-signed certificate valid from a day ago (clocks differ) to [`SELF_SIGNED_VALIDITY`] from now.
fn self_signed() -> Result<(rcgen::Certificate, rcgen::KeyPair), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(self_signed_names())?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + SELF_SIGNED_VALIDITY;
    Ok((params.self_signed(&key)?, key))
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
            let (cert, key) = self_signed().map_err(|e| TlsError::Generate(e.to_string()))?;
            let fingerprint = fingerprint(cert.der());
            let config = RustlsConfig::from_pem(cert.pem().into_bytes(), key.serialize_pem().into_bytes())
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
