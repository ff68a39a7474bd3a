//! Bench fixtures (`benches/engine.rs`), compiled only with feature `internals`; not part of
//! the API:
//! - [`FanoutFixture`]: a shard with subscribers and no sockets, for the in-process cost of
//!   appending one publish to the subscribers' ring (and, before the rings, pushing it onto
//!   every subscriber's queue).
//! - [`SocketFixture`]: a shard whose clients each have a real socket, for the whole path of a
//!   publish: fan-out, the flush that writes it to the sockets, and (untimed) reading it back
//!   at the far ends. Its API names no shard internals (queues, dirty lists), so the benches
//!   that use it measure any engine behind the same calls.
//!
//! What does not live here: the shard's own unit tests (`tests.rs`), which drive a shard
//! with real sockets on a paused clock.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;

use bytes::Bytes;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{ConnShared, Shard, ShardMsg};
use crate::Topic;
use crate::config::EngineConfig;
use crate::frame;
use crate::interest::Interest;
use crate::socket::Socket;

/// One shard with `k` subscribers of one topic and no sockets, for measuring the in-process
/// cost of fan-out (`benches/engine.rs`). Not part of the API (feature `internals`).
pub struct FanoutFixture {
    shard: Shard,
    topic: Topic,
    frame: Bytes,
}

impl FanoutFixture {
    /// `k` subscribers, each with a send budget large enough for `burst` frames of
    /// `payload` bytes between two [`FanoutFixture::drain`] calls.
    pub fn new(k: usize, payload: usize, burst: usize) -> Self {
        let frame = frame::encode(crate::Opcode::Binary, &vec![7u8; payload]);
        let (mut shard, topic) = lone_shard(frame.len() * burst);
        for id in 0..k as u64 {
            reserve(&mut shard, &topic, id);
        }
        Self {
            shard,
            topic,
            frame,
        }
    }

    /// Appends one frame to the subscribers' ring: what a shard does per publish.
    pub fn publish(&mut self) {
        self.shard.fan_out(&self.topic, &self.frame, None);
    }

    /// As [`FanoutFixture::publish`], with `frame` (shared with other threads).
    pub fn publish_frame(&mut self, frame: &Bytes) {
        self.shard.fan_out(&self.topic, frame, None);
    }

    /// The frame [`FanoutFixture::publish`] sends.
    pub fn frame(&self) -> Bytes {
        self.frame.clone()
    }

    /// Moves every cursor to the head of its ring, as writing to sockets would.
    pub fn drain(&mut self) {
        let shard = &mut self.shard;
        for (_, c) in shard.clients.iter_mut() {
            if let Some(ring) = c.ring.and_then(|r| shard.rings.get_mut(r as usize))
                && c.out.cursor < ring.head()
            {
                c.out.cursor = ring.head();
                ring.caught_up();
            }
            c.dirty = false;
        }
        for (_, ring) in shard.rings.iter_mut() {
            ring.dirty = false;
        }
        shard.dirty.clear();
        shard.dirty_rings.clear();
    }

    /// Frames delivered so far.
    pub fn deliveries(&self) -> u64 {
        self.shard.deliveries
    }
}

/// Kernel buffer asked for on each socket, both ways, at the least: far more than a round of
/// the benches' small frames. The kernel caps it at `net.core.wmem_max` / `rmem_max`.
const SOCKET_BUFFER: usize = 1 << 18;

/// One shard whose clients are all subscribed to one topic, each with a real socket (one end
/// of a local socket pair; the fixture holds the far ends). A round is one publish by each
/// publisher; every client receives every publish. Not part of the API (feature `internals`).
///
/// Use: [`round`](Self::round) or [`publish`](Self::publish), then [`flush`](Self::flush)
/// (what the shard does after a batch), then [`read_all`](Self::read_all) before the
/// sockets' buffers fill: the fixture never waits for a socket to become writable again, so a
/// write the kernel refuses is never retried, and `read_all` then fails.
///
/// The fixture owns the (current-thread) tokio runtime its sockets are registered with; the
/// caller needs none.
pub struct SocketFixture {
    shard: Shard,
    topic: Topic,
    frame: Bytes,
    /// Publishes per round: 1 for [`SocketFixture::fanout`], one per client for
    /// [`SocketFixture::chat`].
    publishers: usize,
    /// The clients' far ends, non-blocking, in the order the clients were attached.
    peers: Vec<StdUnixStream>,
    /// Publishes since the last `read_all`: each peer is owed a frame for each.
    unread: u64,
    buf: Vec<u8>,
    /// Declared last: dropped after the shard's sockets, which are registered with it.
    _runtime: Runtime,
}

impl SocketFixture {
    /// `k` subscribers of one topic and one publisher: a round is one publish, delivered to
    /// all `k`.
    pub fn fanout(k: usize, payload: usize) -> Self {
        Self::new(k, 1, payload)
    }

    /// `n` clients subscribed to one topic, each also publishing to it: a round is one
    /// publish by each, `n` publishes delivered to all `n` clients (`n * n` deliveries).
    pub fn chat(n: usize, payload: usize) -> Self {
        Self::new(n, n, payload)
    }

