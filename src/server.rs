//! The accept loop and the server's lifecycle: start the shards, serve HTTP on every accepted
//! socket, and on shutdown stop accepting, close every client with 1001 and wait for the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::relay::Relay;
use crate::shard::{INBOX, Shard, ShardMsg};
use crate::{Config, Error};

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay bound to a listener, with its shards started. Call [`Server::run`] to serve.
pub struct Server {
    listener: TcpListener,
    relay: Relay,
    shards: Vec<JoinHandle<()>>,
}

impl Server {
    /// Validates `config` and starts its shards on the current tokio runtime.
    pub fn new(listener: TcpListener, config: Config) -> Result<Self, Error> {
        config.validate()?;
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..config.shards).map(|_| mpsc::channel(INBOX)).unzip();
        let relay = Relay::new(config, senders);
        let shards = inboxes
            .into_iter()
            .enumerate()
            .map(|(i, inbox)| tokio::spawn(Shard::new(i, relay.clone()).run(inbox)))
            .collect();
        Ok(Self {
            listener,
            relay,
            shards,
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
        } = self;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve_http(stream, peer, relay.clone()));
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

async fn serve_http(stream: tokio::net::TcpStream, peer: SocketAddr, relay: Relay) {
    let service = service_fn(move |req| crate::http::handle(req, relay.clone(), peer));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
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
