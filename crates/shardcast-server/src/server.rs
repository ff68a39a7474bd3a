//! The accept loops and the server's lifecycle: start the shards, serve HTTP on every accepted
//! socket, and on shutdown turn `/readyz` to 503, wait, then close every client with 1001 in
//! batches spread over the drain timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use shardcast_core::{Engine, InterestWatcher};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::bus::Bus;
use crate::http::Endpoint;
use crate::reject::RejectReason;
use crate::relay::Relay;
use crate::{Config, Error, Prepared};

/// The largest request head (request line and headers) accepted; larger gets 431. Also the
/// most hyper buffers while reading a head, so a client cannot make it buffer more.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A relay bound to a listener, with its shards started. Call [`Server::run`] to serve.
pub struct Server {
    listener: TcpListener,
    relay: Relay,
    shards: Vec<JoinHandle<()>>,
    tls: Option<TlsAcceptor>,
    metrics: Option<TcpListener>,
    /// The bus task (`--bus`), stopped once the drain is over.
    bus: Option<JoinHandle<()>>,
}

impl Server {
    /// Validates `config` and starts its shards on the current tokio runtime.
    pub fn new(listener: TcpListener, config: Config) -> Result<Self, Error> {
        Self::prepared(listener, config.prepare()?)
    }

    /// Starts a configuration already checked and loaded by [`Config::prepare`].
    pub fn prepared(listener: TcpListener, prepared: Prepared) -> Result<Self, Error> {
        let Prepared { config, auth, tls } = prepared;
        let local = listener.local_addr().map_err(Error::LocalAddr)?;
        if let Some(what) = config.auth.open_access_warning(local) {
            tracing::warn!(addr = %local, "{what}; set --jwt-secret or --jwt-public-key (docs/security.md)");
        }
        let demo = crate::demo::enabled(&config, local);
        // The bus hears of the engine's interest changes; the engine gets the bus's messages.
        let (engine, shards, bus) = match config.bus.clone() {
            Some(bus_config) => {
                let (bus, inboxes) = Bus::new();
                let watcher: Arc<dyn InterestWatcher> = bus.clone();
                let (engine, shards) = Engine::start(config.engine(), Some(watcher));
                let task = crate::bus::spawn(Arc::clone(&bus), inboxes, engine.clone(), bus_config);
                (engine, shards, Some((bus, task)))
            }
            None => {
                let (engine, shards) = Engine::start(config.engine(), None);
                (engine, shards, None)
            }
        };
        let (bus, bus_task) = bus.unzip();
        let relay = Relay::new(config, auth, engine, bus, demo);
        Ok(Self {
            listener,
            relay,
            shards,
            tls,
            metrics: None,
            bus: bus_task,
        })
    }

    /// A handle for publishing server-side and reading counters while the server runs.
    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(Error::LocalAddr)
    }

    /// Serves `/metrics` (and the health checks) on `listener` instead of the main port.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics = Some(listener);
        self
    }

    /// Serves until `shutdown` completes, then drains (see [`Server::run_with`]).
    pub async fn run(self, shutdown: impl Future) -> Result<(), Error> {
        let (tx, rx) = watch::channel(Stop::Run);
        let server = self.run_with(rx);
        tokio::pin!(server, shutdown);
        let mut asked = false;
        loop {
            tokio::select! {
                r = &mut server => return r,
                _ = &mut shutdown, if !asked => {
                    asked = true;
                    let _ = tx.send(Stop::Drain);
                }
            }
        }
    }

    /// Serves until `stop` says [`Stop::Drain`], then drains without a reconnect storm:
    ///
    /// 1. `/readyz` answers 503 and new upgrades get 503 at once; open clients keep being
    ///    served for `--drain-delay`, so a load balancer can take the node out first.
    /// 2. Clients are closed with 1001 in batches spread evenly over `--drain-timeout`
    ///    (less a second for the last batch to finish its close handshake).
    /// 3. Returns when every client is gone, or when the drain timeout ends.
    ///
    /// [`Stop::Now`], at any point, closes every client at once and returns within about a
    /// second. If `stop`'s sender is dropped, that counts as [`Stop::Drain`].
    pub async fn run_with(self, mut stop: watch::Receiver<Stop>) -> Result<(), Error> {
        let Server {
            listener,
            relay,
            shards,
            tls,
            metrics,
            bus,
        } = self;
        // Nothing is served before the JWKS (if any) has keys: tokens could not be checked.
        if let Err(e) = relay.auth().start().await {
            relay.engine().shutdown_now().await;
            return Err(e);
        }
        let accept = futures_util::future::join(
            accept_loop(listener, relay.clone(), tls, Endpoint::Main),
            async {
                match metrics {
                    Some(l) => accept_loop(l, relay.clone(), None, Endpoint::Metrics).await,
                    None => std::future::pending().await,
                }
            },
        );
        tokio::pin!(accept);
        tokio::select! {
            _ = &mut accept => {}
            _ = reached(&mut stop, Stop::Drain) => {}
        }
        let config = relay.config().clone();
        relay.engine().start_draining();
        tracing::info!(
            delay = ?config.drain_delay,
            timeout = ?config.drain_timeout,
            "draining: /readyz answers 503; clients will be closed with 1001 in batches"
        );
        let mut now = false;
        tokio::select! {
            _ = &mut accept => {}
            _ = tokio::time::sleep(config.drain_delay) => {}
            _ = reached(&mut stop, Stop::Now) => now = true,
        }
        let start = tokio::time::Instant::now();
        let mut deadline = start + config.drain_timeout;
        if now {
            tracing::info!("second signal: closing every client now");
            deadline = start + CLOSE_GRACE;
            relay.engine().shutdown_now().await;
        } else {
            let last_batch = CLOSE_GRACE.min(config.drain_timeout / 2);
            let until = deadline - last_batch;
            relay.engine().drain(until, deadline).await;
        }
        let done = futures_util::future::join_all(shards);
        // The margin covers one timer tick of the shards' own deadline.
        let timeout = tokio::time::sleep_until(deadline + Duration::from_secs(1));
        tokio::pin!(done, timeout);
        loop {
            tokio::select! {
                _ = &mut accept => {}
                _ = &mut done => break,
                _ = &mut timeout => {
                    tracing::warn!("shards did not stop within the drain timeout");
                    break;
                }
                _ = reached(&mut stop, Stop::Now), if !now => {
                    now = true;
                    tracing::info!("second signal: closing every client now");
                    relay.engine().shutdown_now().await;
                    let soon = tokio::time::Instant::now() + CLOSE_GRACE + Duration::from_secs(1);
                    let current = timeout.deadline();
                    timeout.as_mut().reset(soon.min(current));
                }
            }
        }
        relay.engine().stop_publishing();
        if let Some(bus) = bus {
            // Publishes are refused from here on, so the bus has nothing left to carry.
            bus.abort();
        }
        tracing::info!("drain finished");
        Ok(())
    }
}

