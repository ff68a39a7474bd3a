//! A WebSocket connection's reader: finishes the upgrade, then reads client frames and turns
//! them into publishes, pongs and closes. Writing to the client is the shard's job (in
//! shardcast-core); this task never writes to the socket. `conn/fuzzing.rs` runs this same
//! reader over an in-memory stream for the `server_read` fuzz target.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use shardcast_core::frame::{self, close_code};
use shardcast_core::reader::{Event, FrameReader, ProtocolError};
use shardcast_core::{ConnShared, DisconnectReason, Slot, Socket, Source};

use crate::handshake::Publish;
use crate::relay::Relay;
use crate::tls::Tls;

#[cfg(any(test, feature = "internals"))]
pub mod fuzzing;

/// `--client-publish-rate` for one connection, as the generic cell rate algorithm: one
/// instant of state instead of a token count and a refill time. A message is allowed while
/// the theoretical arrival time is at most `burst` intervals ahead of now.
///
/// Hand-written rather than `governor`: it must run on tokio's clock, which tests pause.
#[derive(Debug)]
struct RateLimit {
    /// The time at which the bucket would be empty again.
    tat: Instant,
    interval: Duration,
    /// `(burst - 1) * interval`: how far `tat` may run ahead of now.
    tolerance: Duration,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        let interval = Duration::from_secs(1) / per_second;
        Self {
            tat: Instant::now(),
            interval,
            tolerance: interval * (per_second - 1),
        }
    }

    /// Takes one message's allowance at `now`; false once the rate is exceeded.
    fn allow(&mut self, now: Instant) -> bool {
        let tat = self.tat.max(now);
        if tat - now > self.tolerance {
            return false;
        }
        self.tat = tat + self.interval;
        true
    }
}

const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// Bytes read from a socket are parsed here and never kept, so a connection owns no read
    /// buffer while it waits.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Waits until the socket is readable. Unlike `TcpStream::readable`, whose future carries a
/// 150-byte waiter, this keeps only the waker tokio already stores per socket: the reader is
/// the socket's only reader, so the single slot is enough.
fn readable(stream: &Socket) -> impl Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| stream.poll_read_ready(cx))
}

enum Read {
    Bytes(Result<(), ProtocolError>),
    Eof,
    NotReady,
    Failed(io::Error),
}

/// Completes the upgrade for the connection reserved at `slot`, then starts its reader.
///
/// The reader runs in a task of its own, spawned once the upgrade is done. That task lives as
/// long as the connection, and a future's size is the largest state of any `.await` in it;
/// keeping the upgrade and its arguments out of it, and boxing the short-lived large steps
/// (publishing, telling the shard), leaves little more than the parser: a few hundred bytes
/// per idle connection.
pub(crate) async fn serve(
    relay: Relay,
    slot: Slot,
    conn: Arc<ConnShared>,
    publish: Publish,
    peer: SocketAddr,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) {
    let Some((stream, leftover)) = attach(&relay, slot, peer, upgrade).await else {
        let _ = relay.engine().gone(slot).await;
        return;
    };
    let mut reader = Reader::new(relay, slot, conn, publish, peer, ());
    let first = reader.replay(leftover);
    tokio::spawn(reader.serve(stream, first));
}

/// Waits for the upgrade, then hands the socket's write side to the shard.
async fn attach(
    relay: &Relay,
    slot: Slot,
    peer: SocketAddr,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) -> Option<(Arc<Socket>, Bytes)> {
    let upgraded = match upgrade.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "upgrade failed");
            return None;
        }
    };
    // The server serves hyper only these two stream types (see `server.rs`).
    let (socket, read_buf) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (Socket::Tcp(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => {
            let parts = upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>().ok()?;
            let tls = Tls::new(parts.io.into_inner());
            (Socket::Sealed(Box::new(tls)), parts.read_buf)
        }
    };
    let stream = Arc::new(socket);
    relay
        .engine()
        .attach(slot, Arc::clone(&stream))
        .await
        .ok()?;
    Some((stream, read_buf))
}

