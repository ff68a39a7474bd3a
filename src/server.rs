//! The accept loop and the server's lifecycle: start the shards, serve HTTP on every accepted
//! socket, and on shutdown stop accepting, close every client with 1001 and wait for the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::auth::Auth;
use crate::handshake::RejectReason;
use crate::relay::Relay;
use crate::shard::{INBOX, Shard, ShardMsg};
use crate::{Config, Error};

/// The largest request head (request line and headers) accepted; larger gets 431. Also the
/// most hyper buffers while reading a head, so a client cannot make it buffer more.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A relay bound to a listener, with its shards started. Call [`Server::run`] to serve.
pub struct Server {
    listener: TcpListener,
    relay: Relay,
    shards: Vec<JoinHandle<()>>,
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// Validates `config` and starts its shards on the current tokio runtime.
    pub fn new(listener: TcpListener, config: Config) -> Result<Self, Error> {
        config.validate()?;
        let auth = Auth::new(&config.auth)?;
        if let Ok(addr) = listener.local_addr()
            && let Some(what) = config.auth.open_access_warning(addr)
        {
            tracing::warn!(%addr, "{what}; set --jwt-secret or --jwt-public-key (docs/security.md)");
        }
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..config.shards).map(|_| mpsc::channel(INBOX)).unzip();
        let relay = Relay::new(config, auth, senders);
        let shards = inboxes
            .into_iter()
            .enumerate()
            .map(|(i, inbox)| tokio::spawn(Shard::new(i, relay.clone()).run(inbox)))
            .collect();
        Ok(Self {
            listener,
            relay,
            shards,
            tls,
        })
    }

    /// A handle for publishing server-side and reading counters while the server runs.
    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(Error::LocalAddr)
    }

    /// Serves until `shutdown` completes, then drains: every client gets close 1001 and at
    /// most `drain_timeout` to go. Returns once the shards have stopped.
    pub async fn run(self, shutdown: impl Future) -> Result<(), Error> {
        let Server {
            listener,
            relay,
            shards,
            tls,
        } = self;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        match &tls {
                            None => {
                                tokio::spawn(serve_http(TokioIo::new(stream), peer, relay.clone()));
                            }
                            Some(acceptor) => {
                                tokio::spawn(serve_tls(acceptor.clone(), stream, peer, relay.clone()));
                            }
                        }
                    }
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!("shutting down: closing every client with 1001");
        relay.shared.shutting_down.store(true, Ordering::Release);
        for tx in &relay.shared.shards {
            let _ = tx.send(ShardMsg::Shutdown).await;
        }
        // Shards free every client by the drain deadline; the margin covers one timer tick.
        let deadline = relay.config().drain_timeout + Duration::from_secs(1);
        let all = futures_util::future::join_all(shards);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("shards did not stop within the drain timeout");
        }
        Ok(())
    }
}

/// Serves HTTP/1.1 on one connection. `io` is a TCP stream or, behind TLS, a local socket;
/// `conn.rs` takes either back after an upgrade.
async fn serve_http<I>(io: TokioIo<I>, peer: SocketAddr, relay: Relay)
where
    TokioIo<I>: Read + Write + Unpin + Send + 'static,
{
    let timeout = relay.config().handshake_timeout;
    let service = {
        let relay = relay.clone();
        service_fn(move |req| crate::http::handle(req, relay.clone(), peer))
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        if e.is_parse_too_large() {
            relay.reject(RejectReason::HeadersTooLarge);
        } else if e.is_timeout() {
            relay.reject(RejectReason::HandshakeTimeout);
        }
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// Terminates TLS (within the handshake timeout), then serves HTTP on the plain side.
async fn serve_tls(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    relay: Relay,
) {
    let timeout = relay.config().handshake_timeout;
    match tokio::time::timeout(timeout, crate::tls::accept(&acceptor, tcp)).await {
        Ok(Some(plain)) => serve_http(TokioIo::new(plain), peer, relay).await,
        Ok(None) => relay.reject(RejectReason::TlsHandshake),
        Err(_) => {
            relay.reject(RejectReason::HandshakeTimeout);
            tracing::debug!(%peer, "tls handshake timed out");
        }
    }
}

/// Runs a relay on `listener` with `config` until `shutdown` completes. The testable entry
/// point, in the style of mini-redis: tests bind `127.0.0.1:0` and pass a channel.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), Error> {
    Server::new(listener, config)?.run(shutdown).await
}
