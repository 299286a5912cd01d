//! The HTTPS certificate: self-signed on first start, kept in the data directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The certificate could not be generated.
    #[error("cannot generate a self-signed certificate")]
    Generate(#[source] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The certificate file is unreadable or holds no certificate.
    #[error("cannot read the certificate {0}")]
    ReadCert(PathBuf, #[source] rustls::pki_types::pem::Error),
    /// The certificate file holds no PEM certificate.
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    /// The key file is unreadable or holds no key.
    #[error("cannot read the private key {0}")]
    ReadKey(PathBuf, #[source] rustls::pki_types::pem::Error),
    /// rustls refused the certificate and key.
    #[error("certificate and key do not make a TLS configuration")]
    Config(#[source] rustls::Error),
}

/// Certificate and key file paths under `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("tls/cert.pem"), dir.join("tls/key.pem"))
}

/// Writes `data` to `path` through a temporary file and a rename, so a crash leaves
/// either the old file or the new one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Creates a self-signed certificate for `names` in `dir` unless one is there.
pub fn ensure_certificate(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), Error> {
    let (cert_path, key_path) = paths(dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let tls_dir = dir.join("tls");
    fs::create_dir_all(&tls_dir).map_err(|e| Error::Write(tls_dir.clone(), e))?;
    let certified = rcgen::generate_simple_self_signed(names.to_vec()).map_err(Error::Generate)?;
    write_atomic(
        &key_path,
        certified.key_pair.serialize_pem().as_bytes(),
        0o600,
    )
    .map_err(|e| Error::Write(key_path.clone(), e))?;
    write_atomic(&cert_path, certified.cert.pem().as_bytes(), 0o644)
        .map_err(|e| Error::Write(cert_path.clone(), e))?;
    tracing::info!(path = %cert_path.display(), "generated a self-signed HTTPS certificate");
    Ok((cert_path, key_path))
}

/// rustls server configuration from PEM files (HTTP/1.1 only).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::ReadCert(cert.to_owned(), e))?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::ReadKey(key.to_owned(), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(Error::Config)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_is_generated_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (cert, key) = ensure_certificate(dir.path(), &names).unwrap();
        let first = fs::read(&cert).unwrap();
        ensure_certificate(dir.path(), &names).unwrap();
        assert_eq!(
            first,
            fs::read(&cert).unwrap(),
            "certificate must be kept across starts"
        );
        server_config(&cert, &key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn garbage_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = paths(dir.path());
        fs::create_dir_all(cert.parent().unwrap()).unwrap();
        fs::write(&cert, "not a certificate").unwrap();
        fs::write(&key, "not a key").unwrap();
        let err = server_config(&cert, &key).unwrap_err();
        assert!(err.to_string().contains("cert.pem"), "{err}");
    }
}