/// Sees the parser after every feed. Production readers use `()`, which is zero-sized and
/// does nothing; the fuzzing entry ([`fuzzing`]) records how much the parser held.
pub(crate) trait Watch {
    /// Called after `bytes` bytes were fed to `parser`.
    fn fed(&mut self, parser: &FrameReader, bytes: usize);
}

impl Watch for () {
    #[inline(always)]
    fn fed(&mut self, _: &FrameReader, _: usize) {}
}

struct Reader<W: Watch = ()> {
    relay: Relay,
    slot: Slot,
    conn: Arc<ConnShared>,
    publish: Publish,
    rate: Option<RateLimit>,
    parser: FrameReader,
    events: Vec<Event>,
    /// The client's address, for the log line of every rejection.
    peer: SocketAddr,
    watch: W,
}

impl<W: Watch> Reader<W> {
    fn new(
        relay: Relay,
        slot: Slot,
        conn: Arc<ConnShared>,
        publish: Publish,
        peer: SocketAddr,
        watch: W,
    ) -> Self {
        let parser = FrameReader::new(relay.config().max_message_bytes);
        let rate = relay.config().client_publish_rate.map(RateLimit::new);
        Self {
            relay,
            slot,
            conn,
            publish,
            rate,
            parser,
            events: Vec::new(),
            peer,
            watch,
        }
    }

    /// Parses the bytes hyper read past the upgrade request. `leftover` is a view into
    /// hyper's 8 KiB read buffer: it is parsed and let go at once, or every idle connection
    /// would keep that buffer alive.
    fn replay(&mut self, leftover: Bytes) -> Result<(), ProtocolError> {
        let first = self.parser.feed(&leftover, &mut self.events);
        self.watch.fed(&self.parser, leftover.len());
        first
    }

    /// Reads the connection to its end, then tells the shard the reader is gone.
    ///
    /// An `async move` block rather than an `async fn`: the latter keeps its arguments and
    /// the state of its body apart, which made this (per-connection) future 760 bytes instead
    /// of 472 (`the_reader_task_stays_small`).
    #[allow(clippy::manual_async_fn)]
    fn serve(
        mut self,
        stream: Arc<Socket>,
        first: Result<(), ProtocolError>,
    ) -> impl Future<Output = ()> {
        async move {
            self.run(&stream, first).await;
            let _ = Box::pin(self.relay.engine().gone(self.slot)).await;
        }
    }