    fn new(clients: usize, publishers: usize, payload: usize) -> Self {
        let frame = frame::encode(crate::Opcode::Binary, &vec![7u8; payload]);
        let round_bytes = frame.len() * publishers;
        let (mut shard, topic) = lone_shard(round_bytes);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a tokio runtime");
        let peers = runtime.block_on(async {
            let mut peers = Vec::with_capacity(clients);
            for id in 0..clients as u64 {
                let key = reserve(&mut shard, &topic, id);
                let (stream, peer) = socket_pair(round_bytes).await;
                shard.handle(ShardMsg::Attach { key, id, stream });
                peers.push(peer);
            }
            peers
        });
        // Attaching marks every client dirty; this flush finds nothing to write.
        shard.end_batch();
        Self {
            shard,
            topic,
            frame,
            publishers,
            peers,
            unread: 0,
            buf: vec![0; 1 << 16],
            _runtime: runtime,
        }
    }

    /// One publish, handled as the shard handles a `Publish` from its inbox: the frame joins
    /// every subscriber's pending output; nothing is written until [`SocketFixture::flush`].
    pub fn publish(&mut self) {
        self.shard.handle(ShardMsg::Publish {
            topic: self.topic.clone(),
            frame: self.frame.clone(),
            skip: None,
            at: Instant::now(),
        });
        self.unread += 1;
    }

    /// One publish by each publisher (see [`SocketFixture::fanout`], [`SocketFixture::chat`]).
    pub fn round(&mut self) {
        for _ in 0..self.publishers {
            self.publish();
        }
    }

    /// What the shard does after a batch of messages: writes every client's pending output to
    /// its socket.
    pub fn flush(&mut self) {
        self.shard.end_batch();
    }

    /// Deliveries in one [`SocketFixture::round`]: publishers × clients.
    pub fn deliveries_per_round(&self) -> u64 {
        (self.publishers * self.peers.len()) as u64
    }

    /// Reads every far end until it has received each frame published since the last call,
    /// and returns the bytes read in all. Never blocks: a client still short once its socket
    /// has nothing more to read is a failure (its write was refused or it was dropped), and
    /// panics.
    pub fn read_all(&mut self) -> u64 {
        let owed = self.unread * self.frame.len() as u64;
        let mut total = 0;
        for (i, peer) in self.peers.iter_mut().enumerate() {
            let mut got = 0;
            while got < owed {
                let want = self.buf.len().min((owed - got) as usize);
                match peer.read(&mut self.buf[..want]) {
                    Ok(0) => panic!("client {i}: end of stream after {got} of {owed} bytes"),
                    Ok(n) => got += n as u64,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => panic!(
                        "client {i}: {got} of {owed} bytes, and nothing more to read \
                         (a socket buffer filled, or the shard dropped the client)"
                    ),
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            total += got;
        }
        assert_eq!(total, owed * self.peers.len() as u64, "bytes read in all");
        self.unread = 0;
        total
    }
}

/// A shard alone, with a send budget of at least `budget` bytes per client, and the topic
/// the fixtures subscribe to: no engine, so no inbox and no watcher of its interest.
fn lone_shard(budget: usize) -> (Shard, Topic) {
    let config = EngineConfig {
        shards: 1,
        send_queue_bytes: budget.max(1 << 20),
        ..EngineConfig::default()
    };
    let shard = Shard::new(0, config, Arc::new(Interest::new(None)));
    (shard, Topic::new("bench").expect("a valid topic"))
}

/// Reserves client `id`, subscribed to `topic`, as the handshake does; returns its key.
fn reserve(shard: &mut Shard, topic: &Topic, id: u64) -> usize {
    let (reply, mut answer) = oneshot::channel();
    shard.handle(ShardMsg::Reserve {
        id,
        topics: Box::new([topic.clone()]),
        conn: Arc::new(ConnShared::default()),
        guard: Box::new(()),
        expires: None,
        reply,
    });
    answer
        .try_recv()
        .expect("the shard answers a reservation at once")
}

/// A local socket pair with buffers for `round_bytes` at the least: the shard's end,
/// registered with the current runtime and seen writable by it (tokio tries a write only
/// then), and the far end, non-blocking.
async fn socket_pair(round_bytes: usize) -> (Arc<Socket>, StdUnixStream) {
    let (ours, peer) = StdUnixStream::pair().expect("a socket pair");
    let size = SOCKET_BUFFER.max(2 * round_bytes);
    let send = socket2::SockRef::from(&ours);
    send.set_send_buffer_size(size).expect("SO_SNDBUF");
    socket2::SockRef::from(&peer)
        .set_recv_buffer_size(size)
        .expect("SO_RCVBUF");
    // The kernel doubles what it is asked for and counts its own overhead in it.
    let granted = send.send_buffer_size().expect("SO_SNDBUF");
    assert!(
        granted >= 2 * round_bytes,
        "a {granted}-byte send buffer is too small for a {round_bytes}-byte round \
         (raise net.core.wmem_max)"
    );
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    let ours = tokio::net::UnixStream::from_std(ours).expect("registered");
    ours.writable().await.expect("a fresh socket is writable");
    (Arc::new(Socket::Local(ours)), peer)
}
