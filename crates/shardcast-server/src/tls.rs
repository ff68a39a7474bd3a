//! TLS termination: loads the certificate and key, and runs one pump task per TLS connection
//! that moves plain bytes between the encrypted stream and a local socket pair. Everything
//! behind the pair (hyper, the reader, the shard) is the same as for plain TCP.
//!
//! The pump costs a task, two 8 KiB buffers and two extra descriptors per TLS connection;
//! see `docs/security.md` for when to terminate TLS in front of the relay instead.

use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, TlsConfig};

/// Bytes each pump buffers per direction, for the connection's lifetime. A larger frame takes
/// several copies; back-pressure from a slow client still reaches the shard through the pair.
const PUMP_BUFFER: usize = 8 * 1024;

/// Reads the PEM files and builds the acceptor (TLS 1.2 and 1.3, ring provider, ALPN
/// `http/1.1`).
pub(crate) fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, Error> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| Error::Config(format!("{flag} {}: {e}", path.display())))
    };
    let cert_pem = read("--tls-cert", &config.cert)?;
    let key_pem = read("--tls-key", &config.key)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("--tls-cert {}: {e}", config.cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "--tls-cert {}: no certificate in the file",
            config.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| Error::Config(format!("--tls-key {}: {e}", config.key.display())))?;
    let mut server = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(format!("--tls-key does not fit --tls-cert: {e}")))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Completes the TLS handshake on `tcp` and starts the pump. Returns the plain local end,
/// or `None` if the handshake failed (logged at debug).
pub(crate) async fn accept(acceptor: &TlsAcceptor, tcp: TcpStream) -> Option<UnixStream> {
    let peer = tcp.peer_addr().ok();
    let mut tls = match acceptor.accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(?peer, error = %e, "tls handshake failed");
            return None;
        }
    };
    let (plain, mut pump_end) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "failed to create a socket pair for a tls connection");
            return None;
        }
    };
    tokio::spawn(async move {
        let r = tokio::io::copy_bidirectional_with_sizes(
            &mut tls,
            &mut pump_end,
            PUMP_BUFFER,
            PUMP_BUFFER,
        )
        .await;
        if let Err(e) = r {
            tracing::debug!(?peer, error = %e, "tls connection ended");
        }
    });
    Some(plain)
}
