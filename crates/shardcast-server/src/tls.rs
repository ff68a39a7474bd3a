//! TLS termination: loads the certificate and key, completes the TLS handshake, and after
//! the WebSocket upgrade turns the connection into the engine's [`Sealed`] socket, [`Tls`]:
//! one TCP socket and its rustls state, with no task of its own. The reader decrypts in its
//! reads and the shard encrypts in its writes, each under the connection's lock.
//!
//! Before the upgrade hyper serves the `tokio_rustls` stream as it would a TCP stream.
//! What does not live here: the handshake deadline (`server.rs`) and the send budget
//! (the engine's; a TLS client may hold up to [`SEALED_LIMIT`] more, in rustls).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use shardcast_core::Sealed;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::ServerConnection;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

use crate::{Error, TlsConfig};

/// Most encrypted bytes one connection holds for the kernel: the output of one write. A
/// write takes at most this much plain text (a few TLS records), and the next write waits
/// until it is sent. Large enough that a backlog goes out in large writes.
const SEALED_LIMIT: usize = 64 * 1024;

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

/// Completes the TLS handshake on `tcp`, or returns `None` if it failed (logged at debug).
pub(crate) async fn accept(acceptor: &TlsAcceptor, tcp: TcpStream) -> Option<TlsStream<TcpStream>> {
    let peer = tcp.peer_addr().ok();
    match acceptor.accept(tcp).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(?peer, error = %e, "tls handshake failed");
            None
        }
    }
}

/// A TLS connection after its upgrade: the engine's [`Sealed`] socket.
pub(crate) struct Tls {
    tcp: TcpStream,
    /// The connection's TLS state. Locked by the reader (decrypting) and the shard
    /// (encrypting), never across an await: every call holding it is non-blocking.
    conn: Mutex<ServerConnection>,
    /// Whether `conn` may hold decrypted plain text not yet read, so that the reader must
    /// not wait for the socket (whose readiness may be spent: the bytes are already in).
    /// Set when the upgrade hands the stream over and after each read; only the reader
    /// reads and clears it.
    plain_waiting: AtomicBool,
}

impl Tls {
    /// Takes the stream hyper served apart; plain text rustls already decrypted stays in it
    /// and is read first.
    pub(crate) fn new(stream: TlsStream<TcpStream>) -> Self {
        let (tcp, mut conn) = stream.into_inner();
        conn.set_buffer_limit(Some(SEALED_LIMIT));
        let waiting = plain_waiting(&mut conn);
        Self {
            tcp,
            conn: Mutex::new(conn),
            plain_waiting: AtomicBool::new(waiting),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        // Nothing under the lock panics (rustls reports failures as errors). Were it to,
        // rustls' state is still its own, and a broken one fails the next call with an error.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends pending output; `Ok(true)` once none is left.
    fn flush(conn: &mut ServerConnection, tcp: &TcpStream) -> io::Result<bool> {
        while conn.wants_write() {
            match conn.write_tls(&mut Io(tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Whether `conn` holds decrypted plain text (or an error) for the next read.
fn plain_waiting(conn: &mut ServerConnection) -> bool {
    // Cheap when nothing new came in; an error is for the next read to report.
    conn.process_new_packets()
        .map_or(true, |state| state.plaintext_bytes_to_read() > 0)
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// rustls' blocking I/O over the socket's non-blocking calls: `WouldBlock` passes through.
struct Io<'a>(&'a TcpStream);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// A write's frames are gathered here and encrypted as one run of full-size records
    /// (one record per frame would cost a record header, a tag and a cipher call each).
    static GATHER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(SEALED_LIMIT));
}

impl Sealed for Tls {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.plain_waiting.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut conn = self.lock();
        let mut eof = false;
        self.plain_waiting.store(false, Ordering::Relaxed);
        loop {
            match conn.reader().read(buf) {
                Ok(n) => {
                    let waiting = n > 0 && plain_waiting(&mut conn);
                    self.plain_waiting.store(waiting, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !eof => {}
                // End of stream, with or without the peer's close_notify: the WebSocket
                // layer decides whether the connection ended cleanly.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
            // Nothing decrypted is waiting: read more records (`WouldBlock` passes through
            // and clears the socket's readiness).
            if conn.read_tls(&mut Io(&self.tcp))? == 0 {
                eof = true;
            }
            let processed = conn.process_new_packets();
            // Alerts, and answers to a key update, go out now if the socket takes them;
            // anything left goes with the next write.
            let _ = Self::flush(&mut conn, &self.tcp);
            if let Err(e) = processed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut conn = self.lock();
        if !Self::flush(&mut conn, &self.tcp)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let taken = GATHER.with_borrow_mut(|gather| {
            gather.clear();
            for b in bufs {
                let room = SEALED_LIMIT - gather.len();
                if room == 0 {
                    break;
                }
                gather.extend_from_slice(&b[..b.len().min(room)]);
            }
            conn.writer().write(gather)
        })?;
        // The output need not all go now: what is left waits for `try_flush`.
        Self::flush(&mut conn, &self.tcp)?;
        Ok(taken)
    }

    fn try_flush(&self) -> io::Result<bool> {
        Self::flush(&mut self.lock(), &self.tcp)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_write_ready(cx)
    }

    fn shutdown(&self, how: Shutdown) {
        if how != Shutdown::Read {
            let mut conn = self.lock();
            // Only if nothing waits: a close_notify half-sent behind a full socket would
            // cut a record in two.
            if !conn.wants_write() {
                conn.send_close_notify();
                let _ = Self::flush(&mut conn, &self.tcp);
            }
        }
        let _ = socket2::SockRef::from(&self.tcp).shutdown(how);
    }
}