/// The listen backlog [`bind`] asks for; the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 65_535;

/// Binds a listener for [`Server::new`] with a deep accept backlog: after a node restarts,
/// thousands of clients reconnect at once, and the standard library's 128 would drop
/// most of their SYNs. `SO_REUSEADDR` lets a restart bind while old sockets sit in
/// `TIME_WAIT`.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let fail = |reason| Error::Bind { addr, reason };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    TcpListener::from_std(socket.into()).map_err(fail)
}

/// What a [`Server`] is asked to do; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Keep serving.
    Run,
    /// Drain gracefully (the first SIGTERM or SIGINT).
    Drain,
    /// Close everything at once (the second signal).
    Now,
}

/// The grace a client gets for its close handshake when everything closes at once.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Completes once `stop` is at `level`. A dropped sender counts as `Drain`, never as `Now`.
async fn reached(stop: &mut watch::Receiver<Stop>, level: Stop) {
    if stop.wait_for(|s| *s >= level).await.is_err() && level > Stop::Drain {
        std::future::pending::<()>().await;
    }
}

/// Accepts forever, serving each connection in a task of its own.
async fn accept_loop(
    listener: TcpListener,
    relay: Relay,
    tls: Option<TlsAcceptor>,
    endpoint: Endpoint,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let relay = relay.clone();
                let timeout = relay.config().handshake_timeout;
                match &tls {
                    None => {
                        let io = TokioIo::new(stream);
                        tokio::spawn(serve_http(io, peer, relay, endpoint, timeout));
                    }
                    Some(acceptor) => {
                        // No overflow: `Config::validate` caps the timeout at 24 hours.
                        let deadline = Instant::now() + timeout;
                        tokio::spawn(serve_tls(acceptor.clone(), stream, peer, relay, deadline));
                    }
                }
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection. `io` is a TCP stream or a TLS stream over one;
/// `conn.rs` takes either back after an upgrade.
///
/// `head_timeout` bounds the reading of each request head: `--handshake-timeout` on plain
/// TCP, and behind TLS what the TLS handshake left of it (see [`serve_tls`]).
async fn serve_http<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    relay: Relay,
    endpoint: Endpoint,
    head_timeout: Duration,
) where
    TokioIo<I>: Read + Write + Unpin + Send + 'static,
{
    let service = {
        let relay = relay.clone();
        service_fn(move |req| crate::http::handle(req, relay.clone(), peer, endpoint))
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        if e.is_parse_too_large() {
            relay.reject(RejectReason::HeadersTooLarge);
        } else if e.is_parse() {
            relay.reject(RejectReason::BadRequest);
        } else if e.is_timeout() {
            relay.reject(RejectReason::HandshakeTimeout);
        }
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// Completes the TLS handshake, then serves HTTP over the TLS stream. `deadline` (the accept plus
/// `--handshake-timeout`) is one budget for the TLS handshake and the first request head
/// together, so a client trickling both is cut off once, not after twice the timeout.
///
/// Hyper's head timeout is a duration applied to every head on the connection, so keep-alive
/// requests after the first get the same remaining budget: the timeout less the time TLS took.
async fn serve_tls(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    relay: Relay,
    deadline: Instant,
) {
    match tokio::time::timeout_at(deadline, crate::tls::accept(&acceptor, tcp)).await {
        Ok(Some(tls)) => {
            let left = deadline.saturating_duration_since(Instant::now());
            serve_http(TokioIo::new(tls), peer, relay, Endpoint::Main, left).await
        }
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