    async fn run(&mut self, stream: &Socket, first: Result<(), ProtocolError>) {
        let mut result = first;
        loop {
            // Boxed: see `serve`. One allocation per read that completed a frame.
            if !self.events.is_empty() && !Box::pin(self.handle_events()).await {
                return self.drain(stream).await;
            }
            if let Err(e) = result {
                tracing::debug!(peer = %self.peer, error = %e, "protocol error");
                Box::pin(self.close(e.code, e.reason)).await;
                return self.drain(stream).await;
            }
            if self.parser.is_done() {
                return;
            }
            result = loop {
                if readable(stream).await.is_err() {
                    return;
                }
                match self.read(stream) {
                    Read::Bytes(r) => break r,
                    Read::NotReady => continue,
                    Read::Eof => return,
                    Read::Failed(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "read failed");
                        return;
                    }
                }
            };
        }
    }

    /// One non-blocking read into the thread's scratch buffer, parsed at once.
    fn read(&mut self, stream: &Socket) -> Read {
        SCRATCH.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => Read::Eof,
            Ok(n) => {
                self.conn.mark_alive();
                let result = self.parser.feed(&buf[..n], &mut self.events);
                self.watch.fed(&self.parser, n);
                Read::Bytes(result)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::NotReady,
            Err(e) => Read::Failed(e),
        })
    }

    /// Acts on parsed events in order. Returns false once the connection is closing.
    async fn handle_events(&mut self) -> bool {
        let mut events = std::mem::take(&mut self.events);
        let mut open = true;
        for event in events.drain(..) {
            if !open {
                break;
            }
            match event {
                Event::Message { opcode, payload } => {
                    if self.conn.is_closing() {
                        continue; // the server already sent its close; data is ignored
                    }
                    if let Some(rate) = &mut self.rate
                        && !rate.allow(Instant::now())
                    {
                        tracing::debug!(peer = %self.peer, "publish rate exceeded");
                        self.close_for(
                            close_code::POLICY,
                            "publish rate exceeded",
                            DisconnectReason::RateLimited,
                        )
                        .await;
                        open = false;
                        continue;
                    }
                    match &self.publish {
                        Publish::To(topic) => {
                            if self
                                .relay
                                .publish_from(Source::Ws, topic, opcode, &payload)
                                .await
                                .is_err()
                            {
                                open = false;
                            }
                        }
                        Publish::Refuse(reason) => {
                            let reason = *reason;
                            tracing::debug!(peer = %self.peer, reason, "data message refused");
                            self.close(close_code::POLICY, reason).await;
                            open = false;
                        }
                    }
                }
                Event::Ping(payload) => {
                    let pong = self
                        .relay
                        .engine()
                        .control(self.slot, frame::pong(&payload));
                    open = pong.await.is_ok();
                }
                Event::Pong => {}
                Event::Close { code } => {
                    let echo = code.unwrap_or(close_code::NORMAL);
                    let why = DisconnectReason::ClientClose;
                    let _ = self.relay.engine().close(self.slot, echo, "", why).await;
                    open = false;
                }
            }
        }
        // Keep the (empty) allocation only if it is small.
        if events.capacity() <= 8 {
            self.events = events;
        }
        open
    }

    async fn close(&self, code: u16, reason: &'static str) {
        self.close_for(code, reason, DisconnectReason::ProtocolError)
            .await;
    }

    async fn close_for(&self, code: u16, reason: &'static str, why: DisconnectReason) {
        let _ = self
            .relay
            .engine()
            .close(self.slot, code, reason, why)
            .await;
    }

    /// After the server decided to close: read and discard until the client closes or the
    /// shard frees the connection (which shuts the socket down, ending this with end-of-file).
    /// Reading on keeps the kernel from answering the client's late bytes with a reset that
    /// could destroy our close frame before the client reads it.
    async fn drain(&mut self, stream: &Socket) {
        loop {
            if readable(stream).await.is_err() {
                return;
            }
            let done = SCRATCH.with_borrow_mut(|buf| match stream.try_read(buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            });
            if done {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    /// The reader task lives as long as its connection: its future must stay small. An
    /// `async fn serve(self, ..)` made it 760 bytes; the peer address costs 32.
    #[tokio::test]
    async fn the_reader_task_stays_small() {
        let (relay, _inboxes) = fuzzing::detached_relay(crate::Config::default());
        let (server, _client) = UnixStream::pair().expect("a unix stream pair");
        let slot = Slot::new(0, 0, 1);
        let peer = SocketAddr::from(([192, 0, 2, 1], 40000));
        let publish = Publish::Refuse("no");
        let reader = Reader::new(relay, slot, Arc::default(), publish, peer, ());
        let task = reader.serve(Arc::new(Socket::Local(server)), Ok(()));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 512, "the reader task's future is {size} bytes");
    }

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut r = RateLimit::new(4);
        r.tat = start;
        for _ in 0..4 {
            assert!(r.allow(start));
        }
        assert!(!r.allow(start), "the fifth message in the same instant");
        assert!(r.allow(start + Duration::from_millis(250)));
        assert!(!r.allow(start + Duration::from_millis(250)));
        // A quiet second refills the whole burst, and no more.
        let later = start + Duration::from_secs(3);
        for _ in 0..4 {
            assert!(r.allow(later));
        }
        assert!(!r.allow(later));
    }
}
